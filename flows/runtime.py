"""Where Prefect keeps its state for featx runs, and a reliable first start of its database.

Each demo or test run gets its own PREFECT_HOME (set before Prefect is imported). With no
PREFECT_API_URL, flows talk to a temporary local API server on a SQLite file; creating that
file from several processes at once is what raises "database is locked", so the schema is
created once, up front, by a single process, with retries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def use_prefect_home(home: Path) -> None:
    """Point Prefect at `home` unless the caller already chose a home or an API server."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    # Local runs: results persisted under the home, no telemetry, quiet server logs.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")


def ensure_database(attempts: int = 5) -> None:
    """Create or migrate the local SQLite database once, before any flow starts a server."""
    if os.environ.get("PREFECT_API_URL"):
        return  # a real server owns its database
    cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    for i in range(attempts):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            return
        if "locked" not in (r.stdout + r.stderr) or i == attempts - 1:
            raise RuntimeError(f"could not prepare Prefect's database:\n{r.stderr[-2000:]}")
        time.sleep(1 + i)
