"""Using the features: the nearest-neighbour index, neighbours, near-duplicates and leakage,
and the exclusion list. Feature folders are made here; one test runs ingest and extraction on
images with planted copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featx.features import VERSIONS, make_table, read_features, write_manifest, write_part


def write_version(root: Path, version: int, parts: dict[str, list], *, dim: int = 16) -> Path:
    """Version `version` of a features folder: parts maps "split/NNNNNN" to (embeddings,
    labels, shard sha). Makes it current, as extraction does."""
    folder = root / VERSIONS / f"{version:06d}"
    for rel, (emb, labels, sha) in parts.items():
        split, number = rel.split("/")
        n = len(emb)
        table = make_table(
            keys=[f"{split}-{number}-{i}" for i in range(n)],
            split=split,
            labels=list(labels),
            label_names=[None if v is None else f"class{v}" for v in labels],
            sources=[f"src/{split}/{number}/{i}.png" for i in range(n)],
            embeddings=emb,
            metadata={"shard_sha256": sha, "checkpoint_sha256": "c" * 64},
        )
        write_part(folder / split / f"part-{number}.parquet", table)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"version": f"{version:06d}", "complete": True, "dataset": str(root / "nowhere")}
    write_manifest(folder, manifest)
    write_manifest(root, {**manifest, "current": f"{version:06d}"})
    return root


def clustered(n: int, classes: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + spread * rng.normal(0, 1, (n, dim))).astype(np.float32), labels


def test_neighbours_of_a_sample_are_mostly_its_own_class_when_the_features_are_good(tmp_path):
    from featx.index import build_index, neighbors

    good, labels = clustered(300, 5)
    parts = {
        "train/000000": (good[:200], labels[:200], "a"),
        "val/000001": (good[200:], labels[200:], "b"),
    }
    feat = write_version(tmp_path / "good", 1, parts)
    s = build_index(feat)
    assert (s.rows, s.segments, s.segments_built) == (300, 1, 1)
    same = []
    for i in range(0, 100, 10):
        nb = neighbors(feat, key=f"val-000001-{i}", k=10)
        assert len(nb) == 10 and f"val-000001-{i}" not in set(nb["key"])
        assert list(nb["rank"]) == list(range(1, 11)) and nb["similarity"].is_monotonic_decreasing
        same.append(np.mean(nb["label_name"] == f"class{labels[200 + i]}"))
    assert np.mean(same) >= 0.9
    # the same check on features that know nothing of the classes: near chance
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (300, 16)).astype(np.float32)
    bad = write_version(
        tmp_path / "bad",
        1,
        {
            "train/000000": (noise[:200], labels[:200], "a"),
            "val/000001": (noise[200:], labels[200:], "b"),
        },
    )
    chance = [
        np.mean(neighbors(bad, key=f"val-000001-{i}")["label_name"] == f"class{labels[200 + i]}")
        for i in range(0, 100, 10)
    ]
    assert np.mean(chance) < 0.5


def test_the_index_is_versioned_with_the_features_and_rebuilt_only_where_parts_changed(tmp_path):
    from featx.index import INDEX_DIR, Index, build_index

    X, y = clustered(600, 4)
    a, b, c = (X[:200], y[:200], "a"), (X[200:400], y[200:400], "b"), (X[400:], y[400:], "c")
    feat = write_version(tmp_path / "f", 1, {"train/000000": a, "train/000001": b})
    first = build_index(feat, segment_rows=200)
    assert (first.segments, first.segments_built) == (2, 2)
    assert build_index(feat).up_to_date
    # version 2: the same two parts (linked, as extraction does) and a new one
    v1 = tmp_path / "f" / VERSIONS / "000001"
    write_version(tmp_path / "f", 2, {"val/000002": c})
    for rel in ("train/part-000000.parquet", "train/part-000001.parquet"):
        (tmp_path / "f" / VERSIONS / "000002" / rel).parent.mkdir(exist_ok=True)
        os.link(v1 / rel, tmp_path / "f" / VERSIONS / "000002" / rel)
    second = build_index(feat, segment_rows=200)
    assert (second.rows, second.segments_reused, second.segments_built) == (600, 2, 1)
    assert (tmp_path / "f" / VERSIONS / "000001" / INDEX_DIR).is_dir()  # the old one stays
    # every row is found as its own nearest neighbour, under its own key
    index = Index.open(feat)
    Xall, df = read_features(feat)
    sims, ids = index.search(Xall, 1)
    assert [r["key"] for r in index.rows(ids[:, 0])] == list(df["key"])
    assert np.allclose(sims[:, 0], 1.0, atol=1e-4)
    # version 3 drops a part: its segment goes, the others stay
    write_version(tmp_path / "f", 3, {})
    v2 = tmp_path / "f" / VERSIONS / "000002"
    for rel in ("train/part-000000.parquet", "val/part-000002.parquet"):
        (tmp_path / "f" / VERSIONS / "000003" / rel).parent.mkdir(exist_ok=True)
        os.link(v2 / rel, tmp_path / "f" / VERSIONS / "000003" / rel)
    third = build_index(feat, segment_rows=200)
    assert (third.rows, third.segments, third.segments_built) == (400, 2, 0)


def test_a_large_segment_is_an_ivf_index_that_finds_what_exact_search_finds(tmp_path, monkeypatch):
    import featx.index as fi

    monkeypatch.setattr(fi, "IVF_FROM", 1000)
    X, y = clustered(4000, 20, dim=32, spread=0.6)
    feat = write_version(tmp_path / "f", 1, {"train/000000": (X, y, "a")})
    s = fi.build_index(feat)
    assert s.kinds == {"ivf": 1}
    index = fi.Index.open(feat)
    Q = X[:200]
    _, got = index.search(Q, 10)
    Z = fi.normalise(X, index.mean)
    exact = np.argsort(-(fi.normalise(Q, index.mean) @ Z.T), axis=1)[:, :10]
    rows = got & ((1 << 24) - 1)
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(rows, exact, strict=True)])
    assert recall >= 0.95


def test_planted_near_duplicates_are_found_within_and_across_splits(tmp_path):
    from featx.dedup import find_duplicates, read_exclusions

    X, y = clustered(400, 8, spread=1.0)
    rng = np.random.default_rng(3)
    # copies of train rows planted in val and train, copies of val rows in test
    planted = [(f"train-000000-{i}", "val-000001-" + str(j)) for j, i in enumerate(range(0, 40, 4))]
    val = X[300:].copy()
    val[:10] = X[0:40:4] + 0.01 * rng.normal(0, 1, (10, 16))
    train = X[:300].copy()
    train[299] = X[5] + 0.01 * rng.normal(0, 1, 16)
    test = X[200:220] + 0.01 * rng.normal(0, 1, (20, 16)).astype(np.float32)
    test[:3] = val[50:53] + 0.01 * rng.normal(0, 1, (3, 16))
    feat = write_version(
        tmp_path / "f",
        1,
        {
            "train/000000": (train, y[:300], "a"),
            "val/000001": (val, y[300:], "b"),
            "test/000002": (test.astype(np.float32), y[200:220], "c"),
        },
    )
    s = find_duplicates(feat, threshold=0.95)
    import pandas as pd

    pairs = pd.read_parquet(s.files["pairs"])
    found = {tuple(sorted((a, b))) for a, b in zip(pairs["key_a"], pairs["key_b"], strict=True)}
    assert {tuple(sorted(p)) for p in planted} <= found
    assert ("train-000000-299", "train-000000-5") in found
    assert all((f"test-000002-{i}", f"val-000001-{50 + i}") in found for i in range(3))
    assert s.by_splits["train-val"] >= 10 and s.by_splits["train-test"] >= 17
    assert s.leaking["val"] >= 10 and s.leaking["test"] >= 17
    assert len(pairs) < 60  # distinct samples are not called duplicates
    excluded = read_exclusions(s.files["exclude"])
    assert {b for _, b in planted} <= excluded and "train-000000-299" in excluded
    assert not {a for a, _ in planted} & excluded  # the train member is kept
    summary = json.loads(Path(s.files["summary"]).read_text())
    assert summary["pairs"] == len(pairs) and len(summary["worst"]) == min(16, len(pairs))
    assert summary["worst"][0]["similarity"] >= summary["worst"][-1]["similarity"]


def test_the_exclusion_list_changes_the_probe_and_the_cli_reports_both(tmp_path):
    """Val rows that are copies of train rows score like train rows (the probe fits its train
    set exactly here: more dimensions than rows); left out, the probe says what it really
    does on new samples."""
    from typer.testing import CliRunner

    from featx import cli
    from featx.config import ProbeConfig
    from featx.dedup import find_duplicates
    from featx.probe import probe

    rng = np.random.default_rng(0)
    X, y = clustered(140, 2, dim=64, spread=8.0, seed=4)
    train, val = X[:60], X[60:].copy()
    val[40:] = train[:40] + 0.01 * rng.normal(0, 1, (40, 64))
    yv = y[60:].copy()
    yv[40:] = y[:40]
    feat = write_version(
        tmp_path / "f", 1, {"train/000000": (train, y[:60], "a"), "val/000001": (val, yv, "b")}
    )
    s = find_duplicates(feat, threshold=0.95)
    assert s.leaking["val"] == 40
    cfg = dict(features=feat, baseline=False, classic=False)
    r = probe(ProbeConfig.parse(**cfg, exclude=s.files["exclude"]))
    w = r.without_excluded
    assert w["rows"] == {"val": 40} and r.rows["val"] == 80
    assert r.accuracy - w["accuracy"] >= 0.1  # the copies inflated the score
    assert probe(ProbeConfig.parse(**cfg)).without_excluded is None

    runner = CliRunner()
    out = runner.invoke(cli.app, ["probe", str(feat), "--no-baseline", "--no-classic",
                                  "--exclude", s.files["exclude"]])  # fmt: skip
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "without the samples in" in said and "40 val" in said
    out = runner.invoke(cli.app, ["neighbors", str(feat), "--key", "val-000001-45", "-k", "3"])
    assert out.exit_code == 0, out.output
    assert "train-000000-5" in out.output  # its original, first
    out = runner.invoke(cli.app, ["neighbors", str(feat), "--key", "nope"])
    assert out.exit_code == 2 and "no sample with key 'nope'" in out.output
    out = runner.invoke(cli.app, ["neighbors", str(feat)])
    assert "exactly one of --key KEY or --file PATH" in str(out.exception)  # main() says it
    out = runner.invoke(cli.app, ["dedup", str(feat), "--threshold", "0.95"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "40 near-duplicate pairs" in said and "leaking into train: 40 val" in said
    assert (feat / VERSIONS / "000001" / "_dedup" / "pairs.parquet").is_file()
    out = runner.invoke(cli.app, ["export", str(feat), "--to", "lance", "--out",
                                  str(tmp_path / "f.lance")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "exported 140 rows of 64 floats" in " ".join(out.output.split())
    import lance

    assert lance.dataset(str(tmp_path / "f.lance")).count_rows() == 140


def scene(seed: int):
    """A picture of a few coloured shapes on a coloured ground: no two seeds alike."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        (x, y), (w, h) = rng.integers(0, 36, 2), rng.integers(8, 24, 2)
        box = [int(x), int(y), int(x + w), int(y + h)]
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return im


