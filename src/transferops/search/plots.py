"""The search's plots, logged on its MLflow parent run: every trial shown, pruned ones too.

Optuna's own history plot draws complete trials only: with the median pruner stopping most
trials, "optimization history" showed 3 dots of 10 trials. Here pruned trials are drawn at
their last reported val accuracy (hollow), with the epoch they stopped at; the intermediate
values plot shows every trial's curve; importances and the contour use complete trials only,
drawn from at least MIN_TRIALS_FOR_SURFACE of them (fewer: skipped, and the run says why).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna

log = logging.getLogger(__name__)

METRIC = "val accuracy"
TS = optuna.trial.TrialState


def history_axes(study: optuna.Study) -> Any:
    """Val accuracy per trial (complete: filled, pruned: hollow at the last value reported),
    and the best so far."""
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(6, 3.5))
    best, xs, ys = float("-inf"), [], []
    for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)):
        if t.state == TS.COMPLETE and t.value is not None:
            ax.scatter(t.number, t.value, color="tab:blue", zorder=3)
            best = max(best, t.value)
        elif t.intermediate_values:
            step = max(t.intermediate_values)
            ax.scatter(
                t.number,
                t.intermediate_values[step],
                facecolors="none",
                edgecolors="tab:gray",
                zorder=3,
            )
        if best > float("-inf"):
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.scatter([], [], color="tab:blue", label="complete")
    ax.scatter([], [], facecolors="none", edgecolors="tab:gray", label="pruned (last epoch)")
    ax.set(xlabel="trial", ylabel=METRIC, title=f"Search: {study.study_name}")
    ax.legend(loc="lower right", fontsize=8)
    return ax


MIN_TRIALS_FOR_SURFACE = 5  # complete trials before importances and a contour are drawn


def log_search_plots(mlflow: Any, study: optuna.Study) -> None:
    """History, intermediate values, importances, contour lr x depth: PNGs under plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    n = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))
    plots = {
        "optimization_history": lambda: history_axes(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    if n < MIN_TRIALS_FOR_SURFACE:  # an importance or a surface from 2-4 points is noise
        log.info(
            "no importance or contour plot: %d complete trial(s), %d needed",
            n,
            MIN_TRIALS_FOR_SURFACE,
        )
        mlflow.set_tag(
            "plots_skipped",
            f"importances and contour need {MIN_TRIALS_FOR_SURFACE} complete trials; {n} completed",
        )
        plots_surface = False
    else:
        plots["param_importances"] = lambda: ovm.plot_param_importances(study, target_name=METRIC)
        plots_surface = True
    if plots_surface and {"lr", "unfreeze_depth"} <= set(study.best_trial.params):
        plots["contour_lr_depth"] = lambda: ovm.plot_contour(
            study, params=["lr", "unfreeze_depth"], target_name=METRIC
        )
    with tempfile.TemporaryDirectory() as d:
        for fname, fn in plots.items():
            try:
                # few trials: Optuna warns that importances are equal / a param has one
                # value; the suptitle already says how many trials a plot is from
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    verbosity = optuna.logging.get_verbosity()
                    optuna.logging.set_verbosity(optuna.logging.ERROR)
                    try:
                        made = fn()
                    finally:
                        optuna.logging.set_verbosity(verbosity)
                fig = made.figure if hasattr(made, "figure") else made.flat[0].figure
                if fname in ("param_importances", "contour_lr_depth"):
                    fig.suptitle(f"from the {n} complete trials (pruned ones have no value)")
                if fname == "intermediate_values":
                    made.set_ylabel(METRIC)
                    made.set_xlabel("epoch")
                fig.savefig(Path(d) / f"{fname}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
                mlflow.log_artifact(str(Path(d) / f"{fname}.png"), artifact_path="plots")
            except (ValueError, RuntimeError, IndexError) as exc:  # too few trials for a plot
                log.info("skipping plot %s: %s", fname, exc)
