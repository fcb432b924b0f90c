"""Extract: one feature vector per sample, Ray Data actors -> one Parquet part per input shard.

One streaming Ray Data pipeline reads every pending shard as raw bytes; an actor pool (model
loaded once per actor) decodes, collates and runs `forward_features`; the driver groups rows by
shard and writes a shard's part atomically as soon as all its rows are in. A part you can see is
complete, so re-runs skip finished parts and a killed run resumes with every sample exactly once.
Memory stays flat: only the embeddings of shards still in flight are held by the driver.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featx import __version__, storage
from featx.checkpoint import META_FILE, MODEL_FILE, load_meta, resolve_model_dir
from featx.config import ExtractConfig
from featx.dataset import CARD, SPLITS, finished_shards, load_card, read_stats
from featx.errors import ConfigError
from featx.features import (
    BASELINE_DIR,
    FORMAT,
    MANIFEST,
    make_table,
    part_metadata,
    part_name,
    read_manifest,
    write_manifest,
    write_part,
)
from featx.fsutil import exclusive, sha256_file
from featx.storage import is_uri, location

log = logging.getLogger(__name__)

# Logical CPUs each read task asks for. Reading a tar is light (decoding happens in the actors),
# and the actor pool is sized to leave exactly this much free, so reads always get scheduled
# (a pool that takes every CPU hangs with "Cluster resources are not enough to run any task").
READ_CPUS = 0.5


@dataclass
class ExtractSummary:
    out: str
    model_dir: str
    rows: int  # rows written by this run
    total_rows: int  # rows in OUT after this run
    files_written: int
    files_skipped: int  # parts already finished before this run
    seconds: float
    samples_per_s: float  # rows / seconds of this run, Ray start-up included
    ray_init_seconds: float = 0.0  # 0 when Ray was already running
    nodes: list[str] = field(default_factory=list)  # Ray node ids of the actors that embedded
    first_file_seconds: float | None = None  # from the call to the first part on disk
    feature_dim: int = 0
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Shard:
    split: str
    tar: Path
    part: Path
    samples: int
    sha256: str
    chunks: list = field(default_factory=list)  # rows received so far (embeddings, no pixels)
    received: int = 0

    @property
    def id(self) -> str:  # split/shard-NNNNNN.tar, as in the dataset card
        return f"{self.split}/{storage.name(self.tar)}"


def extract(
    dataset: Path,
    checkpoint: Path,
    out: Path,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    gpu: bool = False,
    ray_address: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractSummary:
    """Extract features of every sample of `dataset` with `checkpoint` into Parquet under `out`.

    `progress(done, total)` is called as rows arrive. Returns at once ("up to date") when every
    shard already has its part. Raises ConfigError, before any work, on bad options, a
    checkpoint of another modality, or an `out` holding features of another checkpoint.
    """
    cfg = ExtractConfig.parse(
        dataset=dataset,
        checkpoint=checkpoint,
        out=out,
        batch_size=batch_size,
        workers=workers,
        gpu=gpu,
        ray_address=ray_address,
        overwrite=overwrite,
    )
    return run_extract(cfg, progress)


def run_extract(
    cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None
) -> ExtractSummary:
    """`extract` for an already validated config (what the CLI and the flows call)."""
    if is_uri(cfg.out):
        # Parts are written locally and pushed to the store after the manifest naming their
        # model; a part in the store is complete (objects appear whole).
        if cfg.overwrite:
            storage.clear(cfg.out)
        with storage.staged_output(cfg.out, last=("*.parquet",)) as local:
            summary = run_extract(
                cfg.model_copy(update={"out": local, "overwrite": False}), progress
            )
        summary.out = storage.display(cfg.out)
        return summary
    t0 = time.perf_counter()
    card, meta, sha, model_dir, warnings = preflight(cfg)
    for w in warnings:
        log.warning(w)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "extract"):
        if cfg.overwrite:
            _clear(out)
        if n := _remove_partials(out):
            log.info("removed %d partial file(s) left by an interrupted run", n)
        manifest = _manifest(cfg, card, meta, sha, model_dir)
        old = read_manifest(out)
        if old is None or _identity(old) != _identity(manifest):
            # Written before any part: a part on disk always has a manifest naming its model.
            if old is not None:
                manifest["created_at"] = old["created_at"]
            write_manifest(out, manifest)
        shards, skipped = _plan(cfg.dataset, out, sha)
        summary = ExtractSummary(
            out=str(out),
            model_dir=storage.display(model_dir),
            rows=0,
            total_rows=sum(skipped),
            files_written=0,
            files_skipped=len(skipped),
            seconds=0.0,
            samples_per_s=0.0,
            feature_dim=int(meta["feature_dim"]),
            warnings=warnings,
        )
        if not shards:
            summary.up_to_date = True
        else:
            stamp = {
                "featx_version": __version__,
                "model_name": meta["model_name"],
                "preset": meta["preset"],
                "modality": meta["modality"],
                "feature_dim": str(meta["feature_dim"]),
                "checkpoint_sha256": sha,
                "dataset_fingerprint": card["fingerprint"],
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            _run(cfg, shards, card, model_dir, sha, stamp, summary, progress, t0)
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.samples_per_s = round(summary.rows / max(summary.seconds, 1e-9), 1)
    return summary


def preflight(cfg: ExtractConfig):
    """Every check that needs no Ray; one ConfigError lists all problems.

    Returns (card, meta, checkpoint sha256, model dir, warnings).
    """
    problems, warnings = [], []
    card = meta = sha = model_dir = None
    if not storage.exists(storage.join(cfg.dataset, CARD)):
        problems.append(
            f"dataset: no {CARD} in {cfg.dataset}: did you run `featx ingest SRC {cfg.dataset}`?"
        )
    else:
        card = load_card(cfg.dataset)
    try:
        model_dir = resolve_model_dir(cfg.checkpoint)
        local = storage.local_copy(model_dir) if is_uri(model_dir) else model_dir
        where = storage.display(model_dir)
        meta = load_meta(local)
        if not (local / MODEL_FILE).exists():
            problems.append(f"checkpoint: {where} has {META_FILE} but no {MODEL_FILE}")
        else:
            sha = sha256_file(local / MODEL_FILE)
        if meta.get("tokenizer") and not (local / meta["tokenizer"]).exists():
            problems.append(
                f"checkpoint: {where} names tokenizer {meta['tokenizer']!r}"
                " but the file is missing; copy it back or retrain"
            )
        elif sha is not None:
            problems += _check_loads(local, meta)
    except FileNotFoundError as e:
        problems.append(f"checkpoint: {e}")
    if card is not None and meta is not None:
        if card["modality"] != meta["modality"]:
            problems.append(
                f"checkpoint: {model_dir} is a {meta['modality']} model but {cfg.dataset} holds"
                f" {card['modality']} samples; pick a checkpoint trained on {card['modality']}"
            )
        elif card["fingerprint"] != meta.get("dataset_fingerprint"):
            # New data through an old model is legitimate (that is what features are for).
            warnings.append(
                f"{model_dir} was trained on another dataset (fingerprint "
                f"{str(meta.get('dataset_fingerprint'))[:12]}, not {card['fingerprint'][:12]});"
                " extracting anyway"
            )
    problems += _check_out(cfg, sha)
    if problems:
        raise ConfigError(problems)
    return card, meta, sha, model_dir, warnings


def _check_loads(model_dir: Path, meta: dict) -> list[str]:
    """Rebuild and load the model here (a fraction of a second), so a checkpoint that does not
    match this featx's architectures stops now, not as an actor traceback after Ray started."""
    from featx.checkpoint import load_model

    try:
        load_model(model_dir)
    except Exception as e:  # state-dict mismatch, bad config, truncated file, ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return [
            f"checkpoint: {model_dir} does not load into this featx's {meta.get('model_name')!r}"
            f" model ({first}); it was written by featx {meta.get('featx_version')}: retrain it"
            " or extract with that version"
        ]
    return []


