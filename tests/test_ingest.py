"""Ingest: decode/normalise per modality, splits, dedup, rejects, resume and read-back."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_audio, make_image, make_text, png_bomb
from faults_support import in_splits
from PIL import Image

from featx import normalize as N
from featx.config import ConfigError, IngestConfig
from featx.dataset import decode_sample, load_card, sample_key, split_of
from featx.dataset import reasons as R
from featx.ingest import ingest

FEATX = [sys.executable, "-m", "featx.cli"]


def run(src, out, **kw):
    return ingest(IngestConfig.parse(src=src, out=out, **kw))


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar in sorted(in_splits(out, "shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                assert m.name not in members, f"{m.name} appears twice"
                members[m.name] = t.extractfile(m).read()
    return members


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(in_splits(out, "shard-*.tar"))}


def rejected(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return {r["source"]: r for r in rows}


# ---------------------------------------------------------------------------------------------
# per-modality normalisation


@pytest.mark.parametrize(
    "mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "PA-transparent"]
)
def test_any_image_mode_becomes_rgb_of_the_requested_size(tmp_path, mode):
    path = tmp_path / "x.png"
    if mode == "I;16":
        ramp = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)
        Image.fromarray(ramp).save(path)
    elif mode == "CMYK":
        path = make_image(tmp_path / "x.tif", 1, mode="CMYK")
    elif mode == "PA-transparent":
        im = Image.new("P", (40, 30), 3)
        im.putpalette(list(range(256)) * 3)
        im.save(path, transparency=3)
    else:
        make_image(path, 1, mode=mode)
    res = N.process(str(path), None, "image", N.Params.of(image_size=16, image_format="png"))
    assert isinstance(res, N.Normalised), res
    out = Image.open(io.BytesIO(res.payload))
    assert (out.mode, out.size) == ("RGB", (16, 16))
    if mode == "I;16":  # 16-bit range is scaled, not clipped to white
        arr = np.asarray(out)
        assert arr.min() < 20 and arr.max() > 200 and len(np.unique(arr)) > 50
    if mode == "PA-transparent":  # fully transparent composites onto white
        assert np.asarray(out).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "x.jpg", exif=exif, quality=95)
    params = N.Params.of(image_size=20, image_resize="stretch", image_format="png")
    res = N.process(str(tmp_path / "x.jpg"), None, "image", params)
    arr = np.asarray(Image.open(io.BytesIO(res.payload))).astype(int)
    top, bottom = arr[:5].mean(axis=(0, 1)), arr[-5:].mean(axis=(0, 1))
    assert top[2] > 200 and bottom[0] > 200  # blue ended up on top after the rotation


def test_resize_modes_keep_aspect_or_stretch(tmp_path):
    im = Image.new("RGB", (80, 20), (0, 255, 0))
    im.save(tmp_path / "wide.png")
    res = {
        m: np.asarray(
            Image.open(
                io.BytesIO(
                    N.process(
                        str(tmp_path / "wide.png"),
                        None,
                        "image",
                        N.Params.of(image_size=20, image_resize=m, image_format="png"),
                    ).payload
                )
            )
        )
        for m in ("crop", "pad", "stretch")
    }
    assert (res["crop"][..., 1] > 250).all() and (res["stretch"][..., 1] > 250).all()
    assert (res["pad"][0] < 5).all()  # letterbox bars are black


def test_gif_first_frame_and_webp_bmp_tiff(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    for fmt in ("webp", "bmp", "tiff"):
        make_image(tmp_path / f"a.{fmt}", 3)
    for name in ("a.gif", "a.webp", "a.bmp", "a.tiff"):
        res = N.process(str(tmp_path / name), None, "image", N.Params.of(image_format="png"))
        assert isinstance(res, N.Normalised), (name, res)
    gif = np.asarray(
        Image.open(
            io.BytesIO(
                N.process(
                    str(tmp_path / "a.gif"), None, "image", N.Params.of(image_format="png")
                ).payload
            )
        )
    )
    assert gif[..., 0].mean() > 200 and gif[..., 1].mean() < 50  # the first (red) frame


def test_audio_is_mono_resampled_and_capped(tmp_path):
    import soundfile as sf

    src = make_audio(tmp_path / "a.wav", 1, seconds=3.0, sr=44100, channels=2)
    res = N.process(str(src), None, "audio", N.Params.of(sample_rate=16000, max_seconds=2.0))
    x, sr = sf.read(io.BytesIO(res.payload))
    assert sr == 16000 and x.ndim == 1 and len(x) == 32000
    assert res.original == {"sample_rate": 44100, "channels": 2, "seconds": 3.0, "format": "WAV"}
    # the 250 Hz tone survives resampling: its spectral peak is where it was
    peak = np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x)
    assert abs(peak - 250) < 5


def test_resampler_is_anti_aliased(tmp_path):
    import soundfile as sf

    sr = 48000
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 11000 * t)  # above the 8 kHz Nyquist of the target
    sf.write(tmp_path / "hi.wav", tone.astype(np.float32), sr)
    res = N.process(str(tmp_path / "hi.wav"), None, "audio", N.Params.of(sample_rate=16000))
    x, _ = sf.read(io.BytesIO(res.payload))
    # naive decimation would fold 11 kHz to a loud 5 kHz alias; a proper resampler removes it
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) < 0.01


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_audio_formats_decode(tmp_path, fmt):
    path = make_audio(tmp_path / f"a.{fmt.lower()}", 2, seconds=0.5, sr=16000, fmt=fmt)
    res = N.process(str(path), None, "audio", N.Params.of())
    assert isinstance(res, N.Normalised) and res.original["format"] == fmt


def test_text_normalised_bom_stripped_and_capped(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbf  Hello \t\n  world \r\n" + "caf\u0065\u0301".encode())
    res = N.process(str(p), None, "text", N.Params.of(max_chars=100))
    assert res.payload.decode() == "Hello world caf\u00e9"  # NFC-composed, one space each
    res = N.process(str(p), None, "text", N.Params.of(max_chars=5))
    assert res.payload.decode() == "Hello" and res.original["truncated"]


def test_latin1_text_rejected_unless_encoding_given(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("café crème".encode("latin-1"))
    res = N.process(str(p), None, "text", N.Params.of())
    assert res.reason == N.NOT_UTF8 and "--encoding" in res.detail
    res = N.process(str(p), None, "text", N.Params.of(encoding="latin-1"))
    assert res.payload.decode() == "café crème"


# ---------------------------------------------------------------------------------------------
# datasets: layout, splits, dedup, card


def test_class_folders_become_shards_with_card(image_tree, tmp_path):
    out = tmp_path / "out"
    s = run(image_tree, out, shard_samples=5, val_fraction=0.25)
    card = load_card(out)
    assert s.ingested == s.total == 24 and not s.rejected
    assert card["modality"] == "image" and card["classes"] == {"cats": 0, "dogs": 1}
    total = sum(c["total"] for c in card["counts"].values())
    assert total == 24 and card["counts"]["val"]["total"] > 0
    assert all(sh["samples"] <= 5 for sh in card["shards"])
    for sh in card["shards"]:
        tar = out / sh["shard"]
        assert tar.exists()
        import hashlib

        assert hashlib.sha256(tar.read_bytes()).hexdigest() == sh["sha256"]
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        assert stats["samples"] == sh["samples"] == len(stats["entries"])
        assert "errors" in stats and "seconds" in stats
    # members of one sample are adjacent, keys carry no dots or slashes, labels match folders
    names = []
    for tar in sorted(in_splits(out, "shard-*.tar")):
        with tarfile.open(tar) as t:
            names += t.getnames()
    keys = [n.split(".", 1)[0] for n in names]
    for i in range(0, len(keys), 3):
        assert keys[i] == keys[i + 1] == keys[i + 2]
        assert "/" not in keys[i]
    members = tar_members(out)
    for name, data in members.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            key = name[: -len(".json")]
            cls = int(members[key + ".cls"])
            assert card["class_names"][cls] == meta["label"] == meta["source"].split("/")[0]
            assert split_of(key, 0.25, 0.0) == meta["split"]


def test_split_is_deterministic_and_near_the_fraction():
    keys = [sample_key(f"{i:064x}", f"a/{i}.png") for i in range(4000)]
    splits = [split_of(k, 0.2, 0.1) for k in keys]
    assert splits == [split_of(k, 0.2, 0.1) for k in keys]
    assert abs(splits.count("val") / 4000 - 0.2) < 0.03
    assert abs(splits.count("test") / 4000 - 0.1) < 0.03
    # fixed expectations: the split must not depend on the machine or Python's hash seed
    code = (
        "from featx.dataset import split_of;print([split_of(f'k{i}', .3, .2) for i in range(50)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert other.stdout.strip() == str([split_of(f"k{i}", 0.3, 0.2) for i in range(50)])


def test_manifest_split_wins_and_inline_text(tmp_path):
    docs = tmp_path / "docs"
    for i in range(6):
        make_text(docs / f"d{i}.txt", i)
    rows = [
        {"path": f"docs/d{i}.txt", "label": "a" if i < 3 else "b", "split": "test"}
        for i in range(6)
    ]
    rows += [{"text": f"inline document number {i}", "label": "b"} for i in range(4)]
    rows += [{"path": "../outside.txt", "label": "a"}, {"path": "/etc/passwd", "label": "a"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad json\n")
    (tmp_path / "outside.txt").write_text("never read")
    out = tmp_path / "out"
    s = run(tmp_path / "m.jsonl", out, val_fraction=0.0)
    assert s.modality == "text" and s.ingested == 10
    card = load_card(out)
    assert card["counts"]["test"]["total"] == 6 and card["counts"]["train"]["total"] == 4
    rej = rejected(out)
    assert rej["../outside.txt"]["reason"] == N.PATH_ESCAPE
    assert rej["/etc/passwd"]["reason"] == N.PATH_ESCAPE
    assert any(r["reason"] == N.BAD_ROW for r in rej.values())
    assert (out / "tokenizer.json").exists()


def test_inline_rows_are_keyed_by_content_not_line(tmp_path):
    """A row inserted at the top of a JSONL manifest is a new sample, and the rows below it
    keep theirs: nothing is skipped, nothing rejected as a duplicate of itself."""
    rows = [{"text": f"inline document number {i} about topic {i % 2}"} for i in range(6)]
    manifest, out = tmp_path / "m.jsonl", tmp_path / "out"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run(manifest, out, val_fraction=0.0, vocab_size=300, workers=1)
    assert s.ingested == 6
    first = {e["source"]: e["key"] for e in _entries(out)}
    top = {"text": "a new document inserted at the top of the manifest"}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [top, *rows, rows[2]]))
    s = run(manifest, out, val_fraction=0.0, vocab_size=300, workers=1)
    assert s.ingested == 1 and s.total == 7
    assert s.rejected == {N.DUPLICATE: 1}  # the repeated row, and only it
    assert rejected(out)["m.jsonl:8"]["detail"].endswith("the same text as line 4")
    after = {e["source"]: e["key"] for e in _entries(out)}
    assert {k: after[k] for k in first} == first  # every old row kept its sample
    texts = {v.decode() for name, v in tar_members(out).items() if name.endswith(".txt")}
    assert top["text"] in texts and all(r["text"] in texts for r in rows)


def _entries(out: Path) -> list[dict]:
    stats = [json.loads(st.read_text()) for st in in_splits(out, "shard-*_stats.json")]
    return [e for st in stats for e in st["entries"]]


def test_csv_manifest(tmp_path):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"{i}.png", i)
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "".join(f"imgs/{i}.png,{'x' if i % 2 else 'y'}\n" for i in range(4))
    )
    s = run(tmp_path / "m.csv", tmp_path / "out")
    assert s.ingested == 4 and load_card(tmp_path / "out")["classes"] == {"x": 0, "y": 1}


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        make_audio(tmp_path / "src" / f"{i}.wav", i)
    s = run(tmp_path / "src", tmp_path / "out")
    assert s.modality == "audio" and s.ingested == 5
    members = tar_members(tmp_path / "out")
    assert not any(n.endswith(".cls") for n in members)
    assert load_card(tmp_path / "out")["classes"] == {}


def test_modality_detected_from_content_not_extension(tmp_path):
    for i in range(6):
        make_image(tmp_path / "src" / "c" / f"{i}.dat", i, fmt="PNG")
    assert run(tmp_path / "src", tmp_path / "out").modality == "image"


def test_duplicates_ingested_once(image_tree, tmp_path):
    dup = image_tree / "dogs" / "copy_of_img001.png"
    dup.write_bytes((image_tree / "cats" / "img001.png").read_bytes())
    out = tmp_path / "out"
    s = run(image_tree, out)
    assert s.total == 24 and s.duplicates == 1
    # the first of the two in path order is kept, whatever order ingest writes in
    rej = rejected(out)["dogs/copy_of_img001.png"]
    assert rej["reason"] == N.DUPLICATE
    first = next(e for e in _entries(out) if e["source"] == "cats/img001.png")
    assert rej["detail"] == f"duplicate of {first['key']}"


# ---------------------------------------------------------------------------------------------
# broken and hostile inputs


def hostile_tree(root: Path, outside: Path) -> dict[str, str]:
    """Valid images plus broken ones; returns source -> expected reject reason."""
    for i in range(8):
        make_image(root / "ok" / f"good{i}.png", 100 + i)
    bad = root / "bad"
    bad.mkdir(parents=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    jpg = make_image(bad / "full.jpg", 7, size=(64, 64))
    (bad / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    jpg.unlink()
    png_bomb(bad / "bomb.png")
    (bad / "latin1.txt").write_bytes("café".encode("latin-1"))
    (bad / "binary.txt").write_bytes(b"\x00\x01\x02binary\xff")
    wav = make_audio(bad / "full.wav", 1, seconds=0.5)
    (bad / "truncated.wav").write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    wav.unlink()
    outside.write_bytes(make_image(root / "tmp.png", 5).read_bytes())
    (root / "tmp.png").unlink()
    os.symlink(outside, bad / "escape.png")
    os.symlink(bad / "loop_b.png", bad / "loop_a.png")
    os.symlink(bad / "loop_a.png", bad / "loop_b.png")
    return {
        "bad/empty.png": N.EMPTY,
        "bad/random.jpg": N.NOT_DECODABLE,
        "bad/truncated.jpg": N.TRUNCATED,
        "bad/bomb.png": N.BOMB,
        "bad/latin1.txt": N.NOT_DECODABLE,  # in an image dataset these are not images
        "bad/binary.txt": N.NOT_DECODABLE,
        "bad/truncated.wav": N.NOT_DECODABLE,
        "bad/escape.png": N.SYMLINK_ESCAPE,
        "bad/loop_a.png": N.BROKEN_SYMLINK,
        "bad/loop_b.png": N.BROKEN_SYMLINK,
    }


def test_hostile_inputs_are_recorded_and_valid_ones_kept(tmp_path):
    outside = tmp_path / "secret.png"
    expected = hostile_tree(tmp_path / "src", outside)
    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    out = tmp_path / "out"
    s = run(tmp_path / "src", out)
    assert s.total == 8
    rej = rejected(out)
    assert {k: v["reason"] for k, v in rej.items()} == expected
    assert all(r["detail"] for r in rej.values())
    assert sum(s.rejected.values()) == len(expected)
    members = tar_members(out)
    assert not any(outside.read_bytes() == v for v in members.values())
    # inputs are never modified
    assert before == {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}


def test_hostile_text_and_audio_reasons(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        make_text(src / "ok" / f"{i}.txt", i)
    (src / "ok" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (src / "ok" / "binary.txt").write_bytes(b"abc\x00def")
    (src / "ok" / "blank.txt").write_text("   \n\t ")
    s = run(src, tmp_path / "t", modality="text")
    rej = rejected(tmp_path / "t")
    assert s.total == 4
    assert rej["ok/latin1.txt"]["reason"] == N.NOT_UTF8
    assert rej["ok/binary.txt"]["reason"] == N.BINARY_TEXT
    assert rej["ok/blank.txt"]["reason"] == N.EMPTY

    src = tmp_path / "asrc"
    for i in range(4):
        make_audio(src / "ok" / f"{i}.wav", i)
    wav = make_audio(src / "ok" / "full.wav", 9, seconds=0.5)
    (src / "ok" / "cut.wav").write_bytes(wav.read_bytes()[:3000])
    wav.unlink()
    make_audio(src / "ok" / "one.wav", 1, seconds=1 / 16000)
    s = run(src, tmp_path / "a", modality="audio")
    rej = rejected(tmp_path / "a")
    assert s.total == 4
    assert rej["ok/cut.wav"]["reason"] == N.TRUNCATED
    assert rej["ok/one.wav"]["reason"] == N.TOO_SHORT


def test_bad_config_stops_before_work(tmp_path, image_tree):
    with pytest.raises(ConfigError) as e:
        IngestConfig.parse(
            src=image_tree, out=tmp_path / "o", val_fraction=0.7, test_fraction=0.5, image_size=2
        )
    assert "image_size" in str(e.value) and "leaves no training data" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(ConfigError, match="inside src"):
        run(image_tree, image_tree / "out")
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run(image_tree, tmp_path / "mine")
    with pytest.raises(ConfigError, match="overwrite"):
        run(image_tree, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# re-runs, increments and kills


def test_rerun_is_a_noop_and_increment_adds_shards(image_tree, tmp_path):
    out = tmp_path / "out"
    run(image_tree, out, shard_samples=4)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    s = run(image_tree, out, shard_samples=4)
    assert s.up_to_date and s.ingested == 0 and s.shards_written == 0
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert before == after
    for i in range(24, 30):
        make_image(image_tree / ("cats" if i % 2 else "dogs") / f"img{i:03d}.png", seed=i)
    s = run(image_tree, out, shard_samples=4)
    assert s.ingested == 6 and s.total == 30 and s.shards_written >= 2
    for p, (_, data) in before.items():
        if p.suffix == ".tar":
            assert p.read_bytes() == data  # finished shards are never rewritten
    assert len(tar_members(out)) == 30 * 3
    # a changed parameter is refused rather than mixing two normalisations
    with pytest.raises(ConfigError, match="image_size"):
        run(image_tree, out, shard_samples=4, image_size=32)
    # a new class gets the next index; the samples already written keep theirs
    classes = load_card(out)["classes"]
    make_image(image_tree / "birds" / "b.png", seed=99)
    s = run(image_tree, out, shard_samples=4)
    assert s.ingested == 1 and load_card(out)["classes"] == {**classes, "birds": len(classes)}


def test_a_run_killed_before_its_card_is_caught_up_by_the_next(tmp_path, monkeypatch):
    """Shards written, then the run dies before its card: the next run must not say "up to
    date" with the old card, which would hide the newest samples from training forever."""
    import featx.ingest

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(12):
        make_text(src / f"c{i % 2}" / f"{i:02d}.txt", seed=i)
    run(src, out, shard_samples=4, vocab_size=300, workers=1)
    first_tokenizer = (out / "tokenizer.json").read_bytes()
    for i in range(12, 20):
        make_text(src / f"c{i % 2}" / f"{i:02d}.txt", seed=i)

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(featx.ingest, "write_card", killed)
        with pytest.raises(KeyboardInterrupt):
            run(src, out, shard_samples=4, vocab_size=300, workers=1)
    s = run(src, out, shard_samples=4, vocab_size=300, workers=1)
    assert not s.up_to_date and s.ingested == 0 and s.total == 20
    card = load_card(out)
    on_disk = {f"{p.parent.name}/{p.name}" for p in in_splits(out, "shard-*.tar")}
    assert {sh["shard"] for sh in card["shards"]} == on_disk
    assert sum(c["total"] for c in card["counts"].values()) == 20
    assert run(src, out, shard_samples=4, vocab_size=300, workers=1).up_to_date
    # The dataset's tokenizer is the first ingest's, never re-fitted under a model; a new
    # model version fits its own on the train shards the card lists now.
    assert (out / "tokenizer.json").read_bytes() == first_tokenizer
    from featx.tokenizer import fit_tokenizer, shard_texts
    from featx.train import _fit_run_tokenizer

    _fit_run_tokenizer(out, card, tmp_path / "run-tokenizer.json")
    train = [out / sh["shard"] for sh in card["shards"] if sh["split"] == "train"]
    fit_tokenizer(shard_texts(train), 300, tmp_path / "expected.json")
    fitted = (tmp_path / "run-tokenizer.json").read_bytes()
    assert fitted == (tmp_path / "expected.json").read_bytes() and fitted != first_tokenizer


