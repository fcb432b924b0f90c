"""Atomic file writes: write a hidden temporary, fsync, rename; a reader never sees half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from featx.errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            f = open(tmp, "wb")  # noqa: SIM115 (closed below)
        except OSError as e:
            e.filename = str(path.parent)  # the folder to fix, not a hidden temporary
            raise
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file; say which one
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX needs the directory entry flushed too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive(folder: Path, what: str):
    """Hold `folder/.lock` while writing there; a second writer gets a clear error at once."""
    try:
        lock = open(Path(folder) / ".lock", "a")  # noqa: SIM115 ("a": taking it must not touch it)
    except OSError as e:
        e.filename = str(folder)  # the folder to fix, not the hidden lock file
        raise
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                [f"out: another featx {what} is writing to {folder}; wait for it to finish"]
            ) from None
        yield
