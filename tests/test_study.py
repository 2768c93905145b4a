"""The MoE-versus-dense study script: its variants are the models they claim to be, and its bookkeeping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmoe.config_io import from_dict, merge_dicts
from mmoe.model.active_params import active_param_count
from mmoe.model.moe import MoAAttention, MoEFFN
from mmoe.model.vlm import MMoEVLM, VLMConfig

REPO = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("moe_vs_dense", REPO / "benchmarks" / "moe_vs_dense.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
        merged = merge_dicts(base, over)
        models[v] = (_build(merged["model"]["arch"]), merged)
    sites = {v: (sum(isinstance(m, MoEFFN) and m.site == "vision" for m in mod.modules()),
                 sum(isinstance(m, MoAAttention) for m in mod.modules()),
                 sum(isinstance(m, MoEFFN) for m in mod.modules()))
             for v, (mod, _) in models.items()}
    assert sites["moe"][0] > 0 and sites["moe"][1] > 0
    assert sites["dense"] == (0, 0, 0)
    assert sites["no_moa"][1] == 0 and sites["no_moa"][2] == sites["moe"][2]
    assert sites["no_vision_moe"][0] == 0 and sites["no_vision_moe"][1] == sites["moe"][1]
    vision_side = sites["moe"][0] + 1  # the ViT's MoE blocks and the MoE connector
    assert sites["moe_vision_only"] == (sites["moe"][0], 0, vision_side)
    assert sites["moe_decoder_only"] == (0, sites["moe"][1], sites["moe"][2] - vision_side)
    assert sites["dense_vit"] == (0, sites["moe"][1], sites["moe"][2] - sites["moe"][0])
    assert sites["dense_connector"] == (sites["moe"][0], sites["moe"][1], sites["moe"][2] - 1)
    for half, dense_part in (("moe_vision_only", "decoder"), ("moe_decoder_only", "vision"),
                             ("dense_vit", "vision"), ("dense_connector", "connector")):
        assert models[half][1]["model"]["arch"][dense_part] == models["dense"][1]["model"]["arch"][dense_part]
    # dense twin: same active parameters (within rounding of the hidden widths)
    a_moe, a_dense = active_param_count(models["moe"][0]), active_param_count(models["dense"][0])
    assert abs(a_moe - a_dense) / a_moe < 0.02
    for half in ("moe_vision_only", "moe_decoder_only", "dense_vit", "dense_connector"):  # same active parameters
        assert abs(active_param_count(models[half][0]) - a_moe) / a_moe < 0.02
    shared = models["connector_shared"][0].connector.proj  # 1 shared + top-1 routed: the default's active width
    assert shared.shared is not None and shared.router.cfg.top_k == 1 and sites["connector_shared"] == sites["moe"]
    assert active_param_count(models["connector_shared"][0]) == a_moe
    assert models["vit_router_lr"][1]["model"]["optim"] == {**base["model"]["optim"], "vision_router_lr_scale": 1.0}
    assert models["vit_router_lr"][1]["model"]["arch"] == arch
    assert models["vit_drop_upcycle"][1]["model"]["arch"]["vision"]["moe"] == {**arch["vision"]["moe"],
                                                                               "upcycle_reinit": 0.5}
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


def test_routing_health_takes_the_in_group_max_violation_of_modality_grouped_layers():
    """A modality-grouped layer is judged by its worst group's MaxVio; a layer without groups by its overall one."""
    study = _study()
    rows = [{"variant": v, "seed": 0, "vqa_test": 80.0, "vqa_heldout": 60.0, "routing_layers": layers}
            for v, layers in (("moe", {"ffn.1": {"max_violation": 0.25, "dead_experts": 0.0}}),
                              ("modality", {"ffn.1": {"max_violation": 0.44, "in_group_max_violation": 0.12,
                                                      "dead_experts": 0.0},
                                            "vision.1": {"max_violation": 0.2, "dead_experts": 1.0}}),
                              ("dense", {}))]
    health = study.study_summary(rows, {})["routing_health"]
    assert health["moe"]["worst_max_violation"] == 0.25
    assert health["modality"]["worst_max_violation"] == 0.2  # the vision layer's 0.2 beats the FFN's in-group 0.12
    assert health["modality"]["dead_experts_total"] == 1.0 and "dense" not in health


def test_dense_total_matches_total_params_and_modality_variant_routes_by_modality():
    study = _study()
    base = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    arch = base["model"]["arch"]
    moe = _build(arch)
    dense_total = _build(merge_dicts(base, study.variant_overrides("dense_total", arch))["model"]["arch"])
    assert not any(isinstance(m, (MoEFFN, MoAAttention)) for m in dense_total.modules())
    n_moe, n_dt = (sum(p.numel() for p in m.parameters()) for m in (moe, dense_total))
    assert abs(n_moe - n_dt) / n_moe < 0.02, (n_moe, n_dt)
    assert active_param_count(dense_total) > 1.5 * active_param_count(moe)  # all of it active: an upper reference
    modality = _build(merge_dicts(base, study.variant_overrides("modality", arch))["model"]["arch"])
    routers = [m.router for m in modality.decoder.modules() if isinstance(m, MoEFFN)]
    assert routers and all(r.cfg.hierarchy == "modality" for r in routers)


