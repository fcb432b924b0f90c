"""Shared fixtures: tiny synthetic inputs made in tmp_path, never downloaded."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def make_image(path: Path, seed: int, size=(40, 30), mode="RGB", fmt=None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_audio(path: Path, seed: int, seconds=0.3, sr=16000, channels=1, fmt=None) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.01 * rng.standard_normal(len(t))
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, format=fmt)
    return path


def make_text(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(rng.choice(words, 12)) + f" doc {seed}\n", encoding="utf-8")
    return path


def png_bomb(path: Path, width=100_000, height=100_000) -> Path:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""
    buf = io.BytesIO()
    from PIL import Image

    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """Class-folder layout with two classes of small RGB images."""
    src = tmp_path / "src"
    for i in range(24):
        label = "cats" if i % 2 else "dogs"
        make_image(src / label / f"img{i:03d}.png", seed=i)
    return src


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module; featx processes join it with --ray-address."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread: intra-op sync costs more than it saves, and on a
    shared machine OpenMP spin-waits can make two threads 100x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# fault-injection figures: collected by tests/test_faults.py, printed at the end of the run

_FAULT_FIGURES = pytest.StashKey[object]()


@pytest.fixture(scope="session")
def fault_figures(request):
    """The session's FaultFigures; the fault tests add what they tried and what came out."""
    from faults_support import FaultFigures

    figures = FaultFigures()
    request.config.stash[_FAULT_FIGURES] = figures
    return figures


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = config.stash.get(_FAULT_FIGURES, None)
    if figures is not None:
        terminalreporter.section("featx fault-injection summary")
        for line in figures.lines():
            terminalreporter.write_line(line)
