"""Fault injection: hostile inputs, SIGKILLs at seeded moments, worker faults, disk trouble.

Every test runs the real thing (the `featx` CLI in a subprocess, a real Ray, a real Prefect
server) on tiny synthetic data, injects one kind of fault, and compares what is left with an
uninterrupted run of the same inputs. What was tried and what came out is added to the
session's figures, printed at the end of the run (conftest.py, `fault_figures`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_audio, make_image, make_text, png_bomb
from faults_support import (
    FEATX,
    check_visible_parts,
    check_visible_shards,
    crashed,
    featx_env,
    file_stats,
    in_splits,
    kill_and_reap,
    no_dac_prefix,
    one_line_error,
    own_processes,
    partial_files,
    run_featx,
    shard_bytes,
    sigkill,
    snapshot,
    start_featx,
    stats_keys,
    tar_keys,
    wait_for,
)
from PIL import Image

from featx import normalize as N

pytestmark = pytest.mark.faults
pytest_plugins = ["prefect_fixtures"]  # the session's real Prefect server and `featx serve`

SEED = 20261129  # every "random moment" below comes from random.Random(SEED + n)


# ---------------------------------------------------------------------------------------------
# hostile inputs: every one rejected with its reason or ingested correctly; nothing crashes

INGESTED = "ingested"  # expectation: the input becomes a sample that decodes and checks out


def _valid_images(src: Path, n: int = 8) -> list[str]:
    names = []
    for i in range(n):
        label = "a" if i % 2 else "b"
        make_image(src / label / f"ok{i:02d}.png", seed=1000 + i, size=(40, 30))
        names.append(f"{label}/ok{i:02d}.png")
    return names


def hostile_images(src: Path, outside: Path) -> tuple[list[str], dict[str, tuple[str, object]]]:
    """Valid images beside hostile ones; returns (valid sources, source -> (kind, expected))."""
    valid = _valid_images(src)
    a = src / "a"
    h: dict[str, tuple[str, object]] = {}

    def add(rel: str, kind: str, expected) -> Path:
        h[rel] = (kind, expected)
        return src / rel

    add("a/empty.png", "empty file", {N.EMPTY}).write_bytes(b"")
    add("a/random.jpg", "random bytes", {N.NOT_DECODABLE}).write_bytes(
        np.random.default_rng(1).bytes(4000)
    )
    jpg = make_image(src / "full.jpg", 7, size=(64, 64))
    add("a/truncated.jpg", "truncated file", {N.TRUNCATED}).write_bytes(
        jpg.read_bytes()[: jpg.stat().st_size // 2]
    )
    png = make_image(src / "full.png", 8, size=(64, 64))
    # the signature and the IHDR chunk (33 bytes): dimensions, but not one pixel
    add("a/header_only.png", "header only", {N.TRUNCATED, N.CORRUPT, N.NOT_DECODABLE}).write_bytes(
        png.read_bytes()[:33]
    )
    jpg.unlink()
    png.unlink()
    make_image(add("a/png_named.jpg", "wrong extension", INGESTED), 11, fmt="PNG")
    make_image(add("b/jpeg_named.txt", "wrong extension", INGESTED), 12, fmt="JPEG")
    png_bomb(add("a/bomb.png", "decompression bomb", {N.BOMB}))
    Image.new("L", (4096, 4096), 90).save(add("a/huge.png", "huge dimensions", INGESTED))
    strip = add("b/strip.png", "huge dimensions", INGESTED)
    Image.new("RGB", (20000, 3), (10, 200, 30)).save(strip)
    ramp = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)
    Image.fromarray(ramp).save(add("a/sixteen_bit.png", "16-bit image", INGESTED))
    pal = Image.new("P", (40, 30), 3)
    pal.putpalette(list(range(256)) * 3)
    pal.save(add("b/palette.png", "palette image", INGESTED), transparency=3)
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(
        add("b/animated.gif", "palette image", INGESTED), save_all=True, append_images=frames[1:]
    )
    for rel, kind in (
        ("b/my holiday photo.png", "name with spaces"),
        ("b/v1.2.final..png", "name with dots"),
        ("b/café_日本_😀.png", "unicode name"),
        ("b/-rf.png", "name with leading dash"),
        ("b/--help.png", "name with leading dash"),
    ):
        make_image(add(rel, kind, INGESTED), 20 + len(h))
    # Not UTF-8 (Linux allows any bytes in a name): recorded with \xNN escapes.
    make_image(src / os.fsdecode(b"b/raw_\xff\xfe.png"), 40)
    h["b/raw_\\xff\\xfe.png"] = ("non-UTF-8 name", INGESTED)
    make_image(add("b/.hidden.png", "hidden file", {N.HIDDEN}), 41)
    os.symlink(a / "loop_b.png", add("a/loop_a.png", "symlink loop", {N.BROKEN_SYMLINK}))
    os.symlink(a / "loop_a.png", add("a/loop_b.png", "symlink loop", {N.BROKEN_SYMLINK}))
    os.symlink("..", add("a/up", "symlink loop (folder)", {N.SYMLINK_DIR}))
    make_image(outside / "secret.png", 42)
    os.symlink(outside / "secret.png", add("a/escape.png", "symlink escape", {N.SYMLINK_ESCAPE}))
    os.symlink(outside, add("b/escape_dir", "symlink escape (folder)", {N.SYMLINK_ESCAPE}))
    locked = make_image(add("a/locked.png", "unreadable file", {N.UNREADABLE}), 43)
    locked.chmod(0)
    make_image(src / "locked_dir" / "x.png", 44)
    h["locked_dir"] = ("unreadable folder", {N.UNREADABLE})
    (src / "locked_dir").chmod(0)
    os.mkfifo(add("a/fifo.png", "not a regular file", {N.UNSUPPORTED}))
    shutil.copy(a / "ok01.png", add("b/copy_of_ok01.png", "duplicate", {N.DUPLICATE}))
    make_image(add("stray.png", "outside class folders", {N.OUTSIDE_CLASSES}), 45)
    make_text(add("a/notes.txt", "text in an image dataset", {N.NOT_DECODABLE}), 46)
    return valid, h


def hostile_texts(src: Path, outside: Path) -> tuple[list[str], dict[str, tuple[str, object]]]:
    valid = []
    for i in range(10):
        label = "pos" if i % 2 else "neg"
        make_text(src / label / f"doc{i:02d}.txt", 300 + i)
        valid.append(f"{label}/doc{i:02d}.txt")
    h: dict[str, tuple[str, object]] = {}

    def add(rel: str, kind: str, expected) -> Path:
        h[rel] = (kind, expected)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        return src / rel

    add("pos/latin1.txt", "non-UTF-8 text", {N.NOT_UTF8}).write_bytes(
        "café crème brûlée".encode("latin-1")
    )
    add("pos/cut_utf8.txt", "truncated file", {N.NOT_UTF8}).write_bytes("naïve ☃".encode()[:-1])
    add("neg/random.txt", "random bytes", {N.BINARY_TEXT, N.NOT_UTF8}).write_bytes(
        np.random.default_rng(2).bytes(3000)
    )
    add("neg/nul.txt", "NUL bytes", {N.BINARY_TEXT}).write_bytes(b"hello\x00world")
    add("neg/utf16.txt", "binary text", {N.BINARY_TEXT}).write_bytes("hello".encode("utf-16"))
    add("neg/escape_codes.txt", "binary text", {N.BINARY_TEXT}).write_bytes(b"ok \x1b[31mred\x07")
    add("pos/empty.txt", "empty file", {N.EMPTY}).write_bytes(b"")
    add("pos/blank.txt", "empty file", {N.EMPTY}).write_bytes(b" \n\t\r\n ")
    add("pos/bom_crlf.txt", "BOM and CRLF", INGESTED).write_bytes(
        b"\xef\xbb\xbfline one\r\nline two\r\n"
    )
    add("neg/huge.txt", "huge document", INGESTED).write_text("word " * 400_000)
    make_text(add("neg/-n 'quoted' name.txt", "name with leading dash", INGESTED), 350)
    make_text(add("neg/日本語 ファイル.txt", "unicode name", INGESTED), 351)
    picture = add("pos/picture.txt", "wrong extension", {N.BINARY_TEXT, N.NOT_UTF8})
    make_image(picture, 352, fmt="PNG")
    shutil.copy(src / "pos/doc01.txt", add("pos/zz_copy.txt", "duplicate", {N.DUPLICATE}))
    os.symlink(src / "pos/doc03.txt", add("pos/zz_link_to_doc03.txt", "duplicate", {N.DUPLICATE}))
    (outside / "secret.txt").write_text("never read")
    os.symlink(outside / "secret.txt", add("pos/escape.txt", "symlink escape", {N.SYMLINK_ESCAPE}))
    dangling = add("pos/dangling.txt", "broken symlink", {N.BROKEN_SYMLINK})
    os.symlink(src / "pos/missing.txt", dangling)
    return valid, h


def hostile_audio(src: Path, outside: Path) -> tuple[list[str], dict[str, tuple[str, object]]]:
    import soundfile as sf

    valid = []
    for i in range(8):
        label = "hi" if i % 2 else "lo"
        make_audio(src / label / f"clip{i:02d}.wav", seed=i, seconds=0.25)
        valid.append(f"{label}/clip{i:02d}.wav")
    h: dict[str, tuple[str, object]] = {}

    def add(rel: str, kind: str, expected) -> Path:
        h[rel] = (kind, expected)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        return src / rel

    make_audio(add("hi/one_sample.wav", "1-sample audio", {N.TOO_SHORT}), 50, seconds=1 / 16000)
    ten_min = np.sin(np.arange(600 * 8000) * 0.05).astype(np.float32) * 0.2
    sf.write(add("lo/ten_minutes.wav", "10-minute audio", INGESTED), ten_min, 8000, "PCM_16")
    wav = make_audio(src / "full.wav", 51, seconds=0.5)
    add("hi/truncated.wav", "truncated file", {N.TRUNCATED}).write_bytes(wav.read_bytes()[:3000])
    add("hi/header_only.wav", "header only", {N.TOO_SHORT, N.TRUNCATED}).write_bytes(
        wav.read_bytes()[:44]
    )
    wav.unlink()
    add("lo/noise.wav", "random bytes", {N.NOT_DECODABLE}).write_bytes(
        np.random.default_rng(3).bytes(5000)
    )
    add("lo/empty.flac", "empty file", {N.EMPTY}).write_bytes(b"")
    nan = np.full(4000, np.nan, dtype=np.float32)
    sf.write(add("lo/nan.wav", "non-finite samples", {N.CORRUPT}), nan, 16000, "FLOAT")
    make_audio(add("hi/flac_named.mp3", "wrong extension", INGESTED), 52, fmt="FLAC")
    make_audio(add("hi/stereo 44k.flac", "name with spaces", INGESTED), 53, sr=44100, channels=2)
    x = (np.sin(np.arange(4000) * 0.1) * 0.5).astype(np.float32)
    sf.write(add("lo/-8bit.wav", "name with leading dash", INGESTED), x, 8000, "PCM_U8")
    make_text(add("lo/notes.wav", "text in an audio dataset", {N.NOT_DECODABLE}), 54)
    make_image(add("hi/picture.wav", "image in an audio dataset", {N.NOT_DECODABLE}), 55, fmt="PNG")
    shutil.copy(src / "hi/clip01.wav", add("hi/zz_copy.wav", "duplicate", {N.DUPLICATE}))
    return valid, h


def _check_sample(modality: str, sample: dict, args: dict) -> str | None:
    """None when a decoded sample is what ingest promises, else what is wrong."""
    if modality == "image":
        img = sample["image"]
        if img.shape != (args["size"], args["size"], 3) or img.dtype != np.uint8:
            return f"image {img.shape} {img.dtype}"
    elif modality == "audio":
        x = sample["audio"]
        if x.ndim != 1 or not 0 < len(x) <= args["max_seconds"] * 16000:
            return f"audio of shape {x.shape}"
    else:
        t = sample["text"]
        if not t or len(t) > args["max_chars"] or "\ufeff" in t or "\r" in t:
            return f"text of {len(t)} chars {t[:20]!r}"
    return None


HOSTILE = {
    "image": (hostile_images, ["--image-size", "16"], {"size": 16}),
    "text": (hostile_texts, ["--modality", "text", "--max-chars", "500"], {"max_chars": 500}),
    "audio": (hostile_audio, ["--modality", "audio", "--max-seconds", "2"], {"max_seconds": 2}),
}


@pytest.mark.parametrize("modality", list(HOSTILE))
def test_hostile_inputs_are_rejected_with_reason_or_ingested(modality, tmp_path, fault_figures):
    """Every hostile input is rejected with its reason or ingested correctly, every valid input
    beside them is ingested, inputs are left as they were, and featx does not crash."""
    import tarfile

    from featx.dataset import decode_sample

    build, cli_args, check_args = HOSTILE[modality]
    src, outside, out = tmp_path / "src", tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    valid, hostile = build(src, outside)
    before = file_stats(src)
    fault_figures.inputs_tried += len(valid) + len(hostile)
    fault_figures.hostile_tried += len(hostile)
    fault_figures.hostile_kinds |= {f"{modality}: {kind}" for kind, _ in hostile.values()}
    fault_figures.valid_expected += len(valid)

    # Permissions must bind (the unreadable inputs), also when the suite runs as root.
    args = ("--workers", "2", "--val-fraction", "0", *cli_args)
    r = run_featx("ingest", src, out, *args, prefix=no_dac_prefix())
    if crashed(r.stderr, r.returncode):
        fault_figures.crashes += 1
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr

    rejected = {}
    for line in (out / "rejected.jsonl").read_text().splitlines():
        row = json.loads(line)
        rejected[row["source"]] = row
    samples = {}
    for tar in sorted(in_splits(out, "shard-*.tar")):
        raw: dict[str, dict] = {}
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                raw.setdefault(key, {"__key__": key})[ext] = t.extractfile(m).read()
        for s in raw.values():
            d = decode_sample(s)
            samples[d["meta"]["source"]] = d

    wrong = []
    for source, (kind, expected) in sorted(hostile.items()):
        if expected == INGESTED:
            if source not in samples:
                why = rejected.get(source, {}).get("reason", "missing")
                wrong.append(f"{modality} {kind} {source!r}: not ingested ({why})")
            elif problem := _check_sample(modality, samples[source], check_args):
                wrong.append(f"{modality} {kind} {source!r}: {problem}")
            else:
                fault_figures.hostile_ingested += 1
        else:
            row = rejected.get(source)
            if row is None:
                where = "ingested" if source in samples else "neither ingested nor rejected"
                wrong.append(f"{modality} {kind} {source!r}: {where}, expected {expected}")
            elif row["reason"] not in expected or not row.get("detail"):
                wrong.append(f"{modality} {kind} {source!r}: {row['reason']!r}, not {expected}")
            else:
                fault_figures.hostile_rejected += 1
    fault_figures.hostile_wrong += wrong
    ok_valid = [v for v in valid if v in samples]
    ok_valid = [v for v in ok_valid if not _check_sample(modality, samples[v], check_args)]
    fault_figures.valid_ingested += len(ok_valid)

    assert not wrong, "\n".join(wrong)
    assert sorted(ok_valid) == sorted(valid)
    # Nothing else was ingested or rejected: every input is accounted for exactly once.
    assert set(samples) | set(rejected) == set(valid) | set(hostile)
    assert not set(samples) & set(rejected)
    assert len(tar_keys(out)) == len(samples)
    assert check_visible_shards(out) == [] and partial_files(out) == []
    # Nothing from outside SRC got in (by content hash); the inputs were only read.
    from featx.fsutil import sha256_file

    secrets = {sha256_file(p) for p in outside.iterdir() if p.is_file()}
    assert not secrets & {s["meta"]["sha256"] for s in samples.values()}
    assert file_stats(src) == before


# ---------------------------------------------------------------------------------------------
# SIGKILL of ingest at seeded random moments


def _bmp_images(src: Path, n: int) -> None:
    """n 256x192 noise images (BMP: quick to write, a few ms each to normalise), distinct
    also once normalised to a few pixels (dedup compares the normalised payload): each has
    its index in a central block of a few output pixels at 32 px."""
    base = np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8)
    for i in range(n):
        a = np.roll(base, i, axis=1)
        a[84:108, 112:144, 0], a[84:108, 112:144, 1] = i % 256, i // 256
        path = src / f"c{i % 3}" / f"{i:04d}.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)


def _ingest_here(src: Path, out: Path, args: list[str]) -> None:
    """`featx ingest SRC OUT ARGS` in this process: the same code and options as the CLI,
    without paying a fresh interpreter's imports for a run that is not under test."""
    from typer.testing import CliRunner

    from featx.cli import app

    r = CliRunner().invoke(app, ["ingest", str(src), str(out), *args])
    assert r.exit_code == 0, r.output


