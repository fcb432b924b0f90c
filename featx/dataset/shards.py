"""WebDataset shards: the atomic shard writer, shard listing, and the sample decoder.

A shard is written under a hidden temporary name and renamed when complete, after its
`_stats.json`; so a `*.tar` that exists is always whole. Tar headers carry fixed times and owners,
so the same samples give the same bytes on every run and machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from featx import storage
from featx.dataset.layout import PAYLOADS, shard_name, stats_path
from featx.fsutil import atomic_write_text, fsync_dir, remove_temporaries, sha256_file


def finished_shards(out, split: str) -> list:
    """Complete shards of a split, in index order (a tar without its stats is not complete).

    `out` is a local folder or an object-store URI; so are the returned shards."""
    folder = storage.join(out, split)
    done = {str(p) for p in storage.listdir(folder, "shard-*_stats.json")}
    return [t for t in storage.listdir(folder, "shard-*.tar") if str(stats_path(t)) in done]


def remove_partials(out: Path) -> int:
    """Delete temporaries (files and folders) and tars without stats left by a killed run;
    returns how many."""
    if not out.is_dir():
        return 0
    n = 0
    for folder in [out, *(p for p in out.iterdir() if p.is_dir() and p.name[0] != ".")]:
        n += remove_temporaries(folder)
        for tar in folder.glob("*.tar"):
            if not stats_path(tar).exists():
                tar.unlink()
                n += 1
    return n


class ShardWriter:
    """Writes one split's samples into shards capped by sample count and payload bytes."""

    def __init__(
        self,
        out: Path,
        split: str,
        start_index: int,
        max_samples: int,
        max_bytes: int,
        extra_stats: dict,
    ) -> None:
        self.folder = out / split
        self.split = split
        self.index = start_index
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.extra_stats = extra_stats
        self.written: list[dict] = []  # stats of shards finished by this writer
        self._file = None
        self._rejects: list[dict] = []

    def write(self, members: bytes, entry: dict) -> None:
        """Append one sample: its tar members, as `tar_members` built them."""
        size = len(members)
        if self._file is not None and (
            len(self._entries) >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self.finish()
        if self._file is None:
            self._open()
        self._file.write(members)
        self._entries.append(entry)
        self._bytes += size

    def note_reject(self, record: dict) -> None:
        """Record a rejected input with the shard being filled: its stats list the rejects and
        their histogram, so a resumed run knows them even if rejected.jsonl was never written
        (and neither re-decodes nor counts them twice)."""
        self._rejects.append(record)

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._final = self.folder / shard_name(self.index)
        self._tmp = self.folder / f".{self._final.name}.tmp{os.getpid()}"
        try:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by finish/abort)
        except OSError as e:
            e.filename = str(self.folder)  # the folder to fix, not our hidden temporary
            raise
        self._entries: list[dict] = []
        self._bytes = 0
        self._t0 = time.perf_counter()

    def finish(self) -> None:
        """Close the open shard: fsync, write its stats, then rename it into place."""
        if self._file is None:
            return
        # The end of a tar archive, as tarfile writes it: two zero blocks, then zeros up to
        # a whole record.
        end = self._file.tell() + 2 * tarfile.BLOCKSIZE
        self._file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._file.write(tarfile.NUL * (-end % tarfile.RECORDSIZE))
        self._file.close()
        sha = sha256_file(self._tmp, fsync=True)
        stats = {
            "shard": f"{self.split}/{self._final.name}",
            "split": self.split,
            "samples": len(self._entries),
            "bytes": self._tmp.stat().st_size,
            "sha256": sha,
            "seconds": round(time.perf_counter() - self._t0, 3),
            "errors": dict(sorted(Counter(r["reason"] for r in self._rejects).items())),
            "rejects": self._rejects,
            **self.extra_stats,
            "entries": self._entries,
        }
        atomic_write_text(stats_path(self._final), json.dumps(stats, indent=1))
        os.replace(self._tmp, self._final)
        fsync_dir(self.folder)
        self.written.append(stats)
        self._rejects = []
        self._file = None
        self.index += 1

    def abort(self) -> None:
        """Drop the open shard's temporary; never raises (it runs while an error propagates,
        e.g. a full disk, where closing the tar fails again)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


def read_stats(tar) -> dict:
    return json.loads(storage.read_text(stats_path(tar)))


def shard_samples(url) -> Iterator[dict]:
    """The raw samples of one shard (a local path or a URI), in shard order: `{"__key__",
    ext: bytes, ...}` as webdataset groups a tar's members; pass each to `decode_sample`."""
    import webdataset as wds

    with storage.open_input(url) as stream:
        members = wds.tariterators.tar_file_expander([{"url": str(url), "stream": stream}])
        for sample in wds.tariterators.group_by_keys(members):
            yield {k: v for k, v in sample.items() if k != "__url__"}


def decode_sample(sample: dict) -> dict:
    """Decode one raw WebDataset sample (member name -> bytes) into featx's in-memory form.

    Returns `{"__key__", "cls", "meta", and one of "image" (uint8 HxWx3), "audio" (float32 mono)
    or "text" (str)}`. Only featx's own formats are decoded: nothing is unpickled or torch-loaded.
    """
    import numpy as np

    out: dict = {"__key__": sample["__key__"]}
    cls = sample.get("cls")
    out["cls"] = int(_bytes(cls)) if cls is not None else None
    meta = sample.get("json")
    out["meta"] = json.loads(_bytes(meta)) if meta is not None else {}
    for ext, kind in PAYLOADS.items():
        if ext not in sample:
            continue
        raw = _bytes(sample[ext])
        if kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as im:
                out["image"] = np.asarray(im.convert("RGB"))
        elif kind == "audio":
            import soundfile as sf

            x, sr = sf.read(io.BytesIO(raw), dtype="float32")
            out["audio"] = x
            out["meta"].setdefault("sample_rate", sr)
        else:
            out["text"] = raw.decode("utf-8")
        break
    else:
        raise ValueError(
            f"sample {sample['__key__']!r} has no featx payload (one of {sorted(PAYLOADS)})"
        )
    return out


def _bytes(v) -> bytes:
    # Ray Data hands members over as bytes, numpy scalars or already-decoded objects.
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, (int, float)):
        return str(int(v)).encode()
    if isinstance(v, dict):
        return json.dumps(v).encode()
    return bytes(v)


def tar_members(key: str, members: dict[str, bytes]) -> bytes:
    """One sample's tar members as webdataset's TarWriter lays them out (extensions sorted,
    fixed owner, mode and time, so the same sample gives the same bytes), with ustar headers
    from tarfile and each member padded to tar's 512-byte blocks."""
    out = []
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "featx"
        out += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"), data]
        out.append(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
    return b"".join(out)
