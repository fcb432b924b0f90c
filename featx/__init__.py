"""featx: learned features from your own raw images, text and audio.

Stages: ingest (raw files -> WebDataset shards), train (Ray Train DDP), extract (Parquet, in
this process or on Ray Data), orchestrated by Prefect flows in `flows/`. The library runs
without Prefect.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]


def __getattr__(name: str):
    # Lazy: `import featx` stays light (no pyarrow/numpy until features are read).
    if name == "read_features":
        from featx.features import read_features

        return read_features
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


__all__ += ["read_features"]
