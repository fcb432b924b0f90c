"""Helpers of the fault-injection suite: figures, featx processes, kills and exactly-once checks.

Every kill targets a process this test session started (a descendant of the pytest process):
the machine may be shared with other Ray jobs, which must never be touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

FEATX = [sys.executable, "-m", "featx.cli"]
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# figures reported at the end of the run (see the fault_figures fixture in conftest.py)


@dataclass
class FaultFigures:
    """What the fault tests tried and what came out, counted from real outcomes."""

    inputs_tried: int = 0  # every input file handed to ingest by the hostile-input tests
    hostile_tried: int = 0
    hostile_kinds: set[str] = field(default_factory=set)
    hostile_rejected: int = 0  # rejected with the expected reason
    hostile_ingested: int = 0  # ingested, and the sample checks out
    hostile_wrong: list[str] = field(default_factory=list)  # any other outcome
    valid_expected: int = 0
    valid_ingested: int = 0
    crashes: int = 0  # featx processes that died with a traceback or a signal of their own
    faults: Counter = field(default_factory=Counter)  # kind -> effective injections
    samples_checked: int = 0  # distinct samples compared with a reference (exactly once)
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0  # samples found that the reference does not have
    checks: int = 0

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def exactly_once(self, expected: Iterable[str], found: Iterable[str]) -> dict:
        """Compare the keys found with the reference keys; counts go into the figures."""
        want = set(expected)
        got = Counter(found)
        lost = sorted(want - set(got))
        dup = {k: n - 1 for k, n in got.items() if n > 1}
        extra = sorted(set(got) - want)
        self.checks += 1
        self.samples_checked += len(want)
        self.lost += len(lost)
        self.duplicated += sum(dup.values())
        self.unexpected += len(extra)
        return {"lost": lost[:10], "duplicated": dict(list(dup.items())[:10]), "unexpected": extra}

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k}: {n}" for k, n in sorted(self.faults.items())) or "none"
        distinct = len({k.split(": ", 1)[-1] for k in self.hostile_kinds})
        out = [
            f"inputs tried: {self.inputs_tried} ({self.hostile_tried} hostile, of {distinct} kinds"
            f" ({len(self.hostile_kinds)} modality x kind); {self.valid_expected} valid)",
            f"hostile inputs: {self.hostile_rejected} rejected with their reason, "
            f"{self.hostile_ingested} ingested correctly, {len(self.hostile_wrong)} wrong",
            f"valid inputs ingested: {self.valid_ingested} of {self.valid_expected}",
            f"faults injected: {sum(self.faults.values())} ({faults})",
            f"crashes: {self.crashes}",
            f"samples checked for exactly once: {self.samples_checked} in {self.checks} checks",
            f"samples lost: {self.lost}, duplicated: {self.duplicated}, "
            f"unexpected: {self.unexpected}",
        ]
        if self.hostile_wrong:
            out.append("wrong outcomes: " + "; ".join(self.hostile_wrong[:10]))
        return out


# ---------------------------------------------------------------------------------------------
# running featx


def no_dac_prefix() -> list[str]:
    """A command prefix under which file permissions bind, even for root.

    As root, chmod does not stop reads or writes (CAP_DAC_OVERRIDE); dropping that capability
    and CAP_DAC_READ_SEARCH from the bounding set makes root obey mode bits like anyone else.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        import pytest

        pytest.skip("running as root without setpriv(1): cannot make permissions bind")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def featx_env(**extra: str) -> dict[str, str]:
    """Environment of a featx subprocess: no Prefect settings, local code (not shipped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("RAY_ADDRESS", None)
    env["FEATX_SHIP_CODE"] = "0"  # workers of the test's Ray import featx from this checkout
    env.update(extra)
    return env


def run_featx(*args, prefix: list[str] | None = None, timeout: float = 300, **kw):
    return subprocess.run(
        [*(prefix or []), *FEATX, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", None) or featx_env(),
        cwd=REPO,
        **kw,
    )


def start_featx(*args, log: Path, **kw) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [*FEATX, *map(str, args)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=kw.pop("env", None) or featx_env(),
            cwd=REPO,
            **kw,
        )


def crashed(stderr: str, returncode: int) -> bool:
    """A crash, as opposed to a clean refusal: a traceback, or death by a signal."""
    return "Traceback (most recent call last)" in stderr or returncode < 0


def one_line_error(stderr: str) -> str | None:
    """The `error: ...` line featx printed, if it printed exactly one error and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if len(lines) != 1 or "Traceback" in stderr:
        return None
    return lines[0]


# ---------------------------------------------------------------------------------------------
# processes


