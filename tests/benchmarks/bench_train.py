"""Training throughput: featx (Ray Train DDP, 2 workers) against a plain single-process loop.

Both train the same model on the same shards with the same global batch size and the same
cores (the baseline runs torch with every core; each featx worker gets its CPU share). Steady
state is the median samples/s over the epochs after the first; the plain loop runs before and
after featx, and its steady state is the median over both runs. Start-up is reported apart and
split by watching RUN_DIR for checkpoints: Ray start-up (`ray.init`), Ray Train set-up (call to
the first checkpoint, less epoch 1's training), per-epoch validation + checkpoint, and the tail
(publishing `best/`, the curves, stopping the workers). Each featx run starts its own Ray and
stops it. Peak memory is the PSS of the process tree (driver, Ray daemons, workers).
With `--objective contrastive` both sides do SimCLR's work per sample: two augmented views
through the model and the projection head (`featx.contrastive.ContrastiveNet`) and NT-Xent over
the global batch, in one process for the plain loop and over both ranks' views for featx.
Usage: python tests/benchmarks/bench_train.py [--per-class 400] [--epochs 4] [--model cnn]
    [--objective supervised|contrastive] [--loaders shards,ray] [--scales 1] [--workdir DIR]
    [--json F]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import Spans, TreeMemory, emit

REPO = Path(__file__).resolve().parents[2]


def make_dataset(tmp: Path, per_class: int) -> Path:
    """Sample-style images (data/make_sample_data.py), per_class of each of 4 classes, ingested.

    Cached: a folder that already holds a dataset.json is reused.
    """
    sys.path.insert(0, str(REPO / "data"))
    from make_sample_data import make_images

    from featx.config import IngestConfig
    from featx.ingest import ingest

    out = tmp / f"shards-{per_class}"
    if (out / "dataset.json").exists():
        return out
    make_images(tmp / f"src-{per_class}", per_class=per_class)
    src = tmp / f"src-{per_class}" / "images"
    ingest(IngestConfig.parse(src=src, out=out, shard_samples=256, overwrite=True))
    shutil.rmtree(tmp / f"src-{per_class}")
    return out


def plain_loop(
    dataset: Path,
    model_name: str,
    batch: int,
    epochs: int,
    objective: str = "supervised",
    threads: int | None = None,
) -> list[float]:
    """Samples/s per epoch of the simplest correct loop: read, decode, collate, step."""
    import torch
    import torch.nn.functional as F
    import webdataset as wds

    from featx.batching import make_collate
    from featx.dataset import decode_sample, load_card
    from featx.models import create_model

    torch.set_num_threads(threads or os.cpu_count() or 1)
    card = load_card(dataset)
    urls = [str(dataset / s["shard"]) for s in card["shards"] if s["split"] == "train"]
    torch.manual_seed(0)
    model = create_model(model_name, "image", len(card["classes"]))
    if objective == "contrastive":
        from featx.config import TrainConfig
        from featx.contrastive import ContrastiveNet

        model = ContrastiveNet(model)
        step = _contrastive_step(batch, TrainConfig.model_fields["temperature"].default)
        collate = make_collate("image", augment=True, seed=0, views=2)
    else:
        step = _step
        collate = make_collate("image", augment=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        loader = wds.WebDataset(urls, shardshuffle=False).shuffle(8 * batch).map(decode_sample)
        samples = []
        for s in loader:
            samples.append(s)
            if len(samples) == batch:
                n += step(model, opt, collate(samples), F)
                samples = []
        if samples:
            n += step(model, opt, collate(samples), F)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _step(model, opt, b, F) -> int:
    loss = F.cross_entropy(model(b["x"]), b["labels"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return len(b["keys"])


def _contrastive_step(batch: int, temperature: float):
    """One process's NT-Xent step: `x` holds both views (view 1 first) of up to `batch`
    samples, padded to the global batch as featx pads each rank's share."""
    import torch

    from featx.contrastive import nt_xent, pad_views

    def step(model, opt, b, F) -> int:
        n = b["x"].shape[0] // 2
        z = pad_views(model(b["x"], b["lengths"]), n, batch)
        valid = torch.zeros(2 * batch, dtype=torch.bool)
        valid[:n] = valid[batch : batch + n] = True
        loss = nt_xent(z, valid, temperature)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(b["keys"])

    return step


