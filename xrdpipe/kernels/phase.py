"""The phase model's kernels (:mod:`xrdpipe.phasefit`): its lines' values and Jacobian
(:func:`phase_value_jac`) or its normal equations straight from the lines (:func:`phase_normal`),
the linear solve of one window at many trial centres (:func:`window_trials`), reflection
positions from cells (:func:`radial_positions`) and the lines' centres with their derivatives by
the cell and zero columns (:func:`centre_derivs`)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .base import _CG, _CL, _LN2, _kernel
from .batch import damped_systems, take_steps

#: (u / FWHM)² beyond which a Gaussian's exp(-4 ln 2 u²) is exactly 0.0 in double precision
#: (exp(-776); the smallest subnormal number is exp(-744.4)).
_GAUSS_GONE = 280.0

_K = 1.6651092223153954          # 2 sqrt(ln 2): a Gaussian of FWHM f is exp(-(K (x - c) / f)²)
_INV_K_SQRT_PI = 0.33883037580155256  # 1 / (K sqrt(π))
_POINT_BELOW = 1e-3              # an instrument half-width below this share of the FWHM: a point sample
_G_REACH = 6.5                   # K |x - c| / f beyond which a Gaussian's antiderivatives are their limits
#: A Lorentzian of half-width g is averaged by its series (:func:`_lorentz_series`) where
#: |t - i g|² exceeds this many b² (the series' ratio below 1/9).
_SERIES_R2 = 9.0
_SERIES_C0 = np.array([2.0 / ((2 * n + 1) * (2 * n + 2)) for n in range(19)])   # the triangle's E[s^2n] / b^2n
_SERIES_C1 = np.array([1.0 / (n + 1) for n in range(19)])                       # (2n + 1) times those


@njit(inline="always", nogil=True, error_model="numpy")
def _pv_terms(xj, c, inv_f, area, eta):  # pragma: no cover - compiled
    """One line (area-normalised pseudo-Voigt times its area) at one point: its value and its
    derivatives in area, FWHM, eta and centre."""
    g_unit = (1.0 - eta) * _CG * inv_f
    l_unit = eta * _CL * inv_f
    u = (xj - c) * inv_f
    u2 = u * u
    gauss = np.exp(u2 * (-4.0 * _LN2))
    lor = 1.0 / (1.0 + 4.0 * u2)
    t1 = area * g_unit * gauss
    t2 = area * l_unit * lor
    val = t1 + t2
    d_area = g_unit * gauss + l_unit * lor
    d_fwhm = inv_f * (8.0 * u2 * (_LN2 * t1 + t2 * lor) - val)
    d_eta = area * inv_f * (_CL * lor - _CG * gauss)
    d_c = 8.0 * inv_f * u * (_LN2 * t1 + t2 * lor)
    return val, d_area, d_fwhm, d_eta, d_c


@njit(inline="always", nogil=True, error_model="numpy")
def _gauss_antiderivatives(t, f, inv_f):  # pragma: no cover - compiled
    """At ``t`` = x - c from the centre of an area-normalised Gaussian of FWHM ``f``: its
    cumulative distribution ``F`` and the antiderivative ``H`` of that (``H' = F``)."""
    u = t * inv_f
    ku = _K * u
    if ku > _G_REACH:                               # erfc(6.5) < 4e-20: the Gaussian is all behind
        return 1.0, t
    if ku < -_G_REACH:                              # ... or all ahead
        return 0.0, 0.0
    tail = math.erfc(-ku)                           # 1 + erf(ku), exact on the far left
    return 0.5 * tail, 0.5 * f * (u * tail + math.exp(-ku * ku) * _INV_K_SQRT_PI)


@njit(inline="always", nogil=True, error_model="numpy")
def _lorentz_antiderivatives(t, f, inv_f):  # pragma: no cover - compiled
    """:func:`_gauss_antiderivatives` of an area-normalised Lorentzian of FWHM ``f``."""
    u = t * inv_f
    at = math.atan(2.0 * u)
    return 0.5 + at / math.pi, f * (0.5 * u + (u * at - 0.25 * math.log1p(4.0 * u * u)) / math.pi)


@njit(inline="always", nogil=True, error_model="numpy")
def _lorentz_series(t, gam, b):  # pragma: no cover - compiled
    """An area-normalised Lorentzian of half-width ``gam`` averaged over a triangle of half-width
    ``b`` at ``t`` = x - c, where |t - i gam| > 3 b: the average and its derivatives in the
    centre and in the FWHM (2 gam).

    The Lorentzian is Im(z) / π with z = 1 / (t - i gam), and every derivative of z is a power
    of it, so the triangle's Taylor series is Im(z Σ_n c_n (b z)^2n) / π, c_n = E[s^2n] / b^2n
    = 2 / ((2n + 1)(2n + 2)) for the triangle's moments; the derivatives in t and gam are -Im
    and Re of z² Σ_n (2n + 1) c_n (b z)^2n over π. The ratio of its terms, |b z|², is below
    1/9 here: the terms kept (4 to 18, by that ratio) leave less than 1e-18 of the sum. Far
    from the line the exact second difference of the antiderivative (:func:`_line_terms`)
    cancels to a few parts in 1e10 (it subtracts values of ~t/b² times the result); this
    loses nothing, and takes no transcendental function."""
    d = 1.0 / (t * t + gam * gam)
    zr = t * d
    zi = gam * d
    z2r = zr * zr - zi * zi
    z2i = 2.0 * zr * zi
    b2 = b * b
    qr = b2 * z2r
    qi = b2 * z2i
    ratio = b2 * d
    if ratio < 1e-4:
        nn = 4
    elif ratio < 1e-3:
        nn = 6
    elif ratio < 1e-2:
        nn = 9
    elif ratio < 0.04:
        nn = 12
    else:
        nn = 18
    s0r = _SERIES_C0[nn]
    s0i = 0.0
    s1r = _SERIES_C1[nn]
    s1i = 0.0
    for n in range(nn - 1, -1, -1):       # Horner's rule in q = (b z)²
        tr = s0r * qr - s0i * qi + _SERIES_C0[n]
        s0i = s0r * qi + s0i * qr
        s0r = tr
        tr = s1r * qr - s1i * qi + _SERIES_C1[n]
        s1i = s1r * qi + s1i * qr
        s1r = tr
    wr = z2r * s1r - z2i * s1i
    wi = z2r * s1i + z2i * s1r
    return (zr * s0i + zi * s0r) / math.pi, wi / math.pi, 0.5 * wr / math.pi


@njit(inline="always", nogil=True, error_model="numpy")
def _second_difference(t0, b, f, inv_f, lorentz):  # pragma: no cover - compiled
    """The Gaussian's (or, ``lorentz``, the Lorentzian's) average over the triangle of
    half-width ``b`` at ``t0``, and its derivatives in the centre and the FWHM: the second
    difference of its antiderivatives (see :func:`_line_terms`)."""
    s_f = 0.0
    s_h = 0.0
    s_hf = 0.0
    for q in range(3):
        t = t0 + (q - 1) * b
        wq = -2.0 if q == 1 else 1.0
        if lorentz:
            f_x, h_x = _lorentz_antiderivatives(t, f, inv_f)
        else:
            f_x, h_x = _gauss_antiderivatives(t, f, inv_f)
        s_f += wq * f_x
        s_h += wq * h_x
        s_hf += wq * (h_x - t * f_x)
    inv_b2 = 1.0 / (b * b)
    return s_h * inv_b2, -s_f * inv_b2, s_hf * inv_b2 * inv_f


@njit(inline="always", nogil=True, error_model="numpy")
def _line_terms(xj, c, inv_f, area, eta, b):  # pragma: no cover - compiled
    """One line at point ``xj`` as an integrated bin sees it: the area-normalised pseudo-Voigt
    averaged over a triangle of half-width ``b`` centred on ``xj`` (the pixels' area, their
    splitting and the bin: :attr:`xrdpipe.integration.Integrator.instrument_sd` is the triangle's
    standard deviation, b = sqrt(6) sd), times its area. Its value and derivatives in area, FWHM,
    eta and centre, as :func:`_pv_terms` (which it is when ``b`` is below a thousandth of the
    FWHM: a point sample).

    The triangle average of a profile whose antiderivative of the distribution is ``H`` is the
    second difference (H(t + b) - 2 H(t) + H(t - b)) / b², exact; with ``H`` of f: d/dc = -F,
    d/df = (H - t F) / f. It is taken at -|t| (the profile and the triangle are symmetric):
    there ``H`` is small and its second difference keeps its digits (on the right ``H`` ~ t,
    and a Gaussian wing 1.7 FWHM out in a bin of 0.01 FWHM lost 8 of them). The Gaussian's is 0
    where the triangle lies beyond :data:`_G_REACH` of it; the Lorentzian's is its series
    (:func:`_lorentz_series`) where |t - i f/2| exceeds 3 b (exact to the last digits there, and
    without a transcendental function)."""
    if b * inv_f < _POINT_BELOW:
        return _pv_terms(xj, c, inv_f, area, eta)
    f = 1.0 / inv_f
    # (computed on the line's left, where the antiderivatives are small: on its right they are
    # ~t, and their second difference cancels; the line and the triangle are symmetric, so only
    # the derivative in the centre changes sign)
    t0 = xj - c
    side = 1.0
    if t0 > 0.0:
        t0 = -t0
        side = -1.0
    g_avg = 0.0
    g_dc = 0.0
    g_df = 0.0
    if abs(t0) - b < _G_REACH / _K * f:
        g_avg, g_dc, g_df = _second_difference(t0, b, f, inv_f, False)
    gam = 0.5 * f
    if t0 * t0 + gam * gam > _SERIES_R2 * b * b:
        l_avg, l_dc, l_df = _lorentz_series(t0, gam, b)
    else:
        l_avg, l_dc, l_df = _second_difference(t0, b, f, inv_f, True)
    shape = g_avg + eta * (l_avg - g_avg)
    return (area * shape, shape, area * (g_df + eta * (l_df - g_df)), area * (l_avg - g_avg),
            side * area * (g_dc + eta * (l_dc - g_dc)))


@_kernel
def phase_value_jac(x, hw, lo, hi, cen, theta, fw_col, eta_col, a_col, dcol, dval, f, jac):  # pragma: no cover - compiled
    """Add the phase model's lines to ``f`` (r, M) and their derivatives to ``jac`` (r, k, M).

    Line ``i`` (area-normalised pseudo-Voigt times its area, averaged over the instrument's
    triangle of half-width ``hw[j]`` at point ``j``: :func:`_line_terms`) lies on points
    ``lo[i]:hi[i]`` of the abscissa ``x``, at centre ``cen[r, i]``, with its width, eta and area in columns
    ``fw_col[i]``, ``eta_col[i]``, ``a_col[i]`` of ``theta`` (r, k); its centre moves by
    ``dval[r, i, q]`` per unit of column ``dcol[i, q]`` (-1: none), the cell and zero columns."""
    for r in range(theta.shape[0]):
        for i in range(cen.shape[1]):
            c = cen[r, i]
            inv_f = 1.0 / theta[r, fw_col[i]]
            area = theta[r, a_col[i]]
            eta = theta[r, eta_col[i]]
            for j in range(lo[i], hi[i]):
                val, d_area, d_fwhm, d_eta, d_c = _line_terms(x[j], c, inv_f, area, eta, hw[j])
                f[r, j] += val
                jac[r, a_col[i], j] += d_area
                jac[r, fw_col[i], j] += d_fwhm
                jac[r, eta_col[i], j] += d_eta
                for q in range(dcol.shape[1]):
                    if dcol[i, q] >= 0:
                        jac[r, dcol[i, q], j] += d_c * dval[r, i, q]


@_kernel
def phase_normal(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, cen, theta,
                 fw_col, eta_col, a_col, la, lf, le, ld, dval, skip, chi2, hess, grad):  # pragma: no cover - compiled
    """The normal equations of the phase model straight from its lines, window by window:
    ``chi2`` (r,), ``hess`` = JᵀW²J (r, k, k) and ``grad`` = JᵀW²(y - f) (r, k) for parameter
    rows ``theta`` (r, k), without the dense Jacobian (r, k, M) that :func:`phase_value_jac`
    fills (most of it zeros: a point depends only on its window's columns).

    Window ``w`` covers points ``win_lo[w]:win_hi[w]`` and the columns ``wcols[wcol_ptr[w]:
    wcol_ptr[w + 1]]``; its background has ``nbg[w]`` columns (local ``lbg[w, d]``, values
    ``tpow[j, d]``), its lines are ``lines[line_ptr[w]:line_ptr[w + 1]]``. Line ``i`` is the
    line of :func:`phase_value_jac` (instrument half-widths ``hw``) (global columns ``fw_col``, ``eta_col``,
    ``a_col`` for its values, local ``lf``, ``le``, ``la`` for its derivatives; its centre moves by
    ``dval[r, i, q]`` per unit of local column ``ld[i, q]``, -1: none).

    A line ``skip[r, i]`` is left out of row ``r`` (give it only for a line of area 0 held at 0:
    it adds nothing to the model, and its area's column, held, needs no curvature). The sums run
    over the window's columns that some line left in (or the background) moves, a rank-one update
    per point over those alone: every entry gets the same terms in the same order as over all
    the window's columns, less exact zeros, so the sums are the same to the last bit. Each
    line's constants (centre, 1 / FWHM, area, eta, places) are read once per window, not at
    every point."""
    n_win = win_lo.size
    kmax = 0
    for w in range(n_win):
        kmax = max(kmax, wcol_ptr[w + 1] - wcol_ptr[w])
    h = np.zeros((kmax, kmax))
    g = np.zeros(kmax)
    jrow = np.zeros(kmax)
    pos = np.zeros(kmax, np.int64)        # local column -> place among the columns in use (-1: none)
    used = np.zeros(kmax, np.int64)       # place -> local column
    n_max = 0
    for w in range(n_win):
        n_max = max(n_max, line_ptr[w + 1] - line_ptr[w])
    width = ld.shape[1]
    # the window's lines left in, with their constants and places (the same numbers the point
    # loop would read through the indices at every point)
    l_cen = np.zeros(n_max)
    l_inv = np.zeros(n_max)
    l_area = np.zeros(n_max)
    l_eta = np.zeros(n_max)
    l_pa = np.zeros(n_max, np.int64)
    l_pf = np.zeros(n_max, np.int64)
    l_pe = np.zeros(n_max, np.int64)
    l_pd = np.zeros((n_max, width), np.int64)
    l_dv = np.zeros((n_max, width))
    b_pos = np.zeros(tpow.shape[1], np.int64)
    b_val = np.zeros(tpow.shape[1])
    for r in range(theta.shape[0]):
        c2 = 0.0
        for w in range(n_win):
            c0 = wcol_ptr[w]
            kw = wcol_ptr[w + 1] - c0
            # the columns in use: the background's and those of the lines left in, in local order
            # (so that a <= b among them is a <= b among the window's columns)
            for a in range(kw):
                pos[a] = -1
            for d in range(nbg[w]):
                pos[lbg[w, d]] = 0
            for n in range(line_ptr[w], line_ptr[w + 1]):
                i = lines[n]
                if skip[r, i]:
                    continue
                pos[la[i]] = 0
                pos[lf[i]] = 0
                pos[le[i]] = 0
                for q in range(ld.shape[1]):
                    if ld[i, q] >= 0:
                        pos[ld[i, q]] = 0
            nu = 0
            for a in range(kw):
                if pos[a] == 0:
                    pos[a] = nu
                    used[nu] = a
                    nu += 1
            for a in range(nu):
                g[a] = 0.0
                for b in range(nu):
                    h[a, b] = 0.0
            nl = 0
            for n in range(line_ptr[w], line_ptr[w + 1]):
                i = lines[n]
                if skip[r, i]:
                    continue
                l_cen[nl] = cen[r, i]
                l_inv[nl] = 1.0 / theta[r, fw_col[i]]
                l_area[nl] = theta[r, a_col[i]]
                l_eta[nl] = theta[r, eta_col[i]]
                l_pa[nl] = pos[la[i]]
                l_pf[nl] = pos[lf[i]]
                l_pe[nl] = pos[le[i]]
                for q in range(width):
                    l_pd[nl, q] = pos[ld[i, q]] if ld[i, q] >= 0 else -1
                    l_dv[nl, q] = dval[r, i, q]
                nl += 1
            for d in range(nbg[w]):
                b_pos[d] = pos[lbg[w, d]]
                b_val[d] = theta[r, wcols[c0 + lbg[w, d]]]
            for j in range(win_lo[w], win_hi[w]):
                for a in range(nu):
                    jrow[a] = 0.0
                f = 0.0
                for d in range(nbg[w]):
                    f += b_val[d] * tpow[j, d]
                    jrow[b_pos[d]] = tpow[j, d]
                for n in range(nl):
                    val, d_area, d_fwhm, d_eta, d_c = _line_terms(x[j], l_cen[n], l_inv[n], l_area[n], l_eta[n], hw[j])
                    f += val
                    jrow[l_pa[n]] += d_area
                    jrow[l_pf[n]] += d_fwhm
                    jrow[l_pe[n]] += d_eta
                    for q in range(width):
                        if l_pd[n, q] >= 0:
                            jrow[l_pd[n, q]] += d_c * l_dv[n, q]
                ww = wt[j]
                if ww == 0.0:
                    continue
                res = ww * (y[j] - f)
                c2 += res * res
                for a in range(nu):
                    jrow[a] *= ww
                for a in range(nu):
                    ja = jrow[a]
                    if ja != 0.0:
                        g[a] += ja * res
                        for b in range(a, nu):
                            h[a, b] += ja * jrow[b]
            for a in range(nu):
                ca = wcols[c0 + used[a]]
                grad[r, ca] += g[a]
                hess[r, ca, ca] += h[a, a]
                for b in range(a + 1, nu):
                    cb = wcols[c0 + used[b]]
                    hess[r, ca, cb] += h[a, b]
                    hess[r, cb, ca] += h[a, b]
        chi2[r] = c2


@_kernel
def _spd_solve(a, b):  # pragma: no cover - compiled
    """``a x = b`` for a symmetric positive (semi-)definite ``a`` with unit diagonal, by
    Cholesky; where a pivot vanishes (a singular system), with a ridge of 1e-10 added, then ten
    times more until it goes through."""
    k = b.size
    low = np.zeros((k, k))
    ridge = 0.0
    while True:
        ok = True
        for i in range(k):
            for j in range(i + 1):
                s = a[i, j] + (ridge if i == j else 0.0)
                for q in range(j):
                    s -= low[i, q] * low[j, q]
                if i == j:
                    if s <= 1e-12:
                        ok = False
                        break
                    low[i, i] = np.sqrt(s)
                else:
                    low[i, j] = s / low[j, j]
            if not ok:
                break
        if ok:
            break
        ridge = 1e-10 if ridge == 0.0 else ridge * 10.0
    z = np.zeros(k)
    for i in range(k):
        s = b[i]
        for q in range(i):
            s -= low[i, q] * z[q]
        z[i] = s / low[i, i]
    for i in range(k - 1, -1, -1):
        s = z[i]
        for q in range(i + 1, k):
            s -= low[q, i] * z[q]
        z[i] = s / low[i, i]
    return z


@_kernel
def window_trials(x, hw, bg, y, w, cen, fw, eta, keep, coef, chi2):  # pragma: no cover - compiled
    """Weighted least squares of one window at many trials, the areas not negative
    (:func:`_window_trials`)."""
    _window_trials(x, hw, bg, y, w, cen, fw, eta, keep, coef, chi2)


@_kernel
def windows_linear(x, hw, tpow, nbg, y, wt, win_lo, win_hi, line_lo, line_hi, cen, fw, eta, use, tail,
                   areas, bg, bg_lo, chi2):  # pragma: no cover - compiled
    """:func:`_window_trials` of every window at once, each at the trials ``cen`` (T, L) of its
    lines (``line_lo[w]:line_hi[w]`` of the L, in window order; points ``win_lo[w]:win_hi[w]``
    of ``x``, ``hw``, ``y``, ``wt``; background columns ``tpow[:, :nbg[w]]``), widths ``fw``
    (L,) and ``eta`` (L,). A line is fitted in a trial where ``use[t]`` has it and its centre
    lies within the window less half its width, or within ``tail`` widths of it (its tail is in
    the data); as ``xrdpipe.phasefit.frame._Frame._window_call`` keeps it, with every line's tail
    allowed. Writes its areas ``areas`` (T, L), each window's background ``bg`` (T, ...) from
    ``bg_lo[w]`` and its χ² ``chi2`` (T, W); a window without points gets zeros."""
    n_trials = cen.shape[0]
    for v in range(win_lo.size):
        lo, hi, a0, a1, nb = win_lo[v], win_hi[v], line_lo[v], line_hi[v], nbg[v]
        n = a1 - a0
        if hi == lo:
            for t in range(n_trials):
                for i in range(a0, a1):
                    areas[t, i] = 0.0
                for d in range(nb):
                    bg[t, bg_lo[v] + d] = 0.0
                chi2[t, v] = 0.0
            continue
        x0, x1 = x[lo], x[hi - 1]
        cw = np.empty((n_trials, n))
        fww = np.empty((n_trials, n))
        keep = np.empty((n_trials, n), np.bool_)
        for t in range(n_trials):
            for i in range(n):
                c, f = cen[t, a0 + i], fw[a0 + i]
                cw[t, i] = c
                fww[t, i] = f
                inner = c >= x0 + f / 2 and c <= x1 - f / 2
                near = c >= x0 - tail * f and c <= x1 + tail * f
                keep[t, i] = (inner or near) and use[t, a0 + i]
        coef = np.zeros((n_trials, n + nb))
        c2 = np.zeros(n_trials)
        _window_trials(x[lo:hi], hw[lo:hi], tpow[lo:hi, :nb], y[lo:hi], wt[lo:hi], cw, fww, eta[a0:a1].copy(), keep,
                       coef, c2)
        for t in range(n_trials):
            for i in range(n):
                areas[t, a0 + i] = coef[t, i]
            for d in range(nb):
                bg[t, bg_lo[v] + d] = coef[t, n + d]
            chi2[t, v] = c2[t]


@njit(inline="always", nogil=True, error_model="numpy")
def _window_trials(x, hw, bg, y, w, cen, fw, eta, keep, coef, chi2):  # pragma: no cover - compiled
    """Weighted least squares of one window at many trials, the areas not negative.

    Trial ``t`` fits ``y`` (m,) with weights ``w`` (m,) by the lines of :func:`_line_terms`
    (instrument half-widths ``hw`` (m,)) at ``cen[t]`` (n,) with widths ``fw[t]`` (n,) and ``eta`` (n,) (a line not ``keep[t, i]``
    has an empty column) and the background columns ``bg`` (m, nb). Negative areas are dropped
    and the system solved again (twice); the normal equations are scaled to unit diagonal (a
    singular system gets a ridge of 1e-10 of the diagonal: two equal lines share their area).
    Writes the coefficients ``coef[t]`` (n + nb) and ``chi2[t]``."""
    m = x.size
    n = cen.shape[1]
    nb = bg.shape[1]
    k = n + nb
    a = np.zeros((m, k))
    b = y * w
    on = np.zeros(k, np.bool_)
    h = np.zeros((k, k))
    hs = np.zeros((k, k))
    r = np.zeros(k)
    rs = np.zeros(k)
    diag = np.zeros(k)
    changed = np.ones(k, np.bool_)      # columns that differ from the trial before
    for d in range(nb):
        for j in range(m):
            a[j, n + d] = w[j] * bg[j, d]
    for t in range(cen.shape[0]):
        # a line at the same centre, width and keep as in the trial before keeps its column and
        # its sums (most trials move one phase's lines; the others' and the background stay):
        # the same numbers, computed once
        for i in range(n):
            changed[i] = (t == 0 or cen[t, i] != cen[t - 1, i] or fw[t, i] != fw[t - 1, i]
                          or keep[t, i] != keep[t - 1, i])
            if not changed[i]:
                continue
            f = fw[t, i]
            g_unit = (1.0 - eta[i]) * _CG / f
            l_unit = eta[i] * _CL / f
            for j in range(m):
                if not keep[t, i]:
                    a[j, i] = 0.0
                elif hw[j] < _POINT_BELOW * f:
                    u = (x[j] - cen[t, i]) / f
                    a[j, i] = w[j] * (l_unit / (1.0 + 4.0 * u * u) + g_unit * np.exp(-4.0 * _LN2 * u * u))
                else:
                    a[j, i] = w[j] * _line_terms(x[j], cen[t, i], 1.0 / f, 1.0, eta[i], hw[j])[1]
        for i in range(n, k):
            changed[i] = t == 0
        for i in range(k):
            on[i] = False
            for j in range(m):
                if a[j, i] != 0.0:
                    on[i] = True
                    break
        # the normal equations (sums of columns that changed; a dropped column is masked below)
        for i in range(k):
            if changed[i]:
                s = 0.0
                for j in range(m):
                    s += a[j, i] * b[j]
                r[i] = s
            for q in range(i, k):
                if changed[i] or changed[q]:
                    s = 0.0
                    for j in range(m):
                        s += a[j, i] * a[j, q]
                    h[i, q] = s
                    h[q, i] = s
        _nonnegative_solve(h, r, on, n, diag, hs, rs, coef[t])
        total = 0.0
        for j in range(m):
            v = b[j]
            for i in range(k):
                v -= a[j, i] * coef[t, i]
            total += v * v
        chi2[t] = total


@njit(inline="always", nogil=True, error_model="numpy")
def _nonnegative_solve(h, r, on, n, diag, hs, rs, out):  # pragma: no cover - compiled
    """``h out = r`` over the columns ``on`` (the others 0), the first ``n`` not negative: a
    negative one is dropped and the system solved again (twice), then clipped at 0. The system
    is scaled to unit diagonal (:func:`_spd_solve`). ``diag``, ``hs``, ``rs``: work arrays."""
    k = r.size
    for _ in range(3):
        for i in range(k):
            diag[i] = np.sqrt(max(h[i, i], 1e-300)) if on[i] else 1.0
        for i in range(k):
            rs[i] = r[i] / diag[i] if on[i] else 0.0
            for q in range(k):
                if on[i] and on[q]:
                    hs[i, q] = h[i, q] / (diag[i] * diag[q])
                else:
                    hs[i, q] = 1.0 if i == q else 0.0
        z = _spd_solve(hs, rs)
        negative = False
        for i in range(k):
            out[i] = z[i] / diag[i] if on[i] else 0.0
            if i < n and out[i] < 0:
                negative = True
        if not negative:
            break
        for i in range(n):
            if out[i] < 0:
                on[i] = False
    for i in range(n):
        out[i] = max(out[i], 0.0)


@njit(nogil=True, error_model="numpy")
def _angle_terms(alpha, beta, gamma):  # pragma: no cover - compiled
    """The cosines and sines of a cell's angles (degrees) and 1 - cos²α - cos²β - cos²γ + 2 cos α
    cos β cos γ: what the reciprocal metric takes from the angles (see :func:`_d_spacing`)."""
    rad = np.pi / 180.0
    ca, cb, cg = np.cos(alpha * rad), np.cos(beta * rad), np.cos(gamma * rad)
    sa, sb, sg = np.sin(alpha * rad), np.sin(beta * rad), np.sin(gamma * rad)
    return ca, cb, cg, sa, sb, sg, 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg


@njit(nogil=True, error_model="numpy")
def _d_spacing(h, k, l, a, b, c, ca, cb, cg, sa, sb, sg, vol2):  # pragma: no cover - compiled
    """The d-spacing of (hkl) from the reciprocal metric tensor, the angles' terms given."""
    inv_d2 = (h * h * sa**2 / a**2 + k * k * sb**2 / b**2 + l * l * sg**2 / c**2
              + 2 * k * l * (cb * cg - ca) / (b * c) + 2 * h * l * (cg * ca - cb) / (a * c)
              + 2 * h * k * (ca * cb - cg) / (a * b)) / vol2
    return 1.0 / np.sqrt(inv_d2) if inv_d2 > 0 else (np.inf if inv_d2 == 0 else np.nan)


@njit(nogil=True, error_model="numpy")
def _position_of_d(d, zero, wavelength, unit, displacement):  # pragma: no cover - compiled
    """A d-spacing's position on the run's axis (see :func:`radial_positions`)."""
    rad = np.pi / 180.0
    tth = np.nan
    if wavelength > 0:
        s = wavelength / (2.0 * d)
        if np.abs(s) <= 1:
            tth = 2.0 * np.arcsin(s) / rad
        if displacement:
            tth += zero * np.cos(tth * rad / 2)
        else:
            tth += zero
    if unit == 1:
        return 4.0 * np.pi * np.sin(tth * rad / 2.0) / wavelength if wavelength > 0 else 2 * np.pi / d
    return tth


@_kernel
def radial_positions(hkl, cell, zero, wavelength, unit, displacement, out):  # pragma: no cover - compiled
    """Positions ``out`` (T, n) of reflections ``hkl`` (n, 3) in cells ``cell`` (T, n, 6), or
    (T, 1, 6) one per trial (a, b, c in Å, α, β, γ in degrees), with zero shifts ``zero`` (T,):
    the d-spacing from the reciprocal metric tensor (as
    :func:`xrdpipe.crystallography.d_from_cell`), then 2θ (degrees) at ``wavelength`` (NaN where
    λ > 2d, and everywhere without a wavelength, ``wavelength`` 0), plus the zero shift (times
    cos θ with ``displacement``); with ``unit`` 1, Q (Å⁻¹) of that 2θ, or 2π/d without a
    wavelength."""
    each = cell.shape[1] > 1
    for t in range(out.shape[0]):
        for n in range(hkl.shape[0]):
            e = n if each else 0
            ca, cb, cg, sa, sb, sg, vol2 = _angle_terms(cell[t, e, 3], cell[t, e, 4], cell[t, e, 5])
            d = _d_spacing(hkl[n, 0], hkl[n, 1], hkl[n, 2], cell[t, e, 0], cell[t, e, 1], cell[t, e, 2],
                           ca, cb, cg, sa, sb, sg, vol2)
            out[t, n] = _position_of_d(d, zero[t], wavelength, unit, displacement)


@_kernel
def centre_derivs(hkl, r_phase, cell_src, base, theta, dcol, zero_col, wavelength, unit, displacement,
                  cen, dval):  # pragma: no cover - compiled
    """Every line's centre ``cen`` (r, R) for parameter rows ``theta`` (r, k) and its derivatives
    ``dval`` (r, R, width) by the columns ``dcol`` (R, width) that move it: its phase's cell
    columns (-1: none), then the zero shift (last). Line ``i`` is reflection ``hkl[i]`` of phase
    ``r_phase[i]``, whose cell parameter ``j`` is column ``cell_src[p, j]`` of a row, or
    ``base[p, j]`` where that is -1; positions as :func:`radial_positions`.

    The derivatives are central differences: by a cell column ``c``, with the step 1e-6 times
    the row's ``|theta[r, c]|`` (at least 1e-6; NaN where that is NaN), so that a row's centres
    and derivatives are the same numbers whatever other rows it is evaluated with (a batch
    split over threads gives what it gives whole); by the zero shift with the step 1e-4."""
    n_rows, n_lines = cen.shape
    width = dcol.shape[1]
    steps = np.zeros((n_rows, theta.shape[1]))
    for r in range(n_rows):
        for c in range(theta.shape[1]):
            v = abs(theta[r, c])
            steps[r, c] = 1e-6 * (1.0 if 1.0 > v else v)
    hz = 1e-4
    cell = np.zeros(6)
    pos = np.zeros(2)
    for r in range(n_rows):
        zero = theta[r, zero_col]
        for i in range(n_lines):
            p = r_phase[i]
            h0, k0, l0 = hkl[i, 0], hkl[i, 1], hkl[i, 2]
            for j in range(6):
                cell[j] = theta[r, cell_src[p, j]] if cell_src[p, j] >= 0 else base[p, j]
            # (the angles' terms and the d-spacing, computed once where a step does not move them)
            ca, cb, cg, sa, sb, sg, vol2 = _angle_terms(cell[3], cell[4], cell[5])
            d = _d_spacing(h0, k0, l0, cell[0], cell[1], cell[2], ca, cb, cg, sa, sb, sg, vol2)
            cen[r, i] = _position_of_d(d, zero, wavelength, unit, displacement)
            up = _position_of_d(d, zero + hz, wavelength, unit, displacement)
            dn = _position_of_d(d, zero - hz, wavelength, unit, displacement)
            dval[r, i, width - 1] = (up - dn) / (2.0 * hz)
            for q in range(width - 1):
                col = dcol[i, q]
                if col < 0:
                    continue
                h = steps[r, col]
                angle = False
                for j in range(6):
                    if cell_src[p, j] == col and j >= 3:
                        angle = True
                for side in range(2):
                    moved = theta[r, col] + h if side == 0 else theta[r, col] - h
                    for j in range(6):
                        if cell_src[p, j] == col:
                            cell[j] = moved
                    if angle:
                        mca, mcb, mcg, msa, msb, msg, mvol2 = _angle_terms(cell[3], cell[4], cell[5])
                    else:
                        mca, mcb, mcg, msa, msb, msg, mvol2 = ca, cb, cg, sa, sb, sg, vol2
                    dm = _d_spacing(h0, k0, l0, cell[0], cell[1], cell[2], mca, mcb, mcg, msa, msb, msg, mvol2)
                    pos[side] = _position_of_d(dm, zero, wavelength, unit, displacement)
                for j in range(6):
                    if cell_src[p, j] == col:
                        cell[j] = theta[r, col]
                dval[r, i, q] = (pos[0] - pos[1]) / (2.0 * h)


@_kernel
def phase_normal_rows(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, fw_col, eta_col,
                       a_col, la, lf, le, ld, hkl, r_phase, cell_src, base, dcol, zero_col, wavelength, unit,
                       displacement, theta, held, chi2, hess, grad):  # pragma: no cover - compiled
    """chi², JᵀW²J and JᵀW²r of parameter rows ``theta`` (r, k), the rows' ``held`` columns
    (r, k) given: the lines' centres and their derivatives (:func:`centre_derivs`, each
    row's with its own steps), a line whose area is held at 0 left
    out, then :func:`phase_normal` (what :meth:`xrdpipe.phasefit.PhaseModel.normal` does)."""
    n = theta.shape[0]
    n_lines = hkl.shape[0]
    cen = np.empty((n, n_lines))
    dval = np.zeros((n, n_lines, dcol.shape[1]))
    centre_derivs(hkl, r_phase, cell_src, base, theta, dcol, zero_col, wavelength, unit, displacement, cen, dval)
    skip = np.zeros((n, n_lines), np.bool_)
    for r in range(n):
        for i in range(n_lines):
            skip[r, i] = held[r, a_col[i]] and theta[r, a_col[i]] == 0.0
    chi2[:] = 0.0
    hess[:] = 0.0
    grad[:] = 0.0
    phase_normal(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, cen, theta, fw_col,
                 eta_col, a_col, la, lf, le, ld, dval, skip, chi2, hess, grad)


@_kernel
def phase_lm(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, fw_col, eta_col, a_col,
             la, lf, le, ld, hkl, r_phase, cell_src, base, dcol, zero_col, wavelength, unit, displacement,
             p, lower, upper, fixed, stop, max_iter, xtol, amp_cols, amp_shape, weak_z, moved,
             rise_ends, chi2, hess, n_iter, status):  # pragma: no cover - compiled
    """The Levenberg-Marquardt iterations of :func:`xrdpipe.batchfit._iterate` for rows ``p``
    (n, k) of the phase model against one frame's data ``y``, weights ``wt`` (the lines of
    :func:`phase_normal_rows`), compiled: the same steps in the same order on the same rows
    at once (the active ones), with the same kernels (:func:`~xrdpipe.kernels.batch.damped_systems`,
    :func:`~xrdpipe.kernels.batch.take_steps`) and LAPACK's solve, so the same numbers, without
    the ~0.8 ms of NumPy calls an iteration took in Python. ``p`` is updated in place; writes
    ``chi2`` (n,), ``hess`` (n, k, k), ``n_iter`` and ``status`` (1 converged, 0 out of
    iterations, -1 not finite); ``moved`` (n,): rows that need not take a step to be done
    (updated); ``rise_ends`` (n,): rows that may end, once moved, on a step that promises a rise
    (:func:`~xrdpipe.batchfit.least_squares_batch`'s ``must_descend`` negated). ``amp_cols``,
    ``amp_shape``: the weak-peak map (empty: none), used from the third iteration on."""
    n, k = p.shape
    grad = np.zeros((n, k))
    phase_normal_rows(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, fw_col, eta_col,
                       a_col, la, lf, le, ld, hkl, r_phase, cell_src, base, dcol, zero_col, wavelength, unit,
                       displacement, p, fixed, chi2, hess, grad)
    lam = np.full(n, 1e-3)
    no_cols = np.zeros(0, np.int64)
    no_shape = np.zeros((0, 1), np.int64)
    active = np.zeros(n, np.int64)
    na = 0
    for r in range(n):
        n_iter[r] = 0
        if np.isfinite(chi2[r]):
            status[r] = 0
            active[na] = r
            na += 1
        else:
            status[r] = -1
    for it in range(max_iter):
        if na == 0:
            break
        rows = active[:na]
        pa, ga, ha, lo, hi, fx, la_ = p[rows], grad[rows], hess[rows], lower[rows], upper[rows], fixed[rows], lam[rows]
        damped = np.empty((na, k, k))
        rhs = np.empty((na, k))
        if it >= 2:
            damped_systems(ha, ga, pa, lo, hi, fx, la_, amp_cols, amp_shape, weak_z, damped, rhs)
        else:
            damped_systems(ha, ga, pa, lo, hi, fx, la_, no_cols, no_shape, weak_z, damped, rhs)
        trial = np.empty((na, k))
        diag = np.empty((na, k))
        keep = np.ones(na, np.bool_)
        for i in range(na):
            a = active[i]
            step = _lm_solve(damped[i], rhs[i])
            for c in range(k):
                v = pa[i, c] + step[c]
                trial[i, c] = v if v != v else min(max(v, lo[i, c]), hi[i, c])     # (np.clip's NaN kept)
                diag[i, c] = ha[i, c, c]
            # a nearly undamped step that promises less than the tolerance: done (see _iterate)
            dg = 0.0
            for c in range(k):
                dg += (trial[i, c] - pa[i, c]) * ga[i, c]
            dhd = 0.0
            for c in range(k):
                dc = trial[i, c] - pa[i, c]
                s = 0.0
                for q in range(k):
                    s += ha[i, c, q] * (trial[i, q] - pa[i, q])
                dhd += dc * s
            promise = 2 * dg - dhd
            if (lam[a] <= 1e-2 and promise <= stop[a] * chi2[a] and it > 0
                    and ((moved[a] and rise_ends[a]) or promise >= 0)):
                status[a] = 1
                keep[i] = False
        sel = np.flatnonzero(keep)
        m_ = sel.size
        if m_ == 0:
            na = 0
            break
        act = rows[sel]
        pa2, tr2, dg2, fx2, st2, before = pa[sel], trial[sel], diag[sel], fx[sel], stop[act], chi2[act]
        for a in act:
            n_iter[a] += 1
        chi2_t = np.empty(m_)
        hess_t = np.empty((m_, k, k))
        grad_t = np.empty((m_, k))
        phase_normal_rows(x, hw, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, fw_col,
                           eta_col, a_col, la, lf, le, ld, hkl, r_phase, cell_src, base, dcol, zero_col, wavelength,
                           unit, displacement, tr2, fx2, chi2_t, hess_t, grad_t)
        done = np.zeros(m_, np.bool_)
        take_steps(act, pa2, tr2, dg2, chi2_t, hess_t, grad_t, p, chi2, hess, grad, lam, st2, xtol, done)
        na = 0
        for j in range(m_):
            a = act[j]
            if chi2[a] < before[j]:
                moved[a] = True
            if done[j]:
                status[a] = 1
            else:
                active[na] = a
                na += 1


@njit(nogil=True, error_model="numpy")
def _lm_solve(a, b):  # pragma: no cover - compiled
    """``a x = b`` by LAPACK (as ``np.linalg.solve``), by least squares where it is singular
    (NumPy's default cut of small singular values: machine epsilon times the larger size); NaN
    where ``a`` or ``b`` is not finite, as NumPy's solve gives (Numba's raises, and an exception
    raised again in the handler stopped the whole run with "Unreachable condition reached")."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return np.full(b.shape[0], np.nan)
    try:
        return np.linalg.solve(a, b)
    except Exception:
        return np.linalg.lstsq(a, b, rcond=2.220446049250313e-16 * max(a.shape[0], a.shape[1]))[0]


@_kernel
def add_lines(x, cen, fw, area, eta, out):  # pragma: no cover - compiled
    """Add to ``out`` (m,) the sum over lines of the area-normalised pseudo-Voigt of
    :func:`xrdpipe.lineshapes.pseudo_voigt` (a point sample) of centres ``cen``, FWHM ``fw``,
    areas ``area`` and ``eta`` (n,) at ``x`` (m,): each term with the operations of that
    function in their order, and the sum over lines as NumPy's sum along a row takes it
    (in order below eight lines; eight running sums, then paired, from eight on), so the same
    numbers as ``out += pseudo_voigt(x[:, None], ...).sum(axis=1)``."""
    n = cen.size
    v = np.empty(n)
    for j in range(x.size):
        for i in range(n):
            u = (x[j] - cen[i]) / fw[i]
            # (beyond 16.7 FWHM the Gaussian's exp underflows to 0.0: not called, the same bits;
            # NaN still goes through it)
            g = 0.0 if u * u >= _GAUSS_GONE else _CG * np.exp(-4 * _LN2 * u * u)
            lo = _CL / (1 + 4 * u * u)
            v[i] = area[i] / fw[i] * (eta[i] * lo + (1 - eta[i]) * g)
        out[j] += _row_sum(v)


@njit(inline="always", nogil=True, error_model="numpy")
def _row_sum(v):  # pragma: no cover - compiled
    """``v.sum()`` for a short contiguous row as NumPy's pairwise sum takes it (up to 128
    terms: sequential below eight; else eight running sums over the first multiple of eight,
    combined ((0+1)+(2+3))+((4+5)+(6+7)), then the rest in order)."""
    n = v.size
    if n < 8:
        s = 0.0
        for i in range(n):
            s += v[i]
        return s
    r0, r1, r2, r3, r4, r5, r6, r7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    i = 8
    while i < n - n % 8:
        r0 += v[i]
        r1 += v[i + 1]
        r2 += v[i + 2]
        r3 += v[i + 3]
        r4 += v[i + 4]
        r5 += v[i + 5]
        r6 += v[i + 6]
        r7 += v[i + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += v[i]
        i += 1
    return s


@_kernel
def odd_about_lines(x, r, valid, cen, width, reach, out, counts):  # pragma: no cover - compiled
    """The part of a residual ``r`` (on the sorted points ``x``, ``valid`` where weighted) odd
    about each line: for line k (centre ``cen[k]``, FWHM ``width[k]``), at every valid point
    above the centre within ``reach`` FWHM, half the residual less the residual mirrored below
    the centre (linear interpolation between two valid points, neither the point itself),
    normalised to unit variance for unit independent noise, (1 + t² + (1 - t)²) / 4 with t the
    interpolation weight. Written one line after the other into ``out``, ``counts[k]`` values
    for line k (0 where its width is not a positive number). The same operations in the same
    order as the NumPy expressions of :func:`xrdpipe.phasefit.solve.position_redchi` had (the
    same bits)."""
    n = x.size
    pos = 0
    for k in range(cen.size):
        counts[k] = 0
        c, wd = cen[k], width[k]
        if not (np.isfinite(wd) and wd > 0):
            continue
        top = c + reach * wd
        for u in range(n):
            if not (valid[u] and x[u] > c and x[u] <= top):
                continue
            mirror = 2 * c - x[u]
            j = np.searchsorted(x, mirror) - 1
            if j < 0 or j + 1 >= u or not (valid[j] and valid[j + 1]):
                continue
            t = (mirror - x[j]) / (x[j + 1] - x[j])
            s = 1 - t
            out[pos] = (r[u] - (s * r[j] + t * r[j + 1])) / 2 / math.sqrt((1 + t * t + s * s) / 4)
            pos += 1
            counts[k] += 1


@_kernel
def free_shifts(hkl, row, tied, values, wavelength, unit, displacement, out):  # pragma: no cover - compiled
    """How far reflections ``hkl`` (n, 3) of one phase move on the run's axis per unit of each
    of its free cell parameters, ``out`` (f, n): central differences with the step 1e-4 times
    the parameter (at least 1e-4), the parameters its crystal system ties to each (``tied``
    (f, 6)) moving with it. ``row`` (6,): the full cell with the system's constants; the free
    parameters at ``values`` (f,). The numbers of
    :meth:`xrdpipe.phasefit.PhaseModel.shifted_cells` placed by :func:`radial_positions`
    (zero shift 0), then ``abs(up - down) / (2 h)``."""
    f = values.size
    cell = np.empty(6)
    for k in range(f):
        a = abs(values[k])
        h = 1e-4 * (1.0 if 1.0 > a else a)
        for n in range(hkl.shape[0]):
            pos_up = 0.0
            pos_dn = 0.0
            for side in range(2):
                for j in range(6):
                    cell[j] = row[j]
                    for q in range(f):
                        if tied[q, j]:
                            cell[j] = values[q]
                    if tied[k, j]:
                        cell[j] = values[k] + h if side == 0 else values[k] - h
                ca, cb, cg, sa, sb, sg, vol2 = _angle_terms(cell[3], cell[4], cell[5])
                d = _d_spacing(hkl[n, 0], hkl[n, 1], hkl[n, 2], cell[0], cell[1], cell[2], ca, cb, cg, sa, sb, sg, vol2)
                pos = _position_of_d(d, 0.0, wavelength, unit, displacement)
                if side == 0:
                    pos_up = pos
                else:
                    pos_dn = pos
            out[k, n] = abs(pos_up - pos_dn) / (2 * h)


@_kernel
def add_lines_reach(x, win_lo, win_hi, reach, cen, fw, area, eta, out):  # pragma: no cover - compiled
    """:func:`add_lines` in every window ``w`` (points ``win_lo[w]:win_hi[w]`` of ``x`` and
    ``out``, the concatenated windows) of the lines ``reach[:, w]`` (L, W) picks, in their order:
    one call for what a call per window does (the same numbers)."""
    n_lines = cen.size
    sel_c = np.empty(n_lines)
    sel_f = np.empty(n_lines)
    sel_a = np.empty(n_lines)
    sel_e = np.empty(n_lines)
    for w in range(win_lo.size):
        n = 0
        for i in range(n_lines):
            if reach[i, w]:
                sel_c[n], sel_f[n], sel_a[n], sel_e[n] = cen[i], fw[i], area[i], eta[i]
                n += 1
        if n:
            add_lines(x[win_lo[w]:win_hi[w]], sel_c[:n], sel_f[:n], sel_a[:n], sel_e[:n], out[win_lo[w]:win_hi[w]])
