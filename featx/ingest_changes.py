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
from dataclasses import dataclass, field
from pathlib import Path

from featx.dataset import SPLITS, ShardWriter, read_stats, stats_path, tar_members
from featx.sources import Item

_INDEX = re.compile(r"shard-(\d+)\.tar$")


@dataclass
class Changes:
    """Samples that leave the dataset this run, by shard (`split/shard-N.tar` -> keys)."""

    removed: dict[str, set[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # deleted, relabelled, ... -> samples

    def note(self, shard: str, key: str, why: str) -> None:
        self.removed.setdefault(shard, set()).add(key)
        self.counts[why] = self.counts.get(why, 0) + 1

    def live(self, prior: list[dict]) -> list[dict]:
        """`prior` stats without the entries that leave."""
        out = []
        for st in prior:
            gone = self.removed.get(st["shard"], ())
            out.append({**st, "entries": [e for e in st["entries"] if e["key"] not in gone]})
        return out


def find_changes(items: list[Item], prior: list[dict]) -> Changes:
    """Compare the inputs found now with the samples the finished shards hold."""
    now = {it.source: it for it in items}
    changes = Changes()
    for st in prior:
        for e in st["entries"]:
            it = now.get(e["source"])
            if it is None:
                changes.note(st["shard"], e["key"], "deleted")
            elif it.label != e["label"]:
                changes.note(st["shard"], e["key"], "relabelled")
            elif it.split is not None and it.split != st["split"]:
                changes.note(st["shard"], e["key"], "moved to another split")
            elif it.path is not None and (it.size, it.mtime_ns) != (e["size"], e["mtime_ns"]):
                from featx.fsutil import sha256_file

                if sha256_file(it.path) != e["sha256"]:
                    changes.note(st["shard"], e["key"], "edited")
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
        todo = [st for st in mine if st["shard"] in changes.removed or (compact and st in small)]
        group, size = [], 0
        for st in todo:
            n = st["samples"] - len(changes.removed.get(st["shard"], ()))
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
    stats naming the shards it replaces; returns its stats (None when no sample stays: the
    group's shards are then simply deleted after the card)."""
    split = group[0]["split"]
    names = [st["shard"] for st in group]
    writer = ShardWriter(out, split, index, 1 << 62, 1 << 62, {**extra, "replaces": names})
    try:
        for st in group:
            gone = changes.removed.get(st["shard"], set())
            by_key = {e["key"]: e for e in st["entries"]}
            for key, members in _samples(out / st["shard"]):
                if key not in gone:
                    writer.write(tar_members(key, members), by_key[key])
            for r in st.get("rejects", []):
                writer.note_reject(r)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.written[0] if writer.written else None


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
