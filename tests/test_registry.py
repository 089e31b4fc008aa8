"""Registry: the promotion gates on a real MLflow registry, and registration of a real
fine-tuned model (idempotent, lineage tags, model card, pyfunc on raw images)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from transferops.config import (
    Config,
    RegistryConfig,
    load_config,
    registered_model_name,
    with_overrides,
)
from transferops.errors import RegistryError
from transferops.registry.client import CHALLENGER, CHAMPION
from transferops.registry.promote import Evidence, decide_promotion, gate, promote
from transferops.registry.register import register

from .conftest import write_image_folder

NAME = "gate-test"


# ----------------------------------------------------------- gates (synthetic)


@pytest.fixture
def gate_cfg(tmp_path: Path, monkeypatch) -> Config:
    monkeypatch.chdir(tmp_path)
    return with_overrides(
        Config(),
        {
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.artifact_location": str(tmp_path / "art"),
            "registry.model_name": NAME,
        },
    )


def _challenger(
    cfg: Config, acc: float, beats: bool = True, scratch: float = 0.5, classical: float = 0.0
) -> str:
    """A version with the tags `register` writes, aliased challenger; `classical` is its test
    accuracy minus the classical baseline's (interval +-0.03 around it)."""
    from transferops.runtime.tracking import setup_tracking

    setup_tracking(cfg.tracking)
    client = MlflowClient()
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    src = Path(cfg.tracking.artifact_location) / f"m{acc}"
    src.mkdir(parents=True, exist_ok=True)
    mv = client.create_model_version(
        NAME,
        src.resolve().as_uri(),
        tags={
            "test_accuracy": str(acc),
            "scratch_accuracy": str(scratch),
            "transfer_beats_scratch": str(beats).lower(),
            # the gate reads the interval, not the verdict text
            "transfer_minus_scratch_ci_low": "0.05" if beats else "-0.02",
            "verdict": "transfer beats scratch" if beats else "no significant gain",
            "data_hash": "d1",
            "classes": '["a", "b"]',
            "minus_classical_mean": str(classical),
            "minus_classical_ci_low": str(classical - 0.03),
            "minus_classical_ci_high": str(classical + 0.03),
        },
    )
    client.set_registered_model_alias(NAME, CHALLENGER, mv.version)
    return str(mv.version)


def _champion(cfg: Config) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(NAME, CHAMPION).version)
    except Exception:
        return None


# ------------------------------------------------------ the gate (pure function)


def _ev(**kw) -> Evidence:
    base = dict(
        name="m",
        challenger="2",
        challenger_metric=0.85,
        scratch_mean=0.70,
        gain_low=0.03,
        verdict="transfer beats scratch by 15 ± 12 points",
    )
    return Evidence(**(base | kw))


def test_cheap_gate_refuses_a_model_a_cheap_baseline_beats():
    rule = RegistryConfig()
    beaten = gate(
        _ev(minus={"probe": (0.01, -0.02, 0.04), "classical": (-0.08, -0.11, -0.05)}), rule
    )
    assert not beaten.promote
    assert "fails the cheap-baseline gate (vs probe +1.0" in beaten.summary()
    assert "beaten by classical -8.0 [-11.0, -5.0] points" in beaten.summary()
    # within the noise of the test split (interval spans 0): not beaten
    tied = gate(_ev(minus={"classical": (-0.02, -0.05, 0.01)}), rule)
    assert tied.promote and "passes the cheap-baseline gate" in tied.summary()
    off = gate(_ev(minus={"classical": (-0.08, -0.11, -0.05)}), RegistryConfig(cheap_gate=False))
    assert off.promote and "cheap-baseline" not in off.summary()


