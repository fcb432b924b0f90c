"""Extract flow: one feature vector per sample into Parquet, then a linear probe."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from featx.config import ExtractConfig, ProbeConfig
from featx.probe import describe, describe_line, headline
from flows.tasks import class_table_artifact, extract_task, probe_task


@flow(name="featx-extract", log_prints=True)
def extract_flow(config: ExtractConfig, run_probe: bool = True) -> dict:
    """Extract features of `config.dataset` with `config.checkpoint` into `config.out`."""
    from featx.dataset import load_card

    summary = extract_task(config)
    described = describe(config.out)
    # unlabelled data (a contrastive model's) has nothing to probe: describe the features
    probe = (
        probe_task(ProbeConfig.parse(features=config.out))
        if run_probe and described["labelled"]
        else None
    )
    create_markdown_artifact(
        key="featx-extract",
        markdown=(
            f"# Features\n\n{summary['total_rows']} rows x {summary['feature_dim']} floats in "
            f"`{summary['out']}` ({summary['files_written']} files written, "
            f"{summary['files_skipped']} already done).\n\n"
            + (
                f"Linear probe (val): {headline(probe)}.\n"
                if probe
                else f"Features: {describe_line(described)}.\n"
            )
        ),
        description="Extraction summary",
    )
    class_table_artifact(load_card(config.dataset), probe)
    print(f"features: {summary['out']}")
    return {"extract": summary, "probe": probe, "described": described}
