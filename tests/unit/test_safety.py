"""No product code deserialises with pickle or marshal, evaluates strings, or loads unsafe YAML."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "clients" / "python" / "shoal", ROOT / "coordinator", ROOT / "node"]
GENERATED = ROOT / "clients" / "python" / "shoal" / "v1"
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}


def _sources() -> list[Path]:
    files = [p for d in PRODUCT for p in d.rglob("*.py") if GENERATED not in p.parents]
    assert len(files) > 20, "the product tree moved: update PRODUCT"
    return files


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "") in BANNED_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in BANNED_CALLS:
                found.append(f"{where} calls {fn.id}()")
            elif (
                isinstance(fn, ast.Attribute)
                and fn.attr in ("load", "load_all", "unsafe_load")
                and isinstance(fn.value, ast.Name)
                and fn.value.id == "yaml"
            ):
                found.append(f"{where} calls yaml.{fn.attr}() (use yaml.safe_load)")
    return found


def test_no_unsafe_deserialisation_or_evaluation_in_product_code() -> None:
    violations = [v for path in _sources() for v in _violations(path)]
    assert violations == []


def test_the_check_catches_what_it_bans(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom marshal import loads\nimport yaml\n"
        "eval('1')\nexec('x = 1')\nyaml.load('a: 1')\n"
    )
    found = _violations(bad, root=tmp_path)
    assert len(found) == 5, found
