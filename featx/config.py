"""Typed configuration for each stage, validated once at the boundary (CLI, flow, YAML).

Every problem in a config is reported at once in a single `ConfigError`, before any work starts.
Below the boundary, functions take plain typed arguments.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from featx.errors import ConfigError
from featx.storage import Location, is_uri

Modality = Literal["image", "text", "audio"]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _lift_credentials(cls, values):
        """Credentials inside a storage URI move to the process's environment before the
        config exists, so no config (and nothing made from one: flow parameters, artifacts,
        reports, logs) ever holds them."""
        from featx.storage import lift_credentials

        if not isinstance(values, dict):
            return values
        seen: dict[str, str] = {}
        return {k: lift_credentials(v, seen) for k, v in values.items()}

    @classmethod
    def parse(cls, **values):
        """Build the config, turning pydantic's errors into one ConfigError with every problem."""
        try:
            return cls(**values)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"])
                if where:
                    problems.append(f"{where}: {err['msg']}")
                elif isinstance(err.get("ctx", {}).get("error"), ConfigError):
                    problems += err["ctx"]["error"].problems  # from a model validator
            # Cross-field rules do not run when a field fails; run them here so one error
            # lists everything that needs fixing.
            defaults = {k: f.default for k, f in cls.model_fields.items()}
            with contextlib.suppress(TypeError, ValueError):
                problems += cls.cross_problems({**defaults, **values})
            raise ConfigError(problems) from None

    @classmethod
    def cross_problems(cls, v: dict) -> list[str]:
        """Rules that involve several fields; `v` holds raw field values."""
        return []

    def check_paths(self) -> None:
        """Checks that need the file system, run before any work starts (none by default)."""

    @model_validator(mode="after")
    def _cross(self):
        if problems := self.cross_problems(dict(self)):
            raise ValueError("; ".join(problems))
        return self


def field_from(config: type[StageConfig], name: str, **changes) -> FieldInfo:
    """Another config's field (default, constraints, description), with `changes`: a config
    that takes an option of another stage declares it once, where that stage does."""
    return FieldInfo.merge_field_infos(config.model_fields[name], **changes)


