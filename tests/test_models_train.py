"""Every family learns on every modality: trained features beat random-init ones on held-out data.

Each task is made so that random weights do poorly: the class is in the *shape* of what is drawn
(not its colour or place), in which word of a sentence-like string is there among many shared
fillers, or in the *direction* of a sweep through the same band of frequencies. A model trained
with featx's recipe (`featx.recipe` and `featx.batching`, as in the Ray Train workers) for a
few epochs must give features that a linear probe separates clearly better on samples it never
saw than the same architecture at its random initialisation (by MARGIN, or, where random init
already gets most of them right, with at most half its errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from featx.batching import make_collate
from featx.models import MODALITIES, create_model, default_lr, list_models
from featx.recipe import build_optimizer, warmup_cosine

NUM_CLASSES = 4
TRAIN, HELD_OUT = 160, 80
EPOCHS, BATCH = 8, 16
SIZE = 32
SAMPLE_RATE = 8000
WORDS = [
    ["apple", "banana", "cherry", "grape"],
    ["dog", "cat", "horse", "sheep"],
    ["red", "green", "blue", "yellow"],
    ["train", "plane", "boat", "truck"],
]
FILLER = "the a of and some with very quite then so it was on in at near over under".split()
# Trained features must beat random-init ones by this much on held-out samples, and reach this.
# Where random init leaves fewer than 2 * MARGIN errors (the conv front end and a random GRU
# already tell most tone moves apart), training must remove at least half of them instead.
MARGIN, FLOOR = 0.15, 0.75

pytestmark = pytest.mark.usefixtures("one_thread")


def shape_image(rng: np.random.Generator, cls: int) -> np.ndarray:
    """A bright bar (horizontal or vertical), cross or hollow box on a dark noisy background,
    at a random place and size and in a random bright colour: only the shape tells the class."""
    img = rng.integers(0, 60, 3) + rng.normal(0, 15, (SIZE, SIZE, 3))
    colour = rng.integers(150, 256, 3)
    n = int(rng.integers(14, 20))
    r, c = rng.integers(1, SIZE - n - 1, 2)
    t = 4
    mid = n // 2 - t // 2
    box = np.zeros((n, n), bool)
    if cls in (0, 2):
        box[mid : mid + t, :] = True
    if cls in (1, 2):
        box[:, mid : mid + t] = True
    if cls == 3:
        box[:t, :] = box[-t:, :] = box[:, :t] = box[:, -t:] = True
    img[r : r + n, c : c + n][box] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def sentence(rng: np.random.Generator, cls: int) -> str:
    """Fillers around one word pair; the class is the pair's order, which a bag of words cannot
    see: "cat dog" (0), "dog cat" (1), "red blue" (2), "blue red" (3)."""
    first, second = [("cat", "dog"), ("dog", "cat"), ("red", "blue"), ("blue", "red")][cls]
    words = list(rng.choice(FILLER, size=int(rng.integers(6, 14))))
    at = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:at] + [first, second] + words[at:])


def steps(rng: np.random.Generator, cls: int) -> np.ndarray:
    """Two tones one after the other from a random starting pitch (400-1000 Hz): the class is
    the move between them, which no pitch or share of time at a pitch tells: up a fifth (0),
    down a fifth (1), up an octave and a half (2), down as much (3). Random lengths, levels,
    phases and noise."""
    ratio = [1.5, 1 / 1.5, 2.8, 1 / 2.8][cls]
    low = rng.uniform(400, 1000) / (min(ratio, 1.0))
    first, second = (low, low * ratio)
    n1, n2 = (int(rng.uniform(0.12, 0.25) * SAMPLE_RATE) for _ in range(2))
    t1, t2 = np.arange(n1) / SAMPLE_RATE, np.arange(n2) / SAMPLE_RATE
    wave = np.concatenate(
        [np.sin(2 * math.pi * first * t1 + rng.uniform(0, 6)), np.sin(2 * math.pi * second * t2)]
    )
    wave = rng.uniform(0.2, 0.8) * wave + rng.normal(0, 0.02, wave.size)
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, tuple[list[dict], str | None]]:
    rng = np.random.default_rng(0)
    n = TRAIN + HELD_OUT
    labels = [i % NUM_CLASSES for i in range(n)]
    images = [{"image": shape_image(rng, c)} for c in labels]
    texts = [{"text": sentence(rng, c)} for c in labels]
    clips = [{"audio": steps(rng, c)} for c in labels]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[PAD]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t["text"] for t in texts[:TRAIN]], trainer)
    path = str(tmp_path_factory.mktemp("text") / "tokenizer.json")
    tok.save(path)

    def samples(payloads):
        return [
            {"__key__": f"s{i}", "cls": c, "meta": {}, **p}
            for i, (c, p) in enumerate(zip(labels, payloads, strict=True))
        ]

    return {
        "image": (samples(images), None),
        "text": (samples(texts), path),
        "audio": (samples(clips), None),
    }


def features(model, samples, collate) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        batch = collate(samples)
        return model.forward_features(batch["x"], batch["lengths"]).numpy()


def probe(model, samples, collate) -> float:
    """Linear-probe accuracy on the held-out samples, fitted on the train samples."""
    X = features(model, samples, collate)
    y = np.array([s["cls"] for s in samples])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(X[:TRAIN], y[:TRAIN])
    return float((clf.predict(X[TRAIN:]) == y[TRAIN:]).mean())


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", list_models())
def test_trained_features_beat_random_init(name, modality, tasks):
    samples, tokenizer_path = tasks[modality]
    plain = make_collate(modality, tokenizer_path=tokenizer_path)
    vocab = None if tokenizer_path is None else Tokenizer.from_file(tokenizer_path).get_vocab_size()
    torch.manual_seed(0)
    model = create_model(name, modality, NUM_CLASSES, vocab_size=vocab, sample_rate=SAMPLE_RATE)
    random_init = probe(model, samples, plain)

    optimizer = build_optimizer(model, default_lr(name), weight_decay=0.01)
    steps = EPOCHS * math.ceil(TRAIN / BATCH)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 0.1))
    rng = np.random.default_rng(0)
    for epoch in range(EPOCHS):
        collate = make_collate(modality, tokenizer_path=tokenizer_path, augment=True, seed=epoch)
        model.train()
        order = rng.permutation(TRAIN)
        for i in range(0, TRAIN, BATCH):
            batch = collate([samples[j] for j in order[i : i + BATCH]])
            logits = model(batch["x"], batch["lengths"])
            loss = F.cross_entropy(logits, batch["labels"], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    trained = probe(model, samples, plain)

    gain = min(MARGIN, (1.0 - random_init) / 2)
    assert trained >= FLOOR and trained >= random_init + gain and trained > random_init, (
        f"{name}/{modality}: held-out probe accuracy {trained:.3f} after training against "
        f"{random_init:.3f} at random init"
    )
