"""The features format: versions of one Parquet part per input shard, manifests, and
`read_features`.

    FEATURES_DIR/
      _featx_features.json              the current version's manifest, + "current", "versions"
      current -> versions/000003        a link to the current version (local folders)
      versions/000003/_featx_features.json
      versions/000003/<split>/part-NNNNNN.parquet   the rows of <split>/shard-NNNNNN.tar

Every version is complete and from one model; the pointer (the root manifest, and the link)
switches when a new one is. Plain Arrow/Parquet, so pandas, DuckDB, Polars, Spark and
scikit-learn read `FEATURES_DIR/current` without featx or Ray. This module owns the names, the
schema and the reader; `featx.extract` and `featx.feature_versions` write them.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featx import storage
from featx.dataset import SPLITS
from featx.fsutil import atomic_write_bytes

MANIFEST = "_featx_features.json"
FORMAT = "featx-features/2"  # /1: the parts at FEATURES_DIR/<split>/, no versions
VERSIONS = "versions"
CURRENT = "current"
BASELINE_DIR = "_baseline"  # probe's random-init features; "_" keeps it out of dataset scans
# Parquet key-value metadata written on every part (values are strings).
META_KEYS = (
    "featx_version",
    "model_name",
    "preset",
    "modality",
    "feature_dim",
    "checkpoint_sha256",
    "dataset_fingerprint",
    "created_at",
    "shard",
    "shard_sha256",
)

_SHARD = re.compile(r"shard-(\d+)\.tar$")
_PART = re.compile(r"part-(\d+)\.parquet$")


def part_name(shard: str | Path) -> str:
    """`shard-000003.tar` -> `part-000003.parquet`: one part per input shard."""
    m = _SHARD.search(Path(shard).name)
    if m is None:
        raise ValueError(f"{shard} is not a featx shard name (shard-NNNNNN.tar)")
    return f"part-{m.group(1)}.parquet"


def schema(feature_dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The schema of every part: one row per sample, the embedding as a fixed-size list."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("label", pa.int32()),  # null when the dataset is unlabelled
            pa.field("label_name", pa.string()),
            pa.field("source", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), feature_dim), nullable=False),
        ],
        metadata=metadata,
    )


def make_table(
    keys: list[str],
    split: str,
    labels: list[int | None],
    label_names: list[str | None],
    sources: list[str | None],
    embeddings: np.ndarray,
    metadata: dict[str, str],
) -> pa.Table:
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = emb.shape
    columns = [
        pa.array(keys, pa.string()),
        pa.array([split] * n, pa.string()),
        pa.array(labels, pa.int32()),
        pa.array(label_names, pa.string()),
        pa.array(sources, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    ]
    return pa.Table.from_arrays(columns, schema=schema(dim, metadata))


def encode_part(table: pa.Table) -> bytes:
    """A part's Parquet bytes. A part is at most one shard's rows (about a megabyte), so it is
    built in memory where the rows are made, and written whole by `write_part`."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_part(path: Path, part: pa.Table | bytes) -> None:
    """Write a part (a table, or `encode_part`'s bytes) atomically: a hidden temporary in the
    same folder, fsync, rename; a reader never sees a partial file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, part if isinstance(part, bytes) else encode_part(part))


def part_metadata(path: Path) -> dict[str, str]:
    """The featx key-value metadata of a part (reads the footer only)."""
    raw = pq.read_metadata(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.decode() in META_KEYS}


def read_manifest(features_dir: Path) -> dict | None:
    """The manifest of a features folder (the current version's, with "current" and
    "versions") or of one version folder; None when there is none."""
    path = Path(features_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def current_dir(features_dir: Path) -> Path:
    """The folder holding the current version's parts: FEATURES_DIR/versions/<current>, or the
    folder itself when it is one version (or written by a featx before versions)."""
    manifest = read_manifest(features_dir)
    if manifest and manifest.get("current"):
        return Path(features_dir) / VERSIONS / manifest["current"]
    return Path(features_dir)


def part_files(features_dir: Path, split: str | None = None) -> list[Path]:
    """Finished parts, split by split (train, val, test) and by shard index within a split."""
    root = Path(features_dir)
    splits = SPLITS if split is None else (split,)
    return [p for s in splits for p in sorted((root / s).glob("part-*.parquet"))]


def read_features(path: str | Path, split: str | None = None):
    """Read extracted features: `(X, df)`, X a float32 (N, D) matrix, df the other columns.

    `path` is a features folder written by `featx extract` (its current version is read), one
    of its `versions/NNNNNN` folders, or one part file; `split` keeps one split. Rows come
    split by split, shard by shard, in shard order, so `X[i]` is `df.iloc[i]`.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if storage.is_uri(path):
        return _to_numpy(_read_store(path, split))
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        path = current_dir(path)
        files = part_files(path, split)
        if not files:
            found = [s for s in SPLITS if part_files(path, s)]
            if found:
                raise ValueError(f"no {split!r} rows in {path}; it holds the splits {found}")
            raise FileNotFoundError(
                f"No features in {path}: did you run `featx extract DATASET --checkpoint RUN_DIR"
                f" --out {path}`?"
            )
    else:
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by featx extract")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    if split is not None and path.is_file():
        table = table.filter(pc.equal(table["split"], split))
    return _to_numpy(table)


def _read_store(uri: str, split: str | None) -> pa.Table:
    """The parts under an object-store URI (a features folder, or one part)."""
    fs, root = storage.filesystem(uri)
    if uri.endswith(".parquet"):
        table = pq.read_table(root, filesystem=fs)
        return table.filter(pc.equal(table["split"], split)) if split else table
    try:
        current = json.loads(storage.read_text(storage.join(uri, MANIFEST))).get("current")
    except FileNotFoundError:
        current = None
    if current:
        uri = storage.join(uri, VERSIONS, current)
    splits = SPLITS if split is None else (split,)
    files = [p for s in splits for p in storage.listdir(storage.join(uri, s), "part-*.parquet")]
    if not files:
        raise FileNotFoundError(
            f"No features in {storage.display(uri)}: did you run `featx extract DATASET"
            f" --checkpoint RUN_DIR --out {storage.display(uri)}`?"
        )
    return pa.concat_tables([pq.read_table(storage.filesystem(f)[1], filesystem=fs) for f in files])


def _to_numpy(table: pa.Table):
    emb = table["embedding"].combine_chunks()
    dim = emb.type.list_size
    # flatten() honours slicing offsets; every embedding is non-null by the schema
    X = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    X = X.reshape(len(table), dim)
    # label as pandas' nullable Int32: stays an integer column when some labels are missing
    df = table.drop_columns(["embedding"]).to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    return X, df


def write_manifest(features_dir: Path, manifest: dict) -> None:
    atomic_write_bytes(
        Path(features_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode()
    )