def wait_for(
    check: Callable[[], object],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    every: float = 0.02,
):
    """Poll `check` until truthy; fail with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log)}")


def tail(log: Path | None, chars: int = 4000) -> str:
    if log is None:
        return ""
    try:
        return Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def own_processes(needle: str, root: int | None = None) -> dict[int, str]:
    """Processes under `root` (default: this pytest) whose command line contains `needle`."""
    import psutil

    found = {}
    try:
        kids = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for p in kids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cmd = " ".join(p.cmdline())
            if needle in cmd:
                found[p.pid] = cmd
    return found


def sigkill(pid: int) -> bool:
    """SIGKILL `pid`; True when the process was alive to receive it."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def kill_and_reap(proc: subprocess.Popen | int, *, children_end: bool = False) -> bool:
    """SIGKILL one process, not its children (they are orphaned, as after a real kill), then
    make sure none of them outlives the test. True when the kill hit a running process. With
    `children_end`, fail unless every child ended by itself within 10 s."""
    import psutil

    pid = proc if isinstance(proc, int) else proc.pid
    try:
        target = psutil.Process(pid)
        kids = target.children(recursive=True)
    except psutil.NoSuchProcess:
        target, kids = None, []
    if isinstance(proc, int):
        hit = target is not None and sigkill(pid)
        if target is not None:
            psutil.wait_procs([target], timeout=30)  # its parent reaps it
    else:
        hit = proc.poll() is None
        if hit:
            proc.kill()
        hit = proc.wait(30) == -9 and hit
    _, alive = psutil.wait_procs(kids, timeout=10)
    left = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            left.append(" ".join(p.cmdline())[:120])
            p.kill()
    assert not (children_end and left), f"the killed process left {len(left)} behind: {left}"
    return hit


# ---------------------------------------------------------------------------------------------
# what is on disk


def in_splits(root: Path, pattern: str) -> list[Path]:
    """`root/<split>/<pattern>` for each split folder. Use it to watch a running featx: a plain
    `root.glob("*/...")` also lists featx's own hidden temporary folders, and fails when one
    is removed while glob reads it."""
    return [p for split in ("test", "train", "val") for p in sorted((root / split).glob(pattern))]


def partial_files(root: Path) -> list[str]:
    """Temporaries featx writes under hidden names (`.name.tmpPID`, `.best.tmp`), left over."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or ".old" in p.name
    )


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def tar_keys(out: Path) -> list[str]:
    """Sample keys as the shards on disk hold them (one `.json` member per sample)."""
    keys = []
    for tar in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(tar) as t:
            keys += [m.name[: -len(".json")] for m in t if m.name.endswith(".json")]
    return keys


def stats_keys(dataset: Path, split: str = "*") -> list[str]:
    """Sample keys as the shards' `_stats.json` list them (what ingest says it wrote)."""
    return [
        e["key"]
        for p in sorted(dataset.glob(f"{split}/shard-*_stats.json"))
        for e in json.loads(p.read_text())["entries"]
    ]


def check_visible_shards(out: Path) -> list[str]:
    """Problems with the shards one can see: each must have its stats and match its sha256."""
    from featx.fsutil import sha256_file

    problems = []
    for tar in sorted(out.glob("*/shard-*.tar")):
        stats = tar.with_name(tar.stem + "_stats.json")
        if not stats.exists():
            problems.append(f"{tar.relative_to(out)} has no stats")
            continue
        st = json.loads(stats.read_text())
        if sha256_file(tar) != st["sha256"]:
            problems.append(f"{tar.relative_to(out)} does not match its sha256")
        with tarfile.open(tar) as t:
            n = sum(m.name.endswith(".json") for m in t)
        if n != st["samples"]:
            problems.append(f"{tar.relative_to(out)} holds {n} samples, stats say {st['samples']}")
    return problems


def check_visible_parts(features: Path, dataset: Path) -> list[str]:
    """Problems with the Parquet parts one can see, in every feature version: each holds its
    whole shard, in order; and a current version, if any, has a part for every shard."""
    import pyarrow.parquet as pq

    from featx.features import current_dir, read_manifest

    problems = []
    versions = sorted((features / "versions").glob("[0-9]*"))
    for part in [p for v in versions for p in in_splits(v, "part-*.parquet")]:
        split, idx = part.parent.name, part.name[len("part-") : -len(".parquet")]
        stats = dataset / split / f"shard-{idx}_stats.json"
        want = [e["key"] for e in json.loads(stats.read_text())["entries"]]
        try:
            got = pq.read_table(part)["key"].to_pylist()
        except Exception as e:  # a torn file is exactly what must never be visible
            problems.append(f"{part.relative_to(features)} does not read: {e}")
            continue
        if got != want:
            problems.append(f"{part.relative_to(features)} holds {len(got)} of {len(want)} keys")
    if (read_manifest(features) or {}).get("current"):
        cur = current_dir(features)
        have = {f"{p.parent.name}/{p.name[5:11]}" for p in in_splits(cur, "part-*.parquet")}
        shards = {f"{t.parent.name}/{t.name[6:12]}" for t in in_splits(dataset, "shard-*.tar")}
        if have != shards:
            problems.append(f"the current version {cur.name} lacks parts of {shards - have}")
    return problems


def file_stats(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under `root`, links not followed, unreadable ones too."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mtime_ns, st.st_size)
    return out


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` with its mtime and bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
