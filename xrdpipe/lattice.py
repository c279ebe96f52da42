"""Lattice parameters, phase fractions and layer geometry per frame, from fitted peaks.

For every frame and phase, the cell (a, c; also b, β for orthorhombic and monoclinic phases) is
refined by weighted least squares from the centres of all the phase's reflections found in that
frame, each weighted by its esd; the esds of the cell follow from the centre esds (not
rescaled). ``correction = "zero"`` adds a 2θ zero shift, ``"displacement"`` a sample-displacement
term (∝ cos θ), shared by the phases of the frame. A cell parameter that no reflection sees (a,
when a phase shows only 00l peaks) is not refined: it is reported as NaN and flagged.

Phase fractions: from the areas of corresponding peaks of coexisting phases in the same window
(e.g. the (003) of O3 against the (003) of P3), each scaled by its area in the nearest frame
where that phase was alone (the same reflection is not equally strong in two structures),
inverse-variance averaged over such windows; or, with ``fraction_window``, the window's area of
each phase against that of the whole window in a reference frame. Where a Rietveld refinement of
the frame succeeded (``xrdpipe refine``), ``fraction`` is its Hill-Howard weight fraction instead
(``[lattice] fractions``); ``area_fraction`` and ``weight_fraction`` keep both, and
``fraction_source`` says which one ``fraction`` is.

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
from .phases import GEOMETRY_KEYS, layer_geometry
from .tables import csv_number, write_csv

__all__ = ["LatticeTable", "WeightFractions", "refine_lattice", "trend", "LATTICE_COLUMNS", "LATTICE_FIELDS"]

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


def _refine_frame(obs, specs: Sequence[PhaseSpec], start: dict, *, unit: str, wavelength_A: float | None,
                  correction: str):
    """Joint least squares of the phases' cells (and one correction) in a frame.

    ``obs[p]`` = (hkl, centre, esd) in the run's radial unit. Returns, per phase, the refined
    parameters, their esds, the covariance block and a message; and the correction (value, esd).
    """
    to_tth = unit == "2th_deg"
    use_corr = correction != "none" and wavelength_A
    layout: list[tuple[int, str]] = []
    for p, spec in enumerate(specs):
        hkl = obs[p][0]
        if len(hkl):
            for name in _identifiable(crystal_system(spec.space_group), hkl):
                layout.append((p, name))
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
        out = []
        cur = cells(x)
        for p, spec in enumerate(specs):
            hkl = obs[p][0]
            if not len(hkl):
                continue
            cp = cur[p]
            d = d_spacing(spec.space_group, hkl[:, 0], hkl[:, 1], hkl[:, 2], cp["a"], cp["c"], cp.get("b"),
                          cp.get("beta"), cp.get("alpha"), cp.get("gamma"))
            if use_corr:
                tth = tth_from_d(d, wavelength_A)
                shift = x[-1] * (np.cos(np.radians(tth) / 2) if correction == "displacement" else 1.0)
                tth = tth + shift
                out.append(tth if to_tth else q_from_tth(tth, wavelength_A))
            elif to_tth:
                out.append(tth_from_d(d, wavelength_A))
            else:
                out.append(q_from_d(d))
        return np.concatenate(out)

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
        out = _refine_frame(obs, phases, start, unit=unit, wavelength_A=wavelength_A, correction=spec.correction)
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
    frac, frac_err = _fractions(table, phases, spec)
    vals["area_fraction"], vals["area_fraction_err"] = frac, frac_err
    frames = np.asarray(table.frame)
    source = _choose_fractions(vals, frames, names, weights, spec.fractions)
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
        cols = [c for c, (_, name, _, _) in enumerate(table.peaks) if name == spec_i.name]
        vals["n_reflections"][:, i] = np.asarray(table.present)[:, cols].sum(axis=1) if cols else 0
        if spec_i.z_o is not None and crystal_system(spec_i.space_group) == "hexagonal" \
                and spec_i.structure_kind in ("O3", "P3", "P2"):
            for r in np.flatnonzero(here):
                for key, v in layer_geometry(spec_i.structure_kind, cell[r, 0], cell[r, 2], spec_i.z_o).items():
                    vals[key][r, i] = v
    frac, err, method = phase_fractions(table, phases, spec)
    vals["area_fraction"], vals["area_fraction_err"] = frac, err
    frames = np.asarray(table.frame)
    source = _choose_fractions(vals, frames, names, weights, spec.fractions)
    method = np.where(source == "refinement", "refinement", method)
    return LatticeTable(frames, np.asarray(table.time_s, float), names, vals, msg, fraction_source=source,
                        fraction_method=method, presence=presence)


def combine_ratios(ratio: np.ndarray, var: np.ndarray, *, cut: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row, one scale from several windows' estimates ``ratio`` (n, W) with variances
    ``var`` (NaN: no estimate); returns the scale (n,) and its variance.

    The windows' esds come from the fit's noise alone, and the windows disagree by more than
    that (profile mismatch, overlapping lines), so the estimates are combined as a random-effects
    mean (DerSimonian-Laird: weights 1 / (var + τ²), τ² the spread between windows beyond their
    esds), after leaving out, where three or more windows agree, a window more than ``cut``
    robust deviations from their median (a phase's line swallowed by another phase's line, its
    area pressed to 0 with a small esd). The variance includes τ²: it is as large as the
    windows' disagreement says."""
    r = np.asarray(ratio, float)
    v = np.asarray(var, float)
    good = np.isfinite(r) & np.isfinite(v) & (v >= 0)
    n_good = good.sum(axis=1)
    rm = np.where(good, r, np.nan)
    out_s = np.full(r.shape[0], np.nan)
    out_v = np.full(r.shape[0], np.nan)
    rows = n_good > 0
    if not rows.any():
        return out_s, out_v
    with np.errstate(all="ignore"):
        med = np.nanmedian(rm[rows], axis=1)
        dev = np.abs(rm[rows] - med[:, None])
        mad = 1.4826 * np.nanmedian(dev, axis=1)
        outlier = (n_good[rows, None] >= 3) & (dev > cut * np.sqrt(mad[:, None] ** 2 + v[rows]))
        use = good[rows] & ~outlier
        vv = np.where(use, np.maximum(v[rows], 1e-300), np.inf)
        w = 1.0 / vv
        sw = w.sum(axis=1)
        mean_fe = (w * np.where(use, rm[rows], 0.0)).sum(axis=1) / sw
        q = (w * np.where(use, rm[rows] - mean_fe[:, None], 0.0) ** 2).sum(axis=1)
        dof = use.sum(axis=1) - 1
        tau2 = np.where(dof > 0, np.maximum(0.0, (q - dof) / (sw - (w ** 2).sum(axis=1) / sw)), 0.0)
        w2 = np.where(use, 1.0 / (vv + tau2[:, None]), 0.0)
        out_s[rows] = (w2 * np.where(use, rm[rows], 0.0)).sum(axis=1) / w2.sum(axis=1)
        out_v[rows] = 1.0 / w2.sum(axis=1)
    return out_s, out_v


