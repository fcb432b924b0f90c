"""Self-supervised training: two views of each sample, a projection head, and an NT-Xent loss
whose negatives are every rank's samples (SimCLR), or, with labels, supervised contrastive.

`ContrastiveNet` wraps a feature model with the projection head that only training uses:
`featx.json` and `model.pt` hold the feature model alone, so extraction, probing and versions
treat a contrastive model exactly as a supervised one. The loss and the label-free monitors are
plain functions of tensors, tested without Ray (and against a 2-rank process group).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PROJECTION_DIM = 128
KNN_K = 10


class ContrastiveNet(nn.Module):
    """features -> MLP projection head (Linear, BatchNorm, ReLU, Linear): SimCLR's head. The
    loss is computed on the head's output; the features before it transfer better."""

    def __init__(self, model: nn.Module, out_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        # The loss shapes what training learns; the fitted token bag (text) takes no part.
        d = model.trained_dim
        # The feature model's classifier head takes no part (and DDP would wait for its
        # gradients); it stays in model.pt so the model directory loads like any other.
        model.head.requires_grad_(False)
        self.model = model
        self.projector = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, out_dim)
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.projector(self.model.forward_features(x, lengths, bag=False))


class _Gather(torch.autograd.Function):
    """all_gather with a backward: each rank gets the gradient of its own rows, summed over
    every rank's loss (the gathered gradient all-reduced, then this rank's slice).

    Plain `dist.all_gather_single` and `dist.all_reduce`, which gloo and NCCL both run
    synchronously. torch's functional collective (`all_gather_tensor_autograd`) corrupted the
    heap of gloo ranks: "free(): invalid pointer" or "malloc(): unaligned tcache chunk" within
    5,000-16,000 steps, outside Ray too (`tests/benchmarks/stress_gather.py`); and
    `torch.distributed.nn.functional.all_gather` is deprecated.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = z.new_empty((world * z.shape[0], *z.shape[1:]))
        # torch 2.13 renamed all_gather_into_tensor (now a deprecated alias of the same call)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, z.contiguous())
        ctx.rows = z.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce sums in place: on a copy, never on a buffer autograd may still hold
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather(z: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `z`, concatenated in rank order, with gradients flowing back to each
    rank's own rows; `z` alone without a process group. Every rank must pass the same shape."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _Gather.apply(z)


def pad_views(z: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """(2n, D) rows [view 1 of n samples; view 2 of them] -> (2 size, D), each view zero-padded
    to `size` rows, so every rank gathers one shape whatever its batch."""
    pad = z.new_zeros(size - n, z.shape[1])
    return torch.cat([z[:n], pad, z[n:], pad], 0)


def nt_xent(
    z: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    gather_fn=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrastive loss of this rank's anchors against every rank's samples.

    `z` (2 size, D) holds this rank's padded views (`pad_views`): row i's positive is row
    i + size (and back); `valid` (2 size,) marks real rows. With `labels` (2 size,) every row
    of the same label is a positive too (supervised contrastive, SupCon's L_out). `gather_fn`
    (default `gather`: every rank's rows) collects the candidates.

    Returns (loss to backpropagate, this rank's summed anchor loss, anchors, anchors whose
    nearest candidate is their other view). The loss to backpropagate is scaled so that DDP's
    mean of the ranks' gradients is the gradient of the mean over all ranks' anchors: the same
    as one process with the whole global batch.
    """
    gather_fn = gather_fn or gather
    z = F.normalize(z.float(), dim=1)
    rows, size = z.shape[0], z.shape[0] // 2
    every_z = gather_fn(z)
    every_valid = gather_fn(valid.float().unsqueeze(1)).squeeze(1) > 0
    world = every_z.shape[0] // rows
    rank = dist.get_rank() if world > 1 else 0
    local = torch.arange(rows, device=z.device)
    own = local + rank * rows  # global index of each local row
    partner = own + torch.where(local < size, size, -size)
    logits = z @ every_z.T / temperature
    logits = logits.masked_fill(~every_valid[None, :], float("-inf"))
    logits[local, own] = float("-inf")  # never its own candidate
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    if labels is None:
        anchor_loss = -log_prob[local, partner]
    else:
        every_label = gather_fn(labels.float().unsqueeze(1)).squeeze(1)
        positive = (labels.float()[:, None] == every_label[None, :]) & every_valid[None, :]
        positive[local, own] = False
        safe = log_prob.masked_fill(~positive, 0.0)
        anchor_loss = -safe.sum(1) / positive.sum(1).clamp(min=1)
    anchor_loss = anchor_loss[valid]
    found = (logits.argmax(1) == partner)[valid]
    total_anchors = every_valid.sum().clamp(min=1)
    summed = anchor_loss.sum()
    return summed * world / total_anchors, summed.detach(), valid.sum(), found.sum()


