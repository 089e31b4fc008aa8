"""Optuna search on real (tiny) data: resume after a kill, workers, pruning, MLflow children."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from transferops.config import SearchConfig, validate_config
from transferops.data.prepared import load_prepared
from transferops.errors import ConfigError
from transferops.runtime.study_storage import make_storage
from transferops.search.start import start_points
from transferops.search.study import cpu_seconds, make_sampler, run_search, study_name, suggest

TS = optuna.trial.TrialState


def _raw(tmp_path: Path, digits_prepared: Path, lite0_source: Path, **search) -> dict:
    """A quick search config; ``n_workers`` goes to compute (Dask workers when > 1)."""
    compute = {"n_workers": search.pop("n_workers", 1)}
    return {
        "compute": compute,
        "data": {"out": str(digits_prepared)},
        "source": {"out": str(lite0_source)},
        "finetune": {
            "epochs_per_stage": [2, 1],
            "blocks_per_stage": 2,
            "batch_size": 8,
            "checkpoint_dir": str(tmp_path / "ck"),
        },
        "search": {
            "storage": f"sqlite:///{tmp_path}/optuna.db",
            "out": str(tmp_path / "search"),
            "sampler": "random",
            "heartbeat_s": 1,
            "stop_without_headroom": 0,  # 6 val images: the probe is often unbeatable
            "space": {
                "lr": {"low": 1e-3, "high": 3e-2, "log": True},
                "unfreeze_depth": {"low": 0, "high": 2},
            },
            **search,
        },
        "tracking": {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "artifact_location": str(tmp_path / "mlartifacts"),
            "experiment": "t",
        },
    }


def _mlflow_children(tmp_path: Path, parent: str) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags["trial"]: r.data.tags["state"] for r in runs}


def test_search_prunes_dedupes_and_tracks(tmp_path, digits_prepared, lite0_source, caplog):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=4, pruner="median")
    raw["finetune"]["epochs_per_stage"] = [3]
    raw["search"]["space"]["unfreeze_depth"] = {"choices": [0]}
    cfg = validate_config(raw)
    # Enqueued points fix what runs; the 4th repeats the 1st, so it must not be recomputed.
    study = optuna.create_study(
        study_name=study_name(cfg), storage=make_storage(cfg.search), direction="maximize"
    )
    for lr in (0.02, 0.01, 1.000001e-3, 0.02):
        study.enqueue_trial({"lr": lr, "unfreeze_depth": 0})
    caplog.set_level("INFO", logger="transferops")
    res = run_search(cfg)
    trials = optuna.load_study(study_name=res.study_name, storage=cfg.search.storage).trials
    assert [t.params["lr"] for t in trials[:4]] == [0.02, 0.01, 1.000001e-3, 0.02]
    # Without a terminal (a log file, CI): a line per trial and per epoch, named by trial
    assert "trial #0 complete: val accuracy" in caplog.text
    assert "trial 0: stage 0 (depth 0)" in caplog.text and " epoch 2: loss " in caplog.text
    # the repeat of #0 was not trained and does not count: a fifth trial was drawn
    assert trials[3].user_attrs["duplicate_of"] == 0 and trials[3].state == TS.FAIL
    assert sum(t.state in (TS.COMPLETE, TS.PRUNED) for t in trials) == 4 == len(trials) - 1
    states = {str(t.number): t.state for t in trials}
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    children = _mlflow_children(tmp_path, summary["mlflow_run_id"])
    optuna_to_tag = {TS.COMPLETE: "complete", TS.PRUNED: "pruned"}
    for num, state in states.items():
        expected = "duplicate" if num == "3" else optuna_to_tag[state]
        assert children[num] == expected
    best = json.loads((tmp_path / "search" / "best_params.json").read_text())
    assert set(best) == {"finetune.lr", "finetune.unfreeze_depth"}
    assert best["finetune.lr"] == trials[res.best_trial].params["lr"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["best.finetune.lr"] == str(best["finetune.lr"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in arts
    # Per-epoch metrics reached the child runs.
    child = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.trial = '0'",
    )[0]
    assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 3


def test_pruned_trial_is_pruned_in_optuna_and_mlflow(tmp_path, digits_prepared, lite0_source):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=3, pruner="median")
    raw["finetune"]["epochs_per_stage"] = [2, 4]
    raw["finetune"]["blocks_per_stage"] = 1
    raw["finetune"]["head_init"] = "random"  # a probe head would make every lr look alike
    raw["search"]["space"] = {
        "lr": {"low": 1e-9, "high": 0.05, "log": True},
        "unfreeze_depth": {"choices": [1]},
    }
    cfg = validate_config(raw)
    study = optuna.create_study(
        study_name=study_name(cfg), storage=make_storage(cfg.search), direction="maximize"
    )
    for lr in (0.05, 0.04, 1e-9):  # the last cannot learn anything: below the median
        study.enqueue_trial({"lr": lr, "unfreeze_depth": 1})
    run_search(cfg)
    trials = optuna.load_study(study_name=study_name(cfg), storage=cfg.search.storage).trials
    assert trials[2].state == TS.PRUNED and len(trials[2].intermediate_values) < 4
    # nothing is compared in the head-only stage every trial shares: the first report (and
    # so the first chance to prune) is after the first thaw, at epoch 2 (stage 0 has 2)
    assert all(min(t.intermediate_values) == 2 for t in trials)
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert _mlflow_children(tmp_path, summary["mlflow_run_id"])["2"] == "pruned"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id], "tags.trial = '2'")
    # stopped early by the pruner: not FINISHED (its epochs did not all run); MLflow has no
    # "pruned" status, KILLED is the closest, and the tag says which
    assert run.info.status == "KILLED" and run.data.tags["state"] == "pruned"
    # named by arm: the transfer and scratch searches' trials do not share names
    assert run.info.run_name == "transfer-trial-2" and run.data.tags["arm"] == "transfer"
    assert study_name(cfg).startswith("transferops-transfer-digits-")  # arm, data name
    assert summary["counts"]["pruned"] == 1 and summary["fully_evaluated"] == 2
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.metrics["fully_evaluated"] == 2
    # 2 complete trials: no importance or contour drawn from them, and the run says why
    assert "2 completed" in parent.data.tags["plots_skipped"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/intermediate_values.png" in arts and "plots/param_importances.png" not in arts
    # the plots show every trial, the pruned one too, and name the metric
    from transferops.search.plots import history_axes

    study = optuna.load_study(study_name=study_name(cfg), storage=cfg.search.storage)
    assert study.metric_names == ["val_accuracy"]
    assert study.user_attrs["source"].startswith("package:efficientnet-lite0")  # not a hash
    ax = history_axes(study)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3 and ax.get_ylabel() == (
        "val accuracy"
    )
    arts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= arts


def test_invalid_space_is_refused_before_any_trial(tmp_path, digits_prepared, lite0_source):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=2)
    raw["search"]["space"]["unfreeze_depth"] = {"low": 0, "high": 12}
    with pytest.raises(ConfigError, match=r"goes up to 12 but the source model has 9 blocks"):
        run_search(validate_config(raw))
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    raw["search"]["space"]["lr"] = {"low": 0.1, "high": 0.01, "log": True}
    with pytest.raises(ConfigError, match=r"search.space.lr"):
        validate_config(raw)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["TRANSFEROPS_PROGRESS"] = "0"
    return env


def _kill_search_mid_trial(tmp_path: Path, name: str, cfg) -> tuple[int | None, dict]:
    """Start `transferops search`, SIGKILL it once a trial has finished and another is
    running with its params set; (the trial left RUNNING, the finished trials' values).
    None when the running one finished before the kill landed."""
    log = open(tmp_path / "search.log", "w")  # noqa: SIM115 (closed by the child's end)
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferops.cli", "search"],
        cwd=tmp_path,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name=name, storage=cfg.search.storage).trials
            except KeyError:  # study not created yet
                continue
            # A trial with its params set (the retry must repeat them); one killed before
            # that is test_trial_killed_before_its_first_heartbeat_is_failed_and_retried.
            if any(t.state == TS.COMPLETE for t in trials) and any(
                t.state == TS.RUNNING and t.params for t in trials
            ):
                break
    finally:
        proc.kill()
        proc.wait()
    trials = optuna.load_study(study_name=name, storage=cfg.search.storage).trials
    running = [t.number for t in trials if t.state == TS.RUNNING and t.params]
    done = {t.number: t.value for t in trials if t.state == TS.COMPLETE}
    return (running[0] if running else None), done


def test_resume_after_a_killed_process(tmp_path, digits_prepared, lite0_source):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=4, pruner="none")
    raw["finetune"]["epochs_per_stage"] = [3, 2]  # longer trials: a kill lands mid-trial
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = validate_config(raw)
    name = study_name(cfg)
    killed, before = None, {}
    for _ in range(3):  # a trial may finish between the poll and the kill: try again then
        killed, before = _kill_search_mid_trial(tmp_path, name, cfg)
        if killed is not None:
            break
    assert killed is not None, (tmp_path / "search.log").read_text()[-3000:]
    # Past the grace period (2 x 1 s) by more than a second: sqlite stores heartbeats and
    # compares them with CURRENT_TIMESTAMP at 1-second resolution, so 2.5 s after the last
    # beat can read as exactly 2 s, "not stale", and the killed trial would stay RUNNING.
    time.sleep(3.5)
    res = run_search(cfg)
    trials = optuna.load_study(study_name=name, storage=cfg.search.storage).trials
    # Finished trials were kept as they were, not rerun.
    assert {n: v for n, v in ((t.number, t.value) for t in trials) if n in before} == before
    assert trials[killed].state == TS.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == trials[killed].params
    assert sum(t.state == TS.COMPLETE for t in trials) == 4 == res.counts["complete"]
    assert len({t.number for t in trials}) == len(trials)
    # the resumed process did not replay the killed one's draws
    configs = [tuple(sorted(t.params.items())) for t in trials if t.state == TS.COMPLETE]
    assert len(configs) == len(set(configs))


def test_trial_killed_before_its_first_heartbeat_is_failed_and_retried(
    tmp_path, digits_prepared, lite0_source
):
    """Optuna asks a trial before its heartbeat thread starts; a process killed in between
    leaves a RUNNING trial with no heartbeat, which must not stay RUNNING forever."""
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=2, pruner="none")
    raw["finetune"]["epochs_per_stage"] = [1]
    cfg = validate_config(raw)
    study = optuna.create_study(
        study_name=study_name(cfg), storage=make_storage(cfg.search), direction="maximize"
    )
    study.enqueue_trial({"lr": 0.01, "unfreeze_depth": 0})
    orphan = study.ask()  # RUNNING with its params fixed, and never a heartbeat
    orphan.suggest_float("lr", 1e-3, 3e-2, log=True)
    orphan.suggest_int("unfreeze_depth", 0, 2)
    time.sleep(2.5)  # past the grace period (2 x 1 s)
    res = run_search(cfg)
    trials = optuna.load_study(study_name=res.study_name, storage=cfg.search.storage).trials
    assert trials[orphan.number].state == TS.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].params == {"lr": 0.01, "unfreeze_depth": 0}
    assert retried[0].state == TS.COMPLETE and res.counts["complete"] == 2


def test_a_fresh_trial_without_heartbeat_is_not_failed(tmp_path, digits_prepared, lite0_source):
    """Within the grace period a trial with no heartbeat yet may be a live worker's."""
    cfg = validate_config(_raw(tmp_path, digits_prepared, lite0_source))
    storage = make_storage(cfg.search)
    study = optuna.create_study(study_name=study_name(cfg), storage=storage)
    trial = study.ask()
    assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(2.5)
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]


