"""The whole-pattern refinement's kernels: :func:`pv_profiles` and :func:`profile_columns` (the
pseudo-Voigt profiles of every reflection on the points of its near window with their
derivatives, and the Jacobian columns summed from them, in one pass each instead of a dozen
NumPy temporaries over the same entries); the ``tail_*`` kernels add the far Lorentzian tails
(points ``lo_far ... lo_near`` and ``hi_near ... hi_far`` of each reflection) to a pattern, a
transposed product or Jacobian columns, computed where they are used and never stored
(:func:`profile_matvec` and :func:`profile_rmatvec`: the products of the whole profiles, near
entries and far tails, with intensities and with a pattern, for the Le Bail extraction, one
cycle of which is :func:`lebail_cycle`); :func:`reflection_geometry` and :func:`tch_widths` give
positions and TCH widths from a cell."""

from __future__ import annotations

import numpy as np

from .base import _CG, _CL, _LN2, _kernel


@_kernel
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


@_kernel
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


@_kernel
def tail_matvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, j0, j1, w,
                out):  # pragma: no cover - compiled
    """Add Σ_j w[j] η_j L_j(x) over the far points of reflections ``j0 ... j1`` to ``out``
    (L: the Lorentzian of area 1 and FWHM H, 2/(πH) / (1 + 4u²/H²))."""
    for j in range(j0, j1):
        wj = w[j]
        if wj == 0.0:
            continue
        H = fwhm[j]
        inv_h = 1.0 / H
        c = wj * eta[j] * _CL * inv_h
        x0 = pos[j]
        for i in range(lo_far[j], lo_near[j]):
            z = (x[i] - x0) * inv_h
            out[i] += c / (1.0 + 4.0 * z * z)
        for i in range(hi_near[j], hi_far[j]):
            z = (x[i] - x0) * inv_h
            out[i] += c / (1.0 + 4.0 * z * z)


@_kernel
def tail_rmatvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v, out):  # pragma: no cover - compiled
    """``out[j] += Σ_i η_j L_j(x_i) v[i]`` over every reflection's far points."""
    for j in range(pos.size):
        H = fwhm[j]
        inv_h = 1.0 / H
        x0 = pos[j]
        acc = 0.0
        for i in range(lo_far[j], lo_near[j]):
            z = (x[i] - x0) * inv_h
            acc += v[i] / (1.0 + 4.0 * z * z)
        for i in range(hi_near[j], hi_far[j]):
            z = (x[i] - x0) * inv_h
            acc += v[i] / (1.0 + 4.0 * z * z)
        out[j] += acc * eta[j] * _CL * inv_h


@_kernel
def tail_columns(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, j0, j1, I, cx0, cH, ceta, cols,
                 J):  # pragma: no cover - compiled
    """The far tails' part of :func:`profile_columns` for reflections ``j0 ... j1`` (the rows
    of the coefficients ``c*`` counted from ``j0``): T = η L, dT/dx0 = η L/q 8u/H²,
    dT/dH = (u dT/dx0 - T)/H, dT/dη = L (q = 1 + 4u²/H²)."""
    nc = cols.size
    for j in range(j0, j1):
        w = I[j]
        if w == 0.0:
            continue
        k = j - j0
        H = fwhm[j]
        inv_h = 1.0 / H
        e = eta[j]
        cl = _CL * inv_h
        x0 = pos[j]
        for part in range(2):
            a = lo_far[j] if part == 0 else hi_near[j]
            b = lo_near[j] if part == 0 else hi_far[j]
            for i in range(a, b):
                u = x[i] - x0
                z = u * inv_h
                q = 1.0 + 4.0 * z * z
                lor = cl / q
                t = e * lor
                dx = t / q * 8.0 * u * inv_h * inv_h
                dh = (u * dx - t) * inv_h
                gx = w * dx
                gh = w * dh
                ge = w * lor
                for c in range(nc):
                    J[i, cols[c]] += gx * cx0[k, c] + gh * cH[k, c] + ge * ceta[k, c]


