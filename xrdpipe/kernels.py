"""Compiled kernels (Numba, cached on disk, run without the GIL).

:func:`csc_sums` is the per-frame kernel of the integrator; :func:`pv_profiles` and
:func:`profile_columns` are the refinement's (the pseudo-Voigt profiles of every reflection on the
points of its window with their derivatives, and the Jacobian columns summed from them, in one
pass each instead of a dozen NumPy temporaries over the same entries).

The integrator's kernel: one pass over the pixel-to-bin matrix for the
intensity and the Poisson variance at once, straight from the raw frame.

The matrix is kept one column per pixel (CSC: ``indptr`` over pixels, ``indices`` the bins,
``data`` the splitting coefficients ``c``). For every pixel the kernel reads its value in the
frame's own dtype once, and for every coefficient of its column adds ``c (x - dark)`` to the
signal of the bin and ``c² max(x, 1)`` to its variance: the matrix is streamed once per frame
(SciPy's product needs two passes, since the two sums have different coefficients, c and c²,
and a float32 copy of the frame, a dark-subtracted copy and a variance array first). A pixel at
``flag`` (an integer frame's largest value: EIGER gaps, overflows) adds nothing; its share of
the normalisation ``c n`` is summed into ``lost`` so the caller takes it off the denominator.

Products are float32 (the frame and the coefficients are), sums float64. Compiled by Numba once
per frame dtype (cached on disk) and run without the GIL, so two threads integrate two frames at
once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uintp

__all__ = ["csc_sums", "pv_profiles", "profile_columns"]

_LN2 = 0.6931471805599453
_CG = 0.9394372786996513       # 2 sqrt(ln 2 / π)
_CL = 0.6366197723675814       # 2 / π


@njit(nogil=True, cache=True)
def csc_sums(x, dark, has_dark, flag, has_flag, data, indices, indptr, norm, signal, variance, lost,
             with_variance):  # pragma: no cover - compiled
    """Add Σ c (x - dark), Σ c² max(x, 1) and, over flagged pixels, Σ c n per bin into
    ``signal``, ``variance`` and ``lost`` (float64 arrays of the bins)."""
    n_pix = len(indptr) - 1
    one = np.float32(1.0)
    j = np.int64(indptr[0])
    for p in range(n_pix):
        end = np.int64(indptr[p + 1])
        if j == end:          # masked, or outside the range
            continue
        xv = x[p]
        if has_flag and xv == flag:
            w = np.float64(norm[p])
            while j < end:
                lost[uintp(indices[j])] += data[j] * w
                j += 1
            continue
        xf = np.float32(xv)
        s = xf - dark[p] if has_dark else xf
        if with_variance:
            v = max(xf, one)
            while j < end:    # unsigned bin numbers: no wrap-around test for negative indices
                k = uintp(indices[j])
                c = data[j]
                signal[k] += c * s
                variance[k] += c * c * v
                j += 1
        else:
            while j < end:
                signal[uintp(indices[j])] += data[j] * s
                j += 1


@njit(nogil=True, cache=True)
def pv_profiles(x, pos, fwhm, eta, inv_tan, lo, ptr, p1, p2, asym_on, deriv, r, idx, P, dx0, dH, deta, dP1,
                dP2):  # pragma: no cover - compiled
    """Every reflection's pseudo-Voigt (area 1, Gaussian and Lorentzian of one FWHM, mixing η)
    times the asymmetry 1 + (P1 fa(z) + P2 fb(z)) / tan θ (fa = 2z e^-z², fb = 2(2z² - 3) fa,
    z = (x - x0)/H) on the points ``lo[j] ...`` of its window, flat: entries ``ptr[j] ...
    ptr[j + 1]`` of ``r`` (its reflection), ``idx`` (its point) and ``P``; with ``deriv`` also
    the derivatives in position ``dx0``, FWHM ``dH``, mixing ``deta`` and P1 and P2. The
    exponentials only where they exceed 1e-43 (the Gaussian core)."""
    four_ln2 = 4.0 * _LN2
    for j in range(pos.size):
        H = fwhm[j]
        e = eta[j]
        x0 = pos[j]
        it = inv_tan[j]
        cg = _CG / H
        cl = _CL / H
        inv_h = 1.0 / H
        k0 = ptr[j]
        for k in range(k0, ptr[j + 1]):
            i = lo[j] + k - k0
            r[k] = j
            idx[k] = i
            u = x[i] - x0
            z = u * inv_h
            z2 = z * z
            g = cg * np.exp(-four_ln2 * z2) if z2 < 36.0 else 0.0
            q = 1.0 + 4.0 * z2
            lor = cl / q
            prof = e * lor + (1.0 - e) * g
            if asym_on:
                ez = np.exp(-z2) if z2 < 100.0 else 0.0
                fa = 2.0 * z * ez
                fb = 2.0 * (2.0 * z2 - 3.0) * fa
                asym = 1.0 + (p1 * fa + p2 * fb) * it
                P[k] = prof * asym
            else:
                P[k] = prof
            if deriv:
                # d/dx0 of each part; d/dH from the scaling f(u; H) = φ(u/H)/H: (u df/dx0 - f)/H
                dp_dx0 = (e * lor / q + (1.0 - e) * _LN2 * g) * (8.0 * u * inv_h * inv_h)
                dp_dh = (u * dp_dx0 - prof) * inv_h
                if asym_on:
                    dfa = 2.0 * ez * (1.0 - 2.0 * z2)
                    dfb = 8.0 * z * fa + 2.0 * (2.0 * z2 - 3.0) * dfa
                    pa = prof * (p1 * dfa + p2 * dfb) * it * inv_h
                    dx0[k] = asym * dp_dx0 - pa
                    dH[k] = asym * dp_dh - pa * z
                    deta[k] = (lor - g) * asym
                    dP1[k] = prof * fa * it
                    dP2[k] = prof * fb * it
                else:
                    dx0[k] = dp_dx0
                    dH[k] = dp_dh
                    deta[k] = lor - g
                    dP1[k] = 0.0
                    dP2[k] = 0.0


@njit(nogil=True, cache=True)
def profile_columns(a, b, r, idx, r0, I, P, dx0, dH, deta, cx0, cH, ceta, cI, cols,
                    J):  # pragma: no cover - compiled
    """Add to the columns ``cols`` of ``J`` (points x columns) the derivative of the pattern
    over the flat profile entries ``a ... b`` (reflections ``r0 ...``): for column c, each
    entry's I (dx0 cx0[k, c] + dH cH[k, c] + deta ceta[k, c]) + P cI[k, c], k = r - r0, where
    the c* are the derivatives of each reflection's position, FWHM, mixing and intensity."""
    nc = cols.size
    for e in range(a, b):
        k = r[e] - r0
        i = idx[e]
        w = I[r[e]]
        gx = w * dx0[e]
        gh = w * dH[e]
        ge = w * deta[e]
        p = P[e]
        for c in range(nc):
            J[i, cols[c]] += gx * cx0[k, c] + gh * cH[k, c] + ge * ceta[k, c] + p * cI[k, c]
