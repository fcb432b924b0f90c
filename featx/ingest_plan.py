"""What an ingest run does, decided before any decoding: the modality and class map (checked
against the shards already there), the inputs no finished shard holds or a cached reject
covers, and the order they are written in.

Everything that grows with the number of inputs (the inputs found, the finished shards' entries,
the run's rejects and dedup digests) lives in `Plan`, a throwaway SQLite file in OUT, not in
lists and dicts: memory stays flat whatever the number of inputs, at ~300 bytes of disk each.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from featx import normalize as N
from featx.config import IngestConfig
from featx.dataset import REJECTED, SPLITS, finished_shards, read_stats
from featx.dataset import reasons as R
from featx.errors import ConfigError
from featx.fsutil import sha256_file
from featx.sources import Item, Reject

log = logging.getLogger(__name__)

PLAN = ".plan.tmp"  # + pid: the plan's file in OUT, hidden; one a killed run left is a partial

_SCHEMA = """
CREATE TABLE item (seq INTEGER PRIMARY KEY, source BLOB, path BLOB, label BLOB, split BLOB,
    text BLOB, size INTEGER, mtime_ns INTEGER, pending INTEGER DEFAULT 0);
CREATE TABLE done (rid INTEGER PRIMARY KEY, shard TEXT, key TEXT, source BLOB, label BLOB,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT, dedup TEXT, gone INTEGER DEFAULT 0);
CREATE TABLE gone (rid INTEGER PRIMARY KEY, shard TEXT, key TEXT);
CREATE TABLE cached (rid INTEGER PRIMARY KEY, prio INTEGER, source BLOB, size INTEGER,
    mtime_ns INTEGER, rec TEXT);
CREATE TABLE reject (rid INTEGER PRIMARY KEY, source BLOB, reason BLOB, rec TEXT);
CREATE TABLE seen (dedup TEXT PRIMARY KEY, key TEXT) WITHOUT ROWID;
CREATE TABLE digest (seq INTEGER PRIMARY KEY, digest BLOB);
CREATE TABLE skip (seq INTEGER PRIMARY KEY);
CREATE TABLE todo (ord BLOB, seq INTEGER);
"""

BATCH = 512  # rows per insert, update or page read: few enough to hold, enough to amortise


def _b(s: str | None) -> bytes | None:
    """Text as SQLite stores it here: UTF-8 bytes, lone surrogates kept (a file name that is
    not UTF-8 reaches Python as them), compared byte-wise, which is Python's order of str."""
    return None if s is None else s.encode("utf-8", "surrogatepass")


def _s(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "surrogatepass")


class LabelCounts:
    """A shard's `entries` as the card counts them (one `{"label"}` per sample), from the
    count of each label: the stats kept for the whole run hold no per-sample entries."""

    def __init__(self, entries: Iterable[dict]) -> None:
        self.counts = Counter(e["label"] for e in entries)

    def __iter__(self) -> Iterator[dict]:
        for label, n in self.counts.items():
            for _ in range(n):
                yield {"label": label}


def light(stats: dict) -> dict:
    """A shard's stats without its per-sample entries and rejects (they stay on disk, and the
    finished ones in the plan): what the run keeps of every shard."""
    if isinstance(stats["entries"], LabelCounts):
        return stats
    kept = {k: v for k, v in stats.items() if k not in ("entries", "rejects")}
    return {**kept, "entries": LabelCounts(stats["entries"])}


