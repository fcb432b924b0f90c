"""The per-worker training recipe Ray Train runs on every rank, read top to bottom.

`train_loop_per_worker` sets up (model, optimiser, state, data), then runs the epochs: train,
reduce metrics, evaluate and checkpoint on rank 0, stop together. The pieces take plain
arguments, so they run (and are tested) without Ray or a process group.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from featx import storage
from featx.config import TrainConfig
from featx.train_data import RankData, dummy_batch, shard_lists

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """One rank's whole run; `config` is what `featx.train` sends: the TrainConfig as JSON,
    the dataset card, the splits present, torch threads, and where to log sample keys."""
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from featx import ray_compat
    from featx.batching import make_collate
    from featx.recipe import best_epoch, earliest_stop, should_stop

    cfg = TrainConfig.model_validate(config["config"])
    card, splits, key_dir = config["card"], config["splits"], config["key_dir"]
    torch.set_num_threads(config["threads"])
    ray_compat.quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    device = ray.train.torch.get_device()

    tokenizer = storage.local_path(config["tokenizer"]) if config.get("tokenizer") else None
    from featx.checkpoint import load_meta

    checkpoint = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        # A resumed run opens its checkpoint once (an object store's is downloaded): for the
        # architecture it started with, then for the state it left.
        folder = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        model = setup_model(
            cfg,
            card,
            tokenizer,
            load_meta(folder)["model"] if folder else None,
            # rank 0's start reaches every rank: DDP broadcasts its weights when it wraps them
            data_start=rank == 0 and not config.get("warm_start"),
            # a new version's bag is fitted on its own train split, warm started or not
            fit_bag=rank == 0,
            exclude=config.get("exclude") or (),
        )
        contrastive = cfg.objective != "supervised"
        min_epochs = earliest_stop(cfg.objective, cfg.epochs)
        if contrastive:  # the projection head trains with the model; extraction never sees it
            from featx.contrastive import ContrastiveNet

            model = ContrastiveNet(model)
        steps_per_epoch = max(
            1, math.ceil(card["counts"]["train"]["total"] / world / cfg.batch_size)
        )
        optimizer, scheduler = setup_optimizer(
            model, cfg.lr, cfg.weight_decay, cfg.warmup, steps_per_epoch * cfg.epochs
        )
        start_epoch, history = 0, []
        if config.get("warm_start") and not folder:
            loaded = warm_start(features_of(model), storage.local_path(config["warm_start"]))
            if rank == 0:
                log.info("warm start: %d of %d tensors from the previous version", *loaded)
        if folder:
            start_epoch, history = restore(folder, model, optimizer, scheduler)
            if rank == 0:
                log.info("resuming from the checkpoint of epoch %d", start_epoch)
    ddp = prepare_model(model)
    net = ddp.module if hasattr(ddp, "module") else ddp
    data = setup_data(cfg.loader, card, cfg.dataset, splits, cfg.batch_size, device)
    data.exclude = frozenset(config.get("exclude") or ())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    views = 2 if contrastive else 1
    from featx.contrastive import contrastive_loss, evaluate_contrastive

    step_loss = (
        contrastive_loss(cfg.temperature, cfg.batch_size, cfg.objective == "supcon")
        if contrastive
        else supervised_loss(cfg.label_smoothing)
    )
    fallback = (lambda: both_views(dummy_batch(card, device))) if contrastive else None

    for epoch in range(start_epoch, cfg.epochs):
        if should_stop(history, cfg.patience, min_epochs=min_epochs):  # restored, had stopped
            break
        collate = make_collate(
            card["modality"],
            tokenizer_path=tokenizer,
            max_tokens=cfg.max_tokens,
            augment=cfg.augment,
            flip=cfg.flip,
            seed=cfg.seed + 1000 * epoch + rank,
            views=views,
        )
        t_epoch = time.perf_counter()
        totals = run_epoch(
            ddp,
            optimizer,
            scheduler,
            data.train_steps(collate, cfg.seed + epoch, rank, world, steps_per_epoch),
            label_smoothing=cfg.label_smoothing,
            grad_clip=cfg.grad_clip,
            autocast=autocast,
            fallback=fallback or (lambda: dummy_batch(card, device)),
            step_loss=step_loss,
            keep_keys=bool(key_dir),
        )
        seconds = time.perf_counter() - t_epoch
        reduced, rank_nodes = reduce_metrics(totals, seconds, node_id, world, device)
        metrics = {
            "epoch": epoch + 1,
            **reduced,
            "lr": scheduler.get_last_lr()[0],
            "nodes": len(set(rank_nodes)),
        }
        if key_dir:
            write_keys(key_dir, epoch + 1, rank, totals.keys)
        if rank == 0:
            if "val" in splits:
                plain = make_collate(
                    card["modality"], tokenizer_path=tokenizer, max_tokens=cfg.max_tokens
                )
                if contrastive:
                    # the same views every epoch (a fixed seed), so the val loss is comparable
                    paired = make_collate(
                        card["modality"],
                        tokenizer_path=tokenizer,
                        max_tokens=cfg.max_tokens,
                        augment=True,
                        flip=cfg.flip,
                        seed=cfg.seed,
                        views=2,
                    )
                    metrics.update(
                        evaluate_contrastive(
                            net,
                            data.batches("val", paired),
                            data.batches("val", plain),
                            cfg.temperature,
                            cfg.objective == "supcon",
                            autocast,
                        )
                    )
                else:
                    metrics.update(evaluate(net, data.batches("val", plain), autocast))
            history.append(metrics)
            log_epoch(metrics, cfg.epochs)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(
                    Path(tmp),
                    features_of(net),
                    optimizer,
                    scheduler,
                    card,
                    tokenizer,
                    history,
                    extra={
                        "rank_nodes": rank_nodes,
                        "max_tokens": cfg.max_tokens,
                        "version": config.get("version", 1),
                        "objective": cfg.objective,
                    },
                    head=net.projector if contrastive else None,
                )
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Rank 0 alone holds the validation history; every rank must stop at the same epoch.
        stop = rank == 0 and should_stop(history, cfg.patience, min_epochs=min_epochs)
        if stop_together(stop, world, device):
            if rank == 0:
                best = best_epoch(history)
                log.info("early stop: val loss last improved in epoch %d of %d", best, epoch + 1)
            break


# -- set-up ---------------------------------------------------------------------------------------


def warm_start(model: torch.nn.Module, weights: str) -> tuple[int, int]:
    """Copy the previous version's weights into `model` where names and shapes match (a
    re-fitted tokenizer can change the embedding's size); returns (copied, total). A token bag
    is not copied: it is fitted on each version's own train split."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    own = model.state_dict()
    fitted = model.fitted_keys()
    same = {
        k: v for k, v in state.items() if k in own and own[k].shape == v.shape and k not in fitted
    }
    model.load_state_dict(same, strict=False)
    return len(same), len(own)


