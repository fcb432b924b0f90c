"""The `featx` command line: one sub-command per stage, each a thin wrapper over the library."""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from featx.config import ConfigError

app = typer.Typer(
    help=(
        "featx: learned features from your own raw images, text and audio.\n\n"
        "Stages: ingest (raw files -> WebDataset shards), train (Ray Train DDP), "
        "extract (Ray Data -> Parquet), probe (how good are the features)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(stderr=True)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details."),
) -> None:
    import os

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # featx reports its own progress; the HTTP client of Prefect and Ray Data's
        # per-execution lines would drown it.
        for name in ("httpx", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


@app.command()
def ingest(
    src: Path = typer.Argument(
        ...,
        help="Class folders (SRC/<label>/...), a flat folder, "
        "or a .csv/.jsonl manifest (path, label, split[, text]).",
    ),
    out: str = typer.Argument(
        ...,
        help="Output folder: <split>/shard-*.tar, dataset.json, rejected.jsonl; or an "
        "object-store URI (s3://bucket/prefix), staged locally and uploaded.",
    ),
    modality: str | None = typer.Option(
        None, help="image, text or audio; default: detect from file contents."
    ),
    val_fraction: float = typer.Option(0.1, help="Share of samples assigned to val."),
    test_fraction: float = typer.Option(0.0, help="Share of samples assigned to test."),
    shard_samples: int = typer.Option(1000, help="Most samples per shard."),
    shard_bytes: int = typer.Option(256 * 2**20, help="Most payload bytes per shard."),
    workers: int = typer.Option(0, help="Decode processes (0: one per core)."),
    image_size: int = typer.Option(64, help="Images: output side in pixels."),
    image_resize: str = typer.Option(
        "crop", help="Images: crop (shorter side + centre crop), pad (letterbox) or stretch."
    ),
    image_format: str = typer.Option("jpg", help="Images: re-encode as jpg or png."),
    max_pixels: int = typer.Option(
        89_478_485, help="Images: larger ones are rejected as decompression bombs."
    ),
    sample_rate: int = typer.Option(16000, help="Audio: target sample rate in Hz."),
    max_seconds: float = typer.Option(10.0, help="Audio: longer clips are cut."),
    min_seconds: float = typer.Option(0.05, help="Audio: shorter clips are rejected."),
    encoding: str | None = typer.Option(
        None, help="Text: decode with this codec instead of UTF-8 (e.g. latin-1)."
    ),
    max_chars: int = typer.Option(10_000, help="Text: longer documents are cut."),
    vocab_size: int = typer.Option(2000, help="Text: tokenizer vocabulary size."),
    overwrite: bool = typer.Option(False, help="Delete existing shards in OUT and start again."),
    ray_address: str | None = typer.Option(
        None,
        envvar="RAY_ADDRESS",
        help="Decode on this Ray cluster; this process reads the inputs and writes the shards. "
        "Default: local processes.",
    ),
    summary_json: Path | None = typer.Option(
        None, "--summary-json", help="Also write the run's summary as JSON to this file."
    ),
) -> None:
    """Turn raw files into validated, deduplicated WebDataset shards with a dataset card.

    Re-running is safe: finished shards are kept, new files become new shards, and a run
    killed at any moment resumes to the same bytes. Rejected inputs and their reasons are
    listed in OUT/rejected.jsonl.
    """
    from featx.config import IngestConfig
    from featx.ingest import ingest as run_ingest

    cfg = _parse(IngestConfig, locals())
    with _progress_bar("ingest") as progress:
        summary = run_ingest(cfg, progress=progress)
    if summary.up_to_date:
        console.print(
            f"[green]up to date[/]: {summary.total} samples in "
            f"{summary.shards_total} shards at {summary.out}"
        )
    t = Table(title=f"ingest {summary.modality} -> {summary.out}", show_header=False)
    t.add_row("ingested (this run)", str(summary.ingested))
    t.add_row("samples (total)", str(summary.total))
    t.add_row("rejected", str(sum(summary.rejected.values())))
    for reason, n in summary.rejected.items():
        t.add_row(f"  {reason}", str(n))
    t.add_row("duplicates", str(summary.duplicates))
    t.add_row("shards (new / total)", f"{summary.shards_written} / {summary.shards_total}")
    if summary.nodes:
        t.add_row("Ray nodes", str(len(summary.nodes)))
    t.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(t)
    _write_summary(summary_json, summary.to_dict())


@app.command()
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
) -> None:
    """The main job: the whole pipeline on the embedded sample data in data/.

    For each sample dataset the Prefect pipeline flow runs ingest -> train (Ray Train, 2
    workers) -> extract (Ray Data -> Parquet) -> linear probe -> report, on a local Ray and a
    temporary local Prefect API (state under OUT/prefect); no server to start by hand.
    """
    from featx.pipeline import REPO_DATA
    from flows.runtime import ensure_database, use_prefect_home

    use_prefect_home(out / "prefect")
    ensure_database()
    from featx.pipeline import PipelineConfig
    from flows.pipeline import pipeline_flow

    rows = []
    for name in [m.strip() for m in modalities.split(",") if m.strip()]:
        cfg = _parse(
            PipelineConfig,
            {"src": REPO_DATA / name, "workdir": out / name, "model": model, "epochs": epochs},
        )
        s = pipeline_flow(cfg)
        rows.append((name, s["features"], s["probe"], s["report"]))
    t = Table(title="featx demo: linear-probe accuracy on val")
    for col in ("data", "trained features", "random-init", "classic", "majority"):
        t.add_column(col)
    for name, _, probe, _ in rows:
        kind = probe.get("classic_features")
        t.add_row(
            name,
            _acc(probe["accuracy"]),
            _acc(probe.get("baseline_accuracy")),
            _acc(probe.get("classic_accuracy")) + (f" ({kind})" if kind else ""),
            _acc(probe["majority_accuracy"]),
        )
    console.print(t)
    for name, features, _, report in rows:
        console.print(f"[bold]{name}[/]: features {features}/ (Parquet), report {report}")


