"""Names of the dataset format: files, splits, payload extensions, sample keys and splits."""

from __future__ import annotations

import hashlib

from featx.storage import is_uri

CARD = "dataset.json"
REJECTED = "rejected.jsonl"
TOKENIZER = "tokenizer.json"
FORMAT = "featx-shards/1"
SPLITS = ("train", "val", "test")
PAYLOADS = {"jpg": "image", "png": "image", "flac": "audio", "txt": "text"}  # ext -> modality


def payload_ext(modality: str, image_format: str) -> str:
    """The member extension a sample's payload is stored under."""
    return {"image": image_format, "audio": "flac", "text": "txt"}[modality]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def stats_path(tar):
    if is_uri(tar):
        return tar[: -len(".tar")] + "_stats.json"
    return tar.with_name(tar.name[: -len(".tar")] + "_stats.json")


def sample_key(sha256: str, source: str) -> str:
    """Stable key from content and relative path; no dots or slashes (WebDataset splits on them)."""
    return f"{sha256[:20]}_{hashlib.blake2b(source.encode(), digest_size=4).hexdigest()}"


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the key: the same on every run and machine."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"
