"""Shared timing helpers for the benchmarks: medians of repeats, peak memory, a final JSON line.

Every benchmark prints a human table and then one machine-readable JSON line (last line of stdout),
so CI and reports can parse results without scraping the table.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

import torch


def setup_threads(num_threads: int | None = None) -> int:
    """Pin torch's intra-op threads to the usable core count (or `num_threads`); returns it."""
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = max(1, int(num_threads or 1))
    torch.set_num_threads(n)
    return n


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device=None) -> float:
    """Seconds for one call of `fn`, synchronising an accelerator around it."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2, device=None,
            min_time: float = 0.0) -> dict[str, dict[str, float]]:
    """Time several callables *interleaved* (A B C A B C ...) so machine noise hits them alike.

    Each callable runs `warmup` untimed calls, then at least `repeats` timed rounds (more while the
    total is under `min_time` seconds). Returns {name: {"median", "min", "mean", "n"}} in seconds.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time and rounds < 50 * repeats):
        for k, fn in fns.items():
            times[k].append(time_once(fn, device))
        rounds += 1
    return {k: {"median": statistics.median(v), "min": min(v), "mean": statistics.fmean(v), "n": len(v)}
            for k, v in times.items()}


def peak_memory(fn: Callable[[], object], device=None) -> int:
    """Peak bytes allocated while running `fn` once: torch.cuda's counter on GPU, tracemalloc on CPU
    (torch's CPU allocator is not traced, so on CPU this falls back to the RSS high-water mark delta)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        fn()
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    return max(py_peak, rss_delta)


def env_info(device=None) -> dict[str, object]:
    info: dict[str, object] = {"torch": torch.__version__, "python": platform.python_version(),
                               "threads": torch.get_num_threads(), "machine": platform.machine()}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: list[dict[str, object]], columns: list[str] | None = None) -> None:
    """Plain fixed-width table on stdout."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def print_json(result: dict[str, object]) -> None:
    """The final machine-readable line."""
    print(json.dumps(result, sort_keys=True, default=str))
    sys.stdout.flush()


RESULTS_ENV = "MMOE_BENCH_RESULTS"  # a directory for the result files, or "none" to write nothing (tests)


def finish(name: str, result: dict[str, object], device=None) -> dict[str, object]:
    """Every benchmark's last call: write `result` with date, commit and machine to
    benchmarks/results/<name>-<cpu|cuda>.json (or $MMOE_BENCH_RESULTS), then print it as the final JSON line.

    The file is the evidence behind a number quoted in the README; the printed line is unchanged."""
    from pathlib import Path

    from mmoe.training.provenance import write_result

    where = os.environ.get(RESULTS_ENV, str(Path(__file__).resolve().parent / "results"))
    if where.lower() != "none":
        kind = "cuda" if device is not None and torch.device(device).type == "cuda" else "cpu"
        path = write_result(result, Path(where) / f"{name}-{kind}.json", None if device is None else str(device))
        print(f"[bench] result written to {path}", flush=True)
    print_json(result)
    return result