def test_a_model_that_drops_a_class_is_named_and_refused():
    from transferops.evaluation.evaluate import dropped_classes

    per_class = {
        "cat": {"precision": 0.8, "recall": 0.9},
        "owl": {"precision": 0.0, "recall": 0.0},  # never predicted right
        "yak": {"precision": 0.0, "recall": 0.0},  # the probe gets none of it either
    }
    probe = ("probe", {"cat": 0.8, "owl": 0.27, "yak": 0.0})
    assert dropped_classes(per_class, probe) == ["owl"]
    assert dropped_classes(per_class, None) == []
    refused = gate(_ev(dropped=["owl"]), RegistryConfig())
    assert not refused.promote
    assert "fails the dropped-class gate (class owl: recall 0 on test" in refused.summary()
    off = gate(_ev(dropped=["owl"]), RegistryConfig(dropped_class_gate=False))
    assert off.promote and "dropped-class" not in off.summary()


def test_gate_decides_on_the_interval_not_on_text():
    rule = RegistryConfig()
    assert gate(_ev(), rule).promote  # first model, interval above 0
    refused = gate(_ev(gain_low=-0.01, verdict="transfer beats scratch (wrong text)"), rule)
    assert not refused.promote and "fails the baseline gate" in refused.summary()
    assert not gate(_ev(gain_low=None), rule).promote  # one seed: no interval, no promotion
    mean_rule = RegistryConfig(baseline_gate="mean")
    assert gate(_ev(gain_low=None), mean_rule).promote
    assert not gate(_ev(challenger_metric=0.69), mean_rule).promote


def test_a_classical_candidate_must_itself_beat_scratch():
    # transfer's verdict is about the fine-tuned network, not the pixel model train kept
    rule = RegistryConfig()
    classical = {"candidate": "classical", "gain_low": -0.02, "verdict": "no significant gain"}
    passes = gate(_ev(**classical, minus={"scratch": (0.12, 0.05, 0.19)}), rule)
    assert passes.promote
    assert "passes the baseline gate (the classical candidate vs scratch +12.0 [+5.0, +19.0]" in (
        passes.summary()
    )
    fails = gate(_ev(candidate="classical", minus={"scratch": (0.02, -0.01, 0.05)}), rule)
    assert not fails.promote and "fails the baseline gate" in fails.summary()
    # a fine-tuned candidate keeps transfer's verdict; scratch is not a cheap baseline
    tuned = gate(_ev(minus={"scratch": (0.02, -0.01, 0.05)}), rule)
    assert tuned.promote and "vs scratch" not in tuned.summary()


def test_gate_against_the_champion():
    rule = RegistryConfig(min_improvement=0.02)
    champ = {"champion": "1", "champion_note": "on the same test split"}
    assert gate(_ev(champion_metric=0.80, **champ), rule).promote
    tie = gate(_ev(champion_metric=0.84, **champ), rule)  # +0.01 < min_improvement
    assert not tie.promote and "does not beat champion v1" in tie.summary()
    other = gate(_ev(champion_metric=None, champion="1", champion_note="other classes"), rule)
    assert other.promote and "replaces it" in other.summary()
    same = gate(_ev(champion="2", champion_metric=0.85), rule)
    assert not same.promote and "already the champion" in same.summary()


# ------------------------------------------------------ the gate on a real registry


def test_first_model_that_beats_the_baseline_becomes_champion(gate_cfg):
    v = _challenger(gate_cfg, 0.8)
    assert promote(gate_cfg, dry_run=True).promote and _champion(gate_cfg) is None  # dry run
    d = promote(gate_cfg)
    assert d.applied and _champion(gate_cfg) == v
    assert "first model" in d.summary()
    again = promote(gate_cfg)
    assert not again.promote and "already the champion" in again.summary()


def test_first_model_that_does_not_beat_the_baseline_is_not_promoted(gate_cfg):
    _challenger(gate_cfg, 0.8, beats=False)
    d = promote(gate_cfg)
    assert not d.applied and _champion(gate_cfg) is None
    assert "fails the baseline gate (no significant gain)" in d.summary()


def test_beats_both_is_promoted(gate_cfg):
    old = _challenger(gate_cfg, 0.80)
    promote(gate_cfg)
    new = _challenger(gate_cfg, 0.85)
    d = promote(gate_cfg)
    assert d.applied and _champion(gate_cfg) == new != old
    assert d.champion_metric == pytest.approx(0.80) and d.challenger_metric == pytest.approx(0.85)
    tags = MlflowClient().get_model_version(NAME, new).tags
    assert tags["replaced_champion"] == old