def test_two_dask_workers_share_one_study(tmp_path, digits_prepared, lite0_source, monkeypatch):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=4, n_workers=2, pruner="none")
    cfg = validate_config(raw)
    # What loading a registered pyfunc in this process does: its shipped, inference-only copy
    # of transferops goes first on sys.path. Workers must still import the real package.
    (tmp_path / "code" / "transferops").mkdir(parents=True)
    (tmp_path / "code" / "transferops" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    res = run_search(cfg)
    trials = optuna.load_study(study_name=res.study_name, storage=cfg.search.storage).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(trials)))
    assert sum(t.state == TS.COMPLETE for t in trials) >= 4
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2
    # each worker draws its own sequence (and the constant liar): no configuration twice
    configs = [tuple(sorted(t.params.items())) for t in trials if t.state == TS.COMPLETE]
    assert len(configs) == len(set(configs))
    # every trial's MLflow run is nested under the search run, from whichever worker
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert set(_mlflow_children(tmp_path, summary["mlflow_run_id"])) == {str(n) for n in numbers}


def test_the_old_n_workers_key_says_where_it_moved():
    with pytest.raises(ConfigError, match=r"search\.n_workers: moved to compute\.n_workers"):
        validate_config({"search": {"n_workers": 2}})


def test_each_worker_and_resumed_process_draws_its_own_sequence():
    """The same seed in every worker replayed the same configurations (issue 15); the offset
    (worker index, trials already in the study) gives each its own, reproducibly."""

    sc = SearchConfig(
        space={
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "unfreeze_depth": {"low": 0, "high": 8},
        }
    )

    def first(offset: int) -> dict:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(sc, offset))
        return suggest(study.ask(), sc)

    assert first(0) == first(0)  # reproducible
    assert len({json.dumps(first(o), sort_keys=True) for o in (0, 1, 10_007, 10_008)}) == 4


