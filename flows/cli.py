"""The commands that run Prefect flows: `featx demo`, `pipeline`, `serve` and `server`.

They join the `featx` command line through the entry point `featx.commands` (pyproject.toml),
so that `featx.cli` never imports `flows`: the flows import featx, never the other way.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from featx.cli_parts import RAY_ENV, acc, config_command, console, parse
from featx.pipeline import PipelineConfig

# The demo's contrastive run (sample audio): its share of the demo's 3 minutes, about 75 steps.
DEMO_CONTRASTIVE_EPOCHS = 25


def demo(
    out: Path = typer.Option(Path(".runs/demo"), help="Where the demo writes its outputs."),
    modalities: str = typer.Option(
        "images,text,audio", help="Sample datasets to run, comma-separated (folders of data/)."
    ),
    model: str = typer.Option("cnn", help="Encoder family for every dataset."),
    epochs: int | None = typer.Option(
        None,
        help="Most training epochs per dataset (early stopping ends sooner); default: "
        "featx train's.",
    ),
    contrastive: bool = typer.Option(
        True,
        help="Also train the sample audio without its labels (--objective contrastive) and "
        "probe those features with the labels the training never saw.",
    ),
) -> None:
    """The main job: the whole pipeline on the embedded sample data in data/.

    For each sample dataset the Prefect pipeline flow runs ingest -> train (Ray Train, 2
    workers) -> extract (Parquet) -> linear probe -> report, on a local Ray and a
    temporary local Prefect API (state under OUT/prefect); no server to start by hand.
    Then the audio once more, learnt without labels (self-supervised, contrastive).
    """
    from featx.pipeline import REPO_DATA
    from flows.runtime import ensure_database, use_prefect_home

    use_prefect_home(out / "prefect")
    ensure_database()
    from featx.pipeline import PipelineConfig
    from flows.pipeline import pipeline_flow

    runs = [
        (name, {"src": REPO_DATA / name, "workdir": out / name, "epochs": epochs})
        for name in [m.strip() for m in modalities.split(",") if m.strip()]
    ]
    if contrastive:
        # the labels stay in the shards for the probe; contrastive training never reads them
        runs.append(
            (
                "audio, no labels",
                {
                    "src": REPO_DATA / "audio",
                    "workdir": out / "audio-contrastive",
                    "objective": "contrastive",
                    "epochs": epochs or DEMO_CONTRASTIVE_EPOCHS,
                },
            )
        )
    rows = []
    for name, values in runs:
        s = pipeline_flow(parse(PipelineConfig, {**values, "model": model}))
        rows.append((name, s["features"], s["probe"], s["report"], s.get("used")))
    t = Table(
        title="featx demo: linear-probe accuracy on val",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # short headers: the table fits an 80-column terminal; the notes below it say the rest
    cols = ("data", "featx", "random init", "classic", "majority", "near-dups")
    for col in cols:
        t.add_column(col, no_wrap=True)
    kinds = {}
    for name, _, probe, _, used in rows:
        if probe.get("classic_features") not in (None, *kinds.values()):
            kinds[name] = probe["classic_features"]
        clean = probe.get("without_excluded")
        dd = used["dedup"] if used else None
        t.add_row(
            name,
            acc(probe["accuracy"]) + (f" ({acc(clean['accuracy'])})" if clean else ""),
            acc(probe.get("baseline_accuracy")),
            acc(probe.get("classic_accuracy")),
            acc(probe["majority_accuracy"]),
            f"{dd['pairs']} ({sum(dd['leaking'].values())} leak)" if dd else "-",
        )
    console.print(t)
    notes = [
        "featx: the trained features (in brackets: without the near-duplicates that leak across "
        "splits)",
        "random init: the same model untrained",
    ]
    if kinds:
        notes.append("classic: " + "; ".join(f"{n}: {k}" for n, k in kinds.items()))
    if contrastive:
        notes.append(
            "'audio, no labels' learnt without the labels (contrastive); the probe reads them"
        )
    console.print("; ".join(notes) + ".")
    for name, features, _, report, used in rows:
        console.print(f"[bold]{name}[/]: features {features}/current/ (Parquet), report {report}")
        if used:
            console.print(f"  map {used['map']['png']}", soft_wrap=True)


def pipeline(values: dict) -> None:
    """Run the pipeline flow (ingest -> train -> extract -> probe -> report) on SRC.

    Uses the Prefect server in PREFECT_API_URL when set, otherwise a temporary local one.
    """
    from featx.probe import describe_line, headline
    from featx.storage import is_uri
    from flows.runtime import ensure_database, use_prefect_home

    cfg = parse(PipelineConfig, values)
    # Prefect's state stays on this machine (SQLite), also for a workdir in an object store.
    workdir = cfg.workdir
    use_prefect_home(Path(".runs/pipeline" if is_uri(workdir) else workdir) / "prefect")
    ensure_database()
    from flows.pipeline import pipeline_flow

    s = pipeline_flow(cfg)
    outcome = headline(s["probe"]) if s["probe"] else describe_line(s["described"])
    console.print(f"features: {s['features']}\nprobe: {outcome}\nreport: {s['report']}")


def serve(
    src: Path = typer.Option(None, help="Raw input for the scheduled runs (default: data/images)."),
    workdir: Path = typer.Option(Path(".runs/scheduled"), help="Work folder of scheduled runs."),
    cron_ingest: str = typer.Option("0 * * * *", help="Schedule of featx-ingest."),
    cron_train: str = typer.Option("0 2 * * *", help="Schedule of featx-train."),
    cron_extract: str = typer.Option("0 4 * * *", help="Schedule of featx-extract."),
    cron_pipeline: str = typer.Option("0 3 * * 0", help="Schedule of featx-pipeline."),
    paused: bool = typer.Option(False, help="Register the schedules paused."),
) -> None:
    """Serve the ingest, train, extract and pipeline flows as scheduled deployments.

    Registers them with the Prefect server in PREFECT_API_URL (start one with `featx server`)
    and runs their flow runs in this process until stopped; schedules stay active after.
    """
    import os

    from featx.pipeline import REPO_DATA

    if not os.environ.get("PREFECT_API_URL"):
        console.print(
            "[red]error[/]: set PREFECT_API_URL to a Prefect server "
            "(e.g. `featx server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
        raise typer.Exit(2)
    from flows.serve import serve_all

    crons = {
        "ingest": cron_ingest,
        "train": cron_train,
        "extract": cron_extract,
        "pipeline": cron_pipeline,
    }
    serve_all(src or REPO_DATA / "images", workdir, crons, paused)


def server(
    host: str = typer.Option(
        "127.0.0.1",
        help="Bind address. Keep 127.0.0.1 unless a "
        "reverse proxy with authentication sits in front.",
    ),
    port: int = typer.Option(4200, help="Port of the API and UI."),
    home: Path = typer.Option(
        Path(".runs/prefect-server"),
        help="PREFECT_HOME: the SQLite database and settings of this server.",
    ),
) -> None:
    """Start a local Prefect server (API + UI) with its own PREFECT_HOME and SQLite database."""
    import os
    import sys

    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # `--port` alone leaves the UI calling the API on 4200; tell it where the API is.
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
    }
    env.pop("PREFECT_API_URL", None)
    console.print(
        f"Prefect UI: http://{host}:{port}  state: {home}\n"
        f"In other shells: export PREFECT_API_URL=http://{host}:{port}/api"
    )
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
    ]
    os.execvpe(cmd[0], cmd, env)


def add_commands(app: typer.Typer) -> None:
    """Add this module's commands to the `featx` app (the entry point `featx.commands`)."""
    app.command()(demo)
    config_command(app, PipelineConfig, arguments=("src",), envvars=RAY_ENV, defaults={"src": ...})(
        pipeline
    )
    app.command()(serve)
    app.command()(server)
