"""Pictures of the features: a 2-D map coloured by label, and grids of a dataset's images.

The map is PCA (always: cheap, linear, its axes mean something) beside t-SNE from openTSNE when
it is installed (`featx[map]`); t-SNE keeps neighbourhoods but not distances, so the two are
read together. Figures are built on `matplotlib.figure.Figure` without pyplot (no global state)
and written atomically. Images are found through the shards' stats, so a few keys cost a few
shards read, not a scan of the whole dataset.
"""

from __future__ import annotations

import io
import logging
import textwrap
import time
from pathlib import Path

import numpy as np

from featx.errors import ConfigError
from featx.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

METHODS = ("auto", "pca", "tsne")
KNN = 5  # neighbours of the neighbourhood score
LEGEND_CLASSES = 20  # more classes than this get colours but no legend
TSNE_MIN_POINTS = 10  # fewer points than this: "auto" draws PCA alone
MAX_ROWS = 8  # queries in a neighbour grid
MAX_NEIGHBOURS = 12  # neighbours drawn per query
MAX_PAIRS = 16  # pairs in a contact sheet
PAIRS_PER_ROW = 2
CELL = 1.6  # inches per image
DPI = 100
UNLABELLED = "#b0b0b0"
SPLIT_MARKERS = {"train": "o", "val": "^", "test": "s"}


# ---------------------------------------------------------------------------------------------
# the feature map


def feature_map(
    X: np.ndarray,
    df,
    out_png: str | Path,
    *,
    method: str = "auto",
    max_points: int = 20_000,
    seed: int = 0,
) -> dict:
    """Draw a 2-D map of the features `X` (N, D), rows described by `df` (`read_features`'
    columns: label, label_name, split), into `out_png`.

    `method`: "pca" draws PCA alone; "tsne" PCA and t-SNE (openTSNE required); "auto" adds
    t-SNE when openTSNE is installed. Beyond `max_points` rows a seeded random sample is drawn.

    Returns `{"png", "methods", "points" (drawn), "rows" (given), "classes",
    "explained_variance" ([PC1, PC2] fractions), "neighbourhood_score" (leave-one-out kNN-5
    accuracy of the labelled points in the last map's 2-D coordinates; None without two
    classes), "neighbourhood_scores" (per method), "chance" (the largest class's share, what
    the score is for features that keep no classes together), "seconds"}`.
    """
    t0 = time.perf_counter()
    X = np.asarray(X)
    _check_inputs(X, df, max_points)
    methods = _methods(method, min(len(X), max_points))
    rng = np.random.default_rng(seed)
    idx = np.arange(len(X))
    if len(X) > max_points:
        idx = np.sort(rng.choice(len(X), max_points, replace=False))
    x = X[idx].astype(np.float64)
    rows = df.iloc[idx]
    labels, names = _labels(rows)
    splits = _column(rows, "split", "train")

    # Centred, not standardised: feature dimensions share one scale, and dividing by each
    # one's spread would blow up the near-constant ones into noise.
    pcs, ratio = _pca(x, seed)
    maps = {"pca": pcs[:, :2]}
    if "tsne" in methods:
        maps["tsne"] = _tsne(pcs, seed)
    scores = {m: _knn_score(Y, labels) for m, Y in maps.items()}
    chance = _chance(labels)

    titles = {
        "pca": f"PCA: {ratio[0] + ratio[1]:.1%} of variance"
        f" (PC1 {ratio[0]:.1%}, PC2 {ratio[1]:.1%})",
        "tsne": f"t-SNE (openTSNE, perplexity {_perplexity(len(x)):g})",
    }
    for m, s in scores.items():
        if s is not None:
            titles[m] += f"\nkNN-{KNN} in 2-D: {s:.3f} (chance {chance:.3f})"
    fig = _map_figure(maps, titles, labels, names, splits)
    how = "coloured by label" if names else "no labels"
    fig.suptitle(f"{len(idx):,} of {len(X):,} rows, {how}", fontsize=10)
    png = _write_png(fig, out_png)
    main = scores[methods[-1]]
    return {
        "png": str(png),
        "methods": list(methods),
        "points": int(len(idx)),
        "rows": int(len(X)),
        "classes": len(names),
        "explained_variance": [float(ratio[0]), float(ratio[1])],
        "neighbourhood_score": main,
        "neighbourhood_scores": scores,
        "chance": chance,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def have_tsne() -> bool:
    """Whether openTSNE is importable (`pip install 'featx[map]'`)."""
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        return False
    return True


def _methods(method: str, n: int) -> tuple[str, ...]:
    if method not in METHODS:
        raise ConfigError([f"method={method!r} is not one of {METHODS}"])
    if method == "pca":
        return ("pca",)
    if method == "tsne":
        if not have_tsne():
            raise ConfigError(
                [
                    "method='tsne' needs openTSNE: pip install 'featx[map]' "
                    "(or use method 'pca', or 'auto' to draw PCA alone without it)"
                ]
            )
        if n < TSNE_MIN_POINTS:
            raise ValueError(f"t-SNE needs at least {TSNE_MIN_POINTS} rows; got {n}")
        return ("pca", "tsne")
    if have_tsne() and n >= TSNE_MIN_POINTS:
        return ("pca", "tsne")
    return ("pca",)


def _check_inputs(X: np.ndarray, df, max_points: int) -> None:
    if X.ndim != 2 or X.shape[1] < 2:
        raise ValueError(f"X must be a (rows, dim >= 2) matrix; got shape {X.shape}")
    if len(X) < 3:
        raise ValueError(f"a map needs at least 3 rows; got {len(X)}")
    if len(df) != len(X):
        raise ValueError(f"X has {len(X)} rows but df has {len(df)}; pass read_features' pair")
    if max_points < 3:
        raise ValueError(f"max_points={max_points} must be at least 3")
    bad = int((~np.isfinite(X).all(axis=1)).sum())
    if bad:
        raise ValueError(f"{bad} row(s) of X hold NaN or inf; re-extract or drop them first")


def _column(df, name: str, default) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), default, dtype=object)
    return df[name].to_numpy(dtype=object)