class Plan:
    """The run's inputs and the finished shards' entries, in a SQLite file in OUT that is
    deleted when the run ends (`close`), and by the next run if this one is killed."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / f"{PLAN}{os.getpid()}"
        try:  # by os.open, for the error a read-only or full OUT gives (not sqlite's)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        except OSError as e:
            e.filename = str(out)  # the folder to fix, not our hidden temporary
            raise
        self.db = sqlite3.connect(self.path)
        # A scratch file: nothing to roll back or to keep after a crash. The page cache is
        # bounded (16 MB); sorts spill to temporary files. Pages of 1 KB: a plan of a few
        # inputs takes ~20 KB of OUT's disk, not ~60 KB.
        pragmas = ("page_size=1024", "journal_mode=OFF", "synchronous=OFF", "cache_size=-16384")
        for pragma in pragmas:
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.inputs = 0  # inputs found
        self.pending = 0  # inputs to decode, in `todo`

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    # -- the finished shards -----------------------------------------------------------------

    def load_shards(self, out: Path) -> list[dict]:
        """The `light` stats of every finished shard, in split and index order; their entries
        and rejects go into the plan (each stats file is read once per run)."""
        found = []
        for split in SPLITS:
            for tar in finished_shards(out, split):
                st = read_stats(tar)
                name = st["shard"]
                self.db.executemany(
                    "INSERT INTO done (shard, key, source, label, size, mtime_ns, sha256, dedup)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        (name, e["key"], _b(e["source"]), _b(e["label"]), e["size"])
                        + (e["mtime_ns"], e["sha256"], e.get("payload_sha256", e["sha256"]))
                        for e in st["entries"]
                    ),
                )
                self._cache_rejects(1, st.get("rejects", []))
                found.append(light(st))
        self.db.execute("CREATE INDEX done_source ON done (source, gone, rid)")
        self.db.commit()
        return found

    def _cache_rejects(self, prio: int, records: Iterable[dict]) -> None:
        """Rejects a run need not decode again: not transient, not duplicates (a duplicate is
        decided again: the sample it duplicated may have left), and with a file time."""
        skip = R.TRANSIENT | {R.DUPLICATE}
        self.db.executemany(
            "INSERT INTO cached (prio, source, size, mtime_ns, rec) VALUES (?, ?, ?, ?, ?)",
            (
                (prio, _b(r["source"]), r.get("size"), r["mtime_ns"], json.dumps(r))
                for r in records
                if r["reason"] not in skip and r.get("mtime_ns")
            ),
        )

    def entries_with_inputs(self) -> Iterator[tuple]:
        """(rid, shard, key, entry label, size, mtime_ns, sha256, input) of every finished
        entry in shard order, `input` the Item found now with its source (the last of them), or
        None."""
        cur = self.db.execute(
            "SELECT d.rid, d.shard, d.key, d.label, d.size, d.mtime_ns, d.sha256, i.seq,"
            " i.source, i.path, i.label, i.split, i.text, i.size, i.mtime_ns"
            " FROM done d LEFT JOIN item i"
            " ON i.seq = (SELECT MAX(seq) FROM item WHERE source = d.source)"
            " ORDER BY d.rid"
        )
        for rid, shard, key, label, size, mtime, sha, seq, *item in cur:
            yield rid, shard, key, _s(label), size, mtime, sha, None if seq is None else _item(item)

    def leave(self, gone: Iterable[tuple[int, str, str]]) -> None:
        """The entries (rid, shard, key) whose samples leave the dataset this run."""
        self.db.executemany("INSERT INTO gone VALUES (?, ?, ?)", gone)
        self.db.execute("UPDATE done SET gone = 1 WHERE rid IN (SELECT rid FROM gone)")
        self.db.execute("CREATE INDEX gone_shard ON gone (shard)")
        # The samples that stay, by the hash of their normalised payload, for dedup (shards
        # written before featx recorded it dedup by the input's bytes, as they did then).
        self.db.execute(
            "INSERT OR REPLACE INTO seen SELECT dedup, key FROM done WHERE gone = 0 ORDER BY rid"
        )
        self.db.commit()

    def gone_keys(self, shard: str) -> set[str]:
        """The keys of the samples of `shard` that leave the dataset this run."""
        return {k for (k,) in self.db.execute("SELECT key FROM gone WHERE shard = ?", (shard,))}

    # -- the inputs --------------------------------------------------------------------------

    def add_inputs(self, found: Iterable[Item | Reject]) -> None:
        """Take in what discovery yields: inputs, and the rejects it recorded."""
        items, rejects = [], []
        for x in found:
            if isinstance(x, Item):
                items.append(x)
                if len(items) >= BATCH:
                    self._insert_items(items)
            else:
                rejects.append(x)
                if len(rejects) >= BATCH:
                    self.add_rejects(rejects)
        self._insert_items(items)
        self.add_rejects(rejects)
        self.db.execute("CREATE INDEX item_source ON item (source, seq)")
        self.db.commit()
        (self.inputs,) = self.db.execute("SELECT COUNT(*) FROM item").fetchone()

    def _insert_items(self, items: list[Item]) -> None:
        self.db.executemany(
            "INSERT INTO item (source, path, label, split, text, size, mtime_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                (_b(it.source), _b(it.path), _b(it.label), _b(it.split), _b(it.text))
                + (it.size, it.mtime_ns)
                for it in items
            ),
        )
        items.clear()

    def every_nth(self, step: int) -> list[Item]:
        """Inputs 0, step, 2 step, ... in source order."""
        cur = self.db.execute(
            f"SELECT {_ITEM} FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY source, seq) - 1 AS i"
            " FROM item) WHERE i % ? = 0 ORDER BY i",
            (step,),
        )
        return [_item(row) for row in cur]

    def labels(self) -> set[str]:
        cur = self.db.execute("SELECT DISTINCT label FROM item WHERE label IS NOT NULL")
        return {_s(label) for (label,) in cur}

    # -- rejects and dedup during the run ----------------------------------------------------

    def add_rejects(self, rejects: list[Reject]) -> None:
        self.db.executemany(
            "INSERT INTO reject (source, reason, rec) VALUES (?, ?, ?)",
            ((_b(r.source), _b(r.reason), json.dumps(r.record())) for r in rejects),
        )
        rejects.clear()

    def kept(self, digests: list[str]) -> dict[str, str]:
        """The keys of the samples already kept whose payloads have these hashes."""
        marks = ", ".join("?" * len(digests))
        cur = self.db.execute(f"SELECT dedup, key FROM seen WHERE dedup IN ({marks})", digests)
        return dict(cur.fetchall())

    def keep(self, samples: list[tuple[str, str]]) -> None:
        """Record kept samples: (payload hash, key)."""
        self.db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?)", samples)
        self.db.commit()

    def reject_lines(self) -> Iterator[str]:
        """rejected.jsonl: every reject of this run, by source and reason."""
        cur = self.db.execute("SELECT rec FROM reject ORDER BY source, reason, rid")
        for (rec,) in cur:
            yield rec + "\n"

    def reject_counts(self) -> dict[str, int]:
        cur = self.db.execute("SELECT reason, COUNT(*) FROM reject GROUP BY reason")
        return dict(sorted((_s(reason), n) for reason, n in cur))

    # -- the inputs to decode, in write order ------------------------------------------------

    def todo(self) -> Iterator[Item]:
        """The pending inputs in write order (`order`), read a page at a time."""
        last = (b"", -1)
        columns = ", ".join(f"i.{c}" for c in _ITEM.split(", "))
        while True:
            rows = self.db.execute(
                f"SELECT t.ord, t.seq, {columns} FROM todo t"
                " JOIN item i ON i.seq = t.seq WHERE (t.ord, t.seq) > (?, ?)"
                " ORDER BY t.ord, t.seq LIMIT ?",
                (*last, BATCH),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][:2]
            for row in rows:
                yield _item(row[2:])


# the columns an Item is made of, in its order
_ITEM = "source, path, label, split, text, size, mtime_ns"


# SQLite's primary result codes (sqlite3 names them from Python 3.11 on)
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 3, 8, 10, 13, 14


def as_os_error(e: sqlite3.Error, out: Path) -> OSError | None:
    """The OSError a failed write of the plan means (OUT full or read-only), naming OUT, as
    every other write of ingest fails; None for any other SQLite error (a bug: re-raised)."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # Python 3.11+; the message before that
    if code == _SQLITE_FULL or "disk is full" in str(e):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
    if code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(out))
    if code == _SQLITE_IOERR:
        return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({e})", str(out))
    return None


