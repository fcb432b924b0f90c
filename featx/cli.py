"""The `featx` command line: one sub-command per stage, each a thin wrapper over the library."""

from __future__ import annotations

import logging
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
def ingest(
    src: Path = typer.Argument(
        ...,
        help="Class folders (SRC/<label>/...), a flat folder, "
        "or a .csv/.jsonl manifest (path, label, split[, text]).",
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: <split>/shard-*.tar, dataset.json, rejected.jsonl."
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
) -> None:
    """Turn raw files into validated, deduplicated WebDataset shards with a dataset card.

    Re-running is safe: finished shards are kept, new files become new shards, and a run
    killed at any moment resumes to the same bytes. Rejected inputs and their reasons are
    listed in OUT/rejected.jsonl.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from featx.config import IngestConfig
    from featx.ingest import ingest as run_ingest

    cfg = _parse(IngestConfig, locals())
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("ingest", total=None)
        summary = run_ingest(
            cfg, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
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
    t.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(t)


@app.command()
def demo(
    out: Path = typer.Option(Path(".runs/demo"), help="Where the demo writes its outputs."),
    data: Path = typer.Option(None, help="Sample data folder (default: the repo's data/)."),
) -> None:
    """The main job on the embedded sample data: every stage, local Ray, no server needed.

    Today: ingest of data/images, data/text and data/audio.
    """
    from featx.config import IngestConfig
    from featx.ingest import ingest as run_ingest

    data = data or Path(__file__).resolve().parents[1] / "data"
    for modality, folder in (("image", "images"), ("text", "text"), ("audio", "audio")):
        cfg = _parse(
            IngestConfig,
            {
                "src": data / folder,
                "out": out / folder / "shards",
                "modality": modality,
                "shard_samples": 64,
            },
        )
        s = run_ingest(cfg)
        state = "up to date" if s.up_to_date else f"{s.ingested} new"
        console.print(
            f"[bold]{folder}[/]: {s.total} samples ({state}), "
            f"{sum(s.rejected.values())} rejected, {s.shards_total} shards -> {s.out}"
        )


@app.command()
def train(
    dataset: Path = typer.Argument(..., help="Output folder of `featx ingest`."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="RUN_DIR: checkpoints, best/, metrics.csv, "
        "curves.png. Running again with the same RUN_DIR resumes.",
    ),
    model: str = typer.Option("cnn", help="Encoder family: cnn, rnn or attention."),
    preset: str = typer.Option("small", help="Model size: small (laptop) or base."),
    workers: int = typer.Option(2, help="Ray Train workers (DDP ranks)."),
    gpu: bool = typer.Option(False, help="One GPU per worker (NCCL, bf16 autocast)."),
    cpus_per_worker: float | None = typer.Option(
        None, help="CPUs per worker; default leaves one CPU to Ray Data."
    ),
    epochs: int = typer.Option(5, help="Epochs to train (in total, across resumes)."),
    batch_size: int = typer.Option(32, help="Per-worker batch size."),
    lr: float = typer.Option(2e-3, help="Peak AdamW learning rate (linear warm-up, cosine)."),
    seed: int = typer.Option(0, help="Random seed."),
    keep: int = typer.Option(3, help="Checkpoints kept, best by validation loss."),
    max_failures: int = typer.Option(1, help="Worker failures survived (-1: unlimited)."),
    augment: bool = typer.Option(True, help="Light training augmentation."),
    log_keys: bool = typer.Option(
        False,
        help="Write the sample keys each rank trained on, "
        "per epoch, to RUN_DIR/keys/ (audits data coverage).",
    ),
    ray_address: str | None = typer.Option(
        None, envvar="RAY_ADDRESS", help="Ray cluster address; default: start a local Ray."
    ),
    overwrite: bool = typer.Option(False, help="Start RUN_DIR afresh instead of resuming."),
) -> None:
    """Train a feature extractor on ingested shards with Ray Train (DDP).

    Local Ray with CPU workers (gloo) by default; `--gpu` uses NCCL. Each epoch reports loss,
    accuracy and samples/s, and keeps the best checkpoints by validation loss; `RUN_DIR/best`
    is the model directory `featx extract` reads. A worker that dies is restarted from the
    latest checkpoint; running the same command again resumes an interrupted run.
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
    console.print(t)


def _parse(config_cls, values: dict):
    try:
        cfg = config_cls.parse(**{k: v for k, v in values.items() if k in config_cls.model_fields})
        cfg.check_paths()
        return cfg
    except ConfigError as e:
        console.print(f"[red]error[/]: {e}")
        raise typer.Exit(2) from None


def main() -> None:
    try:
        app()
    except ConfigError as e:
        console.print(f"[red]error[/]: {e}")
        sys.exit(2)
    except FileNotFoundError as e:
        console.print(f"[red]error[/]: {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
