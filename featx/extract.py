"""Extract: one feature vector per sample, one Parquet part per input shard.

The shard is the unit of work: `featx.embed.ShardEmbedder` reads one shard, embeds its samples
in order and returns the finished part, checked against the shard's stats where it is made.
Small jobs on a laptop run it in this process (no Ray start-up); larger ones and clusters run
it on a Ray Data actor pool, one task per shard. The driver writes each part atomically as it
arrives, so a part you can see is complete, re-runs skip finished parts, and a killed run
resumes with every sample exactly once.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from featx import __version__, storage
from featx.config import ExtractConfig
from featx.dataset import SPLITS, finished_shards, read_stats
from featx.embed import ShardTask
from featx.errors import ConfigError
from featx.extract_engines import choose_engine, run_here, run_on_ray
from featx.extract_plan import ExtractPlan, absolute, preflight
from featx.features import (
    BASELINE_DIR,
    FORMAT,
    MANIFEST,
    part_metadata,
    part_name,
    read_manifest,
    write_manifest,
    write_part,
)
from featx.fsutil import exclusive, remove_temporaries
from featx.storage import is_uri

log = logging.getLogger(__name__)


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
    engine: str = ""  # where the model ran: "ray" or "local" ("" when up to date)
    first_file_seconds: float | None = None  # from the call to the first part on disk
    feature_dim: int = 0
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def extract(
    cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None
) -> ExtractSummary:
    """Extract features of every sample of `cfg.dataset` with `cfg.checkpoint` into Parquet.

    `progress(done, total)` is called as parts are written. Returns at once ("up to date") when
    every shard already has its part. Raises ConfigError, before any work, on bad options, a
    checkpoint of another modality, or an `out` holding features of another checkpoint.
    Build the config with `ExtractConfig.parse(dataset=..., checkpoint=..., out=...)`.
    """
    if is_uri(cfg.out):
        # Parts are written locally and pushed to the store after the manifest naming their
        # model; a part in the store is complete (objects appear whole).
        with storage.staged_output(cfg.out, last=("*.parquet",), overwrite=cfg.overwrite) as local:
            summary = extract(cfg.model_copy(update={"out": local, "overwrite": False}), progress)
        summary.out = storage.display(cfg.out)
        return summary
    t0 = time.perf_counter()
    plan = preflight(cfg)
    for w in plan.warnings:
        log.warning(w)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "extract"):
        if cfg.overwrite:
            _clear(out)
        if n := _remove_partials(out):
            log.info("removed %d partial file(s) left by an interrupted run", n)
        manifest = _manifest(cfg, plan)
        old = read_manifest(out)
        if old is None or _identity(old) != _identity(manifest):
            # Written before any part: a part on disk always has a manifest naming its model.
            if old is not None:
                manifest["created_at"] = old["created_at"]
            write_manifest(out, manifest)
        tasks, skipped = _pending(cfg.dataset, out, plan.sha)
        summary = ExtractSummary(
            out=str(out),
            model_dir=storage.display(plan.model_dir),
            rows=0,
            total_rows=sum(skipped),
            files_written=0,
            files_skipped=len(skipped),
            seconds=0.0,
            samples_per_s=0.0,
            feature_dim=int(plan.meta["feature_dim"]),
            warnings=plan.warnings,
        )
        if not tasks:
            summary.up_to_date = True
        else:
            summary.engine = choose_engine(cfg, sum(t.samples for t in tasks))
            run = run_on_ray if summary.engine == "ray" else run_here
            total = sum(t.samples for t in tasks)
            for task, data, node in run(cfg, plan, tasks, summary):
                write_part(out / task.part, data)
                summary.files_written += 1
                summary.rows += task.samples
                summary.total_rows += task.samples
                if node and node not in summary.nodes:
                    summary.nodes.append(node)
                if summary.first_file_seconds is None:
                    summary.first_file_seconds = round(time.perf_counter() - t0, 3)
                if progress:
                    progress(summary.rows, total)
            summary.nodes.sort()
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.samples_per_s = round(summary.rows / max(summary.seconds, 1e-9), 1)
    return summary


def _manifest(cfg: ExtractConfig, plan: ExtractPlan) -> dict:
    card, meta, sha, model_dir = plan.card, plan.meta, plan.sha, plan.model_dir
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT,
        "featx_version": __version__,
        "checkpoint_sha256": sha,
        "model_dir": storage.display(absolute(model_dir)),
        "model_name": meta["model_name"],
        "preset": meta["preset"],
        "modality": meta["modality"],
        "feature_dim": meta["feature_dim"],
        "model": meta["model"],
        "trained_on_fingerprint": meta.get("dataset_fingerprint"),
        "dataset": storage.display(absolute(cfg.dataset)),
        "dataset_fingerprint": card["fingerprint"],
        "class_names": card["class_names"],
        "created_at": now,
    }


def _identity(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created_at", "featx_version")}


def _pending(dataset, out: Path, sha: str) -> tuple[list[ShardTask], list[int]]:
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
            rel = f"{split}/{part.name}"
            pending.append(ShardTask(split, str(absolute(tar)), rel, st["samples"], st["sha256"]))
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


def _remove_partials(out: Path) -> int:
    """Delete hidden temporaries left by a killed run (a visible part is always complete)."""
    return sum(remove_temporaries(folder) for folder in (out, *(out / s for s in SPLITS)))


def _clear(out: Path) -> None:
    """--overwrite: remove what extract wrote (parts, manifest, probe baseline), nothing else."""
    for s in SPLITS:
        for p in (out / s).glob("part-*.parquet") if (out / s).is_dir() else []:
            p.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    if (out / BASELINE_DIR).is_dir():
        shutil.rmtree(out / BASELINE_DIR)
