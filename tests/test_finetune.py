"""The staged fine-tuning engine on real weights and real (small) data."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torchvision
from threadpoolctl import threadpool_info
from torch import nn

from transferops.config import FinetuneConfig, validate_config
from transferops.data.prepared import load_prepared
from transferops.errors import ConfigError
from transferops.finetune.engine import finetune
from transferops.finetune.plan import Stage, stage_depths
from transferops.finetune.thaw import make_optimizer, make_trainable, set_train_mode, thaw
from transferops.finetune.train import build_net, run_fingerprint, train_from_config
from transferops.model.blocks import AvgPool, Ensemble, StagedNet, Wrap
from transferops.model.families import build_staged
from transferops.model.folder import load_finetuned
from transferops.model.inputs import Inputs, Preprocess, fit_width
from transferops.sources.pull import load_source

CPU = torch.device("cpu")


def _tiny_bert(layers: int) -> nn.Module:
    """A randomly initialised BERT small enough to train in a test (draws from torch's RNG)."""
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )


# ---------------------------------------------------------------- discovery


@pytest.mark.parametrize(
    ("name", "names", "size"),
    [
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4"], 32),
        ("mobilenet_v3_small", [f"features.{i}" for i in range(13)], 32),
        ("efficientnet_b0", [f"features.{i}" for i in range(9)], 32),
    ],
)
def test_torchvision_cnn_blocks_reproduce_the_model(name, names, size):
    torch.manual_seed(0)
    m = torchvision.models.get_model(name).eval()
    family = "resnet" if name.startswith("resnet") else "tv_features"
    net = build_staged(m, family, num_classes=4, image_size=size).eval()
    assert net.block_names == names
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = net.pool(net.run_blocks(x, 0, net.num_blocks))
        ref = m(x)
        ours = m.fc(feats) if family == "resnet" else m.classifier(feats)
        # Running blocks in two pieces equals running them at once (the cache's premise).
        h = net.run_blocks(x, 0, 2)
        assert torch.allclose(net.pool(net.run_blocks(h, 2, net.num_blocks)), feats, atol=1e-6)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert net(x).shape == (2, 4)


def test_torchvision_vit_blocks_reproduce_the_model():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    net = build_staged(m, "tv_vit", num_classes=3).eval()
    assert net.block_names == ["embed", "encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.heads(net.pool(net.run_blocks(x, 0, 4))), m(x), atol=1e-5)


def test_hf_bert_blocks_reproduce_the_model():
    torch.manual_seed(0)
    m = _tiny_bert(3).eval()
    net = build_staged(m, "hf_text", num_classes=2).eval()
    assert net.block_names == ["embeddings"] + [f"encoder.layer.{i}" for i in range(3)]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        ours = net.pool(net.run_blocks(ids, 0, 4, mask), mask)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_cpu_inference_batches_keep_image_activations_in_cache():
    labels = torch.zeros(4, dtype=torch.long)
    sizes = {s: Inputs(torch.zeros(4, 3, s, s, dtype=torch.uint8), labels) for s in (32, 64, 128)}
    assert {s: d.inference_batch(128) for s, d in sizes.items()} == {32: 128, 64: 64, 128: 32}
    # a model that upsamples 64-px images to 128 batches for the side its network sees
    assert sizes[64].inference_batch(128, side=128) == 32
    text = Inputs(torch.ones(4, 8, dtype=torch.long), labels, torch.ones(4, 8, dtype=torch.long))
    assert text.inference_batch(128) == 128  # texts: the caller's batch


def test_texts_are_padded_per_batch_with_the_same_outputs():
    """Batches are cut to their longest text and inference runs in length order; outputs are
    those of padding every text to the split's longest."""
    from transferops.finetune.cache import encode_prefix
    from transferops.model.predict import predict_probs

    torch.manual_seed(0)
    net = build_staged(_tiny_bert(2).eval(), "hf_text", num_classes=3).eval()
    lengths = torch.tensor([2, 12, 3, 2, 7, 4])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (6, 12)) * mask
    data = Inputs(ids, torch.zeros(6, dtype=torch.long), mask)
    x, ctx = data.batch(torch.tensor([0, 2, 3]))
    assert x.shape == (3, 3) and ctx.shape == (3, 3)  # not 12 wide
    assert data.inference_order().tolist() == [0, 3, 2, 5, 4, 1]
    with torch.no_grad():
        full = torch.softmax(net(ids, mask), 1).numpy()
        feats = encode_prefix(net, data, 2, lambda x, *_: x, batch_size=2)
        cached = net.decode(feats, 2, mask)
    spec = {"source": {"family": "hf_text", "input": {"type": "text"}}, "modality": "text"}
    assert np.allclose(predict_probs(net, spec, data, CPU, batch_size=2), full, atol=1e-5)
    assert feats.shape[:2] == (6, 12)  # back to the split's width, in the original order
    assert np.allclose(torch.softmax(cached, 1).numpy(), full, atol=1e-5)
    assert fit_width(feats[:2], mask[:2, :3]).shape == (2, 3, 16)
    assert fit_width(torch.zeros(2, 16), mask[:2, :3]).shape == (2, 16)  # pooled: unchanged
    # training order: chunks of 16 shuffled batches, each sorted by length; small sets as drawn
    n = 100
    lens = torch.randint(1, 12, (n,))
    big = Inputs(torch.zeros(n, 12), torch.zeros(n), None, lengths=lens)
    perm = torch.randperm(n)
    order = big.train_order(perm, batch_size=2)  # chunks of 32
    assert sorted(order.tolist()) == list(range(n))
    for i in range(0, n, 32):
        chunk = order[i : i + 32]
        assert set(chunk.tolist()) == set(perm[i : i + 32].tolist())
        assert (lens[chunk].diff() >= 0).all()
    assert torch.equal(big.train_order(perm, batch_size=16), perm)  # one chunk: left as drawn


