"""Pipeline flow: ingest -> train -> extract -> probe -> report, each stage a retried task."""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from featx.pipeline import PipelineConfig, report_markdown, summarise, write_report
from featx.probe import headline
from flows.tasks import (
    class_table_artifact,
    extract_task,
    ingest_artifacts,
    ingest_task,
    probe_task,
    train_task,
)


@flow(name="featx-pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008
    """The whole pipeline on `config.src`; outputs under `config.workdir`."""
    from featx.dataset import load_card

    t0 = time.perf_counter()
    ingested = ingest_task(config.ingest_config())
    ingest_artifacts(ingested)
    trained = train_task(config.train_config())
    extracted = extract_task(config.extract_config())
    probed = probe_task(config.probe_config())
    summary = summarise(config, ingested, trained, extracted, probed, time.perf_counter() - t0)
    write_report(config.report, summary)
    create_markdown_artifact(
        key="featx-pipeline", markdown=report_markdown(summary), description="Pipeline report"
    )
    class_table_artifact(load_card(config.shards), probed)
    print(f"features: {config.features}  probe: {headline(probed)}  report: {config.report}")
    return summary
