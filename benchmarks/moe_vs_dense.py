"""The MoE-versus-dense study on today's two-stage default recipe, on the default or the hard setting.

    .venv/bin/python benchmarks/moe_vs_dense.py [--setting default|hard] [--seeds 0 1 2]
        [--variants moe dense flat_routing dense_total] [--accelerator cpu|gpu] [--precision bf16-mixed]
        [--jobs N] [--steps N] [--stage0-steps N] [--eval-limit 0] [--out benchmarks/results/<study>]

Recipe per run (as `make train`): stage 0 pretrains the dense vision tower on object labels
(configs/stages/stage0_vision.yaml), the VLM (configs/default.yaml) loads it (upcycled into the MoE blocks) and
trains; then eval/vqa.py scores the FULL test and held-out-combination splits (``--eval-limit 0``). Stage 0 is
shared: one tower per (seed, tower shape), reused by every variant whose tower has that shape (moe, flat_routing,
modality share one; the dense twins have wider MLPs and get their own, trained by the same stage-0 recipe).

Variants (same data, steps, batch, schedule and seed):
  moe           the default: MoE ViT blocks, MoE connector, MoA, group-limited MoE FFN
  dense         dense twin of equal ACTIVE parameters (every MoE site replaced by a dense layer of the active width)
  flat_routing  the decoder FFN routed flat (no group-limited hierarchy, no group balance loss)
  modality      modality-aware decoder FFN routing (`hierarchy: modality`: half the experts for image tokens,
                half for text; each token routes top-k inside its own group)
  dense_total   dense model of equal TOTAL parameters (an upper reference: same parameters, all active)
  no_moa, no_vision_moe, aux_free_bias   older ablations (one MoE site off / aux-loss-free bias balancing)
  moe_vision_only, moe_decoder_only   one half (ViT + connector / MoA + FFN) MoE, the other from the dense twin
  dense_vit, dense_connector          the default with only the ViT (or only the connector) from the dense twin
  connector_shared    the default's MoE connector as 1 shared expert + top-1 of 4 routed (same active parameters)
  vit_router_lr       the default with the ViT's routers at the full LR (the rest of the tower stays at a tenth)
  vit_drop_upcycle    the default with the ViT's experts drop-upcycled (half of each expert's hidden units redrawn)

Seeds are paired: seed s of every variant sees the same data order and (where shapes allow) the same stage-0
tower, so per-seed differences (variant minus dense) are the statistic. Routing health (MaxVio and dead experts of
every MoE layer, and the load CV) is the last logged training step's. Outputs in --out: results.json (one record
per run), summary.json (per-seed accuracies, paired deltas vs dense, routing health, the commit measured),
table.md, vqa_accuracy.png, deltas.png, config_<variant>.yaml, logs. Last stdout line: a JSON summary.

--jobs N runs N trainings at once: on CPU each gets cpu_count // N threads; on a GPU all share the device
(small models are launch-bound, so concurrent runs fill it). Finished runs are skipped, so a study resumes.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmoe.config_io import from_dict, merge_dicts, to_dict  # noqa: E402
from mmoe.model.active_params import dense_equivalent_config  # noqa: E402
from mmoe.model.vlm import VLMConfig  # noqa: E402

MAIN_VARIANTS = ("moe", "dense", "flat_routing", "modality", "dense_total")
ABLATIONS = ("no_moa", "no_vision_moe", "flat_routing", "aux_free_bias", "moe_vision_only", "moe_decoder_only",
             "dense_vit", "dense_connector", "connector_shared", "vit_router_lr",
             "vit_drop_upcycle")
ALL_VARIANTS = tuple(dict.fromkeys((*MAIN_VARIANTS, *ABLATIONS)))
DEFAULT_VARIANTS = ("moe", "dense", "flat_routing", "dense_total")
SETTINGS = {"default": "data/synthetic", "hard": "data/synthetic_hard"}
FROM_DENSE_TWIN = {  # variant -> the arch parts it takes from the dense twin
    "moe_vision_only": ("decoder",), "moe_decoder_only": ("vision", "connector"),
    "dense_vit": ("vision",), "dense_connector": ("connector",)}
TOWER_ONLY_KEYS = ("moe", "moe_layers", "checkpoint")  # VLM vision fields stage 0 does not take


class StudyError(SystemExit):
    """A study that cannot run as asked (bad variant, missing support, failed run): exits with the message."""


def dense_total_config(cfg: VLMConfig) -> VLMConfig:
    """Same dims, no MoE anywhere, widths chosen so TOTAL parameters match (every expert counted): the dense
    model with the MoE model's whole parameter budget active. MoA's experts partition the heads, so attention
    keeps its heads."""
    from copy import deepcopy

    from mmoe.model.moe.config import select_layers

    d = deepcopy(cfg)
    v = d.vision
    if v.moe is not None:
        n = len(select_layers(v.moe_layers, v.depth))
        hidden = v.dim * v.mlp_ratio
        total = (v.moe.expert_hidden or int(hidden)) * (v.moe.num_experts + v.moe.num_shared_experts)
        v.mlp_ratio, v.moe = ((v.depth - n) * hidden + n * total) / v.depth / v.dim, None
    c = d.connector
    if c.kind == "moe_mlp":
        hidden = c.hidden or cfg.decoder.dim
        c.kind, c.hidden = "mlp", (c.moe.expert_hidden or hidden) * (c.moe.num_experts + c.moe.num_shared_experts)
        c.moe = None
    dec = d.decoder
    if dec.ffn_moe is not None:
        n, m = len(dec.moe_ffn_layer_ids()), dec.ffn_moe
        total = (m.expert_hidden or dec.hidden) * (m.num_experts + m.num_shared_experts)
        dec.hidden, dec.ffn_moe = round(((dec.n_layers - n) * dec.hidden + n * total) / dec.n_layers), None
    if dec.attn_moe is not None:
        dec.head_dim, dec.attn_moe = dec.head_size, None
    return d


def variant_overrides(name: str, base_arch: dict) -> dict:
    """Config overrides (YAML-able) that turn the default into variant `name`."""
    if name == "moe":
        return {}
    if name == "dense":
        return {"model": {"arch": to_dict(dense_equivalent_config(from_dict(VLMConfig, base_arch)))}}
    if name == "dense_total":
        return {"model": {"arch": to_dict(dense_total_config(from_dict(VLMConfig, base_arch)))}}
    if name in FROM_DENSE_TWIN:
        # parts of the model from the dense twin (same active parameters per site), the rest from the MoE default:
        # paired with moe and dense they locate where MoE gains or loses. The vision side keeps the tower its
        # half trains from in stage 0.
        dense = to_dict(dense_equivalent_config(from_dict(VLMConfig, base_arch)))
        return {"model": {"arch": {k: dense[k] for k in FROM_DENSE_TWIN[name]}}}
    if name == "connector_shared":
        # every patch token through one shared expert plus its top-1 routed one: the same two experts' compute per
        # token as the default's top-2, with the common projection learned once instead of in every expert
        return {"model": {"arch": {"connector": {"moe": {"num_shared_experts": 1, "top_k": 1}}}}}
    if name == "vit_router_lr":
        # upcycled experts start identical, so the task loss gives the routers no gradient until the experts
        # drift apart; at the pretrained tower's tenth of the LR both stay near uniform
        return {"model": {"optim": {"vision_router_lr_scale": 1.0}}}
    if name == "vit_drop_upcycle":
        # the other way to start the ViT's experts apart: Drop-Upcycling's r = 0.5 (Nakamura et al., ICLR 2025)
        return {"model": {"arch": {"vision": {"moe": {"upcycle_reinit": 0.5}}}}}
    if name == "no_moa":
        return {"model": {"arch": {"decoder": {"attn_moe": None}}}}
    if name == "no_vision_moe":
        return {"model": {"arch": {"vision": {"moe": None}, "connector": {"kind": "mlp", "moe": None}}}}
    if name == "flat_routing":
        return {"model": {"arch": {"decoder": {"ffn_moe": {"hierarchy": "flat", "top_groups": 1}}},  # (no group step)
                          "balance": {"ffn": {"group": 0.0}}}}
    if name == "modality":
        # the FFN's experts split evenly into an image and a text group (each token routes top-k inside its own);
        # the modality groups replace the default's expert groups, so the group loss goes too
        n = base_arch["decoder"]["ffn_moe"]["num_experts"]
        return {"model": {"arch": {"decoder": {"ffn_moe": {"hierarchy": "modality", "image_experts": n // 2,
                                                           "num_groups": 1, "top_groups": 1}}},
                          "balance": {"ffn": {"group": 0.0}}}}
    if name == "aux_free_bias":
        on = {"aux_free_bias": True, "bias_update_rate": 0.001}
        return {"model": {"arch": {"vision": {"moe": on}, "connector": {"moe": on},
                                   "decoder": {"ffn_moe": on, "attn_moe": on}}}}
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")


def tower_config(arch: dict) -> dict:
    """The dense stage-0 tower a VLM vision config is upcycled from (its vision fields without the MoE ones)."""
    return {k: v for k, v in arch["vision"].items() if k not in TOWER_ONLY_KEYS}


def tower_key(tower: dict) -> str:
    """Short stable name of a tower shape (runs with equal towers share one stage-0 run per seed)."""
    import hashlib

    return hashlib.sha256(json.dumps(tower, sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- metrics
def routing_layers(run: Path) -> dict[str, dict[str, float]]:
    """Per MoE layer: the last logged value of each routing-health metric (overall, not per modality/group)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    last: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k.startswith("routing/") and k.count("/") == 2 and v not in ("", None):
                    _, layer, metric = k.split("/")
                    last.setdefault(layer, {})[metric] = float(v)
    return last


