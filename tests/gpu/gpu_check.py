"""GPU checks, for a machine with a CUDA GPU: one prepared script that fits in 8 minutes.

For each model family (cnn, rnn, attention) and modality (images, text, audio) of the sample
data: a 2-epoch training run (`--gpu`: Ray Train, NCCL, DDP across `--workers` GPUs, bf16
autocast), then feature extraction. One JSON line per run: training and extraction samples/s
and, from one real training step (forward and backward under featx's autocast, counted op by
op): the FLOPs per sample, the fraction of this GPU's measured bf16 matmul rate the training
reached, and the bf16 matmul share, the fraction of matmul, convolution and attention FLOPs
that ran in bf16.

Runs go most telling first (the first three cover every family and every modality). A global
deadline (`--budget-s`, 8 minutes, of which RESERVE_S for stopping) skips the runs that no
longer fit and stops one that overruns; the script still prints every run it finished and a
summary line. Exits 2 without CUDA, 1 if a run failed. `--cpu` runs the same code on the CPU
(fp32, small batches) to check the script itself.
Usage: python tests/gpu/gpu_check.py [--budget-s 480] [--epochs 2] [--only text:rnn,...] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# (data folder, model family), most telling first: each of the first three is another family
# on another modality, so a run cut short by the deadline has still seen all of them.
RUNS = [
    ("images", "cnn"),
    ("text", "attention"),
    ("audio", "rnn"),
    ("text", "rnn"),
    ("images", "attention"),
    ("audio", "cnn"),
    ("text", "cnn"),
    ("audio", "attention"),
    ("images", "rnn"),
]


# Of the budget, kept for stopping a run at the deadline and shutting Ray down.
RESERVE_S = 20.0


class OutOfTime(BaseException):  # not an Exception: featx's handlers must not swallow it
    """The deadline passed in the middle of a run."""


def fits(left_s: float, took: list[float], margin: float = 1.2) -> bool:
    """Whether another run fits in `left_s` seconds, judged by the slowest so far (`took`);
    the first run is always tried (the deadline stops it if it overruns)."""
    return left_s > 0 and (not took or left_s > margin * max(took))


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


def _rnn_flops(op, backward: bool):
    """A FLOP formula for cuDNN's fused RNN `op`, which torch's formulas do not cover: each
    weight matrix of each layer and direction multiplies one vector per token (2 FLOPs a
    weight); backward computes the input and the weight gradients, twice that."""
    import torch

    at = [a.name for a in op.default._schema.arguments].index("batch_sizes")

    def flops(*args, out_val=None, **kwargs) -> int:
        inp, weights, batch_sizes = args[0], args[1], args[at]
        tokens = inp.shape[0] if len(batch_sizes) else inp.shape[0] * inp.shape[1]  # packed?
        per_token = sum(
            2 * w.numel() for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2
        )
        return per_token * tokens * (2 if backward else 1)

    return flops


def _formulas() -> dict:
    """aten op packet -> FLOPs(*args, out_val=, **kwargs), for the ops that do the matmul
    work: torch's own formulas (mm, addmm, bmm, convolution and its backward, the fused
    attention kernels), plus the CPU flash attention kernels and cuDNN's RNN."""
    import torch
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    table = dict(flop_registry)
    table[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[
        aten._scaled_dot_product_flash_attention
    ]
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[
        aten._scaled_dot_product_flash_attention_backward
    ]
    table[aten._cudnn_rnn] = _rnn_flops(aten._cudnn_rnn, backward=False)
    table[aten._cudnn_rnn_backward] = _rnn_flops(aten._cudnn_rnn_backward, backward=True)
    return table


def _dtype(args) -> str:
    """ "bf16" when an op's operands are bfloat16, else their dtypes ("fp32", "bf16+fp32"). The
    operands: the first three floating-point tensors among its arguments (matrices, q/k/v,
    grad/input/weight), not what follows them (an attention backward's fp32 logsumexp)."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])]
    floats = [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()][:3]
    found = {names.get(t.dtype, str(t.dtype).removeprefix("torch.")) for t in floats}
    return "+".join(sorted(found)) or "none"


def matmul_flops_by_dtype(step) -> dict[str, int]:
    """Run `step()` and count the FLOPs of its matmul-like ops (as `_formulas` lists them) by
    the dtype of their inputs: what autocast really ran, op by op, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    table = _formulas()
    counts: dict[str, int] = defaultdict(int)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = table.get(func._overloadpacket)
            if formula is not None:
                counts[_dtype(args)] += int(formula(*args, **kwargs, out_val=out))
            return out

    with Count():
        step()
    return dict(counts)


def bf16_share(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return counts.get("bf16", 0) / total if total else 0.0


def train_step_counts(run_best: Path, shards: Path, batch_size: int, device: str) -> dict:
    """Matmul FLOPs by dtype of one training step of the trained model on a real batch: the
    supervised loss under the autocast featx.train_loop trains with, then backward."""
    import torch
    import webdataset as wds

    from featx.batching import make_collate
    from featx.checkpoint import load_model
    from featx.dataset import decode_sample, load_card
    from featx.train_loop import supervised_loss

    model, meta = load_model(run_best, device=device)
    model.train()
    card = load_card(shards)
    first = next(s["shard"] for s in card["shards"] if s["split"] == "train")
    raw = wds.WebDataset(str(shards / first), shardshuffle=False, empty_check=False)
    samples = [decode_sample({k: v for k, v in s.items() if k != "__url__"}) for s in raw]
    tokenizer = run_best / meta["tokenizer"] if meta.get("tokenizer") else None
    batch = make_collate(meta["modality"], tokenizer_path=tokenizer)(samples[:batch_size])
    x, labels = batch["x"].to(device), batch["labels"].to(device)
    lengths = None if batch["lengths"] is None else batch["lengths"].to(device)
    # as featx.train_loop.train_loop_per_worker builds it
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = supervised_loss(0.0)(model, x, lengths, labels, True)[0]
        loss.backward()

    return {"counts": matmul_flops_by_dtype(step), "samples": len(labels)}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/featx-gpu"))
    ap.add_argument("--data", type=Path, default=REPO / "data", help="The sample data's root.")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="Training workers, one GPU each.")
    ap.add_argument("--batch-size", type=int, default=None, help="Default: 64 (GPU), 16 (CPU).")
    ap.add_argument("--budget-s", type=float, default=480.0, help="Stop after this long.")
    ap.add_argument("--only", default="", help="Runs to do, e.g. text:rnn,images:cnn.")
    ap.add_argument("--cpu", action="store_true", help="Check the script on the CPU.")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s - RESERVE_S
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU here; nothing to check (--cpu checks the script)", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    batch_size = args.batch_size or (64 if gpu else 16)
    runs = [r for r in RUNS if not args.only or ":".join(r) in args.only.split(",")]
    peak = matmul_rate(device, n=8192 if gpu else 1024, iters=20 if gpu else 3)
    emit({
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "matmul_tflops": round(peak / 1e12, 2),
        "matmul_dtype": "bf16" if gpu else "fp32",
        "budget_s": args.budget_s,
    })  # fmt: skip

    def out_of_time(signum, frame):
        raise OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))
    names = [":".join(r) for r in runs]
    done, failed, stopped, took = [], [], None, []
    try:
        for name, (folder, model) in zip(names, runs, strict=True):
            if not fits(deadline - time.monotonic(), took):
                break
            t0 = time.monotonic()
            stopped = name
            try:
                emit(one_run(args, folder, model, gpu, device, batch_size, peak))
                done.append(name)
            except Exception as e:  # report it and go on: the other runs still say something
                if time.monotonic() >= deadline:  # OutOfTime, wrapped by C code it interrupted
                    break
                emit({"data": folder, "model": model, "error": f"{type(e).__name__}: {e}"})
                failed.append(name)
            stopped = None
            took.append(time.monotonic() - t0)
    except OutOfTime:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    emit({
        "summary": True,
        "done": done,
        "failed": failed,
        "stopped_at_deadline": stopped,
        "skipped": [n for n in names if n not in (*done, *failed, stopped)],
        "elapsed_s": round(time.monotonic() - t_start, 1),
    })  # fmt: skip
    return 1 if failed else 0


