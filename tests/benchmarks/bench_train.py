"""Training throughput: featx (Ray Train DDP, 2 workers) against a plain single-process loop.

Both train the same model on the same shards with the same global batch size and the same
cores (the baseline runs torch with every core; each featx worker gets its CPU share). Steady
state is the median samples/s over the epochs after the first; start-up is reported apart.
Usage: python tests/benchmarks/bench_train.py [--per-class 400] [--epochs 4] [--model cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_dataset(tmp: Path, per_class: int) -> Path:
    sys.path.insert(0, str(REPO / "data"))
    from make_sample_data import make_images

    from featx.config import IngestConfig
    from featx.ingest import ingest

    make_images(tmp / "src", per_class=per_class)
    out = tmp / "shards"
    ingest(IngestConfig.parse(src=tmp / "src" / "images", out=out, shard_samples=256))
    return out


def plain_loop(dataset: Path, model_name: str, batch: int, epochs: int) -> list[float]:
    """Samples/s per epoch of the simplest correct loop: read, decode, collate, step."""
    import torch
    import torch.nn.functional as F
    import webdataset as wds

    from featx.batching import make_collate
    from featx.ingest import load_card
    from featx.models import create_model
    from featx.shards import decode_sample

    torch.set_num_threads(os.cpu_count() or 1)
    card = load_card(dataset)
    urls = [str(dataset / s["shard"]) for s in card["shards"] if s["split"] == "train"]
    torch.manual_seed(0)
    model = create_model(model_name, "image", len(card["classes"]))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    collate = make_collate("image", augment=True, seed=0)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        loader = wds.WebDataset(urls, shardshuffle=False).shuffle(8 * batch).map(decode_sample)
        samples = []
        for s in loader:
            samples.append(s)
            if len(samples) == batch:
                n += _step(model, opt, collate(samples), F)
                samples = []
        if samples:
            n += _step(model, opt, collate(samples), F)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _step(model, opt, b, F) -> int:
    loss = F.cross_entropy(model(b["x"]), b["labels"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return len(b["keys"])


def featx_train(
    dataset: Path, run: Path, model: str, batch: int, epochs: int, workers: int, loader: str
):
    from featx.train import TrainConfig, train

    t0 = time.perf_counter()
    cfg = TrainConfig.parse(
        dataset=dataset,
        out=run,
        model=model,
        workers=workers,
        epochs=epochs,
        batch_size=batch // workers,
        loader=loader,
    )
    r = train(cfg)
    wall = time.perf_counter() - t0
    rates = [m["samples_per_s_total"] for m in r.metrics]
    # Everything outside the timed training epochs: Ray start-up, worker set-up, rank-0
    # validation and checkpointing.
    startup = wall - sum(m["epoch_seconds"] for m in r.metrics)
    return rates, wall, startup


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--loaders",
        default="shards,ray",
        help="featx data loaders to measure, comma-separated; the first is the headline figure",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-train-"))
    try:
        dataset = make_dataset(tmp, args.per_class)
        base = plain_loop(dataset, args.model, args.batch, args.epochs)
        base_ss = statistics.median(base[1:])
        loaders = {}
        for loader in args.loaders.split(","):
            rates, wall, startup = featx_train(
                dataset,
                tmp / f"run-{loader}",
                args.model,
                args.batch,
                args.epochs,
                args.workers,
                loader,
            )
            ss = statistics.median(rates[1:])
            loaders[loader] = {
                "samples_per_s": round(ss, 1),
                "ratio": round(ss / base_ss, 3),
                "wall_s": round(wall, 1),
                "outside_epochs_s": round(startup, 1),
                "per_epoch": [round(r, 1) for r in rates],
            }
        main_loader = args.loaders.split(",")[0]
        result = {
            "stage": "train",
            "model": args.model,
            "train_samples": _count(dataset),
            "cores": os.cpu_count(),
            "workers": args.workers,
            "global_batch": args.batch,
            "baseline_samples_per_s": round(base_ss, 1),
            "loader": main_loader,
            "featx_samples_per_s": loaders[main_loader]["samples_per_s"],
            "ratio": loaders[main_loader]["ratio"],
            "featx_outside_epochs_s": loaders[main_loader]["outside_epochs_s"],
            "baseline_per_epoch": [round(r, 1) for r in base],
            "loaders": loaders,
        }
        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _count(dataset: Path) -> int:
    from featx.ingest import load_card

    return load_card(dataset)["counts"]["train"]["total"]


if __name__ == "__main__":
    main()
