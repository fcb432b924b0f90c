"""Feature quality on real corpora: every family against random-init, classic and majority.

For each corpus (`corpora.py`: built from what installed packages ship, nothing downloaded) the
script ingests it as a user would (`featx ingest SRC DS --val-fraction 0.2`), then for each
family trains with featx's defaults (`featx train DS --out RUN --model F`: 2 workers, early
stopping), extracts, and probes: a standardised logistic regression on the train rows, scored
on val, for the trained features, the same architecture with random weights, the classic
features of the same samples (raw pixels, tf-idf, log-mel statistics) and the majority class.
All stages run in this process on one local Ray, as `featx pipeline` runs them.

Usage: python tests/benchmarks/bench_quality.py [--corpora digits,docstrings,...]
    [--models cnn,rnn,attention] [--workdir DIR] [--json F] [--epochs N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import corpora
from benchlib import emit


def run_one(ds: Path, work: Path, model: str, epochs: int | None) -> dict:
    from featx.config import ExtractConfig, ProbeConfig
    from featx.extract import extract
    from featx.probe import probe
    from featx.train import TrainConfig, train

    t0 = time.perf_counter()
    values = {"dataset": ds, "out": work / f"run-{model}", "model": model}
    if epochs:
        values["epochs"] = epochs
    from featx.dataset import load_card

    cfg = TrainConfig.parse(**values)
    cfg.check_paths()
    resolved = cfg.resolve(load_card(ds))  # what the defaults become for this data
    trained = train(cfg)
    t_train = time.perf_counter() - t0
    feats = work / f"features-{model}"
    extract(ExtractConfig.parse(dataset=ds, checkpoint=cfg.out, out=feats))
    t_extract = time.perf_counter() - t0 - t_train
    p = probe(ProbeConfig.parse(features=feats))
    return {
        "model": model,
        "trained": p.accuracy,
        "random_init": p.baseline_accuracy,
        "classic": p.classic_accuracy,
        "classic_features": p.classic_features,
        "majority": p.majority_accuracy,
        "epochs": trained.epochs,
        "max_epochs": resolved.epochs,
        "batch_size": resolved.batch_size,
        "best_val_accuracy": trained.best_val_accuracy,
        "train_s": round(t_train, 1),
        "extract_s": round(t_extract, 1),
        "probe_s": round(time.perf_counter() - t0 - t_train - t_extract, 1),
        "beats_both": p.accuracy > max(p.baseline_accuracy or 0, p.classic_accuracy or 0),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| corpus | samples | family | trained | random init | classic | majority | epochs "
        "| train s |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        best = max(r["random_init"] or 0, r["classic"] or 0)
        mark = "**" if r["trained"] > best else ""
        lines.append(
            f"| {r['corpus']} | {r['samples']} | {r['model']} | {mark}{r['trained']:.3f}{mark} "
            f"| {r['random_init']:.3f} | {r['classic']:.3f} ({r['classic_features']}) "
            f"| {r['majority']:.3f} | {r['epochs']}/{r['max_epochs']} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpora", default=",".join(corpora.CORPORA))
    ap.add_argument("--models", default="cnn,rnn,attention")
    ap.add_argument("--epochs", type=int, help="most epochs (default: featx train's default)")
    ap.add_argument("--workdir", type=Path, help="keep corpora, datasets and runs here")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    args = ap.parse_args()
    names = [c for c in args.corpora.split(",") if c]
    unknown = sorted(set(names) - set(corpora.CORPORA))
    if unknown:
        ap.error(f"unknown corpus {', '.join(unknown)}; known: {', '.join(corpora.CORPORA)}")

    import ray

    from featx.config import IngestConfig
    from featx.ingest import ingest

    tmp = Path(tempfile.mkdtemp(prefix="featx-bench-quality-"))
    work = args.workdir or tmp
    rows, skipped = [], {}
    t0 = time.perf_counter()
    try:
        for name in names:
            try:
                info = corpora.BUILDERS[name](work / "corpora")
            except RuntimeError as e:  # a corpus whose source this machine lacks
                skipped[name] = str(e)
                print(f"skipped {name}: {e}", flush=True)
                continue
            ds = work / "datasets" / name
            if not (ds / "dataset.json").exists():
                ingest(IngestConfig.parse(src=work / "corpora" / name, out=ds, val_fraction=0.2))
            for model in args.models.split(","):
                r = run_one(ds, work / "runs" / name, model, args.epochs)
                r.update(corpus=name, modality=corpora.MODALITY[name], samples=info["samples"])
                rows.append(r)
                print(table([r]).splitlines()[-1], flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "rows": rows,
        "skipped": skipped,
        "beats_both": sum(r["beats_both"] for r in rows),
        "runs": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "table": table(rows),
    }
    print(result["table"], flush=True)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
