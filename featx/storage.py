"""Where featx reads and writes: local folders, or object-store URIs (`s3://`, `gs://`, ...).

A location is a `Path` (local) or a URI string. URIs go through pyarrow's file systems, which
take credentials and endpoints from the usual places (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
instance roles, ...); featx never copies them into logs, configs or outputs.

Inputs (shards, tokenizers, model directories) are read from the store directly. Outputs are
written into a local staging folder with featx's usual atomic writes and then *pushed*: files
changed since the last push are uploaded, with the files that mark completion (a shard's stats,
the dataset card, a features manifest) uploaded after the data they vouch for. An object only
appears in a store when its upload completes, so a reader never sees half a file, and a killed
run's staging folder resumes where it stopped. Each push ends with a listing of every object's
size and sha256 (LISTING), and a pull takes only objects that match it. One writer at a time:
a stage holds a lease on its S3 output prefix while it runs (`featx.store_lock`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator

from featx.errors import ConfigError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The user part of an address, with or without a scheme: up to the last "@" before the path
# (as urllib splits it, so a password holding "@" is hidden whole).
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#]*@")
log = logging.getLogger(__name__)
PUSHED = ".pushed.json"  # beside a staging folder: what was last pushed or pulled
# At an output prefix's root: the size and sha256 of each object featx pushed there. "_" keeps
# it out of pyarrow's and Spark's dataset scans; no featx reader lists a prefix's root files.
LISTING = "_featx_objects.json"
# Written into an output prefix by other processes, not by push, so no listing names them and
# a pull takes them as they are: Ray Train's folder in a RUN_DIR (a checkpoint is used only if
# its files match the sha256s its featx.json records, run_dir.checkpoints) and the workers'
# key logs. run_dir.RAY_RUN and run_dir.KEYS_DIR; a test keeps the names equal.
IN_PLACE = ("ray/*", "keys/*")


def is_uri(loc) -> bool:
    """True for an object-store URI (`file://` counts as local)."""
    return isinstance(loc, str) and bool(_SCHEME.match(loc)) and not loc.startswith("file://")


def location(value):
    """A Path for a local folder, the URI string for an object store."""
    if isinstance(value, Path):
        return value
    if isinstance(value, str):
        if value.startswith("file://"):
            return Path(value[len("file://") :])
        return value.rstrip("/") if is_uri(value) else Path(value)
    return value


# A config field that holds a local folder (a Path) or an object-store URI (a str).
Location = Annotated[Path | str, BeforeValidator(location)]


def redact(address: str) -> str:
    """`address` fit for logs: the user part of `scheme://user:pass@host/...` or of
    `user:pass@host:port` becomes `***`; the rest is kept as it is."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", address)


# the user part runs to the last "@" before the bucket (a secret may hold an "@")
_S3_USERINFO = re.compile(r"^(s3://)([^/?#]*)@([^/?#@]*(?:[/?#].*)?)$", re.IGNORECASE | re.DOTALL)


def lift_credentials(loc, seen: dict[str, str] | None = None):
    """`loc` without the credentials of `s3://KEY:SECRET@bucket/...`, which go instead to
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of this process (pyarrow reads them there, and
    so do the processes of a local Ray it starts). A URI with credentials would otherwise be
    copied into configs, Prefect's flow-run parameters and artifacts, reports and logs.
    `seen` collects the credentials lifted so far: two URIs with different ones are refused."""
    if not isinstance(loc, str):
        return loc
    m = _S3_USERINFO.match(loc)
    if m is None:
        return loc
    from urllib.parse import unquote

    key, _, secret = m.group(2).partition(":")
    creds = {"AWS_ACCESS_KEY_ID": unquote(key), "AWS_SECRET_ACCESS_KEY": unquote(secret)}
    if seen is not None:
        if seen and seen != creds:
            raise ConfigError(
                [f"{redact(loc)}: another URI of this run carries other credentials; use one"]
            )
        seen.update(creds)
    os.environ.update({k: v for k, v in creds.items() if v})
    return m.group(1) + m.group(3)


def display(loc) -> str:
    """The location for logs and errors, with any credentials in the URI hidden."""
    text = str(loc)
    # A local path is shown as it is, even with an "@" in a folder's name.
    return redact(text) if isinstance(loc, str) and _SCHEME.match(text) else text