def test_lite0_blocks_reproduce_extract_features(lite0_source):
    """The blocks, with the symmetric "same" pads folded into the convs, compute what the
    untouched package model computes; only asymmetric (stride-2) pads remain."""
    src, ref = load_source(lite0_source, 64), load_source(lite0_source, 64).model.eval()
    m = src.model.eval()
    net = build_staged(m, src.family, num_classes=3, image_size=64).eval()
    assert net.num_blocks == 9
    pads = [c.static_padding for c in m.modules() if hasattr(c, "static_padding")]
    folded = [p for p in pads if isinstance(p, torch.nn.Identity)]
    left = [p.padding for p in pads if isinstance(p, torch.nn.ZeroPad2d)]
    assert folded and left and all(p[0] != p[1] or p[2] != p[3] for p in left)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(
            net.pool(net.run_blocks(x, 0, 9)), ref.extract_features(x).mean((2, 3)), atol=1e-5
        )


# ------------------------------------------------------------ freeze plan


def test_stage_depths():
    assert stage_depths(0, 1) == [0]
    assert stage_depths(3, 1) == [0, 1, 2, 3]
    assert stage_depths(5, 2) == [0, 2, 4, 5]


@pytest.mark.parametrize("depth", [0, 1, 3, 5])
def test_freeze_plan_exact_requires_grad(depth):
    m = torchvision.models.resnet18()
    net = build_staged(m, "resnet", num_classes=3)
    make_trainable(net, depth)
    trainable = {
        n.split(".")[1]
        for n, p in net.named_parameters()
        if p.requires_grad and n.startswith("blocks.")
    }
    expected = {str(i) for i in range(5 - depth, 5)}
    assert trainable == expected
    assert all(p.requires_grad for p in net.head.parameters())
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_expected = sum(p.numel() for b in net.blocks[5 - depth :] for p in b.parameters())
    assert n_train == n_expected + sum(p.numel() for p in net.head.parameters())


def test_frozen_blocks_in_eval_mode_thawed_in_train():
    net = build_staged(torchvision.models.resnet18(), "resnet", num_classes=3)
    set_train_mode(net, 2, bn_mode="train")
    assert [b.training for b in net.blocks] == [False, False, False, True, True]
    set_train_mode(net, 2, bn_mode="frozen")
    bns = [m for m in net.blocks[4].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)


# ------------------------------------------------------------- the loop


def _setup(digits_prepared: Path, lite0_source: Path, **ft):
    cfg = FinetuneConfig(**{"epochs_per_stage": [2, 1], "batch_size": 8, "seed": 3, **ft})
    src = load_source(lite0_source, image_size=16)
    train, val = load_prepared(digits_prepared, "train"), load_prepared(digits_prepared, "val")
    net = build_net(src, 3, cfg, 16)
    pre = Preprocess("image", augment=cfg.augment)
    return net, Inputs(train.images, train.labels), Inputs(val.images, val.labels), cfg, pre


