"""The pipeline end to end: Prefect's overhead, and the wall time of the main command.

Default (compare): the pipeline flow against the same library calls made directly. Each variant
runs in a fresh process on a fresh work folder (so Ray and Prefect start-up are inside the
measurement). Prefect's fixed start-up is measured apart with an empty flow, and the ratio is
reported with and without it.

--demo: the README's main command, `featx demo --out DIR` (what `make demo` runs), in a fresh
process on a fresh DIR, through featx's own entry point (`featx.cli.main`) with timers wrapped
around the calls that start things: Prefect's database upgrade and temporary API server, Ray's
init and shutdown, the imports, each flow and each stage. Prints the wall time, where it went,
and the share that is Ray and Prefect start-up; peak memory is the PSS of the process tree.

Usage:
    python tests/benchmarks/bench_pipeline.py [--epochs 4] [--repeats 1] [--src data/images]
    python tests/benchmarks/bench_pipeline.py --demo [--modalities images,text,audio]
        [--demo-epochs 8] [--json F]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import Spans, TreeMemory, emit, reap

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


def compare(args) -> dict:
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
    return {
        "stage": "pipeline",
        "mode": "compare",
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


# ---------------------------------------------------------------------------------------------
# --demo: the main command, timed from the inside


def demo_child(events_path: Path, demo_argv: list[str]) -> None:
    """Run `featx demo ...` in this process with timers on what starts things; at exit write
    the timings to `events_path`. Wrapping changes no behaviour: each wrapper calls the
    original with the same arguments, in the same order."""
    perf0, wall0 = time.perf_counter(), time.time()
    spans = Spans()
    marks: dict[str, float] = {}

    def write_events() -> None:  # registered first, so it runs after every other exit handler
        marks["exit_done"] = time.perf_counter()
        calls = []
        for c in spans.calls:
            if c["name"] == "prefect.server_start" and c["seconds"] < 0.01:
                continue  # every API client checks the server; only the first call starts it
            call = {
                "name": c["name"],
                "start": round(c["start"] - perf0, 3),
                "seconds": round(c["seconds"], 3),
            }
            if hasattr(c.get("result"), "to_dict"):  # TrainResult, ExtractSummary
                call["result"] = c["result"].to_dict()
            calls.append(call)
        rel = {k: round(v - perf0, 3) for k, v in marks.items()}
        events_path.write_text(json.dumps({"wall0": wall0, "marks": rel, "calls": calls}))

    atexit.register(write_events)

    import flows.runtime as runtime  # no Prefect import: it only sets up PREFECT_HOME

    original_ensure = runtime.ensure_database

    def ensure_database(*args, **kwargs):
        # The demo calls this after use_prefect_home, just before it imports the flows: the
        # first moment Prefect may be imported (PREFECT_HOME must be set before).
        marks["cli_ready"] = time.perf_counter()
        t0 = time.perf_counter()
        original_ensure(*args, **kwargs)
        spans.calls.append(
            {"name": "prefect.database_upgrade", "start": t0, "seconds": time.perf_counter() - t0}
        )
        _instrument(spans, marks)

    runtime.ensure_database = ensure_database
    from featx.cli import main

    sys.argv = ["featx", *demo_argv]
    code = 0
    try:
        main()
    except SystemExit as e:  # click exits with the command's status
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    marks["main_returned"] = time.perf_counter()
    sys.exit(code)


def _instrument(spans: Spans, marks: dict) -> None:
    """Import what the flows import (timed), then wrap the calls the breakdown needs."""
    t0 = time.perf_counter()
    import flows.pipeline

    t1 = time.perf_counter()
    import ray

    import featx.extract
    import featx.ingest
    import featx.probe
    import featx.train

    t2 = time.perf_counter()
    # The API server's module (FastAPI, SQLAlchemy, ...): the first flow would import it to
    # start the temporary server.
    from prefect.server.api.server import SubprocessASGIServer

    t3 = time.perf_counter()
    spans.calls.append({"name": "import.prefect_and_flows", "start": t0, "seconds": t1 - t0})
    spans.calls.append({"name": "import.stages_torch_ray", "start": t1, "seconds": t2 - t1})
    spans.calls.append({"name": "import.prefect_server", "start": t2, "seconds": t3 - t2})

    spans.wrap(SubprocessASGIServer, "start", "prefect.server_start")
    # Prefect registers the bound `stop` for exit when the server starts, so this wrapper is
    # what runs at exit.
    spans.wrap(SubprocessASGIServer, "stop", "prefect.server_stop")
    spans.wrap(ray, "init", "ray.init")
    spans.wrap(featx.ingest, "ingest", "stage.ingest")
    spans.wrap(featx.train, "train", "stage.train", keep_result=True)
    spans.wrap(featx.extract, "extract", "stage.extract", keep_result=True)
    spans.wrap(featx.probe, "probe", "stage.probe")
    flow, registered = flows.pipeline.pipeline_flow, []

    def pipeline_flow(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return flow(*args, **kwargs)
        finally:
            spans.calls.append({"name": "flow", "start": t0, "seconds": time.perf_counter() - t0})
            if not registered:
                # Registered after Ray's and Prefect's exit handlers, so it runs before them:
                # from here to the end of the process is shutdown.
                atexit.register(lambda: marks.setdefault("exit_start", time.perf_counter()))
                registered.append(True)

    flows.pipeline.pipeline_flow = pipeline_flow


def demo(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-demo-"))
    out, events, log = tmp / "demo", tmp / "events.json", tmp / "demo.log"
    demo_argv = ["demo", "--out", str(out)]
    if args.modalities:
        demo_argv += ["--modalities", args.modalities]
    if args.demo_epochs:
        demo_argv += ["--epochs", str(args.demo_epochs)]
    cmd = [sys.executable, __file__, "--demo-child", str(events), "--", *demo_argv]
    try:
        with open(log, "w") as f:
            t_spawn = time.time()
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            with TreeMemory(child.pid, every_s=0.5) as mem:
                try:
                    rc = child.wait(timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    child.kill()
                    rc = child.wait()
            wall = time.perf_counter() - t0
        leftovers = reap(mem.seen)
        if rc != 0 or not events.exists():
            tail = log.read_text()[-4000:] if log.exists() else ""
            raise RuntimeError(f"`featx {' '.join(demo_argv)}` failed (exit {rc}):\n{tail}")
        ev = json.loads(events.read_text())
        result = breakdown(ev, wall, ev["wall0"] - t_spawn)
        result.update(
            {
                "stage": "pipeline",
                "mode": "demo",
                "command": "featx " + " ".join(demo_argv[:1] + demo_argv[3:] + ["--out", "DIR"]),
                "cores": os.cpu_count(),
                "peak_pss_mb": mem.peak_pss_mb,
                "peak_rss_mb": mem.peak_rss_mb,
                # processes of the demo still running 3 s after it exited (ended here)
                "processes_left_behind": leftovers,
            }
        )
        return result
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def breakdown(ev: dict, wall: float, interpreter_s: float) -> dict:
    """Where the demo's wall time went, from the child's timers."""
    calls, marks = ev["calls"], ev["marks"]

    def total(name: str) -> float:
        return sum(c["seconds"] for c in calls if c["name"] == name)

    flows_ = [c for c in calls if c["name"] == "flow"]
    per_dataset = []
    for fl in flows_:
        lo, hi = fl["start"], fl["start"] + fl["seconds"]
        inside = [c for c in calls if lo <= c["start"] <= hi and c is not fl]
        probes = [c for c in inside if c["name"] == "stage.probe"]

        def in_probe(c, probes=probes):
            return any(p["start"] <= c["start"] <= p["start"] + p["seconds"] for p in probes)

        stage = {
            "ingest": sum(c["seconds"] for c in inside if c["name"] == "stage.ingest"),
            "train": sum(c["seconds"] for c in inside if c["name"] == "stage.train"),
            "extract": sum(
                c["seconds"] for c in inside if c["name"] == "stage.extract" and not in_probe(c)
            ),
            "probe": sum(c["seconds"] for c in probes),
        }
        epochs = sum(
            m.get("epoch_seconds", 0)
            for c in inside
            if c["name"] == "stage.train"
            for m in c.get("result", {}).get("metrics", [])
        )
        server = sum(c["seconds"] for c in inside if c["name"] == "prefect.server_start")
        # Ray starts inside the first stage that needs it (train) and stays up
        ray_init = sum(c["seconds"] for c in inside if c["name"] == "ray.init")
        per_dataset.append(
            {
                "flow_s": round(fl["seconds"], 1),
                **{f"{k}_s": round(v, 1) for k, v in stage.items()},
                "train_epochs_s": round(epochs, 1),
                # Ray Train's set-up, validation and checkpoints (Ray's own start-up apart)
                "train_outside_epochs_s": round(stage["train"] - epochs - ray_init, 1),
                "prefect_server_start_s": round(server, 1),
                "ray_init_s": round(ray_init, 1),
                # the flow's own cost: task orchestration, persisted results, artifacts
                "prefect_flow_overhead_s": round(fl["seconds"] - sum(stage.values()) - server, 1),
            }
        )
    exit_s = marks.get("exit_done", 0) - marks.get("exit_start", marks.get("main_returned", 0))
    prefect_stop = total("prefect.server_stop")
    parts = {
        "interpreter_start_s": interpreter_s,
        "cli_imports_s": marks.get("cli_ready", 0),
        "prefect_import_s": total("import.prefect_and_flows") + total("import.prefect_server"),
        "prefect_database_upgrade_s": total("prefect.database_upgrade"),
        "prefect_server_start_s": total("prefect.server_start"),
        "prefect_server_stop_s": prefect_stop,
        "stage_imports_s": total("import.stages_torch_ray"),
        "ray_init_s": total("ray.init"),
        "ray_shutdown_s": max(0.0, exit_s - prefect_stop),
    }
    # The flows' own time: the server start and ray.init happen inside the first flow.
    parts["flows_less_startup_s"] = (
        sum(c["seconds"] for c in flows_) - parts["prefect_server_start_s"] - parts["ray_init_s"]
    )
    parts["other_s"] = wall - sum(parts.values())  # gaps between the timed parts, teardown
    prefect = sum(v for k, v in parts.items() if k.startswith("prefect_"))
    ray_s = parts["ray_init_s"] + parts["ray_shutdown_s"]
    stages = {
        k: sum(d[f"{k}_s"] for d in per_dataset) for k in ("ingest", "train", "extract", "probe")
    }
    return {
        "wall_s": round(wall, 1),
        "datasets": len(per_dataset),
        "startup_ray_prefect_s": round(prefect + ray_s, 1),
        "startup_share": round((prefect + ray_s) / wall, 3),
        "prefect_startup_s": round(prefect, 1),
        "ray_startup_s": round(ray_s, 1),
        "parts": {k: round(v, 2) for k, v in parts.items()},
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "train_outside_epochs_s": round(sum(d["train_outside_epochs_s"] for d in per_dataset), 1),
        "prefect_flow_overhead_s": round(sum(d["prefect_flow_overhead_s"] for d in per_dataset), 1),
        "per_dataset": per_dataset,
    }


def main() -> dict:
    if len(sys.argv) > 2 and sys.argv[1] == "--demo-child":
        demo_child(Path(sys.argv[2]), sys.argv[4:])
        return {}
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, default=REPO / "data" / "images")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demo", action="store_true", help="Time `featx demo` instead (see above).")
    ap.add_argument("--modalities", help="--demo: sample datasets (default: the demo's, all 3).")
    ap.add_argument("--demo-epochs", type=int, help="--demo: epochs (default: the demo's, 8).")
    ap.add_argument("--timeout", type=float, default=1200, help="--demo: seconds before a kill.")
    ap.add_argument("--keep", action="store_true", help="--demo: keep the demo folder and log.")
    ap.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = ap.parse_args()
    return emit(demo(args) if args.demo else compare(args), args.json)


if __name__ == "__main__":
    main()