def test_an_unreadable_input_is_tried_again_once_it_is_readable(image_tree, tmp_path):
    """`unreadable` is transient: after a chmod (which leaves the mtime alone) the next run
    ingests the file and drops the reject, instead of taking it from the reject cache."""
    from faults_support import no_dac_prefix, run_featx

    out = tmp_path / "out"
    locked = image_tree / "cats" / "img001.png"
    locked.chmod(0)
    r = run_featx("ingest", image_tree, out, "--workers", "1", prefix=no_dac_prefix())
    assert r.returncode == 0, r.stderr[-3000:]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(x["source"], x["reason"]) for x in rejected] == [("cats/img001.png", N.UNREADABLE)]
    assert sum(c["total"] for c in load_card(out)["counts"].values()) == 23
    locked.chmod(0o644)
    r = run_featx("ingest", image_tree, out, "--workers", "1", prefix=no_dac_prefix())
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "rejected.jsonl").read_text() == ""
    card = load_card(out)
    assert sum(c["total"] for c in card["counts"].values()) == 24
    sources = {
        e["source"]
        for st in in_splits(out, "shard-*_stats.json")
        for e in json.loads(st.read_text())["entries"]
    }
    assert "cats/img001.png" in sources and card["rejected"]["total"] == 0


def test_inputs_that_normalise_to_the_same_sample_are_one_sample(tmp_path):
    """Dedup compares the normalised payload, not the input's bytes: the same text with CRLF,
    a BOM or NFD accents, and the same picture as PNG and BMP, are each one sample, so no copy
    can land in train and another in val. Incremental runs dedup against finished shards."""
    import unicodedata

    text = "Un café au lait, deux croissants et la crème brûlée du jour, s'il vous plaît."
    src = tmp_path / "text"
    src.mkdir()
    variants = {
        "a.txt": text.encode(),
        "b.txt": (text + "\r\n").encode(),
        "c.txt": b"\xef\xbb\xbf" + text.encode(),
        "d.txt": unicodedata.normalize("NFD", text).encode(),
    }
    for name, data in variants.items():
        (src / name).write_bytes(data)
    make_text(src / "other.txt", seed=1)
    out = tmp_path / "out-text"
    s = run(src, out, val_fraction=0.5, vocab_size=300, workers=1)
    assert s.total == 2 and s.rejected == {R.DUPLICATE: 3}
    (src / "e.txt").write_bytes(unicodedata.normalize("NFD", text + "\r\n").encode())
    s = run(src, out, val_fraction=0.5, vocab_size=300, workers=1)
    assert s.ingested == 0 and s.total == 2 and s.rejected == {R.DUPLICATE: 4}

    img = tmp_path / "img"
    make_image(img / "x" / "a.png", seed=3, fmt="PNG")
    (img / "y").mkdir()
    Image.open(img / "x" / "a.png").save(img / "y" / "a.bmp")
    make_image(img / "y" / "b.png", seed=4, fmt="PNG")
    s = run(img, tmp_path / "out-img", val_fraction=0.5, workers=1)
    assert s.total == 2 and s.rejected == {R.DUPLICATE: 1}


