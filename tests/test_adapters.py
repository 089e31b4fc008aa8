"""LoRA on the packaged MiniLM: only adapter weights (and the head) train; the saved model
has them merged (a plain model that loads offline with no peft) and gives the outputs the
trained network gave; the adapter alone is saved beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from transferops.config import validate_config
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.errors import ConfigError
from transferops.finetune.adapters import ADAPTER_FILE, add_lora
from transferops.finetune.thaw import make_trainable
from transferops.finetune.train import build_net, save_finetuned, train_model
from transferops.model.folder import load_finetuned
from transferops.model.inputs import make_inputs
from transferops.model.predict import predict_probs
from transferops.sources.pull import load_source, pull_from_config

from .conftest import fortunes_minilm

CPU = torch.device("cpu")


def _cfg(tmp_path, **finetune):
    return validate_config(
        {
            **fortunes_minilm(tmp_path),
            "finetune": {
                "adapter": "lora",
                "unfreeze_depth": 2,
                "blocks_per_stage": 2,
                "epochs_per_stage": [1, 2],
                "lr": 0.01,
                "max_length": 32,
                "batch_size": 16,
                "out": str(tmp_path / "ft"),
                "checkpoint_dir": str(tmp_path / "ck"),
                **finetune,
            },
        }
    )


def test_lora_trains_only_adapters_and_reloads_offline_with_equal_outputs(tmp_path):
    cfg = _cfg(tmp_path)
    pull_from_config(cfg)
    prepare(cfg)
    source = load_source(cfg.source.out)
    net = build_net(source, 5, cfg.finetune)
    make_trainable(net, 2, "lora")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    in_blocks = [n for n in trainable if not n.startswith("head")]
    # 2 thawed blocks x 2 modules (query, value) x (A, B), nothing else but the head
    assert len(in_blocks) == 8 and all("lora_" in n for n in in_blocks)
    frozen_lora = [n for n, p in net.named_parameters() if "lora_" in n and not p.requires_grad]
    assert frozen_lora  # the blocks below keep theirs at the (no-op) init
    res, spec = train_model(cfg)
    val = make_inputs(load_prepared(cfg.data.out, "val"), cfg.source.out, spec["source"], 32)
    before = predict_probs(res.net, spec, val, CPU)  # adapters still separate
    base = {k: v.clone() for k, v in load_source(cfg.source.out).model.state_dict().items()}
    save_finetuned(res, spec, tmp_path / "ft", tmp_path / "src")
    adapter = load_file(str(tmp_path / "ft" / ADAPTER_FILE))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    weights = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert not any("lora_" in k for k in weights)  # merged: a plain model
    reloaded, spec2 = load_finetuned(tmp_path / "ft")
    assert np.allclose(predict_probs(reloaded, spec2, val, CPU), before, atol=1e-5)
    # the merged weights moved only where adapters were trained (the top 2 of 7 blocks)
    tuned = reloaded.state_dict()
    moved = [
        i
        for i in range(6)
        if not torch.equal(
            tuned[f"blocks.{i + 1}.layer.attention.self.query.weight"],
            base[f"encoder.layer.{i}.attention.self.query.weight"],
        )
    ]
    assert moved == [4, 5]
    size = (tmp_path / "ft" / ADAPTER_FILE).stat().st_size
    assert size < (tmp_path / "ft" / "model.safetensors").stat().st_size / 50


def test_lora_on_an_image_source_is_refused():
    cfg = validate_config({"finetune": {"adapter": "lora"}})
    with pytest.raises(ConfigError, match=r"finetune\.adapter: lora works on Hugging Face"):
        add_lora(torch.nn.Linear(2, 2), cfg.finetune, "efficientnet_lite")
