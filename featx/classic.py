"""Classic features of a dataset's samples: the baseline learned features must beat.

Downscaled raw pixels, tf-idf word n-grams, log-mel band statistics: no training, cheap, and
often hard to beat on small data. The shards are streamed sample by sample and only the
feature rows are kept; rows are keyed by sample key, so a caller aligns them by key.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from featx import storage

log = logging.getLogger(__name__)

IMAGE_SIDE = 16
N_MELS = 40
KINDS = {
    "image": f"raw pixels {IMAGE_SIDE}x{IMAGE_SIDE}",
    "text": "tf-idf word 1-2 grams",
    "audio": f"log-mel {N_MELS}-band mean+std",
}


@dataclass
class ClassicFeatures:
    """One row per sample: `X[i]` belongs to `keys[i]`; X is a scipy sparse matrix for text."""

    kind: str  # what the rows are, e.g. "raw pixels 16x16" (one of KINDS' values)
    keys: list[str]
    X: object  # np.ndarray (N, D) float32, or scipy.sparse.csr_matrix for tf-idf

    def take(self, keys: Iterable[str]):
        """The rows of `keys`, in that order; a key the dataset does not hold is an error."""
        index = {k: i for i, k in enumerate(self.keys)}
        keys = list(keys)
        missing = [k for k in keys if k not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} feature row(s) have no sample in the dataset (first: "
                f"{missing[:3]}): the features come from another dataset or an older ingest; "
                "pass the dataset they were extracted from (--dataset) or extract again"
            )
        return self.X[np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))]


def pixels(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) -> its 16x16 bilinear thumbnail in [0, 1], flattened."""
    from PIL import Image

    small = (
        Image.fromarray(image)
        .convert("RGB")
        .resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
    )
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(-1)


def log_mel_stats(wave: np.ndarray, logmel) -> np.ndarray:
    """A mono clip -> per mel band, the mean and the std of its log-mel frames (2 x n_mels)."""
    import torch

    with torch.inference_mode():
        frames = logmel(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None])[0]
        # correction=0: a clip of one frame has a std (of zero), not NaN
        stats = torch.cat([frames.mean(0), frames.std(0, correction=0)])
    return stats.numpy().astype(np.float32)


def tfidf(train_texts: Iterable[str]):
    """Fit tf-idf on `train_texts` (streamed once): `(vectorizer, their sparse rows)`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    return vectorizer, vectorizer.fit_transform(train_texts)


def classic_features(
    dataset, card: dict | None = None, progress: Callable[[int, int], None] | None = None
) -> ClassicFeatures:
    """The classic features of every sample of `dataset` (a folder or an object-store URI).

    `card` is its dataset card (read if not given); `progress(done, total)` is called as
    samples are read. Text's tf-idf is fitted on the train split only, then applied to the rest.
    """
    from featx.dataset import load_card

    t0 = time.perf_counter()
    card = card or load_card(dataset)
    modality = card["modality"]
    if modality not in KINDS:
        raise ValueError(f"no classic features for modality {modality!r}; known: {list(KINDS)}")
    shards = [(s["split"], storage.join(dataset, s["shard"])) for s in card["shards"]]
    total = sum(s["samples"] for s in card["shards"])
    log.info(
        "classic features (%s) of %d samples in %s",
        KINDS[modality],
        total,
        storage.display(dataset),
    )
    keys: list[str] = []

    def samples(urls) -> Iterator[dict]:
        for s in _samples(urls):
            keys.append(s["__key__"])
            if progress:
                progress(len(keys), total)
            yield s

    if modality == "text":
        from scipy import sparse

        train = [u for split, u in shards if split == "train"]
        vectorizer, X = tfidf(s["text"] for s in samples(train))
        # One shard's texts at a time: transform needs a list, not the whole dataset's.
        rest = [
            vectorizer.transform([s["text"] for s in samples([u])])
            for split, u in shards
            if split != "train"
        ]
        X = sparse.vstack([X, *rest], format="csr")
    else:
        if modality == "image":
            row = pixels
        else:
            from featx.models.audio import LogMel

            logmel = LogMel(sample_rate=card["normalisation"]["sample_rate"], n_mels=N_MELS)
            row = functools.partial(log_mel_stats, logmel=logmel)
        payload = "image" if modality == "image" else "audio"
        rows = [row(s[payload]) for s in samples([u for _, u in shards])]
        X = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
    log.info("classic features: %d rows in %.1f s", len(keys), time.perf_counter() - t0)
    return ClassicFeatures(KINDS[modality], keys, X)


def _samples(urls) -> Iterator[dict]:
    """Decoded samples of the shards at `urls`, in order, one shard open at a time."""
    import webdataset as wds

    from featx.dataset import decode_sample

    for url in urls:
        with storage.open_input(url) as stream:
            members = wds.tariterators.tar_file_expander([{"url": str(url), "stream": stream}])
            for s in wds.tariterators.group_by_keys(members):
                raw = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                try:
                    sample = decode_sample(raw)
                except Exception as e:
                    # Ingest validated every sample, so this is a damaged shard, not bad input.
                    raise ValueError(
                        f"cannot decode sample {s['__key__']!r} of {storage.display(url)}: {e}; "
                        "the shard is damaged: re-run `featx ingest --overwrite`"
                    ) from e
                yield sample