@_kernel
def reflection_geometry(hkl, cell, lam, U, V, W, X, Y, pos, fwhm, eta, tan, cos):  # pragma: no cover - compiled
    """For reflections ``hkl`` (n, 3) of a cell (a, b, c in Å, α, β, γ in degrees) at the
    wavelength ``lam``: 2θ (degrees), tan θ, cos θ, and the Thompson-Cox-Hastings pseudo-Voigt
    FWHM and mixing of the Caglioti Gaussian (U tan²θ + V tan θ + W) and the Lorentzian
    (X tan θ + Y / cos θ) widths."""
    a, b, c = cell[0], cell[1], cell[2]
    ca = np.cos(np.radians(cell[3]))
    cb = np.cos(np.radians(cell[4]))
    cg = np.cos(np.radians(cell[5]))
    g11, g22, g33 = a * a, b * b, c * c
    g12, g13, g23 = a * b * cg, a * c * cb, b * c * ca
    # the reciprocal metric: the inverse of the (symmetric) metric by cofactors
    c11 = g22 * g33 - g23 * g23
    c12 = g13 * g23 - g12 * g33
    c13 = g12 * g23 - g13 * g22
    c22 = g11 * g33 - g13 * g13
    c23 = g12 * g13 - g11 * g23
    c33 = g11 * g22 - g12 * g12
    det = g11 * c11 + g12 * c12 + g13 * c13
    for n in range(hkl.shape[0]):
        h, k, l = hkl[n, 0], hkl[n, 1], hkl[n, 2]
        q = (h * h * c11 + k * k * c22 + l * l * c33 + 2.0 * (h * k * c12 + h * l * c13 + k * l * c23)) / det
        s = lam * 0.5 * np.sqrt(q)                   # sin θ = λ / 2d
        s = min(max(s, -1.0), 1.0)
        th = np.arcsin(s)
        tn = np.tan(th)
        cs = np.cos(th)
        pos[n] = np.degrees(2.0 * th)
        tan[n] = tn
        cos[n] = cs
    tch_widths(tan, cos, U, V, W, X, Y, fwhm, eta)


@_kernel
def profile_matvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I,
                   out):  # pragma: no cover - compiled
    """``out = Σ_j I[j] profile_j``: the near entries (``P`` at points ``idx``, reflection j's
    at ``ptr[j] ... ptr[j + 1]``) and the far tails (:func:`tail_matvec`)."""
    out[:] = 0.0
    for j in range(I.size):
        w = I[j]
        if w == 0.0:
            continue
        for k in range(ptr[j], ptr[j + 1]):
            out[idx[k]] += P[k] * w
    tail_matvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, 0, I.size, I, out)


@_kernel
def profile_rmatvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v,
                    out):  # pragma: no cover - compiled
    """``out[j] = Σ_i profile_j(x_i) v[i]`` (near entries and far tails)."""
    for j in range(out.size):
        acc = 0.0
        for k in range(ptr[j], ptr[j + 1]):
            acc += P[k] * v[idx[k]]
        out[j] = acc
    tail_rmatvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v, out)


@_kernel
def lebail_cycle(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I, net, valid, area, use,
                 extracted, phase_of, n_ph, step, floor_rel, yc, ratio, out):  # pragma: no cover - compiled
    """One Le Bail extraction from the intensities ``I`` into ``out``: each reflection ``use``
    takes its share of the net observed pattern ``net`` (the model's share where a point is not
    ``valid``), I Σ P (net / Σ I P) step / area, kept above ``floor_rel`` x the largest
    intensity where its phase has any intensity (0 where none); other extracted reflections (too
    little of their profile in the range to be extracted) get 0, computed ones keep I. ``yc`` and ``ratio`` are work arrays of the points."""
    profile_matvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I, yc)
    top = 1e-300
    for i in range(yc.size):
        if yc[i] > top:
            top = yc[i]
    thr = 1e-12 * top
    for i in range(yc.size):
        if not valid[i]:
            ratio[i] = 1.0                 # no data: the model keeps its share
        elif yc[i] > thr:
            ratio[i] = net[i] / max(yc[i], 1e-300)
        else:
            ratio[i] = 0.0
    profile_rmatvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, ratio, out)
    present = np.zeros(n_ph, np.bool_)
    imax = 0.0
    for j in range(I.size):
        if I[j] > 0.0:
            present[phase_of[j]] = True
        if I[j] > imax:
            imax = I[j]
    floor = floor_rel * imax
    for j in range(I.size):
        if use[j]:
            if present[phase_of[j]]:
                v = I[j] * out[j] * step / max(area[j], 1e-12)
                out[j] = v if (v != v or v > floor) else floor
            else:
                out[j] = 0.0
        elif extracted[j]:
            out[j] = 0.0
        else:
            out[j] = I[j]


@_kernel
def tch_widths(tan, cos, U, V, W, X, Y, fwhm, eta):  # pragma: no cover - compiled
    """The Thompson-Cox-Hastings pseudo-Voigt FWHM and mixing of the Caglioti Gaussian width
    (U tan²θ + V tan θ + W, kept above 1e-12) and the Lorentzian (X tan θ + Y / cos θ, kept
    above 0) of every reflection."""
    for n in range(tan.size):
        tn = tan[n]
        hg = np.sqrt(max(U * tn * tn + V * tn + W, 1e-12))
        hl = max(X * tn + Y / cos[n], 0.0)
        h5 = (hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3
              + 0.07842 * hg * hl**4 + hl**5)
        H = h5 ** 0.2
        qq = hl / H
        fwhm[n] = H
        eta[n] = min(max(1.36603 * qq - 0.47719 * qq**2 + 0.11116 * qq**3, 0.0), 1.0)
