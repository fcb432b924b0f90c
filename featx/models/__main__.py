"""Print parameter counts of every model x modality x preset: `python -m featx.models`."""

from __future__ import annotations

import argparse

from featx.models import MODALITIES, PRESETS, create_model, list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=8000, help="for text models")
    args = parser.parse_args()
    print("| model | modality | " + " | ".join(f"`{p}`" for p in PRESETS["cnn"]) + " |")
    print("| --- | --- |" + " ---: |" * len(PRESETS["cnn"]))
    for name in list_models():
        for modality in MODALITIES:
            counts = []
            for preset in PRESETS[name]:
                model = create_model(
                    name, modality, args.num_classes, preset, vocab_size=args.vocab_size
                )
                counts.append(f"{sum(p.numel() for p in model.parameters()):,}")
            print(f"| {name} | {modality} | " + " | ".join(counts) + " |")


if __name__ == "__main__":
    main()