@pytest.mark.parametrize("acc", [0.79, 0.80])
def test_losing_or_tying_with_the_champion_changes_nothing(gate_cfg, acc):
    old = _challenger(gate_cfg, 0.80)
    promote(gate_cfg)
    _challenger(gate_cfg, acc)
    d = promote(gate_cfg)
    assert not d.applied and _champion(gate_cfg) == old
    assert f"does not beat {CHAMPION} v{old}" in d.summary()


def test_beating_the_champion_but_not_the_baseline_changes_nothing(gate_cfg):
    old = _challenger(gate_cfg, 0.80)
    promote(gate_cfg)
    _challenger(gate_cfg, 0.95, beats=False)
    d = promote(gate_cfg)
    assert not d.applied and _champion(gate_cfg) == old
    assert "fails the baseline gate" in d.summary() and "beats champion" in d.summary()


def test_min_improvement_margin(gate_cfg):
    cfg = with_overrides(gate_cfg, {"registry.min_improvement": 0.05})
    old = _challenger(cfg, 0.80)
    promote(cfg)
    _challenger(cfg, 0.84)
    assert not promote(cfg).applied and _champion(cfg) == old
    new = _challenger(cfg, 0.86)
    assert promote(cfg).applied and _champion(cfg) == new


def test_challenger_beaten_by_the_classical_baseline_is_not_crowned(gate_cfg):
    old = _challenger(gate_cfg, 0.80)
    promote(gate_cfg)
    _challenger(gate_cfg, 0.90, classical=-0.05)  # beats the champion, loses to classical
    d = promote(gate_cfg)
    assert not d.applied and _champion(gate_cfg) == old
    assert "fails the cheap-baseline gate (beaten by classical -5.0" in d.summary()


def test_mean_gate_compares_with_the_scratch_mean(gate_cfg):
    cfg = with_overrides(gate_cfg, {"registry.baseline_gate": "mean"})
    _challenger(cfg, 0.60, beats=False, scratch=0.70)
    assert not promote(cfg).applied
    v = _challenger(cfg, 0.75, beats=False, scratch=0.70)
    assert promote(cfg).applied and _champion(cfg) == v


def test_promote_without_a_challenger_says_what_to_do(gate_cfg):
    with pytest.raises(RegistryError, match="run `transferops register` first"):
        decide_promotion(gate_cfg)


