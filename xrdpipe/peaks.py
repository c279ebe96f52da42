"""Per-frame peak fitting: named reflections, one component per coexisting phase.

A ``[[windows]]`` table becomes a :class:`WindowModel`: one profile per listed ``"phase hkl"``
(its start centre from the phase's cell at the run's wavelength) plus a polynomial background.
:class:`PeakFitter` fits every window in a block of frames at once and carries the results
forward as the next block's start values; a component whose removal does not worsen the fit
enough (BIC or F-test) is declared absent and gets area 0 and ``present = False``.

Two engines give the same answers: ``"batched"`` (:mod:`xrdpipe.batchfit`, vectorised
Levenberg-Marquardt with analytic derivatives, all frames of a block at once) and ``"lmfit"``
(an lmfit composite model fitted frame by frame: the reference, and the user-facing definition
of every model through :meth:`WindowModel.lmfit_model`, built by :mod:`xrdpipe.lmfit_models`,
the only module that imports lmfit).

Failures are data: every (frame, window) gets ``success`` and a ``message``; nothing raises
inside the loop over frames.

Example
-------
>>> table = fit_peaks(open_run("results/run.nxs"), exp.phases, exp.windows)   # doctest: +SKIP
>>> table.write_csv("results/peaks.csv")                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .batchfit import BatchResult, least_squares_batch
from .config import FitSpec, PhaseSpec, WindowSpec
from .errors import WindowSetupError
from .lineshapes import PROFILES, height
from .lmfit_models import lmfit_model, lmfit_params
from .tables import PEAK_ARRAYS, csv_number, write_csv
from .windows import WindowModel, d_from_radial

__all__ = ["WindowModel", "PeakFitter", "PeakTable", "WindowSetupError", "fit_peaks", "fit_window", "lmfit_model",
           "PEAK_COLUMNS"]

#: The columns of peaks.csv (a public interface: extend, never rename).
PEAK_COLUMNS = ("frame", "time_s", "window", "phase", "hkl", "center", "center_err", "fwhm", "fwhm_err",
                "eta", "area", "area_err", "height", "redchi", "present", "success", "message",
                "d_A", "d_err_A", "shape", "fwhm_left", "fwhm_right", "profile")

#: Per-component quantities kept for every frame (frame x peak arrays).
PEAK_FIELDS = PEAK_ARRAYS
# ----------------------------------------------------------------------------------------------
# one window over a block of frames

@dataclass
class _Fit:
    """Solutions on a set of rows, in the free layout of a window model."""

    p: np.ndarray
    cov: np.ndarray
    chi2: np.ndarray
    n_points: np.ndarray
    n_vary: int
    ok: np.ndarray
    message: np.ndarray

    def take(self, rows: np.ndarray) -> "_Fit":
        return _Fit(self.p[rows], self.cov[rows], self.chi2[rows], self.n_points[rows], self.n_vary,
                    self.ok[rows], self.message[rows])


def _optimize_batched(model: WindowModel, theta, lo, hi, hold, y, w, *, max_iter: int, has_errors: bool,
                      weak_z: float = 2.0) -> _Fit:
    res: BatchResult = least_squares_batch(model.value_jac, theta, y, w, lower=lo, upper=hi, fixed=hold,
                                           max_iter=max_iter, amplitudes=model.amplitudes, weak_z=weak_z)
    # components near the presence threshold were held still while weak: polish those rows
    # without the hold, so that the presence test compares true minima (as lmfit would)
    areas = [a for a, _ in model.amplitudes]
    with np.errstate(all="ignore"):
        z = res.p[:, areas] / np.sqrt(np.diagonal(res.cov, axis1=1, axis2=2)[:, areas])
    near = np.flatnonzero((np.isfinite(z) & (z > 0.3 * weak_z) & (z < 2 * weak_z)).any(axis=1) & res.success)
    if near.size and weak_z > 0:
        again = least_squares_batch(model.value_jac, res.p[near], y[near], w[near], lower=lo[near], upper=hi[near],
                                    fixed=hold if np.ndim(hold) == 1 else hold[near], max_iter=max_iter)
        for name in ("p", "cov", "chi2", "n_iter", "status", "at_bound"):
            getattr(res, name)[near] = getattr(again, name)
    msg = np.full(len(theta), "", dtype=object)
    msg[res.status == 0] = f"no convergence in {max_iter} iterations"
    msg[res.status < 0] = "fit diverged (non-finite chi-square)"
    return _Fit(res.p, res.cov, res.chi2, res.n_points, int(model.n_free - np.count_nonzero(hold)),
                res.success, msg)


_LMFIT_MODELS: "weakref.WeakKeyDictionary[WindowModel, object]" = weakref.WeakKeyDictionary()


def _optimize_lmfit(model: WindowModel, theta, lo, hi, hold, y, w, *, max_iter: int, has_errors: bool,
                   weak_z: float = 0.0) -> _Fit:
    lm = _LMFIT_MODELS.get(model)
    if lm is None:
        lm = _LMFIT_MODELS[model] = lmfit_model(model)
    n, k = theta.shape
    out = _Fit(theta.copy(), np.full((n, k, k), np.nan), np.full(n, np.nan), np.zeros(n, int),
               int(k - np.count_nonzero(hold)), np.zeros(n, bool), np.full(n, "", dtype=object))
    col = {name: i for i, name in enumerate(model.names)}
    for i in range(n):
        keep = w[i] > 0
        out.n_points[i] = np.count_nonzero(keep)
        params = lmfit_params(model, lm, theta[i], lo[i], hi[i], hold)
        try:
            res = lm.fit(y[i, keep], params, x=model.x[keep], weights=w[i, keep] if has_errors else None,
                         scale_covar=False, max_nfev=max_iter * (k + 1))
        except (ValueError, TypeError, FloatingPointError) as exc:
            out.message[i] = f"lmfit: {exc}"
            continue
        out.p[i] = [res.params[name].value for name in model.names]
        out.chi2[i] = res.chisqr
        out.ok[i] = bool(res.success) and np.isfinite(res.chisqr)
        if not out.ok[i]:
            out.message[i] = f"lmfit: {res.message}"
        if res.covar is not None:
            idx = [col[v] for v in res.var_names]
            out.cov[i][np.ix_(idx, idx)] = res.covar
        at = (out.p[i] <= lo[i]) | (out.p[i] >= hi[i])  # like the batched path: no esd at a bound
        out.cov[i][at, :] = np.nan
        out.cov[i][:, at] = np.nan
    return out


_ENGINES = {"batched": _optimize_batched, "lmfit": _optimize_lmfit}


@dataclass
class WindowResult:
    """One window fitted in n frames: per-component arrays (n, K) and per-frame ones (n,)."""

    values: dict[str, np.ndarray]
    present: np.ndarray
    success: np.ndarray
    redchi: np.ndarray
    message: np.ndarray
    full_params: np.ndarray = field(repr=False)


def fit_window(model: WindowModel, y: np.ndarray, sigma: np.ndarray | None, *, seeds: np.ndarray | None = None,
               fit: FitSpec = FitSpec(), usable: np.ndarray | None = None) -> WindowResult:
    """Fit one window in a block of frames (rows of ``y``, on the window's grid ``model.x``).

    ``sigma`` (same shape, or None) weights the points; without it every valid point has unit
    weight and the esds are scaled by the reduced chi-square. ``usable`` marks the frames to fit
    at all. Components whose presence is not supported by the data are removed (``presence``).
    """
    y = np.asarray(y, float)
    n, m = y.shape
    k_comp = len(model.components)
    usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
    has_errors, valid, w = _weights(y, sigma, usable)
    y0 = np.where(valid, y, 0.0)
    theta, lo, hi = model.start(y, valid, seeds)
    message, rows = _fittable(model, usable, valid.sum(axis=1), m)
    success = np.zeros(n, bool)
    present = np.zeros((n, k_comp), bool)
    final = np.full((n, model.n_free), np.nan)
    final_cov = np.full((n, model.n_free, model.n_free), np.nan)
    chi2 = np.full(n, np.nan)
    npts = np.zeros(n, int)
    nvary = np.zeros(n, int)
    opt = _ENGINES[fit.engine]
    presence = model.spec.presence or fit.presence
    # a component too weak to pass the presence test even at its best stops moving (batched path;
    # near the threshold it is polished without the hold); "always" keeps every one moving
    k_own = max((len(own) + 1 for _, own in model.amplitudes), default=1)
    weak_z = {"bic": np.sqrt(fit.bic_threshold + k_own * np.log(max(m, 2))), "ftest": 2.0, "always": 0.0}[presence]
    kw = dict(max_iter=fit.max_iter, has_errors=has_errors, weak_z=weak_z)
    if rows.size:
        full = opt(model, theta[rows], lo[rows], hi[rows], np.zeros(model.n_free, bool), y0[rows], w[rows], **kw)
        message[rows] = full.message
        good = rows[full.ok]
        fg = full.take(full.ok)
        decided = np.ones((good.size, k_comp), bool)
        reduced: dict[int, _Fit] = {}
        if presence != "always" and good.size:
            veto = _vetoed(model, fg.p, lo[good], hi[good], fit.min_fraction)
            for j in range(k_comp):
                decided[:, j], reduced[j] = _test_component(model, j, fg, lo[good], hi[good], y0[good], w[good],
                                                            opt, kw, presence, fit, veto[:, j])
        final[good], final_cov[good], chi2[good], nvary[good] = _without_absent(
            model, fg, decided, reduced, lo[good], hi[good], y0[good], w[good], opt, kw)
        npts[good] = fg.n_points
        present[good] = decided
        success[good] = True
        none = good[~decided.any(axis=1)]
        message[none] = "no component present"
    with np.errstate(all="ignore"):
        redchi = chi2 / (npts - nvary)
    if not has_errors or fit.esd_scale == "redchi":
        final_cov = final_cov * redchi[:, None, None]
    values = _component_values(model, final, final_cov, present, success)
    return WindowResult(values, present, success, redchi, message, final)


def _weights(y: np.ndarray, sigma: np.ndarray | None, usable: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray]:
    """Whether the data have esds, the valid points and the weights (1/sigma, or 1; 0 where not valid)."""
    has_errors = sigma is not None and bool(np.isfinite(sigma[usable]).any())
    valid = np.isfinite(y)
    if has_errors:
        valid &= np.isfinite(sigma) & (sigma > 0)
        w = np.where(valid, 1.0 / np.where(valid, sigma, 1.0), 0.0)
    else:
        w = valid.astype(float)
    return has_errors, valid, w


def _fittable(model: WindowModel, usable: np.ndarray, n_valid: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The message of each frame (n,; why a usable frame cannot be fitted) and the rows to fit."""
    message = np.full(len(usable), "", dtype=object)
    if m == 0:
        message[usable] = (f"window {model.name!r} {list(model.spec.range)} has no data points "
                           f"(the data span {model.data_span[0]:g} to {model.data_span[1]:g} {model.unit})")
        return message, np.zeros(0, int)
    few = usable & (n_valid < model.n_free + 2)
    message[few] = [f"only {v} valid points in the window (NaN or no esd); {model.n_free + 2} needed"
                    for v in n_valid[few]]
    return message, np.flatnonzero(usable & ~few)


def _without_absent(model: WindowModel, fg: _Fit, decided: np.ndarray, reduced: dict[int, _Fit],
                    lo: np.ndarray, hi: np.ndarray, y0: np.ndarray, w: np.ndarray, opt, kw: dict):
    """Final parameters, covariances, chi² and number varied of the fitted rows: the full fit
    ``fg``, or the fit without the components ``decided`` absent (the reduced fit of the
    presence test where one component is, a refit with them at area 0 otherwise)."""
    sol_p, sol_cov, sol_chi2, sol_nv = fg.p.copy(), fg.cov.copy(), fg.chi2.copy(), np.full(len(fg.p), fg.n_vary)
    absent_sets = [tuple(np.flatnonzero(~r)) for r in decided]
    for pattern in set(absent_sets):
        if not pattern:
            continue
        sel = np.array([s == pattern for s in absent_sets])
        if len(pattern) == 1 and pattern[0] in reduced:
            red = reduced[pattern[0]]
            use = sel & red.ok
            sol_p[use], sol_cov[use], sol_chi2[use], sol_nv[use] = red.p[use], red.cov[use], red.chi2[use], red.n_vary
            sel &= ~use
        hold = model.drop_mask(pattern)
        # where every absent component already rests at area 0, the full fit is the fit
        # without them: nothing to refit
        empty = sel & np.all([fg.p[:, model.index(j, "area")] <= 0 for j in pattern], axis=0)
        sol_nv[empty] = fg.n_vary - int(np.count_nonzero(hold))
        sel &= ~empty
        if not sel.any():
            continue
        start = fg.p[sel].copy()
        for j in pattern:
            start[:, model.index(j, "area")] = 0.0
        red = opt(model, start, lo[sel], hi[sel], hold, y0[sel], w[sel], **kw)
        use = np.flatnonzero(sel)[red.ok]
        sol_p[use], sol_cov[use], sol_chi2[use], sol_nv[use] = red.p[red.ok], red.cov[red.ok], red.chi2[red.ok], red.n_vary
    return sol_p, sol_cov, sol_chi2, sol_nv


def _vetoed(model: WindowModel, p: np.ndarray, lo: np.ndarray, hi: np.ndarray, min_fraction: float) -> np.ndarray:
    """(n, K): components that are not peaks whatever the statistics say: the centre ended on a
    hard limit (``center_bounds``, the ``max_shift`` box, a free line's reach) or within half a
    FWHM of the window's edge (it is chasing something outside the window), or, beside other
    components, a phase's area is below ``min_fraction`` of the phases' peak area in the window
    (a line of no phase is neither held to it nor counted in it). A centre pressed against the
    territory of a neighbour is not vetoed: overlapping peaks legitimately sit there."""
    k = len(model.components)
    areas = np.stack([p[:, model.index(j, "area")] for j in range(k)], axis=1)
    of_phase = np.array([c.hkl is not None for c in model.components], bool)
    total = areas[:, of_phase].sum(axis=1, keepdims=True)
    out = np.zeros(areas.shape, bool)
    w_lo, w_hi = model.spec.range
    for j in range(k):
        c = model.index(j, "center")
        if model.spec.max_shift is not None:
            hard_lo, hard_hi = lo[:, c], hi[:, c]
        else:
            hard_lo, hard_hi = np.full(len(p), model.limits[j, 0]), np.full(len(p), model.limits[j, 1])
        tol = 1e-6 * (hard_hi - hard_lo)
        edge = np.maximum(0.5 * p[:, model.index(j, PROFILES[model.profile][2][1])], 2 * abs(model.step))
        out[:, j] = ((p[:, c] <= hard_lo + tol) | (p[:, c] >= hard_hi - tol)
                     | (p[:, c] < w_lo + edge) | (p[:, c] > w_hi - edge))
        if of_phase.sum() > 1 and of_phase[j]:     # (a line of no phase: by statistics)
            with np.errstate(all="ignore"):
                out[:, j] |= areas[:, j] < min_fraction * total[:, 0]
    return out


def _test_component(model: WindowModel, j: int, fg: _Fit, lo, hi, y, w, opt, kw, presence: str, fit: FitSpec,
                    veto: np.ndarray):
    """Is component ``j`` present in each row of a successful full fit? Returns the decision and
    the fits without ``j`` (``ok`` only on the rows where one was made)."""
    from scipy.special import fdtrc, fdtri

    n = fg.p.shape[0]
    a_col = model.index(j, "area")
    hold = model.drop_mask([j])
    k_j = int(np.count_nonzero(hold))
    area = fg.p[:, a_col]
    with np.errstate(all="ignore"):
        z2 = area**2 / np.diagonal(fg.cov, axis1=1, axis2=2)[:, a_col]
        rc = fg.chi2 / fg.n_points
        nfree = fg.n_points - fg.n_vary
    decision = np.zeros(n, bool)
    at_zero = (area <= lo[:, a_col]) | veto
    if presence == "bic":
        margin = 4 * (fit.bic_threshold + k_j * np.log(np.maximum(fg.n_points, 2)))
        with np.errstate(all="ignore"):
            sure = z2 / rc > margin
    else:
        f_crit = fdtri(k_j, np.maximum(nfree, 1), 1 - fit.ftest_alpha)
        with np.errstate(all="ignore"):
            sure = z2 / (k_j * fg.chi2 / np.maximum(nfree, 1)) > 4 * f_crit
    if fit.engine == "lmfit":
        sure = np.zeros(n, bool)  # the reference tests every component the long way
    sure &= np.isfinite(z2) & ~at_zero & (fg.chi2 > 0)
    decision[sure] = True
    test = np.flatnonzero(~sure & ~at_zero)
    reduced = _Fit(fg.p.copy(), fg.cov.copy(), fg.chi2.copy(), fg.n_points, fg.n_vary - k_j, np.zeros(n, bool),
                   fg.message)
    if test.size == 0:
        return decision, reduced
    start = fg.p[test].copy()
    start[:, a_col] = 0.0
    red = opt(model, start, lo[test], hi[test], hold, y[test], w[test], **kw)
    f_chi2 = fg.chi2[test]
    r_chi2 = np.where(red.ok, red.chi2, np.inf)
    npts = fg.n_points[test]
    with np.errstate(all="ignore"):
        if presence == "bic":
            delta = npts * np.log(r_chi2 / f_chi2) - k_j * np.log(npts)
            keep = delta > fit.bic_threshold
        else:
            nf = np.maximum(npts - fg.n_vary, 1)
            fstat = ((r_chi2 - f_chi2) / k_j) / (f_chi2 / nf)
            keep = fdtrc(k_j, nf, fstat) < fit.ftest_alpha
    decision[test] = keep & np.isfinite(f_chi2)
    reduced.p[test], reduced.cov[test], reduced.chi2[test], reduced.ok[test] = red.p, red.cov, red.chi2, red.ok
    return decision, reduced


def _component_values(model: WindowModel, p, cov, present, success) -> dict[str, np.ndarray]:
    """Per-component quantities (n, K) from the free parameters and their covariance."""
    n, k = p.shape[0], len(model.components)
    out = {name: np.full((n, k), np.nan) for name in PEAK_FIELDS}
    names = PROFILES[model.profile][2]
    var = np.diagonal(cov, axis1=1, axis2=2)
    with np.errstate(all="ignore"):
        err = np.sqrt(var)
    for j in range(k):
        c = {name: model.index(j, name) for name in names}
        live = success & present[:, j]
        out["center"][:, j] = p[:, c["center"]]
        out["center_err"][:, j] = err[:, c["center"]]
        out["area"][:, j] = p[:, c["area"]]
        out["area_err"][:, j] = err[:, c["area"]]
        shape = names[-1]
        out["shape"][:, j] = p[:, c[shape]]
        out["shape_err"][:, j] = err[:, c[shape]]
        if model.profile == "split_pseudo_voigt":
            fl, fr = p[:, c["fwhm_left"]], p[:, c["fwhm_right"]]
            il, ir = c["fwhm_left"], c["fwhm_right"]
            with np.errstate(all="ignore"):
                fw_err = np.sqrt(var[:, il] + var[:, ir] + 2 * cov[:, il, ir]) / 2
            out["fwhm"][:, j] = (fl + fr) / 2
            out["fwhm_err"][:, j] = fw_err
            out["fwhm_left"][:, j], out["fwhm_right"][:, j] = fl, fr
            out["height"][:, j] = height(model.profile, out["area"][:, j], fl, out["shape"][:, j], fr)
        else:
            out["fwhm"][:, j] = p[:, c["fwhm"]]
            out["fwhm_err"][:, j] = err[:, c["fwhm"]]
            out["fwhm_left"][:, j] = out["fwhm_right"][:, j] = out["fwhm"][:, j]
            out["height"][:, j] = height(model.profile, out["area"][:, j], out["fwhm"][:, j], out["shape"][:, j])
        out["d_A"][:, j], out["d_err_A"][:, j] = d_from_radial(out["center"][:, j], out["center_err"][:, j],
                                                               model.unit, model.wavelength_A)
        # an absent component has area 0 and nothing else; a failed window has nothing at all
        gone = success & ~present[:, j]
        for name in PEAK_FIELDS:
            out[name][~live, j] = np.nan
        out["area"][gone, j] = 0.0
        out["height"][gone, j] = 0.0
    return out


# ----------------------------------------------------------------------------------------------
# every window, frame block by frame block

@dataclass
class PeakTable:
    """Fitted peaks of n frames: ``values[field]`` (n, P) per component (``labels``), ``present``
    (n, P), and per window ``success``, ``redchi``, ``message`` (n, W)."""

    frame: np.ndarray
    time_s: np.ndarray
    windows: tuple[str, ...]
    peaks: tuple[tuple[str, str, str, str], ...]  # (window, phase, hkl, profile) per component
    values: dict[str, np.ndarray]
    present: np.ndarray
    success: np.ndarray
    redchi: np.ndarray
    message: np.ndarray
    #: the phase model's per (frame, phase[, window]) arrays (:data:`xrdpipe.phasefit.PHASE_ARRAYS`)
    #: and the phases they belong to; None for independent peaks
    phase: dict[str, np.ndarray] | None = None
    phase_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def column(self, name: str, label: str) -> np.ndarray:
        """One component's series, e.g. ``table.column("center", "O3 003")``."""
        for i, (_, phase, hkl, _) in enumerate(self.peaks):
            if f"{phase} {hkl}" == label:
                return self.present[:, i] if name == "present" else self.values[name][:, i]
        raise KeyError(f"no peak {label!r}; peaks: {[f'{p} {h}' for _, p, h, _ in self.peaks]}")

    def rows(self):
        """peaks.csv rows (dicts keyed by :data:`PEAK_COLUMNS`), frame by frame."""
        win_index = {w: i for i, w in enumerate(self.windows)}
        for r in range(len(self.frame)):
            for i, (window, phase, hkl, profile) in enumerate(self.peaks):
                wi = win_index[window]
                v = {k: self.values[k][r, i] for k in PEAK_FIELDS}
                yield {
                    "frame": int(self.frame[r]), "time_s": csv_number(self.time_s[r]), "window": window, "phase": phase,
                    "hkl": hkl, "center": csv_number(v["center"]), "center_err": csv_number(v["center_err"]),
                    "fwhm": csv_number(v["fwhm"]), "fwhm_err": csv_number(v["fwhm_err"]),
                    "eta": csv_number(v["shape"]) if profile != "pearson7" else "",
                    "area": csv_number(v["area"]), "area_err": csv_number(v["area_err"]), "height": csv_number(v["height"]),
                    "redchi": csv_number(self.redchi[r, wi]), "present": int(bool(self.present[r, i])),
                    "success": int(bool(self.success[r, wi])), "message": self.message[r, wi] or "",
                    "d_A": csv_number(v["d_A"]), "d_err_A": csv_number(v["d_err_A"]), "shape": csv_number(v["shape"]),
                    "fwhm_left": csv_number(v["fwhm_left"]), "fwhm_right": csv_number(v["fwhm_right"]), "profile": profile,
                }

    def write_csv(self, path: Path | str) -> Path:
        """Write ``peaks.csv`` (one row per frame and component; centre and FWHM in the run's unit)."""
        return write_csv(path, PEAK_COLUMNS, self.rows())


class PeakFitter:
    """Fits every window of an experiment, a block of frames at a time, carrying start values.

    ``seeds`` (one (K, block) array per window) is the whole state between blocks: each
    component's parameters in the last frame where it was found. Set it to resume a run.
    """

    def __init__(self, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(), *,
                 radial: np.ndarray, unit: str, wavelength_A: float | None):
        phase_map = {p.name: p for p in phases}
        self.fit = fit
        self.models, problems = [], []
        for i, w in enumerate(windows):
            try:
                self.models.append(WindowModel(w, phase_map, radial, unit, wavelength_A))
            except (ValueError, KeyError) as exc:
                problems.append((i, f"window {w.name!r}: {exc}"))
        if problems:
            raise WindowSetupError(problems)
        self.windows = tuple(m.name for m in self.models)
        self.peaks = tuple((m.name, c.phase, c.hkl_text, m.profile) for m in self.models for c in m.components)
        self.seeds = [np.full((len(m.components), m.block), np.nan) for m in self.models]

    def fit_block(self, intensity: np.ndarray, sigma: np.ndarray | None, *, frame: np.ndarray,
                  time_s: np.ndarray | None = None, usable: np.ndarray | None = None,
                  reasons: Sequence[str] | None = None) -> PeakTable:
        """Fit frames ``intensity`` (n, npt) (``sigma`` alike or None); rows not ``usable`` are
        recorded as failures with their ``reasons``."""
        n = intensity.shape[0]
        usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
        values = {k: np.full((n, len(self.peaks)), np.nan) for k in PEAK_FIELDS}
        present = np.zeros((n, len(self.peaks)), bool)
        success = np.zeros((n, len(self.models)), bool)
        redchi = np.full((n, len(self.models)), np.nan)
        message = np.full((n, len(self.models)), "", dtype=object)
        results = self._fit_windows(intensity, sigma, usable)
        col = 0
        for wi, (model, res) in enumerate(zip(self.models, results)):
            k = len(model.components)
            for name in PEAK_FIELDS:
                values[name][:, col:col + k] = res.values[name]
            present[:, col:col + k] = res.present
            success[:, wi], redchi[:, wi], message[:, wi] = res.success, res.redchi, res.message
            col += k
        if reasons is not None:
            for r in np.flatnonzero(~usable):
                message[r, :] = reasons[r] or "frame not integrated"
        return PeakTable(np.asarray(frame), np.full(n, np.nan) if time_s is None else np.asarray(time_s, float),
                         self.windows, self.peaks, values, present, success, redchi, message)

    def _fit_windows(self, intensity, sigma, usable) -> list[WindowResult]:
        """Every window over the block. The batched engine splits the frames between threads
        (NumPy releases the GIL in the heavy loops); lmfit goes frame by frame."""
        n = intensity.shape[0]
        if self.fit.engine == "lmfit":
            out = []
            for wi, model in enumerate(self.models):
                s = sigma[:, model.columns] if sigma is not None else None
                out.append(self._sequential(wi, model, intensity[:, model.columns], s, usable))
            return out
        workers = self.fit.workers or os.cpu_count() or 1
        parts = max(1, min(workers, n // 32))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        jobs = [(wi, slice(a, b)) for wi in range(len(self.models)) for a, b in zip(bounds[:-1], bounds[1:])]

        def run(job):
            wi, rows = job
            model = self.models[wi]
            s = sigma[rows, model.columns] if sigma is not None else None
            return fit_window(model, intensity[rows, model.columns], s, seeds=self._seed(wi), fit=self.fit,
                              usable=usable[rows])

        if parts > 1 or len(jobs) > 1 and workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(run, jobs))
        else:
            done = [run(j) for j in jobs]
        out = []
        for wi in range(len(self.models)):
            pieces = [r for (w, _), r in zip(jobs, done) if w == wi]
            res = pieces[0] if len(pieces) == 1 else _join_results(pieces)
            self._carry(wi, res)
            out.append(res)
        return out

    def _seed(self, wi: int) -> np.ndarray | None:
        return self.seeds[wi] if self.models[wi].spec.seed == "previous" else None

    def _carry(self, wi: int, res: WindowResult) -> None:
        """Keep each component's parameters from the last frame where its window succeeded and it
        was present (a failed frame never seeds the next)."""
        model = self.models[wi]
        for j in range(len(model.components)):
            ok = np.flatnonzero(res.success & res.present[:, j])
            if ok.size:
                self.seeds[wi][j] = res.full_params[ok[-1]][model.component_columns(j)]

    def resume(self, stored: Mapping[str, np.ndarray]) -> None:
        """Take the start values from results already written (rows before the resumed ones):
        ``stored`` holds the (frame, peak) arrays and ``success`` (frame, window). Components not
        found there start afresh."""
        for seeds in self.seeds:
            seeds[:] = np.nan
        col = 0
        for wi, model in enumerate(self.models):
            names = PROFILES[model.profile][2]
            for j in range(len(model.components)):
                ok = np.flatnonzero(stored["success"][:, wi] & stored["present"][:, col + j])
                if ok.size:
                    r = ok[-1]
                    src = {"fwhm": "fwhm", "eta": "shape", "m": "shape"}
                    self.seeds[wi][j] = [stored[src.get(name, name)][r, col + j] for name in names]
            col += len(model.components)

    def _sequential(self, wi: int, model: WindowModel, y, s, usable) -> WindowResult:
        parts = []
        for r in range(y.shape[0]):
            res = fit_window(model, y[r:r + 1], None if s is None else s[r:r + 1], seeds=self._seed(wi),
                             fit=self.fit, usable=usable[r:r + 1])
            self._carry(wi, res)
            parts.append(res)
        return _join_results(parts)


def _join_results(parts: Sequence[WindowResult]) -> WindowResult:
    return WindowResult({k: np.concatenate([p.values[k] for p in parts]) for k in PEAK_FIELDS},
                        np.concatenate([p.present for p in parts]), np.concatenate([p.success for p in parts]),
                        np.concatenate([p.redchi for p in parts]), np.concatenate([p.message for p in parts]),
                        np.concatenate([p.full_params for p in parts]))


def concat_tables(tables: Sequence[PeakTable]) -> PeakTable:
    """Join consecutive blocks."""
    t0 = tables[0]
    phase = None if t0.phase is None else {k: np.concatenate([t.phase[k] for t in tables]) for k in t0.phase}
    return PeakTable(np.concatenate([t.frame for t in tables]), np.concatenate([t.time_s for t in tables]),
                     t0.windows, t0.peaks, {k: np.concatenate([t.values[k] for t in tables]) for k in PEAK_FIELDS},
                     np.concatenate([t.present for t in tables]), np.concatenate([t.success for t in tables]),
                     np.concatenate([t.redchi for t in tables]), np.concatenate([t.message for t in tables]),
                     phase, t0.phase_names)


def fit_peaks(patterns, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(), *,
              progress: bool = False) -> PeakTable:
    """Fit ``windows`` as independent peaks in every frame of an in-memory
    :class:`~xrdpipe.run.store.Patterns` stack (whatever ``fit.model`` says; the phase model is
    :func:`xrdpipe.phasefit.fit_phases`).

    Frames that failed integration are kept as failed rows. For a run file on disk (streamed,
    resumable, written as it goes) use :func:`xrdpipe.run.fit.fit_experiment`.
    """
    status = np.asarray(patterns.frames.get("status", np.ones(len(patterns.intensity))))
    fitter = PeakFitter(phases, windows, fit, radial=patterns.radial, unit=patterns.unit,
                        wavelength_A=patterns.wavelength_A)
    sigma = patterns.sigma
    n = patterns.intensity.shape[0]
    usable = status == 1
    reasons = [("frame not integrated: " + str(m)) if not u else "" for u, m in
               zip(usable, patterns.frames.get("message", [""] * n))]
    blocks = []
    step = fit.block_frames
    for b in range(0, n, step):
        sl = slice(b, min(n, b + step))
        blocks.append(fitter.fit_block(patterns.intensity[sl], None if sigma is None else sigma[sl],
                                       frame=np.arange(n)[sl], time_s=patterns.frames.get("time_s", np.full(n, np.nan))[sl],
                                       usable=usable[sl], reasons=reasons[sl]))
    return concat_tables(blocks)
