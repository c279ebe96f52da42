"""Levenberg-Marquardt for many small least-squares problems at once (NumPy; each iteration's
damped systems and the acceptance of its steps compiled, :mod:`xrdpipe.kernels.batch`).

Each row of a batch is one problem: the same model and the same abscissa, its own data, weights,
start values and bounds. Every iteration works on the rows that have not converged yet, with one
damping factor per row, so a batch of a thousand frames costs about as much Python as one
frame. Bounds are kept by projection: a parameter at a bound whose gradient points outwards is
held there for the step (so an absent peak's area rests at 0 instead of going negative).

This is the fast path of :mod:`xrdpipe.peaks`; ``tests/test_peaks.py`` checks that it finds the
same minimum as lmfit on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import kernels

__all__ = ["BatchResult", "least_squares_batch"]

# Why a row stopped (``BatchResult.status``).
CONVERGED, MAX_ITER, NOT_FINITE = 1, 0, -1


@dataclass
class BatchResult:
    """Solutions of a batch: parameters ``p`` (n, k), unscaled covariance ``cov`` (n, k, k)
    (NaN for parameters at a bound or without influence, and in rows whose covariance was not
    asked for), ``chi2`` (n,), valid points ``n_points``
    (n,), iterations ``n_iter`` (n,), ``status`` (n,) and ``at_bound`` (n, k)."""

    p: np.ndarray
    cov: np.ndarray
    chi2: np.ndarray
    n_points: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    at_bound: np.ndarray

    @property
    def success(self) -> np.ndarray:
        return self.status == CONVERGED


def least_squares_batch(fun: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], p0: np.ndarray,
                        y: np.ndarray, w: np.ndarray, *, lower: np.ndarray, upper: np.ndarray,
                        fixed: np.ndarray | None = None, max_iter: int = 200, ftol: float = 1e-8,
                        xtol: float = 1e-8, stat_tol: float = 1e-3,
                        amplitudes: list[tuple[int, tuple[int, ...]]] | None = None,
                        weak_z: float = 2.0, must_move: np.ndarray | None = None,
                        must_descend: np.ndarray | None = None,
                        covariance: np.ndarray | None = None,
                        normal: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                                         tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                        iterate: Callable | None = None) -> BatchResult:
    """Minimise ``sum(w**2 * (y - f(p))**2)`` row by row.

    Parameters
    ----------
    fun : ``fun(p)`` with ``p`` of shape (r, k) returns the model (r, m) and its Jacobian (r, k, m)
    p0 : start values (n, k), clipped into the bounds
    y, w : data and weights (n, m); a weight of 0 drops a point (give ``y`` finite there)
    lower, upper : bounds (n, k) or (k,); use ``±inf`` for none
    fixed : (k,) or (n, k) booleans: parameters held at their start value
    max_iter : iterations per row at most
    ftol, xtol : a row converges when an accepted step lowers chi² by less than ``ftol`` relative,
        or moves no parameter by more than ``xtol`` relative (lmfit's leastsq uses 1.5e-8 for both)
    stat_tol : ... or lowers chi² by less than ``stat_tol`` times chi² per point: a gain far below
        the noise (an almost empty component creeping after a noise spike would otherwise run on);
        a lightly damped step that moves every parameter by less than 1 % of its standard error
        also ends the fit
    amplitudes, weak_z : ``(amplitude column, shape columns)`` per peak: from the fourth iteration
        on, a peak whose amplitude is below ``weak_z`` times its (conditional) standard error has
        its shape parameters held, so that a nearly empty peak stops wandering after noise; its
        amplitude stays free (this is what makes a batch of mostly absent peaks converge in a few
        steps)
    must_move : (n,) booleans: rows that are not taken as converged before they have taken a
        step where the step (cut by the bounds) promises a rise of chi²; by default a row whose
        lightly damped step promises less than the tolerance is done, even at its start
    must_descend : (n,) booleans: rows never taken as converged on a step that promises a rise
        (a step cut by the bounds: the quadratic model says nothing there), at any iteration;
        such a step is tried and damped like any other, and the row ends where a step promises a
        fall below the tolerance or the step sizes and chi² stop moving
    covariance : the rows whose covariance is wanted (indices or booleans; default all): an
        inverse per row, of which a caller that uses one row's needs no other
    normal : ``normal(p, y, w, held)`` returns chi², JᵀW²J and JᵀW²r (r,), (r, k, k), (r, k)
        directly, in place of ``fun`` and the products of its dense Jacobian (a model whose
        Jacobian is mostly zeros sums only what is not); ``held`` (r, k) are the rows' ``fixed``
        columns, whose entries are not used but for the curvature's diagonal where the parameter
        is not 0 (so a part of the model that only a parameter held at 0 moves may be left out)
    iterate : the iterations themselves, compiled for one model: called as :func:`_iterate`
        (without its first argument; ``amplitudes`` as the pair of :func:`_amplitude_map`, empty
        arrays where there are none),
        returns chi², JᵀW²J, the iterations and the status per row, ``p`` updated in place; it
        must take the same steps (:meth:`xrdpipe.phasefit.PhaseModel.iterate`)

    Example
    -------
    >>> x = np.linspace(0, 1, 5)
    >>> f = lambda p: (p[:, :1] + p[:, 1:] * x, np.stack(np.broadcast_arrays(np.ones((len(p), 5)), p[:, 1:] * 0 + x), 1))
    >>> r = least_squares_batch(f, np.zeros((2, 2)), np.array([1 + 2 * x, 3 - x]), np.ones((2, 5)),
    ...                         lower=np.full(2, -np.inf), upper=np.full(2, np.inf))
    >>> np.round(r.p, 6).tolist()
    [[1.0, 2.0], [3.0, -1.0]]
    """
    n, k = p0.shape
    lower = np.broadcast_to(np.asarray(lower, float), (n, k))
    upper = np.broadcast_to(np.asarray(upper, float), (n, k))
    fixed = np.zeros((n, k), bool) if fixed is None else np.broadcast_to(np.asarray(fixed, bool), (n, k))
    for name, rows in (("must_move", must_move), ("must_descend", must_descend)):
        if rows is not None and np.shape(rows) != (n,):
            raise ValueError(f"least_squares_batch: {name} must be one boolean per row, shape ({n},); "
                             f"got shape {np.shape(rows)}")
    p = np.clip(np.asarray(p0, float), lower, upper)
    y = np.asarray(y, float)
    w = np.asarray(w, float)
    n_points = np.count_nonzero(w > 0, axis=1)
    stop = np.maximum(ftol, stat_tol / np.maximum(n_points, 1))

    if iterate is not None:
        chi2, hess, n_iter, status = iterate(p, y, w, lower, upper, fixed, stop, max_iter=max_iter, xtol=xtol,
                                             amplitudes=_amplitude_map(amplitudes) or _NO_PEAKS, weak_z=weak_z,
                                             must_move=must_move, must_descend=must_descend)
    else:
        normal_eq = _normal_equations(fun, normal)
        chi2, hess, n_iter, status = _iterate(normal_eq, p, y, w, lower, upper, fixed, stop, max_iter=max_iter,
                                              xtol=xtol, amplitudes=amplitudes, weak_z=weak_z,
                                              must_move=must_move, must_descend=must_descend)
    at_bound = (p <= lower) | (p >= upper) | fixed
    if covariance is None:
        cov = _covariance(hess, at_bound)
    else:
        cov = np.full(hess.shape, np.nan)
        cov[covariance] = _covariance(hess[covariance], at_bound[covariance])
    return BatchResult(p, cov, chi2, n_points, n_iter, status, at_bound)


def _normal_equations(fun, normal):
    """``normal_eq(p, y, w, held)`` -> chi², JᵀW²J, JᵀW²r: ``normal`` itself, or the products of
    the dense Jacobian of ``fun``."""
    if normal is not None:
        return normal

    def normal_eq(p, y, w, _held):
        f, jac = fun(p)
        return _normal(y, w, f, jac)
    return normal_eq


def _iterate(normal_eq, p, y, w, lower, upper, fixed, stop, *, max_iter, xtol, amplitudes, weak_z,
             must_move=None, must_descend=None):
    """The damped Gauss-Newton iterations of every row, ``p`` updated in place; returns chi²,
    JᵀW²J, the iterations and the status per row."""
    chi2, hess, grad = normal_eq(p, y, w, fixed)
    n = len(p)
    lam = np.full(n, 1e-3)
    status = np.full(n, MAX_ITER, np.int8)
    status[~np.isfinite(chi2)] = NOT_FINITE
    n_iter = np.zeros(n, np.int32)
    # rows that have taken a step (or need not have, to be done)
    moved = np.ones(n, bool) if must_move is None else ~np.asarray(must_move, bool)
    # rows that may end on a step promising a rise once they have moved (not ``must_descend``)
    rise_ends = np.ones(n, bool) if must_descend is None else ~np.asarray(must_descend, bool)
    active = np.flatnonzero(status == MAX_ITER)
    amplitudes = _amplitude_map(amplitudes)

    for it in range(max_iter):
        if active.size == 0:
            break
        g, pa, h, diag, trial = _damped_step(p[active], grad[active], hess[active], lam[active],
                                             lower[active], upper[active], fixed[active],
                                             amplitudes if it >= 2 else None, weak_z)
        # a nearly undamped step that promises (Gauss-Newton) less than the tolerance: done,
        # without spending an evaluation to confirm it (with ``must_move``, not a row that has
        # not moved yet and whose step, cut by the bounds, promises a rise: the quadratic model
        # says nothing there)
        d = trial - pa
        promise = 2 * np.einsum("rk,rk->r", d, g) - np.einsum("rk,rkl,rl->r", d, h, d)
        settled = ((lam[active] <= 1e-2) & (promise <= stop[active] * chi2[active]) & (it > 0)
                   & ((moved[active] & rise_ends[active]) | (promise >= 0)))
        if settled.any():
            status[active[settled]] = CONVERGED
            keep = ~settled
            active, pa, trial, diag = active[keep], pa[keep], trial[keep], diag[keep]
            if active.size == 0:
                break
        n_iter[active] += 1
        before = chi2[active]
        done = _take_step(active, pa, trial, diag, normal_eq(trial, y[active], w[active], fixed[active]),
                          p, chi2, hess, grad, lam, stop[active], xtol)
        moved[active[chi2[active] < before]] = True
        status[active[done]] = CONVERGED
        active = active[~done]
    return chi2, hess, n_iter, status


def _damped_step(pa, g, h, lam, lo, hi, fixed, amplitudes, weak_z):
    """The Levenberg-Marquardt trial point of the active rows: parameters at a bound that the
    gradient pushes out, fixed ones and (with ``amplitudes``) the shape of weak peaks are held
    (:func:`xrdpipe.kernels.damped_systems`). Returns the gradient, parameters, curvature, its
    diagonal and the trial point."""
    damped, rhs = np.empty_like(h), np.empty_like(g)
    cols, shape = amplitudes if amplitudes is not None else _NO_PEAKS
    kernels.damped_systems(h, g, pa, lo, hi, fixed, lam, cols, shape, float(weak_z), damped, rhs)
    step = _solve(damped, rhs)
    return g, pa, h, np.diagonal(h, axis1=1, axis2=2), np.clip(pa + step, lo, hi)


_NO_PEAKS = (np.zeros(0, np.int64), np.zeros((0, 1), np.int64))


def _amplitude_map(amplitudes):
    """``(amplitude column, shape columns)`` pairs as the amplitude columns (A,) and the shape
    columns each holds (A, most), padded with -1, or None if there are none."""
    if not amplitudes:
        return None
    cols = np.array([a for a, _ in amplitudes], np.int64)
    shape = np.full((cols.size, max(len(s) for _, s in amplitudes)), -1, np.int64)
    for j, (_, held) in enumerate(amplitudes):
        shape[j, :len(held)] = held
    return cols, shape


def _take_step(active, pa, trial, diag, evaluated, p, chi2, hess, grad, lam, stop, xtol):
    """Accept the trial points that lower chi² (in place in ``p``, ``chi2``, ``hess``, ``grad``),
    adapt the damping ``lam`` and return which active rows have converged
    (:func:`xrdpipe.kernels.take_steps`)."""
    chi2_t, hess_t, grad_t = evaluated
    done = np.zeros(active.size, bool)
    kernels.take_steps(active, pa, trial, np.ascontiguousarray(diag), chi2_t, hess_t, grad_t, p, chi2, hess, grad, lam,
                       stop, float(xtol), done)
    return done


def _normal(y, w, f, jac):
    """chi², JᵀWJ and JᵀW r for residuals of a batch; ``jac`` is (r, k, m)."""
    r = w * (y - f)
    jw = np.multiply(jac, w[:, None, :], out=jac)  # the Jacobian is ours: weight it in place
    chi2 = np.einsum("ij,ij->i", r, r)
    return chi2, np.matmul(jw, jw.transpose(0, 2, 1)), np.matmul(jw, r[:, :, None])[:, :, 0]


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve each system; a singular one falls back to least squares on its own, so a row's
    result never depends on the other rows of the batch."""
    try:
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.zeros_like(b)
        for i in range(a.shape[0]):
            try:
                out[i] = np.linalg.solve(a[i:i + 1], b[i:i + 1, :, None])[0, :, 0]
            except np.linalg.LinAlgError:
                out[i] = np.linalg.lstsq(a[i], b[i], rcond=None)[0]
        return out


def _block_covariance(h: np.ndarray) -> np.ndarray:
    """inv(h) of one free block (k, k) as :func:`_covariance` makes it: scaled to unit diagonal,
    inverted, scaled back; the estimable part where it is singular or not a covariance."""
    d = np.sqrt(np.diagonal(h))
    scale = d[:, None] * d[None, :]
    hs = h / scale
    try:
        c = np.linalg.inv(hs) / scale
    except np.linalg.LinAlgError:
        return _estimable_covariance(hs) / np.outer(d, d)
    if not np.isfinite(c).all() or (np.diagonal(c) < 0).any():
        return _estimable_covariance(hs) / np.outer(d, d)
    return c


def _covariance(hess: np.ndarray, held: np.ndarray) -> np.ndarray:
    """inv(JᵀWJ) over the parameters that are free and have influence; NaN elsewhere. Only that
    block is inverted (rows with the same such parameters together): a frame of the phase model
    has 54 columns of which ~27 move, and the whole matrix with ones on the others' diagonal
    took three times as long to invert."""
    n, k, _ = hess.shape
    diag = np.diagonal(hess, axis1=1, axis2=2)
    live = ~held & (diag > 0)
    cov = np.full((n, k, k), np.nan)
    if n == 1:        # (one row, the phase model's frames: its block as a matrix, the same numbers)
        idx = np.flatnonzero(live[0])
        if idx.size:
            cov[0][idx[:, None], idx] = _block_covariance(hess[0][idx[:, None], idx])
        return cov
    if n == 1 or (live == live[0]).all():
        groups = [(live[0], np.arange(n))]
    else:
        masks, which = np.unique(live, axis=0, return_inverse=True)
        groups = [(mask, np.flatnonzero(which.reshape(-1) == g)) for g, mask in enumerate(masks)]
    for mask, rows in groups:
        idx = np.flatnonzero(mask)
        if not idx.size:
            continue
        block = np.ix_(rows, idx, idx)
        h = hess[block]
        # scale to unit diagonal before inverting: the parameters span many orders of magnitude
        d = np.sqrt(np.diagonal(h, axis1=1, axis2=2))
        hs = h / (d[:, :, None] * d[:, None, :])
        singular = np.zeros(rows.size, bool)
        try:
            inv = np.linalg.inv(hs)
        except np.linalg.LinAlgError:     # row by row, so one singular row leaves the others alone
            inv = np.empty_like(hs)
            for i in range(rows.size):
                try:
                    inv[i] = np.linalg.inv(hs[i:i + 1])[0]
                except np.linalg.LinAlgError:
                    singular[i] = True
        c = inv / (d[:, :, None] * d[:, None, :])
        bad = singular | ~np.isfinite(c).all(axis=(1, 2)) | (np.diagonal(c, axis1=1, axis2=2) < 0).any(axis=1)
        for i in np.flatnonzero(bad):
            c[i] = _estimable_covariance(hs[i]) / np.outer(d[i], d[i])
        cov[block] = c
    return cov


def _estimable_covariance(hs: np.ndarray) -> np.ndarray:
    """The covariance of a singular (unit-diagonal) normal matrix ``hs`` (k, k): NaN for every
    parameter that takes part in a direction the data do not determine (two areas of one line:
    only their sum is known), the pseudo-inverse's elsewhere, which is the covariance of what
    the data do determine (a cell beside those two areas). Before, one such pair took every
    esd of the frame with it."""
    w, v = np.linalg.eigh(hs)
    keep = w > max(float(w.max()), 0.0) * hs.shape[0] * 1e-12
    out = (v[:, keep] / w[keep]) @ v[:, keep].T
    loose = (np.abs(v[:, ~keep]) > 1e-6).any(axis=1)
    out[loose, :] = np.nan
    out[:, loose] = np.nan
    return out