def join(loc, *parts: str):
    if is_uri(loc):
        return "/".join([loc.rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(loc).joinpath(*parts)


def name(loc) -> str:
    return loc.rstrip("/").rsplit("/", 1)[-1] if is_uri(loc) else Path(loc).name


def filesystem(loc):
    """`(pyarrow FileSystem, path inside it)` for a location."""
    import pyarrow.fs as pafs

    if is_uri(loc):
        try:
            return pafs.FileSystem.from_uri(loc)
        except ValueError as e:  # pyarrow's ArrowInvalid: an unknown scheme
            raise ConfigError(
                [f"{display(loc)}: not a storage URI pyarrow can open ({e})"]
            ) from None
    return pafs.LocalFileSystem(), str(Path(loc).absolute())


def exists(loc) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(loc) -> bytes:
    if not is_uri(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(loc) -> str:
    return read_bytes(loc).decode("utf-8")


def write_text(loc, text: str) -> None:
    """Write a small file (local: atomically; objects appear whole anyway)."""
    if not is_uri(loc):
        from featx.fsutil import atomic_write_text

        Path(loc).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(loc), text)
        return
    fs, path = filesystem(loc)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def open_input(loc):
    """A binary stream (local file or object) to read from."""
    if not is_uri(loc):
        return open(loc, "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = filesystem(loc)
    return fs.open_input_stream(path)


def listdir(loc, pattern: str = "*") -> list:
    """Files directly in folder `loc` whose names match `pattern`, sorted; [] if no folder."""
    if not is_uri(loc):
        folder = Path(loc)
        return sorted(folder.glob(pattern)) if folder.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)
    )
    return [join(loc, n) for n in names]


def glob(loc, pattern: str) -> list:
    """Files under folder `loc` whose path relative to it matches `pattern` (fnmatch: `*`
    crosses folders), sorted."""
    if not is_uri(loc):
        root = Path(loc)
        return (
            sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern)
            )
            if root.is_dir()
            else []
        )
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    rels = sorted(
        i.path[len(path) :].lstrip("/")
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    )
    return [join(loc, r) for r in rels if fnmatch.fnmatch(r, pattern)]


def local_path(loc) -> str:
    """A path a library that wants a file name can read: the file itself, or a cached copy."""
    if not is_uri(loc):
        return str(loc)
    from featx.fsutil import atomic_write_bytes

    data = read_bytes(loc)
    cache = cache_root() / "objects" / hashlib.sha256(data).hexdigest()
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, data)
    return str(cache)


