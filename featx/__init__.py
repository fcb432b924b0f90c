"""featx: learned features from your own raw images, text and audio.

Stages: ingest (raw files -> WebDataset shards), train (Ray Train DDP), extract (Ray Data ->
Parquet), orchestrated by Prefect flows in `flows/`. The library runs without Prefect.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
