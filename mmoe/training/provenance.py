"""Where a result came from: date, commit and machine, stamped on every benchmark and `make train` summary.

A number in the README is only evidence with the code and machine that produced it, so every result file the
benchmarks and `make train` write carries this block (see benchmarks/_util.py: `finish`)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str | None = None) -> dict[str, object]:
    """{date (UTC, ISO), commit, dirty, machine: {cpu, cores, memory_gib, os, python, torch, load_avg_1_5_15_min
    [, gpu]}}."""
    import torch

    status = _git("status", "--porcelain", "--untracked-files=no")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine: dict[str, object] = {"cpu": _cpu_model(), "cores": cores, "os": platform.platform(),
                                  "python": platform.python_version(), "torch": torch.__version__}
    try:
        machine["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "getloadavg"):  # a timing taken while other work shared the cores says so
        machine["load_avg_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        machine["gpu"] = torch.cuda.get_device_name(0)
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "machine": machine}


def write_result(result: dict, path: str | Path, device: str | None = None) -> Path:
    """Write `result` plus a `provenance` block as JSON to `path` (atomically); returns the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**result, "provenance": provenance(device)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