def test_ingest_sigkill_at_seeded_moments_resumes_byte_identical(tmp_path, fault_figures):
    """SIGKILL `featx ingest` at 5+ seeded moments while it writes shards (each run resumes the
    last); a final run gives the uninterrupted run's shards byte for byte, every sample once,
    and no killed run leaves a process behind."""
    src, ref, out = tmp_path / "src", tmp_path / "ref", tmp_path / "out"
    _bmp_images(src, 600)
    (src / "c0" / "zz_broken.bmp").write_bytes(b"BM" + bytes(100))  # rejected on every run
    shutil.copy(src / "c1" / "0001.bmp", src / "c2" / "zz_dup.bmp")  # a duplicate
    args = ["--shard-samples", "16", "--workers", "1", "--image-format", "png"]
    args += ["--image-size", "64", "--val-fraction", "0.2"]
    _ingest_here(src, ref, args)  # the uninterrupted reference run

    rng = random.Random(SEED)
    kills, runs = 0, 0
    log = tmp_path / "ingest.log"
    while kills < 5:
        runs += 1
        assert runs <= 12, f"only {kills} effective kills in {runs - 1} runs"
        shards_before = set(in_splits(out, "shard-*.tar"))
        proc = start_featx("ingest", src, out, *args, log=log)

        def progressed(before=shards_before, p=proc):
            # this run's own temporary (a killed run's stay until the next run removes them)
            tmp = list(in_splits(out, f".shard-*.tmp{p.pid}"))
            return tmp or set(in_splits(out, "shard-*.tar")) - before or p.poll() is not None

        wait_for(progressed, 60, "ingest to start writing", log=log, every=0.005)
        time.sleep(rng.uniform(0.0, 0.2))  # the seeded random moment, once writing has begun
        # its decoding processes and their forkserver end with it, not idle for good
        if kill_and_reap(proc, children_end=True):
            kills += 1
        elif proc.returncode == 0:
            break  # finished before the moment came: nothing left to kill
        else:
            pytest.fail(f"ingest exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        # Whatever the moment, every shard one can see is whole and matches its stats.
        assert check_visible_shards(out) == []
    fault_figures.fault("SIGKILL ingest", kills)
    assert kills >= 5, f"only {kills} kills landed while ingest was writing"

    r = run_featx("ingest", src, out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    fault_figures.exactly_once(tar_keys(ref), tar_keys(out))
    assert shard_bytes(out) == shard_bytes(ref)
    card, ref_card = (json.loads((p / "dataset.json").read_text()) for p in (out, ref))
    for k in ("shards", "counts", "fingerprint", "rejected", "classes"):
        assert card[k] == ref_card[k], k
    assert (out / "rejected.jsonl").read_text() == (ref / "rejected.jsonl").read_text()
    assert partial_files(out) == []


# ---------------------------------------------------------------------------------------------
# ingest's decoding processes: one killed mid-run, one input that crashes the decoder


def _ingest_workers(proc: subprocess.Popen) -> list[int]:
    """Pids of a running `featx ingest`'s pool processes (the forkserver's children)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for p in kids:
        with contextlib.suppress(psutil.NoSuchProcess):  # one that exits while we look
            if p.ppid() != proc.pid:
                pids.append(p.pid)
    return pids


def test_ingest_worker_killed_mid_run_loses_nothing(tmp_path, fault_figures):
    """SIGKILL one of ingest's decoding processes (as the kernel's OOM killer would) at a
    seeded moment: the run goes on, says so, and writes the uninterrupted run's shards."""
    src, ref = tmp_path / "src", tmp_path / "ref"
    _bmp_images(src, 900)
    args = ["--shard-samples", "16", "--workers", "2", "--image-format", "png"]
    args += ["--image-size", "64", "--val-fraction", "0.2"]
    _ingest_here(src, ref, args)
    rng = random.Random(SEED + 1)
    kills = 0
    for attempt in range(3):
        out, log = tmp_path / f"out{attempt}", tmp_path / f"ingest{attempt}.log"
        proc = start_featx("ingest", src, out, *args, log=log)
        try:
            wait_for(lambda o=out: list(in_splits(o, ".shard-*.tmp*")), 60, "a shard", proc, log)
            time.sleep(rng.uniform(0.0, 0.1))
            workers = _ingest_workers(proc)
            assert workers, f"no pool processes under featx ingest\n{log.read_text()}"
            hit = sigkill(rng.choice(workers)) and proc.poll() is None
            assert proc.wait(120) == 0, log.read_text()[-3000:]
        finally:
            kill_and_reap(proc)
        if not hit:
            continue
        kills += 1
        assert "worker process died" in log.read_text()
        fault_figures.exactly_once(tar_keys(ref), tar_keys(out))
        assert shard_bytes(out) == shard_bytes(ref)
        assert (out / "rejected.jsonl").read_text() == (ref / "rejected.jsonl").read_text()
        assert partial_files(out) == []
    fault_figures.fault("SIGKILL ingest worker", kills)
    assert kills >= 2, f"only {kills} of 3 kills hit a running ingest"


# Loaded by every Python process of the run under test (PYTHONPATH): Pillow's `open` takes
# down the pool process that calls it with SIGSEGV when the input carries the marker (or any
# input, with CRASH_ALL), as a memory bug in a decoder library would. The featx process itself
# is spared: its sniffing of inputs is not under test.
_CRASHING_PILLOW = """
import io, multiprocessing, os, resource, signal
import PIL.Image

_open = PIL.Image.open

def open(fp, *args, **kwargs):
    if multiprocessing.parent_process() is not None and isinstance(fp, io.BytesIO):
        if os.environ.get("CRASH_ALL") or b"FEATX-TEST-CRASH" in fp.getvalue():
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.kill(os.getpid(), signal.SIGSEGV)
    return _open(fp, *args, **kwargs)

PIL.Image.open = open
"""


@pytest.fixture
def crashing_pillow(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASHING_PILLOW)
    return lambda **extra: featx_env(PYTHONPATH=str(hook), **extra)


def test_input_that_crashes_the_decoder_is_rejected_and_the_rest_ingested(
    tmp_path, crashing_pillow, fault_figures
):
    src, ref, out = tmp_path / "src", tmp_path / "ref", tmp_path / "out"
    _bmp_images(src, 300)
    args = ["--shard-samples", "16", "--workers", "2", "--image-format", "png"]
    args += ["--image-size", "32", "--modality", "image"]
    _ingest_here(src, ref, args)  # the same inputs, without the poisonous one
    poison = src / "c1" / "0100x.bmp"
    poison.write_bytes((src / "c1" / "0100.bmp").read_bytes() + b"FEATX-TEST-CRASH")

    r = run_featx("ingest", src, out, *args, env=crashing_pillow())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "c1/0100x.bmp killed its worker process twice" in r.stderr
    rejects = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(x["source"], x["reason"]) for x in rejects] == [("c1/0100x.bmp", N.CRASHED)]
    fault_figures.exactly_once(tar_keys(ref), tar_keys(out))
    assert shard_bytes(out) == shard_bytes(ref)
    fault_figures.fault("input crashing the decoder")

    # A crash is not cached: the next run tries that input again (it may have been memory).
    r = run_featx("ingest", src, out, *args, env=crashing_pillow())
    assert r.returncode == 0 and "killed its worker process twice" in r.stderr, r.stderr
    assert "up to date" in r.stderr