def test_the_first_trials_are_spread_over_the_space_and_the_same_on_every_seed():
    """search.start: spread: no two start trials share an lr bin or a depth bin, the first
    is the middle of the space and the next its far sides (so the 3 trials the no-headroom
    stop reads cover it), depth 0 (the probe every trial starts from) left to the sampler;
    the seed does not move them. `sampler` and the grid sampler start from nothing."""
    space = {
        "lr": {"low": 3e-4, "high": 3e-2, "log": True},
        "unfreeze_depth": {"low": 0, "high": 7},
    }
    points = start_points(SearchConfig(space=space))
    assert len(points) == 5  # TPE's start-up trials, replaced
    lrs = [p["lr"] for p in points]
    centres = [3e-4 * 100 ** ((i + 0.5) / 5) for i in range(5)]  # the centres of 5 log-bins
    assert lrs[0] == pytest.approx(centres[2]) and sorted(lrs) == pytest.approx(centres)
    depths = [p["unfreeze_depth"] for p in points]
    assert depths[0] == 4 and len(set(depths)) == 5 and 0 not in depths
    first3 = sorted(depths[:3])
    assert first3[0] <= 2 and first3[-1] >= 6  # the shallow and the deep side, early
    assert start_points(SearchConfig(space=space, seed=7)) == points
    assert start_points(SearchConfig(space=space, start="sampler")) == []
    assert start_points(SearchConfig(space=space, sampler="grid")) == []
    assert len(start_points(SearchConfig(space=space, n_trials=2))) == 2
    # a coarse dimension alone: each value once, no repeats (0 only when it is all there is)
    two = SearchConfig(space={"lr": None, "unfreeze_depth": {"choices": [0, 2, 1]}})
    assert sorted(p["unfreeze_depth"] for p in start_points(two)) == [1, 2]
    probe_only = SearchConfig(space={"lr": space["lr"], "unfreeze_depth": {"choices": [0]}})
    assert {p["unfreeze_depth"] for p in start_points(probe_only)} == {0}


