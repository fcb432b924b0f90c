"""The cost of a daily cycle as the dataset grows: ingest, train, extract after a day's changes.

For each scale (1x and 4x of --n images in 4 classes): a first cycle builds the work folder;
then a day passes (2% new files arrive, one file is deleted, one moves to another class
folder) and the timed daily cycle runs `featx ingest`, `featx train` and `featx extract` on
the same folders, as the scheduled deployments do. The baseline, run in the same process
tree on the same data, rebuilds everything from scratch into fresh folders. Each command is a
fresh process, so its start-up is included. Training is from scratch in both (the default;
--epochs fixes its length so the two are comparable).

Usage: python tests/benchmarks/bench_cycle.py [--n 400] [--scales 1,4] [--epochs 3]
    [--workdir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATX = [sys.executable, "-m", "featx.cli"]


def make_images(src: Path, start: int, stop: int) -> None:
    from PIL import Image

    for i in range(start, stop):
        c = i % 4
        rng = np.random.default_rng(i)
        a = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
        a[..., c % 3] += 120
        if c == 3:
            a[8:24, 8:24] = 255
        path = src / f"c{c}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)


def timed(*args) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([*FEATX, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"featx {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def cycle(src: Path, work: Path, epochs: int) -> dict[str, float]:
    shards, run, feats = work / "shards", work / "run", work / "features"
    return {
        "ingest": timed("ingest", src, shards, "--image-size", "32", "--val-fraction", "0.2"),
        "train": timed("train", shards, "--out", run, "--epochs", epochs, "--patience", "0"),
        "extract": timed("extract", shards, "--checkpoint", run, "--out", feats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="featx-bench-cycle-"))
    rows = []
    for scale in map(int, a.scales.split(",")):
        n = a.n * scale
        base = root / f"x{scale}"
        shutil.rmtree(base, ignore_errors=True)
        src, work = base / "src", base / "work"
        make_images(src, 0, n)
        cycle(src, work, a.epochs)  # the first day
        make_images(src, n, n + max(1, n // 50))  # 2% new files
        (src / "c0" / f"{0:05d}.png").unlink()  # one deleted
        moved = src / "c1" / f"{1:05d}.png"
        moved.rename(src / "c2" / moved.name)  # one moved to another class folder
        daily = cycle(src, work, a.epochs)
        scratch = cycle(src, base / "scratch", a.epochs)
        card = json.loads((work / "shards" / "dataset.json").read_text())
        samples = sum(c["total"] for c in card["counts"].values())
        row = {"scale": scale, "samples": samples, "daily": daily, "from scratch": scratch}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| scale | samples | stage | daily cycle s | from scratch s | ratio |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        for stage in ("ingest", "train", "extract"):
            d, s = r["daily"][stage], r["from scratch"][stage]
            print(f"| {r['scale']}x | {r['samples']} | {stage} | {d:.1f} | {s:.1f} | {d / s:.2f} |")
        d, s = sum(r["daily"].values()), sum(r["from scratch"].values())
        print(f"| {r['scale']}x | {r['samples']} | all | {d:.1f} | {s:.1f} | {d / s:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