def test_sigkill_mid_run_then_rerun_gives_identical_shards(tmp_path):
    src = tmp_path / "src"
    for i in range(160):
        make_image(src / f"c{i % 3}" / f"{i:04d}.png", seed=i, size=(300, 200))
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--shard-samples", "8", "--workers", "1", "--image-format", "png"]
    subprocess.run([*FEATX, "ingest", str(src), str(ref), *args], check=True, capture_output=True)
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [*FEATX, "ingest", str(src), str(out), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait until at least one shard exists, then kill at a random moment
        deadline = time.time() + 60
        while not list(in_splits(out, "shard-*.tar")) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # what is visible after the kill is complete: every tar has its stats and reads whole
        for tar in in_splits(out, "shard-*.tar"):
            assert tar.with_name(tar.stem + "_stats.json").exists()
            with tarfile.open(tar) as t:
                t.getmembers()
    assert kills >= 1
    subprocess.run([*FEATX, "ingest", str(src), str(out), *args], check=True, capture_output=True)
    assert shard_bytes(out) == shard_bytes(ref)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert load_card(out)["shards"] == load_card(ref)["shards"]


# ---------------------------------------------------------------------------------------------
# reading the shards back


@pytest.fixture
def ingested(image_tree, tmp_path):
    out = tmp_path / "out"
    run(image_tree, out, shard_samples=5)
    return out


def test_read_back_with_webdataset(ingested):
    import webdataset as wds

    urls = [str(p) for p in sorted(in_splits(ingested, "shard-*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).map(decode_sample)]
    expected = {e["key"] for e in _entries(ingested)}
    assert sorted(keys) == sorted(expected) and len(keys) == 24
    sample = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).map(decode_sample)))
    assert sample["image"].shape == (64, 64, 3) and sample["cls"] in (0, 1)


def test_read_back_with_tarfile(ingested):
    members = tar_members(ingested)
    keys = {n.split(".")[0] for n in members}
    assert keys == {e["key"] for e in _entries(ingested)}
    assert all({f"{k}.jpg", f"{k}.cls", f"{k}.json"} <= set(members) for k in keys)


@pytest.mark.slow
def test_read_back_with_ray_data(ingested):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_webdataset(
            [str(p) for p in sorted(in_splits(ingested, "shard-*.tar"))], decoder=None
        )
        rows = ds.take_all()
    finally:
        ray.shutdown()
    keys = [r["__key__"] for r in rows]
    assert len(keys) == len(set(keys)) == 24
    assert set(keys) == {e["key"] for e in _entries(ingested)}
    decoded = decode_sample(rows[0])
    assert decoded["image"].shape == (64, 64, 3)


def test_cli_summary_and_up_to_date(image_tree, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run(
        [*FEATX, "ingest", str(image_tree), str(out)], capture_output=True, text=True, check=True
    )
    assert "ingested" in first.stderr and "24" in first.stderr
    again = subprocess.run(
        [*FEATX, "ingest", str(image_tree), str(out)], capture_output=True, text=True, check=True
    )
    assert "up to date" in again.stderr
    bad = subprocess.run(
        [*FEATX, "ingest", str(image_tree), str(out), "--val-fraction", "2"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "val_fraction" in bad.stderr


def test_rejects_are_counted_once_after_a_resume(tmp_path):
    """A run killed after some shards but before rejected.jsonl and the card: the re-run must
    not decode and count the inputs those shards already rejected a second time."""
    src = tmp_path / "src"
    for i in range(30):
        make_image(src / ("a" if i % 2 else "b") / f"{i:02d}.png", seed=i)
    for i in range(4):
        (src / "a" / f"bad{i}.png").write_bytes(b"not an image %d" % i)
    out = tmp_path / "ds"
    cfg = IngestConfig.parse(src=src, out=out, shard_samples=5, val_fraction=0.0, workers=1)
    ingest(cfg)
    # What the killed run left: every shard but the last, no rejected.jsonl, no card.
    (out / "rejected.jsonl").unlink()
    (out / "dataset.json").unlink()
    last = sorted((out / "train").glob("shard-*.tar"))[-1]
    last.unlink()
    last.with_name(last.stem + "_stats.json").unlink()

    summary = ingest(cfg)
    histogram: dict[str, int] = {}
    for p in sorted(out.glob("*/*_stats.json")):
        for reason, n in json.loads(p.read_text())["errors"].items():
            histogram[reason] = histogram.get(reason, 0) + n
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejected) == [f"a/bad{i}.png" for i in range(4)]
    assert sum(histogram.values()) == 4
    assert summary.rejected == histogram == load_card(out)["rejected"]["by_reason"]
    assert summary.total == 30


def test_shards_of_class_folders_mix_the_classes(tmp_path):
    """A loader that streams shards sees every class in every stretch of its stream."""
    for c in range(4):
        for i in range(12):
            make_image(tmp_path / "src" / f"class{c}" / f"{i:02d}.png", seed=10 * c + i)
    out = tmp_path / "out"
    run(tmp_path / "src", out, shard_samples=12, val_fraction=0.0)
    card = load_card(out)
    assert len(card["shards"]) == 4
    for tar in sorted((out / "train").glob("shard-*.tar")):
        classes = {int(v) for k, v in tar_members_of(tar).items() if k.endswith(".cls")}
        assert len(classes) >= 3, f"{tar.name} holds classes {classes}"


def tar_members_of(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


# ---------------------------------------------------------------------------------------------
# data that changes: deleted, relabelled, moved and edited sources; compaction


def _card_matches_disk(out: Path) -> None:
    """The card lists exactly the shards on disk, and every sample is there once."""
    card = load_card(out)
    on_disk = {f"{p.parent.name}/{p.name}" for p in in_splits(out, "shard-*.tar")}
    assert {s["shard"] for s in card["shards"]} == on_disk
    keys = [e["key"] for e in _entries(out)]
    assert len(keys) == len(set(keys)) == sum(c["total"] for c in card["counts"].values())


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))


def test_deleted_relabelled_moved_and_edited_sources_leave_on_the_next_run(tmp_path):
    """Edits of SRC are applied, not ignored: a deleted source's sample leaves; a relabelled,
    re-split or edited one leaves and comes back as it is now; a duplicate of a deleted
    sample takes its place. The summary and the card count what changed."""
    imgs, manifest, out = tmp_path / "imgs", tmp_path / "m.csv", tmp_path / "out"
    for i in range(12):
        make_image(imgs / f"{i:02d}.png", seed=i)
    (imgs / "dup_of_05.png").write_bytes((imgs / "05.png").read_bytes())
    rows = [(f"imgs/{i:02d}.png", "ab"[i % 2], "train") for i in range(12)]
    rows.append(("imgs/dup_of_05.png", "b", "train"))
    _write_csv(manifest, rows)
    first = run(manifest, out, shard_samples=4, workers=1)
    assert first.ingested == 12 and first.duplicates == 1
    before = {e["source"]: e for e in _entries(out)}

    rows[0] = ("imgs/00.png", "b", "train")  # relabelled
    rows[2] = ("imgs/02.png", "a", "val")  # moved to another split
    make_image(imgs / "04.png", seed=99)  # edited: other bytes under the same name
    os.utime(imgs / "04.png", ns=(1, 1))
    del rows[5]  # deleted from the manifest (its duplicate stays)
    (imgs / "07.png").unlink()  # deleted from the disk, its row dangling
    _write_csv(manifest, rows)
    s = run(manifest, out, shard_samples=4, workers=1)
    assert s.removed == {"relabelled": 1, "moved to another split": 1, "edited": 1, "deleted": 2}
    assert s.ingested == 4  # 00, 02 and 04 as they are now, and the duplicate of 05
    assert s.total == 11 and s.shards_rewritten >= 1
    card = load_card(out)
    assert {k: v for k, v in card["last_changes"].items() if k != "at"} == {
        "added": 4,
        **s.removed,
        "shards rewritten": s.shards_rewritten,
    }
    _card_matches_disk(out)
    after = {e["source"]: e for e in _entries(out)}
    assert set(after) == {r[0] for r in rows} - {"imgs/07.png"}
    assert after["imgs/00.png"]["label"] == "b" and after["imgs/02.png"]["label"] == "a"
    assert after["imgs/04.png"]["sha256"] != before["imgs/04.png"]["sha256"]
    assert split_of_entry(out, "imgs/02.png") == "val"
    for src in ("imgs/01.png", "imgs/03.png", "imgs/06.png"):  # untouched: the same sample
        assert after[src]["key"] == before[src]["key"]
    members = tar_members(out)
    assert members[f"{after['imgs/00.png']['key']}.cls"] == b"1"  # the label in the shard too
    again = run(manifest, out, shard_samples=4, workers=1)
    assert again.up_to_date and again.removed == {} and again.ingested == 0


def split_of_entry(out: Path, source: str) -> str:
    for st in in_splits(out, "shard-*_stats.json"):
        stats = json.loads(st.read_text())
        if any(e["source"] == source for e in stats["entries"]):
            return stats["split"]
    raise AssertionError(f"{source} is in no shard")


def test_small_shards_are_compacted_past_the_threshold_and_with_compact(tmp_path):
    """Hourly runs that add a file each close a small shard each; past --compact-after they
    are merged into one, every sample kept once; --compact merges now."""
    src, out = tmp_path / "src", tmp_path / "out"
    opts = dict(shard_samples=8, val_fraction=0.0, workers=1, compact_after=4)
    for i in range(3):
        make_image(src / "c" / f"{i:02d}.png", seed=i)
        s = run(src, out, **opts)
        assert s.shards_rewritten == 0
    assert len(load_card(out)["shards"]) == 3
    make_image(src / "c" / "03.png", seed=3)
    s = run(src, out, **opts)  # the fourth small shard: merged with the other three
    assert s.shards_rewritten == 4 and s.total == 4
    assert [sh["samples"] for sh in load_card(out)["shards"]] == [4]
    _card_matches_disk(out)
    for i in range(4, 6):
        make_image(src / "c" / f"{i:02d}.png", seed=i)
        run(src, out, **opts)
    assert len(load_card(out)["shards"]) == 3
    r = subprocess.run(
        [*FEATX, "ingest", str(src), str(out), "--compact", "--shard-samples", "8",
         "--val-fraction", "0", "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    # the two small ones merged; the shard of 4 (half of --shard-samples) is not small
    assert [sh["samples"] for sh in load_card(out)["shards"]] == [4, 2]
    _card_matches_disk(out)
    # shard names are never used twice: a replaced name is not a new shard's
    names = [sh["shard"] for sh in load_card(out)["shards"]]
    assert names == ["train/shard-000004.tar", "train/shard-000007.tar"]


@pytest.mark.parametrize("killed_at", ["write_card", "delete_replaced"])
def test_a_rewrite_killed_at_any_step_keeps_the_card_true(tmp_path, monkeypatch, killed_at):
    """A rewrite dies after its new shard (before the card) or after the card (before the old
    shards are deleted): the card still lists each sample once, and the next run finishes
    the rewrite so that the card matches the disk."""
    import featx.ingest
    import featx.ingest_changes

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(8):
        make_image(src / "ab"[i % 2] / f"{i:02d}.png", seed=i)
    opts = dict(shard_samples=4, val_fraction=0.0, workers=1)
    run(src, out, **opts)
    (src / "a" / "00.png").unlink()
    where = featx.ingest if killed_at == "write_card" else featx.ingest_changes

    def die(*a, **k):
        raise KeyboardInterrupt  # as a kill would stop it, before this step

    monkeypatch.setattr(where, killed_at, die)
    with pytest.raises(KeyboardInterrupt):
        run(src, out, **opts)
    monkeypatch.undo()
    card = load_card(out)
    keys = [
        e["key"]
        for sh in card["shards"]
        for e in json.loads((out / sh["shard"].replace(".tar", "_stats.json")).read_text())[
            "entries"
        ]
    ]
    assert len(keys) == len(set(keys))  # what readers see: no sample twice
    s = run(src, out, **opts)
    assert s.total == 7
    _card_matches_disk(out)
    assert "a/00.png" not in {e["source"] for e in _entries(out)}


def test_a_file_moved_to_another_class_folder_takes_its_new_label(image_tree, tmp_path):
    """Moving a file between class folders is a delete and an add: its sample leaves and
    comes back with the new label (it was a duplicate of itself and kept the old one)."""
    out = tmp_path / "out"
    run(image_tree, out, workers=1)
    (image_tree / "cats" / "img001.png").rename(image_tree / "dogs" / "img001.png")
    s = run(image_tree, out, workers=1)
    assert s.removed == {"deleted": 1} and s.ingested == 1 and s.duplicates == 0
    entries = {e["source"]: e for e in _entries(out)}
    assert "cats/img001.png" not in entries and entries["dogs/img001.png"]["label"] == "dogs"
    _card_matches_disk(out)


# ---------------------------------------------------------------------------------------------
# bad manifests


def test_a_nul_byte_in_a_manifest_path_is_a_bad_row(tmp_path):
    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.png", i)
    rows = "".join(f"imgs/{i}.png,x\n" for i in range(3)) + '"imgs/a\x00b.png",x\n'
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    s = run(tmp_path / "m.csv", tmp_path / "out", workers=1)
    assert s.ingested == 3
    [bad] = [r for r in rejected(tmp_path / "out").values() if r["reason"] == N.BAD_ROW]
    assert "NUL byte" in bad["detail"] and bad["detail"].startswith("m.csv:5")


def test_a_partly_labelled_manifest_is_refused_before_any_work(tmp_path):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"{i}.png", i)
    rows = "imgs/0.png,x\nimgs/1.png,\nimgs/2.png,y\nimgs/3.png,\n"
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    with pytest.raises(ConfigError, match=r"2 of 4 rows of m.csv have no label \(lines 3, 5\)"):
        run(tmp_path / "m.csv", tmp_path / "out", workers=1)
    assert not list(in_splits(tmp_path / "out", "*"))  # nothing written


# ---------------------------------------------------------------------------------------------
# the decode spool holds plain data


def test_the_decode_spool_is_plain_data_and_a_planted_pickle_never_runs(tmp_path):
    """Decoded results travel through files in OUT; anyone who can write to OUT could plant
    one. They are a framed JSON + bytes format: a pickle planted there is an error, not code
    run in featx."""
    import pickle

    res = [
        N.Normalised("a" * 64, "png", b"", "b" * 64, {"size": [4, 4]}, "k", "train", b"\0tar"),
        N.Rejected(N.DUPLICATE, "duplicate of k", "c" * 64),
    ]
    assert N.load_results(N.dump_results(res)) == res

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    with pytest.raises(ValueError):
        N.load_results(pickle.dumps([Boom()]))
    assert not (tmp_path / "ran").exists()
    featx_src = Path(N.__file__).parent
    assert not [p for p in featx_src.rglob("*.py") if "import pickle" in p.read_text()]


# ---------------------------------------------------------------------------------------------
# inputs are opened safely


def test_a_file_swapped_for_a_symlink_after_discovery_is_not_read(tmp_path, monkeypatch):
    """Discovery checks symlinks; decoding happens later. A file (or a folder on its path)
    swapped for a link to a secret between the two is refused, and the secret is in no
    shard."""
    import featx.ingest

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        make_text(src / "a" / f"{i}.txt", seed=i)
        make_text(src / "b" / f"{i}.txt", seed=10 + i)
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = CANARY-do-not-ingest\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0.txt").symlink_to(secret)
    found = featx.ingest.discover

    def discover_then_swap(path):
        layout, inputs = found(path)  # discovery streams: the swap comes after its last input

        def then_swap():
            yield from inputs
            (src / "a" / "1.txt").unlink()
            (src / "a" / "1.txt").symlink_to(secret)  # the file becomes a link
            (src / "b").rename(tmp_path / "b-moved")
            (src / "b").symlink_to(elsewhere)  # a folder on the path becomes a link

        return layout, then_swap()

    monkeypatch.setattr(featx.ingest, "discover", discover_then_swap)
    s = run(src, out, workers=1, vocab_size=300)
    assert s.rejected.get(N.SYMLINK_ESCAPE) == 2
    assert not any(b"CANARY" in v for v in tar_members(out).values())
    details = {r["source"]: r["detail"] for r in rejected(out).values()}
    assert "not followed" in details["a/1.txt"] and "not followed" in details["b/0.txt"]


def test_an_input_over_max_input_bytes_is_rejected_unread(tmp_path):
    for i in range(4):
        make_image(tmp_path / "src" / "c" / f"{i}.png", seed=i, size=(24, 24))
    big = tmp_path / "src" / "c" / "big.bmp"
    Image.new("RGB", (200, 200)).save(big)
    s = run(tmp_path / "src", tmp_path / "out", workers=1, max_input_bytes=20_000)
    assert s.ingested == 4 and s.rejected == {N.TOO_LARGE: 1}
    assert rejected(tmp_path / "out")["c/big.bmp"]["detail"].startswith("120054 bytes")


# ---------------------------------------------------------------------------------------------
# memory does not grow with the number of inputs


def test_ingest_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    """What ingest keeps per input (the inputs found, their order, dedup digests, rejects, the
    finished shards' entries) lives in its plan on disk, not in Python lists and dicts: the
    peak Python memory of a run over 2N inputs is that of a run over N, give or take a little.
    (Before, it grew by ~3 KB per input here, and `featx ingest` of 1M tiny files peaked at
    1.5 GB RSS; now 223 MB, as at 100k: tests/benchmarks/bench_ingest_memory.py.)"""
    import gc
    import tracemalloc

    def tree(n: int) -> Path:
        src = tmp_path / f"src-{n}"
        for i in range(n):
            path = src / f"c{i % 2}" / f"{i // 500}" / f"{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"doc {i} of {n}: {'alpha beta gamma delta'[i % 7 :]}\n")
        return src

    def peak(n: int) -> int:
        """Peak bytes Python allocated in this process (not the pool's) while ingesting."""
        src = tree(n)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        s = run(src, tmp_path / f"out-{n}", **opts)
        assert s.ingested == n
        return tracemalloc.get_traced_memory()[1] - before

    # Shards of 100, all train: what ingest holds per open shard (its entries) and per page of
    # the plan (a few hundred rows) is the same at both sizes.
    opts = dict(modality="text", workers=1, vocab_size=64, shard_samples=100, val_fraction=0.0)
    run(tree(40), tmp_path / "warm-up", **opts)  # imports, and the pool's first start
    n = 1000
    tracemalloc.start()
    try:
        small, large = peak(n), peak(2 * n)
    finally:
        tracemalloc.stop()
    per_input = (large - small) / n
    assert per_input < 400, (
        f"ingest's peak Python memory grew by {per_input:.0f} bytes per input "
        f"({small / 1e6:.2f} MB at {n} inputs, {large / 1e6:.2f} MB at {2 * n})"
    )