def test_param_groups_and_lrs_per_stage_and_adam_state_kept(digits_prepared, lite0_source):
    net, tr, va, cfg, pre = _setup(
        digits_prepared,
        lite0_source,
        unfreeze_depth=3,
        blocks_per_stage=2,
        lr=0.01,
        layer_decay=0.5,
        early_stopping_patience=None,
    )
    res = finetune(net, tr, va, cfg, pre, CPU)
    names = net.block_names
    assert [[n for n, _ in g] for g in res.stage_groups] == [
        ["head"],
        ["head", names[8], names[7]],
        ["head", names[8], names[7], names[6]],
    ]
    assert [lr for _, lr in res.stage_groups[2]] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    steps = -(-len(tr) // cfg.batch_size)  # batches per epoch
    # Epochs: stage 0: 2, stage 1: 1, stage 2: 1. Adam's step count carries across stages.
    assert res.optimizer_steps == {
        "head": 4 * steps,
        names[8]: 2 * steps,
        names[7]: 2 * steps,
        names[6]: steps,
    }


@pytest.mark.parametrize(
    ("family", "ft", "scale"),
    [
        ("hf_text", {}, 0.03),  # a text encoder's blocks train far below the head's LR
        ("efficientnet_lite", {}, 1.0),
        ("hf_text", {"init": "random"}, 1.0),  # from scratch: nothing pretrained to keep
        ("hf_text", {"adapter": "lora"}, 1.0),  # adapters start at zero
        ("efficientnet_lite", {"block_lr_scale": 0.2}, 0.2),  # a number is taken as given
    ],
)
def test_thawed_blocks_train_at_the_familys_share_of_the_head_lr(family, ft, scale):
    blocks = [(f"b{i}", Wrap(nn.Linear(4, 4))) for i in range(3)]
    net = StagedNet(blocks, AvgPool(), 4, 3, family=family)
    cfg = FinetuneConfig(lr=0.01, layer_decay=0.5, **ft)
    opt = make_optimizer(net, cfg)
    thaw(net, opt, Stage(1, 2, (1, 2), 1, 1, 0, True), cfg)
    lrs = {g["name"]: g["base_lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"head": 0.01, "b2": 0.01 * scale * 0.5, "b1": 0.01 * scale * 0.25})


def test_frozen_bn_statistics_do_not_move(digits_prepared, lite0_source):
    net, tr, va, cfg, pre = _setup(
        digits_prepared,
        lite0_source,
        unfreeze_depth=2,
        bn_mode="train",
        feature_cache=False,
        head_init="random",  # else the exact probe, better than these epochs, is the model
    )
    before = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    finetune(net, tr, va, cfg, pre, CPU)
    after = net.state_dict()
    frozen = [k for k in before if not k.startswith(("blocks.7.", "blocks.8."))]
    thawed = [k for k in before if k.startswith(("blocks.7.", "blocks.8."))]
    assert frozen and thawed
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in thawed)  # bn_mode: train moves them


def test_feature_cache_gives_the_same_result(digits_prepared, lite0_source):
    results = []
    for cache in (True, False):
        net, tr, va, cfg, pre = _setup(
            digits_prepared, lite0_source, unfreeze_depth=2, blocks_per_stage=1, feature_cache=cache
        )
        res = finetune(net, tr, va, cfg, pre, CPU)
        results.append((res, {k: v.clone() for k, v in net.state_dict().items()}))
    (a, sa), (b, sb) = results
    assert [h["val_accuracy"] for h in a.history] == [h["val_accuracy"] for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4, abs=1e-5)
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-4) for k in sa)


def test_linear_probe_runs_the_backbone_once_not_per_epoch(digits_prepared, lite0_source):
    """With the cache, E epochs of a linear probe cost one backbone pass over train + val."""
    calls = []
    for epochs in (1, 6):
        net, tr, va, cfg, pre = _setup(
            digits_prepared,
            lite0_source,
            unfreeze_depth=0,
            epochs_per_stage=[epochs],
            early_stopping_patience=None,
        )
        seen = [0]

        def count(_m, _i, o, seen=seen):
            seen[0] += len(o)

        net.blocks[0].register_forward_hook(count)
        finetune(net, tr, va, cfg, pre, CPU)
        calls.append(seen[0])
    assert calls[0] == calls[1]  # independent of the number of epochs
    assert calls[0] <= len(tr) + len(va) + 2  # one pass (+ a 2-image size probe)


class _Stop(Exception):
    pass


def test_checkpoint_resume_equals_uninterrupted(digits_prepared, lite0_source, tmp_path):
    kw = {
        "unfreeze_depth": 2,
        "blocks_per_stage": 1,
        "early_stopping_patience": None,
        "dropout": 0.3,
        "checkpoint_every_s": 0,  # every epoch
    }
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, **kw)
    full = finetune(net, tr, va, cfg, pre, CPU)
    ref = {k: v.clone() for k, v in net.state_dict().items()}

    def stop_at_2(epoch, rec):
        if epoch == 2:
            raise _Stop

    ck = tmp_path / "ck.pt"
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, **kw)
    with pytest.raises(_Stop):
        finetune(net, tr, va, cfg, pre, CPU, on_epoch_end=stop_at_2, checkpoint=ck, fingerprint="f")
    assert ck.exists()
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, **kw)  # a fresh process
    res = finetune(net, tr, va, cfg, pre, CPU, checkpoint=ck, fingerprint="f")
    assert res.resumed_from == 3 and len(res.history) == len(full.history) == 4
    assert [h["val_loss"] for h in res.history] == [h["val_loss"] for h in full.history]
    assert all(torch.equal(ref[k], v) for k, v in net.state_dict().items())
    # Another fingerprint does not resume.
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, **kw)
    assert finetune(net, tr, va, cfg, pre, CPU, checkpoint=ck, fingerprint="g").resumed_from is None


def test_a_checkpoint_is_keyed_on_the_precision_the_run_resolved_to():
    # precision auto is bf16 on one CPU and fp32 on another: the same settings must not
    # resume a bf16 run's checkpoint in fp32
    spec = {"source": {"arch": "x", "sha256": "ab"}, "data_hash": "d", "precision": "bf16"}
    cfg = FinetuneConfig(precision="auto")
    assert run_fingerprint(spec, cfg) == run_fingerprint(dict(spec), cfg)
    assert run_fingerprint(spec, cfg) != run_fingerprint(spec | {"precision": "fp32"}, cfg)
    assert run_fingerprint(spec, cfg) != run_fingerprint(spec, FinetuneConfig(lr=0.01))


