"""The stage tasks every flow shares: one library call each, with retries and artifacts.

Results are persisted, so a retry of a flow run reuses the stages that already completed
(Prefect's default cache policy is keyed on the flow run); a new run of a finished stage is a
quick "up to date" in the library itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from featx.config import ExtractConfig, IngestConfig, ProbeConfig, TrainConfig
from featx.storage import location


class _Progress:
    """Turns a library `progress(done, total)` callback into a throttled Prefect progress bar."""

    def __init__(self, description: str, every_s: float = 2.0) -> None:
        self.id = create_progress_artifact(progress=0.0, description=description)
        self.every_s, self.last = every_s, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= self.every_s:
            self.last = now
            update_progress_artifact(self.id, progress=100.0 * done / max(total, 1))


@task(name="ingest", retries=2, retry_delay_seconds=5, persist_result=True)
def ingest_task(config: IngestConfig) -> dict:
    from featx.ingest import ingest

    summary = ingest(config, progress=_Progress(f"ingest {config.src}"))
    return summary.to_dict()


@task(name="train", retries=1, retry_delay_seconds=5, persist_result=True)
def train_task(config: TrainConfig) -> dict:
    from featx.dataset import load_card
    from featx.train import train

    # the most epochs the run may take (early stopping may end it sooner, then the bar jumps)
    epochs = config.resolve(load_card(config.dataset)).epochs
    watcher = _EpochWatcher(config.out, epochs)
    watcher.start()
    try:
        result = train(config).to_dict()
    finally:
        watcher.stop()
    watcher.complete()
    return result


@task(name="extract", retries=2, retry_delay_seconds=5, persist_result=True)
def extract_task(config: ExtractConfig) -> dict:
    from featx.extract import extract

    return extract(config, progress=_Progress(f"extract {config.dataset}")).to_dict()


@task(name="probe", retries=1, persist_result=True)
def probe_task(config: ProbeConfig) -> dict:
    from featx.probe import probe

    return probe(config).to_dict()


@task(name="use features", retries=1, persist_result=True)
def use_task(config) -> dict:
    """Index, near-duplicates and leakage, the map (featx.pipeline.use_features)."""
    from featx.pipeline import use_features

    return use_features(config)


class _EpochWatcher:
    """Shows training progress (epochs checkpointed so far) as a Prefect progress artifact.

    Ray Train reports to its controller, not to this process, so the watcher reads what rank
    0 has checkpointed in RUN_DIR.
    """

    def __init__(self, run_dir: Path, epochs: int) -> None:
        self.run_dir, self.epochs = location(run_dir), epochs
        self.bar = create_progress_artifact(progress=0.0, description=f"train {run_dir}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._update()

    def complete(self) -> None:
        """The run finished, perhaps stopped early before its most epochs."""
        update_progress_artifact(self.bar, progress=100.0)

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            self._update()

    def _update(self) -> None:
        from featx.train import latest_epoch

        try:
            done = latest_epoch(self.run_dir)
        except (OSError, ValueError):  # a checkpoint being written right now
            return
        update_progress_artifact(self.bar, progress=100.0 * min(done, self.epochs) / self.epochs)


def ingest_artifacts(s: dict) -> None:
    rejects = "\n".join(f"| {r} | {n} |" for r, n in s["rejected"].items()) or "| (none) | 0 |"
    create_markdown_artifact(
        key="featx-ingest",
        markdown=(
            f"# Ingest: {s['modality']}\n\n"
            f"{s['total']} samples in {s['shards_total']} shards at `{s['out']}` "
            f"({s['ingested']} new, {s['shards_written']} new shards, {s['seconds']} s).\n\n"
            f"| rejected reason | inputs |\n| --- | --- |\n{rejects}\n\n"
            f"Every rejected input and its reason: `{s['out']}/rejected.jsonl`.\n"
        ),
        description="Ingest summary",
    )


def class_table(card: dict, probe: dict | None) -> list[dict]:
    """Rows of the per-class table artifact: counts per split and, with a probe, accuracy."""
    per_class = (probe or {}).get("per_class_accuracy", {})
    rows = []
    for name in card["class_names"] or ["(unlabelled)"]:
        row = {"class": name}
        for split, c in card["counts"].items():
            row[f"{split} samples"] = c["per_class"].get(name, 0)
        if probe:
            acc = per_class.get(name)
            row["probe accuracy"] = None if acc is None else round(acc, 3)
        rows.append(row)
    return rows


def class_table_artifact(card: dict, probe: dict | None) -> None:
    create_table_artifact(
        key="featx-classes", table=class_table(card, probe), description="Per-class counts"
    )
