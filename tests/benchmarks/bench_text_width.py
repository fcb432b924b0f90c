"""How many numbers a text feature needs: the best linear unsupervised summary at each width.

For each text corpus of `corpora.py`, on a stratified 80/20 split (seed 0): the probe accuracy
of tf-idf itself (the classic baseline, `featx.classic.tfidf`: word 1-2 grams, sublinear tf,
thousands of columns), and of tf-idf reduced by a truncated SVD fitted on the train rows
(latent semantic analysis) to 64 ... 1024 numbers. The probe is featx's: a standardised
logistic regression fitted on train, scored on val. No labels reach the SVD.

A second row gives the start of a featx contrastive text model's token embeddings (`featx
train --text-init lsa`, `featx.recipe.lsa_embeddings`): a tokenizer fitted on the train texts
as `featx ingest` fits it, the LSA embeddings of each width, and each text's mean embedding,
which is what the model's token mean feature reads before its first step. A third row gives
featx's token bag (`featx.recipe.fit_token_bag`): the fitted LSA of each text's tokens and
adjacent token pairs that ends a contrastive text feature (1,024 numbers by default).

The trained part of a featx text feature has 128 (cnn, attention) or 192 (rnn) numbers with
the small preset. Read its probe accuracy in `bench_quality.py` against the SVD row of about
its width: that is what an unsupervised summary of that size can keep of what tf-idf's probe
uses.

Usage: python tests/benchmarks/bench_text_width.py [--corpora debian,docstrings]
       [--widths 64,128,256,512,1024] [--workdir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import corpora
from benchlib import emit


def _texts(root: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8"))
            labels.append(folder.name)
    return texts, labels


def widths_of(root: Path, widths: list[int]) -> dict:
    import numpy as np
    from sklearn.decomposition import TruncatedSVD
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.classic import tfidf

    texts, labels = _texts(root)
    y = np.array(labels)
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    vectorizer, x_tr = tfidf(texts[i] for i in tr)
    x_va = vectorizer.transform([texts[i] for i in va])
    full = LogisticRegression(max_iter=5000).fit(x_tr, y[tr]).score(x_va, y[va])
    row = {"samples": len(y), "tfidf_columns": x_tr.shape[1], "tfidf": round(full, 4), "svd": {}}
    for k in widths:
        if k >= min(x_tr.shape):
            continue
        svd = TruncatedSVD(k, random_state=0).fit(x_tr)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        probe.fit(svd.transform(x_tr), y[tr])
        row["svd"][k] = round(probe.score(svd.transform(x_va), y[va]), 4)
        print(f"  svd {k:5d}: {row['svd'][k]:.3f}", flush=True)
    row["lsa_start"], row["token_bag"] = lsa_start(texts, y, tr, va, widths)
    return row


def lsa_start(texts: list[str], y, tr, va, widths: list[int]) -> tuple[dict, dict]:
    """Probe accuracy, per width, of the mean token embedding of featx's LSA start, and of
    featx's token bag (`featx.recipe.fit_token_bag`, the fitted part of a contrastive text
    feature) fitted on the train texts."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from tokenizers import Tokenizer

    from featx.config import IngestConfig
    from featx.models.registry import COMMON
    from featx.recipe import bag_counts, fit_token_bag, lsa_embeddings
    from featx.tokenizer import fit_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        fit_tokenizer((texts[i] for i in tr), IngestConfig.model_fields["vocab_size"].default, path)
        tok = Tokenizer.from_file(str(path))
    ids = [e.ids or [1] for e in tok.encode_batch(texts)]
    out, bag = {}, {}
    columns = COMMON["bag_columns"]
    for k in widths:
        emb = lsa_embeddings((ids[i] for i in tr), tok.get_vocab_size(), k, seed=0).numpy()
        x = np.stack([emb[i].mean(axis=0) for i in ids])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        out[k] = round(probe.fit(x[tr], y[tr]).score(x[va], y[va]), 4)
        print(f"  featx LSA start {k:5d}: {out[k]:.3f}", flush=True)
        fitted = fit_token_bag([ids[i] for i in tr], tok.get_vocab_size(), k, columns, seed=0)
        x = bag_counts(ids, tok.get_vocab_size(), fitted["keys"].numpy())
        x = TfidfTransformer(sublinear_tf=True).fit(x[tr]).transform(x) @ fitted["proj"].numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        bag[k] = round(probe.fit(x[tr], y[tr]).score(x[va], y[va]), 4)
        print(f"  featx token bag {k:5d}: {bag[k]:.3f}", flush=True)
    return out, bag


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    text = [c for c in corpora.CORPORA if corpora.MODALITY[c] == "text"]
    ap.add_argument("--corpora", default=",".join(text))
    ap.add_argument("--widths", default="64,128,256,512,1024")
    ap.add_argument("--workdir", type=Path, help="keep the corpora here")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    args = ap.parse_args()
    names = [c for c in args.corpora.split(",") if c]
    bad = sorted(set(names) - set(text))
    if bad:
        ap.error(f"not a text corpus: {', '.join(bad)}; text corpora: {', '.join(text)}")
    widths = [int(w) for w in args.widths.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featx-bench-text-width-"))
    t0 = time.perf_counter()
    rows, skipped = {}, {}
    try:
        for name in names:
            try:
                corpora.BUILDERS[name](work / "corpora")
            except RuntimeError as e:  # a corpus whose source this machine lacks
                skipped[name] = str(e)
                continue
            print(f"{name}:", flush=True)
            rows[name] = widths_of(work / "corpora" / name, widths)
            print(f"  tf-idf ({rows[name]['tfidf_columns']} columns): {rows[name]['tfidf']:.3f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    lines = ["| corpus | tf-idf (columns) | " + " | ".join(f"SVD {w}" for w in widths) + " |"]
    lines.append("| --- | ---: |" + " ---: |" * len(widths))
    for name, r in rows.items():
        cells = " | ".join(f"{r['svd'][w]:.3f}" if w in r["svd"] else "-" for w in widths)
        lines.append(f"| {name} | {r['tfidf']:.3f} ({r['tfidf_columns']}) | {cells} |")
        cells = " | ".join(f"{r['lsa_start'][w]:.3f}" for w in widths)
        lines.append(f"| {name}, featx LSA start (token mean) | - | {cells} |")
        cells = " | ".join(f"{r['token_bag'][w]:.3f}" for w in widths)
        lines.append(f"| {name}, featx token bag | - | {cells} |")
    result = {
        "rows": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "table": "\n".join(lines),
    }
    print(result["table"], flush=True)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