def _check_out(cfg: ExtractConfig, sha: str | None) -> list[str]:
    out = cfg.out
    if is_uri(out):
        ds = str(cfg.dataset).rstrip("/")
        if out == ds or any(out.startswith(f"{ds}/{s}/") or out == f"{ds}/{s}" for s in SPLITS):
            return [f"out: {storage.display(out)} is the dataset or inside its shards"]
        return []  # the rest is checked against its staging folder once fetched, before work
    if out.exists() and not out.is_dir():
        return [f"out: {out} exists and is not a folder"]
    if not is_uri(cfg.dataset) and cfg.dataset.exists() and out.resolve() == cfg.dataset.resolve():
        return [f"out: {out} is the dataset folder; write features to another folder"]
    for s in SPLITS if not is_uri(cfg.dataset) else ():
        if out.resolve().is_relative_to((cfg.dataset / s).resolve()):
            return [f"out: {out} is inside the dataset's {s}/ shards; choose another folder"]
    if not out.is_dir():
        return []
    old = read_manifest(out)
    if old is None:
        if any(p.name != ".lock" for p in out.iterdir()):
            return [
                f"out: {out} is not empty and holds no featx features ({MANIFEST});"
                " choose a new or empty folder"
            ]
        return []
    if sha is not None and old["checkpoint_sha256"] != sha and not cfg.overwrite:
        return [
            f"out: {out} holds features of another checkpoint ({old['model_dir']}, sha256 "
            f"{old['checkpoint_sha256'][:12]}, not {sha[:12]}); mixing them would give rows "
            "from two models: choose another --out, or pass --overwrite to replace them"
        ]
    return []