# ---------------------------------------------------- a real registered model


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """The whole pipeline (plain-Python door) once on tiny real digits."""
    from transferops.config import load_config
    from transferops.pipeline.run import run_pipeline

    root = tmp_path_factory.mktemp("reg")
    write_image_folder(root / "raw", per_class=12)
    (root / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [2, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  scratch_trials: 2\n  linear_probe: false\n"
        "  efficiency_per_class: [null]\n"
        # these tests are about a fine-tuned network (on these scans pixels win on val)
        "registry:\n  baseline_gate: mean\n  classical_candidate: false\n"
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_pipeline(load_config(root / "params.yaml"))
        yield root
    finally:
        os.chdir(cwd)


@pytest.fixture
def in_pipeline_dir(pipeline_dir, monkeypatch) -> Config:
    from transferops.config import load_config
    from transferops.runtime.tracking import setup_tracking

    monkeypatch.chdir(pipeline_dir)
    cfg = load_config("params.yaml")
    setup_tracking(cfg.tracking)
    return cfg


def test_registering_the_same_model_twice_makes_one_version(in_pipeline_dir):
    cfg = in_pipeline_dir
    again = register(cfg)  # the pipeline registered it already
    assert not again.created and again.version == "1"
    versions = MlflowClient().search_model_versions(f"name='{registered_model_name(cfg)}'")
    assert [int(v.version) for v in versions] == [1]
    receipt = json.loads(Path(cfg.registry.out).read_text())
    held = MlflowClient().get_model_version(registered_model_name(cfg), "1").aliases
    assert receipt["version"] == "1" and CHALLENGER in receipt["aliases"]
    assert receipt["aliases"] == sorted(held)  # champion too, once promoted: every alias


def test_lineage_tags_and_model_card(in_pipeline_dir):
    from transferops.runtime.artifacts import read_json, sha256_file

    cfg = in_pipeline_dir
    client = MlflowClient()
    mv = client.get_model_version_by_alias(registered_model_name(cfg), CHALLENGER)
    t = mv.tags
    metrics = read_json(Path(cfg.evaluate.out) / "metrics.json")
    source = read_json(Path(cfg.source.out) / "manifest.json")
    summary = read_json(Path(cfg.search.out) / "summary.json")
    assert t["data_hash"] == read_json(Path(cfg.data.out) / "manifest.json")["data_hash"]
    assert t["source_sha256"] == source["sha256"] and t["source_origin"] == source["origin"]
    assert t["model_sha256"] == sha256_file(Path(cfg.finetune.out) / "model.safetensors")
    assert t["git_commit"] == "not a git repository"  # the project is a temp folder
    assert t["best_trial"] == f"{summary['study_name']}#{summary['best_trial']}"
    assert json.loads(t["best_params"]) == summary["best_params"]
    noise = summary["within_noise"]  # how many configurations val could not tell apart
    assert t["search_within_noise"] == f"{len(noise['trials'])} of {noise['of']}"
    assert json.loads(t["params"])["unfreeze_depth"] == summary["best_params"].get(
        "finetune.unfreeze_depth", cfg.finetune.unfreeze_depth
    )
    assert float(t["test_accuracy"]) == pytest.approx(metrics["finetuned"]["accuracy"], abs=1e-6)
    # the model to register carries its temperature, fitted on val (NLL can only drop there)
    spec = read_json(Path(cfg.finetune.out) / "model.json")
    cal = spec["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"] and spec["temperature"] > 0
    assert metrics["finetuned"]["calibration"]["temperature"] == round(spec["temperature"], 4)
    # the dropped-class gate's evidence travels with the version
    assert json.loads(t["dropped_classes"]) == metrics["finetuned"]["dropped_classes"]
    assert float(t["scratch_accuracy"]) == pytest.approx(
        metrics["models"]["scratch"]["accuracy"]["mean"], abs=1e-6
    )
    assert t["verdict"] == metrics["verdict"]
    (logged,) = client.search_logged_models(  # its page says "Registered", not "Not ..."
        experiment_ids=[client.get_run(mv.run_id).info.experiment_id],
        filter_string=f"source_run_id = '{mv.run_id}'",
    )
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": registered_model_name(cfg), "version": mv.version}
    ]
    for role in ("scratch", "classical"):  # what the cheap-baseline gate reads (+ scratch)
        d = metrics["finetuned"]["minus"][role]
        assert float(t[f"minus_{role}_ci_high"]) == pytest.approx(d["ci_high"], abs=1e-5)
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    card = client.download_artifacts(mv.run_id, "model_card.md")
    text = Path(card).read_text()
    assert t["data_hash"][:12] in text and metrics["verdict"] in text
    assert f"models:/{registered_model_name(cfg)}@champion" in text
    assert f"({t['search_within_noise']} complete configurations within val noise" in text


def test_pyfunc_predicts_on_raw_images_like_the_trained_model(in_pipeline_dir, tmp_path):
    import mlflow
    import torch

    from transferops.data.prepared import load_prepared
    from transferops.model.folder import load_finetuned
    from transferops.model.predict import predict_probs

    cfg = in_pipeline_dir
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(cfg)}@{CHALLENGER}")
    train = load_prepared(cfg.data.out, "train")
    assert train.images is not None
    imgs = train.images[:6]
    encoded = []
    for i, img in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        encoded.append(buf.getvalue())
        (tmp_path / f"{i}.png").write_bytes(buf.getvalue())
    out = model.predict(pd.DataFrame({"image": encoded}))
    by_path = model.predict(pd.DataFrame({"image": [str(tmp_path / f"{i}.png") for i in range(6)]}))
    net, spec = load_finetuned(cfg.finetune.out)
    from transferops.model.inputs import Inputs

    ref = predict_probs(net, spec, Inputs(imgs, torch.zeros(6)), torch.device("cpu"))
    assert list(out["label"]) == [spec["class_names"][i] for i in ref.argmax(1)]
    np.testing.assert_allclose(np.stack(out["probabilities"]), ref, atol=1e-5)
    assert list(by_path["label"]) == list(out["label"])
    assert model.metadata.metadata["class_names"] == spec["class_names"]
    # the signature declares every column predict returns
    outputs = model.metadata.get_output_schema().input_names()
    assert outputs == ["label", "confidence", "probabilities"] == list(out.columns)


