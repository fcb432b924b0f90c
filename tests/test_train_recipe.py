"""The training recipe's pieces without Ray or a process group: a rank's data, one epoch's
steps, evaluation, and the checkpoint a restarted worker resumes from."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import nn

from featx.train_data import RankData, share_of
from featx.train_loop import (
    evaluate,
    reduce_metrics,
    restore,
    run_epoch,
    save_checkpoint,
    setup_data,
    setup_optimizer,
)

CPU = torch.device("cpu")
SIZES = [7, 7, 7, 7, 7, 3, 1]  # 5 full shards, a short one, a single sample


class Tiny(nn.Module):
    """Two features -> two logits, with featx's (x, lengths) call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x, lengths=None):
        return self.fc(x)


def batch(xs, labels, keys):
    return torch.tensor(xs, dtype=torch.float32), None, torch.tensor(labels), keys


def fallback_counter():
    calls = []

    def fallback():
        calls.append(1)
        return batch([[0.0, 0.0]], [0], [])

    return fallback, calls


@pytest.fixture
def shards(tmp_path) -> list[tuple[str, int]]:
    """Train shards of SIZES samples (keys s{shard}-{i}), as (url, samples) like the card's."""
    found = []
    (tmp_path / "train").mkdir()
    for i, n in enumerate(SIZES):
        url = str(tmp_path / "train" / f"shard-{i}.tar")
        with wds.TarWriter(url) as w:
            for j in range(n):
                w.write({"__key__": f"s{i}-{j}", "txt": b"x", "cls": str(j % 2).encode()})
        found.append((url, n))
    return found


EVERY = {f"s{i}-{j}" for i, n in enumerate(SIZES) for j in range(n)}


def key_collate(samples):
    return {
        "x": torch.zeros(len(samples), 2),
        "lengths": None,
        "labels": torch.tensor([s["cls"] for s in samples]),
        "keys": [s["__key__"] for s in samples],
    }


# -- a rank's data ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_are_disjoint_complete_and_even(shards, world):
    """Whole shards dealt to ranks, the leftovers shared by sample: every sample once per
    epoch, on one rank, and the ranks' shares within one sample of each other."""
    for seed in (None, 0, 1, 2):
        shares = [
            [s["__key__"] for s in share_of(shards, rank, world, seed, buffer=4)]
            for rank in range(world)
        ]
        got = [k for share in shares for k in share]
        assert sorted(got) == sorted(EVERY), seed  # each sample exactly once
        counts = [len(share) for share in shares]
        assert max(counts) - min(counts) <= 1, (seed, counts)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_takes_the_same_steps_and_together_sees_every_sample(tmp_path, shards, world):
    """The shards loader as a worker sets it up from the card: each rank yields exactly the
    steps the card implies (None once its share runs out), and the real batches cover the
    split once."""
    card = {
        "shards": [
            {"shard": f"train/shard-{i}.tar", "split": "train", "samples": n}
            for i, n in enumerate(SIZES)
        ]
    }
    batch_size = 3
    steps = max(1, math.ceil(sum(SIZES) / world / batch_size))  # as the worker computes it
    data = setup_data("shards", card, tmp_path, ["train"], batch_size, CPU)
    seen = []
    for rank in range(world):
        items = list(data.train_steps(key_collate, 7, rank, world, steps))
        assert len(items) == steps, (rank, len(items))
        real = [b for b in items if b is not None]
        assert all(b is None for b in items[len(real) :]), "zero-weight steps come last"
        for x, _, labels, keys in real:
            assert x.device == CPU and len(labels) == len(keys) <= batch_size
            seen += keys
    assert sorted(seen) == sorted(EVERY)


def test_a_dataset_that_grew_after_ingest_is_an_error(shards):
    data = RankData("shards", {"train": shards}, 3, CPU)
    with pytest.raises(RuntimeError, match="re-run `featx ingest`"):
        list(data.train_steps(key_collate, 0, 0, 1, steps=2))  # the card would say 6 samples


# -- one epoch ----------------------------------------------------------------------------------


