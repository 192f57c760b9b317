"""A stop signal under Snakemake reaches every process of the job at once; training must still save and resume exactly."""
import os
import shutil
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
    "train": {"steps": 150, "save_every": 50, "learning_rate": 0.005, "seed": 3, "latent_sampling": "random"},
    "runs": {"demotok": {"init_text": "cat", "vectors": 2}},
    # the rerun goes on through evaluate: keep its sampling short, it is not what these tests check
    "evaluate": {"seeds": [1], "steps": 2, "validation_samples": 4, "checkpoint_grid": 2, "image_loss_timesteps": 2},
}
# SDXL: two text encoders, and buckets with mirrored copies so each image's size conditioning is in play
SDXL_CONFIG = {**CONFIG, "model": {"path": "builtin:tiny-sdxl"},
               "preprocess": {"size": 96, "mode": "bucket", "bucket_min_side": 64, "bucket_step": 16, "flip": True}}
TARGET = "out/train/demotok/demotok.safetensors"


def snakemake_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", TARGET]


def new_workdir(tmp_path_factory, name: str, config: dict = CONFIG) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


def untrained_copy(tmp_path_factory, name: str, finished: Path) -> Path:
    """A finished workflow's folder with everything of training removed: the stages before it stay done, as in a
    workflow that was stopped while training, so each test spends its time on the stop and the resume."""
    workdir = tmp_path_factory.mktemp(name)
    shutil.copytree(finished, workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("train", "train_demotok.log"))
    assert not (workdir / "out/train").exists() and not (workdir / "out/cache/train").exists()
    return workdir


def run_to_the_end(workdir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(snakemake_command(workdir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = new_workdir(tmp_path_factory, "uninterrupted")
    run_to_the_end(workdir)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(finished) -> torch.Tensor:
    return load_file(str(finished / TARGET))["emb_params"]


def stop_the_job_group(workdir: Path, stop: signal.Signals, kill_reader_first: bool = False) -> str:
    """Run the workflow as `snakemake ... | cat` in a process group of its own, and once train has saved step 50,
    send `stop` to the whole group, as Ctrl-C, scancel, pre-emption or a hard kill do. Returns what the terminal
    (cat's output) was shown."""
    shown = workdir / "terminal.txt"
    pipeline = " ".join(f"'{part}'" for part in snakemake_command(workdir)) + f" 2>&1 | cat > '{shown}'"
    group = subprocess.Popen(["bash", "-c", pipeline], start_new_session=True)
    periodic = workdir / "out/train/demotok/steps/demotok-50.safetensors"
    state = workdir / "out/cache/train/demotok"  # the step-50 save ends with the full state (written atomically)
    deadline = time.monotonic() + 300
    while not (periodic.exists() and any(state.glob("*/state.pt"))):
        assert group.poll() is None and time.monotonic() < deadline, f"train never saved step 50: {shown.read_text()[-3000:]}"
        time.sleep(0.02)
    if kill_reader_first:  # the process reading the trainer's output dies before the trainer hears anything
        subprocess.run(["pkill", "-KILL", "-g", str(group.pid), "-x", "cat"], check=True)
        time.sleep(0.3)
    if stop == signal.SIGKILL:
        os.killpg(group.pid, stop)
    else:  # as a terminal or a scheduler does: every process of the job, while the terminal (cat) stays to show what is said
        subprocess.run(["pkill", f"-{stop.name}", "-g", str(group.pid), "-f", "snakemake|stages.train"], check=True)
    wait_for(lambda: not subprocess.run(["pgrep", "-g", str(group.pid), "-f", "stages.train"], capture_output=True).stdout,
             f"the trainer did not stop within 2 minutes of {stop.name}", group)
    # Snakemake itself can hang when the reader of its own output is gone (its job-end callback dies writing the
    # log). That is Snakemake's, not the job's, and the trainer has saved by now: give it time, then end it.
    try:
        wait_for(lambda: group.poll() is not None and not group_alive(group.pid), "snakemake is still running", group, seconds=30)
    except AssertionError:
        assert kill_reader_first, f"snakemake did not exit after {stop.name} although its terminal was alive"
        os.killpg(group.pid, signal.SIGKILL)
        wait_for(lambda: group.poll() is not None and not group_alive(group.pid), "the job group survived SIGKILL", group)
    return shown.read_text()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)  # a zombie still counts as a member: callers reap the shell with poll() first
        return True
    except ProcessLookupError:
        return False


def wait_for(done, message: str, group: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        group.poll()
        left = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(group.pid)], capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"{message}:\n{left}"
        time.sleep(0.1)


def saved_steps(workdir: Path, folder: str = "steps") -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in (workdir / "out/train/demotok" / folder).glob("demotok-*.safetensors"))


@pytest.mark.parametrize("stop, kill_reader_first", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, False)],
                         ids=["group-sigterm", "reader-killed-first", "ctrl-c"])
