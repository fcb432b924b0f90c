"""Helpers the benchmark scripts and the suite share: process-tree memory, atomic JSON, machine.

Imported as a sibling module (`from benchlib import ...`): each script runs as
`python tests/benchmarks/<script>.py`, which puts this folder first on sys.path.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path


class TreeMemory:
    """Peak PSS and RSS summed over a process and all its descendants, sampled in a thread.

    PSS splits shared pages (forked workers, Ray's shared memory) between the processes that
    map them, so the sum is what the tree really costs; RSS counts shared pages once per
    process. Every pid seen is remembered, so a caller can reap processes that outlive the
    tree (Ray's daemons get re-parented when their driver exits).
    """

    def __init__(
        self, pid: int | None = None, every_s: float = 0.5, tree: bool = True, memory: bool = True
    ) -> None:
        import psutil

        self.root, self.every_s, self.tree = psutil.Process(pid), every_s, tree
        self.memory = memory  # False: only remember the pids (cheap), for reap()
        self.peak_pss = self.peak_rss = 0
        self.samples = 0
        self.cpu_s = 0.0  # the sampler's own CPU time: what measuring cost the benchmark
        self.seen: dict[int, float] = {}  # pid -> create_time, to never confuse a reused pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_pss_mb(self) -> float:
        return round(self.peak_pss / 2**20, 1)

    @property
    def peak_rss_mb(self) -> float:
        return round(self.peak_rss / 2**20, 1)

    def _run(self) -> None:
        import psutil

        # Reading smaps_rollup of a Ray tree costs a few ms per process; at the lowest priority
        # the sampler takes only CPU the benchmark leaves idle (Linux: nice is per thread).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        cpu0 = time.thread_time()
        while not self._stop.is_set():
            pss = rss = 0
            try:
                procs = [self.root, *(self.root.children(recursive=True) if self.tree else [])]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    self.seen.setdefault(p.pid, p.create_time())
                    if not self.memory:
                        continue
                    m = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                pss, rss = pss + m.pss, rss + m.rss
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.samples += 1
            self.cpu_s = time.thread_time() - cpu0
            self._stop.wait(self.every_s)


class Spans:
    """Times every call of chosen functions, wherever they are called from.

    `spans.wrap(module, "name")` replaces module.name with a timing wrapper, so featx code that
    looks the function up at call time (`import ray; ray.init(...)`) is timed without knowing
    which featx function calls it. `undo()` puts the originals back.
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []  # {"name", "start", "seconds", "result"} in call order
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, name: str | None = None, keep_result: bool = False):
        import functools

        orig = getattr(owner, attr)
        label = name or f"{getattr(owner, '__name__', owner)}.{attr}"

        @functools.wraps(orig)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                result = orig(*args, **kwargs)
            finally:
                call = {"name": label, "start": t0, "seconds": time.perf_counter() - t0}
                self.calls.append(call)
            if keep_result:
                call["result"] = result
            return result

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))
        return orig

    def total(self, name: str) -> float:
        return sum(c["seconds"] for c in self.calls if c["name"] == name)

    def undo(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()


def reap(seen: dict[int, float], settle_s: float = 3.0, grace_s: float = 5.0) -> list[str]:
    """End the processes in `seen` (pid -> create_time) still alive after `settle_s`.

    Only processes this benchmark started are in `seen`, and the create time guards against a
    pid the system has since given to another process. They get `settle_s` to exit on their
    own (Ray's daemons follow their driver within a second or two), then SIGTERM, then SIGKILL
    after `grace_s`. Returns "name (pid)" of each process that had to be ended.
    """
    import psutil

    def alive() -> list:
        procs = []
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
        return procs

    deadline = time.monotonic() + settle_s
    while (procs := alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            ended.append(f"{p.name()} ({p.pid})")
            p.terminate()
    _, still = psutil.wait_procs(procs, timeout=grace_s)
    for p in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return ended


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    write_text(Path(path), json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def emit(result: dict, json_path: Path | None) -> dict:
    """Print the result (what a person running the script reads) and write it for the suite."""
    print(json.dumps(result, indent=2), flush=True)
    if json_path:
        write_json(json_path, result)
    return result


def elapsed_since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def machine_info() -> dict:
    """Cores, memory, CPU model, load and library versions: what a figure needs beside it."""
    from importlib import metadata

    import psutil

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        gpu = ", ".join(r.stdout.split("\n")).strip(", ") or None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu,
        "gpu": gpu,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "ray", "prefect", "webdataset", "featx")},
    }
