"""Distributed training with Ray Train: DDP over CPU (gloo) or GPU (NCCL) workers.

Ray Data reads the shards and splits the train split across workers (members arrive as raw
bytes; featx decodes them, nothing is unpickled). Each epoch rank 0 evaluates, reports and
checkpoints a self-contained model directory; Ray Train restarts failed workers from the latest
checkpoint, and running the same command again resumes a run whose driver died.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featx import storage
from featx.config import TrainConfig
from featx.dataset import load_card
from featx.errors import ConfigError
from featx.storage import is_uri, location

log = logging.getLogger(__name__)

RAY_RUN = "ray"  # Ray Train's run folder inside RUN_DIR
STATE_FILE = "train_state.pt"
KEYS_DIR = "keys"


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

    def to_dict(self) -> dict:
        return asdict(self)


def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` with Ray Train; returns the best model directory."""
    t0 = time.perf_counter()
    cfg.check_paths()
    cfg = cfg.resolve(load_card(cfg.dataset))
    if not is_uri(cfg.out):
        return _train(cfg, cfg.out.resolve(), None, t0)
    # An object store: Ray Train writes checkpoints there directly (from any node); the driver
    # keeps a local mirror for run.json, best/ and the curves, and pushes them back.
    if cfg.overwrite:
        storage.clear(cfg.out)
    with storage.staged_output(cfg.out, last=("best/featx.json",)) as local:
        result = _train(cfg.model_copy(update={"overwrite": False}), local, cfg.out, t0)
    result.run_dir = storage.display(cfg.out)
    result.best_dir = storage.display(storage.join(cfg.out, "best"))
    return result


def _train(cfg: TrainConfig, out: Path, store: str | None, t0: float) -> TrainResult:
    """Train with RUN_DIR `out` (a local folder; the staging mirror of `store` if given)."""
    card = load_card(cfg.dataset)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    prior = json.loads(run_file.read_text()) if run_file.exists() else None
    if prior:
        if prior["config"] != cfg.run_fingerprint() or prior["dataset"] != card["fingerprint"]:
            raise ConfigError(
                [
                    f"out: {out} holds a run with other settings or data ({prior['config']}); "
                    "use the same options, another --out, or --overwrite"
                ]
            )
        last = _latest_state(out)
        if last and _finished(last, cfg):
            _publish(out)  # the driver may have died between the last checkpoint and here
            return _result(out, cfg, t0, up_to_date=True)

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
    if not prior:
        from featx.fsutil import atomic_write_text

        run = {"config": cfg.run_fingerprint(), "dataset": card["fingerprint"]}
        atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")
        if store:
            storage.push(out, store)  # so a driver elsewhere resumes with the same checks
    dataset = cfg.dataset if is_uri(cfg.dataset) else cfg.dataset.resolve()
    splits = [s for s in ("train", "val") if card["counts"].get(s, {}).get("total", 0)]
    datasets = {}
    if cfg.loader == "ray":
        datasets = {s: _read_split(dataset, card, s, cfg.batch_size) for s in splits}
    # The workers get the config itself, as JSON, and parse it back: no second list of options.
    loop_config = {
        "config": cfg.model_copy(update={"dataset": dataset}).model_dump(mode="json"),
        "card": card,
        "splits": splits,
        "threads": max(1, int(cpus)),
        "key_dir": str(storage.join(store or out, KEYS_DIR)) if cfg.log_keys else None,
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
        dataset_config=_split_train_only() if datasets else None,
    )
    latest = _latest_state(out)
    resumed = latest["epoch"] if latest else 0
    with env_defaults(_fit_env(local)):
        result = trainer.fit()
    if result.error:
        raise result.error
    if store:  # the checkpoints Ray Train kept in the store, and only those
        shutil.rmtree(out / RAY_RUN, ignore_errors=True)
        storage.pull(store, out)
    _publish(out)
    return _result(out, cfg, t0, resumed_from_epoch=resumed)


