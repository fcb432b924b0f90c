"""Where the pipeline's fixed start-up goes: each piece timed alone, in a fresh process.

Pieces: the imports (`python -X importtime`, grouped by top-level package), Prefect's database
upgrade (what `flows.runtime.ensure_database` runs, on a new and on an existing database), the
temporary Prefect API server (an empty flow; with and without migrate-on-start), a local
`ray.init` and shutdown, Ray Train's set-up (a no-op fit with 2 workers, with Ray Train's
defaults and as featx sets it up, with the import seconds of every actor process), and a Ray
Data actor pool's first batch. Prints JSON and a table; nothing in featx/ or flows/ runs
differently for it.
Usage: python tests/benchmarks/profile_startup.py [--only imports,prefect,ray] [--json F]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import TreeMemory, emit, reap

REPO = Path(__file__).resolve().parents[2]

IMPORTS = (
    "import featx.cli, flows.pipeline, featx.ingest, featx.train, featx.extract, featx.probe, "
    "ray.train.torch, ray.data, prefect.server.api.server"
)

EMPTY_FLOW = """
import time
t0 = time.perf_counter()
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
t1 = time.perf_counter()
orig, took = SubprocessASGIServer.start, []
def start(self, *a, **k):
    s = time.perf_counter(); orig(self, *a, **k); took.append(time.perf_counter() - s)
SubprocessASGIServer.start = start
flow(lambda: None, name="empty")()
t2 = time.perf_counter()
print("RESULT", t1 - t0, max(took), t2 - t1)
"""

RAY_INIT = """
import logging, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
         runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
t2 = time.perf_counter()
ray.shutdown()
print("RESULT", t1 - t0, t2 - t1, time.perf_counter() - t2)
"""

RAY_TRAIN = """
import logging, os, tempfile, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

if os.environ.get("PROFILE_TRAINER") == "featx":  # as `featx train` starts Ray and the trainer
    from featx.cluster import env_defaults, init_ray
    from featx.ray_compat import trainer_class
    from featx.train import _fit_env
    init_ray(None, prestart=False)
    Trainer, fit_env = trainer_class(datasets=False, local=True), _fit_env(True)
else:
    from contextlib import nullcontext as env_defaults
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    Trainer, fit_env = TorchTrainer, None

def loop(config):
    import os, time
    import ray.train
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["dir"], f"t{rank}"), "w") as f:
        f.write(str(time.time()))  # when the loop runs on this worker
    ray.train.report({"x": 1})

d = tempfile.mkdtemp()
t0, w0 = time.perf_counter(), time.time()
with env_defaults(fit_env):
    Trainer(
        loop, train_loop_config={"dir": d},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=d),
    ).fit()
t1, w1 = time.perf_counter(), time.time()
t_loop = max(float(open(f"{d}/t{r}").read()) for r in (0, 1))
print("SESSION", ray._private.worker._global_node.get_session_dir_path())
ray.shutdown()
print("RESULT", t1 - t0, t_loop - w0, w1 - t_loop)
"""


RAY_DATA = """
import logging, time
import ray
ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)

class Model:
    def __init__(self):
        import torch  # what an extraction actor imports first
    def __call__(self, batch):
        return batch

