"""Find ingest inputs: a class-folder tree, a flat folder, or a CSV/JSONL manifest.

Discovery never follows a symlink out of SRC, never descends symlinked folders (no loops), and
never lets a manifest path leave the manifest's folder. What it refuses is returned as a rejected
record, so every input is accounted for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from featx.dataset import reasons as R
from featx.dataset.layout import SPLITS
from featx.errors import ConfigError


@dataclass(frozen=True)
class Item:
    """One input: a file (path) or a manifest row with inline text."""

    source: str  # path relative to the source root (POSIX), or "manifest.jsonl:LINE" for inline
    path: str | None
    label: str | None = None
    split: str | None = None
    text: str | None = None
    size: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str
    detail: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str | None = None

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def discover(src: Path) -> tuple[str, Iterator[Item | Reject]]:
    """The layout of `src`, and its inputs and what was refused, yielded as they are found (in
    walk or row order; the plan sorts them), so that no list of every input is held."""
    if src.is_file():
        return "manifest", _manifest(src)
    root = os.path.realpath(src)
    top = sorted(os.scandir(root), key=lambda e: e.name)
    has_dirs = any(e.is_dir(follow_symlinks=False) and not e.name.startswith(".") for e in top)
    layout = "class-folders" if has_dirs else "flat"
    return layout, _tree(root, layout)


def _tree(root: str, layout: str) -> Iterator[Item | Reject]:
    errors: list[Reject] = []  # from os.walk's callback, yielded in the order they happened

    def walk_error(e: OSError) -> None:
        errors.append(Reject(_rel(e.filename, root), R.UNREADABLE, e.strerror or str(e)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error, followlinks=False):
        yield from errors
        errors.clear()
        rel_dir = _rel(dirpath, root)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            rel = _rel(full, root)
            if d.startswith("."):
                yield Reject(rel, R.HIDDEN, "hidden folder skipped")
            elif os.path.islink(full):
                target = os.path.realpath(full)
                reason = R.SYMLINK_DIR if _inside(target, root) else R.SYMLINK_ESCAPE
                yield Reject(rel, reason, f"points to {_show(target, root)}")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = _rel(full, root)
            if name.startswith("."):
                yield Reject(rel, R.HIDDEN, "hidden file skipped")
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, root):
                    yield Reject(rel, R.SYMLINK_ESCAPE, f"points to {_show(target, root)}")
                    continue
                if not os.path.isfile(target):
                    yield Reject(rel, R.BROKEN_SYMLINK, "target missing or a loop")
                    continue
                full = target  # read the checked target itself, never through the link
            try:
                st = os.stat(full)
            except OSError as e:
                yield Reject(rel, R.UNREADABLE, e.strerror or str(e))
                continue
            if not _is_regular(st):
                yield Reject(rel, R.UNSUPPORTED, "not a regular file")
                continue
            label = None
            if layout == "class-folders":
                if rel_dir == "":
                    detail = "files must sit in SRC/<label>/"
                    yield Reject(rel, R.OUTSIDE_CLASSES, detail, st.st_size, st.st_mtime_ns)
                    continue
                label = rel_dir.split("/")[0]
            yield Item(rel, full, label, None, None, st.st_size, st.st_mtime_ns)
    yield from errors


def _rows(path: Path) -> Iterator[tuple[int, dict] | Reject]:
    """(line, row) of a manifest, or a Reject for a line that is no row."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield i + 2, row
        return
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield Reject(f"{path.name}:{i}", R.BAD_ROW, f"invalid JSON: {e.msg}")
                continue
            if not isinstance(row, dict):
                yield Reject(f"{path.name}:{i}", R.BAD_ROW, "not a JSON object")
                continue
            yield i, row


def _manifest(path: Path) -> Iterator[Item | Reject]:
    base = os.path.realpath(path.parent)
    rows = 0
    unlabelled: list[int] = []  # the first 10 lines without a label (shown in the error)
    n_unlabelled = 0
    # inline text already seen -> its first line, by the 64 bits of its hash that its source
    # holds: a few dozen bytes per inline row, the one thing a manifest's reading keeps
    texts: dict[int, int] = {}
    for found in _rows(path):
        if isinstance(found, Reject):
            yield found
            continue
        line, row = found
        rows += 1
        where = f"{path.name}:{line}"
        label = _clean(row.get("label"))
        if label is None:
            n_unlabelled += 1
            if len(unlabelled) < 10:
                unlabelled.append(line)
        split = _clean(row.get("split"))
        if split is not None and split not in SPLITS:
            yield Reject(where, R.BAD_ROW, f"split {split!r} is not one of {SPLITS}")
            continue
        text, rel = row.get("text"), _clean(row.get("path"))
        if rel is None:
            if isinstance(text, str):
                # Keyed by content, not by line number: inserting or deleting a row above it
                # leaves the text the same sample.
                source = inline_source(path.name, text)
                first = texts.setdefault(int(source[-16:], 16), line)
                if first != line:
                    detail = f"{where}: the same text as line {first}"
                    yield Reject(where, R.DUPLICATE, detail)
                    continue
                yield Item(source, None, label, split, text, len(text.encode()), 0)
            else:
                yield Reject(where, R.BAD_ROW, "needs a 'path' (or 'text' in JSONL)")
            continue
        if "\x00" in rel:  # no file name holds one; os calls would raise ValueError
            shown = rel.replace("\x00", "\\x00")
            yield Reject(shown, R.BAD_ROW, f"{where}: the path holds a NUL byte")
            continue
        full = os.path.realpath(os.path.join(base, rel))
        if os.path.isabs(rel) or not _inside(full, base):
            yield Reject(rel, R.PATH_ESCAPE, f"{where}: paths must stay under {base}")
            continue
        try:
            st = os.stat(full)
        except OSError as e:
            yield Reject(rel, R.MISSING, f"{where}: {e.strerror}")
            continue
        if not _is_regular(st):
            yield Reject(rel, R.UNSUPPORTED, f"{where}: not a regular file")
            continue
        source = _rel(full, base)
        yield Item(source, full, label, split, None, st.st_size, st.st_mtime_ns)
    if n_unlabelled and n_unlabelled < rows:
        # Either every row has a label (classes) or none has (unlabelled data): a mix would
        # train on some samples and crash, or silently drop the others. Raised once the
        # manifest is read, before any input is decoded.
        lines = ", ".join(map(str, unlabelled)) + (" ..." if n_unlabelled > 10 else "")
        raise ConfigError(
            [
                f"src: {n_unlabelled} of {rows} rows of {path.name} have no label "
                f"(lines {lines}); label every row, or none"
            ]
        )


def inline_source(manifest: str, text: str) -> str:
    """The source of an inline manifest text: the manifest's name and a hash of the text."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{manifest}#text-{digest[:16]}"


def _clean(v) -> str | None:
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _is_regular(st: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)  # normalised already; no Path: it interns each part
    rel = "" if rel == "." else rel.replace(os.sep, "/")
    # A file name need not be UTF-8 (Linux allows any bytes); show such bytes as \xNN so keys,
    # JSON and Parquet always get valid text. The file itself is read by its real path.
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _show(target: str, root: str) -> str:
    return _rel(target, root) if _inside(target, root) else "a path outside SRC"