def phase_fractions(table, phases: Sequence[PhaseSpec], spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase fractions (n, P), their esds and the method, from the phase model's areas.

    A phase's scale in a frame is the sum of its fitted areas over the windows divided by the
    same sum in the nearest frame where it was the only phase present (its intensities as that
    structure gives them): ``"scale"``. A phase never seen alone has its raw area sum instead
    (``"area"``: the fraction of diffracted intensity, not of the phase). The fractions are the
    scales normalised over the phases present that take part (``fraction = true``); esds from the
    fit's area covariance (the reference frames' errors neglected). A frame with one such phase
    has fraction 1 (``"single phase"``); an absent phase has 0.
    """
    ph, model_names = table.phase, tuple(table.phase_names)
    n = len(table.frame)
    frac = np.full((n, len(phases)), np.nan)
    err = np.full((n, len(phases)), np.nan)
    method = np.full((n, len(phases)), "", dtype=object)
    ok = np.asarray(table.success).any(axis=1)
    win = list(table.windows)
    use_w = np.ones(len(win), bool) if spec.fraction_window is None else np.array([w == spec.fraction_window for w in win])
    part = [i for i, p in enumerate(phases) if p.fraction and p.name in model_names]
    cols = [model_names.index(phases[i].name) for i in part]
    if not part:
        return frac, err, method
    present = ph["phase_present"][:, cols].astype(bool) & ok[:, None]
    area = np.where(use_w[None, None, :], np.nan_to_num(ph["phase_area"][:, cols]), 0.0)
    sd = np.where(use_w[None, None, :], ph["phase_area_err"][:, cols], np.nan)
    var = np.nan_to_num(sd) ** 2
    scale = np.zeros((n, len(part)))
    scale_var = np.zeros((n, len(part)))
    how = np.full(len(part), "scale", dtype=object)
    for k in range(len(part)):
        alone = np.flatnonzero(present[:, k] & (present.sum(axis=1) == 1))
        if alone.size:
            pos = np.clip(np.searchsorted(alone, np.arange(n)), 0, alone.size - 1)
            prev = alone[np.maximum(pos - 1, 0)]
            near = np.where(np.abs(alone[pos] - np.arange(n)) <= np.abs(prev - np.arange(n)), alone[pos], prev)
            ref = area[near, k, :]                                   # (n, W)
            # each window's ratio to the reference, combined robustly (a window where the
            # phase's lines are swallowed by another phase's disagrees with the rest and is
            # left out; one where its area rests at 0 without an esd has no say)
            with np.errstate(all="ignore"):
                ratio = area[:, k, :] / ref
                r_var = var[:, k, :] / ref**2
                good = (ref > 0) & np.isfinite(sd[:, k, :]) & (sd[:, k, :] > 0) & np.isfinite(ratio)
            scale[:, k], scale_var[:, k] = combine_ratios(np.where(good, ratio, np.nan), np.where(good, r_var, np.nan))
            # the reference frame itself has ratio 1 and no spread: it is its own scale
            single = present[:, k] & (present.sum(axis=1) == 1)
            scale[single, k], scale_var[single, k] = 1.0, 0.0
        else:
            how[k] = "area"
            scale[:, k] = area[:, k, :].sum(axis=1)
            scale_var[:, k] = var[:, k, :].sum(axis=1)
    # one method per frame: where a present phase was never seen alone, every phase of that
    # frame takes its raw area sum (a scale and an area cannot be normalised together)
    raw = (present & (how == "area")[None, :]).any(axis=1)
    if raw.any():
        scale[raw] = area[raw].sum(axis=2)
        scale_var[raw] = var[raw].sum(axis=2)
    scale = np.where(present, scale, 0.0)
    scale_var = np.where(present, scale_var, 0.0)
    total = scale.sum(axis=1)
    several = present.sum(axis=1) > 1
    for k, i in enumerate(part):
        with np.errstate(all="ignore"):
            f = scale[:, k] / total
            # d f_k / d s_j = (δ_kj S - s_k) / S²
            v = ((total - scale[:, k]) ** 2 * scale_var[:, k]
                 + scale[:, k] ** 2 * (scale_var.sum(axis=1) - scale_var[:, k])) / total**4
        rows = several & np.isfinite(f)
        frac[rows, i], err[rows, i] = f[rows], np.sqrt(v[rows])
        method[rows & present[:, k], i] = np.where(raw[rows & present[:, k]], "area", how[k])
        single = ok & (present.sum(axis=1) == 1)
        frac[single, i] = np.where(present[single, k], 1.0, 0.0)
        err[single, i] = 0.0
        method[single & present[:, k], i] = "single phase"
    return frac, err, method


@dataclass
class WeightFractions:
    """Weight fractions of a whole-pattern refinement: ``fraction`` and ``esd`` (rows, R) for
    the run-file rows ``0..rows-1`` and the refined phases ``phases``; NaN where a frame was not
    refined, failed, or was refined without a structure (Le Bail)."""

    phases: tuple[str, ...]
    fraction: np.ndarray
    esd: np.ndarray


def _choose_fractions(vals, frames: np.ndarray, names: Sequence[str], weights: WeightFractions | None,
                      mode: str) -> np.ndarray:
    """Fill ``weight_fraction`` and choose ``fraction`` per frame; returns its source (n, P).

    A frame takes the refinement's fractions when every refined phase has one there; phases of
    the experiment that the refinement left out are 0 in such a frame (the refinement says what
    the pattern is made of)."""
    n, p = len(frames), len(names)
    use = np.zeros(n, bool)
    if weights is not None and mode != "peaks":
        inside = (frames >= 0) & (frames < weights.fraction.shape[0])
        rows = np.where(inside, frames, 0)
        wf, we = weights.fraction[rows], weights.esd[rows]
        wf[~inside], we[~inside] = np.nan, np.nan
        use = np.isfinite(wf).all(axis=1) if wf.shape[1] else use
        for i, name in enumerate(names):
            if name in weights.phases:
                j = weights.phases.index(name)
                vals["weight_fraction"][:, i], vals["weight_fraction_err"][:, i] = wf[:, j], we[:, j]
            else:
                vals["weight_fraction"][use, i], vals["weight_fraction_err"][use, i] = 0.0, 0.0
    source = np.full((n, p), "", dtype=object)
    if mode == "refinement":
        vals["fraction"], vals["fraction_err"] = vals["weight_fraction"].copy(), vals["weight_fraction_err"].copy()
        source[use] = "refinement"
        return source
    peaks = ~use
    vals["fraction"] = np.where(use[:, None], vals["weight_fraction"], vals["area_fraction"])
    vals["fraction_err"] = np.where(use[:, None], vals["weight_fraction_err"], vals["area_fraction_err"])
    source[use] = "refinement"
    source[peaks[:, None] & np.isfinite(vals["area_fraction"])] = "peaks"
    return source


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


def _fractions(table, phases: Sequence[PhaseSpec], spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Phase fractions (n, P) with esds, from peak areas."""
    n, names = len(table.frame), [p.name for p in phases]
    frac = np.full((n, len(names)), np.nan)
    err = np.full((n, len(names)), np.nan)
    area, aerr, present = table.values["area"], table.values["area_err"], table.present
    col_phase = [ph for _, ph, _, _ in table.peaks]
    col_window = [w for w, _, _, _ in table.peaks]
    if spec.fraction_window is not None:
        cols = [i for i, w in enumerate(col_window) if w == spec.fraction_window]
        ref = int(np.searchsorted(table.frame, spec.reference_frame))
        total_ref = np.nansum(area[ref, cols]) if ref < n else np.nan
        for p, name in enumerate(names):
            mine = [i for i in cols if col_phase[i] == name]
            if mine and total_ref > 0:
                frac[:, p] = np.nansum(np.where(present[:, mine], area[:, mine], 0.0), axis=1) / total_ref
                err[:, p] = np.sqrt(np.nansum(np.where(present[:, mine], aerr[:, mine], 0.0) ** 2, axis=1)) / total_ref
        return frac, err
    # (i) areas of corresponding peaks of coexisting phases, window by window
    num = np.zeros((n, len(names)))
    wsum = np.zeros((n, len(names)))
    for window in dict.fromkeys(col_window):
        cols = [i for i, w in enumerate(col_window) if w == window]
        phs = [col_phase[i] for i in cols]
        if len(set(phs)) < 2:
            continue
        a = np.where(present[:, cols], area[:, cols], 0.0)
        e = np.where(present[:, cols], aerr[:, cols], 0.0)
        # the same reflection is not equally strong in two phases: scale each phase's area by
        # its area in the nearest frame where it was alone in the window (if there is one)
        for j in range(len(cols)):
            alone = np.flatnonzero(present[:, cols[j]] & (present[:, cols].sum(axis=1) == 1) & np.isfinite(a[:, j]))
            if alone.size:
                pos = np.clip(np.searchsorted(alone, np.arange(n)), 0, alone.size - 1)
                prev = alone[np.maximum(pos - 1, 0)]
                near = np.where(np.abs(alone[pos] - np.arange(n)) <= np.abs(prev - np.arange(n)), alone[pos], prev)
                ref = a[near, j]
                a[:, j], e[:, j] = a[:, j] / ref, e[:, j] / ref
        tot = a.sum(axis=1)
        ok = (tot > 0) & np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(e) | (a == 0), axis=1)
        for j, i in enumerate(cols):
            p = names.index(col_phase[i]) if col_phase[i] in names else None
            if p is None:
                continue
            with np.errstate(all="ignore"):
                f = a[:, j] / tot
                # d f_j / d a_k = (δjk tot - a_j) / tot²
                var = ((tot - a[:, j]) ** 2 * e[:, j] ** 2 + (a[:, j] ** 2) * (np.sum(e**2, axis=1) - e[:, j] ** 2)) / tot**4
            with np.errstate(divide="ignore"):
                wgt = np.where(var > 0, 1.0 / var, 1e12)
            use = ok & np.isfinite(f)
            num[use, p] += (f * wgt)[use]
            wsum[use, p] += wgt[use]
    seen = wsum > 0
    with np.errstate(all="ignore"):
        frac[seen] = num[seen] / wsum[seen]
        err[seen] = np.where(wsum[seen] >= 1e12, 0.0, 1.0 / np.sqrt(wsum[seen]))
    # frames where only one phase shows up anywhere: it is all there is
    shows = np.stack([present[:, [i for i, ph in enumerate(col_phase) if ph == name]].any(axis=1)
                      if name in col_phase else np.zeros(n, bool) for name in names], axis=1)
    alone = shows.sum(axis=1) == 1
    for p in range(len(names)):
        frac[alone & shows[:, p], p], err[alone & shows[:, p], p] = 1.0, 0.0
        frac[alone & ~shows[:, p], p], err[alone & ~shows[:, p], p] = 0.0, 0.0
        gone = ~shows[:, p] & shows.any(axis=1) & np.isnan(frac[:, p])
        frac[gone, p], err[gone, p] = 0.0, 0.0
    return frac, err


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