def setup_model(
    cfg: TrainConfig,
    card: dict,
    tokenizer: str | None,
    saved: dict | None = None,
    *,
    data_start: bool = False,
    fit_bag: bool = False,
    exclude=(),
) -> torch.nn.Module:
    """The model the card's data needs, seeded by `cfg.seed`; with `saved` (a checkpoint's
    model config), the architecture that checkpoint was trained with. With `data_start`, a new
    text model's embeddings start as `cfg.text_init` (resolved) says: from an LSA of the train
    split without the `exclude` keys, or N(0, 1). With `fit_bag`, a new model's token bag
    (contrastive text) is fitted on that split."""
    from featx.models import create_model, rebuild_model

    torch.manual_seed(cfg.seed)
    if saved:
        return rebuild_model(saved)
    vocab = None
    if tokenizer:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(tokenizer).get_vocab_size()
    model = create_model(
        cfg.model,
        card["modality"],
        # an unlabelled dataset (contrastive) has no classes; its unused head gets one logit
        max(1, len(card["classes"])),
        cfg.preset,
        vocab_size=vocab,
        sample_rate=card["normalisation"].get("sample_rate", 16000),
        # without labels, max or attention pooling alone left text features under a bag of
        # random word vectors; with labels the token mean cost the sample text 0.85 -> 0.45
        token_mean=card["modality"] == "text" and cfg.objective != "supervised",
        # without labels, attention pooling alone left audio features under log-mel statistics
        frame_stats=card["modality"] == "audio" and cfg.objective != "supervised",
        # without labels, no feature of 128-192 trained numbers came near tf-idf on real text
        token_bag=card["modality"] == "text" and cfg.objective != "supervised",
    )
    lsa = data_start and card["modality"] == "text" and cfg.text_init == "lsa"
    if lsa or (fit_bag and model.bag is not None):
        from featx.recipe import BAG_MAX_TEXTS, LSA_MAX_TEXTS

        limit = LSA_MAX_TEXTS if lsa else BAG_MAX_TEXTS
        texts = train_token_ids(cfg, card, tokenizer, limit, exclude)
        if lsa:
            init_text_embeddings(model, cfg, texts)
        if fit_bag and model.bag is not None:
            fit_text_bag(model, cfg, texts)
    return model


