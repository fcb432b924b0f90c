"""Why an input was not ingested: the closed set of reasons rejected.jsonl and the card use,
so users can group and count them."""

from __future__ import annotations

EMPTY = "empty"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
NOT_DECODABLE = "not decodable"
UNSUPPORTED = "unsupported format"
BOMB = "decompression bomb"
NOT_UTF8 = "not UTF-8"
BINARY_TEXT = "binary text"
TOO_SHORT = "too short"
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"
SYMLINK_ESCAPE = "symlink escaping SRC"
BROKEN_SYMLINK = "broken symlink"
SYMLINK_DIR = "symlinked folder not followed"
PATH_ESCAPE = "path escaping manifest folder"
MISSING = "missing"
BAD_ROW = "bad manifest row"
OUTSIDE_CLASSES = "outside class folders"
HIDDEN = "hidden file"
CHANGED = "changed after ingest"
CRASHED = "crashed the decoder"  # its process died on it twice
OUT_OF_MEMORY = "out of memory"
TOO_LARGE = "too large"  # over --max-input-bytes: never read whole

# Rejects that may not happen again: the next run tries the input again instead of taking the
# reject from the cache (a `chmod` fixes an unreadable file without changing its mtime).
TRANSIENT = frozenset({UNREADABLE, CRASHED, OUT_OF_MEMORY})

REASONS = frozenset(
    {
        EMPTY, NOT_UTF8, CORRUPT, TRUNCATED, NOT_DECODABLE, UNSUPPORTED, BOMB, BINARY_TEXT,
        TOO_SHORT, UNREADABLE, DUPLICATE, SYMLINK_ESCAPE, BROKEN_SYMLINK, SYMLINK_DIR,
        PATH_ESCAPE, MISSING, BAD_ROW, OUTSIDE_CLASSES, HIDDEN, CHANGED, CRASHED, OUT_OF_MEMORY,
        TOO_LARGE,
    }
)  # fmt: skip