# -- the training step and rank 0's evaluation ----------------------------------------------------


def contrastive_loss(temperature: float, batch_size: int, use_labels: bool) -> Callable:
    """NT-Xent over the global batch (`featx.contrastive.nt_xent`): `x` holds the two views of
    its samples, view 1 first. A zero-weight step still joins the gather, with no valid rows."""

    def step(model, x, lengths, labels, real):
        n = x.shape[0] // 2
        z = pad_views(model(x, lengths), n, batch_size)
        valid = torch.zeros(2 * batch_size, dtype=torch.bool, device=z.device)
        if real:
            valid[:n] = valid[batch_size : batch_size + n] = True
        both = None
        if use_labels:
            padded = torch.full((batch_size,), -1, dtype=torch.long, device=z.device)
            padded[:n] = labels
            both = torch.cat([padded, padded])
        with torch.autocast(z.device.type, enabled=False):  # the loss in fp32
            loss, summed, anchors, found = nt_xent(z.float(), valid, temperature, both)
        # per sample: the mean of its two views' anchor losses; correct: views that found theirs
        return loss, summed.item() / 2, int(anchors.item()) // 2, found.item() / 2

    return step


def evaluate_contrastive(
    net, paired, plain, temperature: float, use_labels: bool, autocast=None, cap: int = 4096
) -> dict:
    """Rank 0's view of a contrastive run on `val`, with no labels needed: the loss on fixed
    views (`paired` batches), the views' alignment, and the features' uniformity and effective
    rank; with labels, also a leave-one-out kNN accuracy of the features. At most `cap`
    samples feed the monitors."""
    autocast = autocast or nullcontext()
    net.eval()
    loss_sum = found = n = 0.0
    align, feats, labels = [], [], []
    identity = lambda t: t  # noqa: E731 (rank 0 alone: no other rank to gather from)
    with torch.inference_mode():
        for x, lengths, y, _ in paired:
            with autocast:
                f = net.model.forward_features(x, lengths, bag=False)
                z = net.projector(f)
            b = len(z) // 2
            valid = torch.ones(len(z), dtype=torch.bool, device=z.device)
            both = torch.cat([y, y]) if use_labels else None
            _, summed, anchors, hits = nt_xent(z, valid, temperature, both, gather_fn=identity)
            loss_sum, found, n = loss_sum + summed.item() / 2, found + hits.item() / 2, n + b
            align.append(alignment(f[:b], f[b:]) * b)
        for x, lengths, y, _ in plain:
            if sum(len(t) for t in feats) >= cap:
                break
            with autocast:
                feats.append(net.model.forward_features(x, lengths).float())
            labels.append(y)
    net.train()
    features = torch.cat(feats)[:cap]
    metrics = {
        "val_loss": loss_sum / max(n, 1),
        "val_view_accuracy": found / max(n, 1),
        "alignment": sum(align) / max(n, 1),
        "uniformity": uniformity(features),
        "effective_rank": effective_rank(features),
    }
    if labels and all(y is not None for y in labels):
        metrics["knn_accuracy"] = knn_accuracy(features, torch.cat(labels)[:cap])
    return metrics


# -- monitors without labels ----------------------------------------------------------------------


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean squared distance between the normalised views of a sample (Wang & Isola; lower is
    better aligned)."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (z1 - z2).pow(2).sum(1).mean().item()


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(-t |zi - zj|^2) over pairs of normalised rows (lower: spread more evenly over
    the sphere; a collapsed model scores 0)."""
    z = F.normalize(z.float(), dim=1)
    if len(z) < 2:
        return 0.0
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log().item()


def effective_rank(features: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values of the centred features (Roy &
    Vetterli): about how many directions the features use; 1 when they collapse to a line."""
    x = features.float() - features.float().mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp(min=1e-12)
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = KNN_K) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (cosine, majority vote) of `features` against
    each other: how well the features separate the classes, with nothing trained on the labels."""
    n = len(features)
    if n < 2:
        return float("nan")
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    # a small val split gets fewer neighbours: k near n is the majority class, not a test
    idx = sim.topk(max(1, min(k, (n - 1) // 4)), dim=1).indices
    votes = F.one_hot(labels[idx], int(labels.max()) + 1).sum(1)
    return (votes.argmax(1) == labels).float().mean().item()
