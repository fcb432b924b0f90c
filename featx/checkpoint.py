"""Self-contained model directories: `model.pt` (a state dict) + `featx.json` (+ tokenizer).

A model directory is all extraction needs. Weights load with `torch.load(weights_only=True)`,
so a checkpoint can never run code; the architecture is rebuilt from `featx.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from featx import __version__
from featx.fsutil import atomic_write_text, sha256_file

MODEL_FILE = "model.pt"
META_FILE = "featx.json"
TOKENIZER_FILE = "tokenizer.json"


def save_model_dir(
    folder: Path,
    model: torch.nn.Module,
    card: dict,
    dataset: Path,
    metrics: dict,
    extra: dict | None = None,
) -> None:
    """Write a model directory; `featx.json` goes last, so its presence means complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = folder / f".{MODEL_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / MODEL_FILE)
    tokenizer = None
    if card.get("tokenizer"):
        from featx import storage

        tokenizer_file = storage.local_path(storage.join(dataset, card["tokenizer"]))
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
        tokenizer = TOKENIZER_FILE
    meta = {
        "featx_version": __version__,
        "model_name": model.model_name,
        "preset": model.preset,
        "modality": model.modality,
        "feature_dim": model.feature_dim,
        "model": model.config,
        "classes": card["classes"],
        "class_names": card["class_names"],
        "normalisation": card["normalisation"],
        "tokenizer": tokenizer,
        "dataset_fingerprint": card["fingerprint"],
        "metrics": metrics,
        **(extra or {}),
    }
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


def load_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No {META_FILE} in {folder}: pass a model directory written by `featx train` "
            "(RUN_DIR/best or RUN_DIR itself)"
        )
    return json.loads(path.read_text())


def resolve_model_dir(path):
    """Accept a model directory or a training RUN_DIR (whose `best` holds the best model);
    either may be a local folder or an object-store URI."""
    from featx import storage

    if storage.is_uri(path):
        for candidate in (path, storage.join(path, "best")):
            if storage.exists(storage.join(candidate, META_FILE)):
                return candidate
        where = storage.display(path)
        raise FileNotFoundError(
            f"No model in {where}: expected {META_FILE} there or in {where}/best; "
            "did `featx train ... --out` finish an epoch?"
        )
    path = Path(path)
    if (path / META_FILE).exists():
        return path
    if (path / "best" / META_FILE).exists():
        return path / "best"
    raise FileNotFoundError(
        f"No model in {path}: expected {META_FILE} there or in {path}/best; "
        "did `featx train ... --out` finish an epoch?"
    )


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from `featx.json` and load `model.pt` safely; returns (model, meta)."""
    from featx import storage
    from featx.models import create_model

    folder = resolve_model_dir(folder)
    if storage.is_uri(folder):
        folder = storage.local_copy(folder)
    meta = load_meta(folder)
    model = create_model(**meta["model"])
    state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    meta["model_dir"] = str(folder)
    meta["checkpoint_sha256"] = sha256_file(folder / MODEL_FILE)
    return model, meta
