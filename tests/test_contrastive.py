"""Contrastive training's parts: the loss over every rank's batch, the views, the monitors."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from featx.batching import make_collate
from featx.contrastive import contrastive_loss, effective_rank, knn_accuracy, uniformity

DIM, FEATURES = 6, 4


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, DIM, generator=g)  # view 1 of n samples, then view 2
    labels = torch.tensor([i % 3 for i in range(n)])
    return x, labels


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, FEATURES)
    )


def _step(model, x, labels, size, use_labels):
    step = contrastive_loss(0.3, size, use_labels)
    loss, summed, seen, _ = step(lambda x, lengths: model(x), x, None, labels, True)
    loss.backward()
    return summed, seen, [p.grad.clone() for p in model.parameters()]


def _rank(rank: int, world: int, port: int, shares, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, labels = _batch(sum(shares))
        start, n = sum(shares[:rank]), shares[rank]
        n_all = sum(shares)
        mine = torch.cat([x[start : start + n], x[n_all + start : n_all + start + n]])
        results = []
        for use_labels in (False, True):
            model = _model()
            summed, seen, grads = _step(
                model, mine, labels[start : start + n], max(shares), use_labels
            )
            for g in grads:  # what DDP does with the ranks' gradients: their mean
                dist.all_reduce(g)
                g /= world
            totals = torch.tensor([summed, float(seen)])
            dist.all_reduce(totals)
            results.append((totals.tolist(), [g.tolist() for g in grads]))
        if rank == 0:
            out.put(results)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:  # the results reach the parent before this process goes
        out.close()
        out.join_thread()
    # Leave without C++ static destructors: gloo's threads sometimes abort them ("terminate
    # called without an active exception") after the work is done and checked.
    os._exit(0)


def _two_ranks(args, target):
    """Run `target(*args(rank, port, queue))` in two spawned gloo ranks; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=args(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return result


def test_loss_gathered_across_two_ranks_equals_one_process_on_the_whole_batch():
    """Negatives come from every rank, with gradients through the gather: two gloo ranks
    holding 5 and 3 samples (so one pads its rows) get the same loss and, once DDP averages
    them, the same gradients as one process with all 8; for the label-free loss and for
    supervised contrastive."""
    shares = (5, 3)
    distributed = _two_ranks(lambda rank, port, out: (rank, 2, port, shares, out), _rank)

    x, labels = _batch(sum(shares))
    for use_labels, ((d_summed, d_seen), d_grads) in zip((False, True), distributed, strict=True):
        summed, seen, grads = _step(_model(), x, labels, sum(shares), use_labels)
        assert d_seen == seen == sum(shares)
        assert d_summed == pytest.approx(summed, rel=1e-5)
        for g, d in zip(grads, d_grads, strict=True):
            np.testing.assert_allclose(np.asarray(d), g.numpy(), rtol=1e-4, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in grads)


def test_two_views_of_an_image_batch_differ_and_repeat_from_a_seed():
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"k{i}", "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "cls": i}
        for i in range(4)
    ]
    batch = make_collate("image", augment=True, seed=3, views=2)(samples)
    again = make_collate("image", augment=True, seed=3, views=2)(samples)
    assert batch["x"].shape == (8, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["x"], again["x"])
    assert not torch.allclose(batch["x"][:4], batch["x"][4:])  # the two views differ
    assert torch.isfinite(batch["x"]).all()


def test_two_views_of_audio_change_speed_are_cropped_and_padded_to_one_width():
    from featx.batching import VIEW_KEEP, VIEW_SPEED

    n = [1600 + 10 * i for i in range(20)]
    samples = [
        {"__key__": f"k{i}", "audio": np.sin(np.arange(m) / 5).astype(np.float32)}
        for i, m in enumerate(n)
    ]
    batch = make_collate("audio", augment=True, seed=0, views=2)(samples)
    assert batch["x"].shape[0] == 40 and batch["labels"] is None
    lengths = batch["lengths"].numpy()
    assert batch["x"].shape[1] == lengths.max()
    # a view is its clip at a speed of its own, cropped to VIEW_KEEP of that: slowed views are
    # longer than the clip, sped-up and cropped ones shorter, within the bounds of both
    share = lengths / np.array(n * 2)
    assert share.min() >= VIEW_KEEP[0] / (1 + VIEW_SPEED) - 0.01
    assert share.max() <= 1 / (1 - VIEW_SPEED) + 0.01
    assert share.max() > 1.05 and share.min() < 0.85
    assert (lengths[:20] != lengths[20:]).all()  # the two views of a clip differ


