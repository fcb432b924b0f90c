"""Ingest decoding on a Ray cluster: a poisonous input is isolated, not fatal.

The cluster's worker processes load a hook (sitecustomize on their PYTHONPATH) that kills the
process with SIGSEGV when Pillow is given an input ending in a marker, as a decoder bug would.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import make_image

from featx.config import IngestConfig
from featx.dataset import reasons as R
from featx.ingest import ingest

pytestmark = pytest.mark.slow

_HOOK = """
import io, os, resource, signal
import PIL.Image

_open = PIL.Image.open

def open(fp, *args, **kwargs):
    if isinstance(fp, io.BytesIO) and b"FEATX-TEST-CRASH" in fp.getvalue():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
    return _open(fp, *args, **kwargs)

PIL.Image.open = open
"""


@pytest.fixture(scope="module")
def crashing_cluster(tmp_path_factory):
    """A local Ray whose worker processes crash on the marked input (this process, the
    driver, started before the hook was on PYTHONPATH and never loads it)."""
    import ray

    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(_HOOK)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), before]))
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_a_poisonous_input_on_ray_is_rejected_and_the_rest_ingested(crashing_cluster, tmp_path):
    src = tmp_path / "src"
    for i in range(40):
        make_image(src / f"c{i % 2}" / f"{i:03d}.png", seed=i, size=(24, 24))
    good = (src / "c1" / "001.png").read_bytes()
    (src / "c1" / "poison.png").write_bytes(good + b"FEATX-TEST-CRASH")
    opts = dict(shard_samples=8, image_size=16, image_format="png", val_fraction=0.0)
    s = ingest(
        IngestConfig.parse(src=src, out=tmp_path / "out", ray_address=crashing_cluster, **opts)
    )
    assert s.nodes, "the inputs were not decoded on Ray"
    assert s.ingested == 40 and s.rejected == {R.CRASHED: 1}
    rows = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rows] == [("c1/poison.png", R.CRASHED)]
    # the same shards as a local run of the same inputs without the poisonous one
    (src / "c1" / "poison.png").unlink()
    ref = ingest(IngestConfig.parse(src=src, out=tmp_path / "ref", workers=1, **opts))
    assert ref.ingested == 40
    for tar in sorted((tmp_path / "ref" / "train").glob("shard-*.tar")):
        assert (tmp_path / "out" / "train" / tar.name).read_bytes() == tar.read_bytes()
