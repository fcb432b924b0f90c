"""Ingest throughput: featx (process pool) against a plain single-process loop on the same files.

The baseline does the same per-file work (Pillow decode with JPEG draft mode, EXIF, RGB,
resize + centre crop, JPEG encode, tarfile write) in one process. Prints samples/s, MB/s and
ratios. Usage: python tests/benchmarks/bench_ingest.py [--n 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def make_photos(root: Path, n: int) -> int:
    """n photo-sized JPEGs (640x480, smooth content like a real photo) in 4 class folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    total = 0
    for i in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        arr = np.stack(
            [127 + 120 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + i) for c in range(3)], -1
        )
        arr += rng.normal(0, 8, arr.shape)
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def baseline(src: Path, out: Path, size: int = 64) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    out.mkdir(parents=True)
    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for i, p in enumerate(files):
            im = Image.open(p)
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("cls", p.parent.name.encode())):
                ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    return len(files)


def featx_ingest(src: Path, out: Path, workers: int) -> int:
    from featx.config import IngestConfig
    from featx.ingest import ingest

    s = ingest(IngestConfig.parse(src=src, out=out, workers=workers, image_size=64))
    return s.total


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-ingest-"))
    try:
        src = tmp / "src"
        mb = make_photos(src, args.n) / 1e6
        runs: dict[str, list[float]] = {"baseline": [], "featx_1": [], "featx_2": []}
        for r in range(args.repeats):
            for name, fn, extra in (
                ("baseline", baseline, ()),
                ("featx_1", featx_ingest, (1,)),
                ("featx_2", featx_ingest, (2,)),
            ):
                out = tmp / f"{name}-{r}"
                sec, n = timed(fn, src, out, *extra)
                assert n == args.n, (name, n)
                runs[name].append(sec)
                shutil.rmtree(out)
        med = {k: statistics.median(v) for k, v in runs.items()}
        result = {
            "stage": "ingest",
            "files": args.n,
            "input_mb": round(mb, 1),
            "cores": os.cpu_count(),
            **{f"{k}_samples_per_s": round(args.n / v, 1) for k, v in med.items()},
            **{f"{k}_mb_per_s": round(mb / v, 2) for k, v in med.items()},
            "ratio_featx_2_vs_baseline": round(med["baseline"] / med["featx_2"], 2),
            "ratio_featx_1_vs_baseline": round(med["baseline"] / med["featx_1"], 2),
            "scaling_1_to_2_processes": round(med["featx_1"] / med["featx_2"], 2),
            "repeats": args.repeats,
        }
        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