def test_a_model_trained_in_another_precision_is_not_the_same_run():
    # reuse (`same_run`: the baseline taking train's members, train taking the search's
    # trial) compares what the settings resolve to here, not only the settings
    from transferops.finetune.train import _same, precision_here
    from transferops.sources.manifest import source_id

    cfg = validate_config({"finetune": {"precision": "auto"}})
    src = {"sha256": "ab", "family": "hf_text"}
    here = precision_here(cfg.finetune, src)
    spec = {"finetune": cfg.finetune.model_dump(mode="json"), "data_hash": "d", "source": src}
    assert _same(spec | {"precision": here}, cfg, "d", source_id(src))
    other = {"bf16": "fp32", "fp32": "bf16"}[here]
    assert not _same(spec | {"precision": other}, cfg, "d", source_id(src))
    assert _same(spec, cfg, "d", source_id(src))  # a spec from before precision was recorded
    fp32 = validate_config({"finetune": {"precision": "fp32"}})
    assert precision_here(fp32.finetune, src) == "fp32"
    assert precision_here(validate_config({"finetune": {"precision": "bf16"}}).finetune, src) == (
        "bf16"
    )


def test_checkpoints_wait_for_their_interval(digits_prepared, lite0_source, tmp_path):
    def stop_at_1(epoch, rec):
        if epoch == 1:
            raise _Stop

    for every_s, written in ((3600, False), (0, True)):
        ck = tmp_path / f"ck-{every_s}.pt"
        net, tr, va, cfg, pre = _setup(
            digits_prepared, lite0_source, unfreeze_depth=0, checkpoint_every_s=every_s
        )
        with pytest.raises(_Stop):
            finetune(net, tr, va, cfg, pre, CPU, on_epoch_end=stop_at_1, checkpoint=ck)
        assert ck.exists() is written


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_weight_average_is_the_mean_of_the_last_epochs_and_kept_only_if_better(
    digits_prepared, lite0_source, bn_mode
):
    """average_epochs: the mean weights of the plan's last N epochs are scored on val (BN
    statistics recomputed for them when learned) and replace the best epoch only if better."""
    from transferops.finetune.engine import val_scores

    net, tr, va, cfg, pre = _setup(
        digits_prepared,
        lite0_source,
        unfreeze_depth=2,
        blocks_per_stage=1,
        epochs_per_stage=[2],
        average_epochs=3,
        bn_mode=bn_mode,
        head_init="random",  # no probe floor: the best is an epoch or the average
        early_stopping_patience=None,
        lr=0.01,
    )
    snaps = []
    res = finetune(
        net,
        tr,
        va,
        cfg,
        pre,
        CPU,
        on_epoch_end=lambda e, r: snaps.append({k: v.clone() for k, v in net.state_dict().items()}),
    )
    assert res.average is not None and res.average.epochs == 3
    mean = {k: torch.stack([s[k].float() for s in snaps[-3:]]).mean(0) for k in snaps[-1]}
    avg_net = build_net(load_source(lite0_source, image_size=16), 3, cfg, 16)
    weights = {k: mean[k].to(v.dtype) if v.is_floating_point() else v for k, v in snaps[-1].items()}
    avg_net.load_state_dict(weights)
    if bn_mode == "train":  # the average's own statistics, as the loop computes them
        from transferops.finetune.engine import recalibrate_bn

        recalibrate_bn(avg_net, 2, tr, None, pre, 16, nullcontext)
    acc, loss, _ = val_scores(avg_net, va, None, 1, pre, 16, nullcontext)
    assert res.average.val_accuracy == pytest.approx(acc, abs=1e-6)
    epochs_best = max((h["val_accuracy"], -h["val_loss"]) for h in res.history)
    assert res.average.kept == ((acc, -loss) > epochs_best)
    kept = res.net.state_dict()
    if res.average.kept:
        assert res.best_val_accuracy == pytest.approx(acc)
        assert all(
            torch.allclose(kept[k].float(), avg_net.state_dict()[k].float(), atol=1e-5)
            for k in kept
            if "running" not in k
        )
    else:  # the best epoch's own weights, one of the snapshots
        assert any(all(torch.equal(kept[k], s[k]) for k in kept) for s in snaps)


@pytest.mark.parametrize("augment", ["crop", "flip_crop"])
def test_crop_augmentation_shifts_and_only_flip_crop_mirrors(augment):
    x = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    x[..., 8:] = 255  # dark left half, bright right half
    out = Preprocess("image", augment=augment)(x, True, torch.Generator().manual_seed(0))
    plain = Preprocess("image")(x, True, None)
    assert not torch.equal(out, plain)  # shifted (up to 2 px at 16 px)
    mirrored = (out[..., 0] > 0).all(dim=(1, 2))  # the left edge came from the right half
    if augment == "crop":  # shifts only: the left third stays dark, the right third bright
        assert (out[..., :6] < 0).all() and (out[..., 10:] > 0).all() and not mirrored.any()
    else:
        assert 0 < mirrored.sum() < len(x)


def test_augmentation_with_cached_views_trains(digits_prepared, lite0_source):
    net, tr, va, cfg, pre = _setup(
        digits_prepared, lite0_source, unfreeze_depth=1, augment="flip_crop", cached_views=2
    )
    res = finetune(net, tr, va, cfg, pre, CPU)
    assert len(res.history) == 3 and all(h["train_loss"] > 0 for h in res.history)


# ------------------------------------------------------------ train command


