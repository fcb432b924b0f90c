"""Embed one shard: read it, decode, batch, run the model, and return its finished Parquet part.

The shard is extraction's unit of work end to end (as in img2dataset): one call reads one shard
in order, checks that it made one row per sample of the shard's stats, in the stats' order, and
hands back the part's bytes. The same `ShardEmbedder` runs in a Ray Data actor or in the calling
process; either way the driver only writes whole parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import storage
from featx.batching import batched
from featx.checkpoint import MODEL_FILE
from featx.dataset import decode_sample, read_stats, shard_samples
from featx.features import encode_part, make_table


@dataclass(frozen=True)
class ShardTask:
    """One shard to embed, and where its part goes."""

    split: str
    tar: str  # local path or URI of the shard
    part: str  # the part's path, relative to FEATURES_DIR
    samples: int
    sha256: str

    @property
    def id(self) -> str:  # split/shard-NNNNNN.tar, as in the dataset card
        return f"{self.split}/{storage.name(self.tar)}"


class ShardEmbedder:
    """Loads the model once, then turns shards into Parquet parts (`embed`).

    As a Ray Data actor (`map_batches(ShardEmbedder, ...)`) it takes batches of shard tasks and
    returns one row per shard: its id, its row count, the part's bytes and the node it ran on.
    """

    def __init__(
        self,
        model_dir: str,
        sha: str,
        *,
        stamp: dict[str, str],
        class_names: list[str],
        batch_size: int = 64,
        device: str = "cpu",
        threads: int | None = None,
        loaded: tuple | None = None,
    ) -> None:
        import torch

        from featx.batching import make_collate
        from featx.checkpoint import load_model

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        # `loaded`: the (model, meta) the caller already loaded and hashed (one load a process).
        self.model, meta = loaded or load_model(storage.location(model_dir), device=device)
        if meta["checkpoint_sha256"] != sha:
            raise RuntimeError(
                f"{model_dir}/{MODEL_FILE} changed while extraction started; run again"
            )
        tokenizer = Path(meta["model_dir"]) / meta["tokenizer"] if meta.get("tokenizer") else None
        # Text is cut where training cut it (models written before featx recorded it: 256).
        self.collate = make_collate(
            meta["modality"],
            tokenizer_path=tokenizer,
            max_tokens=meta.get("max_tokens", 256),
            augment=False,
        )
        self.batch_size = batch_size
        self.stamp = stamp
        self.class_names = class_names

    def embed(self, task: ShardTask) -> bytes:
        """The finished Parquet part of `task`'s shard (every sample once, in shard order)."""
        tar = storage.location(task.tar)
        keys, labels, sources, chunks = [], [], [], []
        # Decoding and the model take turns: a decoding thread beside the model measured no
        # faster on 2 cores (the model's threads already use them), and a pool of actors
        # overlaps them anyway.
        for raws in batched(shard_samples(tar), self.batch_size):
            batch = self._decoded(raws, task)
            x = batch["x"].to(self.device)
            lengths = None if batch["lengths"] is None else batch["lengths"].to(self.device)
            with self.torch.inference_mode():
                chunks.append(self.model.forward_features(x, lengths).float().cpu().numpy())
            keys += batch["keys"]
            labels += batch["labels_or_none"]
            sources += batch["sources"]
        expected = [e["key"] for e in read_stats(tar)["entries"]]
        if keys != expected:
            raise RuntimeError(
                f"{task.id}: read {len(keys)} samples that do not match the {len(expected)} of "
                "its stats (order or keys differ); the shard is damaged: re-run `featx ingest`"
            )
        dim = int(self.stamp["feature_dim"])
        table = make_table(
            keys=keys,
            split=task.split,
            labels=labels,
            label_names=[None if v is None else self.class_names[v] for v in labels],
            sources=sources,
            embeddings=np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32),
            metadata={**self.stamp, "shard": task.id, "shard_sha256": task.sha256},
        )
        return encode_part(table)

    def _decoded(self, raws: list[dict], task: ShardTask) -> dict:
        samples = []
        for raw in raws:
            try:
                samples.append(decode_sample(raw))
            except Exception as e:
                # Ingest validated every sample, so this is a damaged shard, not bad input.
                raise ValueError(
                    f"cannot decode sample {raw.get('__key__')!r} of {task.id}: {e}; the shard "
                    "is damaged: re-run `featx ingest --overwrite`"
                ) from e
        batch = self.collate(samples)
        batch["labels_or_none"] = [s["cls"] for s in samples]
        batch["sources"] = [s["meta"].get("source") for s in samples]
        return batch

    def __call__(self, tasks: dict) -> dict:
        """Ray Data: a batch of shard tasks (columns of ShardTask) -> one row per shard."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        fields = ("split", "tar", "part", "samples", "sha256")
        out: dict[str, list] = {"shard": [], "part": [], "rows": [], "data": [], "node": []}
        for i in range(len(tasks["tar"])):
            task = ShardTask(**{f: _plain(tasks[f][i]) for f in fields})
            out["shard"].append(task.id)
            out["part"].append(task.part)
            out["rows"].append(task.samples)
            out["data"].append(self.embed(task))
            out["node"].append(node)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def embed_files(features, files: list, *, batch_size: int = 64) -> np.ndarray:
    """Feature vectors of new raw files, made as `features` were: each file is normalised with
    the dataset's ingest settings (recorded in the model directory) and embedded by the model
    the features came from. A file ingest would reject raises ValueError with its reason."""
    import torch

    from featx.batching import make_collate
    from featx.checkpoint import load_model
    from featx.features import read_manifest
    from featx.normalize import Params, Rejected, process

    manifest = read_manifest(features)
    if manifest is None:
        raise FileNotFoundError(f"No features manifest in {features}")
    model_dir = storage.location(manifest["model_dir"])
    if storage.is_uri(model_dir):
        model_dir = storage.local_copy(model_dir)
    model, meta = load_model(Path(model_dir))
    norm = meta.get("normalisation") or {}
    params = Params.of(**{k: v for k, v in norm.items() if k in Params.__dataclass_fields__})
    tokenizer = Path(meta["model_dir"]) / meta["tokenizer"] if meta.get("tokenizer") else None
    collate = make_collate(
        meta["modality"],
        tokenizer_path=tokenizer,
        max_tokens=meta.get("max_tokens", 256),
        augment=False,
    )
    samples = []
    for i, f in enumerate(files):
        res = process(str(f), None, meta["modality"], params)
        if isinstance(res, Rejected):
            raise ValueError(f"{f}: ingest would reject it: {res.reason} ({res.detail})")
        samples.append(decode_sample({"__key__": f"file{i}", res.ext: res.payload}))
    chunks = []
    for batch in batched(samples, batch_size):
        b = collate(batch)
        with torch.inference_mode():
            chunks.append(model.forward_features(b["x"], b["lengths"]).float().numpy())
    return np.concatenate(chunks)
