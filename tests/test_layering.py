"""The import graph of the shipped code: one dependency direction and no cycle.

Layers, bottom up: the core (``deqcore``) <- backends (``deqcore_torch``, ``deqcore_jax`` and the
backend plugins) <- plugins <- models and applications (``deqcore_models``). A module may import
from its own layer and the layers below it, never from above. Within the code, no module may
reach itself again through imports, lazy imports inside functions included (they are
dependencies all the same, only deferred). Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: top-level package -> (source folder, layer); higher layers may import lower ones
PACKAGES = {
    "deqcore": (ROOT / "deqcore", 0),
    "deqcore_torch": (ROOT / "backends" / "deqcore_torch", 1),
    "deqcore_jax": (ROOT / "backends" / "deqcore_jax", 1),
    **{path.name: (path, 2) for path in sorted(ROOT.glob("plugins/*/src/*")) if path.is_dir()},
    "deqcore_models": (ROOT / "models" / "deqcore_models", 3),
}
LAYER_NAMES = {0: "core", 1: "backends", 2: "plugins", 3: "models and applications"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, (folder, _) in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` for every import in the file, resolved to a module of ``MODULES`` where
    it names one (``from .x import y`` is ``x.y`` when that is a module, else ``x``)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _ in _imports(name, path) if target in MODULES and target != name}
    return graph


def test_every_package_is_read():
    assert {"deqcore._solve", "deqcore_torch._backend", "deqcore_jax._backend"} <= set(MODULES)
    assert any(name.startswith("deqcore_models.") for name in MODULES)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_imports_a_layer_above_its_own(package):
    folder, layer = PACKAGES[package]
    upward = []
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        for target, line in _imports(name, path):
            top = target.split(".")[0]
            if top in PACKAGES and top != package and PACKAGES[top][1] >= layer:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                              f"({LAYER_NAMES[PACKAGES[top][1]]})")
    upward = list(dict.fromkeys(upward))
    assert not upward, f"{package} ({LAYER_NAMES[layer]}) imports sideways or upward:\n" + "\n".join(upward)


def test_only_the_core_imports_its_private_modules():
    """Sister packages use the core's namespaces (deqcore, .extend, .internal, .testing, ...)."""
    private = []
    for name, path in MODULES.items():
        if name.split(".")[0] == "deqcore":
            continue
        for target, line in _imports(name, path):
            parts = target.split(".")
            if parts[0] == "deqcore" and any(p.startswith("_") for p in parts[1:]):
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not private, "imports of deqcore's private modules:\n" + "\n".join(private)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_cycles_and_upward_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "deqcore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def late():\n    from .a import thing\n    import deqcore_models.x\n")
    models = tmp_path / "deqcore_models"
    models.mkdir()
    (models / "__init__.py").write_text("")
    (models / "x.py").write_text("")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "PACKAGES", {"deqcore": (pkg, 0), "deqcore_models": (models, 3)})
    monkeypatch.setattr(here, "MODULES", _modules())
    monkeypatch.setattr(here, "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"deqcore.a -> deqcore.b -> deqcore.a"):
        test_the_import_graph_has_no_cycle()
    with pytest.raises(AssertionError, match=r"b.py:3 imports deqcore_models.x \(models and applications\)"):
        test_no_module_imports_a_layer_above_its_own("deqcore")