def _manifest(cfg: ExtractConfig, card: dict, meta: dict, sha: str, model_dir: Path) -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT,
        "featx_version": __version__,
        "checkpoint_sha256": sha,
        "model_dir": storage.display(_absolute(model_dir)),
        "model_name": meta["model_name"],
        "preset": meta["preset"],
        "modality": meta["modality"],
        "feature_dim": meta["feature_dim"],
        "model": meta["model"],
        "trained_on_fingerprint": meta.get("dataset_fingerprint"),
        "dataset": storage.display(_absolute(cfg.dataset)),
        "dataset_fingerprint": card["fingerprint"],
        "class_names": card["class_names"],
        "created_at": now,
    }


def _absolute(loc):
    return loc if is_uri(loc) else Path(loc).resolve()


def _identity(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created_at", "featx_version")}


def _plan(dataset: Path, out: Path, sha: str) -> tuple[list[_Shard], list[int]]:
    """Shards still without a part, and the sample counts of those already done.

    A finished part must come from the same shard bytes and checkpoint; anything else (a
    re-ingested dataset, a part without a shard) is refused rather than mixed in.
    """
    pending, done, problems, wanted = [], [], [], set()
    for split in SPLITS:
        for tar in finished_shards(dataset, split):
            st = read_stats(tar)
            part = out / split / part_name(tar)
            wanted.add(part)
            if part.exists():
                m = part_metadata(part)
                if m.get("shard_sha256") != st["sha256"] or m.get("checkpoint_sha256") != sha:
                    problems.append(
                        f"out: {part.relative_to(out)} was extracted from another version of "
                        f"{split}/{storage.name(tar)} or another checkpoint (dataset "
                        "re-ingested?); pass --overwrite to extract again"
                    )
                done.append(st["samples"])
                continue
            pending.append(_Shard(split, tar, part, st["samples"], st["sha256"]))
    for split in SPLITS:
        for part in sorted((out / split).glob("part-*.parquet")):
            if part not in wanted:
                problems.append(
                    f"out: {part.relative_to(out)} has no shard in {dataset} (dataset "
                    "re-ingested?); pass --overwrite to extract again"
                )
    if problems:
        raise ConfigError(problems)
    return pending, done


class _Embedder:
    """Ray Data actor: loads the checkpoint once, then decodes, collates and embeds batches."""

    def __init__(self, model_dir: str, sha: str, device: str, threads: int) -> None:
        import torch

        from featx.batching import make_collate
        from featx.checkpoint import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model, meta = load_model(location(model_dir), device=device)
        if meta["checkpoint_sha256"] != sha:
            raise RuntimeError(
                f"{model_dir}/{MODEL_FILE} changed while extraction started; run again"
            )
        tokenizer = Path(meta["model_dir"]) / meta["tokenizer"] if meta.get("tokenizer") else None
        self.collate = make_collate(meta["modality"], tokenizer_path=tokenizer, augment=False)
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch) -> dict:
        from featx.dataset import decode_sample

        rows = batch.to_pylist()
        samples = []
        for raw in rows:
            try:
                samples.append(decode_sample({k: v for k, v in raw.items() if v is not None}))
            except Exception as e:
                # Ingest validated every sample, so this is a damaged shard, not bad input.
                raise ValueError(
                    f"cannot decode sample {raw.get('__key__')!r} of {raw.get('__url__')}: {e}; "
                    "the shard is damaged: re-run `featx ingest --overwrite`"
                ) from e
        b = self.collate(samples)
        x = b["x"].to(self.device)
        lengths = None if b["lengths"] is None else b["lengths"].to(self.device)
        with self.torch.inference_mode():
            emb = self.model.forward_features(x, lengths).float().cpu().numpy()
        return {
            "key": np.array(b["keys"], dtype=object),
            "shard": np.array(["/".join(Path(r["__url__"]).parts[-2:]) for r in rows], object),
            "label": np.array([-1 if s["cls"] is None else s["cls"] for s in samples], np.int64),
            "source": np.array([s["meta"].get("source") for s in samples], dtype=object),
            "embedding": emb,
            "node": np.array([self.node_id] * len(rows), dtype=object),  # not written
        }