class IngestConfig(StageConfig):
    """Options of `featx ingest`. Normalisation fields are recorded in the dataset card."""

    src: Path = Field(
        description="Class folders (`SRC/<label>/...`), a flat folder, or a .csv/.jsonl manifest "
        "(path, label, split[, text])."
    )
    out: Location = Field(
        description="Output folder: `<split>/shard-*.tar`, dataset.json, rejected.jsonl; or an "
        "object-store URI (s3://bucket/prefix), staged locally and uploaded."
    )
    modality: Modality | None = Field(
        None, description="image, text or audio; default: detect from file contents."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of samples for val.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of samples for test.")
    shard_samples: int = Field(1000, ge=1, description="Most samples per shard.")
    shard_bytes: int = Field(256 * 2**20, ge=1024, description="Most payload bytes per shard.")
    workers: int = Field(0, ge=0, description="Decode processes (0: one per core).")
    # images
    image_size: int = Field(64, ge=8, le=4096, description="Images: output side in pixels.")
    image_resize: Literal["crop", "pad", "stretch"] = Field(
        "crop",
        description="Images: crop (shorter side + centre crop), pad (letterbox) or stretch.",
    )
    image_format: Literal["jpg", "png"] = Field("jpg", description="Images: re-encode as.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="Images: JPEG quality.")
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Images: larger ones are rejected as decompression bombs (Pillow's limit).",
    )
    # audio
    sample_rate: int = Field(
        16000, ge=1000, le=192000, description="Audio: target sample rate in Hz."
    )
    max_seconds: float = Field(10.0, gt=0, description="Audio: longer clips are cut.")
    min_seconds: float = Field(0.05, ge=0, description="Audio: shorter clips are rejected.")
    # text
    encoding: str | None = Field(
        None, description="Text: decode with this codec instead of UTF-8 (e.g. latin-1)."
    )
    max_chars: int = Field(10_000, ge=1, description="Text: longer documents are cut.")
    min_chars: int = Field(1, ge=1, description="Text: shorter documents are rejected.")
    vocab_size: int = Field(
        2000, ge=64, le=1_000_000, description="Text: tokenizer vocabulary size."
    )
    max_input_bytes: int = Field(
        1 << 30,
        ge=1024,
        description="Inputs larger than this many bytes are rejected as `too large` without "
        "being read (each input is read whole to decode it).",
    )
    compact: bool = Field(
        False,
        description="Merge the small shards (under half of --shard-samples) of each split now, "
        "into as few shards as fit. Each incremental run closes a small last shard.",
    )
    compact_after: int = Field(
        16,
        ge=0,
        description="Merge a split's small shards automatically once it has this many "
        "(0: only with --compact).",
    )
    overwrite: bool = Field(False, description="Delete existing shards in OUT and start again.")
    ray_address: str | None = Field(
        None,
        description="Decode on this Ray cluster; this process reads the inputs and writes the "
        "shards. Default: RAY_ADDRESS if set, else local processes.",
    )

    @classmethod
    def cross_problems(cls, v: dict) -> list[str]:
        problems = []
        if float(v["val_fraction"]) + float(v["test_fraction"]) >= 1.0:
            problems.append(
                f"val_fraction + test_fraction = {v['val_fraction'] + v['test_fraction']}"
                " leaves no training data; keep their sum below 1"
            )
        if float(v["min_seconds"]) >= float(v["max_seconds"]):
            problems.append("min_seconds must be below max_seconds")
        if int(v["min_chars"]) > int(v["max_chars"]):
            problems.append("min_chars must not exceed max_chars")
        if v["encoding"] is not None:
            import codecs

            try:
                codecs.lookup(v["encoding"])
            except LookupError:
                problems.append(f"encoding: unknown codec {v['encoding']!r} (e.g. 'latin-1')")
        return problems

    def check_paths(self) -> None:
        """Checks that need the file system; run before any work starts."""
        problems = []
        if not self.src.exists():
            problems.append(f"src: {self.src} does not exist")
        elif self.src.is_file() and self.src.suffix.lower() not in (".csv", ".jsonl"):
            problems.append(f"src: {self.src} is a file; give a folder or a .csv/.jsonl manifest")
        if is_uri(self.out):  # an object store: checked when opened
            pass
        elif self.out.exists() and not self.out.is_dir():
            problems.append(f"out: {self.out} exists and is not a folder")
        elif self.src.is_dir() and self.out.resolve().is_relative_to(self.src.resolve()):
            problems.append(f"out: {self.out} is inside src; write shards outside the input tree")
        if problems:
            raise ConfigError(problems)

    def normalisation(self) -> dict:
        """The parameters that decide the bytes of every sample; a change needs --overwrite."""
        return self.model_dump(
            mode="json",
            include={
                "image_size",
                "image_resize",
                "image_format",
                "jpeg_quality",
                "max_pixels",
                "sample_rate",
                "max_seconds",
                "min_seconds",
                "encoding",
                "max_chars",
                "min_chars",
                "val_fraction",
                "test_fraction",
                "shard_samples",
                "shard_bytes",
            },
        )


class TrainConfig(StageConfig):
    """Options of `featx train`."""

    dataset: Location = Field(
        description="Output folder of `featx ingest`, or its object-store URI (s3://...)."
    )
    out: Location = Field(
        description="RUN_DIR (folder or s3://... URI): checkpoints, best/, metrics.csv, "
        "curves.png. Running again with the same RUN_DIR resumes."
    )
    model: Literal["cnn", "rnn", "attention"] = Field("cnn", description="Encoder family.")
    preset: str = Field("small", description="Model size: small (laptop) or base.")
    objective: Literal["supervised", "contrastive", "supcon"] = Field(
        "supervised",
        description="What the features learn from: 'supervised', the labels (cross-entropy); "
        "'contrastive', no labels (two augmented views of each sample, NT-Xent over the whole "
        "batch of every worker; labels, if any, are ignored); 'supcon', the labels in a "
        "contrastive loss (supervised contrastive).",
    )
    temperature: float = Field(
        0.2, gt=0, le=10, description="Contrastive objectives: temperature of the NT-Xent loss."
    )
    workers: int = Field(2, ge=1, le=1024, description="Ray Train workers (DDP ranks).")
    gpu: bool = Field(False, description="One GPU per worker (NCCL, bf16 autocast).")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs per worker; default splits the CPUs between workers (with --loader "
        "ray, after leaving one to Ray Data).",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most epochs to train (in total, across resumes); early stopping usually "
        "ends the run sooner. Default: enough for 500 optimizer steps, at least 20.",
    )
    patience: int = Field(
        5,
        ge=0,
        description="Stop once validation loss has not improved for this many epochs (the "
        "best checkpoint is kept); 0 trains every epoch.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Per-worker batch size. Default: 32, smaller for small datasets (down to "
        "8) so an epoch has 32 steps.",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak AdamW learning rate (linear warm-up, cosine); default: the family's "
        "(cnn 2e-3, rnn 5e-3, attention 2e-3).",
    )
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay (not on norms, biases and embeddings)."
    )
    warmup: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="Cross-entropy label smoothing of the training loss."
    )
    augment: bool = Field(
        True,
        description="Training augmentation: images shifted, audio shifted with noise, text "
        "with token dropout.",
    )
    flip: bool = Field(
        False,
        description="Images: also mirror left-right when augmenting. Right for photos; wrong "
        "where a mirror changes the meaning (digits, letters, text in images).",
    )
    seed: int = Field(0, description="Random seed.")
    keep: int = Field(3, ge=1, description="Checkpoints kept, best by validation loss.")
    keep_versions: int = Field(
        3,
        ge=0,
        description="Earlier model versions kept in RUN_DIR/versions/ (a new version is trained "
        "when the dataset has changed since the last one).",
    )
    warm_start: bool = Field(
        False,
        description="Start a new model version from the previous version's best weights "
        "(default: from scratch).",
    )
    max_failures: int = Field(1, ge=-1, description="Worker failures survived (-1: unlimited).")
    max_tokens: int = Field(256, ge=1, description="Text: most tokens per sample.")
    text_init: Literal["lsa", "random"] | None = Field(
        None,
        description="Text: where token embeddings start. 'lsa': from a latent semantic "
        "analysis of the train split (the top singular vectors of its tf-idf matrix), so "
        "tokens that share texts start close; 'random': N(0, 1). Default: lsa for the "
        "contrastive objectives, random for supervised.",
    )
    loader: Literal["shards", "ray"] = Field(
        "shards",
        description="How ranks read shards: 'shards' (each rank streams its share with "
        "webdataset; faster) or 'ray' (Ray Data streaming split).",
    )
    log_keys: bool = Field(
        False,
        description="Write the sample keys each rank trained on, per epoch, to RUN_DIR/keys/ "
        "(audits data coverage).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS, else start a local Ray."
    )
    exclude: Path | None = Field(
        None,
        description="A file of sample keys to leave out, one a line (`featx dedup` writes "
        "FEATURES/versions/<v>/_dedup/exclude.txt): near-duplicates and leaking samples.",
    )
    overwrite: bool = Field(False, description="Start RUN_DIR afresh instead of resuming.")

    def check_paths(self) -> None:
        from featx.dataset import load_card
        from featx.models import PRESETS

        problems = []
        try:
            card = load_card(self.dataset)
        except FileNotFoundError as e:
            raise ConfigError([f"dataset: {e}"]) from None
        labelled = self.objective != "contrastive"  # contrastive training ignores labels
        if labelled and len(card["classes"]) < 2:
            problems.append(
                f"dataset: {self.dataset} has {len(card['classes'])} classes; --objective "
                f"{self.objective} needs labelled data with at least 2 (class folders or a "
                "manifest `label` column); for unlabelled data use --objective contrastive"
            )
        if card["counts"].get("train", {}).get("total", 0) == 0:
            problems.append(f"dataset: {self.dataset} has no train samples")
        unlabelled = sum(c["per_class"].get("(unlabelled)", 0) for c in card["counts"].values())
        if labelled and card["classes"] and unlabelled:
            problems.append(
                f"dataset: {unlabelled} samples of {self.dataset} have no label (their sources "
                "are in the shards' _stats.json with label null); label them and ingest again"
            )
        if self.preset not in PRESETS[self.model]:
            problems.append(f"preset: {self.preset!r} unknown; known: {list(PRESETS[self.model])}")
        if not is_uri(self.out) and self.out.exists() and not self.out.is_dir():
            problems.append(f"out: {self.out} exists and is not a folder")
        if self.exclude is not None and not self.exclude.is_file():
            problems.append(f"exclude: {self.exclude} is not a file")
        if problems:
            raise ConfigError(problems)

    def resolve(self, card: dict) -> TrainConfig:
        """The config with every default that depends on the family or the data filled in."""
        from featx.models import default_lr
        from featx.recipe import auto_batch_size, auto_epochs

        n_train = card["counts"]["train"]["total"]
        contrastive = self.objective != "supervised"
        batch = self.batch_size or auto_batch_size(n_train, self.workers, contrastive)
        return self.model_copy(
            update={
                "batch_size": batch,
                "epochs": self.epochs or auto_epochs(n_train, self.workers, batch, contrastive),
                "lr": self.lr if self.lr is not None else default_lr(self.model),
                "text_init": self.text_init or ("lsa" if contrastive else "random"),
            }
        )

    def run_fingerprint(self) -> dict:
        """What a resumed run, or a new version in the same RUN_DIR, must share with the run
        before it: taken before `resolve`, so automatic settings are None."""
        settings = self.model_dump(
            mode="json", include={"model", "preset", "batch_size", "lr", "seed", "workers"}
        )
        if self.objective != "supervised":  # absent for supervised: run.json from before it
            settings.update(objective=self.objective, temperature=self.temperature)
        if self.exclude is not None:  # absent without one: run.json from before it
            import hashlib

            settings["exclude_sha256"] = hashlib.sha256(self.exclude.read_bytes()).hexdigest()
        return settings


