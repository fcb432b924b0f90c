"""The benchmark suite (`make bench`): every stage against its baseline, medians, cost growth.

Each repeat of each stage is one run of its script (bench_<stage>.py) in a fresh process tree;
the script measures featx and its plain baseline side by side and writes JSON; the suite takes
medians over the repeats, computes the ratios, checks the targets, and writes
tests/benchmarks/results.json and results.md (rewritten, atomically, after every run, so a
crash keeps what was measured). Data sizes 2x and 4x (cost growth) run in the first repeat.

    python tests/benchmarks/suite.py                 # the full suite, ~35 min on 2 idle cores
    python tests/benchmarks/suite.py --quick         # tiny sizes, 1 repeat: checks the harness
    python tests/benchmarks/suite.py --stages ingest,extract --repeats 5
    python tests/benchmarks/suite.py --stages ingest_memory --merge \
        --ingest-memory-sizes 10000,100000,1000000   # one stage into the existing results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import TreeMemory, machine_info, reap, write_json, write_text
from report import markdown, num, rate

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STAGES = ("ingest", "ingest_memory", "train", "extract", "pipeline", "quality")

# Per stage: script, arguments of the first repeat (with the cost-growth sizes) and of the
# others, repeats, the estimate on 2 idle cores (seconds, whole stage with data generation;
# from the README's per-run figures and the quick runs), and a time limit per run against hangs
# (generous: a shared machine runs several times slower). Full sizes follow the README's
# Performance commands, except extract at 1500 images (README 2000) to fit in 15 minutes.
PLANS = {
    "full": {
        "ingest": {
            "script": "bench_ingest.py",
            "first": ["--n", "600", "--repeats", "1", "--scales", "1,2,4"],
            # 4x in every repeat, and two repeats in each later run: 5 paired steady-state
            # ratios, each from two short runs' difference (+-0.3 s on ~3 s moves one a lot)
            "rest": ["--n", "600", "--repeats", "2", "--scales", "1,4"],
            "repeats": 3,
            "estimate_s": 130,
            "timeout_s": 900,
        },
        "ingest_memory": {
            "script": "bench_ingest_memory.py",  # 1M inputs: --ingest-memory-sizes (~25 min)
            "first": ["--sizes", "10000,100000"],
            "rest": ["--sizes", "10000,100000"],
            "repeats": 1,
            "estimate_s": 200,
            "timeout_s": 1800,
        },
        "train": {
            "script": "bench_train.py",
            "first": ["--per-class", "300", "--epochs", "5", "--loaders", "shards"]
            + ["--scales", "1,2,4"],
            "rest": ["--per-class", "300", "--epochs", "5", "--loaders", "shards"]
            + ["--scales", "1"],
            "repeats": 3,
            "estimate_s": 270,
            "timeout_s": 1500,
        },
        "extract": {
            "script": "bench_extract.py",
            "first": ["--n", "1500", "--repeats", "1", "--scales", "1,2,4"],
            "rest": ["--n", "1500", "--repeats", "1", "--scales", "1,4"],
            "repeats": 3,
            "estimate_s": 205,
            "timeout_s": 1500,
        },
        "pipeline": {
            "script": "bench_pipeline.py",
            "first": ["--demo", "--timeout", "1700"],  # `featx demo` as is: 3 datasets, 8 epochs
            "rest": ["--demo", "--timeout", "1700"],
            "repeats": 1,
            "estimate_s": 230,
            "timeout_s": 1800,
        },
        "quality": {
            # every corpus x family with featx's defaults, supervised and without labels
            "script": "bench_quality.py",
            "first": ["--objectives", "supervised,contrastive"],
            "rest": ["--objectives", "supervised,contrastive"],
            "repeats": 1,
            "estimate_s": 3300,
            "timeout_s": 9000,
        },
    },
    "quick": {
        "ingest": {
            "script": "bench_ingest.py",
            "first": ["--n", "100", "--repeats", "1", "--scales", "1,2,4"],
            "rest": ["--n", "100", "--repeats", "1", "--scales", "1"],
            "repeats": 1,
            "estimate_s": 15,
            "timeout_s": 300,
        },
        "ingest_memory": {
            "script": "bench_ingest_memory.py",
            "first": ["--sizes", "2000,4000"],
            "rest": ["--sizes", "2000,4000"],
            "repeats": 1,
            "estimate_s": 15,
            "timeout_s": 300,
        },
        "train": {
            "script": "bench_train.py",
            "first": ["--per-class", "24", "--epochs", "2", "--loaders", "shards"]
            + ["--scales", "1,2,4"],
            "rest": ["--per-class", "24", "--epochs", "2", "--loaders", "shards"]
            + ["--scales", "1"],
            "repeats": 1,
            "estimate_s": 75,
            "timeout_s": 500,
        },
        "extract": {
            "script": "bench_extract.py",
            "first": ["--n", "200", "--repeats", "1", "--scales", "1,2,4"],
            "rest": ["--n", "200", "--repeats", "1", "--scales", "1,4"],
            "repeats": 1,
            "estimate_s": 50,
            "timeout_s": 500,
        },
        "pipeline": {
            "script": "bench_pipeline.py",
            "first": ["--demo", "--modalities", "images", "--demo-epochs", "1"],
            "rest": ["--demo", "--modalities", "images", "--demo-epochs", "1"],
            "repeats": 1,
            "estimate_s": 55,
            "timeout_s": 500,
        },
        "quality": {
            "script": "bench_quality.py",
            "first": ["--corpora", "digits", "--models", "cnn", "--epochs", "2"]
            + ["--objectives", "supervised,contrastive"],
            "rest": ["--corpora", "digits", "--models", "cnn", "--epochs", "2"]
            + ["--objectives", "supervised,contrastive"],
            "repeats": 1,
            "estimate_s": 140,
            "timeout_s": 600,
        },
    },
}

TARGETS = {
    "ingest": 1.7,  # featx (2 processes) / single-process loop, 2 cores
    "train": 0.9,  # steady-state samples/s, featx DDP / plain loop
    "extract": 0.9,  # steady-state samples/s, featx / plain loop
    "memory_growth": 1.2,  # extract peak PSS at 4x data / at 1x: "flat"
    "startup_s": 20.0,
    "ingest_memory_mb_at_1m": 1024,  # peak RSS of `featx ingest` over 1M small inputs
}


# ---------------------------------------------------------------------------------------------
# running the stage scripts


def run_script(plan: dict, argv: list[str], json_out: Path, log: Path) -> dict:
    """One run of a stage script in its own process tree; every process it leaves is ended."""
    cmd = [sys.executable, str(HERE / plan["script"]), *argv, "--json", str(json_out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    json_out.unlink(missing_ok=True)  # a reused work folder must not pass off an old result
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        child = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        with TreeMemory(child.pid, every_s=0.5, memory=False) as watch:
            try:
                rc = child.wait(timeout=plan["timeout_s"])
            except subprocess.TimeoutExpired:
                _stop(child)
                rc = None
            except KeyboardInterrupt:
                _stop(child)
                reap(watch.seen, settle_s=0)
                raise
    left = reap(watch.seen)
    if left:
        with open(log, "a") as f:
            f.write(f"\n[suite] ended processes left running: {', '.join(left)}\n")
    if rc is None:
        raise RuntimeError(f"timed out after {plan['timeout_s']} s; log: {log}")
    if rc != 0 or not json_out.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"exit status {rc}; log: {log}\n{tail}")
    result = json.loads(json_out.read_text())
    result["_left_running"] = left  # processes the run left behind (ended by the suite)
    return result


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM the run's process group (it has its own session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# per-stage summaries: medians, ratios, targets, cost growth


def med(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def row(stage, figure, baseline, featx, ratio=None, target=None, met=None, note="") -> dict:
    return {
        "stage": stage,
        "figure": figure,
        "baseline": baseline,
        "featx": featx,
        "ratio": None if ratio is None else round(ratio, 2),
        "target": target,
        "met": met,
        "note": note,
    }


def growth_rows(stage: str, points: dict[str, dict]) -> list[dict]:
    """Cost growth: seconds and peak PSS at each data size, relative to 1x."""
    one = points.get("1x")
    out = []
    for scale, p in sorted(points.items(), key=lambda kv: int(kv[0][:-1])):
        out.append(
            {
                "stage": stage,
                "scale": scale,
                "samples": p["samples"],
                "seconds": round(p["seconds"], 2),
                "time_vs_1x": round(p["seconds"] / one["seconds"], 2) if one else None,
                "peak_pss_mb": p.get("peak_pss_mb"),
                "memory_vs_1x": (
                    round(p["peak_pss_mb"] / one["peak_pss_mb"], 2)
                    if one and p.get("peak_pss_mb") and one.get("peak_pss_mb")
                    else None
                ),
                "note": p.get("note", ""),
            }
        )
    return out


def summarise_ingest(runs: list[dict]) -> dict:
    n, t = runs[0]["files"], TARGETS["ingest"]
    base, f1, f2 = (med(runs, f"{k}_samples_per_s") for k in ("baseline", "featx_1", "featx_2"))
    steadies = [r["steady"] for r in runs if r.get("steady")]
    rows = []
    if steadies:
        steady = {
            k: statistics.median(s[k] for s in steadies) if k != "scale" else steadies[0][k]
            for k in steadies[0]
            if k != "per_run"
        }
        sb, sf = steady["baseline_samples_per_s"], steady["featx_2_samples_per_s"]
        # Each run against the baseline timed in it, as for train and extract.
        pairs = [pr for s_ in steadies for pr in s_.get("per_run", [])]
        ratios = [pr["featx_2"] / pr["baseline"] for pr in pairs]
        ratio = statistics.median(ratios) if ratios else sf / sb
        how = (
            "ratio: median of the runs' ratios (" + ", ".join(f"{r:.2f}" for r in ratios) + ")"
            if pairs
            else f"median of {len(steadies)}"
        )
        rows.append(
            row(
                "ingest",
                f"steady-state samples/s, JPEG photos 640x480 -> 64 px ({steady['scale']} minus "
                f"1x run): 2 processes vs a 1-process loop; {how}",
                f"{sb:.0f}/s",
                f"{sf:.0f}/s",
                ratio,
                f">= {t}",
                ratio >= t,
            )
        )
        if pairs:
            ceiling = statistics.median(pr["ceiling"] for pr in pairs)
            rows.append(
                row(
                    "ingest",
                    f"the machine's ceiling for that ratio: the plain loop split by hand over 2 "
                    f"processes vs 1 process, {steady['scale']} runs in the same repeats (per-run "
                    + ", ".join(f"{pr['ceiling']:.2f}" for pr in pairs)
                    + ")",
                    f"{steady['plain_1_samples_per_s']:.0f}/s",
                    f"{steady['plain_split_2_samples_per_s']:.0f}/s",
                    ceiling,
                )
            )
            shares = [pr["featx_2"] / pr["baseline"] / pr["ceiling"] for pr in pairs]
            rows.append(
                row(
                    "ingest",
                    "featx's ratio over the ceiling, run by run (1.00: featx gets all that "
                    "perfectly even work got from the two cores at the time; per-run "
                    + ", ".join(f"{x:.2f}" for x in shares)
                    + ")",
                    "-",
                    "-",
                    statistics.median(shares),
                )
            )
        rows.append(
            row(
                "ingest",
                "fixed cost per call (s): 1x time less the steady-state work (discovery, pool "
                "start, first decodes, card)",
                f"{steady['baseline_fixed_s']:.2f}",
                f"{steady['featx_2_fixed_s']:.2f}",
            )
        )
        if "featx_2_parent_cpu_s_per_1000" in steady:
            rows.append(
                row(
                    "ingest",
                    f"CPU of the process that runs ingest (its threads, not the pool's processes) "
                    f"at {steady['scale']}, s per 1000 inputs: what it takes from the decoding "
                    "processes' cores",
                    "-",
                    f"{steady['featx_2_parent_cpu_s_per_1000']:.3f}",
                )
            )
    rows += [
        row(
            "ingest",
            f"end to end at 1x ({n} photos) incl. fixed costs, samples/s",
            f"{base:.0f}/s",
            f"{f2:.0f}/s",
            f2 / base,
        ),
        row("ingest", "scaling 1 -> 2 processes (featx)", f"{f1:.0f}/s", f"{f2:.0f}/s", f2 / f1),
        row(
            "ingest",
            "first call in a process: forkserver start + decoder imports (s)",
            "-",
            f"{med(runs, 'featx_first_call_s'):.1f}",
            note="paid once per `featx ingest`; kept out of the rates above",
        ),
    ]
    points = {k: dict(v) for k, v in runs[0]["scales"].items()}
    points["1x"]["seconds"] = statistics.median(n / r["featx_2_samples_per_s"] for r in runs)
    points["1x"]["peak_pss_mb"] = med(runs, "featx_2_peak_pss_mb")
    return {"rows": rows, "growth": growth_rows("ingest", points)}


def summarise_ingest_memory(runs: list[dict]) -> dict:
    """Peak RSS of `featx ingest` (its process tree) against the number of inputs; flat is
    the goal, under 1 GB at 1M. One run: the sizes are its points."""
    r = runs[0]
    points, m = r["points"], r["machine"]
    small, large = points[0], points[-1]
    where = f"measured {m['date'][:10]} on {m['cpu_model']}, {m['cores']} cores"
    sizes = " -> ".join(_count(p["inputs"]) for p in points)
    growth = large["peak_rss_mb"] / small["peak_rss_mb"]
    target = TARGETS["ingest_memory_mb_at_1m"]
    at_1m = next((p for p in points if p["inputs"] == 1_000_000), None)
    rows = [
        row(
            "ingest memory",
            f"peak RSS (MB) of `featx ingest` (CLI + {r['workers']} decode processes, summed), "
            f"{sizes} tiny text files; ratio: growth over the sizes",
            "-",
            " -> ".join(f"{p['peak_rss_mb']:.0f}" for p in points),
            growth,
            f"< {target} MB at 1M",
            at_1m["peak_rss_mb"] < target if at_1m else None,
            note=where
            + ("" if at_1m else "; 1M not run (--ingest-memory-sizes ...,1000000)")
            + "; largest single process "
            + " -> ".join(f"{p['max_process_rss_mb']:.0f}" for p in points),
        ),
        row(
            "ingest memory",
            f"inputs/s of the same runs ({sizes}); re-run of the same command (nothing new) s",
            "-",
            " -> ".join(f"{p['inputs_per_s']:.0f}/s" for p in points),
            note="re-runs "
            + ", ".join(f"{p['rerun']['seconds']:.0f} s" for p in points if "rerun" in p),
        ),
    ]
    growth_rows_ = [
        {
            "stage": "ingest memory",
            "scale": _count(p["inputs"]),
            "samples": p["samples"],
            "seconds": p["seconds"],
            "time_vs_1x": round(p["seconds"] / small["seconds"], 2),
            "peak_pss_mb": p["peak_pss_mb"],
            "memory_vs_1x": round(p["peak_pss_mb"] / small["peak_pss_mb"], 2),
            "note": f"tiny text files; 1x = {_count(small['inputs'])}; peak RSS "
            f"{p['peak_rss_mb']:.0f} MB",
        }
        for p in points
    ]
    return {"rows": rows, "growth": growth_rows_}


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def summarise_train(runs: list[dict]) -> dict:
    t, first = TARGETS["train"], runs[0]
    base, featx = med(runs, "baseline_samples_per_s"), med(runs, "featx_samples_per_s")
    # Each run's ratio is to the plain loop of that run (it brackets featx in time), so the
    # ratio is the median of the per-run ratios, not the ratio of the two medians.
    ratio = med(runs, "ratio")
    n, epochs = first["train_samples"], first["epochs"]
    rows = [
        row(
            "train",
            f"steady-state samples/s, cnn/small, {n} images, global batch "
            f"{first['global_batch']}: DDP {first['workers']} workers "
            f"(--loader {first['loader']}) vs a plain loop; ratio: median of {len(runs)} "
            "runs' ratios",
            f"{base:.0f}/s",
            f"{featx:.0f}/s",
            ratio,
            f">= {t}",
            ratio >= t,
            note="per-run ratios " + ", ".join(f"{r['ratio']:.2f}" for r in runs),
        )
    ]
    for name, lo in first["loaders"].items():
        if name != first["loader"]:
            rows.append(
                row(
                    "train",
                    f"the same with --loader {name} (1 run)",
                    f"{first['baseline_samples_per_s']:.0f}/s",
                    f"{lo['samples_per_s']:.0f}/s",
                    lo["samples_per_s"] / first["baseline_samples_per_s"],
                )
            )
    startup = med(runs, "featx_startup_s")
    if startup is not None:
        rows.append(
            row(
                "train",
                "start-up before epoch 1 (s): ray.init + Ray Train set-up",
                "-",
                f"{startup:.1f} ({med(runs, 'featx_ray_init_s'):.1f} + "
                f"{med(runs, 'featx_train_setup_s'):.1f})",
                target=f"< {TARGETS['startup_s']:.0f} s",
                met=startup < TARGETS["startup_s"],
            )
        )
    rows.append(
        row(
            "train",
            f"wall time outside the {epochs} timed epochs (s): start-up, validation, "
            "checkpoints, Ray shutdown",
            "-",
            f"{med(runs, 'featx_outside_epochs_s'):.1f}",
        )
    )
    points = {k: dict(v) for k, v in first["scales"].items()}
    for p in points.values():
        p["note"] = f"{epochs} epochs; {p['samples_per_s']:.0f} samples/s"
    return {"rows": rows, "growth": growth_rows("train", points)}


def summarise_extract(runs: list[dict]) -> dict:
    """Steady state as bench_extract.py computes it, over every run of the suite: the extra
    samples of the largest size over the extra seconds (best-of-N), fixed start-up cancels."""
    big = max(int(k[:-1]) for k in runs[0]["scales"])
    one, top = "1x", f"{big}x"
    n = runs[0]["scales"][one]["samples"]

    def best(kind: str, scale: str) -> float:
        return min(s for r in runs for s in r["scales"][scale][f"{kind}_seconds_runs"])

    # None when the larger run was not slower: noise swamped the extra work (sizes too small)
    steady = {
        k: (big - 1) * n / dt if (dt := best(k, top) - best(k, one)) > 0 else None
        for k in ("plain", "featx")
    }

    def at(scale: str, key: str):
        return statistics.median(r["scales"][scale][key] for r in runs if scale in r["scales"])

    t = TARGETS["extract"]
    mem1, mem4 = at(one, "featx_peak_pss_mb"), at(top, "featx_peak_pss_mb")
    growth = mem4 / mem1
    ok = steady["plain"] and steady["featx"]
    fixed = {
        k: at(one, f"{k}_seconds") - n / steady[k] if steady[k] else None
        for k in ("plain", "featx")
    }
    # Headline: the rate once running, inside each run of the largest size (rows from a third
    # to nine tenths of the way); the ratio is the median of the runs' ratios, plain and featx of
    # one run being neighbours in time. The across-runs figure (largest minus 1x) follows; its
    # start-up noise is the size of the extra work it measures.
    ratios = [x for r in runs for x in r["scales"][top]["in_run_ratio_runs"]]
    in_run = statistics.median(ratios) if ratios else None
    rows = [
        row(
            "extract",
            f"steady-state samples/s once running, cnn/small, 64 px ({big}x run, rows from a "
            f"third to nine tenths of the way); ratio: median of {len(ratios)} runs' ratios",
            rate(_median_known(runs, top, "plain_in_run_samples_per_s")),
            rate(_median_known(runs, top, "featx_in_run_samples_per_s")),
            in_run,
            f">= {t}",
            in_run >= t if ratios else None,
            note="per-run ratios " + ", ".join(f"{x:.2f}" for x in ratios)
            if ratios
            else "n/a: runs too small for a steady rate (rows computed ahead)",
        ),
        row(
            "extract",
            f"steady-state samples/s across runs ({big}x minus 1x run, best of {len(runs)})",
            rate(steady["plain"]),
            rate(steady["featx"]),
            steady["featx"] / steady["plain"] if ok else None,
            note="" if ok else f"n/a: a {big}x run was not slower than a 1x run (noise)",
        ),
        row(
            "extract",
            f"end to end at 1x ({n} images) incl. start-up (s)",
            f"{at(one, 'plain_seconds'):.1f}",
            f"{at(one, 'featx_seconds'):.1f}",
            at(one, "plain_seconds") / at(one, "featx_seconds"),
        ),
        row(
            "extract",
            "fixed start-up (s): 1x time less the steady-state work (imports, Ray, actor, model)",
            num(fixed["plain"], 1),
            num(fixed["featx"], 1),
            target=f"< {TARGETS['startup_s']:.0f} s",
            met=fixed["featx"] < TARGETS["startup_s"] if fixed["featx"] is not None else None,
        ),
    ]
    for scale in (one, top):
        rows.append(
            row(
                "extract",
                f"time to first Parquet file at {scale} (s; the plain loop writes one file at "
                "the end)",
                f"{at(scale, 'plain_first_file_seconds'):.1f}",
                f"{at(scale, 'featx_first_file_seconds'):.1f}",
                at(scale, "plain_first_file_seconds") / at(scale, "featx_first_file_seconds"),
            )
        )
    rows.append(
        row(
            "extract",
            f"peak memory, PSS of the process tree, 1x -> {big}x data (MB); ratio: growth",
            f"{at(one, 'plain_peak_pss_mb'):.0f} -> {at(top, 'plain_peak_pss_mb'):.0f}",
            f"{mem1:.0f} -> {mem4:.0f}",
            growth,
            f"flat: <= {TARGETS['memory_growth']}",
            growth <= TARGETS["memory_growth"],
        )
    )
    points = {}
    for scale in runs[0]["scales"]:
        k = len([r for r in runs if scale in r["scales"]])
        points[scale] = {
            "samples": runs[0]["scales"][scale]["samples"],
            "seconds": at(scale, "featx_seconds"),
            "peak_pss_mb": at(scale, "featx_peak_pss_mb"),
            "note": f"median of {k} run(s); plain loop {at(scale, 'plain_seconds'):.1f} s, "
            f"{at(scale, 'plain_peak_pss_mb'):.0f} MB",
        }
    return {
        "rows": rows,
        "growth": growth_rows("extract", points),
        "steady_samples_per_s": {k: v and round(v, 1) for k, v in steady.items()},
    }


def _median_known(runs: list[dict], scale: str, key: str):
    values = [r["scales"][scale].get(key) for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_pipeline(runs: list[dict]) -> dict:
    r = runs[0] if len(runs) == 1 else min(runs, key=lambda x: x["wall_s"])
    wall, startup = med(runs, "wall_s"), med(runs, "startup_ray_prefect_s")
    rows = [
        row(
            "pipeline",
            f"`{r['command']}` end to end (s; {r['datasets']} dataset(s))",
            "-",
            f"{wall:.0f}",
        ),
        row(
            "pipeline",
            "Ray + Prefect start-up in it (s, share of wall): Prefect import, database "
            "upgrade, API server; ray.init and shutdown",
            "-",
            f"{startup:.1f} ({startup / wall:.0%})",
            target=f"< {TARGETS['startup_s']:.0f} s",
            met=startup < TARGETS["startup_s"],
        ),
    ]
    return {"rows": rows, "growth": [], "breakdown": r}


def summarise_quality(runs: list[dict]) -> dict:
    """One row per corpus x family x objective: trained against the better of random init and
    classic (rows of a one-objective run have no "objectives": the row is its own)."""
    rows = []
    for r in runs[0]["rows"]:
        best = max(r["random_init"] or 0.0, r["classic"] or 0.0)
        by_objective = r.get("objectives") or {r.get("objective", "supervised"): r}
        for objective, o in by_objective.items():
            labels = "" if objective == "supervised" else f", {objective} (labels hidden)"
            rows.append(
                row(
                    "quality",
                    f"{r['corpus']} ({r['modality']}, {r['samples']} samples), {r['model']}"
                    f"{labels}: val probe accuracy with default settings ({o['epochs']} epochs)",
                    f"random {r['random_init']:.3f} / classic {r['classic']:.3f}",
                    f"{o['trained']:.3f}",
                    ratio=o["trained"] / best if best else None,
                    target="> both",
                    met=o["beats_both"],
                )
            )
    return {"rows": rows, "growth": [], "table": runs[0]["table"]}


SUMMARISE = {
    "ingest": summarise_ingest,
    "ingest_memory": summarise_ingest_memory,
    "train": summarise_train,
    "extract": summarise_extract,
    "pipeline": summarise_pipeline,
    "quality": summarise_quality,
}


HEADER = ("machine", "mode", "command", "status", "elapsed_s")


def with_header(res: dict, kept: dict | None, stages: list[str]) -> dict:
    """Under --merge, what is saved keeps the results file's own header (machine, command,
    status, time), and lists this run (its stages, machine, command) under `merged`."""
    if kept is None:
        return res
    this = {k: res.get(k) for k in HEADER} | {"stages": stages}
    return {
        **res,
        **{k: kept[k] for k in HEADER if k in kept},
        "stages": {k: res["stages"][k] for k in STAGES if k in res["stages"]},
        "merged": [*kept.get("merged", []), this],
    }


def save(res: dict, out_dir: Path) -> None:
    res["rows"] = [
        r for st in res["stages"].values() for r in st.get("summary", {}).get("rows", [])
    ]
    res["growth"] = [
        g for st in res["stages"].values() for g in st.get("summary", {}).get("growth", [])
    ]
    write_json(out_dir / "results.json", res)
    write_text(out_dir / "results.md", markdown(res))


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="Tiny sizes, 1 repeat (2-3 minutes).")
    ap.add_argument("--stages", default=",".join(STAGES), help="Comma-separated subset.")
    ap.add_argument("--repeats", type=int, help="Repeats of every stage (default: per stage).")
    ap.add_argument("--out", type=Path, default=HERE, help="Where results.json/.md go.")
    ap.add_argument("--workdir", type=Path, help="Generated data and logs (default: temp).")
    ap.add_argument("--keep-workdir", action="store_true", help="Keep data and logs after.")
    ap.add_argument(
        "--train-loaders",
        default="shards",
        help="featx loaders the first train run measures, e.g. shards,ray (+35 s on 2 cores); "
        "the first is the headline",
    )
    ap.add_argument(
        "--ingest-memory-sizes",
        help="Input counts of the ingest_memory stage, e.g. 10000,100000,1000000 (1M: ~25 min "
        "on 2 cores); default 10000,100000 (quick: 2000,4000)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="Keep the other stages of the results.json in --out and replace only the stages "
        "run now (each row then says when and where it was measured, if it differs)",
    )
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    plans = {s: dict(PLANS[mode][s]) for s in stages}
    if "train" in plans:
        first = plans["train"]["first"] = list(plans["train"]["first"])
        first[first.index("--loaders") + 1] = args.train_loaders
        rest = plans["train"]["rest"] = list(plans["train"]["rest"])
        rest[rest.index("--loaders") + 1] = args.train_loaders.split(",")[0]
    if "ingest_memory" in plans and args.ingest_memory_sizes:
        plan = plans["ingest_memory"]
        plan["first"] = plan["rest"] = ["--sizes", args.ingest_memory_sizes]
        if "1000000" in args.ingest_memory_sizes.split(","):
            plan["estimate_s"], plan["timeout_s"] = 1700, 5400
    for p in plans.values():
        if args.repeats:
            p["estimate_s"] = round(p["estimate_s"] * _repeat_factor(p, args.repeats))
            p["repeats"] = args.repeats
    t_suite = time.perf_counter()
    res: dict = {
        "machine": machine_info(),
        "mode": mode,
        "command": "python tests/benchmarks/suite.py " + " ".join(sys.argv[1:]),
        "status": "running",
        "targets": TARGETS,
        "stages": {},
    }
    kept = None  # under --merge: the results file this run's stages go into
    if args.merge and (args.out / "results.json").exists():
        kept = json.loads((args.out / "results.json").read_text())
        res["stages"] = {k: v for k, v in kept["stages"].items() if k not in stages}
    total_est = sum(p["estimate_s"] for p in plans.values())
    m = res["machine"]
    print(
        f"featx benchmarks, {mode} mode: {', '.join(stages)} on {m['cores']} cores "
        f"({m['cpu_model']}), load {m['load_average_at_start']}; estimate ~{total_est / 60:.1f} "
        f"min on 2 idle cores; work folder {work}",
        flush=True,
    )
    failed = False
    try:
        for name in stages:
            plan = plans[name]
            st = res["stages"][name] = {
                "estimate_s": plan["estimate_s"],
                "status": "running",
                "runs": [],
                "plan": {k: plan[k] for k in ("first", "rest", "repeats")},
            }
            print(
                f"\n[{name}] {plan['repeats']} run(s), estimate ~{plan['estimate_s']} s", flush=True
            )
            t0 = time.perf_counter()
            try:
                for r in range(plan["repeats"]):
                    t_run = time.perf_counter()
                    argv = [*(plan["first"] if r == 0 else plan["rest"])]
                    if name in ("ingest", "train", "extract"):
                        argv += ["--workdir", str(work / name)]
                    result = run_script(
                        plan, argv, work / f"{name}-{r}.json", work / "logs" / f"{name}-{r}.log"
                    )
                    result["_seconds"] = round(time.perf_counter() - t_run, 1)
                    st["runs"].append(result)
                    st["elapsed_s"] = round(time.perf_counter() - t0, 1)
                    done = f"run {r + 1}/{plan['repeats']} done in {result['_seconds']:.0f} s"
                    print(f"[{name}] {done}", flush=True)
                    save(with_header(res, kept, stages), args.out)
                st["summary"] = SUMMARISE[name](st["runs"])
                st["status"] = "done"
            except Exception as e:  # keep what was measured, go on with the next stage
                failed = True
                st["status"] = "failed"
                st["error"] = str(e)[-3000:]
                print(f"[{name}] FAILED: {str(e)[-1500:]}", file=sys.stderr, flush=True)
                if st["runs"] and "summary" not in st:
                    # partial runs may lack what a summary needs; the raw runs are kept anyway
                    with contextlib.suppress(Exception):
                        st["summary"] = SUMMARISE[name](st["runs"])
            st["elapsed_s"] = round(time.perf_counter() - t0, 1)
            print(
                f"[{name}] {st['status']} in {st['elapsed_s']:.0f} s "
                f"(estimate on 2 idle cores ~{plan['estimate_s']} s)",
                flush=True,
            )
            res["elapsed_s"] = round(time.perf_counter() - t_suite, 1)
            save(with_header(res, kept, stages), args.out)
        res["status"] = "failed stage(s)" if failed else "complete"
    except KeyboardInterrupt:
        res["status"] = "interrupted"
        failed = True
    finally:
        res["elapsed_s"] = round(time.perf_counter() - t_suite, 1)
        shown = with_header(res, kept, stages)
        save(shown, args.out)
        if failed or args.keep_workdir or args.workdir:
            print(f"data and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(shown))
    print(
        f"\n{res['status']} in {res['elapsed_s'] / 60:.1f} min; wrote "
        f"{args.out / 'results.json'} and {args.out / 'results.md'}"
    )
    return 1 if failed else 0


def _repeat_factor(plan: dict, repeats: int) -> float:
    """Rough scaling of a stage's estimate to another repeat count (the first run costs ~2)."""
    return (1 + repeats) / (1 + plan["repeats"])


if __name__ == "__main__":
    sys.exit(main())
