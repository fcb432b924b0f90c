"""Log-mel spectrogram in torch, so audio features are computed on the model's device.

HTK mel scale with triangular filters and no area normalisation (torchaudio's
`melscale_fbanks(norm=None, mel_scale="htk")`). Frames are centred with zero padding, not
reflection, so a clip's frames never depend on how much batch padding follows it.
"""

from __future__ import annotations

import torch
from torch import nn


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular filters, shape (n_freqs, n_mels), on `n_freqs` bins evenly spaced 0..sr/2."""
    f_max = sample_rate / 2 if f_max is None else f_max
    # float64 while building: the filter edges are differences of nearby frequencies
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = torch.tensor([f_min, f_max], dtype=torch.float64)
    mels = torch.linspace(*hz_to_mel(edges).tolist(), n_mels + 2, dtype=torch.float64)
    pts = mel_to_hz(mels)  # lower edge, centre, upper edge of filter m are pts[m], [m+1], [m+2]
    widths = pts[1:] - pts[:-1]
    offsets = pts[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Waveforms (B, T) -> log-mel frames (B, F, n_mels), F = 1 + T // hop_length.

    25 ms Hann windows every 10 ms at any sample rate. The filterbank and window are non-persistent
    buffers: they follow the model to its device but are rebuilt from the config, not checkpointed.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 40,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.n_fft = round(sample_rate * win_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        self.eps = eps
        window = torch.hann_window(self.n_fft, periodic=True)
        self.register_buffer("window", window, persistent=False)
        fbank = mel_filterbank(self.n_fft // 2 + 1, n_mels, sample_rate)
        self.register_buffer("fbank", fbank, persistent=False)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames that belong to a clip of `lengths` samples (centred framing)."""
        return 1 + torch.div(lengths, self.hop_length, rounding_mode="floor")

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # The FFT needs float32 even when the rest of the model runs under bf16/fp16 autocast.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=self.window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()  # (B, n_freqs, F)
            mel = power.transpose(1, 2) @ self.fbank
            return torch.log(mel + self.eps)