def _item(row) -> Item:
    source, path, label, split, text, size, mtime_ns = row
    return Item(_s(source), _s(path), _s(label), _s(split), _s(text), size, mtime_ns)


def pending_inputs(out: Path, plan: Plan) -> None:
    """Mark the inputs that no finished shard holds, minus rejects cached from earlier runs:
    decode rejects from rejected.jsonl, and every reject a finished shard recorded (a run killed
    before writing rejected.jsonl must not decode and count those inputs again); the cached
    rejects join the run's. Transient rejects (unreadable, out of memory, a crashed decoder)
    and duplicates are not cached: tried again."""
    if (out / REJECTED).exists():
        with open(out / REJECTED) as f:
            for lines in iter(lambda: f.readlines(1 << 20), []):
                plan._cache_rejects(0, (json.loads(line) for line in lines))
    db = plan.db
    db.execute("CREATE INDEX cached_input ON cached (source, size, mtime_ns)")
    # an edited source's entry has left (`gone`) already
    db.execute(
        "UPDATE item SET pending = 1 WHERE NOT EXISTS"
        " (SELECT 1 FROM done d WHERE d.source = item.source AND d.gone = 0)"
    )
    # the last record of an input wins, and one from a shard's stats over rejected.jsonl
    cur = db.execute(
        "SELECT i.seq, (SELECT c.rec FROM cached c WHERE c.source = i.source"
        " AND c.size = i.size AND c.mtime_ns = i.mtime_ns ORDER BY c.prio DESC, c.rid DESC"
        " LIMIT 1) AS rec FROM item i WHERE i.pending = 1 AND rec IS NOT NULL"
        " ORDER BY i.source, i.seq"
    )
    while rows := cur.fetchmany(BATCH):
        db.executemany("INSERT INTO skip VALUES (?)", ((seq,) for seq, _ in rows))
        plan.add_rejects([Reject(**json.loads(rec)) for _, rec in rows])
    db.execute("UPDATE item SET pending = 0 WHERE seq IN (SELECT seq FROM skip)")
    db.commit()


