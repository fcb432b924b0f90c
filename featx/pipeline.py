"""The whole pipeline as one typed config: ingest -> train -> extract -> probe -> report.

`PipelineConfig` turns into the per-stage configs (builder methods, so stages never read the
pipeline config), `run_pipeline` calls the stages directly, and `flows/pipeline.py` runs the
same steps as Prefect tasks. Each stage is idempotent, so a re-run skips finished work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from featx import storage
from featx.config import IngestConfig, Modality, StageConfig
from featx.storage import Location

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


class PipelineConfig(StageConfig):
    """Options of the pipeline flow (and of `featx demo` for each sample dataset)."""

    src: Path = Field(REPO_DATA / "images", description="Raw input: class folders or manifest.")
    workdir: Location = Field(
        Path(".runs/pipeline"),
        description="Stage outputs: shards/, run/, features/, report.md (a folder or an "
        "object-store URI).",
    )
    modality: Modality | None = Field(None, description="Force a modality; default: detect.")
    model: Literal["cnn", "rnn", "attention"] = Field("cnn", description="Encoder family.")
    preset: str = Field("small", description="Model size preset.")
    epochs: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most training epochs (early stopping ends sooner); default: featx "
        "train's (enough for 500 steps, at least 20).",
    )
    patience: int = Field(
        5, ge=0, description="Early stopping: epochs without a better val loss (0: off)."
    )
    workers: int = Field(2, ge=1, le=1024, description="Training workers (DDP ranks).")
    batch_size: int | None = Field(
        None, ge=1, description="Per-worker training batch size; default: featx train's."
    )
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default: the family's.")
    flip: bool = Field(False, description="Images: mirror left-right when augmenting.")
    gpu: bool = Field(False, description="GPU workers and actors.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Share of samples for validation.")
    shard_samples: int = Field(64, ge=1, description="Most samples per shard.")
    image_size: int = Field(64, ge=8, le=4096, description="Images: output side in pixels.")
    ray_address: str | None = Field(None, description="Ray cluster; default RAY_ADDRESS/local.")

    def check_paths(self) -> None:
        from featx.config import ConfigError

        if not self.src.exists():
            raise ConfigError([f"src: {self.src} does not exist"])

    @property
    def shards(self):
        return storage.join(self.workdir, "shards")

    @property
    def run_dir(self):
        return storage.join(self.workdir, "run")

    @property
    def features(self):
        return storage.join(self.workdir, "features")

    @property
    def report(self):
        return storage.join(self.workdir, "report.md")

    def ingest_config(self) -> IngestConfig:
        return IngestConfig.parse(
            src=self.src,
            out=self.shards,
            modality=self.modality,
            val_fraction=self.val_fraction,
            shard_samples=self.shard_samples,
            image_size=self.image_size,
            ray_address=self.ray_address,
        )

    def train_config(self):
        from featx.train import TrainConfig

        return TrainConfig.parse(
            dataset=self.shards,
            out=self.run_dir,
            model=self.model,
            preset=self.preset,
            workers=self.workers,
            gpu=self.gpu,
            epochs=self.epochs,
            patience=self.patience,
            batch_size=self.batch_size,
            lr=self.lr,
            flip=self.flip,
            ray_address=self.ray_address,
        )

    def extract_config(self):
        from featx.extract import ExtractConfig

        return ExtractConfig.parse(
            dataset=self.shards,
            checkpoint=self.run_dir,
            out=self.features,
            gpu=self.gpu,
            ray_address=self.ray_address,
        )


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage in order, without Prefect; returns the same summary the flow returns."""
    from featx.extract import run_extract
    from featx.ingest import ingest
    from featx.probe import probe
    from featx.train import train

    t0 = time.perf_counter()
    ingested = ingest(cfg.ingest_config()).to_dict()
    trained = train(cfg.train_config()).to_dict()
    extracted = run_extract(cfg.extract_config()).to_dict()
    probed = probe(cfg.features).to_dict()
    summary = summarise(cfg, ingested, trained, extracted, probed, time.perf_counter() - t0)
    write_report(cfg.report, summary)
    return summary


def summarise(
    cfg: PipelineConfig,
    ingested: dict,
    trained: dict,
    extracted: dict,
    probed: dict,
    seconds: float,
) -> dict:
    """One JSON-able record of a pipeline run (stage results as dicts): what reports show."""
    return {
        "src": str(cfg.src),
        "workdir": str(cfg.workdir),
        "modality": ingested["modality"],
        "ingest": ingested,
        "train": trained,
        "extract": extracted,
        "probe": probed,
        "features": str(cfg.features),
        "curves": str(storage.join(cfg.run_dir, "curves.png")),
        "report": str(cfg.report),
        "seconds": round(seconds, 1),
    }


def report_markdown(s: dict) -> str:
    from featx.probe import headline

    ing, tr, ex, pr = s["ingest"], s["train"], s["extract"], s["probe"]
    rejects = ", ".join(f"{k}: {v}" for k, v in ing["rejected"].items()) or "none"
    lines = [
        f"# featx pipeline: {s['modality']} from `{s['src']}`",
        "",
        "| stage | result |",
        "| --- | --- |",
        f"| ingest | {ing['total']} samples in {ing['shards_total']} shards "
        f"({ing['ingested']} new); rejected: {rejects} |",
        f"| train | {tr['epochs']} epochs; best val loss {_f(tr['best_val_loss'])}, "
        f"val accuracy {_f(tr['best_val_accuracy'])} |",
        f"| extract | {ex['total_rows']} rows of {ex['feature_dim']} floats in `{s['features']}` |",
        f"| probe | {headline(pr)} |",
        "",
        f"- Training curves: `{s['curves']}`",
        f"- Features (Parquet): `{s['features']}`",
        f"- Wall time: {s['seconds']} s",
    ]
    return "\n".join(lines) + "\n"


def write_report(path, summary: dict) -> None:
    storage.write_text(path, report_markdown(summary))


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