def _cfg(tmp_path: Path, digits_prepared: Path, lite0_source: Path, **ft) -> object:
    return validate_config(
        {
            "data": {"out": str(digits_prepared)},
            "source": {"out": str(lite0_source)},
            "finetune": {
                "out": str(tmp_path / "ft"),
                "metrics": str(tmp_path / "m.json"),
                "checkpoint_dir": str(tmp_path / "ck"),
                "batch_size": 8,
                **ft,
            },
            "search": {"out": str(tmp_path / "search")},
            "registry": {"classical_candidate": False},  # the network path (pixels win here)
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"},
        }
    )


def test_train_writes_a_reloadable_model_and_never_reads_test(
    tmp_path, digits_prepared, lite0_source, monkeypatch
):
    import transferops.finetune.train as train_mod

    read = []
    orig = train_mod.load_prepared
    monkeypatch.setattr(
        train_mod, "load_prepared", lambda out, s: (read.append(s), orig(out, s))[1]
    )
    cfg = _cfg(tmp_path, digits_prepared, lite0_source, unfreeze_depth=1, epochs_per_stage=[2, 1])
    res = train_from_config(cfg)
    assert set(read) == {"train", "val"}
    net, spec = load_finetuned(tmp_path / "ft")
    assert spec["class_names"] == ["one", "two", "zero"] and len(spec["data_hash"]) == 64
    val = load_prepared(digits_prepared, "val")
    with torch.no_grad():
        x = (val.images.float() / 255 - 0.5) / 0.5
        acc = (net(x).argmax(1) == val.labels).float().mean().item()
    assert acc == pytest.approx(res.val_accuracy)
    metrics = (tmp_path / "m.json").read_text()
    assert "val_accuracy" in metrics


def test_depth_above_blocks_is_refused_before_training(tmp_path, digits_prepared, lite0_source):
    cfg = _cfg(tmp_path, digits_prepared, lite0_source, unfreeze_depth=10)
    with pytest.raises(ConfigError, match="9 blocks"):
        train_from_config(cfg)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "mlflow.db").exists()


def test_learned_bn_statistics_use_the_configured_momentum(digits_prepared, lite0_source):
    """EfficientNet-Lite ships BN momentum 0.01 (TF port): too slow for short from-scratch runs."""

    def momenta(net: nn.Module) -> set[float]:
        return {round(m.momentum, 6) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}

    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, bn_mode="train", bn_momentum=0.1)
    assert momenta(net) == {0.01}
    finetune(net, tr, va, cfg, pre, CPU)
    assert momenta(net) == {0.1}
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, bn_momentum=None)
    finetune(net, tr, va, cfg, pre, CPU)
    assert momenta(net) == {0.01}


def test_precise_bn_statistics_are_the_train_average():
    from transferops.finetune.engine import recalibrate_bn

    torch.manual_seed(0)
    net = build_staged(torchvision.models.resnet18(), "resnet", num_classes=3)
    data = Inputs(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.zeros(20))
    pre = Preprocess("image")
    bn = net.blocks[4].mods[0][0].bn1  # first BN of layer4: its input is frozen prefix + conv
    seen = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        net.eval()
        net(pre(data.x, False, None))
    hook.remove()
    x = seen[0]
    recalibrate_bn(net, 1, data, None, pre, bs=5, amp=nullcontext)  # 4 equal batches
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    batch_means = [x[i : i + 7].mean(dim=(0, 2, 3)) for i in range(0, 20, 7)]
    recalibrate_bn(net, 1, data, None, pre, bs=7, amp=nullcontext)  # 7 + 7 + 6
    assert torch.allclose(bn.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
    assert bn.momentum == pytest.approx(0.1)  # restored
    frozen_bn = net.blocks[3].mods[0][0].bn1
    assert torch.equal(frozen_bn.running_mean, torch.zeros_like(frozen_bn.running_mean))


# ------------------------------------------------------- the plan and the family table


def test_stage_plan_says_what_thaws_when_and_refuses_a_deeper_depth():
    from transferops.finetune.plan import stage_plan, total_epochs

    cfg = FinetuneConfig(unfreeze_depth=5, blocks_per_stage=2, epochs_per_stage=[3, 2])
    plan = stage_plan(cfg, 9)
    assert [(s.depth, s.thaws, s.epochs, s.frozen) for s in plan] == [
        (0, (), 3, 9),
        (2, (1, 2), 2, 7),
        (4, (3, 4), 2, 5),
        (5, (5,), 2, 4),
    ]
    assert total_epochs(cfg, 9) == 9
    # average_epochs (6) counts back from the last epoch, across stages
    assert [(s.averaged_from, s.last) for s in plan] == [
        (3, False),
        (0, False),
        (0, False),
        (0, True),
    ]
    off = stage_plan(cfg.model_copy(update={"average_epochs": 3}), 9)
    assert [s.averaged_from for s in off] == [3, 2, 1, 0]  # stage 2's last epoch, stage 3's two
    with pytest.raises(ConfigError, match=r"finetune.unfreeze_depth is 10 .* 9 blocks"):
        stage_plan(cfg.model_copy(update={"unfreeze_depth": 10}), 9)  # no silent clamp


def test_family_table_decides_names_and_channels_last():
    from transferops.model.families import FAMILIES, torchvision_family
    from transferops.model.inputs import make_preprocess

    assert [torchvision_family(n) for n in ("resnet50", "wide_resnet50_2", "vit_b_16")] == [
        "resnet",
        "resnet",
        "tv_vit",
    ]
    assert torchvision_family("mobilenet_v3_small") == "tv_features"
    assert torchvision_family("alexnet") == "unknown"
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # only device.type is read

    def channels_last(fam: str, device: torch.device) -> bool:
        return make_preprocess({"family": fam, "input": {}}, device, "image").channels_last

    # CNNs run channels_last on both devices (1.4-1.6x per run on the CPU: bench/memory_format)
    for device in (gpu, cpu):
        assert (
            {f for f in FAMILIES if channels_last(f, device)}
            == {f for f, row in FAMILIES.items() if row.channels_last}
            == {"resnet", "tv_features", "efficientnet_lite", "unknown"}
        )
    pre = make_preprocess({"family": "efficientnet_lite", "input": {}}, cpu, "image")
    x = pre(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), False, None)
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = pre.place(torch.nn.Conv2d(3, 4, 3), cpu)  # the net follows its inputs' format
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not make_preprocess({"family": "hf_text", "input": {}}, cpu, "text").channels_last


