"""One rank's training data: its share of the shards (or of Ray Data's split), batched, on device.

Every rank takes the same number of optimizer steps however its share falls: a rank that runs
out yields None, a zero-weight step. torch, Ray and webdataset are imported where they are used,
so the driver imports this module for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx import storage

if TYPE_CHECKING:
    import torch


@dataclass
class RankData:
    """Where one rank's batches come from, per split: its shards `[(url, samples)]` with the
    default loader, or Ray Data's iterator of the split with `loader="ray"`."""

    loader: str
    sources: dict[str, Any]
    batch_size: int
    device: torch.device
    exclude: frozenset = frozenset()  # sample keys left out (the shards loader; Ray's filters)

    def batches(self, split: str, collate, seed: int | None = None, share=(0, 1)):
        """(x, lengths, labels, keys) batches of `split` on the device; `share` is (rank, world)
        for the shards loader (Ray Data's split is already this rank's)."""
        if self.loader == "ray":
            host = ray_batches(self.sources[split], collate, self.batch_size, seed)
        else:
            samples = share_of(self.sources[split], *share, seed, 8 * self.batch_size, self.exclude)
            host = prefetch(collated(samples, collate, self.batch_size))
        return to_device(host, self.device)

    def train_steps(self, collate, seed: int, rank: int, world: int, steps: int):
        """One epoch of this rank's train batches, then None (a zero-weight step) until every
        rank has stepped as often as the others."""
        batches = self.batches("train", collate, seed, (rank, world))
        if self.loader == "shards":  # shares known up front: no per-step agreement needed
            return fixed_steps(batches, steps)
        return in_step(batches, world, self.device)


def shard_lists(card: dict, dataset, splits: list[str]) -> dict[str, list[tuple[str, int]]]:
    """split -> its shards as (url, samples), from the dataset card."""
    return {
        s: [
            (str(storage.join(dataset, sh["shard"])), sh["samples"])
            for sh in card["shards"]
            if sh["split"] == s
        ]
        for s in splits
    }


def ray_batches(iterator, collate, batch_size: int, seed: int | None):
    raw_batches = iterator.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        prefetch_batches=2,
        local_shuffle_buffer_size=8 * batch_size if seed is not None else None,
        local_shuffle_seed=seed,
    )
    return (collate(rows(raw)) for raw in raw_batches)


def to_device(batches, device):
    use_cuda = device.type == "cuda"
    for batch in batches:
        x = batch["x"].pin_memory() if use_cuda else batch["x"]
        lengths = batch["lengths"]
        yield (
            x.to(device, non_blocking=True),
            None if lengths is None else lengths.to(device),
            None if batch["labels"] is None else batch["labels"].to(device),
            batch["keys"],
        )


def rows(raw: dict) -> list[dict]:
    """A Ray Data batch of raw members (columns) -> decoded sample dicts."""
    from featx.dataset import decode_sample

    cols = [c for c in raw if c != "__url__"]
    n = len(raw["__key__"])
    return [decode_sample({c: raw[c][i] for c in cols if raw[c][i] is not None}) for i in range(n)]


def share_of(
    shards: list[tuple[str, int]],
    rank: int,
    world: int,
    seed: int | None,
    buffer: int,
    exclude: frozenset = frozenset(),
):
    """Rank `rank`'s share of the samples of `shards` (url, samples): disjoint from the other
    ranks' shares, together covering every sample, and within one sample of each other in
    size, however many shards there are.

    Shards of equal size are dealt out whole, the same number to every rank; the ones left
    over (fewer than `world` of a size) are shared by sample: every `world`-th sample of them.
    A rank reads only its own shards and the shared ones, and decodes only its samples. With a
    seed, the shard order (hence which rank gets which shard) and a `buffer`-sample window are
    shuffled per epoch; every rank draws the same order from the same seed. Samples whose
    key is in `exclude` are skipped.
    """
    import random

    import webdataset as wds

    from featx.dataset import decode_sample, shard_samples

    rng = random.Random(seed)
    order = list(shards)
    if seed is not None:
        rng.shuffle(order)
    owner = owners(order, world)

    def raw():
        shared = 0  # index among the shared shards' samples, the same on every rank
        for url, _ in order:
            if owner[url] not in (rank, None):
                continue
            for s in shard_samples(url):
                if owner[url] is None:
                    shared += 1
                    if (shared - 1) % world != rank:
                        continue
                if s["__key__"] not in exclude:
                    yield s

    mine = raw()
    if seed is not None:
        # webdataset's buffer shuffle: yields once `initial` samples are in, then fills up to
        # `buffer`, so an epoch's first batch is not held back by a full buffer's reads.
        mine = wds.filters.shuffle(buffer, initial=min(buffer, 100), rng=rng)(mine)
    for s in mine:
        yield decode_sample(s)


