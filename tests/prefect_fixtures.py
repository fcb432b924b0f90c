"""A real `prefect server`, a real `featx serve` and one finished pipeline run, for the session.

Test modules load this with `pytest_plugins = ["prefect_fixtures"]`: fixtures of a plugin are
registered once, so test_prefect_server.py and test_prefect_ui.py share one server, one served
process and one run (together about two minutes on 2 cores) instead of making two of each.
Every subprocess gets a fresh PREFECT_HOME under tmp, every wait is bounded, and every process
tree is killed at teardown, also when a test fails. (PYTEST_DONT_REWRITE: the test modules
import helpers from here before pytest loads it as a plugin; it has no asserts to rewrite.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "train", "extract", "pipeline")
RUN_NAME = "featx-e2e"  # the pipeline run's name, which the UI test looks for
# Tiny but learnable: 64 images of two colours, 16 px, 2 epochs.
TINY = {"epochs": 2, "batch_size": 8, "shard_samples": 8, "image_size": 16, "val_fraction": 0.25}
N_IMAGES = 64
RUN_TIMEOUT_S = 600


@dataclass
class Server:
    url: str  # UI root, e.g. http://127.0.0.1:4321
    api_url: str
    home: Path
    log: Path
    proc: subprocess.Popen


@dataclass
class Served:
    src: Path
    workdir: Path
    log: Path
    proc: subprocess.Popen
    deployments: dict[str, object]  # stage -> DeploymentResponse


@dataclass
class PipelineRun:
    flow_run: object  # prefect FlowRun, read after it finished
    config: dict
    workdir: Path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect or Ray settings, plus `extra`.

    Other tests set PREFECT_HOME in os.environ; a subprocess must never see those.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("RAY_ADDRESS", None)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 8000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(no output: {e})"
    return text[-chars:]


def wait_until(
    check: Callable[[], object],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    every: float = 1.0,
):
    """Poll `check` until it returns something truthy; fail with `log`'s tail otherwise."""
    deadline = time.monotonic() + timeout
    error = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}"
            )
        try:
            if result := check():
                return result
        except Exception as e:  # a server still starting refuses connections
            error = e
        time.sleep(every)
    pytest.fail(
        f"{what}: not done after {timeout:.0f} s (last error: {error!r})\n"
        + (tail(log) if log else "")
    )


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate `proc`'s process group and every descendant (Ray workers start their own)."""
    import psutil

    if proc.poll() is None:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        _, alive = psutil.wait_procs(kids, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphans left in its group


@contextlib.contextmanager
def use_api(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at `api_url` (settings are read at import time)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def upgrade_database(env: dict[str, str], attempts: int = 5) -> None:
    """Create the server's SQLite schema from one process, with retries, before it starts.

    A first start that creates the schema while the server's services already use the file
    can fail with "database is locked" on a busy machine; a migrated file starts cleanly.
    """
    cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    for i in range(attempts):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return
        if "locked" not in r.stdout + r.stderr or i == attempts - 1:
            pytest.fail(f"prefect server database upgrade failed:\n{(r.stdout + r.stderr)[-4000:]}")
        time.sleep(1 + i)


def spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A background process in a session of its own (so `stop` ends its whole tree), its
    output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_server(root: Path) -> Server:
    """`prefect server start` on a free port with its own PREFECT_HOME (SQLite) in `root`."""
    port, home, log = free_port(), root / "prefect-home", root / "server.log"
    home.mkdir(parents=True)
    url = f"http://127.0.0.1:{port}"
    env = clean_env(
        PREFECT_HOME=str(home),
        # `--port` alone leaves the UI calling the API on the default port 4200.
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"{url}/api",
        # No scheduler: the hourly ingest cron must not start a run into the test's work folder
        # (the deployments keep their schedules; only automatic scheduled runs are off).
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    upgrade_database(env)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = spawn([*cmd, "--port", str(port)], log, env, cwd=root)
    server = Server(url, f"{url}/api", home, log, proc)

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/api/health", timeout=5) as r:
            return r.read() == b"true"

    try:
        wait_until(
            healthy,
            timeout=180,
            what="prefect server /api/health",
            proc=proc,
            log=log,
        )
    except BaseException:
        stop(proc)
        raise
    return server


def colour_images(root: Path, n: int = N_IMAGES) -> Path:
    """Red and blue noisy squares in class folders: a CNN separates them in one epoch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = ("red", "blue")[i % 2]
        base = np.array([200, 40, 40] if label == "red" else [40, 40, 200], dtype=float)
        arr = np.clip(base + rng.normal(0, 60, (20, 20, 3)), 0, 255).astype(np.uint8)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / label / f"{i:03d}.png")
    return root


def read_deployments(api_url: str) -> dict[str, object]:
    """The featx deployments on the server, by stage name."""
    from prefect.client.orchestration import get_client

    with use_api(api_url), get_client(sync_client=True) as client:
        found = client.read_deployments()
    by_name = {d.name: d for d in found}
    return {s: by_name[f"featx-{s}"] for s in STAGES if f"featx-{s}" in by_name}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("prefect-server"))
    yield server
    stop(server.proc)


@pytest.fixture(scope="session")
def featx_served(prefect_server: Server, tmp_path_factory) -> Iterator[Served]:
    """`featx serve` on a tiny dataset, once its four deployments are registered."""
    root = tmp_path_factory.mktemp("featx-serve")
    src, workdir, log = colour_images(root / "src"), root / "work", root / "serve.log"
    env = clean_env(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=prefect_server.api_url,
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # pick the run up in 2 s, not 10
    )
    cmd = [sys.executable, "-m", "featx.cli", "serve", "--src", str(src)]
    # cwd: deployment entrypoints are relative to the working directory
    proc = spawn([*cmd, "--workdir", str(workdir)], log, env, cwd=REPO)

    def all_registered():
        found = read_deployments(prefect_server.api_url)
        return found if len(found) == len(STAGES) else None

    try:
        deployments = wait_until(
            all_registered,
            timeout=180,
            what="featx serve registering 4 deployments",
            proc=proc,
            log=log,
        )
        yield Served(src, workdir, log, proc, deployments)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def pipeline_run(prefect_server: Server, featx_served: Served) -> PipelineRun:
    """A run of the served pipeline deployment, started through the API, finished."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    config = {"src": str(featx_served.src), "workdir": str(featx_served.workdir), **TINY}
    with use_api(prefect_server.api_url):
        created = run_deployment(
            name="featx-pipeline/featx-pipeline",
            parameters={"config": config},
            flow_run_name=RUN_NAME,
            timeout=0,  # return at once; the wait below is ours, with the log on failure
            as_subflow=False,
        )
        with get_client(sync_client=True) as client:

            def finished():
                r = client.read_flow_run(created.id)
                return r if r.state.is_final() else None

            run = wait_until(
                finished,
                timeout=RUN_TIMEOUT_S,
                what=f"flow run {RUN_NAME} of featx-pipeline",
                proc=featx_served.proc,
                log=featx_served.log,
                every=2.0,
            )
    if not run.state.is_completed():
        pytest.fail(
            f"flow run {RUN_NAME} ended {run.state.type.value}: {run.state.message}\n"
            f"--- featx serve output (tail) ---\n{tail(featx_served.log, 12000)}"
        )
    return PipelineRun(run, config, featx_served.workdir)