def test_precision_resolves_by_device_family_and_cpu():
    """finetune.precision: auto = bf16 on a GPU, and on a CPU with native bf16 (AMX or
    AVX512-BF16) only for the families the table says gain (text encoders: matmuls); fp32 /
    bf16 are what they say everywhere."""
    from transferops.model.families import FAMILIES
    from transferops.model.inputs import make_preprocess

    gpu, cpu = torch.device("cuda"), torch.device("cpu")

    def bf16(fam: str, device: torch.device, precision: str) -> bool:
        manifest = {"family": fam, "input": {}}
        return make_preprocess(manifest, device, "image", precision=precision).bf16

    for caps in ({"amx_bf16": True}, {"avx512_bf16": True}, {"avx512_f": True}, {}):
        native = bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
        with patch.object(torch.cpu, "get_capabilities", lambda caps=caps: caps):
            auto_cpu = {f for f in FAMILIES if bf16(f, cpu, "auto")}
            assert auto_cpu == ({"hf_text"} if native else set())
            assert all(bf16(f, gpu, "auto") for f in FAMILIES)
            for device in (gpu, cpu):
                assert not any(bf16(f, device, "fp32") for f in FAMILIES)
                assert all(bf16(f, device, "bf16") for f in FAMILIES)
    # serving builds its preprocessing without a precision: float32
    assert not make_preprocess({"family": "hf_text", "input": {}}, gpu, "text").bf16


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_training_autocasts_matmuls_and_keeps_float32_weights(bf16):
    """With Preprocess.bf16 the thawed blocks' matmuls run in bf16 in training and in the
    val passes (the feature cache's prefix too); weights, head and the result stay float32."""
    torch.manual_seed(0)
    net = build_staged(_tiny_bert(2), "hf_text", num_classes=2)
    mask = torch.ones(24, 6, dtype=torch.long)
    ids = torch.randint(1, 50, (24, 6))
    y = (ids[:, 0] > 25).long()
    tr, va = Inputs(ids[:16], y[:16], mask[:16]), Inputs(ids[16:], y[16:], mask[16:])
    cfg = FinetuneConfig(
        epochs_per_stage=[1, 1], unfreeze_depth=1, blocks_per_stage=1, batch_size=8, seed=0
    )
    seen: dict[str, set] = {"prefix": set(), "thawed": set()}

    def record(where: str):
        return lambda _m, _i, out: seen[where].add(out.dtype)

    for where, block in (("prefix", net.blocks[1]), ("thawed", net.blocks[2])):
        linear = next(m for m in block.modules() if isinstance(m, nn.Linear))
        linear.register_forward_hook(record(where))
    res = finetune(net, tr, va, cfg, Preprocess("text", bf16=bf16), CPU)
    want = {torch.bfloat16} if bf16 else {torch.float32}
    assert seen == {"prefix": want, "thawed": want}
    assert {p.dtype for p in res.net.parameters()} == {torch.float32}


# ----------------------------------------------------------- the exact probe (LP-FT)


def test_exact_probe_equals_sklearn_and_picks_c_on_val():
    from sklearn.linear_model import LogisticRegression

    from transferops.finetune.probe import C_GRID, fit_probe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12))
    y = rng.integers(0, 4, 240)
    x = centers[y] + rng.normal(scale=1.5, size=(240, 12))
    blas_threads = []
    real_fit = LogisticRegression.fit

    def spy(self, *a, **k):
        blas_threads.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return real_fit(self, *a, **k)

    with patch.object(LogisticRegression, "fit", spy):
        fit = fit_probe(x[:160], y[:160], x[160:], y[160:], num_classes=4)
    assert blas_threads and set(blas_threads) == {1}  # the L-BFGS path on one BLAS thread
    ref = LogisticRegression(C=fit.C, max_iter=5000, tol=1e-10).fit(x[:160], y[:160])
    logits = x[160:] @ fit.weight.double().numpy().T + fit.bias.double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # the same optimum, up to sklearn's convergence tolerance (tol=1e-4, the default)
    assert np.allclose(probs, ref.predict_proba(x[160:]), atol=1e-3)

    def val_loss(c: float) -> float:
        p = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x[:160], y[:160])
        return float(-np.log(p.predict_proba(x[160:])[np.arange(80), y[160:]]).mean())

    losses = {c: val_loss(c) for c in C_GRID}
    best_c = min(losses, key=lambda c: losses[c])
    assert best_c == fit.C  # picked on val log-loss
    assert fit.val_loss == pytest.approx(losses[fit.C], abs=1e-3)


