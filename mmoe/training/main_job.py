"""`make train`: generate the embedded default data if missing, train, export, evaluate, summarise.

    python -m mmoe.training.main_job --config configs/default.yaml --data data/synthetic [-- extra CLI args]
    python -m mmoe.training.main_job --data data/myvqa      # a dataset converted by data_scripts/prepare_*.py

On the synthetic data: stage 0 (the vision tower pretrained on object boxes), the VLM, then VQA on the test
and held-out splits and captioning on test. On a converted dataset (``DIR/dataset.json``, written by the
converters): stage 0 when DIR has object boxes (``train_instances.json``), else it is skipped with a message
saying which tower the VLM uses; the VLM trains on the training split(s) with the tokenizer of DIR (the
decoder's vocabulary sized to it), validates on the VQA validation split if there is one, and is evaluated
on every evaluation split the data has (VQA, GQA, captions; per task its test splits, else its validation
splits); splits it cannot score (free-form conversations; captions without Java) are named in
``evals_skipped`` with the reason.

The last line of output is one JSON object: the metrics, the export path, the run directory, timings and
peak memory; ``<run-dir>/summary.json`` holds it with date, commit and machine (``--summary-out FILE`` also
writes it to FILE: ``make train`` writes benchmarks/results/make_train.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _peak_rss_gib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024 ** 2  # Linux reports KiB


@contextmanager
def _own_argv():
    """LightningCLI warns when called with args while sys.argv holds other flags (ours, already parsed)."""
    saved = sys.argv
    sys.argv = sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _stale_synthetic_version(data: Path) -> str | None:
    """Why `data` (a synthetic dataset written by an older generator) must be regenerated, else None.

    Only directories that say they are ours (meta.json with a generator_version) are ever replaced."""
    from mmoe.data.synthetic import GENERATOR_VERSION

    meta = data / "meta.json"
    if not meta.is_file():
        return None
    found = json.loads(meta.read_text()).get("generator_version")
    if found is None or found == GENERATOR_VERSION:
        return None
    return f"written by generator {found}, this checkout makes {GENERATOR_VERSION}"


def _run_eval(args: list[str]) -> dict:
    """Run an eval script, stream its output, and parse its last stdout line (JSON metrics)."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation failed ({' '.join(args[:1])}), exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _own_data_plan(data: Path, run_dir: Path) -> dict:
    """Training and evaluation inputs of a converted dataset, from its manifest (``dataset.json``)."""
    manifest = json.loads((data / "dataset.json").read_text())
    splits = manifest.get("splits", {})
    train = [name for name, s in splits.items() if s.get("role") == "train" and s.get("llava")]
    if not train:
        raise SystemExit(f"{data}/dataset.json lists no training split; convert one with data_scripts/prepare_*.py "
                         "(--role train)")
    if not (data / "tokenizer.json").exists():
        raise SystemExit(f"{data} has no tokenizer.json; re-run a converter without --tokenizer none")
    if len(train) == 1:
        train_json = splits[train[0]]["llava"]
    else:  # several converted sources train together: one file with all their samples
        mixed: list = []
        for name in train:
            mixed += json.loads((data / splits[name]["llava"]).read_text())
        run_dir.mkdir(parents=True, exist_ok=True)
        train_json = str((run_dir / "train_mix_llava.json").resolve())
        (run_dir / "train_mix_llava.json").write_text(json.dumps(mixed))
    evals = []  # per task: its test splits, else its validation splits
    for task in dict.fromkeys(s.get("task") for s in splits.values()):
        of_task = [name for name, s in splits.items() if s.get("task") == task]
        tests = [name for name in of_task if splits[name].get("role") == "test"]
        evals += tests or [name for name in of_task if splits[name].get("role") == "val"]
    vqa_val = [name for name, s in splits.items() if s.get("role") == "val" and s.get("task") == "vqa"]
    return {"manifest": manifest, "train": train, "train_json": train_json, "val": vqa_val[0] if vqa_val else None,
            "evals": [(name, splits[name]) for name in evals]}


def _vision_tower(extra: list[str], config: str) -> str:
    for i, a in enumerate(extra):
        if a.startswith("--model.arch.vision.checkpoint"):
            value = a.split("=", 1)[1] if "=" in a else (extra[i + 1] if i + 1 < len(extra) else "?")
            return f"the tower in {value} (model.arch.vision.checkpoint), upcycled into the VLM"
    return (f"a tower trained from scratch inside the VLM (model.arch.vision of {config}) at the full learning "
            "rate; pass --model.arch.vision.checkpoint=FILE to start from a pretrained one")


