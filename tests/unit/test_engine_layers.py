"""The coordinator's engine is layered one way and transport-free; its servicers are thin."""

from __future__ import annotations

import ast
from pathlib import Path

COORDINATOR = Path(__file__).resolve().parents[2] / "coordinator"
ENGINE = COORDINATOR / "engine"
PACKAGE = "shoal.coordinator.engine"
# Bottom to top: a module may import only those before it (the kernel knows dispatch only
# through its `kick` callback).
LAYERS = [
    "states",
    "lifecycle",
    "dispatch",
    "queries",
    "overview",
    "intake",
    "updates",
    "nodes",
    "clock",
    "recovery",
    "coordinator",
    "__init__",
]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return names


def test_every_engine_module_has_its_place_in_the_layers() -> None:
    assert sorted(p.stem for p in ENGINE.glob("*.py")) == sorted(LAYERS)


def test_engine_modules_import_only_the_layers_below_them() -> None:
    upward = []
    for layer, name in enumerate(LAYERS):
        for module in _imports(ENGINE / f"{name}.py"):
            if module.startswith(f"{PACKAGE}."):
                below = module.removeprefix(f"{PACKAGE}.")
                if below not in LAYERS[:layer]:
                    upward.append(f"{name} imports {below}")
    assert upward == []


def test_the_engine_never_imports_grpc_or_the_servicers() -> None:
    for path in ENGINE.glob("*.py"):
        for module in _imports(path):
            assert module.split(".")[0] != "grpc", f"{path.name} imports {module}"
            assert not module.startswith("shoal.coordinator.api"), f"{path.name} imports {module}"


def test_each_servicer_has_its_own_module_and_calls_only_the_facade() -> None:
    api = COORDINATOR / "api"
    for name in ("tasks", "admin", "locks", "gateway"):
        engine_imports = {m for m in _imports(api / f"{name}.py") if m.startswith(PACKAGE)}
        assert engine_imports == {PACKAGE}, f"api/{name}.py imports {engine_imports}"


def test_servicers_reach_the_engine_only_through_the_facade_methods() -> None:
    """`self._core.x(...)`, never `self._core.tokens.create(...)`: the façade is the contract.
    The event log is the exception: a watch's flow control reads it directly."""
    reached = []
    for path in (COORDINATOR / "api").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            inner = node.value
            if (
                isinstance(inner, ast.Attribute)
                and isinstance(inner.value, ast.Attribute)
                and inner.value.attr == "_core"
                and inner.attr != "events"
            ):
                reached.append(f"api/{path.name}:{node.lineno} _core.{inner.attr}.{node.attr}")
    assert reached == []
