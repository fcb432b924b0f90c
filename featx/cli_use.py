"""The `featx` commands that use extracted features: index, neighbors, dedup, map, export."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from featx.cli_parts import (
    RAY_ENV,
    config_command,
    console,
    parse,
    progress_bar,
    write_summary,
)
from featx.config import DedupConfig, ExportConfig, IndexConfig, MapConfig, NeighborsConfig

SUMMARY_JSON = typer.Option(
    None, "--summary-json", help="Also write the run's summary as JSON to this file."
)


def register(app: typer.Typer) -> None:
    @config_command(app, IndexConfig, arguments=("features",), envvars=RAY_ENV)
    def index(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
        """Build the nearest-neighbour index of the current feature version (FAISS).

        The index lives in FEATURES/versions/<current>/_index/, beside the parts it covers.
        Run it again after an extraction made a new version: segments whose parts did not
        change are reused, only new parts are indexed. `featx neighbors` and `featx dedup`
        build it themselves when it is missing.
        """
        from featx.index import build_index

        cfg = parse(IndexConfig, values)
        with progress_bar("index segments", starting="index") as progress:
            s = build_index(
                cfg.features,
                segment_rows=cfg.segment_rows,
                ray_address=cfg.ray_address,
                progress=progress,
            )
        state = "up to date" if s.up_to_date else f"{s.seconds:.1f} s"
        console.print(
            f"[green]index[/] of version {s.version}: {s.rows} rows of {s.dim} floats in "
            f"{s.segments} segment(s) ({s.segments_built} built, {s.segments_reused} reused; "
            f"{', '.join(f'{n} {k}' for k, n in s.kinds.items())}); {state}"
        )
        write_summary(summary_json, s.to_dict())

    @config_command(app, NeighborsConfig, arguments=("features",), flags={"k": ("-k",)})
    def neighbors(values: dict, json_out: bool = typer.Option(False, "--json")) -> None:
        """The k nearest samples to one sample (--key) or to a new raw file (--file).

        Similarity is the cosine of centred features (1: the same). A new file is normalised
        as the dataset was and embedded by the model the features came from.
        """
        from featx.index import neighbors as find

        cfg = parse(NeighborsConfig, values)
        try:
            df = find(cfg.features, key=cfg.key, file=cfg.file, k=cfg.k)
        except (KeyError, ValueError) as e:
            console.print(f"[red]error[/]: {str(e).strip(chr(34))}")
            raise typer.Exit(2) from None
        if json_out:
            print(df.to_json(orient="records", indent=1))
            return
        t = Table(title=f"{cfg.k} nearest to {cfg.key or cfg.file}")
        for col in ("rank", "similarity", "key", "split", "label", "source"):
            t.add_column(col)
        for r in df.itertuples():
            t.add_row(
                str(r.rank),
                f"{r.similarity:.3f}",
                str(r.key),
                str(r.split),
                str(r.label_name or "-"),
                str(r.source or "-"),
            )
        console.print(t)

    @config_command(app, DedupConfig, arguments=("features",))
    def dedup(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
        """Find near-duplicate samples, within and across splits, and the val/test samples
        that leak (their nearest train sample is a near-duplicate).

        Writes pairs.parquet, summary.json and exclude.txt (the keys to leave out: pass it to
        `featx train --exclude` and `featx probe --exclude`), and for images pairs.png, a
        contact sheet of the worst pairs.
        """
        from featx.dedup import find_duplicates, headline

        cfg = parse(DedupConfig, values)
        with progress_bar("dedup rows", starting="index") as progress:
            s = find_duplicates(
                cfg.features,
                threshold=cfg.threshold,
                out=cfg.out,
                sheet=cfg.sheet,
                progress=progress,
            )
        console.print(headline(s.to_dict()), soft_wrap=True)
        t = Table(title=f"worst pairs (cosine >= {cfg.threshold:g})")
        for col in ("similarity", "a", "split", "label", "b", "split", "label"):
            t.add_column(col)
        for w in s.worst[:8]:
            t.add_row(
                f"{w['similarity']:.3f}",
                w["key_a"],
                w["split_a"],
                str(w["label_a"] or "-"),
                w["key_b"],
                w["split_b"],
                str(w["label_b"] or "-"),
            )
        if s.worst:
            console.print(t)
        for name, path in s.files.items():
            console.print(f"{name}: {path}", soft_wrap=True)
        write_summary(summary_json, s.to_dict())

    @config_command(app, MapConfig, arguments=("features",))
    def map(values: dict) -> None:  # noqa: A001 (the command's name)
        """Draw a 2-D map of the features coloured by label: PCA, and t-SNE beside it when
        openTSNE is installed."""
        from featx.featmap import feature_map
        from featx.features import read_features

        cfg = parse(MapConfig, values)
        X, df = read_features(cfg.features)
        info = feature_map(X, df, cfg.out, method=cfg.method, max_points=cfg.max_points)
        score = info.get("neighbourhood_score")
        kept = "" if score is None else f"; classes kept together: kNN-5 {score:.3f}"
        console.print(f"[green]map[/] ({', '.join(info['methods'])}): {cfg.out}{kept}")

    @config_command(app, ExportConfig, arguments=("features",))
    def export(values: dict, summary_json: Path | None = SUMMARY_JSON) -> None:
        """Export the current feature version for a vector store: a Lance dataset with a
        vector index on `embedding` (`pip install 'featx[lance]'`)."""
        from featx.export import export_lance

        cfg = parse(ExportConfig, values)
        with progress_bar("parts", starting="export") as progress:
            s = export_lance(cfg.features, cfg.out, index=cfg.index, progress=progress)
        index = s.index or f"none ({s.index_skipped})"
        console.print(
            f"[green]exported[/] {s.rows} rows of {s.dim} floats (version {s.version}) to "
            f"{s.out} as Lance; vector index: {index}",
            soft_wrap=True,
        )
        write_summary(summary_json, s.to_dict())
