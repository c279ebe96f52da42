"""Shared by the tests that run a synthetic O3/P3 experiment end to end: its truth, and its cells
and fractions checked against it with the crystallography issue's tolerances."""

from __future__ import annotations

import csv
from pathlib import Path


def read_truth(folder: Path) -> dict[int, dict[str, dict[str, str]]]:
    """truth.csv of a synthetic experiment: frame -> phase -> row."""
    out: dict[int, dict[str, dict[str, str]]] = {}
    for r in csv.DictReader(open(Path(folder) / "truth.csv")):
        out.setdefault(int(r["frame"]), {})[r["phase"]] = r
    return out


def assert_lattice_row(row: dict[str, str], truth: dict[str, str] | None, where) -> None:
    """A lattice.csv row against the truth of its phase in its frame (None: absent there):
    a within 2e-4 Å, c within 3e-3 Å, fraction within 0.03; an absent phase has no cell."""
    if truth is not None:
        assert abs(float(row["a_A"]) - float(truth["a"])) < 2e-4, where
        assert abs(float(row["c_A"]) - float(truth["c"])) < 3e-3, where
        assert abs(float(row["fraction"]) - float(truth["fraction"])) < 0.03, where
    else:
        assert row["a_A"] == "" and float(row["fraction"] or 0) < 0.03, where
