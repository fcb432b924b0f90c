"""Ingest's local decoding pool: `N.work` of every input, in input order, on worker processes.

Memory stays flat (a bounded window of chunks is in flight), and a worker process that dies (the
kernel's OOM killer, a crash inside a decoder library) loses nothing and stops nothing: its
unfinished inputs run again, and an input that kills its process twice becomes a `Rejected`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from featx import normalize as N
from featx.dataset import reasons as R

log = logging.getLogger(__name__)

# Chunks in flight per worker: enough queued work that a worker never waits for the parent
# (on busy cores its wake-ups come late: with 2 per worker, featx got a median 0.94x of the
# machine's 2-process ceiling, with 8 1.05x), few enough to bound memory.
IN_FLIGHT = 8

# Inputs that kill their process, with none run alone succeeding, before the environment (every
# decode dies) is blamed rather than the inputs.
CRASHES_BEFORE_ERROR = 5


SPOOL = ".decode.tmp"  # + pid: the folder of results in transit, inside the output folder


class WorkerError(RuntimeError):
    """Ingest's worker processes die whatever the input: the environment is at fault."""


@dataclass
class _Run:
    workers: int
    initargs: tuple  # for N.init_worker
    spool: str  # folder of the results in transit (see N.work_chunk)
    crashed: int = 0  # inputs run alone that killed their process twice
    ok: int = 0  # inputs run alone that did not


def decode(
    args: Iterable[tuple],
    total: int,
    workers: int,
    params: N.Params,
    layout: N.Layout,
    out: Path,
) -> Iterator:
    """Yield `N.work(arg)` for each of the `total` `args`, in order, computed on `workers`
    processes; `args` is read only as far as the chunks in flight.

    Even one worker is a separate process: a decoder that crashes takes down that process,
    never the caller, whatever the inputs or the options. Results in transit wait in a hidden
    `out/.decode.tmpPID` folder, removed at the end (`shards.remove_partials` removes one a
    killed run left)."""
    if not total:
        return
    chunk = max(1, min(8, total // (workers * 8)))
    args = iter(args)
    chunks = iter(lambda: list(islice(args, chunk)), [])
    spool = out / f"{SPOOL}{os.getpid()}"
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        e.filename = str(out)  # the folder to fix, not our hidden temporary
        raise
    try:
        results = _pooled(chunks, _Run(workers, (params, layout), str(spool)), IN_FLIGHT)
        with contextlib.closing(results):
            yield from results
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _pooled(chunks: Iterable[list[tuple]], run: _Run, in_flight: int) -> Iterator:
    """Results of every chunk, in order, with `in_flight` chunks per worker in flight.

    A process that dies breaks the pool. The unfinished inputs in flight then run again on a
    new pool, one input per worker at a time, so a one-off death costs little; if a process
    dies again there, the few inputs in flight run alone (`_isolated`) to find the one that
    kills it. The rest go on as before.
    """
    todo = iter(chunks)
    while True:
        window: deque[list] = deque()  # [chunk, future], in input order
        pool = _executor(run.workers, run.initargs)
        try:
            with _main_not_rerun():  # the first submits start the processes
                _submit(pool, window, todo, in_flight * run.workers, run.spool)
            while window:
                yield from _load(window[0][1].result())
                window.popleft()
                _submit(pool, window, todo, 1, run.spool)
            return
        except BrokenProcessPool:
            # chunks that finished before the death keep their results
            lost = [
                pair
                for chunk, f in window
                for pair in zip(chunk, _result(f) or [None] * len(chunk), strict=True)
            ]
        finally:
            # on an error or Ctrl-C, wait only for the chunks the processes already hold
            pool.shutdown(wait=True, cancel_futures=True)
        n = sum(res is None for _, res in lost)
        if in_flight > 1:
            log.warning("an ingest worker process died; running the %d unfinished inputs again", n)
            yield from _retried(lost, run)
        else:
            log.warning("an ingest worker process died again; running %d inputs alone", n)
            yield from _isolated(lost, run)


def _retried(pairs: list[tuple], run: _Run) -> Iterator:
    """The known results of `pairs` (input, result or None), and the unknown ones from a new
    pool with one input per worker in flight."""
    redo = _pooled([[a] for a, r in pairs if r is None], run, in_flight=1)
    with contextlib.closing(redo):
        for _, res in pairs:
            yield res if res is not None else next(redo)


def _isolated(pairs: list[tuple], run: _Run) -> Iterator:
    """For each (input, result or None): the result, or `N.work` of the input alone in a
    one-process pool; an input whose process dies twice is rejected (CRASHED) instead of
    stopping the run."""
    pool = None
    try:
        for arg, res in pairs:
            if res is not None:
                yield res
                continue
            for _ in range(2):
                if pool is None:
                    pool = _executor(1, run.initargs)
                try:
                    with _main_not_rerun():
                        future = pool.submit(N.work_chunk, [arg], run.spool)
                    (res,) = _load(future.result())
                    break
                except BrokenProcessPool:
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = None
            if res is not None:
                run.ok += 1
                yield res
                continue
            run.crashed += 1
            if run.crashed >= CRASHES_BEFORE_ERROR and not run.ok:
                raise WorkerError(
                    f"ingest worker processes die on every input run alone ({run.crashed} in a"
                    f" row, the last {arg[2]}): out of memory, or a broken Pillow or soundfile"
                    " install? (If those files themselves are bad, move them out of SRC.) Then"
                    " run the same command again: it resumes"
                )
            log.warning("%s killed its worker process twice; rejected", arg[2])
            yield N.Rejected(
                R.CRASHED,
                "the worker process decoding it died twice (a crash in a decoder library,"
                " or killed for memory)",
            )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool: ProcessPoolExecutor, window: deque, todo: Iterator, n: int, spool: str) -> None:
    for chunk in islice(todo, n):
        window.append([chunk, None])  # in the window before submit can fail
        window[-1][1] = pool.submit(N.work_chunk, chunk, spool)


def _result(future: Future | None) -> list | None:
    """A finished future's results, or None if it failed, was cancelled or never ran."""
    if future is None or not future.done() or future.cancelled() or future.exception():
        return None
    return _load(future.result())


def _load(path: str) -> list:
    """The results N.work_chunk left in `path` (a file of this run's spool, then deleted)."""
    with open(path, "rb") as f:
        out = N.load_results(f.read())
    os.unlink(path)
    return out


def _executor(workers: int, initargs: tuple) -> ProcessPoolExecutor:
    """A process pool whose workers import only featx.normalize (Pillow, soundfile), not
    torch. forkserver, not fork: a fork of a threaded parent (Prefect, Ray clients) can
    deadlock. A ProcessPoolExecutor, not a multiprocessing.Pool: Pool's worker-handler thread
    wakes on every result that arrives (0.3 s of the parent's CPU per 2400 photos, taken from
    the workers' two cores), and a Pool whose worker is killed waits forever for its task."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["featx.normalize"])
    # with this process's pid: its workers leave if it is killed outright (N._exit_with)
    return ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=N.init_worker, initargs=(*initargs, os.getpid())
    )


@contextlib.contextmanager
def _main_not_rerun():
    """Start pool workers without re-running the program's main module in each of them.

    forkserver children import `__main__` again (for `featx ingest`, the CLI with typer, rich
    and pydantic: 0.1-0.3 s per worker, most of a small ingest's start-up), and Python 3.11's
    "__main__" preload, meant to share that import, never receives the path. The workers
    need nothing from `__main__` (their code is featx.normalize), so it is hidden from
    multiprocessing while the workers start.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__
