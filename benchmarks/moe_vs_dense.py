"""The MoE-versus-dense study on the synthetic data: equal active parameters, equal training steps.

    .venv/bin/python benchmarks/moe_vs_dense.py [--steps 800] [--seeds 0 1 2] [--variants moe dense ...]
        [--ablation-seeds 0] [--out benchmarks/results/moe_vs_dense] [--eval-limit 600] [--jobs 2]

The defaults are the committed study (benchmarks/results/moe_vs_dense): 800 steps (a full warmup + cosine
schedule, about half the default run's), 3 seeds of MoE and dense, 1 seed of each ablation, the first 600
questions of each split and 500 test images for captions; ~85 minutes on a 2-core CPU.

Variants (all from configs/default.yaml, same steps, batch and schedule):
  moe               the default: MoE ViT blocks, MoE connector, MoA, hierarchical MoE FFN
  dense             every MoE site replaced by a dense layer of the activated width (same active params)
  no_moa            MoA layers replaced by dense attention
  no_vision_moe     the ViT and connector dense (decoder MoE kept)
  flat_routing      decoder FFN routed flat (no group-limited hierarchy)
  aux_free_bias     the default plus DeepSeek-V3 auxiliary-loss-free bias balancing in every router

Each run trains with train.py, exports, and is scored with eval/vqa.py (test split and the held-out
attribute-combination split, overall and per question type) and eval/caption.py (CIDEr); routing health
(load CV, MaxVio, drop rate, entropy per layer) comes from the run's last logged step. Results go to
<out>/results.json, <out>/table.md and <out>/*.png. Last stdout line: JSON summary with the MoE-minus-dense
accuracy gap (target >= 3 points) — reported as measured, whether or not it meets the target.

``--jobs N`` trains N runs at once, each with cpu_count // N threads (on a 2-core CPU two 1-thread runs
get more steps per minute than one 2-thread run); results are identical to serial runs up to float
summation order. Finished runs (results.json) are skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmoe.config_io import from_dict, to_dict  # noqa: E402
from mmoe.model.equivalents import dense_equivalent_config  # noqa: E402
from mmoe.model.vlm import VLMConfig  # noqa: E402

ABLATIONS = ("no_moa", "no_vision_moe", "flat_routing", "aux_free_bias")


def variant_overrides(name: str, base_arch: dict) -> dict:
    """Config overrides (YAML-able) that turn the default into variant `name`."""
    if name == "moe":
        return {}
    if name == "dense":
        return {"model": {"arch": to_dict(dense_equivalent_config(from_dict(VLMConfig, base_arch)))}}
    if name == "no_moa":
        return {"model": {"arch": {"decoder": {"attn_moe": None}}}}
    if name == "no_vision_moe":
        return {"model": {"arch": {"vision": {"moe": None}, "connector": {"kind": "mlp", "moe": None}}}}
    if name == "flat_routing":
        return {"model": {"arch": {"decoder": {"ffn_moe": {"hierarchy": "flat", "top_groups": 1}}},  # (no group step)
                          "balance": {"ffn": {"group": 0.0}}}}
    if name == "aux_free_bias":
        on = {"aux_free_bias": True, "bias_update_rate": 0.001}
        return {"model": {"arch": {"vision": {"moe": on}, "connector": {"moe": on},
                                   "decoder": {"ffn_moe": on, "attn_moe": on}}}}
    raise ValueError(f"unknown variant {name!r}; choose from moe, dense, {', '.join(ABLATIONS)}")


def _last_json(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def routing_health(run: Path) -> dict:
    """Mean over MoE layers of the last logged routing-health metrics."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    last: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("routing/") and v not in ("", None):
                last[k] = float(v)
    out = {}
    for metric in ("load_cv", "max_violation", "drop_rate", "token_entropy", "marginal_entropy"):
        vals = [v for k, v in last.items() if k.endswith("/" + metric) and k.count("/") == 2]
        if vals:
            out[metric] = statistics.fmean(vals)
    return out


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


def run_one(variant: str, seed: int, args, data: Path, out: Path, threads: int) -> dict:
    # checkpoints stay out of the committed results; one folder per study so studies never reuse each other's runs
    run = REPO / "runs" / "study" / out.name / f"{variant}_s{seed}"
    cfg_path = out / f"config_{variant}.yaml"  # written once by main() before any run starts
    env = _thread_env(threads)
    t0 = time.time()
    log_path = out / f"log_{variant}_s{seed}.txt"
    if not (run / "export" / "config.json").exists():
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "train.py", "fit", "--config", args.config, "--config",
                                   str(cfg_path), "--data.data_dir", str(data), "--seed_everything", str(seed),
                                   "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(run),
                                   "--export_dir", str(run / "export"), "--trainer.enable_progress_bar", "false"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"[study] {variant} seed {seed}: training failed ({proc.returncode}); see {log_path}")
    minutes = (time.time() - t0) / 60
    lim = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    res = {"variant": variant, "seed": seed, "steps": args.steps, "threads": threads,
           "train_minutes": round(minutes, 2)}
    for split in ("test", "heldout"):
        m = _last_json([sys.executable, "eval/vqa.py", "--model", str(run / "export"), "--questions",
                        str(data / f"{split}_questions.json"), "--annotations", str(data / f"{split}_annotations.json"),
                        "--images", str(data), "--image-index", str(data / f"{split}_captions.json"),
                        "--out", str(run / f"vqa_{split}.json"), *lim], env)
        res[f"vqa_{split}"] = m["overall"]
        res[f"vqa_{split}_per_question_type"] = m["per_question_type"]
    c = _last_json([sys.executable, "eval/caption.py", "--model", str(run / "export"), "--captions",
                    str(data / "test_captions.json"), "--images", str(data), "--out", str(run / "captions.json"),
                    *lim, *(["--allow-subset"] if lim else [])], env)
    res["cider_test"] = c.get("CIDEr")
    res["routing"] = routing_health(run)
    return res