def test_monitors_tell_collapsed_features_from_spread_ones():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(200, 32, generator=g)
    collapsed = (torch.rand(200, 1, generator=g) + 1) * torch.ones(1, 32)  # one direction
    assert effective_rank(collapsed) < 1.5 < 20 < effective_rank(spread)
    assert uniformity(collapsed) > -0.1 > -1.0 > uniformity(spread)
    labels = torch.arange(200) % 4
    centres = torch.randn(4, 32, generator=g) * 5
    separated = centres[labels] + torch.randn(200, 32, generator=g)
    assert knn_accuracy(separated, labels) > 0.95
    assert knn_accuracy(spread, labels) < 0.5


def test_a_checkpoint_resumes_the_projection_head_and_publishes_the_features_model(tmp_path):
    """Resuming restores the head with the model and the optimiser; the model directory holds
    the feature model alone, so extraction loads it like a supervised one."""
    from featx.checkpoint import load_model
    from featx.contrastive import ContrastiveNet
    from featx.models import create_model
    from featx.train_loop import restore, save_checkpoint, setup_optimizer

    card = {
        "classes": [],
        "class_names": {},
        "normalisation": {"image_size": 16},
        "fingerprint": "f",
        "modality": "image",
    }

    def fresh(seed):
        torch.manual_seed(seed)
        net = ContrastiveNet(create_model("cnn", "image", 1, "small"))
        return net, *setup_optimizer(net, 1e-3, 0.01, 0.1, 10)

    net, opt, sched = fresh(0)
    x = make_collate("image", augment=True, seed=0, views=2)(
        [{"__key__": str(i), "image": np.full((16, 16, 3), 40 * i, np.uint8)} for i in range(4)]
    )["x"]
    contrastive_loss(0.2, 4, False)(net, x, None, None, True)[0].backward()
    opt.step()
    sched.step()
    history = [{"epoch": 1, "train_loss": 1.0}]
    save_checkpoint(tmp_path, net.model, opt, sched, card, None, history, {}, head=net.projector)

    other, opt2, sched2 = fresh(1)
    epoch, restored = restore(tmp_path, other, opt2, sched2)
    assert epoch == 1 and restored == history
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"] and sched2.last_epoch == 1
    model, _ = load_model(tmp_path)
    assert set(model.state_dict()) == set(net.model.state_dict())


def _bag_rank(rank: int, port: int, out) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from featx.contrastive import ContrastiveNet
    from featx.models import create_model
    from featx.recipe import build_optimizer, fit_token_bag

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        vocab = 30
        model = create_model(
            "cnn", "text", 1, vocab_size=vocab, token_bag=True, bag_dim=8, bag_columns=60
        )
        if rank == 0:  # featx train fits the bag on rank 0 only
            rng = np.random.default_rng(0)
            docs = [rng.integers(2, vocab, 12).tolist() for _ in range(40)]
            with torch.no_grad():
                for name, value in fit_token_bag(docs, vocab, 8, 60).items():
                    getattr(model.bag, name).copy_(value)
        net = DistributedDataParallel(ContrastiveNet(model))  # as ray.train's prepare_model
        bag = [p.detach().clone() for p in model.bag.parameters()]
        matrices = [p.detach().clone() for p in model.encoder.parameters()]
        optimizer = build_optimizer(net, 1e-2, 0.01)
        step = contrastive_loss(0.3, 4, False)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(2, vocab, (8, 10), generator=g)  # two views of 4 texts
        for _ in range(2):
            optimizer.zero_grad()
            loss, *_ = step(net, x, torch.full((8,), 10), None, True)
            loss.backward()
            optimizer.step()
        theirs = [[torch.zeros_like(t) for _ in range(2)] for t in bag]
        for t, gathered in zip(bag, theirs, strict=True):
            dist.all_gather(gathered, t)
        if rank == 0:
            out.put(
                {
                    "fitted": bool(bag[2].abs().sum() > 0),
                    "same_bag": all(torch.equal(a, b) for a, b in theirs),
                    "bag_kept": all(
                        torch.equal(a, b) for a, b in zip(bag, model.bag.parameters(), strict=True)
                    ),
                    "trained": any(
                        not torch.equal(a, b)
                        for a, b in zip(matrices, model.encoder.parameters(), strict=True)
                    ),
                    "loss": float(loss),
                }
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        out.close()
        out.join_thread()
    os._exit(0)  # as _rank: gloo's threads sometimes abort C++ static destructors


def test_ddp_hands_rank_0s_token_bag_to_every_rank_and_training_leaves_it():
    """A contrastive text model's token bag is fitted on rank 0 only: DDP's wrap hands it to
    the other ranks, and two DDP steps train the encoder around it without moving it."""
    result = _two_ranks(lambda rank, port, out: (rank, port, out), _bag_rank)
    assert result["fitted"] and result["same_bag"], result
    assert result["bag_kept"] and result["trained"] and np.isfinite(result["loss"]), result