class ExtractConfig(StageConfig):
    """Options of `featx extract`."""

    dataset: Location = Field(
        description="Dataset folder written by `featx ingest` (holds dataset.json and shards), "
        "or its object-store URI."
    )
    checkpoint: Location = Field(
        description="Model directory (featx.json + model.pt), or a training RUN_DIR: its best/ "
        "is used. Folder or URI."
    )
    out: Location = Field(
        description="FEATURES_DIR: versions of `<split>/part-NNNNNN.parquet`, one per input "
        "shard, under `versions/NNNNNN/`; `current` and `_featx_features.json` point at the "
        "newest complete one. A folder or an object-store URI."
    )
    keep_versions: int = Field(
        3,
        ge=1,
        le=1000,
        description="Feature versions kept in OUT, the current one included; older ones are "
        "removed once a new one is complete.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Samples per forward pass.")
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Model actors (with the Ray engine). Each loads the model once and embeds "
        "whole shards; together they get every CPU. Default: 1 with --gpu; on CPUs 2 (one "
        "decodes while another runs the model), about one per 4 CPUs on larger machines, and "
        "never more than there are shards.",
    )
    gpu: bool = Field(
        False,
        description="Run the model on a GPU: one per actor with the Ray engine (the cluster "
        "needs GPUs), this machine's with the local one.",
    )
    engine: Literal["auto", "ray", "local"] = Field(
        "auto",
        description="Where the model runs: `ray`, a Ray Data actor pool, one task per shard "
        "(a cluster, or a large job); `local`, this process, without Ray's start-up (a small "
        "job); `auto`, local when no Ray cluster is named and at most 20,000 samples are "
        "pending, else ray.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS, else a local Ray."
    )
    overwrite: bool = Field(
        False,
        description="Delete every feature version in OUT first and start again at version 1.",
    )
    # The checks that need the file system are extract's preflight, run once as it starts.