def test_head_starts_as_the_probe_and_the_probe_is_the_floor(digits_prepared, lite0_source):
    # A tiny LR: fine-tuning barely moves the head, so it must still be the probe's.
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, unfreeze_depth=2, lr=1e-9)
    res = finetune(net, tr, va, cfg, pre, CPU)
    assert res.probe is not None
    assert torch.allclose(net.head[-1].weight, res.probe.weight, atol=1e-5)
    assert res.best_val_accuracy >= res.probe.val_accuracy
    # An LR that wrecks every epoch: nothing beats the probe on val, so the probe is the model.
    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, unfreeze_depth=2, lr=50.0)
    res = finetune(net, tr, va, cfg, pre, CPU)
    assert res.best_val_accuracy == res.probe.val_accuracy
    assert torch.equal(net.head[-1].weight, res.probe.weight)
    # head_init random: no probe, the head is not the probe's
    net, tr, va, cfg, pre = _setup(
        digits_prepared, lite0_source, unfreeze_depth=0, head_init="random", lr=1e-9
    )
    res2 = finetune(net, tr, va, cfg, pre, CPU)
    assert res2.probe is None and not torch.allclose(net.head[-1].weight, res.probe.weight)


def test_an_epoch_replaces_the_probe_only_beyond_val_noise(digits_prepared, lite0_source):
    """finetune.beat_probe_by: the best epoch is kept when it beats the probe on val by more
    than that many standard errors of the paired per-example difference; just short of it,
    the model is the exact probe, and the spec says "probe"."""
    from contextlib import nullcontext

    from transferops.finetune.engine import val_scores

    def run(z: float):
        net, tr, va, cfg, pre = _setup(
            digits_prepared, lite0_source, unfreeze_depth=1, lr=0.003, beat_probe_by=z
        )
        return net, finetune(net, tr, va, cfg, pre, CPU), va, pre

    net, free, va, pre = run(0.0)  # any gain counts: the old floor
    gain = free.best_val_accuracy - free.probe.val_accuracy
    assert gain > 0 and not free.from_probe  # this lr beats the probe on these digits
    _, _, right = val_scores(net, va, None, 0, pre, 16, nullcontext)
    d = right.float() - free.probe.val_correct.float()
    needed = gain / (float(d.std()) / len(d) ** 0.5)  # the gain, in paired SEs
    _, under, _, _ = run(needed * 0.99)
    assert under.best_val_accuracy == free.best_val_accuracy and not under.from_probe
    net, over, _, _ = run(needed * 1.01)
    assert over.from_probe and over.best_val_accuracy == over.probe.val_accuracy
    assert torch.equal(net.head[-1].weight, over.probe.weight)  # the exact probe's head
    assert over.history == free.history  # the same epochs ran: only the choice differs


def test_balanced_class_weights_follow_the_class_counts():
    from transferops.finetune.balance import IMBALANCE_RATIO, class_weights

    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)  # 3 present classes, class 3 absent
    w = class_weights(y, 4, "balanced")
    assert w is not None
    # w_c = n / (K n_c): each present class's total weight is the same, n / K
    assert torch.allclose(w[:3] * torch.tensor([60.0, 30.0, 10.0]), torch.full((3,), 100 / 3))
    assert w[3] == 0  # an absent class weighs nothing
    assert w[2] / w[0] == pytest.approx(6.0)  # inversely proportional to the counts
    assert (w[y].mean()).item() == pytest.approx(1.0)  # the mean example weight stays 1
    assert class_weights(y, 4, "none") is None
    assert class_weights(y, 4, "auto") is not None  # 6x imbalance
    mild = torch.tensor([0] * 10 + [1] * int(10 * IMBALANCE_RATIO - 1))
    assert class_weights(mild, 2, "auto") is None  # below the ratio: plain loss


def test_balanced_probe_recovers_a_minority_class():
    from transferops.finetune.balance import class_weights
    from transferops.finetune.probe import fit_probe

    rng = np.random.default_rng(1)
    centers = rng.normal(scale=0.7, size=(3, 8))
    n = np.array([200, 200, 12])  # class 2 is rare and overlaps the others
    y = np.repeat(np.arange(3), n)
    x = centers[y] + rng.normal(size=(len(y), 8))
    yv = np.repeat(np.arange(3), 60)
    xv = centers[yv] + rng.normal(size=(len(yv), 8))

    def recall_of_rare(fit) -> float:
        pred = (xv @ fit.weight.double().numpy().T + fit.bias.double().numpy()).argmax(1)
        return float((pred[yv == 2] == 2).mean())

    plain = fit_probe(x, y, xv, yv, 3)
    w = class_weights(torch.from_numpy(y), 3, "balanced")
    balanced = fit_probe(x, y, xv, yv, 3, w)
    assert recall_of_rare(balanced) > recall_of_rare(plain) + 0.2


