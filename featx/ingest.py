"""Ingest: raw files into validated, normalised, deduplicated WebDataset shards.

Inputs are processed in a fixed order (a hash of their source path, so shards mix classes) by
a process pool (results taken in order), and the parent alone writes shards. A re-run or an
incremental run ingests only what no finished shard holds, into new shards, so a killed run
resumes to the same bytes. Samples whose source was deleted or edited leave by rewriting
their shards, and small shards are merged, both kill-safe (`featx.ingest_changes`). What grows
with the number of inputs is kept on disk (`featx.ingest_plan.Plan`): memory stays flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice, tee
from pathlib import Path

from featx import __version__
from featx import ingest_changes as C
from featx import normalize as N
from featx.config import IngestConfig
from featx.dataset import (
    CARD,
    REJECTED,
    SPLITS,
    TOKENIZER,
    ShardWriter,
    build_card,
    load_card,
    payload_ext,
    remove_partials,
    split_of,
    write_card,
)
from featx.dataset import reasons as R
from featx.decode_pool import decode
from featx.errors import ConfigError
from featx.fsutil import atomic_path, exclusive, sha256_file
from featx.ingest_plan import (
    BATCH,
    Plan,
    as_os_error,
    check_compatible,
    class_map,
    detect_modality,
    light,
    pending_inputs,
    write_order,
)
from featx.sources import Item, Reject, discover
from featx.storage import is_uri

log = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    out: str
    modality: str
    ingested: int  # new samples written by this run
    total: int  # samples in the dataset after this run
    rejected: dict[str, int] = field(default_factory=dict)  # every current reject, by reason
    shards_written: int = 0
    shards_total: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    nodes: list[str] = field(default_factory=list)  # Ray node ids that decoded (a cluster run)
    # samples that left: deleted, relabelled, moved to another split, edited (the last three
    # are in `ingested` again, as they are now)
    removed: dict[str, int] = field(default_factory=dict)
    shards_rewritten: int = 0  # shards replaced (samples left, or small shards merged)

    @property
    def duplicates(self) -> int:
        return self.rejected.get(R.DUPLICATE, 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "duplicates": self.duplicates}


def ingest(cfg: IngestConfig, progress: Callable[[int, int], None] | None = None) -> IngestSummary:
    """Run ingest for `cfg`; `progress(done, total)` is called as inputs are processed."""
    if is_uri(cfg.out):
        return _ingest_to_store(cfg, progress)
    t0 = time.perf_counter()
    cfg.check_paths()
    out = cfg.out
    if cfg.overwrite and out.exists():
        _clear_output(out)
    _check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "ingest"):
        if n := remove_partials(out):
            log.info("removed %d partial file(s) left by an interrupted run", n)
        if n := C.recover(out):
            log.info("removed %d shard(s) an interrupted run had already rewritten", n)
        plan = Plan(out)
        try:
            summary = _ingest(cfg, out, plan, progress)
        except sqlite3.Error as e:
            if (error := as_os_error(e, out)) is None:
                raise
            raise error from e
        finally:
            plan.close()
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _ingest(cfg: IngestConfig, out: Path, plan: Plan, progress) -> IngestSummary:
    """Plan, decode and write, rewrite, then the rejects and the card; per-input state lives
    in `plan` (on disk), so memory does not grow with the number of inputs."""
    found = plan.load_shards(out)  # every finished shard's stats, `light`
    layout, inputs = discover(cfg.src)
    plan.add_inputs(inputs)
    modality = detect_modality(cfg, found, plan)
    classes = class_map(cfg, found, plan)
    check_compatible(cfg, found, modality)
    # Samples whose source was deleted, relabelled, moved to another split or edited leave;
    # the inputs of the last three are ingested again, as they are now.
    changes = C.find_changes(plan, found)
    pending_inputs(out, plan)
    total = write_order(plan)
    params = N.Params.of(cfg)
    extra = {"modality": modality, "classes": classes, "normalisation": cfg.normalisation()}
    writers = {
        s: ShardWriter(out, s, C.next_index(found, s), cfg.shard_samples, cfg.shard_bytes, extra)
        for s in SPLITS
    }
    ingested = 0
    runs = None
    nodes: set[str] = set()  # Ray node ids that decoded, on a cluster
    try:
        sample_layout = N.Layout(modality, classes, cfg.val_fraction, cfg.test_fraction)
        runs = _run(plan.todo(), total, params, sample_layout, cfg, out, nodes)
        rejects: list[Reject] = []  # this run's, into the plan a batch at a time
        for i, (item, res) in enumerate(_dedup(runs, plan)):
            if isinstance(res, N.Rejected):
                reject = Reject(
                    item.source, res.reason, res.detail, item.size, item.mtime_ns, res.sha256
                )
                rejects.append(reject)
                if len(rejects) >= BATCH:
                    plan.add_rejects(rejects)
                w = writers[split_of(item.source, cfg.val_fraction, cfg.test_fraction)]
                w.note_reject(reject.record())
            else:
                w = writers[res.split]
                w.write(res.tar, _entry(item, res))
                ingested += 1
            _keep_light(w)
            if progress:
                progress(i + 1, total)
        plan.add_rejects(rejects)
        for w in writers.values():
            w.finish()
            _keep_light(w)
    except BaseException as e:
        if runs is not None:
            # its pool stops now, not when the traceback is freed; the error to report is e
            with contextlib.suppress(Exception):
                runs.close()
        for w in writers.values():
            w.abort()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(out)  # a failed write() names no file; say where it was
        raise
    new_shards = [st for w in writers.values() for st in w.written]
    # Shards that lose samples, and small shards past the threshold, are rewritten: each
    # group into one new shard that names what it replaces; the card below lists the new
    # ones, and the replaced shards are deleted after it.
    finished = found + new_shards  # every finished shard's stats, without reading them again
    groups = C.plan_rewrites(finished, changes, cfg.shard_samples, cfg.compact_after, cfg.compact)
    for group in groups:
        index = C.next_index(finished, group[0]["split"])
        if (written := C.rewrite(out, group, changes, index, extra)) is not None:
            finished.append(written)
    replaced = {st["shard"] for group in groups for st in group}
    stats = sorted(
        (st for st in finished if st["shard"] not in replaced),
        key=lambda st: (SPLITS.index(st["split"]), st["shard"]),
    )
    rejected_changed = _write_if_changed(out / REJECTED, plan.reject_lines())
    # The card on disk may lag the shards: a run killed after its shards and before its
    # card. So it is rebuilt from the shards every run and rewritten when it differs.
    old = load_card(out) if (out / CARD).exists() else None
    tokenizer = None
    if modality == "text":
        # Fitted once, by the first ingest (so a dataset is usable on its own); each model
        # version then fits its own on the train shards it starts with (`featx train`).
        # The texts stream from the shards: none is held for it.
        tokenizer = TOKENIZER
        if not (out / TOKENIZER).exists():
            from featx.tokenizer import fit_tokenizer, shard_texts

            train_shards = [out / st["shard"] for st in stats if st["split"] == "train"]
            fit_tokenizer(shard_texts(train_shards), cfg.vocab_size, out / TOKENIZER)
    by_reason = plan.reject_counts()
    card = build_card(
        modality=modality,
        layout=layout,
        source=str(cfg.src),
        classes=classes,
        normalisation={
            **cfg.normalisation(),
            "payload": payload_ext(modality, cfg.image_format),
        },
        stats=stats,
        rejected=by_reason,
        tokenizer=tokenizer,
        featx_version=__version__,
    )
    if modality == "text":
        card["vocab_size"] = cfg.vocab_size
    edits = {**changes.counts}
    if groups:
        edits["shards rewritten"] = len(replaced)
    if edits or ingested:
        card["last_changes"] = {"added": ingested, **edits, "at": card["updated_at"]}
    elif old and old.get("last_changes"):
        card["last_changes"] = old["last_changes"]
    card_changed = old is None or _card_content(old) != _card_content(card)
    if card_changed:
        write_card(out, card)
    C.delete_replaced(out, groups)
    up_to_date = not new_shards and not rejected_changed and not card_changed
    return IngestSummary(
        out=str(out),
        modality=modality,
        ingested=ingested,
        total=sum(st["samples"] for st in stats),
        rejected=by_reason,
        shards_written=len(new_shards),
        shards_total=len(stats),
        up_to_date=up_to_date,
        nodes=sorted(nodes),
        removed=changes.counts,
        shards_rewritten=len(replaced),
    )


def _ingest_to_store(cfg: IngestConfig, progress) -> IngestSummary:
    """Ingest into a local staging folder and push it to the object store: a shard before its
    stats, the stats before the card, so a store reader sees only complete shards."""
    import pyarrow.fs as pafs

    from featx import storage

    uri = cfg.out
    cfg.check_paths()
    fs, root = storage.filesystem(uri)
    top = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    # featx's own bookkeeping (another writer's lock, the push listing) is not "objects"
    names = {i.base_name for i in top} - {storage.LISTING}
    names = {n for n in names if not n.startswith(".")}
    if names and not names & {CARD, *SPLITS}:
        raise ConfigError([f"out: {storage.display(uri)} holds objects but no featx shards"])
    last = ("*/*_stats.json", TOKENIZER, REJECTED, CARD)
    markers = (CARD, *SPLITS)
    with storage.staged_output(
        uri, last=last, overwrite=cfg.overwrite, markers=markers, what="ingest"
    ) as local:
        summary = ingest(cfg.model_copy(update={"out": local, "overwrite": False}), progress)
    summary.out = storage.display(uri)
    return summary


# ---------------------------------------------------------------------------------------------


def _dedup(runs: Iterator, plan: Plan, batch: int = 64) -> Iterator:
    """(item, result) in order, with a result whose normalised payload a kept sample has (in
    a finished shard, or earlier in this run) turned into a `duplicate` reject. The plan is
    asked once per `batch` results, not once per result (a query costs ~10 us)."""
    for chunk in iter(lambda: list(islice(runs, batch)), []):
        ok = [res for _, res in chunk if isinstance(res, N.Normalised)]
        kept = plan.kept([res.payload_sha256 for res in ok]) if ok else {}
        new = []
        for item, res in chunk:
            if isinstance(res, N.Normalised):
                if (dup := kept.get(res.payload_sha256)) is not None:
                    res = N.Rejected(R.DUPLICATE, f"duplicate of {dup}", res.sha256)
                else:
                    kept[res.payload_sha256] = res.key
                    new.append((res.payload_sha256, res.key))
            yield item, res
        plan.keep(new)


def _run(
    pending: Iterator[Item],
    total: int,
    params: N.Params,
    layout: N.Layout,
    cfg: IngestConfig,
    out: Path,
    nodes: set[str],
) -> Iterator:
    """Yield (item, result) for the `total` `pending` inputs in their order, decoding and
    encoding on all cores (of a Ray cluster if one is named, else of this machine); Ray node
    ids that did work go in `nodes`. Inputs are read from `pending` only as far as the work in
    flight."""
    from featx.cluster import address_from

    if not total:
        return
    if address_from(cfg.ray_address):
        yield from _run_on_ray(pending, params, layout, address_from(cfg.ray_address), nodes)
        return
    workers = cfg.workers or os.cpu_count() or 1
    workers = min(workers, max(1, total // 8))
    # the pool reads its arguments a window ahead of the results; tee holds the items between
    ahead, items = tee(pending)
    args = ((it.path, it.text, it.source, it.label, it.split) for it in ahead)
    yield from zip(items, decode(args, total, workers, params, layout, out), strict=True)


# Inputs per Ray task: enough to amortise a task's overhead (~1 ms), few enough to spread.
RAY_CHUNK = 16


def _run_on_ray(
    pending: Iterator[Item], params: N.Params, layout: N.Layout, address: str, nodes: set[str]
) -> Iterator:
    """Decode on a Ray cluster: this process reads the inputs (they need not be visible to
    the nodes) and ships their bytes to one-CPU tasks, a bounded window at a time; results
    come back in input order, so the shards are the same bytes as a local run's."""
    import ray

    from featx.cluster import init_ray

    if not ray.is_initialized():
        init_ray(address, worker_logs=False)
    # SPREAD: decode work fans out over every node, instead of piling onto the node that
    # holds the inputs' bytes (this one) while the others start their workers. One retry: a
    # chunk whose process dies twice is split, and each input tried on its own (below).
    task = ray.remote(num_cpus=1, max_retries=1, scheduling_strategy="SPREAD")(N.process_chunk)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    inflight: deque = deque()
    held = 0  # raw bytes in flight: the window closes at RAY_BYTES_IN_FLIGHT too

    def results(chunk, ref, size):
        nonlocal held
        held -= size
        ok = [(it, raw) for it, raw in chunk if not isinstance(raw, N.Rejected)]
        try:
            node, out = ray.get(ref)
            nodes.add(node)
        except ray.exceptions.WorkerCrashedError:
            out = [_alone(task, it, raw, params, layout, nodes) for it, raw in ok]
        merged = iter(out)
        return [(it, raw if isinstance(raw, N.Rejected) else next(merged)) for it, raw in chunk]

    while items := list(islice(pending, RAY_CHUNK)):
        chunk = [(it, N.read_input(it.path, it.text, params.max_input_bytes)) for it in items]
        ok = [(it, raw) for it, raw in chunk if not isinstance(raw, N.Rejected)]
        infos = [(it.source, it.label, it.split) for it, _ in ok]
        size = sum(len(raw) for _, raw in ok)
        inflight.append((chunk, task.remote([raw for _, raw in ok], infos, params, layout), size))
        held += size
        while inflight and (len(inflight) >= window or held > RAY_BYTES_IN_FLIGHT):
            yield from results(*inflight.popleft())
    while inflight:
        yield from results(*inflight.popleft())


