"""Feature quality on real corpora: every family against random-init, classic and majority.

For each corpus (`corpora.py`: built from what installed packages ship, nothing downloaded) the
script ingests it as a user would (`featx ingest SRC DS --val-fraction 0.2`), then for each
family and objective trains with featx's defaults (`featx train DS --out RUN --model F
--objective O`: 2 workers, early stopping), extracts, and probes: a standardised logistic
regression on the train rows, scored on val, for the trained features, the same architecture
with random weights, the classic features of the same samples (raw pixels, tf-idf, log-mel
statistics) and the majority class. The labels stay in the shards: `contrastive` training
ignores them and only the probe reads them. The baselines do not depend on the objective, so
they are probed once per corpus x family. All stages run in this process on one local Ray, as
`featx pipeline` runs them.

With `--seeds 0,1,2` each cell is trained, and the random-init baseline drawn, once per seed
(`featx train --seed S`, `featx probe --seed S`), and the table gives the mean over the seeds;
the JSON keeps each seed's figure. On a val split of a few hundred samples one seed moves a
cell by several points, so only means over seeds tell two close figures apart.

Usage: python tests/benchmarks/bench_quality.py [--corpora digits,docstrings,...]
    [--models cnn,rnn,attention] [--objectives supervised,contrastive] [--workdir DIR]
    [--json F] [--epochs N] [--text-init lsa|random] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import corpora
from benchlib import emit

OBJECTIVES = ("supervised", "contrastive", "supcon")


def run_one(
    ds: Path,
    work: Path,
    model: str,
    objective: str,
    epochs: int | None,
    baselines: bool,
    text_init: str | None = None,
    seed: int = 0,
) -> dict:
    """Train one family with one objective and seed, extract and probe; the baselines only if
    asked (the random-init baseline from the same seed)."""
    from featx.config import ExtractConfig, ProbeConfig
    from featx.dataset import load_card
    from featx.extract import extract
    from featx.probe import probe
    from featx.train import TrainConfig, train

    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    name = model if objective == "supervised" else f"{model}-{objective}"
    name += f"-seed{seed}" if seed else ""  # seed 0 keeps the names of runs before --seeds
    values = {
        "dataset": ds,
        "out": work / f"run-{name}",
        "model": model,
        "objective": objective,
        "seed": seed,
    }
    if text_init:
        values["text_init"] = text_init
    if epochs:
        values["epochs"] = epochs
    cfg = TrainConfig.parse(**values)
    cfg.check_paths()
    resolved = cfg.resolve(load_card(ds))  # what the defaults become for this data
    trained = train(cfg)
    t_train = time.perf_counter() - t0
    feats = work / f"features-{name}"
    extract(ExtractConfig.parse(dataset=ds, checkpoint=cfg.out, out=feats))
    t_extract = time.perf_counter() - t0 - t_train
    p = probe(ProbeConfig.parse(features=feats, baseline=baselines, classic=baselines, seed=seed))
    last = trained.metrics[-1] if trained.metrics else {}
    return {
        "objective": objective,
        "seed": seed,
        "trained": p.accuracy,
        "random_init": p.baseline_accuracy,
        "classic": p.classic_accuracy,
        "classic_features": p.classic_features,
        "majority": p.majority_accuracy,
        "epochs": trained.epochs,
        "max_epochs": resolved.epochs,
        "batch_size": resolved.batch_size,
        "best_val_accuracy": trained.best_val_accuracy,
        # contrastive runs: the label-free monitors of the last epoch (absent for supervised)
        **{k: last[k] for k in ("effective_rank", "uniformity", "knn_accuracy") if k in last},
        "train_s": round(t_train, 1),
        "extract_s": round(t_extract, 1),
        "probe_s": round(time.perf_counter() - t0 - t_train - t_extract, 1),
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }


def mean_over_seeds(runs: list[dict]) -> dict:
    """One objective's runs, one per seed, as one: accuracies are the mean over the seeds (each
    seed's kept in `<key>_per_seed`), the rest is the first seed's. One seed gives the same
    shape, its lists one long."""
    out = dict(runs[0])
    for key in ("trained", "random_init", "knn_accuracy", "best_val_accuracy"):
        values = [r.get(key) for r in runs]
        if all(v is not None for v in values):
            out[key] = round(sum(values) / len(values), 4)
            out[f"{key}_per_seed"] = values
    out.pop("seed")
    out["seeds"] = [r["seed"] for r in runs]
    out["epochs_per_seed"] = [r["epochs"] for r in runs]
    out["train_s"] = round(sum(r["train_s"] for r in runs) / len(runs), 1)
    return out


def merge(runs: list[dict]) -> dict:
    """One corpus x family row from its runs (one per objective, each already averaged over
    seeds); the first run probed the baselines. The top-level `trained`, `epochs`, `train_s`
    and `beats_both` are the first objective's, so a reader of the older one-objective rows
    reads them unchanged."""
    first = runs[0]
    keys = ("random_init", "random_init_per_seed", "classic", "classic_features", "majority")
    base = {k: first.get(k) for k in keys}
    best = max(base["random_init"] or 0, base["classic"] or 0)
    by_objective = {}
    for r in runs:
        o = {k: v for k, v in r.items() if k not in base and k != "objective"}
        o["beats_both"] = r["trained"] > best
        by_objective[r["objective"]] = o
    row = {**base, "objectives": by_objective}
    row.update({k: first[k] for k in ("trained", "epochs", "max_epochs", "train_s")})
    row["objective"] = first["objective"]
    row["beats_both"] = by_objective[first["objective"]]["beats_both"]
    if "supervised" in by_objective and "contrastive" in by_objective:
        gap = by_objective["supervised"]["trained"] - by_objective["contrastive"]["trained"]
        row["supervised_minus_contrastive"] = round(gap, 4)
    return row


def table(rows: list[dict]) -> str:
    objectives = list(rows[0]["objectives"]) if rows else ["supervised"]
    cols = " | ".join(objectives)
    head = (
        f"| corpus | samples | family | {cols} | random init | classic | majority | epochs "
        f"| train s |\n| --- | ---: | --- | {'---: | ' * len(objectives)}---: | ---: | ---: "
        "| ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        runs = [r["objectives"][o] for o in objectives]
        # bold: the features beat both baselines
        acc = " | ".join(
            f"**{o['trained']:.3f}**" if o["beats_both"] else f"{o['trained']:.3f}" for o in runs
        )
        epochs = " / ".join(
            f"{','.join(map(str, o['epochs_per_seed']))}/{o['max_epochs']}" for o in runs
        )
        secs = " / ".join(f"{o['train_s']:.0f}" for o in runs)
        lines.append(
            f"| {r['corpus']} | {r['samples']} | {r['model']} | {acc} "
            f"| {r['random_init']:.3f} | {r['classic']:.3f} ({r['classic_features']}) "
            f"| {r['majority']:.3f} | {epochs} | {secs} |"
        )
    return "\n".join(lines)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpora", default=",".join(corpora.CORPORA))
    ap.add_argument("--models", default="cnn,rnn,attention")
    ap.add_argument(
        "--objectives",
        default="supervised",
        help="training objectives per corpus x family, comma-separated (supervised, "
        "contrastive, supcon); the table has one accuracy column per objective",
    )
    ap.add_argument("--epochs", type=int, help="most epochs (default: featx train's default)")
    ap.add_argument(
        "--text-init",
        choices=["lsa", "random"],
        help="where text models' token embeddings start (featx train --text-init; default: "
        "featx's)",
    )
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds; each cell is the mean over them (default: 0)",
    )
    ap.add_argument("--workdir", type=Path, help="keep corpora, datasets and runs here")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    args = ap.parse_args()
    names = [c for c in args.corpora.split(",") if c]
    unknown = sorted(set(names) - set(corpora.CORPORA))
    if unknown:
        ap.error(f"unknown corpus {', '.join(unknown)}; known: {', '.join(corpora.CORPORA)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    if not seeds:
        ap.error("--seeds needs at least one seed")
    objectives = [o for o in args.objectives.split(",") if o]
    bad = sorted(set(objectives) - set(OBJECTIVES)) or (not objectives and ["(none)"])
    if bad:
        ap.error(f"unknown objective {', '.join(bad)}; known: {', '.join(OBJECTIVES)}")

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
                runs = [
                    mean_over_seeds(
                        [
                            run_one(
                                ds,
                                work / "runs" / name,
                                model,
                                o,
                                args.epochs,
                                baselines=i == 0,
                                text_init=args.text_init,
                                seed=seed,
                            )
                            for seed in seeds
                        ]
                    )
                    for i, o in enumerate(objectives)
                ]
                r = merge(runs)
                r.update(
                    corpus=name,
                    modality=corpora.MODALITY[name],
                    samples=info["samples"],
                    model=model,
                )
                rows.append(r)
                print(table([r]).splitlines()[-1], flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "objectives": objectives,
        "seeds": seeds,
        "rows": rows,
        "skipped": skipped,
        "beats_both": sum(r["beats_both"] for r in rows),
        "beats_both_by_objective": {
            o: sum(r["objectives"][o]["beats_both"] for r in rows) for o in objectives
        },
        "runs": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "table": table(rows),
    }
    print(result["table"], flush=True)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
