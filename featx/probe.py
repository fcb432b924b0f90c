"""Probe: how linearly separable are extracted features? Logistic regression vs baselines.

A standardised logistic regression is fitted on the train rows and scored on val (and test), for
the extracted features and, as baselines, for features of the same architecture with random
weights (fixed seed, extracted into FEATURES_DIR/_baseline/) and for classic features of the same
samples (`featx.classic`: raw pixels, tf-idf, log-mel statistics). Trained features that do not
beat both have not learnt anything the labels care about.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featx.config import ExtractConfig, ProbeConfig
from featx.features import BASELINE_DIR, MANIFEST, read_features, read_manifest

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")


@dataclass
class ProbeResult:
    """Probe scores; the top-level numbers are on val, `splits` has val and test in full."""

    features_dir: str
    classes: list[str]  # class names of the labelled rows, sorted
    rows: dict[str, int]  # labelled rows per split (train, val, test)
    accuracy: float  # val accuracy of the probe on the features
    majority_accuracy: float  # val accuracy of always answering the commonest train class
    per_class_accuracy: dict[str, float]  # val, class name -> accuracy on that class (recall)
    baseline_accuracy: float | None = None  # val accuracy on the random-init baseline features
    baseline_per_class_accuracy: dict[str, float] = field(default_factory=dict)
    classic_accuracy: float | None = None  # val accuracy on classic features of the same samples
    classic_per_class_accuracy: dict[str, float] = field(default_factory=dict)
    classic_features: str | None = None  # what they were, e.g. "raw pixels 16x16"
    # split -> {"accuracy", "majority_accuracy", "per_class_accuracy", "baseline_accuracy",
    #           "baseline_per_class_accuracy", "classic_accuracy", "classic_per_class_accuracy"}
    #           for every labelled eval split (val, test)
    splits: dict[str, dict] = field(default_factory=dict)
    baseline_dir: str | None = None
    # with `exclude`: the probe refitted and scored without the listed samples (near-duplicates
    # and leaking val/test samples): {"file", "rows": excluded rows per split, "accuracy" (val),
    # "splits": {split: accuracy}}
    without_excluded: dict | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def probe(cfg: ProbeConfig, progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Fit a logistic-regression probe on the train rows of `cfg.features`; accuracy on val
    (and test) rows.

    The baseline is `cfg.baseline_checkpoint` if given, otherwise the features' own
    architecture with random weights (`cfg.seed`); its features are extracted from
    `cfg.dataset` (default: the one recorded in the manifest) into
    FEATURES_DIR/_baseline/features. `baseline=False` skips it. The classic baseline probes
    `featx.classic` features of the same samples of the dataset, matched to the feature rows
    by key; `classic=False` skips it. `progress(done, total)` is called as the classic
    features are computed. Build the config with `ProbeConfig.parse(features=...)`.
    """
    from featx import storage

    if storage.is_uri(cfg.features):
        # Probe a local copy (it reads every row anyway); the baseline's features go back.
        with storage.staged_output(cfg.features, last=("*.parquet",), what="probe") as local:
            result = probe(cfg.model_copy(update={"features": local}), progress)
        result.features_dir = storage.display(cfg.features)
        if result.baseline_dir:
            result.baseline_dir = storage.display(
                storage.join(cfg.features, BASELINE_DIR, "features")
            )
        return result
    t0 = time.perf_counter()
    features_dir, seed = Path(cfg.features), cfg.seed
    manifest = read_manifest(features_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"No {MANIFEST} in {features_dir}: run `featx extract DATASET --checkpoint RUN_DIR "
            f"--out {features_dir}` first"
        )
    X, df = read_features(features_dir)
    fit = _Probe.fit(X, df, features_dir, seed)
    # Both baselines read the dataset; check it once, before either starts work.
    needs = [name for name, on in (("random-init", cfg.baseline), ("classic", cfg.classic)) if on]
    source = _source_dataset(manifest, cfg.dataset, needs) if needs else None
    splits = {
        s: {
            "accuracy": fit.accuracy[s],
            "majority_accuracy": fit.majority[s],
            "per_class_accuracy": fit.per_class[s],
        }
        for s in fit.accuracy
    }
    result = ProbeResult(
        features_dir=str(features_dir),
        classes=fit.classes,
        rows=fit.rows,
        accuracy=fit.accuracy["val"],
        majority_accuracy=fit.majority["val"],
        per_class_accuracy=fit.per_class["val"],
        splits=splits,
    )
    if cfg.exclude is not None:
        from featx.dedup import read_exclusions

        drop = df["key"].isin(read_exclusions(cfg.exclude)).to_numpy()
        result.without_excluded = {
            "file": str(cfg.exclude),
            "rows": {str(k): int(v) for k, v in df["split"][drop].value_counts().items()},
            "accuracy": None,
            "splits": {},
        }
        try:
            kept = _Probe.fit(X[~drop], df[~drop].reset_index(drop=True), features_dir, seed)
            result.without_excluded.update(accuracy=kept.accuracy["val"], splits=kept.accuracy)
        except ValueError as e:  # too little left to probe (e.g. no val row): said, not fatal
            result.without_excluded["error"] = str(e)
    if cfg.baseline:
        bdir = _baseline_features(cfg, features_dir, manifest, source)
        base = _Probe.fit(*read_features(bdir), bdir, seed)
        for s, d in splits.items():
            d["baseline_accuracy"] = base.accuracy.get(s)
            d["baseline_per_class_accuracy"] = base.per_class.get(s, {})
        result.baseline_accuracy = base.accuracy["val"]
        result.baseline_per_class_accuracy = base.per_class["val"]
        result.baseline_dir = str(bdir)
    if cfg.classic:
        from featx.classic import classic_features

        feats = classic_features(source, progress=progress)
        # By key, never by position: the rows, labels and splits are exactly the probe's own.
        cfit = _Probe.fit(feats.take(df["key"]), df, features_dir, seed)
        for s, d in splits.items():
            d["classic_accuracy"] = cfit.accuracy.get(s)
            d["classic_per_class_accuracy"] = cfit.per_class.get(s, {})
        result.classic_accuracy = cfit.accuracy["val"]
        result.classic_per_class_accuracy = cfit.per_class["val"]
        result.classic_features = feats.kind
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


