"""Pipeline flow: ingest -> train -> extract -> probe -> report, each stage a retried task."""

from __future__ import annotations

import time

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from featx.pipeline import (
    PipelineConfig,
    exclusions,
    report_markdown,
    summarise,
    use_markdown,
    write_report,
)
from featx.probe import describe, describe_line, headline
from flows.tasks import (
    class_table_artifact,
    extract_task,
    ingest_artifacts,
    ingest_task,
    probe_task,
    train_task,
    use_task,
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
    described = describe(config.features)
    used = use_task(config)
    # unlabelled data has nothing to probe: the report describes the features instead
    probed = probe_task(config.probe_config(exclusions(used))) if described["labelled"] else None
    summary = summarise(
        config, ingested, trained, extracted, probed, time.perf_counter() - t0, described, used
    )
    write_report(config.report, summary)
    create_markdown_artifact(
        key="featx-pipeline", markdown=report_markdown(summary), description="Pipeline report"
    )
    create_markdown_artifact(
        key="featx-features",
        markdown="\n".join(use_markdown(used, inline=True)) + "\n",
        description="Map of the features, nearest neighbours and near-duplicates",
    )
    class_table_artifact(load_card(config.shards), probed)
    outcome = headline(probed) if probed else describe_line(described)
    print(f"features: {config.features}  probe: {outcome}  report: {config.report}")
    return summary
