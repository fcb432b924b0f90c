"""Probe: trained features beat random-init ones; classic baselines; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featx.checkpoint import save_model_dir
from featx.classic import classic_features
from featx.config import ExtractConfig, IngestConfig, ProbeConfig
from featx.dataset import finished_shards, load_card, read_stats
from featx.extract import extract
from featx.features import (
    BASELINE_DIR,
    current_dir,
    make_table,
    read_features,
    write_manifest,
    write_part,
)
from featx.ingest import ingest
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
    extract(ExtractConfig.parse(dataset=patch_ds, checkpoint=trained_run, out=out))
    r = probe(ProbeConfig.parse(features=out))
    card = load_card(patch_ds)
    assert r.rows["val"] == card["counts"]["val"]["total"]
    assert r.rows["train"] == card["counts"]["train"]["total"]
    assert r.accuracy > r.baseline_accuracy, r.to_dict()
    assert r.accuracy >= 0.8 and r.accuracy > r.majority_accuracy
    assert r.classic_features == "raw pixels 16x16" and r.classic_accuracy is not None
    assert set(r.classic_per_class_accuracy) == {"c0", "c1", "c2"}
    assert set(r.per_class_accuracy) == set(r.baseline_per_class_accuracy) == {"c0", "c1", "c2"}
    assert r.classes == ["c0", "c1", "c2"] and list(r.splits) == ["val"]
    assert Path(r.baseline_dir) == out / BASELINE_DIR / "features"
    parts = sorted(current_dir(out / BASELINE_DIR / "features").glob("*/part-*.parquet"))
    assert len(parts) == len(list(current_dir(out).glob("*/part-*.parquet")))
    # The baseline is cached: probing again extracts nothing and gives the same numbers.
    mtimes = [p.stat().st_mtime_ns for p in parts]
    again = probe(ProbeConfig.parse(features=out))
    assert (again.accuracy, again.baseline_accuracy) == (r.accuracy, r.baseline_accuracy)
    assert [p.stat().st_mtime_ns for p in parts] == mtimes
    res = CliRunner().invoke(app, ["probe", str(out)])
    assert res.exit_code == 0, res.output
    assert "random-init baseline" in res.output and f"{r.accuracy:.3f}" in res.output
    assert "classic: raw pixels 16x16" in res.output and f"{r.classic_accuracy:.3f}" in res.output


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
    features = write_features(tmp_path, {"train": 40, "val": 20, "test": 10})
    r = probe(ProbeConfig.parse(features=features, baseline=False, classic=False))
    assert r.accuracy == 1.0 and r.splits["test"]["accuracy"] == 1.0
    assert r.majority_accuracy == 0.5 and r.baseline_accuracy is None
    assert r.classic_accuracy is None and r.classic_features is None
    assert r.per_class_accuracy == {"k0": 1.0, "k1": 1.0}
    assert r.rows == {"train": 40, "val": 20, "test": 10}


def test_probe_without_labels_or_val_rows_says_what_to_do(tmp_path):
    unlabelled = write_features(tmp_path / "a", {"train": 10, "val": 4}, labelled=False)
    with pytest.raises(ValueError, match="no labels.*unlabelled"):
        probe(ProbeConfig.parse(features=unlabelled))
    no_val = write_features(tmp_path / "b", {"train": 10})
    with pytest.raises(ValueError, match="no labelled val rows.*--val-fraction"):
        probe(ProbeConfig.parse(features=no_val))
    with pytest.raises(FileNotFoundError, match="featx extract"):
        probe(ProbeConfig.parse(features=tmp_path / "empty"))
    no_dataset = write_features(tmp_path / "c", {"train": 10, "val": 4})
    with pytest.raises(FileNotFoundError, match="dataset"):  # the auto baseline needs it
        probe(ProbeConfig.parse(features=no_dataset))


def test_probe_command_takes_the_config_and_writes_a_summary(tmp_path):
    import json

    from typer.testing import CliRunner

    from featx.cli import app

    features = write_features(tmp_path / "f", {"train": 40, "val": 20})
    summary = tmp_path / "probe.json"
    argv = ["probe", str(features), "--no-baseline", "--no-classic", "--seed", "3"]
    res = CliRunner().invoke(app, [*argv, "--summary-json", str(summary)])
    assert res.exit_code == 0, res.output
    assert "linear probe" in res.output and "1.000" in res.output
    assert json.loads(summary.read_text())["accuracy"] == 1.0
    res = CliRunner().invoke(app, ["probe", str(write_features(tmp_path / "g", {"train": 10}))])
    assert res.exit_code == 2 and "no labelled val rows" in res.output


# ---------------------------------------------------------------------------------------------
# the classic baseline, on small datasets made here where the raw samples carry the class


def features_of(dataset: Path, root: Path, seed: int = 0) -> Path:
    """A features folder for every sample of `dataset`: its keys, splits and labels, noise as
    embeddings, and rows in a random order (not the shards'), so only matching by key works."""
    rng = np.random.default_rng(seed)
    card = load_card(dataset)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(root, {"checkpoint_sha256": "0" * 64, "dataset": str(dataset)})
    for split in card["counts"]:
        entries = [e for tar in finished_shards(dataset, split) for e in read_stats(tar)["entries"]]
        entries = [entries[i] for i in rng.permutation(len(entries))]
        table = make_table(
            keys=[e["key"] for e in entries],
            split=split,
            labels=[card["classes"][e["label"]] for e in entries],
            label_names=[e["label"] for e in entries],
            sources=[e["source"] for e in entries],
            embeddings=rng.normal(0, 1, (len(entries), 4)),
            metadata={},
        )
        (root / split).mkdir(parents=True, exist_ok=True)
        write_part(root / split / "part-000000.parquet", table)
    return root


def _ingest(src: Path, out: Path, **kw) -> Path:
    ingest(IngestConfig.parse(src=src, out=out, shard_samples=8, workers=1, **kw))
    return out


@pytest.fixture(scope="module")
def square_ds(tmp_path_factory) -> Path:
    """Noisy grey 16x16 images with a square of the class's colour in the middle."""
    from PIL import Image

    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    for i in range(48):
        a = rng.normal(128, 30, (16, 16, 3))
        a[5:11, 5:11] = COLOURS[i % 3]
        path = root / "src" / f"c{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
    return _ingest(root / "src", root / "ds", val_fraction=0.3, image_size=16, image_format="png")


@pytest.fixture(scope="module")
def words_ds(tmp_path_factory) -> Path:
    """Texts whose class shows only in which topic words they use, among shared filler."""
    import json

    root = tmp_path_factory.mktemp("words")
    rng = np.random.default_rng(0)
    topics = {
        "sport": ["goal", "match", "striker", "referee", "league", "keeper"],
        "cooking": ["oven", "flour", "simmer", "garlic", "recipe", "butter"],
    }
    filler = ["the", "today", "again", "very", "people", "said", "about", "week"]
    rows = []
    for i in range(60):
        label = "sport" if i % 2 else "cooking"
        words = [*rng.choice(topics[label], 3), *rng.choice(filler, 9)]
        text = " ".join(rng.permutation(words))
        rows.append({"text": text, "label": label, "split": "val" if i % 4 == 0 else "train"})
    (root / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _ingest(root / "texts.jsonl", root / "ds", modality="text", vocab_size=64)


def test_classic_pixels_carry_the_class_and_rows_match_by_key(square_ds, tmp_path):
    features = features_of(square_ds, tmp_path / "features")
    # The rows are not in shard order: a probe matching classic rows by position would pair
    # samples with other samples' labels.
    shard_keys = [
        e["key"] for t in finished_shards(square_ds, "train") for e in read_stats(t)["entries"]
    ]
    _, df = read_features(features, split="train")
    assert list(df["key"]) != shard_keys and sorted(df["key"]) == sorted(shard_keys)

    r = probe(ProbeConfig.parse(features=features, baseline=False))
    assert r.classic_features == "raw pixels 16x16"
    assert r.classic_accuracy >= 0.9 and r.classic_accuracy > r.majority_accuracy + 0.4
    assert set(r.classic_per_class_accuracy) == {"c0", "c1", "c2"}
    assert r.splits["val"]["classic_accuracy"] == r.classic_accuracy
    assert r.accuracy < 0.8  # the hand-made "trained" features are noise
    assert classic_features(square_ds).X.shape == (48, 16 * 16 * 3)


def test_classic_tfidf_finds_the_topic_words_and_stays_sparse(words_ds, tmp_path):
    from scipy import sparse

    r = probe(
        ProbeConfig.parse(features=features_of(words_ds, tmp_path / "features"), baseline=False)
    )
    assert r.classic_features == "tf-idf word 1-2 grams"
    assert r.classic_accuracy >= 0.9 and r.rows["val"] == 15
    feats = classic_features(words_ds)
    assert sparse.issparse(feats.X) and feats.X.shape[0] == 60


def test_classic_log_mel_stats_tell_low_from_high_tones(tmp_path):
    from conftest import make_audio

    for i in range(16):  # make_audio's tone is 200 + 50 * seed Hz
        label, seed = ("low", i) if i % 2 else ("high", 40 + i)
        make_audio(tmp_path / "src" / label / f"{i:02d}.flac", seed, seconds=0.2)
    ds = _ingest(tmp_path / "src", tmp_path / "ds", val_fraction=0.4)
    feats = classic_features(ds)
    assert feats.kind == "log-mel 40-band mean+std" and feats.X.shape == (16, 80)
    r = probe(ProbeConfig.parse(features=features_of(ds, tmp_path / "features"), baseline=False))
    assert r.classic_accuracy == 1.0


def test_no_classic_skips_it_and_a_missing_dataset_says_what_to_do(square_ds, tmp_path):
    from typer.testing import CliRunner

    from featx.cli import app

    features = features_of(square_ds, tmp_path / "features")
    res = CliRunner().invoke(app, ["probe", str(features), "--no-baseline"])
    assert res.exit_code == 0, res.output
    assert "classic: raw pixels 16x16" in res.output

    nowhere = write_features(tmp_path / "nowhere", {"train": 10, "val": 4})
    with pytest.raises(FileNotFoundError, match="classic baseline needs the dataset.*--no-classic"):
        probe(ProbeConfig.parse(features=nowhere, baseline=False))
    with pytest.raises(
        FileNotFoundError,
        match=r"random-init and classic baselines.*--no-baseline\) and .*--no-classic",
    ):
        probe(ProbeConfig.parse(features=nowhere))
    # Without the classic baseline the dataset is never read.
    res = CliRunner().invoke(app, ["probe", str(nowhere), "--no-baseline", "--no-classic"])
    assert res.exit_code == 0, res.output
    assert "classic:" not in res.output


def test_classic_refuses_feature_rows_the_dataset_does_not_hold(square_ds, words_ds, tmp_path):
    features = features_of(words_ds, tmp_path / "features")
    with pytest.raises(ValueError, match="no sample in the dataset.*--dataset"):
        probe(ProbeConfig.parse(features=features, baseline=False, dataset=square_ds))


def test_the_random_init_baseline_keeps_a_text_models_fitted_token_bag(words_ds, tmp_path):
    """The token bag is fitted on the data, not trained: the random-init baseline of a
    contrastive text model holds the same bag beside random weights, so the baseline measures
    what training adds. A model with another bag gets a new baseline, not the cached one."""
    from featx.checkpoint import MODEL_FILE
    from featx.config import TrainConfig
    from featx.probe import _random_model
    from featx.train_loop import setup_model

    card = load_card(words_ds)
    tokenizer = str(words_ds / card["tokenizer"])

    def trained(version: int) -> tuple[torch.nn.Module, dict]:
        cfg = TrainConfig.parse(
            dataset=words_ds, out=tmp_path / "run", model="cnn", objective="contrastive"
        ).resolve(card)
        model = setup_model(cfg, card, tokenizer, fit_bag=True)
        with torch.no_grad():  # stands in for training: weights no random init gives
            model.stem.embed.weight.fill_(0.5)
            model.bag.proj.mul_(version)  # stands in for a bag fitted on other data
        folder = tmp_path / f"model-{version}"
        save_model_dir(folder, model, card, words_ds, metrics={})
        return model, {"model_dir": str(folder), "model": model.config}

    def baseline(manifest: dict) -> dict:
        folder = _random_model(tmp_path / "baseline", manifest, words_ds, seed=0)
        return torch.load(folder / MODEL_FILE, weights_only=True)

    model, manifest = trained(version=1)
    base = baseline(manifest)
    bag = [k for k in model.state_dict() if k.startswith("bag.")]
    assert bag and all(torch.equal(base[k], model.state_dict()[k]) for k in bag)
    assert not torch.equal(base["stem.embed.weight"], model.stem.embed.weight)
    other, manifest = trained(version=2)
    assert not torch.equal(other.bag.proj, model.bag.proj)
    assert torch.equal(baseline(manifest)["bag.proj"], other.bag.proj)
