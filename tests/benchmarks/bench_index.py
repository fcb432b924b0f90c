"""The nearest-neighbour index and near-duplicate detection at a million rows, and the libraries.

For each dimension (`--dims`), a synthetic features folder of `--rows` rows is written in a temp
dir as `featx extract` writes one (versions/000001/<split>/part-NNNNNN.parquet + manifests):
clustered vectors like a trained model's features (n/200 centres, 1000 to 5000, with a decaying
spectrum, a common positive offset and per-cluster spread; the median cosine to a row's nearest
neighbour is ~0.8), in parts of 10k-20k rows over train/val/test (80/10/10), with `--planted`
near-duplicate pairs: a row copied over another with noise (cosine ~0.98-0.999 after centring),
about a third of them across splits. Then, each step in a fresh subprocess whose peak RSS is
its own `ru_maxrss` (from wait4):

  build   `build_index(features)`: wall time, peak RSS, index size on disk
  query   `Index.open(features).search(Q, 10)`, Q 10k rows of the data plus noise: queries/s
          and recall@10 against exact search (FAISS brute-force inner product on the same
          centred, normalised vectors, 1000 of the queries), at the default nprobe and others
  dedup   `find_duplicates(features, threshold=0.95, sheet=False)`: wall time, peak RSS against
          the size of the vectors, the planted pairs found, all pairs found

Then the libraries featx could have used, in memory, at `--compare-rows` rows of the same kind
of data for each dimension, each in its own subprocess: FAISS IVF-Flat (featx's choice, its nlist
rule), FAISS HNSW32 and usearch (HNSW, its defaults), by build time, recall@10 and queries/s at a
few search settings. FAISS and usearch use every core (OpenMP / threads=0).

Results: a markdown table on stdout, JSON (`--json`, default tests/benchmarks/results-index.json)
and a markdown section (`--md`, default tests/benchmarks/results-index.md); --quick (100k rows,
50k for the libraries) writes neither file unless named.
Usage: python tests/benchmarks/bench_index.py [--rows 1000000] [--dims 64,256] [--quick]
       [--planted 1000] [--nprobes 8,16,32,64,128] [--compare-rows 200000] [--no-compare]
       [--profile] [--workdir DIR] [--json F] [--md F]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import elapsed_since, machine_info, write_json, write_text

HERE = Path(__file__).resolve().parent
SPLIT_SHARE = {"train": 0.8, "val": 0.1, "test": 0.1}
PART_ROWS = (10_000, 20_000)
K = 10
N_QUERIES, N_TRUTH = 10_000, 1_000
QUERY_NOISE = 0.3  # relative noise on a query's source row: cosine ~0.96 to it
PLANT_NOISE = (0.05, 0.2)  # relative noise of a planted copy: cosine 0.98 to 0.999
THRESHOLD = 0.95  # find_duplicates' default
COMPARE_SETTINGS = {
    "faiss-ivf-flat": ("nprobe", (8, 16, 32, 64)),
    "faiss-hnsw32": ("efSearch", (16, 32, 64, 128)),
    "usearch": ("expansion_search", (16, 32, 64, 128)),
}
LIBRARY_NOTES = {
    "faiss-ivf-flat": "featx's choice: nlist by featx's rule, trained on 64 x nlist rows",
    "faiss-hnsw32": "IndexHNSWFlat M=32, efConstruction 40 (FAISS default)",
    "usearch": "f32, metric ip, connectivity 16, expansion_add 128 (usearch defaults)",
}


def mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def maxrss_mb() -> float:
    """This process's peak RSS so far (Linux: ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- data ---------------------------------------------------------------------------------------


