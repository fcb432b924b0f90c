"""Nearest-neighbour index over extracted features, kept beside them and versioned with them.

    FEATURES_DIR/versions/000004/_index/
      index.json        what the index covers: segments, their parts, the centring mean
      seg-<hash>.faiss  one FAISS index per segment (a few parts' rows)

The index is a list of segments. A segment covers whole parts (one part per input shard), so
when a new feature version only adds or removes shards, segments whose parts are all still
there, unchanged, are linked from the previous version's index and only the new parts are
indexed (`build_index` is incremental, like extraction). A small segment is an exact inner-
product index; from `IVF_FROM` rows it is an IVF-Flat index (FAISS, chosen over usearch and
FAISS-HNSW by measurement: build time dominates on 2 cores, see README "Use the features").

Vectors are compared by the cosine of centred features: the mean of the rows the index was
first built on is subtracted and each row is scaled to unit length. Raw features of a trained
model share a large common component (ReLU outputs are all positive), which makes every
cosine high; centring leaves what tells samples apart.

Ids are stable across versions: (split, part number, row in part), packed into an int64, so a
reused segment still names the right rows. On a Ray cluster (`ray_address`) each segment is
built by a Ray task that reads its parts where they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featx import storage
from featx.dataset import SPLITS
from featx.features import VERSIONS, current_dir, part_files, part_metadata, read_manifest
from featx.fsutil import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_MANIFEST = "index.json"
FORMAT = "featx-index/1"
IVF_FROM = 50_000  # segments of fewer rows are exact (flat) indexes
SEGMENT_ROWS = 1_000_000  # most rows in one segment
MAX_SEGMENTS = 8  # past this many, the index is rebuilt whole
NPROBE = 32  # IVF cells searched per query: recall@10 >= 0.95 in the benchmark
_PART = re.compile(r"part-(\d+)\.parquet$")
_ROW_BITS, _PART_BITS = 24, 24  # up to 16M rows a part, 16M parts a split


def pack_ids(split: str, part: int, rows: np.ndarray) -> np.ndarray:
    """Stable int64 ids of rows `rows` of part number `part` of `split`."""
    code = SPLITS.index(split)
    return (np.int64(code) << (_ROW_BITS + _PART_BITS)) | (np.int64(part) << _ROW_BITS) | rows


def unpack_id(i: int) -> tuple[str, int, int]:
    i = int(i)
    mask = (1 << _ROW_BITS) - 1
    return SPLITS[i >> (_ROW_BITS + _PART_BITS)], (i >> _ROW_BITS) & mask, i & mask


def normalise(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred, unit-length rows (float32, C order): what the index holds and is asked."""
    Z = np.ascontiguousarray(X, dtype=np.float32) - mean
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z


@dataclass(frozen=True)
class Part:
    """One part of the indexed version: its path in the version and what made it."""

    rel: str  # "train/part-000003.parquet"
    rows: int
    shard_sha256: str
    checkpoint_sha256: str

    @property
    def split(self) -> str:
        return self.rel.split("/")[0]

    @property
    def number(self) -> int:
        return int(_PART.search(self.rel).group(1))


@dataclass
class IndexSummary:
    features: str
    version: str
    rows: int
    dim: int
    segments: int
    segments_built: int
    segments_reused: int
    up_to_date: bool = False
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)  # "flat"/"ivf" -> segments
    nodes: list[str] = field(default_factory=list)  # Ray nodes that built segments

    def to_dict(self) -> dict:
        return asdict(self)


def _parts(version_dir: Path) -> list[Part]:
    parts = []
    for p in part_files(version_dir):
        import pyarrow.parquet as pq

        m = part_metadata(p)
        parts.append(
            Part(
                f"{p.parent.name}/{p.name}",
                pq.read_metadata(p).num_rows,
                m.get("shard_sha256", ""),
                m.get("checkpoint_sha256", ""),
            )
        )
    return parts


def _read_part_vectors(path) -> np.ndarray:
    import pyarrow.parquet as pq

    if storage.is_uri(path):
        fs, p = storage.filesystem(path)
        table = pq.read_table(p, filesystem=fs, columns=["embedding"])
    else:
        table = pq.read_table(path, columns=["embedding"])
    emb = table["embedding"].combine_chunks()
    X = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return X.reshape(len(table), emb.type.list_size)


def _segment_name(parts: list[Part]) -> str:
    h = hashlib.sha256(
        json.dumps([[p.rel, p.shard_sha256, p.checkpoint_sha256] for p in parts]).encode()
    ).hexdigest()[:16]
    return f"seg-{h}.faiss"


