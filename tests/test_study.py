"""The MoE-versus-dense study script: its variants are the models they claim to be, and its bookkeeping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmoe.config_io import from_dict
from mmoe.model.active_params import active_param_count
from mmoe.model.moe import MoAAttention, MoEFFN
from mmoe.model.vlm import MMoEVLM, VLMConfig

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("moe_vs_dense", REPO / "benchmarks" / "moe_vs_dense.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(arch: dict) -> MMoEVLM:
    with torch.device("meta"):
        return MMoEVLM(from_dict(VLMConfig, arch))


def test_variants_change_only_what_they_name():
    study = _study()
    base = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    arch = base["model"]["arch"]
    models = {}
    for v in ("moe", "dense", *study.ABLATIONS):
        over = study.variant_overrides(v, arch)
        merged = _merge(base, over)
        models[v] = (_build(merged["model"]["arch"]), merged)
    sites = {v: (sum(isinstance(m, MoEFFN) and m.site == "vision" for m in mod.modules()),
                 sum(isinstance(m, MoAAttention) for m in mod.modules()),
                 sum(isinstance(m, MoEFFN) for m in mod.modules()))
             for v, (mod, _) in models.items()}
    assert sites["moe"][0] > 0 and sites["moe"][1] > 0
    assert sites["dense"] == (0, 0, 0)
    assert sites["no_moa"][1] == 0 and sites["no_moa"][2] == sites["moe"][2]
    assert sites["no_vision_moe"][0] == 0 and sites["no_vision_moe"][1] == sites["moe"][1]
    # dense twin: same active parameters (within rounding of the hidden widths)
    a_moe, a_dense = active_param_count(models["moe"][0]), active_param_count(models["dense"][0])
    assert abs(a_moe - a_dense) / a_moe < 0.02
    assert models["flat_routing"][1]["model"]["arch"]["decoder"]["ffn_moe"]["hierarchy"] == "flat"
    assert models["flat_routing"][1]["model"]["balance"]["ffn"]["group"] == 0.0
    assert models["aux_free_bias"][1]["model"]["arch"]["decoder"]["ffn_moe"]["aux_free_bias"] is True
    with pytest.raises(ValueError, match="unknown variant"):
        study.variant_overrides("moa_only", arch)


def test_summary_means_and_routing_health(tmp_path):
    study = _study()
    rows = [{"variant": "moe", "seed": s, "vqa_test": a, "vqa_heldout": h, "cider_test": 1.0,
             "vqa_test_per_question_type": {"how many": a}, "routing": {"load_cv": 0.2, "max_violation": 0.5}}
            for s, a, h in ((0, 50.0, 40.0), (1, 54.0, 44.0))]
    rows.append({"variant": "dense", "seed": 0, "vqa_test": 49.0, "vqa_heldout": 41.0, "cider_test": None,
                 "vqa_test_per_question_type": {"how many": 49.0}, "routing": {}})
    table = study.summarise(rows)
    assert table["moe"]["vqa_test"] == 52.0 and table["moe"]["vqa_test_std"] == 2.0
    assert table["moe"]["per_question_type"] == {"how many": 52.0}
    assert table["dense"]["cider_test"] is None and table["dense"]["load_cv"] is None
    study.write_report(table, tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "| moe | 2 | 52.00 ± 2.00 | 42.00 ± 2.00 |" in text and (tmp_path / "vqa_accuracy.png").stat().st_size
    assert "| variant | how many |" in text and "| dense | 49.00 |" in text  # per-question-type table
    assert (tmp_path / "vqa_per_question_type.png").stat().st_size > 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,routing/ffn.1/load_cv,routing/ffn.1/image/load_cv,routing/ffn.3/load_cv\n"
                                     "10,0.5,9.0,0.1\n20,0.3,9.0,\n")
    # last value per layer (0.3 and 0.1), the per-modality column is not a layer
    assert study.routing_health(run) == {"load_cv": pytest.approx(0.2)}
    json.dumps(table)  # the summary is written as JSON