def make_vectors(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n clustered float32 rows and their cluster: centres and noise share a power-law spectrum
    (a few strong directions, as real features have), every row a common positive offset (what
    featx's centring removes), each cluster its own spread. Made in chunks to bound memory."""
    rng = np.random.default_rng([seed, dim])
    scale = np.arange(1, dim + 1, dtype=np.float64) ** -0.5
    scale = (scale / np.sqrt((scale**2).mean())).astype(np.float32)
    n_centres = int(min(5000, max(1000, n // 200)))
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32) * scale
    spread = rng.uniform(0.5, 1.0, n_centres).astype(np.float32)
    offset = 3 * np.abs(rng.standard_normal(dim)).astype(np.float32)
    cluster = rng.integers(0, n_centres, n)
    X = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        c = cluster[lo : lo + 100_000]
        noise = rng.standard_normal((len(c), dim), dtype=np.float32) * scale
        X[lo : lo + len(c)] = centres[c] + spread[c, None] * noise + offset
    return X, cluster


def noisy_copies(X: np.ndarray, centre: np.ndarray, rel: np.ndarray, rng) -> np.ndarray:
    """Rows of X plus isotropic noise of `rel` times each row's centred norm: cosine to the row
    (after centring) ~ 1 / sqrt(1 + rel^2)."""
    norm = np.linalg.norm(X - centre, axis=1, keepdims=True)
    noise = rng.standard_normal(X.shape, dtype=np.float32)
    return (X + noise * (rel[:, None] * norm / np.sqrt(X.shape[1]))).astype(np.float32)


def layout(n: int, seed: int) -> list[tuple[str, int, int, int]]:
    """(split, part number, first row, rows) of every part: 80/10/10, parts of 10k-20k rows."""
    rng = np.random.default_rng([seed, 1])
    parts, start = [], 0
    for i, (split, share) in enumerate(SPLIT_SHARE.items()):
        rows = n - start if i == len(SPLIT_SHARE) - 1 else int(round(n * share))
        end, number = start + rows, 0
        while start < end:
            size = min(int(rng.integers(PART_ROWS[0], PART_ROWS[1] + 1)), end - start)
            parts.append((split, number, start, size))
            start, number = start + size, number + 1
    return parts


def step_generate(a: dict) -> dict:
    """Write the features folder and planted.json (the planted pairs by key)."""
    from featx.features import VERSIONS, make_table, write_manifest, write_part

    t0 = time.perf_counter()
    n, dim, seed, root = a["rows"], a["dim"], a["seed"], Path(a["features"])
    X, cluster = make_vectors(n, dim, seed)
    rng = np.random.default_rng([seed, 2])
    rows = rng.choice(n, 2 * a["planted"], replace=False)
    src, dst = rows[: a["planted"]], rows[a["planted"] :]
    rel = rng.uniform(*PLANT_NOISE, len(src)).astype(np.float32)
    X[dst] = noisy_copies(X[src], X.mean(0), rel, rng)
    cluster[dst] = cluster[src]
    parts = layout(n, seed)
    key_of = np.empty(n, dtype=object)
    folder = root / VERSIONS / "000001"
    for split, number, start, size in parts:
        keys = [f"{split}-{number:06d}-{i}" for i in range(size)]
        key_of[start : start + size] = keys
        labels = (cluster[start : start + size] % 100).tolist()
        table = make_table(
            keys=keys,
            split=split,
            labels=labels,
            label_names=[f"class{v}" for v in labels],
            sources=[f"src/{k}.png" for k in keys],
            embeddings=X[start : start + size],
            metadata={"shard_sha256": f"{seed}-{split}-{number}", "checkpoint_sha256": "c" * 64},
        )
        write_part(folder / split / f"part-{number:06d}.parquet", table)
    manifest = {"version": "000001", "complete": True, "dataset": str(root / "nowhere")}
    write_manifest(folder, manifest)
    write_manifest(root, {**manifest, "current": "000001"})
    split_of = {k: k.split("-")[0] for k in (key_of[src].tolist() + key_of[dst].tolist())}
    planted = [
        {"a": a_, "b": b_, "cross_split": split_of[a_] != split_of[b_]}
        for a_, b_ in zip(key_of[src].tolist(), key_of[dst].tolist(), strict=True)
    ]
    (root / "planted.json").write_text(json.dumps(planted))
    return {
        "parts": len(parts),
        "parts_per_split": {s: sum(p[0] == s for p in parts) for s in SPLIT_SHARE},
        "part_rows": [min(p[3] for p in parts), max(p[3] for p in parts)],
        "planted": len(planted),
        "planted_cross_split": sum(p["cross_split"] for p in planted),
        "vectors_mb": mb(X.nbytes),
        "parquet_mb": mb(sum(f.stat().st_size for f in folder.rglob("*.parquet"))),
        "seconds": elapsed_since(t0),
    }


# -- featx's index and dedup ------------------------------------------------------------------


def step_build(a: dict) -> dict:
    import faiss
    from benchlib import Spans

    import featx.index as fx

    rss_imports = maxrss_mb()
    spans = Spans()
    spans.wrap(fx, "_mean")
    spans.wrap(fx, "build_segment")
    peaks = {}
    serialize = faiss.serialize_index

    def serialize_index(index):  # the peak before and after the index is copied out
        peaks["before_serialize_mb"] = maxrss_mb()
        out = serialize(index)
        peaks["after_serialize_mb"] = maxrss_mb()
        return out

    faiss.serialize_index = serialize_index
    t0 = time.perf_counter()
    s = fx.build_index(a["features"])
    seconds = elapsed_since(t0)
    peaks["end_mb"] = maxrss_mb()
    index_dir = fx.current_dir(Path(a["features"])) / fx.INDEX_DIR
    manifest = json.loads((index_dir / fx.INDEX_MANIFEST).read_text())
    return {
        "seconds": seconds,
        "mean_s": round(spans.total("featx.index._mean"), 2),
        "segments_s": round(spans.total("featx.index.build_segment"), 2),
        "segments": s.segments,
        "kinds": s.kinds,
        "nlist": [_nlist(index_dir / seg["file"]) for seg in manifest["segments"]],
        "index_mb": mb(sum(f.stat().st_size for f in index_dir.iterdir())),
        "rss_after_imports_mb": rss_imports,
        "rss_marks_mb": peaks,
    }


def _nlist(path: Path) -> int | None:
    import faiss

    ix = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    return int(ix.nlist) if hasattr(ix, "nlist") else None


def _part_vectors(features: Path, vectors: bool = True):
    """(packed ids, raw vectors) of every part, in index id order, one part at a time; only the
    ids unless `vectors`."""
    from featx.index import _parts, _read_part_vectors, current_dir, pack_ids

    folder = current_dir(features)
    for p in _parts(folder):
        ids = pack_ids(p.split, p.number, np.arange(p.rows, dtype=np.int64))
        yield (ids, _read_part_vectors(folder / p.rel)) if vectors else ids


def exact_topk(Q: np.ndarray, features: Path, mean: np.ndarray, k: int):
    """Exact top-k ids and cosines of normalised queries Q over every row, part by part."""
    import faiss

    from featx.index import normalise

    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.full((len(Q), k), -1, np.int64)
    for ids, X in _part_vectors(features):
        s, i = faiss.knn(Q, normalise(X, mean), k, metric=faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids[i]], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_s, best_i


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return round(hits / exact.size, 4)


def step_query(a: dict) -> dict:
    from featx.index import NPROBE, Index, normalise

    rss_imports = maxrss_mb()
    features = Path(a["features"])
    t0 = time.perf_counter()
    index = Index.open(features)
    open_s = elapsed_since(t0)
    rss_open = maxrss_mb()
    # queries: rows of the data (any part) plus noise, read one part at a time
    rng = np.random.default_rng([a["seed"], 3])
    pick = np.sort(rng.choice(len(index), N_QUERIES, replace=False))
    rows, start = [], 0
    for _, X in _part_vectors(features):
        sel = pick[(pick >= start) & (pick < start + len(X))] - start
        rows.append(X[sel])
        start += len(X)
    raw = np.concatenate(rows)[rng.permutation(N_QUERIES)]
    Q = noisy_copies(raw, index.mean, np.full(len(raw), QUERY_NOISE, np.float32), rng)
    segments = zip(index.segments, index.manifest["segments"], strict=True)
    ivf = [ix for ix, s in segments if s["kind"] == "ivf"]
    default = ivf[0].nprobe if ivf else NPROBE  # what Index.open set: grows with nlist
    index.search(Q[:200], K)  # warm-up
    runs = {}
    for nprobe in sorted(set(a["nprobes"]) | {default}):
        for ix in ivf:
            ix.nprobe = nprobe
        t = time.perf_counter()
        _, ids = index.search(Q, K)
        runs[nprobe] = {"seconds": time.perf_counter() - t, "ids": ids[:N_TRUTH]}
    rss_search = maxrss_mb()
    t = time.perf_counter()
    _, exact = exact_topk(normalise(Q[:N_TRUTH], index.mean), features, index.mean, K)
    exact_s = time.perf_counter() - t
    return {
        "queries": N_QUERIES,
        "truth_queries": N_TRUTH,
        "k": K,
        "default_nprobe": default,
        "open_s": open_s,
        "segments": len(index.segments),
        "by_nprobe": [
            {
                "nprobe": p,
                "qps": round(N_QUERIES / r["seconds"]),
                "ms_per_query": round(1000 * r["seconds"] / N_QUERIES, 3),
                "recall_at_10": recall_at_k(r["ids"], exact),
            }
            for p, r in runs.items()
        ],
        "exact_qps": round(N_TRUTH / exact_s),  # brute force streaming the parts
        "rss_after_imports_mb": rss_imports,
        "rss_after_open_mb": rss_open,
        "rss_after_search_mb": rss_search,
    }


class _TimedSegment:
    """A FAISS index whose range_search is timed: FAISS's share of Index.range_search."""

    def __init__(self, ix, clock: list[float]):
        self._ix, self._clock = ix, clock

    def __getattr__(self, name):
        return getattr(self._ix, name)

    def __setattr__(self, name, value):  # nprobe and the like reach the FAISS index
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._ix, name, value)

    def range_search(self, *args):
        t = time.perf_counter()
        try:
            return self._ix.range_search(*args)
        finally:
            self._clock[0] += time.perf_counter() - t


def step_pairs_truth(a: dict) -> dict:
    """Every pair at cosine >= THRESHOLD with one end in a sample of rows, by brute force over
    the same centred, normalised vectors: what dedup should find for those rows."""
    from featx.index import INDEX_DIR, INDEX_MANIFEST, current_dir, normalise, unpack_id

    features = Path(a["features"])
    mean = json.loads((current_dir(features) / INDEX_DIR / INDEX_MANIFEST).read_text())["mean"]
    mean = np.asarray(mean, np.float32)
    parts = list(_part_vectors(features, vectors=False))
    n = sum(len(ids) for ids in parts)
    rng = np.random.default_rng([a["seed"], 5])
    pick = np.sort(rng.choice(n, a["sample"], replace=False))
    all_ids = np.concatenate(parts)
    sample_ids = all_ids[pick]
    rows, start = [], 0
    for _, X in _part_vectors(features):
        rows.append(X[pick[(pick >= start) & (pick < start + len(X))] - start])
        start += len(X)
    Q = normalise(np.concatenate(rows), mean)
    t0 = time.perf_counter()
    pairs = set()
    for ids, X in _part_vectors(features):
        sim = Q @ normalise(X, mean).T
        for qi, xi in zip(*np.nonzero(sim >= THRESHOLD), strict=True):
            if sample_ids[qi] != ids[xi]:
                pairs.add(tuple(sorted((int(sample_ids[qi]), int(ids[xi])))))

    def key(i: int) -> str:
        split, number, row = unpack_id(i)
        return f"{split}-{number:06d}-{row}"

    Path(a["truth"]).write_text(
        json.dumps(
            {
                "sample": [key(i) for i in sample_ids.tolist()],
                "pairs": [[key(i), key(j)] for i, j in sorted(pairs)],
            }
        )
    )
    return {"sample": len(sample_ids), "pairs": len(pairs), "seconds": elapsed_since(t0)}


def _overlap(pairs, reference: Path) -> dict:
    """How many of the pairs a reference run (featx's default nprobe) found this run found."""
    import pyarrow.parquet as pq

    ref = pq.read_table(reference, columns=["key_a", "key_b"])
    ab = zip(ref["key_a"].to_pylist(), ref["key_b"].to_pylist(), strict=True)
    want = {tuple(sorted(k)) for k in ab}
    return {"reference_pairs": len(want), "reference_pairs_found": len(want & set(pairs))}


def step_dedup(a: dict) -> dict:
    import pyarrow.parquet as pq
    from benchlib import Spans

    import featx.dedup as dedup_module
    import featx.index as fx
    from featx.dedup import find_duplicates

    rss_imports = maxrss_mb()
    features = Path(a["features"])
    out = Path(a["out"])
    spans = Spans()
    spans.wrap(fx.Index, "open", "Index.open")
    spans.wrap(fx.Index, "range_search", "Index.range_search")
    faiss_clock = [0.0]
    init = fx.Index.__init__

    def timed_init(self, *args, **kwargs):  # time FAISS's calls
        init(self, *args, **kwargs)
        self.segments = [_TimedSegment(ix, faiss_clock) for ix in self.segments]

    fx.Index.__init__ = timed_init
    if a.get("nprobe"):  # the cells find_duplicates searches, when not its default
        dedup_module.DEDUP_NPROBE = a["nprobe"]
    profile = None
    if a.get("profile"):
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    t0 = time.perf_counter()
    s = find_duplicates(features, threshold=THRESHOLD, out=out, sheet=False)
    seconds = elapsed_since(t0)
    rss_peak = maxrss_mb()  # before anything below reads the pairs
    top = None
    if profile is not None:
        import io
        import pstats

        profile.disable()
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(20)
        top = buf.getvalue().splitlines()
    spans.undo()
    fx.Index.__init__ = init
    planted = json.loads((features / "planted.json").read_text())
    pairs = pq.read_table(out / "pairs.parquet", columns=["key_a", "key_b", "similarity"])
    ab = zip(pairs["key_a"].to_pylist(), pairs["key_b"].to_pylist(), strict=True)
    sims = {tuple(sorted(k)): v for k, v in zip(ab, pairs["similarity"].to_pylist(), strict=True)}
    hit = [p for p in planted if tuple(sorted((p["a"], p["b"]))) in sims]
    hit_cross = sum(p["cross_split"] for p in hit)
    hit_sims = [sims[tuple(sorted((p["a"], p["b"])))] for p in hit]
    truth = json.loads(Path(a["truth"]).read_text())
    sample = set(truth["sample"])
    want = {tuple(sorted(p)) for p in truth["pairs"]}
    got = {k for k in sims if k[0] in sample or k[1] in sample}
    return {
        "nprobe": dedup_module.DEDUP_NPROBE,
        "seconds": seconds,
        "index_open_s": round(spans.total("Index.open"), 2),
        "range_search_s": round(spans.total("Index.range_search"), 2),
        "faiss_range_search_s": round(faiss_clock[0], 2),
        "range_search_calls": sum(c["name"] == "Index.range_search" for c in spans.calls),
        "threshold": THRESHOLD,
        "pairs": s.pairs,
        "by_splits": s.by_splits,
        "leaking": s.leaking,
        "excluded": s.excluded,
        "planted": len(planted),
        "planted_found": len(hit),
        "planted_recall": round(len(hit) / len(planted), 4),
        "planted_cross_split": sum(p["cross_split"] for p in planted),
        "planted_cross_split_found": hit_cross,
        "planted_min_similarity": round(min(hit_sims), 4) if hit_sims else None,
        "other_pairs": s.pairs - len(hit),
        # every pair with an end in a sample of rows, by brute force: what dedup found of them
        "sample_rows": len(sample),
        "sample_exact_pairs": len(want),
        "sample_pairs_found": len(want & got),
        "sample_pair_recall": round(len(want & got) / len(want), 4) if want else None,
        "sample_pairs_not_exact": len(got - want),
        **(_overlap(sims.keys(), Path(a["reference"])) if a.get("reference") else {}),
        "pairs_file_mb": mb((out / "pairs.parquet").stat().st_size),
        "rss_after_imports_mb": rss_imports,
        "rss_at_end_mb": rss_peak,
        "profile_top_tottime": top,
    }


# -- libraries -----------------------------------------------------------------------------------


def step_compare(a: dict) -> dict:
    """One library at compare-rows x dim: build, then the search settings' recall and speed."""
    import faiss

    lib, dim, n = a["library"], a["dim"], a["rows"]
    X, _ = make_vectors(n, dim, a["seed"])
    mean = X.mean(0)
    Z = X - mean
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    del X
    rng = np.random.default_rng([a["seed"], 4])
    Q = noisy_copies(Z[rng.choice(n, N_QUERIES, replace=False)], 0, np.full(N_QUERIES, 0.3), rng)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    _, exact = faiss.knn(Q[:N_TRUTH], Z, K, metric=faiss.METRIC_INNER_PRODUCT)
    rss_before = maxrss_mb()
    param, values = COMPARE_SETTINGS[lib]
    t0 = time.perf_counter()
    if lib == "usearch":
        from usearch.index import Index

        index = Index(ndim=dim, metric="ip", dtype="f32")
        index.add(np.arange(n, dtype=np.uint64), Z, threads=0)
        build_s = elapsed_since(t0)
        size = index.memory_usage

        def search(v):
            index.expansion_search = v
            return index.search(Q, K, threads=0).keys.astype(np.int64)

    else:
        if lib == "faiss-ivf-flat":
            nlist = int(min(65536, 2 ** round(np.log2(4 * np.sqrt(n)))))  # featx's rule
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.train(Z[rng.choice(n, min(n, 64 * nlist), replace=False)])
        else:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.add(Z)
        build_s = elapsed_since(t0)
        size = len(faiss.serialize_index(index))

        def search(v):
            if lib == "faiss-ivf-flat":
                index.nprobe = v
            else:
                index.hnsw.efSearch = v
            return index.search(Q, K)[1]

    rss_built = maxrss_mb()
    search(values[0])  # warm-up
    runs = []
    for v in values:
        t = time.perf_counter()
        ids = search(v)
        sec = time.perf_counter() - t
        runs.append(
            {
                param: v,
                "qps": round(N_QUERIES / sec),
                "recall_at_10": recall_at_k(ids[:N_TRUTH], exact),
            }
        )
    return {
        "library": lib,
        "rows": n,
        "dim": dim,
        "build_s": build_s,
        "index_mb": mb(size),
        "vectors_mb": mb(Z.nbytes),
        "rss_before_build_mb": rss_before,
        "rss_after_build_mb": rss_built,
        "param": param,
        "settings": runs,
        "note": LIBRARY_NOTES[lib],
    }


STEPS = {
    "generate": step_generate,
    "build": step_build,
    "query": step_query,
    "pairs_truth": step_pairs_truth,
    "dedup": step_dedup,
    "compare": step_compare,
}


def run_step(name: str, args: dict, work: Path) -> dict:
    """A step in a fresh Python process: its result, wall time and peak RSS (ru_maxrss)."""
    arg_file = work / f"step-{name}-{os.getpid()}-{time.monotonic_ns()}.json"
    out_file = arg_file.with_suffix(".out.json")
    arg_file.write_text(json.dumps(args))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, str(arg_file)]
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    with open(work / f"step-{name}.log", "a") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = elapsed_since(t0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "".join((work / f"step-{name}.log").read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"step {name} failed ({os.waitstatus_to_exitcode(status)}):\n{tail}")
    result = json.loads(out_file.read_text())
    result["process"] = {
        "wall_s": wall,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_average": {"start": load0, "end": [round(x, 2) for x in os.getloadavg()]},
    }
    arg_file.unlink()
    out_file.unlink()
    return result


# -- report -------------------------------------------------------------------------------------


def by_default(q: dict) -> dict:
    return next(r for r in q["by_nprobe"] if r["nprobe"] == q["default_nprobe"])


def tables(res: dict) -> str:
    sep = "| " + " | ".join(["---:"] * 13) + " |"
    lines = [
        "| rows | dim | parts | vectors MB | build s | build peak RSS MB | index on disk MB "
        "| queries/s (k=10, default nprobe) | recall@10 | dedup s | dedup peak RSS MB "
        "| pairs found | planted pairs found |",
        sep,
    ]
    for r in res["sizes"]:
        g, b, q, d = r["generate"], r["build"], r["query"], r["dedup"]
        dq = by_default(q)
        cells = [
            r["rows"],
            r["dim"],
            g["parts"],
            f"{g['vectors_mb']:.0f}",
            f"{b['seconds']:.0f}",
            f"{b['process']['peak_rss_mb']:.0f}",
            f"{b['index_mb']:.0f}",
            dq["qps"],
            f"{dq['recall_at_10']:.3f}",
            f"{d['seconds']:.0f}",
            f"{d['process']['peak_rss_mb']:.0f}",
            d["pairs"],
            f"{d['planted_found']}/{d['planted']}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "| rows | dim | nprobe | queries/s | ms/query | recall@10 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["sizes"]:
        q, rd = r["query"], f"| {r['rows']} | {r['dim']} "
        for p in q["by_nprobe"]:
            mark = " (default)" if p["nprobe"] == q["default_nprobe"] else ""
            lines.append(
                f"{rd}| {p['nprobe']}{mark} | {p['qps']} | {p['ms_per_query']:.3f} "
                f"| {p['recall_at_10']:.3f} |"
            )
        ms = 1000 / q["exact_qps"]
        lines.append(f"{rd}| exact (brute force) | {q['exact_qps']} | {ms:.3f} | 1 |")
    lines += [
        "",
        "| rows | dim | find_duplicates nprobe | s | in FAISS range_search s | peak RSS MB "
        "| pairs | planted found | pairs of sampled rows found / exact "
        "| pairs found at the default nprobe found |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["sizes"]:
        for d in [r["dedup"], *r.get("dedup_other_nprobe", [])]:
            mark = " (default)" if d is r["dedup"] else ""
            lines.append(
                f"| {r['rows']} | {r['dim']} | {d['nprobe']}{mark} | {d['seconds']:.0f} "
                f"| {d['faiss_range_search_s']:.0f} | {d['process']['peak_rss_mb']:.0f} "
                f"| {d['pairs']} | {d['planted_found']}/{d['planted']} "
                f"| {d['sample_pairs_found']}/{d['sample_exact_pairs']} "
                f"| {d.get('reference_pairs_found', d['pairs'])}/"
                f"{d.get('reference_pairs', d['pairs'])} |"
            )
    if res.get("libraries"):
        lines += [
            "",
            "| rows | dim | library | build s | index MB | peak RSS MB | setting | queries/s "
            "| recall@10 |",
            "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for c in res["libraries"]:
            for i, s in enumerate(c["settings"]):
                first = [
                    f"{c['build_s']:.1f}",
                    f"{c['index_mb']:.0f}",
                    f"{c['process']['peak_rss_mb']:.0f}",
                ]
                cells = [c["rows"], c["dim"], c["library"], *(first if i == 0 else [""] * 3)]
                cells += [f"{c['param']}={s[c['param']]}", s["qps"], f"{s['recall_at_10']:.3f}"]
                lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def findings(res: dict) -> list[str]:
    """What the figures say, in sentences computed from them."""
    out = []
    for r in res["sizes"]:
        q, b, d, g = r["query"], r["build"], r["dedup"], r["generate"]
        dq, vec = by_default(q), g["vectors_mb"]
        s = (
            f"{r['rows']} x {r['dim']}: nprobe {q['default_nprobe']} (default) gives recall@10 "
            f"{dq['recall_at_10']:.3f} at {dq['qps']} queries/s"
        )
        for p in q["by_nprobe"]:
            if p["nprobe"] != q["default_nprobe"]:
                s += f"; nprobe {p['nprobe']}: {p['recall_at_10']:.3f} at {p['qps']}/s"
        bp, marks = b["process"]["peak_rss_mb"], b["rss_marks_mb"]
        s += (
            f". build_index: {b['seconds']:.0f} s ({b['mean_s']:.0f} s for the mean, "
            f"{b['segments_s']:.0f} s in build_segment), peak RSS {bp:.0f} MB = {bp / vec:.1f} x "
            f"the vectors ({vec:.0f} MB)"
        )
        if "before_serialize_mb" in marks:  # a Ray task's segment: serialized to return it
            s += (
                f"; {marks['before_serialize_mb']:.0f} MB before faiss.serialize_index, "
                f"{marks['after_serialize_mb']:.0f} MB after"
            )
        s += "."
        dp = d["process"]["peak_rss_mb"]
        s += (
            f" find_duplicates: {d['seconds']:.0f} s ({d['range_search_s']:.0f} s in "
            f"Index.range_search, {d['faiss_range_search_s']:.0f} s of it in FAISS), peak RSS "
            f"{dp:.0f} MB = {dp / vec:.1f} x the vectors, for "
            f"{d['pairs']} pairs ({d['pairs_file_mb']} MB of Parquet); planted pairs found "
            f"{d['planted_found']}/{d['planted']} ({d['planted_cross_split_found']}/"
            f"{d['planted_cross_split']} across splits), the lowest at cosine "
            f"{d['planted_min_similarity']}; {d['other_pairs']} other pairs (the data's own); "
            f"of the {d['sample_exact_pairs']} pairs of {d['sample_rows']} sampled rows found by "
            f"brute force, {d['sample_pairs_found']}."
        )
        for o in r.get("dedup_other_nprobe", []):
            s += (
                f" At nprobe {o['nprobe']}: {o['seconds']:.0f} s, {o['pairs']} pairs, planted "
                f"{o['planted_found']}/{o['planted']}, sampled rows' pairs "
                f"{o['sample_pairs_found']}/{o['sample_exact_pairs']}, "
                f"{o['reference_pairs_found']} of the {o['reference_pairs']} pairs found at "
                f"nprobe {d['nprobe']}."
            )
        out.append(s)
    for dim in sorted({c["dim"] for c in res.get("libraries", [])}):
        libs = [c for c in res["libraries"] if c["dim"] == dim]
        parts = []
        for c in libs:
            ok = [s for s in c["settings"] if s["recall_at_10"] >= 0.95]
            best = max(ok, key=lambda s: s["qps"]) if ok else None
            text = f"{c['library']} builds in {c['build_s']:.0f} s"
            if best:
                text += (
                    f", {best['qps']} queries/s at recall@10 {best['recall_at_10']:.3f} "
                    f"({c['param']}={best[c['param']]})"
                )
            else:
                text += ", recall@10 < 0.95 at every setting tried"
            parts.append(text)
        out.append(
            f"{libs[0]['rows']} x {dim}, fastest setting at recall@10 >= 0.95: "
            + "; ".join(parts)
            + "."
        )
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    head = (
        f"# Nearest-neighbour index and near-duplicates ({m['date'][:10]})\n\n"
        f"Measured {m['date']} on {m['cpu_model']}: {m['cores']} cores, {m['memory_gib']} GiB, "
        f"{'GPU ' + m['gpu'] if m['gpu'] else 'no GPU'}; Python {m['python']}, faiss "
        f"{res['versions']['faiss']}, usearch {res['versions']['usearch']}. Load average at start "
        f"{m['load_average_at_start']}.\n\n"
        f"Command: `{res['command']}` ({res['elapsed_s']:.0f} s).\n\n"
        "Synthetic features written as `featx extract` writes them (clustered, parts of 10k-20k "
        f"rows over train/val/test 80/10/10, {res['planted']} planted near-duplicate pairs). Each "
        "step ran in a fresh process; peak RSS is that process's `ru_maxrss` (imports included: "
        "~100-200 MB). Queries: 10k rows of the data plus noise, k=10, one batch (all cores); "
        "recall@10 against exact search on 1000 of them. Libraries: in memory, the same kind of "
        "data, the same queries and recall.\n\n"
    )
    return head + tables(res) + "\n\n" + "\n".join(f"- {s}" for s in findings(res)) + "\n"


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dims", default="64,256")
    ap.add_argument("--quick", action="store_true", help="100k rows, 50k for the libraries.")
    ap.add_argument("--planted", type=int, default=1000, help="Near-duplicate pairs planted.")
    ap.add_argument("--nprobes", default="8,16,32,64,128", help="besides featx's default")
    ap.add_argument(
        "--dedup-nprobes", default="4,32", help="find_duplicates again at these nprobe ('': not)"
    )
    ap.add_argument("--truth-sample", type=int, default=5000, help="rows whose pairs are checked")
    ap.add_argument("--compare-rows", type=int, default=200_000)
    ap.add_argument("--no-compare", action="store_true", help="Skip the library comparison.")
    ap.add_argument("--profile", action="store_true", help="cProfile the dedup step.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="Where the features go (default: a temp dir).")
    ap.add_argument("--json", type=Path, help="default tests/benchmarks/results-index.json")
    ap.add_argument("--md", type=Path, help="default tests/benchmarks/results-index.md")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.compare_rows = 100_000, 50_000
    else:
        args.json = args.json or HERE / "results-index.json"
        args.md = args.md or HERE / "results-index.md"
    import faiss
    import usearch

    t0 = time.perf_counter()
    dims = [int(d) for d in args.dims.split(",")]
    nprobes = [int(p) for p in args.nprobes.split(",")]
    dedup_nprobes = [int(p) for p in args.dedup_nprobes.split(",") if p]
    res = {
        "stage": "index",
        "command": "python tests/benchmarks/bench_index.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": {"faiss": faiss.__version__, "usearch": usearch.__version__},
        "planted": args.planted,
        "threshold": THRESHOLD,
        "sizes": [],
        "libraries": [],
    }
    base = Path(tempfile.mkdtemp(prefix="featx-bench-index-", dir=args.workdir))
    try:
        for dim in dims:
            feats = base / f"features-{args.rows}x{dim}"
            common = {"features": str(feats), "rows": args.rows, "dim": dim, "seed": args.seed}
            row = {"rows": args.rows, "dim": dim}
            say = functools.partial(print, f"{args.rows} x {dim}:", flush=True)
            say("writing the features folder")
            row["generate"] = g = run_step("generate", {**common, "planted": args.planted}, base)
            say(f"{g['parts']} parts in {g['seconds']:.0f} s; build_index")
            row["build"] = b = run_step("build", common, base)
            say(f"built in {b['seconds']:.0f} s, {b['process']['peak_rss_mb']:.0f} MB; queries")
            row["query"] = run_step("query", {**common, "nprobes": nprobes}, base)
            say(f"{by_default(row['query'])}; find_duplicates")
            truth = str(base / f"truth-{dim}.json")
            row["pairs_truth"] = run_step(
                "pairs_truth", {**common, "truth": truth, "sample": args.truth_sample}, base
            )
            row["dedup_other_nprobe"] = []
            reference = base / f"dedup-{dim}" / "pairs.parquet"  # the default run's pairs
            for nprobe in [None, *dedup_nprobes]:
                out = base / (f"dedup-{dim}" if nprobe is None else f"dedup-{dim}-{nprobe}")
                dedup = {**common, "out": str(out), "truth": truth, "nprobe": nprobe}
                dedup |= {"profile": args.profile and nprobe is None}
                if nprobe is not None:
                    dedup["reference"] = str(reference)
                d = run_step("dedup", dedup, base)
                if nprobe is None:
                    row["dedup"] = d
                else:
                    row["dedup_other_nprobe"].append(d)
                    shutil.rmtree(out, ignore_errors=True)
                say(
                    f"dedup (nprobe {d['nprobe']}) {d['seconds']:.0f} s, "
                    f"{d['process']['peak_rss_mb']:.0f} MB, {d['pairs']} pairs, planted "
                    f"{d['planted_found']}/{d['planted']}, sample pairs "
                    f"{d['sample_pairs_found']}/{d['sample_exact_pairs']}"
                )
            res["sizes"].append(row)
            shutil.rmtree(feats, ignore_errors=True)
            shutil.rmtree(base / f"dedup-{dim}", ignore_errors=True)
        if not args.no_compare:
            for dim in dims:
                for lib in COMPARE_SETTINGS:
                    print(f"{args.compare_rows} x {dim}: {lib}", flush=True)
                    c = {"library": lib, "dim": dim, "rows": args.compare_rows, "seed": args.seed}
                    res["libraries"].append(run_step("compare", c, base))
        res["elapsed_s"] = elapsed_since(t0)
        res["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        res["findings"] = findings(res)
        print("\n" + tables(res) + "\n")
        print("\n".join(f"- {s}" for s in res["findings"]), flush=True)
        if args.json:
            write_json(args.json, res)
        if args.md:
            write_text(args.md, markdown(res))
        return res
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--step":
        step_args = json.loads(Path(sys.argv[3]).read_text())
        result = STEPS[sys.argv[2]](step_args)
        write_json(Path(sys.argv[3]).with_suffix(".out.json"), result)
    else:
        main()
