"""sklearn's multinomial logistic regression, as transferops fits and uses it: on one BLAS
thread, and as the weights of a torch linear head (the exact probe's, the classical model's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits


def serial_blas() -> threadpool_limits:
    """Numpy/scipy's BLAS on one thread, for sklearn's L-BFGS fits (`with serial_blas():`).
    Their steps are tiny matrix products: OpenBLAS waking a thread per core for each one cost
    the demo's probe path 4.7 s on 2 cores against 0.35 s on one (bench/blas_threads.py).
    Torch's own threads are not touched."""
    return threadpool_limits(limits=1, user_api="blas")


def linear_head(clf: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight [classes, features], bias [classes]) of a fitted sklearn LogisticRegression
    over all `num_classes` labels: a class absent from train gets a bias that never wins."""
    weight = np.zeros((num_classes, clf.coef_.shape[1]))
    bias = np.full(num_classes, -1e4)
    binary = len(clf.classes_) == 2  # sklearn keeps one row; softmax needs both, halved
    coef = np.vstack([-clf.coef_, clf.coef_]) / 2 if binary else clf.coef_
    icpt = np.r_[-clf.intercept_, clf.intercept_] / 2 if binary else clf.intercept_
    weight[clf.classes_], bias[clf.classes_] = coef, icpt
    return weight, bias
