"""Real corpora for the quality benchmark, built from what installed packages ship (no download).

Each builder writes a class-folder tree `OUT/<name>/<label>/<file>` that `featx ingest` reads:

- `digits`: scikit-learn's 1,797 handwritten digits (8x8 grey scans of 43 writers), as PNGs.
- `glyphs`: the letters A-J drawn in every installed TrueType font (system and matplotlib's),
  at several sizes, weights and small offsets, as 28x28 grey PNGs.
- `docstrings`: the first paragraph of the docstrings of public functions and classes of eight
  scientific Python libraries (the label is the library), read with `ast`, nothing imported;
  the libraries' own names are blanked so the text, not a name, must tell them apart.
- `spoken_digits`: "zero" to "nine" spoken by espeak-ng's English voices and voice variants
  (Debian package `espeak-ng`), at speeds and pitches of their own, stored at sample rates from
  8 to 44.1 kHz with a little background noise.
- `spoken_words`: ten everyday words of one to three syllables ("apple" to "jacket"), made as
  `spoken_digits` is: a second audio corpus, so that a change to audio is not tuned to digits.

Every choice is seeded, so a corpus is the same on every run with the same packages.

    python tests/benchmarks/corpora.py OUT [--only digits,docstrings]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SEED = 20261202
CORPORA = ("digits", "glyphs", "docstrings", "debian", "spoken_digits", "spoken_words")
MODALITY = {
    "digits": "image",
    "glyphs": "image",
    "docstrings": "text",
    "debian": "text",
    "spoken_digits": "audio",
    "spoken_words": "audio",
}


def _rng(*parts) -> np.random.Generator:
    h = hashlib.sha256(repr((SEED, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------
# images


def build_digits(out: Path) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    root = _fresh(out / "digits")
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target, strict=True)):
        folder = root / str(int(y))
        folder.mkdir(exist_ok=True)
        pixels = np.clip(img * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255 (ink is bright)
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    return {"samples": len(d.target), "classes": 10}


def _font_files() -> list[Path]:
    roots = [Path("/usr/share/fonts")]
    if spec := importlib.util.find_spec("matplotlib"):
        roots.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    files, seen = [], set()
    for root in roots:
        for f in sorted(root.rglob("*.ttf")):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if digest not in seen:  # matplotlib ships copies of DejaVu too
                seen.add(digest)
                files.append(f)
    return files


def build_glyphs(out: Path, letters: str = "ABCDEFGHIJ", per_font: int = 3) -> dict:
    from PIL import Image, ImageDraw, ImageFont

    root = _fresh(out / "glyphs")
    fonts = _font_files()
    n = 0
    for letter in letters:
        folder = root / letter
        folder.mkdir()
        for fi, font_file in enumerate(fonts):
            for k in range(per_font):
                rng = _rng("glyphs", letter, fi, k)
                size = int(rng.integers(18, 27))
                try:
                    font = ImageFont.truetype(str(font_file), size * 4)
                except OSError:
                    continue
                canvas = Image.new("L", (112, 112), 0)
                draw = ImageDraw.Draw(canvas)
                box = draw.textbbox((0, 0), letter, font=font)
                if box[2] - box[0] < 4 or box[3] - box[1] < 4:
                    continue  # a symbol font without this letter
                dx, dy = rng.integers(-8, 9, size=2)
                x = (112 - (box[2] - box[0])) / 2 - box[0] + dx
                y = (112 - (box[3] - box[1])) / 2 - box[1] + dy
                draw.text((x, y), letter, fill=255, font=font)
                canvas = canvas.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR)
                small = np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.float64)
                small = np.clip(small + rng.normal(0, 8, small.shape), 0, 255).astype(np.uint8)
                Image.fromarray(small, "L").save(folder / f"{letter}_{fi:02d}_{k}.png")
                n += 1
    return {"samples": n, "classes": len(letters), "fonts": len(fonts)}


# ----------------------------------------------------------------------------------------------
# text

LIBRARIES = ("numpy", "scipy", "pandas", "torch", "sklearn", "matplotlib", "sympy", "networkx")
# the libraries' names and usual aliases, blanked in every text
_NAMES = re.compile(
    r"\b(numpy|np|scipy|sp|pandas|pd|torch|pytorch|sklearn|scikit-learn|scikit|matplotlib|mpl|"
    r"plt|pyplot|sympy|networkx|nx)\b",
    re.IGNORECASE,
)


def _docstrings(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any("test" in p or "vendor" in p for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def _clean(doc: str, max_words: int = 80) -> str | None:
    para = re.split(r"\n\s*\n", doc.strip())[0]
    para = _NAMES.sub("_", para)
    words = para.split()
    if len(words) < 6:
        return None
    return " ".join(words[:max_words])


def build_docstrings(out: Path, per_class: int = 250) -> dict:
    root = _fresh(out / "docstrings")
    counts = {}
    for lib in LIBRARIES:
        texts = sorted({t for t in (_clean(d) for d in _docstrings(lib)) if t})
        order = _rng("docstrings", lib).permutation(len(texts))
        chosen = [texts[i] for i in order[:per_class]]
        folder = root / lib
        folder.mkdir()
        for i, text in enumerate(chosen):
            (folder / f"{lib}_{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
        counts[lib] = len(chosen)
    return {"samples": sum(counts.values()), "classes": len(counts), "per_class": counts}


DEBIAN_SECTIONS = ("games", "sound", "graphics", "science", "mail", "editors", "database", "video")


def _debian_descriptions() -> dict[str, list[str]]:
    """Section -> package descriptions (synopsis and long text) from apt's package index."""
    if shutil.which("apt-cache") is None:
        return {}
    text = subprocess.run(
        ["apt-cache", "dumpavail"], capture_output=True, text=True, check=False
    ).stdout
    out: dict[str, list[str]] = {}
    for record in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in record.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        section = fields.get("Section", "").rsplit("/", 1)[-1]
        desc = fields.get("Description")
        if section in DEBIAN_SECTIONS and desc:
            body = " ".join(
                w for line in desc.splitlines() for w in line.strip().split() if line.strip() != "."
            )
            out.setdefault(section, []).append(body)
    return out