def test_decoders_crashing_on_every_input_stop_with_a_clear_error(tmp_path, crashing_pillow):
    src, out = tmp_path / "src", tmp_path / "out"
    _bmp_images(src, 200)
    args = ["--workers", "2", "--image-size", "32", "--modality", "image"]
    r = run_featx("ingest", src, out, *args, env=crashing_pillow(CRASH_ALL="1"))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    error = one_line_error(r.stderr)
    assert error and "die on every input" in error, r.stderr[-3000:]
    assert not list(in_splits(out, "shard-*.tar")) and partial_files(out) == []


# ---------------------------------------------------------------------------------------------
# disk trouble: a write that fails ends with a clear error and no half-written output


def _small_images(src: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        make_image(src / ("a" if i % 2 else "b") / f"{i:03d}.png", seed=i, size=(48, 40))


def test_read_only_output_fails_with_a_clear_error_and_changes_nothing(tmp_path, fault_figures):
    """Ingest into a read-only folder, ingest of new inputs into a dataset whose folders turned
    read-only, and extract into a read-only folder: each stops with one `error:` line naming
    the folder, exit code 1, no traceback, and not a byte written or changed."""
    prefix = no_dac_prefix()  # as root, chmod binds only without CAP_DAC_OVERRIDE
    src, ro, out = tmp_path / "src", tmp_path / "ro", tmp_path / "out"
    _small_images(src, 12)
    args = ["--image-size", "16", "--workers", "1", "--shard-samples", "4"]
    ro.mkdir()
    ro.chmod(0o555)
    _ingest_here(src, out, args)
    _small_images(src, 6, start=12)  # new inputs: the next run must write new shards
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    before = snapshot(out)
    for p in folders:
        p.chmod(0o555)
    from featx.checkpoint import save_model_dir
    from featx.models import create_model

    model_dir = tmp_path / "model"
    card = json.loads((out / "dataset.json").read_text())
    save_model_dir(model_dir, create_model("cnn", "image", 2), card, out, metrics={})
    try:
        runs = {
            "ingest into a read-only folder": (("ingest", src, ro, *args), ro),
            "ingest into a read-only dataset": (("ingest", src, out, *args), out),
            "extract into a read-only folder": (
                ("extract", out, "--checkpoint", model_dir, "--out", ro),
                ro,
            ),
        }
        for what, (cmd, folder) in runs.items():
            r = run_featx(*cmd, prefix=prefix)
            fault_figures.fault("read-only output")
            if crashed(r.stderr, r.returncode):
                fault_figures.crashes += 1
            line = one_line_error(r.stderr)
            assert r.returncode == 1 and line, f"{what}: exit {r.returncode}\n{r.stderr[-3000:]}"
            assert str(folder) in line and ("ermission denied" in line or "ead-only" in line)
            assert ".tmp" not in line, f"{what}: names a hidden temporary: {line}"
        assert list(ro.iterdir()) == []
        assert snapshot(out) == before  # finished shards, card and rejects untouched
    finally:
        for p in [ro, *folders]:
            p.chmod(0o755)
    fault_figures.exactly_once(stats_keys(out), tar_keys(out))


def _namespace_prefix() -> list[str]:
    """A private mount namespace (tmpfs mounts vanish with it), or skip if none is allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed: cannot mount a small tmpfs")
    prefix = ["unshare", "-m", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix = ["unshare", "-r", "-m", "--propagation", "private"]
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=64k featx-probe /mnt"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"this machine does not allow a tmpfs mount: {probe.stderr.strip()}")
    return prefix


def test_full_disk_fails_with_a_clear_error_then_resumes_identically(tmp_path, fault_figures):
    """Ingest onto a 96 KiB tmpfs runs out of space mid-run: exit code 1, one `error:` line, no
    traceback, every visible shard whole, no temporaries; with space freed the same command
    resumes and gives the shards of an uninterrupted run, byte for byte."""
    import shlex

    prefix = _namespace_prefix()
    src, ref, out, keep = (tmp_path / n for n in ("src", "ref", "out", "keep"))
    _small_images(src, 40)
    args = ["--image-size", "32", "--image-format", "png", "--workers", "1", "--shard-samples", "4"]
    _ingest_here(src, ref, args)
    out.mkdir()
    keep.mkdir()
    ingest = shlex.join(str(a) for a in (*FEATX, "ingest", src, out, *args))
    o, k = shlex.quote(str(out)), shlex.quote(str(keep))
    # In a private mount namespace: fill a small tmpfs, keep a copy of what is visible, give it
    # room, run the same command again, keep a copy; the mount disappears with the namespace.
    script = f"""
        mount -t tmpfs -o size=96k featx-full {o} || exit 90
        {ingest} > {k}/full.out 2> {k}/full.err; echo $? > {k}/full.rc
        cp -a {o} {k}/after_full
        mount -o remount,size=64m {o} || exit 91
        {ingest} > {k}/resume.out 2> {k}/resume.err; echo $? > {k}/resume.rc
        cp -a {o} {k}/after_resume
    """
    r = subprocess.run(
        [*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=300, env=featx_env()
    )
    assert r.returncode == 0, r.stderr
    fault_figures.fault("full disk")
    full_rc = int((keep / "full.rc").read_text())
    full_err = (keep / "full.err").read_text()
    if crashed(full_err, full_rc):
        fault_figures.crashes += 1
    line = one_line_error(full_err)
    assert full_rc == 1 and line, f"exit {full_rc}\n{full_err[-3000:]}"
    assert "No space left on device" in line and str(out) in line
    after_full = keep / "after_full"
    assert 0 < len(shard_bytes(after_full)) < len(shard_bytes(ref)), "the disk filled mid-run"
    assert check_visible_shards(after_full) == []
    assert partial_files(after_full) == []
    assert not (after_full / "dataset.json").exists()  # the card is written last

    assert (keep / "resume.rc").read_text().strip() == "0", (keep / "resume.err").read_text()
    resumed = keep / "after_resume"
    fault_figures.exactly_once(tar_keys(ref), tar_keys(resumed))
    assert shard_bytes(resumed) == shard_bytes(ref)
    assert partial_files(resumed) == []


# ---------------------------------------------------------------------------------------------
# Ray: SIGKILL of extract, a killed extraction actor, a Ray Train worker killed twice


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-class image dataset of 30 small shards and a random-init checkpoint for it."""
    import torch

    from featx.checkpoint import save_model_dir
    from featx.config import IngestConfig
    from featx.ingest import ingest
    from featx.models import create_model

    root = tmp_path_factory.mktemp("faults-extract")
    for i in range(240):
        make_image(root / "src" / f"c{i % 3}" / f"{i:03d}.png", seed=i, size=(32, 32))
    cfg = IngestConfig.parse(
        src=root / "src", out=root / "ds", shard_samples=8, image_size=32, workers=1
    )
    ingest(cfg)
    torch.manual_seed(0)
    card = json.loads((root / "ds" / "dataset.json").read_text())
    model_dir = root / "model"
    save_model_dir(model_dir, create_model("cnn", "image", 3), card, root / "ds", metrics={})
    return root / "ds", model_dir


def _features(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    from featx.features import read_features

    X, df = read_features(out)
    keys = list(df["key"])
    return keys, dict(zip(keys, X, strict=True))


def _expect_same_features(reference: Path, out: Path, dataset: Path, fault_figures) -> None:
    """Exactly once: the reference's keys, each once, with equal embeddings; parts whole."""
    ref_keys, ref = _features(reference)
    keys, got = _features(out)
    report = fault_figures.exactly_once(ref_keys, keys)
    assert report == {"lost": [], "duplicated": {}, "unexpected": []}, report
    for k in ref_keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert check_visible_parts(out, dataset) == []
    assert partial_files(out) == []


@pytest.fixture(scope="module")
def reference_features(ray_cluster, image_dataset, tmp_path_factory) -> Path:
    """Features of an uninterrupted extraction (in this process, on the module's Ray)."""
    from featx.extract import ExtractConfig, extract

    dataset, model_dir = image_dataset
    out = tmp_path_factory.mktemp("faults-reference") / "features"
    extract(ExtractConfig.parse(dataset=dataset, checkpoint=model_dir, out=out, batch_size=4))
    return out


def test_extract_sigkill_at_seeded_moments_resumes_exactly_once(
    ray_cluster, image_dataset, reference_features, tmp_path, fault_figures
):
    """SIGKILL `featx extract` at 5+ seeded moments while it writes parts (each run resumes
    the last); after a final run every sample is there once, embeddings equal the reference."""
    dataset, model_dir = image_dataset
    ref, out, log = reference_features, tmp_path / "out", tmp_path / "extract.log"
    cmd = ("extract", dataset, "--checkpoint", model_dir, "--out", out, "--batch-size", "4")
    cmd += ("--ray-address", ray_cluster)
    rng = random.Random(SEED + 1)
    building = out / "versions" / "000001"  # every run builds the first version
    kills, runs = 0, 0
    while kills < 5:
        runs += 1
        assert runs <= 14, f"only {kills} effective kills in {runs - 1} runs"
        parts_before = set(in_splits(building, "part-*.parquet"))
        proc = start_featx(*cmd, log=log)
        try:
            wait_for(
                lambda p=proc, before=parts_before: (
                    set(in_splits(building, "part-*.parquet")) - before or p.poll() == 0
                ),
                120,
                "a new part",
                proc=proc,
                log=log,
            )
            time.sleep(rng.uniform(0.0, 0.15))
            hit = proc.poll() is None
            proc.kill()
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert check_visible_parts(out, dataset) == []
        if hit and rc == -9:
            kills += 1
        elif rc == 0:  # finished before enough kills landed (a fast machine): start afresh
            _expect_same_features(ref, out, dataset, fault_figures)
            shutil.rmtree(out)
    fault_figures.fault("SIGKILL extract", kills)
    assert kills >= 5, f"only {kills} kills landed while extract was writing"
    r = run_featx(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    _expect_same_features(ref, out, dataset, fault_figures)


def test_extract_actor_killed_mid_run_is_retried_exactly_once(
    ray_cluster, image_dataset, reference_features, tmp_path, fault_figures
):
    """SIGKILL the Ray Data actor that embeds (`ShardEmbedder`) once parts are being written: Ray
    restarts it and retries its tasks, featx finishes, and the output is exactly once. One
    actor (`--workers 1`), so the run can only finish if the killed actor comes back."""
    dataset, model_dir = image_dataset
    out, log = tmp_path / "out", tmp_path / "extract.log"
    n_parts = len(list(in_splits(dataset, "shard-*.tar")))
    cmd = ("extract", dataset, "--checkpoint", model_dir, "--out", out, "--batch-size", "4")
    cmd += ("--workers", "1")
    earlier = set(own_processes("ShardEmbedder"))  # a previous test's actor may still be exiting
    proc = start_featx(*cmd, "--ray-address", ray_cluster, log=log)
    try:
        building = out / "versions" / "000001"
        wait_for(lambda: in_splits(building, "part-*.parquet"), 120, "a first part", proc, log)
        actors = set(own_processes("ShardEmbedder")) - earlier
        assert len(actors) == 1, actors
        victim = next(iter(actors))
        parts_at_kill = len(in_splits(building, "part-*.parquet"))
        assert sigkill(victim) and parts_at_kill < n_parts, "the kill came after the work"
        fault_figures.fault("Ray Data actor killed")
        # Ray restarts the actor (a new process) and retries the tasks it had in flight.
        restarted = wait_for(
            lambda: (
                set(own_processes("ShardEmbedder")) - earlier - {victim} or proc.poll() is not None
            ),
            120,
            "a restarted actor",
        )
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert rc == 0, log.read_text()[-4000:]
    assert restarted is not True, "featx finished without restarting the actor"
    _expect_same_features(reference_features, out, dataset, fault_figures)


def _registered_epoch(run: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (0: none yet)."""
    snap = run / "ray" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not there yet, or being rewritten right now
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def _rank0_pids(log: Path) -> list[int]:
    """Pids of the workers that logged epochs as rank 0, in order (one per worker group)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # Ray's colours
    pids = re.findall(r"RayTrainWorker pid=(\d+)\)\s+epoch \d+/", text)
    return list(dict.fromkeys(int(p) for p in pids))


def test_train_worker_killed_twice_is_survived(ray_cluster, tmp_path, fault_figures):
    """SIGKILL a Ray Train worker after a registered checkpoint (rank 1), then the restarted
    group's rank 0 after its next one: with --max-failures 3 the run resumes both times from
    its checkpoint and finishes at the requested epoch, every epoch covering the train split
    exactly once."""
    from featx.config import IngestConfig
    from featx.ingest import ingest
    from featx.pipeline import REPO_DATA

    ds, run, log = tmp_path / "ds", tmp_path / "run", tmp_path / "train.log"
    cfg = IngestConfig.parse(
        src=REPO_DATA / "images", out=ds, shard_samples=64, image_size=32, workers=1
    )
    ingest(cfg)
    epochs = 6
    opts = ("--workers", "2", "--epochs", epochs, "--batch-size", "8", "--max-failures", "3")
    opts += ("--patience", "0")  # every epoch runs: the kills land at known ones
    proc = start_featx(
        "train", ds, "--out", run, *opts, "--log-keys", "--ray-address", ray_cluster, log=log
    )
    victims: list[tuple[int, int]] = []  # (pid, epoch of the checkpoint it was killed after)
    try:
        # 1) rank 1 of the first worker group, once a checkpoint is registered
        epoch = wait_for(lambda: _registered_epoch(run), 300, "a registered checkpoint", proc, log)
        rank0 = wait_for(lambda: _rank0_pids(log), 60, "rank 0 to log its epoch", proc, log)
        first_group = own_processes("RayTrainWorker")
        others = sorted(set(first_group) - set(rank0))
        assert len(first_group) == 2 and others, (first_group, rank0)
        assert sigkill(others[0])
        victims.append((others[0], epoch))

        # 2) rank 0 of the restarted group, once it registered a checkpoint of its own
        def restarted_rank0() -> list[int] | None:
            new = [p for p in _rank0_pids(log) if p not in first_group]
            return new if new and _registered_epoch(run) > epoch else None

        new_rank0 = wait_for(restarted_rank0, 300, "a checkpoint of the new workers", proc, log)
        epoch2 = _registered_epoch(run)
        assert epoch2 < epochs, "the run finished before the second kill"
        assert sigkill(new_rank0[0])
        victims.append((new_rank0[0], epoch2))
        rc = proc.wait(400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text(errors="replace")
    resumed = [int(e) for e in re.findall(r"resuming from the checkpoint of epoch (\d+)", text)]
    fault_figures.fault("Ray Train worker killed", min(len(victims), len(resumed)))
    assert rc == 0, text[-4000:]
    assert len(resumed) >= 2, f"{victims} killed, resumed from {resumed}"
    assert resumed[0] >= victims[0][1] and resumed[1] >= victims[1][1]
    latest = max(
        run.glob("ray/checkpoint_*/featx.json"), key=lambda p: json.loads(p.read_text())["epoch"]
    )
    history = json.loads(latest.read_text())["metrics"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    import pandas as pd

    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == list(range(1, epochs + 1))
    # Every epoch, the train split exactly once across the ranks (the killed epochs redone).
    train = stats_keys(ds, "train")
    for epoch in range(1, epochs + 1):
        seen = []
        for rank in (0, 1):
            seen += (run / "keys" / f"epoch{epoch}-rank{rank}.txt").read_text().split()
        report = fault_figures.exactly_once(train, seen)
        assert report == {"lost": [], "duplicated": {}, "unexpected": []}, (epoch, report)


# ---------------------------------------------------------------------------------------------
# orchestration: the pipeline flow's process killed mid-run, then the flow run retried


def _flow_run_process(served_pid: int) -> int | None:
    """The process `featx serve` started to execute a flow run (one run at a time here)."""
    runs = own_processes("-m prefect.engine", root=served_pid)
    assert len(runs) <= 1, runs
    return next(iter(runs), None)


def test_pipeline_flow_killed_mid_run_then_retried_skips_finished_stages(
    ray_cluster, prefect_server, featx_served, tmp_path, fault_figures
):
    """A run of the served featx-pipeline deployment is SIGKILLed (its flow-run process) at a
    seeded moment after ingest and train completed; Prefect marks it crashed. Retried through
    the API as the UI's Retry does (AwaitingRetry), the same flow run finishes and reuses the
    persisted results of ingest and train: their task bodies ran once and not one of their
    files was rewritten; every ingested sample has exactly one feature row."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry
    from prefect_fixtures import TINY, colour_images, use_api

    from featx.features import read_features

    src, work = colour_images(tmp_path / "src"), tmp_path / "work"
    served = featx_served.proc
    # The module's Ray wants its token mode (ray.init put RAY_AUTH_MODE in this environment);
    # a `featx serve` started before it lacks that, and then the flow starts a Ray of its own.
    joins = psutil.Process(served.pid).environ().get("RAY_AUTH_MODE") == os.environ.get(
        "RAY_AUTH_MODE"
    )
    config = {"src": str(src), "workdir": str(work), **TINY, "epochs": 1, "workers": 1}
    config["ray_address"] = ray_cluster if joins else None
    with use_api(prefect_server.api_url), get_client(sync_client=True) as client:
        run = run_deployment(
            name="featx-pipeline/featx-pipeline",
            parameters={"config": config},
            flow_run_name="featx-faults-killed-then-retried",
            timeout=0,
            as_subflow=False,
        )

        def tasks() -> dict[str, object]:
            found = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
            return {t.name.rsplit("-", 1)[0]: t for t in found}

        def done(task) -> bool:
            return bool(task and task.state and task.state.is_completed())

        def extract_started() -> bool:
            t = tasks()
            return done(t.get("ingest")) and done(t.get("train")) and "extract" in t

        wait_for(extract_started, 300, "ingest and train done", served, featx_served.log, 0.2)
        time.sleep(random.Random(SEED + 2).uniform(0.0, 2.0))
        victim = _flow_run_process(served.pid)
        later = tasks()  # extract may be done already: what comes after it is not
        assert victim and not all(
            done(later.get(s)) for s in ("extract", "use features", "probe")
        ), "the kill must land mid-run"
        finished = {  # what ingest and train wrote: shards, card, checkpoints, metrics
            p: p.stat().st_mtime_ns
            for p in work.rglob("*")
            if p.is_file() and p.relative_to(work).parts[0] in ("shards", "run")
        }
        assert kill_and_reap(victim)
        fault_figures.fault("Prefect flow process killed")
        crashed_run = wait_for(
            lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 120, "a crash"
        )
        assert crashed_run.state.is_crashed(), crashed_run.state

        # The UI's "Retry": the same flow run goes back to the runner, which runs it again.
        response = client.set_flow_run_state(run.id, AwaitingRetry(message="retry after a kill"))
        assert response.status.value == "ACCEPT", response
        done = wait_for(
            lambda: (r := client.read_flow_run(run.id)).state.is_final() and r,
            400,
            "the retried flow run",
            served,
            featx_served.log,
            every=1.0,
        )
        assert done.state.is_completed(), f"{done.state}\n{featx_served.log.read_text()[-4000:]}"
        assert done.run_count >= 2
        progress = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    bars = [(a.description or "").split(" ")[0] for a in progress if a.type == "progress"]
    assert bars.count("ingest") == bars.count("train") == 1, f"a finished stage ran again: {bars}"
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not one file rewritten
    report = (work / "report.md").read_text()
    assert "(64 new)" in report, report  # the retry reports ingest's first (and only) result
    _, df = read_features(work / "features")
    report = fault_figures.exactly_once(stats_keys(work / "shards"), list(df["key"]))
    assert report == {"lost": [], "duplicated": {}, "unexpected": []}, report
