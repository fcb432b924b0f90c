"""The one model contract: a modality stem, an encoder family, and a linear head.

`forward_features(x, lengths) -> (B, feature_dim)` is what extraction keeps; `forward` adds the
head for training. Composition, not inheritance: any stem pairs with any encoder.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class FeatureExtractor(Protocol):
    feature_dim: int
    model_name: str
    modality: str
    preset: str
    config: dict[str, Any]

    def forward_features(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor: ...


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True at valid steps."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def masked_mean(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over the step axis of (B, S, D), counting only each row's first `lengths` steps."""
    if lengths is None:
        return x.mean(dim=1)
    mask = length_mask(lengths, x.shape[1]).unsqueeze(-1).to(x.dtype)  # (B, S, 1)
    return (x * mask).sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, 2 * D): the mean and the standard deviation over the step axis of (B, S, D), each
    row's first `lengths` steps only (statistics pooling). Two passes: E[x^2] - E[x]^2 loses
    the small variances of large values."""
    mean = masked_mean(x, lengths)
    var = masked_mean((x - mean.unsqueeze(1)).square(), lengths)
    return torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1)


class FeatureModel(nn.Module):
    """stem -> encoder -> (B, feature_dim) features -> dropout -> linear head -> logits."""

    def __init__(
        self,
        stem: nn.Module,
        encoder: nn.Module,
        num_classes: int,
        dropout: float,
        *,
        model_name: str,
        modality: str,
        preset: str,
        config: dict[str, Any],
        bag: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.encoder = encoder
        # Text with `token_mean`: the features also hold the mean of the token embeddings (a
        # bag of words the model learns), beside what the encoder pools. Max or attention
        # pooling keeps a few telling steps and loses the rest of a short text's words.
        self.token_mean = modality == "text" and bool(config.get("token_mean"))
        # Audio with `frame_stats`, where the stem embeds frames (rnn, attention): the features
        # also hold the mean and standard deviation of the frame embeddings over the clip
        # (statistics pooling, as speaker embeddings pool speech frames), beside what the
        # encoder pools. Without labels, attention pooling alone left the attention family's
        # features under log-mel statistics on spoken digits (0.888 against 0.944).
        frame_dim = getattr(stem, "frame_dim", None)  # only audio stems that embed frames
        self.frame_stats = bool(config.get("frame_stats") and frame_dim)
        # Text with a `bag` (`token_bag`): the features end with an LSA of the text's tokens and
        # token pairs, fitted on the train split and not trained (`TokenBag`). A dense summary of a
        # text needs hundreds of numbers to keep what tf-idf's probe reads; the encoder's 128-192
        # could not, on any corpus measured.
        self.bag = bag
        bag_dim = bag.proj.shape[1] if bag is not None else 0
        self.feature_dim: int = (
            encoder.feature_dim
            + (stem.embed.embedding_dim if self.token_mean else 0)
            + (2 * frame_dim if self.frame_stats else 0)
            + bag_dim
        )
        self.trained_dim = self.feature_dim - bag_dim  # what training shapes: all but the bag
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.model_name = model_name
        self.modality = modality
        self.preset = preset
        self.config = config

    def forward_features(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, *, bag: bool = True
    ) -> torch.Tensor:
        """(B, feature_dim); with `bag=False`, the first `trained_dim` of them only."""
        h, steps = self.stem(x, lengths)
        features = self.encoder(h, steps)
        if self.token_mean:
            features = torch.cat([features, masked_mean(self.stem.embed(x), steps)], dim=1)
        if self.frame_stats:
            features = torch.cat([features, masked_mean_std(h, steps)], dim=1)
        if bag and self.bag is not None:
            features = torch.cat([features, self.bag(x, steps).to(features.dtype)], dim=1)
        return features

    def fitted_keys(self) -> set[str]:
        """State-dict keys of tensors fitted on a dataset rather than trained (the token bag):
        a warm start does not copy them, and a random-init baseline keeps them."""
        return {f"bag.{k}" for k in self.bag.state_dict()} if self.bag is not None else set()

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        # Raw logits: cross-entropy wants them unbounded, so no activation after the head.
        return self.head(self.head_drop(features))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, lengths))

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, modality={self.modality!r}, preset={self.preset!r}"
