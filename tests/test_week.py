"""A simulated week of the served deployments on a real Prefect server.

`featx serve` registers ingest (hourly), train (nightly), extract and pipeline (weekly); here
their runs are started through the API in the order the crons would start them, a week
compressed into four days, while the data changes as it does in real use: files arrive, a file
is deleted, a manifest row is relabelled, and one run is killed mid-way (then retried, as the
UI's Retry does). After every day the current features hold exactly one row for each live
sample, all from the newest model version, and no flow run has ended Failed or Crashed.

The week's log (runs, states, seconds, versions, rows per version) is printed and written to
`week.json` in the test's folder.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
from faults_support import kill_and_reap, own_processes
from prefect_fixtures import (
    REPO,
    clean_env,
    read_deployments,
    spawn,
    start_server,
    stop,
    tail,
    use_api,
)

from featx.dataset import load_card
from featx.features import read_features, read_manifest
from featx.fsutil import sha256_file

pytestmark = pytest.mark.slow

SEED = 20261206
TINY = {"epochs": 1, "workers": 1, "batch_size": 8, "shard_samples": 8, "image_size": 16}


def _write_manifest(path: Path, rows: dict[str, str]) -> None:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in sorted(rows.items())))


def _add_images(src: Path, rows: dict[str, str], start: int, n: int) -> None:
    """Red and blue noisy squares, listed in the manifest: learnable in one epoch."""
    import numpy as np
    from PIL import Image

    for i in range(start, start + n):
        label = "red" if i % 2 else "blue"
        rng = np.random.default_rng(i)
        a = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        a[..., 0 if label == "red" else 2] += 180
        path = src / "imgs" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)
        rows[f"imgs/{i:03d}.png"] = label


def test_a_week_of_scheduled_runs_keeps_the_features_true(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry

    from featx.pipeline import PipelineConfig

    src, work = tmp_path / "src", tmp_path / "work"
    rows: dict[str, str] = {}
    _add_images(src, rows, 0, 40)
    manifest = src / "manifest.csv"
    _write_manifest(manifest, rows)
    pipe = PipelineConfig.parse(src=manifest, workdir=work, val_fraction=0.25, **TINY)
    configs = {
        "ingest": pipe.ingest_config().model_dump(mode="json"),
        "train": pipe.train_config().model_dump(mode="json"),
        "extract": pipe.extract_config().model_dump(mode="json"),
        "pipeline": pipe.model_dump(mode="json"),
    }

    server = start_server(tmp_path / "server")
    serve_log = tmp_path / "serve.log"
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "serve-home"),
        PREFECT_API_URL=server.api_url,
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    cmd = [sys.executable, "-m", "featx.cli", "serve", "--src", str(manifest)]
    cmd += ["--workdir", str(work), "--paused"]  # runs come from the API, in cron order
    served = spawn(cmd, serve_log, env, cwd=REPO)
    log: list[dict] = []
    try:
        deadline = time.monotonic() + 180
        while len(read_deployments(server.api_url)) < 4:
            assert served.poll() is None and time.monotonic() < deadline, tail(serve_log)
            time.sleep(1)
        with use_api(server.api_url), get_client(sync_client=True) as client:

            def wait_final(run_id, timeout=600):
                end = time.monotonic() + timeout
                while True:
                    r = client.read_flow_run(run_id)
                    if r.state.is_final():
                        return r
                    assert time.monotonic() < end, f"run {r.name} not final\n{tail(serve_log)}"
                    assert served.poll() is None, tail(serve_log)
                    time.sleep(0.5)

            def start(day: int, stage: str):
                return run_deployment(
                    name=f"featx-{stage}/featx-{stage}",
                    parameters={"config": configs[stage]},
                    flow_run_name=f"day{day}-{stage}-{len(log)}",
                    timeout=0,
                    as_subflow=False,
                )

            def record(day: int, stage: str, run, t0: float, note: str = "") -> None:
                log.append(
                    {
                        "day": day,
                        "run": stage,
                        "state": run.state.type.value,
                        "runs": run.run_count,
                        "seconds": round(time.monotonic() - t0, 1),
                        "note": note,
                    }
                )
                assert run.state.is_completed(), f"{run.name}: {run.state}\n{tail(serve_log)}"

            def run_stage(day: int, stage: str, note: str = "") -> None:
                t0 = time.monotonic()
                record(day, stage, wait_final(start(day, stage).id), t0, note)

            def check_day(day: int, events: str) -> None:
                card = load_card(work / "shards")
                live = {e["source"]: e["key"] for e in _live_entries(work / "shards", card)}
                assert set(live) == set(rows), events  # every manifest row, once
                X, df = read_features(work / "features")
                assert sorted(df["key"]) == sorted(live.values()) and df["key"].is_unique
                labels = dict(zip(df["source"], df["label_name"], strict=True))
                assert labels == rows  # the labels as the manifest says now
                manifest_now = read_manifest(work / "features")
                best = json.loads((work / "run" / "best" / "featx.json").read_text())
                sha = sha256_file(work / "run" / "best" / "model.pt")
                assert manifest_now["checkpoint_sha256"] == sha  # the newest model version
                assert manifest_now["model_version"] == best["version"]
                log.append(
                    {
                        "day": day,
                        "events": events,
                        "samples": len(live),
                        "shards": len(card["shards"]),
                        "model version": best["version"],
                        "feature version": manifest_now["current"],
                        "rows per feature version": {
                            v["version"]: v["rows"] for v in manifest_now["versions"]
                        },
                    }
                )

            # Day 1: the first hourly ingests (the second finds nothing new), the nightly
            # train, then extract.
            for note in ("40 files", "nothing new"):
                run_stage(1, "ingest", note)
            run_stage(1, "train")
            run_stage(1, "extract")
            check_day(1, "40 files")

            # Day 2: files arrive between two ingests, and one is deleted.
            _add_images(src, rows, 40, 8)
            _write_manifest(manifest, rows)
            run_stage(2, "ingest", "8 files arrived")
            del rows["imgs/003.png"]
            (src / "imgs" / "003.png").unlink()
            run_stage(2, "ingest", "a file deleted")
            run_stage(2, "train")
            run_stage(2, "extract")
            check_day(2, "8 files arrived, 1 deleted")

            # Day 3: a manifest row is relabelled; the nightly train is killed mid-way and
            # retried (the UI's Retry on the crashed run).
            rows["imgs/004.png"] = "red" if rows["imgs/004.png"] == "blue" else "blue"
            _write_manifest(manifest, rows)
            run_stage(3, "ingest", "a row relabelled")
            t0 = time.monotonic()
            run = start(3, "train")
            end = time.monotonic() + 120
            while _run_version(work / "run") != 3:  # featx train has started version 3
                assert time.monotonic() < end, tail(serve_log)
                time.sleep(0.2)
            time.sleep(random.Random(SEED).uniform(2.0, 5.0))  # mid-way, at a seeded moment
            victim = _flow_process(served.pid)
            assert victim and kill_and_reap(victim)
            crashed = wait_final(run.id, 120)
            assert crashed.state.is_crashed(), crashed.state
            log.append({"day": 3, "run": "train", "state": "CRASHED", "note": "killed mid-way"})
            client.set_flow_run_state(run.id, AwaitingRetry(message="retry after a kill"))
            record(3, "train", wait_final(run.id), t0, "retried after the kill")
            run_stage(3, "extract")
            check_day(3, "a row relabelled, the train killed and retried")

            # Day 4: a quiet day, then the weekly pipeline: every stage finds its work done.
            run_stage(4, "ingest", "nothing new")
            run_stage(4, "train", "up to date")
            run_stage(4, "extract", "up to date")
            run_stage(4, "pipeline", "the weekly run: all up to date, then a probe")
            check_day(4, "nothing new")
            runs = client.read_flow_runs()
        bad = [r.name for r in runs if r.state.is_failed() or r.state.is_crashed()]
        assert bad == [], bad  # the killed run ended Completed once retried
    finally:
        stop(served)
        stop(server.proc)
        (tmp_path / "week.json").write_text(json.dumps(log, indent=1))
        print("\n".join(json.dumps(e) for e in log))
    days = [e for e in log if "events" in e]
    assert [d["model version"] for d in days] == [1, 2, 3, 3]
    assert [int(d["feature version"]) for d in days] == [1, 2, 3, 3]


def _live_entries(dataset: Path, card: dict) -> list[dict]:
    """The samples the card lists (what readers see)."""
    out = []
    for sh in card["shards"]:
        stats = dataset / sh["shard"].replace(".tar", "_stats.json")
        out += json.loads(stats.read_text())["entries"]
    return out


def _run_version(run: Path) -> int | None:
    """The model version RUN_DIR's run.json says is training (written when it starts)."""
    try:
        return json.loads((run / "run.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def _flow_process(served_pid: int) -> int | None:
    runs = own_processes("-m prefect.engine", root=served_pid)
    return next(iter(runs), None)
