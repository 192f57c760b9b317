"""Snakemake after a stop: a SIGTERM that cannot deadlock it, and its lock removed when no snakemake runs here.

Snakemake locks the working folder while it runs and removes the lock when it ends. A closed
terminal, a SIGKILL or a crash leaves the lock behind, and every later run then refuses to start
until `snakemake --unlock`. A lock is stale when no snakemake process on this machine works in
this folder; then it is removed, and the run goes on.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def _ancestors() -> set[int]:
    """This process and its parents: a `make run` or a shell that started this snakemake is no other snakemake."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def snakemake_running_in(folder: Path) -> list[int]:
    """PIDs of other snakemake processes on this machine whose working folder is `folder`."""
    folder, ours, found = folder.resolve(), _ancestors(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            argv = [os.fsdecode(arg) for arg in (entry / "cmdline").read_bytes().split(b"\0") if arg]
            if not any("snakemake" in Path(arg).name for arg in argv):  # .venv/bin/snakemake, or python -m snakemake
                continue
            if Path(os.readlink(entry / "cwd")).resolve() == folder or str(folder) in argv:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or another user's
    return found


def remove_stale_lock(folder: Path = Path(".")) -> list[Path]:
    """Remove .snakemake/locks/* when no other snakemake works in `folder`; return what was removed."""
    locks = sorted((folder / ".snakemake" / "locks").glob("*.lock"))
    if not locks or not Path("/proc/self").exists():
        return []  # without /proc there is no telling a live run from a dead one: leave Snakemake's message
    running = snakemake_running_in(folder)
    if running:
        return []  # a live run holds it: Snakemake's own message explains
    for lock in locks:
        lock.unlink(missing_ok=True)
    return locks


def defer_sigterm_handler() -> bool:
    """Run Snakemake's SIGTERM handler in a thread of its own instead of inside the signal.

    Snakemake 9's JobScheduler.exit_gracefully takes the scheduler's lock, a plain (non-reentrant)
    threading.Lock that the scheduling loop holds on the same main thread. A SIGTERM (scancel,
    pre-emption, `kill` on the group) that lands while the loop holds it deadlocks snakemake for
    good: its jobs stop and save, but snakemake hangs with the working folder locked. In a thread
    of its own, the handler simply waits for the loop to let go. Returns False when this Snakemake
    has no such handler (then nothing is changed).
    """
    try:
        from snakemake.scheduling.job_scheduler import JobScheduler
    except ImportError:
        return False
    original = getattr(JobScheduler, "exit_gracefully", None)
    if original is None or getattr(original, "deferred", False):
        return original is not None

    @functools.wraps(original)
    def exit_gracefully(self, *args):
        threading.Thread(target=original, args=(self, *args), name="snakemake-sigterm", daemon=True).start()

    exit_gracefully.deferred = True
    JobScheduler.exit_gracefully = exit_gracefully
    return True
