"""Attention family: a pre-norm Transformer encoder over patches, tokens or log-mel frames.

Log-mel frames pass two frequency-halving convs first (`freq_conv`, `AudioStem`).

Sinusoidal positions (no learned table, so every length up to `max_len` is equally trained), key
padding masks, and attention pooling: a softmax over valid steps weights the outputs into one
vector.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from featx.models.model import length_mask
from featx.models.registry import register_model
from featx.models.stems import sequence_stem


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim) sin/cos table of "Attention Is All You Need"; dim must be even."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class AttentionEncoder(nn.Module):
    """(B, S, d_model) + valid lengths -> (B, d_model) by attention pooling."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_layers: int,
        mlp_ratio: int,
        dropout: float,
        max_len: int,
    ) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            dim_feedforward=d_model * mlp_ratio,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # nested tensors are off: they do not support norm_first and would only warn
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        # no bias: a constant added to every score cancels in the softmax and never learns
        self.pool_score = nn.Linear(d_model, 1, bias=False)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.max_len = max_len
        self.feature_dim = d_model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        steps = x.shape[1]
        if steps > self.max_len:
            raise ValueError(
                f"input of {steps} steps is longer than max_len={self.max_len}: pass "
                f"max_len={steps} (or more) to create_model, or shorten the input (text: "
                "max_tokens; audio: shorter clips; images: larger patch_size)"
            )
        x = x + self.positions[:steps].to(x.dtype)
        pad = None if lengths is None else ~length_mask(lengths, steps)  # True = ignore
        h = self.encoder(x, src_key_padding_mask=pad)
        scores = self.pool_score(h)  # (B, S, 1): the last axis broadcasts over features
        if pad is not None:
            scores = scores.masked_fill(pad.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return (weights * h).sum(dim=1)


def _check(cfg: dict[str, Any]) -> list[str]:
    problems = []
    if cfg["d_model"] % cfg["num_heads"]:
        problems.append(
            f"d_model={cfg['d_model']} must be divisible by num_heads={cfg['num_heads']}"
        )
    if cfg["d_model"] % 2:
        problems.append(f"d_model={cfg['d_model']} must be even (sinusoidal positions)")
    return problems


_SMALL = {
    "d_model": 64,
    "num_heads": 4,
    "num_layers": 2,
    "mlp_ratio": 2,
    "max_len": 2048,
    "patch_size": 8,
    "n_mels": 40,
    "freq_conv": True,
    "dropout": 0.0,
}
_BASE = {
    "d_model": 256,
    "num_heads": 8,
    "num_layers": 6,
    "mlp_ratio": 4,
    "max_len": 4096,
    "patch_size": 8,
    "n_mels": 64,
    "freq_conv": True,
    "dropout": 0.1,
}


@register_model("attention", presets={"small": _SMALL, "base": _BASE}, check=_check)
def attention(
    modality: str, cfg: dict[str, Any], *, vocab_size: int | None, sample_rate: int
) -> tuple[nn.Module, nn.Module]:
    dim = cfg["d_model"]
    stem = sequence_stem(modality, dim, cfg, vocab_size, sample_rate)
    encoder = AttentionEncoder(
        dim,
        cfg["num_heads"],
        cfg["num_layers"],
        cfg["mlp_ratio"],
        cfg["dropout"],
        cfg["max_len"],
    )
    return stem, encoder
