"""LoRA adapters (the ``peft`` library) for HF encoders: ``finetune.adapter: lora``.

The adapters are injected into the source model before it is cut into blocks, so the
staged plan is unchanged: stage 0 trains the head, later stages thaw blocks top-down, but a
thawed block trains only its adapters (rank ``lora_rank`` on ``lora_modules``), never its
weights. An adapter starts as an exact no-op (its B matrix is zero), so frozen blocks still
compute the source's features and the feature cache stays exact.

When the model is saved, the adapters are merged into the weights: the saved model is a
plain one (it loads offline with no peft, registers, serves and exports to ONNX as any
other), and the adapter weights alone are saved beside it (``adapter.safetensors``, a
fraction of the size) with the source's reference in ``model.json``.
"""

from __future__ import annotations

from torch import nn

from transferops.config import FinetuneConfig
from transferops.errors import ConfigError

ADAPTER_FILE = "adapter.safetensors"


def is_adapter(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter."""
    return "lora_" in name


def add_lora(model: nn.Module, cfg: FinetuneConfig, family: str) -> nn.Module:
    """Inject LoRA adapters into `model` in place (HF encoders only)."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy: only when asked for

    if not family.startswith("hf"):
        raise ConfigError(
            f"finetune.adapter: lora works on Hugging Face encoders (source.kind: hf), not "
            f"the {family} family: set finetune.adapter: none"
        )
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_modules),
        lora_dropout=0.0,
    )
    try:
        return inject_adapter_in_model(config, model)
    except ValueError as exc:  # no module matched the names
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"finetune.lora_modules {cfg.lora_modules} match no layer of the source "
            f"({exc}); its Linear layers are named: {', '.join(linear)}"
        ) from None


def adapter_weights(net: nn.Module) -> dict:
    """The adapters' tensors (what `adapter.safetensors` holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if is_adapter(k)}


def merge_adapters(net: nn.Module) -> int:
    """Fold every adapter into its layer's weight and put the plain layer back; how many."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, layer.get_base_layer())
    return len(layers)
