"""mmoe.model stays plain PyTorch: no Lightning, no torch.distributed, no training/parallel imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mmoe.model

MODEL_DIR = Path(mmoe.model.__file__).parent
REPO = MODEL_DIR.parent.parent
FORBIDDEN_MODULES = ("lightning", "pytorch_lightning", "mmoe.training", "mmoe.parallel")
FORBIDDEN_IMPORTS = ("lightning", "pytorch_lightning", "torch.distributed", "mmoe.training", "mmoe.parallel")

_PROBE = r"""
import importlib, json, pkgutil, sys
import mmoe.model
names = ["mmoe.model"]
for m in pkgutil.walk_packages(mmoe.model.__path__, prefix="mmoe.model."):
    importlib.import_module(m.name)
    names.append(m.name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def test_importing_every_model_module_pulls_no_training_stack():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert "mmoe.model.moe" in data["imported"]
    bad = [m for m in data["modules"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    assert not bad, f"importing mmoe.model pulled in {bad}"


def _imports_and_uses(path: Path) -> list[str]:
    """Imported module names and `torch.distributed` attribute uses in one file (docstrings ignored)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside mmoe.model
                parts = path.parent.relative_to(REPO).parts
                pkg = parts[: len(parts) - node.level + 1]
                base = ".".join(pkg + ((base,) if base else ()))
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            found.append("torch.distributed")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant):
                found.append(str(node.args[0].value))
    return found


def test_model_sources_do_not_reference_distributed_or_lightning():
    files = sorted(MODEL_DIR.rglob("*.py"))
    assert any(f.name == "ffn.py" for f in files)
    offenders = {}
    for f in files:
        bad = [n for n in _imports_and_uses(f)
               if any(n == p or n.startswith(p + ".") for p in FORBIDDEN_IMPORTS)]
        if bad:
            offenders[str(f.relative_to(REPO))] = sorted(set(bad))
    assert not offenders, offenders


def test_the_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""torch.distributed is mentioned in a docstring only."""\nimport torch\n'
                   "def f():\n    return torch.distributed.get_rank()\n")
    assert "torch.distributed" in _imports_and_uses(bad)
    ok = tmp_path / "ok.py"
    ok.write_text('"""No Lightning, no torch.distributed."""\nimport torch\n')
    assert not [n for n in _imports_and_uses(ok) if n.startswith("torch.distributed")]
    lit = tmp_path / "lit.py"
    lit.write_text("from lightning.pytorch import LightningModule\n")
    assert "lightning.pytorch" in _imports_and_uses(lit)
