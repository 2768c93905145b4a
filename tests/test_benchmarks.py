"""The data-loading benchmark runs end to end on a tiny dataset (its loaders must keep giving identical batches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_data_loading_benchmark_checks_identical_batches_and_prints_ratios(tiny_data):
    out = subprocess.run([sys.executable, "benchmarks/data_loading.py", "--data", str(tiny_data), "--batches", "2",
                          "--batch-size", "4", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("vlm_first_epoch_speedup", "vlm_later_epoch_speedup", "vlm_cached_images_speedup", "stage0_speedup",
                "stage0_cached_images_speedup"):
        assert result[key] > 0, key
    assert set(result["vlm_ms_per_batch"]) == {"reference", "fast", "fast_cached", "cached_images"}
    assert set(result["stage0_ms_per_batch"]) == {"reference", "fast", "cached_images"}
    assert result["batch_size"] == 4


def test_data_loading_benchmark_names_missing_data(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/data_loading.py", "--data", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode != 0 and "train_llava.json not found" in out.stderr
