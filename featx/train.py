"""Distributed training with Ray Train: DDP over CPU (gloo) or GPU (NCCL) workers.

The driver: checks RUN_DIR, starts Ray Train with `featx.train_loop`'s per-worker recipe,
publishes the best checkpoint. Ray Train restarts failed workers from the latest checkpoint,
and running the same command again resumes a run whose driver died.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featx import storage
from featx.checkpoint import MODEL_FILE, TOKENIZER_FILE
from featx.config import TrainConfig
from featx.dataset import load_card
from featx.dedup import read_exclusions
from featx.errors import ConfigError
from featx.run_dir import (
    KEYS_DIR,
    RAY_RUN,
    RUN_FILE,
    VERSIONS,
    finished,
    latest_epoch,
    latest_state,
    model_history,
    plot_curves,
    publish,
    start_version,
    versions,
    write_metrics,
)
from featx.storage import is_uri
from featx.train_data import read_split, split_train_only

# Importable from here, as they were before the run-dir helpers got their own module.
__all__ = [
    "KEYS_DIR",
    "RAY_RUN",
    "TrainConfig",
    "TrainResult",
    "latest_epoch",
    "plot_curves",
    "train",
    "write_metrics",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    best_dir: str
    epochs: int
    best_val_loss: float | None
    best_val_accuracy: float | None
    metrics: list[dict]
    seconds: float
    resumed_from_epoch: int = 0
    up_to_date: bool = False
    rank_nodes: list[str] | None = None  # the Ray node id of each rank in the last epoch
    version: int = 1  # the model version in RUN_DIR: a new one each time the dataset changed
    versions_kept: list[int] | None = None  # earlier versions in RUN_DIR/versions/

    def to_dict(self) -> dict:
        return asdict(self)


# What makes a folder a RUN_DIR that --overwrite may delete: its run.json (written when a run
# starts) or a published model.
RUN_MARKERS = (RUN_FILE, "best/featx.json")


def same_settings(prior: dict, requested: dict) -> bool:
    """A RUN_DIR's recorded settings against those asked for now: equal, where an automatic
    one (None) matches what any earlier run recorded for it (run.json of featx before this
    recorded the resolved value)."""
    return all(v is None or prior.get(k) == v for k, v in requested.items()) and set(prior) <= set(
        requested
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` with Ray Train; returns the best model directory."""
    t0 = time.perf_counter()
    cfg.check_paths()
    # The settings as asked for: "auto" (None) stays auto, so a dataset that grew (and gets
    # another automatic batch size) trains a new version instead of being refused.
    requested = cfg.run_fingerprint()
    cfg = cfg.resolve(load_card(cfg.dataset))
    if not is_uri(cfg.out):
        return _train(cfg, cfg.out.resolve(), None, t0, requested)
    # An object store: Ray Train writes checkpoints there directly (from any node); the driver
    # keeps a local mirror for run.json, best/ and the curves, and pushes them back.
    with storage.staged_output(
        cfg.out,
        last=("best/featx.json",),
        overwrite=cfg.overwrite,
        markers=RUN_MARKERS,
        what="train",
    ) as local:
        result = _train(cfg.model_copy(update={"overwrite": False}), local, cfg.out, t0, requested)
    result.run_dir = storage.display(cfg.out)
    result.best_dir = storage.display(storage.join(cfg.out, "best"))
    return result


