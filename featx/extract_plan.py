"""Extraction's preflight: every check that needs no Ray, run once, returning the plan the run
consumes (the card, the model loaded and hashed once, warnings), or one ConfigError that lists
every problem before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from featx import __version__, storage
from featx.checkpoint import META_FILE, MODEL_FILE, CorruptModel, load_meta, resolve_model_dir
from featx.config import ExtractConfig
from featx.dataset import CARD, SPLITS, load_card
from featx.errors import ConfigError
from featx.features import CURRENT, MANIFEST, VERSIONS, read_manifest
from featx.storage import is_uri


@dataclass
class ExtractPlan:
    """What the preflight found, for the run to use: nothing is read, hashed or loaded twice."""

    card: dict
    meta: dict  # the model's featx.json, with model_dir and checkpoint_sha256
    sha: str  # sha256 of model.pt
    model_dir: Path | str  # as resolved (a folder or a URI); meta["model_dir"] is its local copy
    model: Any  # the model, loaded once here; an in-process run uses it as it is
    warnings: list[str] = field(default_factory=list)

    def stamp(self) -> dict[str, str]:
        """The key-value metadata every part of this run carries (plus its shard)."""
        return {
            "featx_version": __version__,
            "model_name": self.meta["model_name"],
            "preset": self.meta["preset"],
            "modality": self.meta["modality"],
            "feature_dim": str(self.meta["feature_dim"]),
            "checkpoint_sha256": self.sha,
            "dataset_fingerprint": self.card["fingerprint"],
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def preflight(cfg: ExtractConfig) -> ExtractPlan:
    """Every check that needs no Ray, with one ConfigError listing all problems; the model is
    loaded (and its file hashed) here, once, so a checkpoint that does not match this featx's
    architectures stops now, not as an actor traceback after Ray started."""
    from featx.checkpoint import load_model

    problems, warnings = [], []
    card = meta = model = model_dir = None
    if not storage.exists(storage.join(cfg.dataset, CARD)):
        problems.append(
            f"dataset: no {CARD} in {cfg.dataset}: did you run `featx ingest SRC {cfg.dataset}`?"
        )
    else:
        card = load_card(cfg.dataset)
    try:
        model_dir = absolute(resolve_model_dir(cfg.checkpoint))
        local = storage.local_copy(model_dir) if is_uri(model_dir) else model_dir
        where = storage.display(model_dir)
        found = load_meta(local)
        if not (local / MODEL_FILE).exists():
            problems.append(f"checkpoint: {where} has {META_FILE} but no {MODEL_FILE}")
        elif found.get("tokenizer") and not (local / found["tokenizer"]).exists():
            problems.append(
                f"checkpoint: {where} names tokenizer {found['tokenizer']!r}"
                " but the file is missing; copy it back or retrain"
            )
        else:
            try:
                model, meta = load_model(local)
            except CorruptModel as e:
                problems.append(f"checkpoint: {e}")
            except Exception as e:  # state-dict mismatch, bad config, truncated file, ...
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                problems.append(
                    f"checkpoint: {where} does not load into this featx's "
                    f"{found.get('model_name')!r} model ({first or type(e).__name__}); it was "
                    f"written by featx {found.get('featx_version')}: retrain it or extract with "
                    "that version"
                )
    except FileNotFoundError as e:
        problems.append(f"checkpoint: {e}")
    if card is not None and meta is not None:
        if card["modality"] != meta["modality"]:
            problems.append(
                f"checkpoint: {model_dir} is a {meta['modality']} model but {cfg.dataset} holds"
                f" {card['modality']} samples; pick a checkpoint trained on {card['modality']}"
            )
        elif card["fingerprint"] != meta.get("dataset_fingerprint"):
            # New data through an old model is legitimate (that is what features are for).
            warnings.append(
                f"{model_dir} was trained on another dataset (fingerprint "
                f"{str(meta.get('dataset_fingerprint'))[:12]}, not {card['fingerprint'][:12]});"
                " extracting anyway"
            )
    sha = meta["checkpoint_sha256"] if meta else None
    problems += _check_out(cfg)
    if problems:
        raise ConfigError(problems)
    return ExtractPlan(card, meta, sha, model_dir, model, warnings)


def _check_out(cfg: ExtractConfig) -> list[str]:
    out = cfg.out
    if is_uri(out):
        ds = str(cfg.dataset).rstrip("/")
        if out == ds or any(out.startswith(f"{ds}/{s}/") or out == f"{ds}/{s}" for s in SPLITS):
            return [f"out: {storage.display(out)} is the dataset or inside its shards"]
        return []  # the rest is checked against its staging folder once fetched, before work
    if out.exists() and not out.is_dir():
        return [f"out: {out} exists and is not a folder"]
    if not is_uri(cfg.dataset) and cfg.dataset.exists() and out.resolve() == cfg.dataset.resolve():
        return [f"out: {out} is the dataset folder; write features to another folder"]
    for s in SPLITS if not is_uri(cfg.dataset) else ():
        if out.resolve().is_relative_to((cfg.dataset / s).resolve()):
            return [f"out: {out} is inside the dataset's {s}/ shards; choose another folder"]
    if not out.is_dir():
        return []
    if read_manifest(out) is None:
        # a run killed before its first version was complete leaves only these
        def ours(name: str) -> bool:
            return name in (".lock", VERSIONS) or name.startswith(f".{CURRENT}.tmp")

        if any(not ours(p.name) for p in out.iterdir()):
            return [
                f"out: {out} is not empty and holds no featx features ({MANIFEST});"
                " choose a new or empty folder"
            ]
    return []


def absolute(loc):
    return loc if is_uri(loc) else Path(loc).resolve()
