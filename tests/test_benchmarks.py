"""The benchmark scripts run end to end at tiny sizes: their final JSON line has the documented keys with values
that are consistent with each other, and the same record is written with date, commit and machine (the evidence
files `make bench` leaves in benchmarks/results/). No wall-clock time is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, results: Path, timeout: int = 300) -> tuple[dict, dict]:
    """(final stdout JSON, the result file's record) of one benchmark run."""
    env = {**os.environ, "MMOE_BENCH_RESULTS": str(results), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    files = sorted(results.glob("*.json"))
    assert len(files) == 1, files
    record = json.loads(files[0].read_text())
    prov = record.pop("provenance")
    assert record == json.loads(json.dumps(last)), "the file holds exactly the printed result"
    assert prov["date"][:4].isdigit() and "T" in prov["date"]
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["torch"] and prov["machine"]["cpu"]
    load = prov["machine"]["load_avg_1_5_15_min"]  # how busy the machine was when the timing ended
    assert len(load) == 3 and all(x >= 0 for x in load)
    return last, prov


def test_data_loading_benchmark_checks_identical_batches_and_prints_ratios(tiny_data, tmp_path):
    result, _ = _run("benchmarks/data_loading.py", "--data", str(tiny_data), "--batches", "2", "--batch-size", "4",
                     "--repeats", "1", "--threads", "1", results=tmp_path)
    vlm, s0 = result["vlm_ms_per_batch"], result["stage0_ms_per_batch"]
    assert set(vlm) == {"reference", "fast", "fast_cached", "cached_images"}
    assert set(s0) == {"reference", "fast", "cached_images"}
    assert all(v > 0 for v in [*vlm.values(), *s0.values()])
    # each speed-up is the ratio of the reported times (rounded), not an independent number
    for key, (a, b) in {"vlm_first_epoch_speedup": (vlm["reference"], vlm["fast"]),
                        "vlm_later_epoch_speedup": (vlm["reference"], vlm["fast_cached"]),
                        "stage0_speedup": (s0["reference"], s0["fast"])}.items():
        assert result[key] == pytest.approx(a / b, rel=0.05, abs=0.02), key
    assert result["batch_size"] == 4 and result["benchmark"] == "data_loading"


def test_data_loading_benchmark_names_missing_data(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/data_loading.py", "--data", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode != 0 and "train_llava.json not found" in out.stderr


def test_decode_benchmark_tiny(tmp_path):
    """Cached and uncached greedy decoding give the same tokens (fp32), timed the same way (interleaved rounds)."""
    result, _ = _run("benchmarks/decode.py", "--tiny", "--device", "cpu", "--contexts", "8,48", "--prompt", "24",
                     "--new-tokens", "6", "--steps", "3", "--repeats", "2", results=tmp_path)
    assert result["benchmark"] == "decode" and result["contexts"] == [8, 48] and result["repeats"] == 2
    assert result["greedy_token_agreement"] == 1.0
    assert result["cached_gen_s"] > 0 and result["uncached_gen_s"] > 0
    assert result["cached_gen_s_min"] <= result["cached_gen_s"] and result["uncached_gen_s_min"] <= result["uncached_gen_s"]
    assert result["cached_speedup"] == pytest.approx(result["uncached_gen_s"] / result["cached_gen_s"], rel=0.02)
    assert result["latency_ratio_long_over_short"] == pytest.approx(
        result["decode_ms_per_token_long"] / result["decode_ms_per_token_short"], rel=0.01)


@pytest.mark.distributed
def test_expert_parallel_benchmark_tiny(tmp_path):
    """Bytes sent are summed from the tensors handed to the all-to-all: they match the dispatcher's own counter
    (plus the tiny split-size exchange) and the uniform-routing theory; every token-slot arrives somewhere."""
    T, layers, k = 64, 2, 2
    result, _ = _run("benchmarks/expert_parallel.py", "--tokens", str(T), "--dim", "16", "--hidden", "32",
                     "--layers", str(layers), "--experts", "4", "--top-k", str(k), "--steps", "2", "--warmup", "1",
                     results=tmp_path)
    sent, counter = result["a2a_sent_bytes_per_rank_step_fwd"], result["dispatcher_counter_bytes_per_rank_step_fwd"]
    assert counter <= sent <= counter + 64 * result["a2a_calls_per_rank_step_fwd"]
    assert 0.7 < result["a2a_sent_over_theory"] < 1.3  # near-uniform router: about half the slots leave the rank
    assert result["a2a_theory_bytes_per_rank_step_fwd"] == 2 * k * T * 16 * 0.5 * layers * 4
    for layer in range(layers):  # all k*T slots of both ranks are received by one of the two ranks
        assert result["recv_tokens_per_layer_rank0"][layer] + result["recv_tokens_per_layer_rank1"][layer] == 2 * k * T
    assert result["params_per_rank_ep2"] < result["params_per_rank_ep1"]
    assert result["step_s_ep1"] > 0 and result["step_s_ep2"] > 0
    assert result["ep2_over_ep1_step_time"] == pytest.approx(result["step_s_ep2"] / result["step_s_ep1"])


@pytest.mark.slow
def test_model_step_benchmark_tiny(tmp_path):
    """The MoE-vs-dense step benchmark on the tiny test VLM: the dense model it compares with has the same
    active parameter count (that is what makes the step-time ratio meaningful)."""
    import yaml
    from conftest import TINY_ARCH

    cfg = tmp_path / "tiny.yaml"  # TINY_ARCH overrides every field of configs/default.yaml (tests/test_presets.py)
    cfg.write_text(yaml.safe_dump({"model": {"arch": TINY_ARCH}}))
    results = tmp_path / "results"
    result, _ = _run("benchmarks/model_step.py", "--config", str(cfg), "--batch", "2", "--seq", "16", "--repeats", "1",
                     "--threads", "1", "--device", "cpu", results=results)
    assert result["benchmark"] == "model_step" and result["batch"] == 2 and result["seq"] == 16
    assert result["active_params_ratio"] == pytest.approx(1.0, abs=0.05)
    assert result["moe_peak_mem_gib"] > 0 and result["dense_peak_mem_gib"] > 0
    assert result["step_ratio_vs_dense"] > 0 and result["step_ratio_vs_dense_min"] > 0


def _assert_refused(results: Path, script: str, *args: str, message: str) -> None:
    """The script exits non-zero, names the problem on stderr and writes no result file."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "MMOE_BENCH_RESULTS": str(results)})
    assert out.returncode != 0 and message in out.stderr and not list(results.iterdir())


@pytest.mark.parametrize("args, message", [(["--compile"], "--compile is for the GPU mode"),
                                           (["--gpu-mode", "--compile-mode", "max-autotune"], "needs --compile")])
def test_model_step_benchmark_refuses_compile_options_it_would_ignore(tmp_path, args, message):
    _assert_refused(tmp_path, "benchmarks/model_step.py", "--device", "cpu", *args, message=message)


def test_moe_profile_benchmark_tables_and_compiled_ratio(tmp_path):
    """benchmarks/moe_profile.py at tiny sizes: the ratios are those of the reported times, the op tables are per
    step (the dense SwiGLU's 3 linears make exactly 9 matmuls a step: 3 forward, 6 backward), sorted, aten
    operators only, and the compiled MoE step runs (fullgraph) instead of recording a compile error."""
    result, _ = _run("benchmarks/moe_profile.py", "--device", "cpu", "--dtype", "fp32", "--size", "tiny",
                     "--steps", "2", "--threads", "1", results=tmp_path)
    assert "compile_error" not in result
    t = result["train_ms"]
    assert set(t) == {"moe", "dense", "moe_compiled", "dense_compiled"} and all(v > 0 for v in t.values())
    assert result["train_ratio_vs_dense"] == pytest.approx(t["moe"] / t["dense"], rel=0.01)
    assert result["train_compiled_ratio_vs_dense"] == pytest.approx(t["moe_compiled"] / t["dense_compiled"], rel=0.01)
    for mode in ("moe", "moe_compiled", "dense"):
        rows = result[mode]["top_ops"]
        assert rows and all(r["name"].startswith(("aten::", "mmoe::")) for r in rows), mode
        times = [r["ms_per_step"] for r in rows]
        assert times == sorted(times, reverse=True) and 0 < sum(r["share"] for r in rows) <= 1.0001, mode
        assert result[mode]["profiled_ms_per_step"] >= sum(times) - 1e-3, mode
    dense_mm = {r["name"]: r for r in result["dense"]["top_ops"]}["aten::mm"]
    assert dense_mm["calls_per_step"] == 9
    # the eager MoE: the router's gate (3 matmuls a step) plus per-expert matmuls in the loop kernel
    moe_mm = {r["name"]: r for r in result["moe"]["top_ops"]}["aten::mm"]
    assert moe_mm["calls_per_step"] > 9 and result["size"] == "tiny" and result["steps"] == 2


def test_moe_profile_benchmark_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _assert_refused(tmp_path, "benchmarks/moe_profile.py", "--device", "cuda", message="no CUDA device here")


def test_int8_accuracy_benchmark_compares_the_same_questions(tiny_data, tmp_path):
    """Float and int8 runs answer the same questions; the reported accuracies are those of the saved answers
    (eval/vqa.py's metrics), the delta their difference. Skipped without torchao (an optional extra)."""
    pytest.importorskip("torchao")
    import torch

    from mmoe.interop.export import export_model
    from mmoe.model.vlm import MMoEVLM
    from mmoe.interop.factory import model_preset

    torch.manual_seed(0)
    export = export_model(MMoEVLM(model_preset("tiny")), tmp_path / "export", tokenizer=tiny_data)
    results = tmp_path / "results"
    result, _ = _run("benchmarks/int8_accuracy.py", "--model", str(export), "--data", str(tiny_data),
                     "--limit", "4", "--batch-size", "4", "--device", "cpu", results=results)
    assert result["questions"] == 4 and 0 <= result["identical_answers"] <= 4
    assert 0 <= result["accuracy_float"] <= 100 and 0 <= result["accuracy_int8"] <= 100
    assert result["delta"] == pytest.approx(result["accuracy_int8"] - result["accuracy_float"], abs=0.01)
    assert result["int8_linears"] > 0 and result["int8_weight_elements"] > 0
    assert (results / "int8_accuracy-cpu.json").is_file()


def test_heldout_errors_classifies_each_wrong_answer_by_the_scene(tiny_data, tmp_path):
    """Per question the expected kind is read off the scene here (another object's colour / a colour no object has /
    not a colour); the script must count the same, and accuracy must be right answers over colour questions."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from heldout_errors import HeldoutErrorsError, main

    meta = json.loads((tiny_data / "meta.json").read_text())
    scene_file = json.loads((tiny_data / "heldout_scenes.json").read_text())
    scenes = {s["image_id"]: s["objects"] for s in scene_file["scenes"]}
    qs = json.loads((tiny_data / "heldout_questions.json").read_text())["questions"]
    truth = {a["question_id"]: a["multiple_choice_answer"]
             for a in json.loads((tiny_data / "heldout_annotations.json").read_text())["annotations"]}
    exist_ids = {a["question_id"] for a in json.loads((tiny_data / "heldout_annotations.json").read_text())["annotations"]
                 if a["question_type"] == "is there"}
    answers, expected = dict(truth), {"other_object": 0, "absent_value": 0, "invalid": 0}
    color_qs = [q for q in qs if q["question"].startswith(("What color is", "What is the color of"))]
    assert len(color_qs) >= 3, "the tiny held-out split needs a few colour questions"
    for i, q in enumerate(color_qs):
        present = {o["color"] for o in scenes[q["image_id"]]}
        others = sorted(present - {truth[q["question_id"]]})  # objects of another colour (the referent has its own)
        absent = sorted(set(meta["colors"]) - present)
        if i % 3 == 0 and others:
            answers[q["question_id"]], kind = others[0], "other_object"
        elif i % 3 == 1 and absent:
            answers[q["question_id"]], kind = absent[0], "absent_value"
        elif i % 3 == 2:
            answers[q["question_id"]], kind = "yes", "invalid"
        else:
            continue
        expected[kind] += 1
    assert all(expected.values()), expected  # each kind occurs at least once
    wrong = sum(expected.values())
    res = tmp_path / "vqa_heldout.json"
    res.write_text(json.dumps([{"question_id": k, "answer": v} for k, v in answers.items()]))
    report = main(["--data", str(tiny_data), f"m={res}"])["m"]["what color"]
    assert report["errors"] == expected
    assert report["n_referent_heldout"] == len(color_qs)  # every held-out colour question asks about an unseen combo
    assert report["acc_referent_heldout"] == round(100.0 * (len(color_qs) - wrong) / len(color_qs), 2)
    assert main(["--data", str(tiny_data), f"m={res}"])["m"]["what shape"]["acc_referent_heldout"] in (100.0, None)
    # "is there": every answer "no" is right exactly on the questions whose answer is no
    exist_truth = [truth[q] for q in exist_ids]
    res.write_text(json.dumps([{"question_id": k, "answer": "no" if k in exist_ids else v} for k, v in truth.items()]))
    exist = main(["--data", str(tiny_data), f"m={res}"])["m"]["is there"]
    assert (exist["n_yes"], exist["n_no"]) == (exist_truth.count("yes"), exist_truth.count("no")) and exist["n_yes"]
    assert exist["acc_yes"] == 0.0 and exist["acc_no"] in (100.0, None)
    res.write_text(json.dumps([{"question_id": qs[0]["question_id"], "answer": "red"}]))
    with pytest.raises(HeldoutErrorsError, match="no answer for question"):
        main(["--data", str(tiny_data), f"m={res}"])