def build_segment(
    version_dir, parts: list[dict], mean: list[float], seed: int = 0, serialize: bool = True
):
    """A FAISS index over `parts` (dicts of `Part`) of `version_dir` (a folder or URI): exact
    below IVF_FROM rows, else IVF-Flat trained on a sample of every part. The index's bytes.
    Reads the parts twice for IVF (sample, then add) so memory holds the index and one part."""
    import faiss

    mu = np.asarray(mean, dtype=np.float32)
    parts = [Part(**p) for p in parts]
    n = sum(p.rows for p in parts)
    dim = len(mu)
    if n < IVF_FROM:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        nlist = int(min(65536, 2 ** round(np.log2(4 * np.sqrt(n)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        take = min(n, 64 * nlist)
        rng = np.random.default_rng(seed)
        sample = []
        for p in parts:
            X = _read_part_vectors(storage.join(version_dir, p.rel))
            k = max(1, round(take * p.rows / n))
            sample.append(normalise(X[rng.choice(p.rows, min(k, p.rows), replace=False)], mu))
        index.train(np.concatenate(sample))
        del sample
        # nlist grows as 4 sqrt(n): search a share of the cells that keeps recall@10 (0.94 at
        # 1M x 64 with 32 cells, 0.97 with 64: tests/benchmarks/results-index.md)
        index.nprobe = max(NPROBE, nlist // 64)
    for p in parts:
        X = normalise(_read_part_vectors(storage.join(version_dir, p.rel)), mu)
        index.add_with_ids(X, pack_ids(p.split, p.number, np.arange(p.rows, dtype=np.int64)))
    # Bytes only for a Ray task's reply (a copy); here the caller writes the index itself:
    # serializing held the index twice more (3.8 GB peak at 1M x 256, 1.7 GB without).
    return faiss.serialize_index(index) if serialize else index


def _resolve(features) -> tuple[Path, str]:
    """The folder of the current version of `features` (a FEATURES_DIR or a version folder)
    and its name."""
    features = Path(features)
    manifest = read_manifest(features)
    if manifest is None:
        raise FileNotFoundError(
            f"No features in {features}: run `featx extract DATASET --checkpoint RUN_DIR "
            f"--out {features}` first"
        )
    folder = current_dir(features)
    if not part_files(folder):
        raise FileNotFoundError(f"No feature parts in {folder}")
    return folder, folder.name


def _previous_indexes(version_dir: Path) -> list[Path]:
    """Index folders of other versions of the same FEATURES_DIR, newest first."""
    root = version_dir.parent
    if root.name != VERSIONS:
        return []
    others = sorted((p for p in root.iterdir() if p.is_dir() and p != version_dir), reverse=True)
    return [p / INDEX_DIR for p in others if (p / INDEX_DIR / INDEX_MANIFEST).exists()]


def build_index(
    features,
    *,
    segment_rows: int = SEGMENT_ROWS,
    ray_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IndexSummary:
    """Build or bring up to date the index of the current version of `features`.

    Segments of an earlier version's index whose parts are all in this version, made from the
    same shard by the same model, are reused (hard-linked); the other parts are indexed anew,
    in segments of at most `segment_rows` rows, by Ray tasks when `ray_address` is given.
    `progress(done, total)` counts segments. A URI is indexed in a local staging copy and
    pushed back, under the store's writer lock.
    """
    if storage.is_uri(features):
        with storage.staged_output(features, what="index") as local:
            s = build_index(
                local, segment_rows=segment_rows, ray_address=ray_address, progress=progress
            )
        s.features = storage.display(features)
        return s
    t0 = time.perf_counter()
    folder, version = _resolve(features)
    out = folder / INDEX_DIR
    parts = _parts(folder)
    dim = len(_read_part_vectors(folder / parts[0].rel)[:1][0])
    have = _load_manifest(out)
    if have and [Part(**p) for s in have["segments"] for p in s["parts"]] and _covers(have, parts):
        return IndexSummary(
            str(features), version, sum(p.rows for p in parts), dim, len(have["segments"]),
            0, len(have["segments"]), up_to_date=True, kinds=_kinds(have),
        )  # fmt: skip
    by_id = {p: p for p in parts}
    reused, mean = [], None
    for prev_dir in [out, *_previous_indexes(folder)]:
        prev = _load_manifest(prev_dir)
        if not prev or prev.get("dim") != dim:
            continue
        mean = prev["mean"]
        for seg in prev["segments"]:
            seg_parts = [Part(**p) for p in seg["parts"]]
            if all(p in by_id for p in seg_parts):
                reused.append((prev_dir, seg))
        break
    covered = {Part(**p) for _, seg in reused for p in seg["parts"]}
    pending = [p for p in parts if p not in covered]
    groups = _groups(pending, segment_rows)
    if len(reused) + len(groups) > MAX_SEGMENTS:  # too fragmented: one rebuild
        reused, mean, groups = [], None, _groups(parts, segment_rows)
    if mean is None:
        mean = _mean(folder, parts).tolist()
    out.mkdir(exist_ok=True)
    segments = []
    for prev_dir, seg in reused:
        if prev_dir != out:
            _link(prev_dir / seg["file"], out / seg["file"])
        segments.append(seg)
    total = len(groups)
    if progress:
        progress(0, total)
    nodes: set[str] = set()
    for i, (group, data, node) in enumerate(_build_groups(folder, groups, mean, ray_address)):
        if node:
            nodes.add(node)
        name = _segment_name(group)
        if isinstance(data, np.ndarray | bytes):
            atomic_write_bytes(out / name, bytes(data))
        else:
            import faiss

            with atomic_path(out / name) as tmp:
                faiss.write_index(data, str(tmp))
            del data
        rows = sum(p.rows for p in group)
        segments.append(
            {
                "file": name,
                "rows": rows,
                "kind": "flat" if rows < IVF_FROM else "ivf",
                "parts": [asdict(p) for p in group],
            }
        )
        if progress:
            progress(i + 1, total)
    manifest = {
        "format": FORMAT,
        "library": "faiss",
        "metric": "cosine of centred features",
        "version": version,
        "dim": dim,
        "rows": sum(s["rows"] for s in segments),
        "mean": mean,
        "nprobe": NPROBE,
        "segments": segments,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(out / INDEX_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    keep = {s["file"] for s in segments}
    for p in out.glob("seg-*.faiss"):
        if p.name not in keep:
            p.unlink()
    return IndexSummary(
        str(features),
        version,
        manifest["rows"],
        dim,
        len(segments),
        len(groups),
        len(reused),
        seconds=round(time.perf_counter() - t0, 3),
        kinds=_kinds(manifest),
        nodes=sorted(nodes),
    )


def _kinds(manifest: dict) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for s in manifest["segments"]:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    return kinds


def _covers(manifest: dict, parts: list[Part]) -> bool:
    return sorted(
        (Part(**p) for s in manifest["segments"] for p in s["parts"]), key=lambda p: p.rel
    ) == sorted(parts, key=lambda p: p.rel)


def _groups(parts: list[Part], segment_rows: int) -> list[list[Part]]:
    groups: list[list[Part]] = []
    rows = 0
    for p in parts:
        if not groups or rows + p.rows > segment_rows:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += p.rows
    return groups


def _mean(folder: Path, parts: list[Part]) -> np.ndarray:
    total, n = None, 0
    for p in parts:
        X = _read_part_vectors(folder / p.rel).astype(np.float64)
        total = X.sum(0) if total is None else total + X.sum(0)
        n += len(X)
    return (total / max(n, 1)).astype(np.float32)


def _build_groups(folder: Path, groups, mean, ray_address):
    """(group, index bytes, Ray node or None) for each group: here, or as Ray tasks."""
    if not groups:
        return
    if ray_address is None:
        for g in groups:
            yield g, build_segment(str(folder), [asdict(p) for p in g], mean, serialize=False), None
        return
    import ray

    from featx.cluster import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(ray_address, worker_logs=False)
    try:
        task = ray.remote(num_cpus=1)(_segment_task)
        refs = {task.remote(str(folder), [asdict(p) for p in g], mean): g for g in groups}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            node, data = ray.get(done[0])
            yield refs[done[0]], data, node
    finally:
        if started:
            ray.shutdown()


def _segment_task(version_dir, parts, mean):
    """`build_segment` as a Ray task: (the node it ran on, the index's bytes)."""
    import ray

    return ray.get_runtime_context().get_node_id(), build_segment(version_dir, parts, mean)


def _link(src: Path, dest: Path) -> None:
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:
        import shutil

        shutil.copyfile(src, dest)


def _load_manifest(index_dir: Path) -> dict | None:
    path = Path(index_dir) / INDEX_MANIFEST
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    return m if m.get("format") == FORMAT else None


class Index:
    """A loaded index: `search` over every segment, `rows` to name what ids are."""

    def __init__(self, version_dir: Path, manifest: dict):
        import faiss

        self.folder = Path(version_dir)
        self.manifest = manifest
        self.mean = np.asarray(manifest["mean"], dtype=np.float32)
        self.segments = []
        for s in manifest["segments"]:
            ix = faiss.read_index(str(self.folder / INDEX_DIR / s["file"]))
            if s["kind"] == "ivf":
                ix.nprobe = max(manifest.get("nprobe", NPROBE), ix.nlist // 64)
            self.segments.append(ix)
        self._meta: dict[str, object] = {}

    @classmethod
    def open(cls, features) -> Index:
        """The index of the current version of `features`; built first if missing or stale."""
        folder, _ = _resolve(features)
        manifest = _load_manifest(folder / INDEX_DIR)
        if manifest is None or not _covers(manifest, _parts(folder)):
            log.info("indexing %s", folder)
            build_index(features)
            manifest = _load_manifest(folder / INDEX_DIR)
        return cls(folder, manifest)

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of the k nearest rows to each row of X (raw features),
        best first; -1 ids where fewer rows exist."""
        Q = normalise(np.atleast_2d(X), self.mean)
        sims, ids = [], []
        for ix in self.segments:
            s, i = ix.search(Q, k)
            sims.append(s)
            ids.append(i)
        sim, idx = np.concatenate(sims, 1), np.concatenate(ids, 1)
        sim = np.where(idx < 0, -np.inf, sim)
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sim, order, 1), np.take_along_axis(idx, order, 1)

    def range_search(self, X: np.ndarray, threshold: float):
        """For each row of X: (ids, similarities) of every indexed row with cosine >= threshold."""
        Q = normalise(np.atleast_2d(X), self.mean)
        per_row = [([], []) for _ in range(len(Q))]
        for ix in self.segments:
            lims, sim, idx = ix.range_search(Q, float(threshold))
            for r in range(len(Q)):
                a, b = lims[r], lims[r + 1]
                per_row[r][0].append(idx[a:b])
                per_row[r][1].append(sim[a:b])
        return [(np.concatenate(i), np.concatenate(d)) for i, d in per_row]

    def part_meta(self, split: str, number: int):
        """The key, split, label, label_name and source columns of one part (cached)."""
        import pyarrow.parquet as pq

        rel = f"{split}/part-{number:06d}.parquet"
        if rel not in self._meta:
            cols = ["key", "split", "label", "label_name", "source"]
            self._meta[rel] = pq.read_table(self.folder / rel, columns=cols).to_pandas()
        return self._meta[rel]

    def rows(self, ids) -> list[dict]:
        """key, split, label, label_name and source of each id."""
        out = []
        for i in ids:
            split, number, row = unpack_id(i)
            rec = self.part_meta(split, number).iloc[row].to_dict()
            out.append({k: (None if _isna(v) else v) for k, v in rec.items()})
        return out

    def vectors(self, keys: list[str]) -> tuple[np.ndarray, list[int]]:
        """The raw feature vectors of `keys` and their ids (KeyError names a missing key)."""
        import pyarrow.parquet as pq

        want = dict.fromkeys(keys)
        found: dict[str, tuple[np.ndarray, int]] = {}
        for s in self.manifest["segments"]:
            for p in s["parts"]:
                part = Part(**p)
                names = pq.read_table(self.folder / part.rel, columns=["key"])["key"].to_pylist()
                hits = [(r, k) for r, k in enumerate(names) if k in want and k not in found]
                if hits:
                    X = _read_part_vectors(self.folder / part.rel)
                    for r, k in hits:
                        found[k] = (X[r], int(pack_ids(part.split, part.number, np.int64(r))))
                if len(found) == len(want):
                    break
        missing = [k for k in keys if k not in found]
        if missing:
            raise KeyError(f"no sample with key {missing[0]!r} in {self.folder}")
        return np.stack([found[k][0] for k in keys]), [found[k][1] for k in keys]


def _isna(v) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def neighbors(
    features,
    *,
    key: str | None = None,
    vector: np.ndarray | None = None,
    file=None,
    k: int = 10,
):
    """The k nearest samples to one sample of `features` (`key`), a feature vector, or a new
    raw file (`file`: normalised as the dataset was, embedded by the features' model), as a
    pandas DataFrame: rank, key, split, label, label_name, source, similarity (cosine of
    centred features). A sample's own row is left out."""
    import pandas as pd

    if sum(x is not None for x in (key, vector, file)) != 1:
        raise ValueError("give exactly one of key, vector or file")
    index = Index.open(features)
    own = None
    if key is not None:
        X, ids = index.vectors([key])
        own = ids[0]
    elif file is not None:
        from featx.embed import embed_files

        X = embed_files(features, [file])
    else:
        X = np.atleast_2d(np.asarray(vector, dtype=np.float32))
    sims, ids = index.search(X, k + (own is not None))
    rows = []
    for s, i in zip(sims[0], ids[0], strict=True):
        if i < 0 or i == own:
            continue
        rows.append({**index.rows([i])[0], "similarity": round(float(s), 4)})
    df = pd.DataFrame(rows[:k])
    df.insert(0, "rank", range(1, len(df) + 1))
    return df
