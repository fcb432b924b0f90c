"""What an ingest run does, decided before any decoding: the modality and class map (checked
against the shards already there), the inputs no finished shard holds or a cached reject
covers, and the order they are written in."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from featx import normalize as N
from featx.config import IngestConfig
from featx.dataset import REJECTED
from featx.dataset import reasons as R
from featx.errors import ConfigError
from featx.fsutil import sha256_file
from featx.sources import Item, Reject

log = logging.getLogger(__name__)


def write_order(items: list[Item], known: dict[str, str]) -> dict[str, bytes]:
    """The order inputs are decoded and written in: a hash of the source path, not path order.
    Class folders would otherwise become shards of one class each, and a loader that streams
    shards (with a shuffle buffer much smaller than a shard) would feed training batches of
    one or two classes. Measured on real digits with 2 workers: the attention family stalled
    at 0.44 val accuracy on path-ordered shards.

    Inputs with identical bytes share the place of the first of them in path order and follow
    it in path order, so the copy kept is the first by path and the others are its duplicates,
    as in a path-ordered run. Only inputs that share a size with another are hashed here, and
    not those a finished shard holds (`known`: source to sha256). The order is computed over
    every input found, so a resumed run writes exactly the shards an uninterrupted one would."""
    by_size: dict[int, list[Item]] = {}
    for it in items:
        by_size.setdefault((it.path is None, it.size), []).append(it)
    order = {}
    for group in by_size.values():
        firsts: dict[str, Item] = {}
        for it in sorted(group, key=lambda it: it.source):
            first = it
            if len(group) > 1:
                try:
                    digest = known.get(it.source) or _digest(it)
                except OSError:
                    digest = it.source  # unreadable: the decoder says why
                first = firsts.setdefault(digest, it)
            order[it.source] = _hash(first.source) + it.source.encode("utf-8", "surrogateescape")
    return order


def _digest(it: Item) -> str:
    if it.path is None:
        return hashlib.sha256((it.text or "").encode("utf-8")).hexdigest()
    return sha256_file(Path(it.path))


def _hash(source: str) -> bytes:
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).digest()


def pending_inputs(out: Path, items: list[Item], rejects: list[Reject], prior: list[dict]):
    """Inputs that no finished shard holds, minus rejects cached from earlier runs: decode
    rejects from rejected.jsonl, and every reject a finished shard recorded (a run killed
    before writing rejected.jsonl must not decode and count those inputs again). Transient
    rejects (unreadable, out of memory, a crashed decoder) and duplicates are not cached:
    tried again."""
    done = {e["source"]: e for st in prior for e in st["entries"]}
    cached = {}
    if (out / REJECTED).exists():
        for line in (out / REJECTED).read_text().splitlines():
            r = json.loads(line)
            if r["reason"] not in R.TRANSIENT | {R.DUPLICATE} and r.get("mtime_ns"):
                cached[(r["source"], r.get("size"), r["mtime_ns"])] = r
    for st in prior:
        for r in st.get("rejects", []):
            # a duplicate is decided again: the sample it duplicated may have left
            if r["reason"] not in R.TRANSIENT | {R.DUPLICATE} and r.get("mtime_ns"):
                cached[(r["source"], r.get("size"), r["mtime_ns"])] = r
    pending = []
    for it in items:
        if it.source in done:  # (an edited source's entry left `prior` already)
            continue
        r = cached.get((it.source, it.size, it.mtime_ns))
        if r is not None:
            rejects.append(Reject(**r))
            continue
        pending.append(it)
    return pending, rejects


def detect_modality(cfg: IngestConfig, prior: list[dict], items: list[Item]) -> str:
    if cfg.modality:
        return cfg.modality
    if prior:
        return prior[0]["modality"]
    votes = Counter()
    step = max(1, len(items) // 64)
    for it in items[::step]:
        votes["text" if it.path is None else N.sniff(it.path)] += 1
    votes.pop(None, None)
    if not votes:
        raise ConfigError(
            [
                f"src: could not detect a modality in {cfg.src} (no image, audio or text files"
                " found); pass --modality image|text|audio"
            ]
        )
    (best, n), *rest = votes.most_common()
    if rest:
        log.warning("mixed inputs %s; ingesting as %s (force with --modality)", dict(votes), best)
    return best


def class_map(cfg: IngestConfig, prior: list[dict], items: list[Item]) -> dict[str, int]:
    """Class name -> index. A class seen for the first time gets the next index, so the
    indices of the samples already written never change."""
    labels = sorted({it.label for it in items if it.label is not None})
    classes: dict[str, int] = {}
    for st in prior:  # later shards may know more classes; an index never changes
        classes.update(st["classes"])
    classes = dict(sorted(classes.items(), key=lambda kv: kv[1]))
    for name in labels:
        if name not in classes:
            classes[name] = len(classes)
    return classes


def check_compatible(cfg: IngestConfig, prior: list[dict], modality: str) -> None:
    if not prior:
        return
    problems = []
    if prior[0]["modality"] != modality:
        problems.append(
            f"modality: {cfg.out} holds {prior[0]['modality']} shards, not {modality};"
            " use another --out or --overwrite"
        )
    old = prior[0]["normalisation"]
    for k, v in cfg.normalisation().items():
        if old.get(k) != v:
            problems.append(
                f"{k}: {cfg.out} was ingested with {old.get(k)!r}, not {v!r}; use the same"
                " value, another --out, or --overwrite to rebuild"
            )
    if problems:
        raise ConfigError(problems)
