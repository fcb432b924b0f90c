"""The suite's report: results.md (main table, cost growth, pipeline breakdown, runs).

Rows and growth points come from suite.py's per-stage summaries; this module only formats.
"""

from __future__ import annotations


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# featx benchmarks",
        "",
        f"Measured {m['date']} on {m['cpu_model']}: {m['cores']} cores, {m['memory_gib']} GiB, "
        f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}; Python {m['python']}, torch "
        f"{m['torch']}, Ray {m['ray']}, Prefect {m['prefect']}, webdataset {m['webdataset']}. "
        f"Load average at start {m['load_average_at_start']}.",
        "",
        f"Command: `{res['command']}` ({res['mode']} mode; {res['status']}; "
        f"{res.get('elapsed_s', 0):.0f} s).",
    ]
    if res["mode"] == "quick":
        lines += [
            "",
            "**Quick mode: tiny sizes and one repeat, to check the harness. Fixed start-up "
            "dominates at these sizes: do not read the figures as featx's performance.**",
        ]
    lines += [
        "",
        "| stage | figure | baseline | featx | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"| {r['stage']} | {r['figure']}{note} | {r['baseline']} | {r['featx']} | {ratio} "
            f"| {r['target'] or '-'} | {met} |"
        )
    lines += [
        "",
        "Ratio: featx over the baseline for rates, baseline over featx for times (above 1: "
        "featx is faster); for memory, the growth from 1x to 4x data. Each figure is the "
        "median of the stage's repeats, except where a row says otherwise.",
    ]
    if res["growth"]:
        lines += [
            "",
            "## Cost growth (featx at 1x, 2x and 4x the data)",
            "",
            "| stage | data | samples | seconds | time vs 1x | peak PSS (MB) | memory vs 1x "
            "| note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for g in res["growth"]:
            lines.append(
                f"| {g['stage']} | {g['scale']} | {g['samples']} | {g['seconds']:.1f} | "
                f"{num(g['time_vs_1x'])} | {num(g['peak_pss_mb'], 0)} | "
                f"{num(g['memory_vs_1x'])} | {g['note']} |"
            )
        lines += [
            "",
            "Seconds are the wall time of the featx call (train: with its own Ray start and "
            "stop; extract: a fresh process); peak PSS sums the whole process tree (driver, "
            "Ray daemons and workers, pool processes). 2x and 4x: one run each.",
        ]
    quality = res["stages"].get("quality", {}).get("summary", {}).get("table")
    if quality:
        lines += [
            "",
            "## Feature quality (real corpora, featx's default settings)",
            "",
            "Val accuracy of a standardised logistic-regression probe fitted on the train rows: "
            "trained features, the same architecture at random init, classic features of the "
            "same samples, and the majority class. Bold: trained beats both baselines. "
            "Corpora: `tests/benchmarks/corpora.py`.",
            "",
            quality,
        ]
    bd = res["stages"].get("pipeline", {}).get("summary", {}).get("breakdown")
    if bd:
        lines += pipeline_markdown(bd)
    lines += [
        "",
        "## Runs",
        "",
        "| stage | runs | elapsed (s) | estimate on 2 idle cores (s) | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, st in res["stages"].items():
        lines.append(
            f"| {name} | {len(st.get('runs', []))} | {st.get('elapsed_s', 0):.0f} | "
            f"{st['estimate_s']} | {st['status']} |"
        )
    lines += [
        "",
        "Raw numbers of every run: `results.json`; logs: the work folder printed by the suite.",
    ]
    return "\n".join(lines) + "\n"


def pipeline_markdown(bd: dict) -> list[str]:
    p, wall = bd["parts"], bd["wall_s"]
    named = [
        ("Python start and `featx.cli` imports", p["interpreter_start_s"] + p["cli_imports_s"]),
        ("Prefect: import (flows, API server module)", p["prefect_import_s"]),
        (
            "Prefect: database upgrade (`ensure_database`, a subprocess)",
            p["prefect_database_upgrade_s"],
        ),
        ("Prefect: temporary API server start", p["prefect_server_start_s"]),
        ("imports of the stages (torch, Ray, pyarrow)", p["stage_imports_s"]),
        ("Ray: `ray.init` (local Ray)", p["ray_init_s"]),
        ("the flows, less the two start-ups above", p["flows_less_startup_s"]),
        ("Prefect: API server stop", p["prefect_server_stop_s"]),
        ("Ray: shutdown at exit", p["ray_shutdown_s"]),
        ("other (gaps, interpreter teardown)", p["other_s"]),
    ]
    lines = [
        "",
        f"## Pipeline: where `{bd['command']}` spends its {wall:.0f} s",
        "",
        "| part | seconds | share |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {s:.1f} | {s / wall:.0%} |" for name, s in named]
    st = bd["stages_s"]
    lines += [
        "",
        f"Inside the flows: ingest {st['ingest']:.1f} s, train {st['train']:.1f} s (of which "
        f"{bd['train_outside_epochs_s']:.1f} s outside the epochs: Ray Train set-up, validation, "
        f"checkpoints), extract {st['extract']:.1f} s, probe {st['probe']:.1f} s (with its "
        f"random-init baseline extraction); Prefect's own per-flow work (tasks, results, "
        f"artifacts) {bd['prefect_flow_overhead_s']:.1f} s. Peak PSS of the process tree "
        f"{bd['peak_pss_mb']:.0f} MB.",
    ]
    return lines


def num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def rate(v) -> str:
    return "n/a" if v is None else f"{v:.0f}/s"
