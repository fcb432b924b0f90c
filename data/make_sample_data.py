"""Generate featx's sample dataset: shape images, topic texts and tone/noise audio clips.

Every sample draws from its own RNG seeded by (modality, class, index), so the output is
byte-identical across runs and a smaller `per_class` reproduces the first files of the full set.
Run `python data/make_sample_data.py [--out DIR]`; it replaces DIR/{images,text,audio}.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

SEED = 20240611
IMAGE_CLASSES = ("circles", "squares", "triangles", "stripes")
# Reviews: the topic (cooking or sports) and whether the writer liked it. The verdict is one
# shared word of praise or scorn, negated half the time ("not at all good"), so the words alone
# do not tell liked from disliked: their order does.
TEXT_TOPICS = ("cooking", "sports")
TEXT_CLASSES = tuple(f"{t}_{v}" for t in TEXT_TOPICS for v in ("liked", "disliked"))
# Two pairs whose members have the same spectrum over time, so band statistics cannot tell
# them apart: only the order in time can (as for spoken words).
AUDIO_CLASSES = ("chirp_up", "chirp_down", "long_beep", "triple_beep")

# Shapes are drawn at this multiple of the output size and downsampled, which antialiases edges
# the way a camera would instead of leaving pixel-exact staircases a model could key on.
SUPERSAMPLE = 4


def sample_rng(modality: int, class_idx: int, index: int) -> np.random.Generator:
    """One independent RNG per sample, so counts can change without reshuffling other files."""
    return np.random.default_rng([SEED, modality, class_idx, index])


def reset_dir(path: Path) -> None:
    """Start a modality folder from scratch so files from an older run cannot linger."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary(name: str, root: Path, counts: dict[str, int], extra: str) -> str:
    per_class = ", ".join(f"{c}={n}" for c, n in counts.items())
    total = sum(counts.values())
    size_kb = dir_size(root) / 1024
    return f"{name}: {total} files ({per_class}) {extra}-> {root} [{size_kb:.0f} KiB]"


# ----------------------------------------------------------------------------------------------
# images


