"""Near-duplicates and split leakage, found with the features' index.

`find_duplicates` asks the index (`featx.index`) for every row's neighbours above a cosine
similarity, a block of rows at a time, and streams the pairs it finds to Parquet: memory holds
one block's pairs, the index, and a few small columns per row, never all pairs. It writes, into
`out` (default FEATURES_DIR/versions/<current>/_dedup/):

    pairs.parquet  every pair once: key_a, split_a, label_a, key_b, split_b, label_b, similarity
    summary.json   counts within and across splits, the worst pairs, the leaking samples
    exclude.txt    keys that `featx train --exclude` and `featx probe --exclude` leave out

A val or test sample leaks when its nearest train sample is a near-duplicate. The exclusion
list keeps the first of every group of copies (rows in order: train, val, test, then shard and
row) and lists the rest, and every leaking val or test sample: leaving them out leaves the
splits without near-duplicates across them, and every group of copies once.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featx.dataset import SPLITS
from featx.fsutil import atomic_path, atomic_write_text

DEDUP_DIR = "_dedup"
PAIRS, SUMMARY, EXCLUDE = "pairs.parquet", "summary.json", "exclude.txt"
WORST = 16  # pairs kept for the summary and the contact sheet
BLOCK = 2048  # rows asked at once
# IVF cells searched per row: pairs at cosine >= 0.95 share a cell or a neighbour; 8 found the
# same pairs as 32 at 1M rows, 3.4x faster (tests/benchmarks/results-index.md)
DEDUP_NPROBE = 8


@dataclass
class DedupSummary:
    features: str
    threshold: float
    rows: int
    pairs: int  # pairs at or above the threshold, each once
    by_splits: dict[str, int]  # "train-val" -> pairs
    leaking: dict[str, int]  # val/test -> samples whose nearest train sample is a near-duplicate
    excluded: int  # keys in exclude.txt
    worst: list[dict] = field(default_factory=list)
    out: str = ""
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    index_built_at: str = ""  # the index it read: a re-run on the same index is up to date
    up_to_date: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def headline(d: dict) -> str:
    """One line of a dedup summary (`DedupSummary.to_dict()`)."""
    leaks = ", ".join(f"{n} {s}" for s, n in d["leaking"].items()) or "none"
    return (
        f"{d['pairs']} near-duplicate pairs at cosine >= {d['threshold']:g} among {d['rows']} "
        f"rows; leaking into train: {leaks}; {d['excluded']} keys to exclude"
    )


def find_duplicates(
    features,
    *,
    threshold: float = 0.95,
    out=None,
    block: int = BLOCK,
    sheet: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DedupSummary:
    """Pairs of rows of the current version of `features` whose centred cosine similarity is
    at least `threshold`, within and across splits; see the module's docstring for what is
    written; `sheet` draws the worst pairs of an image dataset as pairs.png.
    `progress(done, total)` counts rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featx.index import Index, Part, _read_part_vectors, pack_ids, unpack_id

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a cosine similarity in (0, 1]")
    t0 = time.perf_counter()
    index = Index.open(features)
    for ix in index.segments:
        if hasattr(ix, "nprobe"):
            ix.nprobe = DEDUP_NPROBE
    folder = index.folder
    out = Path(out) if out is not None else folder / DEDUP_DIR
    out.mkdir(parents=True, exist_ok=True)
    built_at = index.manifest.get("built_at", "")
    if (out / SUMMARY).exists():  # the same index and threshold: nothing to redo
        saved = json.loads((out / SUMMARY).read_text())
        same = saved.get("threshold") == threshold and saved.get("index_built_at") == built_at
        if same and all(Path(f).exists() for f in saved.get("files", {}).values()):
            return DedupSummary(**{**saved, "up_to_date": True})
    parts = sorted(
        (Part(**p) for s in index.manifest["segments"] for p in s["parts"]),
        key=lambda p: (SPLITS.index(p.split), p.number),
    )
    # The keys and label names of every part, as Arrow arrays (compact, no Python objects).
    cols: dict[tuple[str, int], pa.Table] = {
        (p.split, p.number): pq.read_table(folder / p.rel, columns=["key", "label_name"])
        for p in parts
    }
    schema = pa.schema(
        [
            ("key_a", pa.string()),
            ("split_a", pa.string()),
            ("label_a", pa.string()),
            ("key_b", pa.string()),
            ("split_b", pa.string()),
            ("label_b", pa.string()),
            ("similarity", pa.float32()),
        ]
    )
    total = sum(p.rows for p in parts)
    by_splits: dict[str, int] = {}
    best_train: dict[int, float] = {}  # eval row id -> its best train similarity (>= T)
    excluded: set[int] = set()
    worst: list[tuple[float, int, int]] = []
    n_pairs = done = 0

    def names(ids: np.ndarray, column: str) -> list:
        return [cols[unpack_id(i)[:2]][column][unpack_id(i)[2]].as_py() for i in ids]

    with atomic_path(out / PAIRS) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for p in parts:
            X = _read_part_vectors(folder / p.rel)
            ids = pack_ids(p.split, p.number, np.arange(p.rows, dtype=np.int64))
            for lo in range(0, p.rows, block):
                found = index.range_search(X[lo : lo + block], threshold)
                qa, qb, qs = [], [], []
                for qid, (nids, sims) in zip(ids[lo : lo + block], found, strict=True):
                    qid = int(qid)
                    kept = qid not in excluded  # rows come in id order: its fate is known
                    for nid, sim in zip(nids.tolist(), sims.tolist(), strict=True):
                        if nid == qid:
                            continue
                        if p.split != "train" and unpack_id(nid)[0] == "train":
                            best_train[qid] = max(best_train.get(qid, -1.0), sim)
                        if nid < qid:
                            continue  # each pair once, from its first row's side
                        if kept:  # one of each group of copies stays: the first
                            excluded.add(nid)
                        qa.append(qid)
                        qb.append(nid)
                        qs.append(sim)
                    if qid in best_train:  # a leaking val/test row goes, whatever else
                        excluded.add(qid)
                if qa:
                    a, b = np.asarray(qa), np.asarray(qb)
                    w.write_table(
                        pa.table(
                            {
                                "key_a": names(a, "key"),
                                "split_a": [unpack_id(i)[0] for i in a],
                                "label_a": names(a, "label_name"),
                                "key_b": names(b, "key"),
                                "split_b": [unpack_id(i)[0] for i in b],
                                "label_b": names(b, "label_name"),
                                "similarity": np.asarray(qs, np.float32),
                            },
                            schema=schema,
                        )
                    )
                    for i, j, s in zip(qa, qb, qs, strict=True):
                        si, sj = unpack_id(i)[0], unpack_id(j)[0]
                        pair = "-".join(sorted((si, sj), key=SPLITS.index))
                        by_splits[pair] = by_splits.get(pair, 0) + 1
                        item = (s, -i, -j)
                        if len(worst) < WORST:
                            heapq.heappush(worst, item)
                        else:
                            heapq.heappushpop(worst, item)
                    n_pairs += len(qa)
                done += len(ids[lo : lo + block])
                if progress:
                    progress(done, total)
    leaking = {s: 0 for s in SPLITS[1:]}
    for qid in best_train:
        leaking[unpack_id(qid)[0]] += 1
    ex_ids = sorted(excluded)
    ex_keys = names(np.asarray(ex_ids, dtype=np.int64), "key") if ex_ids else []
    header = (
        f"# featx dedup: keys of near-duplicates (cosine >= {threshold:g}) to leave out, one "
        f"a line; from {index.folder}\n"
    )
    atomic_write_text(out / EXCLUDE, header + "".join(f"{k}\n" for k in ex_keys))
    worst_rows = []
    for s, ni, nj in sorted(worst, reverse=True):
        a, b = np.asarray([-ni]), np.asarray([-nj])
        worst_rows.append(
            {
                "key_a": names(a, "key")[0],
                "split_a": unpack_id(-ni)[0],
                "label_a": names(a, "label_name")[0],
                "key_b": names(b, "key")[0],
                "split_b": unpack_id(-nj)[0],
                "label_b": names(b, "label_name")[0],
                "similarity": round(float(s), 4),
            }
        )
    summary = DedupSummary(
        features=str(features),
        threshold=threshold,
        rows=total,
        pairs=n_pairs,
        by_splits=dict(sorted(by_splits.items())),
        leaking=leaking,
        excluded=len(ex_keys),
        worst=worst_rows,
        out=str(out),
        files={"pairs": str(out / PAIRS), "exclude": str(out / EXCLUDE)},
        index_built_at=built_at,
    )
    if sheet and worst_rows:
        png = _contact_sheet(index.folder, worst_rows, out / "pairs.png")
        if png:
            summary.files["contact_sheet"] = str(png)
    summary.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / SUMMARY, json.dumps(summary.to_dict(), indent=2) + "\n")
    summary.files["summary"] = str(out / SUMMARY)
    return summary


def read_exclusions(path) -> set[str]:
    """The keys of an exclusion list: one a line; blank lines and `#` comments are skipped."""
    from featx import storage

    text = storage.read_text(storage.location(path))
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def _contact_sheet(version_dir: Path, worst: list[dict], png: Path) -> Path | None:
    """The worst pairs side by side, for an image dataset that is still where extract read it."""
    from featx import storage
    from featx.dataset import load_card
    from featx.features import read_manifest

    dataset = (read_manifest(version_dir) or {}).get("dataset")
    if not dataset:
        return None
    dataset = storage.location(dataset)
    try:
        if load_card(dataset)["modality"] != "image":
            return None
    except FileNotFoundError:
        return None
    from featx.featmap import contact_sheet

    pairs = [
        (w["key_a"], w["key_b"], w["similarity"], f"{w['split_a']} / {w['split_b']}") for w in worst
    ]
    contact_sheet(dataset, pairs, png)
    return png
