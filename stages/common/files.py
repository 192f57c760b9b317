"""File helpers every stage needs: atomic writes, content hashes, CSV tables."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds.

    A crash or Ctrl-C mid-write leaves the previous file (or none), never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as temp:
        temp.write_text(text, encoding="utf-8")


def write_csv_atomic(target: str | Path, table: pd.DataFrame) -> None:
    with atomic_path(target) as temp:
        table.to_csv(temp, index=False)


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def prune_tree(root: str | Path, keep: Callable[[Path], bool]) -> tuple[int, int]:
    """Delete every file under `root` that `keep` refuses, then the folders left empty: (files, bytes) freed.

    The caches' `prune` options share this; each says in `keep` which of its entries are still in use.
    """
    root = Path(root)
    if not root.is_dir():
        return 0, 0
    files = freed = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if keep(path):
            continue
        freed += path.stat().st_size
        path.unlink()
        files += 1
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return files, freed