# ---------------------------------------------------------------------------------------------
# the per-worker loop (runs inside Ray Train workers)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from featx import ray_compat
    from featx.batching import make_collate
    from featx.checkpoint import save_model_dir
    from featx.models import create_model
    from featx.recipe import best_epoch, build_optimizer, should_stop, warmup_cosine

    cfg = TrainConfig.model_validate(config["config"])
    torch.set_num_threads(config["threads"])
    ray_compat.quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    card, dataset = config["card"], cfg.dataset
    modality = card["modality"]
    tokenizer = None
    if card.get("tokenizer"):
        tokenizer = storage.local_path(storage.join(dataset, card["tokenizer"]))
    vocab = None
    if tokenizer:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(tokenizer).get_vocab_size()
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model,
        modality,
        len(card["classes"]),
        cfg.preset,
        vocab_size=vocab,
        sample_rate=card["normalisation"].get("sample_rate", 16000),
    )
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"

    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    n_train = card["counts"]["train"]["total"]
    steps_per_epoch = max(1, math.ceil(n_train / world / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / "model.pt", weights_only=True))
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            history = json.loads((Path(d) / "featx.json").read_text())["metrics"]["history"]
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", start_epoch)
    ddp = prepare_model(model)
    net = ddp.module if hasattr(ddp, "module") else ddp

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda)
    batch_size = cfg.batch_size

    def to_device(batches):
        for batch in batches:
            x = batch["x"].pin_memory() if use_cuda else batch["x"]
            lengths = batch["lengths"]
            yield (
                x.to(device, non_blocking=True),
                None if lengths is None else lengths.to(device),
                batch["labels"].to(device),
                batch["keys"],
            )

    if cfg.loader == "ray":
        ray_its = {s: ray.train.get_dataset_shard(s) for s in config["splits"]}

        def split_batches(split, collate, shuffle_seed=None, share=(0, 1)):
            raw_batches = ray_its[split].iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                prefetch_batches=2,
                local_shuffle_buffer_size=8 * batch_size if shuffle_seed is not None else None,
                local_shuffle_seed=shuffle_seed,
            )
            return to_device(collate(_rows(raw)) for raw in raw_batches)
    else:
        shards = {
            s: [
                (str(storage.join(dataset, sh["shard"])), sh["samples"])
                for sh in card["shards"]
                if sh["split"] == s
            ]
            for s in config["splits"]
        }

        def split_batches(split, collate, shuffle_seed=None, share=(0, 1)):
            samples = _share_of(shards[split], *share, shuffle_seed, 8 * batch_size)
            return to_device(_prefetch(_collated(samples, collate, batch_size)))

    for epoch in range(start_epoch, cfg.epochs):
        if should_stop(history, cfg.patience):  # restored from a checkpoint that stopped
            break
        collate = make_collate(
            modality,
            tokenizer_path=tokenizer,
            max_tokens=cfg.max_tokens,
            augment=cfg.augment,
            flip=cfg.flip,
            seed=cfg.seed + 1000 * epoch + rank,
        )
        ddp.train()
        t_epoch = time.perf_counter()
        loss_sum = correct = seen = 0.0
        keys_seen: list[str] = []
        last = None
        epoch_batches = split_batches("train", collate, cfg.seed + epoch, (rank, world))
        if cfg.loader == "shards":  # shares known up front: no per-step agreement needed
            epoch_batches = _fixed_steps(epoch_batches, steps_per_epoch)
        else:
            epoch_batches = _in_step(epoch_batches, world)
        for batch in epoch_batches:
            # A rank whose split ran out steps on its last batch with zero weight, so every
            # rank takes the same optimizer steps and the replicas never drift apart.
            real = batch is not None
            x, lengths, labels, keys = batch if real else last or _dummy_batch(card, device)
            with autocast:
                logits = ddp(x, lengths)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            (loss if real else loss * 0.0).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if real:
                last = batch
                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                if config["key_dir"]:
                    keys_seen += keys
        seconds = time.perf_counter() - t_epoch
        # on the model's device: NCCL reduces only CUDA tensors
        totals = torch.tensor([loss_sum, correct, seen, seen / max(seconds, 1e-9)], device=device)
        rank_nodes = [node_id]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
            rank_nodes = [None] * world
            dist.all_gather_object(rank_nodes, node_id)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": totals[0].item() / max(totals[2].item(), 1),
            "train_accuracy": totals[1].item() / max(totals[2].item(), 1),
            "samples": int(totals[2].item()),
            "samples_per_s_worker": seen / max(seconds, 1e-9),
            "samples_per_s_total": totals[3].item(),
            "epoch_seconds": seconds,
            "lr": scheduler.get_last_lr()[0],
            "nodes": len(set(rank_nodes)),
        }
        if config["key_dir"]:
            storage.write_text(
                storage.join(location(config["key_dir"]), f"epoch{epoch + 1}-rank{rank}.txt"),
                "\n".join(keys_seen),
            )
        if rank == 0:
            if "val" in config["splits"]:
                plain = make_collate(modality, tokenizer_path=tokenizer, max_tokens=cfg.max_tokens)
                metrics.update(_evaluate(net, split_batches("val", plain), autocast))
            history.append(metrics)
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %s  val_acc %s  %.0f samples/s",
                epoch + 1,
                cfg.epochs,
                metrics["train_loss"],
                _fmt(metrics.get("val_loss")),
                _fmt(metrics.get("val_accuracy")),
                metrics["samples_per_s_total"],
            )
            with tempfile.TemporaryDirectory() as tmp:
                save_model_dir(
                    Path(tmp),
                    net,
                    card,
                    dataset,
                    {"last": metrics, "history": history},
                    extra={"epoch": epoch + 1, "rank_nodes": rank_nodes},
                )
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                    },
                    Path(tmp) / STATE_FILE,
                )
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Rank 0 alone holds the validation history; every rank must stop at the same epoch.
        stop = torch.tensor([int(rank == 0 and should_stop(history, cfg.patience))])
        stop = stop.to(device)
        if world > 1 and dist.is_initialized():
            dist.broadcast(stop, 0)
        if stop.item():
            if rank == 0:
                best = best_epoch(history)
                log.info("early stop: val loss last improved in epoch %d of %d", best, epoch + 1)
            break