@pytest.mark.slow
def test_study_runs_end_to_end_and_summary_deltas_are_the_recorded_per_seed_differences(tiny_data, tmp_path):
    """Tiny sizes, 2 steps per stage, 2 seeds of moe and its dense twin: the study trains stage 0 once per (seed,
    tower shape), trains and scores every run, and writes a summary whose deltas are the paired differences of
    the accuracies it recorded per run."""
    from tests.conftest import TINY_OVERRIDES

    study = _study()
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(TINY_OVERRIDES))
    s0 = tmp_path / "s0.yaml"
    s0.write_text(yaml.safe_dump({"trainer": {"log_every_n_steps": 1, "enable_model_summary": False},
                                  "data": {"batch_size": 4}}))
    out = tmp_path / "study"
    summary = study.main(["--data", str(tiny_data), "--config", "configs/default.yaml", str(tiny),
                          "--stage0-config", "configs/stages/stage0_vision.yaml", str(s0), "--steps", "2",
                          "--stage0-steps", "2", "--seeds", "0", "1", "--variants", "moe", "dense",
                          "--eval-limit", "6", "--in-process", "--out", str(out), "--runs", str(tmp_path / "runs")])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    results = {(r["variant"], r["seed"]): r for r in json.loads((out / "results.json").read_text())}
    assert sorted(results) == [("dense", 0), ("dense", 1), ("moe", 0), ("moe", 1)]
    for key in ("heldout_delta_vs_dense", "test_delta_vs_dense"):
        assert set(on_disk[key]) >= {"mean", "std", "min", "per_seed"}
    assert on_disk["test_acc_per_seed"]["moe"] == [results["moe", s]["vqa_test"] for s in (0, 1)]
    assert on_disk["test_acc_per_seed"]["dense"] == [results["dense", s]["vqa_test"] for s in (0, 1)]
    for split in ("test", "heldout"):
        d = on_disk[f"{split}_delta_vs_dense"]
        want = [results["moe", s][f"vqa_{split}"] - results["dense", s][f"vqa_{split}"] for s in (0, 1)]
        assert d["per_seed"] == pytest.approx(want, abs=1e-9)
        assert d["mean"] == pytest.approx(sum(want) / 2) and d["min"] == pytest.approx(min(want))
        assert d["std"] == pytest.approx(abs(want[0] - want[1]) / 2)
        assert all(results[k][f"vqa_{split}_questions"] == 6 for k in results)
    assert on_disk["commit"] and on_disk["setting"] == "default" and on_disk["steps"] == 2
    # stage 0 ran once per (seed, tower shape): the dense twin's wider tower gets its own
    towers = sorted(p.name for p in (tmp_path / "runs").glob("stage0_*"))
    assert len(towers) == 4 and len({t.rsplit("_", 1)[0] for t in towers}) == 2
    # routing health for every MoE layer of the MoE runs; none for the dense twin
    layers = on_disk["routing_health"]["moe"]["per_seed_layers"]["0"]
    assert layers and all({"max_violation", "dead_experts"} <= set(m) for m in layers.values())
    assert "dense" not in on_disk["routing_health"]
    assert (out / "table.md").read_text().count("| moe |") >= 2 and (out / "deltas.png").stat().st_size > 0


def test_study_refuses_a_data_directory_of_another_setting(tiny_data):
    study = _study()
    with pytest.raises(SystemExit, match="holds the 'default' synthetic setting, not --setting hard"):
        study.ensure_data("hard", tiny_data)
    study.ensure_data("default", tiny_data)  # the matching setting passes


def test_a_failed_stage_is_reported_after_the_rest_is_summarised(tiny_data, tmp_path):
    study = _study()
    bad = tmp_path / "bad_stage0.yaml"
    bad.write_text(yaml.safe_dump({"model": {"no_such_field": 1}}))
    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=r"2 run\(s\) failed .*stage0 failed"):
        study.main(["--data", str(tiny_data), "--stage0-config", "configs/stages/stage0_vision.yaml", str(bad),
                    "--seeds", "0", "--variants", "moe", "dense", "--in-process", "--out", str(out),
                    "--runs", str(tmp_path / "runs")])
    summary = json.loads((out / "summary.json").read_text())  # written before the failure is raised
    assert summary["test_acc_per_seed"] == {} and summary["heldout_delta_vs_dense"]["per_seed"] == []
    assert "no_such_field" in "".join(p.read_text() for p in out.glob("log_stage0_*.txt"))
