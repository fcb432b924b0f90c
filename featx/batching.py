"""Decoded shard samples -> model inputs: one collate for training and extraction alike.

`Batcher` is a small picklable callable (the tokenizer is loaded lazily in each process), so the
same object runs in DataLoader workers and Ray Data actors. Augmentation is opt-in, meant for
training only, and reproducible from a seed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

MODALITIES = ("image", "text", "audio")

# ImageNet channel statistics: fixed constants, so training and extraction normalise identically
# whatever the dataset (a per-dataset estimate would have to travel with every checkpoint).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
IMAGE_FILL = tuple(round(255 * m) for m in IMAGE_MEAN)  # augmentation border: ~0 once normalised
_IMAGE_SCALE = 1.0 / (255.0 * torch.tensor(IMAGE_STD).view(1, 3, 1, 1))
_IMAGE_SHIFT = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

# Fraction of tokens removed per text sample when augmenting. Small text corpora overfit fast
# (train accuracy near 1 within a few epochs); on real ones 0.25 lifted the probe by 1-3 points
# over 0.1 for every family.
TOKEN_DROPOUT = 0.25
AUDIO_SHIFT = 0.1  # largest circular time shift, as a fraction of the clip's length
AUDIO_NOISE_STD = 0.005  # Gaussian noise on waveforms in [-1, 1], about -46 dBFS
AUDIO_SPEED = 0.1  # speed (tempo and pitch) changes by up to +-10%
AUDIO_TIME_MASKS = 2  # silenced spans per clip, each up to AUDIO_TIME_MASK of its length
AUDIO_TIME_MASK = 0.05
AUDIO_FREQ_MASK = 0.1  # one band of up to 10% of the spectrum removed

# Contrastive views (`views=2`): each is a stronger augmentation than supervised training's, as
# the two views of a sample must differ in everything the features should ignore.
VIEW_CROP_SCALE = (0.35, 1.0)  # images: random resized crop, share of the area kept
VIEW_JITTER = 0.4  # images: brightness, contrast, saturation each scaled by 1 +- 0.4 (p 0.8)
VIEW_GREY = 0.2  # images: probability of greyscale
VIEW_BLUR = 0.5  # images: probability of a Gaussian blur, sigma 0.1-2 px
# Audio views: each changes its own speed (tempo and pitch together) by up to VIEW_SPEED, and
# keeps VIEW_KEEP of the clip, so the two views of a clip differ more in tempo and pitch but
# both still hold the whole word. The former views (no speed of their own, 60-100% of the clip
# kept) probed 0.910 / 0.888 / 0.820 on spoken digits (cnn / rnn / attention), these 0.978 /
# 0.944 / 0.865 (tests/benchmarks/results-contrastive.md, with a second corpus of words).
VIEW_SPEED = 0.2
VIEW_KEEP = (0.8, 1.0)  # audio: share of the (sped-up or slowed) clip kept by a random crop
# Text: each view keeps a random TEXT_VIEW_KEEP share of the tokens (each token independently),
# then loses one contiguous span of up to TEXT_VIEW_MASK of what is left. The former text views
# (token dropout 0.25, then a 60-100% crop) shared most of their tokens, so NT-Xent was solved by
# token identity. Debian descriptions, linear-probe val accuracy cnn / rnn / attention, mean of
# seeds 0-2 at featx's defaults (20 epochs): former 0.338 / 0.396 / 0.425, these 0.342 / 0.444 /
# 0.467 (`bench_quality.py --corpora debian --objectives contrastive`, tf-idf 0.830). Ranked at 10
# epochs (seed 0): former 0.266 / 0.406 / 0.406; keep 50-80% 0.296 / 0.471 / 0.469; plus the span
# 0.347 / 0.480 / 0.469; two disjoint halves 0.196 / 0.413 / 0.436 (the pairs were memorised:
# train view accuracy 0.88, val 0.18); two disjoint 30-50% spans 0.180 / 0.410 / 0.373; halves
# plus dropout 0.228 / 0.382 / 0.406; SimCSE (same text, dropout 0.1 on the embeddings) 0.273 /
# 0.443 / 0.415. Keeping 30-60%, temperature 0.1 or 0.5 and a 1x embedding rate did no better.
TEXT_VIEW_KEEP = (0.5, 0.8)
TEXT_VIEW_MASK = 0.3
VIEW_GAIN_DB = 6.0  # audio: gain change, +- dB


class Batcher:
    """Collate a list of decoded samples into `{"x", "lengths", "labels", "keys"}`.

    - `x`: image (B, 3, H, W) float32 normalised; text (B, S) int64 ids padded with 0;
      audio (B, T) float32 waveforms padded with zeros.
    - `lengths`: (B,) int64 valid tokens or samples (every value >= 1); None for images.
    - `labels`: (B,) int64 class indices, or None unless every sample in the batch has a `cls`
      (training needs all of them; extraction reads `keys`).
    - `keys`: the samples' `__key__`s, in order.

    With `seed`, augmentation is deterministic per process; DataLoader workers each add their
    worker id to the seed. Other parallel copies (Ray actors, DDP ranks) should get distinct seeds.
    """

    def __init__(
        self,
        modality: str,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        max_tokens: int = 256,
        augment: bool = False,
        flip: bool = False,
        seed: int | None = None,
        views: int = 1,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; known modalities: {MODALITIES}")
        if modality == "text" and tokenizer_path is None:
            raise ValueError(
                "text batches need tokenizer_path: pass the dataset's tokenizer.json "
                "(written by `featx ingest` beside the shards)"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} should be at least 1")
        if views not in (1, 2):
            raise ValueError(f"views={views} should be 1 or 2")
        self.views = views
        self.modality = modality
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self.max_tokens = max_tokens
        self.augment = augment
        self.flip = flip
        self.seed = seed
        self._tokenizer = None
        self._unk_id = 1
        self._rng: np.random.Generator | None = None
        self._rng_pid = 0
        if modality == "text":
            self._load_tokenizer()  # fail now, not in a worker, on a bad tokenizer file

    def __getstate__(self) -> dict[str, Any]:
        # Each unpickled copy reloads the tokenizer and restarts its random stream from the seed.
        return {**self.__dict__, "_tokenizer": None, "_rng": None}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        for s in samples:
            if self.modality not in s:
                found = [k for k in MODALITIES if k in s]
                raise ValueError(
                    f"sample {s.get('__key__')!r} has no {self.modality!r} payload (found: "
                    f"{found or 'none'}); is the dataset's modality {self.modality!r}?"
                )
        collate = {"image": self._images, "text": self._texts, "audio": self._audio}[self.modality]
        x, lengths = collate(samples)
        if self.views == 2:
            x, lengths = _stack_views((x, lengths), collate(samples))
        classes = [s.get("cls") for s in samples]
        labels = None
        if all(c is not None for c in classes):
            labels = torch.tensor([int(c) for c in classes], dtype=torch.long)
        return {
            "x": x,
            "lengths": lengths,
            "labels": labels,
            "keys": [s["__key__"] for s in samples],
        }

    def _random(self) -> np.random.Generator:
        # A forked worker inherits the parent's generator; start its own stream instead.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng_pid = os.getpid()
            worker = torch.utils.data.get_worker_info()
            entropy = None if self.seed is None else [self.seed, 0 if worker is None else worker.id]
            self._rng = np.random.default_rng(entropy)
        return self._rng

    def _images(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, None]:
        arrays = [np.asarray(s["image"]) for s in samples]
        for s, a in zip(samples, arrays, strict=True):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(
                    f"sample {s['__key__']!r}: image must be uint8 (H, W, 3) RGB, got {a.dtype} "
                    f"{a.shape}; decode shards with featx.shards.decode_sample"
                )
            if a.shape != arrays[0].shape:
                raise ValueError(
                    f"sample {s['__key__']!r} is {a.shape[:2]} but {samples[0]['__key__']!r} is "
                    f"{arrays[0].shape[:2]}: a batch needs one image size; ingest with a fixed size"
                )
        if self.views == 2 and self.augment:
            return self._view_images(np.stack(arrays)), None
        flips = None
        if self.augment:
            pixels, flips = self._augment_images(arrays)
        else:
            pixels = np.stack(arrays)
        # NHWC uint8 -> NCHW float32 in one copy, then (x / 255 - mean) / std in place.
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        x.mul_(_IMAGE_SCALE).sub_(_IMAGE_SHIFT)
        if flips is not None and flips.any():
            mirrored = torch.from_numpy(flips)
            x[mirrored] = x[mirrored].flip(-1)
        return x, None

    def _augment_images(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Shift each image within a border of the mean colour (same size) and pick which to
        mirror. Done on the uint8 pixels, where a shift is one slice copy per image."""
        rng = self._random()
        h, w, _ = arrays[0].shape
        pad = max(1, min(h, w) // 16)
        shifts = rng.integers(-pad, pad + 1, size=(len(arrays), 2))
        flips = rng.random(len(arrays)) < (0.5 if self.flip else 0.0)
        out = np.empty((len(arrays), h, w, 3), np.uint8)
        out[:] = np.broadcast_to(np.asarray(IMAGE_FILL, np.uint8), (h, w, 3))
        for i, (a, (dy, dx)) in enumerate(zip(arrays, shifts, strict=True)):
            out[i, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
        return out, flips

    def _view_images(self, pixels: np.ndarray) -> torch.Tensor:
        """SimCLR's view of each image, in torch on the whole batch: a random resized crop (and
        a mirror with `flip`) as one affine resampling, colour jitter, greyscale, blur."""
        rng = self._random()
        n, h, w, _ = pixels.shape
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        area = rng.uniform(*VIEW_CROP_SCALE, size=n)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=n))
        sx, sy = np.minimum(1.0, np.sqrt(area * ratio)), np.minimum(1.0, np.sqrt(area / ratio))
        cx, cy = rng.uniform(-1, 1, size=n) * (1 - sx), rng.uniform(-1, 1, size=n) * (1 - sy)
        mirror = np.where(rng.random(n) < (0.5 if self.flip else 0.0), -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.from_numpy(sx * mirror).float()
        theta[:, 0, 2] = torch.from_numpy(cx).float()
        theta[:, 1, 1] = torch.from_numpy(sy).float()
        theta[:, 1, 2] = torch.from_numpy(cy).float()
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
        grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        jitter = torch.from_numpy(rng.random(n) < 0.8)
        for i in torch.nonzero(jitter).flatten().tolist():
            b, c, s = 1 + rng.uniform(-VIEW_JITTER, VIEW_JITTER, size=3)
            img = x[i] * b
            img = (img - img.mean()) * c + img.mean()
            grey = (img * grey_weights[0]).sum(0, keepdim=True)
            x[i] = ((img - grey) * s + grey).clamp_(0, 1)
        greyed = torch.from_numpy(rng.random(n) < VIEW_GREY)
        x[greyed] = (x[greyed] * grey_weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        for i in np.flatnonzero(rng.random(n) < VIEW_BLUR).tolist():
            x[i] = _blur(x[i], rng.uniform(0.1, 2.0) * min(h, w) / 32)
        x.sub_(torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)).div_(
            torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        )
        return x

    def _crop(self, n: int) -> slice:
        """A random contiguous span of a sequence of `n` steps, VIEW_KEEP of it."""
        rng = self._random()
        keep = max(1, int(round(n * rng.uniform(*VIEW_KEEP))))
        start = int(rng.integers(0, n - keep + 1))
        return slice(start, start + keep)

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer  # only text batches pay for the import

            try:
                tok = Tokenizer.from_file(self.tokenizer_path)
            except Exception as e:
                raise ValueError(
                    f"cannot load tokenizer {self.tokenizer_path!r}: {e}; pass the tokenizer.json "
                    "that `featx ingest` wrote beside the text shards"
                ) from e
            pad_id, unk_id = tok.token_to_id("[PAD]"), tok.token_to_id("[UNK]")
            if pad_id != 0 or unk_id is None:
                raise ValueError(
                    f"tokenizer {self.tokenizer_path!r} maps [PAD] to {pad_id} and [UNK] to "
                    f"{unk_id}; featx needs [PAD] = 0 and an [UNK] token: re-run `featx ingest`"
                )
            # The file's own padding/truncation settings would fight ours.
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer, self._unk_id = tok, unk_id
        return self._tokenizer

    def _texts(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        for s in samples:
            if not isinstance(s["text"], str):
                raise ValueError(
                    f"sample {s['__key__']!r}: text must be str, got {type(s['text'])}"
                )
        encodings = self._load_tokenizer().encode_batch([s["text"] for s in samples])
        seqs = []
        for enc in encodings:
            # an empty text becomes one [UNK]: zero-length sequences cannot be packed or pooled
            ids = enc.ids[: self.max_tokens] or [self._unk_id]
            if self.augment and self.views == 2:
                ids = self._view_tokens(ids)
            elif self.augment:
                ids = self._drop_tokens(ids, TOKEN_DROPOUT)
            seqs.append(ids)
        lengths = torch.tensor([len(ids) for ids in seqs], dtype=torch.long)
        x = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, ids in enumerate(seqs):
            x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return x, lengths

    def _drop_tokens(self, ids: list[int], rate: float) -> list[int]:
        """`ids` less a random `rate` of them, each token independently (one at least stays)."""
        if len(ids) <= 1:
            return ids
        keep = self._random().random(len(ids)) >= rate
        if not keep.any():
            keep[self._random().integers(len(ids))] = True
        return [t for t, k in zip(ids, keep, strict=True) if k]

    def _view_tokens(self, ids: list[int]) -> list[int]:
        """A contrastive view of a text: TEXT_VIEW_KEEP of its tokens, then one span of up to
        TEXT_VIEW_MASK of them removed (never the whole text)."""
        rng = self._random()
        ids = self._drop_tokens(ids, 1.0 - rng.uniform(*TEXT_VIEW_KEEP))
        n = len(ids)
        width = int(rng.integers(0, int(TEXT_VIEW_MASK * n) + 1))
        if 0 < width < n:
            start = int(rng.integers(0, n - width + 1))
            ids = ids[:start] + ids[start + width :]
        return ids

    def _audio(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        waves = []
        for s in samples:
            a = np.asarray(s["audio"])
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.floating):
                raise ValueError(
                    f"sample {s['__key__']!r}: audio must be a 1-D float mono waveform, got "
                    f"{a.dtype} {a.shape}; decode shards with featx.shards.decode_sample"
                )
            # an empty clip becomes one silent sample, so every length is at least 1
            waves.append(a.astype(np.float32, copy=False) if a.size else np.zeros(1, np.float32))
        if self.augment:
            waves = [self._augment_wave(w) for w in waves]
        if self.augment and self.views == 2:
            waves = [self._view_wave(w) for w in waves]
        lengths = torch.tensor([w.size for w in waves], dtype=torch.long)
        x = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
        for i, w in enumerate(waves):
            x[i, : w.size] = torch.from_numpy(w)
        return x, lengths

    def _augment_wave(self, wave: np.ndarray) -> np.ndarray:
        """Speed, shift, masks in time and frequency, light noise; the length never changes.

        The speed change (tempo and pitch together, as a faster or higher voice) and the masks
        (SpecAugment's, done on the waveform: silenced spans, and a band removed from the
        spectrum) teach a model that a word is the same word whoever says it and whatever
        drowns part of it. Measured on real spoken digits, they lifted the probe of every
        family (README, Models).
        """
        rng = self._random()
        n = wave.size
        stretched = _speed(wave, rng.uniform(1.0 - AUDIO_SPEED, 1.0 + AUDIO_SPEED))[:n]
        out = np.zeros(n)
        out[: stretched.size] = stretched
        limit = int(AUDIO_SHIFT * n)
        out = np.roll(out, int(rng.integers(-limit, limit + 1)))
        for _ in range(AUDIO_TIME_MASKS):
            width = int(rng.integers(0, int(AUDIO_TIME_MASK * n) + 1))
            start = int(rng.integers(0, max(1, n - width)))
            out[start : start + width] = 0.0
        if n >= 64:
            spectrum = np.fft.rfft(out)
            width = int(rng.integers(0, int(AUDIO_FREQ_MASK * spectrum.size) + 1))
            start = int(rng.integers(0, max(1, spectrum.size - width)))
            spectrum[start : start + width] = 0.0
            out = np.fft.irfft(spectrum, n)
        out += rng.normal(0.0, AUDIO_NOISE_STD, size=n)
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def _view_wave(self, wave: np.ndarray) -> np.ndarray:
        """On top of `_augment_wave`: a speed change of its own (the view is shorter or
        longer), a random crop in time and a gain change."""
        rng = self._random()
        gain = 10 ** (rng.uniform(-VIEW_GAIN_DB, VIEW_GAIN_DB) / 20)
        wave = _speed(wave, rng.uniform(1.0 - VIEW_SPEED, 1.0 + VIEW_SPEED))
        return np.clip(wave[self._crop(wave.size)] * gain, -1.0, 1.0).astype(np.float32)


def _speed(wave: np.ndarray, rate: float) -> np.ndarray:
    """`wave` played `rate` times as fast (tempo and pitch together): 1/rate times as long."""
    n = wave.size
    return np.interp(np.arange(0.0, n, rate), np.arange(n), wave)


def _stack_views(a: tuple, b: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two collated views of one list of samples -> (2B, ...) rows, view 1 first; sequences
    padded to the longer view."""
    (x1, l1), (x2, l2) = a, b
    if l1 is None:
        return torch.cat([x1, x2]), None
    width = max(x1.shape[1], x2.shape[1])
    x1 = torch.nn.functional.pad(x1, (0, width - x1.shape[1]))
    x2 = torch.nn.functional.pad(x2, (0, width - x2.shape[1]))
    return torch.cat([x1, x2]), torch.cat([l1, l2])


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (3, H, W) image under a separable Gaussian of `sigma` pixels."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(img.dtype)
    x = img.unsqueeze(1)  # (3, 1, H, W): one channel per batch row
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1)
    )
    x = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1)
    )
    return x.squeeze(1)


def make_collate(
    modality: str,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    max_tokens: int = 256,
    augment: bool = False,
    flip: bool = False,
    seed: int | None = None,
    views: int = 1,
) -> Batcher:
    """The collate function for `modality`; see `Batcher` for the batch it returns."""
    return Batcher(
        modality,
        tokenizer_path=tokenizer_path,
        max_tokens=max_tokens,
        augment=augment,
        flip=flip,
        seed=seed,
        views=views,
    )


def batched(items, size: int):
    """Lists of `size` items (the last one shorter), as they arrive."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