def routing_health(run: Path) -> dict:
    """Mean over MoE layers of the last logged routing-health metrics."""
    layers = routing_layers(run)
    out = {}
    for metric in ("load_cv", "max_violation", "drop_rate", "token_entropy", "marginal_entropy"):
        vals = [m[metric] for m in layers.values() if metric in m]
        if vals:
            out[metric] = statistics.fmean(vals)
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b (same seed order) with mean, std (population) and min."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if not d:
        return {"mean": None, "std": None, "min": None, "per_seed": []}
    return {"mean": statistics.fmean(d), "std": statistics.pstdev(d) if len(d) > 1 else 0.0, "min": min(d),
            "per_seed": d}


# ----------------------------------------------------------------------------------------------- running
def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


ENTRY_POINTS = {  # kind -> (command prefix for a subprocess, how to call it in this process)
    "stage0": (["-m", "mmoe.training.vision_pretrain"], "mmoe.training.vision_pretrain:cli_main"),
    "train": (["train.py"], "mmoe.training.cli:cli_main"),
    "vqa": (["eval/vqa.py"], "eval/vqa.py:main"),
    "caption": (["eval/caption.py"], "eval/caption.py:main"),
}


def _entry(target: str):
    import importlib
    import importlib.util

    where, fn = target.split(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem + "_study_entry", REPO / where)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    return getattr(mod, fn)


