"""profiles/slurm on a real one-node SLURM cluster (.ci/slurm-up: Debian's slurm-wlm and munge, no accounting daemon):
the demo workflow goes through the executor plugin, every stage as an sbatch job, and leaves its files.
Skipped, with .ci/slurm-up's reason, only where no such cluster answers and none can be started."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SLURM_UP = REPO / ".ci" / "slurm-up"
HARD_TIMEOUT_S = 300  # snakemake ignores SIGTERM while its jobs run: past this, its process group is killed
CLUSTER_STAGES = {"preprocess", "caption", "preflight_run", "cache_latents", "train", "evaluate"}  # all, overview and preflight (the page) are localrules

DEMO = {
    "out_dir": "out",
    "model": {"path": "builtin:tiny-sd15"},
    "dataset": {"images": "builtin:demo"},
    "preprocess": {"size": 64},
    "runs": {"demotok": {"init_text": "cat", "vectors": 1, "steps": 20, "save_every": 10}},
    "evaluate": {"prompts": ["a photo of [name]"], "seeds": [1], "steps": 2, "checkpoint_grid": 2, "validation_samples": 4},
}


@pytest.fixture(scope="module")
def slurm_node() -> dict[str, int]:
    """The cluster's one node (cpus, mem_mb), after .ci/slurm-up --no-install started what is installed."""
    if not SLURM_UP.is_file():
        pytest.skip(f"{SLURM_UP} is missing")
    try:
        setup = subprocess.run(["bash", str(SLURM_UP), "--no-install"], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM cluster: .ci/slurm-up did not finish within 180 s")
    if setup.returncode != 0:
        reason = (setup.stderr.strip() or setup.stdout.strip() or f"exit status {setup.returncode}").splitlines()[-1]
        pytest.skip(f"no SLURM cluster: {reason}")
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, timeout=30)
    cpus, mem_mb = sinfo.stdout.split()[:2]
    return {"cpus": int(cpus), "mem_mb": int(mem_mb.rstrip("+"))}


def slurm_test_profile(node: dict[str, int], logdir: Path) -> dict:
    """profiles/slurm with what a one-node test cluster needs instead; every other setting kept as it is.

    gpu becomes 0 and a GPU model or partition goes: the node has no GPU. threads and mem_mb shrink to what the node has.
    The executor plugin gets squeue as its status command (no accounting daemon, so sacct cannot answer),
    a first status check after 1 s instead of 40, and the sbatch logs kept in a folder of the test's."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    cap_mem = max(500, node["mem_mb"] // 2)
    profile["set-threads"] = {rule: min(threads, node["cpus"]) for rule, threads in profile["set-threads"].items()}
    for rule in CLUSTER_STAGES:  # gpu=0, not left out: the Snakefile's rules hold gpu=1 themselves
        profile["set-resources"].setdefault(rule, {})["gpu"] = 0
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        for key in ("gpu_model", "slurm_partition", "slurm_account"):
            resources.pop(key, None)
        if "mem_mb" in resources:
            resources["mem_mb"] = min(resources["mem_mb"], cap_mem)
    profile.update({
        "retries": 0,  # a failure shows at once, not after three more attempts
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-logdir": str(logdir),
        "slurm-keep-successful-logs": True,
    })
    return profile


def run_bounded(command: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, stdout + stderr); None as the status when the command ran past the timeout and was killed."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def test_the_demo_runs_through_the_slurm_profile_on_a_real_cluster(slurm_node, tmp_path):
    workdir, logdir, profile_dir = tmp_path / "work", tmp_path / "slurm-logs", tmp_path / "profile"
    workdir.mkdir()
    profile_dir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(DEMO))
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(slurm_test_profile(slurm_node, logdir)))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--profile", str(profile_dir)]

    started = time.monotonic()
    status, output = run_bounded(command, HARD_TIMEOUT_S)
    seconds = time.monotonic() - started
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", output)
    if status is None:
        if job_ids and shutil.which("scancel"):
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)
        pytest.fail(f"snakemake ran past {HARD_TIMEOUT_S} s and was killed:\n{output[-4000:]}")
    assert status == 0, output[-4000:]
    print(f"the SLURM run took {seconds:.0f} s")  # about a minute on 2 idle cores; pytest -s shows it

    out = workdir / "out"
    for name in ["train/demotok/demotok.safetensors", "evaluate/demotok/grid.png", "evaluate/index.html"]:
        assert (out / name).is_file(), name

    # every stage ran as its own sbatch job, but a run's pre-flight part and its training as one (the profile's
    # groups: one wait in the GPU queue): one SLURM job id each, and the job's log under the plugin's log folder
    jobs = {f"rule_{stage}" for stage in CLUSTER_STAGES - {"preflight_run", "train"}} | {"group_train_run_preflight_run_train"}
    assert len(set(job_ids)) == len(jobs), output[-4000:]
    logged = {log.relative_to(logdir).parts[0] for log in logdir.rglob("*.log")}
    assert logged == jobs, sorted(logdir.rglob("*"))
    assert {log.stem for log in logdir.rglob("*.log")} == set(job_ids)
