"""`make test` guards `make train` and the other Makefile entry points.

The end-to-end tests shrink the tower of both the stage-0 and the VLM config, so a stage-0 config that no longer
matches the VLM's tower would pass them and fail only after a full stage 0. Here both shipped configs are built at
their real sizes (no overrides but the data directory): the stage-0 tower's export must load into the VLM exactly as
`make train` passes it, and one optimizer step of the full-size VLM must run. The Makefile and `.ci/run` are
exercised with `make -n` (dry run: what would be executed, nothing is).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO

STAGE0 = REPO / "configs/stages/stage0_vision.yaml"
DEFAULT = REPO / "configs/default.yaml"


def _stage0_export(data: Path, out: Path) -> Path:
    """The shipped stage-0 module at full size, exported as `make train` exports it (untrained weights)."""
    from mmoe.training.vision_pretrain import cli_main as vision_cli_main

    cli = vision_cli_main(["--config", str(STAGE0), "--data.data_dir", str(data),
                           "--trainer.default_root_dir", str(out)], run=False)
    return cli.model.export(out / "export")


def test_stage0_export_loads_into_the_full_size_vlm_and_trains_a_step(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from mmoe.training.cli import cli_main
    from mmoe.training.main_job import main  # noqa: F401  (the entry point `make train` runs must import)

    tower = _stage0_export(tiny_data, tmp_path / "stage0")
    # the arguments main_job passes to the VLM stage (see mmoe/training/main_job.py)
    cli = cli_main(["--config", str(DEFAULT), "--data.data_dir", str(tiny_data),
                    "--model.arch.vision.checkpoint", str(tower), "--trainer.default_root_dir", str(tmp_path / "vlm")],
                   run=False)
    module = cli.model
    s0 = load_file(str(tower))
    vit = dict(module.model.vision.vit.state_dict())
    # every stage-0 tensor reached the VLM: dense ones by name, the MLPs of MoE blocks copied into every expert
    # (a stage-0 tower deeper, wider or differently laid out than the VLM's fails here)
    upcycled = 0
    for k, v in s0.items():
        if k in vit:
            assert torch.equal(vit[k], v), k
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", k)
        assert m, f"stage-0 tensor {k} has no place in the VLM tower"
        experts = vit[f"blocks.{m[1]}.mlp.moe.experts.{'w_in' if m[2] == 'fc1' else 'w_out'}.{m[3]}"]
        for e in range(experts.shape[0]):
            assert torch.equal(experts[e], v) or torch.equal(experts[e], v.t()), (k, e)
        upcycled += 1
    assert upcycled == 8, upcycled  # 2 MoE blocks (every_2 of 4) x fc1/fc2 x weight/bias
    # one real optimizer step at full size on a real batch
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    out = module.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch["labels"],
                       logits_at_labels=True)
    from mmoe.training.module import lm_loss
    aux, _ = module.balancing_loss(out.routing)
    loss = lm_loss(out.logits, out.labels) + aux
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()


def _dry_run(*targets: str, **variables: str) -> str:
    args = ["make", "-n", "-C", str(REPO), *targets, *(f"{k}={v}" for k, v in variables.items())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_targets_name_files_that_exist(tmp_path):
    """`make -n` of every documented target: the commands reference scripts and configs that exist, and
    `make train` runs main_job with the default config (whose stage-0 config default is checked above)."""
    stamp: dict[str, str] = {}
    train = _dry_run("train", DATA=str(tmp_path / "data"), **stamp)
    assert "-m mmoe.training.main_job --config configs/default.yaml" in train
    # only `make train` writes the committed record; main_job alone writes into its run directory
    assert re.search(r"--summary-out benchmarks/results/make_train\.json\b", train)
    assert "data_scripts/make_synthetic.py" in train
    test = _dry_run("test", **stamp)
    assert re.search(r"-m pytest\b.*\btests\b", test)
    bench = _dry_run("bench", DATA=str(tmp_path / "data"), **stamp)
    for script in re.findall(r"benchmarks/\w+\.py", bench):
        assert (REPO / script).is_file(), script
    assert "benchmarks/decode.py" in bench and "benchmarks/expert_parallel.py" in bench
    mutation = _dry_run("mutation", **stamp)
    assert "mutmut run" in mutation
    for text in (train, test, bench):
        for path in re.findall(r"\b(?:configs|data_scripts|benchmarks|eval)/[\w/]+\.(?:py|yaml)\b", text):
            assert (REPO / path).is_file(), path
    from mmoe.training.main_job import main
    import inspect
    assert "configs/stages/stage0_vision.yaml" in inspect.getsource(main)  # the stage-0 config built above


def test_ci_script_runs_make_test():
    ci = REPO / ".ci" / "run"
    text = ci.read_text()
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
    assert re.search(r"^make test$", text, re.M)
    proc = subprocess.run(["bash", "-n", str(ci)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
