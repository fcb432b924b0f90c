"""Stress the contrastive loss's cross-rank gather on gloo: two CPU processes, many steps.

Each step is what a contrastive training step does with the gather: a DDP model, its
normalised outputs and a validity column gathered from both ranks with gradients, a loss over
the gathered rows, backward and an optimizer step, then some heap churn (as Python objects of a
data loader make). `--gather featx` is `featx.contrastive.gather`; `--gather functional` is
torch's functional collective `all_gather_tensor_autograd`, which featx used before and which
corrupted the heap of a rank within some 10^4 steps ("malloc(): unaligned tcache chunk
detected", "free(): invalid pointer").

Exits 0 when both ranks finish every step, and non-zero (with the rank's signal) when one dies.
Usage: python tests/benchmarks/stress_gather.py [--gather featx|functional] [--steps 30000]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, gather_impl: str, steps: int, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    if gather_impl == "functional":
        import torch.distributed._functional_collectives as fc

        fn = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd

        def gather(z):
            return fn(z.contiguous(), 0, dist.group.WORLD)
    else:
        from featx.contrastive import gather

    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        z = F.normalize(model(torch.randn(128, 64)), dim=1)
        every = gather(z)
        valid = gather(torch.ones(128, 1)).squeeze(1)
        logits = z @ every.T / 0.2
        loss = F.cross_entropy(logits, torch.arange(128) + rank * 128) * valid.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _churn = [bytearray(1000 * (j % 50)) for j in range(200)]  # noqa: F841
        if rank == 0 and step % 5000 == 0:
            print(f"{step} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gather", choices=("featx", "functional"), default="featx")
    ap.add_argument("--steps", type=int, default=30000)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    try:
        mp.spawn(_run, args=(args.gather, args.steps, _free_port()), nprocs=2)
    except mp.ProcessExitedException as e:
        print(f"{args.gather}: a rank died: {e}", flush=True)
        return 1
    print(f"{args.gather}: both ranks finished {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
