"""Every registered model x modality honours the contract; LogMel matches a numpy reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from featx.models import (
    MODALITIES,
    PRESETS,
    LogMel,
    create_model,
    list_models,
    mel_filterbank,
)

VOCAB = 50
COMBOS = [(name, modality) for name in list_models() for modality in MODALITIES]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, modality: str, num_classes: int = 3, **kw) -> torch.nn.Module:
    return create_model(name, modality, num_classes, vocab_size=VOCAB, **kw)


def sample(modality: str, length: int, gen: torch.Generator) -> torch.Tensor:
    """One unbatched text (token ids, never the pad id) or audio (waveform in [-1, 1]) sample."""
    if modality == "text":
        return torch.randint(2, VOCAB, (length,), generator=gen)
    return torch.rand(length, generator=gen) * 2 - 1


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.numel() for s in seqs])
    x = torch.zeros(len(seqs), int(lengths.max()), dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        x[i, : s.numel()] = s
    return x, lengths


def batch(modality: str, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    if modality == "image":
        return torch.randn(size, 3, 32, 32, generator=gen), None
    lengths = [5, 9, 3, 12] if modality == "text" else [1600, 2400, 800, 3200]
    return pad([sample(modality, n, gen) for n in lengths[:size]])


@pytest.mark.parametrize("name,modality", COMBOS)
def test_shapes_and_finite(name, modality):
    model = build(name, modality).eval()
    x, lengths = batch(modality)
    with torch.no_grad():
        feats = model.forward_features(x, lengths)
        logits = model(x, lengths)
    assert feats.shape == (4, model.feature_dim)
    assert logits.shape == (4, 3)
    assert feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()


@pytest.mark.parametrize("name,modality", COMBOS)
def test_identity_and_config(name, modality):
    model = build(name, modality)
    assert (model.model_name, model.modality, model.preset) == (name, modality, "small")
    assert json.loads(json.dumps(model.config)) == model.config
    rebuilt = create_model(**json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    assert str(rebuilt) == str(model)


@pytest.mark.parametrize("name,modality", COMBOS)
def test_gradients_reach_every_parameter(name, modality):
    torch.manual_seed(0)
    model = build(name, modality).train()
    x, lengths = batch(modality)
    loss = torch.nn.functional.cross_entropy(model(x, lengths), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name,modality", COMBOS)
def test_padding_never_changes_features(name, modality):
    torch.manual_seed(0)
    model = build(name, modality).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if modality == "image":
            x = torch.randn(3, 3, 32, 32, generator=gen)
            alone = model.forward_features(x[1:2])
            together = model.forward_features(x)[1:2]
            torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
            return
        short_n, long_n = (7, 19) if modality == "text" else (2345, 5003)
        short, long = sample(modality, short_n, gen), sample(modality, long_n, gen)
        x, lengths = pad([short, long])
        together = model.forward_features(x, lengths)
        alone_short = model.forward_features(short[None], torch.tensor([short_n]))
        alone_long = model.forward_features(long[None], torch.tensor([long_n]))
        # lengths=None means "all valid", the same as passing the full length
        assert torch.equal(model.forward_features(short[None]), alone_short)
    torch.testing.assert_close(together[0:1], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1:2], alone_long, atol=1e-5, rtol=0)
    # and the garbage in padded positions is not what made it equal
    assert not torch.allclose(alone_short, alone_long, atol=1e-3)


@pytest.mark.parametrize("name", ["cnn", "rnn", "attention"])
def test_padding_never_enters_batch_statistics(name):
    """In training, extra padding changes neither the features nor BatchNorm's running stats."""
    gen = torch.Generator().manual_seed(1)
    x, lengths = pad([sample("audio", n, gen) for n in (2345, 5003)])
    wider = torch.cat([x, torch.zeros(2, 4000)], dim=1)
    outs, stats = [], []
    for inputs in (x, wider):
        torch.manual_seed(0)
        model = build(name, "audio").train()
        with torch.no_grad():
            outs.append(model.forward_features(inputs, lengths))
        stats.append([b.clone() for n, b in model.named_buffers() if n.endswith("running_var")])
    assert stats[0], "the model has no BatchNorm: the test would not test anything"
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for a, b in zip(*stats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,modality", COMBOS)
def test_seeded_builds_are_identical(name, modality):
    x, lengths = batch(modality)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build(name, modality).eval()
        with torch.no_grad():
            outs.append(model(x, lengths))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name,modality", COMBOS)
def test_checkpoint_round_trip(name, modality, tmp_path):
    torch.manual_seed(0)
    model = build(name, modality).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "featx.json").write_text(json.dumps(model.config))

    torch.manual_seed(123)  # a different init, so equality must come from the loaded weights
    fresh = create_model(**json.loads((tmp_path / "featx.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    x, lengths = batch(modality)
    with torch.no_grad():
        assert torch.equal(model(x, lengths), fresh(x, lengths))


@pytest.mark.parametrize("name,modality", COMBOS)
def test_logits_are_not_rectified(name, modality):
    model = build(name, modality).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-1.5)
        logits = model(*batch(modality))
    torch.testing.assert_close(logits, torch.full_like(logits, -1.5))


@pytest.mark.parametrize("name,modality", COMBOS)
def test_base_preset_builds(name, modality):
    small, base = build(name, modality), build(name, modality, preset="base")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(base) > 3 * n(small)
    assert base.config["preset"] == "base"


def test_cnn_takes_any_image_size():
    model = build("cnn", "image").eval()
    with torch.no_grad():
        a = model.forward_features(torch.randn(2, 3, 32, 32))
        b = model.forward_features(torch.randn(2, 3, 48, 40))
        c = model.forward_features(torch.randn(1, 3, 7, 9))
    assert a.shape == b.shape == (2, model.feature_dim)
    assert c.shape == (1, model.feature_dim)


@pytest.mark.parametrize("name", ["rnn", "attention"])
def test_patch_models_take_other_image_sizes(name):
    model = build(name, "image").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 24, 40)).shape == (2, 3)
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 4, 4))