def one_run(args, folder: str, model: str, gpu: bool, device: str, batch_size: int, peak):
    """Ingest `folder` (once; later runs find it up to date), train `model` on it, extract."""
    from featx.config import ExtractConfig, IngestConfig
    from featx.extract import extract
    from featx.ingest import ingest
    from featx.train import TrainConfig, train

    shards = args.out / folder / "shards"
    ingest(IngestConfig.parse(src=args.data / folder, out=shards, shard_samples=64))
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
            batch_size=batch_size,
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
            batch_size=256 if gpu else 64,
            # both places the model can run: Ray Data GPU actors, and this process
            engine="ray" if model == "cnn" else "local",
            overwrite=True,
        )
    )
    rate = r.metrics[-1]["samples_per_s_total"]
    step = train_step_counts(run / "best", shards, batch_size, device)
    flops = sum(step["counts"].values()) / step["samples"]
    return {
        "data": folder,
        "model": model,
        "bf16_autocast": gpu,
        "train_samples_per_s": round(rate, 1),
        "train_wall_s": round(train_s, 1),
        "extract_samples_per_s": ex.samples_per_s,
        "extract_rows": ex.total_rows,
        "extract_engine": ex.engine,
        "train_gflop_per_sample": round(flops / 1e9, 4),
        "train_fraction_of_matmul_rate": round(flops * rate / peak, 4),
        "bf16_matmul_share": round(bf16_share(step["counts"]), 4),
        "matmul_gflop_by_dtype": {k: round(v / 1e9, 3) for k, v in step["counts"].items()},
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
