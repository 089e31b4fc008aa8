"""Baselines and the evaluation report: statistics, verdicts, test-split isolation, outputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from transferops.config import validate_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import SPLIT_READS, load_prepared
from transferops.evaluation import baseline as baseline_module
from transferops.evaluation.baseline import role_overrides, run_baselines, transfer_epochs
from transferops.evaluation.evaluate import evaluate
from transferops.evaluation.stats import ece, mean_ci, paired_bootstrap, verdict
from transferops.finetune.selection import ValProbs, greedy_join
from transferops.finetune.train import train_from_config
from transferops.model.calibration import nll
from transferops.model.folder import load_finetuned
from transferops.model.inputs import make_inputs
from transferops.model.predict import predict_probs
from transferops.runtime.artifacts import sha256_file
from transferops.search.study import run_search

from .conftest import tiny_digits


def test_mean_ci_on_known_values():
    ci = mean_ci([0.8, 0.9, 1.0], 0.95)
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert ci["mean"] == pytest.approx(0.9)
    assert ci["ci_low"] == pytest.approx(0.9 - half) and ci["ci_high"] == pytest.approx(0.9 + half)
    assert mean_ci([0.5])["ci_low"] is None
    clipped = mean_ci([0.98, 1.0, 1.0], 0.95, (0, 1))  # a t-interval can pass 1.0
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] < clipped["mean"]


def test_verdict_logic():
    assert verdict({"mean": 0.10, "ci_low": 0.05, "ci_high": 0.15}) == (
        "transfer beats scratch by 10.0 ± 5.0 points"
    )
    assert verdict({"mean": 0.02, "ci_low": -0.01, "ci_high": 0.05}).startswith(
        "no significant gain of transfer over scratch (+2.0 ± 3.0 points)"
    )
    assert verdict({"mean": -0.10, "ci_low": -0.12, "ci_high": -0.08}) == (
        "scratch beats transfer by 10.0 ± 2.0 points"
    )
    assert "no interval" in verdict({"mean": 0.1, "ci_low": None, "ci_high": None})


def test_paired_bootstrap_uses_the_pairing():
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.8
    b = a.copy()
    b[:30] = ~b[:30]  # b differs from a on 30 of 300 examples, 10 %
    d = paired_bootstrap(a, b)
    assert d["mean"] == pytest.approx(a.mean() - b.mean()) and d["n"] == 300
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    assert d == paired_bootstrap(a, b)  # seeded: reproducible
    # identical models: a zero-width interval (an unpaired test could not see that)
    assert paired_bootstrap(a, a) == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 300}
    # a consistent 5-point gain on 300 examples is significant when paired
    c = a.copy()
    c[np.flatnonzero(~a)[:15]] = True
    assert paired_bootstrap(c, a)["ci_low"] > 0
    # the half width shrinks like 1/sqrt(n)
    wide = paired_bootstrap(c[:75], a[:75])
    full = paired_bootstrap(c, a)
    assert wide["ci_high"] - wide["ci_low"] > 1.5 * (full["ci_high"] - full["ci_low"])


def test_ece():
    y = np.array([0, 1, 1, 0])
    sure_right = np.eye(2)[y]
    assert ece(sure_right, y) == pytest.approx(0.0)
    assert ece(sure_right, 1 - y) == pytest.approx(1.0)
    half = np.full((4, 2), 0.5)
    half[:, 0] += 1e-9
    assert ece(half, y) == pytest.approx(0.0, abs=1e-6)  # 50 % confident, 50 % right


def test_scratch_gets_the_same_budget():
    cfg = validate_config(
        {"finetune": {"unfreeze_depth": 4, "blocks_per_stage": 2, "epochs_per_stage": [3, 2]}}
    )
    assert transfer_epochs(cfg, 9) == 3 + 2 + 2
    o = role_overrides(cfg, "scratch", 5, 9)
    assert o["finetune.epochs_per_stage"] == [1, 6] and o["finetune.unfreeze_depth"] == 9
    assert o["finetune.bn_mode"] == "train" and o["finetune.seed"] == 5
    assert role_overrides(cfg, "probe", 1, 9)["finetune.epochs_per_stage"] == [7]


def test_scratch_lrs_spread_over_the_range_middle_first():
    """The scratch arm's lr search starts at the centres of the range's equal (log-)bins,
    the middle first, then outwards (higher first), on every seed."""
    from transferops.config import SearchConfig
    from transferops.search.start import start_points

    def lrs(lr: dict, n: int) -> list[float]:
        sc = SearchConfig(space={"lr": lr, "unfreeze_depth": None}, n_trials=n, seed=n)
        return [p["lr"] for p in start_points(sc)]

    got = lrs({"low": 3e-4, "high": 3e-2, "log": True}, 3)
    assert got == pytest.approx([3e-3, 3e-3 * 10 ** (2 / 3), 3e-3 / 10 ** (2 / 3)])
    assert lrs({"low": 0.1, "high": 1.1}, 4) == pytest.approx([0.725, 0.475, 0.975, 0.225])


def test_pipeline_reads_test_only_in_evaluate_and_writes_the_report(
    tmp_path, lite0_source, monkeypatch
):
    cfg = validate_config(
        {
            "data": tiny_digits(tmp_path),
            "source": {"out": str(lite0_source)},
            "finetune": {
                "unfreeze_depth": 2,
                "blocks_per_stage": 2,
                "epochs_per_stage": [1, 1],
                "batch_size": 8,
                "out": str(tmp_path / "ft"),
                "metrics": str(tmp_path / "m.json"),
                "checkpoint_dir": str(tmp_path / "ck"),
            },
            "search": {
                "n_trials": 2,
                "storage": f"sqlite:///{tmp_path}/optuna.db",
                "out": str(tmp_path / "search"),
                "space": {"unfreeze_depth": {"low": 0, "high": 2}},
            },
            "baseline": {
                "seeds": [0, 1],
                "scratch_trials": 2,
                "efficiency_per_class": [2, None],
                "out": str(tmp_path / "base"),
            },
            "evaluate": {"out": str(tmp_path / "reports")},
            "registry": {"classical_candidate": False},  # the network path (pixels win here)
            "tracking": {
                "uri": f"sqlite:///{tmp_path}/mlflow.db",
                "artifact_location": str(tmp_path / "art"),
                "experiment": "e",
            },
        }
    )
    reads = SPLIT_READS
    reads.clear()
    prepare(cfg)
    found = run_search(cfg)
    best = with_overrides(cfg, found.best_params)
    kept = tmp_path / "search" / "best_model"
    assert json.loads((kept / "model.json").read_text())["trial"] == found.best_trial
    assert not (tmp_path / ".search-trials").exists()  # the other candidates are gone
    # ... but the next-best trial's model stays: an ensemble member (ensemble_trials 2)
    up = tmp_path / "search" / "runners_up"
    (runner,) = json.loads((up / "order.json").read_text())
    other = json.loads((up / str(runner) / "model.json").read_text())
    assert runner != found.best_trial and other["trial"] == runner
    assert other["val_accuracy"] <= found.best_value
    # `train` with the best params is the best trial: copied, not trained again ...
    # (the first member of the ensemble `train` writes by default; the second is seed 1,
    # the third the search's runner-up, copied too)
    done = train_from_config(best)
    first = tmp_path / "ck" / "members" / "s0"
    assert done.candidate == "ensemble" and done.reused_from == str(kept)
    members = json.loads((tmp_path / "ft" / "model.json").read_text())["members"]
    seeds = [first, tmp_path / "ck" / "members" / "s1"]
    assert [(m["finetune"]["seed"], m["trial"]) for m in members[:2]] == [
        (0, found.best_trial),
        (1, None),
    ]
    # the runner-up joined exactly when it raised the seeds' val score (greedy selection)
    val_probs = ValProbs(tmp_path / "prep")
    ((_, before, after),) = greedy_join("accuracy", seeds, [up / str(runner)], val_probs)
    assert [m["trial"] for m in members[2:]] == ([runner] if after > before else [])
    val, pool = load_prepared(tmp_path / "prep", "val"), []
    for f in seeds:
        net, spec = load_finetuned(f)
        inputs = make_inputs(val, f, spec["source"], 64)
        pool.append(predict_probs(net, spec | {"temperature": 1.0}, inputs, torch.device("cpu")))
    mean, y = np.mean(pool, axis=0), val.labels.numpy()
    assert before == pytest.approx(((mean.argmax(1) == y).mean(), -nll(mean, y)))
    # the ensemble's recorded val score and pre-calibration NLL are its network's own
    # (train averages the val passes of its members instead of running them again)
    net, spec = load_finetuned(tmp_path / "ft")
    inputs = make_inputs(val, tmp_path / "ft", spec["source"], 64)
    raw = predict_probs(net, spec | {"temperature": 1.0}, inputs, torch.device("cpu"))
    assert spec["val_accuracy"] == pytest.approx((raw.argmax(1) == y).mean())
    assert spec["val_loss"] == pytest.approx(nll(raw, y), rel=1e-4)
    assert spec["calibration"]["val_nll_before"] == pytest.approx(nll(raw, y), abs=2e-4)
    # val passes are kept by the weights' sha256: a copy shares them, other weights do not
    uniform = np.full_like(mean, 1 / mean.shape[1])
    val_probs.remember(first, uniform)
    assert val_probs(first) is uniform and val_probs(kept) is uniform
    assert not np.allclose(val_probs(seeds[1]), uniform)
    # a copy of the one member adds nothing (the same average), so it does not join
    ((_, before, after),) = greedy_join("accuracy", [first], [first], val_probs)
    assert after == pytest.approx(before) and not after > before
    assert json.loads((first / "model.json").read_text())["val_accuracy"] == found.best_value
    assert sha256_file(first / "model.safetensors") == sha256_file(kept / "model.safetensors")
    # ... because training it again gives exactly those weights
    elsewhere = {
        "finetune.out": str(tmp_path / "ft2"),
        "finetune.checkpoint_dir": str(tmp_path / "ck2"),  # the members kept there: not these
        "search.out": str(tmp_path / "none"),
    }
    again = with_overrides(best, elsewhere)
    assert train_from_config(again).reused_from is None  # no search there: no runner-up
    assert len(json.loads((tmp_path / "ft2" / "model.json").read_text())["members"]) == 2
    redone = tmp_path / "ck2" / "members" / "s0" / "model.safetensors"
    assert sha256_file(redone) == sha256_file(first / "model.safetensors")
    assert not list((tmp_path / "ck").rglob("last.pt"))  # models saved: checkpoints go
    cfg = best
    trained = []  # (role seed, pretrained) of every baseline run actually trained
    real_train = baseline_module.train_model
    monkeypatch.setattr(
        baseline_module,
        "train_model",
        lambda rcfg, **kw: (
            trained.append((rcfg.finetune.seed, rcfg.finetune.init)) or real_train(rcfg, **kw)
        ),
    )
    runs = run_baselines(cfg)
    assert not list((tmp_path / "base" / ".checkpoints").glob("*/last.pt"))
    # transfer-s0 and -s1 are the members of the ensemble `train` wrote, scratch-s0 the
    # scratch search's best trial (same seeds and params): copied, not retrained
    assert len(trained) == len(runs) - 3 and trained.count((1, "pretrained")) == 1  # probe-s1
    assert trained.count((0, "random")) == 1 and (1, "random") in trained  # 1 = scratch-k2
    by_name = {r["name"]: r for r in runs}
    assert sha256_file(Path(by_name["transfer-s0"]["dir"]) / "model.safetensors") == sha256_file(
        first / "model.safetensors"
    )
    searched = json.loads((tmp_path / "base" / "scratch_search" / "summary.json").read_text())
    assert searched["runners_up"] == []  # no ensemble there: no runner-up's model copied
    scratch = json.loads((Path(by_name["scratch-s1"]["dir"]) / "model.json").read_text())
    # scratch is tuned: every scratch run uses the lr its own search found
    assert scratch["finetune"]["lr"] == searched["best_params"]["finetune.lr"]
    assert scratch["finetune"]["init"] == "random" and searched["counts"]["complete"] >= 1
    # ... over lrs spread across the range (centres of its log-bins, the middle first), not
    # the sampler's seeded draws, which are the same on every dataset
    study = optuna.load_study(study_name=searched["study_name"], storage=cfg.search.storage)
    tried = [t.params["lr"] for t in sorted(study.trials, key=lambda t: t.number)]
    assert tried == pytest.approx([0.003 * 10 ** (1 / 2), 0.003 / 10 ** (1 / 2)])
    assert reads["test"] == 0 and reads["train"] > 0 and reads["val"] > 0
    assert {r["name"] for r in runs} == {
        "transfer-s0",
        "scratch-s0",
        "probe-s0",
        "transfer-s1",
        "scratch-s1",
        "probe-s1",
        "transfer-k2",
        "scratch-k2",
    }
    # per-epoch metrics reach each run's MLflow run through the engine's on_epoch_end hook
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(runs[0]["mlflow_run_id"], "val_accuracy")
    epochs = json.loads((Path(runs[0]["dir"]) / "history.json").read_text())
    assert [h.step for h in history] == [e["epoch"] for e in epochs]
    m = evaluate(cfg)
    assert reads["test"] == 1

    out = tmp_path / "reports"
    saved = json.loads((out / "metrics.json").read_text())
    # what `dvc metrics show` prints: a few numbers, not the 60-column report
    html = (out / "evaluation.html").read_text()  # self-contained: plots inlined, no network
    assert html.count('src="data:image/png;base64,') >= 2 and 'src="plots/' not in html
    assert "<table>" in html and "http" not in html.replace("http-equiv", "")
    short = json.loads((out / "summary.json").read_text())
    assert 5 <= len(short) <= 12 and all(isinstance(v, int | float) for v in short.values())
    assert short["transfer_accuracy"] == round(saved["models"]["transfer"]["accuracy"]["mean"], 4)
    assert saved == json.loads(json.dumps(m))
    for key in (
        "test_size",
        "confidence",
        "models",
        "transfer_minus_scratch",
        "transfer_minus_probe",
        "transfer_beats_scratch",
        "verdict",
        "efficiency",
        "data_hash",
    ):
        assert key in saved
    assert set(saved["models"]) == {"transfer", "scratch", "probe", "classical"}
    acc = saved["models"]["transfer"]["accuracy"]
    assert acc["n"] == 2 and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    d = saved["transfer_minus_scratch"]["accuracy"]
    assert saved["verdict"] == verdict(d)
    # decided over the test examples, each role averaged over its seeds: the same mean as the
    # seed-paired differences, whose t-interval is reported beside it
    assert d["n"] == saved["test_size"] and d["over_seeds"]["n"] == 2
    assert d["mean"] == pytest.approx(d["over_seeds"]["mean"])
    each = d["over_seeds"]["per_seed"]  # the seed spread, beside the (wide) t-interval
    assert len(each) == 2 and sum(each) / 2 == pytest.approx(d["mean"])
    assert f"(each seed: {each[0]:+.3f}, {each[1]:+.3f})" in (out / "evaluation.md").read_text()
    assert saved["transfer_beats_scratch"] == (d["ci_low"] > 0)
    assert [r["per_class"] for r in saved["efficiency"]] == [2, "all"]
    for r in saved["efficiency"]:  # each point with its interval over the test examples
        for role in ("transfer", "scratch"):
            lo, hi = r[f"{role}_ci"]
            assert lo <= r[role] <= hi and hi - lo > 0
    per_class = json.loads((out / "per_class.json").read_text())
    assert set(per_class) == {"transfer", "scratch", "probe"}
    assert set(per_class["transfer"]["one"]) == {"precision", "recall"}
    assert set(per_class["transfer"]) == {"one", "two", "zero"}
    assert "per_class" not in saved
    report = (out / "evaluation.md").read_text()
    assert saved["verdict"] in report and "Data efficiency" in report
    # each arm's tuning is stated: scratch got a search of its own
    assert saved["tuning"]["scratch"]["trials"] == searched["counts"]
    assert "- scratch: an Optuna search (" in report and "- transfer: an Optuna search (" in report
    # ... and how many configurations val could not tell from the best (one SE of a
    # difference of two accuracies on the 6 val examples): the pick among those is noise
    noise = json.loads((tmp_path / "search" / "summary.json").read_text())["within_noise"]
    study = optuna.load_study(study_name=found.study_name, storage=cfg.search.storage)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    p = min(max(found.best_value, 1 / 6), 5 / 6)  # an accuracy of 0 or 1 has noise too
    margin = math.sqrt(2 * p * (1 - p) / 6)
    assert noise["margin"] == pytest.approx(margin) and noise["of"] == len(done)
    assert noise["trials"] == [t.number for t in done if found.best_value - t.value <= margin]
    assert f"{len(noise['trials'])} of {len(done)} complete configurations within val noise" in (
        report
    )
    # the report names its data: path, counts per split, image size (not only a hash)
    assert f"Data `{tmp_path / 'raw'}`, 36 train / 6 val / 6 test, images 16 px" in report
    assert "plots/confusion_scratch.png" in report  # both matrices shown, not one
    header = (out / "learning_curves.csv").read_text().splitlines()[0]
    assert header == "role,epoch,val_accuracy,train_loss,stage"  # stage: where blocks thaw
    for png in ("data_efficiency", "learning_curves", "confusion_transfer", "confusion_scratch"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    header = (out / "efficiency.csv").read_text().splitlines()[0].split(",")
    assert header == ["per_class", "transfer", "scratch"] + [
        f"{r}_{e}" for r in ("transfer", "scratch") for e in ("low", "high")
    ]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("e")
    roles = {r.data.tags.get("role") for r in client.search_runs([exp.experiment_id])}
    assert {"transfer", "scratch", "probe", "search", "trial", "evaluation"} <= roles
    t0 = client.get_run(runs[0]["mlflow_run_id"])
    assert "test_accuracy" in t0.data.metrics and t0.data.tags["data_hash"] == saved["data_hash"]


def test_evaluate_refuses_baselines_from_other_data(tmp_path, digits_prepared):
    base = tmp_path / "base"
    base.mkdir()
    (base / "index.json").write_text(json.dumps({"data_hash": "0" * 64, "seeds": [0], "runs": []}))
    cfg = validate_config({"data": {"out": str(digits_prepared)}, "baseline": {"out": str(base)}})
    from transferops.errors import DataError

    with pytest.raises(DataError, match="re-run `transferops baseline`"):
        evaluate(cfg)


def test_baseline_runs_as_dask_tasks_match_the_ones_trained_here(tmp_path, lite0_source):
    """compute.n_workers 2: every baseline run is a task of a local Dask cluster, trained in
    a worker process (not this one), nested under the pipeline's MLflow run, with the val
    accuracy the same run gets trained in this process."""
    from mlflow import MlflowClient

    from transferops.runtime.tracking import pipeline_run

    def config(n_workers: int, out: str) -> dict:
        return {
            "data": tiny_digits(tmp_path),
            "source": {"out": str(lite0_source)},
            "finetune": {
                "unfreeze_depth": 1,
                "epochs_per_stage": [1, 1],
                "batch_size": 8,
                "out": str(tmp_path / "ft"),
            },
            "baseline": {
                "seeds": [0, 1],
                "efficiency_per_class": [2],
                "scratch_trials": 0,  # the fan-out of the runs is under test, not the search
                "out": str(tmp_path / out),
            },
            "compute": {"n_workers": n_workers},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"},
        }

    here = validate_config(config(1, "here"))
    prepare(here)
    # the threads each of 2 workers gets: a near-random scratch model's few val predictions
    # flip with the float summation order that the thread count sets
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        expected = {r["name"]: r["val_accuracy"] for r in run_baselines(here)}
    finally:
        torch.set_num_threads(threads)
    cfg = validate_config(config(2, "dask"))
    with pipeline_run(cfg.tracking, {}) as (_, parent):
        runs = run_baselines(cfg)
    assert {r["name"]: r["val_accuracy"] for r in runs} == expected
    assert all((Path(r["dir"]) / "model.safetensors").exists() for r in runs)
    index = json.loads((tmp_path / "dask" / "index.json").read_text())
    assert [r["name"] for r in index["runs"]] == list(expected)
    tags = [MlflowClient().get_run(r["mlflow_run_id"]).data.tags for r in runs]
    assert all(t["mlflow.parentRunId"] == parent for t in tags)
    pids = {t["transferops.pid"] for t in tags}
    assert str(os.getpid()) not in pids and len(pids) == 2  # both workers trained


def test_efficiency_chart_shows_intervals_and_the_cheap_baselines():
    """The data-efficiency chart (a DVC image plot): the seed mean with its interval at
    "all" for transfer and scratch, the probe and the classical model as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferops.evaluation.report import efficiency_axes

    eff = [
        {"per_class": 5, "transfer": 0.6, "scratch": 0.3},
        {"per_class": "all", "transfer": 0.9, "scratch": 0.7},
    ]
    # one run per point: the band is the bootstrap interval over the test examples
    banded = [r | {"transfer_ci": [r["transfer"] - 0.05, r["transfer"] + 0.04]} for r in eff]
    ci = {"mean": 0.88, "ci_low": 0.85, "ci_high": 0.91, "n": 3}
    models = {
        "transfer": {"accuracy": ci},
        "scratch": {"accuracy": ci | {"mean": 0.7, "ci_low": 0.6, "ci_high": 0.8}},
        "probe": {"accuracy": ci | {"mean": 0.8}},
        "classical": {"accuracy": 0.75},
    }
    fig, ax = plt.subplots()
    efficiency_axes(ax, banded, models)
    assert set(ax.get_legend_handles_labels()[1]) == {
        "transfer",
        "transfer: 95% CI over test examples",
        "scratch",
        "probe (all data)",
        "classical (all data)",
        "transfer: mean of 3 seeds, 95% CI",
        "scratch: mean of 3 seeds, 95% CI",
    }
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    assert list(lines["probe (all data)"]) == [0.8, 0.8]
    assert list(lines["classical (all data)"]) == [0.75, 0.75]
    bars = [c for c in ax.containers if c.get_label().startswith("transfer: mean")]
    (segment,) = bars[0].lines[2][0].get_segments()
    assert segment[0][1] == pytest.approx(0.85) and segment[1][1] == pytest.approx(0.91)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "all"]
    (band,) = [c for c in ax.collections if c.get_label().startswith("transfer: 95% CI")]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.55) and ys.max() == pytest.approx(0.94)
    plt.close(fig)
    # one seed: no interval exists, none is drawn (and nothing fails)
    one = {r: {"accuracy": {"mean": 0.8, "ci_low": None, "ci_high": None, "n": 1}} for r in models}
    fig, ax = plt.subplots()
    efficiency_axes(ax, eff, one)
    assert not ax.containers and "probe (all data)" in ax.get_legend_handles_labels()[1]
    plt.close(fig)


