"""Tutorial-sized training: every model x modality learns a tiny synthetic task in seconds.

Each dataset has a class structure a model can pick up (image colour, class-specific words, tone
pitch). Samples go through `featx.batching` exactly as shards would, and a few AdamW steps on
the `small` preset must cut the loss clearly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from featx.batching import make_collate
from featx.models import MODALITIES, create_model, list_models

NUM_CLASSES = 3
SAMPLES = 48
STEPS = 30
BATCH = 16
SAMPLE_RATE = 16000
WORDS = [["apple", "banana", "cherry"], ["dog", "cat", "horse"], ["red", "green", "blue"]]
FILLER = ["the", "a", "of", "and", "some", "with", "very", "quite"]
TONES_HZ = [400.0, 1200.0, 3000.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def image_data(rng: np.random.Generator) -> list[dict]:
    """16x16 noise with the class's colour channel brightened."""
    out = []
    for i in range(SAMPLES):
        c = i % NUM_CLASSES
        img = rng.integers(0, 120, (16, 16, 3))
        img[..., c] += 120
        out.append({"__key__": f"i{i}", "cls": c, "meta": {}, "image": img.astype(np.uint8)})
    return out


def text_data(rng: np.random.Generator) -> list[dict]:
    """3-10 filler words with one or two words of the class mixed in."""
    out = []
    for i in range(SAMPLES):
        c = i % NUM_CLASSES
        words = list(rng.choice(FILLER, size=rng.integers(3, 11)))
        for w in rng.choice(WORDS[c], size=rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(w))
        out.append({"__key__": f"t{i}", "cls": c, "meta": {}, "text": " ".join(words)})
    return out


def audio_data(rng: np.random.Generator) -> list[dict]:
    """0.1-0.2 s tones at the class's pitch, random phase and level, plus noise."""
    out = []
    for i in range(SAMPLES):
        c = i % NUM_CLASSES
        t = np.arange(rng.integers(SAMPLE_RATE // 10, SAMPLE_RATE // 5)) / SAMPLE_RATE
        wave = rng.uniform(0.2, 0.8) * np.sin(2 * math.pi * TONES_HZ[c] * t + rng.uniform(0, 6))
        wave += rng.normal(0, 0.02, t.size)
        out.append({"__key__": f"a{i}", "cls": c, "meta": {}, "audio": wave.astype(np.float32)})
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[list[dict], str | None]]:
    rng = np.random.default_rng(0)
    text = text_data(rng)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["[PAD]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([s["text"] for s in text], trainer)
    path = str(tmp_path_factory.mktemp("text") / "tokenizer.json")
    tok.save(path)
    return {
        "image": (image_data(rng), None),
        "text": (text, path),
        "audio": (audio_data(rng), None),
    }


def mean_loss(model: torch.nn.Module, batch: dict) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(batch["x"], batch["lengths"]), batch["labels"]).item()


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", list_models())
def test_small_model_learns(name, modality, datasets):
    torch.manual_seed(0)
    samples, tokenizer_path = datasets[modality]
    train_collate = make_collate(modality, tokenizer_path=tokenizer_path, augment=True, seed=0)
    eval_batch = make_collate(modality, tokenizer_path=tokenizer_path)(samples)
    vocab = None if tokenizer_path is None else Tokenizer.from_file(tokenizer_path).get_vocab_size()
    model = create_model(name, modality, NUM_CLASSES, vocab_size=vocab, sample_rate=SAMPLE_RATE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    before = mean_loss(model, eval_batch)
    order = np.random.default_rng(0)
    model.train()
    for _ in range(STEPS):
        idx = order.choice(SAMPLES, size=BATCH, replace=False)
        batch = train_collate([samples[i] for i in idx])
        loss = F.cross_entropy(model(batch["x"], batch["lengths"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = mean_loss(model, eval_batch)

    assert after < 0.7 * before, f"loss went from {before:.3f} to {after:.3f}"