def test_a_search_cut_short_by_its_timeout_says_so(tmp_path, digits_prepared, lite0_source, caplog):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=5, timeout_s=0.5)
    res = run_search(validate_config(raw))
    assert res.counts["complete"] + res.counts["pruned"] < 5
    assert "of the 5 trials asked for: search.timeout_s (0.5 s) ran out" in caplog.text


def test_a_search_stops_when_its_cpu_budget_is_spent(
    tmp_path, digits_prepared, lite0_source, caplog
):
    """search.budget_s: no trial starts once the finished ones used that much compute (wall
    x threads); the study says why it is short."""
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=4, budget_s=0.01)
    res = run_search(validate_config(raw))
    assert res.counts["complete"] + res.counts["pruned"] == 1  # the first spent it
    study = optuna.load_study(study_name=res.study_name, storage=f"sqlite:///{tmp_path}/optuna.db")
    # the design's first point ran; its other start trials wait (a longer budget runs them)
    (t,) = [t for t in study.trials if t.state != TS.WAITING]
    assert t.params == start_points(validate_config(raw).search)[0]
    wall = (t.datetime_complete - t.datetime_start).total_seconds()
    assert cpu_seconds(study) == pytest.approx(wall * t.user_attrs["threads"])
    assert "of the 4 trials asked for: search.budget_s (0.01 CPU s) is spent" in caplog.text