t0 = time.perf_counter()
# 1 CPU for the actor leaves 1 for the read task (2 cores); 1.5 + 1 would never schedule
ds = ray.data.range(64).map_batches(Model, batch_size=32,
                                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
ds.context.enable_progress_bars = False
for _ in ds.iter_batches(batch_size=None):
    t1 = time.perf_counter()
    break
ray.shutdown()
print("RESULT", t1 - t0)
"""


def run(cmd: list[str], env: dict, timeout: float = 180) -> tuple[float, str]:
    """Wall seconds and output of a fresh process; its leftovers are ended."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeMemory(p.pid, every_s=0.5, memory=False) as watch:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    wall = time.perf_counter() - t0
    reap(watch.seen)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({p.returncode}):\n{err[-2000:]}")
    return wall, out + err


def result_line(text: str) -> list[float]:
    line = [x for x in text.splitlines() if x.startswith("RESULT ")][-1]
    return [float(v) for v in line.split()[1:]]


def imports(env: dict) -> dict:
    """`python -X importtime`: seconds per top-level package, each module's own ("self") time
    counted under its package wherever it was imported from (torch under torch, not featx)."""
    wall, text = run([sys.executable, "-X", "importtime", "-c", IMPORTS], env)
    per: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| (.*)$", line)
        if m:
            root = m.group(2).strip().split(".")[0]
            per[root] = per.get(root, 0.0) + int(m.group(1)) / 1e6
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:12])
    return {
        "command": f'python -X importtime -c "{IMPORTS}"',
        "wall_s": round(wall, 2),
        "total_s": round(sum(per.values()), 2),
        "top_s": {k: round(v, 2) for k, v in top.items()},
    }


def prefect(env: dict, home: Path) -> dict:
    env = {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }
    upgrade = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    new_db, _ = run(upgrade, env)
    existing_db, _ = run(upgrade, env)
    wall, text = run([sys.executable, "-c", EMPTY_FLOW], env)
    imp, server, flow = result_line(text)
    no_migrate = {**env, "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"}
    wall2, text2 = run([sys.executable, "-c", EMPTY_FLOW], no_migrate)
    _, server2, _ = result_line(text2)
    t0 = time.perf_counter()
    run([sys.executable, "-c", "import prefect"], env)
    bare = time.perf_counter() - t0
    return {
        "database_upgrade_new_s": round(new_db, 2),
        "database_upgrade_existing_s": round(existing_db, 2),
        "python_import_prefect_s": round(bare, 2),
        "empty_flow_process_s": round(wall, 2),
        "empty_flow_imports_s": round(imp, 2),
        "server_start_s": round(server, 2),
        "first_flow_s": round(flow, 2),
        "server_start_no_migrate_on_start_s": round(server2, 2),
        "empty_flow_process_no_migrate_s": round(wall2, 2),
        "commands": {
            "database_upgrade": " ".join(upgrade[1:]) + " (fresh PREFECT_HOME, then again)",
            "empty_flow": "python -c EMPTY_FLOW (this file), PREFECT_HOME with the database",
        },
    }


def ray_parts(env: dict) -> dict:
    wall, text = run([sys.executable, "-c", RAY_INIT], env)
    imp, init, shutdown = result_line(text)
    out = {
        "import_ray_s": round(imp, 2),
        "init_s": round(init, 2),
        "shutdown_s": round(shutdown, 2),
        "init_process_wall_s": round(wall, 2),
    }
    # A no-op fit as Ray Train sets it up by default, then as featx does (no job runtime_env,
    # no dataset manager, placement-group cleaner or preemption watcher); each once timed and
    # once under -X importtime in every Ray process, for the import seconds of each actor.
    for name in ("ray", "featx"):
        variant = {**env, "PROFILE_TRAINER": name}
        _, text = run([sys.executable, "-c", RAY_TRAIN], variant)
        fit, to_loop, after_loop = result_line(text)
        _, text = run(
            [sys.executable, "-c", RAY_TRAIN], {**variant, "PYTHONPROFILEIMPORTTIME": "1"}
        )
        out[f"train_{name}"] = {
            "noop_fit_s": round(fit, 2),
            "to_loop_s": round(to_loop, 2),
            "after_loop_s": round(after_loop, 2),
            "actor_import_s": actor_imports(text),
        }
    _, text = run([sys.executable, "-c", RAY_DATA], env)
    (data,) = result_line(text)
    out["data_actor_first_batch_s"] = round(data, 2)
    out["commands"] = {
        "init": "ray.init(include_dashboard=False, ...) then ray.shutdown() (as featx does)",
        "train": "no-op fit, 2 workers x 1 CPU, a loop that reports once: TorchTrainer on a "
        "plain ray.init (train_ray), then featx's init_ray + trainer (train_featx); import "
        "seconds per actor from PYTHONPROFILEIMPORTTIME=1 in every Ray process",
        "data": "range(64).map_batches(actor importing torch, ActorPoolStrategy(size=1))",
    }
    return out


