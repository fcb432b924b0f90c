"""Ray Train parts featx swaps in on a local Ray; imported only when a local run starts.

Ray Train's controller unpickles these by name, so they live at module level here rather than
in `featx.train`, which the CLI imports without Ray.
"""

from __future__ import annotations

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
