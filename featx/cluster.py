"""Connecting to Ray: a local Ray on a laptop, or a running cluster (`RAY_ADDRESS`).

On a cluster featx ships its own code to the workers through the job's `runtime_env`
(`py_modules`), so nodes need only the image's dependencies, and it checks before any work
that folders the stages share between nodes are visible from every node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

from featx.errors import ConfigError
from featx.storage import redact

log = logging.getLogger(__name__)

# Ray Data's internals trip a pandas deprecation warning in every worker; it is not ours.
_WORKER_ENV = {"PYTHONWARNINGS": "ignore::DeprecationWarning"}


def address_from(address: str | None) -> str | None:
    """The cluster to join: the argument, else RAY_ADDRESS; None means start a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def runtime_env(address: str | None) -> dict:
    """The job's runtime_env: featx's package travels to the workers of a running cluster.

    Inside a job started by `ray job submit`, the job's own runtime_env (its `--working-dir`
    or `--runtime-env`) already decides what the workers get; featx adds only env vars there.
    """
    env: dict = {"env_vars": dict(_WORKER_ENV)}
    in_submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if address and not in_submitted_job and os.environ.get("FEATX_SHIP_CODE", "1") != "0":
        import featx

        env["py_modules"] = [str(Path(featx.__file__).parent)]
    return env


def init_ray(address: str | None, *, worker_logs: bool = True, prestart: bool = True) -> float:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray; returns the seconds taken.

    A local Ray starts without the dashboard (no HTTP server; nothing featx runs needs it);
    its gRPC ports are Ray's own. `worker_logs=False` keeps workers' output off the console.
    `prestart=False` starts a local Ray without the idle worker per CPU it otherwise starts
    for the first tasks: Ray Train's actors never take them (each carries the env vars Ray
    Train propagates, so its own runtime env), and on a laptop their start takes the CPU the
    training processes are starting on (measured: about 1 s of training start-up on 2 cores).
    """
    import ray

    from featx import ray_compat

    address = address_from(address)
    t0 = time.perf_counter()
    kw: dict = {"logging_level": logging.WARNING, "log_to_driver": worker_logs}
    if address:
        _token_mode_if_token()
        ray.init(address=address, runtime_env=runtime_env(address), **kw)
        log.info(
            "connected to the Ray cluster at %s (%d node(s))", redact(address), len(alive_nodes())
        )
    else:
        # A local Ray's processes inherit the driver's environment, so the worker env vars go
        # there rather than into a job runtime_env: with one, Ray would not hand the workers it
        # pre-starts at launch to tasks and actors (extraction's actors take them).
        if not prestart:
            kw |= ray_compat.no_worker_prestart()
        with env_defaults(_WORKER_ENV):
            ray.init(include_dashboard=False, **kw)
    return round(time.perf_counter() - t0, 3)


@contextlib.contextmanager
def env_defaults(values: dict[str, str]):
    """Set the environment variables in `values` that are not set already, for the block;
    values the user set win. Ray reads them when it starts processes inside the block."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _token_mode_if_token() -> None:
    """Joining a cluster by address, Ray uses token authentication only if RAY_AUTH_MODE says
    so, even where a token is set up; featx turns it on when a token is there (RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token), so a token-secured cluster
    needs nothing more. An explicit RAY_AUTH_MODE (e.g. `disabled`) is left as it is."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        from featx import ray_compat

        ray_compat.refresh_config()  # Ray caches its config at import
        log.info("a Ray auth token is set up: connecting with token authentication")


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def current_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def check_shared(paths: dict[str, Path]) -> None:
    """On a cluster of several nodes, every folder in `paths` (what -> folder) must be the
    same folder on every node: shards are read, checkpoints and features written, by workers
    anywhere. A folder only the driver's node sees stops the run here, before any work.

    Each folder gets a marker file written by the driver; a zero-CPU task pinned to each
    node looks for it. Object-store URIs are shared by nature and are not checked.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from featx.storage import is_uri

    paths = {what: Path(p) for what, p in paths.items() if not is_uri(p)}
    nodes = [n for n in alive_nodes() if n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) < 2:
        return
    markers = {}
    try:
        for what, folder in paths.items():
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / f".featx-shared-check-{uuid.uuid4().hex}"
            marker.write_text(current_node_id())
            markers[what] = marker
        probe = ray.remote(num_cpus=0)(_sees)
        checks = {
            (what, n["NodeManagerAddress"], n["NodeID"]): probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for what, marker in markers.items()
            for n in nodes
        }
        seen = {}
        for check, ref in checks.items():
            # A node that left the cluster since it was listed runs nothing: skip it.
            with contextlib.suppress(
                ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError
            ):
                seen[check] = ray.get(ref, timeout=120)
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    problems = [
        f"{what}: {paths[what]} is not visible from node {node_id[:12]} ({ip}); on a cluster "
        "it must be shared storage (NFS or another mount every node has) or an object-store URI"
        for (what, ip, node_id), ok in seen.items()
        if not ok
    ]
    if problems:
        raise ConfigError(problems)


def _sees(marker: str) -> bool:
    return Path(marker).is_file()
