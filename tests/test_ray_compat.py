"""featx's uses of Ray's private API: present in the installed Ray, and a safe fallback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from featx import ray_compat

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_ray_has_every_name_featx_patches():
    assert ray_compat.missing() == []
    assert ray_compat.LocalScalingPolicy is not None


def test_pyproject_pins_the_tested_ray_range():
    pins = re.findall(r'"ray\[[a-z,]+\]([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins and set(pins) == {ray_compat._range()}, pins
    low, high = ray_compat.TESTED
    assert low <= ray_compat.ray_version() < high


@pytest.fixture
def fresh_check(monkeypatch):
    ray_compat.usable.cache_clear()
    yield monkeypatch
    ray_compat.usable.cache_clear()


def test_an_untested_ray_gets_the_stock_trainer_with_a_warning(fresh_check):
    from ray.train.torch import TorchTrainer

    fresh_check.setattr(ray_compat, "ray_version", lambda: (9, 0))
    with pytest.warns(RuntimeWarning, match="outside the tested range"):
        assert ray_compat.trainer_class(datasets=False, local=True) is TorchTrainer


def test_a_ray_without_a_patched_name_gets_the_stock_trainer_with_a_warning(fresh_check):
    from ray.train.torch import TorchTrainer

    gone = {**ray_compat.PRIVATE, "moved": ("ray.train.torch", "TorchTrainer._no_such_method")}
    fresh_check.setattr(ray_compat, "PRIVATE", gone)
    with pytest.warns(RuntimeWarning, match="_no_such_method"):
        assert ray_compat.trainer_class(datasets=False, local=True) is TorchTrainer


def test_a_tested_ray_gets_the_trimmed_trainer(fresh_check):
    from ray.train.torch import TorchTrainer

    trimmed = ray_compat.trainer_class(datasets=False, local=True)
    assert trimmed is not TorchTrainer and issubclass(trimmed, TorchTrainer)
    # a cluster run with Ray Datasets keeps every helper: nothing to trim
    assert ray_compat.trainer_class(datasets=True, local=False) is TorchTrainer
