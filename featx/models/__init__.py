"""Feature-extractor models: three encoder families (cnn, rnn, attention) x three modalities.

`create_model(name, modality, num_classes, preset, **overrides)` builds one; every model has
`forward_features(x, lengths) -> (B, feature_dim)` and `forward(x, lengths) -> logits`.
`rebuild_model(model.config)` builds the architecture of a saved model again.
"""

# Importing the family modules registers them.
from featx.models import attention, cnn, rnn  # noqa: F401
from featx.models.audio import LogMel, mel_filterbank
from featx.models.model import FeatureExtractor, FeatureModel
from featx.models.registry import (
    MODALITIES,
    PRESETS,
    create_model,
    default_lr,
    list_models,
    rebuild_model,
    register_model,
)

__all__ = [
    "MODALITIES",
    "PRESETS",
    "FeatureExtractor",
    "FeatureModel",
    "LogMel",
    "create_model",
    "default_lr",
    "list_models",
    "mel_filterbank",
    "rebuild_model",
    "register_model",
]
