"""Decode, validate and normalise one raw input into the bytes a shard stores.

Runs in ingest's worker processes, so everything here is a plain picklable function of its
arguments. Decoding is left to the standard libraries (Pillow, soundfile, soxr); a bad input
becomes a `Rejected` with a reason from a fixed vocabulary, never an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import select
import tempfile
import threading
import time
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np

from featx.dataset.layout import sample_key, split_of
from featx.dataset.reasons import (  # noqa: F401 (featx.normalize.EMPTY ... stay public)
    BAD_ROW,
    BINARY_TEXT,
    BOMB,
    BROKEN_SYMLINK,
    CHANGED,
    CORRUPT,
    CRASHED,
    DUPLICATE,
    EMPTY,
    HIDDEN,
    MISSING,
    NOT_DECODABLE,
    NOT_UTF8,
    OUT_OF_MEMORY,
    OUTSIDE_CLASSES,
    PATH_ESCAPE,
    SYMLINK_DIR,
    SYMLINK_ESCAPE,
    TOO_LARGE,
    TOO_SHORT,
    TRUNCATED,
    UNREADABLE,
    UNSUPPORTED,
)
from featx.dataset.shards import tar_members

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
AUDIO_FORMATS = {"WAV", "FLAC", "OGG", "MP3", "WAVEX", "RF64"}
TEXT_SUFFIXES = {".txt", ".md", ".text", ".markdown"}


@dataclass(frozen=True)
class Params:
    """The IngestConfig fields that decide a sample's bytes, as a plain picklable record for the
    decoding processes. Made from a config (`of`); the defaults are the config's."""

    image_size: int
    image_resize: str
    image_format: str
    jpeg_quality: int
    max_pixels: int
    sample_rate: int
    max_seconds: float
    min_seconds: float
    encoding: str | None
    max_chars: int
    min_chars: int
    max_input_bytes: int

    @classmethod
    def of(cls, config=None, **changes) -> Params:
        """`config`'s values (an IngestConfig; default: its defaults), with `changes`."""
        from featx.config import IngestConfig

        fields = IngestConfig.model_fields
        names = cls.__dataclass_fields__
        values = {k: getattr(config, k) if config else fields[k].default for k in names}
        return cls(**{**values, **changes})


@dataclass(frozen=True)
class Layout:
    """What a worker needs to turn a normalised input into its shard bytes."""

    modality: str
    classes: dict  # label -> class id
    val_fraction: float
    test_fraction: float


@dataclass
class Normalised:
    sha256: str  # of the input's bytes
    ext: str  # payload member: jpg, png, flac or txt
    payload: bytes
    # of the normalised payload: what dedup compares, so inputs that normalise to the same
    # sample (CRLF or LF, with or without a BOM, NFD or NFC accents; one picture as PNG and as
    # BMP) are one sample
    payload_sha256: str = ""
    original: dict = field(default_factory=dict)
    key: str = ""  # set by `encode`, which also replaces payload with the sample's tar bytes
    split: str = ""
    tar: bytes = b""


@dataclass
class Rejected:
    reason: str
    detail: str
    sha256: str | None = None


def process(path: str | None, text: str | None, modality: str, p: Params):
    """Normalise one input given by file path or inline text; returns Normalised or Rejected."""
    raw = read_input(path, text, p.max_input_bytes)
    return raw if isinstance(raw, Rejected) else process_raw(raw, path, modality, p)


def read_input(
    path: str | None, text: str | None, max_bytes: int | None = None
) -> bytes | Rejected:
    """The bytes of an input (a file, or inline manifest text), or why it cannot be read.

    `path` is the real path discovery found (symlinks resolved and checked to stay in SRC).
    It is opened without following a link, and the file opened must still be at that real
    path: a file swapped for a symlink (to ~/.aws/credentials, say) between discovery and
    now is refused, not read. At most `max_bytes` are read; a larger input is `too large`.
    """
    if path is None:
        return (text or "").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Rejected(
                SYMLINK_ESCAPE, "is a symlink now (it was a file when found); not followed"
            )
        return Rejected(UNREADABLE, f"cannot read: {e.strerror or e}")
    with os.fdopen(fd, "rb") as f:
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened) and os.path.realpath(opened) != os.path.realpath(path):
            return Rejected(SYMLINK_ESCAPE, "a folder on its path became a symlink; not followed")
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            return Rejected(TOO_LARGE, f"{size} bytes, over --max-input-bytes {max_bytes}")
        try:
            data = f.read(max_bytes + 1 if max_bytes is not None else -1)
        except OSError as e:
            return Rejected(UNREADABLE, f"cannot read: {e.strerror or e}")
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        return Rejected(TOO_LARGE, f"over --max-input-bytes {max_bytes}")
    return data


