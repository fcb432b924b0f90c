"""What changed in SRC since the shards were written, and rewriting shards to match.

Samples leave the dataset when their source is deleted, its label or split is edited, or its
bytes change (then it is ingested again as it is now). A shard that loses samples is rewritten
without them, and small shards are merged (compaction), by the same kill-safe step:

1. the new shard is written (tar, then its stats, which name the shards it `replaces`);
2. the card is rewritten, listing the new shard and not those it replaces;
3. the replaced shards are deleted.

Readers follow the card, so they see the old shards or the new one, never both. A run killed
after 1 finishes 3 when the next run starts (`recover`); before 1, nothing changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from featx.dataset import SPLITS, ShardWriter, read_stats, stats_path, tar_members
from featx.fsutil import sha256_file
from featx.ingest_plan import Plan, light

_INDEX = re.compile(r"shard-(\d+)\.tar$")


@dataclass
class Changes:
    """Samples that leave the dataset this run: how many, by shard and by why; their keys
    stay in the plan (`keys`), read a shard at a time when it is rewritten."""

    leaving: dict[str, int] = field(default_factory=dict)  # `split/shard-N.tar` -> samples
    counts: dict[str, int] = field(default_factory=dict)  # deleted, relabelled, ... -> samples
    keys: Callable[[str], set[str]] = lambda shard: set()  # shard -> the keys that leave it


def find_changes(plan: Plan, prior: list[dict]) -> Changes:
    """Compare the inputs found now with the samples the finished shards hold."""
    split_of = {st["shard"]: st["split"] for st in prior}
    changes = Changes(keys=plan.gone_keys)

    def gone():
        for rid, shard, key, label, size, mtime_ns, sha256, it in plan.entries_with_inputs():
            if it is None:
                why = "deleted"
            elif it.label != label:
                why = "relabelled"
            elif it.split is not None and it.split != split_of[shard]:
                why = "moved to another split"
            elif (
                it.path is not None
                and (it.size, it.mtime_ns) != (size, mtime_ns)
                and sha256_file(it.path) != sha256
            ):
                why = "edited"
            else:
                continue
            changes.leaving[shard] = changes.leaving.get(shard, 0) + 1
            changes.counts[why] = changes.counts.get(why, 0) + 1
            yield rid, shard, key

    plan.leave(gone())
    return changes


def recover(out: Path) -> int:
    """Finish a rewrite a killed run left half done: delete the shards that a finished shard
    replaces, and the stats of a shard whose tar never arrived (or was being deleted).
    Returns how many shards it removed."""
    n = 0
    for split in SPLITS:
        for stats in sorted((out / split).glob("shard-*_stats.json")):
            tar = stats.with_name(stats.name[: -len("_stats.json")] + ".tar")
            if not tar.exists():
                stats.unlink()
                continue
            n += sum(_delete_shard(out / name) for name in read_stats(tar).get("replaces", []))
    return n


def next_index(stats: list[dict], split: str) -> int:
    """The index a new shard of `split` gets, given the `stats` of every finished shard: past
    each of them and every name one replaced, so a replaced name is never used again."""
    used = [-1]
    for st in stats:
        if st["split"] == split:
            used.append(int(_INDEX.search(st["shard"]).group(1)))
            used += [int(_INDEX.search(n).group(1)) for n in st.get("replaces", [])]
    return max(used) + 1


def plan_rewrites(
    stats: list[dict], changes: Changes, max_samples: int, compact_after: int, force: bool
) -> list[list[dict]]:
    """Groups of shards, each rewritten into one new shard: every shard that loses samples, and
    the small ones (under half of `max_samples`) of a split that has `compact_after` of them
    (any two or more with `force`). A group never holds more than `max_samples` samples."""
    groups = []
    for split in SPLITS:
        mine = [st for st in stats if st["split"] == split]
        small = [st for st in mine if st["samples"] < max_samples / 2]
        compact = len(small) >= 2 and (force or (compact_after and len(small) >= compact_after))
        todo = [st for st in mine if st["shard"] in changes.leaving or (compact and st in small)]
        group, size = [], 0
        for st in todo:
            n = st["samples"] - changes.leaving.get(st["shard"], 0)
            if group and size + n > max_samples:
                groups.append(group)
                group, size = [], 0
            group.append(st)
            size += n
        if group:
            groups.append(group)
    return groups


def rewrite(out: Path, group: list[dict], changes: Changes, index: int, extra: dict) -> dict | None:
    """Write the samples of `group` that stay into one new shard `index` of their split, its
    stats naming the shards it replaces; returns its `light` stats (None when no sample stays:
    the group's shards are then simply deleted after the card). Each shard's entries are read
    from its stats file, one shard at a time."""
    split = group[0]["split"]
    names = [st["shard"] for st in group]
    writer = ShardWriter(out, split, index, 1 << 62, 1 << 62, {**extra, "replaces": names})
    try:
        for name in names:
            gone = changes.keys(name) if name in changes.leaving else set()
            st = read_stats(out / name)
            by_key = {e["key"]: e for e in st["entries"]}
            for key, members in _samples(out / name):
                if key not in gone:
                    writer.write(tar_members(key, members), by_key[key])
            for r in st.get("rejects", []):
                writer.note_reject(r)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return light(writer.written[0]) if writer.written else None


def _samples(tar_path: Path):
    """(key, {ext: bytes}) of a featx shard, in order, read with tarfile: a rewrite needs no
    decoding, and webdataset's import (which loads torch) costs 1.7 s."""
    import tarfile

    key, members = None, {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            k, ext = m.name.split(".", 1)
            if k != key and members:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(m).read()
    if members:
        yield key, members


def delete_replaced(out: Path, groups: list[list[dict]]) -> int:
    return sum(_delete_shard(out / st["shard"]) for group in groups for st in group)


def _delete_shard(tar: Path) -> int:
    """Delete a shard featx wrote (its tar, then its stats); 1 if it was there."""
    if not stats_path(tar).exists() and not tar.exists():
        return 0
    tar.unlink(missing_ok=True)
    stats_path(tar).unlink(missing_ok=True)
    return 1
