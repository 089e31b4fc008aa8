"""params.yaml validation: unknown keys, wrong types, impossible values, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferops.config import (
    Config,
    check_depth,
    load_config,
    resolve_depth_range,
    validate_config,
)
from transferops.errors import ConfigError

from .conftest import REPO


def test_repo_params_yaml_is_valid_and_matches_defaults() -> None:
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.demo == "digits"
    # Every default in the schema is spelled out in params.yaml (one place to read them).
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Config.model_fields)


def _err(raw: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        validate_config(raw)
    return str(ei.value)


def test_unknown_key_names_key_and_allowed() -> None:
    msg = _err({"finetune": {"lrr": 0.1}})
    assert "finetune.lrr: unknown key" in msg
    assert "lr" in msg and "unfreeze_depth" in msg


def test_unknown_section() -> None:
    msg = _err({"trainig": {}})
    assert "trainig: unknown key" in msg and "finetune" in msg


def test_wrong_type() -> None:
    msg = _err({"finetune": {"batch_size": "big"}})
    assert "finetune.batch_size" in msg and "'big'" in msg


def test_negative_lr() -> None:
    msg = _err({"finetune": {"lr": -0.1}})
    assert "finetune.lr" in msg and "greater than 0" in msg


def test_splits_must_sum_to_one() -> None:
    msg = _err({"data": {"splits": {"train": 0.8, "val": 0.15, "test": 0.15}}})
    assert "data.splits" in msg and "sum to 1" in msg and "1.1" in msg


def test_zero_test_split_rejected() -> None:
    msg = _err({"data": {"splits": {"train": 0.8, "val": 0.2, "test": 0.0}}})
    assert "data.splits" in msg and "> 0" in msg


def test_empty_search_space() -> None:
    msg = _err({"search": {"space": {"lr": None, "unfreeze_depth": None}}})
    assert "search.space" in msg and "empty" in msg


def test_inverted_lr_range() -> None:
    msg = _err({"search": {"space": {"lr": {"low": 0.1, "high": 0.01, "log": True}}}})
    assert "search.space.lr" in msg and "must be < high" in msg


def test_bad_choice_lists_allowed_values() -> None:
    msg = _err({"data": {"on_bad_file": "ignore"}})
    assert "data.on_bad_file" in msg and "'skip'" in msg and "'fail'" in msg


def test_depth_above_block_count() -> None:
    cfg = validate_config({"finetune": {"unfreeze_depth": 12}})
    with pytest.raises(ConfigError, match=r"finetune.unfreeze_depth is 12 .* 9 blocks .*0\.\.9"):
        check_depth(cfg, 9)
    cfg = validate_config(
        {
            "finetune": {"unfreeze_depth": 2},
            "search": {"space": {"unfreeze_depth": {"choices": [0, 2, 11]}}},
        }
    )
    with pytest.raises(ConfigError, match=r"search.space.unfreeze_depth goes up to 11"):
        check_depth(cfg, 9)
    check_depth(cfg, 9, search=False)  # `train` checks only what it uses
    check_depth(
        validate_config({"search": {"space": {"unfreeze_depth": {"low": 0, "high": 9}}}}), 9
    )


def test_default_depth_range_follows_the_source() -> None:
    # The packaged MiniLM has 7 blocks: the default range adapts instead of being refused.
    cfg = validate_config({"finetune": {"unfreeze_depth": 3}})
    check_depth(cfg, 7)
    assert resolve_depth_range(cfg, 7).search.space.unfreeze_depth.values() == list(range(8))
    assert resolve_depth_range(cfg, 9).search.space.unfreeze_depth.values() == list(range(10))
    explicit = validate_config({"search": {"space": {"unfreeze_depth": {"low": 1, "high": 4}}}})
    assert resolve_depth_range(explicit, 9).search.space.unfreeze_depth.values() == [1, 2, 3, 4]


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("finetune:\n  lr: 0.01\n")
    cfg = load_config(
        p, ["finetune.lr=3e-4", "data.splits.seed=7", "finetune.epochs_per_stage=[2, 1]"]
    )
    assert cfg.finetune.lr == pytest.approx(3e-4)
    assert cfg.data.splits.seed == 7
    assert cfg.finetune.epochs_per_stage == [2, 1]
    with pytest.raises(ConfigError, match=r"finetune.lr: Input should be greater than 0"):
        load_config(p, ["finetune.lr=-1"])
    with pytest.raises(ConfigError, match=r"finetune.nope: unknown key"):
        load_config(p, ["finetune.nope=1"])
    with pytest.raises(ConfigError, match=r"must look like key.path=value"):
        load_config(p, ["finetune.lr"])
    # A mapping (what Prefect flow parameters pass) goes through the same validation.
    with pytest.raises(ConfigError, match=r"finetune.unfreeze_depth"):
        load_config(p, {"finetune.unfreeze_depth": -1})


def test_epochs_for_stage_repeats_last() -> None:
    cfg = validate_config({"finetune": {"epochs_per_stage": [3, 2]}})
    assert [cfg.finetune.epochs_for_stage(s) for s in range(4)] == [3, 2, 2, 2]


def test_table_image_column_replaces_text_column() -> None:
    cfg = validate_config({"data": {"format": "table", "table": {"image_column": "file"}}})
    assert cfg.data.table.text_column is None and cfg.data.modality == "image"
    cfg = validate_config({"data": {"format": "table"}})
    assert cfg.data.modality == "text"


def test_each_data_set_registers_under_its_own_name_by_default():
    from transferops.config import registered_model_name, validate_config

    def name(**data):
        return registered_model_name(validate_config({"data": data}))

    assert name() == "transferops-digits"  # the demo
    assert name(path="/srv/data/Bird Photos", demo=None) == "transferops-Bird-Photos"
    assert name(path="tables/fortunes.csv", demo=None, format="table") == "transferops-fortunes"
    named = validate_config({"registry": {"model_name": "mine"}})
    assert registered_model_name(named) == "mine"


def test_preset_sets_its_keys_over_params_and_set_beats_it(tmp_path):
    from transferops.config import PRESETS, load_config

    p = tmp_path / "params.yaml"
    p.write_text("preset: fast\nsearch:\n  n_trials: 30\nbaseline:\n  seeds: [0, 1, 2, 3]\n")
    cfg = load_config(p)
    assert cfg.preset == "fast"
    assert cfg.search.n_trials == PRESETS["fast"]["search.n_trials"]  # over params.yaml's 30
    assert cfg.baseline.seeds == [0] and cfg.source.candidates is None
    # --set beats the preset; --set preset=... picks another preset
    assert load_config(p, ["search.n_trials=5"]).search.n_trials == 5
    best = load_config(p, ["preset=best"])
    assert best.search.n_trials == 16 and best.baseline.seeds == [0, 1, 2]
    # no preset: params.yaml as written
    p.write_text("search:\n  n_trials: 30\n")
    assert load_config(p).search.n_trials == 30
    with pytest.raises(ConfigError, match="preset: 'huge' is not one of fast, balanced, best"):
        load_config(p, ["preset=huge"])


def test_shipped_params_are_the_balanced_preset():
    from transferops.config import PRESETS, load_config, param_value

    cfg = load_config(REPO / "params.yaml")
    assert cfg.preset is None
    for key, value in PRESETS["balanced"].items():
        assert param_value(cfg, key) == value, key  # "balanced" = what ships
