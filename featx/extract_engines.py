"""Where extraction's shard tasks run: in this process, or on a Ray Data actor pool.

Both take the preflight's plan and the pending shard tasks and yield `(task, part bytes, node)`
as parts are finished; `featx.extract` writes them. `choose_engine` picks one for `--engine`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import asdict

from featx.config import ExtractConfig
from featx.embed import ShardEmbedder, ShardTask
from featx.errors import ConfigError
from featx.extract_plan import ExtractPlan

log = logging.getLogger(__name__)

# The most pending samples `--engine auto` embeds in this process rather than on Ray. On 2 cores
# (tests/benchmarks/bench_extract.py) a Ray actor pool costs about 12 s before its first part
# and then embeds ~2,500 samples/s; this process costs ~1.5 s and embeds ~1,800/s, so it is
# faster up to roughly 50,000 samples. A bigger machine gives the pool more actors, so the
# switch comes well before that.
LOCAL_MAX_SAMPLES = 20_000


def choose_engine(cfg: ExtractConfig, samples: int) -> str:
    """`ray` or `local` for `cfg.engine`; `auto` runs a small job on a laptop in this process.

    A Ray actor pool costs seconds before its first row (starting Ray, then processes that
    import torch and load the model), which is most of a small job. So `auto` embeds here
    when no cluster is named (argument or RAY_ADDRESS) and at most LOCAL_MAX_SAMPLES samples
    are pending; otherwise it uses Ray Data.
    """
    from featx.cluster import address_from

    if cfg.engine != "auto":
        return cfg.engine
    if address_from(cfg.ray_address) or samples > LOCAL_MAX_SAMPLES:
        return "ray"
    ray = sys.modules.get("ray")  # a process already connected to a cluster keeps using it
    if ray is not None and ray.is_initialized() and len(ray.nodes()) > 1:
        return "ray"
    return "local"


def run_here(cfg: ExtractConfig, plan: ExtractPlan, tasks: list[ShardTask], summary):
    """Embed the shards one after another in this process, with the model preflight loaded."""
    device = "cuda" if cfg.gpu else "cpu"
    if cfg.gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(["gpu: this machine has no CUDA GPU; drop --gpu to run on CPUs"])
    log.info(
        "extracting %d samples from %d shards in this process",
        sum(t.samples for t in tasks),
        len(tasks),
    )
    embedder = ShardEmbedder(
        str(plan.model_dir),
        plan.sha,
        stamp=plan.stamp(),
        class_names=plan.card["class_names"],
        batch_size=cfg.batch_size,
        device=device,
        loaded=(plan.model.to(device), plan.meta),
    )
    for task in tasks:
        yield task, embedder.embed(task), None


def run_on_ray(cfg: ExtractConfig, plan: ExtractPlan, tasks: list[ShardTask], summary):
    """Embed the shards on a Ray Data actor pool, one task per shard; yields the parts as
    they are finished, in any order."""
    import ray

    from featx.cluster import alive_nodes, check_shared

    with ray_session(cfg.ray_address) as init_seconds:
        summary.ray_init_seconds = init_seconds
        cpus = float(ray.cluster_resources().get("CPU", 0))
        problems = []
        if cfg.gpu and not ray.cluster_resources().get("GPU"):
            problems.append("gpu: the Ray cluster has no GPUs; drop --gpu to run on CPUs")
        if cpus <= 0:
            problems.append("the Ray cluster has no CPUs")
        if problems:
            raise ConfigError(problems)
        # Model actors may run on any node of a cluster.
        check_shared({"dataset": cfg.dataset, "checkpoint": plan.model_dir})
        # An actor without a shard to embed would only cost its start-up.
        workers = min(cfg.workers or default_workers(cpus, cfg.gpu), len(tasks))
        # Actors read their own shards, so no CPU is kept back for read tasks; an actor never
        # asks for more CPUs than the largest node has, or it could not be placed.
        largest = max(n["Resources"].get("CPU", 0) for n in alive_nodes())
        actor_cpus = min(cpus / workers, largest)
        if cfg.gpu:
            actor_cpus = min(actor_cpus, 1.0)
        threads = max(1, round(actor_cpus))
        log.info(
            "extracting %d samples from %d shards: %d actor(s) x %.2f CPU, %d torch thread(s)%s",
            sum(t.samples for t in tasks),
            len(tasks),
            workers,
            actor_cpus,
            threads,
            ", 1 GPU each" if cfg.gpu else "",
        )
        by_part = {t.part: t for t in tasks}
        ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map_batches(
            ShardEmbedder,
            fn_constructor_args=(str(plan.model_dir), plan.sha),
            fn_constructor_kwargs={
                "stamp": plan.stamp(),
                "class_names": plan.card["class_names"],
                "batch_size": cfg.batch_size,
                "device": "cuda" if cfg.gpu else "cpu",
                "threads": threads,
            },
            batch_size=1,  # one shard a call: the shard is the unit of work and of retry
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus,
            num_gpus=1 if cfg.gpu else None,
        )
        ds.context.enable_progress_bars = False  # the caller shows progress
        ds.context.print_on_execution_start = False
        done = set()
        for row in ds.iter_rows():
            task = by_part.get(row["part"])
            if task is None or task.part in done:
                raise RuntimeError(f"Ray Data returned part {row['part']!r} unexpectedly")
            done.add(task.part)
            yield task, bytes(row["data"]), str(row["node"])
    if missing := [t.id for t in tasks if t.part not in done]:
        raise RuntimeError(f"Ray Data returned no part for {', '.join(missing)}")


def default_workers(cpus: float, gpu: bool) -> int:
    """Model actors when `--workers` is not given: one with `--gpu` (one GPU); on CPUs, 2 from
    2 CPUs up, then about one per 4 CPUs. Inside an actor, decoding (one Python thread) and
    the model (torch threads) overlap only partly; with two or more actors one decodes while
    another runs the model."""
    if gpu or cpus < 2:
        return 1
    return max(2, round(cpus / 4))


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
