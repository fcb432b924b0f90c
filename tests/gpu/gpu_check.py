"""GPU checks, for a machine with a CUDA GPU: one short script, run by hand.

Ingests the sample data, trains each model family for one epoch with `--gpu` (NCCL, bf16
autocast) on every modality, and prints samples/s per run as JSON lines. Exits 2 without CUDA.
Usage: python tests/gpu/gpu_check.py [--out /tmp/featx-gpu] [--epochs 1] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/featx-gpu"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))

    from featx.config import IngestConfig
    from featx.ingest import ingest
    from featx.train import TrainConfig, train

    for folder in ("images", "text", "audio"):
        shards = args.out / folder / "shards"
        ingest(IngestConfig.parse(src=REPO / "data" / folder, out=shards, shard_samples=64))
        for model in ("cnn", "rnn", "attention"):
            t0 = time.perf_counter()
            r = train(
                TrainConfig.parse(
                    dataset=shards,
                    out=args.out / folder / f"run-{model}",
                    model=model,
                    workers=args.workers,
                    gpu=True,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    overwrite=True,
                )
            )
            last = r.metrics[-1]
            print(json.dumps({
                "stage": "train", "data": folder, "model": model, "bf16": True,
                "samples_per_s": round(last["samples_per_s_total"], 1),
                "val_accuracy": last.get("val_accuracy"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