def build_debian(out: Path, per_class: int = 250, max_words: int = 60) -> dict:
    """Debian package descriptions by archive section: needs apt's lists (`apt-get update`)."""
    by_section = _debian_descriptions()
    if not by_section:
        raise RuntimeError("debian needs apt's package lists: run apt-get update")
    root = _fresh(out / "debian")
    counts = {}
    for section in DEBIAN_SECTIONS:
        texts = sorted({" ".join(t.split()[:max_words]) for t in by_section.get(section, [])})
        order = _rng("debian", section).permutation(len(texts))
        folder = root / section
        folder.mkdir()
        for i, j in enumerate(order[:per_class]):
            (folder / f"{section}_{i:04d}.txt").write_text(texts[j] + "\n", encoding="utf-8")
        counts[section] = min(per_class, len(texts))
    return {"samples": sum(counts.values()), "classes": len(counts), "per_class": counts}


# ----------------------------------------------------------------------------------------------
# audio

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("apple", "bridge", "candle", "dolphin", "engine", "forest", "guitar", "harbour", "island")
WORDS += ("jacket",)
_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd")
_VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f4")
_RATES = (8000, 11025, 16000, 22050, 32000, 44100)


def _espeak(text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return data, rate


def build_spoken_digits(
    out: Path, words: tuple[str, ...] = DIGIT_WORDS, name: str = "spoken_digits"
) -> dict:
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        raise RuntimeError(f"{name} needs espeak-ng: apt-get install espeak-ng")
    root = _fresh(out / name)
    speakers = [(v, var) for v in _VOICES for var in _VARIANTS]  # 36 voices
    for w, word in enumerate(words):
        folder = root / str(w)
        folder.mkdir()
        for s, (voice, variant) in enumerate(speakers):
            rng = _rng("speech", word, s)
            wave, rate = _espeak(
                word, f"{voice}+{variant}", int(rng.integers(130, 221)), int(rng.integers(25, 76))
            )
            target = _RATES[int(rng.integers(len(_RATES)))]
            wave = soxr.resample(wave, rate, target).astype(np.float32)
            lead = np.zeros(int(rng.uniform(0.0, 0.25) * target), np.float32)
            wave = np.concatenate([lead, wave, np.zeros(int(0.1 * target), np.float32)])
            wave *= float(rng.uniform(0.3, 0.9)) / max(1e-6, float(np.abs(wave).max()))
            wave += rng.normal(0, float(rng.uniform(0.002, 0.01)), wave.size).astype(np.float32)
            sf.write(folder / f"{word}_{s:02d}.wav", np.clip(wave, -1, 1), target)
    return {"samples": len(words) * len(speakers), "classes": len(words)}


BUILDERS = {
    "digits": build_digits,
    "glyphs": build_glyphs,
    "docstrings": build_docstrings,
    "debian": build_debian,
    "spoken_digits": build_spoken_digits,
    "spoken_words": lambda out: build_spoken_digits(out, WORDS, "spoken_words"),
}


def build(out: Path, only: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return {name: BUILDERS[name](out) for name in only or CORPORA}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--only", default=",".join(CORPORA), help="comma-separated corpus names")
    args = p.parse_args()
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CORPORA))
    if unknown:
        sys.exit(f"unknown corpus {', '.join(unknown)}; known: {', '.join(CORPORA)}")
    for name, info in build(args.out, only).items():
        print(f"{name}: {info}")


if __name__ == "__main__":
    main()
