"""The dataset format, owned here: what ingest writes and train, extract and probe read.

A dataset is a folder (or object-store prefix) holding `<split>/shard-NNNNNN.tar` WebDataset
shards, each with its `_stats.json`, a card (`dataset.json`), `rejected.jsonl` and, for text,
`tokenizer.json`. A sample is `<key>.<payload ext>` + `<key>.json` (+ `<key>.cls`), its key a
hash of its content and source path, its split a hash of its key.

- `layout`: file names, splits, payload extensions, keys and splits of samples;
- `reasons`: the closed set of reasons an input is rejected for;
- `shards`: the tar framing, the atomic shard writer, shard listing, `decode_sample`;
- `card`: building, writing and loading the card.
"""

from featx.dataset.card import build_card, load_card, write_card
from featx.dataset.layout import (
    CARD,
    FORMAT,
    PAYLOADS,
    REJECTED,
    SPLITS,
    TOKENIZER,
    payload_ext,
    sample_key,
    shard_name,
    split_of,
    stats_path,
)
from featx.dataset.shards import (
    ShardWriter,
    decode_sample,
    finished_shards,
    read_stats,
    remove_partials,
    shard_samples,
    tar_members,
)

__all__ = [
    "CARD",
    "FORMAT",
    "PAYLOADS",
    "REJECTED",
    "SPLITS",
    "TOKENIZER",
    "ShardWriter",
    "build_card",
    "decode_sample",
    "finished_shards",
    "load_card",
    "payload_ext",
    "read_stats",
    "remove_partials",
    "sample_key",
    "shard_samples",
    "shard_name",
    "split_of",
    "stats_path",
    "tar_members",
    "write_card",
]