def write_order(plan: Plan) -> int:
    """Put the pending inputs in the order they are decoded and written in: a hash of the source
    path, not path order. Class folders would otherwise become shards of one class each, and a
    loader that streams shards (with a shuffle buffer much smaller than a shard) would feed
    training batches of one or two classes. Measured on real digits with 2 workers: the
    attention family stalled at 0.44 val accuracy on path-ordered shards.

    Inputs with identical bytes share the place of the first of them in path order and follow
    it in path order, so the copy kept is the first by path and the others are its duplicates,
    as in a path-ordered run. Only inputs that share a size with another are hashed here, and
    not those a finished shard holds (the sha256 of its entry). The order is computed over
    every input found, so a resumed run writes exactly the shards an uninterrupted one would.
    Returns how many inputs are pending."""
    db = plan.db
    shared = db.execute(
        "SELECT i.seq, i.source, i.path, i.text, (SELECT d.sha256 FROM done d"
        " WHERE d.source = i.source AND d.gone = 0 ORDER BY d.rid DESC LIMIT 1)"
        " FROM item i WHERE (i.path IS NULL, i.size) IN"
        " (SELECT path IS NULL, size FROM item GROUP BY 1, 2 HAVING COUNT(*) > 1)"
    )
    digests = []
    for seq, source, path, text, known in shared:
        try:
            digest = known or _digest(_s(path), _s(text))
        except OSError:
            digest = _s(source)  # unreadable: the decoder says why
        digests.append((seq, _b(digest)))
        if len(digests) >= BATCH:
            db.executemany("INSERT INTO digest VALUES (?, ?)", digests)
            digests.clear()
    db.executemany("INSERT INTO digest VALUES (?, ?)", digests)
    ordered = db.execute(
        "SELECT seq, source, first FROM (SELECT i.seq, i.source, i.pending, FIRST_VALUE(i.source)"
        " OVER (PARTITION BY i.path IS NULL, i.size, g.digest ORDER BY i.source, i.seq) AS first"
        " FROM item i LEFT JOIN digest g ON g.seq = i.seq) WHERE pending = 1"
    )
    rows = []
    for seq, source, first in ordered:
        rows.append((_hash(_s(first)) + _s(source).encode("utf-8", "surrogateescape"), seq))
        if len(rows) >= BATCH:
            db.executemany("INSERT INTO todo VALUES (?, ?)", rows)
            rows.clear()
    db.executemany("INSERT INTO todo VALUES (?, ?)", rows)
    db.execute("CREATE INDEX todo_order ON todo (ord, seq)")
    db.commit()
    (plan.pending,) = db.execute("SELECT COUNT(*) FROM todo").fetchone()
    return plan.pending


def _digest(path: str | None, text: str | None) -> str:
    if path is None:
        return hashlib.sha256((text or "").encode("utf-8")).hexdigest()
    return sha256_file(path)  # a str: a Path would intern every part of every path


def _hash(source: str) -> bytes:
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).digest()


def detect_modality(cfg: IngestConfig, prior: list[dict], plan: Plan) -> str:
    if cfg.modality:
        return cfg.modality
    if prior:
        return prior[0]["modality"]
    votes = Counter()
    for it in plan.every_nth(max(1, plan.inputs // 64)):
        votes["text" if it.path is None else N.sniff(it.path)] += 1
    votes.pop(None, None)
    if not votes:
        raise ConfigError(
            [
                f"src: could not detect a modality in {cfg.src} (no image, audio or text files"
                " found); pass --modality image|text|audio"
            ]
        )
    (best, n), *rest = votes.most_common()
    if rest:
        log.warning("mixed inputs %s; ingesting as %s (force with --modality)", dict(votes), best)
    return best


def class_map(cfg: IngestConfig, prior: list[dict], plan: Plan) -> dict[str, int]:
    """Class name -> index. A class seen for the first time gets the next index, so the
    indices of the samples already written never change."""
    labels = sorted(plan.labels())
    classes: dict[str, int] = {}
    for st in prior:  # later shards may know more classes; an index never changes
        classes.update(st["classes"])
    classes = dict(sorted(classes.items(), key=lambda kv: kv[1]))
    for name in labels:
        if name not in classes:
            classes[name] = len(classes)
    return classes


def check_compatible(cfg: IngestConfig, prior: list[dict], modality: str) -> None:
    if not prior:
        return
    problems = []
    if prior[0]["modality"] != modality:
        problems.append(
            f"modality: {cfg.out} holds {prior[0]['modality']} shards, not {modality};"
            " use another --out or --overwrite"
        )
    old = prior[0]["normalisation"]
    for k, v in cfg.normalisation().items():
        if old.get(k) != v:
            problems.append(
                f"{k}: {cfg.out} was ingested with {old.get(k)!r}, not {v!r}; use the same"
                " value, another --out, or --overwrite to rebuild"
            )
    if problems:
        raise ConfigError(problems)
