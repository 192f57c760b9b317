"""A stage's output: to the terminal while one is there, and to its log file as readable lines.

Under Snakemake a stop signal (Ctrl-C, scancel, pre-emption, a closed terminal) reaches every
process of the job at once, so whatever reads the stage's output may die before the stage has
saved. A write to a dead pipe or terminal must then cost nothing but that copy of the text: the
stage writes its own log file instead of being piped into `tee`, and a stream whose reader is
gone is quietly sent to /dev/null.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO


class ForgivingStream(io.TextIOBase):
    """Write through to `stream` until it fails (EPIPE, EIO), then to nowhere, never raising."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                self._abandon()
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._abandon()

    def _abandon(self) -> None:
        """The reader is gone: point the descriptor at /dev/null so the interpreter's own exit-time flush succeeds too."""
        stream, self.stream = self.stream, None
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError("the stream's reader is gone")
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


class LogLines:
    """A log file that keeps what a person reads: a progress bar's redrawn frames (`\\r`) collapse to the last one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8", errors="replace")
        self.pending = ""

    def write(self, text: str) -> None:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._write_line(line)

    def _write_line(self, line: str) -> None:
        frames = [frame for frame in line.split("\r") if frame.strip()]
        if frames:
            self.file.write(frames[-1].rstrip() + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.pending:
            self._write_line(self.pending)
            self.pending = ""
        self.file.close()


class Tee(io.TextIOBase):
    """One of the stage's streams: the terminal (forgiving) and the shared log file."""

    def __init__(self, terminal: ForgivingStream, log: LogLines | None):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        if self.log is not None:
            try:
                self.log.write(text)
            except (OSError, ValueError):
                self.log = None  # a full disk must not stop the stage either
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return self.terminal.encoding


@contextlib.contextmanager
def routed_output(log_path: Path | None) -> Iterator[LogLines | None]:
    """For the block, sys.stdout and sys.stderr survive a dead reader and, with `log_path`, copy to that file."""
    saved = sys.stdout, sys.stderr
    log = LogLines(Path(log_path)) if log_path else None
    sys.stdout = Tee(ForgivingStream(sys.stdout), log)
    sys.stderr = Tee(ForgivingStream(sys.stderr), log)
    try:
        yield log
    finally:
        sys.stdout, sys.stderr = saved
        if log is not None:
            log.close()
