"""One writer per object-store output prefix: a lease held in a `.featx-lock` object.

pyarrow cannot make a conditional put, so this one job goes through boto3: the lock is created
only if absent (If-None-Match: *), renewed and released only while it still holds what its
holder wrote (If-Match on its ETag), and taken over, once its lease has lapsed by the store's
clock, by one taker only (If-Match on the ETag the taker saw). For S3 and the servers that
speak its conditional writes; one that answers NotImplemented is written without a lock (with
a warning), and one that ignores the headers would let two writers in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

from featx.errors import ConfigError

LOCK = ".featx-lock"  # hidden: pull, push and the readers skip it
LEASE_S = 600.0  # a lease lapses this long after its last renewal; renewed every third of that
log = logging.getLogger(__name__)


class LockLost(RuntimeError):
    """Another writer took the prefix over (this process stalled past its lease)."""


@contextlib.contextmanager
def held(fs, prefix: str, shown: str, what: str | None = None):
    """Hold the lock of `prefix` ("bucket/path" in the S3 file system `fs`; `shown` is its URI
    for messages) while the block runs: taken at once or refused with a ConfigError that names
    the holder, renewed by a daemon thread, released at the end, on errors and Ctrl-C too."""
    bucket, _, path = prefix.strip("/").partition("/")
    lease = _Lease(client(fs), bucket, f"{path}/{LOCK}".lstrip("/"), shown, what)
    lease.take()
    try:
        yield lease
    finally:
        lease.release()


class _Lease:
    def __init__(self, s3, bucket: str, key: str, shown: str, what: str | None):
        self.s3, self.bucket, self.key = s3, bucket, key
        self.shown, self.what = shown, what or "stage"
        self.lease_s = LEASE_S
        self.since = _now()
        self.etag: str | None = None
        self.lost: str | None = None
        self.unsupported = False
        self._stop = threading.Event()
        self._io = threading.Lock()  # a renewal and a check never cross
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"{self.shown}/{LOCK}"

    def take(self) -> None:
        try:
            self._take()
        except ConfigError:
            raise
        except Exception as e:  # botocore's errors: no credentials, no bucket, no server
            if _code(e) in ("NotImplemented", "501"):
                log.warning(
                    "%s: this store cannot make conditional writes, so featx cannot lock it; "
                    "run one writer at a time there",
                    self.shown,
                )
                self.unsupported = True
                return
            raise ConfigError(
                [
                    f"out: could not take {self.uri} ({e}); check the URI, the credentials "
                    "and, for an S3-compatible server, AWS_ENDPOINT_URL"
                ]
            ) from e

    def _take(self) -> None:
        for _ in range(8):  # each turn: another taker or a release came in between
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
            seen = self._read()
            if seen is None:  # released in between
                continue
            etag, holder, lapsed = seen
            if not lapsed and not _gone(holder):
                raise ConfigError([self._refusal(holder)])
            try:
                self.etag = self._put(IfMatch=etag)
            except Exception as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    continue  # someone else took it first; look again
                raise
            why = "its lease lapsed" if lapsed else "its process is gone"
            log.warning("took over %s from %s: %s", self.uri, _who(holder), why)
            break
        else:
            raise ConfigError([f"out: could not take {self.uri}: other writers keep taking it"])
        self._thread = threading.Thread(target=self._renew, name="featx-lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LockLost unless this process still holds the lock (before pushing)."""
        if self.unsupported:
            return
        with self._io:
            if self.lost is None and self._head() != self.etag:
                self.lost = "the lock object was replaced or deleted"
        if self.lost:
            raise LockLost(
                f"{self.shown}: this run no longer holds {self.uri} ({self.lost}); nothing "
                "was pushed. Another featx may be writing there: let it finish, then run again "
                "(the local staging folder keeps this run's work)"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a renewal in flight; not forever on a dead network
        if self.lost or self.etag is None:
            return
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:
            if _code(e) in ("PreconditionFailed", "NoSuchKey", "404"):
                log.warning("%s was taken over or removed before this run released it", self.uri)
                return
            # a server without conditional deletes: delete it if it is still ours
            try:
                if self._head() == self.etag:
                    self.s3.delete_object(Bucket=self.bucket, Key=self.key)
            except Exception as e2:  # the lease lapses by itself; say so and carry on
                log.warning("could not release %s (%s); it lapses by itself", self.uri, e2)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self._io:
                    self.etag = self._put(IfMatch=self.etag)
            except Exception as e:
                if _code(e) in ("PreconditionFailed", "NoSuchKey"):
                    self.lost = "another writer took it over after this run's lease lapsed"
                    log.error("%s: %s", self.uri, self.lost)
                    return
                log.warning("could not renew %s (%s); trying again", self.uri, e)

    def _head(self) -> str | None:
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self.key)["ETag"]
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _put(self, **condition) -> str:
        now = _now()
        body = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pidns": _pid_namespace(),
            "stage": self.what,
            "since": _iso(self.since),
            "expires": _iso(now + timedelta(seconds=self.lease_s)),
            "lease_s": self.lease_s,
        }
        r = self.s3.put_object(
            Bucket=self.bucket,
            Key=self.key,
            Body=json.dumps(body, indent=1).encode(),
            ContentType="application/json",
            **condition,
        )
        return r["ETag"]

    def _read(self) -> tuple[str, dict, bool] | None:
        """(ETag, body, lapsed) of the lock in the store; None if there is none. Lapsed by the
        store's clock (its Date against the object's Last-Modified), so skewed clocks between
        writers do not matter."""
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            holder = json.loads(r["Body"].read())
            lease_s = float(holder.get("lease_s", LEASE_S))
        except (ValueError, TypeError, AttributeError):
            holder, lease_s = {}, LEASE_S
        date = r["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else _now()
        lapsed = now >= r["LastModified"] + timedelta(seconds=lease_s)
        return r["ETag"], holder, lapsed

    def _refusal(self, holder: dict) -> str:
        return (
            f"out: {self.shown} is being written by {_who(holder)} since "
            f"{holder.get('since', '?')}; its lease runs to {holder.get('expires', '?')} and is "
            "renewed while that run lives. Wait for it to finish, or write elsewhere; if that "
            f"run is gone, run again after its lease lapses, or delete {self.uri} yourself"
        )


def client(fs):
    """A boto3 S3 client that reaches the store the pyarrow file system `fs` reaches: its
    endpoint, region and keys (the AWS_* variables, profiles and roles boto3 reads itself)."""
    import boto3
    from botocore.config import Config

    s = _pyarrow_settings(fs)
    endpoint = s.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{s.get('scheme') or 'https'}://{endpoint}"
    keys = {}
    if s.get("access_key"):
        keys = {
            "aws_access_key_id": s["access_key"],
            "aws_secret_access_key": s.get("secret_key"),
            "aws_session_token": s.get("session_token") or None,
        }
    config = Config(
        retries={"mode": "standard"},
        # pyarrow's endpoint, never one boto3 alone reads (AWS_ENDPOINT_URL_S3, a profile's)
        ignore_configured_endpoint_urls=bool(s),
        # pyarrow addresses a custom endpoint by path (bucket in the path, not the host name)
        s3={"addressing_style": "virtual" if s.get("force_virtual_addressing") else "path"}
        if endpoint
        else {},
    )
    return boto3.session.Session().client(
        "s3",
        region_name=fs.region or None,
        endpoint_url=endpoint,
        verify=s.get("tls_ca_file_path") or None,
        config=config,
        **keys,
    )


def _pyarrow_settings(fs) -> dict:
    """The endpoint, scheme and keys pyarrow resolved (from the URI's query, AWS_ENDPOINT_URL,
    ...). pyarrow exposes only `region` as a property; the rest is in its pickle state, read
    here and nowhere else. {} if a pyarrow release changes that state: boto3 then reads the
    same AWS_* variables itself (tests/test_storage.py fails first)."""
    try:
        state = fs.__reduce__()[1][0]
    except (AttributeError, IndexError, TypeError):
        return {}
    return state if isinstance(state, dict) and "endpoint_override" in state else {}


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _who(holder: dict) -> str:
    return (
        f"featx {holder.get('stage', '?')} on {holder.get('host', '?')} "
        f"(pid {holder.get('pid', '?')})"
    )


def _gone(holder: dict) -> bool:
    """The holder ran on this machine, in this process namespace, and has exited (killed
    without releasing): no need to wait for its lease. Elsewhere a lease is all there is."""
    ns = _pid_namespace()
    if not ns or holder.get("host") != socket.gethostname() or holder.get("pidns") != ns:
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def _pid_namespace() -> str | None:
    # Containers can share a host name; a pid means something only within one namespace.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _now() -> datetime:
    return datetime.fromtimestamp(time.time(), timezone.utc)


def _iso(t: datetime) -> str:
    return t.replace(microsecond=0).isoformat()