def test_run_epoch_counts_real_samples_and_steps_on_every_item():
    """lr 0 keeps the model fixed, so the totals can be checked against the model itself;
    the two trailing None items are zero-weight steps: stepped, not counted."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer, scheduler = setup_optimizer(model, 0.0, 0.0, 0.1, total_steps=8)
    b1 = batch([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], [0, 1, 1], ["a", "b", "c"])
    b2 = batch([[-1.0, 1.0], [0.5, 0.5]], [1, 0], ["d", "e"])
    fallback, calls = fallback_counter()
    totals = run_epoch(
        model,
        optimizer,
        scheduler,
        [b1, b2, None, None],
        label_smoothing=0.1,
        grad_clip=1.0,
        fallback=fallback,
        keep_keys=True,
    )
    assert totals.seen == 5 and totals.keys == ["a", "b", "c", "d", "e"]
    assert scheduler.last_epoch == 4  # every item was an optimizer step
    assert not calls  # ran out after real batches: stepped on the last one, not the fallback
    with torch.no_grad():
        x = torch.cat([b1[0], b2[0]])
        labels = torch.cat([b1[2], b2[2]])
        logits = model(x)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum").item()
    assert totals.loss_sum == pytest.approx(expected, rel=1e-5)
    assert totals.correct == (logits.argmax(1) == labels).sum().item()

    metrics, nodes = reduce_metrics(totals, 2.0, "node-a", 1, CPU)  # no process group
    assert nodes == ["node-a"] and metrics["samples"] == 5
    assert metrics["train_loss"] == pytest.approx(expected / 5, rel=1e-5)
    assert metrics["samples_per_s_total"] == pytest.approx(2.5)


def test_a_rank_without_data_steps_with_zero_weight():
    """Fewer blocks than ranks: the rank still steps (the others' all-reduces need it), on the
    fallback batch, and adds no gradient, so it pulls no replica anywhere."""
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, scheduler = setup_optimizer(model, 0.1, 0.0, 0.1, total_steps=3)
    fallback, calls = fallback_counter()
    totals = run_epoch(
        model,
        optimizer,
        scheduler,
        [None, None, None],
        label_smoothing=0.1,
        grad_clip=1.0,
        fallback=fallback,
    )
    assert totals.seen == 0 and totals.loss_sum == 0 and len(calls) == 3
    assert scheduler.last_epoch == 3
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_run_epoch_learns():
    torch.manual_seed(0)
    model = Tiny()
    before = model.fc.weight.detach().clone()
    optimizer, scheduler = setup_optimizer(model, 0.05, 0.01, 0.1, total_steps=40)
    x = torch.randn(64, 2)
    labels = (x[:, 0] > 0).long()
    batches = [(x[i : i + 16], None, labels[i : i + 16], []) for i in range(0, 64, 16)]
    fallback, _ = fallback_counter()
    losses = []
    for _ in range(10):
        t = run_epoch(
            model,
            optimizer,
            scheduler,
            batches,
            label_smoothing=0.0,
            grad_clip=1.0,
            fallback=fallback,
        )
        losses.append(t.loss_sum / t.seen)
        assert t.seen == 64 and not t.keys  # keys are kept only when asked for
    assert not torch.equal(model.fc.weight, before)
    assert losses[-1] < 0.6 * losses[0]
    assert t.correct >= 54  # chance is 32 of 64


# -- evaluation ---------------------------------------------------------------------------------


def test_evaluate_averages_over_samples_not_batches():
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(2))
        model.fc.bias.zero_()
    # logits equal x: [2, 0] (label 0, right), [0, 1] (label 0, wrong), [0, 3] (label 1, right)
    batches = [batch([[2.0, 0.0], [0.0, 1.0]], [0, 0], []), batch([[0.0, 3.0]], [1], [])]
    model.train()
    got = evaluate(model, batches)
    by_hand = (
        math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(-3))
    ) / 3
    assert got["val_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert got["val_accuracy"] == pytest.approx(2 / 3)
    assert model.training  # handed back ready to train


# -- checkpoint and resume ----------------------------------------------------------------------


def test_a_restored_worker_continues_exactly_where_the_checkpoint_left_off(tmp_path):
    """Weights, optimiser moments, schedule position, epoch and history all survive the
    checkpoint: the next step from the restored state equals the next step without a restart."""
    from featx.checkpoint import STATE_FILE
    from featx.models import create_model

    card = {
        "modality": "image",
        "classes": [0, 1],
        "class_names": ["a", "b"],
        "normalisation": {"image_size": 16},
        "fingerprint": "test",
    }

    def fresh():
        torch.manual_seed(1)
        model = create_model("cnn", "image", 2, "small")
        return model, *setup_optimizer(model, 1e-3, 0.01, 0.1, total_steps=20)

    torch.manual_seed(0)
    images = [(torch.randn(4, 3, 16, 16), None, torch.tensor([0, 1, 0, 1]), []) for _ in range(3)]
    fallback, _ = fallback_counter()
    step = dict(label_smoothing=0.1, grad_clip=1.0, fallback=fallback)

    model, optimizer, scheduler = fresh()
    run_epoch(model, optimizer, scheduler, images, **step)
    history = [{"epoch": 1, "train_loss": 0.7}]
    save_checkpoint(tmp_path, model, optimizer, scheduler, card, None, history, {"version": 1})
    assert (tmp_path / STATE_FILE).exists()

    model2, optimizer2, scheduler2 = fresh()
    epoch, restored_history = restore(tmp_path, model2, optimizer2, scheduler2)
    assert epoch == 1 and restored_history == history
    assert scheduler2.last_epoch == scheduler.last_epoch == 3
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    moments = optimizer.state_dict()["state"]
    for i, state in optimizer2.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], moments[i]["exp_avg"])

    run_epoch(model, optimizer, scheduler, images[:1], **step)
    run_epoch(model2, optimizer2, scheduler2, images[:1], **step)
    after = model2.state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, after[k], atol=1e-6), k


def _card() -> dict:
    return {
        "classes": {"a": 0, "b": 1},
        "class_names": ["a", "b"],
        "normalisation": {},
        "fingerprint": "f" * 64,
    }


def _checkpoint(folder, epoch: int, val_loss: float) -> None:
    from featx.checkpoint import save_model_dir
    from featx.models import create_model

    torch.manual_seed(epoch)
    model = create_model("cnn", "image", 2)
    history = [{"epoch": e, "train_loss": 1.0, "val_loss": val_loss} for e in range(1, epoch + 1)]
    metrics = {"last": history[-1], "history": history}
    save_model_dir(folder, model, _card(), None, metrics, extra={"epoch": epoch})


def test_a_checkpoint_cut_short_is_never_loaded_or_published(tmp_path):
    """Ray copies a checkpoint file by file; a model.pt cut short beside a whole featx.json
    is skipped by RUN_DIR's checkpoint list (the best whole one is published), and refused
    with a clear error by every reader."""
    from featx.checkpoint import CorruptModel, load_model
    from featx.run_dir import checkpoints, publish

    run = tmp_path / "run"
    _checkpoint(run / "ray" / "checkpoint_000001", epoch=1, val_loss=0.9)
    _checkpoint(run / "ray" / "checkpoint_000002", epoch=2, val_loss=0.5)  # the best ...
    cut = run / "ray" / "checkpoint_000002" / "model.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # ... cut short
    assert [m["epoch"] for _, m in checkpoints(run)] == [1]
    publish(run)
    model, meta = load_model(run / "best")  # the whole one, verified
    assert meta["epoch"] == 1
    with pytest.raises(CorruptModel, match="does not match the sha256"):
        load_model(run / "ray" / "checkpoint_000002")
    from featx.train_loop import restore

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CorruptModel):
        restore(run / "ray" / "checkpoint_000002", model, opt, sched)


# -- the collectives `--gpu` runs -----------------------------------------------------------------


def _refuse_tensors_off(device) -> None:
    """Make this process's collectives refuse a tensor that is not on `device`, as NCCL
    refuses CPU tensors, and refuse `all_gather_object` (pickled CPU tensors under NCCL)."""
    import torch.distributed as dist

    def guard(name, real):
        def check(*args, **kw):
            flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
            off = [t.device for t in flat if isinstance(t, torch.Tensor) and t.device != device]
            if off:
                raise RuntimeError(f"{name}: tensors must be on {device} (NCCL), got {off}")
            return real(*args, **kw)

        return check

    for name in ("all_reduce", "broadcast", "all_gather"):
        setattr(dist, name, guard(name, getattr(dist, name)))

    def no_objects(*a, **k):
        raise RuntimeError("all_gather_object sends CPU tensors, which NCCL refuses")

    dist.all_gather_object = no_objects


def _collectives_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from featx.train_data import in_step
    from featx.train_loop import EpochTotals, reduce_metrics, stop_together

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cpu")  # the rank's device; the default device below is another
    _refuse_tensors_off(device)
    # A tensor made without device= lands on the default device, "meta" here, and is refused,
    # as a CPU tensor is on a GPU rank.
    with torch.device("meta"):
        totals = EpochTotals(loss_sum=2.0 * (rank + 1), correct=rank + 1, seen=4)
        metrics, nodes = reduce_metrics(totals, 1.0, f"node-{rank}", world, device)
        stop = stop_together(rank == 0, world, device)
        steps = list(in_step(iter(range(rank + 1)), world, device))  # 1 batch, then 2
    Path(out_dir, f"{rank}.json").write_text(
        json.dumps({"metrics": metrics, "nodes": nodes, "stop": stop, "steps": steps})
    )
    dist.destroy_process_group()


def test_the_collectives_keep_their_tensors_on_the_ranks_device(tmp_path):
    """The metrics all-reduce, the node-id gather, early stopping's broadcast and the Ray
    loader's step agreement, in a real 2-rank process group whose collectives refuse tensors
    off the rank's device (what NCCL does with CPU tensors under --gpu)."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_collectives_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["nodes"] == ["node-0", "node-1"] and r["stop"] is True
        assert r["metrics"]["samples"] == 8 and r["metrics"]["train_loss"] == 6.0 / 8
    assert ranks[0]["steps"] == [0, None] and ranks[1]["steps"] == [0, 1]


# -- where text embeddings start ------------------------------------------------------------------

TOPICS = {
    "fruit": "apple banana cherry grape lemon mango melon peach pear plum".split(),
    "animals": "dog cat horse sheep goat mouse tiger zebra camel otter".split(),
    "weather": "rain snow wind storm cloud frost thunder sunshine fog hail".split(),
    "vehicles": "train plane boat truck bicycle tram ferry lorry scooter rocket".split(),
}
FILLERS = "the a of and some with very then so it was on in at near over under by".split()


def _split_embeddings(model, card, ds: Path, split: str, bag: bool = False):
    """Each text's mean token embedding (what the token mean feature reads), or with `bag` its
    token-bag features, and its label."""
    from featx.batching import make_collate
    from featx.models.model import masked_mean

    data = setup_data("shards", card, ds, [split], 64, CPU)
    collate = make_collate("text", tokenizer_path=ds / "tokenizer.json")
    xs, ys = [], []
    with torch.no_grad():
        for x, lengths, labels, _ in data.batches(split, collate):
            part = model.bag(x, lengths) if bag else masked_mean(model.stem.embed(x), lengths)
            xs.append(part.numpy())
            ys.append(labels.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _topic_corpus(tmp_path: Path) -> Path:
    """Four topics; each text is 3 of its topic's words among 6 shared fillers. Ingested."""
    from featx.config import IngestConfig
    from featx.ingest import ingest

    rng = np.random.default_rng(0)
    for topic, words in TOPICS.items():
        (tmp_path / "src" / topic).mkdir(parents=True)
        for i in range(80):
            text = list(rng.choice(words, 3)) + list(rng.choice(FILLERS, 6))
            rng.shuffle(text)
            (tmp_path / "src" / topic / f"{i:02d}.txt").write_text(" ".join(text))
    ds = tmp_path / "ds"
    ingest(IngestConfig.parse(src=tmp_path / "src", out=ds, val_fraction=0.25))
    return ds


def _nearest_topic_accuracy(model, card, ds: Path, bag: bool = False) -> float:
    """How many val texts lie nearest (cosine) their own topic's centre of the train texts."""
    (x_tr, y_tr), (x_va, y_va) = (
        _split_embeddings(model, card, ds, s, bag) for s in ("train", "val")
    )
    x_tr, x_va = (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12) for x in (x_tr, x_va))
    centres = np.stack([x_tr[y_tr == c].mean(axis=0) for c in range(len(TOPICS))])
    return float(((x_va @ centres.T).argmax(axis=1) == y_va).mean())


def test_text_embeddings_start_from_the_train_splits_topics(tmp_path):
    """Before any step, each text's mean token embedding lies nearest its own topic's centre
    when a contrastive run's embeddings start as featx's default says (an LSA of the train
    split); from N(0, 1) (`--text-init random`), the six shared filler words of each text blur
    the three that tell its topic."""
    from featx.config import TrainConfig
    from featx.dataset import load_card
    from featx.train_loop import setup_model

    ds = _topic_corpus(tmp_path)
    card = load_card(ds)
    tokenizer = str(ds / "tokenizer.json")

    def nearest_topic_accuracy(**options) -> float:
        cfg = TrainConfig.parse(
            dataset=ds, out=tmp_path / "run", model="cnn", objective="contrastive", **options
        ).resolve(card)
        model = setup_model(cfg, card, tokenizer, data_start=True)
        return _nearest_topic_accuracy(model, card, ds)

    lsa, random = nearest_topic_accuracy(), nearest_topic_accuracy(text_init="random")
    assert lsa >= 0.95 and 1 - lsa <= (1 - random) / 2, (
        f"val texts nearest their topic's centre: {lsa:.3f} from LSA, {random:.3f} from N(0, 1)"
    )


def test_the_token_bag_is_fitted_on_the_train_split_and_tells_its_topics(tmp_path):
    """A contrastive text model's token bag, as rank 0 fits it before training: the val texts'
    bag features lie nearest their own topic's centre. A model whose bag was not fitted (the
    other ranks, before DDP hands them rank 0's) has nothing there."""
    from featx.config import TrainConfig
    from featx.dataset import load_card
    from featx.train_loop import setup_model

    ds = _topic_corpus(tmp_path)
    card = load_card(ds)
    cfg = TrainConfig.parse(
        dataset=ds, out=tmp_path / "run", model="attention", objective="contrastive"
    ).resolve(card)
    fitted = setup_model(cfg, card, str(ds / "tokenizer.json"), fit_bag=True)
    accuracy = _nearest_topic_accuracy(fitted, card, ds, bag=True)
    assert accuracy >= 0.95, f"val texts nearest their topic's centre by the bag: {accuracy:.3f}"
    unfitted = setup_model(cfg, card, str(ds / "tokenizer.json"))
    assert not unfitted.bag.proj.any() and fitted.bag.proj.any()


def test_a_warm_start_copies_trained_weights_and_keeps_the_new_versions_token_bag(tmp_path):
    """A new dataset version warm-starts from the previous model's weights, but its token bag
    is fitted on its own train split: the previous one is not copied over it."""
    from featx.models import create_model
    from featx.train_loop import warm_start

    def model(fill: float):
        torch.manual_seed(0)
        m = create_model("rnn", "text", 2, vocab_size=40, token_bag=True, bag_dim=8)
        with torch.no_grad():
            m.stem.embed.weight.fill_(fill)
            m.bag.proj.fill_(fill)
        return m

    previous, new = model(1.0), model(2.0)
    torch.save(previous.state_dict(), tmp_path / "model.pt")
    copied, total = warm_start(new, str(tmp_path / "model.pt"))
    assert copied == total - 3  # every tensor but the bag's keys, idf and projection
    assert torch.equal(new.stem.embed.weight, previous.stem.embed.weight)
    assert (new.bag.proj == 2.0).all()
