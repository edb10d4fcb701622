"""The layers hold: the engine, placement, store, gates and shared spec code are
transport-free, the store is free of protobuf, and a node needs nothing of the coordinator.
Read from the sources (ast), following imports through Shoal's own modules."""

from __future__ import annotations

import ast
from collections.abc import Collection
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {  # as pyproject.toml's package-dir maps them
    "shoal.coordinator": ROOT / "coordinator",
    "shoal.node": ROOT / "node",
    "shoal": ROOT / "clients" / "python" / "shoal",
}
GENERATED = "shoal.v1"  # protobuf and grpc stubs: their own imports are not followed

ENGINE = "shoal.coordinator.engine"
PLACEMENT = "shoal.coordinator.placement"
STORE = "shoal.coordinator.store"
GATES = "shoal.coordinator.gates"
SHARED_SPEC = ["shoal.specs", "shoal.validation", "shoal.spec_checks", "shoal.templates"]

# Known edges that break a rule today, each to be removed with the import it names (the test
# fails once the import is gone, so the exception cannot outlive it).
KNOWN: set[tuple[str, str]] = set()


def _file(module: str) -> Path | None:
    """The source of one of Shoal's modules (a package's __init__.py); None for any other."""
    for prefix, folder in PACKAGE_DIRS.items():
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) :].lstrip(".")
            base = folder.joinpath(*rest.split(".")) if rest else folder
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    return path
            return None
    return None


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under `if TYPE_CHECKING:` (never run)."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.body:
                skipped.update(ast.walk(child))
    return skipped


@cache
def imports(module: str) -> frozenset[str]:
    """The modules `module`'s source names in import statements (in functions too)."""
    path = _file(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from package import submodule` imports the submodule.
            found.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if _file(f"{node.module}.{a.name}") is not None
            )
    return frozenset(found)


def modules_of(package: str) -> list[str]:
    """`package` and every module under it."""
    init = _file(package)
    assert init is not None, f"{package} is gone: update this test"
    if init.name != "__init__.py":
        return [package]
    return [package] + [
        f"{package}.{'.'.join(p.relative_to(init.parent).with_suffix('').parts)}"
        for p in sorted(init.parent.rglob("*.py"))
        if p.name != "__init__.py"
    ]


def reached(roots: list[str], skip: Collection[tuple[str, str]] = ()) -> dict[str, str]:
    """Every module `roots` import, directly or through Shoal's modules: {module: importer}."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module.startswith(GENERATED + ".") and module != GENERATED:
            continue
        for name in imports(module):
            if (module, name) in skip or name in seen:
                continue
            seen[name] = module
            todo.append(name)
    return seen


def _grpc(module: str) -> bool:
    return module == "grpc" or module.startswith(("grpc.", "grpc_")) or module.endswith("_grpc")


def _protobuf(module: str) -> bool:
    return (
        module.startswith("google.protobuf")
        or module == GENERATED
        or module.startswith(GENERATED + ".")
    )


def _chain(found: dict[str, str], module: str, roots: list[str]) -> str:
    chain = [module]
    while chain[-1] not in roots and chain[-1] in found:
        chain.append(found[chain[-1]])
    return " <- ".join(chain)


def test_the_known_exceptions_still_exist() -> None:
    for importer, imported in KNOWN:
        assert imported in imports(importer), f"{importer} no longer imports {imported}: drop it"


def test_engine_placement_gates_store_and_shared_spec_code_import_no_grpc() -> None:
    roots = (
        modules_of(ENGINE)
        + modules_of(PLACEMENT)
        + modules_of(STORE)
        + modules_of(GATES)
        + SHARED_SPEC
    )
    assert len(roots) > 25
    found = reached(roots)
    assert [_chain(found, m, roots) for m in found if _grpc(m)] == []


def test_the_store_imports_no_protobuf() -> None:
    roots = modules_of(STORE)
    direct = {m for r in roots for m in imports(r)}
    assert not {m for m in direct if _protobuf(m)}
    found = reached(roots, KNOWN)
    assert [_chain(found, m, roots) for m in found if _protobuf(m)] == []


def test_the_node_imports_nothing_of_the_coordinator() -> None:
    roots = modules_of("shoal.node")
    assert len(roots) > 10
    found = reached(roots)
    coordinator = [m for m in found if m.startswith("shoal.coordinator")]
    assert [_chain(found, m, roots) for m in coordinator] == []


def test_the_reader_follows_imports() -> None:
    # The rules above pass vacuously if imports are not read: pin what is known to be there.
    assert "grpc" in imports("shoal.coordinator.api.gateway")
    assert "shoal.coordinator.store.sqlite" in imports("shoal.coordinator.store")
    found = reached(["shoal.coordinator.engine"])
    assert {"shoal.coordinator.placement.scheduler", "shoal.v1.task_pb2", "shoal.specs"} <= set(
        found
    )