def _train(
    cfg: TrainConfig, out: Path, store: str | None, t0: float, requested: dict
) -> TrainResult:
    """Train with RUN_DIR `out` (a local folder; the staging mirror of `store` if given);
    `requested` is the run's settings as asked for (automatic ones None)."""
    card = load_card(cfg.dataset)
    if cfg.overwrite and out.exists():
        storage.check_overwrite(out, RUN_MARKERS)  # never the dataset, `.`, or a home folder
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    prior = json.loads(run_file.read_text()) if run_file.exists() else None
    version, warm_from = 1, None
    if prior:
        if not same_settings(prior["config"], requested):
            raise ConfigError(
                [
                    f"out: {out} holds a run with other settings ({prior['config']}); "
                    "use the same options, another --out, or --overwrite"
                ]
            )
        version = int(prior.get("version", 1))
        if prior["dataset"] == card["fingerprint"]:
            last = latest_state(out)
            from featx.recipe import earliest_stop

            if last and finished(
                last, cfg.epochs, cfg.patience, earliest_stop(cfg.objective, cfg.epochs)
            ):
                publish(out)  # the driver may have died between the last checkpoint and here
                return _result(out, cfg, t0, up_to_date=True)
        else:
            # The dataset grew or changed: a new model version, trained beside the current
            # one, whose best/ extraction keeps reading until the new version finishes.
            version = start_version(out, prior, store, cfg.keep_versions)
            log.info(
                "the dataset changed since version %d: training version %d", version - 1, version
            )
            prior = None
            previous = out / VERSIONS / f"v{version - 1}" / "best" / MODEL_FILE
            if cfg.warm_start and previous.exists():
                warm_from = str(previous)

    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )

    from featx import ray_compat
    from featx.cluster import address_from, check_shared, env_defaults, init_ray
    from featx.train_loop import train_loop_per_worker

    if not ray.is_initialized():
        init_ray(cfg.ray_address, prestart=False)
    # Workers on any node read the shards and persist checkpoints into RUN_DIR.
    check_shared({"dataset": cfg.dataset, "out": store or out})
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    cpus = cfg.cpus_per_worker or _default_cpus_per_worker(
        total_cpus, cfg.workers, reserve_for_data=cfg.loader == "ray"
    )
    if cpus * cfg.workers > total_cpus:
        raise ConfigError(
            [
                f"workers: {cfg.workers} workers x {cpus} CPUs exceed the cluster's {total_cpus:g} "
                "CPUs; lower --workers or --cpus-per-worker"
            ]
        )
    from featx.fsutil import atomic_write_text

    snapshot = card.get("tokenizer") and not (out / TOKENIZER_FILE).exists()
    if snapshot:
        # A new model version fits its own tokenizer on the train shards it starts with, and
        # trains and extracts with those token ids; the dataset's tokenizer.json (fitted by
        # the first ingest) is never changed under a model.
        _fit_run_tokenizer(cfg.dataset, card, out / TOKENIZER_FILE)
    if not prior:
        run = {"config": requested, "dataset": card["fingerprint"], "version": version}
        atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")
    if store and (snapshot or not prior):
        storage.push(out, store)  # so a driver elsewhere resumes with the same checks
    dataset = cfg.dataset if is_uri(cfg.dataset) else cfg.dataset.resolve()
    splits = [s for s in ("train", "val") if card["counts"].get(s, {}).get("total", 0)]
    datasets = {}
    exclude = sorted(read_exclusions(cfg.exclude)) if cfg.exclude else []
    if exclude:
        log.info("leaving out %d sample keys listed in %s", len(exclude), cfg.exclude)
    if cfg.loader == "ray":
        datasets = {s: read_split(dataset, card, s, cfg.batch_size, exclude) for s in splits}
    # The workers get the config itself, as JSON, and parse it back: no second list of options.
    loop_config = {
        "config": cfg.model_copy(update={"dataset": dataset}).model_dump(mode="json"),
        "card": card,
        "splits": splits,
        "threads": max(1, int(cpus)),
        "key_dir": str(storage.join(store or out, KEYS_DIR)) if cfg.log_keys else None,
        "tokenizer": str(storage.join(store or out, TOKENIZER_FILE))
        if card.get("tokenizer")
        else None,
        "version": version,
        "warm_start": warm_from,
        "exclude": exclude,
    }
    local = not address_from(cfg.ray_address)
    trainer = ray_compat.trainer_class(datasets=bool(datasets), local=local)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name=RAY_RUN,
            storage_path=store or str(out),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's own per-report INFO lines repeat the metrics featx logs per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep,
                checkpoint_score_attribute="val_loss" if "val" in splits else "train_loss",
                checkpoint_score_order="min",
            ),
        ),
        datasets=datasets or None,
        dataset_config=split_train_only() if datasets else None,
    )
    latest = latest_state(out)
    resumed = latest["epoch"] if latest else 0
    with env_defaults(_fit_env(local)):
        result = trainer.fit()
    if result.error:
        raise result.error
    if store:  # the checkpoints Ray Train kept in the store, and only those
        shutil.rmtree(out / RAY_RUN, ignore_errors=True)
        storage.pull(store, out)
    publish(out)
    return _result(out, cfg, t0, resumed_from_epoch=resumed)


# ---------------------------------------------------------------------------------------------
# driver helpers


def _default_cpus_per_worker(total: float, workers: int, reserve_for_data: bool) -> float:
    """Split the CPUs between workers. With the Ray Data loader, leave one CPU (half on a 1-CPU
    machine) to its read tasks, which otherwise never get scheduled and the run hangs."""
    reserve = (1.0 if total >= 2 else 0.5) if reserve_for_data else 0.0
    share = (total - reserve) / workers
    if share <= 0:
        raise ConfigError(
            [f"workers: {workers} workers cannot fit on {total:g} CPUs with one left for Ray Data"]
        )
    # Whole CPUs where they are available, so torch threads map to cores.
    return math.floor(share) if share >= 1 else round(share, 3)


def _fit_env(local: bool) -> dict[str, str]:
    """Ray Train settings for the fit (the user's own values win; the driver's propagate).

    Ray Train's controller polls the workers every 2 s by default, so a finished run idles up
    to 2 s before returning; 0.5 s costs nothing measurable. A laptop's Ray is never drained
    or pre-empted, so it needs no preemption-watcher actor.
    """
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    if local:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def _result(out: Path, cfg: TrainConfig, t0: float, **kw) -> TrainResult:
    history = model_history(out / "best") if (out / "best").exists() else []
    latest = latest_state(out)
    if latest:
        history = latest["metrics"]["history"]
    best_meta = json.loads((out / "best" / "featx.json").read_text())
    best = best_meta["metrics"]["last"]
    return TrainResult(
        run_dir=str(out),
        best_dir=str(out / "best"),
        epochs=len(history),
        best_val_loss=best.get("val_loss"),
        best_val_accuracy=best.get("val_accuracy"),
        metrics=history,
        seconds=round(time.perf_counter() - t0, 2),
        rank_nodes=(latest or {}).get("rank_nodes"),
        version=int(best_meta.get("version", 1)),
        versions_kept=versions(out),
        **kw,
    )


def _fit_run_tokenizer(dataset, card: dict, path: Path) -> None:
    """Fit the run's tokenizer on the train shards the card lists, with the vocabulary size
    the dataset was ingested with."""
    from tokenizers import Tokenizer

    from featx.tokenizer import fit_tokenizer, shard_texts

    vocab = card.get("vocab_size")
    if vocab is None:  # a dataset ingested before featx recorded it: its tokenizer's size
        first = storage.local_path(storage.join(dataset, card["tokenizer"]))
        vocab = Tokenizer.from_file(first).get_vocab_size()
    shards = [
        storage.local_path(storage.join(dataset, sh["shard"]))
        for sh in card["shards"]
        if sh["split"] == "train"
    ]
    fit_tokenizer(shard_texts(shards), vocab, path)
