"""Run named mutmut mutants by hand, N at a time, and record the verdicts where `mutmut results` reads them.

    .venv/bin/python tools/run_mutants.py [--jobs 2] [--pending] [--tests FILE ...] [--dry-run] GLOB [GLOB ...]

mutmut 3.8's `run` can stall on some functions (no verdict for many minutes, its children restarting); this runs
the same check without its scheduler: for each mutant, pytest over the `[tool.mutmut]` test selection of
pyproject.toml, in `mutants/`, with MUTANT_UNDER_TEST naming the mutant. Exit code 0 means the mutant survived,
any other that a test killed it; a run over --timeout seconds is recorded as mutmut's timeout (36). The selection
is run once with no mutant active first, and a selection that fails by itself is refused. Verdicts go into
the `exit_code_by_key` of the `.meta` files, so `mutmut results` and `mutmut show` see them.

It runs the tests of the working tree (`../tests` from `mutants/`), not mutmut's copy, so a test written
for a survivor is checked at once. `mutants/` must come from a `mutmut run` on the current source: mutants of
a function changed since are stale, so the script refuses when a mutated source file is newer than the
mutants' stats. GLOB matches mutant names (`mmoe.model.moe.experts.xǁGroupedLinearǁforward__mutmut_*`);
--pending keeps only mutants with no verdict yet.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_EXIT = 36  # mutmut.stats.status_by_exit_code: "timeout"


def select(mutants: Path, globs: list[str], pending: bool) -> dict[str, Path]:
    """{mutant name: its .meta file} for every mutant matching one of `globs` (only unchecked ones if pending)."""
    chosen: dict[str, Path] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatchcase(name, g) for g in globs) and not (pending and code is not None):
                chosen[name] = meta
    return chosen


def refuse_stale(repo: Path, mutants: Path, metas: set[Path]) -> None:
    """A source file edited after the mutants were generated has mutants of the old code: refuse them."""
    stats = mutants / "mutmut-stats.json"
    if not stats.exists():
        raise SystemExit(f"{stats} is missing: run `make mutation` (mutmut run) once to generate the mutants")
    for meta in metas:
        source = repo / meta.relative_to(mutants).with_suffix("")  # mutants/mmoe/x.py.meta -> mmoe/x.py
        if source.stat().st_mtime > stats.stat().st_mtime:
            raise SystemExit(f"{source} changed after the mutants were generated ({stats}): rerun `make mutation` "
                             "for it first (its mutants are of the old code)")


def pytest_command(pyproject: Path, python: str, tests: list[str] | None = None) -> list[str]:
    """pytest over [tool.mutmut]'s test selection (or `tests`, test files or node ids relative to the repository),
    run from `mutants/` on the working tree's tests (pytest's rootdir stays the repository: its pyproject.toml is
    the first config above ../tests)."""
    cfg = tomllib.loads(pyproject.read_text())["tool"]["mutmut"]
    selection, args = [], tests or cfg["pytest_add_cli_args_test_selection"]
    for i, a in enumerate(args):  # test files move to ../; node ids (--deselect) stay relative to the rootdir
        selection.append(f"../{a}" if a.startswith("tests/") and (i == 0 or args[i - 1] != "--deselect") else a)
    return [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *cfg.get("pytest_add_cli_args", []),
            *selection]


RUNNING: set[subprocess.Popen] = set()  # the test runs in flight, stopped with the script
STOPPING = threading.Event()  # set on SIGTERM / SIGINT: runs cut short get no verdict


def run_one(name: str, command: list[str], cwd: Path, timeout: float) -> int:
    """The exit code of the test selection with mutant `name` active (TIMEOUT_EXIT past `timeout` seconds)."""
    env = {**os.environ, "MUTANT_UNDER_TEST": name}
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        RUNNING.add(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return TIMEOUT_EXIT
        finally:
            RUNNING.discard(proc)


def stop_running(signum, frame) -> None:
    """SIGTERM / SIGINT: stop the test runs in flight too (they would go on as orphans) and exit."""
    STOPPING.set()
    for proc in list(RUNNING):
        proc.kill()
    raise SystemExit(128 + signum)


def record(meta: Path, name: str, code: int) -> None:
    data = json.loads(meta.read_text())
    data["exit_code_by_key"][name] = code
    meta.write_text(json.dumps(data, indent=4))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("globs", nargs="+", help="mutant-name globs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pending", action="store_true", help="only mutants with no verdict yet")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    ap.add_argument("--tests", nargs="+", metavar="TEST",
                    help="run these test files / node ids instead of [tool.mutmut]'s selection (a survivor of a "
                         "narrower selection may still be killed by the full one)")
    ap.add_argument("--dry-run", action="store_true", help="list the mutants and the command, run nothing")
    ap.add_argument("--repo", type=Path, default=REPO)
    args = ap.parse_args(argv)
    mutants = args.repo / "mutants"
    chosen = select(mutants, args.globs, args.pending)
    if not chosen:
        raise SystemExit(f"no mutant in {mutants} matches {args.globs}" + (" with no verdict" if args.pending else ""))
    refuse_stale(args.repo, mutants, set(chosen.values()))
    command = pytest_command(args.repo / "pyproject.toml", sys.executable, args.tests)
    print(f"[mutants] {len(chosen)} mutants, {args.jobs} at a time: MUTANT_UNDER_TEST=<name> {' '.join(command)}",
          flush=True)
    if args.dry_run:
        print("\n".join(chosen))
        return 0
    # Any failing run counts as a kill, so a selection that fails by itself (a typo in --tests, a broken test)
    # would "kill" every mutant: run it once with no mutant active first.
    clean = run_one("", command, mutants, args.timeout)
    if clean != 0:
        raise SystemExit(f"the test selection fails with no mutant active (exit code {clean}): every mutant would "
                         f"count as killed. Fix it first: cd {mutants} && MUTANT_UNDER_TEST= {' '.join(command)}")
    counts: dict[str, int] = {}
    start, lock = time.monotonic(), threading.Lock()

    def check(name: str) -> None:
        if STOPPING.is_set():  # queued behind a stopped run
            return
        code = run_one(name, command, mutants, args.timeout)
        if STOPPING.is_set():
            return
        verdict = {0: "survived", TIMEOUT_EXIT: "timeout"}.get(code, "killed")
        with lock:  # several mutants of one file share its .meta
            record(chosen[name], name, code)
            counts[verdict] = counts.get(verdict, 0) + 1
            print(f"[mutants] {sum(counts.values())}/{len(chosen)} {name} {verdict} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)

    previous = {sig: signal.signal(sig, stop_running) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(check, chosen))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"mutants": len(chosen), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
