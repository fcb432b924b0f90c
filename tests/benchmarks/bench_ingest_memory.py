"""Ingest memory against the number of inputs: `featx ingest` of N tiny text files, peak RSS.

Each size is a fresh `featx ingest SRC OUT` (local process pool, the default) in a subprocess
whose whole process tree (the CLI and its decode workers) is sampled every 0.2 s: the peak of
the summed RSS is what a user's machine sees; PSS (shared pages split) and the largest single
process's peak (`ru_maxrss`, from wait4) are printed beside it. Inputs are a few words each,
from a 1000-word vocabulary, in 4 class folders of 1000-file subfolders, ~1% exact duplicates.
Then the same command again on the same output (a re-run: nothing to add, every finished shard
checked against SRC). The goal is flat: peak RSS the same at every size, under 1 GB at 1M inputs.
Usage: python tests/benchmarks/bench_ingest_memory.py [--sizes 10000,100000] [--json F]
       [--workdir DIR (keeps the generated inputs for the next run)] [--workers 2] [--no-rerun]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import TreeMemory, emit, machine_info

CLASSES = 4
PER_FOLDER = 1000
# A fixed vocabulary: text of N inputs has a bounded number of distinct words, as real text
# nearly does, so the tokenizer that text ingest fits measures ingest, not an ever-growing
# vocabulary of made-up words.
WORDS = [hashlib.sha256(str(i).encode()).hexdigest()[: 3 + i % 6] for i in range(1000)]


def text_of(i: int) -> str:
    """Input i's text: 6 to 11 words picked by a hash of i; every 100th repeats input i - 1."""
    if i % 100 == 99:
        i -= 1
    h = hashlib.sha256(i.to_bytes(8, "big")).digest()
    n = 6 + h[0] % 6
    return " ".join(WORDS[int.from_bytes(h[1 + 2 * k : 3 + 2 * k], "big") % 1000] for k in range(n))


def rel_path(i: int) -> str:
    return f"class{i % CLASSES}/{i // (CLASSES * PER_FOLDER):05d}/{i:07d}.txt"


def make_inputs(root: Path, n: int) -> Path:
    """A class-folder tree of n tiny text files under root/src-n (kept if already complete)."""
    src, done = root / f"src-{n}", root / f"src-{n}.complete"
    if done.exists():
        return src
    tmp = root / f".src-{n}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    made: set[str] = set()
    for i in range(n):
        path = tmp / rel_path(i)
        folder = str(path.parent)
        if folder not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        path.write_text(text_of(i) + "\n")
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    done.touch()
    return src


def run_ingest(src: Path, out: Path, workers: int, log: Path) -> dict:
    """`featx ingest src out` in a subprocess: wall seconds and the tree's peak memory."""
    featx = Path(sys.executable).parent / "featx"
    cmd = [str(featx), "ingest", str(src), str(out), "--workers", str(workers)]
    cmd += ["--summary-json", str(out.parent / f"{out.name}.summary.json")]
    with open(log, "w") as f:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        with TreeMemory(child.pid, every_s=0.2) as mem:
            _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"featx ingest failed ({child.returncode}); log {log}:\n{tail}")
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": mem.peak_rss_mb,
        "peak_pss_mb": mem.peak_pss_mb,
        # Linux reports ru_maxrss in KiB: the largest single process of the tree
        "max_process_rss_mb": round(usage.ru_maxrss / 1024, 1),
        # CPU of the CLI and of the processes it waited for (its decode pool's, through the
        # forkserver): what the run cost, less sensitive than wall time to a busy machine
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "memory_samples": mem.samples,
    }


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10000,100000", help="Input counts, comma-separated.")
    ap.add_argument("--workers", type=int, default=2, help="featx ingest --workers.")
    ap.add_argument("--workdir", type=Path, help="Keep generated inputs here (default: temp).")
    ap.add_argument("--json", type=Path, help="Also write the result to this file.")
    ap.add_argument("--no-rerun", action="store_true", help="Skip the re-run of each size.")
    args = ap.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-ingest-memory-"))
    work = args.workdir or tmp
    work.mkdir(parents=True, exist_ok=True)
    points = []
    try:
        for n in sizes:
            t0 = time.perf_counter()
            src = make_inputs(work, n)
            made_s = time.perf_counter() - t0
            out = tmp / f"out-{n}"
            p = run_ingest(src, out, args.workers, tmp / f"ingest-{n}.log")
            p = {"inputs": n, **p, "inputs_per_s": round(n / p["seconds"], 1)}
            p["inputs_made_s"] = round(made_s, 1)
            summary = json.loads((tmp / f"out-{n}.summary.json").read_text())
            p["samples"], p["rejected"] = summary["total"], sum(summary["rejected"].values())
            if not args.no_rerun:
                again = run_ingest(src, out, args.workers, tmp / f"ingest-{n}-rerun.log")
                p["rerun"] = again
            points.append(p)
            shutil.rmtree(out)
            print(
                f"{n:>9} inputs: {p['seconds']:8.1f} s, {p['inputs_per_s']:8.0f} inputs/s, "
                f"peak RSS {p['peak_rss_mb']:7.0f} MB (PSS {p['peak_pss_mb']:.0f} MB, largest "
                f"process {p['max_process_rss_mb']:.0f} MB)"
                + (
                    f"; re-run {p['rerun']['seconds']:.1f} s, {p['rerun']['peak_rss_mb']:.0f} MB"
                    if "rerun" in p
                    else ""
                ),
                flush=True,
            )
        small = points[0]
        for p in points:
            p["rss_vs_smallest"] = round(p["peak_rss_mb"] / small["peak_rss_mb"], 2)
        print(
            "\npeak RSS: summed over the process tree (the CLI and its decode workers), sampled "
            "every 0.2 s; largest process: ru_maxrss"
        )
        print(
            "| inputs | wall s | inputs/s | peak RSS MB | vs smallest | PSS MB | largest MB "
            "| re-run s | re-run peak RSS MB | re-run largest MB |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for p in points:
            again = p.get("rerun", {})
            print(
                f"| {p['inputs']} | {p['seconds']:.1f} | {p['inputs_per_s']:.0f} | "
                f"{p['peak_rss_mb']:.0f} | {p['rss_vs_smallest']:.2f} | {p['peak_pss_mb']:.0f} "
                f"| {p['max_process_rss_mb']:.0f} | {again.get('seconds', '-')} "
                f"| {again.get('peak_rss_mb', '-')} | {again.get('max_process_rss_mb', '-')} |"
            )
        result = {
            "stage": "ingest_memory",
            "modality": "text",
            "workers": args.workers,
            "cores": os.cpu_count(),
            "machine": machine_info(),
            "points": points,
        }
        return emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