def _run(cfg, shards, card, model_dir, sha, stamp, summary, progress, t0) -> None:
    import ray

    names = card["class_names"]
    by_id = {s.id: s for s in shards}
    total = sum(s.samples for s in shards)
    from featx.cluster import alive_nodes, check_shared

    with ray_session(cfg.ray_address) as init_seconds:
        summary.ray_init_seconds = init_seconds
        cpus = float(ray.cluster_resources().get("CPU", 0))
        problems = []
        if cfg.gpu and not ray.cluster_resources().get("GPU"):
            problems.append("gpu: the Ray cluster has no GPUs; drop --gpu to run on CPUs")
        if cpus <= READ_CPUS:
            problems.append(
                f"the Ray cluster has {cpus:g} CPUs; extraction needs more than "
                f"{READ_CPUS} (one read task plus the model actors)"
            )
        if problems:
            raise ConfigError(problems)
        # Read tasks and model actors may run on any node of a cluster.
        check_shared({"dataset": cfg.dataset, "checkpoint": model_dir})
        workers = cfg.workers or default_workers(cpus, cfg.gpu)
        # The pool never takes the CPUs a read task needs; torch gets about one thread per CPU
        # the actor reserved (rounded, at least one), so actors do not oversubscribe cores.
        actor_cpus = (cpus - READ_CPUS) / workers
        # On a cluster the CPUs are split between nodes: cap the actors so the largest node
        # still fits a read task beside one, or actors could fill every node and reads never run.
        largest = max(n["Resources"].get("CPU", 0) for n in alive_nodes())
        actor_cpus = min(actor_cpus, largest - READ_CPUS)
        if cfg.gpu:
            actor_cpus = min(actor_cpus, 1.0)
        threads = max(1, round(actor_cpus))
        log.info(
            "extracting %d samples from %d shards: %d actor(s) x %.2f CPU, %d torch thread(s)%s",
            total,
            len(shards),
            workers,
            actor_cpus,
            threads,
            ", 1 GPU each" if cfg.gpu else "",
        )
        ds = ray.data.read_webdataset(
            [str(_absolute(s.tar)) for s in shards],
            decoder=None,  # raw bytes: featx decodes its own formats, never unpickles
            override_num_blocks=len(shards),
            num_cpus=READ_CPUS,
        )
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "model_dir": str(_absolute(model_dir)),
                "sha": sha,
                "device": "cuda" if cfg.gpu else "cpu",
                "threads": threads,
            },
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus,
            num_gpus=1 if cfg.gpu else None,
        )
        ds.context.enable_progress_bars = False  # the caller shows progress
        ds.context.print_on_execution_start = False
        done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids = batch["shard"]
            for shard_id in np.unique(ids):
                s = by_id.get(shard_id)
                if s is None:
                    raise RuntimeError(f"rows of unexpected shard {shard_id!r} from Ray Data")
                sel = ids == shard_id
                s.chunks.append({k: batch[k][sel] for k in ("key", "label", "source", "embedding")})
                s.received += int(sel.sum())
                if s.received >= s.samples:
                    _finish(s, names, stamp)
                    summary.files_written += 1
                    summary.rows += s.samples
                    summary.total_rows += s.samples
                    if summary.first_file_seconds is None:
                        summary.first_file_seconds = round(time.perf_counter() - t0, 3)
            summary.nodes = sorted(set(summary.nodes) | {str(n) for n in np.unique(batch["node"])})
            done += len(ids)
            if progress:
                progress(done, total)
    missing = [
        f"{sid} ({s.received} of {s.samples} rows)"
        for sid, s in by_id.items()
        if s.received < s.samples
    ]
    if missing:
        raise RuntimeError(f"Ray Data returned too few rows for {', '.join(missing)}")