class CheckpointWatch:
    """Records when each checkpoint (a folder with featx.json) first appears under RUN_DIR/ray."""

    def __init__(self, run: Path, every_s: float = 0.1) -> None:
        self.folder, self.every_s = run / "ray", every_s
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CheckpointWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for meta in self.folder.glob("checkpoint_*/featx.json"):
                self.seen.setdefault(meta.parent.name, time.perf_counter())
            self._stop.wait(self.every_s)


def featx_train(
    dataset: Path,
    run: Path,
    model: str,
    batch: int,
    epochs: int,
    workers: int,
    loader: str,
    objective: str = "supervised",
) -> dict:
    import ray

    from featx.train import TrainConfig, train

    spans = Spans()
    spans.wrap(ray, "init")  # however featx starts Ray, its start-up is timed on its own
    try:
        # 2 s: a pass over a Ray tree costs ~50 ms of CPU, taken from the epochs it samples;
        # memory here is a plateau
        with TreeMemory(every_s=2.0) as mem, CheckpointWatch(run) as ckpts:
            t0 = time.perf_counter()
            cfg = TrainConfig.parse(
                dataset=dataset,
                out=run,
                model=model,
                workers=workers,
                epochs=epochs,
                batch_size=batch // workers,
                loader=loader,
                objective=objective,
            )
            r = train(cfg)
            t_done = time.perf_counter()
            ray.shutdown()
            end = time.perf_counter()
    finally:
        spans.undo()
    rates = [m["samples_per_s_total"] for m in r.metrics]
    epoch_s = [m["epoch_seconds"] for m in r.metrics]
    times = sorted(ckpts.seen.values())
    inits = [c for c in spans.calls if c["name"] == "ray.init"]
    ray_end = inits[-1]["start"] + inits[-1]["seconds"] if inits else t0
    out = {
        "rates": rates,
        "wall_s": end - t0,
        # Everything outside the timed training epochs: Ray start-up, worker set-up, rank-0
        # validation and checkpointing, publishing, Ray shutdown.
        "outside_epochs_s": end - t0 - sum(epoch_s),
        "ray_init_s": spans.total("ray.init"),
        "ray_shutdown_s": end - t_done,
        "peak_pss_mb": mem.peak_pss_mb,
        "peak_rss_mb": mem.peak_rss_mb,
        "memory_sampler_cpu_s": mem.cpu_s,
    }
    if len(times) == len(epoch_s) >= 2:
        # The first checkpoint lands after set-up + epoch 1 + its validation and save.
        per_epoch = (times[-1] - times[0] - sum(epoch_s[1:])) / (len(times) - 1)
        out["train_setup_s"] = times[0] - ray_end - epoch_s[0] - per_epoch
        out["per_epoch_val_ckpt_s"] = per_epoch
        out["tail_s"] = t_done - times[-1]
        # The start-up a user waits through before training: Ray, then Ray Train's set-up
        # (with the config checks and the driver's work before ray.init).
        out["startup_s"] = ray_end - t0 + out["train_setup_s"]
    return out


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--model", default="cnn")
    ap.add_argument(
        "--objective",
        choices=("supervised", "contrastive"),
        default="supervised",
        help="what both sides train: cross-entropy, or NT-Xent on two views per sample",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--baseline-threads",
        type=int,
        help="torch threads of the plain loop (default: every core). On a machine other work "
        "keeps busy, torch's threads wait for each other at every op and the loop slows by "
        "3-6x; 1 thread then shows what one process really gets",
    )
    ap.add_argument(
        "--loaders",
        default="shards,ray",
        help="featx data loaders to measure, comma-separated; the first is the headline figure",
    )
    ap.add_argument(
        "--scales",
        default="1",
        help="data sizes as multiples of --per-class, comma-separated; above 1 only featx "
        "with the headline loader runs",
    )
    ap.add_argument("--workdir", type=Path, help="Keep generated datasets here (default: temp).")
    ap.add_argument("--json", type=Path, help="Also write the result to this file.")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: steady state is measured after the first epoch")
    scales = sorted({int(s) for s in args.scales.split(",")} | {1})
    load_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-train-"))
    work = args.workdir or tmp
    work.mkdir(parents=True, exist_ok=True)
    try:
        datasets = {k: make_dataset(work, args.per_class * k) for k in scales}
        dataset = datasets[1]
        plain_args = (
            dataset,
            args.model,
            args.batch,
            args.epochs,
            args.objective,
            args.baseline_threads,
        )
        # The plain loop runs before and after featx and its steady state is the median over
        # both, so a load that drifts during the run weighs on both sides alike.
        with TreeMemory(tree=False) as base_mem:
            base = plain_loop(*plain_args)
        loaders = {}
        for loader in args.loaders.split(","):
            run = featx_train(
                dataset,
                tmp / f"run-{loader}",
                args.model,
                args.batch,
                args.epochs,
                args.workers,
                loader,
                args.objective,
            )
            ss = statistics.median(run["rates"][1:])
            loaders[loader] = {
                "samples_per_s": round(ss, 1),
                **{k: round(v, 2) for k, v in run.items() if k != "rates"},
                "per_epoch": [round(r, 1) for r in run["rates"]],
            }
        base_after = plain_loop(*plain_args)
        base_ss = statistics.median(base[1:] + base_after[1:])
        for lo in loaders.values():
            lo["ratio"] = round(lo["samples_per_s"] / base_ss, 3)
        main_loader = args.loaders.split(",")[0]
        head = loaders[main_loader]
        growth = {1: head}
        for k in scales[1:]:
            run = featx_train(
                datasets[k],
                tmp / f"run-{main_loader}-{k}x",
                args.model,
                args.batch,
                args.epochs,
                args.workers,
                main_loader,
                args.objective,
            )
            growth[k] = {
                "samples_per_s": round(statistics.median(run["rates"][1:]), 1),
                **{k2: round(v, 2) for k2, v in run.items() if k2 != "rates"},
            }
        result = {
            "stage": "train",
            "model": args.model,
            "objective": args.objective,
            "train_samples": _count(dataset),
            "epochs": args.epochs,
            "cores": os.cpu_count(),
            "workers": args.workers,
            "global_batch": args.batch,
            "baseline_samples_per_s": round(base_ss, 1),
            "baseline_threads": args.baseline_threads or os.cpu_count(),
            "loader": main_loader,
            "featx_samples_per_s": head["samples_per_s"],
            "ratio": head["ratio"],
            "featx_outside_epochs_s": head["outside_epochs_s"],
            "featx_startup_s": head.get("startup_s"),
            "featx_ray_init_s": head["ray_init_s"],
            "featx_train_setup_s": head.get("train_setup_s"),
            "featx_peak_pss_mb": head["peak_pss_mb"],
            "baseline_peak_pss_mb": base_mem.peak_pss_mb,
            "baseline_per_epoch": [round(r, 1) for r in base],
            "baseline_after_per_epoch": [round(r, 1) for r in base_after],
            "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "loaders": loaders,
            # Cost growth of featx (headline loader): wall seconds and peak PSS per data size.
            "scales": {
                f"{k}x": {
                    "samples": _count(datasets[k]),
                    "seconds": g["wall_s"],
                    "samples_per_s": g["samples_per_s"],
                    "outside_epochs_s": g["outside_epochs_s"],
                    "peak_pss_mb": g["peak_pss_mb"],
                }
                for k, g in growth.items()
            },
        }
        return emit(result, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _count(dataset: Path) -> int:
    from featx.dataset import load_card

    return load_card(dataset)["counts"]["train"]["total"]


if __name__ == "__main__":
    main()
