"""Named model presets (configs/model/*.yaml, configs/default.yaml, configs/cumo_large.yaml) parse and build."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import REPO, TINY_OVERRIDES
from mmoe.config_io import ConfigError, merge_dicts
from mmoe.interop.factory import MODEL_PRESETS, model_preset
from mmoe.model.vlm import MMoEVLM


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    out = {}
    for name in MODEL_PRESETS:
        with torch.device("meta"):  # no memory, no file reads: cumo_large's 7B decoder costs nothing here
            model = MMoEVLM(model_preset(name))
        out[name] = sum(p.numel() for p in model.parameters())
    return out


def test_every_preset_builds_and_they_grow_in_size(sizes):
    assert sizes["tiny"] < sizes["default"] < sizes["mid"] < sizes["cumo_large"], sizes
    assert 0.2e9 < sizes["mid"] < 3e9, sizes["mid"]  # fits one GPU with room for a benchmark batch


def test_tiny_preset_is_what_the_tests_train_and_it_overrides_every_default_field():
    tiny = yaml.safe_load((REPO / "configs" / MODEL_PRESETS["tiny"]).read_text())["model"]["arch"]
    assert TINY_OVERRIDES["model"]["arch"] == tiny
    default = yaml.safe_load((REPO / "configs/default.yaml").read_text())["model"]["arch"]
    # stacked over configs/default.yaml (`--config default.yaml --config model/tiny.yaml`) nothing leaks through
    assert _flat_keys(default) <= _flat_keys(tiny), _flat_keys(default) - _flat_keys(tiny)
    model = MMoEVLM(model_preset("tiny"))
    assert model.cfg.decoder.dim == 32 and len(model.vision.moe_mlps) == 1


def test_unknown_presets_and_bad_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="'huge'.*cumo_large.*tiny"):
        model_preset("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"arch": {"decoder": {"n_layer": 2}}}}))
    with pytest.raises(ConfigError, match=r"model.arch.decoder.*n_layer"):
        model_preset(bad)
    with pytest.raises(ValueError, match="no model.arch"):
        (tmp_path / "empty.yaml").write_text("trainer: {}\n")
        model_preset(tmp_path / "empty.yaml")


def test_merge_dicts_stacks_configs_like_repeated_config_files():
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": [1, 2], "c": {"k": 1}, "d": 5}
    over = {"a": {"y": {"q": 2}}, "b": [3], "c": None, "d": {"new": 1}, "e": 0}
    merged = merge_dicts(base, over)
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [3], "c": None, "d": {"new": 1}, "e": 0}
    assert base == {"a": {"x": 1, "y": {"p": 1}}, "b": [1, 2], "c": {"k": 1}, "d": 5}  # inputs untouched
    assert over["a"] == {"y": {"q": 2}}