@dataclass
class _Probe:
    classes: list[str]
    rows: dict[str, int]
    accuracy: dict[str, float]
    majority: dict[str, float]
    per_class: dict[str, dict[str, float]]

    @classmethod
    def fit(cls, X, df, features_dir: Path, seed: int) -> _Probe:
        """Probe rows X (dense, or scipy sparse) whose key, split and labels are `df`'s."""
        from scipy import sparse
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        labelled = df["label"].notna().to_numpy()
        if not labelled.any():
            raise ValueError(
                f"no labels in {features_dir}: the dataset is unlabelled, and a probe needs "
                "class labels (ingest class folders or a manifest with a label column)"
            )
        split = df["split"].to_numpy()
        y = df["label"].to_numpy(dtype=np.float64, na_value=np.nan)
        train = labelled & (split == "train")
        evals = {s: labelled & (split == s) for s in EVAL_SPLITS if (labelled & (split == s)).any()}
        if "val" not in evals:
            raise ValueError(
                f"no labelled val rows in {features_dir}: the probe is scored on val; ingest "
                "with --val-fraction > 0 (or a manifest split column) and extract again"
            )
        if len(np.unique(y[train])) < 2:
            raise ValueError(
                f"the train rows of {features_dir} hold {len(np.unique(y[train]))} class(es); "
                "a probe needs at least two"
            )
        names = dict(zip(y[labelled].astype(int), df["label_name"][labelled], strict=True))
        # Centring would densify a sparse matrix (tf-idf): scale it only.
        scaler = StandardScaler(with_mean=not sparse.issparse(X))
        clf = make_pipeline(scaler, LogisticRegression(max_iter=5000, random_state=seed))
        clf.fit(X[train], y[train].astype(int))
        values, counts = np.unique(y[train].astype(int), return_counts=True)
        common = values[np.argmax(counts)]
        accuracy, majority, per_class = {}, {}, {}
        for s, rows in evals.items():
            truth = y[rows].astype(int)
            pred = clf.predict(X[rows])
            accuracy[s] = round(float(np.mean(pred == truth)), 4)
            majority[s] = round(float(np.mean(truth == common)), 4)
            per_class[s] = {
                str(names[c]): round(float(np.mean(pred[truth == c] == c)), 4)
                for c in sorted(np.unique(truth))
            }
        return cls(
            classes=sorted(str(n) for n in names.values()),
            rows={"train": int(train.sum()), **{s: int(r.sum()) for s, r in evals.items()}},
            accuracy=accuracy,
            majority=majority,
            per_class=per_class,
        )


def headline(probe: dict) -> str:
    """One line of a probe's val numbers (a `ProbeResult.to_dict()`), for reports and logs."""

    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    classic = (
        f"classic ({probe['classic_features']})" if probe.get("classic_features") else "classic"
    )
    line = (
        f"accuracy {f(probe['accuracy'])} vs random-init baseline "
        f"{f(probe.get('baseline_accuracy'))}, {classic} {f(probe.get('classic_accuracy'))}, "
        f"majority class {f(probe.get('majority_accuracy'))}"
    )
    if probe.get("without_excluded"):
        w = probe["without_excluded"]
        line += (
            f"; without the {sum(w['rows'].values())} excluded near-duplicates {f(w['accuracy'])}"
        )
    return line


