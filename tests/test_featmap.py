"""Feature maps and image grids: the map keeps separated classes apart and random ones mixed,
works without labels; grids and contact sheets draw a small ingested image dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image, make_text
from PIL import Image

from featx import featmap
from featx.config import IngestConfig
from featx.errors import ConfigError
from featx.featmap import contact_sheet, feature_map, neighbour_grid, sample_images
from featx.features import make_table, read_features, write_part
from featx.ingest import ingest


def features(n: int, dim: int, classes: int, spread: float, seed: int = 0, labelled=True):
    """`n` rows around `classes` centres `spread` apart (0: one cloud), as read_features
    returns them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.standard_normal((classes, dim))[y] * spread + rng.standard_normal((n, dim))
    df = pd.DataFrame(
        {
            "key": [f"k{i}" for i in range(n)],
            "split": rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1]),
            "label": pd.array(y if labelled else [None] * n, dtype="Int32"),
            "label_name": [f"class{c}" for c in y] if labelled else [None] * n,
            "source": None,
        }
    )
    return X.astype(np.float32), df


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# the map


def test_separated_classes_score_high_and_random_ones_near_chance(tmp_path):
    X, df = features(300, 32, classes=4, spread=2.0)
    info = feature_map(X, df, tmp_path / "map.png")
    assert info["methods"] == (["pca", "tsne"] if featmap.have_tsne() else ["pca"])
    assert info["points"] == info["rows"] == 300 and info["classes"] == 4
    assert all(s > 0.9 for s in info["neighbourhood_scores"].values()), info
    assert 0 < sum(info["explained_variance"]) < 1
    w, h = png_size(info["png"])
    assert 1000 <= w <= 2000 and 400 <= h <= 1000  # two panels side by side
    assert no_temporaries(tmp_path)

    X, df = features(300, 32, classes=4, spread=0.0)
    info = feature_map(X, df, tmp_path / "random.png")
    # a random map's kNN-5 vote is right about as often as the largest class is common
    assert info["neighbourhood_score"] < info["chance"] + 0.15, info


def test_unlabelled_features_map_without_a_score(tmp_path):
    X, df = features(200, 16, classes=3, spread=2.0, labelled=False)
    info = feature_map(X, df, tmp_path / "sub" / "map.png", method="pca")
    assert info["methods"] == ["pca"] and info["classes"] == 0
    assert info["neighbourhood_score"] is None and info["chance"] is None
    assert png_size(tmp_path / "sub" / "map.png") == (800, 600)


def test_features_read_back_partly_labelled_and_subsampled(tmp_path):
    # read_features' own columns: nullable Int32 labels, some missing
    X, _ = features(120, 8, classes=2, spread=3.0)
    labels = [None if i % 4 == 0 else i % 2 for i in range(120)]
    table = make_table(
        keys=[f"k{i}" for i in range(120)],
        split="train",
        labels=labels,
        label_names=[None if v is None else f"c{v}" for v in labels],
        sources=[None] * 120,
        embeddings=X,
        metadata={},
    )
    write_part(tmp_path / "part.parquet", table)
    X, df = read_features(tmp_path / "part.parquet")
    info = feature_map(X, df, tmp_path / "map.png", method="pca", max_points=50, seed=1)
    assert info["points"] == 50 and info["rows"] == 120 and info["classes"] == 2
    assert info["neighbourhood_score"] is not None


def test_tsne_without_opentsne_is_a_clear_error_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(featmap, "have_tsne", lambda: False)
    X, df = features(50, 8, classes=2, spread=2.0)
    with pytest.raises(ConfigError, match=r"pip install 'featx\[map\]'"):
        feature_map(X, df, tmp_path / "map.png", method="tsne")
    assert not (tmp_path / "map.png").exists()
    assert feature_map(X, df, tmp_path / "map.png")["methods"] == ["pca"]
    with pytest.raises(ConfigError, match="not one of"):
        feature_map(X, df, tmp_path / "map.png", method="umap")
    with pytest.raises(ValueError, match="rows but df has"):
        feature_map(X, df.iloc[:10], tmp_path / "map.png")


# ---------------------------------------------------------------------------------------------
# images


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 20-image dataset of 32-pixel images in 4 shards (ingest decodes in a child process,
    no Ray), and its keys in shard order."""
    root = tmp_path_factory.mktemp("images")
    for i in range(20):
        make_image(root / "src" / ("cats" if i % 2 else "dogs") / f"img{i:02d}.png", seed=i)
    out = root / "ds"
    ingest(
        IngestConfig.parse(
            src=root / "src", out=out, image_size=32, shard_samples=5, val_fraction=0.0, workers=1
        )
    )
    card = json.loads((out / "dataset.json").read_text())
    keys = []
    for shard in card["shards"]:
        stats = json.loads((out / shard["shard"].replace(".tar", "_stats.json")).read_text())
        keys += [e["key"] for e in stats["entries"]]
    assert len(card["shards"]) == 4 and len(keys) == 20
    return out, keys


def test_sample_images_come_back_in_the_order_asked(images):
    out, keys = images
    want = [keys[-1], keys[0], keys[7]]  # last shard first
    got = sample_images(out, want)
    assert list(got) == want
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in got.values())
    assert sample_images(str(out), keys[:1])[keys[0]].size == (32, 32)  # a str path works too
    with pytest.raises(KeyError, match="1 key"):
        sample_images(out, [keys[0], "no_such_key"])


def test_sample_images_refuse_a_text_dataset(tmp_path):
    for i in range(4):
        make_text(tmp_path / "src" / f"doc{i}.txt", seed=i)
    ingest(IngestConfig.parse(src=tmp_path / "src", out=tmp_path / "ds", workers=1))
    with pytest.raises(ValueError, match="text dataset"):
        sample_images(tmp_path / "ds", ["x"])


def test_neighbour_grid_grows_with_neighbours_and_caps_rows(images, tmp_path):
    out, keys = images
    small = neighbour_grid(out, [keys[:3]], tmp_path / "small.png")
    wide = neighbour_grid(
        out,
        [keys[:6], keys[6:9]],
        tmp_path / "wide.png",
        titles=[["query", "a 0.99", "b", "c", "d", "e"], ["q2", "f", "g"]],
    )
    assert (small["rows"], small["columns"]) == (1, 3) and (wide["rows"], wide["columns"]) == (2, 6)
    (w1, h1), (w2, h2) = png_size(small["png"]), png_size(wide["png"])
    assert w2 > 1.5 * w1 and h2 > 1.5 * h1
    capped = neighbour_grid(out, [keys[i : i + 2] for i in range(12)], tmp_path / "capped.png")
    assert capped["rows"] == featmap.MAX_ROWS
    assert no_temporaries(tmp_path)
    with pytest.raises(ValueError, match="shaped like rows"):
        neighbour_grid(out, [keys[:3]], tmp_path / "bad.png", titles=[["only one"]])


def test_contact_sheet_draws_pairs_and_caps_them(images, tmp_path):
    out, keys = images
    pairs = [(keys[i], keys[i + 1], 0.99 - i / 100, "train / train") for i in range(19)]
    one = contact_sheet(out, pairs[:1], tmp_path / "one.png")
    many = contact_sheet(out, pairs, tmp_path / "many.png")
    assert one["pairs"] == 1 and many["pairs"] == featmap.MAX_PAIRS
    (w1, h1), (w2, h2) = png_size(one["png"]), png_size(many["png"])
    assert w2 > w1 and h2 > 4 * h1  # 2 pairs a row, 8 rows
    with pytest.raises(ValueError, match="no pairs"):
        contact_sheet(out, [], tmp_path / "none.png")
