"""Extract: one feature vector per sample, one Parquet part per input shard, in versions.

The shard is the unit of work: `featx.embed.ShardEmbedder` reads one shard, embeds its samples
in order and returns the finished part, checked against the shard's stats where it is made.
Small jobs on a laptop run it in this process (no Ray start-up); larger ones and clusters run
it on a Ray Data actor pool, one task per shard. The driver writes each part atomically as it
arrives, so a part you can see is complete, re-runs skip finished parts, and a killed run
resumes with every sample exactly once. Each run that changes what the features hold builds
a new version beside the current one and switches to it when complete (`featx.feature_versions`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from featx import __version__, storage
from featx import feature_versions as V
from featx.config import ExtractConfig
from featx.extract_engines import choose_engine, run_here, run_on_ray
from featx.extract_plan import ExtractPlan, absolute, preflight
from featx.features import BASELINE_DIR, FORMAT, MANIFEST, VERSIONS, write_part
from featx.fsutil import exclusive
from featx.storage import is_uri

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    out: str
    model_dir: str
    rows: int  # rows written by this run
    total_rows: int  # rows in OUT after this run
    files_written: int
    files_skipped: int  # parts already there (in this version, or linked from the last)
    seconds: float
    samples_per_s: float  # rows / seconds of this run, Ray start-up included
    ray_init_seconds: float = 0.0  # 0 when Ray was already running
    nodes: list[str] = field(default_factory=list)  # Ray node ids of the actors that embedded
    engine: str = ""  # where the model ran: "ray" or "local" ("" when up to date)
    first_file_seconds: float | None = None  # from the call to the first part on disk
    feature_dim: int = 0
    up_to_date: bool = False
    version: str = ""  # the features' current version after this run
    files_linked: int = 0  # parts of unchanged shards taken from the previous version
    versions: list[str] = field(default_factory=list)  # the versions kept, oldest first
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def extract(
    cfg: ExtractConfig, progress: Callable[[int, int], None] | None = None
) -> ExtractSummary:
    """Extract features of every sample of `cfg.dataset` with `cfg.checkpoint` into Parquet.

    `progress(done, total)` is called as parts are written. Returns at once ("up to date") when
    the current version holds a part of this checkpoint for every shard and no other; else
    builds the next version (parts of unchanged shards linked from the current one) and makes
    it current when complete. Raises ConfigError, before any work, on bad options, a checkpoint
    of another modality, or an `out` that holds something other than features.
    Build the config with `ExtractConfig.parse(dataset=..., checkpoint=..., out=...)`.
    """
    if is_uri(cfg.out):
        # Parts are written locally and pushed to the store before their version's manifest,
        # and that before the root manifest that makes it current (objects appear whole).
        last = ("*.parquet", f"{VERSIONS}/*/{MANIFEST}", MANIFEST)
        markers = (MANIFEST, VERSIONS)
        with storage.staged_output(
            cfg.out, last=last, overwrite=cfg.overwrite, markers=markers, what="extract"
        ) as local:
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
            V.clear(out)
            if (out / BASELINE_DIR).is_dir():
                shutil.rmtree(out / BASELINE_DIR)
        if n := V.remove_partials(out):
            log.info("removed %d partial file(s) left by an interrupted run", n)
        manifest = _manifest(cfg, plan)
        version = V.plan_version(cfg.dataset, plan.card, out, plan.sha, manifest)
        tasks = version.tasks
        summary = ExtractSummary(
            out=str(out),
            model_dir=storage.display(plan.model_dir),
            rows=0,
            total_rows=sum(version.done),
            files_written=0,
            files_skipped=len(version.done),
            seconds=0.0,
            samples_per_s=0.0,
            feature_dim=int(plan.meta["feature_dim"]),
            version=version.name,
            files_linked=version.linked,
            warnings=plan.warnings,
        )
        if version.up_to_date:
            summary.up_to_date = True
            summary.versions = V.versions(out)
        else:
            if tasks:
                summary.engine = choose_engine(cfg, sum(t.samples for t in tasks))
                run = run_on_ray if summary.engine == "ray" else run_here
                total = sum(t.samples for t in tasks)
                for task, data, node in run(cfg, plan, tasks, summary):
                    write_part(version.folder / task.part, data)
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
            summary.versions = V.publish(out, version, manifest, cfg.keep_versions)
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
        "model_version": meta.get("version"),
        "trained_on_fingerprint": meta.get("dataset_fingerprint"),
        "dataset": storage.display(absolute(cfg.dataset)),
        "dataset_fingerprint": card["fingerprint"],
        "class_names": card["class_names"],
        "created_at": now,
    }
