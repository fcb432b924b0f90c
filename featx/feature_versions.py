"""Feature versions, the write side: what an extraction builds, and how it is published.

An extraction that would change what FEATURES_DIR holds (a new model, new or removed shards)
builds a new version folder beside the current one. A part whose shard and model are the same
as in the current version is linked from it (a hard link: no new bytes, no new forward pass),
so with the same model only new shards are embedded. When every part is there, the version's
manifest is marked complete and the pointer switches: first the `current` link (what pandas,
DuckDB and Polars read), then the root manifest (what featx reads). A reader therefore always
sees one whole version from one model, and a killed run resumes the version it was building.
Versions beyond `keep` are removed, newest kept, the current one always.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from featx import storage
from featx.dataset import SPLITS
from featx.embed import ShardTask
from featx.features import (
    CURRENT,
    FORMAT,
    MANIFEST,
    VERSIONS,
    part_metadata,
    part_name,
    read_manifest,
    write_manifest,
)
from featx.fsutil import remove_temporaries

_VERSION = re.compile(r"\d{6}$")


@dataclass
class VersionPlan:
    """The version an extraction writes into, and what it still has to embed."""

    name: str  # the version folder's name, e.g. "000004"
    folder: Path
    tasks: list[ShardTask] = field(default_factory=list)  # shards still to embed
    done: list[int] = field(default_factory=list)  # sample counts of parts already there
    linked: int = 0  # parts linked from the current version
    up_to_date: bool = False  # the current version already holds exactly this


def plan_version(dataset, card: dict, out: Path, sha: str, identity: dict) -> VersionPlan:
    """Compare the shards the dataset's card lists with the current version of `out` (parts
    made by checkpoint `sha` from the same shard bytes): up to date, or the version to build,
    with unchanged parts linked in and the rest as tasks. `identity` is the manifest a new
    version gets (its model and dataset); it is written, marked incomplete, before any part."""
    _migrate(out)
    root = read_manifest(out)
    current = root.get("current") if root else None
    cur_dir = out / VERSIONS / current if current else None
    # (split, tar, its card entry) of every shard, split by split in shard order: the card,
    # not a listing, says which shards are the dataset (ingest deletes replaced ones after it)
    wanted = [
        (split, storage.join(dataset, sh["shard"]), sh)
        for split in SPLITS
        for sh in sorted(card["shards"], key=lambda sh: sh["shard"])
        if sh["split"] == split
    ]

    def made_from(part: Path, st: dict) -> bool:
        if not part.exists():
            return False
        m = part_metadata(part)
        return m.get("shard_sha256") == st["sha256"] and m.get("checkpoint_sha256") == sha

    if cur_dir is not None:
        rels = {f"{s}/{part_name(t)}" for s, t, _ in wanted}
        have = {f"{p.parent.name}/{p.name}" for s in SPLITS for p in (cur_dir / s).glob("part-*")}
        if have == rels and all(made_from(cur_dir / s / part_name(t), st) for s, t, st in wanted):
            return VersionPlan(current, cur_dir, done=[st["samples"] for *_, st in wanted],
                               up_to_date=True)  # fmt: skip
    name = _building(out, current) or _next_name(out)
    folder = out / VERSIONS / name
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, {**identity, "version": name, "complete": False})
    plan = VersionPlan(name, folder)
    keep = set()
    for split, tar, st in wanted:
        part = folder / split / part_name(tar)
        keep.add(part)
        if made_from(part, st):  # finished by a killed run building this version
            plan.done.append(st["samples"])
            continue
        part.unlink(missing_ok=True)  # of another shard or model: this version's own, redone
        if cur_dir is not None and made_from(cur_dir / split / part.name, st):
            part.parent.mkdir(parents=True, exist_ok=True)
            _link(cur_dir / split / part.name, part)
            plan.done.append(st["samples"])
            plan.linked += 1
            continue
        rel = f"{split}/{part.name}"
        abs_tar = tar if storage.is_uri(tar) else Path(tar).resolve()
        plan.tasks.append(ShardTask(split, str(abs_tar), rel, st["samples"], st["sha256"]))
    for split in SPLITS:  # parts of shards the dataset no longer has
        for part in (folder / split).glob("part-*.parquet"):
            if part not in keep:
                part.unlink()
    return plan


def publish(out: Path, plan: VersionPlan, manifest: dict, keep: int) -> list[str]:
    """Mark the version complete and make it current; prune to `keep` versions. Returns the
    versions kept, oldest first."""
    rows = sum(plan.done) + sum(t.samples for t in plan.tasks)
    entry = {**manifest, "version": plan.name, "complete": True, "rows": rows}
    write_manifest(plan.folder, entry)
    with contextlib.suppress(OSError):  # a file system without links: the manifest suffices
        link = out / f".{CURRENT}.tmp{os.getpid()}"
        link.unlink(missing_ok=True)
        os.symlink(f"{VERSIONS}/{plan.name}", link)
        os.replace(link, out / CURRENT)
    kept = prune(out, plan.name, keep)
    history = [_summary(out / VERSIONS / v) for v in kept]
    write_manifest(out, {**entry, "format": FORMAT, "current": plan.name, "versions": history})
    return kept


def prune(out: Path, current: str, keep: int) -> list[str]:
    """Remove complete versions beyond the newest `keep` (never `current`), and unfinished ones
    older than `current`; returns the versions left, oldest first."""
    names = versions(out)
    complete = [v for v in names if (read_manifest(out / VERSIONS / v) or {}).get("complete")]
    kept = set(complete[-max(1, keep) :]) | {current}
    for v in names:
        if v not in kept and (v in complete or v < current):
            shutil.rmtree(out / VERSIONS / v)
    return [v for v in versions(out) if v in kept]


def versions(out: Path) -> list[str]:
    """The version folders under `out`, oldest first."""
    root = Path(out) / VERSIONS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name))


def remove_partials(out: Path) -> int:
    """Hidden temporaries left by a killed run, in `out` and its version folders."""
    folders = [out, out / VERSIONS]
    for v in versions(out):
        folders += [out / VERSIONS / v, *(out / VERSIONS / v / s for s in SPLITS)]
    return sum(remove_temporaries(f) for f in folders)


def clear(out: Path) -> None:
    """--overwrite: what extract wrote (versions, link, manifest, parts of the old layout)."""
    for v in versions(out):
        shutil.rmtree(out / VERSIONS / v)
    if (out / CURRENT).is_symlink():
        (out / CURRENT).unlink()
    for s in SPLITS:
        for p in (out / s).glob("part-*.parquet") if (out / s).is_dir() else []:
            p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


def _building(out: Path, current: str | None) -> str | None:
    """An unfinished version newer than the current one (a killed run's): resumed."""
    for v in reversed(versions(out)):
        if current is not None and v <= current:
            return None
        if not (read_manifest(out / VERSIONS / v) or {}).get("complete"):
            return v
    return None


def _next_name(out: Path) -> str:
    names = versions(out)
    return f"{int(names[-1]) + 1 if names else 1:06d}"


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # no hard links here (another device, some network file systems)
        shutil.copyfile(src, dest)


def _summary(folder: Path) -> dict:
    m = read_manifest(folder) or {}
    keys = ("version", "checkpoint_sha256", "model_dir", "trained_on_fingerprint")
    return {k: m.get(k) for k in (*keys, "dataset_fingerprint", "rows", "created_at")}


def _migrate(out: Path) -> None:
    """A features folder of the layout before versions (parts at OUT/<split>/) becomes its
    version 000001, by renames only."""
    root = read_manifest(out)
    if root is None or root.get("current") or not any((out / s).is_dir() for s in SPLITS):
        return
    folder = out / VERSIONS / _next_name(out)
    folder.mkdir(parents=True)
    for s in SPLITS:
        if (out / s).is_dir():
            os.replace(out / s, folder / s)
    import pyarrow.parquet as pq

    done = [pq.read_metadata(p).num_rows for s in SPLITS for p in (folder / s).glob("part-*")]
    plan = VersionPlan(folder.name, folder, done=done)
    publish(out, plan, {**root, "format": FORMAT}, keep=1 << 30)