@app.command()
def pipeline(
    src: Path = typer.Argument(..., help="Raw input (class folders or manifest)."),
    workdir: str = typer.Option(
        ".runs/pipeline",
        help="shards/, run/, features/, report.md go here: a folder or an object-store URI "
        "(s3://bucket/prefix).",
    ),
    model: str = typer.Option("cnn", help="Encoder family: cnn, rnn or attention."),
    epochs: int | None = typer.Option(
        None,
        help="Most training epochs (early stopping ends sooner); default: featx train's.",
    ),
    patience: int = typer.Option(5, help="Early stopping patience in epochs (0: off)."),
    workers: int = typer.Option(2, help="Training workers."),
    gpu: bool = typer.Option(False, help="GPU workers and extraction actors."),
    ray_address: str | None = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster."),
) -> None:
    """Run the pipeline flow (ingest -> train -> extract -> probe -> report) on SRC.

    Uses the Prefect server in PREFECT_API_URL when set, otherwise a temporary local one.
    """
    from featx.storage import is_uri
    from flows.runtime import ensure_database, use_prefect_home

    # Prefect's state stays on this machine (SQLite), also for a workdir in an object store.
    use_prefect_home(Path(".runs/pipeline" if is_uri(workdir) else workdir) / "prefect")
    ensure_database()
    from featx.pipeline import PipelineConfig
    from featx.probe import headline
    from flows.pipeline import pipeline_flow

    values = {k: v for k, v in locals().items() if k in PipelineConfig.model_fields}
    s = pipeline_flow(_parse(PipelineConfig, values))
    console.print(
        f"features: {s['features']}\nprobe: {headline(s['probe'])}\nreport: {s['report']}"
    )


@app.command()
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


@app.command()
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
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    os.execvpe(cmd[0], cmd, env)