def test_champion_trained_on_other_data_is_rescored_on_the_new_test_split(in_pipeline_dir):
    """A champion from older data: its tagged metric is not comparable, so it is re-scored."""
    cfg = in_pipeline_dir
    client = MlflowClient()
    name = registered_model_name(cfg)
    real = client.get_model_version_by_alias(name, CHALLENGER)
    old = client.create_model_version(
        name, real.source, tags=real.tags | {"data_hash": "old-data", "test_accuracy": "0.0"}
    )
    prev_champion = _alias(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, old.version)
    try:
        d = decide_promotion(cfg)
        # Re-scored, the champion is the same network as the challenger: equal, not 0.0.
        assert d.champion_metric == pytest.approx(float(real.tags["test_accuracy"]), abs=1e-6)
        assert "re-scored on the new test split" in d.summary() and not d.promote
    finally:
        if prev_champion:
            client.set_registered_model_alias(name, CHAMPION, prev_champion)
        else:
            client.delete_registered_model_alias(name, CHAMPION)
        client.delete_model_version(name, old.version)


def _alias(client, name, alias):
    try:
        return client.get_model_version_by_alias(name, alias).version
    except Exception:
        return None


def test_registered_model_is_a_source_for_a_new_fine_tune(in_pipeline_dir, tmp_path):
    """source.kind mlflow: the registered model's fine-tuned backbone, head dropped; an alias
    is resolved on every pull, so moving it pulls the new version."""
    import torch

    from transferops.finetune.train import train_from_config
    from transferops.model.families import build_staged
    from transferops.model.folder import load_finetuned
    from transferops.sources.pull import load_source, pull_from_config

    cfg = in_pipeline_dir
    name = registered_model_name(cfg)
    client = MlflowClient()
    real = client.get_model_version_by_alias(name, CHALLENGER)
    client.set_registered_model_alias(name, "src-test", real.version)
    src_cfg = with_overrides(
        cfg,
        {
            "source.kind": "mlflow",
            "source.name": f"models:/{name}@src-test",
            "source.out": str(tmp_path / "source"),
            "finetune.out": str(tmp_path / "tuned"),
            "finetune.metrics": str(tmp_path / "tuned.json"),
            "finetune.checkpoint_dir": str(tmp_path / "ck"),
        },
    )
    moved = None
    try:
        res = pull_from_config(src_cfg)
        reg = res.manifest["registered"]
        assert not res.skipped and reg["version"] == int(real.version)
        assert reg["model_sha256"] == real.tags["model_sha256"]
        assert res.manifest["origin"].startswith(f"mlflow:{name} v{real.version} (@src-test)")
        # The pulled backbone is the registered model's, weight for weight.
        net, spec = load_finetuned(cfg.finetune.out)
        src = load_source(tmp_path / "source", spec["image_size"])
        pulled = build_staged(src.model, src.family, 2, image_size=spec["image_size"])
        one = net.members[0] if spec.get("members") else net  # an ensemble: its first member
        tuned, again = one.state_dict(), pulled.state_dict()
        backbone = [k for k in tuned if not k.startswith("head.")]
        assert backbone and all(torch.equal(tuned[k], again[k]) for k in backbone)
        assert pull_from_config(src_cfg).skipped
        # Move the alias: the next pull resolves and fetches the new version.
        moved = client.create_model_version(name, real.source, tags=real.tags)
        client.set_registered_model_alias(name, "src-test", moved.version)
        res2 = pull_from_config(src_cfg)
        assert not res2.skipped and res2.manifest["registered"]["version"] == int(moved.version)
        assert res2.manifest["sha256"] == res.manifest["sha256"]  # same weights, same file
        # And it fine-tunes like any other source.
        train_from_config(src_cfg)
        _, new_spec = load_finetuned(tmp_path / "tuned")
        assert new_spec["source"]["origin"].startswith(f"mlflow:{name} v{moved.version}")
    finally:
        client.delete_registered_model_alias(name, "src-test")
        if moved is not None:
            client.delete_model_version(name, moved.version)


