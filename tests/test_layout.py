"""The package layout rules (issue 14), checked on the source with ``ast``.

* dependencies point one way: app / cli -> ui -> agent -> tools -> services -> stores -> models, data -> core
  (a module may import its own package and any lower layer; ``models`` and ``data`` are siblings
  and do not import each other);
* no import loops between modules;
* no module-level side effects on import (only imports, definitions, constant assignments and
  ``if TYPE_CHECKING`` blocks), except in the two entry points ``app.py`` and ``cli.py``;
* no function-local imports of project modules, except the optional heavy backends listed in
  :data:`LAZY_PROJECT_IMPORTS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "models", "data", "stores", "services", "tools", "agent", "ui")
ENTRY_POINTS = ("app", "cli")
#: layer of each package; an import may go to the same package or to a strictly lower layer
LAYER = {"core": 0, "models": 1, "data": 1, "stores": 2, "services": 3, "tools": 4, "agent": 5, "ui": 6,
         "app": 7, "cli": 7}
#: function-local imports of project modules that are allowed: optional heavy backends loaded only when chosen
#: (none are left: the agent's optional backends (agent.qwen2_vl, agent.openai_server) are loaded by
#: ``importlib.import_module`` from ``agent.models.BACKEND_MODULES`` when configured)
LAZY_PROJECT_IMPORTS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            parts = p.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    for name in ENTRY_POINTS:
        out[name] = REPO / f"{name}.py"
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _target(name: str) -> str | None:
    """The project module an imported name refers to (longest known prefix), or None."""
    parts = name.split(".")
    if parts[0] not in LAYER:
        return None
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


def _imports(tree: ast.Module):
    """Yield ``(target module, local: bool)`` for every project import outside ``if TYPE_CHECKING``."""

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    t = _target(a.name)
                    if t:
                        yield t, local
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = {_target(f"{child.module}.{a.name}") or _target(child.module) for a in child.names}
                for t in targets - {None}:
                    yield t, local
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, inner)

    yield from visit(tree, False)


EDGES: dict[str, set[str]] = {}
LOCAL: dict[str, set[str]] = {}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}
for _name, _tree in TREES.items():
    for _t, _local in _imports(_tree):
        if _t != _name:
            EDGES.setdefault(_name, set()).add(_t)
            if _local:
                LOCAL.setdefault(_name, set()).add(_t)


def _pkg(module: str) -> str:
    return module.split(".")[0]


def test_dependencies_point_one_way():
    bad = []
    for src, targets in EDGES.items():
        for dst in targets:
            a, b = _pkg(src), _pkg(dst)
            if a == b:
                continue
            if LAYER[b] >= LAYER[a]:
                bad.append(f"{src} -> {dst}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_loops():
    """Tarjan's strongly connected components over module imports: every component is one module."""
    index, low, stack, on, loops = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in EDGES.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            strong(v)
    assert not loops, f"import loops: {loops}"


def test_no_function_local_project_imports():
    found = {(src, dst) for src, dsts in LOCAL.items() for dst in dsts}
    assert found <= LAZY_PROJECT_IMPORTS, "function-local project imports:\n" + "\n".join(
        f"{s} -> {d}" for s, d in sorted(found - LAZY_PROJECT_IMPORTS))


_ALLOWED_TOP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                ast.Assign, ast.AnnAssign)


def _reads_environment(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv") and isinstance(n.value, ast.Name) \
                and n.value.id == "os":
            return True
    return False


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in ENTRY_POINTS))
def test_no_side_effects_on_import(name):
    """Only definitions and constants at module level; no environment reads or writes at import."""
    problems = []
    for i, node in enumerate(TREES[name].body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.If) and (_is_type_checking(node) or ast.unparse(node.test) == "__name__ == '__main__'"):
            continue  # type-only imports; a script's main block does not run on import
        if not isinstance(node, _ALLOWED_TOP):
            problems.append(f"line {node.lineno}: {type(node).__name__}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _reads_environment(node):
            problems.append(f"line {node.lineno}: reads os.environ at import")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_the_target_layout_is_in_place():
    for pkg in PACKAGES:
        assert (REPO / pkg / "__init__.py").is_file(), pkg
    for module in ("core.settings", "core.profiles", "core.catalog", "core.imageio", "core.types",
                   "models.patchcore.config", "models.patchcore.model", "models.patchcore.coreset",
                   "models.patchcore.calibration", "models.patchcore.anomaly_map", "models.backbones",
                   "models.embedders", "models.defect_descriptor", "stores.banks", "stores.image_index",
                   "stores.vector_store", "stores.blobstore", "stores.manual_store", "stores.history",
                   "stores.atomic", "services.container", "services.lock", "services.inspect", "services.search",
                   "services.manuals", "services.gallery", "services.products", "services.build",
                   "services.evaluate", "tools.anomaly_scoring", "agent.agents", "ui.chat", "ui.tabs"):
        assert module in MODULES, module
    assert (REPO / "data" / "taxonomy.json").is_file()