@app.command()
def train(
    dataset: str = typer.Argument(
        ..., help="Output folder of `featx ingest`, or its object-store URI (s3://...)."
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="RUN_DIR (folder or s3://... URI): checkpoints, best/, metrics.csv, "
        "curves.png. Running again with the same RUN_DIR resumes.",
    ),
    model: str = typer.Option("cnn", help="Encoder family: cnn, rnn or attention."),
    preset: str = typer.Option("small", help="Model size: small (laptop) or base."),
    workers: int = typer.Option(2, help="Ray Train workers (DDP ranks)."),
    gpu: bool = typer.Option(False, help="One GPU per worker (NCCL, bf16 autocast)."),
    cpus_per_worker: float | None = typer.Option(
        None,
        help="CPUs per worker; default splits the CPUs between workers (with --loader ray, "
        "after leaving one to Ray Data).",
    ),
    loader: str = typer.Option(
        "shards",
        help="How ranks read shards: 'shards' (each rank streams its share with webdataset; "
        "faster) or 'ray' (Ray Data streaming split).",
    ),
    epochs: int | None = typer.Option(
        None,
        help="Most epochs to train (in total, across resumes); early stopping usually ends "
        "the run sooner. Default: enough for 500 optimizer steps, at least 20.",
    ),
    patience: int = typer.Option(
        5,
        help="Stop once validation loss has not improved for this many epochs (the best "
        "checkpoint is kept); 0 trains every epoch.",
    ),
    batch_size: int | None = typer.Option(
        None,
        help="Per-worker batch size. Default: 32, smaller for small datasets (down to 8) so "
        "an epoch has 32 steps.",
    ),
    lr: float | None = typer.Option(
        None,
        help="Peak AdamW learning rate (linear warm-up, cosine); default: the family's "
        "(cnn 2e-3, rnn 5e-3, attention 2e-3).",
    ),
    seed: int = typer.Option(0, help="Random seed."),
    keep: int = typer.Option(3, help="Checkpoints kept, best by validation loss."),
    max_failures: int = typer.Option(1, help="Worker failures survived (-1: unlimited)."),
    augment: bool = typer.Option(
        True,
        help="Training augmentation: images shifted, audio shifted with noise, text with "
        "token dropout.",
    ),
    flip: bool = typer.Option(
        False,
        help="Images: also mirror left-right when augmenting. Right for photos; wrong where "
        "a mirror changes the meaning (digits, letters, text in images).",
    ),
    log_keys: bool = typer.Option(
        False,
        help="Write the sample keys each rank trained on, "
        "per epoch, to RUN_DIR/keys/ (audits data coverage).",
    ),
    ray_address: str | None = typer.Option(
        None, envvar="RAY_ADDRESS", help="Ray cluster address; default: start a local Ray."
    ),
    overwrite: bool = typer.Option(False, help="Start RUN_DIR afresh instead of resuming."),
    summary_json: Path | None = typer.Option(
        None, "--summary-json", help="Also write the run's summary as JSON to this file."
    ),
) -> None:
    """Train a feature extractor on ingested shards with Ray Train (DDP).

    The defaults are meant to be enough: the batch size, the most epochs and the learning rate
    follow the data and the family, and early stopping ends the run once validation loss stops
    improving (RUN_DIR/best is the best checkpoint, the model directory `featx extract` reads).

    Which family: cnn is the safe first choice for images and audio; rnn is the strongest on
    audio and short texts; attention is close on images and text, weakest on audio. On
    topic-labelled text tf-idf is a strong baseline: compare with `featx probe`.

    Local Ray with CPU workers (gloo) by default; `--gpu` uses NCCL. A worker that dies is
    restarted from the latest checkpoint; running the same command again resumes an
    interrupted run.
    """
    from featx.train import TrainConfig
    from featx.train import train as run_train

    cfg = _parse(TrainConfig, locals())
    r = run_train(cfg)
    if r.up_to_date:
        console.print(f"[green]up to date[/]: {r.epochs} epochs already trained in {r.run_dir}")
    t = Table(title=f"train {cfg.model}/{cfg.preset} -> {r.best_dir}", show_header=False)
    t.add_row(
        "epochs",
        str(r.epochs)
        + (f" (resumed after {r.resumed_from_epoch})" if r.resumed_from_epoch else ""),
    )
    last = r.metrics[-1] if r.metrics else {}
    t.add_row("train loss (last)", f"{last.get('train_loss', float('nan')):.4f}")
    if r.best_val_loss is not None:
        t.add_row("val loss (best)", f"{r.best_val_loss:.4f}")
        t.add_row("val accuracy (best)", f"{r.best_val_accuracy:.3f}")
    t.add_row("samples/s (last epoch)", f"{last.get('samples_per_s_total', 0):.0f}")
    t.add_row("metrics", f"{r.run_dir}/metrics.csv, {r.run_dir}/curves.png")
    t.add_row("seconds", f"{r.seconds:.1f}")
    if r.rank_nodes and len(set(r.rank_nodes)) > 1:
        t.add_row("Ray nodes", str(len(set(r.rank_nodes))))
    console.print(t)
    _write_summary(summary_json, r.to_dict())


