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
from featx.config import (
    ExtractConfig,
    IngestConfig,
    Modality,
    ProbeConfig,
    StageConfig,
    TrainConfig,
    field_from,
)
from featx.storage import Location

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


class PipelineConfig(StageConfig):
    """Options of the pipeline flow (and of `featx demo` for each sample dataset): the stage
    options most worth setting, each as its stage declares it (`field_from`), and the work
    folder.
    """

    src: Path = field_from(IngestConfig, "src", default=REPO_DATA / "images")
    workdir: Location = Field(
        Path(".runs/pipeline"),
        description="Stage outputs: shards/, run/, features/, report.md (a folder or an "
        "object-store URI).",
    )
    # ingest (a smaller shard and a larger val split than `featx ingest`'s, for small data)
    modality: Modality | None = field_from(IngestConfig, "modality")
    val_fraction: float = field_from(IngestConfig, "val_fraction", default=0.2)
    shard_samples: int = field_from(IngestConfig, "shard_samples", default=64)
    image_size: int = field_from(IngestConfig, "image_size")
    # train
    model: Literal["cnn", "rnn", "attention"] = field_from(TrainConfig, "model")
    preset: str = field_from(TrainConfig, "preset")
    objective: Literal["supervised", "contrastive", "supcon"] = field_from(TrainConfig, "objective")
    temperature: float = field_from(TrainConfig, "temperature")
    epochs: int | None = field_from(TrainConfig, "epochs")
    patience: int = field_from(TrainConfig, "patience")
    workers: int = field_from(TrainConfig, "workers")
    batch_size: int | None = field_from(TrainConfig, "batch_size")
    lr: float | None = field_from(TrainConfig, "lr")
    flip: bool = field_from(TrainConfig, "flip")
    keep_versions: int = field_from(
        TrainConfig, "keep_versions", description="Model versions and feature versions kept."
    )
    # extract (and the probe's baseline extraction)
    engine: Literal["auto", "ray", "local"] = field_from(ExtractConfig, "engine")
    # every stage
    gpu: bool = field_from(
        TrainConfig, "gpu", description="GPU training workers and extraction actors."
    )
    ray_address: str | None = field_from(TrainConfig, "ray_address")

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
        # `workers` are training's; ingest decodes with one process per core
        return IngestConfig.parse(**self._shared(IngestConfig, skip={"workers"}), out=self.shards)

    def train_config(self) -> TrainConfig:
        return TrainConfig.parse(**self._shared(TrainConfig), dataset=self.shards, out=self.run_dir)

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig.parse(
            dataset=self.shards,
            checkpoint=self.run_dir,
            out=self.features,
            gpu=self.gpu,
            engine=self.engine,
            ray_address=self.ray_address,
            keep_versions=self.keep_versions,
        )

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig.parse(
            features=self.features, engine=self.engine, ray_address=self.ray_address
        )

    def _shared(self, config: type[StageConfig], skip: set[str] = frozenset()) -> dict:
        """This config's values of the fields `config` has too."""
        return {k: v for k, v in self if k in config.model_fields and k not in skip}


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage in order, without Prefect; returns the same summary the flow returns."""
    from featx.extract import extract
    from featx.ingest import ingest
    from featx.probe import describe, probe
    from featx.train import train

    t0 = time.perf_counter()
    ingested = ingest(cfg.ingest_config()).to_dict()
    trained = train(cfg.train_config()).to_dict()
    extracted = extract(cfg.extract_config()).to_dict()
    described = describe(cfg.features)
    probed = probe(cfg.probe_config()).to_dict() if described["labelled"] else None
    summary = summarise(
        cfg, ingested, trained, extracted, probed, time.perf_counter() - t0, described
    )
    write_report(cfg.report, summary)
    return summary


def summarise(
    cfg: PipelineConfig,
    ingested: dict,
    trained: dict,
    extracted: dict,
    probed: dict | None,
    seconds: float,
    described: dict | None = None,
) -> dict:
    """One JSON-able record of a pipeline run (stage results as dicts): what reports show.
    `probed` is None for unlabelled data; `described` is `featx.probe.describe`'s summary."""
    return {
        "src": str(cfg.src),
        "workdir": str(cfg.workdir),
        "modality": ingested["modality"],
        "ingest": ingested,
        "train": trained,
        "extract": extracted,
        "probe": probed,
        "described": described,
        "objective": cfg.objective,
        "features": str(cfg.features),
        "curves": str(storage.join(cfg.run_dir, "curves.png")),
        "report": str(cfg.report),
        "seconds": round(seconds, 1),
    }


def report_markdown(s: dict) -> str:
    from featx.probe import describe_line, headline

    ing, tr, ex, pr = s["ingest"], s["train"], s["extract"], s["probe"]
    rejects = ", ".join(f"{k}: {v}" for k, v in ing["rejected"].items()) or "none"
    lines = [
        f"# featx pipeline: {s['modality']} from `{s['src']}`",
        "",
        "| stage | result |",
        "| --- | --- |",
        f"| ingest | {ing['total']} samples in {ing['shards_total']} shards "
        f"({ing['ingested']} new); rejected: {rejects} |",
        f"| train | {train_line(tr, s.get('objective', 'supervised'))} |",
        f"| extract | {ex['total_rows']} rows of {ex['feature_dim']} floats in `{s['features']}` |",
        f"| probe | {headline(pr) if pr else describe_line(s['described'])} |",
        "",
        f"- Training curves: `{s['curves']}`",
        f"- Features (Parquet): `{s['features']}`",
        f"- Wall time: {s['seconds']} s",
    ]
    return "\n".join(lines) + "\n"


def train_line(tr: dict, objective: str) -> str:
    """The report's training row: val loss and accuracy, or a contrastive run's monitors."""
    line = f"{tr['epochs']} epochs, {objective}; best val loss {_f(tr['best_val_loss'])}"
    if objective == "supervised":
        return f"{line}, val accuracy {_f(tr['best_val_accuracy'])}"
    last = tr["metrics"][-1] if tr["metrics"] else {}
    monitors = [
        f"{name} {_f(last.get(key))}"
        for name, key in (
            ("alignment", "alignment"),
            ("uniformity", "uniformity"),
            ("effective rank", "effective_rank"),
            ("val kNN accuracy", "knn_accuracy"),
        )
        if last.get(key) is not None
    ]
    return ", ".join([line, *monitors]) + " (last epoch)"


def write_report(path, summary: dict) -> None:
    storage.write_text(path, report_markdown(summary))


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
