"""Extract: Parquet schema and metadata, equality with a plain loop, resume, refusal, readers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_image, make_text
from faults_support import in_splits

from featx.checkpoint import save_model_dir
from featx.config import ConfigError, IngestConfig
from featx.dataset import SPLITS, finished_shards, load_card, read_stats
from featx.extract import ExtractConfig, extract
from featx.features import MANIFEST, current_dir, read_features
from featx.ingest import ingest
from featx.models import create_model

FEATX = [sys.executable, "-m", "featx.cli"]
META_KEYS = {
    "featx_version",
    "model_name",
    "preset",
    "modality",
    "feature_dim",
    "checkpoint_sha256",
    "dataset_fingerprint",
    "created_at",
}


def save_checkpoint(
    folder: Path, dataset: Path, seed: int, extra: dict | None = None, **card_changes
) -> Path:
    card = {**load_card(dataset), **card_changes}
    vocab = None
    if card["modality"] == "text":
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(dataset / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    model = create_model("cnn", card["modality"], max(1, len(card["classes"])), vocab_size=vocab)
    save_model_dir(folder, model, card, dataset, metrics={}, extra=extra)
    return folder


def raw_samples(tar: Path) -> list[dict]:
    """A shard's samples as WebDataset dicts of bytes, read with plain tarfile."""
    samples: list[dict] = []
    with tarfile.open(tar) as t:
        for m in t:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = t.extractfile(m).read()
    return samples


def reference_embeddings(
    dataset: Path, model_dir: Path, max_tokens: int = 256
) -> dict[str, np.ndarray]:
    """forward_features in a plain loop: decode_sample + make_collate + load_model."""
    from featx.batching import make_collate
    from featx.checkpoint import load_model
    from featx.dataset import decode_sample

    model, meta = load_model(model_dir)
    tok = model_dir / meta["tokenizer"] if meta.get("tokenizer") else None
    collate = make_collate(meta["modality"], tokenizer_path=tok, max_tokens=max_tokens)
    out = {}
    for split in SPLITS:
        for tar in finished_shards(dataset, split):
            samples = [decode_sample(s) for s in raw_samples(tar)]
            for i in range(0, len(samples), 5):
                b = collate(samples[i : i + 5])
                with torch.inference_mode():
                    emb = model.forward_features(b["x"], b["lengths"]).numpy()
                out.update(zip(b["keys"], emb, strict=True))
    return out


def shard_keys(dataset: Path) -> dict[str, list[str]]:
    """'<split>/part-NNNNNN.parquet' -> the shard's keys in shard order."""
    return {
        f"{split}/part-{tar.name[6:12]}.parquet": [e["key"] for e in read_stats(tar)["entries"]]
        for split in SPLITS
        for tar in finished_shards(dataset, split)
    }


def visible_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def image_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    for i in range(90):
        make_image(root / "src" / f"c{i % 3}" / f"{i:03d}.png", seed=i, size=(24, 24))
    ingest(
        IngestConfig.parse(
            src=root / "src",
            out=root / "ds",
            shard_samples=12,
            image_size=24,
            val_fraction=0.25,
            workers=1,
        )
    )
    return root / "ds"


@pytest.fixture(scope="module")
def run_dir(image_ds, tmp_path_factory) -> Path:
    """A training RUN_DIR layout: the model directory is RUN_DIR/best."""
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best", image_ds, seed=0)
    return run


@pytest.fixture(scope="module", params=["ray", "local"])
def features(request, ray_cluster, image_ds, run_dir, tmp_path_factory):
    """Features of the image dataset, embedded by a Ray Data actor pool or in this process:
    every test of the output holds for both engines."""
    out = tmp_path_factory.mktemp(f"feat-{request.param}") / "features"
    cfg = dict(dataset=image_ds, checkpoint=run_dir, out=out, batch_size=8)
    summary = extract(ExtractConfig.parse(**cfg, engine=request.param))
    assert summary.engine == request.param
    return out, summary


# ---------------------------------------------------------------------------------------------
# validation before any work (no Ray)