def train_token_ids(
    cfg: TrainConfig, card: dict, tokenizer: str, limit: int, exclude=()
) -> list[list[int]]:
    """The token ids of the train split's first `limit` texts (padding excluded), read and
    tokenized as training batches them, without the `exclude` keys."""
    import itertools

    from featx.batching import make_collate

    data = setup_data("shards", card, cfg.dataset, ["train"], 256, torch.device("cpu"))
    data.exclude = frozenset(exclude)
    collate = make_collate("text", tokenizer_path=tokenizer, max_tokens=cfg.max_tokens)
    texts = (
        ids[:n]
        for x, lengths, _, _ in data.batches("train", collate)
        for ids, n in zip(x.tolist(), lengths.tolist(), strict=True)
    )
    return list(itertools.islice(texts, limit))


def init_text_embeddings(model: torch.nn.Module, cfg: TrainConfig, texts) -> bool:
    """Start the token embeddings from an LSA of the train split's `texts` (token ids,
    `featx.recipe.lsa_embeddings`); False if the split is too small for it."""
    from featx.recipe import lsa_embeddings

    embed = model.stem.embed
    t0 = time.perf_counter()
    emb = lsa_embeddings(texts, embed.num_embeddings, embed.embedding_dim, cfg.seed)
    if emb is None:
        return False
    with torch.no_grad():
        embed.weight.copy_(emb)
    log.info(
        "token embeddings start from an LSA of the train split (%.1f s)", time.perf_counter() - t0
    )
    return True


def fit_text_bag(model: torch.nn.Module, cfg: TrainConfig, texts: list) -> bool:
    """Fit the model's token bag (`featx.recipe.fit_token_bag`) on the train split's first
    BAG_MAX_TEXTS `texts`; False (the bag stays zero) if the split is too small for it."""
    from featx.recipe import BAG_MAX_TEXTS, fit_token_bag

    bag = model.bag
    t0 = time.perf_counter()
    fitted = fit_token_bag(
        texts[:BAG_MAX_TEXTS], bag.vocab_size, bag.proj.shape[1], len(bag.keys), cfg.seed
    )
    if fitted is None:
        log.warning(
            "token bag: the train split is too small for an LSA (%d texts); its %d feature "
            "columns stay zero",
            len(texts),
            bag.proj.shape[1],
        )
        return False
    with torch.no_grad():
        for name, value in fitted.items():
            getattr(bag, name).copy_(value)
    log.info(
        "token bag: an LSA of the train split's tokens and token pairs (%.1f s)",
        time.perf_counter() - t0,
    )
    return True