def owners(order: list[tuple[str, int]], world: int) -> dict[str, int | None]:
    """url -> the rank that reads the whole shard, or None for a shard shared by sample."""
    by_size: dict[int, list[str]] = {}
    for url, n in order:
        by_size.setdefault(n, []).append(url)
    owner: dict[str, int | None] = {}
    for urls in by_size.values():
        whole = len(urls) // world * world
        for i, url in enumerate(urls):
            owner[url] = i % world if i < whole else None
    return owner


def collated(samples, collate, batch_size: int):
    from featx.batching import batched

    return (collate(batch) for batch in batched(samples, batch_size))


def prefetch(items, depth: int = 2):
    """Run `items` in a background thread, `depth` ahead, so decoding overlaps the step
    (Pillow and torch both release the GIL). Errors surface in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="featx-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def dummy_batch(card: dict, device):
    """A one-sample batch for a rank that got no data at all (fewer blocks than ranks)."""
    import torch

    norm = card["normalisation"]
    if card["modality"] == "image":
        size = norm["image_size"]
        x, lengths = torch.zeros(1, 3, size, size), None
    elif card["modality"] == "text":
        x, lengths = torch.ones(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    else:
        n = norm["sample_rate"] // 10
        x, lengths = torch.zeros(1, n), torch.tensor([n])
    lengths = None if lengths is None else lengths.to(device)
    return x.to(device), lengths, torch.zeros(1, dtype=torch.long, device=device), []


def fixed_steps(batches, steps: int):
    """Yield exactly `steps` items: the local batches, then None (a zero-weight step).

    With the by-sample split every rank knows the largest share from the card, so the ranks
    agree on the step count without talking; a rank never skips an all-reduce the others make.
    """
    it = iter(batches)
    for _ in range(steps):
        yield next(it, None)
    if next(it, None) is not None:
        raise RuntimeError(
            "the train shards hold more samples than dataset.json records; the dataset changed "
            "after ingest: re-run `featx ingest` on it"
        )


def in_step(batches, world: int, device):
    """Yield each local batch, then None until every rank has run out (one all-reduce a step).

    Ray's equal split would drop up to world-1 rows an epoch; an unequal split covers every
    row once, and this keeps the ranks in lock-step while their counts differ by a batch. The
    flag lives on the rank's device: NCCL (`--gpu`) refuses CPU tensors.
    """
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(flag)
        if flag.item() == 0:
            return
        yield batch


# -- the driver's side of the Ray Data loader ---------------------------------------------------


def read_split(dataset: Path, card: dict, split: str, batch_size: int, exclude=()):
    """A Ray Dataset of `split`'s shards, members as raw bytes, in batch-sized blocks, without
    the samples whose key is in `exclude`."""
    import ray

    ctx = ray.data.DataContext.get_current()
    # featx reports per epoch; Ray Data's per-execution bars would flood the terminal.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    paths = [str(storage.join(dataset, s["shard"])) for s in card["shards"] if s["split"] == split]
    # decoder=None: members stay raw bytes; featx decodes them in the worker.
    ds = ray.data.read_webdataset(paths, decoder=None, override_num_blocks=len(paths))
    # Re-chunk into batch-sized blocks (fused into the read task, zero-copy) so the streaming
    # split hands work out at batch granularity and the ranks' shares differ by a batch at most.
    return ds.map_batches(
        _Without(list(exclude)) if exclude else _identity,
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
    )


def _identity(batch):
    return batch


class _Without:
    """A batch without the rows whose key is in `keys` (picklable, for Ray Data)."""

    def __init__(self, keys: list[str]):
        self.keys = keys

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pc.invert(pc.is_in(batch["__key__"], value_set=pa.array(self.keys, pa.string())))
        return batch.filter(keep)


def split_train_only():
    """Split only `train` across workers, without dropping rows (Ray's default split is equal,
    which drops the remainder); rank 0 reads all of `val`."""
    from ray.train import DataConfig

    class SplitTrain(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = DataConfig.default_ingest_options()
                if name == "train":
                    splits = ds.streaming_split(world_size, equal=False)
                    for i, it in enumerate(splits):
                        output[i][name] = it
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return SplitTrain(datasets_to_split=["train"])
