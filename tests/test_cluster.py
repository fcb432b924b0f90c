"""A real multi-node Ray cluster on this machine: `ray start` head and worker nodes.

Each node is its own `ray start` process tree with its own raylet, so Ray schedules across them
as across machines. Where the machine allows (root, `ip netns`), every worker node runs in its
own network namespace with its own address on a bridge, as on separate hosts; otherwise the
nodes share the loopback address. Stages reach the cluster through RAY_ADDRESS (and `ray job
submit`), with token authentication on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prefect_fixtures import colour_images

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
FEATX = [sys.executable, "-m", "featx.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Live processes in session `sid` (zombies, already dead, excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the command name, in parentheses, may hold spaces: split after its closing one
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


class Network:
    """A bridge with the head's address, and one network namespace per worker node on it."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge, self.prefix = f"fxb{tag}", f"fx{tag}"
        self.subnet = f"10.{77 + os.getpid() % 50}.{os.getpid() % 250}"
        self.head_ip = f"{self.subnet}.1"
        self.spaces: list[str] = []
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    @staticmethod
    def available() -> bool:
        probe = f"fxprobe{os.getpid()}"
        ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ok and shutil.which("ip") is not None

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"

    def add(self) -> tuple[str, list[str]]:
        """A new namespace wired to the bridge: (its address, the command prefix to run in it)."""
        i = len(self.spaces) + 1
        ns, veth = f"{self.prefix}n{i}", f"{self.prefix}v{i}"
        self._ip("netns", "add", ns)
        self.spaces.append(ns)
        self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip("link", "set", veth, "master", self.bridge, "up")
        addr = f"{self.subnet}.{10 + i}"
        for args in (
            ("addr", "add", f"{addr}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
        ):
            self._ip("netns", "exec", ns, "ip", *args)
        return addr, ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in self.spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class LocalCluster:
    """Head and worker nodes as separate `ray start --block` process groups."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under the temp dir and paths are capped at 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="fxr", dir="/tmp"))
        token = self.root / "token"
        token.write_text(os.urandom(16).hex())
        token.chmod(0o600)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.net = Network() if Network.available() else None
        self.head_ip = self.net.head_ip if self.net else "127.0.0.1"
        self.address = f"{self.head_ip}:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.ips: dict[str, str] = {}  # node name -> its address

    def _ports(self) -> list[str]:
        # Every node on one machine needs its own agent and metrics ports.
        return [
            "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
        ]  # fmt: skip

    def start_head(self) -> None:
        cmd = [
            RAY, "start", "--head", "--block", "--port", str(self.port),
            "--node-ip-address", self.head_ip, "--num-cpus", "1",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--temp-dir", str(self.root / "ray"), *self._ports(),
        ]  # fmt: skip
        self._launch("head", cmd, self.net.bridge if self.net else None)
        self.wait_for_nodes(1)

    def add_node(self, name: str, wrap: list[str] | None = None) -> str:
        """Start a worker node with one CPU; returns its node id once the GCS lists it."""
        before = set(self.node_ids())
        ip, netns = self.net.add() if self.net else ("127.0.0.1", [])
        self.ips[name] = ip
        cmd = [
            RAY, "start", "--address", self.address, "--block", "--num-cpus", "1",
            "--node-ip-address", ip, *self._ports(),
        ]  # fmt: skip
        for attempt in (1, 2):
            self._launch(name, netns + (wrap or []) + cmd, "eth0" if self.net else None)

            def joined():
                if self.nodes[name].poll() is not None:  # Ray gave up starting the node
                    raise RuntimeError(f"node {name} exited")
                return set(self.node_ids()) - before

            try:
                # (a node killed just before may still be listed: wait for a new id)
                return self._wait(joined, f"node {name} to join").pop()
            except RuntimeError:
                # On a loaded machine a raylet can miss Ray's start-up deadline; try once more.
                if attempt == 2:
                    raise
                self.kill(name)
        raise AssertionError("unreachable")

    def _launch(self, name: str, cmd: list[str], interface: str | None = None) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        env = dict(self.env)
        if interface:
            # The namespaces share one hostname, which resolves to loopback; tell gloo (torch
            # DDP on CPUs) which interface carries the node's address, as on multi-NIC hosts.
            env["GLOO_SOCKET_IFNAME"] = interface
        self.nodes[name] = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self, name: str) -> None:
        """SIGKILL every process of a node (raylet, agents, workers), as a lost machine.

        The node was started in a session of its own; its Ray workers each run in a process
        group of their own within that session, so killing the node's process group alone
        would leave them running (and a "lost" node's training rank would carry on).
        """
        proc = self.nodes.pop(name)
        for _ in range(20):
            members = _session_members(proc.pid)
            if not members:
                break
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        else:
            raise AssertionError(f"processes of node {name} survived SIGKILL: {members}")
        proc.wait(timeout=30)

    def _nodes(self, expr: str):
        """`expr` over `ray.nodes()` (as `nodes`), asked of the cluster's GCS by a client."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            f"nodes = ray.nodes(); print(json.dumps({expr}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=90
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_ids(self) -> list[str]:
        """Alive nodes with CPUs."""
        return self._nodes(
            "[n['NodeID'] for n in nodes if n['Alive'] and n['Resources'].get('CPU')]"
        )

    def wait_for_nodes(self, n: int) -> None:
        self._wait(lambda: len(self.node_ids()) >= n, f"{n} nodes")

    def _wait(self, predicate, what: str, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if found := predicate():
                    return found
            except AssertionError:
                pass  # the GCS is not up yet
            time.sleep(1)
        logs = {p.name: p.read_text()[-1500:] for p in self.root.glob("*.log")}
        raise AssertionError(f"timed out waiting for {what}: {logs}")

    def featx(self, *args, timeout: float = 420) -> subprocess.CompletedProcess:
        # Like a user's shell: the token file is set up, RAY_AUTH_MODE is not (featx sees the
        # token and turns token mode on itself).
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_MODE"}
        return subprocess.run(
            [*FEATX, *map(str, args)],
            env={**env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def node_addresses(self) -> dict[str, str]:
        """Node id -> the address the node registered with."""
        return self._nodes("{n['NodeID']: n['NodeManagerAddress'] for n in nodes if n['Alive']}")

    def shutdown(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        if self.net:
            self.net.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head()
        c.add_node("worker1")
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory) -> Path:
    """Ingested as a Ray job on the cluster: `ray job submit -- featx ingest ...` (inside the
    job RAY_ADDRESS is set, so the decoding runs as Ray tasks across the nodes)."""
    root = tmp_path_factory.mktemp("cluster")
    src = colour_images(root / "src", n=320)
    out = root / "shards"
    entry = (
        f"{sys.executable} -m featx.cli ingest {src} {out} --shard-samples 64"
        f" --summary-json {root / 'ingest.json'}"
    )
    r = subprocess.run(
        [RAY, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard_port}",
         "--", *entry.split()],
        env=cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    assert json.loads((out / "dataset.json").read_text())["counts"]["train"]["total"] > 0
    return out


def test_stages_run_on_more_than_one_node(cluster, shards, tmp_path):
    nodes = set(cluster.node_ids())
    assert len(nodes) == 2
    if cluster.net:  # each node on its own address, as separate hosts
        assert sorted(cluster.node_addresses().values()) == sorted(
            [cluster.head_ip, cluster.ips["worker1"]]
        )

    # Ingest decoded on both nodes, and its shards are the bytes a local ingest writes.
    assert set(json.loads((shards.parent / "ingest.json").read_text())["nodes"]) == nodes
    local = tmp_path / "local-shards"
    env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [*FEATX, "ingest", shards.parent / "src", local, "--shard-samples", "64"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    tars = sorted(p.relative_to(shards) for p in shards.rglob("*.tar"))
    assert tars and tars == sorted(p.relative_to(local) for p in local.rglob("*.tar"))
    assert all((shards / t).read_bytes() == (local / t).read_bytes() for t in tars)

    summary = tmp_path / "train.json"
    r = cluster.featx(
        "train", shards, "--out", tmp_path / "run", "--workers", 2, "--epochs", 2,
        "--batch-size", 16, "--summary-json", summary,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    trained = json.loads(summary.read_text())
    assert trained["epochs"] == 2
    # one CPU per node and one per worker: the two ranks ran on the two nodes
    assert set(trained["rank_nodes"]) == nodes

    summary = tmp_path / "extract.json"
    feats = tmp_path / "features"
    r = cluster.featx(
        "extract", shards, "--checkpoint", tmp_path / "run", "--out", feats,
        "--workers", 2, "--summary-json", summary,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    extracted = json.loads(summary.read_text())
    # the actors spread over the nodes; which ones got batches depends on who started first
    assert extracted["nodes"] and set(extracted["nodes"]) <= nodes
    import pyarrow.dataset as pads

    table = pads.dataset(feats / "current", format="parquet").to_table(columns=["key"])
    total = json.loads((shards / "dataset.json").read_text())["counts"]
    assert table.num_rows == sum(c["total"] for c in total.values())
    assert len(set(table.column("key").to_pylist())) == table.num_rows

    # The index's segments are built by Ray tasks on the cluster, and answer queries here.
    summary = tmp_path / "index.json"
    r = cluster.featx("index", feats, "--segment-rows", 100, "--summary-json", summary)
    assert r.returncode == 0, r.stderr[-3000:]
    indexed = json.loads(summary.read_text())
    assert indexed["rows"] == table.num_rows and indexed["segments_built"] >= 3
    assert indexed["nodes"] and set(indexed["nodes"]) <= nodes
    key = table.column("key")[0].as_py()
    r = cluster.featx("neighbors", feats, "--key", key, "-k", 3, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout)) == 3 and key not in r.stdout


def test_a_folder_one_node_cannot_see_is_refused_before_work(cluster, shards, tmp_path):
    """A node in its own mount namespace sees an empty tmpfs where the shards are."""
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{shards}" && exec "$0" "$@"']  # fmt: skip
    if subprocess.run([*hide[:4], "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mount namespaces (unshare --mount)")
    blind = cluster.add_node("blind", wrap=hide)
    try:
        r = cluster.featx("train", shards, "--out", tmp_path / "run", "--epochs", 1)
        assert r.returncode == 2, r.stderr[-3000:]
        said = " ".join(r.stderr.split())  # the console wraps long lines
        assert f"dataset: {shards} is not visible from node {blind[:12]}" in said
        assert "shared storage" in said
        assert not list((tmp_path / "run").glob("ray/checkpoint_*"))
    finally:
        cluster.kill("blind")


def test_training_survives_losing_a_worker_node(cluster, shards, tmp_path):
    """SIGKILL every process of a worker node mid-run; a replacement node joins (as an
    autoscaler would add one) and training resumes from the latest checkpoint."""
    cluster.wait_for_nodes(2)
    run = tmp_path / "run"
    summary = tmp_path / "train.json"
    proc = subprocess.Popen(
        [*FEATX, "train", str(shards), "--out", str(run), "--workers", "2", "--epochs", "6",
         "--batch-size", "8", "--max-failures", "2", "--summary-json", str(summary)],
        env={**cluster.env, "RAY_ADDRESS": cluster.address},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        snapshot = run / "ray" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint registered in time"
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before the node could be killed"
        cluster.kill("worker1")
        replacement = cluster.add_node("worker2")
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    trained = json.loads(summary.read_text())
    assert [m["epoch"] for m in trained["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert replacement in trained["rank_nodes"], "the last epochs ran on the new node"
