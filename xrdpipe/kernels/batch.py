"""The batched least squares' kernels (:mod:`xrdpipe.batchfit`): the damped system of every
active row (:func:`damped_systems`) and the acceptance of its trial point (:func:`take_steps`),
element for element what their NumPy forms compute."""

from __future__ import annotations

import numpy as np

from .base import _kernel


@_kernel
def damped_systems(h, g, pa, lo, hi, fixed, lam, amp_cols, amp_shape, weak_z, damped, rhs):  # pragma: no cover - compiled
    """The Levenberg-Marquardt systems ``damped`` (r, k, k) and right-hand sides ``rhs`` (r, k) of
    rows with curvature ``h`` (r, k, k), gradient ``g`` and parameters ``pa`` (r, k) within
    ``lo``, ``hi``, damping ``lam`` (r,).

    Held: the ``fixed`` parameters, those at a bound that the gradient pushes out, and the shape
    columns ``amp_shape[j]`` (-1: none) of a weak peak, whose amplitude ``pa[:, amp_cols[j]]`` is
    below ``weak_z`` times its conditional standard error (no peaks: ``amp_cols`` empty). A held
    parameter's row and column are those of the identity, its right-hand side 0. The damping
    adds ``lam`` times the diagonal (Marquardt's scaling, 1 where it is not positive).

    Every entry gets the operations of the NumPy expressions it replaces, in their order: the
    damping's product with the identity's 0 off the diagonal, the mask by a product with 0 or 1
    and the identity's sum (an entry's sign of zero included)."""
    n, k = pa.shape
    hold = np.zeros(k, np.bool_)
    scale = np.zeros(k)
    for r in range(n):
        for c in range(k):
            hold[c] = fixed[r, c] or (pa[r, c] <= lo[r, c] and g[r, c] < 0) or (pa[r, c] >= hi[r, c] and g[r, c] > 0)
        for j in range(amp_cols.size):
            a = amp_cols[j]
            d = h[r, a, a]
            if d < 0:
                d = 0.0
            if abs(pa[r, a]) * np.sqrt(d) < weak_z:
                for s in range(amp_shape.shape[1]):
                    if amp_shape[j, s] >= 0:
                        hold[amp_shape[j, s]] = True
        for c in range(k):
            d = h[r, c, c]
            scale[c] = d if d > 0 else 1.0
        for a in range(k):
            t = lam[r] * scale[a]
            for b in range(k):
                v = h[r, a, b] + t * (1.0 if a == b else 0.0)
                v = v * (0.0 if hold[a] or hold[b] else 1.0)
                damped[r, a, b] = v + (1.0 if a == b and hold[a] else 0.0)
            rhs[r, a] = 0.0 if hold[a] else g[r, a]


@_kernel
def take_steps(active, pa, trial, diag, chi2_t, hess_t, grad_t, p, chi2, hess, grad, lam, stop, xtol, done):  # pragma: no cover - compiled
    """Accept the trial points ``trial`` of the rows ``active`` (parameters ``pa``, curvature
    diagonal ``diag`` there) that lower chi²: their ``chi2_t``, ``hess_t``, ``grad_t`` replace
    the rows of ``p``, ``chi2``, ``hess``, ``grad``; the damping ``lam`` falls tenfold (to 1e-12
    at least) where accepted and rises tenfold where not. ``done`` (active,): a row accepted
    whose chi² fell by at most ``stop`` relative, or that moved every parameter by at most
    ``xtol`` relative, or by at most 1 % of its conditional esd with little damping; or a row
    refused whose step was that small or whose damping passed 1e12."""
    k = pa.shape[1]
    for i in range(active.size):
        a = active[i]
        old = chi2[a]
        better = np.isfinite(chi2_t[i]) and chi2_t[i] < old
        small_step = True
        tiny = True
        for c in range(k):
            move = abs(trial[i, c] - pa[i, c])
            if not move <= xtol * (abs(pa[i, c]) + xtol):
                small_step = False
            d = diag[i, c]
            if d < 0:
                d = 0.0
            if not move * np.sqrt(d) <= 0.01:
                tiny = False
        tiny = tiny and lam[a] <= 1e-2
        small_drop = (old - chi2_t[i]) <= stop[i] * old
        if better:
            for c in range(k):
                p[a, c] = trial[i, c]
                grad[a, c] = grad_t[i, c]
                for q in range(k):
                    hess[a, c, q] = hess_t[i, c, q]
            chi2[a] = chi2_t[i]
            lam[a] = max(lam[a] * 0.1, 1e-12)
            done[i] = small_drop or small_step or tiny
        else:
            lam[a] *= 10.0
            done[i] = small_step or lam[a] > 1e12
