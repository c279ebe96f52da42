"""Imports go one way: core -> stages -> run/ -> cli, with no cycle at any level (every import
counted, the ones inside functions too)."""

import ast
from pathlib import Path

import xrdpipe

PKG = Path(xrdpipe.__file__).parent

#: Top-level modules (core and stages): a module imports only modules of its rank or below.
RANK = {"errors": 0, "crystallography": 0, "lineshapes": 0, "batchfit": 0, "phases": 0, "composition": 0, "safeio": 0,
        "parallel": 0, "integrator_cache": 0, "kernels": 0, "tables": 0, "lmfit_models": 1,
        "refine": 1, "config": 1, "cyclers": 1,
        "frames": 2, "timing": 2, "patterns": 2, "calibration": 2,
        "echem": 3, "scaffold": 3, "integration": 3, "streaming": 3, "windows": 3, "peaks": 3, "phasefit": 3,
        "fractions": 3, "lattice": 3,
        "plots": 4, "export": 4, "report": 4, "geometry_fit": 5, "_forkserver": 4,
        # above the run layer: they drive it
        "testing": 8, "cli": 9, "__main__": 10}

def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to ``xrdpipe`` (``run.store``)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in it (function-level ones included)."""
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif (node.module or "").split(".")[0] == "xrdpipe":
                base = []
            else:
                continue
            mod = [*base, *(node.module.split(".") if node.module else [])]
            if mod and mod[0] == "xrdpipe" and not node.level:
                mod = mod[1:]
            target = ".".join(mod)
            subs = {f"{target}.{a.name}" if target else a.name for a in node.names}
            found = subs & set(MODULES)
            out |= found or ({target} if target in MODULES else set())
        elif isinstance(node, ast.Import):
            out |= {a.name[len("xrdpipe."):] for a in node.names if a.name.startswith("xrdpipe.")}
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_layers():
    """With run/ (and what belongs to it) one node, and every other package one node: run ->
    stages -> core, and back never."""
    layers: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        layers.setdefault(_top(name), set()).update(_top(d) for d in deps if _top(d) != _top(name))
    assert _cycles(layers) == []


def _top(name: str) -> str:
    """A module's place in RANK: its own name, or its package's (``refine.model`` -> ``refine``)."""
    return name.split(".")[0]


def test_every_module_is_placed():
    for name in MODULES:
        if _top(name) != "run":
            assert _top(name) in RANK, f"add {_top(name)} to RANK"


def test_imports_go_one_way():
    for name, deps in GRAPH.items():
        top = _top(name)
        if top == "run":
            continue
        for target in deps:
            if _top(target) == "run":
                # the stage modules never import the store or the run layer: only the modules
                # above it (testing, cli: rank >= 8) do
                assert RANK[top] >= 8, f"{name} imports {target}: only run/ knows the run file"
            else:
                assert RANK[_top(target)] <= RANK[top], f"{name} imports {target}"


def test_the_run_layer_imports_only_itself_and_below():
    for name, deps in GRAPH.items():
        if _top(name) == "run":
            for target in deps:
                assert _top(target) == "run" or RANK[_top(target)] < 8, f"{name} imports {target}"


def test_pyfai_only_at_its_seams():
    users = {_top(name) for name, path in MODULES.items() if "import pyFAI" in path.read_text()}
    assert users <= {"calibration", "geometry_fit", "integration", "testing"}


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_lmfit_imported_in_one_module():
    users = {name for name, path in MODULES.items() if "lmfit" in _third_party(path)}
    assert users == {"lmfit_models"}


def test_the_walk_sees_function_level_imports():
    """The graph holds imports inside functions (the ones that hid cycles before)."""
    assert "lmfit_models" in GRAPH["windows"]          # WindowModel.lmfit_model imports it inside
    assert "phasefit" in GRAPH["run.fit"] and "lattice" in GRAPH["run.lattice"]   # inside the runners