def describe(features) -> dict:
    """What a features folder holds, without labels: rows per split, the dimension, and how
    the features spread (effective rank, uniformity, mean norm); `labelled` says whether a
    probe can score them. The report of a run on unlabelled data."""
    import torch

    from featx.contrastive import effective_rank, uniformity

    X, df = read_features(features)
    sample = torch.from_numpy(X[np.random.default_rng(0).permutation(len(X))[:4096]])
    return {
        "rows": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
        "feature_dim": int(X.shape[1]),
        "labelled": bool(df["label"].notna().any()),
        "effective_rank": round(effective_rank(sample), 2),
        "uniformity": round(uniformity(sample), 3),
        "mean_norm": round(float(np.linalg.norm(X, axis=1).mean()), 3),
    }


def describe_line(d: dict) -> str:
    rows = ", ".join(f"{k} {v}" for k, v in d["rows"].items())
    return (
        f"no labels to probe with: {rows} rows of {d['feature_dim']} floats; effective rank "
        f"{d['effective_rank']:.1f}, uniformity {d['uniformity']:.2f}, mean norm "
        f"{d['mean_norm']:.2f}"
    )


def _source_dataset(manifest: dict, dataset, needs: list[str]):
    """The dataset the features came from (`dataset`, else the manifest's), checked to exist."""
    from featx import storage
    from featx.dataset import CARD

    dataset = storage.location(dataset or manifest["dataset"])
    if not storage.exists(storage.join(dataset, CARD)):
        flags = {
            "random-init": "baseline=False (--no-baseline)",
            "classic": "classic=False (--no-classic)",
        }
        what = " and ".join(needs) + (" baselines need" if len(needs) > 1 else " baseline needs")
        raise FileNotFoundError(
            f"the {what} the dataset the features came from, and {storage.display(dataset)} "
            f"holds no {CARD}; pass dataset=<folder> (--dataset), or skip with "
            + " and ".join(flags[n] for n in needs)
        )
    return dataset


def _baseline_features(cfg: ProbeConfig, features_dir: Path, manifest: dict, dataset) -> Path:
    """Extract baseline features into FEATURES_DIR/_baseline/features (cached across runs)."""
    from featx import storage
    from featx.checkpoint import resolve_model_dir
    from featx.extract import extract

    root = features_dir / BASELINE_DIR
    model_dir = (
        resolve_model_dir(cfg.baseline_checkpoint)
        if cfg.baseline_checkpoint
        else _random_model(root / "model", manifest, dataset, cfg.seed)
    )
    if storage.is_uri(model_dir):
        model_dir = storage.local_copy(model_dir)
    out = root / "features"
    log.info("extracting baseline features with %s into %s", model_dir, out)
    extract(
        ExtractConfig.parse(
            dataset=dataset,
            checkpoint=model_dir,
            out=out,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            engine=cfg.engine,
            ray_address=cfg.ray_address,
            keep_versions=1,  # probe's cache: another baseline model replaces it
        )
    )
    return out


def _random_model(folder: Path, manifest: dict, dataset: Path, seed: int) -> Path:
    """The features' architecture with random weights from `seed`, as a model directory."""
    import json

    import torch

    from featx import storage
    from featx.checkpoint import META_FILE, MODEL_FILE, load_meta, save_model_dir
    from featx.dataset import load_card
    from featx.models import rebuild_model
    from featx.models.registry import saved_config

    source = storage.location(manifest["model_dir"])
    if storage.is_uri(source):
        source = storage.local_copy(source)
    trained = load_meta(source)
    # A text model's token bag is fitted on the data, not trained: the baseline keeps the
    # trained model's, so that it measures what training adds.
    torch.manual_seed(seed)
    model = rebuild_model(manifest["model"])
    fitted = model.fitted_keys()
    fitted_from = trained["sha256"][MODEL_FILE] if fitted else None
    if (folder / META_FILE).exists():
        meta = json.loads((folder / META_FILE).read_text())
        same = meta.get("model") == saved_config(manifest["model"])
        if same and meta.get("baseline_seed") == seed and meta.get("fitted_from") == fitted_from:
            return folder
    if fitted:
        state = torch.load(Path(source) / MODEL_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict({k: state[k] for k in fitted}, strict=False)
    card = load_card(dataset)
    # Text models must tokenise exactly like the trained model: save_model_dir copies
    # `dataset / card["tokenizer"]`, so point it at the trained model's own tokenizer.
    card = {
        **card,
        "tokenizer": trained.get("tokenizer"),
        "fingerprint": trained.get("dataset_fingerprint", card["fingerprint"]),
    }
    save_model_dir(
        folder,
        model,
        card,
        source,
        metrics={},
        extra={"baseline": "random-init", "baseline_seed": seed, "fitted_from": fitted_from},
    )
    return folder