def test_registry_source_errors_name_what_is_wrong(in_pipeline_dir, tmp_path):
    from transferops.errors import ConfigError, SourceError
    from transferops.sources.pull import pull_from_config

    cfg = in_pipeline_dir
    out = {"source.kind": "mlflow", "source.out": str(tmp_path / "s")}
    with pytest.raises(SourceError, match=f"Registered models there: {registered_model_name(cfg)}"):
        pull_from_config(with_overrides(cfg, {**out, "source.name": "models:/nope@champion"}))
    with pytest.raises(SourceError, match=r"does not exist; point at the MLflow store"):
        pull_from_config(
            with_overrides(
                cfg,
                {
                    **out,
                    "source.name": "models:/x/1",
                    "source.registry_uri": f"sqlite:///{tmp_path}/none.db",
                },
            )
        )
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match=r"source\.name: kind mlflow takes models:/"):
        with_overrides(cfg, {**out, "source.name": "transferops-demo"})


def test_registered_model_loads_where_transferops_is_not_installed(in_pipeline_dir, tmp_path):
    """The model ships transferops' code (code_paths) and pins what that code imports."""
    import subprocess
    import sys

    import mlflow

    from transferops.runtime.tracking import absolute_uri

    cfg = in_pipeline_dir
    uri = f"models:/{registered_model_name(cfg)}@{CHALLENGER}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    reqs = (local / "requirements.txt").read_text().split()
    assert not any(r.split("==")[0] == "transferops" for r in reqs)
    pinned = {r.split("==")[0] for r in reqs}
    assert {"torch", "efficientnet-lite-pytorch", "pillow", "safetensors"} <= pinned
    assert not {"pydantic", "pyyaml", "rich", "optuna"} & pinned  # inference code only
    code = local / "code" / "transferops"
    shipped = {p.relative_to(code).as_posix() for p in code.rglob("*.py")}
    assert {"model/folder.py", "model/inputs.py", "model/_pyfunc_entry.py"} <= shipped
    assert not {p for p in shipped if p.split("/")[0] in ("finetune", "search", "pipeline")}
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    expected = list(mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": paths}))["label"])
    script = f"""
import importlib.util, json, sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p or ".") / "transferops").is_dir()]
assert importlib.util.find_spec("transferops") is None, "transferops still importable"
import mlflow, pandas as pd
mlflow.set_tracking_uri({absolute_uri(cfg.tracking.uri)!r})
model = mlflow.pyfunc.load_model({uri!r})
import transferops
out = model.predict(pd.DataFrame({{"image": {paths!r}}}))
print(json.dumps({{"file": transferops.__file__, "labels": list(out["label"])}}))
"""
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "type hints" not in r.stderr  # MLflow's hint at the class: the signature is given
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "/code/transferops/" in got["file"]  # the copy inside the model, not the install
    assert got["labels"] == expected


def test_predict_command_from_another_folder(pipeline_dir, tmp_path, monkeypatch):
    """`transferops predict` finds the project's store through --params (a relative sqlite
    path is the project's, not the working folder's) and agrees with the pyfunc."""
    import mlflow
    from typer.testing import CliRunner

    from transferops.cli import app
    from transferops.config import load_config

    cfg = load_config(pipeline_dir / "params.yaml")
    imgs = sorted((pipeline_dir / "raw" / "one").glob("*.png"))[:3]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    name = registered_model_name(cfg)
    args = ["predict", *map(str, imgs), "--params", str(pipeline_dir / "params.yaml")]
    r = CliRunner().invoke(app, [*args, "--model", f"models:/{name}@challenger", "--out", "p.csv"])
    assert r.exit_code == 0, r.output
    assert not (elsewhere / "mlflow.db").exists()  # no empty store made here
    got = pd.read_csv(elsewhere / "p.csv")
    assert list(got["input"]) == list(map(str, imgs))
    uri = f"sqlite:///{pipeline_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    ref = mlflow.pyfunc.load_model(f"models:/{name}@challenger").predict(
        pd.DataFrame({"image": list(map(str, imgs))})
    )
    assert list(got["label"].astype(str)) == list(ref["label"])
    # an alias nobody holds: the error says what there is
    r = CliRunner().invoke(app, [*args, "--model", f"models:/{name}@nope"])
    assert r.exit_code == 2 and "--model" in r.output, r.output
    assert f"{name} has v1 @" in r.output and "@challenger" in r.output


