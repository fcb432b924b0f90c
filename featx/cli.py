"""The `featx` command line: one sub-command per stage, each a thin wrapper over the library."""

from __future__ import annotations

import errno
import logging
import re
import sys
from pathlib import Path

import typer
from rich.table import Table

from featx.cli_parts import RAY_ENV, acc, config_command, console, parse
from featx.cli_parts import progress_bar as _progress_bar
from featx.cli_parts import write_summary as _write_summary
from featx.cli_use import register as register_use_commands
from featx.config import ExtractConfig, IngestConfig, ProbeConfig, TrainConfig
from featx.errors import ConfigError

app = typer.Typer(
    help=(
        "featx: learned features from your own raw images, text and audio.\n\n"
        "Stages: ingest (raw files -> WebDataset shards), train (Ray Train DDP), "
        "extract (Parquet: in-process or on Ray Data), probe (how good are the features)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
SUMMARY_JSON = typer.Option(
    None, "--summary-json", help="Also write the run's summary as JSON to this file."
)


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


@config_command(app, IngestConfig, arguments=("src", "out"), envvars=RAY_ENV)
def ingest(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
    """Turn raw files into validated, deduplicated WebDataset shards with a dataset card.

    Re-running is safe: finished shards are kept, new files become new shards, and a run
    killed at any moment resumes to the same bytes. Sources deleted, relabelled, moved to
    another split or edited since leave their shards (the last three come back as they are
    now), and small shards are merged past --compact-after (or now with --compact). Rejected
    inputs and their reasons are listed in OUT/rejected.jsonl.
    """
    from featx.ingest import ingest as run_ingest

    cfg = parse(IngestConfig, values)
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
    for why, n in summary.removed.items():
        t.add_row(f"left: {why}", str(n))
    t.add_row("shards (new / total)", f"{summary.shards_written} / {summary.shards_total}")
    if summary.shards_rewritten:
        t.add_row("shards rewritten", str(summary.shards_rewritten))
    if summary.nodes:
        t.add_row("Ray nodes", str(len(summary.nodes)))
    t.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(t)
    _write_summary(summary_json, summary.to_dict())


@config_command(app, TrainConfig, arguments=("dataset",), envvars=RAY_ENV)
def train(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
    """Train a feature extractor on ingested shards with Ray Train (DDP).

    The defaults are meant to be enough: the batch size, the most epochs and the learning rate
    follow the data and the family, and early stopping ends the run once validation loss stops
    improving (RUN_DIR/best is the best checkpoint, the model directory `featx extract` reads).

    Which family: cnn is the safe first choice for images and audio; rnn is the strongest on
    audio and short texts; attention is close on images and text, weakest on audio. On
    topic-labelled text tf-idf is a strong baseline: compare with `featx probe`.

    Local Ray with CPU workers (gloo) by default; `--gpu` uses NCCL. A worker that dies is
    restarted from the latest checkpoint; running the same command again resumes an
    interrupted run. Once the dataset has changed (an ingest added files), the same command
    trains a new model version in RUN_DIR; best/ switches to it when it finishes, and earlier
    versions stay in RUN_DIR/versions/ (`--keep-versions`).
    """
    from featx.train import train as run_train

    cfg = parse(TrainConfig, values)
    r = run_train(cfg)
    if r.up_to_date:
        console.print(f"[green]up to date[/]: {r.epochs} epochs already trained in {r.run_dir}")
    t = Table(title=f"train {cfg.model}/{cfg.preset} -> {r.best_dir}", show_header=False)
    kept = (
        f" (earlier kept: {', '.join(f'v{n}' for n in r.versions_kept)})" if r.versions_kept else ""
    )
    t.add_row("model version", f"v{r.version}{kept}")
    t.add_row(
        "epochs",
        str(r.epochs)
        + (f" (resumed after {r.resumed_from_epoch})" if r.resumed_from_epoch else ""),
    )
    last = r.metrics[-1] if r.metrics else {}
    t.add_row("train loss (last)", f"{last.get('train_loss', float('nan')):.4f}")
    if cfg.objective != "supervised":
        t.add_row("objective", cfg.objective)
    if r.best_val_loss is not None:
        t.add_row("val loss (best)", f"{r.best_val_loss:.4f}")
    if r.best_val_accuracy is not None:
        t.add_row("val accuracy (best)", f"{r.best_val_accuracy:.3f}")
    for name, key in (("effective rank", "effective_rank"), ("val kNN accuracy", "knn_accuracy")):
        if last.get(key) is not None:
            t.add_row(f"{name} (last)", f"{last[key]:.3f}")
    t.add_row("samples/s (last epoch)", f"{last.get('samples_per_s_total', 0):.0f}")
    t.add_row("metrics", f"{r.run_dir}/metrics.csv, {r.run_dir}/curves.png")
    t.add_row("seconds", f"{r.seconds:.1f}")
    if r.rank_nodes and len(set(r.rank_nodes)) > 1:
        t.add_row("Ray nodes", str(len(set(r.rank_nodes))))
    console.print(t)
    _write_summary(summary_json, r.to_dict())


@config_command(
    app, ExtractConfig, arguments=("dataset",), flags={"checkpoint": ("-c",), "out": ("-o",)}
)
def extract(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
    """Extract one feature vector per sample into Parquet, shard by shard.

    Small jobs on a laptop run in this process; clusters and large jobs on a Ray Data actor
    pool, one task per shard (`--engine`).

    Writes one Parquet part for each `<split>/shard-NNNNNN.tar` of DATASET, with columns key,
    split, label, label_name, source and embedding (fixed-size float32 list), into a version
    folder `OUT/versions/NNNNNN/<split>/`. `OUT/current` (and the manifest) switch to a version
    when it is complete, so readers see one model's rows. A re-run with nothing changed is "up
    to date"; a new checkpoint, or shards added or removed, build the next version, with the
    parts of unchanged shards of the same model reused; `--keep-versions` are kept. A run
    killed at any moment resumes with every sample exactly once.
    """
    from featx.extract import extract

    cfg = parse(ExtractConfig, values)
    with _progress_bar("extract", starting="extract (starting Ray)") as progress:
        s = extract(cfg, progress=progress)
    if s.up_to_date:
        console.print(
            f"[green]up to date[/]: {s.total_rows} rows in {s.files_skipped} files at {s.out}"
        )
    t = Table(title=f"extract -> {s.out}", show_header=False)
    t.add_row("version", f"{s.version} (kept: {', '.join(s.versions)})")
    t.add_row("rows (this run / total)", f"{s.rows} / {s.total_rows}")
    t.add_row("files (written / reused)", f"{s.files_written} / {s.files_skipped}")
    t.add_row("feature dim", str(s.feature_dim))
    t.add_row("seconds", f"{s.seconds:.1f} (Ray start-up {s.ray_init_seconds:.1f})")
    t.add_row("samples/s", f"{s.samples_per_s:.0f}")
    t.add_row("model", s.model_dir)
    t.add_row("Parquet", f"{s.out}/current/*/part-*.parquet")
    if len(s.nodes) > 1:
        t.add_row("Ray nodes", str(len(s.nodes)))
    for w in s.warnings:
        t.add_row("[yellow]warning[/]", w)
    console.print(t)
    _write_summary(summary_json, s.to_dict())


@config_command(app, ProbeConfig, arguments=("features",))
def probe(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
    """How good are the features? A linear probe against random-init and classic baselines.

    Fits a standardised logistic regression on the train rows and reports accuracy on val
    (and test), next to the same probe on features of the same architecture with random
    weights (extracted once into FEATURES_DIR/_baseline/), on classic features of the same
    samples (raw pixels, tf-idf or log-mel statistics) and the majority-class rate.
    """

    from featx.probe import probe as run_probe

    cfg = parse(ProbeConfig, values)
    try:
        with _progress_bar("classic features", starting="probe") as progress:
            r = run_probe(cfg, progress=progress)
    except ValueError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(2) from None
    # The feature kind goes in the caption: as a header it would wrap an 80-column terminal.
    caption = f"classic: {r.classic_features}" if r.classic_features else None
    t = Table(title=f"linear probe: {r.features_dir}", caption=caption)
    for col in ("split", "rows", "probe accuracy", "random-init baseline", "classic", "majority"):
        t.add_column(col)
    for split, d in r.splits.items():
        t.add_row(
            split,
            str(r.rows[split]),
            acc(d["accuracy"]),
            acc(d.get("baseline_accuracy")),
            acc(d.get("classic_accuracy")),
            acc(d["majority_accuracy"]),
        )
    if r.without_excluded:
        w = r.without_excluded
        left = ", ".join(f"{n} {s}" for s, n in w["rows"].items()) or "none of these rows"
        scores = ", ".join(f"{s} {acc(a)}" for s, a in w["splits"].items()) or w.get("error")
        console.print(f"without the samples in {w['file']} ({left}): accuracy {scores}")
    console.print(t)
    c = Table(title="val accuracy per class")
    for col in ("class", "probe", "random-init", "classic"):
        c.add_column(col)
    for name, value in r.per_class_accuracy.items():
        c.add_row(
            name,
            acc(value),
            acc(r.baseline_per_class_accuracy.get(name)),
            acc(r.classic_per_class_accuracy.get(name)),
        )
    console.print(c)
    _write_summary(summary_json, r.to_dict())


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


def _add_commands() -> None:
    """Commands other packages add (entry points `featx.commands`: a function taking the app).
    featx's Prefect flows add demo, pipeline, serve and server this way: the library does not
    import its orchestration layer."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="featx.commands"):
        ep.load()(app)


register_use_commands(app)
_add_commands()


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
