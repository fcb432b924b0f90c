"""Ingest flow: raw files -> WebDataset shards, with progress and a summary artifact."""

from __future__ import annotations

from prefect import flow

from featx.config import IngestConfig
from flows.tasks import class_table_artifact, ingest_artifacts, ingest_task


@flow(name="featx-ingest", log_prints=True)
def ingest_flow(config: IngestConfig) -> dict:
    """Ingest `config.src` into shards at `config.out` (see `featx ingest --help`)."""
    from featx.dataset import load_card

    summary = ingest_task(config)
    ingest_artifacts(summary)
    class_table_artifact(load_card(config.out), None)
    print(f"{summary['total']} samples in {summary['shards_total']} shards at {config.out}")
    return summary
