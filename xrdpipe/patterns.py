"""1D pattern readers (for data already integrated by DAWN, Dioptas, a Mythen...).

``read_pattern(path)`` returns ``(x, y, esd)``; ``esd`` is None when the file has no third
column. Text formats: .xy .xye .dat .chi (header lines that are not numbers are skipped);
GSAS .fxye (``BANK ... FXYE``/``FXY``: 2θ in centidegrees).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import PatternReadError

__all__ = ["read_pattern", "PATTERN_SUFFIXES", "write_xye"]

PATTERN_SUFFIXES = {".xy", ".xye", ".dat", ".chi", ".txt", ".csv", ".fxye", ".gsa", ".gsas"}


def _numeric_rows(lines: list[str], path: Path) -> np.ndarray:
    rows = []
    for n, line in enumerate(lines, start=1):
        s = line.strip()
        if not s or s[0] in "#!;%'\"":
            continue
        parts = s.replace(",", " ").split()
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            if rows:  # text after data: a broken file, not a header
                raise PatternReadError(str(path), f"line {n} is not numeric: {s[:60]!r}") from None
            continue
        rows.append(vals)
    if not rows:
        raise PatternReadError(str(path), "no numeric data found")
    width = min(len(r) for r in rows)
    if width < 2:
        raise PatternReadError(str(path), "expected at least two columns (x, intensity)")
    return np.array([r[:3] for r in rows if len(r) >= width], dtype=float)[:, : min(width, 3)]


def _read_gsas(path: Path, lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    for i, line in enumerate(lines):
        if line.startswith("BANK"):
            fields = line.split()
            kind = fields[-1].upper() if fields else ""
            if kind not in ("FXYE", "FXY"):
                raise PatternReadError(str(path), f"GSAS bank type {kind!r} not supported (FXYE or FXY)")
            data = _numeric_rows(lines[i + 1:], path)
            x = data[:, 0] / 100.0  # centidegrees
            return x, data[:, 1], (data[:, 2] if data.shape[1] > 2 and kind == "FXYE" else None)
    raise PatternReadError(str(path), "no BANK line: not a GSAS .fxye file")


def read_pattern(path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read one 1D pattern.

    Raises
    ------
    PatternReadError
        Unreadable file, no numeric data, or a non-increasing x column.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise PatternReadError(str(path), f"cannot read: {exc}") from None
    if path.suffix.lower() in (".fxye", ".gsa", ".gsas") or any(l.startswith("BANK") for l in lines[:50]):
        x, y, e = _read_gsas(path, lines)
    else:
        data = _numeric_rows(lines, path)
        x, y = data[:, 0], data[:, 1]
        e = data[:, 2] if data.shape[1] > 2 else None
    if x.size < 2 or np.any(np.diff(x) <= 0):
        raise PatternReadError(str(path), "the x column must increase strictly")
    if not np.all(np.isfinite(y)):
        raise PatternReadError(str(path), "intensity column has non-finite values")
    return x, y, e


def write_xye(path: Path | str, x: np.ndarray, y: np.ndarray, e: np.ndarray | None = None,
              *, header: str = "") -> None:
    """Write a pattern as whitespace-separated x y [esd] columns."""
    cols = [x, y] if e is None else [x, y, e]
    np.savetxt(path, np.column_stack(cols), fmt="%.6f" if e is None else ["%.6f", "%.6f", "%.6f"],
               header=header)
