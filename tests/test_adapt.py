"""Adapting to a new domain: AdaBN, instance weights, pseudo-labels, the target gate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferops.config import validate_config
from transferops.data.prepare import prepare

from .conftest import digit_images, tiny_digits


def _shifted(img: np.ndarray) -> np.ndarray:
    """A synthetic domain: faded ink on a grey page (contrast and brightness moved)."""
    return (img.astype(float) * 0.35 + 110).clip(0, 255).astype(np.uint8)


def _write_domain(root: Path, per_class: int, labelled: bool, offset: int) -> Path:
    names = {0: "zero", 1: "one", 2: "two"}
    for c, imgs in digit_images(offset + per_class).items():
        for i, img in enumerate(imgs[offset:]):
            folder = root / names[c] if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_shifted(img), mode="L").convert("RGB").save(folder / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def shifted_project(tmp_path_factory, lite0_source) -> dict:
    """Tiny digits trained (a network, not the classical candidate), plus a shifted domain:
    unlabelled images and a labelled target sample, all prepared."""
    from transferops.finetune.train import train_from_config

    root = tmp_path_factory.mktemp("adapt")
    raw = {
        "data": tiny_digits(root)
        | {
            "unlabelled": str(_write_domain(root / "unl", 20, False, 16)),
            "target_test": str(_write_domain(root / "tt", 10, True, 36)),
            "auxiliary": str(_write_domain(root / "aux", 8, True, 46)),  # a related domain
        },
        "source": {"out": str(lite0_source), "candidates": None},
        "finetune": {
            "out": str(root / "ft"),
            "metrics": str(root / "train.json"),
            "checkpoint_dir": str(root / "ck"),
            "unfreeze_depth": 1,
            "blocks_per_stage": 1,
            "epochs_per_stage": [2, 1],
            "batch_size": 8,
        },
        "registry": {"classical_candidate": False},
        "adapt": {"out": str(root / "adapted"), "report": str(root / "adapt.json")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    cfg = validate_config(raw)
    prepare(cfg)
    train_from_config(cfg)
    return raw


def _one_network(raw: dict) -> tuple:
    """The trained model, or its first member when `train` wrote an ensemble (the default):
    the methods change one network."""
    from transferops.model.blocks import Ensemble
    from transferops.model.folder import load_finetuned, member_spec

    net, spec = load_finetuned(raw["finetune"]["out"])
    if isinstance(net, Ensemble):
        return net.members[0], member_spec(spec, 0)
    return net, spec


def _cfg(raw: dict, **adapt) -> object:
    raw = copy.deepcopy(raw)
    raw["adapt"] |= adapt
    return validate_config(raw)


def test_domains_are_prepared_apart_from_the_data_hash(shifted_project):
    from transferops.data.prepared import read_manifest

    m = read_manifest(shifted_project["data"]["out"])
    assert m["domains"]["unlabelled"]["count"] == 60  # 3 classes x 20, labels ignored
    assert m["domains"]["target_test"]["count"] == 30
    assert m["domains"]["auxiliary"]["count"] == 24
    assert "unlabelled.safetensors" not in m["artifacts"]  # not part of data_hash
    assert m["counts"]["val"] == {"one": 2, "two": 2, "zero": 2}  # val untouched by them


def test_adabn_changes_only_batchnorm_statistics_and_helps_on_a_shift(shifted_project):
    from transferops.adapt.adapt import load_domain
    from transferops.adapt.methods import adabn
    from transferops.data.prepared import load_prepared
    from transferops.finetune.engine import autocast_for
    from transferops.model.inputs import Inputs, make_preprocess
    from transferops.model.predict import predict_probs

    cpu = torch.device("cpu")
    net, spec = _one_network(shifted_project)
    before = copy.deepcopy(net.state_dict())
    pre = make_preprocess(spec["source"], cpu, "image")
    target = load_domain(shifted_project["data"]["out"], "unlabelled")
    tt = load_domain(shifted_project["data"]["out"], "target_test")
    acc0 = (predict_probs(net, spec, tt, cpu).argmax(1) == tt.y.numpy()).mean()
    train = load_prepared(shifted_project["data"]["out"], "train")
    n = adabn(net, Inputs(train.images, train.labels), target, pre, autocast_for(cpu, False))
    after = net.state_dict()
    assert n > 0
    stats = {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert {k for k in after if not torch.equal(after[k], before[k])} <= stats | {
        k for k in after if k.endswith("num_batches_tracked")
    }
    assert any(not torch.equal(after[k], before[k]) for k in stats)
    acc1 = (predict_probs(net, spec, tt, cpu).argmax(1) == tt.y.numpy()).mean()
    assert acc1 > acc0  # the faded domain: normalised again, the same head reads it better


def test_align_trains_only_the_top_and_pulls_the_domains_together(shifted_project):
    """Deep CORAL: the CORAL distance between source and target features falls; only the top
    block and the head move, and the source view shares them but keeps its statistics."""
    from transferops.adapt.adapt import load_domain
    from transferops.adapt.methods import adabn, align
    from transferops.data.prepared import load_prepared
    from transferops.finetune.engine import autocast_for
    from transferops.model.inputs import Inputs, make_preprocess

    cpu, amp = torch.device("cpu"), autocast_for(torch.device("cpu"), False)
    net, spec = _one_network(shifted_project)
    pre = make_preprocess(spec["source"], cpu, "image")
    source_view = copy.deepcopy(net)
    train = load_prepared(shifted_project["data"]["out"], "train")
    source, target = (
        Inputs(train.images, train.labels),
        load_domain(shifted_project["data"]["out"], "unlabelled"),
    )
    adabn(net, source, target, pre, amp)  # the target view's statistics move first
    before = copy.deepcopy(net.state_dict())
    settings = {"depth": 1, "epochs": 5, "lr": 1e-3, "weight": 1.0, "batch_size": 8, "seed": 0}
    found = align(net, source_view, source, target, pre, amp, settings)
    assert found["coral_after"] < found["coral_before"]
    after = net.state_dict()
    top = f"blocks.{net.num_blocks - 1}."
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith((top, "head.")) for k in moved)
    assert not any(k.endswith(("running_mean", "running_var")) for k in moved)
    shared = source_view.state_dict()
    for k in moved:  # the same trained weights in both views ...
        assert torch.equal(shared[k], after[k])
    stats = [k for k in after if k.startswith(top) and k.endswith("running_mean")]
    assert any(not torch.equal(shared[k], after[k]) for k in stats)  # ... each its statistics


def test_instance_weights_rise_for_target_like_examples():
    from transferops.adapt.methods import domain_weights

    rng = np.random.default_rng(0)
    source = rng.normal(0, 1, (400, 5))
    target = rng.normal(0, 1, (300, 5)) + np.array([1.5, 0, 0, 0, 0])  # shifted along x0
    w, auc = domain_weights(source, target)
    assert w.mean() == pytest.approx(1.0)
    assert auc > 0.75  # the domains differ
    # examples on the target's side of x0 weigh more
    assert np.corrcoef(source[:, 0], w)[0, 1] > 0.5
    assert w[source[:, 0] > 1].mean() > 2 * w[source[:, 0] < -1].mean()
    _, same = domain_weights(source, rng.normal(0, 1, (300, 5)))
    assert same < 0.65  # no shift: the classifier can hardly tell them apart


def test_pseudo_labels_never_come_from_the_target_test_sample(shifted_project, tmp_path):
    """The adapted weights do not depend on the labelled target sample at all: replacing it
    (other images, other labels) changes only the score."""
    from safetensors.torch import load_file, save_file

    from transferops.adapt.adapt import adapt, load_domain
    from transferops.model.blocks import Ensemble, StagedNet
    from transferops.model.folder import load_finetuned
    from transferops.model.predict import predict_probs

    cfg = _cfg(shifted_project, methods=["adabn", "pseudo_label"], pseudo_threshold=0.5)
    first = adapt(cfg)
    assert first["found"]["pseudo_label"]["taken_per_round"][0] > 0
    # judged against the model it would replace (the ensemble `train` wrote by default);
    # what it writes is the one network it changed
    trained, spec = load_finetuned(cfg.finetune.out)
    assert isinstance(trained, Ensemble)
    target = load_domain(cfg.data.out, "target_test")
    probs = predict_probs(trained, spec, target, torch.device("cpu"))
    before = (probs.argmax(1) == target.y.numpy()).mean()
    assert first["target_accuracy"]["before"] == pytest.approx(before)
    assert isinstance(load_finetuned(cfg.adapt.out)[0], StagedNet)
    assert first["found"]["auxiliary"]["images"] == 24  # the related domain's labelled images
    w1 = load_file(str(Path(cfg.adapt.out) / "model.safetensors"))
    tt = Path(cfg.data.out) / "target_test.safetensors"
    t = load_file(str(tt))
    save_file({"images": 255 - t["images"], "labels": (t["labels"] + 1) % 3}, str(tt))
    try:
        second = adapt(cfg)
    finally:
        save_file(t, str(tt))
    w2 = load_file(str(Path(cfg.adapt.out) / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert first["target_accuracy"] != second["target_accuracy"]


def test_an_adapted_model_worse_on_the_target_sample_is_refused(shifted_project, monkeypatch):
    import transferops.adapt.adapt as adapt_module

    cfg = _cfg(shifted_project, methods=["adabn"], out=shifted_project["adapt"]["out"] + "-x")
    real = adapt_module._score
    on_target: list[int] = []

    def rigged(net, spec, data, device):
        right = real(net, spec, data, device)
        if len(data) != 30:  # val: as it is
            return right
        on_target.append(1)  # the adapted model is scored first: it gets every one wrong
        return right & False if len(on_target) == 1 else right | True

    monkeypatch.setattr(adapt_module, "_score", rigged)
    report = adapt_module.adapt(cfg)
    assert not report["kept"] and report["decision"].startswith("refused")
    assert report["target_minus_before"]["ci_high"] < 0
    assert not Path(cfg.adapt.out).exists()  # nothing written to serve
    saved = json.loads(Path(cfg.adapt.report).read_text())
    assert saved["kept"] is False


def test_on_drift_with_unlabelled_data_adapts_instead_of_retraining(
    shifted_project, tmp_path, monkeypatch
):
    import transferops.evaluation.drift as drift
    from transferops.evaluation.drift import decide_retrain, save_reference
    from transferops.pipeline.run import _run_steps

    drift._FEATURES.clear()
    computed: list[str] = []
    real = drift.frozen_features

    def counted(source, splits, *args, **kwargs):
        computed.extend(splits)
        return real(source, splits, *args, **kwargs)

    monkeypatch.setattr(drift, "frozen_features", counted)

    raw = copy.deepcopy(shifted_project)
    raw["schedule"] = {"retrain": "on_drift", "reference": str(tmp_path / "ref.safetensors")}
    raw["adapt"] |= {"out": str(tmp_path / "adapted"), "report": str(tmp_path / "a.json")}
    cfg = validate_config(raw)
    save_reference(cfg)  # the champion was trained on exactly this labelled data
    gate = decide_retrain(cfg)
    assert not gate["retrain"] and gate["adapt"]  # no new labels; the serving domain moved
    assert "data.unlabelled (60 images) drifted" in gate["reason"]
    assert gate["domain_drift"]["p_value"] < cfg.schedule.drift_alpha
    ran = []

    def runner(step, key, fn):
        ran.append(step)
        return fn()

    summary = _run_steps(cfg, runner)
    assert ran == ["prepare", "pull", "drift", "adapt"]  # no search, no training
    # the drift check and adapt's shift test read the same splits: computed once each
    assert sorted(computed) == ["train", "unlabelled"]
    assert summary["retrain"].startswith("skipped") and "adapting" in summary["retrain"]
    assert summary["adapted"].startswith("adapted model written")  # AdaBN helps on this shift
    report = json.loads(Path(cfg.adapt.report).read_text())
    assert summary["adapted"].startswith(report["decision"])
    # ...and it is a model version of its own, alias adapted, with its lineage
    from mlflow import MlflowClient

    assert summary["adapted"].endswith("v1 (@adapted)")
    mv = MlflowClient(cfg.tracking.uri).get_model_version_by_alias("transferops-raw", "adapted")
    assert mv.tags["adapt_methods"] == "adabn,pseudo_label"
    assert mv.tags["target_data_sha256"] == report["unlabelled"]["sha256"]
    assert float(mv.tags["target_accuracy_after"]) == report["target_accuracy"]["after"]
    assert mv.tags["adapted_from"] == "not registered"  # this test registered nothing before
    assert "No label of that domain was used" in mv.description


def test_unlabelled_data_like_the_training_data_is_not_adapted_to(shifted_project, tmp_path):
    """No shift (the unlabelled images are more scans of the same kind): adapting could only
    cost, so nothing is written and the report says why."""
    from transferops.adapt.adapt import adapt

    raw = copy.deepcopy(shifted_project)
    same = tmp_path / "same"
    names = {0: "zero", 1: "one", 2: "two"}
    for c, imgs in digit_images(36).items():
        for i, img in enumerate(imgs[16:]):  # scans the model never saw, unshifted
            same.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").convert("RGB").save(same / f"{names[c]}_{i}.png")
    raw["data"] |= {"unlabelled": str(same), "out": str(tmp_path / "prep")}
    raw["adapt"] |= {"out": str(tmp_path / "adapted"), "report": str(tmp_path / "a.json")}
    cfg = validate_config(raw)
    prepare(cfg)
    report = adapt(cfg)
    assert not report["kept"] and not report["shift"]["shifted"]
    assert report["decision"].startswith("nothing to adapt: the unlabelled images look like")
    assert not Path(cfg.adapt.out).exists()


def test_without_a_target_sample_the_adapted_model_is_written_not_registered(
    shifted_project, tmp_path
):
    from mlflow import MlflowClient

    from transferops.pipeline.run import step_adapt

    raw = copy.deepcopy(shifted_project)
    raw["data"] |= {"target_test": None, "auxiliary": None, "out": str(tmp_path / "prep")}
    raw["adapt"] |= {"out": str(tmp_path / "adapted"), "report": str(tmp_path / "a.json")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cfg = validate_config(raw)
    prepare(cfg)
    r = step_adapt(cfg)
    assert r["kept"] and r["target_accuracy"] is None
    assert "target accuracy unknown" in r["decision"] and "not registered" in r["decision"]
    report = json.loads(Path(cfg.adapt.report).read_text())
    assert {"before", "after"} <= set(report["proxy_atc"])  # a proxy, beside the domain AUC
    assert all(0 <= report["proxy_atc"][k] <= 1 for k in ("before", "after"))
    assert (tmp_path / "adapted" / "model.json").exists()  # there to inspect
    assert not MlflowClient(cfg.tracking.uri).search_registered_models()  # not served


def test_atc_estimates_accuracy_from_confidence_alone():
    """On val itself the estimate is val accuracy; target images the model is less sure of
    get a lower estimate, surer ones a higher one."""
    from transferops.evaluation.stats import atc_accuracy

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.34, 1.0, 400)  # three classes, top class 0 with prob `conf`
    val = np.c_[conf, (1 - conf) / 2, (1 - conf) / 2]
    y = np.where(rng.uniform(size=400) < conf, 0, 1)  # calibrated: right as often as sure
    assert abs(atc_accuracy(val, y, val) - (y == 0).mean()) < 0.01
    unsure = np.c_[conf * 0.5 + 0.17, (1 - conf * 0.5 - 0.17) / 2, (1 - conf * 0.5 - 0.17) / 2]
    sure = np.c_[np.sqrt(conf), (1 - np.sqrt(conf)) / 2, (1 - np.sqrt(conf)) / 2]
    assert atc_accuracy(val, y, unsure) < (y == 0).mean() - 0.2
    assert atc_accuracy(val, y, sure) > (y == 0).mean()