@app.command()
def extract(
    dataset: str = typer.Argument(
        ...,
        help="Dataset folder written by `featx ingest` (holds dataset.json and shards), "
        "or its object-store URI.",
    ),
    checkpoint: str = typer.Option(
        ...,
        "--checkpoint",
        "-c",
        help="Model directory (featx.json + model.pt), or a training RUN_DIR: its best/ is "
        "used. Folder or URI.",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="FEATURES_DIR: `<split>/part-NNNNNN.parquet`, one per input shard, "
        "and `_featx_features.json`; a folder or an object-store URI.",
    ),
    batch_size: int = typer.Option(64, help="Samples per forward pass."),
    workers: int | None = typer.Option(
        None,
        help="Model actors. Each loads the model once; together they get every CPU but the "
        "half CPU kept for reading shards. Default: 1 with --gpu; on CPUs 2 (one decodes while "
        "another runs the model), about one per 4 CPUs on larger machines.",
        show_default=False,
    ),
    gpu: bool = typer.Option(False, help="One GPU per actor (the Ray cluster needs GPUs)."),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster address; default: $RAY_ADDRESS, else a local Ray (no dashboard)."
    ),
    overwrite: bool = typer.Option(
        False, help="Delete the features in OUT first (needed to switch checkpoints)."
    ),
    summary_json: Path | None = typer.Option(
        None, "--summary-json", help="Also write the run's summary as JSON to this file."
    ),
) -> None:
    """Extract one feature vector per sample into Parquet with Ray Data.

    Writes `OUT/<split>/part-NNNNNN.parquet` for each `<split>/shard-NNNNNN.tar` of DATASET,
    with columns key, split, label, label_name, source and embedding (fixed-size float32
    list). Each part appears only when complete: re-running skips finished parts ("up to
    date"), and a run killed at any moment resumes with every sample exactly once.
    """
    from featx.extract import ExtractConfig, run_extract

    cfg = _parse(ExtractConfig, locals())
    with _progress_bar("extract", starting="extract (starting Ray)") as progress:
        s = run_extract(cfg, progress=progress)
    if s.up_to_date:
        console.print(
            f"[green]up to date[/]: {s.total_rows} rows in {s.files_skipped} files at {s.out}"
        )
    t = Table(title=f"extract -> {s.out}", show_header=False)
    t.add_row("rows (this run / total)", f"{s.rows} / {s.total_rows}")
    t.add_row("files (written / skipped)", f"{s.files_written} / {s.files_skipped}")
    t.add_row("feature dim", str(s.feature_dim))
    t.add_row("seconds", f"{s.seconds:.1f} (Ray start-up {s.ray_init_seconds:.1f})")
    t.add_row("samples/s", f"{s.samples_per_s:.0f}")
    t.add_row("model", s.model_dir)
    t.add_row("Parquet", f"{s.out}/*/part-*.parquet")
    if len(s.nodes) > 1:
        t.add_row("Ray nodes", str(len(s.nodes)))
    for w in s.warnings:
        t.add_row("[yellow]warning[/]", w)
    console.print(t)
    _write_summary(summary_json, s.to_dict())


