"""Probe: trained features beat random-init ones; clear errors without labels or val rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featx.checkpoint import save_model_dir
from featx.config import IngestConfig
from featx.extract import extract
from featx.features import BASELINE_DIR, make_table, write_manifest, write_part
from featx.ingest import ingest, load_card
from featx.models import create_model
from featx.probe import probe

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])
SIZE, PATCH = 32, 12


def patch_image(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A random flat colour with noise and, somewhere, a square of the class's colour.

    Random-init features mostly see the background, so a probe on them is far from perfect;
    a briefly trained model learns to look for the square.
    """
    a = rng.integers(0, 256, 3) + rng.normal(0, 20, (SIZE, SIZE, 3))
    r, c = rng.integers(0, SIZE - PATCH, 2)
    a[r : r + PATCH, c : c + PATCH] = COLOURS[cls]
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def patch_ds(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for i in range(120):
        path = root / "src" / f"c{i % 3}" / f"{i:03d}.png"  # folder c<k> is class index k
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(patch_image(rng, i % 3)).save(path)
    ingest(
        IngestConfig.parse(
            src=root / "src",
            out=root / "ds",
            val_fraction=0.3,
            shard_samples=40,
            image_size=SIZE,
            image_format="png",
            workers=1,
        )
    )
    return root / "ds"


@pytest.fixture(scope="module")
def trained_run(patch_ds, tmp_path_factory) -> Path:
    """Test setup, not featx training: 120 Adam steps in a plain loop on 600 fresh samples."""
    from featx.batching import make_collate

    rng = np.random.default_rng(1)
    ys = np.arange(600) % 3
    collate = make_collate("image")
    x = collate([{"__key__": str(i), "image": patch_image(rng, y)} for i, y in enumerate(ys)])["x"]
    y = torch.from_numpy(ys)
    torch.manual_seed(0)
    model = create_model("cnn", "image", 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(120):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("run")
    save_model_dir(run / "best", model.eval(), load_card(patch_ds), patch_ds, metrics={})
    return run


@pytest.mark.slow
def test_trained_features_beat_the_random_init_baseline(
    ray_cluster, patch_ds, trained_run, tmp_path
):
    from typer.testing import CliRunner

    from featx.cli import app

    out = tmp_path / "features"
    extract(patch_ds, trained_run, out)
    r = probe(out)
    card = load_card(patch_ds)
    assert r.rows["val"] == card["counts"]["val"]["total"]
    assert r.rows["train"] == card["counts"]["train"]["total"]
    assert r.accuracy > r.baseline_accuracy, r.to_dict()
    assert r.accuracy >= 0.8 and r.accuracy > r.majority_accuracy
    assert set(r.per_class_accuracy) == set(r.baseline_per_class_accuracy) == {"c0", "c1", "c2"}
    assert r.classes == ["c0", "c1", "c2"] and list(r.splits) == ["val"]
    assert Path(r.baseline_dir) == out / BASELINE_DIR / "features"
    parts = sorted((out / BASELINE_DIR / "features").glob("*/part-*.parquet"))
    assert len(parts) == len(list(out.glob("*/part-*.parquet")))
    # The baseline is cached: probing again extracts nothing and gives the same numbers.
    mtimes = [p.stat().st_mtime_ns for p in parts]
    again = probe(out)
    assert (again.accuracy, again.baseline_accuracy) == (r.accuracy, r.baseline_accuracy)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    res = CliRunner().invoke(app, ["probe", str(out)])
    assert res.exit_code == 0, res.output
    assert "random-init baseline" in res.output and f"{r.accuracy:.3f}" in res.output


# ---------------------------------------------------------------------------------------------
# probe logic on hand-made feature folders (no Ray, no model)


def write_features(root: Path, rows: dict[str, int], labelled: bool = True, seed: int = 0) -> Path:
    """A features folder whose embeddings separate the classes (class index in dimension 0)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, {"checkpoint_sha256": "0" * 64, "dataset": str(root / "nowhere")})
    for split, n in rows.items():
        labels = [i % 2 for i in range(n)] if labelled else [None] * n
        emb = rng.normal(0, 1, (n, 8)).astype(np.float32)
        emb[:, 0] += [0.0 if v is None else 6.0 * v for v in labels]
        table = make_table(
            keys=[f"{split}{i}" for i in range(n)],
            split=split,
            labels=labels,
            label_names=[None if v is None else f"k{v}" for v in labels],
            sources=[f"x/{i}.png" for i in range(n)],
            embeddings=emb,
            metadata={},
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        write_part(root / split / "part-000000.parquet", table)
    return root


def test_probe_scores_val_and_test_per_class(tmp_path):
    r = probe(write_features(tmp_path, {"train": 40, "val": 20, "test": 10}), baseline=False)
    assert r.accuracy == 1.0 and r.splits["test"]["accuracy"] == 1.0
    assert r.majority_accuracy == 0.5 and r.baseline_accuracy is None
    assert r.per_class_accuracy == {"k0": 1.0, "k1": 1.0}
    assert r.rows == {"train": 40, "val": 20, "test": 10}


def test_probe_without_labels_or_val_rows_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no labels.*unlabelled"):
        probe(write_features(tmp_path / "a", {"train": 10, "val": 4}, labelled=False))
    with pytest.raises(ValueError, match="no labelled val rows.*--val-fraction"):
        probe(write_features(tmp_path / "b", {"train": 10}))
    with pytest.raises(FileNotFoundError, match="featx extract"):
        probe(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="dataset"):  # the auto baseline needs it
        probe(write_features(tmp_path / "c", {"train": 10, "val": 4}))
