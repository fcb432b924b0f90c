"""Prefect flows under `prefect_test_harness`: outputs, artifacts, retries and re-runs."""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

import pytest
from prefect_fixtures import colour_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key or a.type: a for a in found}


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def test_ingest_flow_retries_a_transient_failure(harness, tmp_path):
    """A lock held by another writer fails the first attempt; the retry succeeds."""
    from featx.config import IngestConfig
    from flows.ingest import ingest_flow

    src, out = colour_images(tmp_path / "src"), tmp_path / "shards"
    out.mkdir()
    lock = open(out / ".lock", "a")  # noqa: SIM115 (another "featx ingest" holds the lock)
    fcntl.flock(lock, fcntl.LOCK_EX)
    threading.Timer(2.0, lambda: (fcntl.flock(lock, fcntl.LOCK_UN), lock.close())).start()
    state = ingest_flow(IngestConfig.parse(src=src, out=out), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["total"] == 64 and (out / "dataset.json").exists()
    task = _task_runs(state.state_details.flow_run_id)["ingest"]
    assert task.run_count == 2 and task.state.is_completed()
    arts = _artifacts(state.state_details.flow_run_id)
    assert "featx-ingest" in arts and "featx-classes" in arts
    table = arts["featx-classes"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert {r["class"] for r in rows} == {"red", "blue"}


def test_pipeline_flow_end_to_end_then_rerun_skips_work(harness, ray_local, tmp_path, monkeypatch):
    import os
    import uuid

    from featx.features import read_features
    from featx.pipeline import PipelineConfig
    from flows.pipeline import pipeline_flow

    # A secret in the environment of the flow process: it must reach no artifact, log,
    # Prefect state or output (scanned after the run).
    canary = f"featx-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)

    cfg = PipelineConfig.parse(
        src=colour_images(tmp_path / "src"),
        workdir=tmp_path / "work",
        epochs=2,
        batch_size=8,
        shard_samples=8,
        image_size=16,
        val_fraction=0.25,
    )
    state = pipeline_flow(cfg, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    X, df = read_features(cfg.features)
    assert X.shape[0] == s["ingest"]["total"] == 64 and df["key"].is_unique
    assert Path(s["report"]).read_text().startswith("# featx pipeline")
    assert s["probe"]["accuracy"] is not None
    arts = _artifacts(state.state_details.flow_run_id)
    for key in ("featx-ingest", "featx-pipeline", "featx-classes"):
        assert key in arts, sorted(arts)
    assert (
        "probe" in arts["featx-pipeline"].data and str(cfg.features) in arts["featx-pipeline"].data
    )
    assert "progress" in arts  # ingest, train and extract show progress bars in the UI
    assert not [k for k, a in arts.items() if canary in str(a.data)]
    from prefect.settings import get_current_settings

    url = str(get_current_settings().server.database.connection_url.get_secret_value())
    db = Path(url.split(":///", 1)[1])  # sqlite+aiosqlite:///PATH: every log line, artifact
    roots = (db.parent, Path(os.environ["PREFECT_HOME"]), tmp_path)
    scanned = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert db in scanned and db.stat().st_size > 0
    assert not [p for p in scanned if canary.encode() in p.read_bytes()]
    parts = {p: p.stat().st_mtime_ns for p in cfg.features.rglob("*.parquet")}

    again = pipeline_flow(cfg)
    assert again["ingest"]["up_to_date"] and again["train"]["up_to_date"]
    assert again["extract"]["up_to_date"]
    assert parts == {p: p.stat().st_mtime_ns for p in cfg.features.rglob("*.parquet")}


def test_train_and_extract_flows(harness, ray_local, tmp_path):
    from featx.config import IngestConfig
    from featx.extract import ExtractConfig
    from featx.features import read_features
    from featx.ingest import ingest
    from featx.train import TrainConfig
    from flows.extract import extract_flow
    from flows.train import train_flow

    shards = tmp_path / "shards"
    ingest(
        IngestConfig.parse(
            src=colour_images(tmp_path / "src"),
            out=shards,
            image_size=16,
            shard_samples=8,
            val_fraction=0.25,
        )
    )
    cfg = TrainConfig.parse(dataset=shards, out=tmp_path / "run", epochs=2, batch_size=8)
    state = train_flow(cfg, return_state=True)
    assert state.is_completed(), state
    trained = state.result()
    assert len(trained["metrics"]) == 2 and (tmp_path / "run" / "best" / "model.pt").exists()
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"featx-train", "featx-train-metrics", "progress"} <= set(arts)
    assert "curves.png" in arts["featx-train"].data

    state = extract_flow(
        ExtractConfig.parse(dataset=shards, checkpoint=tmp_path / "run", out=tmp_path / "feat"),
        return_state=True,
    )
    assert state.is_completed(), state
    out = state.result()
    X, df = read_features(tmp_path / "feat")
    assert X.shape == (64, out["extract"]["feature_dim"]) and df["key"].is_unique
    card = json.loads((shards / "dataset.json").read_text())
    assert out["probe"]["classes"] == ["blue", "red"]
    assert out["probe"]["rows"]["val"] == card["counts"]["val"]["total"]
    assert out["probe"]["accuracy"] > out["probe"]["majority_accuracy"]  # red vs blue is learnt
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"featx-extract", "featx-classes"} <= set(arts)


def _stripes(root: Path, n: int = 64) -> Path:
    """A flat folder (no labels): noisy stripes, horizontal (h_*) or vertical (v_*), of random
    colours and phase. The orientation is the class the training never sees."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        kind = "hv"[i % 2]
        period = int(rng.integers(3, 6))
        wave = (np.arange(20) + rng.integers(period)) % period < period / 2
        mask = np.tile(
            wave[:, None] if kind == "h" else wave[None, :], (1, 20) if kind == "h" else (20, 1)
        )
        colour = rng.integers(60, 255, 3)
        arr = np.where(mask[..., None], colour, 255 - colour) + rng.normal(0, 25, (20, 20, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{kind}_{i:03d}.png")
    return root


def test_pipeline_flow_learns_features_from_an_unlabelled_folder(harness, ray_local, tmp_path):
    """A flat folder of unlabelled images goes from raw files to Parquet features through the
    pipeline flow with the contrastive objective; the report needs no labels, and the features
    separate a class the training never saw."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.features import read_features
    from featx.pipeline import PipelineConfig
    from flows.pipeline import pipeline_flow

    cfg = PipelineConfig.parse(
        src=_stripes(tmp_path / "flat", 96),
        workdir=tmp_path / "work",
        objective="contrastive",
        epochs=25,  # about 75 steps of 32 samples: orientation is learnt (random init: ~0.7)
        patience=0,
        batch_size=16,
        shard_samples=16,
        image_size=16,
        val_fraction=0.25,
    )
    state = pipeline_flow(cfg, return_state=True)
    assert state.is_completed(), state
    s = state.result()
    assert s["probe"] is None and s["described"]["labelled"] is False
    report = Path(s["report"]).read_text()
    assert "no labels to probe with" in report and "effective rank" in report
    arts = _artifacts(state.state_details.flow_run_id)
    assert "effective rank" in arts["featx-pipeline"].data

    X, df = read_features(cfg.features)
    assert len(X) == s["ingest"]["total"] == 96 and df["label"].isna().all()
    hidden = df["source"].str.rsplit("/", n=1).str[-1].str.startswith("h_").to_numpy()
    train = (df["split"] == "train").to_numpy()
    # featx probe's classifier, fitted on labels only the test knows
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(X[train], hidden[train])
    assert np.mean(clf.predict(X[~train]) == hidden[~train]) >= 0.85
