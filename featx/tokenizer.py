"""The subword tokenizer fitted on the train split at ingest and saved beside the shards.

Byte-level BPE from the `tokenizers` library: any Unicode text encodes without unknown tokens.
Id 0 is padding and id 1 unknown, which the batching code relies on.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

PAD, UNK = "[PAD]", "[UNK]"


def fit_tokenizer(texts: Iterable[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from featx.fsutil import atomic_write_text

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write_text(path, tok.to_str(pretty=False))


def shard_texts(shards: Iterable[Path]) -> Iterator[str]:
    """The `txt` members of the given shards, in order."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8")