def test_bad_options_are_all_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        ExtractConfig.parse(
            dataset=tmp_path, checkpoint=tmp_path, out=tmp_path / "o", batch_size=0, workers=0
        )
    assert {p.split(":")[0] for p in e.value.problems} == {"batch_size", "workers"}
    with pytest.raises(ConfigError) as e:
        extract(
            ExtractConfig.parse(
                dataset=tmp_path / "nope", checkpoint=tmp_path / "nothing", out=tmp_path / "out"
            )
        )
    msg = str(e.value)
    assert "featx ingest" in msg and "checkpoint" in msg
    assert not (tmp_path / "out").exists()  # nothing was created


def test_checkpoint_of_another_modality_is_refused(image_ds, tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn", "text", 3, vocab_size=100)
    save_model_dir(tmp_path / "text_model", model, load_card(image_ds), image_ds, metrics={})
    with pytest.raises(ConfigError, match="is a text model but .* holds image samples"):
        extract(
            ExtractConfig.parse(
                dataset=image_ds, checkpoint=tmp_path / "text_model", out=tmp_path / "out"
            )
        )


def test_a_folder_that_is_not_features_is_refused(image_ds, run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no featx features"):
        extract(ExtractConfig.parse(dataset=image_ds, checkpoint=run_dir, out=tmp_path / "out"))
    with pytest.raises(ConfigError, match="dataset folder"):
        extract(ExtractConfig.parse(dataset=image_ds, checkpoint=run_dir, out=image_ds))


def test_a_model_file_cut_short_is_refused_before_work(image_ds, tmp_path):
    model_dir = save_checkpoint(tmp_path / "model", image_ds, seed=0)
    weights = model_dir / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="model.pt does not match the sha256 in its featx.json"):
        extract(ExtractConfig.parse(dataset=image_ds, checkpoint=model_dir, out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# output


@pytest.mark.slow
def test_one_part_per_shard_with_schema_metadata_and_shard_order(features, image_ds, run_dir):
    out, summary = features
    card = load_card(image_ds)
    expected = shard_keys(image_ds)
    cur = current_dir(out)
    assert cur == out / "versions" / "000001" and summary.version == "000001"
    assert (out / "current").resolve() == cur.resolve()  # the link plain readers use
    parts = {str(p.relative_to(cur)) for p in in_splits(cur, "part-*.parquet")}
    assert parts == set(expected)
    assert summary.files_written == len(expected) and summary.rows == card_total(card)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["current"] == "000001" and manifest["versions"][0]["rows"] == summary.rows
    for name, keys in expected.items():
        f = pq.ParquetFile(cur / name)
        s = f.schema_arrow
        assert s.names == ["key", "split", "label", "label_name", "source", "embedding"]
        assert (s.field("key").type, s.field("label").type) == (pa.string(), pa.int32())
        assert s.field("embedding").type == pa.list_(pa.float32(), 64)
        meta = {k.decode(): v.decode() for k, v in f.metadata.metadata.items()}
        assert set(meta) >= META_KEYS
        assert meta["model_name"] == "cnn" and meta["modality"] == "image"
        assert meta["feature_dim"] == "64" and meta["preset"] == "small"
        assert meta["checkpoint_sha256"] == manifest["checkpoint_sha256"]
        assert meta["dataset_fingerprint"] == card["fingerprint"]
        assert meta["created_at"].endswith("+00:00")
        t = f.read()
        assert t["key"].to_pylist() == keys  # shard order
        assert set(t["split"].to_pylist()) == {name.split("/")[0]}
        labels, names = t["label"].to_pylist(), t["label_name"].to_pylist()
        assert all(card["class_names"][i] == n for i, n in zip(labels, names, strict=True))
        assert all(
            src.startswith(f"{n}/") for src, n in zip(t["source"].to_pylist(), names, strict=True)
        )


def card_total(card: dict) -> int:
    return sum(c["total"] for c in card["counts"].values())


@pytest.mark.slow
def test_embeddings_equal_a_plain_pytorch_loop(features, image_ds, run_dir):
    out, _ = features
    X, df = read_features(out)
    ref = reference_embeddings(image_ds, run_dir / "best")
    assert len(df) == len(ref) == df["key"].nunique()
    want = np.stack([ref[k] for k in df["key"]])
    np.testing.assert_allclose(X, want, atol=1e-5)


@pytest.mark.slow
def test_rerun_is_a_noop_and_the_cli_says_up_to_date(features, image_ds, run_dir):
    from typer.testing import CliRunner

    from featx.cli import app

    out, _ = features
    before = visible_files(out)
    again = extract(ExtractConfig.parse(dataset=image_ds, checkpoint=run_dir, out=out))
    assert again.up_to_date and again.files_written == 0 and again.rows == 0
    assert again.files_skipped == len(shard_keys(image_ds))
    r = CliRunner().invoke(
        app, ["extract", str(image_ds), "--checkpoint", str(run_dir), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "up to date" in r.output
    assert visible_files(out) == before  # nothing rewritten: same files, same mtimes


@pytest.mark.slow
def test_duckdb_polars_pandas_and_read_features_read_the_output(features, image_ds):
    import duckdb
    import pandas as pd
    import polars as pl

    import featx

    out, _ = features
    card = load_card(image_ds)
    n = card_total(card)
    glob = f"{out}/current/*/*.parquet"  # as the README gives it
    [(count, keys, dim)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT key), max(len(embedding)) FROM read_parquet('{glob}')"
    ).fetchall()
    assert (count, keys, dim) == (n, n, 64)
    per_split = dict(
        duckdb.sql(f"SELECT split, count(*) FROM read_parquet('{glob}') GROUP BY split").fetchall()
    )
    assert per_split == {s: c["total"] for s, c in card["counts"].items()}
    pl_df = pl.read_parquet(glob)
    assert pl_df.height == n and pl_df.schema["embedding"] == pl.Array(pl.Float32, 64)
    pd_df = pd.read_parquet(out / "current")  # pyarrow skips _featx_features.json
    assert len(pd_df) == n and len(pd_df["embedding"].iloc[0]) == 64
    X, df = featx.read_features(out)
    assert X.shape == (n, 64) and X.dtype == np.float32 and len(df) == n
    assert "embedding" not in df.columns
    Xv, dv = read_features(out, split="val")
    assert Xv.shape == (card["counts"]["val"]["total"], 64) and set(dv["split"]) == {"val"}
    one = next((out / "current").glob("train/part-*.parquet"))
    X1, _ = read_features(one)
    assert X1.shape == (pq.read_metadata(one).num_rows, 64)


@pytest.mark.slow
def test_another_checkpoint_is_a_new_version_beside_the_first(features, image_ds, tmp_path, caplog):
    src, _ = features
    out = tmp_path / "features"
    shutil.copytree(src, out, symlinks=True)
    v1 = visible_files(out / "versions" / "000001")
    other = save_checkpoint(tmp_path / "other", image_ds, seed=1, fingerprint="f" * 64)
    s = extract(ExtractConfig.parse(dataset=image_ds, checkpoint=other, out=out))
    assert s.version == "000002" and s.versions == ["000001", "000002"]
    assert s.files_written == len(shard_keys(image_ds)) and s.files_linked == 0
    assert any("trained on another dataset" in w for w in s.warnings)  # warned, not refused
    assert "trained on another dataset" in caplog.text
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model_dir"] == str(other.resolve()) and manifest["current"] == "000002"
    assert (out / "current").resolve() == (out / "versions" / "000002").resolve()
    X_old, df_old = read_features(src)
    X_new, df_new = read_features(out)
    assert X_new.shape == X_old.shape and not np.allclose(X_new, X_old)
    # The first version is still there, untouched, and readable on its own.
    assert visible_files(out / "versions" / "000001") == v1
    X_v1, _ = read_features(out / "versions" / "000001")
    np.testing.assert_array_equal(X_v1, X_old)
    # Back to the first model: a third version; with --keep-versions 2 the oldest goes.
    first = json.loads((src / MANIFEST).read_text())["model_dir"]
    s = extract(ExtractConfig.parse(dataset=image_ds, checkpoint=first, out=out, keep_versions=2))
    assert s.version == "000003" and s.versions == ["000002", "000003"]
    assert not (out / "versions" / "000001").exists()
    np.testing.assert_array_equal(read_features(out)[0], X_old)


@pytest.mark.slow
def test_new_shards_with_the_same_model_become_new_parts_only(
    features, image_ds, run_dir, tmp_path
):
    src_feat, _ = features
    ds, out = tmp_path / "ds", tmp_path / "features"
    shutil.copytree(image_ds, ds)
    shutil.copytree(image_ds.parent / "src", tmp_path / "src")
    shutil.copytree(src_feat, out, symlinks=True)
    for i in range(90, 120):  # new files arrive
        make_image(tmp_path / "src" / f"c{i % 3}" / f"{i:03d}.png", seed=i, size=(24, 24))
    args = dict(shard_samples=12, image_size=24, val_fraction=0.25, workers=1)
    grown = ingest(IngestConfig.parse(src=tmp_path / "src", out=ds, **args))
    assert grown.ingested == 30
    old_parts = {str(p.relative_to(current_dir(out))) for p in in_splits(current_dir(out), "*")}
    s = extract(ExtractConfig.parse(dataset=ds, checkpoint=run_dir, out=out))
    assert s.version == "000002" and s.rows == 30  # only the new samples went through the model
    assert s.files_linked == len(old_parts) and s.files_written == grown.shards_written
    v1, v2 = out / "versions" / "000001", out / "versions" / "000002"
    for rel in old_parts:  # the same bytes, not a copy
        assert (v1 / rel).stat().st_ino == (v2 / rel).stat().st_ino
    X, df = read_features(out)
    keys = [k for ks in shard_keys(ds).values() for k in ks]
    assert sorted(df["key"]) == sorted(keys) and df["key"].is_unique
    ref = reference_embeddings(ds, run_dir / "best")
    np.testing.assert_allclose(X, np.stack([ref[k] for k in df["key"]]), atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_sample_exactly_once(
    ray_cluster, image_ds, run_dir, tmp_path
):
    out = tmp_path / "features"
    expected = shard_keys(image_ds)
    cmd = [
        *FEATX,
        "extract",
        str(image_ds),
        "--checkpoint",
        str(run_dir),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--ray-address",
        ray_cluster,
    ]
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    building = out / "versions" / "000001"  # the first version, until it is complete
    while not list(in_splits(building, "part-*.parquet")):
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no part file appeared within 120 s"
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0.0, 0.3))  # a seeded "random moment" after that
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    # Whatever the moment, every visible part is whole.
    for p in in_splits(building, "part-*.parquet"):
        rel = str(p.relative_to(building))
        assert pq.read_table(p)["key"].to_pylist() == expected[rel]
    killed_with = len(list(in_splits(building, "part-*.parquet")))
    s = extract(ExtractConfig.parse(dataset=image_ds, checkpoint=run_dir, out=out))
    assert s.files_skipped == killed_with and s.files_written == len(expected) - killed_with
    _, df = read_features(out)
    all_keys = [k for keys in expected.values() for k in keys]
    assert sorted(df["key"]) == sorted(all_keys) and df["key"].is_unique
    hidden = [p.name for p in out.rglob(".*") if p.name != ".lock"]
    assert hidden == []


@pytest.mark.slow
def test_unlabelled_text_gives_null_labels_and_matches_a_plain_loop(ray_cluster, tmp_path):
    for i in range(30):
        make_text(tmp_path / "src" / f"doc{i:02d}.txt", seed=i)
    ds = tmp_path / "ds"
    ingest(
        IngestConfig.parse(
            src=tmp_path / "src", out=ds, shard_samples=10, vocab_size=100, workers=1
        )
    )
    # trained with --max-tokens 8: extraction cuts the texts where training did
    model_dir = save_checkpoint(tmp_path / "model", ds, seed=0, extra={"max_tokens": 8})
    s = extract(
        ExtractConfig.parse(
            dataset=ds,
            checkpoint=model_dir,
            out=tmp_path / "features",
            batch_size=4,
            workers=2,
            engine="ray",
        )
    )
    assert s.rows == 30
    X, df = read_features(tmp_path / "features")
    assert df["label"].isna().all() and df["label_name"].isna().all()
    assert df["source"].str.endswith(".txt").all()
    ref = reference_embeddings(ds, model_dir, max_tokens=8)
    np.testing.assert_allclose(X, np.stack([ref[k] for k in df["key"]]), atol=1e-5)
    uncut = reference_embeddings(ds, model_dir, max_tokens=256)
    assert not np.allclose(X, np.stack([uncut[k] for k in df["key"]]), atol=1e-3)
