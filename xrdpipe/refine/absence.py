"""Which phases a Le Bail fit needs: a phase whose intensity the fit does not need is absent
(its cell held, not reported), and one that reappears is put back.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .least_squares import minimise
from .lebail import extract, lebail_cycle, profile_matrix

ABSENT_CHI2 = 3.0             # a Le Bail phase lowering χ² by less than this per reflection ...
ABSENT_REL = 0.05             # ... or than this fraction of χ² is absent


def find_absent(calc, theta: np.ndarray, I: np.ndarray, y: np.ndarray, wt: np.ndarray) -> list[int]:
    """Le Bail phases that do not improve the fit: with their intensities removed and the other
    phases' re-extracted, χ² rises by less than ABSENT_CHI2 per reflection (at least 25) or than
    ABSENT_REL of χ² (a phase that only takes over another's misfit)."""
    st = calc.reflection_state(theta, I)
    pr = calc.profiles(st, theta)
    bkg = calc.background(theta)

    P = profile_matrix(calc, pr, I.size)

    def chi2(inten):
        yc = bkg + P @ inten
        r = (y - yc) * wt
        return float(r @ r)

    base = chi2(I)
    out = []
    for p in range(len(calc.model.phases)):
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        if not np.any(I[a:b] > 0):
            out.append(p)
            continue
        I2 = I.copy()
        I2[a:b] = 0.0
        I2 = extract(calc, pr, theta, I2, y, 3)
        if chi2(I2) - base <= max(25.0, ABSENT_CHI2 * (b - a), ABSENT_REL * base):
            out.append(p)
    return out


def find_needed(calc, theta: np.ndarray, I: np.ndarray, I_start: np.ndarray, y: np.ndarray, wt: np.ndarray,
                phases: Sequence[int]) -> list[int]:
    """Of the absent Le Bail ``phases``, those whose lines (from their start intensities,
    re-extracted with the others') lower χ² by more than :func:`find_absent` asks of a present phase."""
    with_lines = I.copy()                    # the profiles of the tested phases too
    for p in phases:
        with_lines[int(calc.offsets[p]):int(calc.offsets[p + 1])] = I_start[int(calc.offsets[p]):int(calc.offsets[p + 1])]
    st = calc.reflection_state(theta, with_lines)
    pr = calc.profiles(st, theta)
    bkg = calc.background(theta)
    P = profile_matrix(calc, pr, I.size)

    def chi2(inten):
        r = (y - bkg - P @ inten) * wt
        return float(r @ r)

    base = chi2(I)
    out = []
    for p in phases:
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        I2 = I.copy()
        I2[a:b] = I_start[a:b]
        I2 = extract(calc, pr, theta, I2, y, 5)
        if base - chi2(I2) > max(25.0, ABSENT_CHI2 * (b - a), ABSENT_REL * base):
            out.append(p)
    return out


def phase_params(calc, p: int) -> list[int]:
    """The cell and width parameters of phase ``p`` (held while it is absent)."""
    return [i for i, q in enumerate(calc.layout.params) if q.phase == p and q.kind in ("cell", "profile", "struct")]


def put_back(calc, y, wt, theta, I, free, absent: Sequence[int], back: Sequence[int], I_back: np.ndarray, *,
             cycles: int, tol: float, n_valid: int, bounds, follow: bool):
    """Refined again with the ``absent`` Le Bail phases ``back`` put back: their intensities from
    ``I_back`` (then ``cycles`` Le Bail cycles of all), their cell and widths free. Returns θ,
    intensities, free parameters, the phases still absent, convergence and iterations."""
    I = I.copy()
    for p in back:
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        I[a:b] = I_back[a:b]
    if cycles:
        I = lebail_cycle(calc, theta, I, y, cycles=cycles)
    still = [p for p in absent if p not in back]
    L = calc.layout
    free = np.array(sorted(set(int(i) for i in free) | {i for p in back for i in phase_params(calc, p)
                                                       if L.params[i].refined}), int)
    theta, I, converged, it = minimise(calc, y, wt, theta.copy(), I, free, max_iter=calc.model.max_iter, tol=tol,
                                       hold=False, n_valid=n_valid, bounds=bounds, absent=still, follow=follow)
    return theta, I, free, still, converged, it
