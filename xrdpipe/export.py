"""Every integrated pattern in the text formats other programs read, so that a user can refine
elsewhere (GSAS-II, TOPAS, FullProf, Jana...).

- ``xye``: ``x y esd`` columns in the run's radial unit, with a ``#`` header (run, frame, time,
  wavelength, unit, x and voltage when known).
- ``fxye``: GSAS ``FXYE`` (one bank; 2θ in centidegrees, intensity, esd), read by GSAS-II and
  GSAS; with one GSAS-II instrument parameter file (``.instprm``: type, wavelength, polarization)
  for the whole run.
- ``topas``: TOPAS ``.xye``, purely numeric ``2θ y esd`` (TOPAS takes no header line).

NaN points (masked, outside the detector) are left out. A point without an esd (patterns
integrated with ``error_model = "none"``) gets the counting esd ``sqrt(max(y, 1))``, and the
header says so. An ``index.csv`` lists every file written with its frame, time, x and voltage,
for sequential refinements.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .crystallography import convert_radial
from .errors import StoreError
from .safeio import write_text_atomic
from .tables import csv_number, write_csv

__all__ = ["export_patterns", "ExportSource", "ExportResult", "write_fxye", "write_instprm", "gsas2_profile", "EXPORT_SUFFIX"]

EXPORT_SUFFIX = {"xye": ".xye", "fxye": ".fxye", "topas": ".xye"}
_FOLDER = {"xye": "xye", "fxye": "gsas2", "topas": "topas"}
INDEX_COLUMNS = ("frame", "time_s", "time", "x", "voltage_V", "format", "file", "source")


@dataclass
class ExportResult:
    """What an export wrote."""

    folder: Path
    files: dict[str, int] = field(default_factory=dict)   # format -> number of files
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why not written
    index: Path | None = None
    instprm: Path | None = None
    frames: int = 0
    kept: int = 0                                           # files already up to date, not rewritten
    not_integrated: list[int] = field(default_factory=list)   # asked for, but pending or failed
    empty: list[int] = field(default_factory=list)            # integrated, but no valid point: not written

    def __str__(self) -> str:
        parts = [f"{n} {fmt}" for fmt, n in self.files.items()]
        lines = [f"exported {self.frames} pattern(s) as " + (", ".join(parts) or "nothing") + f" in {self.folder}"
                 + (f" ({self.kept} file(s) already up to date)" if self.kept else "")]
        lines += [f"  {fmt} not written: {why}" for fmt, why in self.skipped.items()]
        if self.not_integrated:
            shown = ", ".join(map(str, self.not_integrated[:10])) + (" ..." if len(self.not_integrated) > 10 else "")
            lines.append(f"  frame(s) not integrated, so not exported: {shown}")
        if self.empty:
            shown = ", ".join(map(str, self.empty[:10])) + (" ..." if len(self.empty) > 10 else "")
            lines.append(f"  frame(s) with an empty pattern (no valid point), not exported: {shown}")
        return "\n".join(lines)


def _columns(x: np.ndarray, y: np.ndarray, e: np.ndarray, fmt: str) -> str:
    return "".join(fmt % row for row in zip(x, y, e))


def write_fxye(path: Path | str, tth_deg: np.ndarray, y: np.ndarray, esd: np.ndarray, *, title: str,
               instprm: str | None = None) -> Path:
    """A GSAS ``FXYE`` file of one bank: 2θ in centidegrees, intensity and esd per line."""
    path = Path(path)
    n = tth_deg.size
    if n == 0:
        raise ValueError(f"{path}: an empty pattern (no valid point) has no FXYE file")
    step = float(np.median(np.diff(tth_deg))) if n > 1 else 0.0
    head = [title[:80]]
    if instprm:
        head.append(f"Instrument parameter file:{instprm}")
    head.append(f"BANK 1 {n} {n} CONS {tth_deg[0] * 100:.5f} {step * 100:.7f} 0 0 FXYE")
    write_text_atomic(path, "\n".join(head) + "\n" + _columns(tth_deg * 100, y, esd, "%15.6f %15.6f %15.6f\n"))
    return path


def gsas2_profile(profile: dict[str, float]) -> dict[str, float]:
    """xrdpipe's Thompson-Cox-Hastings widths (U, V, W: Gaussian FWHM² in deg²; X tan θ +
    Y / cos θ: Lorentzian FWHM in deg) as GSAS-II's (U, V, W: Gaussian *variance* in centideg²,
    FWHM² / (8 ln 2); X / cos θ + Y tan θ in centideg: GSAS-II's X is xrdpipe's Y and the
    other way round)."""
    k = 1e4 / (8 * np.log(2))
    return {"U": profile.get("U", 0.0) * k, "V": profile.get("V", 0.0) * k, "W": profile.get("W", 0.0) * k,
            "X": profile.get("Y", 0.0) * 100, "Y": profile.get("X", 0.0) * 100}


def write_instprm(path: Path | str, *, wavelength_A: float, polarization: float | None = None,
                  zero_deg: float = 0.0, profile: dict[str, float] | None = None) -> Path:
    """A GSAS-II instrument parameter file for a constant-wavelength X-ray pattern.
    ``polarization``: GSAS-II's ``Polariz.``, the fraction of the beam polarized in the
    horizontal plane (0.99 at a synchrotron, the default; 1.0 applies no correction: give it
    when pyFAI has already corrected the polarization). ``profile``: xrdpipe's refined U, V,
    W, X, Y (see :func:`gsas2_profile`), else GSAS-II's defaults; SH/L is GSAS-II's default
    (xrdpipe's asymmetry is Bérar-Baldinozzi's, which GSAS-II has not). ``zero_deg``: the zero
    shift, same sign in both programs (2θ = 2θ_Bragg + Zero)."""
    path = Path(path)
    pol = 0.99 if polarization is None else polarization
    g = gsas2_profile(profile) if profile else {"U": 2.0, "V": -2.0, "W": 5.0, "X": 0.0, "Y": 0.0}
    lines = ["#GSAS-II instrument parameter file; do not add/delete items!", "Type:PXC", "Bank:1.0",
             f"Lam:{wavelength_A:.6f}", f"Polariz.:{pol:.4f}", "Azimuth:0.0", f"Zero:{zero_deg:.5f}",
             *[f"{k}:{g[k]:.6g}" for k in "UVWXY"], "Z:0.0", "SH/L:0.002"]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class ExportSource:
    """What an export needs of a run: its name, axis and per-frame labels (one entry per frame)
    and ``read_block(rows) -> (intensity, esd)``, which reads the patterns of some frames (so
    that thousands of frames are never in memory at once). Made by the run layer
    (:func:`xrdpipe.run.output.export_run_file`)."""

    name: str
    radial: np.ndarray
    unit: str
    wavelength_A: float | None
    done: np.ndarray             # bool per frame: integrated
    time_s: np.ndarray
    key: np.ndarray
    start: np.ndarray
    end: np.ndarray
    x: np.ndarray                # NaN where unknown
    voltage_V: np.ndarray
    fingerprint: dict
    read_block: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    where: str = "the run"       # for messages: the run file


def export_patterns(run: ExportSource, folder: Path | str, *, formats: Sequence[str] = ("xye", "fxye", "topas"),
                    frames: Sequence[int] | None = None, polarization: float | None = None,
                    progress: bool = False, block: int = 256, profile: dict[str, float] | None = None,
                    zero_deg: float = 0.0) -> ExportResult:
    """Write the integrated frames of ``run`` (all, or ``frames``) into ``folder``: one
    sub-folder per format (``xye/``, ``gsas2/``, ``topas/``) and ``index.csv``.

    Example
    -------
    >>> export_patterns(source, "results/export", formats=["fxye"])   # doctest: +SKIP
    """
    from tqdm import tqdm

    folder = Path(folder)
    result = ExportResult(folder)
    rows = _rows(run, frames, result)
    tth = run.radial if run.unit == "2th_deg" else (
        convert_radial(run.radial, run.unit, "2th_deg", run.wavelength_A) if run.wavelength_A else None)
    todo = []
    for fmt in formats:
        if fmt in ("fxye", "topas") and tth is None:
            result.skipped[fmt] = "the run is in Q and has no wavelength, so 2θ is unknown"
            continue
        (folder / _FOLDER[fmt]).mkdir(parents=True, exist_ok=True)
        result.files[fmt] = 0
        todo.append(fmt)
    if "fxye" in todo:
        result.instprm = write_instprm(folder / _FOLDER["fxye"] / f"{run.name}.instprm", wavelength_A=run.wavelength_A,
                                       polarization=polarization, profile=profile, zero_deg=zero_deg)
    index: list[dict] = []
    source = hashlib.sha1(json.dumps(run.fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    before = _previous_index(folder / "index.csv")
    bar = tqdm(total=int(rows.size), desc="export", unit="frame", disable=not progress or rows.size == 0, leave=False)
    try:
        for b in range(0, rows.size, block):
            chunk = rows[b:b + block]
            inten, sigma = run.read_block(chunk)
            for k, f in enumerate(chunk):
                _export_frame(run, int(f), inten[k].astype(float), sigma[k].astype(float), tth, folder, todo,
                              source, before, index, result)
                bar.update(1)
    finally:
        bar.close()
    result.frames = int(rows.size) - len(result.empty)
    result.index = write_csv(folder / "index.csv", INDEX_COLUMNS, index)
    return result


def _rows(run: ExportSource, frames: Sequence[int] | None, result: ExportResult) -> np.ndarray:
    """The integrated frames to export (``frames``, else all); the others asked for go to ``result``."""
    done = np.asarray(run.done, bool)
    if frames is None:
        return np.flatnonzero(done)
    asked = np.unique(np.asarray(frames, int))
    outside = asked[(asked < 0) | (asked >= done.size)]
    if outside.size:
        raise StoreError(f"{run.where} has frames 0 to {done.size - 1}; there is no frame {int(outside[0])} "
                         "to export")
    result.not_integrated = [int(f) for f in asked[~done[asked]]]
    return asked[done[asked]]


def _export_frame(run: ExportSource, f: int, y: np.ndarray, e: np.ndarray, tth, folder: Path, todo: list[str],
                  source: str, before: dict, index: list[dict], result: ExportResult) -> None:
    """One frame in every format of ``todo`` (a file already as it would be written is left alone)."""
    ok = np.isfinite(y)
    if not ok.any():                      # nothing to write in any format
        result.empty.append(f)
        return
    counted = ok & ~(np.isfinite(e) & (e > 0))
    e = np.where(counted, np.sqrt(np.maximum(y, 1.0)), e)
    stem = f"{run.name}_{f:0{max(5, len(str(len(run.done) - 1)))}d}"
    start, end = run.start[f], run.end[f]
    when = {"frame": f, "time_s": csv_number(run.time_s[f]), "time": _middle(start, end) if start and end else "",
            "x": csv_number(run.x[f]), "voltage_V": csv_number(run.voltage_V[f])}
    for fmt in todo:
        path = folder / _FOLDER[fmt] / (stem + EXPORT_SUFFIX[fmt])
        row = {**when, "format": fmt, "file": str(path.relative_to(folder)), "source": source}
        result.files[fmt] += 1
        index.append(row)
        if before.get((row["frame"], fmt)) == row and path.exists():
            result.kept += 1               # same pattern, same time, x and V: as written
            continue
        if fmt == "xye":
            head = _xye_header(run.name, f, run.time_s[f], run.key[f], run.unit, run.wavelength_A, run.x[f],
                               run.voltage_V[f], counted.any())
            write_text_atomic(path, head + _columns(run.radial[ok], y[ok], e[ok], "%.6f %.6f %.6f\n"))
        elif fmt == "fxye":
            write_fxye(path, tth[ok], y[ok], e[ok], title=f"{run.name} frame {f} ({run.key[f]})",
                       instprm=f"{run.name}.instprm")
        else:
            write_text_atomic(path, _columns(tth[ok], y[ok], e[ok], "%.6f %.6f %.6f\n"))


def _previous_index(path: Path) -> dict[tuple[int, str], dict[str, object]]:
    """The rows of an earlier ``index.csv`` by (frame, format), to leave up-to-date files alone."""
    import csv

    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return {}
    out = {}
    for r in rows:
        try:
            out[(int(r["frame"]), r["format"])] = {**r, "frame": int(r["frame"])}
        except (KeyError, ValueError):
            return {}
    return out


def _middle(start: str, end: str) -> str:
    from datetime import datetime

    a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
    return (a + (b - a) / 2).isoformat()


def _xye_header(name, f, time_s, key, unit, wl, x, volt, counted: bool) -> str:
    axis = "2theta_deg" if unit == "2th_deg" else "q_A^-1"
    lines = [f"xrdpipe run {name}, frame {int(f)} ({key})", f"columns: {axis} intensity esd"]
    if wl:
        lines.append(f"wavelength_A: {wl:.6f}")
    if np.isfinite(time_s):
        lines.append(f"time_s: {time_s:.3f} (middle of the exposure, from the first frame's start)")
    if np.isfinite(x):
        lines.append(f"x: {x:.5f}")
    if np.isfinite(volt):
        lines.append(f"voltage_V: {volt:.5f}")
    if counted:
        lines.append("esd: sqrt(max(y, 1)) where the run file has none")
    return "".join(f"# {line}\n" for line in lines)
