"""The training recipe's pure parts: optimiser groups, learning-rate schedule, early stopping.

Plain functions of the model and the epoch history, so they run (and are tested) without Ray
or a process group; `featx.train_loop` calls them inside each Ray Train worker.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# Token embeddings learn at this multiple of the peak learning rate, without weight decay. An
# embedding row is updated only by the batches that hold its token, and at N(0, 1) scale an
# Adam step of the matrices' rate barely moves it: on real text corpora the trained features
# stayed far below tf-idf. 30x (nanochat's embeddings, too, learn tens of times faster than
# its matrices) lifted the probe by 5-8 points for every family; 10x gave about half of that.
EMBEDDING_LR_SCALE = 30.0


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases and norms do not; embeddings learn faster."""
    decay, no_decay, embeddings = [], [], []
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        if id(p) in embedding_params:
            embeddings.append(p)
        elif p.ndim < 2 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if embeddings:
        groups.append({"params": embeddings, "weight_decay": 0.0, "lr": lr * EMBEDDING_LR_SCALE})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, lr, weight_decay), lr=lr)


def warmup_cosine(total_steps: int, warmup: float, floor: float = 0.1):
    """Multiplier of the peak rate at each step: linear warm-up over `warmup` of the steps,
    then a cosine down to `floor`."""
    warm = max(1, int(warmup * total_steps))

    def at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return at


def best_epoch(history: list[dict], metric: str = "val_loss") -> int | None:
    """The 1-based epoch with the lowest `metric` (the first of ties); None without it."""
    scored = [(h[metric], h["epoch"]) for h in history if h.get(metric) is not None]
    return min(scored)[1] if scored else None


def should_stop(
    history: list[dict], patience: int, metric: str = "val_loss", min_epochs: int = 0
) -> bool:
    """Early stopping: `patience` epochs have passed without a new best `metric`, and at least
    `min_epochs` have run (`earliest_stop`).

    0 turns it off, and so does a history without the metric (no val split): the run then
    trains every epoch it was given.
    """
    if patience <= 0 or not history or history[-1]["epoch"] < min_epochs:
        return False
    best = best_epoch(history, metric)
    return best is not None and history[-1]["epoch"] - best >= patience


def earliest_stop(objective: str, epochs: int) -> int:
    """The first epoch early stopping may end a run at. A contrastive val loss is a noisy
    proxy (one batch of fixed views on a small val split), and it stopped runs while the
    schedule was still near its peak rate: on spoken digits the cnn's contrastive features
    probed 0.854 stopped at epoch 24 of 100, 0.944 trained to the end (supervised: 0.978).
    So contrastive runs train at least half their epochs; supervised ones may stop at once."""
    return epochs // 2 if objective != "supervised" else 0


# Small datasets need small batches: what a model learns depends on the optimizer steps it
# takes, and 224 images at a global batch of 64 are 4 steps an epoch. On the sample images a
# CNN reached 0.46 in 80 steps (batch 64) and 0.93-0.99 in 560-1120 (batch 8); on 1,400 real
# digits batch 32 per worker loses nothing. So the per-worker batch aims at MIN_STEPS_PER_EPOCH
# steps an epoch, between MIN_BATCH (BatchNorm's statistics need a few samples per rank) and
# MAX_BATCH, and the run gets enough epochs for MIN_STEPS optimizer steps.
MIN_BATCH, MAX_BATCH = 8, 32
MIN_STEPS_PER_EPOCH = 32
MIN_EPOCHS, MIN_STEPS, MAX_AUTO_EPOCHS = 20, 500, 100


# A contrastive loss takes its negatives from the batch: every worker's batch of 32 (64 views)
# is the floor, whatever the dataset's size.
CONTRASTIVE_MIN_BATCH, CONTRASTIVE_MAX_BATCH = 32, 128
# and it learns more slowly than a supervised loss: on Debian descriptions (1,577 train texts,
# 25 steps an epoch) allowing 100 epochs instead of 20 lifted the contrastive features' probe
# from 0.340 / 0.438 / 0.457 to 0.366 / 0.471 / 0.515 (cnn / rnn / attention; runs stopped at
# 50-64 epochs). So a contrastive run gets enough epochs for CONTRASTIVE_MIN_STEPS steps.
CONTRASTIVE_MIN_STEPS = 2500