def process_chunk(raws: list, infos: list, p: Params, layout: Layout) -> tuple[str, list]:
    """A Ray task: normalise and encode inputs read by the driver; returns (node id, results).
    `infos[i]` is the (source, label, split) of `raws[i]`."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for raw, info in zip(raws, infos, strict=True):
        res = process_raw(raw, None, layout.modality, p)
        out.append(encode(res, *info, layout) if isinstance(res, Normalised) else res)
    return node, out


def encode(res: Normalised, source: str, label, split: str | None, layout: Layout) -> Normalised:
    """Give `res` its key and split and build its tar members (payload, json, cls) here, in
    the worker: the one process that writes the shards then only appends bytes."""
    res.key = sample_key(res.sha256, source)
    res.split = split or split_of(res.key, layout.val_fraction, layout.test_fraction)
    meta = {
        "source": source,
        "label": label,
        "split": res.split,
        "sha256": res.sha256,
        "payload_sha256": res.payload_sha256,
        "modality": layout.modality,
        "original": res.original,
    }
    members = {res.ext: res.payload, "json": json.dumps(meta, sort_keys=True).encode()}
    if label is not None:
        members["cls"] = str(layout.classes[label]).encode()
    res.tar = tar_members(res.key, members)
    res.payload = b""  # travels once, inside res.tar
    return res


def process_raw(raw: bytes, path: str | None, modality: str, p: Params):
    """Normalise the bytes of one input; returns Normalised or Rejected."""
    if not raw:
        return Rejected(EMPTY, "0 bytes")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        out = {"image": _image, "audio": _audio, "text": _text}[modality](raw, p, path)
    except MemoryError:
        out = Rejected(OUT_OF_MEMORY, "out of memory while decoding")
    if isinstance(out, Rejected):
        out.sha256 = sha
        return out
    ext, payload, original = out
    return Normalised(sha, ext, payload, hashlib.sha256(payload).hexdigest(), original)


_worker: tuple[Params, Layout] | None = None


def init_worker(params: Params, layout: Layout, parent: int | None = None) -> None:
    """Pool initializer: the arguments every call of `work` shares. With `parent` (the pid of
    the process that made the pool), the worker leaves when that process is gone."""
    global _worker
    _worker = (params, layout)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Return never; end this process when process `parent` ends. A pool's workers wait for
    work on a queue whose both ends they hold, so a parent killed outright (SIGKILL, the OOM
    killer) would leave them, and the forkserver that made them, waiting for good."""
    try:
        fd = os.pidfd_open(parent)  # Linux: readable once the process has ended
    except (AttributeError, OSError):  # other systems, or the parent is already gone
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while _alive(parent):
            time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its pid reused by someone else
        return False
    return True


def work(arg: tuple):
    """(path, text, source, label, split) -> an encoded Normalised, or Rejected."""
    path, text, *info = arg
    params, layout = _worker
    res = process(path, text, layout.modality, params)
    return encode(res, *info, layout) if isinstance(res, Normalised) else res


def work_chunk(args: list[tuple], spool: str) -> str:
    """`work` over a chunk of inputs (one round trip to a pool process), written into a new
    file in `spool` (`dump_results`); returns its path. Results travel by file, not through
    the pool's shared result pipe: a process killed while writing a large message there
    leaves half a message that blocks the reader forever, while a path is one small write,
    which a pipe makes atomic."""
    out = [work(a) for a in args]
    fd, path = tempfile.mkstemp(dir=spool, suffix=".results")
    with os.fdopen(fd, "wb") as f:
        f.write(dump_results(out))
    return path


# The spool's format: plain data, never pickle (anyone who can write to OUT could otherwise
# run code in featx). Per result: a 4-byte big-endian length, a JSON header (the class, its
# text fields, and the length of each bytes field), then those bytes in order.
def dump_results(results: list) -> bytes:
    chunks = []
    for r in results:
        fields = dataclasses.asdict(r)
        blobs = {k: v for k, v in fields.items() if isinstance(v, bytes)}
        head = {
            "kind": type(r).__name__,
            "fields": {k: v for k, v in fields.items() if k not in blobs},
            "blobs": [[k, len(v)] for k, v in blobs.items()],
        }
        raw = json.dumps(head).encode()
        chunks += [len(raw).to_bytes(4, "big"), raw, *blobs.values()]
    return b"".join(chunks)