def image_variant(index: int) -> tuple[tuple[int, int], str, str]:
    """(width, height), PIL mode and extension for sample `index`.

    Variants follow the index, not the RNG, so every class gets the same mix and neither file
    format nor size can leak the label.
    """
    size = {3: (80, 60), 10: (48, 64)}.get(index % 15, (64, 64))
    variants = {5: ("L", "png"), 11: ("P", "png"), 17: ("RGB", "jpg")}
    mode, ext = variants.get(index % 25, ("RGB", "png"))
    return size, mode, ext


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A gentle two-colour linear gradient at a random angle plus mild sensor-like noise."""
    c0 = random_colour(rng)
    # A strong gradient would make edges that compete with the shape; keep it to lighting level.
    c1 = np.clip(c0 + rng.normal(0, 30, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (xs - w / 2) * math.cos(angle) + (ys - h / 2) * math.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0 + (c1 - c0) * t[..., None]
    img += rng.normal(0, rng.uniform(2, 7), size=img.shape)
    return img


def contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    # Keep the shape visible against the background, also in luminance for the grayscale variants;
    # otherwise some labels would be unlearnable.
    luma = np.array([0.299, 0.587, 0.114])
    for _ in range(100):
        colour = random_colour(rng)
        if np.linalg.norm(colour - bg_mean) > 110 and abs(luma @ (colour - bg_mean)) > 45:
            return colour
    return 255.0 - bg_mean


def rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list:
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def draw_shape(rng: np.random.Generator, cls: str, w: int, h: int) -> Image.Image:
    """Return an "L" mask (at SUPERSAMPLE scale) holding one shape of class `cls`."""
    s = SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    short = min(w, h)
    size = rng.uniform(0.45, 0.8) * short * s  # diameter / side / stripe-patch extent
    half = size / 2
    cx = rng.uniform(half, w * s - half)
    cy = rng.uniform(half, h * s - half)
    # Each class keeps a canonical pose (upright squares and triangles, diagonal stripes) with
    # a little jitter: with a few hundred images, a small model learns shape in a few epochs,
    # while colours, sizes and positions stay random so they carry no label.
    pose = {"squares": 0.0, "triangles": 0.0, "stripes": math.pi / 4, "circles": 0.0}[cls]
    angle = pose + rng.normal(0, 0.12)
    # A tenth of circles, squares and triangles are outlines, so "filled blob" is not the cue.
    outline = rng.random() < 0.1
    line_w = int(rng.integers(2, 4) * s)

    if cls == "circles":
        rx = half * rng.uniform(0.85, 1.0)
        ry = half * rng.uniform(0.85, 1.0)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        if outline:
            draw.ellipse(box, outline=255, width=line_w)
        else:
            draw.ellipse(box, fill=255)
    elif cls in ("squares", "triangles"):
        if cls == "squares":
            corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
            corners = [(x * 0.85, y * 0.85) for x, y in corners]  # rotated corners must fit
        else:
            corners = [
                (half * math.cos(a), half * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
            # Irregular triangles, so the class is "three corners", not one template.
            wobble = rng.normal(0, half * 0.1, size=(3, 2))
            corners = [(x + dx, y + dy) for (x, y), (dx, dy) in zip(corners, wobble, strict=True)]
        poly = rotated(corners, cx, cy, angle)
        if outline:
            draw.polygon(poly, outline=255, width=line_w)
        else:
            draw.polygon(poly, fill=255)
    elif cls == "stripes":
        n_bars = int(rng.integers(3, 6))
        pitch = size / n_bars
        bar_w = pitch * rng.uniform(0.35, 0.6)
        for k in range(n_bars):
            off = -half + pitch * (k + 0.5)
            bar = [(off - bar_w / 2, -half), (off + bar_w / 2, -half)]
            bar += [(off + bar_w / 2, half), (off - bar_w / 2, half)]
            draw.polygon(rotated(bar, cx, cy, angle), fill=255)
    else:
        raise ValueError(f"unknown image class {cls!r}; known: {IMAGE_CLASSES}")
    return mask.resize((w, h), Image.Resampling.BOX)


def make_image(rng: np.random.Generator, cls: str, w: int, h: int) -> Image.Image:
    img = background(rng, w, h)
    colour = contrasting_colour(rng, img.mean(axis=(0, 1)))
    alpha = np.asarray(draw_shape(rng, cls, w, h), dtype=np.float64)[..., None] / 255.0
    shade = colour + rng.normal(0, 4, size=img.shape)  # a flat fill would be an easy cue
    img = img * (1 - alpha) + shade * alpha
    # A few specks of clutter, so the only structure in the image is not the labelled shape.
    for _ in range(int(rng.integers(0, 4))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        img[max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1] = random_colour(rng)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def make_images(out: Path, per_class: int = 75) -> str:
    """Write out/images/<class>/*.png|jpg; return a one-line summary."""
    root = out / "images"
    reset_dir(root)
    counts = {}
    for ci, cls in enumerate(IMAGE_CLASSES):
        (root / cls).mkdir()
        for i in range(per_class):
            rng = sample_rng(0, ci, i)
            (w, h), mode, ext = image_variant(i)
            img = make_image(rng, cls, w, h)
            path = root / cls / f"{cls}_{i:03d}.{ext}"
            if ext == "jpg":
                img.save(path, quality=90)
            elif mode == "P":
                img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
            else:
                img.convert(mode).save(path)
        counts[cls] = per_class
    return summary("images", root, counts, "64x64 RGB PNG + 80x60/48x64, L, P, JPEG variants ")


# ----------------------------------------------------------------------------------------------
# text

# Slot fillers per class. Each class has one non-ASCII entry (Müller, crème brûlée, Tromsø,
# Göttingen), so readers must decode UTF-8, and non-ASCII text says nothing about the label.
# Word lists read better packed than one word per line.
# fmt: off
TEXT_VOCAB: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": [
            "the striker", "our goalkeeper", "the coach", "the home team", "the captain",
            "the referee", "the visiting side", "the young winger", "the sprinter",
            "the tennis player", "the defender", "the Müller twins",
        ],
        "verb": [
            "scored", "defended", "won", "lost", "blocked", "passed", "trained for",
            "celebrated", "missed", "dominated", "chased", "secured",
        ],
        "object": [
            "a late goal", "the penalty", "the final match", "the league title", "the relay race",
            "a corner kick", "the championship", "the second set", "the tournament",
            "a free throw", "the rebound", "the derby",
        ],
        "place": [
            "at the stadium", "in the second half", "on the pitch", "in front of the fans",
            "during extra time", "at the arena", "on the court", "before the whistle",
        ],
    },
    "cooking": {
        "subject": [
            "the chef", "my grandmother", "the baker", "our cook", "the sous-chef",
            "the restaurant owner", "the apprentice", "my neighbour", "the caterer", "the host",
        ],
        "verb": [
            "chopped", "simmered", "baked", "roasted", "seasoned", "whisked", "fried",
            "grilled", "stirred", "tasted", "kneaded", "peeled",
        ],
        "object": [
            "the onions", "a pot of soup", "fresh bread", "the garlic", "a crème brûlée",
            "the tomato sauce", "two eggs", "the pasta dough", "a spicy salsa",
            "the vegetables", "the butter", "a lemon tart",
        ],
        "place": [
            "in the kitchen", "over low heat", "in the oven", "on the stove",
            "for twenty minutes", "in a cast iron pan", "before dinner", "with a pinch of salt",
        ],
    },
    "weather": {
        "subject": [
            "the forecast", "a cold front", "the storm", "heavy rain", "the wind", "a thick fog",
            "the temperature", "the meteorologist", "a heat wave", "the humidity",
            "the low pressure system", "a hailstorm",
        ],
        "verb": [
            "brought", "predicted", "dropped", "soaked", "reached", "cleared", "swept across",
            "warned of", "covered", "lifted", "battered", "drifted over",
        ],
        "object": [
            "the coast", "thunder and lightning", "the valley", "light showers",
            "the morning clouds", "record highs", "snow on the hills", "strong gusts",
            "the northern region", "a rainbow", "freezing drizzle", "the fjords near Tromsø",
        ],
        "place": [
            "this afternoon", "over the weekend", "near the lake", "by tomorrow morning",
            "along the coast", "across the plains", "overnight", "in the mountains",
        ],
    },
    "space": {
        "subject": [
            "the telescope", "the astronaut", "the rover", "the probe", "mission control",
            "the astronomer", "the space station", "the rocket", "the satellite", "the crew",
            "the observatory", "the astronomer from Göttingen",
        ],
        "verb": [
            "observed", "orbited", "launched", "landed on", "photographed", "detected",
            "studied", "approached", "mapped", "tracked", "circled", "scanned",
        ],
        "object": [
            "a distant galaxy", "the red planet", "a comet", "the rings of Saturn",
            "a bright nebula", "the lunar surface", "an asteroid", "a new exoplanet",
            "the solar wind", "Jupiter's moons", "a pulsar", "the dark side of the Moon",
        ],
        "place": [
            "in deep space", "beyond the asteroid belt", "in low orbit", "last night",
            "through the atmosphere", "near the Moon", "from the launch pad", "for weeks",
        ],
    },
}

# Shared by every class: carries no label information, so a model must look past it.
OPENERS = [
    "Yesterday", "Today", "Once again", "As expected", "Surprisingly", "According to the report",
    "Honestly", "Later", "By the way", "On Monday", "In the end", "Apparently",
]
CONNECTORS = ["and then", "while", "but", "so", "because", "although", "just as"]
FILLER_SENTENCES = [
    "It was a good day.", "Everyone agreed.", "Nobody expected that.",
    "People talked about it for hours.", "That was über impressive — really.",
    "We will see what happens next.", "It felt a bit naïve at first.", "More news soon.",
    "Not bad at all.", "I wrote it down so I would not forget.",
]
TAILS = ["nobody saw it coming", "just as planned", "again", "for the first time this year"]
PRAISE = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "fun", "superb"]
SCORN = ["bad", "awful", "terrible", "dull", "poor", "boring", "dreadful", "weak"]
NEGATORS = ["not", "not at all", "never", "hardly", "in no way", "not really", "far from"]
VERDICTS = [
    "{opener}, it was {v}.", "Honestly, the whole thing was {v}.", "I found it {v}.",
    "The result was {v}, to be fair.", "All in all it felt {v}.", "My verdict: {v}.",
]
# fmt: on


def pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def slot(rng: np.random.Generator, cls: str, name: str) -> str:
    # Occasionally borrow from another class, so single words are strong but not perfect cues.
    if rng.random() < 0.1:
        cls = pick(rng, [c for c in TEXT_VOCAB if c != cls])
    return pick(rng, TEXT_VOCAB[cls][name])


def capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def make_sentence(rng: np.random.Generator, cls: str) -> str:
    subj, verb, obj = slot(rng, cls, "subject"), slot(rng, cls, "verb"), slot(rng, cls, "object")
    kind = int(rng.integers(5))
    if kind == 0:
        return f"{pick(rng, OPENERS)}, {subj} {verb} {obj} {slot(rng, cls, 'place')}."
    if kind == 1:
        verb2, obj2 = slot(rng, cls, "verb"), slot(rng, cls, "object")
        return f"{capitalise(subj)} {verb} {obj} and {verb2} {obj2}."
    if kind == 2:
        return (
            f"{capitalise(subj)} {verb} {obj} {slot(rng, cls, 'place')}, {pick(rng, CONNECTORS)} "
            f"{slot(rng, cls, 'subject')} {slot(rng, cls, 'verb')} {slot(rng, cls, 'object')}."
        )
    if kind == 3:
        return f"{capitalise(subj)} {verb} {obj}, {pick(rng, TAILS)}."
    return f"{capitalise(subj)} {verb} {obj}."


def verdict(rng: np.random.Generator, liked: bool) -> str:
    """One sentence of praise or scorn; negated half the time, which flips it."""
    negated = rng.random() < 0.5
    word = pick(rng, PRAISE if liked != negated else SCORN)
    v = f"{pick(rng, NEGATORS)} {word}" if negated else word
    return pick(rng, VERDICTS).format(opener=pick(rng, OPENERS), v=v)


def make_document(rng: np.random.Generator, cls: str) -> str:
    """1-2 sentences on the topic and one verdict, 10-40 words."""
    topic, _, feeling = cls.partition("_")
    while True:
        sentences = [make_sentence(rng, topic) for _ in range(int(rng.integers(1, 3)))]
        sentences.insert(int(rng.integers(0, len(sentences) + 1)), verdict(rng, feeling == "liked"))
        text = " ".join(sentences)
        if 10 <= len(text.split()) <= 40:
            return text


def make_texts(out: Path, per_class: int = 150) -> str:
    """Write out/text/<class>/*.txt; return a one-line summary."""
    root = out / "text"
    reset_dir(root)
    counts, non_ascii = {}, 0
    for ci, cls in enumerate(TEXT_CLASSES):
        (root / cls).mkdir()
        for i in range(per_class):
            text = make_document(sample_rng(1, ci, i), cls)
            non_ascii += not text.isascii()
            (root / cls / f"{cls}_{i:03d}.txt").write_bytes((text + "\n").encode("utf-8"))
        counts[cls] = per_class
    return summary("text", root, counts, f"UTF-8, {non_ascii} with non-ASCII ")


# ----------------------------------------------------------------------------------------------
# audio

SAMPLE_RATE = 16_000
WAV_RATE = 22_050


def audio_variant(index: int) -> tuple[int, int, str]:
    """(sample rate, channels, extension): 2 clips per class are 22.05 kHz stereo WAV.

    Few, because WAV is uncompressed and would dominate the size of data/.
    """
    return (WAV_RATE, 2, "wav") if index % 30 == 7 else (SAMPLE_RATE, 1, "flac")


def jitter(rng: np.random.Generator, freq: float, octaves: float = 0.3) -> float:
    return freq * 2 ** rng.uniform(-octaves, octaves)


def envelope(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Raised-cosine attack and release, so onsets do not click (clicks are broadband)."""
    env = np.ones(n)
    attack = int(rng.uniform(0.005, 0.03) * sr)
    env[: min(attack, n // 2)] = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, min(attack, n // 2)))
    release = min(int(rng.uniform(0.02, 0.08) * sr), n // 2)
    env[n - release :] *= 0.5 + 0.5 * np.cos(np.linspace(0, math.pi, release))
    return env


def tone(
    rng: np.random.Generator, n: int, sr: int, f0: float, harmonics: list[float]
) -> np.ndarray:
    t = np.arange(n) / sr
    vibrato = 1 + rng.uniform(0, 0.01) * np.sin(2 * math.pi * rng.uniform(3, 7) * t)
    phase = 2 * math.pi * np.cumsum(f0 * vibrato) / sr
    return sum(a * np.sin(k * phase) for k, a in enumerate(harmonics, start=1))


def base_pitch(rng: np.random.Generator) -> float:
    """Each clip's own register, anywhere over two octaves (350-1400 Hz)."""
    return 700.0 * 2 ** rng.uniform(-1, 1)


def sweep(rng: np.random.Generator, n: int, sr: int, up: bool) -> np.ndarray:
    """An exponential sweep over a random 1.5-2 octaves from the clip's register."""
    f0 = base_pitch(rng)
    f1 = f0 * 2 ** rng.uniform(1.5, 2.0)
    ramp = np.linspace(0, 1, n) if up else np.linspace(1, 0, n)
    freq = f0 * (f1 / f0) ** ramp
    return np.sin(2 * math.pi * np.cumsum(freq) / sr)


def chirp_up(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return sweep(rng, n, sr, up=True)


def chirp_down(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return sweep(rng, n, sr, up=False)


def beeps(rng: np.random.Generator, n: int, sr: int, count: int) -> np.ndarray:
    """`count` equal beeps of one harmonic tone filling 60% of the clip: one beep or three
    have the same share of time at each pitch."""
    signal = tone(rng, n, sr, base_pitch(rng) * 1.7, [1.0, rng.uniform(0.1, 0.4)])
    gate = np.zeros(n)
    on = int(0.6 * n / count)
    gap = (n - count * on) // (count + 1)
    for k in range(count):
        start = gap + k * (on + gap)
        gate[start : start + on] = envelope(rng, on, sr)
    return signal * gate


def long_beep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return beeps(rng, n, sr, 1)


def triple_beep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return beeps(rng, n, sr, 3)


AUDIO_MAKERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "chirp_up": chirp_up,
    "chirp_down": chirp_down,
    "long_beep": long_beep,
    "triple_beep": triple_beep,
}


def make_clip(rng: np.random.Generator, cls: str, sr: int, channels: int) -> np.ndarray:
    """int16 samples, shape (frames,) for mono or (frames, channels)."""
    duration = rng.uniform(0.5, 1.0)
    n = int(duration * sr)
    onset = int(rng.uniform(0, 0.15) * sr)
    length = int(rng.uniform(0.3, duration - onset / sr) * sr)
    signal = AUDIO_MAKERS[cls](rng, length, sr)
    if cls.startswith("chirp"):  # beeps are already gated
        signal = signal * envelope(rng, length, sr)
    signal = rng.uniform(0.2, 0.8) * signal / (np.abs(signal).max() + 1e-12)
    clip = np.zeros(n)
    clip[onset : onset + length] = signal
    # A hum under the whole clip at a pitch of its own (a fridge, a fan, mains), from faint
    # to nearly as loud as the sound itself: what the class is not, which a model must ignore.
    hum_hz = 120.0 * 2 ** rng.uniform(0, 5)
    hum = np.sin(2 * math.pi * hum_hz * np.arange(n) / sr + rng.uniform(0, 2 * math.pi))
    clip += rng.uniform(0.05, 0.6) * np.abs(signal).max() * hum
    # Stereo channels differ a little in gain and noise, so a mix-down is not a plain copy.
    gains = rng.uniform(0.8, 1.0, size=channels) if channels > 1 else np.ones(1)
    # Background hiss around -80 dBFS: real recordings are never silent, but noise is the one
    # thing FLAC cannot compress, and it would dominate the size of data/.
    hiss = rng.normal(0, rng.uniform(1e-4, 3e-4), size=(n, channels))
    clip = clip[:, None] * gains[None, :] + hiss
    pcm = np.clip(np.rint(clip * 32767), -32768, 32767).astype(np.int16)
    return pcm[:, 0] if channels == 1 else pcm


def make_audio(out: Path, per_class: int = 60) -> str:
    """Write out/audio/<class>/*.flac|wav; return a one-line summary."""
    root = out / "audio"
    reset_dir(root)
    counts, n_wav = {}, 0
    for ci, cls in enumerate(AUDIO_CLASSES):
        (root / cls).mkdir()
        for i in range(per_class):
            sr, channels, ext = audio_variant(i)
            pcm = make_clip(sample_rng(2, ci, i), cls, sr, channels)
            path = root / cls / f"{cls}_{i:03d}.{ext}"
            if ext == "flac":
                sf.write(path, pcm, sr, subtype="PCM_16", compression_level=1.0)
            else:
                sf.write(path, pcm, sr, subtype="PCM_16")
            n_wav += ext == "wav"
        counts[cls] = per_class
    extra = f"16 kHz mono FLAC, {n_wav} as 22.05 kHz stereo WAV "
    return summary("audio", root, counts, extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder to write images/, text/ and audio/ into (replaced if present); "
        "default: the folder holding this script",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for make in (make_images, make_texts, make_audio):
        print(make(args.out))


if __name__ == "__main__":
    main()