def _evaluate(net, batches, autocast) -> dict:
    import torch
    import torch.nn.functional as F

    net.eval()
    loss_sum = correct = n = 0.0
    with torch.inference_mode():
        for x, lengths, labels, _ in batches:
            with autocast:
                logits = net(x, lengths)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            n += len(labels)
    net.train()
    return {"val_loss": loss_sum / max(n, 1), "val_accuracy": correct / max(n, 1)}


def _rows(raw: dict) -> list[dict]:
    from featx.dataset import decode_sample

    cols = [c for c in raw if c != "__url__"]
    n = len(raw["__key__"])
    return [decode_sample({c: raw[c][i] for c in cols if raw[c][i] is not None}) for i in range(n)]


def _share_of(shards: list[tuple[str, int]], rank: int, world: int, seed: int | None, buffer: int):
    """Rank `rank`'s share of the samples of `shards` (url, samples): disjoint from the other
    ranks' shares, together covering every sample, and within one sample of each other in
    size, however many shards there are.

    Shards of equal size are dealt out whole, the same number to every rank; the ones left
    over (fewer than `world` of a size) are shared by sample: every `world`-th sample of them.
    A rank reads only its own shards and the shared ones, and decodes only its samples. With a
    seed, the shard order (hence which rank gets which shard) and a `buffer`-sample window are
    shuffled per epoch; every rank draws the same order from the same seed.
    """
    import random

    import webdataset as wds

    from featx.dataset import decode_sample

    rng = random.Random(seed)
    order = list(shards)
    if seed is not None:
        rng.shuffle(order)
    owner = _owners(order, world)

    def raw():
        shared = 0  # index among the shared shards' samples, the same on every rank
        for url, _ in order:
            if owner[url] not in (rank, None):
                continue
            for s in wds.tariterators.group_by_keys(
                wds.tariterators.tar_file_expander(_opened([url]))
            ):
                if owner[url] is None:
                    shared += 1
                    if (shared - 1) % world != rank:
                        continue
                yield s

    mine = raw()
    if seed is not None:
        # webdataset's buffer shuffle: yields once `initial` samples are in, then fills up to
        # `buffer`, so an epoch's first batch is not held back by a full buffer's reads.
        mine = wds.filters.shuffle(buffer, initial=min(buffer, 100), rng=rng)(mine)
    for s in mine:
        yield decode_sample({k: v for k, v in s.items() if k != "__url__"})


def _owners(order: list[tuple[str, int]], world: int) -> dict[str, int | None]:
    """url -> the rank that reads the whole shard, or None for a shard shared by sample."""
    by_size: dict[int, list[str]] = {}
    for url, n in order:
        by_size.setdefault(n, []).append(url)
    owner: dict[str, int | None] = {}
    for urls in by_size.values():
        whole = len(urls) // world * world
        for i, url in enumerate(urls):
            owner[url] = i % world if i < whole else None
    return owner


def _opened(urls):
    for url in urls:
        with storage.open_input(url) as stream:
            yield {"url": url, "stream": stream}


