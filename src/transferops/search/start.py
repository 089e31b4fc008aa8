"""Where a search starts: its first trials spread evenly over the space, the same on every seed.

A seeded sampler's first draws are a lottery: the scratch arm's three lrs once sat within a
factor of 2.1 of a 100x range, and on the text benchmark one draw's first three transfer
trials all missed the configurations that beat the probe, so the search stopped "without
headroom" where other draws registered models 2-6 test points above it (bench/RESULTS.md).
The first trials decide that stop and seed TPE's model of the space, so they are a design,
not a draw: a Latin hypercube over the bin centres of every dimension (no two trials share
an lr bin or a depth bin), the first dimension's bins in the order middle, then outwards
(higher first), and each other dimension's bin chosen so the new point is as far as it can
be from the ones before it. Every prefix is spread: the first trial is the middle of the
space, the next ones its far sides. Depth 0 (the linear probe) is left to the sampler when
the space has other depths. After these trials the sampler (TPE) draws as usual.

One dimension (the scratch arm's lr) gives exactly the bin centres, middle first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from transferops.config import FloatRange, IntRange, SearchConfig

__all__ = ["START_TRIALS", "start_points"]

START_TRIALS = 5  # TPE's random start-up trials: the design replaces them


def _middle_out(n: int) -> list[int]:
    """Bin indices 0..n-1, the middle first, then outwards, the higher side first."""
    return sorted(range(n), key=lambda i: (abs(i - (n - 1) / 2), -i))


def _to_float(r: FloatRange) -> Callable[[float], float]:
    lo, hi = (math.log(r.low), math.log(r.high)) if r.log else (r.low, r.high)
    return lambda u: math.exp(lo + u * (hi - lo)) if r.log else lo + u * (hi - lo)


def _to_choice(values: list[Any]) -> Callable[[float], Any]:
    return lambda u: values[min(len(values) - 1, int(u * len(values)))]


def _dimensions(sc: SearchConfig) -> list[tuple[str, Callable[[float], Any]]]:
    """(Optuna param name, map from [0, 1) to a value) of every searched dimension: lr first
    (its bins middle-out), then the depth, then the rest. An open unfreeze_depth high must
    be resolved first."""
    sp = sc.space
    dims: list[tuple[str, Callable[[float], Any]]] = []
    for name in ("lr", "layer_decay", "weight_decay"):
        r = getattr(sp, name)
        if r is not None:
            dims.append((name, _to_float(r)))
    depth: IntRange | None = sp.unfreeze_depth
    if depth is not None:
        # depth 0 is the linear probe, which every trial starts from and falls back to
        # (head_init probe): the design spends its few trials on depths that thaw something
        values = [v for v in depth.values() if v > 0] or depth.values()
        dims.insert(1 if sp.lr is not None else 0, ("unfreeze_depth", _to_choice(values)))
    if sp.adapter is not None:
        dims.append(("adapter", _to_choice(list(sp.adapter))))
    return dims


def _design(n: int, d: int) -> list[list[float]]:
    """`n` points of the unit `d`-cube on bin centres, every prefix spread (module doc)."""
    centre = [(i + 0.5) / n for i in range(n)]
    points: list[list[float]] = [[centre[i]] for i in _middle_out(n)]
    for j in range(1, d):
        free = _middle_out(n)  # ties go to the bin nearest the middle, then the higher
        for k, p in enumerate(points):
            earlier = [e[: j + 1] for e in points[:k]]
            gaps = [min((math.dist([*p, centre[i]], e) for e in earlier), default=0) for i in free]
            p.append(centre[free.pop(gaps.index(max(gaps)))])  # the first of equals
    return points


def start_points(sc: SearchConfig) -> list[dict[str, Any]]:
    """The first trials (Optuna param names -> values) of a search with settings `sc`:
    ``search.start: spread`` and a drawing sampler give min(START_TRIALS, n_trials) points
    spread over the space (repeats dropped); ``sampler`` (its own draws) and the grid
    sampler (it covers the space itself) none."""
    if sc.start != "spread" or sc.sampler == "grid":
        return []
    dims = _dimensions(sc)
    points: list[dict[str, Any]] = []
    for p in _design(min(START_TRIALS, sc.n_trials), len(dims)):
        point = {name: to_value(u) for (name, to_value), u in zip(dims, p, strict=True)}
        if point not in points:
            points.append(point)
    return points