def features_of(model: torch.nn.Module) -> torch.nn.Module:
    """The feature model inside a contrastive wrapper (or the model itself): what is saved."""
    from featx.contrastive import ContrastiveNet

    return model.model if isinstance(model, ContrastiveNet) else model


def both_views(batch: tuple) -> tuple:
    """A one-sample batch as its two (identical) views."""
    x, lengths, labels, keys = batch
    return (
        torch.cat([x, x]),
        None if lengths is None else torch.cat([lengths, lengths]),
        labels,
        keys,
    )


def setup_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, warmup: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (featx.recipe's groups) and its warm-up + cosine schedule, stepped every step."""
    from featx.recipe import build_optimizer, warmup_cosine

    optimizer = build_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    return optimizer, scheduler


def restore(folder: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load a checkpoint folder into model, optimiser and schedule; returns (epochs done, the
    metrics history)."""
    from featx.checkpoint import MODEL_FILE, load_meta, load_train_state, verify

    meta = load_meta(folder)
    verify(folder, meta)  # a checkpoint copy cut short stops here, not as garbage weights
    features_of(model).load_state_dict(torch.load(Path(folder) / MODEL_FILE, weights_only=True))
    state = load_train_state(folder)
    if "head" in state:  # a contrastive run's projection head
        model.projector.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), meta["metrics"]["history"]


def setup_data(
    loader: str, card: dict, dataset, splits: list[str], batch_size: int, device
) -> RankData:
    """This rank's data: its shards (read here), or Ray Data's split of each split."""
    if loader == "ray":
        import ray.train

        sources = {s: ray.train.get_dataset_shard(s) for s in splits}
    else:
        sources = shard_lists(card, dataset, splits)
    return RankData(loader, sources, batch_size, device)


# -- one epoch ------------------------------------------------------------------------------------


@dataclass
class EpochTotals:
    """One rank's sums over its real (not zero-weight) training samples of an epoch."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    keys: list[str] = field(default_factory=list)


def run_epoch(
    model,
    optimizer,
    scheduler,
    batches,
    *,
    label_smoothing: float,
    grad_clip: float,
    fallback: Callable[[], tuple],
    autocast=None,
    keep_keys: bool = False,
    step_loss: Callable | None = None,
) -> EpochTotals:
    """One optimizer step per item of `batches`: a (x, lengths, labels, keys) batch, or None
    for a zero-weight step; `fallback()` gives the batch to step on before any real one.

    `step_loss(model, x, lengths, labels, real)` gives (loss, summed loss, samples, correct);
    the default is supervised cross-entropy with `label_smoothing`."""
    autocast = autocast or nullcontext()
    step_loss = step_loss or supervised_loss(label_smoothing)
    model.train()
    totals = EpochTotals()
    last = None
    for batch in batches:
        # A rank whose split ran out steps on its last batch with zero weight, so every
        # rank takes the same optimizer steps and the replicas never drift apart.
        real = batch is not None
        x, lengths, labels, keys = batch if real else last or fallback()
        with autocast:
            loss, loss_sum, seen, correct = step_loss(model, x, lengths, labels, real)
        optimizer.zero_grad(set_to_none=True)
        (loss if real else loss * 0.0).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if real:
            last = batch
            totals.loss_sum += loss_sum
            totals.correct += correct
            totals.seen += seen
            if keep_keys:
                totals.keys += keys
    return totals


def supervised_loss(label_smoothing: float) -> Callable:
    """Cross-entropy of the model's logits (computed in fp32) against the labels."""

    def step(model, x, lengths, labels, real):
        logits = model(x, lengths)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        if not real:
            return loss, 0.0, 0, 0
        return (
            loss,
            loss.item() * len(labels),
            len(labels),
            (logits.argmax(1) == labels).sum().item(),
        )

    return step


def reduce_metrics(
    totals: EpochTotals, seconds: float, node_id: str, world: int, device
) -> tuple[dict, list[str]]:
    """Every rank's totals summed (one all-reduce) and each rank's node (one all_gather);
    without a process group, this rank's alone."""
    # on the model's device: NCCL reduces only CUDA tensors
    summed = torch.tensor(
        [totals.loss_sum, totals.correct, totals.seen, totals.seen / max(seconds, 1e-9)],
        device=device,
    )
    rank_nodes = [node_id]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(summed)
        rank_nodes = gather_strings(node_id, world, device)
    metrics = {
        "train_loss": summed[0].item() / max(summed[2].item(), 1),
        "train_accuracy": summed[1].item() / max(summed[2].item(), 1),
        "samples": int(summed[2].item()),
        "samples_per_s_worker": totals.seen / max(seconds, 1e-9),
        "samples_per_s_total": summed[3].item(),
        "epoch_seconds": seconds,
    }
    return metrics, rank_nodes


def evaluate(model, batches, autocast=None) -> dict:
    """Mean cross-entropy (no label smoothing) and accuracy over `batches`."""
    autocast = autocast or nullcontext()
    model.eval()
    loss_sum = correct = n = 0.0
    with torch.inference_mode():
        for x, lengths, labels, _ in batches:
            with autocast:
                logits = model(x, lengths)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            n += len(labels)
    model.train()
    return {"val_loss": loss_sum / max(n, 1), "val_accuracy": correct / max(n, 1)}


def gather_strings(text: str, world: int, device, size: int = 128) -> list[str]:
    """Every rank's `text` (at most `size` UTF-8 bytes), in rank order: a tensor all_gather on
    the rank's device, not `all_gather_object`, whose pickled CPU tensors NCCL refuses."""
    raw = text.encode()[:size]
    mine = torch.zeros(size + 1, dtype=torch.uint8, device=device)
    mine[0] = len(raw)
    mine[1 : 1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [bytes(t[1 : 1 + int(t[0])].tolist()).decode() for t in every]


def stop_together(stop: bool, world: int, device) -> bool:
    """Rank 0's decision, on every rank (a broadcast), so all ranks leave the same epoch."""
    flag = torch.tensor([int(stop)], device=device)
    if world > 1 and dist.is_initialized():
        dist.broadcast(flag, 0)
    return bool(flag.item())


# -- rank 0's report ------------------------------------------------------------------------------


def log_epoch(metrics: dict, epochs: int) -> None:
    # the middle columns: a contrastive run's label-free monitors, else validation accuracy
    shown = (
        ("alignment", "uniformity", "effective_rank", "knn_accuracy")
        if "effective_rank" in metrics
        else ("val_accuracy",)
    )
    log.info(
        "epoch %d/%d  train_loss %.4f  val_loss %s  %s  %.0f samples/s",
        metrics["epoch"],
        epochs,
        metrics["train_loss"],
        _fmt(metrics.get("val_loss")),
        "  ".join(f"{k} {_fmt(metrics.get(k))}" for k in shown),
        metrics["samples_per_s_total"],
    )


def write_keys(key_dir: str, epoch: int, rank: int, keys: list[str]) -> None:
    """The sample keys this rank trained on this epoch (`--log-keys`: audits coverage)."""
    name = f"epoch{epoch}-rank{rank}.txt"
    storage.write_text(storage.join(storage.location(key_dir), name), "\n".join(keys))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def save_checkpoint(
    folder: Path, model, optimizer, scheduler, card, tokenizer, history, extra: dict, head=None
) -> None:
    """A Ray Train checkpoint: the model directory of the epoch `history[-1]` records (with
    the run's tokenizer, and `extra`: what extraction must do the same way, such as
    `max_tokens`, and the model version), plus the optimiser and schedule state that resuming
    needs."""
    from featx.checkpoint import save_model_dir, save_train_state

    metrics = history[-1]
    save_model_dir(
        folder,
        model,
        card,
        None,
        {"last": metrics, "history": history},
        tokenizer=tokenizer,
        extra={"epoch": metrics["epoch"], **extra},
    )
    save_train_state(folder, optimizer, scheduler, metrics["epoch"], head=head)
