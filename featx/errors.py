"""The errors featx raises on purpose; a leaf module, so every layer can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
