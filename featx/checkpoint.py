"""Self-contained model directories: `model.pt` (a state dict) + `featx.json` (+ tokenizer),
and a training checkpoint's optimiser/schedule state (`train_state.pt`) beside them.

Everything loads with `torch.load(weights_only=True)`, so a checkpoint can never run code; the
architecture is rebuilt from `featx.json`. torch is imported lazily: the driver reads the names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from featx import __version__
from featx.fsutil import atomic_path, atomic_write_text, sha256_file

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.pt"
META_FILE = "featx.json"
TOKENIZER_FILE = "tokenizer.json"
# Only in Ray Train's checkpoints (resuming needs it); RUN_DIR/best is published without it.
STATE_FILE = "train_state.pt"


def save_model_dir(
    folder: Path,
    model: torch.nn.Module,
    card: dict,
    dataset: Path | None,
    metrics: dict,
    extra: dict | None = None,
    *,
    tokenizer: str | Path | None = None,
) -> None:
    """Write a model directory; `featx.json` goes last, so its presence means complete.

    A text model's tokenizer is copied in: `tokenizer` (a local file: the one the run trained
    with), else the dataset's.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / MODEL_FILE) as tmp:
        torch.save(state, tmp)
    if card.get("tokenizer"):
        from featx import storage

        source = tokenizer or storage.local_path(storage.join(dataset, card["tokenizer"]))
        with atomic_path(folder / TOKENIZER_FILE) as tmp:
            shutil.copyfile(source, tmp)
    tokenizer = TOKENIZER_FILE if card.get("tokenizer") else None
    sums = {MODEL_FILE: sha256_file(folder / MODEL_FILE)}
    if tokenizer:
        sums[TOKENIZER_FILE] = sha256_file(folder / TOKENIZER_FILE)
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
        "sha256": sums,  # what every reader checks: a copy cut short never passes for whole
        **(extra or {}),
    }
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


class CorruptModel(ValueError):
    """A model directory whose files do not match the sha256 its featx.json records."""


def verify(folder: Path, meta: dict) -> None:
    """Raise CorruptModel unless every file `meta` records a sha256 for matches it (model
    directories written before featx recorded them are taken as they are)."""
    for name, want in (meta.get("sha256") or {}).items():
        path = Path(folder) / name
        got = sha256_file(path) if path.exists() else "missing"
        if got != want:
            raise CorruptModel(
                f"{path} does not match the sha256 in its {META_FILE} ({got[:12]}, not "
                f"{want[:12]}): the copy was cut short or the file changed; retrain, or copy "
                "the model directory again"
            )


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
    import torch

    from featx import storage
    from featx.models import rebuild_model

    folder = resolve_model_dir(folder)
    if storage.is_uri(folder):
        folder = storage.local_copy(folder)
    meta = load_meta(folder)
    verify(folder, meta)
    model = rebuild_model(meta["model"])
    state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    meta["model_dir"] = str(folder)
    meta["checkpoint_sha256"] = sha256_file(folder / MODEL_FILE)
    return model, meta


def save_train_state(
    folder: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    head: torch.nn.Module | None = None,
) -> None:
    """Write what resuming needs beyond the weights: optimiser and schedule state, the number
    of epochs done, and a contrastive run's projection head (not part of the feature model)."""
    import torch

    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
    }
    if head is not None:
        state["head"] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    torch.save(state, Path(folder) / STATE_FILE)


def load_train_state(folder: Path) -> dict:
    """The state `save_train_state` wrote: {"optimizer", "scheduler", "epoch"}."""
    import torch

    return torch.load(Path(folder) / STATE_FILE, weights_only=True)