def _collated(samples, collate, batch_size: int):
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def _prefetch(items, depth: int = 2):
    """Run `items` in a background thread, `depth` ahead, so decoding overlaps the step
    (Pillow and torch both release the GIL). Errors surface in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="featx-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _dummy_batch(card: dict, device):
    """A one-sample batch for a rank that got no data at all (fewer blocks than ranks)."""
    import torch

    norm = card["normalisation"]
    if card["modality"] == "image":
        size = norm["image_size"]
        x, lengths = torch.zeros(1, 3, size, size), None
    elif card["modality"] == "text":
        x, lengths = torch.ones(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    else:
        n = norm["sample_rate"] // 10
        x, lengths = torch.zeros(1, n), torch.tensor([n])
    lengths = None if lengths is None else lengths.to(device)
    return x.to(device), lengths, torch.zeros(1, dtype=torch.long, device=device), []


def _fixed_steps(batches, steps: int):
    """Yield exactly `steps` items: the local batches, then None (a zero-weight step).

    With the by-sample split every rank knows the largest share from the card, so the ranks
    agree on the step count without talking; a rank never skips an all-reduce the others make.
    """
    it = iter(batches)
    for _ in range(steps):
        yield next(it, None)
    if next(it, None) is not None:
        raise RuntimeError(
            "the train shards hold more samples than dataset.json records; the dataset changed "
            "after ingest: re-run `featx ingest` on it"
        )


def _in_step(batches, world: int):
    """Yield each local batch, then None until every rank has run out (one all-reduce a step).

    Ray's equal split would drop up to world-1 rows an epoch; an unequal split covers every
    row once, and this keeps the ranks in lock-step while their counts differ by a batch.
    """
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag)
        if flag.item() == 0:
            return
        yield batch


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


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


def _read_split(dataset: Path, card: dict, split: str, batch_size: int):
    import ray

    ctx = ray.data.DataContext.get_current()
    # featx reports per epoch; Ray Data's per-execution bars would flood the terminal.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    paths = [str(storage.join(dataset, s["shard"])) for s in card["shards"] if s["split"] == split]
    # decoder=None: members stay raw bytes; featx decodes them in the worker.
    ds = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=len(paths))
    # Re-chunk into batch-sized blocks (fused into the read task, zero-copy) so the streaming
    # split hands work out at batch granularity and the ranks' shares differ by a batch at most.
    return ds.map_batches(
        _identity, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True
    )


def _identity(batch):
    return batch


def _split_train_only():
    """Split only `train` across workers, without dropping rows (Ray's default split is equal,
    which drops the remainder); rank 0 reads all of `val`."""
    from ray.train import DataConfig

    class SplitTrain(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = DataConfig.default_ingest_options()
                if name == "train":
                    splits = ds.streaming_split(world_size, equal=False)
                    for i, it in enumerate(splits):
                        output[i][name] = it
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return SplitTrain(datasets_to_split=["train"])


def _checkpoints(out: Path) -> list[tuple[Path, dict]]:
    """Complete checkpoints Ray Train kept in RUN_DIR, oldest first, with their featx.json."""
    found = []
    for meta in (out / RAY_RUN).glob("checkpoint_*/featx.json"):
        found.append((meta.parent, json.loads(meta.read_text())))
    return sorted(found, key=lambda cm: cm[1]["epoch"])


def latest_epoch(run_dir) -> int:
    """The epoch of the newest complete checkpoint in RUN_DIR (a folder or a URI); 0 if none.
    Cheap enough to poll: it reads only the checkpoints' featx.json."""
    metas = storage.glob(storage.join(run_dir, RAY_RUN), "checkpoint_*/featx.json")
    return max((json.loads(storage.read_text(m))["epoch"] for m in metas), default=0)


def _finished(meta: dict, cfg: TrainConfig) -> bool:
    """A checkpoint at the last epoch, or one after which early stopping ends the run."""
    from featx.recipe import should_stop

    history = meta["metrics"]["history"]
    return meta.get("epoch", 0) >= cfg.epochs or should_stop(history, cfg.patience)


def _latest_state(out: Path) -> dict | None:
    ckpts = _checkpoints(out)
    return ckpts[-1][1] if ckpts else None


def _history(model_dir: Path) -> list[dict]:
    return json.loads((model_dir / "featx.json").read_text())["metrics"]["history"]


def _publish(out: Path) -> None:
    """Copy the best kept checkpoint (by validation loss) to RUN_DIR/best; write the curves."""
    ckpts = _checkpoints(out)
    if not ckpts:
        raise RuntimeError(f"training finished without a checkpoint in {out / RAY_RUN}")

    def score(cm):
        last = cm[1]["metrics"]["last"]
        return last.get("val_loss", last["train_loss"])

    best_dir, best_meta = min(ckpts, key=score)
    current = out / "best" / "featx.json"
    if not current.exists() or json.loads(current.read_text()) != best_meta:
        tmp, old = out / ".best.tmp", out / ".best.old"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best_dir, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
        if (out / "best").exists():
            (out / "best").rename(old)
        tmp.rename(out / "best")
        shutil.rmtree(old, ignore_errors=True)
    write_metrics(out, ckpts[-1][1]["metrics"]["history"])


def write_metrics(out: Path, history: list[dict]) -> None:
    import pandas as pd

    from featx.fsutil import atomic_write_text

    fields = sorted({k for row in history for k in row}, key=_metric_order)
    text = pd.DataFrame(history, columns=fields).to_csv(index=False, float_format="%.6g")
    atomic_write_text(out / "metrics.csv", text)
    plot_curves(history, out / "curves.png")


def _metric_order(name: str) -> tuple:
    order = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    return (order.index(name) if name in order else len(order), name)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _result(out: Path, cfg: TrainConfig, t0: float, **kw) -> TrainResult:
    history = _history(out / "best") if (out / "best").exists() else []
    latest = _latest_state(out)
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
        **kw,
    )
