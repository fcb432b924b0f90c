"""Typed configuration for each stage, validated once at the boundary (CLI, flow, YAML).

Every problem in a config is reported at once in a single `ConfigError`, before any work starts.
Below the boundary, functions take plain typed arguments.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from featx.storage import Location, is_uri

Modality = Literal["image", "text", "audio"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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


class IngestConfig(StageConfig):
    """Options of `featx ingest`. Normalisation fields are recorded in the dataset card."""

    src: Path = Field(description="Class-folder tree, flat folder, or a .csv/.jsonl manifest.")
    out: Location = Field(
        description="Output folder (or object-store URI, e.g. s3://bucket/ds) for shards, "
        "dataset.json and rejected.jsonl."
    )
    modality: Modality | None = Field(None, description="Force a modality; default: detect.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of samples for val.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of samples for test.")
    shard_samples: int = Field(1000, ge=1, description="Most samples per shard.")
    shard_bytes: int = Field(256 * 2**20, ge=1024, description="Most payload bytes per shard.")
    workers: int = Field(0, ge=0, description="Decode processes; 0 means one per core.")
    # images
    image_size: int = Field(64, ge=8, le=4096, description="Output side in pixels.")
    image_resize: Literal["crop", "pad", "stretch"] = Field(
        "crop", description="crop: shorter side + centre crop; pad: letterbox; stretch."
    )
    image_format: Literal["jpg", "png"] = Field("jpg", description="Re-encode format.")
    jpeg_quality: int = Field(90, ge=1, le=100)
    max_pixels: int = Field(
        89_478_485, ge=1, description="Decompression-bomb limit (Pillow's default)."
    )
    # audio
    sample_rate: int = Field(16000, ge=1000, le=192000, description="Target sample rate (Hz).")
    max_seconds: float = Field(10.0, gt=0, description="Longer audio is cut to this length.")
    min_seconds: float = Field(0.05, ge=0, description="Shorter audio is rejected.")
    # text
    encoding: str | None = Field(None, description="Decode text with this codec, not UTF-8.")
    max_chars: int = Field(10_000, ge=1, description="Longer text is cut to this length.")
    min_chars: int = Field(1, ge=1, description="Shorter text is rejected.")
    vocab_size: int = Field(2000, ge=64, le=1_000_000, description="Tokenizer vocabulary.")
    overwrite: bool = Field(False, description="Delete existing output and start again.")
    ray_address: str | None = Field(
        None,
        description="Decode on this Ray cluster (default: RAY_ADDRESS if set, else local "
        "processes); this process reads the inputs and writes the shards.",
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
