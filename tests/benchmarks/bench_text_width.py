"""How many numbers a text feature needs: the best linear unsupervised summary at each width.

For each text corpus of `corpora.py`, on a stratified 80/20 split (seed 0): the probe accuracy
of tf-idf itself (the classic baseline, `featx.classic.tfidf`: word 1-2 grams, sublinear tf,
thousands of columns), and of tf-idf reduced by a truncated SVD fitted on the train rows
(latent semantic analysis) to 64 ... 1024 numbers. The probe is featx's: a standardised
logistic regression fitted on train, scored on val. No labels reach the SVD.

A featx text feature has 128 (cnn, attention) or 192 (rnn) numbers with the small preset. Read
its probe accuracy in `bench_quality.py` against the SVD row of about its width: that is what
an unsupervised summary of that size can keep of what tf-idf's probe uses.

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
    return row


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