@contextlib.contextmanager
def _flipped(path: Path) -> Iterator[None]:
    """`path` with some bytes in the middle of its tensors changed, restored after."""
    original = path.read_bytes()
    data = bytearray(original)
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def test_predict_skips_a_bad_file_and_keeps_one_line_per_input(pipeline_dir, tmp_path):
    """A file that cannot be decoded (here: a decompression bomb, and garbage) is reported
    and skipped, not fatal to the batch; a name holding a newline stays on its line."""
    from typer.testing import CliRunner

    from transferops.cli import app

    good = next((pipeline_dir / "raw" / "one").glob("*.png"))
    odd = tmp_path / "a\nb.png"
    odd.write_bytes(good.read_bytes())
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    Image.new("L", (20_000, 20_000)).save(tmp_path / "bomb.png")  # 400 M pixels
    r = CliRunner().invoke(
        app,
        [
            "predict",
            str(good),
            str(odd),
            str(tmp_path / "garbage.png"),
            str(tmp_path / "bomb.png"),
            "--params",
            str(pipeline_dir / "params.yaml"),
            "--model",
            f"models:/{registered_model_name(load_config(pipeline_dir / 'params.yaml'))}/1",
        ],
    )
    assert r.exit_code == 0, r.output
    text = "".join(r.output.split())  # the console wraps long lines
    assert "2prediction(s),2input(s)skipped" in text
    assert "garbage.png:cannotbedecoded" in text and "bomb.png:cannotbedecoded" in text
    rows = [line for line in r.output.splitlines() if line.endswith(".png")]
    assert any(line.endswith("a\\nb.png") for line in rows), r.output


def test_tampered_weights_are_never_served_scored_or_registered(pipeline_dir, monkeypatch):
    """The sha256 recorded at save (model.json) and at registration (the version's tag) is
    checked on every load: a flipped byte is one error line naming the file, and nothing is
    predicted, evaluated or registered from it."""
    from typer.testing import CliRunner

    from transferops.cli import app

    monkeypatch.chdir(pipeline_dir)
    name = registered_model_name(load_config(pipeline_dir / "params.yaml"))
    img = str(next((pipeline_dir / "raw" / "one").glob("*.png")))
    predict = ["predict", img, "--model", f"models:/{name}/1"]
    assert CliRunner().invoke(app, predict).exit_code == 0
    (registered,) = (pipeline_dir / "mlartifacts").rglob("model.safetensors")
    with _flipped(registered):
        r = CliRunner().invoke(app, predict)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "model.safetensors" in r.output
    assert "model_sha256 tag" in r.output and "Traceback" not in r.output
    moved = registered.with_suffix(".moved")
    registered.rename(moved)  # a registered model whose artifact is missing
    try:
        r = CliRunner().invoke(app, predict)
    finally:
        moved.rename(registered)
    assert r.exit_code == 2 and "model.safetensors is missing" in r.output, r.output
    versions = len(MlflowClient().search_model_versions(f"name='{name}'"))
    with _flipped(pipeline_dir / "models" / "finetuned" / "model.safetensors"):
        for step in ("evaluate", "register"):
            r = CliRunner().invoke(app, [step])
            assert r.exit_code == 2, (step, r.output)
            assert "models/finetuned/model.safetensors" in r.output or "weights changed" in (
                r.output
            ), (step, r.output)
    assert len(MlflowClient().search_model_versions(f"name='{name}'")) == versions