def execute(kind: str, argv: list[str], log: Path, env: dict, in_process: bool) -> str:
    """Run one entry point with `argv`, its output appended to `log`; returns its stdout. In a subprocess (own
    thread count, runs in parallel) or, with in_process, in this process (no interpreter start-up: tests)."""
    import contextlib
    import io

    prefix, target = ENTRY_POINTS[kind]
    with open(log, "a") as f:
        if not in_process:
            proc = subprocess.run([sys.executable, *prefix, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=f, text=True, check=False)
            f.write(proc.stdout)
            code, stdout = proc.returncode, proc.stdout
        else:
            buf = io.StringIO()
            saved_argv, code = sys.argv, 0
            sys.argv = sys.argv[:1]  # LightningCLI warns about a foreign argv
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(f):
                    ret = _entry(target)(argv)
                    code = ret if isinstance(ret, int) else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.argv = saved_argv
            stdout = buf.getvalue()
            f.write(stdout)
    if code:
        raise StudyError(f"[study] {kind} failed ({code}): {' '.join(prefix + argv)}; see {log}")
    return stdout


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _configs(paths: list[str]) -> list[str]:
    return [a for p in paths for a in ("--config", p)]


def load_configs(paths: list[str]) -> dict:
    """The configs merged in order, as LightningCLI merges repeated --config files."""
    merged: dict = {}
    for p in paths:
        merged = merge_dicts(merged, yaml.safe_load((REPO / p).read_text()) or {})
    return merged


def _trainer_args(args) -> list[str]:
    return ["--trainer.accelerator", args.accelerator, "--trainer.precision", args.precision,
            "--trainer.enable_progress_bar", "false"]


def run_stage0(seed: int, tower: dict, args, *, data: Path, out: Path, runs: Path, env: dict) -> Path:
    """Pretrain the dense tower (stage 0) for one seed and tower shape, unless done; returns its export file."""
    from mmoe.training.vision_pretrain import VISION_FILE

    key = tower_key(tower)
    run = runs / f"stage0_{key}_s{seed}"
    export = run / "export" / VISION_FILE
    if export.is_file():
        return export
    cfg = out / f"stage0_tower_{key}.yaml"
    log = out / f"log_stage0_{key}_s{seed}.txt"
    cmd = ["fit", *_configs(args.stage0_config),
           "--config", str(cfg), "--data.data_dir", str(data), "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(run), "--export_dir", str(run / "export"), *_trainer_args(args)]
    if args.stage0_steps:
        cmd += ["--trainer.max_steps", str(args.stage0_steps)]
    t0 = time.time()
    log.write_text("")
    execute("stage0", cmd, log, env, args.in_process)
    if not export.is_file():
        raise StudyError(f"[study] stage 0 (tower {key}) seed {seed} wrote no {export}; see {log}")
    (run / "minutes.txt").write_text(f"{(time.time() - t0) / 60:.3f}\n")
    return export


def run_vlm(variant: str, seed: int, tower: Path | None, args, *, data: Path, out: Path, runs: Path,
            env: dict) -> dict:
    """Train one variant on one seed from its stage-0 tower, then score the test and held-out splits."""
    run = runs / f"{variant}_s{seed}"
    log = out / f"log_{variant}_s{seed}.txt"
    t0 = time.time()
    if not (run / "export" / "config.json").exists():
        cmd = ["fit", *_configs(args.config), "--config",
               str(out / f"config_{variant}.yaml"), "--data.data_dir", str(data), "--seed_everything", str(seed),
               "--trainer.default_root_dir", str(run), "--export_dir", str(run / "export"), *_trainer_args(args)]
        cmd += (["--model.arch.vision.checkpoint", str(tower)] if tower is not None
                else ["--model.optim.vision_lr_scale", "1.0"])  # a tower from scratch learns at the full LR
        if args.steps:
            cmd += ["--trainer.max_steps", str(args.steps)]
        log.write_text("")
        execute("train", cmd, log, env, args.in_process)
    res = {"variant": variant, "seed": seed, "steps": args.steps, "stage0_steps": args.stage0_steps,
           "train_minutes": round((time.time() - t0) / 60, 2)}
    if tower is not None:
        m = tower.parent.parent / "minutes.txt"
        res["stage0_minutes"] = round(float(m.read_text()), 2) if m.is_file() else None
    lim = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    dev = ["--device", "cuda"] if args.accelerator == "gpu" else []
    for split in ("test", "heldout"):
        m = _last_json(execute("vqa", ["--model", str(run / "export"), "--questions",
                        str(data / f"{split}_questions.json"), "--annotations", str(data / f"{split}_annotations.json"),
                        "--images", str(data), "--image-index", str(data / f"{split}_captions.json"),
                        "--out", str(run / f"vqa_{split}.json"), "--batch-size", str(args.eval_batch_size),
                        *dev, *lim], log, env, args.in_process))
        res[f"vqa_{split}"] = m["overall"]
        res[f"vqa_{split}_questions"] = m["num_questions"]
        res[f"vqa_{split}_per_question_type"] = m["per_question_type"]
    if args.captions:
        c = _last_json(execute("caption", ["--model", str(run / "export"), "--captions",
                        str(data / "test_captions.json"), "--images", str(data), "--out", str(run / "captions.json"),
                        "--no-meteor", *dev, *lim, *(["--allow-subset"] if lim else [])], log, env,
                               args.in_process))
        res["cider_test"] = c.get("CIDEr")
    res["routing"] = routing_health(run)
    res["routing_layers"] = routing_layers(run)
    return res


# ----------------------------------------------------------------------------------------------- summary
def summarise(results: list[dict]) -> dict[str, dict]:
    """Mean and std over seeds per variant (accuracies, CIDEr, routing health, accuracy per question type)."""
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


def study_summary(results: list[dict], meta: dict) -> dict:
    """summary.json: per-seed accuracies, paired deltas against the dense twin, routing health, the study's goals."""
    by = {(r["variant"], r["seed"]): r for r in results}
    variants = list(dict.fromkeys(r["variant"] for r in sorted(results, key=lambda r: ALL_VARIANTS.index(r["variant"]))))
    seeds = sorted({r["seed"] for r in results})
    out = dict(meta)
    out["seeds"] = seeds
    out["test_acc_per_seed"] = {v: [by[v, s]["vqa_test"] for s in seeds if (v, s) in by] for v in variants}
    out["heldout_acc_per_seed"] = {v: [by[v, s]["vqa_heldout"] for s in seeds if (v, s) in by] for v in variants}
    paired_seeds = [s for s in seeds if ("moe", s) in by and ("dense", s) in by]
    out["paired_seeds"] = paired_seeds
    for split in ("test", "heldout"):
        out[f"{split}_delta_vs_dense"] = paired([by["moe", s][f"vqa_{split}"] for s in paired_seeds],
                                                [by["dense", s][f"vqa_{split}"] for s in paired_seeds])
    out["deltas_vs_dense"] = {}
    for v in variants:
        ss = [s for s in seeds if (v, s) in by and ("dense", s) in by]
        if v != "dense" and ss:
            out["deltas_vs_dense"][v] = {split: paired([by[v, s][f"vqa_{split}"] for s in ss],
                                                       [by["dense", s][f"vqa_{split}"] for s in ss]) | {"seeds": ss}
                                         for split in ("test", "heldout")}
    health = {}
    for v in variants:
        per_seed = {str(s): by[v, s].get("routing_layers", {}) for s in seeds if (v, s) in by}
        layers = [m for ls in per_seed.values() for m in ls.values()]
        if layers:
            # a layer whose experts are split into modality groups balances inside each group: its MaxVio is the
            # worst group's (in_group_max_violation), not the one pooled over both groups' experts
            health[v] = {"worst_max_violation": max(m.get("in_group_max_violation", m.get("max_violation", 0.0))
                                                    for m in layers),
                         "dead_experts_total": sum(m.get("dead_experts", 0.0) for m in layers),
                         "per_seed_layers": per_seed}
    out["routing_health"] = health
    moe_ok = "moe" in health
    d = out["heldout_delta_vs_dense"]
    out["goals"] = {  # the study's targets (docs/moe_vs_dense_study.md), as measured (None: not measured in this study)
        "heldout_delta_mean_ge_3": None if d["mean"] is None else d["mean"] >= 3.0,
        "every_seed_ahead_on_heldout": None if d["min"] is None else d["min"] > 0,
        "moe_zero_dead_experts": health["moe"]["dead_experts_total"] == 0 if moe_ok else None,
        "moe_max_violation_le_0.3": health["moe"]["worst_max_violation"] <= 0.3 if moe_ok else None,
        "moe_test_ge_85_every_seed": (min(out["test_acc_per_seed"]["moe"]) >= 85.0
                                      if out["test_acc_per_seed"].get("moe") else None),
    }
    return out


def _fmt(x, std=None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" + (f" ± {std:.2f}" if std else "")


def write_report(table: dict, out: Path, summary: dict | None = None) -> None:
    """table.md (means, paired deltas, routing health, per question type) and the plots."""
    lines = ["| variant | seeds | VQA test | VQA held-out | CIDEr | load CV | MaxVio | drop rate |",
             "|---|---|---|---|---|---|---|---|"]
    for v, r in table.items():
        lines.append(f"| {v} | {r['seeds']} | {_fmt(r['vqa_test'], r['vqa_test_std'])} | "
                     f"{_fmt(r['vqa_heldout'], r['vqa_heldout_std'])} | {_fmt(r['cider_test'])} | "
                     f"{_fmt(r['load_cv'])} | {_fmt(r['max_violation'])} | {_fmt(r['drop_rate'])} |")
    if summary and summary.get("deltas_vs_dense"):
        lines += ["", f"Paired per-seed differences against the dense twin (VQA points; seeds {summary['paired_seeds']}):",
                  "", "| variant | test mean ± std (min) | held-out mean ± std (min) | held-out per seed |",
                  "|---|---|---|---|"]
        for v, d in summary["deltas_vs_dense"].items():
            t, h = d["test"], d["heldout"]
            lines.append(f"| {v} | {_fmt(t['mean'], t['std'])} ({_fmt(t['min'])}) | {_fmt(h['mean'], h['std'])} "
                         f"({_fmt(h['min'])}) | {', '.join(f'{x:+.2f}' for x in h['per_seed'])} |")
    if summary and summary.get("routing_health"):
        lines += ["", "Routing health at the end of training (worst MoE layer over seeds):", "",
                  "| variant | worst MaxVio (in-group where modality-grouped) | dead experts (all layers, all seeds) |",
                  "|---|---|---|"]
        for v, h in summary["routing_health"].items():
            lines.append(f"| {v} | {h['worst_max_violation']:.3f} | {h['dead_experts_total']:.0f} |")
    qtypes = sorted({t for r in table.values() for t in r.get("per_question_type", {})})
    if qtypes:
        lines += ["", "VQA test accuracy per question type (mean over seeds):", "",
                  "| variant | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
        for v, r in table.items():
            lines.append(f"| {v} | " + " | ".join(_fmt(r["per_question_type"].get(t)) for t in qtypes) + " |")
    if summary:
        note = (f"Setting {summary.get('setting')}, commit {summary.get('commit')}, "
                f"{summary.get('accelerator')} {summary.get('precision')}.")
        lines += ["", note]
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
        ax.set_xticks(list(range(len(qtypes))), qtypes, rotation=20)
        ax.set_ylabel("VQA test accuracy (%)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "vqa_per_question_type.png", dpi=90)
        plt.close(fig)
    if summary and summary.get("deltas_vs_dense"):  # paired differences, one dot per seed
        fig, ax = plt.subplots(figsize=(1.6 * len(summary["deltas_vs_dense"]) + 2, 3.5))
        for i, (v, d) in enumerate(summary["deltas_vs_dense"].items()):
            for j, split in enumerate(("test", "heldout")):
                ys = d[split]["per_seed"]
                ax.scatter([i + 0.15 * (2 * j - 1)] * len(ys), ys, color=f"C{j}",
                           label=split if i == 0 else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(3, color="gray", ls="--", lw=0.8)
        ax.set_xticks(list(range(len(summary["deltas_vs_dense"]))), list(summary["deltas_vs_dense"]), rotation=20)
        ax.set_ylabel("VQA points vs dense twin (per seed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "deltas.png", dpi=90)
        plt.close(fig)


def _commit() -> str:
    if os.environ.get("MMOE_COMMIT"):
        return os.environ["MMOE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ensure_data(setting: str, data: Path) -> None:
    """Generate the setting's dataset if missing; refuse a directory that holds another setting's data."""
    meta = data / "meta.json"
    if not meta.is_file():
        subprocess.run([sys.executable, "data_scripts/make_synthetic.py", "--out", str(data), "--seed", "0",
                        "--preset", setting], cwd=REPO, check=True)
    found = json.loads(meta.read_text()).get("preset", "default")
    if found != setting:
        raise StudyError(f"[study] {data} holds the {found!r} synthetic setting, not --setting {setting}: "
                         f"pass --data with a directory of the {setting} setting")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    ap.add_argument("--data", help="dataset directory (default: data/synthetic, or data/synthetic_hard for hard); "
                                   "generated with make_synthetic.py --preset <setting> if missing")
    ap.add_argument("--config", nargs="+", default=["configs/default.yaml"],
                    help="VLM config file(s), merged in order (the variants' overrides go on top)")
    ap.add_argument("--stage0-config", nargs="+", default=["configs/stages/stage0_vision.yaml"],
                    help="stage-0 recipe file(s) ('none': every tower trains from scratch inside the VLM)")
    ap.add_argument("--steps", type=int, default=0, help="VLM steps (0: the config's)")
    ap.add_argument("--stage0-steps", type=int, default=0, help="stage-0 steps (0: the stage-0 config's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=ALL_VARIANTS)
    ap.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--precision", default=None, help="trainer precision (default: 32-true on CPU, bf16-mixed on GPU)")
    ap.add_argument("--eval-limit", type=int, default=0, help="first N questions per split (0: the full splits)")
    ap.add_argument("--eval-batch-size", type=int, default=0, help="default: 128 on GPU, 32 on CPU")
    ap.add_argument("--captions", action=argparse.BooleanOptionalAction, default=False,
                    help="also score test captions (CIDEr; needs pycocoevalcap)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: summarise the runs already in --out/results.json (e.g. after a timeout)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every stage in this process, one at a time (no interpreter start-ups; for tests)")
    ap.add_argument("--out", help="results directory (default: benchmarks/results/moe_vs_dense_<setting>)")
    ap.add_argument("--runs", help="checkpoint directory (default: runs/study/<out name>)")
    args = ap.parse_args(argv)
    args.config = [str(REPO / c) for c in args.config]  # absolute: runs may start from another directory
    if args.stage0_config != ["none"]:
        args.stage0_config = [str(REPO / c) for c in args.stage0_config]
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    args.eval_batch_size = args.eval_batch_size or (128 if args.accelerator == "gpu" else 32)
    data = Path(args.data) if args.data else REPO / SETTINGS[args.setting]
    data = data if data.is_absolute() else REPO / data
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"moe_vs_dense_{args.setting}"
    out = out if out.is_absolute() else REPO / out
    runs = Path(args.runs) if args.runs else REPO / "runs" / "study" / out.name
    base = load_configs(args.config)
    try:  # refuses an unsupported variant before any work
        overrides = {v: variant_overrides(v, base["model"]["arch"]) for v in args.variants}
    except ValueError as e:
        raise StudyError(f"[study] {e}") from None
    ensure_data(args.setting, data)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    stale = [r for r in results if (r.get("steps"), r.get("stage0_steps")) != (args.steps, args.stage0_steps)]
    if stale:
        raise StudyError(f"[study] {results_path} holds runs of other step counts ({stale[0].get('steps')}, "
                         f"stage 0 {stale[0].get('stage0_steps')}): use another --out")
    done = {(r["variant"], r["seed"]) for r in results}
    todo = [] if args.summary_only else [(v, s) for v in args.variants for s in args.seeds if (v, s) not in done]
    towers: dict[str, dict] = {}
    for v in args.variants:
        (out / f"config_{v}.yaml").write_text(yaml.safe_dump(overrides[v]))
        tower = tower_config(merge_dicts(base, overrides[v])["model"]["arch"])
        towers[v] = tower
        (out / f"stage0_tower_{tower_key(tower)}.yaml").write_text(yaml.safe_dump({"model": {"vision": tower}}))
    use_stage0 = args.stage0_config != ["none"]
    stage0_jobs = sorted({(s, tower_key(towers[v])) for v, s in todo}) if use_stage0 else []
    jobs = 1 if args.in_process else max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = _thread_env(threads)
    print(f"[study] {args.setting}: {len(stage0_jobs)} stage-0 towers and {len(todo)} VLM runs to do "
          f"({len(done)} done), {jobs} at a time on {args.accelerator} ({args.precision}), {threads} thread(s) each",
          flush=True)
    by_key = {tower_key(t): t for t in towers.values()}
    t_start = time.time()
    tower_files: dict[tuple[int, str], Path] = {}
    failures: list[str] = []  # a failed run is reported at the end; the others still finish and are summarised
    where = dict(data=data, out=out, runs=runs, env=env)
    with ThreadPoolExecutor(jobs) as pool:  # phase 1: stage-0 towers, shared per (seed, shape)
        futures = {pool.submit(run_stage0, s, by_key[k], args, **where): (s, k) for s, k in stage0_jobs}
        for fut in as_completed(futures):
            try:
                tower_files[futures[fut]] = fut.result()
            except SystemExit as e:
                failures.append(str(e))
                print(e, flush=True)
                continue
            print(f"[study] stage 0 done: seed {futures[fut][0]} tower {futures[fut][1]}", flush=True)
    t_stage0 = time.time()
    if use_stage0:  # runs whose tower failed cannot start
        todo = [(v, s) for v, s in todo if (s, tower_key(towers[v])) in tower_files]
    with ThreadPoolExecutor(jobs) as pool:  # phase 2: the VLMs, then their evaluation
        futures = {pool.submit(run_vlm, v, s, tower_files.get((s, tower_key(towers[v]))), args, **where): (v, s)
                   for v, s in todo}
        for fut in as_completed(futures):
            v, s = futures[fut]
            try:
                res = fut.result()
            except SystemExit as e:
                failures.append(str(e))
                print(e, flush=True)
                continue
            results.append(res)
            results.sort(key=lambda r: (ALL_VARIANTS.index(r["variant"]), r["seed"]))
            results_path.write_text(json.dumps(results, indent=1))
            print(f"[study] done {v} seed {s}: VQA test {res['vqa_test']:.2f} held-out {res['vqa_heldout']:.2f} "
                  f"({len(results)} of {len(done) + len(todo)})", flush=True)
    meta = {"study": out.name, "setting": args.setting, "commit": _commit(), "accelerator": args.accelerator,
            "precision": args.precision, "steps": args.steps or base["trainer"]["max_steps"],
            "stage0_steps": args.stage0_steps or (load_configs(args.stage0_config)["trainer"]["max_steps"]
                                                  if use_stage0 else 0),
            "eval_limit": args.eval_limit, "jobs": jobs,
            "wall_minutes": {"stage0": round((t_stage0 - t_start) / 60, 2),
                             "vlm_and_eval": round((time.time() - t_stage0) / 60, 2)}}
    table = summarise(results)
    summary = study_summary(results, meta) | {"variants": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(table, out, summary)
    print((out / "table.md").read_text())
    line = {"benchmark": "moe_vs_dense", "setting": args.setting, "commit": summary["commit"],
            "heldout_delta_vs_dense": summary["heldout_delta_vs_dense"],
            "test_delta_vs_dense": summary["test_delta_vs_dense"], "goals": summary["goals"],
            "target_heldout_delta": 3.0}
    print(json.dumps(line))
    if failures:
        raise StudyError(f"[study] {len(failures)} run(s) failed (the summary holds the others): "
                         + "; ".join(failures))
    return summary


if __name__ == "__main__":
    main()