@app.command()
def probe(
    features: str = typer.Argument(
        ..., help="FEATURES_DIR written by `featx extract` (a folder or an object-store URI)."
    ),
    baseline: bool = typer.Option(
        True, help="Compare with the same architecture's random-init features."
    ),
    baseline_checkpoint: str | None = typer.Option(
        None, help="Compare with this model's features instead of a random-init one."
    ),
    classic: bool = typer.Option(
        True,
        help="Compare with classic features of the same samples: raw pixels 16x16, tf-idf "
        "word 1-2 grams, or log-mel 40-band mean+std.",
    ),
    dataset: str | None = typer.Option(
        None,
        help="Dataset for the baselines (random-init and classic features); default: the one "
        "extract recorded.",
    ),
    seed: int = typer.Option(0, help="Seed of the random-init baseline and the probe."),
    ray_address: str | None = typer.Option(
        None, help="Ray cluster for the baseline extraction (default: $RAY_ADDRESS or local)."
    ),
) -> None:
    """How good are the features? A linear probe against random-init and classic baselines.

    Fits a standardised logistic regression on the train rows and reports accuracy on val
    (and test), next to the same probe on features of the same architecture with random
    weights (extracted once into FEATURES_DIR/_baseline/), on classic features of the same
    samples (raw pixels, tf-idf or log-mel statistics) and the majority-class rate.
    """

    from featx.probe import probe as run_probe

    try:
        with _progress_bar("classic features", starting="probe") as progress:
            r = run_probe(
                features,
                baseline_checkpoint,
                baseline=baseline,
                classic=classic,
                dataset=dataset,
                seed=seed,
                ray_address=ray_address,
                progress=progress,
            )
    except ValueError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(2) from None
    # The feature kind goes in the caption: as a header it would wrap an 80-column terminal.
    caption = f"classic: {r.classic_features}" if r.classic_features else None
    t = Table(title=f"linear probe: {features}", caption=caption)
    for col in ("split", "rows", "probe accuracy", "random-init baseline", "classic", "majority"):
        t.add_column(col)
    for split, d in r.splits.items():
        t.add_row(
            split,
            str(r.rows[split]),
            _acc(d["accuracy"]),
            _acc(d.get("baseline_accuracy")),
            _acc(d.get("classic_accuracy")),
            _acc(d["majority_accuracy"]),
        )
    console.print(t)
    c = Table(title="val accuracy per class")
    for col in ("class", "probe", "random-init", "classic"):
        c.add_column(col)
    for name, acc in r.per_class_accuracy.items():
        c.add_row(
            name,
            _acc(acc),
            _acc(r.baseline_per_class_accuracy.get(name)),
            _acc(r.classic_per_class_accuracy.get(name)),
        )
    console.print(c)


def _acc(v: float | None) -> str:
    """An accuracy for a table cell; "-" for a baseline that was skipped."""
    return "-" if v is None else f"{v:.3f}"


@contextlib.contextmanager
def _progress_bar(name: str, starting: str | None = None):
    """A transient rich progress bar; yields the `progress(done, total)` callback stages take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(starting or name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total, description=name)


def _write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        import json

        from featx.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def _parse(config_cls, values: dict):
    try:
        cfg = config_cls.parse(**{k: v for k, v in values.items() if k in config_cls.model_fields})
        cfg.check_paths()
        return cfg
    except ConfigError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(2) from None


# Disk and permission failures a user fixes outside featx: one line with a hint, not a
# traceback. Stages write under hidden temporary names, so nothing half-written is left in
# sight, and the same command resumes.
_FULL = "free some space and run the same command again: it resumes where it stopped"
_DENIED = "fix the permissions of that path, or choose another output folder"
_WRITE_ERRORS = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: "the file system is read-only: choose another output folder",
}


_STORE_ERROR = re.compile(r"AWS Error|GCS|Azure|Bucket .* not found|HDFS", re.IGNORECASE)
_STORE_HINT = (
    "check the URI, the credentials (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a "
    "profile) and, for an S3-compatible server, AWS_ENDPOINT_URL"
)


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[red]error[/]: {e}")
        sys.exit(2)
    except FileNotFoundError as e:
        console.print(f"[red]error[/]: {e}")
        sys.exit(2)
    except RuntimeError as e:
        from featx.decode_pool import WorkerError

        if not isinstance(e, WorkerError):
            raise
        console.print(f"[red]error[/]: {e}", soft_wrap=True)
        sys.exit(1)
    except OSError as e:
        if e.errno is None and _STORE_ERROR.search(str(e)):
            # pyarrow's object-store errors: say so in one line, without a traceback.
            console.print(f"[red]error[/]: object store: {e}; {_STORE_HINT}", soft_wrap=True)
            sys.exit(1)
        if e.errno not in _WRITE_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        hint = _WRITE_ERRORS[e.errno]
        console.print(f"[red]error[/]: {e.strerror}{where}; {hint}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