def auto_batch_size(n_train: int, workers: int, contrastive: bool = False) -> int:
    """The per-worker batch size `featx train` uses when none is given."""
    low, high = (
        (CONTRASTIVE_MIN_BATCH, CONTRASTIVE_MAX_BATCH) if contrastive else (MIN_BATCH, MAX_BATCH)
    )
    return max(low, min(high, n_train // (workers * MIN_STEPS_PER_EPOCH)))


def auto_epochs(n_train: int, workers: int, batch_size: int, contrastive: bool = False) -> int:
    """The most epochs `featx train` runs when none is given (early stopping ends sooner)."""
    steps = max(1, math.ceil(n_train / (workers * batch_size)))
    least = CONTRASTIVE_MIN_STEPS if contrastive else MIN_STEPS
    return max(MIN_EPOCHS, min(MAX_AUTO_EPOCHS, math.ceil(least / steps)))


# Contrastive text models start their token embeddings from an LSA of the train split (`featx
# train --text-init`). Contrastive features, cnn / rnn / attention: Debian descriptions 0.499 /
# 0.487 / 0.590 from N(0, 1), 0.636 / 0.576 / 0.646 from LSA; docstrings 0.447 / 0.436 / 0.444
# and 0.483 / 0.475 / 0.442. Supervised runs gained nothing from it (-3.4 to +2.1 points on the
# same corpora), so they start from N(0, 1). The first LSA_MAX_TEXTS texts are enough for it.
LSA_MAX_TEXTS = 200_000
# The token bag (`fit_token_bag`) is an SVD to 1,024 components: its first BAG_MAX_TEXTS texts.
BAG_MAX_TEXTS = 50_000


def lsa_embeddings(docs, vocab_size: int, dim: int, seed: int = 0) -> torch.Tensor | None:
    """Token embeddings (vocab_size, dim) from latent semantic analysis of the train split:
    the top `dim` right singular vectors of its tf-idf matrix, scaled by their singular values,
    then to an RMS of 1 (`nn.Embedding`'s N(0, 1) scale). Tokens the split never holds get
    zeros. `docs` yields each text's token ids (padding excluded). None when the split is too
    small for even one component.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    counts = bag_counts(list(docs), vocab_size, np.arange(vocab_size))  # the tokens alone
    k = min(dim, counts.shape[0] - 1, vocab_size - 1)
    if k < 1:
        return None
    tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(counts)
    svd = TruncatedSVD(k, random_state=seed).fit(tfidf)
    emb = np.zeros((vocab_size, dim), dtype=np.float32)
    emb[:, :k] = svd.components_.T * svd.singular_values_
    seen = np.asarray((counts > 0).sum(axis=0)).ravel() > 0
    rms = np.sqrt((emb[seen] ** 2).sum(axis=1).mean() / dim) if seen.any() else 0.0
    if rms > 0:
        emb /= rms
    emb[~seen] = 0.0
    return torch.from_numpy(emb)


def fit_token_bag(
    docs, vocab_size: int, dim: int, columns: int, seed: int = 0
) -> dict[str, torch.Tensor] | None:
    """The fitted part of a contrastive text feature (`featx.models.stems.TokenBag`): latent
    semantic analysis of the train split's bag of tokens and adjacent token pairs.

    Columns: the `columns` tokens and pairs held by the most texts (ties by key). scikit-learn's
    `TfidfTransformer(sublinear_tf=True)`, then a `TruncatedSVD` to `dim` components (fewer
    when the split is small; the rest stay zero), scaled so that the train texts' features
    have an RMS of 1. `docs` yields each text's token ids (padding excluded). Returns the
    tensors `TokenBag` holds (`keys`, `idf`, `proj`), or None when the split is too small.
    """
    from collections import Counter

    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    docs = [np.asarray(d, dtype=np.int64) for d in docs]
    df = Counter()
    for d in docs:
        df.update(np.unique(bag_keys(d, vocab_size)).tolist())
    top = sorted(df, key=lambda key: (-df[key], key))[:columns]
    keys = np.arange(columns, dtype=np.int64) + vocab_size * (vocab_size + 1)  # past every key
    keys[: len(top)] = np.sort(top)
    counts = bag_counts(docs, vocab_size, keys)
    k = min(dim, counts.shape[0] - 1, len(top) - 1)
    if k < 1:
        return None
    tfidf = TfidfTransformer(sublinear_tf=True)
    x = tfidf.fit_transform(counts)
    svd = TruncatedSVD(k, random_state=seed).fit(x)
    proj = np.zeros((columns, dim), dtype=np.float32)
    proj[:, :k] = svd.components_.T
    rms = np.sqrt(np.mean(np.square(x[:10_000] @ proj)))
    if rms > 0:
        proj /= rms
    return {
        "keys": torch.from_numpy(keys),
        "idf": torch.from_numpy(tfidf.idf_.astype(np.float32)),
        "proj": torch.from_numpy(proj),
    }


def bag_keys(ids, vocab_size: int):
    """A text's token ids, then its adjacent pairs as `vocab_size + a * vocab_size + b`."""
    return np.concatenate([ids, vocab_size + ids[:-1] * vocab_size + ids[1:]])


def bag_counts(docs, vocab_size: int, keys):
    """Sparse (texts, len(keys)) counts of the `keys` (sorted) in each text's tokens and pairs."""
    import scipy.sparse as sp

    rows, cols = [], []
    for row, d in enumerate(docs):
        found = bag_keys(np.asarray(d, dtype=np.int64), vocab_size)
        column = np.searchsorted(keys, found)
        hit = column < len(keys)
        hit[hit] = keys[column[hit]] == found[hit]
        rows.append(np.full(int(hit.sum()), row))
        cols.append(column[hit])
    row, col = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (rows, cols))
    return sp.csr_matrix((np.ones(len(row)), (row, col)), shape=(len(docs), len(keys)))
