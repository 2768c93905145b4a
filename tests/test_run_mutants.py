"""tools/run_mutants.py: the by-hand mutant runner picks the right mutants, refuses stale ones, runs the
configured test selection with the mutant active and records verdicts where `mutmut results` reads them."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("run_mutants", REPO / "tools" / "run_mutants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_repo(tmp_path):
    """A repo with one mutated module: its test kills mutant 2 (fails when it is active), lets 1 and 3 live."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.mutmut]\npytest_add_cli_args = ["-p", "no:randomly"]\n'
        'pytest_add_cli_args_test_selection = ["tests/test_fake.py", "--deselect", "tests/test_fake.py::test_skip", '
        '"--deselect", "tests/test_fake.py::test_kills_one_and_three"]\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import os\n\ndef test_kills_two():\n    assert not os.environ['MUTANT_UNDER_TEST'].endswith('_2')\n\n"
        "def test_kills_one_and_three():\n    assert not os.environ['MUTANT_UNDER_TEST'].endswith(('_1', '_3'))\n\n"
        "def test_skip():\n    raise AssertionError('deselected by the selection')\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    meta = tmp_path / "mutants" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    names = [f"pkg.mod.x_f__mutmut_{i}" for i in (1, 2, 3)] + ["pkg.mod.x_g__mutmut_1"]
    meta.write_text(json.dumps({"exit_code_by_key": {**dict.fromkeys(names[:3]), names[3]: 1}}))
    stats = tmp_path / "mutants" / "mutmut-stats.json"
    stats.write_text("{}")
    old = time.time() - 100
    os.utime(tmp_path / "pkg" / "mod.py", (old, old))
    return meta, names


def test_run_mutants_selects_by_glob_and_pending():
    tool = _tool()
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        meta, names = _fake_repo(Path(d))
        mutants = Path(d) / "mutants"
        assert set(tool.select(mutants, ["pkg.mod.x_f__*"], pending=False)) == set(names[:3])
        assert set(tool.select(mutants, ["pkg.mod.*"], pending=True)) == set(names[:3])  # g's mutant has a verdict
        assert set(tool.select(mutants, ["pkg.mod.*"], pending=False)) == set(names)
        assert tool.select(mutants, ["other.*"], pending=False) == {}


def test_run_mutants_runs_the_selection_records_verdicts_and_refuses_stale_mutants(tmp_path, capsys):
    tool = _tool()
    meta, names = _fake_repo(tmp_path)
    assert tool.main(["--repo", str(tmp_path), "--jobs", "2", "--pending", "pkg.mod.*"]) == 0
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes == {names[0]: 0, names[1]: 1, names[2]: 0, names[3]: 1}  # 2 killed, 1 and 3 survived
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"mutants": 3, "survived": 2, "killed": 1}
    with pytest.raises(SystemExit, match="no mutant .* with no verdict"):
        tool.main(["--repo", str(tmp_path), "--pending", "pkg.mod.*"])
    # --tests replaces the selection: another test, other verdicts
    assert tool.main(["--repo", str(tmp_path), "--tests", "tests/test_fake.py::test_kills_one_and_three", "--",
                      "pkg.mod.x_f*"]) == 0
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert [codes[n] for n in names[:3]] == [1, 0, 1]
    # a selection that fails with no mutant active (here the test the configured selection deselects) would
    # "kill" every mutant: refused before any verdict is written
    with pytest.raises(SystemExit, match=r"the test selection fails with no mutant active \(exit code 1\)"):
        tool.main(["--repo", str(tmp_path), "--tests", "tests/test_fake.py::test_skip", "--", "pkg.mod.x_f*"])
    assert json.loads(meta.read_text())["exit_code_by_key"] == codes
    with pytest.raises(SystemExit, match=r"fails with no mutant active \(exit code 4\)"):  # a file that is not there
        tool.main(["--repo", str(tmp_path), "--tests", "tests/test_typo.py", "--", "pkg.mod.x_f*"])
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")  # edited after the mutants were generated
    with pytest.raises(SystemExit, match=r"pkg/mod.py changed after the mutants were generated"):
        tool.main(["--repo", str(tmp_path), "pkg.mod.*"])


def test_run_mutants_times_out_a_hanging_run_and_stops_its_runs_when_stopped(tmp_path):
    """A mutant that hangs the tests is recorded as mutmut's timeout; stopping the script stops the test run it
    started (no orphan left holding a core)."""
    import signal
    import subprocess
    import sys
    tool = _tool()
    meta, names = _fake_repo(tmp_path)
    pid_file = tmp_path / "pid"
    (tmp_path / "tests" / "test_fake.py").write_text(  # hangs with a mutant active (the clean run passes)
        "import os, time\n\ndef test_hangs():\n    if os.environ['MUTANT_UNDER_TEST']:\n"
        f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n        time.sleep(120)\n")
    assert tool.main(["--repo", str(tmp_path), "--jobs", "1", "--timeout", "5", names[0]]) == 0
    assert json.loads(meta.read_text())["exit_code_by_key"][names[0]] == tool.TIMEOUT_EXIT
    pid_file.unlink()
    script = subprocess.Popen([sys.executable, str(REPO / "tools" / "run_mutants.py"), "--repo", str(tmp_path),
                               "--jobs", "1", names[1], names[2]], stdout=subprocess.DEVNULL)
    for _ in range(300):  # until the hanging test has started
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    test_pid = int(pid_file.read_text())
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):
        try:
            os.kill(test_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the test run {test_pid} outlived the script")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes[names[1]] is None and codes[names[2]] is None  # no verdict for the stopped run, none started after