def test_balanced_accuracy_is_the_mean_recall_and_a_gate_metric():
    from transferops.evaluation.evaluate import classification_metrics

    y = np.array([0] * 8 + [1] * 2)  # class 2 absent from this split
    pred = np.array([0] * 8 + [0, 1])  # class 0 all right, class 1 half right
    probs = np.eye(3)[pred] * 0.9 + 0.05
    m = classification_metrics(probs, y, ["a", "b", "c"], bins=5)
    assert m["accuracy"] == 0.9
    assert m["balanced_accuracy"] == 0.75  # (1.0 + 0.5) / 2: absent classes do not count
    cfg = validate_config({"registry": {"metric": "balanced_accuracy"}})
    assert cfg.registry.metric == "balanced_accuracy"


def test_the_tuning_lines_say_what_the_search_ran_and_what_val_could_not_tell_apart():
    """A search stopped without headroom leaves its other start trials waiting: the report
    says "not run"; a pick among configurations within val noise is called noise."""
    from transferops.evaluation.report import tuning_lines

    noise = {"trials": [3, 0], "of": 3, "margin": 0.028, "val_size": 511}
    transfer = {
        "trials": {"complete": 3, "pruned": 0, "waiting": 2},
        "best_params": {"finetune.lr": 0.003, "finetune.unfreeze_depth": 4},
        "within_noise": noise,
    }
    text = "\n".join(tuning_lines({"transfer": transfer, "scratch": {}}))
    assert "an Optuna search (3 complete, 2 not run); best lr=0.003, unfreeze_depth=4" in text
    assert "2 of 3 complete configurations within val noise of the best (±2.8 points on 511" in text
    assert "which of them was picked is noise" in text
    alone = tuning_lines({"transfer": transfer | {"within_noise": noise | {"trials": [3]}}})
    assert not any("noise, not a finding" in line for line in alone)  # one: a real winner


