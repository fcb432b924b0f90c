"""featx.batching turns decoded samples into padded, normalised model inputs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from featx.batching import IMAGE_FILL, IMAGE_MEAN, IMAGE_STD, Batcher, make_collate
from featx.models import create_model


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A tiny byte-level BPE trained here, with featx's special tokens [PAD]=0 and [UNK]=1."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["[PAD]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat"] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def images(n: int = 4, size: int = 16, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"img{i}",
            "cls": i % 2,
            "meta": {},
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        }
        for i in range(n)
    ]


def clips(lengths=(1000, 400, 2500), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"wav{i}",
            "cls": 1,
            "meta": {},
            "audio": rng.uniform(-0.5, 0.5, n).astype(np.float32),
        }
        for i, n in enumerate(lengths)
    ]


def texts(strings) -> list[dict]:
    return [{"__key__": f"t{i}", "cls": 0, "meta": {}, "text": s} for i, s in enumerate(strings)]


def test_images_become_normalised_chw_floats():
    samples = images()
    samples[0]["image"][:] = np.round(np.array(IMAGE_MEAN) * 255).astype(np.uint8)
    out = make_collate("image")(samples)
    assert out["x"].shape == (4, 3, 16, 16) and out["x"].dtype == torch.float32
    assert out["lengths"] is None
    assert out["labels"].tolist() == [0, 1, 0, 1]
    assert out["keys"] == ["img0", "img1", "img2", "img3"]
    assert out["x"][0].abs().max() < 0.01  # the mean colour normalises to ~0
    raw = samples[1]["image"][2, 5] / 255.0
    expected = (raw - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    np.testing.assert_allclose(out["x"][1, :, 2, 5].numpy(), expected, atol=1e-5)


def test_image_augmentation_is_seeded_and_keeps_the_size():
    samples = images(8)
    plain = make_collate("image")(samples)["x"]
    a = make_collate("image", augment=True, seed=3)(samples)["x"]
    b = make_collate("image", augment=True, seed=3)(samples)["x"]
    c = make_collate("image", augment=True, seed=4)(samples)["x"]
    assert a.shape == plain.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, plain) and not torch.equal(a, c)
    # off by default: extraction sees exactly the normalised pixels
    assert torch.equal(plain, make_collate("image")(samples)["x"])


@pytest.mark.parametrize("flip", [False, True])
def test_each_augmented_image_is_a_shifted_or_mirrored_copy_of_its_own(flip):
    samples = images(16)
    out = make_collate("image", augment=True, flip=flip, seed=0)(samples)["x"]
    size = samples[0]["image"].shape[0]
    pad = max(1, size // 16)
    flips = 0
    for i, s in enumerate(samples):
        padded = np.empty((size + 2 * pad, size + 2 * pad, 3), np.uint8)
        padded[:] = IMAGE_FILL
        padded[pad:-pad, pad:-pad] = s["image"]
        candidates = [
            (flip, crop[:, ::-1] if flip else crop)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            for flip in (False, True)
            for crop in [padded[top : top + size, left : left + size]]
        ]
        expected = make_collate("image")([{**s, "image": c} for _, c in candidates])["x"]
        found = [
            flip
            for (flip, _), e in zip(candidates, expected, strict=True)
            if torch.equal(out[i], e)
        ]
        assert found, f"augmented image {i} is not a shifted or mirrored copy of its own"
        flips += found[0]
    if flip:
        assert 0 < flips < len(samples)  # both mirrored and unmirrored samples occur
    else:  # a mirror changes what a digit or a letter means: only with flip=True
        assert flips == 0


def test_mixed_image_sizes_are_rejected_with_the_keys():
    samples = images(2) + images(1, size=20)
    samples[-1]["__key__"] = "odd"
    with pytest.raises(ValueError, match="'odd'.*fixed size"):
        make_collate("image")(samples)


def test_text_is_tokenised_padded_and_truncated(tokenizer_path):
    tok = Tokenizer.from_file(tokenizer_path)
    strings = ["the cat sat", "the quick brown fox jumps over the lazy dog", ""]
    out = make_collate("text", tokenizer_path=tokenizer_path)(texts(strings))
    ids = [tok.encode(s).ids for s in strings]
    assert out["lengths"].tolist() == [len(ids[0]), len(ids[1]), 1]
    assert out["x"].dtype == torch.long and out["x"].shape == (3, len(ids[1]))
    assert out["x"][0, : len(ids[0])].tolist() == ids[0]
    assert (out["x"][0, len(ids[0]) :] == 0).all()
    assert out["x"][2, 0] == tok.token_to_id("[UNK]")  # the empty text became one [UNK]

    short = make_collate("text", tokenizer_path=tokenizer_path, max_tokens=4)(texts(strings))
    assert short["lengths"].tolist() == [min(4, len(ids[0])), 4, 1]
    assert short["x"][1].tolist() == ids[1][:4]


def test_token_dropout_is_seeded_and_never_empties(tokenizer_path):
    samples = texts(["the quick brown fox jumps over the lazy dog"] * 6 + ["a", ""])
    plain = make_collate("text", tokenizer_path=tokenizer_path)(samples)
    a = make_collate("text", tokenizer_path=tokenizer_path, augment=True, seed=0)(samples)
    b = make_collate("text", tokenizer_path=tokenizer_path, augment=True, seed=0)(samples)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["lengths"], b["lengths"])
    assert (a["lengths"] >= 1).all()
    assert a["lengths"].sum() < plain["lengths"].sum()


def test_text_views_are_seeded_ordered_subsets_that_differ(tokenizer_path):
    """Contrastive text views (`views=2`): each keeps about half to four fifths of its text's
    tokens, in order, less a span; the two views of a text differ; a text of one token stays."""
    long = " ".join(["the quick brown fox jumps over the lazy dog a cat sat on the mat"] * 3)
    samples = texts([long] * 8 + ["a", ""])
    plain = make_collate("text", tokenizer_path=tokenizer_path)(samples)
    make = lambda: make_collate(  # noqa: E731
        "text", tokenizer_path=tokenizer_path, augment=True, seed=2, views=2
    )
    batch, again = make()(samples), make()(samples)
    assert torch.equal(batch["x"], again["x"]) and batch["x"].shape[0] == 20
    n = len(samples)
    full = plain["x"][0, : plain["lengths"][0]].tolist()
    for i in range(8):
        one, two = (batch["x"][j, : batch["lengths"][j]].tolist() for j in (i, i + n))
        assert one != two
        for view in (one, two):
            assert 0.2 * len(full) <= len(view) <= 0.9 * len(full)
            rest = iter(full)  # an ordered subsequence of the text's tokens
            assert all(t in rest for t in view)
    assert batch["lengths"][8] == batch["lengths"][9] == batch["lengths"][18] == 1


def test_audio_is_zero_padded_with_lengths():
    samples = clips()
    out = make_collate("audio")(samples)
    assert out["x"].shape == (3, 2500) and out["x"].dtype == torch.float32
    assert out["lengths"].tolist() == [1000, 400, 2500]
    assert torch.equal(out["x"][1, :400], torch.from_numpy(samples[1]["audio"]))
    assert (out["x"][1, 400:] == 0).all()


def test_audio_augmentation_stays_inside_each_clip():
    samples = clips()
    a = make_collate("audio", augment=True, seed=1)(samples)
    b = make_collate("audio", augment=True, seed=1)(samples)
    plain = make_collate("audio")(samples)
    assert torch.equal(a["x"], b["x"])
    assert torch.equal(a["lengths"], plain["lengths"])
    assert (a["x"][1, 400:] == 0).all() and (a["x"][0, 1000:] == 0).all()
    assert not torch.equal(a["x"], plain["x"])
    assert a["x"].abs().max() <= 1.0


def test_empty_audio_becomes_one_silent_sample():
    samples = clips((0, 300))
    out = make_collate("audio")(samples)
    assert out["lengths"].tolist() == [1, 300]


def test_labels_are_none_unless_every_sample_has_one():
    samples = images(3)
    samples[1]["cls"] = None
    assert make_collate("image")(samples)["labels"] is None


def test_batcher_pickles_and_gives_the_same_batches(tokenizer_path):
    batcher = make_collate("text", tokenizer_path=tokenizer_path, augment=True, seed=5)
    samples = texts(["the cat sat on the mat", "a quick dog"])
    first = batcher(samples)
    copy = pickle.loads(pickle.dumps(batcher))
    assert isinstance(copy, Batcher)
    # a copy restarts from the seed, like a fresh worker
    assert torch.equal(copy(samples)["x"], first["x"])


def test_bad_input_is_reported(tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match="known modalities"):
        make_collate("video")
    with pytest.raises(ValueError, match="tokenizer_path"):
        make_collate("text")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        make_collate("text", tokenizer_path=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="'img0' has no 'audio' payload.*found: \\['image'\\]"):
        make_collate("audio")(images(1))
    bad = images(1)
    bad[0]["image"] = bad[0]["image"].astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        make_collate("image")(bad)
    with pytest.raises(ValueError, match="empty"):
        make_collate("image")([])


def test_a_tokenizer_without_pad_zero_is_rejected(tmp_path):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "cat": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"\[PAD\] = 0"):
        make_collate("text", tokenizer_path=str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_batches_feed_the_models(modality, tokenizer_path):
    samples = {"image": images(3), "audio": clips(), "text": texts(["the cat", "a dog sat", ""])}
    out = make_collate(modality, tokenizer_path=tokenizer_path)(samples[modality])
    vocab = Tokenizer.from_file(tokenizer_path).get_vocab_size()
    model = create_model("attention", modality, 2, vocab_size=vocab).eval()
    with torch.no_grad():
        assert model(out["x"], out["lengths"]).shape == (3, 2)


def test_batcher_runs_in_dataloader_workers():
    samples = clips((300, 500, 700, 900))
    batcher = make_collate("audio", augment=True, seed=7)
    batcher(samples)  # a generator started in the parent must not be shared by the workers

    def run() -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            samples, batch_size=2, num_workers=2, collate_fn=batcher
        )
        return [b["x"] for b in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert [b.shape for b in first] == [(2, 500), (2, 900)]
