"""`featx export --to lance`: the current feature version as a Lance dataset with a vector
index. Feature folders are made here (test_use's `write_version`), no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_use import clustered, write_version

from featx import export, storage
from featx.errors import ConfigError
from featx.export import INDEX_NAME, INDEX_TYPE, MARKER, export_lance
from featx.features import (
    current_dir,
    part_files,
    read_features,
    read_manifest,
    write_manifest,
)

lance = pytest.importorskip("lance")

IDENTITY = {"model_name": "tiny-cnn", "checkpoint_sha256": "c" * 64, "feature_dim": 16}


def features(root: Path, version: int, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A features folder whose current version holds n_train + n_val rows in two parts, with
    the model's identity in its manifests, as extraction writes them."""
    X, labels = clustered(n_train + n_val, 5, seed=seed)
    labels = [None if i % 7 == 3 else int(v) for i, v in enumerate(labels)]  # some unlabelled
    parts = {
        "train/000000": (X[:n_train], labels[:n_train], "a"),
        "val/000001": (X[n_train:], labels[n_train:], "b"),
    }
    write_version(root, version, parts)
    for folder in (root, root / "versions" / f"{version:06d}"):
        write_manifest(folder, {**read_manifest(folder), **IDENTITY})
    return root


def nearest(ds, q: np.ndarray, k: int = 5) -> list[str]:
    return ds.to_table(nearest={"column": "embedding", "q": q, "k": k})["key"].to_pylist()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_export_holds_the_same_rows_and_an_index_that_finds_each_row_first(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ROWS_PER_PARTITION", 64)  # several IVF cells from 320 rows
    feat = features(tmp_path / "feat", 1, 240, 80)
    out = tmp_path / "export" / "feat.lance"
    calls = []
    s = export_lance(feat, out, progress=lambda done, total: calls.append((done, total)))
    assert (s.rows, s.dim, s.parts, s.version, s.replaced) == (320, 16, 2, "000001", False)
    assert (s.index, s.index_params, s.index_skipped) == (INDEX_TYPE, {"num_partitions": 5}, None)
    assert calls[-1] == (2, 2)

    ds = lance.dataset(str(out))
    table = ds.to_table()
    X, df = read_features(feat)
    assert table.schema.names == ["key", "split", "label", "label_name", "source", "embedding"]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<item: float>[16]"
    parts = pa.concat_tables(pq.read_table(p) for p in part_files(current_dir(feat)))
    assert table.equals(parts, check_metadata=False)  # every column, row for row
    assert table["key"].to_pylist() == list(df["key"]) and table["label"].null_count > 0
    emb = np.asarray(table["embedding"].combine_chunks().flatten()).reshape(-1, 16)
    np.testing.assert_array_equal(emb, X)
    meta = {k.decode(): v.decode() for k, v in ds.schema.metadata.items()}
    assert meta[MARKER] and meta["feature_version"] == "000001"
    assert (meta["model_name"], meta["checkpoint_sha256"]) == ("tiny-cnn", "c" * 64)

    (idx,) = ds.describe_indices()
    assert (idx.name, idx.num_rows_indexed) == (INDEX_NAME, 320)
    q = X[0]
    assert (
        "ANNSubIndex" in ds.scanner(nearest={"column": "embedding", "q": q, "k": 5}).explain_plan()
    )
    keys = list(df["key"])
    for i in range(0, 320, 29):
        assert nearest(ds, X[i])[0] == keys[i]
    assert leftovers(out.parent) == []


def test_few_rows_get_no_index_unless_required_which_is_refused(tmp_path):
    feat = features(tmp_path / "feat", 1, 14, 6)
    out = tmp_path / "small.lance"
    s = export_lance(feat, out)
    assert s.rows == 20 and s.index is None and "20 rows" in s.index_skipped
    ds = lance.dataset(str(out))
    assert ds.describe_indices() == []
    X, df = read_features(feat)
    assert nearest(ds, X[7])[0] == df["key"][7]  # a flat scan, exact
    # required: refused before anything is written, the earlier export left as it was
    with pytest.raises(ConfigError, match="20 rows"):
        export_lance(feat, out, index=True)
    assert lance.dataset(str(out)).version == ds.version and leftovers(tmp_path) == []
    assert export_lance(feat, out, index=False).index_skipped.startswith("not asked")


def test_a_folder_featx_did_not_make_is_refused_and_left_untouched(tmp_path):
    feat = features(tmp_path / "feat", 1, 14, 6)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing"):
        export_lance(feat, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    # a Lance dataset, but not one featx exported
    theirs = tmp_path / "theirs.lance"
    lance.write_dataset(pa.table({"key": ["a", "b"]}), str(theirs))
    with pytest.raises(ConfigError, match="refusing"):
        export_lance(feat, theirs)
    assert lance.dataset(str(theirs)).schema.names == ["key"]
    a_file = tmp_path / "file.lance"
    a_file.write_text("not a dataset")
    with pytest.raises(ConfigError, match="refusing"):
        export_lance(feat, a_file)
    assert a_file.read_text() == "not a dataset"
    assert leftovers(tmp_path) == []


def test_a_second_export_replaces_the_first_and_clears_a_killed_one(tmp_path):
    feat = features(tmp_path / "feat", 1, 14, 6)
    out = tmp_path / "feat.lance"
    export_lance(feat, out)
    features(tmp_path / "feat", 2, 30, 10, seed=1)  # extraction made version 2 current
    # what an export killed before its end leaves beside `out` (pid 2**22+1: never running)
    stale = tmp_path / f".{out.name}.tmp{2**22 + 1}"
    stale.mkdir()
    (stale / "data").mkdir()
    s = export_lance(feat, out)
    assert (s.replaced, s.rows, s.version) == (True, 40, "000002")
    ds = lance.dataset(str(out))
    _, df = read_features(feat)
    assert ds.to_table()["key"].to_pylist() == list(df["key"])
    assert ds.schema.metadata[b"feature_version"] == b"000002"
    assert leftovers(tmp_path) == []


def test_no_features_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No features in .*featx extract"):
        export_lance(empty, tmp_path / "out.lance")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_lance(tmp_path / "nowhere", tmp_path / "out.lance")
    assert not (tmp_path / "out.lance").exists() and leftovers(tmp_path) == []


def test_features_in_an_object_store_are_read_part_by_part(tmp_path, monkeypatch):
    """A URI goes through featx.storage: here `mem://` is served from a local folder."""
    feat = features(tmp_path / "bucket" / "feat", 1, 14, 6)
    real = storage.filesystem

    def filesystem(loc):
        if isinstance(loc, str) and loc.startswith("mem://"):
            return pafs.LocalFileSystem(), str(tmp_path / "bucket" / loc[len("mem://") :])
        return real(loc)

    monkeypatch.setattr(storage, "filesystem", filesystem)
    s = export_lance("mem://feat", tmp_path / "feat.lance")
    assert (s.rows, s.parts, s.version, s.features) == (20, 2, "000001", "mem://feat")
    _, df = read_features(feat)
    assert lance.dataset(str(tmp_path / "feat.lance")).to_table()["key"].to_pylist() == list(
        df["key"]
    )


def test_an_export_that_fails_half_way_leaves_the_earlier_one_as_it_was(tmp_path):
    feat = features(tmp_path / "feat", 1, 14, 6)
    out = tmp_path / "feat.lance"
    export_lance(feat, out)
    before = lance.dataset(str(out)).to_table()
    features(tmp_path / "feat", 2, 30, 10, seed=1)
    (current_dir(feat) / "val" / "part-000001.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="part-000001"):
        export_lance(feat, out)  # fails after the first part was written
    assert lance.dataset(str(out)).to_table().equals(before)
    assert leftovers(tmp_path) == []