def test_a_stop_signal_to_the_job_group_saves_and_the_rerun_resumes_exactly(tmp_path_factory, finished, uninterrupted, stop,
                                                                           kill_reader_first):
    workdir = untrained_copy(tmp_path_factory, "interrupted", finished)
    terminal = stop_the_job_group(workdir, stop, kill_reader_first)
    assert saved_steps(workdir) == [50]
    stopped = saved_steps(workdir, "interrupted")
    assert len(stopped) == 1 and 50 < stopped[0] < 100, stopped  # the stop saved, past the periodic save
    stopped_at = stopped[0]
    message = f"stopped by {stop.name} after step {stopped_at}"
    log = (workdir / "out/logs/train_demotok.log").read_text()
    assert message in log and "\r" not in log  # the log holds readable lines, not progress-bar frames
    assert "train demotok: step 15/150, loss " in log  # and the progress, a line every 10%
    if not kill_reader_first:
        assert message in terminal  # the trainer's own words reach the terminal, not only Snakemake's exit status
    assert not (workdir / TARGET).exists()
    # loss.csv is a declared output, so Snakemake deletes it with the failed job; its rows live on in the saved state

    run_to_the_end(workdir)  # the README's command, no flags: resumes
    assert f"resuming demotok from step {stopped_at} of 150" in (workdir / "out/logs/train_demotok.log").read_text()
    assert torch.equal(load_file(str(workdir / TARGET))["emb_params"], uninterrupted)  # bit-identical to never stopping


def test_sdxl_stops_on_sigterm_to_the_job_group_and_resumes_exactly(tmp_path_factory):
    straight = new_workdir(tmp_path_factory, "sdxl-uninterrupted", SDXL_CONFIG)
    run_to_the_end(straight)
    expected = load_file(str(straight / TARGET))
    assert sorted(expected) == ["clip_g", "clip_l"]

    workdir = untrained_copy(tmp_path_factory, "sdxl-interrupted", straight)
    stop_the_job_group(workdir, signal.SIGTERM)
    stopped = saved_steps(workdir, "interrupted")
    assert len(stopped) == 1 and 50 < stopped[0] < 100, stopped
    assert f"stopped by SIGTERM after step {stopped[0]}" in (workdir / "out/logs/train_demotok.log").read_text()
    run_to_the_end(workdir)
    assert f"resuming demotok from step {stopped[0]} of 150" in (workdir / "out/logs/train_demotok.log").read_text()
    resumed = load_file(str(workdir / TARGET))
    for key in ("clip_l", "clip_g"):
        assert torch.equal(resumed[key], expected[key]), key  # both encoders' vectors bit-identical to never stopping


def test_a_hard_stop_leaves_a_lock_that_the_next_run_removes(tmp_path_factory, finished, uninterrupted):
    """SIGKILL (or a closed terminal's SIGHUP to snakemake) leaves Snakemake's lock; the plain command recovers and resumes."""
    workdir = untrained_copy(tmp_path_factory, "killed", finished)
    stop_the_job_group(workdir, signal.SIGKILL)
    assert list((workdir / ".snakemake" / "locks").glob("*.lock")), "a hard stop leaves the lock behind"
    rerun = run_to_the_end(workdir)
    assert "removed" in rerun.stderr and "left by a snakemake that was stopped hard" in rerun.stderr
    assert "resuming demotok from step 50 of 150" in (workdir / "out/logs/train_demotok.log").read_text()
    assert torch.equal(load_file(str(workdir / TARGET))["emb_params"], uninterrupted)


def test_snakemakes_sigterm_handler_cannot_deadlock_on_its_scheduler_lock():
    """Snakemake's own handler takes the scheduler's non-reentrant lock; run inside the signal while the
    scheduling loop holds that lock, it would wait forever. Deferred to a thread, it returns at once and
    takes effect as soon as the loop lets go."""
    import threading

    from snakemake.scheduling.job_scheduler import JobScheduler

    from stages.common.snakelock import defer_sigterm_handler

    assert defer_sigterm_handler() and defer_sigterm_handler()  # idempotent
    scheduler = JobScheduler.__new__(JobScheduler)  # only the two attributes the handler touches
    scheduler._lock, scheduler._open_jobs, scheduler._user_kill = threading.Lock(), threading.Semaphore(0), None
    with scheduler._lock:  # the scheduling loop is inside its critical section when SIGTERM lands
        scheduler.exit_gracefully(signal.SIGTERM, None)  # returns: the handler no longer blocks the main thread
        assert scheduler._user_kill is None
    assert scheduler._open_jobs.acquire(timeout=10)  # the deferred handler ran once the lock was free
    assert scheduler._user_kill == "graceful"
