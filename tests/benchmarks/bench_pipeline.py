"""Pipeline overhead of Prefect: the pipeline flow against the same library calls made directly.

Each variant runs in a fresh process on a fresh work folder (so Ray and Prefect start-up are
inside the measurement). Prefect's fixed start-up is measured apart with an empty flow, and the
ratio is reported with and without it. Usage:
    python tests/benchmarks/bench_pipeline.py [--epochs 4] [--repeats 1] [--src data/images]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DIRECT = """
import sys
from featx.pipeline import PipelineConfig, run_pipeline
run_pipeline(PipelineConfig.parse(src=sys.argv[1], workdir=sys.argv[2], epochs=int(sys.argv[3])))
"""

PREFECT = """
import sys
from flows.runtime import ensure_database, use_prefect_home
use_prefect_home(sys.argv[2] + "-prefect")
ensure_database()
from featx.pipeline import PipelineConfig
from flows.pipeline import pipeline_flow
pipeline_flow(PipelineConfig.parse(src=sys.argv[1], workdir=sys.argv[2], epochs=int(sys.argv[3])))
"""

EMPTY_FLOW = """
import sys
from flows.runtime import ensure_database, use_prefect_home
use_prefect_home(sys.argv[2] + "-prefect")
ensure_database()
from prefect import flow
flow(lambda: None, name="empty")()
"""


def timed(code: str, src: Path, work: Path, epochs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(src), str(work), str(epochs)],
        check=True,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", type=Path, default=REPO / "data" / "images")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-pipeline-"))
    runs: dict[str, list[float]] = {"direct": [], "prefect": [], "prefect_empty_flow": []}
    try:
        for r in range(args.repeats):
            for name, code in (
                ("direct", DIRECT),
                ("prefect", PREFECT),
                ("prefect_empty_flow", EMPTY_FLOW),
            ):
                runs[name].append(timed(code, args.src, tmp / f"{name}-{r}", args.epochs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    fixed = med["prefect_empty_flow"]
    result = {
        "stage": "pipeline",
        "src": str(args.src),
        "epochs": args.epochs,
        "cores": os.cpu_count(),
        "direct_s": round(med["direct"], 1),
        "prefect_s": round(med["prefect"], 1),
        "prefect_fixed_startup_s": round(fixed, 1),
        "ratio_prefect_vs_direct": round(med["prefect"] / med["direct"], 3),
        "ratio_without_fixed_startup": round((med["prefect"] - fixed) / med["direct"], 3),
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
