"""Package layering: model code is plain single-device PyTorch, inference runs without the training stack, and
no two packages of mmoe import each other.

mmoe.model imports no Lightning, torch.distributed, training / parallel / interop / inference code and opens no
files (weights are loaded by mmoe.interop.factory); mmoe.inference imports no Lightning and no training or
parallel code.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mmoe

PKG = Path(mmoe.__file__).parent
REPO = PKG.parent
MODEL_DIR = PKG / "model"
INFERENCE_DIR = PKG / "inference"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
MODEL_FORBIDDEN = LIGHTNING + ("torch.distributed", "mmoe.training", "mmoe.parallel", "mmoe.interop",
                               "mmoe.inference", "safetensors")
INFERENCE_FORBIDDEN = LIGHTNING + ("torch.distributed", "mmoe.training", "mmoe.parallel", "jsonargparse")
# calls that read or write files: builtins, pathlib methods, torch / json / safetensors entry points
FILE_IO_NAMES = {"open"}
FILE_IO_ATTRS = {"read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmdir", "touch",
                 "load_file", "save_file", "safe_open"}
FILE_IO_MODULE_ATTRS = {("torch", "load"), ("torch", "save"), ("json", "load"), ("json", "dump"),
                        ("os", "remove"), ("shutil", "copy"), ("shutil", "rmtree")}

_PROBE = r"""
import importlib, json, pkgutil, sys
pkg = importlib.import_module(sys.argv[1])
names = [pkg.__name__]
for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
    if m.name.endswith(".__main__"):
        continue
    importlib.import_module(m.name)
    names.append(m.name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


def _import_everything(package: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True, text=True, cwd=REPO,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_FIRST_IMPORT_PROBE = r"""
import importlib, json, pkgutil, sys, traceback
names = [m.name for m in pkgutil.walk_packages(importlib.import_module("mmoe").__path__, prefix="mmoe.")
         if not m.name.endswith(".__main__")]
failed = {}
for name in names:
    for k in [k for k in sys.modules if k == "mmoe" or k.startswith("mmoe.")]:
        del sys.modules[k]  # a fresh start for mmoe; torch, Lightning, ... stay loaded (speed)
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-2)
print(json.dumps({"modules": names, "failed": failed}))
"""


def test_every_module_imports_first_on_its_own():
    """No import cycle that only works in one order: `from mmoe.parallel.checkpoint import ...` as a program's
    first mmoe import once failed (checkpoint -> expert_parallel -> checkpoint, half initialised)."""
    out = subprocess.run([sys.executable, "-c", _FIRST_IMPORT_PROBE], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"mmoe.parallel.checkpoint", "mmoe.parallel.strategy", "mmoe.model.vlm"} <= set(data["modules"])
    assert not data["failed"], "\n".join(f"{k}:\n{v}" for k, v in data["failed"].items())


def _matches(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_importing_every_model_module_pulls_no_training_stack():
    data = _import_everything("mmoe.model")
    assert "mmoe.model.moe" in data["imported"]
    bad = [m for m in data["modules"] if _matches(m, LIGHTNING + ("mmoe.training", "mmoe.parallel"))]
    assert not bad, f"importing mmoe.model pulled in {bad}"


def test_importing_every_inference_module_pulls_no_training_stack():
    data = _import_everything("mmoe.inference")
    assert {"mmoe.inference.pipeline", "mmoe.inference.cli", "mmoe.inference.routing_map",
            "mmoe.inference.lmms_plugin"} <= set(data["imported"])
    bad = [m for m in data["modules"] if _matches(m, LIGHTNING + ("mmoe.training", "mmoe.parallel"))]
    assert not bad, f"importing mmoe.inference pulled in {bad}"


def _imports_and_uses(path: Path) -> list[str]:
    """Imported module names and `torch.distributed` attribute uses in one file (docstrings ignored)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the file's package
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


def _file_io_calls(path: Path) -> list[str]:
    """Calls in one file that read or write files (`open(...)`, `Path.read_text()`, `torch.load`, ...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in FILE_IO_NAMES | FILE_IO_ATTRS:
            found.append(f"{f.id}() line {node.lineno}")
        elif isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if f.attr in FILE_IO_ATTRS or (owner, f.attr) in FILE_IO_MODULE_ATTRS:
                found.append(f"{owner or '...'}.{f.attr}() line {node.lineno}")
    return found


def _offenders(directory: Path, forbidden) -> dict[str, list[str]]:
    offenders = {}
    for f in sorted(directory.rglob("*.py")):
        bad = sorted({n for n in _imports_and_uses(f) if _matches(n, forbidden)})
        if bad:
            offenders[str(f.relative_to(REPO))] = bad
    return offenders


def test_model_sources_import_no_distributed_lightning_training_or_checkpoint_io():
    assert any(f.name == "ffn.py" for f in MODEL_DIR.rglob("*.py"))
    assert not _offenders(MODEL_DIR, MODEL_FORBIDDEN)


def test_model_sources_do_no_file_io():
    offenders = {str(f.relative_to(REPO)): calls for f in sorted(MODEL_DIR.rglob("*.py"))
                 if (calls := _file_io_calls(f))}
    assert not offenders, offenders


def test_inference_sources_import_no_lightning_or_training_code():
    assert any(f.name == "pipeline.py" for f in INFERENCE_DIR.rglob("*.py"))
    assert not _offenders(INFERENCE_DIR, INFERENCE_FORBIDDEN)


def _package_of(module: str) -> str | None:
    """'mmoe.model.moe.ffn' -> 'mmoe.model'; top-level modules (mmoe.constants) count as their own package."""
    parts = module.split(".")
    if parts[0] != "mmoe" or len(parts) < 2 or parts[1].startswith("__"):  # mmoe.__version__, mmoe/__init__.py
        return None
    return ".".join(parts[:2])


def _package_graph() -> dict[str, set[str]]:
    """Which mmoe packages each mmoe package imports (module-level and function-local imports alike)."""
    graph: dict[str, set[str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(REPO).with_suffix("")
        me = _package_of(".".join(rel.parts))
        for name in _imports_and_uses(f):
            other = _package_of(name)
            if other and me and other != me:
                graph.setdefault(me, set()).add(other)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, set()))


def test_no_two_mmoe_packages_import_each_other():
    graph = _package_graph()
    assert "mmoe.interop" in graph["mmoe.training"]  # the graph sees real edges
    assert not _cycles(graph), _cycles(graph)


def test_the_checkers_catch_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""torch.distributed is mentioned in a docstring only."""\nimport torch\n'
                   "def f():\n    return torch.distributed.get_rank()\n")
    assert "torch.distributed" in _imports_and_uses(bad)
    ok = tmp_path / "ok.py"
    ok.write_text('"""No Lightning, no torch.distributed, open() in a docstring."""\nimport torch\n'
                  "def f(x):\n    return x.open_gate()\n")
    assert not [n for n in _imports_and_uses(ok) if n.startswith("torch.distributed")]
    assert not _file_io_calls(ok)
    lit = tmp_path / "lit.py"
    lit.write_text("from lightning.pytorch import LightningModule\n")
    assert "lightning.pytorch" in _imports_and_uses(lit)
    io = tmp_path / "io.py"
    io.write_text("import torch, json\nfrom pathlib import Path\ndef f(p):\n    torch.load(p)\n"
                  "    Path(p).read_text()\n    with open(p) as fh:\n        return json.load(fh)\n")
    assert len(_file_io_calls(io)) == 4
    assert _cycles({"mmoe.a": {"mmoe.b"}, "mmoe.b": {"mmoe.a", "mmoe.c"}}) == [("mmoe.a", "mmoe.b")]