def test_overrides_change_the_architecture():
    model = build("rnn", "text", cell="lstm", hidden=16, bidirectional=False)
    assert isinstance(model.encoder.rnn, torch.nn.LSTM)
    assert model.feature_dim == 16
    # the encoder's 16 pooled features, then the mean of the 64-wide token embeddings
    assert build("rnn", "text", hidden=16, bidirectional=False, token_mean=True).feature_dim == 80
    assert model.config["cell"] == "lstm"
    cnn = build("cnn", "image", widths=(8, 12))
    assert cnn.feature_dim == 12 and cnn.config["widths"] == [8, 12]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known models: attention, cnn, rnn"):
        build("resnet", "image")
    with pytest.raises(ValueError, match="known modalities: image, text, audio"):
        build("cnn", "video")
    with pytest.raises(ValueError, match="known presets: small, base"):
        build("cnn", "image", preset="huge")
    with pytest.raises(ValueError, match="valid fields: .*hidden"):
        build("rnn", "image", hiden=32)


def test_bad_values_are_all_reported_at_once():
    with pytest.raises(ValueError) as err:
        create_model("attention", "text", 0, d_model=30, num_heads=4)
    message = str(err.value)
    assert "num_classes=0" in message and "vocab_size" in message and "divisible" in message
    with pytest.raises(ValueError, match="cell='rnn' should be one of: gru, lstm"):
        build("rnn", "audio", cell="rnn")
    with pytest.raises(ValueError, match="hidden=-1"):
        build("rnn", "audio", hidden=-1)
    with pytest.raises(ValueError, match="dropout"):
        build("cnn", "audio", dropout=1.5)


def test_text_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        create_model("cnn", "text", 3)


def test_attention_reports_inputs_longer_than_max_len():
    model = build("attention", "text", max_len=8).eval()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 9, dtype=torch.long))


def test_presets_share_fields_and_are_json():
    for name in list_models():
        assert set(PRESETS[name]) >= {"small", "base"}
        assert json.loads(json.dumps(PRESETS[name])) == PRESETS[name]


# ---------------------------------------------------------------------------------------------
# LogMel against an independent numpy implementation