class ProbeConfig(StageConfig):
    """Options of `featx probe`; the baseline's extraction takes extract's own options."""

    features: Location = Field(
        description="FEATURES_DIR written by `featx extract` (a folder or an object-store URI)."
    )
    baseline: bool = Field(
        True, description="Compare with the same architecture's random-init features."
    )
    baseline_checkpoint: Location | None = Field(
        None,
        description="Compare with this model's features instead of a random-init one (a model "
        "directory or training RUN_DIR; a folder or URI).",
    )
    classic: bool = Field(
        True,
        description="Compare with classic features of the same samples: raw pixels 16x16, "
        "tf-idf word 1-2 grams, or log-mel 40-band mean+std.",
    )
    dataset: Location | None = Field(
        None,
        description="Dataset for the baselines (random-init and classic features); default: "
        "the one extract recorded.",
    )
    seed: int = Field(0, description="Seed of the random-init baseline and the probe.")
    exclude: Path | None = Field(
        None,
        description="A file of sample keys (one a line, as `featx dedup` writes): the probe "
        "is scored with and without them.",
    )
    batch_size: int = field_from(
        ExtractConfig,
        "batch_size",
        description="Baseline extraction: samples per forward pass.",
    )
    workers: int | None = field_from(
        ExtractConfig,
        "workers",
        description="Baseline extraction: model actors; default: extract's (2 on CPUs, about "
        "one per 4 CPUs on larger machines).",
    )
    engine: Literal["auto", "ray", "local"] = field_from(
        ExtractConfig,
        "engine",
        description="Baseline extraction: where the model runs (as `featx extract --engine`).",
    )
    ray_address: str | None = field_from(
        ExtractConfig,
        "ray_address",
        description="Ray cluster for the baseline extraction (default: $RAY_ADDRESS or local).",
    )
    # The checks that need the file system are probe's own, run as it starts: the features'
    # manifest, then the dataset, only if a baseline reads it.


