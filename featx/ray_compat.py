"""Every use featx makes of Ray's private API, in one place, each with a fallback.

featx trims Ray Train's start-up on a laptop (helper actors a run has no use for) and quiets
its per-report log lines; these need names that Ray does not promise to keep. They are used
only with the Ray versions featx was tested with (`TESTED`, the range pyproject.toml pins).
With another Ray, or one that lacks a name, featx warns once and uses the stock parts, which
work, only slower to start. `missing()` lists the names the installed Ray no longer has; the
test suite fails on any.

Imported only when a Ray run starts: `featx.train` and the CLI import it lazily. Ray Train's
controller unpickles `LocalScalingPolicy` by name, so it is defined at module level.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from functools import cache

log = logging.getLogger(__name__)

TESTED = ((2, 60), (2, 61))  # [low, high): keep in step with pyproject.toml's pin

_POLICY = "ray.train.v2._internal.execution.scaling_policy"
# every private name featx relies on: what for -> (module, attribute path)
PRIVATE = {
    "fixed policy": (_POLICY, "FixedScalingPolicy"),
    "policy request": (_POLICY, "FixedScalingPolicy._maybe_send_resource_request"),
    "policy send": (_POLICY, "FixedScalingPolicy._send_resource_request"),
    "policy cancel": (_POLICY, "FixedScalingPolicy._cancel_resource_request"),
    "datasets callback": ("ray.train.v2._internal.callbacks.datasets", "DatasetsCallback"),
    "placement group callback": (
        "ray.train.v2._internal.callbacks.placement_group_callback",
        "PlacementGroupCleanerCallback",
    ),
    "default callbacks": ("ray.train.torch", "TorchTrainer._create_default_callbacks"),
    "run controller": ("ray.train.torch", "TorchTrainer._initialize_and_run_controller"),
    "report logger": ("ray.train.v2._internal.execution.context", "__file__"),
    "config refresh": ("ray._raylet", "Config.initialize"),
}


def _resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing() -> list[str]:
    """The private names of `PRIVATE` that the installed Ray does not have."""
    gone = []
    for module, path in PRIVATE.values():
        try:
            _resolve(module, path)
        except (ImportError, AttributeError):
            gone.append(f"{module}.{path}")
    return gone


def ray_version() -> tuple[int, int]:
    import ray

    major, minor, *_ = (int(p) if p.isdigit() else 0 for p in ray.__version__.split("."))
    return major, minor


@cache
def usable() -> bool:
    """Whether the patches apply: a tested Ray that has every private name. Warns once if not."""
    import ray

    low, high = TESTED
    if not low <= ray_version() < high:
        why = f"Ray {ray.__version__} is outside the tested range {_range()}"
    elif gone := missing():
        why = f"Ray {ray.__version__} lacks {', '.join(gone)}"
    else:
        return True
    warnings.warn(
        f"{why}: featx uses Ray Train's stock parts, which start more slowly",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _range() -> str:
    (a, b), (c, d) = TESTED
    return f">={a}.{b},<{c}.{d}"


def trainer_class(*, datasets: bool, local: bool):
    """TorchTrainer, less the helper actors a run has no use for. Each is a process of its own
    that imports Ray Train (and often torch), 2-5 s of CPU on a laptop, and Ray Train starts
    them one after another before the loop runs:

    - the dataset manager, which only serves Ray Datasets: none with `--loader shards`;
    - on a local Ray, the placement-group cleaner: it watches the controller through Ray's
      State API, which needs the dashboard featx does not start, and a local Ray's placement
      groups end with the driver anyway. On a cluster it stays: a killed driver there would
      leave the workers' CPUs reserved;
    - on a local Ray, the autoscaling coordinator: the scaling policy asks it, and waits for
      it, to request the workers' resources from the cluster autoscaler, which a local Ray
      does not have. On a cluster it stays.
    """
    from ray.train.torch import TorchTrainer

    if (datasets and not local) or not usable():
        return TorchTrainer
    unused = set()
    if not datasets:
        unused.add(_resolve(*PRIVATE["datasets callback"]))
    if local:
        unused.add(_resolve(*PRIVATE["placement group callback"]))
    fixed = _resolve(*PRIVATE["fixed policy"])

    class FeatxTrainer(TorchTrainer):
        def _create_default_callbacks(self, *args, **kwargs):
            callbacks = super()._create_default_callbacks(*args, **kwargs)
            return [c for c in callbacks if type(c) not in unused]

        def _initialize_and_run_controller(self, **kwargs):
            if local and type(kwargs.get("scaling_policy")) is fixed:
                kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return FeatxTrainer


try:
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class LocalScalingPolicy(FixedScalingPolicy):
        """Ray Train's fixed-size policy without its requests to the cluster autoscaler.

        The stock policy sends them through a coordinator actor that it starts, and waits for,
        before the first worker starts; a local Ray has no autoscaler to receive them.
        """

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

except ImportError:  # a Ray without it: trainer_class() falls back before it is needed
    LocalScalingPolicy = None


def quiet_report_lines() -> None:
    """Ray Train logs every report() at INFO, one long line per rank per epoch, through a
    logger named by its file path, which the `ray.train` level set by LoggingConfig misses.
    featx logs each epoch itself; warnings still come through."""
    try:
        path = _resolve(*PRIVATE["report logger"])
    except (ImportError, AttributeError):  # a Ray that moved it; its lines then stay
        return
    logging.getLogger(path).setLevel(logging.WARNING)


def no_worker_prestart() -> dict:
    """`ray.init` keywords that stop a local Ray from pre-starting a worker for the driver."""
    return {"_system_config": {"prestart_worker_first_driver": False}}


def refresh_config() -> None:
    """Ray caches its config (RAY_AUTH_MODE among it) at import; read it again."""
    try:
        _resolve(*PRIVATE["config refresh"])("")
    except Exception as e:  # noqa: BLE001 (a Ray without it reads the mode when it starts)
        log.debug("could not refresh Ray's config: %s", e)
