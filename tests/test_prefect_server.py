"""featx on a real Prefect server: served deployments, a pipeline run through the API, prefect.yaml.

The server, `featx serve` and the finished run come from prefect_fixtures.py and are shared
with test_prefect_ui.py. Only the prefect.yaml check runs without a server (and is quick).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prefect_fixtures import (
    N_IMAGES,
    REPO,
    RUN_NAME,
    STAGES,
    clean_env,
    read_deployments,
    start_server,
    stop,
    tail,
    use_api,
)

pytest_plugins = ["prefect_fixtures"]

PREFECT_YAML = REPO / "deploy" / "prefect.yaml"


def _yaml_deployments() -> dict[str, dict]:
    import yaml

    doc = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d for d in doc["deployments"]}


def _artifacts(api_url: str, flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with use_api(api_url), get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found if a.key}


def test_prefect_yaml_declares_the_served_deployments():
    """deploy/prefect.yaml and `featx serve` declare the same flows, schedules and parameters."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    from featx.pipeline import PipelineConfig
    from flows.serve import DEFAULT_CRON

    declared = _yaml_deployments()
    assert sorted(declared) == sorted(f"featx-{s}" for s in STAGES)
    # What `featx serve` registers when run from the repository root with its defaults.
    pipe = PipelineConfig(src=Path("data/images"), workdir=Path(".runs/scheduled"))
    served_configs = {
        "ingest": pipe.ingest_config(),
        "train": pipe.train_config(),
        "extract": pipe.extract_config(),
        "pipeline": pipe,
    }
    for stage in STAGES:
        d = declared[f"featx-{stage}"]
        assert d["entrypoint"] == f"flows/{stage}.py:{stage}_flow"
        assert [s["cron"] for s in d["schedules"]] == [DEFAULT_CRON[stage]], stage
        assert d["work_pool"]["name"] == "featx" and "featx" in d["tags"]
        fl = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        assert isinstance(fl, Flow) and fl.name == f"featx-{stage}"
        # The flow accepts the parameters, and they are the ones `featx serve` uses.
        params = fl.validate_parameters(d["parameters"])
        assert params["config"] == served_configs[stage], stage


@pytest.mark.slow
def test_serve_registers_four_scheduled_deployments(prefect_server, featx_served):
    from prefect.client.orchestration import get_client

    from featx.pipeline import PipelineConfig
    from flows.serve import DEFAULT_CRON

    deps = featx_served.deployments
    assert sorted(deps) == sorted(STAGES)
    with use_api(prefect_server.api_url), get_client(sync_client=True) as client:
        flow_names = {s: client.read_flow(d.flow_id).name for s, d in deps.items()}
    for stage, d in deps.items():
        assert flow_names[stage] == d.name == f"featx-{stage}"  # "featx-ingest/featx-ingest"
        assert [s.schedule.cron for s in d.schedules] == [DEFAULT_CRON[stage]], stage
        assert all(s.active for s in d.schedules) and not d.paused
        assert d.entrypoint == f"flows/{stage}.py:{stage}_flow"
        assert "featx" in d.tags
    pipe = deps["pipeline"]
    assert Path(pipe.parameters["config"]["src"]) == featx_served.src.resolve()
    assert Path(pipe.parameters["config"]["workdir"]) == featx_served.workdir.resolve()
    # The UI's custom-run form is built from this schema: every PipelineConfig field is in it.
    schema = pipe.parameter_openapi_schema["definitions"]["PipelineConfig"]
    assert set(schema["properties"]) == set(PipelineConfig.model_fields)


@pytest.mark.slow
def test_pipeline_run_through_the_api_writes_features_and_artifacts(prefect_server, pipeline_run):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run, work = pipeline_run.flow_run, pipeline_run.workdir
    assert run.state.is_completed() and run.name == RUN_NAME
    assert run.parameters == {"config": pipeline_run.config}
    with use_api(prefect_server.api_url), get_client(sync_client=True) as client:
        assert (
            run.deployment_id == client.read_deployment_by_name("featx-pipeline/featx-pipeline").id
        )
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == [
        "extract",
        "ingest",
        "probe",
        "train",
        "use features",
    ]
    assert all(t.state.is_completed() for t in tasks)

    # One feature row per ingested sample, each key once.
    card = json.loads((work / "shards" / "dataset.json").read_text())
    ingested = sum(c["total"] for c in card["counts"].values())
    assert ingested == N_IMAGES and not card["rejected"]["total"]
    parts = sorted(
        p
        for split in card["counts"]
        for p in (work / "features" / "current" / split).glob("*.parquet")
    )
    assert parts, f"no Parquet parts under {work / 'features'}"
    table = pq.ParquetDataset(parts).read()
    assert table.num_rows == ingested
    assert pc.count_distinct(table["key"]).as_py() == ingested
    assert set(table["label_name"].to_pylist()) == {"red", "blue"}
    assert (work / "report.md").read_text().startswith("# featx pipeline")

    arts = _artifacts(prefect_server.api_url, run.id)
    assert {"featx-ingest", "featx-pipeline", "featx-classes", "featx-features"} <= set(arts), (
        sorted(arts)
    )
    # the map and the near-duplicate summary travel in the artifact itself
    used = arts["featx-features"].data
    assert "![map](data:image/png;base64," in used and "near-duplicate pairs" in used
    report = arts["featx-pipeline"]
    assert report.type == "markdown" and "# featx pipeline" in report.data
    assert "probe" in report.data and str(work / "features") in report.data
    classes = arts["featx-classes"]
    rows = json.loads(classes.data) if isinstance(classes.data, str) else classes.data
    assert classes.type == "table" and {r["class"] for r in rows} == {"red", "blue"}
    assert all(r["probe accuracy"] is not None for r in rows)


@pytest.mark.slow
def test_prefect_deploy_registers_the_yaml_deployments(tmp_path):
    """`prefect deploy --all` of deploy/prefect.yaml, as its header says, on a fresh server.

    A server of its own: the yaml's deployments have the served ones' names and would replace
    them on the shared server.
    """
    server = start_server(tmp_path)
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "client-home"),
        PREFECT_API_URL=server.api_url,
        FEATX_HOME=str(REPO),
    )
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    try:
        for args in (
            ["work-pool", "create", "featx", "--type", "process"],
            ["deploy", "--prefect-file", str(PREFECT_YAML), "--all"],
        ):
            r = subprocess.run(
                prefect + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
            )
            assert r.returncode == 0, f"prefect {' '.join(args)}:\n{(r.stdout + r.stderr)[-4000:]}"
        deps = read_deployments(server.api_url)
    except BaseException:
        print(tail(server.log))
        raise
    finally:
        stop(server.proc)

    declared = _yaml_deployments()
    assert sorted(deps) == sorted(STAGES)
    for stage, d in deps.items():
        want = declared[f"featx-{stage}"]
        assert d.work_pool_name == "featx" and d.entrypoint == want["entrypoint"]
        assert [s.schedule.cron for s in d.schedules] == [s["cron"] for s in want["schedules"]]
        assert d.parameters == want["parameters"]
        # The worker runs the flows from the checkout that FEATX_HOME named at deploy time.
        step = d.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == str(REPO)