def default_workers(cpus: float, gpu: bool) -> int:
    """Model actors when `--workers` is not given: one with `--gpu` (one GPU); on CPUs, 2 from
    2 CPUs up, then about one per 4 CPUs. Inside an actor, decoding (one Python thread) and
    the model (torch threads) take turns; with two or more actors one decodes while another
    runs the model. On 2 cores, 6000 images: 1000-1040 rows/s with one actor, 1550-1840 with
    two (bench_extract.py's in-run rate), and no slower end to end at 1500 images."""
    if gpu or cpus < 2:
        return 1
    return max(2, round((cpus - READ_CPUS) / 4))


def _finish(s: _Shard, names: list[str], stamp: dict) -> None:
    """All rows of a shard are in: check them, put them in shard order, write the part."""
    cat = {k: np.concatenate([c[k] for c in s.chunks]) for k in s.chunks[0]}
    s.chunks = []  # free the buffer as soon as the part is built
    keys = [str(k) for k in cat["key"]]
    # Positions come from the shard's stats only now, so the driver never holds the keys of
    # shards that are not in flight.
    positions = {e["key"]: i for i, e in enumerate(read_stats(s.tar)["entries"])}
    try:
        order = np.argsort([positions[k] for k in keys], kind="stable")
    except KeyError as e:
        raise RuntimeError(f"{s.id}: key {e} is not in the shard's stats") from None
    if len(set(keys)) != len(keys) or len(keys) != s.samples:
        raise RuntimeError(
            f"{s.id}: got {len(keys)} rows with {len(set(keys))} distinct keys,"
            f" expected {s.samples}"
        )
    labels = [None if v < 0 else int(v) for v in cat["label"][order]]
    table = make_table(
        keys=[keys[i] for i in order],
        split=s.split,
        labels=labels,
        label_names=[None if v is None else names[v] for v in labels],
        sources=[None if v is None else str(v) for v in cat["source"][order]],
        embeddings=np.stack(cat["embedding"][order])
        if cat["embedding"].dtype == object
        else cat["embedding"][order],
        metadata={**stamp, "shard": s.id, "shard_sha256": s.sha256},
    )
    s.part.parent.mkdir(parents=True, exist_ok=True)
    write_part(s.part, table)


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to Ray if this process is not connected yet; yields the seconds it took.

    With no address (argument or RAY_ADDRESS) a local Ray starts, without the dashboard (no
    HTTP server). Only a Ray started here is shut down here.
    """
    import ray

    from featx.cluster import init_ray

    if ray.is_initialized():
        if address:
            log.warning("Ray is already initialised in this process; ignoring ray_address")
        yield 0.0
        return
    seconds = init_ray(address, worker_logs=False)
    try:
        yield seconds
    finally:
        ray.shutdown()


def _remove_partials(out: Path) -> int:
    """Delete hidden temporaries left by a killed run (a visible part is always complete)."""
    n = 0
    for folder in (out, *(out / s for s in SPLITS)):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name:
                    p.unlink()
                    n += 1
    return n


def _clear(out: Path) -> None:
    """--overwrite: remove what extract wrote (parts, manifest, probe baseline), nothing else."""
    for s in SPLITS:
        for p in (out / s).glob("part-*.parquet") if (out / s).is_dir() else []:
            p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    if (out / BASELINE_DIR).is_dir():
        shutil.rmtree(out / BASELINE_DIR)
