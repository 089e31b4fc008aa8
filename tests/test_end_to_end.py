"""End to end through the CLI door on tiny real data: the fast one runs in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from transferops.cli import app, human_summary
from transferops.config import load_config, registered_model_name
from transferops.model.folder import load_finetuned, rebuild_finetuned
from transferops.pipeline.run import run_description
from transferops.sources.pull import load_source

from .conftest import write_image_folder

runner = CliRunner()


def _summary(output: str) -> dict:
    """The JSON summary `transferops run` prints last (a block starting on its own line)."""
    return json.loads(output[output.rindex("\n{\n") :])


def test_run_pipeline_on_tiny_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "raw", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n"
        "finetune:\n  unfreeze_depth: 2\n  blocks_per_stage: 1\n  epochs_per_stage: [2, 1]\n"
        "  batch_size: 8\n"
        "search:\n  n_trials: 3\n  space:\n    unfreeze_depth: {low: 0, high: 2}\n"
        "registry:\n  classical_candidate: false\n"  # the network path (pixels win here)
    )
    # The plain-Python door (the Prefect door is tested in test_flow.py).
    r = runner.invoke(app, ["run", "--no-prefect", "--json"])
    assert r.exit_code == 0, r.output
    summary = _summary(r.output)
    assert summary["counts"] == {"train": 18, "val": 6, "test": 6}
    assert summary["source"].startswith("package:efficientnet-lite0")
    assert summary["trials"]["complete"] + summary["trials"].get("pruned", 0) == 3
    assert summary["unfreeze_depth"] == summary["best_params"]["finetune.unfreeze_depth"]
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "optuna.db").exists()
    net, spec = load_finetuned(tmp_path / "models" / "finetuned")
    one = net.members[0] if spec.get("members") else net  # an ensemble of seeds by default
    assert spec["data_hash"] == summary["data_hash"] and one.num_blocks == 9
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-4)
    # MLflow: one parent run per invocation, every step's runs nested under it; the curve
    # runs apart from the main comparison, so grouping by role matches the report
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transferops")
    # a model-training experiment with a description (the UI's GenAI view would be empty)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "pipeline" in experiment.tags["mlflow.note.content"]
    exp = experiment.experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if r.data.tags.get("role") == "pipeline"]
    assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == summary["verdict"]
    # the pipeline run says what it ran with, on what data, and what it registered
    assert parent.data.params["data.path"] == "raw" and parent.data.params["search.n_trials"] == "3"
    (d,) = parent.inputs.dataset_inputs
    assert d.dataset.name == "raw" and d.dataset.digest == summary["data_hash"][:12]
    note = parent.data.tags["mlflow.note.content"]
    assert "[transferops-raw version 1](#/models/transferops-raw/versions/1)" in note
    assert summary["promotion"] in note  # the decision in full, not a cut tag
    promotion = client.download_artifacts(parent.info.run_id, "promotion.md", str(tmp_path))
    assert summary["promotion"] in Path(promotion).read_text()
    inner = ("pipeline", "trial", "train-member")  # trials, members: under their own parent
    steps = [r for r in runs if r.data.tags.get("role") not in inner]
    roles = {r.data.tags["role"] for r in steps}
    assert roles >= {"search", "train", "transfer", "scratch", "evaluation"}
    # the registered model's own run (the ensemble of seeds 0 and 1, the default), its
    # members' runs nested in it, each with its curves; the first copied from the best trial
    (train,) = [r for r in steps if r.data.tags["role"] == "train"]
    assert spec["candidate"] == "ensemble" and train.data.metrics["best_val_accuracy"] > 0
    assert train.data.tags.get("reused_from", "").endswith("best_model")
    # (the seeds first, then the search's runner-up trials, as in the spec)
    members = sorted(
        (r for r in runs if r.data.tags.get("role") == "train-member"),
        key=lambda r: ("trial" in r.data.tags, r.data.tags["seed"]),
    )
    runners = json.loads((tmp_path / "models" / "search" / "runners_up" / "order.json").read_text())
    assert [m.data.tags["seed"] for m in members[:2]] == ["0", "1"]
    assert [m.data.tags["trial"] for m in members[2:]] == [
        str(m["trial"]) for m in spec["members"][2:]
    ]
    # ... those of them that raised the seeds' val score (greedy selection; the log says)
    assert len(runners) == 1 and [m.get("trial") for m in spec["members"][2:]] in ([], runners)
    assert all(m.data.tags["mlflow.parentRunId"] == train.info.run_id for m in members)
    assert members[0].data.tags.get("reused_from", "").endswith("best_model")
    for run, member in zip(members, spec["members"], strict=True):
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(curve) == len(member["history"]) > 0
        # the mean of the last epochs' weights was scored too; the run says which weights won
        avg = member["weight_average"]
        assert run.data.metrics["averaged_val_accuracy"] == pytest.approx(avg["val_accuracy"])
        won = f"mean of the last {avg['epochs']} epochs" if avg["kept"] else "best epoch"
        assert run.data.tags["weights"] == won
        assert run.data.tags["precision"] == "fp32"  # images never autocast on a CPU
    assert spec["precision"] == train.data.tags["precision"] == "fp32"
    assert summary["epochs"] == sum(len(m["history"]) for m in spec["members"])
    # the summary a person reads names the ensemble's members, the search's best trial first
    assert len(summary["members"]) == len(spec["members"])
    assert summary["members"][0].startswith(f"trial #{spec['members'][0]['trial']},")
    shown = human_summary(summary)
    assert f"registered model (ensemble of {len(spec['members'])})" in shown
    # fine-tuning significantly below a baseline on test is in the summary (and its line)
    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    below = {
        k: report[f"transfer_minus_{k}"]["accuracy"]
        for k in ("scratch", "probe")
        if report[f"transfer_minus_{k}"]["accuracy"]["ci_high"] < 0
    }
    assert summary["recipe_below"].keys() == below.keys()
    assert ("caution  fine-tuning" in shown) == bool(below)
    worse = summary | {"recipe_below": {"probe": [-4.4, -7.9, -1.0]}}
    assert "caution  fine-tuning -4.4 [-7.9, -1.0] points against the probe on test" in (
        human_summary(worse)
    )
    assert "Caution: fine-tuning -4.4 [-7.9, -1.0] points against the probe" in (
        run_description(worse)
    )
    assert "members  " + "; ".join(summary["members"]) in shown
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in steps)
    # every training and evaluation run names its data (MLflow's Datasets column)
    for r in steps:
        if r.data.tags["role"] in ("train", "transfer", "scratch", "evaluation", "search"):
            (d,) = r.inputs.dataset_inputs
            assert d.dataset.name == "raw" and d.dataset.digest == summary["data_hash"][:12]
            context = {t.key: t.value for t in d.tags}["mlflow.data.context"]
            assert context == ("test" if r.data.tags["role"] == "evaluation" else "training")
    curve = [r for r in steps if r.data.tags.get("comparison") == "curve"]
    assert curve and all(r.data.tags["role"].startswith("curve-") for r in curve)
    # It ends registered, and champion only if the gate passed (tiny data: either can happen).
    assert summary["registered"] == "transferops-raw v1"
    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    cheap_beats = any(
        report["finetuned"]["minus"][r]["ci_high"] < 0 for r in ("probe", "classical")
    )
    dropped = report["finetuned"]["dropped_classes"]  # the dropped-class gate's reason
    gates = report["transfer_beats_scratch"] and not cheap_beats and not dropped
    assert summary["champion"] == ("1" if gates else None), summary["promotion"]
    # ...and exported: ONNX checked against PyTorch, on the model version in MLflow
    receipt = json.loads((tmp_path / "models" / "export" / "export.json").read_text())
    assert summary["onnx"] == "models/export/model.onnx" and receipt["onnx_parity_max_abs"] < 1e-4
    mv = client.get_model_version("transferops-raw", "1")
    assert mv.tags["onnx_sha256"] == receipt["onnx_sha256"] and mv.tags["onnx_opset"] == "17"
    assert [a.path for a in client.list_artifacts(mv.run_id, "onnx")] == ["onnx/model.onnx"]
    # A second run redoes nothing: prepare and pull are up to date, the other steps' stamps
    # match, registration finds the same weights.
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [
            tmp_path / "data/prepared/train.safetensors",
            tmp_path / "models/source/weights.safetensors",
        ]
    }
    stamps[tmp_path / "models/finetuned/model.safetensors"] = 0
    stamps = {p: p.stat().st_mtime_ns for p in stamps}
    r = runner.invoke(app, ["run", "--no-prefect", "--json"])
    again = _summary(r.output)
    assert r.exit_code == 0
    assert {k: v for k, v in again.items() if k != "promotion"} == {
        k: v for k, v in summary.items() if k != "promotion"
    }
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert r.output.count("up to date (fingerprint") == 6  # search ... evaluate, adapt, export
    # one line per step: where the run is and for how long (the rerun is quick)
    assert "step 1/11 prepare (0:00 elapsed)" in r.output and "step 11/11 export" in r.output
    # Without --json: a summary a person reads, ending the output
    r = runner.invoke(app, ["run", "--no-prefect"])
    dropped = ["dropped"] if summary.get("dropped_classes") else []  # a row when one is
    members = ["members"] if summary["candidate"] == "ensemble" else []  # the ensemble's
    tail = r.output.splitlines()[-9 - len(dropped) - len(members) :]
    assert [line.split()[0] for line in tail] == [
        "data",
        "source",
        "search",
        "test",
        *members,
        *dropped,
        "verdict",
        "registered",
        "promotion",
        "report",
        "onnx",
    ]
    kind = "" if summary["candidate"] == "finetuned" else f" ({summary['candidate']}"
    kind += f" of {len(summary['members'])})" if members else (")" if kind else "")
    assert (
        summary["verdict"] in r.output
        and f"registered model{kind} {summary['test_accuracy']['finetuned']:.3f}" in r.output
    )


def test_text_source_fine_tunes_minilm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "params.yaml").write_text(
        "data:\n  demo: fortunes\n  format: table\n  path: raw/fortunes.csv\n"
        "  limit_per_class: 6\n"
        "source:\n  kind: hf\n  name: sentence-transformers/all-MiniLM-L6-v2\n  weights: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1]\n  max_length: 32\n"
        "  batch_size: 16\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  scratch_trials: 2\n  linear_probe: false\n"
        "  efficiency_per_class: [null]\n"
    )
    # Only 3 categories keep the test fast: the CSV's other rows are filtered by a new table.
    r = runner.invoke(app, ["demo-data"])
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(tmp_path / "raw" / "fortunes.csv")
    df = df[df.label.isin(["computers", "food", "pets"])].groupby("label").head(20)
    df.to_csv(tmp_path / "raw" / "fortunes.csv", index=False)
    r = runner.invoke(app, ["run", "--no-prefect"])
    assert r.exit_code == 0, r.output
    _, spec = load_finetuned(tmp_path / "models" / "finetuned")
    assert spec["modality"] == "text" and spec["class_names"] == ["computers", "food", "pets"]
    # finetune.precision auto: a text encoder autocasts to bf16 on a CPU with native bf16; the model
    # folder and every training run in MLflow say which it was
    from mlflow import MlflowClient

    from transferops.model.families import cpu_has_native_bf16

    want = "bf16" if cpu_has_native_bf16() else "fp32"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("transferops").experiment_id])
    trained = [
        r
        for r in runs
        if r.data.tags.get("role") in ("train", "transfer", "scratch")
        or r.data.tags.get("state") == "complete"  # search trials run to the end
    ]
    assert spec["precision"] == want and trained
    assert {r.data.tags.get("precision") for r in trained} == {want}
    # finetune.block_lr_scale auto: the encoder's blocks train at the text family's share of
    # the head's LR; from scratch (random weights) at the head's own
    from transferops.model.families import FAMILIES

    text_scale = FAMILIES["hf_text"].block_lr_scale
    assert spec["block_lr_scale"] == text_scale < 1
    scales = {
        (r.info.run_name.startswith("scratch"), r.data.tags.get("block_lr_scale")) for r in trained
    }
    assert scales == {(False, str(text_scale)), (True, "1.0")}
    assert (tmp_path / "models" / "finetuned" / "hf" / "tokenizer.json").exists()
    assert not list((tmp_path / "models" / "finetuned" / "hf").glob("*.safetensors"))
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"transfer", "scratch", "classical"}
    assert metrics["models"]["classical"]["accuracy"] >= 0  # TF-IDF baseline ran on text
    # The registered text model is a source for the next fine-tune: tuned encoder + tokenizer.
    uri = f"models:/{registered_model_name(load_config('params.yaml'))}@challenger"
    sets = ["source.kind=mlflow", "source.out=models/again", f"source.name={uri}"]
    r = runner.invoke(app, ["pull", *(a for s in sets for a in ("--set", s))])
    assert r.exit_code == 0, r.output
    tuned, _, _ = rebuild_finetuned(tmp_path / "models" / "finetuned")
    pulled = load_source(tmp_path / "models" / "again")
    assert pulled.manifest["input"]["type"] == "text" and pulled.manifest["family"] == "hf_text"
    assert (tmp_path / "models" / "again" / "hf" / "tokenizer.json").exists()
    a, b = tuned.state_dict(), pulled.model.state_dict()
    # Everything the fine-tune trained is carried over; only BERT's pooler, which the
    # fine-tuned model does not use (its head replaces it), is re-initialised.
    assert set(a) == set(b) and any(k.startswith("encoder.layer.") for k in a)
    assert all(k.startswith("pooler.") for k in a if not torch.equal(a[k], b[k]))


def test_image_source_on_text_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n  format: table\n  path: d.csv\n")
    r = runner.invoke(app, ["run", "--no-prefect"])
    assert r.exit_code == 2 and "takes image input but the prepared data is text" in r.output