def test_the_pruner_prunes_only_beyond_validation_noise():
    """The median rule with a margin: the spread of a difference of two accuracies on the
    val split (1 SE at the median): 1-2 val examples below the median is noise, not a loss."""
    from optuna.distributions import FloatDistribution

    from transferops.search.study import NoisyMedianPruner

    pruner = NoisyMedianPruner(val_size=285)
    assert 0.03 < pruner.margin(0.78) < 0.04  # ~3.5 points on 285 examples
    study = optuna.create_study(direction="maximize", pruner=pruner)
    dist = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}

    def finished(value: float) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-3},
                distributions=dist,
                value=value,
                intermediate_values={2: value},
            )
        )

    def pruned_at(value: float) -> bool:
        t = study.ask(dist)
        t.report(value, 2)
        verdict = t.should_prune()
        study.tell(t, value)
        return verdict

    finished(0.78)
    assert not pruned_at(0.50)  # one other trial: no median yet
    finished(0.80)  # the others now: 0.78, 0.50, 0.80 -> median 0.78
    assert not pruned_at(0.78 - 2 / 285)  # two val examples below: noise
    assert pruned_at(0.70)  # 8 points below: pruned
    assert not pruned_at(0.79)


def test_a_search_without_headroom_over_the_probe_stops_and_says_so(
    tmp_path, digits_prepared, lite0_source, caplog
):
    """Trials that cannot move off the exact probe (a vanishing lr): after
    stop_without_headroom complete trials the search stops; the summary and log say why."""
    caplog.set_level("INFO", logger="transferops")
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=6, stop_without_headroom=2)
    raw["search"]["space"]["lr"] = {"low": 1e-12, "high": 1e-11, "log": True}
    raw["search"]["pruner"] = "none"
    res = run_search(validate_config(raw))
    assert res.counts["complete"] == 2  # not 6
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["stopped_early"].startswith("no headroom: in 2 complete trials")
    assert "the probe is the model" in caplog.text
    # the step run again stays stopped: no trial past the stop, though the design's
    # other start trials wait in the study
    assert run_search(validate_config(raw)).counts["complete"] == 2


def test_trials_are_compared_by_the_registry_metric(tmp_path, digits_prepared, lite0_source):
    """With registry.metric macro_f1 a trial's value is its model's val macro-F1 (what the
    gates will decide on), not its val accuracy; the run's accuracy is kept beside it."""
    from sklearn.metrics import f1_score

    from transferops.finetune.train import train_model
    from transferops.search.study import _value

    raw = _raw(tmp_path, digits_prepared, lite0_source)
    # a random head barely trained: a weak model, whose macro-F1 and accuracy differ
    raw["finetune"] |= {"head_init": "random", "epochs_per_stage": [1], "lr": 1e-5}
    raw["finetune"]["unfreeze_depth"] = 0
    raw["registry"] = {"metric": "macro_f1"}
    cfg = validate_config(raw)
    res, spec = train_model(cfg)
    val = load_prepared(digits_prepared, "val")
    with torch.no_grad():
        pred = res.net.eval()((val.images.float() / 255 - 0.5) / 0.5).argmax(1).numpy()
    y = val.labels.numpy()
    f1 = f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert f1 != pytest.approx((pred == y).mean())  # the two metrics disagree here
    assert _value(cfg, res, spec) == pytest.approx(f1)
    plain = validate_config(raw | {"registry": {"metric": "accuracy"}})
    assert _value(plain, res, spec) == res.best_val_accuracy
