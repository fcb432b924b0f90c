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
    DedupConfig,
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
    # using the features: near-duplicates across and within splits
    # 0.99, not dedup's 0.95: supervised features put a whole class close together (the sample
    # images at 0.95: 1859 pairs of distinct pictures; at 0.99: 11, all same-shape look-alikes)
    dedup_threshold: float = field_from(DedupConfig, "threshold", default=0.99)
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

    def probe_config(self, exclude=None) -> ProbeConfig:
        return ProbeConfig.parse(
            features=self.features,
            engine=self.engine,
            ray_address=self.ray_address,
            exclude=exclude,
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
    used = use_features(cfg)
    probed = probe(cfg.probe_config(exclusions(used))).to_dict() if described["labelled"] else None
    summary = summarise(
        cfg, ingested, trained, extracted, probed, time.perf_counter() - t0, described, used
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
    used: dict | None = None,
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
        "used": used,
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
    ]
    used = s.get("used")
    if used:
        lines.append(f"| near-duplicates | {dedup_headline(used['dedup'])} |")
    lines += [
        "",
        f"- Training curves: `{s['curves']}`",
        f"- Features (Parquet): `{s['features']}`",
        f"- Wall time: {s['seconds']} s",
    ]
    if used:
        lines += ["", *use_markdown(used, relative_to=s["workdir"])]
    return "\n".join(lines) + "\n"


def use_features(cfg: PipelineConfig) -> dict:
    """What the pipeline does with its features: the index, near-duplicates and leakage
    (`featx dedup`), a map coloured by label and, for images, a grid of samples with their
    nearest neighbours. The files go into the feature version's `_use/` and `_dedup/`."""
    from featx.dedup import find_duplicates
    from featx.featmap import feature_map
    from featx.features import read_features
    from featx.index import build_index

    with storage.staged_output(cfg.features, what="use") as local:
        index = build_index(local).to_dict()
        dedup = find_duplicates(local, threshold=cfg.dedup_threshold).to_dict()
        X, df = read_features(local)
        folder = Path(dedup["out"]).parent / "_use"
        folder.mkdir(exist_ok=True)
        used = {"index": index, "dedup": dedup, "map": feature_map(X, df, folder / "map.png")}
        used["map"]["png"] = str(folder / "map.png")
        used["grid"] = _neighbour_grid(cfg, local, X, df, folder / "neighbours.png")
    if storage.is_uri(cfg.features):  # name the files where they now are: in the store
        for d in (used["dedup"]["files"], used["map"], used):
            for k, v in list(d.items()):
                if isinstance(v, str) and v.startswith(str(local)):
                    d[k] = str(storage.join(cfg.features, str(Path(v).relative_to(local))))
    return used


def exclusions(used: dict | None):
    """The exclusion list the probe scores without, when dedup listed anything."""
    if used and used["dedup"]["excluded"]:
        return used["dedup"]["files"]["exclude"]
    return None


def _neighbour_grid(cfg: PipelineConfig, features: Path, X, df, png: Path) -> str | None:
    """For an image dataset: a few val samples (one per class where labelled) and their
    nearest neighbours among the rest, drawn as a grid."""
    from featx.dataset import load_card

    if load_card(cfg.shards)["modality"] != "image":
        return None
    from featx.featmap import neighbour_grid
    from featx.index import Index

    index = Index.open(features)
    pool = df[df["split"] == "val"]
    if pool.empty:
        pool = df
    picks = (
        pool.groupby("label_name", dropna=True).head(1).index[:6]
        if pool["label_name"].notna().any()
        else pool.index[:6]
    )
    rows, titles = [], []
    for i in picks:
        sims, ids = index.search(X[i : i + 1], 6)
        found = [(r, s) for r, s in zip(index.rows(ids[0]), sims[0], strict=True)]
        found = [(r, s) for r, s in found if r["key"] != df["key"][i]][:5]
        rows.append([df["key"][i], *(r["key"] for r, _ in found)])
        titles.append(
            [str(df["label_name"][i] or "query")]
            + [f"{r['label_name'] or ''} {s:.2f}".strip() for r, s in found]
        )
    neighbour_grid(cfg.shards, rows, png, titles=titles)
    return str(png)


def dedup_headline(d: dict) -> str:
    from featx.dedup import headline

    return headline(d)


def use_markdown(used: dict, relative_to=None, inline: bool = False) -> list[str]:
    """Markdown of the map, the neighbour grid and the worst near-duplicate pairs. Images are
    linked relative to `relative_to` (the report's folder), or with `inline` embedded as data
    URIs (a Prefect artifact, which cannot reach the files)."""

    def link(path: str) -> str:
        if inline:
            import base64

            data = base64.b64encode(storage.read_bytes(storage.location(path))).decode()
            return f"data:image/png;base64,{data}"
        if relative_to is not None and not storage.is_uri(path):
            try:
                return str(Path(path).absolute().relative_to(Path(relative_to).absolute()))
            except ValueError:
                pass
        return path

    m = used["map"]
    score = m.get("neighbourhood_score")
    lines = [
        "## The features",
        "",
        f"Map of {m.get('points')} rows ({', '.join(m.get('methods', []))})"
        + (f"; kNN-5 agreement of labels on the map: {score:.3f}" if score is not None else ""),
        "",
        f"![map]({link(m['png'])})",
    ]
    if used.get("grid"):
        lines += ["", "Val samples (left) and their nearest neighbours:", ""]
        lines += [f"![neighbours]({link(used['grid'])})"]
    d = used["dedup"]
    lines += ["", f"Near-duplicates: {dedup_headline(d)}."]
    if d["worst"]:
        lines += ["", "| similarity | a | split | b | split |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {w['similarity']:.3f} | {w['key_a']} | {w['split_a']} | {w['key_b']} | "
            f"{w['split_b']} |"
            for w in d["worst"][:8]
        ]
    if d["files"].get("contact_sheet"):
        lines += ["", f"![worst pairs]({link(d['files']['contact_sheet'])})"]
    return lines


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
