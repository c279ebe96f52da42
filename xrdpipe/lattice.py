"""Lattice parameters, phase fractions and layer geometry per frame, from fitted peaks.

For every frame and phase, the cell (a, c; also b, β for orthorhombic and monoclinic phases) is
refined by weighted least squares from the centres of all the phase's reflections found in that
frame, each weighted by its esd; the esds of the cell follow from the centre esds (not
rescaled). ``correction = "zero"`` adds a 2θ zero shift, ``"displacement"`` a sample-displacement
term (∝ cos θ), shared by the phases of the frame (``"auto"``, the default, adds none here). A cell parameter that no reflection sees (a,
when a phase shows only 00l peaks) is not refined: it is reported as NaN and flagged.

Phase fractions (``fraction``, ``area_fraction``, ``weight_fraction``, ``fraction_source``) come
from :mod:`xrdpipe.fractions`.

Example
-------
>>> lat = refine_lattice(peak_table, exp.phases, exp.lattice, unit="2th_deg", wavelength_A=0.6209)  # doctest: +SKIP
>>> lat.write_csv("results/lattice.csv")                                                            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares

from .config import LatticeSpec, PhaseSpec
from .crystallography import (
    CELL_PARAMETERS,
    cell_volume,
    crystal_system,
    d_spacing,
    q_from_d,
    q_from_tth,
    tth_from_d,
)
from .fractions import WeightFractions, choose_fractions, peak_fractions, phase_fractions
from .phases import GEOMETRY_KEYS, layer_geometry
from .tables import csv_number, write_csv

__all__ = ["LatticeTable", "WeightFractions", "refine_lattice", "trend", "phase_present", "LATTICE_COLUMNS", "LATTICE_FIELDS"]

#: The columns of lattice.csv (a public interface: extend, never rename).
LATTICE_COLUMNS = ("frame", "time_s", "voltage_V", "x", "phase", "a_A", "a_err_A", "c_A", "c_err_A", "volume_A3",
                   "fraction", "fraction_err", "b_A", "b_err_A", "beta_deg", "beta_err_deg", "volume_err_A3",
                   "n_reflections", "correction_deg", "correction_err_deg", *GEOMETRY_KEYS, "message",
                   "fraction_source", "area_fraction", "area_fraction_err", "weight_fraction", "weight_fraction_err",
                   "alpha_deg", "alpha_err_deg", "gamma_deg", "gamma_err_deg", "fraction_method", "presence")
#: Per (frame, phase) quantities.
LATTICE_FIELDS = ("a_A", "a_err_A", "b_A", "b_err_A", "c_A", "c_err_A", "beta_deg", "beta_err_deg", "volume_A3",
                  "volume_err_A3", "fraction", "fraction_err", "n_reflections", "correction_deg",
                  "correction_err_deg", *GEOMETRY_KEYS, "area_fraction", "area_fraction_err", "weight_fraction",
                  "weight_fraction_err", "alpha_deg", "alpha_err_deg", "gamma_deg", "gamma_err_deg")
_CELL = CELL_PARAMETERS
_KEYS = (("a", "a_A"), ("b", "b_A"), ("c", "c_A"), ("alpha", "alpha_deg"), ("beta", "beta_deg"), ("gamma", "gamma_deg"))


@dataclass
class LatticeTable:
    """Cells and fractions of n frames: ``values[field]`` (n, P) for the phases ``phases``,
    ``message`` and ``fraction_source`` (n, P: ``"peaks"``, ``"refinement"`` or ``""``);
    ``voltage_V`` and ``x`` stay NaN until the state of charge is known."""

    frame: np.ndarray
    time_s: np.ndarray
    phases: tuple[str, ...]
    values: dict[str, np.ndarray]
    message: np.ndarray
    voltage_V: np.ndarray | None = None
    x: np.ndarray | None = None
    fraction_source: np.ndarray | None = None
    fraction_method: np.ndarray | None = None
    presence: np.ndarray | None = None

    def column(self, name: str, phase: str) -> np.ndarray:
        """One phase's series, e.g. ``lat.column("c_A", "O3")``."""
        return self.values[name][:, self.phases.index(phase)]

    def rows(self):
        n = len(self.frame)
        volt = self.voltage_V if self.voltage_V is not None else np.full(n, np.nan)
        x = self.x if self.x is not None else np.full(n, np.nan)
        source = self.fraction_source if self.fraction_source is not None else np.full(self.message.shape, "")
        method = self.fraction_method if self.fraction_method is not None else np.full(self.message.shape, "")
        presence = self.presence if self.presence is not None else np.full(self.message.shape, "")
        for r in range(n):
            for i, phase in enumerate(self.phases):
                row = {"frame": int(self.frame[r]), "time_s": csv_number(self.time_s[r]), "voltage_V": csv_number(volt[r]),
                       "x": csv_number(x[r]), "phase": phase, "message": self.message[r, i] or "",
                       "fraction_source": source[r, i] or "", "fraction_method": method[r, i] or "",
                       "presence": presence[r, i] or ""}
                for name in LATTICE_FIELDS:
                    v = self.values[name][r, i]
                    row[name] = (str(int(v)) if name == "n_reflections" else csv_number(v))
                yield row

    def write_csv(self, path: Path | str) -> Path:
        """Write ``lattice.csv``: one row per frame and phase."""
        return write_csv(path, LATTICE_COLUMNS, self.rows())


