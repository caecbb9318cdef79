"""The package's import graph, read with ast (nothing is imported): no cycle among module-level imports, and
module-level imports only go down the layers of docs/architecture.md. Imports inside functions ("deferred")
are how the code reaches upward today; they are listed by :func:`deferred_cycles`, not forbidden."""

import ast
from pathlib import Path


PKG = Path(__file__).resolve().parents[1] / "ddpm_curriculum"

# Layers of docs/architecture.md, by the first name under ddpm_curriculum. A module-level import goes to a
# lower layer, or stays in its own sub-package, or stays inside one of SAME_LAYER_OK.
LAYERS = {
    "errors": 0, "atomic": 0, "dist": 0, "sections": 0, "config": 0,  # foundations
    "data": 1, "diffusion": 1, "models": 1,  # components
    "metrics": 2, "sampling": 2, "hooks": 2,  # built on the components; hooks: the extension surface
    "training": 3, "pruning": 3, "sparsity": 3, "modes": 3,  # the trainer, its modes and their extensions
    "evaluation": 4, "experiments": 4, "bench": 4,  # applications
    "train": 5, "generate": 5, "evaluate": 5, "prune": 5,  # entry points (python -m ddpm_curriculum.X)
}
SAME_LAYER_OK = {0, 3}

# Cycles among module-level imports that exist and are accepted as debt (each a sorted tuple of module names).
# Empty: there are none. Add one only with a note here saying why and how it will be removed.
ALLOWED_TOP_LEVEL_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported package module, deferred, line) for every import of ``name``'s file that names a package
    module. Deferred: inside a function. ``if TYPE_CHECKING:`` blocks count as module level (stricter)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, deferred, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[:len(package) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                for a in child.names:  # from pkg import submodule names the submodule
                    found.append((f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod, deferred,
                                  child.lineno))
            visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return [(t, d, line) for t, d, line in found if t in MODULES and t != name]


def graph(deferred: bool, parents: bool = True) -> dict[str, set[str]]:
    """Module → imported modules: module-level imports only, or module-level and deferred ones. An import of
    ``a.b.c`` also runs ``a.b``'s ``__init__`` first (unless the importer is inside ``a.b``): with ``parents``
    an edge too."""
    out = {}
    for name in MODULES:
        targets = set()
        for target, is_deferred, _ in imports(name):
            if is_deferred and not deferred:
                continue
            targets.add(target)
            parts = target.split(".") if parents else []
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if name != parent and not name.startswith(parent + "."):
                    targets.add(parent)
        out[name] = targets
    return out


def cycles(g: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    result.append(tuple(sorted(component)))
    return sorted(result)


def deferred_cycles() -> list[tuple[str, ...]]:
    """Cycles between modules that exist only through deferred imports (debt: see docs/architecture.md).
    Direct edges only: with the package ``__init__`` edges every deferred ``from ..training import x`` would
    merge most of the package into one component."""
    return cycles(graph(deferred=True, parents=False))


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]] if "." in module else -1


def test_every_sub_package_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} == set(LAYERS)


def test_no_new_cycle_among_module_level_imports():
    found = set(cycles(graph(deferred=False)))
    assert found <= ALLOWED_TOP_LEVEL_CYCLES, f"new import cycle(s): {sorted(found - ALLOWED_TOP_LEVEL_CYCLES)}"
    gone = ALLOWED_TOP_LEVEL_CYCLES - found
    assert not gone, f"allowed cycle(s) no longer exist; remove them from ALLOWED_TOP_LEVEL_CYCLES: {gone}"


def test_module_level_imports_go_down_the_layers():
    bad = []
    for name in MODULES:
        for target, deferred, line in imports(name):
            same_unit = name.split(".")[:2] == target.split(".")[:2]
            a, b = layer(name), layer(target)
            if deferred or same_unit or b < a or (a == b and a in SAME_LAYER_OK) or name == "ddpm_curriculum":
                continue
            bad.append(f"{MODULES[name].relative_to(PKG.parent)}:{line} imports {target} (layer {a} -> {b})")
    assert not bad, "module-level import(s) against the layers (import inside the function instead, or move " \
                    "the code down):\n" + "\n".join(bad)


def test_the_graph_sees_deferred_imports_and_finds_a_planted_cycle():
    assert ("ddpm_curriculum.training.cli", True, 9) in imports("ddpm_curriculum.train")  # inside run()
    assert ("ddpm_curriculum.errors", False, 4) in imports("ddpm_curriculum.train")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert all(len(c) > 1 for c in deferred_cycles())


def test_test_modules_do_not_import_each_other():
    """Shared test code lives in tests/helpers.py (plain) and tests/conftest.py (fixtures)."""
    bad = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_"):
                bad.append(f"{path.name}:{node.lineno} imports {node.module}")
    assert not bad, "\n".join(bad)
