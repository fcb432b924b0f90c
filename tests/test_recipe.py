"""The training recipe without Ray: optimiser groups, schedule, early stopping, automatic sizes."""

from __future__ import annotations

import pytest
import torch

from featx.models import create_model
from featx.recipe import (
    EMBEDDING_LR_SCALE,
    auto_batch_size,
    auto_epochs,
    best_epoch,
    build_optimizer,
    param_groups,
    should_stop,
    warmup_cosine,
)
from featx.train import TrainConfig


def history(*val_losses):
    return [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(val_losses)]


def test_embeddings_learn_faster_and_nothing_but_matrices_decays():
    model = create_model("attention", "text", 3, vocab_size=50)
    groups = param_groups(model, lr=1e-3, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    embedding = model.stem.embed.weight
    (emb_group,) = [g for g in groups if any(p is embedding for p in g["params"])]
    assert emb_group["lr"] == pytest.approx(1e-3 * EMBEDDING_LR_SCALE)
    assert emb_group["weight_decay"] == 0.0
    for g in groups:
        if g["weight_decay"]:
            assert all(p.ndim >= 2 for p in g["params"]) and g["lr"] == 1e-3
    # models without embeddings have no third group
    assert len(param_groups(create_model("cnn", "image", 3), 1e-3, 0.01)) == 2


def test_an_embedding_step_moves_rows_further_than_a_matrix_step():
    torch.manual_seed(0)
    model = create_model("rnn", "text", 2, vocab_size=30)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(2, 30, (4, 6))
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    # Adam's first step moves each parameter by about its rate
    assert moved["stem.embed.weight"] == pytest.approx(1e-3 * EMBEDDING_LR_SCALE, rel=0.01)
    assert moved["head.weight"] == pytest.approx(1e-3, rel=0.01)


def test_warmup_then_cosine_to_the_floor():
    at = warmup_cosine(total_steps=100, warmup=0.1, floor=0.1)
    assert at(0) == pytest.approx(0.1) and at(9) == pytest.approx(1.0)
    assert at(10) == pytest.approx(1.0)
    values = [at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # never rises again
    assert at(99) == pytest.approx(0.1, abs=1e-3) and at(500) == pytest.approx(0.1)


def test_early_stopping_waits_patience_epochs_after_the_best():
    h = history(1.0, 0.8, 0.7, 0.75, 0.72, 0.71)
    assert best_epoch(h) == 3
    assert not should_stop(h[:5], patience=3)  # 2 epochs since the best
    assert should_stop(h, patience=3)  # 3 epochs since the best
    assert not should_stop(h, patience=0)  # off
    assert not should_stop(h, patience=4)
    # a new best resets the count
    assert not should_stop([*h, {"epoch": 7, "val_loss": 0.5}], patience=3)


def test_without_validation_loss_early_stopping_never_stops():
    no_val = [{"epoch": e, "train_loss": 1.0 / e} for e in range(1, 30)]
    assert best_epoch(no_val) is None
    assert not should_stop(no_val, patience=1)


@pytest.mark.parametrize(
    ("n_train", "workers", "batch", "epochs"),
    [
        (224, 2, 8, 36),  # the sample images: 14 steps an epoch, 500 steps in 36 epochs
        (1439, 2, 22, 20),  # real digits: batch 22, 33 steps an epoch, 20 epochs at least
        (50_000, 2, 32, 20),  # large data: the usual batch, the least epochs
        (10, 4, 8, 100),  # tiny data: the smallest batch, at most 100 epochs
    ],
)
def test_batch_size_and_epochs_follow_the_data(n_train, workers, batch, epochs):
    assert auto_batch_size(n_train, workers) == batch
    assert auto_epochs(n_train, workers, batch) == epochs


@pytest.mark.parametrize(
    ("n_train", "batch", "epochs"),
    [
        (1577, 32, 100),  # Debian descriptions: 25 steps an epoch, the cap of 100 epochs
        (5_000, 78, 76),  # 33 steps an epoch: 2500 steps in 76 epochs
        (20_000, 128, 32),  # 79 steps an epoch: 2500 steps in 32 epochs
        (100_000, 128, 20),  # 391 steps an epoch: 2500 steps in 7 epochs, the least is 20
    ],
)
def test_contrastive_runs_get_more_steps_than_supervised_ones(n_train, batch, epochs):
    assert auto_batch_size(n_train, 2, contrastive=True) == batch
    assert auto_epochs(n_train, 2, batch, contrastive=True) == epochs
    assert auto_epochs(n_train, 2, batch) == 20  # supervised: 500 steps, at least 20 epochs


def test_train_config_resolves_defaults_from_the_data_and_keeps_what_was_given(tmp_path):
    card = {"counts": {"train": {"total": 224}}}
    cfg = TrainConfig.parse(dataset=tmp_path, out=tmp_path / "run", model="rnn")
    r = cfg.resolve(card)
    assert (r.batch_size, r.epochs, r.lr) == (8, 36, 5e-3)
    given = TrainConfig.parse(
        dataset=tmp_path, out=tmp_path / "run", batch_size=16, epochs=3, lr=1e-4
    ).resolve(card)
    assert (given.batch_size, given.epochs, given.lr) == (16, 3, 1e-4)
    # text embeddings start from LSA where it measured better (contrastive), unless told
    starts = {
        (objective, text_init): TrainConfig.parse(
            dataset=tmp_path, out=tmp_path / "run", objective=objective, text_init=text_init
        )
        .resolve(card)
        .text_init
        for objective in ("supervised", "contrastive")
        for text_init in (None, "lsa", "random")
    }
    assert starts == {
        ("supervised", None): "random",
        ("contrastive", None): "lsa",
        **{(o, t): t for o in ("supervised", "contrastive") for t in ("lsa", "random")},
    }


def test_a_grown_dataset_with_another_automatic_batch_size_is_the_same_settings(tmp_path):
    """The nightly train after the dataset grew: its automatic batch size changes with the
    data, and that must not read as "other settings" (the run was refused: found by
    bench_cycle.py at 1,200 images). An explicit change still is."""
    from featx.train import same_settings

    cfg = TrainConfig.parse(dataset=tmp_path, out=tmp_path / "run")
    small, grown = ({"counts": {"train": {"total": n}}} for n in (240, 4800))
    assert cfg.resolve(small).batch_size != cfg.resolve(grown).batch_size
    recorded = cfg.run_fingerprint()  # what run.json keeps: automatic settings as None
    assert recorded["batch_size"] is None and recorded["lr"] is None
    assert same_settings(recorded, cfg.run_fingerprint())
    # a RUN_DIR of an earlier featx recorded the resolved values: still the same settings
    assert same_settings(cfg.resolve(small).run_fingerprint(), cfg.run_fingerprint())
    other = TrainConfig.parse(dataset=tmp_path, out=tmp_path / "run", batch_size=64)
    assert not same_settings(recorded, other.run_fingerprint())
    assert not same_settings(recorded, cfg.model_copy(update={"model": "rnn"}).run_fingerprint())


def test_contrastive_runs_are_not_stopped_before_half_their_epochs():
    from featx.recipe import earliest_stop

    history = [{"epoch": e, "val_loss": 1.0 if e == 1 else 2.0} for e in range(1, 11)]
    assert should_stop(history, patience=5)  # supervised: 9 epochs without a new best
    assert earliest_stop("supervised", 40) == 0 and earliest_stop("contrastive", 40) == 20
    assert not should_stop(history, patience=5, min_epochs=earliest_stop("contrastive", 40))
    assert should_stop(history, patience=5, min_epochs=earliest_stop("contrastive", 20))
