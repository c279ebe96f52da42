"""Imports go one way: the bottom layers never import the upper ones."""

import ast
from pathlib import Path

import xrdpipe

RANK = {"errors": 0, "crystallography": 0, "lineshapes": 0, "batchfit": 0, "phases": 0, "composition": 0, "safeio": 0, "parallel": 0, "integrator_cache": 0, "kernels": 0, "refine": 1, "config": 1, "cyclers": 1, "echem": 3, "frames": 2, "patterns": 2, "calibration": 2,
        "store": 3, "integration": 3, "testing": 3, "windows": 3, "peaks": 3, "phasefit": 3, "lattice": 3, "pipeline": 4, "refining": 4,
        "plots": 4, "export": 4, "geometry_fit": 5, "workflow": 5, "watch": 5, "cli": 6, "__main__": 7, "_forkserver": 4}


def test_imports_go_one_way():
    pkg = Path(xrdpipe.__file__).parent
    for path in pkg.glob("*.py"):
        if path.stem == "__init__":
            continue
        assert path.stem in RANK, f"add {path.stem} to RANK"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                target = node.module.split(".")[0]
                assert RANK[target] <= RANK[path.stem], f"{path.stem} imports {target}"


def test_pyfai_only_at_its_seams():
    pkg = Path(xrdpipe.__file__).parent
    users = {p.stem for p in pkg.glob("*.py") if "import pyFAI" in p.read_text()}
    assert users <= {"calibration", "geometry_fit", "integration", "testing"}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_lmfit_only_in_peaks():
    pkg = Path(xrdpipe.__file__).parent
    users = {p.stem for p in pkg.glob("*.py") if "lmfit" in _imports(p)}
    assert users == {"peaks"}
