"""Code shape rules that keep mmoe easy to read and call: no function takes more than six positional parameters
(past that, call sites become a row of bare values; use keyword-only parameters or a small dataclass)."""

from __future__ import annotations

import ast
from pathlib import Path

import mmoe

PKG = Path(mmoe.__file__).parent
REPO = PKG.parent
MAX_POSITIONAL = 6


def _long_signatures(path: Path, limit: int = MAX_POSITIONAL) -> list[str]:
    """'name (line N): k positional' for every function in `path` with more than `limit` positional parameters;
    a leading self / cls does not count, keyword-only parameters (after `*`) and *args / **kwargs do not either."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = [a.arg for a in node.args.posonlyargs + node.args.args]
        if names and names[0] in ("self", "cls"):
            names = names[1:]
        if len(names) > limit:
            found.append(f"{node.name} (line {node.lineno}): {len(names)} positional")
    return found


def test_no_mmoe_function_takes_more_than_six_positional_parameters():
    sources = sorted(PKG.rglob("*.py"))
    assert len(sources) > 50  # the walk sees the package
    offenders = {str(f.relative_to(REPO)): bad for f in sources if (bad := _long_signatures(f))}
    assert not offenders, offenders


def test_the_signature_checker_counts_positional_parameters_only(tmp_path):
    src = tmp_path / "shapes.py"
    src.write_text(
        "def six(a, b, c, d, e, f=1): pass\n"
        "def seven(a, b, c, d, e, f, g=1): pass\n"
        "def posonly(a, b, c, d, /, e, f, g): pass\n"
        "def kwonly(a, b, c, *, d, e, f, g, h): pass\n"
        "def star(a, b, *args, **kwargs): pass\n"
        "class C:\n"
        "    def method(self, a, b, c, d, e, f): pass\n"
        "    def long_method(self, a, b, c, d, e, f, g): pass\n"
        "    @classmethod\n"
        "    def build(cls, a, b, c, d, e, f): pass\n"
        "    async def fetch(self, a, b, c, d, e, f, g, h): pass\n"
    )
    found = _long_signatures(src)
    assert [s.split(" ")[0] for s in found] == ["seven", "posonly", "long_method", "fetch"]
    assert "fetch (line 11): 8 positional" in found
