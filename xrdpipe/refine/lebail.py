"""Le Bail intensity extraction: the profile matrix of a phase (sparse, computed by the Numba
kernels) and the extraction cycles, accelerated from a previous frame.
"""

from __future__ import annotations

import numpy as np

LEBAIL_FLOOR = 1e-9           # an extracted intensity stays above this x the largest (0 only when absent)
LEBAIL_MIN_AREA = 0.02        # a reflection with less of its profile's area in the range is not extracted (0)


def lebail_start(calc, theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Le Bail intensities from scratch: the net observed intensity shared evenly by every
    reflection the extraction uses (LEBAIL_MIN_AREA of its profile in the range: a strong line
    centred just beyond the range, whose tail is in the data, too; started at 0 it would stay
    near LEBAIL_FLOOR), then five extraction cycles."""
    n = int(calc.offsets[-1])
    st = calc.reflection_state(theta, np.ones(n))
    area = profile_matrix(calc, calc.profiles(st, theta), n).T @ np.ones(calc.x.size) * calc.step
    net = float(np.sum(np.maximum(y - calc.background(theta), 0.0)[calc.valid]) * calc.step)
    inside = area > LEBAIL_MIN_AREA
    I = np.where(inside, net / max(int(inside.sum()), 1), 0.0)
    return lebail_cycle(calc, theta, I, y, cycles=5)


def lebail_cycle(calc, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int = 1,
                 tol: float = 0.0) -> np.ndarray:
    """Le Bail extraction: each reflection takes its share of the observed net intensity
    (``cycles`` times; the profiles do not change in between, so they are computed once; see
    :func:`extract` for ``tol``)."""
    st = calc.reflection_state(theta, I)          # computed (Rietveld) intensities filled in
    return extract(calc, calc.profiles(st, theta), theta, st["I"], y, cycles, tol=tol)


def extract(calc, pr: dict, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int,
            tol: float = 0.0) -> np.ndarray:
    """``cycles`` Le Bail extractions from ``I``: each reflection takes its share of the
    observed net intensity. The extraction is a fixed-point iteration (the EM algorithm of a
    mixture), slow where reflections overlap. With ``tol``, every three cycles are one SQUAREM
    step (Varadhan & Roland 2008: two cycles, an extrapolation along them, one cycle from
    there), which reaches the same fixed point in far fewer cycles (an extrapolation that leaves
    the fixed point farther than it found it is dropped), and the extraction stops once a step
    changes the intensities by less than ``tol`` relative; without, plain cycles (one is
    :func:`xrdpipe.kernels.lebail_cycle`)."""
    from ..kernels import lebail_cycle as kernel_cycle

    net = y - calc.background(theta)
    P = profile_matrix(calc, pr, I.size)
    PT = P.T
    area = PT @ np.ones(calc.x.size) * calc.step
    valid = calc.valid
    use = calc.extracted & (area > LEBAIL_MIN_AREA)
    n_ph = len(calc.sizes)
    phase_of = np.repeat(np.arange(n_ph), calc.sizes)
    # the extraction is multiplicative: an intensity at exactly 0 would stay there for good (a
    # weak line set to 0 by the cell search's non-negative solution, or whose net intensity was
    # negative in one cycle under a background not yet refined). The lines of a present phase
    # are kept above a floor, from which they recover in one cycle where the data show them; an
    # absent phase's (all 0) stay 0
    net = np.ascontiguousarray(net, float)
    valid = np.ascontiguousarray(valid, bool)
    work = (np.empty(calc.x.size), np.empty(calc.x.size))

    def cycle(I):
        out = np.empty(I.size)
        kernel_cycle(*P.args, np.ascontiguousarray(I, float), net, valid, area, use, calc.extracted, phase_of, n_ph,
                     float(calc.step), LEBAIL_FLOOR, *work, out)
        return out

    left = cycles
    while tol and left >= 3:
        I1 = cycle(I)
        I2 = cycle(I1)
        r = I1 - I
        v = I2 - I1 - r
        nv = float(np.sqrt(v @ v))
        left -= 3
        if not nv > 0:
            I = cycle(I2)
            continue
        a = min(-float(np.sqrt(r @ r)) / nv, -1.0)
        # extrapolated, kept positive (an intensity at zero would stay there)
        Ix = np.where(use, np.maximum(I - 2 * a * r + a * a * v, 0.1 * I2), I2)
        I3 = cycle(Ix)
        new = I3 if float(np.sum((I3 - Ix) ** 2)) <= float(np.sum((I2 - I1) ** 2)) else cycle(I2)
        moved = float(np.sqrt(np.sum((new - I) ** 2)))
        I = new
        if tol and moved <= tol * float(np.sqrt(I @ I)):
            return I
    for _ in range(left):
        I = cycle(I)
    return I


def profile_matrix(calc, pr: dict, n_refl: int) -> "_ProfileMatrix":
    """The profiles as a (points x reflections) matrix, built once per profile state."""
    P = pr.get("matrix")
    if P is None:
        P = pr["matrix"] = _ProfileMatrix(calc, pr, n_refl)
    return P


class _ProfileMatrix:
    """The profiles of :meth:`Calculator.profiles` as a (points x reflections) matrix for
    products ``P @ I`` and ``P.T @ v`` (:func:`xrdpipe.kernels.profile_matvec`,
    :func:`~xrdpipe.kernels.profile_rmatvec`: the near entries, in column order already, and the
    far Lorentzian tails)."""

    def __init__(self, calc, pr: dict, n_refl: int):
        far = pr.get("far")
        if far is None:                      # whole windows: no far tails
            e = np.zeros(n_refl, np.int64)
            far = (np.zeros(n_refl), np.ones(n_refl), np.zeros(n_refl), e, e, e, e)
        self.args = (pr["P"], pr["idx"], pr["ptr"], calc.x, *far)
        self.n_points = calc.x.size
        self.n_refl = n_refl
        self.T = _Transposed(self)

    def __matmul__(self, I: np.ndarray) -> np.ndarray:
        from ..kernels import profile_matvec

        out = np.empty(self.n_points)
        profile_matvec(*self.args, np.ascontiguousarray(I, float), out)
        return out


class _Transposed:
    def __init__(self, P: _ProfileMatrix):
        self.P = P

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        from ..kernels import profile_rmatvec

        out = np.empty(self.P.n_refl)
        profile_rmatvec(*self.P.args, np.ascontiguousarray(v, float), out)
        return out
