"""Least squares: Levenberg-Marquardt on the weighted residuals (Le Bail intensities re-extracted
every step, held from a previous frame at first), Pawley by variable projection, and the
linear solves (non-negative intensities and background) both use.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .lebail import lebail_cycle

#                               alone (Gaussian < 1e-120, asymmetry < e^-100 there) summed where used
LEBAIL_CYCLES = 8             # Le Bail extractions per least-squares iteration
LEBAIL_CYCLES_FOLLOW = 30     # ... from a previous frame: accelerated, at most this many ...
LEBAIL_CYCLE_TOL = 1e-5       # ... until the intensities change by less than this (relative)
SHIFT_ESD = 0.01              # converged when every shift is below 1 % of its esd (Rietveld)
LEBAIL_TOL = 1e-3
SHIFT_ESD_LEBAIL = 0.05       # ... 5 % in Le Bail, whose intensities are re-extracted every step
HOLD_ITERATIONS = 20          # Le Bail from a previous frame: at most this many steps with its intensities held
HOLD_TOL = 5e-2               # ... and fewer once χ² falls by less than 5 % in a step
PRED_TOL = 0.01               # Pawley: converged once a step would lower χ² by less than this x χ²/dof


def _scaled_normal(Jw: np.ndarray, r: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """The Levenberg-Marquardt normal equations of the parameters ``t`` not pinned at a bound
    (at a bound with the gradient pushing outwards): their indices, the scaled normal matrix,
    the scaled gradient and the scales; None when every parameter is pinned."""
    g = Jw.T @ r
    pinned = ((t <= lo) & (g < 0)) | ((t >= hi) & (g > 0))
    move = np.flatnonzero(~pinned)
    if move.size == 0:
        return None
    Jm = Jw[:, move]
    A = Jm.T @ Jm
    dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
    return move, A / np.outer(dscale, dscale), g[move] / dscale, dscale


def _lm_step(calc, theta, I, free, As, gs, dscale, wt, y, chi2_now, lam, bounds):
    """One Levenberg-Marquardt step on the scaled normal equations ``As``, ``gs`` (scaled by
    ``dscale``), kept inside the bounds: (step, θ, λ, χ²) after it, or step None (θ unchanged)
    when no damping lowers χ²."""
    lower, upper = bounds
    for _ in range(12):
        try:
            step = np.linalg.solve(As + lam * np.eye(As.shape[0]), gs) / dscale
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        t_new = theta.copy()
        t_new[free] = np.clip(t_new[free] + step, lower[free], upper[free])
        rn = (y - calc.pattern(t_new, I)) * wt
        c_new = float(rn @ rn)
        if np.isfinite(c_new) and c_new < chi2_now:
            return t_new[free] - theta[free], t_new, max(lam / 5, 1e-9), c_new
        lam *= 8
    return None, theta, lam, chi2_now


def _evaluate(calc, theta, I, free, y, wt, *, extracting: bool, follow: bool):
    """The intensities, weighted residual and Jacobian and χ² at ``theta``. Extracting from a
    previous frame (cells close), the extraction runs to its fixed point at every step
    (accelerated), so overlapping phases no longer creep there step by step; from far starts a
    few plain cycles, whose partial extraction keeps a wrong phase from fitting another's
    misplaced peaks."""
    if extracting and follow:            # (the profiles are computed once for both)
        I = lebail_cycle(calc, theta, I, y, cycles=LEBAIL_CYCLES_FOLLOW, tol=LEBAIL_CYCLE_TOL)
    yc, J, I_used = calc.jacobian(theta, I, free, extract_from=y if extracting and not follow else None,
                                  cycles=LEBAIL_CYCLES)
    if extracting:
        I = I_used
    r = (y - yc) * wt
    return I, r, J * wt[:, None], float(r @ r)


class _FixedPointWatch:
    """From a previous frame: where χ² after the re-extraction rose in two steps in a row, the
    least-squares step and the extraction pull apart (the background and the intensities of
    overlapping lines creep together, half an esd a step, for ever): the best state met
    (``best`` = (χ², θ, I)) is the Le Bail fixed point."""

    def __init__(self):
        self.best, self.last, self.rises = None, np.inf, 0

    def pulled_apart(self, chi2, theta, I) -> bool:
        self.rises = self.rises + 1 if self.best is not None and chi2 > self.last else 0
        self.last = chi2
        if self.best is None or chi2 < self.best[0]:
            self.best = (chi2, theta, I)
        return self.rises >= 2


def _lm(calc, y, wt, theta, I, free, *, max_iter, tol, hold, n_valid, bounds, follow=False):
    """Levenberg-Marquardt over the parameters ``free`` (Le Bail: intensities re-extracted at
    every step, or first held at ``I`` with ``hold``). A parameter at a bound that the gradient
    pushes outward is left out of a step. Returns θ, I, converged, steps taken."""
    lower, upper = bounds
    lebail = calc.any_extracted
    n_iter = 0
    converged = False
    lam = 1e-3
    chi2 = None
    held = 0
    outer = 0
    watch = _FixedPointWatch()
    if free.size == 0:
        return theta, I, True, 0
    while outer < max_iter:
        extracting = lebail and not hold
        I, r, Jw, chi2_now = _evaluate(calc, theta, I, free, y, wt, extracting=extracting, follow=follow)
        if extracting and follow and watch.pulled_apart(chi2_now, theta, I):
            _, theta, I = watch.best
            converged = True
            break
        if hold:
            if held >= HOLD_ITERATIONS or (chi2 is not None and chi2 - chi2_now <= HOLD_TOL * chi2_now):
                hold, chi2, lam = False, None, 1e-3     # the held stage is done: now extract
                continue
        # Le Bail: the re-extracted intensities converge slowly (a fixed point), so it stops,
        # as GSAS-II does, once χ² changes by less than 0.1 % in an iteration
        elif chi2 is not None and abs(chi2 - chi2_now) <= (max(tol, LEBAIL_TOL) if lebail else tol) * chi2_now \
                and outer > 1:
            converged = True
            break
        chi2 = chi2_now
        normal = _scaled_normal(Jw, r, theta[free], lower[free], upper[free])
        if normal is None:
            converged = True
            break
        move, As, gs, dscale = normal
        step, theta, lam, c_new = _lm_step(calc, theta, I, free[move], As, gs, dscale, wt, y, chi2_now, lam, bounds)
        n_iter += 1
        if hold:
            held += 1
            if step is None:
                held = HOLD_ITERATIONS
            continue
        if step is None:
            converged = not lebail or outer > 2
            break
        # converged when every shift is a small fraction of its esd (as Rietveld programs do)
        if outer >= (2 if lebail else 1) and _shifts_below(step, As, dscale, c_new, max(n_valid - free.size, 1),
                                                           SHIFT_ESD_LEBAIL if lebail else SHIFT_ESD):
            converged = True
            break
        outer += 1
    return theta, I, converged, n_iter


def pawley_solve(calc, theta: np.ndarray, y: np.ndarray, wt: np.ndarray, phases: Sequence[int] | None):
    """Pawley's linear part at ``theta``: χ², the intensities, θ with the background terms set,
    and the basis (see :func:`linear_core`)."""
    rows = np.flatnonzero(wt > 0)
    c2, I, bk, extra = linear_core(calc, theta, y * wt, wt, rows, phases, calc.groups)
    t = theta.copy()
    if calc.model.background_terms and extra is not None:
        t[[calc.layout.index[f"bkg_{j}"] for j in range(calc.model.background_terms)]] = bk
    return c2, I, t, extra


def _shifts_below(shift: np.ndarray, As: np.ndarray, dscale: np.ndarray, chi2: float, dof: int,
                  limit: float) -> bool:
    """Every shift at most ``limit`` of its esd (from the scaled normal matrix ``As`` and the
    reduced χ², ``chi2 / dof``); False when the matrix cannot be inverted."""
    try:
        var = np.diag(np.linalg.inv(As)) / dscale**2 * chi2 / dof
    except np.linalg.LinAlgError:
        return False
    return bool(np.all(np.abs(shift) <= limit * np.sqrt(np.maximum(var, 1e-300))))


def _pawley_step(calc, y, wt, theta, cols, As, gs, dscale, lam: float, unit: float, chi2: float, bounds, phases):
    """One damped step of the Pawley parameters ``cols``: the damping raised until χ² (the
    intensities and background solved again) falls. Returns the accepted trial (None when no
    damping lowers χ²), whether the minimum was reached before any trial (the fall the linear
    model predicts is below ``unit``), and the damping for the next step."""
    lower, upper = bounds
    for _ in range(12):
        try:
            ds = np.linalg.solve(As + lam * np.eye(As.shape[0]), gs)
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        # the fall of χ² the linear model predicts: below a hundredth of a reduced χ², the
        # minimum is reached (no trial, which would only meet the rounding of χ²)
        if 2 * gs @ ds - ds @ As @ ds <= unit:
            return None, True, lam
        t_new = theta.copy()
        t_new[cols] = np.clip(t_new[cols] + ds / dscale, lower[cols], upper[cols])
        trial = pawley_solve(calc, t_new, y, wt, phases)
        if trial[3] is not None and np.isfinite(trial[0]) and trial[0] < chi2:
            return trial, False, max(lam / 5, 1e-9)
        lam *= 8
    return None, False, lam


def _lm_pawley(calc, y, wt, theta, free, *, max_iter, tol, n_valid, bounds, phases):
    """Pawley by variable projection: Levenberg-Marquardt over the nonlinear parameters of
    ``free`` (cells, zero, widths, asymmetry); at every trial the intensities (non-negative) and
    the background are solved linearly, and the step uses the projected Jacobian
    (:func:`_project`). Returns θ, I, converged, steps taken."""
    L = calc.layout
    lower, upper = bounds
    nl = np.array([i for i in free if L.params[i].kind != "bkg"], int)
    chi2, I, theta, extra = pawley_solve(calc, theta, y, wt, phases)
    if extra is None:
        return theta, I, False, 0
    if nl.size == 0:
        return theta, I, True, 0
    rows = extra["rows"]
    lam, n_iter, converged = 1e-3, 0, False
    for _ in range(max_iter):
        yc, J, _ = calc.jacobian(theta, I, nl)
        Jw = _project(extra, (J * wt[:, None])[rows])
        r = ((y - yc) * wt)[rows]
        normal = _scaled_normal(Jw, r, theta[nl], lower[nl], upper[nl])
        if normal is None:
            converged = True
            break
        move, As, gs, dscale = normal
        unit = PRED_TOL * max(chi2 / max(n_valid - free.size, 1), 1.0)
        accepted, settled, lam = _pawley_step(calc, y, wt, theta, nl[move], As, gs, dscale, lam, unit, chi2,
                                              bounds, phases)
        if settled:
            converged = True
            break
        n_iter += 1
        if accepted is None:                 # no damping lowers χ²: at the minimum
            converged = True
            break
        c_new, I, t_new, extra = accepted
        shift = t_new[nl[move]] - theta[nl[move]]
        theta, drop, chi2 = t_new, chi2 - c_new, c_new
        # converged when every shift is a small fraction of its esd, or χ² no longer moves
        if _shifts_below(shift, As, dscale, c_new, max(n_valid - free.size, 1), SHIFT_ESD) or drop <= tol * chi2:
            converged = True
            break
    return theta, I, converged, n_iter


def minimise(calc, y, wt, theta, I, cols, *, max_iter, tol, hold, n_valid, bounds, absent: Sequence[int] = (),
             follow: bool = False):
    """Least squares over ``cols``: Pawley (:func:`_lm_pawley`, the phases not ``absent``) or
    Le Bail / Rietveld (:func:`_lm`)."""
    if calc.pawley:
        phases = [p for p in range(len(calc.model.phases)) if p not in set(absent)]
        return _lm_pawley(calc, y, wt, theta, cols, max_iter=max_iter, tol=tol, n_valid=n_valid, bounds=bounds,
                          phases=phases)
    return _lm(calc, y, wt, theta, I, cols, max_iter=max_iter, tol=tol, hold=hold, n_valid=n_valid, bounds=bounds,
               follow=follow)


def linear_fit(calc, theta: np.ndarray, yw: np.ndarray, wt: np.ndarray, rows: np.ndarray,
               phases: Sequence[int] | None = None, full: bool = True):
    """χ² of the best pattern at ``theta`` with free non-negative reflection intensities and a
    free background (the points ``rows`` only), the intensities and the background terms.
    ``full=False`` (the trial cells of the search): each profile within ±NEAR_FWHM only (the
    far Lorentzian tail, about 1 % of a profile's area at η = 0.4, is left to the background),
    at a fraction of the cost."""
    c2, inten, bk, _ = linear_core(calc, theta, yw, wt, rows, phases, full=full)
    return c2, inten, bk


def linear_core(calc, theta: np.ndarray, yw: np.ndarray, wt: np.ndarray, rows: np.ndarray,
                phases: Sequence[int] | None = None, groups: tuple | None = None, pr: dict | None = None,
                full: bool = True):
    """The linear part of a pattern at ``theta``: non-negative intensities (one per reflection,
    or per overlap group of ``groups`` = (group of each reflection, its share, number of
    groups), split by the shares) and the background, by least squares over the points
    ``rows``. Returns χ², the intensity of every reflection, the background terms and what
    :func:`_project` and the Pawley covariance need (the weighted basis and its normal
    matrix). ``full=False``: the profiles within ±NEAR_FWHM only."""
    import scipy.sparse as sp
    from scipy.optimize import nnls

    n_refl = int(calc.offsets[-1])
    if pr is None:                           # the profiles of the phases used only
        ones = np.ones(n_refl)
        if phases is not None:
            ones[:] = 0.0
            for p in phases:
                ones[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 1.0
        st = calc.reflection_state(theta, ones)
        pr = calc.profiles(st, theta, full=full)
    gidx, share, n_col = (np.arange(n_refl), np.ones(n_refl), n_refl) if groups is None else groups
    rowmap = np.full(calc.x.size, -1)
    rowmap[rows] = np.arange(rows.size)
    sel = rowmap[pr["idx"]] >= 0
    if phases is not None:
        use = np.zeros(n_refl, bool)
        for p in phases:
            use[int(calc.offsets[p]):int(calc.offsets[p + 1])] = True
        sel &= use[pr["r"]]
    r_i = rowmap[pr["idx"][sel]]
    c_i = pr["r"][sel]
    vals = pr["P"][sel] * wt[pr["idx"][sel]] * share[c_i]
    if groups is None:                       # the entries are in column order already
        ptr = np.concatenate([[0], np.cumsum(np.bincount(c_i, minlength=n_col))])
        M = sp.csc_matrix((vals, r_i, ptr), shape=(rows.size, n_col))
    else:
        M = sp.csr_matrix((vals, (r_i, gidx[c_i])), shape=(rows.size, n_col))
    B = calc.cheb[rows] * wt[rows, None]
    yv = yw[rows]
    amm = (M.T @ M).toarray()
    amb = np.asarray(M.T @ B)
    abb = B.T @ B
    bm = np.asarray(M.T @ yv).ravel()
    bb = B.T @ yv
    fail = (np.inf, np.zeros(n_refl), np.zeros(B.shape[1]), None)
    try:
        S = np.linalg.solve(abb + 1e-12 * np.trace(abb) * np.eye(abb.shape[0]), np.column_stack([amb.T, bb]))
        ar = amm - amb @ S[:, :n_col]
        br = bm - amb @ S[:, n_col]
        ridge = 1e-10 * max(np.trace(ar) / max(n_col, 1), 1e-300)
        lc = np.linalg.cholesky(ar + ridge * np.eye(n_col))
        inten, _ = nnls(lc.T, np.linalg.solve(lc, br), maxiter=20 * n_col)
    except (np.linalg.LinAlgError, RuntimeError):
        return fail
    bk = S[:, n_col] - S[:, :n_col] @ inten
    res = yv - M @ inten - B @ bk
    extra = {"M": M, "B": B, "amm": amm, "amb": amb, "abb": abb, "G": inten, "rows": rows}
    return float(res @ res), inten[gidx] * share, bk, extra


def _project(extra: dict, Jw: np.ndarray) -> np.ndarray:
    """Variable projection (Kaufman): the weighted Jacobian ``Jw`` (rows of ``extra['rows']``)
    with its part in the span of the active linear basis (intensities above zero, background)
    removed, so a Gauss-Newton step accounts for the intensities and background following."""
    act = np.flatnonzero(extra["G"] > 0)
    M, B = extra["M"][:, act], extra["B"]
    n_a = act.size
    N = np.zeros((n_a + B.shape[1],) * 2)
    N[:n_a, :n_a] = extra["amm"][np.ix_(act, act)]
    N[:n_a, n_a:] = extra["amb"][act]
    N[n_a:, :n_a] = extra["amb"][act].T
    N[n_a:, n_a:] = extra["abb"]
    rhs = np.vstack([np.asarray(M.T @ Jw), B.T @ Jw])
    d = np.sqrt(np.maximum(np.diag(N), 1e-300))
    coef = np.linalg.lstsq(N / np.outer(d, d), rhs / d[:, None], rcond=1e-12)[0] / d[:, None]
    return Jw - (M @ coef[:n_a]) - B @ coef[n_a:]
