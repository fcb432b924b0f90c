"""Ingest throughput: featx (process pool) against a plain single-process loop on the same files.

The baseline does the same per-file work (Pillow decode with JPEG draft mode, EXIF, RGB,
resize + centre crop, JPEG encode, tarfile write) in one process. Beside it, the same loop split
by hand over 2 forked processes measures what this machine's two cores give perfectly even
work at the time: the ceiling for featx's 2-process ratio. Prints samples/s, MB/s, ratios and
the peak memory (PSS, whole process tree) of each variant. With --scales 1,2,4 featx
(2 processes) also runs on 2x and 4x the files, to show how time and memory grow, and, once,
at the largest size for the CPU time of the process that runs it (its pool's threads included).
Usage: python tests/benchmarks/bench_ingest.py [--n 600] [--repeats 3] [--scales 1] [--json F]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import TreeMemory, emit
from PIL import Image, ImageOps

H, W = 480, 640


def make_photos(root: Path, n: int) -> int:
    """n photo-sized JPEGs (640x480, smooth content plus sensor-like noise) in 4 class folders.

    Photo i depends only on i, so the first n photos of a larger set are the set of n. The
    noise is a window of one shared field at an offset of its own (a fresh normal draw per
    photo made generation 4x slower than ingesting it); every photo's content is distinct.
    """
    noise = np.random.default_rng(0).normal(0, 8, (H + 61, W + 67, 3)).astype(np.float32)
    x = np.arange(W, dtype=np.float32)[None, :]
    y = np.arange(H, dtype=np.float32)[:, None]
    total = 0
    for i in range(n):
        f = np.random.default_rng(i).uniform(0.005, 0.05, 3)
        # sin(a x + b y + i), expanded so it costs two outer products per channel
        chans = [
            np.sin(f[c] * x) * np.cos(f[(c + 1) % 3] * y + i)
            + np.cos(f[c] * x) * np.sin(f[(c + 1) % 3] * y + i)
            for c in range(3)
        ]
        dy, dx = (i * 7) % 61, (i * 13) % 67
        arr = 127 + 120 * np.stack(chans, -1) + noise[dy : dy + H, dx : dx + W]
        path = root / f"class{i % 4}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def source(workdir: Path, n: int) -> tuple[Path, float]:
    """A class-folder tree of the first n photos (hard links into one cached set); its MB."""
    photos, src = workdir / "photos", workdir / f"src-{n}"
    have = len(list(photos.rglob("*.jpg"))) if photos.exists() else 0
    if have < n:
        shutil.rmtree(photos, ignore_errors=True)
        make_photos(photos, n)
    if not src.exists():
        tmp = workdir / f".src-{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for i in range(n):
            rel = Path(f"class{i % 4}") / f"{i:05d}.jpg"
            (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
            try:
                os.link(photos / rel, tmp / rel)
            except OSError:
                shutil.copy2(photos / rel, tmp / rel)
        tmp.rename(src)
    return src, sum(p.stat().st_size for p in src.rglob("*.jpg")) / 1e6


def baseline(src: Path, out: Path, size: int = 64) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file())
    out.mkdir(parents=True)
    _plain(files, out / "shard-000000.tar", size)
    return len(files)


def baseline_split(src: Path, out: Path, procs: int = 2, size: int = 64) -> int:
    """The plain loop split by hand over `procs` forked processes, every procs-th file each,
    into a tar each: what perfectly even parallel work gets from this machine's cores at the
    time (on a shared VM, two processes may run at less than twice one's rate), the ceiling
    for any 2-process ratio measured beside it."""
    import multiprocessing as mp

    files = sorted(p for p in src.rglob("*") if p.is_file())
    out.mkdir(parents=True)
    ctx = mp.get_context("fork")
    workers = [
        ctx.Process(target=_plain, args=(files[i::procs], out / f"shard-{i:06d}.tar", size, i))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    return len(files)


def _plain(files: list[Path], tar_path: Path, size: int = 64, part: int = 0) -> None:
    """The per-file work of `featx ingest` for images, written plainly, into one tar."""
    with tarfile.open(tar_path, "w") as tar:
        for i, p in enumerate(files):
            im = Image.open(p)
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("cls", p.parent.name.encode())):
                ti = tarfile.TarInfo(f"{part:02d}{i:08d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def featx_ingest(src: Path, out: Path, workers: int) -> int:
    from featx.config import IngestConfig
    from featx.ingest import ingest

    s = ingest(IngestConfig.parse(src=src, out=out, workers=workers, image_size=64))
    return s.total


def _own_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed(fn, *args, tree: bool = True) -> tuple[float, int, float]:
    """Seconds, result and peak PSS (MB) of the process tree (or this process) while fn ran."""
    with TreeMemory(every_s=0.2, tree=tree) as mem:
        t0 = time.perf_counter()
        n = fn(*args)
        sec = time.perf_counter() - t0
    return sec, n, mem.peak_pss_mb


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--scales",
        default="1",
        help="data sizes as multiples of --n, comma-separated; above 1 only featx (2 processes) "
        "runs, once per repeat",
    )
    ap.add_argument("--workdir", type=Path, help="Keep generated photos here (default: temp).")
    ap.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = ap.parse_args()
    scales = sorted({int(s) for s in args.scales.split(",")} | {1})
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-ingest-"))
    work = args.workdir or tmp
    work.mkdir(parents=True, exist_ok=True)
    try:
        srcs = {k: source(work, args.n * k) for k in scales}
        src, mb = srcs[1]
        # The first ingest of a process also starts multiprocessing's forkserver and imports
        # the decoders in it (about 2 s): a one-off cost, reported apart, that would otherwise
        # land on whichever variant runs first.
        first_call_s, _, _ = timed(featx_ingest, source(work, 8)[0], tmp / "warm-up", 2)
        runs: dict[str, list[float]] = {"baseline": [], "featx_1": [], "featx_2": []}
        mem: dict[str, list[float]] = {k: [] for k in runs}
        growth: dict[int, dict[str, list[float]]] = {k: {"s": [], "mb": []} for k in scales[1:]}
        base_top: list[float] = []  # the baseline at the largest size, for steady-state rates
        split_top: list[float] = []  # the plain loop on 2 processes, at the largest size
        per_run: list[dict] = []  # each repeat's steady-state rates, against its own baselines
        for r in range(args.repeats):
            for name, fn, extra in (
                ("baseline", baseline, ()),
                ("featx_1", featx_ingest, (1,)),
                ("featx_2", featx_ingest, (2,)),
            ):
                out = tmp / f"{name}-{r}"
                # The baseline is one process; its tree would count featx's idle forkserver.
                sec, n, peak = timed(fn, src, out, *extra, tree=name != "baseline")
                assert n == args.n, (name, n)
                runs[name].append(sec)
                mem[name].append(peak)
                shutil.rmtree(out)
            for k in scales[1:]:
                out = tmp / f"featx_2-{k}x-{r}"
                sec, n, peak = timed(featx_ingest, srcs[k][0], out, 2)
                assert n == args.n * k, (k, n)
                growth[k]["s"].append(sec)
                growth[k]["mb"].append(peak)
                shutil.rmtree(out)
                if k == scales[-1] and r == 0:
                    # The parent's own CPU (main thread and the pool's threads), in a run of its
                    # own: the memory sampler above is a thread of this process too.
                    out = tmp / f"featx_2-{k}x-cpu"
                    cpu0 = _own_cpu_s()
                    featx_ingest(srcs[k][0], out, 2)
                    parent_cpu_s = _own_cpu_s() - cpu0
                    shutil.rmtree(out)
                if k == scales[-1]:
                    out = tmp / f"baseline-{k}x-{r}"
                    sec, n, _ = timed(baseline, srcs[k][0], out, tree=False)
                    base_top.append(sec)
                    shutil.rmtree(out)
                    out = tmp / f"split-{k}x-{r}"
                    sec, n, _ = timed(baseline_split, srcs[k][0], out, tree=False)
                    assert n == args.n * k, ("split", n)
                    split_top.append(sec)
                    shutil.rmtree(out)
                    extra = args.n * (k - 1)
                    per_run.append(
                        {
                            "baseline": extra / (base_top[-1] - runs["baseline"][-1]),
                            "featx_2": extra / (growth[k]["s"][-1] - runs["featx_2"][-1]),
                            # the plain loop and its split have no fixed cost to speak of
                            # (a fork), so their ratio needs no difference of two runs
                            "ceiling": base_top[-1] / split_top[-1],
                        }
                    )
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
            **{f"{k}_peak_pss_mb": statistics.median(v) for k, v in mem.items()},
            "featx_first_call_s": round(first_call_s, 2),
            "repeats": args.repeats,
            # Cost growth of featx with 2 processes: seconds and peak PSS at each data size.
            "scales": {
                f"{k}x": {
                    "samples": args.n * k,
                    "input_mb": round(srcs[k][1], 1),
                    "seconds": round(statistics.median(g["s"]), 3),
                    "peak_pss_mb": statistics.median(g["mb"]),
                }
                for k, g in [(1, {"s": runs["featx_2"], "mb": mem["featx_2"]}), *growth.items()]
            },
            "seconds_runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        }
        if base_top:
            # Steady state: the extra samples of the largest size over the extra seconds, so
            # the fixed costs (pool start, first decodes, card) cancel, as for extract.
            k, extra = scales[-1], args.n * (scales[-1] - 1)
            f_top = statistics.median(growth[k]["s"])
            result["steady"] = {
                "scale": f"{k}x",
                "baseline_samples_per_s": round(
                    extra / (statistics.median(base_top) - med["baseline"]), 1
                ),
                "featx_2_samples_per_s": round(extra / (f_top - med["featx_2"]), 1),
                "featx_2_fixed_s": round(
                    med["featx_2"] - args.n * (f_top - med["featx_2"]) / extra, 3
                ),
                "baseline_fixed_s": round(
                    med["baseline"]
                    - args.n * (statistics.median(base_top) - med["baseline"]) / extra,
                    3,
                ),
                "plain_split_2_samples_per_s": round(args.n * k / statistics.median(split_top), 1),
                "plain_1_samples_per_s": round(args.n * k / statistics.median(base_top), 1),
                # CPU seconds of the process that runs ingest (not its pool's), per 1000 inputs
                "featx_2_parent_cpu_s_per_1000": round(parent_cpu_s * 1000 / (args.n * k), 3),
                # Each repeat against the baselines timed in it (the machine's speed drifts).
                "per_run": [{k: round(v, 3) for k, v in pr.items()} for pr in per_run],
            }
        return emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
