"""A source model as an ordered list of blocks (input -> output), a pool and a new head.

Freezing, per-depth learning rates and the feature cache all read this one structure
(``StagedNet.blocks``), so no other module needs to know an architecture. Each block is a
module ``forward(h, ctx)``; ``ctx`` carries what every block may need besides the hidden
state (the attention mask for text). Running ``blocks[a:b]`` continues exactly where
``blocks[:a]`` stopped, which is what makes the frozen-prefix feature cache exact.

The splitters at the bottom cut one architecture family each; which family uses which
splitter is in the family table (:mod:`transferops.model.families`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transferops.errors import SourceError


class Seq(nn.Module):
    """A block made of submodules applied in order (image CNN stages)."""

    def __init__(self, *mods: nn.Module) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        for m in self.mods:
            h = m(h)
        return h


class EffLiteStem(nn.Module):
    """EfficientNet-Lite stem: conv, BN, ReLU6 (the package's `_swish` is ReLU6 for lite)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.act(self.bn(self.conv(h)))


class EffLiteStage(nn.Module):
    """Consecutive MBConv blocks sharing a resolution/width, with their drop-connect rates."""

    def __init__(self, blocks: Sequence[nn.Module], rates: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rates = list(rates)

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        for b, r in zip(self.blocks, self.rates, strict=True):
            h = b(h, drop_connect_rate=r)
        return h


class TVViTEmbed(nn.Module):
    """torchvision ViT input: patchify, class token, position embedding, dropout."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        n = x.shape[0]
        p = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        h = torch.cat([self.class_token.expand(n, -1, -1), p], dim=1)
        return self.dropout(h + self.pos_embedding)


class Wrap(nn.Module):
    """A block that ignores ctx (e.g. a torchvision encoder layer)."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self.mod = mod

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.mod(h)


class HFEmbed(nn.Module):
    """HF text embeddings: token ids -> hidden states."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))


class HFLayer(nn.Module):
    """One HF encoder layer; builds the attention mask from ctx (the [B, L] 0/1 mask)."""

    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self._config = config

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = None
        if ctx is not None:
            mask = create_bidirectional_mask(
                config=self._config, inputs_embeds=h, attention_mask=ctx
            )
        out = self.layer(h, mask)
        return out[0] if isinstance(out, tuple) else out


class AvgPool(nn.Module):
    """Global average pool of a [B, C, H, W] map (or pass-through of [B, D])."""

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return h.mean(dim=(2, 3)) if h.dim() == 4 else h.flatten(1)


class Flatten(nn.Module):
    """The input itself as the feature vector (the classical model: a linear head on pixels)."""

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return h.flatten(1)


class MaskedMeanPool(nn.Module):
    """Mean over real tokens (sentence-transformers pooling)."""

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if ctx is None:
            return h.mean(1)
        m = ctx.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class ClsPool(nn.Module):
    """Final norm, then the class token."""

    def __init__(self, norm: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.norm(h)[:, 0]


class StagedNet(nn.Module):
    """Backbone blocks (input -> output), a pooling step and a new classification head."""

    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        pool: nn.Module,
        feat_dim: int,
        num_classes: int,
        dropout: float = 0.0,
        family: str = "unknown",
    ) -> None:
        super().__init__()
        self.family = family  # the model family's row (model.families): facts the loop reads
        self.block_names = [n for n, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        self.pool = pool
        self.feat_dim = feat_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_dim, num_classes))

    @property
    def num_blocks(self) -> int:
        """Number of backbone blocks (the maximum unfreeze depth)."""
        return len(self.blocks)

    def run_blocks(self, h: torch.Tensor, start: int, end: int, ctx: Any = None) -> torch.Tensor:
        """Run blocks[start:end] on `h` (the output of blocks[:start], or the input)."""
        for b in self.blocks[start:end]:
            h = b(h, ctx)
        return h

    def encode(self, x: torch.Tensor, upto: int, ctx: Any = None) -> torch.Tensor:
        """Output of blocks[:upto]; with every block (upto == num_blocks) the pooled features
        the head reads, so a cache of a fully frozen backbone holds one vector per example."""
        h = self.run_blocks(x, 0, upto, ctx)
        return self.pool(h, ctx) if upto == self.num_blocks else h

    def decode(self, h: torch.Tensor, start: int, ctx: Any = None) -> torch.Tensor:
        """Logits from ``encode(x, start)``: the remaining blocks, the pool, the head."""
        if start < self.num_blocks:
            h = self.pool(self.run_blocks(h, start, self.num_blocks, ctx), ctx)
        return self.head(h)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        # encode(x, 0) is x itself, or the pooled x when there are no blocks (pixel model)
        return self.decode(self.encode(x, 0, ctx), 0, ctx)


class Ensemble(nn.Module):
    """Several fine-tuned StagedNets of one architecture as one model: the average of their
    predicted probabilities. Its output is ``log(mean_k softmax(z_k))``, so a softmax of it
    gives those averaged probabilities exactly, and temperature scaling, ONNX export and
    serving treat it like any network's logits."""

    def __init__(self, members: Sequence[StagedNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x, ctx).float(), 1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))


# ---------------------------------------------------------------- splitters

# (named blocks, pool, feature dim): what a splitter returns
BlockSplit = tuple[list[tuple[str, nn.Module]], nn.Module, int]


def _resolve(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SourceError(
            f"source.blocks: module {name!r} not found in the model; top-level modules are: "
            + ", ".join(n for n, _ in model.named_children())
        ) from None


def feature_dim(blocks: list[tuple[str, nn.Module]], pool: nn.Module, image_size: int) -> int:
    """Width of the pooled features, found by running a small probe image through."""
    with torch.no_grad():
        h = torch.zeros(2, 3, image_size, image_size)
        for _, b in blocks:
            b.eval()
            h = b(h, None)
        return int(pool(h, None).shape[-1])


def split_user(model: nn.Module, user_blocks: list[list[str]], image_size: int) -> BlockSplit:
    """`source.blocks`: each block a list of module names applied in order, then a global pool."""
    blocks = [(" + ".join(ns), Seq(*[_resolve(model, n) for n in ns])) for ns in user_blocks]
    return blocks, AvgPool(), feature_dim(blocks, AvgPool(), image_size)


def split_resnet(m: Any, image_size: int) -> BlockSplit:
    """stem (conv1, bn1, relu, maxpool), layer1..layer4."""
    blocks = [("stem", Seq(m.conv1, m.bn1, m.relu, m.maxpool))]
    blocks += [(f"layer{i}", Seq(getattr(m, f"layer{i}"))) for i in range(1, 5)]
    return blocks, AvgPool(), int(m.fc.in_features)


def split_tv_features(m: Any, image_size: int) -> BlockSplit:
    """features[0] .. features[n-1] (MobileNet v2/v3, EfficientNet v1/v2, MNASNet)."""
    blocks = [(f"features.{i}", Seq(f)) for i, f in enumerate(m.features)]
    return blocks, AvgPool(), feature_dim(blocks, AvgPool(), image_size)


def split_tv_vit(m: Any, image_size: int) -> BlockSplit:
    """embed (patchify + class token + position), encoder layers; final norm + class token."""
    blocks = [("embed", TVViTEmbed(m))]
    blocks += [(f"encoder.layers.{i}", Wrap(layer)) for i, layer in enumerate(m.encoder.layers)]
    return blocks, ClsPool(m.encoder.ln), int(m.hidden_dim)


def split_hf_text(m: Any, image_size: int) -> BlockSplit:
    """embeddings, encoder.layer.0 .. N-1; mean over real tokens."""
    blocks = [("embeddings", HFEmbed(m.embeddings))]
    blocks += [
        (f"encoder.layer.{i}", HFLayer(lyr, m.config)) for i, lyr in enumerate(m.encoder.layer)
    ]
    return blocks, MaskedMeanPool(), int(m.config.hidden_size)


def split_pixels(m: Any, image_size: int) -> BlockSplit:
    """No blocks: the head reads the normalised pixels (the classical model)."""
    return [], Flatten(), 3 * image_size * image_size


def fold_same_padding(m: nn.Module) -> int:
    """Move EfficientNet-Lite's static "same" padding into its convolutions where it is
    symmetric (every stride-1 conv): a separate zero-pad copies each activation before the
    conv, which cost the pad + depthwise conv 1.7-1.9x the conv padding itself on the CPU.
    Same outputs, same state dict; asymmetric pads (stride 2 on even sizes) stay. Returns
    how many convolutions were folded."""
    folded = 0
    for conv in m.modules():
        pad = getattr(conv, "static_padding", None)
        if not isinstance(pad, nn.ZeroPad2d) or not isinstance(conv, nn.Conv2d):
            continue
        left, right, top, bottom = pad.padding
        if left == right and top == bottom and tuple(conv.padding) == (0, 0):
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()
            folded += 1
    return folded


def split_efficientnet_lite(m: Any, image_size: int) -> BlockSplit:
    """stem, one block per stage (consecutive MBConv blocks of one output width), head conv
    (symmetric "same" padding folded into the convs first)."""
    fold_same_padding(m)
    blocks: list[tuple[str, nn.Module]] = [("stem", EffLiteStem(m._conv_stem, m._bn0, m._swish))]
    n = len(m._blocks)
    base_rate = m._global_params.drop_connect_rate or 0.0
    stages: list[list[int]] = []
    for i, b in enumerate(m._blocks):
        width = b._block_args.output_filters
        if stages and m._blocks[stages[-1][0]]._block_args.output_filters == width:
            stages[-1].append(i)
        else:
            stages.append([i])
    for st in stages:
        name = f"_blocks.{st[0]}-{st[-1]}" if len(st) > 1 else f"_blocks.{st[0]}"
        rates = [base_rate * i / n for i in st]
        blocks.append((name, EffLiteStage([m._blocks[i] for i in st], rates)))
    blocks.append(("head", EffLiteStem(m._conv_head, m._bn1, m._swish)))
    return blocks, AvgPool(), int(m._fc.in_features)