# Raw input bytes the driver holds for tasks in flight, at most (and a window of chunks).
RAY_BYTES_IN_FLIGHT = 256 << 20


def _alone(task, it: Item, raw: bytes, params, layout, nodes: set[str]):
    """One input of a chunk whose process died twice, in a task of its own: its result, or
    `crashed the decoder` when it kills that process too (the poisonous input)."""
    import ray

    try:
        node, [res] = ray.get(task.remote([raw], [(it.source, it.label, it.split)], params, layout))
    except ray.exceptions.WorkerCrashedError:
        log.warning("%s killed its worker process twice (on Ray); rejected", it.source)
        return N.Rejected(R.CRASHED, "its decoding process died on it twice (on Ray)")
    nodes.add(node)
    return res


def _entry(item: Item, res: N.Normalised) -> dict:
    return {
        "key": res.key,
        "source": item.source,
        "label": item.label,
        "sha256": res.sha256,
        "payload_sha256": res.payload_sha256,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
    }


def _keep_light(w: ShardWriter) -> None:
    """Drop the per-sample entries of the shard `w` just finished from what it keeps (they are
    on disk in its stats); a write or finish finishes one shard at most."""
    if w.written:
        w.written[-1] = light(w.written[-1])


def _card_content(card: dict) -> dict:
    """What a card says about the data: all but when and by which featx it was written."""
    skip = ("updated_at", "featx_version", "last_changes")
    return {k: v for k, v in card.items() if k not in skip}


def _write_if_changed(path: Path, lines: Iterable[str]) -> bool:
    """Write `lines` to `path` (atomically) unless it holds exactly them already; streamed
    through a hidden temporary, so neither the old file nor the new text is held."""
    new = hashlib.sha256()
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(line)
                    new.update(line.encode("utf-8"))
            if path.exists() and sha256_file(path) == new.hexdigest():
                raise _Unchanged
    except _Unchanged:
        return False
    return True


class _Unchanged(Exception):
    """The file holds the new text already: leaving `atomic_path` by it drops the temporary."""


def _is_featx_output(out: Path) -> bool:
    return any((out / name).exists() for name in (CARD, ".lock", *SPLITS))


def _check_output_folder(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()) and not _is_featx_output(out):
        raise ConfigError(
            [f"out: {out} is not empty and holds no featx shards; choose a new or empty folder"]
        )


def _clear_output(out: Path) -> None:
    if not _is_featx_output(out):
        raise ConfigError([f"out: refusing to --overwrite {out}: it holds no featx shards"])
    for name in (*SPLITS, CARD, REJECTED, TOKENIZER):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