def test_reencoded_and_cropped_copies_of_images_are_found_across_splits(tmp_path):
    """Copies that exact-byte dedup cannot see (JPEG at quality 70, a 2-pixel crop scaled
    back) are found by `featx dedup` on the features of a CNN, wherever the split put them."""
    import pandas as pd
    import torch

    from featx.checkpoint import save_model_dir
    from featx.config import ExtractConfig, IngestConfig
    from featx.dataset import load_card
    from featx.dedup import find_duplicates, read_exclusions
    from featx.extract import extract
    from featx.index import neighbors
    from featx.ingest import ingest
    from featx.models import create_model

    src = tmp_path / "src"
    for i in range(80):
        folder = src / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        im = scene(i)
        im.save(folder / f"{i:03d}.png")
        if i < 10:
            im.save(folder / f"{i:03d}-copy.jpg", quality=70)
        elif i < 20:
            im.crop((2, 2, 46, 46)).resize((48, 48)).save(folder / f"{i:03d}-crop.png")
    ds = tmp_path / "ds"
    cfg = dict(shard_samples=16, image_size=32, val_fraction=0.3, workers=1)
    summary = ingest(IngestConfig.parse(src=src, out=ds, **cfg))
    assert summary.duplicates == 0 and summary.total == 100  # no byte-level duplicates
    torch.manual_seed(0)
    save_model_dir(tmp_path / "model", create_model("cnn", "image", 4), load_card(ds), ds, {})
    feat = tmp_path / "feat"
    extract(ExtractConfig.parse(dataset=ds, checkpoint=tmp_path / "model", out=feat))

    s = find_duplicates(feat, threshold=0.97)
    pairs = pd.read_parquet(s.files["pairs"])
    _, df = read_features(feat)
    source = dict(zip(df["key"], df["source"], strict=True))
    stem = {k: Path(v).stem.split("-")[0] for k, v in source.items()}
    found = {frozenset((a, b)) for a, b in zip(pairs["key_a"], pairs["key_b"], strict=True)}
    planted = {
        frozenset((k, o))
        for k, v in source.items()
        if "-" in Path(v).stem
        for o in source
        if o != k and stem[o] == stem[k]
    }
    assert len(planted) == 20 and planted <= found  # every copy, JPEG or cropped
    split = dict(zip(df["key"], df["split"], strict=True))
    across = [p for p in planted if len({split[k] for k in p}) == 2]
    assert across  # the split put some copies apart: found there too
    assert len(found) <= 2 * len(planted)  # distinct pictures are mostly not called copies
    # the exclusion list breaks up every planted pair, and lists no more than was found
    excluded = read_exclusions(s.files["exclude"])
    assert all(p & excluded for p in planted) and len(excluded) <= len(found)
    assert {k for p in across for k in p if split[k] != "train"} <= excluded
    assert (Path(s.out) / "pairs.png").stat().st_size > 1000  # the contact sheet
    # a new file: normalised and embedded as the dataset was, its copies come first
    nb = neighbors(feat, file=src / "c1" / "005.png", k=2)
    assert {Path(v).name for v in nb["source"]} == {"005.png", "005-copy.jpg"}
    assert nb["similarity"].iloc[0] > 0.999
