"""The dataset card, dataset.json: what a dataset holds, written last by ingest.

Its fingerprint is a hash of the shards' hashes, so it changes exactly when the shards do.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from featx.dataset.layout import CARD, FORMAT, REJECTED
from featx.fsutil import atomic_write_text


def load_card(dataset) -> dict:
    """The dataset card of an ingested folder or URI, with a fix-it error when there is none."""
    from featx import storage

    try:
        return json.loads(storage.read_text(storage.join(dataset, CARD)))
    except FileNotFoundError:
        where = storage.display(dataset)
        raise FileNotFoundError(
            f"No {CARD} in {where}: did you run `featx ingest SRC {where}`?"
        ) from None


def build_card(
    *,
    modality: str,
    layout: str,
    source: str,
    classes: dict[str, int],
    normalisation: dict,
    stats: list[dict],
    rejected: dict[str, int],
    tokenizer: str | None,
    featx_version: str,
) -> dict:
    """The card of a dataset whose finished shards have these `stats` (in shard order), with
    class index `classes` and reject counts by reason `rejected`."""
    counts: dict[str, dict] = {}
    index = {i: name for name, i in classes.items()}
    for st in stats:
        c = counts.setdefault(st["split"], {"total": 0, "per_class": {}})
        c["total"] += st["samples"]
        for e in st["entries"]:
            name = e["label"] if e["label"] is not None else "(unlabelled)"
            c["per_class"][name] = c["per_class"].get(name, 0) + 1
    for c in counts.values():
        c["per_class"] = dict(sorted(c["per_class"].items()))
    shards = [{k: st[k] for k in ("shard", "split", "samples", "bytes", "sha256")} for st in stats]
    fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    return {
        "format": FORMAT,
        "featx_version": featx_version,
        "modality": modality,
        "layout": layout,
        "source": source,
        "classes": classes,
        "class_names": [index[i] for i in sorted(index)],
        "counts": dict(sorted(counts.items())),
        "normalisation": normalisation,
        "tokenizer": tokenizer,
        "shards": shards,
        "fingerprint": fingerprint,
        "rejected": {"total": sum(rejected.values()), "by_reason": rejected, "file": REJECTED},
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_card(out: Path, card: dict) -> None:
    """Publish the card atomically; ingest writes it last, after every shard it lists."""
    atomic_write_text(Path(out) / CARD, json.dumps(card, indent=2) + "\n")
