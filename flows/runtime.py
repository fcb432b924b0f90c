"""Where Prefect keeps its state for featx runs, and a reliable first start of its database.

Each demo or test run gets its own PREFECT_HOME (set before Prefect is imported). With no
PREFECT_API_URL, flows talk to a temporary local API server on a SQLite file; creating that
file from several processes at once is what raises "database is locked", so the schema is
created once, up front, by a single process, with retries.

Creating the schema runs Prefect's migrations (about 14 s on 2 cores). featx does that once per
Prefect version into a template under the user's cache folder and copies it into each new
home; a home whose database is already at the template's revision is left as it is.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from featx.fsutil import atomic_path


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
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or not os.environ.get("PREFECT_HOME"):
        _upgrade(os.environ, attempts)  # a database featx does not place: migrate it in place
        return
    db = Path(os.environ["PREFECT_HOME"]) / "prefect.db"
    template = _template(attempts)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(db) as tmp:
            shutil.copyfile(template, tmp)
    elif _revision(db) != _revision(template):
        _upgrade(os.environ, attempts)
    # The schema is current: the temporary API server need not check it again on start.
    os.environ.setdefault("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")


def _template(attempts: int) -> Path:
    """A freshly migrated database for the installed Prefect, built once per user."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featx"
    template = cache / f"prefect-{version('prefect')}.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as home:
        env = {**os.environ, "PREFECT_HOME": home}
        _upgrade(env, attempts)
        # Two processes may build it at once: each renames a whole file, the last one wins.
        with atomic_path(template) as tmp:
            (Path(home) / "prefect.db").replace(tmp)
    return template


def _revision(db: Path) -> str | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    except (sqlite3.Error, TypeError):
        return None


def _upgrade(env, attempts: int) -> None:
    cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    for i in range(attempts):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(env))
        if r.returncode == 0:
            return
        if "locked" not in (r.stdout + r.stderr) or i == attempts - 1:
            raise RuntimeError(f"could not prepare Prefect's database:\n{r.stderr[-2000:]}")
        time.sleep(1 + i)