def summarise(results: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    table = {}
    for v, rs in by.items():
        row = {"seeds": len(rs)}
        for k in ("vqa_test", "vqa_heldout", "cider_test"):
            xs = [r[k] for r in rs if r.get(k) is not None]
            row[k] = statistics.fmean(xs) if xs else None
            row[k + "_std"] = statistics.pstdev(xs) if len(xs) > 1 else 0.0
        for k in ("load_cv", "max_violation", "drop_rate"):
            xs = [r["routing"][k] for r in rs if k in r.get("routing", {})]
            row[k] = statistics.fmean(xs) if xs else None
        qt = {}
        for r in rs:
            for t, a in r["vqa_test_per_question_type"].items():
                qt.setdefault(t, []).append(a)
        row["per_question_type"] = {t: statistics.fmean(a) for t, a in qt.items()}
        table[v] = row
    return table


def write_report(table: dict, out: Path) -> None:
    lines = ["| variant | seeds | VQA test | VQA held-out | CIDEr | load CV | MaxVio | drop rate |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x, std=None):
        if x is None:
            return "–"
        return f"{x:.2f}" + (f" ± {std:.2f}" if std else "")
    for v, r in table.items():
        lines.append(f"| {v} | {r['seeds']} | {f(r['vqa_test'], r['vqa_test_std'])} | "
                     f"{f(r['vqa_heldout'], r['vqa_heldout_std'])} | {f(r['cider_test'])} | {f(r['load_cv'])} | "
                     f"{f(r['max_violation'])} | {f(r['drop_rate'])} |")
    qtypes = sorted({t for r in table.values() for t in r.get("per_question_type", {})})
    if qtypes:
        lines += ["", "VQA test accuracy per question type (mean over seeds):", "",
                  "| variant | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
        for v, r in table.items():
            lines.append(f"| {v} | " + " | ".join(f(r["per_question_type"].get(t)) for t in qtypes) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(table)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [table[n]["vqa_test"] or 0 for n in names], 0.4, label="test",
           yerr=[table[n]["vqa_test_std"] for n in names])
    ax.bar([i + 0.2 for i in x], [table[n]["vqa_heldout"] or 0 for n in names], 0.4, label="held-out combos",
           yerr=[table[n]["vqa_heldout_std"] for n in names])
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("VQA accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "vqa_accuracy.png", dpi=90)
    plt.close(fig)
    if qtypes:  # per question type: where MoE helps or hurts
        fig, ax = plt.subplots(figsize=(1.4 * len(qtypes) + 2, 3.5))
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + (i - (len(names) - 1) / 2) * w for j in range(len(qtypes))],
                   [table[n]["per_question_type"].get(t, 0) for t in qtypes], w, label=n)
        ax.set_xticks(list(range(len(qtypes))), qtypes)
        ax.set_ylabel("VQA test accuracy (%)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "vqa_per_question_type.png", dpi=90)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--data", default="data/synthetic")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["moe", "dense", *ABLATIONS])
    ap.add_argument("--eval-limit", type=int, default=600, help="first N questions per split (0: all)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (threads are split between them)")
    ap.add_argument("--out", default="benchmarks/results/moe_vs_dense")
    args = ap.parse_args()
    data, out = REPO / args.data, REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "tokenizer.json").exists():
        subprocess.run([sys.executable, "data_scripts/make_synthetic.py", "--out", str(data), "--seed", "0"],
                       cwd=REPO, check=True)
    base_arch = yaml.safe_load((REPO / args.config).read_text())["model"]["arch"]
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    stale = [r for r in results if r.get("steps", args.steps) != args.steps]
    if stale:
        raise SystemExit(f"[study] {results_path} holds runs of {stale[0]['steps']} steps, not {args.steps}: "
                         f"use another --out to change the step count")
    done = {(r["variant"], r["seed"]) for r in results}
    todo = [(v, s) for v in args.variants for s in (args.seeds if v in ("moe", "dense") else args.ablation_seeds)
            if (v, s) not in done]
    jobs = max(1, min(args.jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"[study] {len(todo)} runs to do ({len(done)} done), {jobs} at a time, {threads} thread(s) each",
          flush=True)
    for v in dict.fromkeys(v for v, _ in todo):  # before the pool: concurrent runs must not race on the file
        (out / f"config_{v}.yaml").write_text(yaml.safe_dump(variant_overrides(v, base_arch)))
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_one, v, s, args, data, out, threads): (v, s) for v, s in todo}
        for fut in as_completed(futures):
            v, s = futures[fut]
            res = fut.result()
            results.append(res)
            results.sort(key=lambda r: (r["variant"], r["seed"]))
            results_path.write_text(json.dumps(results, indent=1))
            print(f"[study] done {v} seed {s}: VQA test {res['vqa_test']:.2f} "
                  f"({len(results)} of {len(done) + len(todo)})", flush=True)
    table = summarise(results)
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    write_report(table, out)
    print((out / "table.md").read_text())
    gap = None
    if table.get("moe", {}).get("vqa_test") is not None and table.get("dense", {}).get("vqa_test") is not None:
        gap = table["moe"]["vqa_test"] - table["dense"]["vqa_test"]
    print(json.dumps({"benchmark": "moe_vs_dense", "steps": args.steps, "moe_minus_dense_vqa_test": gap,
                      "target_gap": 3.0, "variants": {v: {k: r[k] for k in ("vqa_test", "vqa_heldout", "cider_test")}
                                                      for v, r in table.items()}}))


if __name__ == "__main__":
    main()