def reference_filterbank(n_freqs: int, n_mels: int, sr: int) -> np.ndarray:
    """Triangles written out filter by filter, HTK mel scale, no normalisation."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    inv = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    top = mel(sr / 2)
    edges = [inv(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_freqs):
            f = k * (sr / 2) / (n_freqs - 1)
            if lo <= f <= mid:
                fb[k, m] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                fb[k, m] = (hi - f) / (hi - mid)
    return fb


def reference_logmel(wave: np.ndarray, sr: int, n_mels: int) -> np.ndarray:
    n_fft, hop = round(0.025 * sr), round(0.010 * sr)
    padded = np.pad(wave.astype(np.float64), n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack(
        [padded[t * hop : t * hop + n_fft] * window for t in range(1 + len(wave) // hop)]
    )
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return np.log(power @ reference_filterbank(n_fft // 2 + 1, n_mels, sr) + 1e-6)


@pytest.mark.parametrize("sr,n_mels", [(16000, 40), (16000, 64), (8000, 23), (22050, 80)])
def test_filterbank_matches_reference(sr, n_mels):
    n_fft = round(0.025 * sr)
    ours = mel_filterbank(n_fft // 2 + 1, n_mels, sr).numpy()
    np.testing.assert_allclose(ours, reference_filterbank(n_fft // 2 + 1, n_mels, sr), atol=1e-6)
    assert (ours.sum(axis=0) > 0).all(), "no empty filters"


@pytest.mark.parametrize("sr", [16000, 8000])
def test_logmel_matches_reference(sr):
    wave = np.random.default_rng(0).uniform(-1, 1, size=sr // 4 + 37).astype(np.float32)
    logmel = LogMel(sample_rate=sr, n_mels=40)
    ours = logmel(torch.from_numpy(wave)[None])[0].numpy()
    ref = reference_logmel(wave, sr, 40)
    assert ours.shape == ref.shape
    assert int(logmel.frame_lengths(torch.tensor([wave.size]))) == ref.shape[0]
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    sr, n_mels = 16000, 40
    t = torch.arange(sr // 2) / sr
    logmel = LogMel(sample_rate=sr, n_mels=n_mels)
    energy = logmel((0.5 * torch.sin(2 * math.pi * freq * t))[None])[0, 2:-2].mean(dim=0)
    peak = int(energy.argmax())
    # the bin whose triangle weighs the tone's FFT bin most
    fft_bin = round(freq / (sr / 2) * (logmel.fbank.shape[0] - 1))
    assert peak == int(logmel.fbank[fft_bin].argmax())
    # and that triangle's support contains the frequency
    mel = 2595.0 * math.log10(1 + freq / 700)
    top = 2595.0 * math.log10(1 + sr / 2 / 700)
    step = top / (n_mels + 1)
    assert peak * step < mel < (peak + 2) * step


@pytest.mark.parametrize("name", ["cnn", "rnn", "attention"])
def test_text_features_count_every_token(name):
    """The token-mean part of text features is the mean of the valid tokens' embeddings: a
    repeated word moves it, a token past the length does not."""
    model = build(name, "text", token_mean=True).eval()
    bag = model.stem.embed.embedding_dim
    weight = model.stem.embed.weight
    with torch.no_grad():
        once = model.forward_features(torch.tensor([[5, 6, 7, 9]]), torch.tensor([3]))
        twice = model.forward_features(torch.tensor([[5, 6, 7, 7]]), torch.tensor([4]))
        assert torch.allclose(once[0, -bag:], weight[[5, 6, 7]].mean(0), atol=1e-6)
        assert torch.allclose(twice[0, -bag:], weight[[5, 6, 7, 7]].mean(0), atol=1e-6)
    assert model.feature_dim == model.encoder.feature_dim + bag == once.shape[1]


def test_token_mean_is_for_text_only():
    for modality in ("image", "audio"):
        plain, with_mean = build("cnn", modality), build("cnn", modality, token_mean=True)
        assert with_mean.feature_dim == plain.feature_dim


@pytest.mark.parametrize("name", ["rnn", "attention"])
def test_audio_frame_statistics_are_over_each_clips_own_frames(name):
    """The frame-statistics part of audio features is the mean and standard deviation of the
    stem's frame embeddings over a clip's valid frames: the same for a clip alone and padded
    beside a longer one, and different for different clips."""
    torch.manual_seed(0)
    model = build(name, "audio", frame_stats=True).eval()
    dim = model.stem.frame_dim
    assert model.feature_dim == model.encoder.feature_dim + 2 * dim
    gen = torch.Generator().manual_seed(1)
    short, long = sample("audio", 2345, gen), sample("audio", 5003, gen)
    x, lengths = pad([short, long])
    with torch.no_grad():
        together = model.forward_features(x, lengths)
        alone = model.forward_features(short[None], torch.tensor([2345]))
        frames, steps = model.stem(short[None], torch.tensor([2345]))
    assert together.shape[1] == model.feature_dim
    torch.testing.assert_close(together[0:1], alone, atol=1e-5, rtol=0)
    f = frames[0, : int(steps[0])]
    torch.testing.assert_close(alone[0, -2 * dim : -dim], f.mean(0), atol=1e-5, rtol=0)
    # within the epsilon that keeps the gradient of a zero deviation finite
    torch.testing.assert_close(alone[0, -dim:], f.std(0, unbiased=False), atol=1e-3, rtol=0)
    assert not torch.allclose(together[0, -2 * dim :], together[1, -2 * dim :], atol=1e-3)


def test_frame_statistics_are_for_audio_only():
    for name, modality in COMBOS:
        plain, with_stats = build(name, modality), build(name, modality, frame_stats=True)
        grows = modality == "audio"
        assert (with_stats.feature_dim > plain.feature_dim) == grows, (name, modality)


def test_cnn_audio_band_means_keep_each_band_and_each_clips_own_frames():
    """With frame statistics, the audio cnn pools each channel in each frequency band of its last
    stage over a clip's valid frames: the same for a clip alone and padded beside a longer one.
    Averaged over the bands, they are exactly the grid mean that the same weights pool without
    them; the bands themselves differ."""
    torch.manual_seed(0)
    model = build("cnn", "audio", frame_stats=True).eval()
    channels, bins = model.config["widths"][-1], 5  # 40 mel bins, halved by 3 stages
    assert model.feature_dim == channels * bins
    gen = torch.Generator().manual_seed(1)
    short, long = sample("audio", 2345, gen), sample("audio", 5003, gen)
    x, lengths = pad([short, long])
    plain = build("cnn", "audio").eval()
    # the same weights (all but the head, which reads another width), pooled over the grid
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert not plain.load_state_dict(trunk, strict=False).unexpected_keys
    with torch.no_grad():
        together = model.forward_features(x, lengths)
        alone = model.forward_features(short[None], torch.tensor([2345]))
        grid_mean = plain.forward_features(x, lengths)
    torch.testing.assert_close(together[0:1], alone, atol=1e-5, rtol=0)
    bands = together.view(2, channels, bins)
    torch.testing.assert_close(bands.mean(dim=2), grid_mean, atol=1e-5, rtol=0)
    assert (bands.std(dim=2) > 1e-3).all()  # the bands are not one number repeated
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_token_bag_is_the_tfidf_lsa_of_each_texts_own_tokens_and_pairs():
    """The token-bag part of text features is scikit-learn's sublinear tf-idf of the text's
    fitted tokens and adjacent token pairs, projected by the fitted SVD: the same for a text
    alone and padded beside a longer one; word order counts through the pairs."""
    from collections import Counter

    from sklearn.feature_extraction.text import TfidfTransformer

    from featx.recipe import fit_token_bag

    rng = np.random.default_rng(0)
    vocab, dim, columns = VOCAB, 16, 120
    # texts that repeat a few pairs, so that pairs are among the columns
    docs = [rng.integers(2, vocab, rng.integers(2, 30)).tolist() for _ in range(150)]
    docs += [[5, 6, 5, 6, 7], [6, 5, 6, 5, 7]] * 10
    fitted = fit_token_bag(docs, vocab, dim, columns)
    assert fit_token_bag(docs[:1], vocab, dim, columns) is None  # one text: no component
    model = build("cnn", "text", token_bag=True, bag_dim=dim, bag_columns=columns).eval()
    with torch.no_grad():
        for name, value in fitted.items():
            getattr(model.bag, name).copy_(value)
    assert model.feature_dim == model.encoder.feature_dim + dim

    # the reference: plain counting of what the columns name, and scikit-learn's tf-idf
    column = {int(k): i for i, k in enumerate(fitted["keys"].tolist())}
    counts = np.zeros((len(docs), columns))
    for row, d in enumerate(docs):
        found = d + [vocab + a * vocab + b for a, b in zip(d, d[1:], strict=False)]
        for key, n in Counter(k for k in found if k in column).items():
            counts[row, column[key]] = n
    pair_columns = [i for k, i in column.items() if vocab <= k < vocab * (vocab + 1)]
    assert counts[:, pair_columns].sum() > 0
    tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
    expected = torch.tensor(tfidf.transform(counts) @ fitted["proj"].numpy(), dtype=torch.float32)
    torch.testing.assert_close(model.bag.idf, torch.tensor(tfidf.idf_, dtype=torch.float32))

    x, lengths = pad([torch.tensor(d) for d in docs])
    with torch.no_grad():
        together = model.forward_features(x, lengths)[:, -dim:]
        alone = model.forward_features(x[:1, : lengths[0]], lengths[:1])[:, -dim:]
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, together[:1], atol=1e-5, rtol=1e-4)
    # the same tokens in another order: only the pairs tell them apart
    assert not torch.allclose(together[-2], together[-1], atol=1e-3)


def test_token_bag_is_for_text_only_and_not_what_training_shapes():
    for name, modality in COMBOS:
        plain, with_bag = build(name, modality), build(name, modality, token_bag=True)
        grows = modality == "text"
        assert (with_bag.feature_dim > plain.feature_dim) == grows, (name, modality)
        # the contrastive head reads the trained features only
        assert with_bag.trained_dim == plain.feature_dim
    model = build("attention", "text", token_bag=True)
    assert not any(p.requires_grad for p in model.bag.parameters())


def test_training_sets_token_mean_and_frame_stats_without_labels_and_resumes_what_was_saved(
    tmp_path,
):
    from types import SimpleNamespace

    from featx.tokenizer import fit_tokenizer
    from featx.train_loop import setup_model

    tok = tmp_path / "tokenizer.json"
    fit_tokenizer(["a small text about cats", "another text about dogs"] * 5, 300, tok)
    text = {"modality": "text", "classes": ["cats", "dogs"], "normalisation": {}}
    image = {"modality": "image", "classes": ["a", "b"], "normalisation": {}}

    def cfg(objective, model="cnn"):
        return SimpleNamespace(model=model, preset="small", seed=0, objective=objective)

    contrastive = setup_model(cfg("contrastive"), text, str(tok))
    supervised = setup_model(cfg("supervised"), text, str(tok))
    assert contrastive.token_mean and not supervised.token_mean
    assert contrastive.bag is not None and supervised.bag is None
    assert not setup_model(cfg("contrastive"), image, None).token_mean
    # and frame statistics for contrastive audio, in the families that embed frames
    audio = {"modality": "audio", "classes": ["a", "b"], "normalisation": {"sample_rate": 16000}}
    for model in ("rnn", "attention"):
        assert setup_model(cfg("contrastive", model), audio, None).frame_stats
        assert not setup_model(cfg("supervised", model), audio, None).frame_stats
    # and the cnn's means per band
    assert setup_model(cfg("contrastive"), audio, None).encoder.pool == "bands"
    assert setup_model(cfg("supervised"), audio, None).encoder.pool == "mean"
    # a checkpoint saved before a field existed resumes with the architecture it was built with
    older = (
        (text, str(tok), "token_mean", "cnn"),
        (text, str(tok), "token_bag", "rnn"),
        (audio, None, "frame_stats", "attention"),
    )
    for data, tokenizer, field, model in older:
        before = setup_model(cfg("supervised", model), data, tokenizer)
        saved = {k: v for k, v in before.config.items() if k != field}
        resumed = setup_model(cfg("contrastive", model), data, tokenizer, saved=saved)
        resumed.load_state_dict(before.state_dict())  # strict: a bag would be unexpected keys
        assert resumed.feature_dim == before.feature_dim and not resumed.config[field]


def test_a_config_saved_before_a_field_existed_rebuilds_its_architecture():
    from featx.models import rebuild_model

    torch.manual_seed(0)
    before = build("attention", "audio", freq_conv=False).eval()
    saved = {k: v for k, v in before.config.items() if k != "freq_conv"}
    rebuilt = rebuild_model(json.loads(json.dumps(saved)))
    rebuilt.load_state_dict(before.state_dict())  # strict: the convs would be missing keys
    x, lengths = batch("audio")
    with torch.no_grad():
        assert torch.equal(before(x, lengths), rebuilt.eval()(x, lengths))
    # new audio attention models have the convs, and their config says so
    assert build("attention", "audio").config["freq_conv"] is True
    assert rebuild_model(build("attention", "audio").config).stem.conv is not None
    # a contrastive audio cnn saved before band means pools its grid as it did
    before = build("cnn", "audio", frame_stats=True, band_means=False).eval()
    saved = {k: v for k, v in before.config.items() if k != "band_means"}
    rebuilt = rebuild_model(json.loads(json.dumps(saved))).eval()
    rebuilt.load_state_dict(before.state_dict())
    with torch.no_grad():
        features = rebuilt.forward_features(x, lengths)
        assert torch.equal(before.forward_features(x, lengths), features)
    assert features.shape[1] == build("cnn", "audio").feature_dim
    new = rebuild_model(build("cnn", "audio", frame_stats=True).config)
    assert new.feature_dim > features.shape[1]


@pytest.mark.parametrize("name", ["cnn", "rnn", "attention"])
def test_batch_statistics_under_bf16_autocast_match_float32(name):
    """Mixed precision trains audio models: BatchNorm's masked statistics stay in float32."""
    gen = torch.Generator().manual_seed(1)
    x, lengths = pad([sample("audio", n, gen) for n in (2345, 5003)])
    stats = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build(name, "audio").train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, lengths).float().sum().backward()
        stats.append([b for n, b in model.named_buffers() if n.endswith("running_mean")])
    for full, mixed in zip(*stats, strict=True):
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, full, atol=0.05, rtol=0.05)