def actor_imports(text: str) -> dict[str, float]:
    """Import seconds (-X importtime, own time of every module) of each Ray actor process of
    the session the script printed, by actor class; processes that ran no actor are "idle"."""
    line = [x for x in text.splitlines() if x.startswith("SESSION ")][-1]
    logs = Path(line.split(maxsplit=1)[1]) / "logs"
    per: dict[str, float] = {}
    for err in logs.glob("worker-*.err"):
        out = err.with_suffix(".out")
        names = re.findall(r":actor_name:(\w+)", out.read_text()) if out.exists() else []
        seconds = sum(
            int(m.group(1)) / 1e6
            for m in re.finditer(r"^import time:\s+(\d+) \|", err.read_text(), re.M)
        )
        if seconds:
            key = names[0] if names else "idle"
            per[key] = round(per.get(key, 0.0) + seconds, 2)
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def table(r: dict) -> str:
    lines = ["piece                                                      seconds"]

    def add(name: str, v) -> None:
        if v is not None:
            lines.append(f"{name:<58} {v:7.2f}")

    if "imports" in r:
        i = r["imports"]
        add("imports, total (-X importtime, top level)", i["total_s"])
        for k, v in i["top_s"].items():
            add(f"  {k}", v)
    if "prefect" in r:
        p = r["prefect"]
        add("prefect: database upgrade, new database", p["database_upgrade_new_s"])
        add("prefect: database upgrade, existing database", p["database_upgrade_existing_s"])
        add("prefect: `python -c 'import prefect'` process", p["python_import_prefect_s"])
        add("prefect: import flow + API server module", p["empty_flow_imports_s"])
        add("prefect: temporary API server start", p["server_start_s"])
        add(
            "  the same, PREFECT_API_DATABASE_MIGRATE_ON_START=false",
            p["server_start_no_migrate_on_start_s"],
        )
        add("prefect: first (empty) flow run, server start included", p["first_flow_s"])
        add("prefect: empty-flow process, wall", p["empty_flow_process_s"])
    if "ray" in r:
        y = r["ray"]
        add("ray: import", y["import_ray_s"])
        add("ray: init (local, no dashboard)", y["init_s"])
        add("ray: shutdown", y["shutdown_s"])
        for name, label in (("ray", "Ray Train's defaults"), ("featx", "as featx sets it up")):
            t = y[f"train_{name}"]
            add(f"ray train: no-op fit, 2 workers, {label}", t["noop_fit_s"])
            add("  fit() call to the loop running on the workers", t["to_loop_s"])
            add("  loop's report to fit() returning", t["after_loop_s"])
            for actor, v in t["actor_import_s"].items():
                add(f"  imports in the {actor} process", v)
        add("ray data: actor pool, first batch", y["data_actor_first_batch_s"])
    return "\n".join(lines)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="imports,prefect,ray", help="Pieces, comma-separated.")
    ap.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = ap.parse_args()
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="featx-startup-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp / "prefect-imports"),  # never the user's ~/.prefect
        "RAY_DEDUP_LOGS": "0",
    }
    r: dict = {"stage": "startup", "cores": os.cpu_count(), "load": os.getloadavg()}
    try:
        for name, fn in (
            ("imports", lambda: imports(env)),
            ("prefect", lambda: prefect(env, tmp / "prefect")),
            ("ray", lambda: ray_parts(env)),
        ):
            if name in only:
                try:
                    r[name] = fn()
                except RuntimeError as e:  # one piece failing leaves the others measured
                    r[f"{name}_error"] = str(e)[-1500:]
                    print(f"{name}: {str(e)[-1500:]}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(r), file=sys.stderr)
    return emit(r, args.json)


if __name__ == "__main__":
    main()
