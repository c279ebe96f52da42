"""The compiled and trimmed pieces of the phase model's steady path against the NumPy they
replace, bit for bit where they promise it: the normal equations with the lines of area held at
0 left out, the model's Jacobian without its empty lines, the centres' central differences, a
phase's shifted cells, the damped systems and the acceptance of trial points of the batched
least squares, and its covariance of chosen rows."""

import numpy as np
import pytest

from xrdpipe import kernels
from xrdpipe.batchfit import _covariance, least_squares_batch
from xrdpipe.config import FitSpec
from xrdpipe.phasefit import PhaseModel
from xrdpipe.phasefit.frame import _Frame
from xrdpipe.phasefit.solve import _held, initial_state
from xrdpipe.testing import Difficulty, fit_config, pattern_series


@pytest.fixture(scope="module")
def frame():
    """The hard O3 <-> P3 series' first frame on its model, and three parameter rows: O3 and Al,
    Al alone, O3 alone (the steady path's batch), the areas solved linearly at the start cells."""
    dif = Difficulty(start_error=((0.01, 0.02), (0.01, 0.02)), separation_fwhm=1.1, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=1)
    series = pattern_series(2, scenario="nfm", counts=0.05, background=2000.0, seed=1, difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    pat = series.as_patterns()
    m = PhaseModel(phases, windows, FitSpec(), radial=pat.radial, unit="2th_deg",
                   wavelength_A=series.scenario.wavelength_A)
    st = initial_state(m)
    st.present[[0, 2]] = True
    fr = _Frame(m, pat.intensity[0][m.columns], pat.sigma[0][m.columns], st)
    rows = [(0, 2), (2,), (0,)]
    theta = fr.linear_rows(st.cell, rows, 0.0)
    held = np.array([_held(m, s) for s in rows])
    return m, fr, st, theta, held


def _dense(m, fr, theta, base):
    """chi², JᵀW²J and JᵀW²r from the dense Jacobian of ``value_jac``."""
    f, jac = m.value_jac(theta, base)
    r = fr.w * (fr.y0 - f)
    jw = jac * fr.w
    return np.einsum("ij,ij->i", r, r), jw @ jw.transpose(0, 2, 1), (jw @ r[:, :, None])[:, :, 0]


def test_normal_equations_leave_out_only_lines_of_area_held_at_0(frame):
    """The normal equations straight from the lines equal the dense Jacobian's products; with the
    rows' held columns, the lines of area held at 0 are left out: every entry is the same to the
    last bit but those of their areas' columns, which are 0."""
    m, fr, st, theta, held = frame
    chi2, hess, grad = _dense(m, fr, theta, st.cell)
    full = m.normal(theta, st.cell, fr.y0, fr.w)
    for got, want in zip(full, (chi2, hess, grad)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    left = m.normal(theta, st.cell, fr.y0, fr.w, held)
    out = held[:, m.area_col] & (theta[:, m.area_col] == 0.0)
    assert out[1:].any() and not out.all()
    np.testing.assert_array_equal(left[0], full[0])
    for r in range(theta.shape[0]):
        gone = m.area_col[out[r]]
        keep = np.setdiff1d(np.arange(m.k), gone)
        np.testing.assert_array_equal(left[1][r][np.ix_(keep, keep)], full[1][r][np.ix_(keep, keep)])
        np.testing.assert_array_equal(left[2][r][keep], full[2][r][keep])
        assert not left[1][r][gone].any() and not left[2][r][gone].any()


def test_compiled_centre_derivatives_are_the_central_differences(frame):
    """The compiled centres and their derivatives are the positions of the parameter rows moved
    by ±h in each cell column (h = 1e-6 of the row's own value, at least 1e-6) and of the zero
    shift moved by ±1e-4, to the last bit; each row's the same alone as beside the others (a
    batch split over threads gives the numbers it gives whole)."""
    m, _, st, theta, _ = frame
    theta = theta.copy()
    theta[:, m.zero_col] = [0.01, -0.02, 0.0]
    cen, dval = m._centre_derivs(theta, st.cell)
    np.testing.assert_array_equal(cen, m.centres(m.cells(theta, st.cell), theta[:, m.zero_col]))
    for p in range(m.P):
        refl = m.r_phase == p
        for q, col in enumerate(m.cell_cols[p]):
            h = 1e-6 * np.maximum(np.abs(theta[:, col]), 1.0)
            moved = []
            for sign in (1.0, -1.0):
                t = theta.copy()
                t[:, col] += sign * h
                moved.append(m.centres(m.cells(t, st.cell), theta[:, m.zero_col])[:, refl])
            np.testing.assert_array_equal(dval[:, refl, q], (moved[0] - moved[1]) / (2 * h[:, None]))
    zero = theta[:, m.zero_col]
    up, dn = (m.centres(m.cells(theta, st.cell), zero + s) for s in (1e-4, -1e-4))
    np.testing.assert_array_equal(dval[:, :, -1], (up - dn) / (2 * 1e-4))
    for r in range(theta.shape[0]):
        alone = m._centre_derivs(theta[r:r + 1], st.cell)
        np.testing.assert_array_equal(alone[0][0], cen[r])
        np.testing.assert_array_equal(alone[1][0], dval[r])


def test_shifted_cells_are_the_cells_of_shifted_rows(frame):
    """A phase's cells at its free values and moved by ±h in each (the tied ones following)
    equal :meth:`PhaseModel.cells` of parameter rows so moved."""
    m, _, st, theta, _ = frame
    for p in range(m.P):
        cols = m.cell_cols[p]
        h = 1e-6 * np.maximum(np.abs(theta[0, cols]), 1.0)
        rows = np.repeat(theta[:1], 1 + 2 * len(cols), axis=0)
        for k, col in enumerate(cols):
            rows[1 + 2 * k, col] += h[k]
            rows[2 + 2 * k, col] -= h[k]
        np.testing.assert_array_equal(m.shifted_cells(p, theta[0, cols], h, st.cell[p]),
                                      m.cells(rows, st.cell)[:, p])


def test_damped_systems_are_the_numpy_ones():
    """The compiled damped systems are those of the NumPy expressions, entry by entry: held
    parameters (fixed, at a bound pushed out, the width of a weak peak) as rows of the identity."""
    rng = np.random.default_rng(7)
    n, k = 5, 9
    a = rng.normal(size=(n, k, k))
    h = a @ a.transpose(0, 2, 1)
    h[1, 3, :] = h[1, :, 3] = 0.0                       # a parameter without influence
    g = rng.normal(size=(n, k))
    pa = rng.normal(size=(n, k))
    lo, hi = np.full((n, k), -1.0), np.full((n, k), 1.0)
    pa[0, 2], g[0, 2] = -1.0, -0.5                       # at its bound, pushed out
    pa[:, 4] = [0.0, 1e-3, 5.0, 0.0, 3.0]                # amplitudes, some weak
    fixed = rng.random((n, k)) < 0.15
    lam = 10.0 ** rng.uniform(-4, 1, n)
    cols, shape = np.array([4], np.int64), np.array([[6, -1]], np.int64)
    damped, rhs = np.empty_like(h), np.empty_like(g)
    kernels.damped_systems(h, g, pa, lo, hi, fixed, lam, cols, shape, 2.0, damped, rhs)

    hold = fixed | ((pa <= lo) & (g < 0)) | ((pa >= hi) & (g > 0))
    diag = np.diagonal(h, axis1=1, axis2=2)
    weak = np.abs(pa[:, cols]) * np.sqrt(np.maximum(diag[:, cols], 0)) < 2.0
    hold[:, 6] |= weak[:, 0]
    assert weak.any() and not weak.all()
    eye = np.eye(k)
    free = ~hold
    want = (h + (lam[:, None] * np.where(diag > 0, diag, 1.0))[:, :, None] * eye) * (free[:, :, None] & free[:, None, :])
    want += eye * hold[:, :, None]
    np.testing.assert_array_equal(damped, want)
    np.testing.assert_array_equal(rhs, np.where(hold, 0.0, g))


def test_covariance_of_chosen_rows_only():
    """With ``covariance``, the rows asked for get the covariance of the whole batch's, bit for
    bit, the others NaN."""
    x = np.linspace(0, 1, 30)

    def fun(p):
        jac = np.stack([np.ones((len(p), x.size)), np.broadcast_to(x, (len(p), x.size)),
                        np.broadcast_to(x * x, (len(p), x.size))], 1)
        return p[:, :1] + p[:, 1:2] * x + p[:, 2:] * x * x, jac.copy()

    rng = np.random.default_rng(3)
    y = np.stack([1 + 2 * x - x * x, 3 - x, 0.5 * x * x]) + rng.normal(0, 0.01, (3, x.size))
    kw = dict(lower=np.full(3, -np.inf), upper=np.full(3, np.inf))
    every = least_squares_batch(fun, np.zeros((3, 3)), y, np.ones_like(y), **kw)
    first = least_squares_batch(fun, np.zeros((3, 3)), y, np.ones_like(y), covariance=[0], **kw)
    np.testing.assert_array_equal(first.p, every.p)
    np.testing.assert_array_equal(first.cov[0], every.cov[0])
    assert np.isnan(first.cov[1:]).all() and np.isfinite(every.cov[1:]).all()
    np.testing.assert_array_equal(_covariance(np.zeros((1, 2, 2)), np.zeros((1, 2), bool)), np.full((1, 2, 2), np.nan))


def test_take_steps_are_the_numpy_ones():
    """The compiled acceptance of trial points is that of the NumPy expressions: rows accepted
    (parameters, chi², curvature and gradient replaced, damping down) or refused (damping up),
    and which are done."""
    rng = np.random.default_rng(11)
    n, k = 6, 4
    active = np.array([0, 2, 3, 5])
    p, chi2 = rng.normal(size=(n, k)), rng.uniform(1, 2, n)
    hess, grad, lam = rng.normal(size=(n, k, k)), rng.normal(size=(n, k)), np.array([1e-3, 1, 1e-2, 1e12, 1e-5, 1])
    pa = p[active]
    trial = pa + np.array([[1e-9] * k, [0.1] * k, [1e-3] * k, [1e-10] * k]) * np.array([1, 1, -1, 1])[:, None]
    diag = np.abs(rng.normal(size=(4, k)))
    chi2_t = chi2[active] * np.array([0.9, 1.1, 1 - 1e-12, np.nan])
    hess_t, grad_t = rng.normal(size=(4, k, k)), rng.normal(size=(4, k))
    stop, xtol = np.full(4, 1e-8), 1e-8

    want_p, want_chi2, want_hess, want_grad, want_lam = p.copy(), chi2.copy(), hess.copy(), grad.copy(), lam.copy()
    old = want_chi2[active]
    better = np.isfinite(chi2_t) & (chi2_t < old)
    acc = active[better]
    small_step = np.all(np.abs(trial - pa) <= xtol * (np.abs(pa) + xtol), axis=1)
    small_drop = (old - chi2_t) <= stop * old
    tiny = np.all(np.abs(trial - pa) * np.sqrt(np.maximum(diag, 0)) <= 0.01, axis=1) & (want_lam[active] <= 1e-2)
    want_p[acc], want_chi2[acc], want_hess[acc], want_grad[acc] = trial[better], chi2_t[better], hess_t[better], grad_t[better]
    want_lam[acc] = np.maximum(want_lam[acc] * 0.1, 1e-12)
    want_lam[active[~better]] *= 10.0
    want_done = (better & (small_drop | small_step | tiny)) | (~better & (small_step | (want_lam[active] > 1e12)))

    done = np.zeros(4, bool)
    kernels.take_steps(active, pa, trial, diag, chi2_t, hess_t, grad_t, p, chi2, hess, grad, lam, stop, xtol, done)
    assert better.any() and not better.all() and want_done.any() and not want_done.all()
    for got, want in ((p, want_p), (chi2, want_chi2), (hess, want_hess), (grad, want_grad), (lam, want_lam),
                      (done, want_done)):
        np.testing.assert_array_equal(got, want)


def test_value_jac_without_empty_lines_in_the_columns_wanted(frame):
    """The model and Jacobian of :meth:`PhaseModel.value_jac` evaluated over some lines only,
    the others of area 0: the same model, and the same Jacobian in every column but those
    lines' areas, to the last bit."""
    m, _, st, theta, _ = frame
    row = theta[1:2]                                     # Al alone: O3's and P3's areas 0
    empty = row[0, m.area_col] == 0
    assert empty.any() and not empty.all()
    f, jac = m.value_jac(row, st.cell)
    f_some, jac_some = m.value_jac(row, st.cell, np.flatnonzero(~empty))
    np.testing.assert_array_equal(f_some, f)
    wanted = np.setdiff1d(np.arange(m.k), m.area_col[empty])
    np.testing.assert_array_equal(jac_some[:, wanted], jac[:, wanted])
    assert not jac_some[:, m.area_col[empty]].any()
