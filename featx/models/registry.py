"""timm-style registry: `@register_model` with named presets, `create_model`, `list_models`.

A preset is a flat dict of numbers written in code; `create_model(..., **overrides)` replaces
fields of it. The resolved fields go into `model.config`, so `rebuild_model(model.config)` (for
instance from `featx.json`, also one saved before a field existed) rebuilds the same architecture.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from featx.models.model import FeatureModel
from featx.models.stems import TokenBag

MODALITIES = ("image", "text", "audio")

# name -> builder(modality, cfg, vocab_size=, sample_rate=) -> (stem, encoder)
_BUILDERS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {}
# name -> check(cfg) -> list of problems, for constraints a type check cannot see
_CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {}
# Fields every family has, beside its preset's (`FeatureModel`); contrastive training turns
# the first three on. token_mean: text features also hold the mean of the token embeddings;
# other modalities ignore it. frame_stats: audio features of the families that embed frames
# (rnn, attention) also hold the mean and standard deviation of the frame embeddings; the cnn
# (with its `band_means`) pools each channel in each frequency band over time, instead of one
# mean over its grid; other modalities ignore it. token_bag: text features end with `bag_dim`
# numbers of an LSA of the text's tokens and adjacent token pairs, the `bag_columns` (at most)
# most texts hold.
COMMON: dict[str, Any] = {
    "token_mean": False,
    "frame_stats": False,
    "token_bag": False,
    "bag_dim": 1024,
    "bag_columns": 10_000,
}
# Fields added to a family's presets after models were saved, with the value that rebuilds
# those models: a config without `freq_conv` (rnn, attention) predates the audio convs.
# Likewise `band_means` (cnn): without it, contrastive audio models pooled the whole grid.
SAVED_BEFORE: dict[str, Any] = {"freq_conv": False, "band_means": False}
# name -> the peak learning rate the family trains best at (measured; `featx train --lr` wins)
_LRS: dict[str, float] = {}


def register_model(
    name: str,
    presets: dict[str, dict[str, Any]],
    check: Callable[[dict[str, Any]], list[str]] | None = None,
    lr: float = 2e-3,
) -> Callable:
    """Register a builder `(modality, cfg, *, vocab_size, sample_rate) -> (stem, encoder)`
    with its presets, a check of constraints across fields, and its default learning rate."""
    fields = {tuple(sorted(p)) for p in presets.values()}
    assert len(fields) == 1, f"presets of {name!r} must all have the same fields"
    assert "dropout" in next(iter(presets.values())), "every preset sets the head dropout"

    def wrap(builder: Callable) -> Callable:
        assert name not in _BUILDERS, f"model {name!r} registered twice"
        _BUILDERS[name] = builder
        _CHECKS[name] = check or (lambda cfg: [])
        PRESETS[name] = presets
        _LRS[name] = lr
        return builder

    return wrap


def default_lr(name: str) -> float:
    """The peak AdamW learning rate family `name` trains with unless told otherwise."""
    if name not in _LRS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _LRS[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def _type_problems(cfg: dict[str, Any], preset: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in cfg.items():
        want = preset[key]
        if isinstance(want, bool):
            ok = isinstance(value, bool)
        elif isinstance(want, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        elif isinstance(want, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(want, list):
            ok = (
                isinstance(value, list)
                and len(value) > 0
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            )
        else:
            ok = isinstance(value, type(want))
        if not ok:
            kind = "a positive int" if type(want) is int else type(want).__name__
            if isinstance(want, list):
                kind = "a non-empty list of positive ints"
            problems.append(f"{key}={value!r} should be {kind} (preset value: {want!r})")
    return problems


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved `model.config` with the fields its family gained since, at their former values."""
    fields = PRESETS.get(config.get("name"), {}).get(config.get("preset", "small"), {})
    return {**{k: v for k, v in SAVED_BEFORE.items() if k in fields}, **config}


def rebuild_model(config: dict[str, Any]) -> FeatureModel:
    """The architecture of a saved `model.config` (`featx.json`, a checkpoint), weights not loaded.

    Use it, not `create_model(**config)`, for configs that may predate a field (`SAVED_BEFORE`).
    """
    return create_model(**saved_config(config))


def create_model(
    name: str,
    modality: str,
    num_classes: int,
    preset: str = "small",
    *,
    vocab_size: int | None = None,
    sample_rate: int = 16000,
    **overrides: Any,
) -> FeatureModel:
    """Build model family `name` for `modality` with a linear head of `num_classes` logits.

    Text needs `vocab_size` (the saved tokenizer's `get_vocab_size()`); audio uses `sample_rate`.
    Raises ValueError listing every problem at once, with the known names or fields.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if modality not in MODALITIES:
        raise ValueError(
            f"unknown modality {modality!r}; known modalities: {', '.join(MODALITIES)}"
        )
    if preset not in PRESETS[name]:
        known = ", ".join(PRESETS[name])
        raise ValueError(f"unknown preset {preset!r} for model {name!r}; known presets: {known}")
    base = {**COMMON, **PRESETS[name][preset]}
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} for model {name!r}; "
            f"valid fields: {', '.join(sorted(base))}"
        )
    # lists, not tuples, so the config survives a JSON round trip unchanged
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in {**base, **overrides}.items()}

    problems = _type_problems(cfg, base)
    if not problems:
        if not 0.0 <= cfg["dropout"] < 1.0:
            problems.append(f"dropout={cfg['dropout']!r} should be in [0, 1)")
        problems += _CHECKS[name](cfg)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        problems.append(f"num_classes={num_classes!r} should be a positive int")
    if modality == "text" and (not isinstance(vocab_size, int) or vocab_size < 2):
        problems.append(
            f"text models need vocab_size (got {vocab_size!r}): pass "
            "vocab_size=Tokenizer.from_file('<dataset>/tokenizer.json').get_vocab_size()"
        )
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        problems.append(f"sample_rate={sample_rate!r} should be a positive int (Hz)")
    if problems:
        raise ValueError(f"cannot build {name!r}/{modality}: " + "; ".join(problems))

    stem, encoder = _BUILDERS[name](modality, cfg, vocab_size=vocab_size, sample_rate=sample_rate)
    bag = None
    if modality == "text" and cfg["token_bag"]:
        # at most bag_columns tokens and pairs; a small vocabulary's texts hold fewer
        columns = min(cfg["bag_columns"], 5 * vocab_size)
        bag = TokenBag(vocab_size, cfg["bag_dim"], columns)
    config = {
        "name": name,
        "modality": modality,
        "num_classes": num_classes,
        "preset": preset,
        "vocab_size": vocab_size,
        "sample_rate": sample_rate,
        **cfg,
    }
    return FeatureModel(
        stem,
        encoder,
        num_classes,
        cfg["dropout"],
        model_name=name,
        modality=modality,
        preset=preset,
        config=config,
        bag=bag,
    )