def _eval_skip_reason(split: dict) -> str | None:
    """Why a converted evaluation split cannot be scored here, else None."""
    task = split.get("task")
    if task == "vqa" and not (split.get("questions") and split.get("annotations")):
        return "VQA split without questions and annotations files"
    if task == "gqa" and not split.get("questions"):
        return "GQA split without a questions file"
    if task == "caption":
        if not split.get("captions"):
            return "caption split without a captions file"
        if shutil.which("java") is None:
            return ("`java` is not on PATH: pycocoevalcap's PTB tokenizer and METEOR need a JRE "
                    "(e.g. apt-get install openjdk-17-jre-headless)")
    if task not in ("vqa", "gqa", "caption"):
        return f"task {task!r}: free-form conversations have no reference metric here"
    return None


def _evaluate_own_data(plan: dict, data: Path, export: Path, run_dir: Path, limit: list[str]) -> dict:
    """Every evaluation the converted data supports; the skipped ones are named with their reason in
    ``evals_skipped`` (and printed)."""
    metrics: dict = {}
    skipped: dict[str, str] = {}
    for name, split in plan["evals"]:
        task = split.get("task")
        reason = _eval_skip_reason(split)
        if reason:
            print(f"[mmoe] evaluation of split {name} skipped: {reason}", flush=True)
            skipped[name] = reason
        elif task == "vqa":
            index = ["--image-index", str(data / split["images"])] if split.get("images") else []
            m = _run_eval(["eval/vqa.py", "--model", str(export), "--questions", str(data / split["questions"]),
                           "--annotations", str(data / split["annotations"]), "--images", str(data), *index,
                           "--out", str(run_dir / f"vqa_{name}.json"), *limit])
            metrics[f"vqa_{name}"] = m.get("overall")
            metrics[f"vqa_{name}_per_answer_type"] = m.get("per_answer_type")
        elif task == "gqa":
            m = _run_eval(["eval/vqa.py", "--format", "gqa", "--model", str(export), "--questions",
                           str(data / split["questions"]), "--images", str(data),
                           "--out", str(run_dir / f"gqa_{name}.json"), *limit])
            metrics[f"gqa_{name}"] = m.get("accuracy", m.get("overall"))
        else:
            c = _run_eval(["eval/caption.py", "--model", str(export), "--captions", str(data / split["captions"]),
                           "--images", str(data), "--out", str(run_dir / f"captions_{name}.json"), *limit])
            metrics.update({f"caption_{name}_{k}": v for k, v in c.items()
                            if k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")})
    return {**metrics, "evals_skipped": skipped}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--data", default="data/synthetic",
                    help="synthetic dataset directory (generated if missing) or a directory converted by "
                         "data_scripts/prepare_*.py (it holds dataset.json)")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N questions/images only")
    ap.add_argument("--vision-pretrain", default="configs/stages/stage0_vision.yaml",
                    help="stage-0 config: pretrain the dense vision tower on object labels first and upcycle it "
                         "into the VLM ('none': the tower starts from scratch inside the VLM)")
    ap.add_argument("--summary-out", default="none",
                    help="also write the summary with date, commit and machine here (`make train` passes "
                         "benchmarks/results/make_train.json, the evidence behind README numbers); "
                         "<run-dir>/summary.json always gets the same record, and by default only it, so a run "
                         "writes nothing outside its run directory")
    ap.add_argument("extra", nargs="*", help="extra LightningCLI arguments, e.g. --trainer.max_steps=100")
    args = ap.parse_args(argv)
    data = Path(args.data)
    t0 = time.time()
    own = (data / "dataset.json").is_file()
    stale = None if own else _stale_synthetic_version(data)
    if own:
        pass
    elif data.is_dir() and any(data.glob("*_llava.json")) and not (data / "meta.json").exists():
        raise SystemExit(f"{data} holds LLaVA files but no dataset.json: convert the dataset with "
                         "data_scripts/prepare_*.py (it writes dataset.json and the tokenizer)")
    elif stale or not (data / "tokenizer.json").exists():
        print(f"[mmoe] generating the synthetic dataset into {data}" + (f" ({stale})" if stale else ""), flush=True)
        subprocess.run([sys.executable, "data_scripts/make_synthetic.py", "--out", str(data), "--seed", "0",
                        *(["--overwrite"] if stale else [])], cwd=REPO, check=True)

    from mmoe.training.cli import cli_main

    run_dir = Path(args.run_dir)
    plan = _own_data_plan(data, run_dir) if own else None
    stage0: list[str] = []
    stage0_minutes = 0.0
    has_boxes = (data / "train_instances.json").is_file()
    if args.vision_pretrain.lower() != "none" and not has_boxes:
        print(f"[mmoe] stage 0 (vision pretraining on object boxes) skipped: {data} has no train_instances.json; "
              f"the VLM uses {_vision_tower(args.extra, args.config)}", flush=True)
        if not any(a.startswith("--model.arch.vision.checkpoint") for a in args.extra):
            stage0 = ["--model.optim.vision_lr_scale", "1.0"]  # a tower from scratch learns at the full LR
    elif args.vision_pretrain.lower() != "none":
        from mmoe.training.vision_pretrain import VISION_FILE
        from mmoe.training.vision_pretrain import cli_main as vision_cli_main

        s0_dir = run_dir / "stage0_vision"
        s0_args = ["fit", "--config", args.vision_pretrain, "--data.data_dir", str(data),
                   "--trainer.default_root_dir", str(s0_dir), "--export_dir", str(s0_dir / "export")]
        print(f"[mmoe] stage 0: python -m mmoe.training.vision_pretrain {' '.join(s0_args)}", flush=True)
        t_s0 = time.time()
        with _own_argv():
            vision_cli_main(s0_args)
        stage0_minutes = (time.time() - t_s0) / 60
        stage0 = ["--model.arch.vision.checkpoint", str(s0_dir / "export" / VISION_FILE)]
    else:
        stage0 = ["--model.optim.vision_lr_scale", "1.0"]  # a tower from scratch learns at the full LR
    own_args: list[str] = []
    no_val: list[str] = []  # after the extra arguments: a config there cannot ask for validation it has no split for
    if plan is not None:
        from mmoe.data.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(data))
        own_args = ["--data.train_json", plan["train_json"], "--model.arch.decoder.vocab_size",
                    str(-(-vocab // 64) * 64)]
        if plan["val"]:
            own_args += ["--data.val_split", plan["val"], "--data.test_split", plan["val"]]
        else:
            print(f"[mmoe] {data} has no VQA validation split: no validation during training", flush=True)
            no_val = ["--data.val_split", "null", "--trainer.limit_val_batches", "0"]
        report = plan["manifest"].get("length_report")
        print(f"[mmoe] own data {data}: training on {', '.join(plan['train'])}; evaluating on "
              f"{', '.join(n for n, _ in plan['evals']) or 'nothing (no test or validation split)'}"
              + (f"; converter length report: {report}" if report else ""), flush=True)
    cli_args = ["fit", "--config", args.config, "--data.data_dir", str(data), *stage0, *own_args,
                "--trainer.default_root_dir", str(run_dir), "--export_dir", str(run_dir / "export"), *args.extra,
                *no_val]
    print(f"[mmoe] python train.py {' '.join(cli_args)}", flush=True)
    t_train = time.time()
    with _own_argv():
        cli_main(cli_args)
    vlm_minutes = (time.time() - t_train) / 60
    train_minutes = stage0_minutes + vlm_minutes
    export = run_dir / "export"
    if not (export / "config.json").exists():
        raise SystemExit(f"training finished but no export was written to {export}")

    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    metrics: dict = {}
    for split in (() if plan is not None else ("test", "heldout")):
        m = _run_eval(["eval/vqa.py", "--model", str(export), "--questions", str(data / f"{split}_questions.json"),
                       "--annotations", str(data / f"{split}_annotations.json"), "--images", str(data),
                       "--image-index", str(data / f"{split}_captions.json"),
                       "--out", str(run_dir / f"vqa_{split}.json"), *limit])
        metrics[f"vqa_{split}"] = m.get("overall")
        metrics[f"vqa_{split}_per_answer_type"] = m.get("per_answer_type")
    if plan is not None:
        metrics = _evaluate_own_data(plan, data, export, run_dir, limit)
    elif (reason := _eval_skip_reason({"task": "caption", "captions": "test_captions.json"})):
        print(f"[mmoe] caption evaluation of split test skipped: {reason}", flush=True)
        metrics["evals_skipped"] = {"test_captions": reason}
    else:
        c = _run_eval(["eval/caption.py", "--model", str(export), "--captions", str(data / "test_captions.json"),
                       "--images", str(data), "--out", str(run_dir / "captions_test.json"), *limit])
        metrics.update({f"caption_{k}": v for k, v in c.items() if k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")})
    summary = {
        **metrics,
        "export": str(export),
        "run_dir": str(run_dir),
        "plots": [str(p) for p in sorted(run_dir.rglob("*.png"))],
        "train_minutes": round(train_minutes, 2),
        "stage0_vision_minutes": round(stage0_minutes, 2),
        "vlm_minutes": round(vlm_minutes, 2),
        "total_minutes": round((time.time() - t0) / 60, 2),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }
    from mmoe.training.provenance import write_result

    write_result(summary, run_dir / "summary.json")
    if args.summary_out.lower() != "none":
        print(f"[mmoe] summary with provenance: {write_result(summary, args.summary_out)}", flush=True)
    print(f"[mmoe] run directory: {run_dir}  export: {export}", flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
