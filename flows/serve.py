"""Deployments of the four featx flows, with cron schedules, served from one process.

`featx serve` calls `serve_all`: each flow becomes a deployment whose parameters point at one
work folder, so the scheduled ingest, train and extract runs feed each other, and the pipeline
deployment runs all of them in one go.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CRON = {
    "ingest": "0 * * * *",  # hourly: new files in SRC become new shards
    "train": "0 2 * * *",  # nightly
    "extract": "0 4 * * *",  # after training
    "pipeline": "0 3 * * 0",  # weekly, end to end
}


def deployments(src: Path, workdir: Path, crons: dict[str, str], paused: bool = False) -> list:
    from featx.pipeline import PipelineConfig
    from flows.extract import extract_flow
    from flows.ingest import ingest_flow
    from flows.pipeline import pipeline_flow
    from flows.train import train_flow

    pipe = PipelineConfig.parse(src=src.resolve(), workdir=workdir.resolve())
    configs = {
        "ingest": (ingest_flow, {"config": _json(pipe.ingest_config())}),
        "train": (train_flow, {"config": _json(pipe.train_config())}),
        "extract": (extract_flow, {"config": _json(pipe.extract_config())}),
        "pipeline": (pipeline_flow, {"config": _json(pipe)}),
    }
    out = []
    for name, (fl, params) in configs.items():
        out.append(
            fl.to_deployment(
                name=f"featx-{name}",
                cron=crons.get(name, DEFAULT_CRON[name]),
                parameters=params,
                paused=paused,
                description=(fl.__doc__ or "").strip().splitlines()[0],
                tags=["featx"],
            )
        )
    return out


def serve_all(src: Path, workdir: Path, crons: dict[str, str], paused: bool = False) -> None:
    """Register the deployments with the Prefect API in PREFECT_API_URL and run their flows."""
    from prefect import serve

    serve(*deployments(src, workdir, crons, paused), pause_on_shutdown=False)


def _json(model) -> dict:
    return model.model_dump(mode="json", exclude_unset=False)
