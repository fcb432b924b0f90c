"""RNN family: a GRU or LSTM over image patches, text embeddings or log-mel frames.

Padded batches go through `pack_padded_sequence`, so the recurrence stops at each sample's last
valid step (in both directions), and features are the mean over valid steps only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from featx.models.model import masked_mean
from featx.models.registry import register_model
from featx.models.stems import sequence_stem

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RNNEncoder(nn.Module):
    """(B, S, input_dim) + valid lengths -> (B, hidden * directions)."""

    def __init__(
        self,
        input_dim: int,
        hidden: int,
        num_layers: int,
        bidirectional: bool,
        cell: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.rnn = CELLS[cell](
            input_dim,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,  # torch warns on dropout with one layer
        )
        self.feature_dim = hidden * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return self.rnn(x)[0].mean(dim=1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return masked_mean(out, lengths)


def _check(cfg: dict[str, Any]) -> list[str]:
    if cfg["cell"] not in CELLS:
        return [f"cell={cfg['cell']!r} should be one of: {', '.join(CELLS)}"]
    return []


_SMALL = {
    "cell": "gru",
    "hidden": 64,
    "num_layers": 1,
    "bidirectional": True,
    "embed_dim": 64,
    "patch_size": 8,
    "n_mels": 40,
    "dropout": 0.0,
}
_BASE = {
    "cell": "gru",
    "hidden": 256,
    "num_layers": 2,
    "bidirectional": True,
    "embed_dim": 256,
    "patch_size": 8,
    "n_mels": 64,
    "dropout": 0.1,
}


@register_model("rnn", presets={"small": _SMALL, "base": _BASE}, check=_check)
def rnn(
    modality: str, cfg: dict[str, Any], *, vocab_size: int | None, sample_rate: int
) -> tuple[nn.Module, nn.Module]:
    dim = cfg["embed_dim"]
    stem = sequence_stem(modality, dim, cfg, vocab_size, sample_rate)
    encoder = RNNEncoder(
        dim,
        cfg["hidden"],
        cfg["num_layers"],
        cfg["bidirectional"],
        cfg["cell"],
        cfg["dropout"],
    )
    return stem, encoder