def test_fine_tuning_loss_is_weighted_by_class(digits_prepared, lite0_source):
    seen = []
    real = torch.nn.functional.cross_entropy

    def spy(logits, target, *a, weight=None, **k):
        if logits.requires_grad:
            seen.append(weight)
        return real(logits, target, *a, weight=weight, **k)

    net, tr, va, cfg, pre = _setup(digits_prepared, lite0_source, unfreeze_depth=1)
    keep = torch.cat([torch.nonzero(tr.y != 0).flatten(), torch.nonzero(tr.y == 0).flatten()[:2]])
    tr = Inputs(tr.x[keep], tr.y[keep])  # class 0 now rare: imbalance far above 2x
    cfg = cfg.model_copy(update={"class_weight": "auto", "epochs_per_stage": [1]})
    with patch("torch.nn.functional.cross_entropy", spy):
        finetune(net, tr, va, cfg, pre, CPU)
    assert seen and all(w is not None for w in seen)
    counts = torch.bincount(tr.y, minlength=len(seen[0])).float()
    assert torch.allclose(seen[0] * counts, torch.full_like(counts, len(tr.y) / len(counts)))


def test_ensemble_output_is_the_log_of_the_members_mean_probabilities():
    torch.manual_seed(0)
    nets = [StagedNet([("b", Wrap(nn.Linear(4, 4)))], AvgPool(), 4, 3) for _ in range(3)]
    x = torch.randn(5, 4)
    got = torch.softmax(Ensemble(nets)(x), 1)
    want = torch.stack([torch.softmax(n(x), 1) for n in nets]).mean(0)
    assert torch.allclose(got, want, atol=1e-6)


def test_train_writes_an_ensemble_of_seeds_and_the_baseline_reuses_its_members(
    tmp_path, digits_prepared, lite0_source
):
    from transferops.config import with_overrides
    from transferops.evaluation.baseline import _already_trained
    from transferops.evaluation.evaluate import _score_finetuned
    from transferops.finetune.train import candidate_note, member_of, reuse_model, same_run
    from transferops.runtime.tracking import setup_tracking, start_run

    # a random head: no probe floor, so the two seeds are two different networks
    cfg = _cfg(
        tmp_path,
        digits_prepared,
        lite0_source,
        unfreeze_depth=1,
        epochs_per_stage=[2, 1],
        head_init="random",
        ensemble=2,
    )
    res = train_from_config(cfg)
    net, spec = load_finetuned(tmp_path / "ft")
    assert isinstance(net, Ensemble) and res.candidate == "ensemble"
    assert [m["finetune"]["seed"] for m in spec["members"]] == [0, 1]
    kept = sorted(p.name for p in (tmp_path / "ck" / "members").glob("s?"))
    assert kept == ["s0", "s1"]  # for the baseline's runs of these seeds, whatever train wrote

    val = load_prepared(digits_prepared, "val")
    x = (val.images.float() / 255 - 0.5) / 0.5
    data_hash, sha = spec["data_hash"], spec["source"]["sha256"]
    mlflow = setup_tracking(cfg.tracking)
    probs = []
    for seed in (0, 1):
        rcfg = with_overrides(cfg, {"finetune.seed": seed})
        assert member_of(tmp_path / "ft", rcfg, data_hash, sha) == seed
        assert not same_run(tmp_path / "ft", rcfg, data_hash, sha)  # an ensemble is not a run
        assert _already_trained(cfg, rcfg, "transfer", data_hash, sha) == (
            tmp_path / "ck" / "members" / f"s{seed}",
            None,
        )
        one, labels = tmp_path / f"s{seed}", {"seed": seed}
        with start_run(mlflow, run_name=f"reuse-s{seed}"):  # it replays the member's curves
            reused, history = reuse_model(tmp_path / "ft", one, labels, member=seed)
        assert reused["finetune"]["seed"] == seed and history == spec["members"][seed]["history"]
        assert same_run(one, rcfg, data_hash, sha)  # exactly the run baseline would train
        member, _ = load_finetuned(one)
        with torch.no_grad():
            probs.append(torch.softmax(member(x), 1))
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # two seeds, two models
    with torch.no_grad():
        averaged = torch.softmax(net(x), 1)
    assert torch.allclose(averaged, (probs[0] + probs[1]) / 2, atol=1e-5)
    acc = (averaged.argmax(1) == val.labels).float().mean().item()
    assert acc == pytest.approx(res.val_accuracy)
    # the report and the model card name the members (evaluate reads them from the spec)
    scored = _score_finetuned(cfg, load_prepared(digits_prepared, "test"), CPU, data_hash, {})
    assert [m["seed"] for m in scored["members"]] == [0, 1]
    note = candidate_note(scored["candidate"], scored["members"])
    assert "ensemble" in note and "seed 0 (val" in note and "seed 1 (val" in note

    shutil.rmtree(tmp_path / "ck")  # a clean machine with finetune.out from the DVC cache
    rcfg = with_overrides(cfg, {"finetune.seed": 1})
    assert _already_trained(cfg, rcfg, "transfer", data_hash, sha) == (tmp_path / "ft", 1)
    other = with_overrides(cfg, {"finetune.seed": 2})
    assert member_of(tmp_path / "ft", other, data_hash, sha) is None