def _labels(df) -> tuple[np.ndarray, list[str]]:
    """Class index per row (-1: unlabelled) in label order, and the classes' names."""
    raw = _column(df, "label", None)
    named = _column(df, "label_name", None)
    known = [(v, n) for v, n in zip(raw, named, strict=True) if not _missing(v)]
    order = sorted({int(v) for v, _ in known})
    name_of = {int(v): n for v, n in known if not _missing(n)}
    names = [str(name_of.get(v, v)) for v in order]
    pos = {v: i for i, v in enumerate(order)}
    labels = np.array([-1 if _missing(v) else pos[int(v)] for v in raw], dtype=np.int64)
    return labels, names


def _missing(v) -> bool:
    import pandas as pd

    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def _pca(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to 50 principal components (t-SNE's input) and their explained-variance ratios."""
    from sklearn.decomposition import PCA

    k = min(50, x.shape[1], len(x))
    pca = PCA(n_components=k, random_state=seed)
    return pca.fit_transform(x), pca.explained_variance_ratio_


def _perplexity(n: int) -> float:
    # openTSNE wants 3 * perplexity neighbours per point
    return float(min(30.0, max(2.0, (n - 1) // 3)))


def _tsne(pcs: np.ndarray, seed: int) -> np.ndarray:
    from openTSNE import TSNE

    n = len(pcs)
    # Below a few thousand points the automatic learning rate (n / 12) settles in half of
    # openTSNE's 250 + 500 iterations (2,000 clustered points: the same kNN-5, 3 s not 7 s).
    # One thread below 10,000: a second one costs more in sync than it saves there, and
    # 4x more on a busy 2-core machine (measured: 300 points 1.3 s on one, 19 s on two).
    small = n <= 5000
    tsne = TSNE(
        perplexity=_perplexity(n),
        initialization="pca",  # on the PCA-50 input: PC1, PC2 rescaled, as openTSNE advises
        early_exaggeration_iter=125 if small else 250,
        n_iter=250 if small else 500,
        n_jobs=1 if n < 10_000 else 2,
        random_state=seed,
        verbose=False,
    )
    return np.asarray(tsne.fit(pcs))


def _knn_score(Y: np.ndarray, labels: np.ndarray) -> float | None:
    """Leave-one-out kNN accuracy of the labelled points in the 2-D coordinates `Y`."""
    from sklearn.neighbors import NearestNeighbors

    keep = labels >= 0
    y = labels[keep]
    if len(np.unique(y)) < 2 or len(y) <= KNN:
        return None
    # kneighbors() without X leaves each point out of its own neighbours
    nn = NearestNeighbors(n_neighbors=KNN).fit(Y[keep])
    _, ind = nn.kneighbors()
    votes = y[ind]
    counts = np.zeros((len(y), int(y.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(y)), KNN), votes.ravel()), 1)
    # ties go to the class of the nearest neighbour among the tied ones
    top = counts.max(axis=1, keepdims=True)
    tied = counts[np.arange(len(y))[:, None], votes] == top
    pred = votes[np.arange(len(y)), tied.argmax(axis=1)]
    return float(round((pred == y).mean(), 4))


def _chance(labels: np.ndarray) -> float | None:
    y = labels[labels >= 0]
    if len(np.unique(y)) < 2:
        return None
    return float(round(np.bincount(y).max() / len(y), 4))


def _class_colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


def _map_figure(maps: dict, titles: dict, labels, names: list[str], splits):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(labels)
    size = float(np.clip(12_000 / n, 2, 30))
    from matplotlib.colors import to_rgba

    colours = np.array([to_rgba(c) for c in [*_class_colours(len(names)), UNLABELLED]])
    point_colours = colours[labels]  # -1, unlabelled: the last row
    split_names = sorted(set(splits.tolist()), key=_split_rank_of)
    many_splits = len(split_names) > 1
    # unlabelled points first, underneath; held-out splits last, on top
    order = np.lexsort((labels >= 0, _split_rank(splits)))

    fig = Figure(figsize=(6 * len(maps) + 2, 6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (m, Y) in zip(axes, maps.items(), strict=True):
        for split in split_names:
            sel = order[splits[order] == split]
            ax.scatter(
                Y[sel, 0],
                Y[sel, 1],
                c=point_colours[sel],
                s=size,
                marker=SPLIT_MARKERS.get(split, "o") if many_splits else "o",
                alpha=0.75,
                linewidths=0,
            )
        ax.set_title(titles[m], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    handles = []
    if 0 < len(names) <= LEGEND_CLASSES:
        handles += [_dot(colours[i], "o", name) for i, name in enumerate(names)]
    elif names:
        axes[0].text(0.01, 0.01, f"{len(names)} classes", transform=axes[0].transAxes, fontsize=8)
    if (labels < 0).any():
        handles.append(_dot(UNLABELLED, "o", "(unlabelled)"))
    if many_splits:
        handles.append(Line2D([], [], linestyle="", label=" "))
        handles += [_dot("black", SPLIT_MARKERS.get(s, "o"), s) for s in split_names]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _split_rank_of(split) -> int:
    return list(SPLIT_MARKERS).index(split) if split in SPLIT_MARKERS else len(SPLIT_MARKERS)


def _split_rank(splits) -> np.ndarray:
    return np.array([_split_rank_of(s) for s in splits])


def _dot(colour, marker: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], marker=marker, linestyle="", color=colour, markersize=6, label=label)


def _write_png(fig, out_png) -> Path:
    """Render `fig` and publish it atomically at `out_png` (its folder is made)."""
    out = Path(out_png)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


# ---------------------------------------------------------------------------------------------
# images of an image dataset


def sample_images(dataset, keys) -> dict:
    """The images of the samples `keys` of an image dataset (a folder or URI written by
    `featx ingest`), as `{key: PIL.Image (RGB)}` in the order asked."""
    return {k: im for k, (im, _) in _read_samples(dataset, keys).items()}


def _read_samples(dataset, keys) -> dict:
    """`{key: (PIL image, label name or None)}`: each shard's stats say which keys it holds,
    so only shards holding a wanted key are read, and reading stops when all are found."""
    from PIL import Image

    from featx import storage
    from featx.dataset import decode_sample, load_card, read_stats, shard_samples

    dataset = storage.location(dataset)
    where = storage.display(dataset)
    card = load_card(dataset)
    if card.get("modality") != "image":
        raise ValueError(
            f"{where} is a {card.get('modality')} dataset; images can only be drawn from an "
            "image dataset"
        )
    wanted = list(dict.fromkeys(str(k) for k in keys))
    found: dict = {}
    todo = set(wanted)
    for shard in card.get("shards", []):
        if not todo:
            break
        tar = storage.join(dataset, shard["shard"])
        try:
            held = {e["key"] for e in read_stats(tar).get("entries", [])}
        except FileNotFoundError:
            held = todo  # no stats to go by: read the shard
        if not held & todo:
            continue
        for raw in shard_samples(tar):
            if raw["__key__"] in todo:
                sample = decode_sample(raw)
                label = sample["meta"].get("label")
                found[raw["__key__"]] = (Image.fromarray(sample["image"]), label)
                todo.discard(raw["__key__"])
                if not todo:
                    break
    if todo:
        some = ", ".join(sorted(todo)[:5])
        raise KeyError(
            f"{len(todo)} key(s) not in {where}'s {len(card.get('shards', []))} shards: {some}"
            f"{' ...' if len(todo) > 5 else ''}; keys come from the `key` column of features "
            "extracted from this dataset"
        )
    return {k: found[k] for k in wanted}


def neighbour_grid(dataset, rows, out_png: str | Path, *, titles=None) -> dict:
    """Draw one row per `[query_key, neighbour_key, ...]` in `rows`: the query (red frame),
    then its neighbours, each captioned by `titles` (a list of lists of strings shaped like
    `rows`; default: the sample's label). At most MAX_ROWS rows of MAX_NEIGHBOURS neighbours.

    Returns `{"png", "rows", "columns"}` (what was drawn)."""
    rows = [[str(k) for k in r] for r in rows]
    if not rows or any(not r for r in rows):
        raise ValueError("rows must be a non-empty list of [query_key, neighbour_key, ...]")
    shaped = titles is None or (
        len(titles) == len(rows)
        and all(len(t) == len(r) for t, r in zip(titles, rows, strict=True))
    )
    if not shaped:
        raise ValueError("titles must hold one caption per key, shaped like rows")
    if len(rows) > MAX_ROWS or any(len(r) > MAX_NEIGHBOURS + 1 for r in rows):
        log.warning(
            "neighbour grid: drawing the first %d rows of %d neighbours at most",
            MAX_ROWS,
            MAX_NEIGHBOURS,
        )
    rows = [r[: MAX_NEIGHBOURS + 1] for r in rows[:MAX_ROWS]]
    if titles is not None:
        titles = [list(t)[: len(r)] for t, r in zip(titles, rows, strict=False)]
    samples = _read_samples(dataset, [k for r in rows for k in r])

    from matplotlib.figure import Figure

    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(CELL * ncols, (CELL + 0.3) * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(r):
                ax.axis("off")
                continue
            image, label = samples[r[j]]
            if titles is not None:
                caption = str(titles[i][j])
            else:
                caption = label or r[j][:12]
                if j == 0:
                    caption = f"query: {caption}"
            _image_cell(ax, image, caption, frame="tab:red" if j == 0 else None)
    png = _write_png(fig, out_png)
    return {"png": str(png), "rows": len(rows), "columns": ncols}


def contact_sheet(dataset, pairs, out_png: str | Path) -> dict:
    """Draw near-duplicate `pairs` (`(key_a, key_b, similarity, caption)`, worst first) side
    by side, PAIRS_PER_ROW pairs a row, each titled with its similarity and caption; at most
    MAX_PAIRS pairs. Returns `{"png", "pairs"}` (how many were drawn)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to draw")
    if len(pairs) > MAX_PAIRS:
        log.warning("contact sheet: drawing the first %d of %d pairs", MAX_PAIRS, len(pairs))
    pairs = pairs[:MAX_PAIRS]
    samples = _read_samples(dataset, [str(k) for p in pairs for k in p[:2]])

    from matplotlib.figure import Figure

    per_row = min(PAIRS_PER_ROW, len(pairs))
    nrows = -(-len(pairs) // per_row)
    fig = Figure(
        figsize=(2 * CELL * per_row + 0.3 * (per_row - 1), (CELL + 0.6) * nrows),
        dpi=DPI,
        layout="constrained",
    )
    subs = np.atleast_1d(fig.subfigures(nrows, per_row, squeeze=False)).ravel()
    for sub, pair in zip(subs, pairs, strict=False):
        key_a, key_b, similarity, caption = pair
        title = f"similarity {float(similarity):.3f}" + (f" · {caption}" if caption else "")
        sub.suptitle(title, fontsize=8)
        ax_a, ax_b = sub.subplots(1, 2)
        for ax, key in ((ax_a, str(key_a)), (ax_b, str(key_b))):
            image, label = samples[key]
            _image_cell(ax, image, f"{label or ''} {key[:10]}".strip())
    for sub in subs[len(pairs) :]:
        sub.set_visible(False)
    png = _write_png(fig, out_png)
    return {"png": str(png), "pairs": len(pairs)}


def _image_cell(ax, image, caption: str, frame: str | None = None) -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(2.5)
    text = "\n".join(textwrap.wrap(caption, 22, max_lines=2, placeholder="…"))
    ax.set_title(text, fontsize=7)