class IndexConfig(StageConfig):
    """Options of `featx index`."""

    features: Location = Field(
        description="FEATURES_DIR written by `featx extract` (a folder or an object-store URI); "
        "its current version is indexed, in FEATURES_DIR/versions/<current>/_index/."
    )
    segment_rows: int = Field(
        1_000_000,
        ge=1,
        description="Most rows in one index segment; segments are built in parallel as Ray "
        "tasks with --ray-address, and reused by the next version where its parts are unchanged.",
    )
    ray_address: str | None = Field(
        None,
        description="Build the segments as Ray tasks on this cluster (default: in this "
        "process). On a cluster, give FEATURES as an object-store URI the nodes can read.",
    )


class NeighborsConfig(StageConfig):
    """Options of `featx neighbors`."""

    features: Location = Field(description="FEATURES_DIR written by `featx extract`.")
    key: str | None = Field(None, description="The sample whose neighbours to list, by key.")
    file: Path | None = Field(
        None,
        description="A new raw file: normalised as the dataset was, embedded by the features' "
        "model, then looked up.",
    )
    k: int = Field(10, ge=1, le=10_000, description="How many neighbours.")

    @classmethod
    def cross_problems(cls, v: dict) -> list[str]:
        if (v.get("key") is None) == (v.get("file") is None):
            return ["give exactly one of --key KEY or --file PATH"]
        return []


class DedupConfig(StageConfig):
    """Options of `featx dedup`."""

    features: Location = Field(description="FEATURES_DIR written by `featx extract`.")
    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Cosine similarity (of centred features) from which two samples are "
        "near-duplicates.",
    )
    out: Path | None = Field(
        None,
        description="Folder for pairs.parquet, summary.json, exclude.txt (and pairs.png for "
        "images); default FEATURES_DIR/versions/<current>/_dedup/.",
    )
    sheet: bool = Field(True, description="Draw the worst pairs as pairs.png (image datasets).")


class ExportConfig(StageConfig):
    """Options of `featx export`."""

    features: Location = Field(description="FEATURES_DIR written by `featx extract`.")
    to: Literal["lance"] = Field("lance", description="The format: a Lance dataset.")
    out: Path = Field(description="Where the export goes (a new folder, or an earlier export).")
    index: bool | None = Field(
        None,
        description="Build a vector index on the embedding column: default when there are "
        "enough rows to train one.",
    )


class MapConfig(StageConfig):
    """Options of `featx map`."""

    features: Location = Field(description="FEATURES_DIR written by `featx extract`.")
    out: Path = Field(description="The PNG to write.")
    method: Literal["auto", "pca", "tsne"] = Field(
        "auto",
        description="auto: PCA, and t-SNE beside it when openTSNE is installed "
        "(pip install 'featx[map]').",
    )
    max_points: int = Field(20_000, ge=10, description="Rows drawn (a seeded sample beyond).")
