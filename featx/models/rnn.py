"""RNN family: a GRU or LSTM over image patches, text embeddings or log-mel frames.

Padded batches go through `pack_padded_sequence`, so the recurrence stops at each sample's last
valid step (in both directions). The inputs are layer-normalised, the recurrent weights start
orthogonal (gradients neither vanish nor explode through the first steps), a linear skip adds
each step's input to its output, and features are the max over valid steps (InferSent's
pooling: one telling step anywhere counts, where a mean over a long sequence dilutes it).
Measured on real corpora, each of these lifted the probe: on text from 0.66 to about 0.82 (with
featx's embedding learning rate), on images from 0.93 to 0.99. Log-mel frames pass two
frequency-halving convs first (`freq_conv`, `AudioStem`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from featx.models.model import length_mask
from featx.models.registry import register_model
from featx.models.stems import sequence_stem

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RNNEncoder(nn.Module):
    """(B, S, input_dim) + valid lengths -> (B, hidden * directions), max over valid steps."""

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
        self.norm = nn.LayerNorm(input_dim)
        self.rnn = CELLS[cell](
            input_dim,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,  # torch warns on dropout with one layer
        )
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for gate in p.data.split(hidden):  # one square block per gate
                    nn.init.orthogonal_(gate)
            elif name.startswith("bias"):
                nn.init.zeros_(p)
        self.feature_dim = hidden * (2 if bidirectional else 1)
        self.skip = nn.Linear(input_dim, self.feature_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if lengths is None:
            return (self.rnn(x)[0] + self.skip(x)).amax(dim=1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        out = out + self.skip(x)
        valid = length_mask(lengths.to(out.device), out.shape[1]).unsqueeze(-1)
        return out.masked_fill(~valid, float("-inf")).amax(dim=1)


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
    "freq_conv": True,
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
    "freq_conv": True,
    "dropout": 0.1,
}


# Recurrent nets train slowly at the others' rate: 5e-3 reached 0.97-0.99 on real digits in
# 10 epochs where 2e-3 stopped at 0.90-0.95.
@register_model("rnn", presets={"small": _SMALL, "base": _BASE}, check=_check, lr=5e-3)
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