def local_copy(uri: str) -> Path:
    """A local copy of the folder at `uri` (a model directory): downloaded once per content.

    The copy's name hashes the URI and its objects' sizes and times, so a changed folder gets
    a fresh copy and concurrent readers never see one half-written."""
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    from featx.fsutil import atomic_path, fsync_dir

    fs, root = filesystem(uri)
    infos = [
        i
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if i.type == pafs.FileType.File
        # not upload left-overs or a lock (hidden), nor the prefix's listing
        and not _hidden(i.path[len(root) :].lstrip("/"))
        and i.path[len(root) :].lstrip("/") != LISTING
    ]
    sig = hashlib.sha256(uri.encode())
    for i in sorted(infos, key=lambda i: i.path):
        sig.update(f"{i.path}\0{i.size}\0{i.mtime_ns}\n".encode())
    dest = cache_root() / "copies" / f"{name(uri)[:40]}-{sig.hexdigest()[:16]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".copy"))
    try:
        for i in infos:
            target = tmp / i.path[len(root) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as part:  # durable before the folder gets its name
                _download(fs, i.path, part)
        # A folder is published whole by one rename; the first process to finish wins.
        try:
            tmp.rename(dest)
        except OSError:  # another process finished the same copy first
            if not dest.is_dir():
                raise
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(fs, path: str, dest: Path) -> str:
    """Copy object `path` to the file `dest`; returns the sha256 of what was copied."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as src, open(dest, "wb") as f:
        while block := src.read(1 << 22):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("FEATX_CACHE", Path.home() / ".cache" / "featx"))


def staging(uri: str) -> Path:
    """The local folder that stages outputs for `uri` (stable, so a killed run resumes)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", name(uri))[:40] or "root"
    return cache_root() / "staging" / f"{tail}-{digest}"


def _local_files(local: Path) -> dict[str, os.stat_result]:
    files = {}
    for root, dirs, names in os.walk(local):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(root) / n
            # temporaries, locks, featx's own bookkeeping; links (a features folder's
            # `current`) are local conveniences a store cannot hold
            if n.startswith(".") or p.is_symlink():
                continue
            files[p.relative_to(local).as_posix()] = p.stat()
    return files


def _index(local: Path) -> dict:
    """What was last pushed or pulled: path -> [size, mtime_ns, sha256] of the local file
    (an index from before listings holds [size, mtime_ns]; the digest is computed when needed)."""
    try:
        return json.loads(_index_path(local).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_index(local: Path, index: dict) -> None:
    from featx.fsutil import atomic_write_text

    atomic_write_text(_index_path(local), json.dumps(index, sort_keys=True))


def _index_path(local: Path) -> Path:
    # Beside the folder, not in it: the folder holds only the stage's own output.
    return local.with_name(local.name + PUSHED)


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def _synced(index: dict, rel: str, st: os.stat_result) -> bool:
    """The local file is as featx last pushed or pulled it."""
    return index.get(rel, [])[:2] == _stamp(st)


def _local_sha(local: Path, rel: str, st: os.stat_result, index: dict) -> str:
    """sha256 of a local file: from the index while the file is unchanged, else computed."""
    from featx.fsutil import sha256_file

    entry = index.get(rel, [])
    return entry[2] if len(entry) > 2 and _synced(index, rel, st) else sha256_file(local / rel)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _read_listing(fs, root: str) -> dict | None:
    """The prefix's listing: {"objects": {path: [size, sha256]}, "pending": {...}}; None where
    there is none (a prefix written by featx before listings, or by nothing yet)."""
    try:
        with fs.open_input_stream(f"{root}/{LISTING}") as f:
            listing = json.loads(f.read())
        return {"objects": dict(listing["objects"]), "pending": dict(listing.get("pending", {}))}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s/%s is not a featx listing; no object there is trusted", root, LISTING)
        return {"objects": {}, "pending": {}}


def _write_listing(fs, root: str, listing: dict) -> None:
    data = json.dumps(listing, indent=1, sort_keys=True).encode()
    # one write of the whole body: a stream cut short by Ctrl-C has it all or nothing
    with fs.open_output_stream(f"{root}/{LISTING}") as out:
        out.write(data)


def _accepted(listing: dict, rel: str) -> set[tuple[int, str]]:
    """The (size, sha256) an object may have: what the last push recorded, or what a push that
    was cut short was uploading in its place."""
    return {tuple(e) for e in (listing["objects"].get(rel), listing["pending"].get(rel)) if e}


class _Mismatch(Exception):
    pass


def _fetch(fs, path: str, dest: Path, accepted: set | None = None) -> list:
    """Download an object to `dest` (atomically); with `accepted`, only if its size and sha256
    are one of those, else raise _Mismatch and leave `dest` as it was. Returns its index entry."""
    from featx.fsutil import atomic_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        sha = _download(fs, path, tmp)
        if accepted is not None and (tmp.stat().st_size, sha) not in accepted:
            raise _Mismatch
    return [*_stamp(dest.stat()), sha]


def pull(
    uri: str, local: Path, skip: tuple[str, ...] = (), in_place: tuple[str, ...] = IN_PLACE
) -> int:
    """Download the files under `uri` that `local` lacks or holds in another version; returns
    how many. Paths matching a `skip` pattern are left out, and so are hidden names (an upload
    cut short, see `_upload`, or the lock). Where the prefix has a listing (LISTING), an object
    is taken only if the listing names it with its size and sha256: any other is refused with
    a warning that names it, and the local copy, if any, is kept. Objects matching `in_place`
    (written into the store by Ray Train, see IN_PLACE) and those of a prefix without a
    listing (featx before listings) are taken as they are, when their size differs. A local
    file that an earlier pull or push put there and the store no longer has is removed
    (featx deleted it there: a compacted shard, a pruned version)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    index = _index(local)
    have = _local_files(local)
    listing = _read_listing(fs, root)
    listed: set[str] = set()
    n = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        if rel == LISTING or _skipped(rel, skip) or _hidden(rel):
            continue
        listed.add(rel)
        dest = local / rel
        if listing is None or _skipped(rel, in_place):
            if rel not in have or have[rel].st_size != info.size:
                index[rel] = _fetch(fs, info.path, dest)
                n += 1
            continue
        accepted = _accepted(listing, rel)
        if rel in have:
            sha = _local_sha(local, rel, have[rel], index)
            if (have[rel].st_size, sha) in accepted:
                index[rel] = [*_stamp(have[rel]), sha]
                continue
        if not accepted:
            why = f"{LISTING} does not name it"
        elif info.size not in {size for size, _ in accepted}:
            why = f"it has {info.size} bytes where {LISTING} records another size"
        else:
            try:
                index[rel] = _fetch(fs, info.path, dest, accepted)
                n += 1
                continue
            except _Mismatch:
                why = f"its sha256 is not the one {LISTING} records"
        log.warning(
            "not pulled: %s: %s (changed or added behind featx's back); %s",
            display(join(uri, rel)),
            why,
            "the local copy is kept" if rel in have else "no local copy",
        )
    for rel in sorted(set(index) - listed):
        if rel in have and _synced(index, rel, have[rel]) and not _skipped(rel, skip):
            (local / rel).unlink()  # unchanged since featx pulled or pushed it
        if not _skipped(rel, skip):
            del index[rel]
    _save_index(local, index)
    return n


def _skipped(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def push(
    local: Path,
    uri: str,
    last: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    in_place: tuple[str, ...] = IN_PLACE,
) -> int:
    """Upload the files of `local` changed since the last push or pull; returns how many.

    Files matching the patterns in `last` go after all others, in the order of the patterns, so
    a marker of completion never reaches the store before what it marks. Paths matching `skip`
    stay local. Hidden files (temporaries, locks) never leave. Then files featx removed from
    `local` since they were pulled or pushed (compacted shards, pruned versions) are deleted
    from the store: only those, so nothing featx did not write there is touched. Last, the
    listing (LISTING) records each object's size and sha256; while the uploads run it accepts
    the new digests beside the old, so a push cut short leaves only objects a pull can verify.
    """
    from featx.fsutil import sha256_file

    fs, root = filesystem(uri)
    index = _index(local)
    files = _local_files(local)
    rank, shas = {}, {}
    for rel, st in files.items():
        if _skipped(rel, skip) or _synced(index, rel, st):
            continue
        shas[rel] = sha256_file(local / rel)
        if index.get(rel, [])[::2] == [st.st_size, shas[rel]]:
            index[rel] = [*_stamp(st), shas[rel]]  # written again with the same bytes
            continue
        rank[rel] = next((i + 1 for i, p in enumerate(last) if fnmatch.fnmatch(rel, p)), 0)
    before = _read_listing(fs, root)
    # What the store's listing says wins over this folder's index: it may hold an older copy
    # of an object a pull refused. The index fills in a prefix without a (readable) listing.
    listing = {"objects": _listed(local, index, files, skip + in_place), "pending": {}}
    if before:
        listing["objects"].update(before["objects"])
        listing["pending"].update(before["pending"])
    for rel, entry in list(listing["pending"].items()):  # a cut-short push from here landed it
        if index.get(rel, [])[2:] == entry[1:]:
            listing["objects"][rel] = listing["pending"].pop(rel)
    todo = sorted(rank, key=lambda r: (rank[r], r))
    if todo:
        for rel in todo:
            if not _skipped(rel, in_place):
                listing["pending"][rel] = [files[rel].st_size, shas[rel]]
        _write_listing(fs, root, listing)
        before = json.loads(json.dumps(listing))  # what the store holds now
    n = 0
    try:
        for rel in todo:
            src = local / rel
            stamp = _stamp(src.stat())
            sha = _upload(fs, src, f"{root}/{rel}")
            index[rel] = [*stamp, sha]
            if not _skipped(rel, in_place):
                listing["objects"][rel] = [stamp[0], sha]
                listing["pending"].pop(rel, None)
            n += 1
        for rel in sorted(set(index) - set(files)):
            if not _skipped(rel, skip):
                with contextlib.suppress(FileNotFoundError):
                    fs.delete_file(f"{root}/{rel}")
                del index[rel]
                listing["objects"].pop(rel, None)
                listing["pending"].pop(rel, None)
        if listing != before:
            _write_listing(fs, root, listing)
    finally:
        _save_index(local, index)
    return n


def _listed(local: Path, index: dict, files: dict, leave_out: tuple[str, ...]) -> dict:
    """A listing's objects from the index (digests an index of older featx lacks are added)."""
    from featx.fsutil import sha256_file

    objects = {}
    for rel, entry in index.items():
        if _skipped(rel, leave_out):
            continue
        if len(entry) > 2:
            objects[rel] = [entry[0], entry[2]]
        elif rel in files and _synced(index, rel, files[rel]):  # an index of older featx
            index[rel] = [*entry, sha256_file(local / rel)]
            objects[rel] = [entry[0], index[rel][2]]
    return objects


def _upload(fs, src: Path, dest: str) -> str:
    """Upload `src` so that `dest` appears whole or not at all; returns the sha256 of what was
    uploaded. An output stream commits what it holds when closed, also when an error (or
    Ctrl-C) closes it half way; so the bytes go to a hidden name beside `dest` first, and a
    server-side move publishes them once complete. A half upload is deleted, or left under its
    hidden name, which pull and readers skip."""
    import uuid

    folder, _, name = dest.rpartition("/")
    tmp = f"{folder}/.{name}.upload-{uuid.uuid4().hex[:12]}"
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as f, fs.open_output_stream(tmp) as out:
            while block := f.read(1 << 22):
                digest.update(block)
                out.write(block)
        fs.move(tmp, dest)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise
    return digest.hexdigest()


def delete_tree(loc, keep: tuple[str, ...] = ()) -> None:
    """Remove everything under `loc` (the store's objects, or a local folder), except the
    top-level names in `keep` (of a URI)."""
    import shutil

    import pyarrow.fs as pafs

    if not is_uri(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = filesystem(loc)
    if not keep:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        return
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(info.path)


@contextlib.contextmanager
def staged_output(
    loc,
    *,
    last: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    overwrite: bool = False,
    markers: tuple[str, ...] = (),
    what: str | None = None,
):
    """Yield a local folder to write `loc`'s output into; push it to `loc` afterwards: how
    every stage writes to an object store.

    A local `loc` is yielded as it is (a stage holds `fsutil.exclusive` there). For a URI, the
    stage (`what`, for the message a second writer gets) first takes the prefix's lock, held
    until the block ends (`featx.store_lock`; S3 only). Then `overwrite` deletes what the store
    and the staging folder hold (`clear`), once `check_overwrite(loc, markers)` has found the
    stage's own marker there; then the staging folder is brought up to date with what the
    store holds (so work done elsewhere is not redone), and pushed when the block ends, also
    when it fails, so finished files of a failed run are kept.
    """
    if not is_uri(loc):
        yield Path(loc)
        return
    with _writer_lock(loc, what) as lock:
        if overwrite:
            check_overwrite(loc, markers)
            clear(loc)
        local = staging(loc)
        n = pull(loc, local, skip=skip)
        if n:
            log.info("fetched %d file(s) of %s into %s", n, display(loc), local)
        try:
            yield local
        except BaseException:
            try:
                lock.check()
                push(local, loc, last=last, skip=skip)
            except Exception as e:  # the original error matters more
                log.warning("could not push finished files to %s: %s", display(loc), e)
            raise
        lock.check()
        n = push(local, loc, last=last, skip=skip)
        log.info("pushed %d file(s) to %s", n, display(loc))


class _NoLock:
    def check(self) -> None:
        pass


@contextlib.contextmanager
def _writer_lock(loc: str, what: str | None):
    """The lease on an S3 prefix (`featx.store_lock`); other schemes have no conditional
    writes featx can reach through pyarrow, so one writer at a time is up to the user there."""
    from featx import store_lock

    fs, path = filesystem(loc)
    if fs.type_name != "s3":
        log.info("%s: no lock for %s outputs; run one writer at a time", display(loc), fs.type_name)
        yield _NoLock()
        return
    with store_lock.held(fs, path, display(loc), what) as lease:
        yield lease


def check_overwrite(loc, markers: tuple[str, ...]) -> None:
    """--overwrite deletes only what featx made: `loc` (a folder or a prefix) must be missing,
    empty, or hold one of `markers`, the files by which a stage knows its own output (a
    dataset's card, a run's run.json, a features manifest). Raises ConfigError otherwise,
    before anything is deleted."""
    if not markers:
        raise ValueError("check_overwrite needs the stage's markers")
    if any(exists(join(loc, m)) for m in markers) or _empty(loc):
        return
    raise ConfigError(
        [
            f"out: refusing to --overwrite {display(loc)}: it holds no featx output of this "
            f"stage (no {' or '.join(markers)} there), so it may hold data featx did not make; "
            "nothing was deleted. Name the folder this stage wrote, or delete it yourself"
        ]
    )


def _empty(loc) -> bool:
    """No files there but featx's own bookkeeping (the lock, the listing)."""
    if not is_uri(loc):
        return not Path(loc).is_dir() or not any(Path(loc).iterdir())
    import pyarrow.fs as pafs

    from featx.store_lock import LOCK

    fs, path = filesystem(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return all(i.base_name in (LOCK, LISTING) for i in infos)


def clear(loc) -> None:
    """Delete an output location and, for a URI, its staging folder; a URI's lock stays (the
    stage that clears holds it)."""
    import shutil

    from featx.store_lock import LOCK

    delete_tree(loc, keep=(LOCK,) if is_uri(loc) else ())
    if is_uri(loc):
        shutil.rmtree(staging(loc), ignore_errors=True)
