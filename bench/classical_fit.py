"""The classical pixel model fitted two ways, side by side: L-BFGS on the pixels (what
`finetune.classical` does) and in the span of the training rows (:func:`fit_in_row_space`
below: with more pixels than images, the same L2-penalised optimum on n instead of d
columns). The same convex problem, so the same model at the optimum; this prints how close
the two fits are at sklearn's default tolerance (largest coefficient and probability
differences, test predictions that differ) and what each cost. Test is read only to report.
Measured 2026-12-07 and not adopted: at the default tolerance the two stop 9-31% apart in
their coefficients and disagree on 1-35 test images (bench/RESULTS.md).

    .venv/bin/python bench/classical_fit.py /tmp/q2/clipart-10-all /tmp/qq/digits-k20-auto
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from transferops.data.prepared import load_prepared
from transferops.finetune.logreg import serial_blas


def fit_in_row_space(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> None:
    """Fit `clf` on `x` [n, d], d > n, in the span of its rows: the loss reads ``W @ x_i``
    only and the penalty grows with W's part orthogonal to the rows, so the optimum is
    ``W = B V^T`` (``x = U S V^T``): logistic regression on the coordinates ``U S``."""
    k = x.astype(np.float64)
    s2, u = np.linalg.eigh(k @ k.T)  # U S^2 U^T, in float64: its small eigenvalues matter
    keep = s2 > s2.max() * 1e-12  # directions no training row spans
    u, s = u[:, keep], np.sqrt(s2[keep])
    clf.fit(u * s, y)
    clf.coef_ = (clf.coef_ / s) @ (u.T @ k)  # B S^-1 U^T x = B V^T
    clf.n_features_in_ = x.shape[1]


def pixels(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_prepared(folder / "data" / "prepared", split)  # type: ignore[arg-type]
    return data.images.flatten(1).float().numpy() / 255, data.labels.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("cases", nargs="+", type=Path, help="finished quality-benchmark folders")
    args = ap.parse_args()
    print(
        "| case | train rows x pixels | fit | wall / CPU s | L-BFGS iterations | val acc |"
        " test acc | max coef diff (rel.) | max test prob diff | test predictions differing |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in args.cases:
        x, y = pixels(folder, "train")
        xv, yv = pixels(folder, "val")
        xt, yt = pixels(folder, "test")
        fits = {}
        for how in ("pixels", "row span"):
            clf = LogisticRegression(max_iter=2000)
            w, c = time.perf_counter(), time.process_time()
            with serial_blas():  # as fit_classical fits
                fit_in_row_space(clf, x, y) if how == "row span" else clf.fit(x, y)
            fits[how] = (clf, time.perf_counter() - w, time.process_time() - c)
        ref = fits["pixels"][0]
        for how, (clf, wall, cpu) in fits.items():
            rel = np.abs(clf.coef_ - ref.coef_).max() / np.abs(ref.coef_).max()
            dp = np.abs(clf.predict_proba(xt) - ref.predict_proba(xt)).max()
            differ = int((clf.predict(xt) != ref.predict(xt)).sum())
            print(
                f"| {folder.name} | {x.shape[0]} x {x.shape[1]} | {how} | {wall:.1f} / {cpu:.1f} |"
                f" {int(np.max(clf.n_iter_))} | {(clf.predict(xv) == yv).mean():.4f} |"
                f" {(clf.predict(xt) == yt).mean():.4f} | {rel:.1e} | {dp:.1e} |"
                f" {differ} of {len(yt)} |"
            )


if __name__ == "__main__":
    main()
