"""GPU checks, for a machine with a CUDA GPU: one short script, run by hand.

Ingests the sample data, then for every modality and model family trains (`--gpu`: NCCL, bf16
autocast) and extracts features (`--gpu`, one actor per GPU), and prints one JSON line per
run: training and extraction samples/s and, from a FLOP count of one real batch (forward and
backward, `torch.utils.flop_counter`), the model FLOP/s achieved in training as a fraction of
this GPU's measured bf16 matmul rate (an 8192^3 matmul loop). Exits 2 without CUDA.
`--cpu` runs the same code on the CPU (fp32, tiny sizes) to check the script itself.
Usage: python tests/gpu/gpu_check.py [--out /tmp/featx-gpu] [--epochs 1] [--workers 1] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def matmul_rate(device: str, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 (CUDA) or fp32 (CPU) matmul FLOP/s: the ceiling for the model's rate."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def train_flops_per_sample(run_best: Path, shards: Path, batch_size: int, device: str) -> float:
    """FLOPs of one training step (forward + backward) per sample, on a real batch."""
    import torch
    import webdataset as wds
    from torch.utils.flop_counter import FlopCounterMode

    from featx.batching import make_collate
    from featx.checkpoint import load_model
    from featx.dataset import decode_sample, load_card

    model, meta = load_model(run_best, device=device)
    model.train()
    card = load_card(shards)
    first = next(s["shard"] for s in card["shards"] if s["split"] == "train")
    raw = wds.WebDataset(str(shards / first), shardshuffle=False, empty_check=False)
    samples = [decode_sample({k: v for k, v in s.items() if k != "__url__"}) for s in raw]
    tokenizer = run_best / meta["tokenizer"] if meta.get("tokenizer") else None
    batch = make_collate(meta["modality"], tokenizer_path=tokenizer)(samples[:batch_size])
    x = batch["x"].to(device)
    lengths = None if batch["lengths"] is None else batch["lengths"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    with FlopCounterMode(display=False) as counter, autocast:
        model(x, lengths).float().sum().backward()
    return counter.get_total_flops() / len(batch["labels"])


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/featx-gpu"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpu", action="store_true", help="Check the script on the CPU.")
    args = ap.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU here; nothing to check (--cpu checks the script)", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    peak = matmul_rate(device, n=8192 if gpu else 1024, iters=20 if gpu else 3)
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "matmul_tflops": round(peak / 1e12, 2),
        "matmul_dtype": "bf16" if gpu else "fp32",
    }))  # fmt: skip

    from featx.config import ExtractConfig, IngestConfig
    from featx.extract import extract
    from featx.ingest import ingest
    from featx.train import TrainConfig, train

    for folder in ("images", "text", "audio"):
        shards = args.out / folder / "shards"
        ingest(IngestConfig.parse(src=REPO / "data" / folder, out=shards, shard_samples=64))
        for model in ("cnn", "rnn", "attention"):
            run = args.out / folder / f"run-{model}"
            t0 = time.perf_counter()
            r = train(
                TrainConfig.parse(
                    dataset=shards,
                    out=run,
                    model=model,
                    workers=args.workers,
                    gpu=gpu,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    overwrite=True,
                )
            )
            train_s = time.perf_counter() - t0
            ex = extract(
                ExtractConfig.parse(
                    dataset=shards,
                    checkpoint=run,
                    out=args.out / folder / f"features-{model}",
                    gpu=gpu,
                    workers=args.workers,
                    batch_size=256,
                    # both places the model can run: Ray Data GPU actors, and this process
                    engine="ray" if model == "cnn" else "local",
                    overwrite=True,
                )
            )
            rate = r.metrics[-1]["samples_per_s_total"]
            flops = train_flops_per_sample(run / "best", shards, args.batch_size, device)
            print(json.dumps({
                "data": folder, "model": model, "bf16": gpu,
                "train_samples_per_s": round(rate, 1),
                "train_wall_s": round(train_s, 1),
                "extract_samples_per_s": ex.samples_per_s,
                "extract_rows": ex.total_rows,
                "extract_engine": ex.engine,
                "train_gflop_per_sample": round(flops / 1e9, 3),
                "train_fraction_of_matmul_rate": round(flops * rate / peak, 4),
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
