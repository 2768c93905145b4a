"""Spawn helpers for multi-process CPU tests: gloo on 127.0.0.1, a free port per job, a hard timeout.

`run_distributed(fn, world_size, *args, timeout=90)` starts `world_size` processes with torch.multiprocessing
(spawn), each calling `fn(rank, world_size, *args)` inside an initialised gloo process group, and returns the
list of per-rank return values (picklable). A rank that raises fails the test with its traceback; a job that
exceeds `timeout` (e.g. a collective mismatch that would hang) is killed and fails instead of hanging.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.pt")


def _save_result(path: str, record: dict) -> None:
    """Atomically: a peer waiting for this file never sees it half written."""
    torch.save(record, path + ".tmp")
    os.replace(path + ".tmp", path)


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args, timeout: float, init_pg: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get(
                          "GLOO_SOCKET_IFNAME", "lo"))
    torch.set_num_threads(1)
    path = _result_path(out_dir, rank)
    try:
        if init_pg:  # else the callee (e.g. Lightning, reading the torchrun-style env) initialises it
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, *args)
        _save_result(path, {"ok": True, "result": result})
    except BaseException:
        _save_result(path, {"ok": False, "error": traceback.format_exc()})
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    _exit_when_all_ranks_done(out_dir, world_size, timeout)


def _exit_when_all_ranks_done(out_dir: str, world_size: int, timeout: float) -> None:
    """Leave without interpreter or process-group teardown once every rank has written its result.

    Gloo's and the TCP store's background threads occasionally abort the process at teardown ("terminate
    called without an active exception", SIGABRT) after all the work is done, which failed CI runs whose
    results were all correct. Waiting on the result files (not a collective: no socket I/O left) guarantees no
    rank still needs a peer, then os._exit skips the C++ destructors where that abort happens."""
    deadline = time.monotonic() + timeout
    paths = [_result_path(out_dir, r) for r in range(world_size)]
    while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args, timeout: float = 90.0, init_pg: bool = True) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; returns per-rank results.

    The torchrun environment (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE) is set in every process; with
    init_pg=False the process group is left to `fn` (Lightning then treats the processes as launched
    externally, as under torchrun or SLURM)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, port, out_dir, fn, args, timeout, init_pg), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed job {getattr(fn, '__name__', fn)} (world {world_size}) "
                                       f"exceeded {timeout:.0f}s: probably a collective mismatch (hang)")
        except mp.ProcessRaisedException as e:
            raise AssertionError(f"a rank failed:\n{e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for r in range(world_size):
            path = _result_path(out_dir, r)
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} produced no result")
            res = torch.load(path, weights_only=False)
            if not res["ok"]:
                raise AssertionError(f"rank {r} failed:\n{res['error']}")
            results.append(res["result"])
        return results


__all__ = ["free_port", "run_distributed"]


def export_vs_gathered(export_dir: str, full: dict) -> dict:
    """How an export on disk compares with the gathered (one-process layout) state dict: the largest absolute
    difference and the expert counts of the packed expert weights it holds."""
    import safetensors.torch as st

    exported = st.load_file(os.path.join(export_dir, "model.safetensors"))
    return {"export_diff": max(float((exported[k] - full[k]).abs().max()) for k in exported),
            "export_expert_rows": sorted({exported[k].shape[0] for k in exported
                                          if ".experts.w_" in k and k.endswith("weight")})}