def test_fine_tuning_significantly_below_the_probe_is_said_in_the_report_and_model_card():
    """The recipe's seeds below the exact probe on test (an unseen text case: -4.4 points
    [-7.9, -1.0]) while val chose fine-tuning: the report, and the card of a fine-tuned
    model, say so; a difference whose interval reaches 0 is not called worse."""
    from transferops.evaluation.report import difference_lines
    from transferops.registry.model_card import _caveats

    def diff(mean: float, low: float, high: float) -> dict:
        seeds = {"mean": mean, "ci_low": low - 0.2, "ci_high": high + 0.2, "n": 2}
        return {"mean": mean, "ci_low": low, "ci_high": high, "n": 260} | {
            "over_seeds": seeds | {"per_seed": [mean + 0.02, mean - 0.02]}
        }

    def metrics(probe: dict) -> dict:
        return {
            "models": {"transfer": {"accuracy": {"n": 2}}},
            "transfer_minus_scratch": {"accuracy": diff(0.18, 0.13, 0.23)},
            "transfer_minus_probe": {"accuracy": probe},
            "finetuned": {"minus": {}},
        }

    below = metrics(diff(-0.044, -0.079, -0.010))
    text = "\n".join(difference_lines(below, 95))
    assert "transfer − probe: -0.044 [-0.079, -0.010]" in text
    assert "fine-tuning is significantly worse than the probe" in text
    assert "fine-tuning is significantly worse than the scratch" not in text
    card = " ".join(_caveats({"candidate": "ensemble"}, below))
    assert "significantly lower than the exact probe on the test split (-4.4 points" in card
    assert "[-7.9, -1.0], mean of its 2 seeds" in card
    # the classical model registered instead: the recipe's result is not this model's
    assert "exact probe" not in " ".join(_caveats({"candidate": "classical"}, below))
    level = metrics(diff(-0.02, -0.06, 0.015))  # the interval reaches 0: not worse
    assert "significantly worse" not in "\n".join(difference_lines(level, 95))
    assert "exact probe" not in " ".join(_caveats({"candidate": "ensemble"}, level))


def test_the_few_shot_subsets_do_not_repeat_the_data_warnings(tmp_path, caplog):
    """The curve's subsets re-read the raw data: what the main prepare warned about (stray
    files, copies across splits) is not said again per subset; one line says the subset."""
    import logging

    data = tiny_digits(tmp_path)
    (Path(data["path"]) / "notes.txt").write_text("not an image")
    cfg = validate_config(
        {"data": data, "baseline": {"out": str(tmp_path / "bl"), "efficiency_per_class": [2]}}
    )
    with caplog.at_level(logging.INFO):
        prepare(cfg)
        assert "ignored 1 file(s) that are not images" in caplog.text  # said once, here
        caplog.clear()
        jobs = baseline_module._jobs(cfg)
    assert [j[0] for j in jobs if j[3] == 2] == ["transfer-k2", "scratch-k2"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "few-shot subset k=2: 6 training examples" in caplog.text
    assert logging.getLogger("transferops.data").level == logging.NOTSET  # restored
