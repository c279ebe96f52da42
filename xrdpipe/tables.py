"""CSV tables written atomically, and the names of the per-peak quantities every table and the run
file share. Pure helpers: no stage knows where its table goes; the run layer says."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["write_csv", "csv_number", "PEAK_ARRAYS"]

#: The per-peak quantities of a fit (frame x peak arrays in the run file, columns of peaks.csv).
PEAK_ARRAYS = ("center", "center_err", "fwhm", "fwhm_err", "fwhm_left", "fwhm_right", "shape", "shape_err",
               "area", "area_err", "height", "d_A", "d_err_A")


def write_csv(path: Path | str, columns: Sequence[str], rows) -> Path:
    """Write dict rows to a CSV file atomically (a reader never sees half a file)."""
    import csv

    from .safeio import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


def csv_number(v) -> str:
    """A number for a CSV cell: empty when not finite, else 10 significant digits."""
    v = float(v)
    return "" if not np.isfinite(v) else f"{v:.10g}"


