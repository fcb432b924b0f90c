"""RUN_DIR, as the driver reads and writes it: Ray Train's checkpoints, best/, metrics.csv,
curves.png, and the model versions before the current one (versions/vN/). Plain files only, no
torch or Ray, so polling a run (`latest_epoch`) stays cheap.

The RUN_DIR's top level is the newest version; best/ is what extraction reads, and it changes
only when a version finishes. When the dataset changes, `start_version` files the finished
version away under versions/ and clears the top level (best/ aside) for the next.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from featx import storage
from featx.checkpoint import META_FILE, STATE_FILE, TOKENIZER_FILE
from featx.fsutil import atomic_path, atomic_write_text, remove_temporaries

RAY_RUN = "ray"  # Ray Train's run folder inside RUN_DIR
KEYS_DIR = "keys"  # per-epoch, per-rank sample keys (`--log-keys`)
log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # the settings, dataset fingerprint and version of the current run
VERSIONS = "versions"  # earlier model versions: versions/vN/{best/, run.json, metrics.csv, ...}
_VERSION_FILES = (RUN_FILE, "metrics.csv", "curves.png", TOKENIZER_FILE)


def checkpoints(out: Path) -> list[tuple[Path, dict]]:
    """Complete checkpoints Ray Train kept in RUN_DIR, oldest first, with their featx.json.
    Complete means its files match the sha256 featx.json records: Ray copies a checkpoint
    file by file, and a copy cut short is skipped (with a warning), never published."""
    from featx.checkpoint import CorruptModel, verify

    found = []
    for meta_file in (out / RAY_RUN).glob(f"checkpoint_*/{META_FILE}"):
        meta = json.loads(meta_file.read_text())
        try:
            verify(meta_file.parent, meta)
        except CorruptModel as e:
            log.warning("skipping checkpoint %s: %s", meta_file.parent.name, e)
            continue
        found.append((meta_file.parent, meta))
    return sorted(found, key=lambda cm: cm[1]["epoch"])


def latest_epoch(run_dir) -> int:
    """The epoch of the newest complete checkpoint in RUN_DIR (a folder or a URI); 0 if none.
    Cheap enough to poll: it reads only the checkpoints' featx.json."""
    metas = storage.glob(storage.join(run_dir, RAY_RUN), f"checkpoint_*/{META_FILE}")
    return max((json.loads(storage.read_text(m))["epoch"] for m in metas), default=0)


def latest_state(out: Path) -> dict | None:
    """featx.json of the newest complete checkpoint, or None before the first."""
    ckpts = checkpoints(out)
    return ckpts[-1][1] if ckpts else None


def finished(meta: dict, epochs: int, patience: int, min_epochs: int = 0) -> bool:
    """A checkpoint at the last epoch, or one after which early stopping ends the run."""
    from featx.recipe import should_stop  # imports torch: only once a run has checkpoints

    history = meta["metrics"]["history"]
    return meta.get("epoch", 0) >= epochs or should_stop(history, patience, min_epochs=min_epochs)


def model_history(model_dir: Path) -> list[dict]:
    return json.loads((model_dir / META_FILE).read_text())["metrics"]["history"]


def publish(out: Path) -> None:
    """Copy the best kept checkpoint (by validation loss) to RUN_DIR/best; write the curves."""
    ckpts = checkpoints(out)
    if not ckpts:
        raise RuntimeError(f"training finished without a checkpoint in {out / RAY_RUN}")

    def score(cm):
        last = cm[1]["metrics"]["last"]
        return last.get("val_loss", last["train_loss"])

    best_dir, best_meta = min(ckpts, key=score)
    current = out / "best" / META_FILE
    if not current.exists() or json.loads(current.read_text()) != best_meta:
        tmp, old = out / ".best.tmp", out / ".best.old"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best_dir, tmp, ignore=shutil.ignore_patterns(STATE_FILE))
        if (out / "best").exists():
            (out / "best").rename(old)
        tmp.rename(out / "best")
        shutil.rmtree(old, ignore_errors=True)
    write_metrics(out, ckpts[-1][1]["metrics"]["history"])


def write_metrics(out: Path, history: list[dict]) -> None:
    import pandas as pd

    fields = sorted({k for row in history for k in row}, key=_metric_order)
    text = pd.DataFrame(history, columns=fields).to_csv(index=False, float_format="%.6g")
    atomic_write_text(out / "metrics.csv", text)
    plot_curves(history, out / "curves.png")


def _metric_order(name: str) -> tuple:
    order = ["epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy"]
    return (order.index(name) if name in order else len(order), name)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def start_version(out: Path, prior: dict, store: str | None, keep: int) -> int:
    """The dataset changed under a run: keep the current version (if it finished, i.e. best/
    is its own) as versions/vN, clear the top level but best/ for version N+1, drop versions
    beyond the newest `keep`, and return N+1. Safe to repeat after a kill at any step."""
    n = int(prior.get("version", 1))
    folder = out / VERSIONS
    folder.mkdir(exist_ok=True)
    remove_temporaries(folder)
    best = out / "best" / META_FILE
    finished_n = best.exists() and json.loads(best.read_text()).get("version", 1) == n
    if finished_n and not (folder / f"v{n}").exists():
        tmp = folder / f".v{n}.tmp"
        tmp.mkdir()
        shutil.copytree(out / "best", tmp / "best")
        for name in _VERSION_FILES:
            if (out / name).exists():
                shutil.copy2(out / name, tmp / name)
        tmp.rename(folder / f"v{n}")  # complete, or not there
    for name in (RAY_RUN, KEYS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
        if store:  # or Ray Train would resume the old version's run from the store
            storage.delete_tree(storage.join(store, name))
    for name in _VERSION_FILES:
        (out / name).unlink(missing_ok=True)
    prune_versions(out, keep, store)
    return n + 1


def versions(out: Path) -> list[int]:
    """The earlier model versions kept in RUN_DIR/versions/, oldest first."""
    return sorted(
        int(p.name[1:]) for p in (out / VERSIONS).glob("v*") if p.is_dir() and p.name[1:].isdigit()
    )


def prune_versions(out: Path, keep: int, store: str | None = None) -> list[int]:
    """Delete the earlier versions beyond the newest `keep` (here and in `store`); returns
    the ones kept."""
    found = versions(out)
    for n in found[:-keep] if keep else found:
        shutil.rmtree(out / VERSIONS / f"v{n}")
        if store:
            storage.delete_tree(storage.join(store, VERSIONS, f"v{n}"))
    return found[-keep:] if keep else []
