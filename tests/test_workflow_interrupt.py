"""A stop signal under Snakemake reaches every process of the job at once; training must still save and resume exactly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO

CONFIG = {
    "out_dir": "out",
    "preprocess": {"size": 64},
    "train": {"steps": 300, "save_every": 100, "learning_rate": 0.005, "seed": 3, "latent_sampling": "random"},
    "runs": {"demotok": {"init_text": "cat", "vectors": 2}},
}
TARGET = "out/train/demotok/demotok.safetensors"


def snakemake_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", TARGET]


def new_workdir(tmp_path_factory, name: str) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return workdir


def run_to_the_end(workdir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(snakemake_command(workdir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> torch.Tensor:
    workdir = new_workdir(tmp_path_factory, "uninterrupted")
    run_to_the_end(workdir)
    return load_file(str(workdir / TARGET))["emb_params"]


def stop_the_job_group(workdir: Path, kill_reader_first: bool) -> str:
    """Run the workflow as `snakemake ... | cat` in a process group of its own, and once train has saved step 100,
    SIGTERM the whole group, as Ctrl-C, scancel or pre-emption do. Returns what the terminal (cat) was shown."""
    shown = workdir / "terminal.txt"
    pipeline = " ".join(f"'{part}'" for part in snakemake_command(workdir)) + f" 2>&1 | cat > '{shown}'"
    group = subprocess.Popen(["bash", "-c", pipeline], start_new_session=True)
    periodic = workdir / "out/train/demotok/steps/demotok-100.safetensors"
    deadline = time.monotonic() + 300
    while not periodic.exists():
        assert group.poll() is None and time.monotonic() < deadline, f"train never saved step 100: {shown.read_text()[-3000:]}"
        time.sleep(0.02)
    if kill_reader_first:  # the process reading the trainer's output dies before the trainer hears anything
        subprocess.run(["pkill", "-KILL", "-g", str(group.pid), "-x", "cat"], check=True)
        time.sleep(0.3)
    os.killpg(group.pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while True:  # wait for every process of the group (the trainer saving last), not just the shell
        group.poll()  # reap the shell: a zombie still counts as a member of the group
        try:
            os.killpg(group.pid, 0)
        except ProcessLookupError:
            break
        left = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(group.pid)], capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"the job's processes did not stop within 2 minutes of SIGTERM:\n{left}"
        time.sleep(0.1)
    return shown.read_text()


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in (workdir / "out/train/demotok/steps").glob("demotok-*.safetensors"))


@pytest.mark.parametrize("kill_reader_first", [False, True], ids=["group-sigterm", "reader-killed-first"])
def test_sigterm_to_the_job_group_saves_and_the_rerun_resumes_exactly(tmp_path_factory, uninterrupted, kill_reader_first):
    workdir = new_workdir(tmp_path_factory, "interrupted")
    stop_the_job_group(workdir, kill_reader_first)
    steps = saved_steps(workdir)
    assert steps[0] == 100 and len(steps) == 2 and 100 < steps[1] < 200, steps  # the stop saved, past the periodic save
    stopped_at = steps[1]
    log = (workdir / "out/logs/train_demotok.log").read_text()
    assert f"stopped by SIGTERM after step {stopped_at}" in log
    assert not (workdir / TARGET).exists()

    rerun = run_to_the_end(workdir)  # the README's command, no flags: resumes
    assert f"resuming demotok from step {stopped_at} of 300" in (workdir / "out/logs/train_demotok.log").read_text()
    assert torch.equal(load_file(str(workdir / TARGET))["emb_params"], uninterrupted)  # bit-identical to never stopping
    assert rerun.returncode == 0
