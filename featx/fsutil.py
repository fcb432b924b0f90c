"""Atomic file writes: write a hidden temporary, fsync, rename; a reader never sees half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from featx.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary beside `path` to write a file into; publish it when the block
    ends: fsync it, rename it onto `path` and fsync the folder, so `path` is the old file or
    the whole new one, also after a crash. On any exception the temporary is removed.

    The one way featx writes a file under its final name: anything that can write to a path
    (torch.save, savefig, a download) goes through it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            e.filename = str(path)  # name the file being written, not a hidden temporary
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        try:
            f = open(tmp, "wb")  # noqa: SIM115 (closed below)
        except OSError as e:
            e.filename = str(Path(path).parent)  # the folder to fix, not a hidden temporary
            raise
        with f:
            f.write(data)


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


def remove_temporaries(folder: Path) -> int:
    """Delete the hidden temporaries (`.NAME.tmp...`, files or folders) that a killed run left
    in `folder`; returns how many. Finished files never carry such a name, so none is touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
    return n