# ----------------------------------------------------------------------------------------------
# one frame

def _columns_by_phase(table, phases: Sequence[PhaseSpec]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per phase: the peak-table columns of its reflections and their (h, k, l), parsed once."""
    from .crystallography import parse_hkl

    out = []
    for p in phases:
        cols = [i for i, (_, ph, _, _) in enumerate(table.peaks) if ph == p.name]
        hkl = np.array([parse_hkl(table.peaks[i][2]) for i in cols], float).reshape(-1, 3)
        out.append((np.array(cols, int), hkl))
    return out


def _observations(table, r: int, cols: np.ndarray, hkl: np.ndarray):
    """(hkl (k, 3), centre, esd) of one phase's reflections found in frame row ``r``."""
    c, e = table.values["center"][r, cols], table.values["center_err"][r, cols]
    use = table.present[r, cols] & np.isfinite(c) & np.isfinite(e) & (e > 0)
    return hkl[use], c[use], e[use]


def _identifiable(system: str, hkl: np.ndarray) -> list[str]:
    """Cell parameters that the reflections constrain."""
    h, k, l = hkl.T
    if system == "cubic":
        out = ["a"] if len(hkl) else []
    elif system in ("hexagonal", "tetragonal"):
        out = (["a"] if np.any((h != 0) | (k != 0)) else []) + (["c"] if np.any(l != 0) else [])
    else:
        out = [n for n, col in (("a", h), ("b", k), ("c", l)) if np.any(col != 0)]
        if system == "monoclinic" and np.any(h * l != 0) and {"a", "c"} <= set(out):
            out.append("beta")
        if system == "triclinic" and {"a", "b", "c"} <= set(out):
            out += [n for n, prod in (("alpha", k * l), ("beta", h * l), ("gamma", h * k)) if np.any(prod != 0)]
    return out


def _positions(specs: Sequence[PhaseSpec], obs, cells: list[dict], shift: float | None, *, unit: str,
               wavelength_A: float | None, correction: str) -> np.ndarray:
    """The peak positions (run's radial unit) of the observed reflections of every phase for the
    cells ``cells`` and (not None) the zero or displacement correction ``shift`` in degrees."""
    to_tth = unit == "2th_deg"
    out = []
    for p, spec in enumerate(specs):
        hkl = obs[p][0]
        if not len(hkl):
            continue
        cp = cells[p]
        d = d_spacing(spec.space_group, hkl[:, 0], hkl[:, 1], hkl[:, 2], cp["a"], cp["c"], cp.get("b"),
                      cp.get("beta"), cp.get("alpha"), cp.get("gamma"))
        if shift is not None:
            tth = tth_from_d(d, wavelength_A)
            tth = tth + shift * (np.cos(np.radians(tth) / 2) if correction == "displacement" else 1.0)
            out.append(tth if to_tth else q_from_tth(tth, wavelength_A))
        elif to_tth:
            out.append(tth_from_d(d, wavelength_A))
        else:
            out.append(q_from_d(d))
    return np.concatenate(out)


def _refine_frame(obs, specs: Sequence[PhaseSpec], start: dict, *, unit: str, wavelength_A: float | None,
                  correction: str):
    """Joint least squares of the phases' cells (and one correction) in a frame.

    ``obs[p]`` = (hkl, centre, esd) in the run's radial unit. Returns, per phase, the refined
    parameters, their esds, the covariance block and a message; and the correction (value, esd).
    """
    use_corr = correction != "none" and wavelength_A
    layout = [(p, name) for p, spec in enumerate(specs) if len(obs[p][0])
              for name in _identifiable(crystal_system(spec.space_group), obs[p][0])]
    n_obs = sum(len(o[0]) for o in obs)
    n_par = len(layout) + (1 if use_corr else 0)
    if not layout or n_obs < n_par:
        return None
    x0 = np.array([start[p][name] for p, name in layout] + ([0.0] if use_corr else []))

    def cells(x):
        cur = [dict(start[p]) for p in range(len(specs))]
        for (p, name), v in zip(layout, x):
            cur[p][name] = v
        return cur

    def model(x):
        return _positions(specs, obs, cells(x), x[-1] if use_corr else None, unit=unit,
                          wavelength_A=wavelength_A, correction=correction)

    centres = np.concatenate([o[1] for o in obs if len(o[0])])
    errs = np.concatenate([o[2] for o in obs if len(o[0])])

    def resid(x):
        return (centres - model(x)) / errs

    try:
        res = least_squares(resid, x0, method="trf", x_scale=np.maximum(np.abs(x0), 1e-3), xtol=1e-12, ftol=1e-12)
    except (ValueError, FloatingPointError) as exc:
        return f"cell refinement failed: {exc}"
    if not res.success or not np.all(np.isfinite(res.x)):
        return f"cell refinement failed: {res.message}"
    jac = res.jac
    try:
        cov = np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        cov = np.full((n_par, n_par), np.nan)
    cur = cells(res.x)
    per_phase = []
    for p, spec in enumerate(specs):
        idx = {name: i for i, (q, name) in enumerate(layout) if q == p}
        per_phase.append((cur[p], idx))
    corr = (res.x[-1], float(np.sqrt(cov[-1, -1]))) if use_corr else (np.nan, np.nan)
    return per_phase, cov, corr


def refine_lattice(table, phases: Sequence[PhaseSpec], spec: LatticeSpec | None = None, *, unit: str,
                   wavelength_A: float | None, weights: "WeightFractions | None" = None) -> LatticeTable:
    """Cells, volumes, layer geometry and fractions of every phase in every frame of a peak table.

    Frames where a phase shows no reflection have NaN cells for it (and fraction 0 when another
    phase is there); a phase whose reflections leave a parameter undetermined is flagged.
    ``weights``: the weight fractions of a whole-pattern refinement of the same run, which
    ``fraction`` takes where ``spec.fractions`` allows (see the module docstring).
    """
    spec = spec or LatticeSpec()
    n, names = len(table.frame), tuple(p.name for p in phases)
    vals = {k: np.full((n, len(phases)), np.nan) for k in LATTICE_FIELDS}
    vals["n_reflections"][:] = 0
    msg = np.full((n, len(phases)), "", dtype=object)
    if getattr(table, "phase", None) is not None:
        return _from_phase_model(table, phases, spec, vals, msg, weights)
    start = [{"a": p.a, "b": p.b, "c": p.c, "alpha": p.alpha, "beta": p.beta, "gamma": p.gamma} for p in phases]
    columns = _columns_by_phase(table, phases)
    for r in range(n):
        obs = [_observations(table, r, cols, hkl) for cols, hkl in columns]
        for i, o in enumerate(obs):
            vals["n_reflections"][r, i] = len(o[0])
        out = _refine_frame(obs, phases, start, unit=unit, wavelength_A=wavelength_A, correction=spec.peaks_correction)
        if isinstance(out, str):
            msg[r, [i for i, o in enumerate(obs) if len(o[0])]] = out
            continue
        if out is None:
            for i, o in enumerate(obs):
                if len(o[0]):
                    msg[r, i] = "too few reflections for the cell and the correction"
            continue
        per_phase, cov, corr = out
        for i, (spec_i, (cell, idx)) in enumerate(zip(phases, per_phase)):
            if not len(obs[i][0]):
                continue
            system = crystal_system(spec_i.space_group)
            missing = [nm for nm in _CELL[system] if nm not in idx]
            vals["correction_deg"][r, i], vals["correction_err_deg"][r, i] = corr
            for nm, key in _KEYS:
                if nm in idx:
                    vals[key][r, i] = cell[nm]
                    with np.errstate(invalid="ignore"):
                        vals[key.replace("_A", "_err_A").replace("_deg", "_err_deg")][r, i] = np.sqrt(cov[idx[nm], idx[nm]])
            if missing:
                msg[r, i] = f"{', '.join(missing)} not determined (only {_families(obs[i][0])} reflections)"
                continue
            _volume(vals, r, i, spec_i, cell, idx, cov)
            if spec_i.z_o is not None and system == "hexagonal" and spec_i.structure_kind in ("O3", "P3", "P2"):
                for key, v in layer_geometry(spec_i.structure_kind, cell["a"], cell["c"], spec_i.z_o).items():
                    vals[key][r, i] = v
            start[i] = {**start[i], **{nm: cell[nm] for nm in idx}}  # the next frame starts here
    frac, frac_err = peak_fractions(table, phases, spec)
    vals["area_fraction"], vals["area_fraction_err"] = frac, frac_err
    frames = np.asarray(table.frame)
    source = choose_fractions(vals, frames, names, weights, spec.fractions)
    method = np.where(source == "peaks", "area", source)
    return LatticeTable(frames, np.asarray(table.time_s, float), names, vals, msg, fraction_source=source,
                        fraction_method=method)


def _from_phase_model(table, phases: Sequence[PhaseSpec], spec: LatticeSpec, vals, msg,
                      weights: "WeightFractions | None") -> LatticeTable:
    """Cells straight from the phase model's fit (with their esds), the layer geometry, and the
    fractions from the phases' areas (:func:`phase_fractions`)."""
    ph, model_names = table.phase, tuple(table.phase_names)
    n, names = len(table.frame), tuple(p.name for p in phases)
    ok = np.asarray(table.success).any(axis=1)
    present = np.zeros((n, len(phases)), bool)
    presence = np.full((n, len(phases)), "", dtype=object)
    for i, spec_i in enumerate(phases):
        if spec_i.name not in model_names:
            msg[:, i] = "not in the phase model's fit"
            continue
        j = model_names.index(spec_i.name)
        here = ok & ph["phase_present"][:, j].astype(bool)
        present[:, i] = here
        presence[:, i] = ph["phase_decision"][:, j]
        cell, err = ph["phase_cell"][:, j], ph["phase_cell_err"][:, j]
        free = CELL_PARAMETERS[crystal_system(spec_i.space_group)]
        for k, (nm, key) in enumerate(_KEYS):
            if nm in free:
                # a parameter the fit had to hold (its lines under another phase's) is not reported
                held = np.array([f"{nm} not determined" in str(d) for d in presence[:, i]], bool)
                blind = not np.isfinite(err[here, k]).any() and here.any()
                use = here & ~held & (not blind)
                vals[key][use, i] = cell[use, k]
                vals[key.replace("_A", "_err_A").replace("_deg", "_err_deg")][use, i] = err[use, k]
                msg[here & held, i] = f"{nm} not determined (its lines lie under another phase's)"
                if blind:
                    msg[here, i] = f"{nm} not determined (no line in the windows depends on it)"
        if "phase_volume" in ph:
            vals["volume_A3"][here, i] = ph["phase_volume"][here, j]
            vals["volume_err_A3"][here, i] = ph["phase_volume_err"][here, j]
        vals["correction_deg"][here, i] = ph["zero"][here]
        if "zero_err" in ph:
            vals["correction_err_deg"][here, i] = ph["zero_err"][here]
        cols = [c for c, (_, name, _, _) in enumerate(table.peaks) if name == spec_i.name]
        vals["n_reflections"][:, i] = np.asarray(table.present)[:, cols].sum(axis=1) if cols else 0
        if spec_i.z_o is not None and crystal_system(spec_i.space_group) == "hexagonal" \
                and spec_i.structure_kind in ("O3", "P3", "P2"):
            rows = np.flatnonzero(here)
            if rows.size:
                for key, v in layer_geometry(spec_i.structure_kind, cell[rows, 0], cell[rows, 2], spec_i.z_o).items():
                    vals[key][rows, i] = v
    frac, err, method = phase_fractions(table, phases, spec)
    vals["area_fraction"], vals["area_fraction_err"] = frac, err
    frames = np.asarray(table.frame)
    source = choose_fractions(vals, frames, names, weights, spec.fractions)
    method = np.where(source == "refinement", "refinement", method)
    return LatticeTable(frames, np.asarray(table.time_s, float), names, vals, msg, fraction_source=source,
                        fraction_method=method, presence=presence)


def _families(hkl: np.ndarray) -> str:
    return "00l" if np.all(hkl[:, :2] == 0) else "some"


def _volume(vals, r, i, spec: PhaseSpec, cell, idx, cov) -> None:
    """Cell volume and its esd (gradient by central differences on the refined parameters)."""
    names = [nm for nm in idx]
    def vol(c):
        return cell_volume(spec.space_group, c["a"], c.get("c"), c.get("b"), c.get("beta"), c.get("alpha"), c.get("gamma"))

    v0 = float(vol(cell))
    grad = []
    for nm in names:
        h = 1e-6 * max(abs(cell[nm]), 1.0)
        up, dn = dict(cell), dict(cell)
        up[nm] += h
        dn[nm] -= h
        grad.append((vol(up) - vol(dn)) / (2 * h))
    sub = cov[np.ix_([idx[nm] for nm in names], [idx[nm] for nm in names])]
    g = np.array(grad, float)
    vals["volume_A3"][r, i] = v0
    with np.errstate(invalid="ignore"):
        vals["volume_err_A3"][r, i] = float(np.sqrt(g @ sub @ g))




def phase_present(a_A, c_A, fraction) -> np.ndarray:
    """Where a phase is present in a lattice table (frames x phases): a cell parameter refined
    (a for a cubic phase such as Al, c for a layered one) or a fraction above zero.

    >>> phase_present([[4.05, np.nan]], [[np.nan, np.nan]], [[np.nan, 0.2]]).tolist()
    [[True, True]]
    """
    return np.isfinite(a_A) | np.isfinite(c_A) | (np.nan_to_num(np.asarray(fraction, float)) > 0)


def trend(x, y, y_err=None, *, x_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Weighted straight line ``y = intercept + slope * x`` over ``x_range``: slope, intercept,
    their esds (scaled by the reduced chi-square when it exceeds 1) and the points used.

    For a slope per mAh/g give capacity as ``x``; against sodium content give ``x``.

    >>> t = trend([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
    >>> round(t["slope"], 6), round(t["intercept"], 6)
    (2.0, 1.0)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    e = np.ones_like(y) if y_err is None else np.asarray(y_err, float)
    use = np.isfinite(x) & np.isfinite(y) & np.isfinite(e) & (e > 0)
    if x_range is not None:
        use &= (x >= min(x_range)) & (x <= max(x_range))
    if use.sum() < 3:
        raise ValueError(f"a trend needs at least 3 points with values, got {int(use.sum())}")
    w = 1 / e[use] ** 2
    a = np.column_stack([np.ones(use.sum()), x[use]])
    cov = np.linalg.inv(a.T @ (a * w[:, None]))
    coef = cov @ (a.T @ (w * y[use]))
    chi2 = float(np.sum(w * (y[use] - a @ coef) ** 2))
    redchi = chi2 / (use.sum() - 2) if use.sum() > 2 else np.nan
    scale = max(redchi, 1.0) if (y_err is not None and np.isfinite(redchi)) else (redchi if np.isfinite(redchi) else 1.0)
    return {"slope": float(coef[1]), "slope_err": float(np.sqrt(cov[1, 1] * scale)),
            "intercept": float(coef[0]), "intercept_err": float(np.sqrt(cov[0, 0] * scale)),
            "redchi": float(redchi), "n": int(use.sum())}
