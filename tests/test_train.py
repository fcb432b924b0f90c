"""Training with Ray Train: 2 workers on 2 CPU cores, coverage, learning, checkpoints, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from featx.config import ConfigError
from featx.dataset import load_card
from featx.ingest import ingest
from featx.train import TrainConfig, _default_cpus_per_worker

FEATX = [sys.executable, "-m", "featx.cli"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The repository's sample images (4 shape classes), as `make demo` trains on them."""
    from featx.config import IngestConfig
    from featx.pipeline import REPO_DATA

    out = tmp_path_factory.mktemp("train") / "shards"
    ingest(
        IngestConfig.parse(src=REPO_DATA / "images", out=out, shard_samples=32, val_fraction=0.2)
    )
    return out


def train_keys(dataset: Path) -> set[str]:
    keys = set()
    for stats in (dataset / "train").glob("*_stats.json"):
        keys |= {e["key"] for e in json.loads(stats.read_text())["entries"]}
    return keys


def run_cli(*args, timeout=300, **kw):
    return subprocess.run(
        [*FEATX, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )


def test_cpu_budget_leaves_ray_data_a_cpu_when_it_reads():
    assert _default_cpus_per_worker(2, 2, reserve_for_data=True) == 0.5
    assert _default_cpus_per_worker(8, 2, reserve_for_data=True) == 3
    assert _default_cpus_per_worker(1, 4, reserve_for_data=True) == 0.125
    with pytest.raises(ConfigError, match="cannot fit"):
        _default_cpus_per_worker(0.5, 2, reserve_for_data=True)
    # the default loader reads in the workers themselves: all CPUs go to them
    assert _default_cpus_per_worker(2, 2, reserve_for_data=False) == 1
    assert _default_cpus_per_worker(2, 4, reserve_for_data=False) == 0.5


def test_bad_train_config_stops_before_work(tmp_path, shards):
    with pytest.raises(ConfigError, match="did you run `featx ingest"):
        TrainConfig.parse(dataset=tmp_path, out=tmp_path / "run").check_paths()
    with pytest.raises(ConfigError) as e:
        TrainConfig.parse(dataset=shards, out=tmp_path / "run", epochs=0, model="mlp")
    assert "epochs" in str(e.value) and "model" in str(e.value)
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig.parse(dataset=shards, out=tmp_path / "run", preset="huge").check_paths()
    unlabelled = tmp_path / "flat"
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    from featx.config import IngestConfig

    flat_src = tmp_path / "flat_src"
    flat_src.mkdir()
    for p in tmp_path.glob("*.png"):
        p.rename(flat_src / p.name)
    ingest(IngestConfig.parse(src=flat_src, out=unlabelled))
    with pytest.raises(ConfigError, match="at least 2"):
        TrainConfig.parse(dataset=unlabelled, out=tmp_path / "run").check_paths()
    # A dataset with classes and some samples without a label (as a partly labelled manifest
    # gave before ingest refused one) is refused before training starts.
    import shutil

    partly = tmp_path / "partly"
    shutil.copytree(shards, partly)
    card = json.loads((partly / "dataset.json").read_text())
    card["counts"]["train"]["per_class"]["(unlabelled)"] = 3
    (partly / "dataset.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="3 samples of .* have no label"):
        TrainConfig.parse(dataset=partly, out=tmp_path / "run").check_paths()
    assert not (tmp_path / "run").exists()


def test_overwrite_deletes_only_a_run_dir(tmp_path, shards):
    """`featx train DS --out DS --overwrite` (or `--out .`) would have deleted the dataset or
    the working folder: a folder without run.json is refused, and nothing is deleted."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(shards, ds)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for out in (ds, mine):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        r = run_cli("train", ds, "--out", out, "--overwrite", "--epochs", 1)
        assert r.returncode == 2 and "refusing to --overwrite" in r.stderr + r.stdout
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.slow
def test_two_workers_cover_the_split_learn_and_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    opts = "--workers 2 --epochs 5 --batch-size 16 --patience 0".split()
    r = run_cli("train", shards, "--out", run, *opts, "--log-keys", "--keep", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = train_keys(shards)
    for epoch in (1, 2, 3, 4, 5):
        ranks = [
            set((run / "keys" / f"epoch{epoch}-rank{k}.txt").read_text().split()) for k in (0, 1)
        ]
        assert ranks[0] and ranks[1], "both ranks trained on data"
        assert not ranks[0] & ranks[1], "ranks saw overlapping samples"
        assert ranks[0] | ranks[1] == expected, "the ranks together cover the train split"
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4, 5]
    # the loss goes down on the sample data (chance level is ln 4 = 1.39)
    assert metrics["train_loss"].iloc[-1] < 0.85 * metrics["train_loss"].iloc[0]
    assert metrics["train_loss"].iloc[-1] < 1.3
    assert metrics["val_accuracy"].between(0, 1).all() and metrics["val_loss"].notna().all()
    assert (metrics["samples"] == len(expected)).all()
    assert (metrics["samples_per_s_total"] > 0).all()
    assert (run / "curves.png").stat().st_size > 1000
    # A local run starts only the actors training needs (each is a process that takes seconds
    # to start on a laptop): Ray Train's controller, the workers and their barrier actor.
    assert _actor_classes_of_latest_ray() == [
        "RayTrainWorker",
        "RayTrainWorker",
        "SynchronizationActor",
        "TrainController",
    ]

    # the best checkpoint reloads (weights_only) to the exact model that was evaluated
    from featx.checkpoint import load_model

    model, meta = load_model(run)
    assert meta["classes"] == load_card(shards)["classes"]
    assert meta["dataset_fingerprint"] == load_card(shards)["fingerprint"]
    val_loss, val_acc = _plain_eval(model, shards)
    best = meta["metrics"]["last"]
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-4, abs=1e-6)
    assert val_acc == pytest.approx(best["val_accuracy"])
    # Ray kept only --keep checkpoints
    assert len(list((run / "ray").glob("checkpoint_*/featx.json"))) == 2

    again = run_cli("train", shards, "--out", run, *opts)
    assert again.returncode == 0 and "up to date" in again.stderr
    clash = run_cli("train", shards, "--out", run, "--model", "rnn")
    assert clash.returncode == 2 and "other settings" in clash.stderr


@pytest.mark.slow
def test_early_stopping_ends_every_rank_at_the_same_epoch_and_keeps_the_best(tmp_path, shards):
    run = tmp_path / "run"
    # a rate high enough that validation loss soon stops improving
    opts = "--workers 2 --epochs 40 --batch-size 16 --lr 0.02 --patience 2 --keep 1".split()
    r = run_cli("train", shards, "--out", run, *opts)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "early stop" in r.stderr
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    epochs = list(metrics["epoch"])
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 40
    best = int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
    assert epochs[-1] - best == 2  # stopped exactly `patience` epochs after the best
    # best/ is the checkpoint of the lowest validation loss, though Ray kept only one more
    meta = json.loads((run / "best" / "featx.json").read_text())
    assert meta["epoch"] == best
    # metrics.csv holds 6 significant digits
    assert meta["metrics"]["last"]["val_loss"] == pytest.approx(metrics["val_loss"].min(), rel=1e-5)
    again = run_cli("train", shards, "--out", run, *opts)
    assert again.returncode == 0 and "up to date" in again.stderr


@pytest.mark.slow
def test_a_grown_dataset_trains_a_new_version_and_best_follows_it(tmp_path):
    """The nightly train after an ingest that added files: the same command trains version 2
    inside RUN (best/ switches to it when it finishes; version 1 is kept), the same data is
    then up to date, other settings are still refused, and --keep-versions prunes."""
    from conftest import make_image

    from featx.config import IngestConfig
    from featx.train import train

    src, ds, run = tmp_path / "src", tmp_path / "ds", tmp_path / "run"

    def add_images(start: int, stop: int) -> str:
        for i in range(start, stop):
            make_image(src / ("a" if i % 2 else "b") / f"{i:03d}.png", seed=i)
        ingest(IngestConfig.parse(src=src, out=ds, shard_samples=8, image_size=16, workers=1))
        return load_card(ds)["fingerprint"]

    def best_meta() -> dict:
        return json.loads((run / "best" / "featx.json").read_text())

    opts = dict(dataset=ds, out=run, workers=1, epochs=2, batch_size=8, patience=0)
    first = add_images(0, 24)
    r1 = train(TrainConfig.parse(**opts))
    assert r1.version == 1 and best_meta()["dataset_fingerprint"] == first

    second = add_images(24, 32)
    r2 = train(TrainConfig.parse(**opts))
    assert r2.version == 2 and not r2.up_to_date and r2.versions_kept == [1]
    assert best_meta()["dataset_fingerprint"] == second and best_meta()["version"] == 2
    v1 = json.loads((run / "versions" / "v1" / "best" / "featx.json").read_text())
    assert v1["dataset_fingerprint"] == first and (run / "versions" / "v1" / "metrics.csv").exists()
    assert json.loads((run / "run.json").read_text())["version"] == 2

    again = train(TrainConfig.parse(**opts))
    assert again.up_to_date and again.version == 2
    with pytest.raises(ConfigError, match="other settings"):
        train(TrainConfig.parse(**{**opts, "lr": 0.01}))

    add_images(32, 40)
    r3 = train(TrainConfig.parse(**opts, keep_versions=1, warm_start=True))
    assert r3.version == 3 and r3.versions_kept == [2]
    assert sorted(p.name for p in (run / "versions").iterdir()) == ["v2"]


@pytest.mark.slow
def test_ray_data_loader_covers_the_split(tmp_path, shards):
    run = tmp_path / "run"
    opts = "--workers 2 --epochs 2 --batch-size 16 --loader ray --log-keys".split()
    r = run_cli("train", shards, "--out", run, *opts)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = train_keys(shards)
    for epoch in (1, 2):
        ranks = [
            set((run / "keys" / f"epoch{epoch}-rank{k}.txt").read_text().split()) for k in (0, 1)
        ]
        assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
        assert ranks[0] | ranks[1] == expected


def _plain_eval(model, dataset: Path) -> tuple[float, float]:
    import torch.nn.functional as F
    import webdataset as wds

    from featx.batching import make_collate
    from featx.dataset import decode_sample

    urls = [str(p) for p in sorted((dataset / "val").glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False)]
    batch = make_collate("image")(samples)
    with torch.inference_mode():
        logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["labels"]).item()
    acc = (logits.argmax(1) == batch["labels"]).float().mean().item()
    return loss, acc


def _ray_train_workers() -> dict[int, str]:
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            found[p.info["pid"]] = cmd
    return found


def _actor_classes_of_latest_ray() -> list[str]:
    """The actor classes the latest Ray session on this machine ran, from the headers Ray
    writes into each worker process's log."""
    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest" / "logs"
    names = []
    for out in logs.glob("worker-*.out"):
        for line in out.read_text(errors="replace").splitlines()[:5]:
            if line.startswith(":actor_name:"):
                names.append(line.removeprefix(":actor_name:"))
    return sorted(names)


def _registered_checkpoint(run: Path) -> bool:
    """Ray Train has recorded a checkpoint (not merely written its folder)."""
    snap = run / "ray" / "checkpoint_manager_snapshot.json"
    return snap.exists() and "checkpoint_" in snap.read_text()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _objective_saved(run: Path, objective: str) -> None:
    """best/ holds the feature model alone, whatever the objective: extraction loads it."""
    from featx.checkpoint import load_model

    model, meta = load_model(run / "best")
    assert meta.get("objective", "supervised") == objective
    assert not any(k.startswith("projector") for k in model.state_dict())


# Each fault for one objective, and each objective through a fault: the kill is survived
# by a contrastive run (restoring its projection head too), the driver's death by a
# supervised one; the resuming code is the same for both (`train_loop.restore`).
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["contrastive"])
def test_a_killed_worker_is_survived(tmp_path, shards, objective):
    run = tmp_path / "run"
    opts = "--workers 2 --epochs 5 --batch-size 4 --max-failures 2 --patience 0".split()
    opts += ["--objective", objective]
    proc = subprocess.Popen(
        [*FEATX, "train", str(shards), "--out", str(run), *opts],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: _registered_checkpoint(run), 240, "the first registered checkpoint")
        before = _ray_train_workers()
        assert len(before) >= 2, before
        victim = max(before)
        os.kill(victim, signal.SIGKILL)  # a real process kill, mid-run
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    metrics = json.loads((run / "best" / "featx.json").read_text())["metrics"]
    latest = max(
        run.glob("ray/checkpoint_*/featx.json"), key=lambda p: json.loads(p.read_text())["epoch"]
    )
    history = json.loads(latest.read_text())["metrics"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert metrics["last"]["epoch"] <= 5
    assert "resuming from the checkpoint" in out  # the restarted workers resumed, not restarted
    _objective_saved(run, objective)
    if objective == "contrastive":  # the label-free monitors, every epoch
        import pandas as pd

        columns = set(pd.read_csv(run / "metrics.csv").columns)
        assert {"alignment", "uniformity", "effective_rank", "knn_accuracy"} <= columns


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["supervised"])
def test_rerun_after_the_driver_died_resumes(tmp_path, shards, objective):
    run = tmp_path / "run"
    args = [
        "train",
        str(shards),
        "--out",
        str(run),
        # Epochs here take well under a second, and Ray Train registers checkpoints in its
        # controller's polls: with 4 epochs a run sometimes finished before the kill landed.
        *"--workers 2 --epochs 10 --batch-size 4 --patience 0".split(),
        *("--objective", objective),
    ]
    proc = subprocess.Popen(
        [*FEATX, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: _registered_checkpoint(run), 240, "the first registered checkpoint")
    finally:
        # the driver and the local Ray it started die together, as when a laptop session ends
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: not _ray_train_workers(), 60, "Ray workers to exit")
    r = run_cli("train", *args[1:], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after" in r.stderr
    history = json.loads((run / "best" / "featx.json").read_text())["metrics"]["history"]
    assert history[-1]["epoch"] <= 10
    import pandas as pd

    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == list(range(1, 11))
    _objective_saved(run, objective)


def test_excluded_keys_are_never_trained_on(tmp_path, shards):
    """`--exclude FILE` (as `featx dedup` writes it): the listed samples are left out of every
    rank's epoch; the rest are all there."""
    expected = train_keys(shards)
    gone = set(sorted(expected)[::5])
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# near-duplicates\n" + "".join(f"{k}\n" for k in sorted(gone)))
    run = tmp_path / "run"
    opts = "--workers 2 --epochs 1 --batch-size 16 --log-keys".split()
    r = run_cli("train", shards, "--out", run, *opts, "--exclude", exclude)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = set()
    for k in (0, 1):
        seen |= set((run / "keys" / f"epoch1-rank{k}.txt").read_text().split())
    assert seen == expected - gone
    # Ray Data's loader filters the same way, batch by batch
    import pyarrow as pa

    from featx.train_data import _Without

    batch = pa.table({"__key__": sorted(expected)})
    assert set(_Without(sorted(gone))(batch)["__key__"].to_pylist()) == expected - gone
