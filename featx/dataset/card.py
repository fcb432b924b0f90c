"""The dataset card, dataset.json: what a dataset holds, written last by ingest."""

from __future__ import annotations

import json

from featx.dataset.layout import CARD


def load_card(dataset) -> dict:
    """The dataset card of an ingested folder or URI, with a fix-it error when there is none."""
    from featx import storage

    try:
        return json.loads(storage.read_text(storage.join(dataset, CARD)))
    except FileNotFoundError:
        where = storage.display(dataset)
        raise FileNotFoundError(
            f"No {CARD} in {where}: did you run `featx ingest SRC {where}`?"
        ) from None