def load_results(data: bytes) -> list:
    """The results `dump_results` wrote; ValueError on anything else."""
    kinds = {"Normalised": Normalised, "Rejected": Rejected}
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        head = json.loads(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        fields = dict(head["fields"])
        for name, size in head["blobs"]:
            fields[name] = data[pos : pos + size]
            pos += size
        if head["kind"] not in kinds or pos > len(data):
            raise ValueError("not a featx decode spool file")
        out.append(kinds[head["kind"]](**fields))
    return out


def sniff(path: str) -> str | None:
    """Modality of a file from its content (Pillow, then soundfile, then UTF-8), or None."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if not head:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head)) as im:
                if im.format in IMAGE_FORMATS:
                    return "image"
    except Exception:
        pass
    import soundfile as sf

    try:
        sf.info(path)
        return "audio"
    except Exception:
        pass
    if b"\x00" in head:
        return None
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError as e:
        # A multi-byte character cut at the 64 KiB boundary is still text.
        return "text" if e.start >= len(head) - 4 else None


# ---------------------------------------------------------------------------------------------
# images


def _image(raw: bytes, p: Params, path: str | None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = p.max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; featx rejects from 1x.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            fmt = im.format
            if fmt not in IMAGE_FORMATS:
                return Rejected(UNSUPPORTED, f"image format {fmt} is not supported")
            original = {"width": im.width, "height": im.height, "mode": im.mode, "format": fmt}
            if fmt == "GIF" or getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            # JPEG can decode at a reduced scale straight away: much faster for large photos.
            im.draft("RGB", (p.image_size, p.image_size))
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Rejected(BOMB, str(e).split(". ")[0])
    except UnidentifiedImageError:
        return Rejected(NOT_DECODABLE, "not an image Pillow can identify")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = TRUNCATED if "truncated" in msg.lower() else CORRUPT
        return Rejected(reason, msg[:200] or type(e).__name__)
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth losing the image
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    size = (p.image_size, p.image_size)
    if p.image_resize == "crop":
        im = ImageOps.fit(im, size, Image.Resampling.BICUBIC)
    elif p.image_resize == "pad":
        im = ImageOps.pad(im, size, Image.Resampling.BICUBIC, color=(0, 0, 0))
    else:
        im = im.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if p.image_format == "jpg":
        im.save(buf, format="JPEG", quality=p.jpeg_quality)
    else:
        im.save(buf, format="PNG")
    return p.image_format, buf.getvalue(), original


def _to_rgb(im):
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's own I->L conversion clips at 255; scale the real range instead.
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# audio


def _audio(raw: bytes, p: Params, path: str | None):
    import soundfile as sf
    import soxr

    try:
        f = sf.SoundFile(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        return Rejected(NOT_DECODABLE, f"not audio soundfile can decode ({_first_line(e)})")
    with f:
        if f.format not in AUDIO_FORMATS:
            return Rejected(UNSUPPORTED, f"audio format {f.format} is not supported")
        sr, channels, declared = f.samplerate, f.channels, f.frames
        limit = int(p.max_seconds * sr) + 1
        want = min(declared, limit) if declared > 0 else limit
        try:
            x = f.read(frames=want, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            return Rejected(CORRUPT, _first_line(e))
    original = {
        "sample_rate": sr,
        "channels": channels,
        "seconds": round(declared / sr, 4) if declared > 0 else None,
        "format": f.format,
    }
    # A header that promises more than the file holds is a truncated file. libsndfile quietly
    # reads what is there, so compare the RIFF size field with the real length too.
    if raw[:4] == b"RIFF" and int.from_bytes(raw[4:8], "little") + 8 > len(raw):
        riff = int.from_bytes(raw[4:8], "little") + 8
        return Rejected(TRUNCATED, f"RIFF header declares {riff} bytes, file holds {len(raw)}")
    if f.format not in ("MP3", "OGG") and 0 < len(x) < want:
        return Rejected(TRUNCATED, f"header declares {declared} frames, file holds {len(x)}")
    if not np.isfinite(x).all():
        return Rejected(CORRUPT, "non-finite samples")
    x = x.mean(axis=1)
    if sr != p.sample_rate:
        x = soxr.resample(x, sr, p.sample_rate, quality="HQ").astype(np.float32)
    x = x[: int(p.max_seconds * p.sample_rate)]
    seconds = len(x) / p.sample_rate
    if seconds < p.min_seconds or len(x) < 2:
        return Rejected(TOO_SHORT, f"{seconds:.4f} s is shorter than {p.min_seconds} s")
    x = np.clip(x, -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, x, p.sample_rate, format="FLAC", subtype="PCM_16")
    return "flac", buf.getvalue(), original


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------------------------------------
# text


def _text(raw: bytes, p: Params, path: str | None):
    if b"\x00" in raw:
        return Rejected(BINARY_TEXT, "contains NUL bytes")
    if p.encoding is None:
        body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return Rejected(
                NOT_UTF8,
                f"byte 0x{body[e.start]:02x} at offset {e.start} is not UTF-8;"
                " pass --encoding (e.g. latin-1) if that is the file's encoding",
            )
    else:
        try:
            text = raw.decode(p.encoding)
        except UnicodeDecodeError as e:
            return Rejected(NOT_DECODABLE, f"not {p.encoding}: {e.reason} at offset {e.start}")
        text = text.removeprefix("\ufeff")
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v" for c in text[:4096]):
        return Rejected(BINARY_TEXT, "contains control characters")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if len(text) < p.min_chars:
        reason = EMPTY if not text else TOO_SHORT
        return Rejected(reason, f"{len(text)} characters after whitespace normalisation")
    original = {"chars": len(text), "truncated": len(text) > p.max_chars}
    return "txt", text[: p.max_chars].encode("utf-8"), original
