"""Line shapes: analytic derivatives, normalisation and heights; the batched solver."""

import numpy as np
import pytest
from scipy.integrate import quad

from xrdpipe.batchfit import least_squares_batch
from xrdpipe.lineshapes import PROFILES, height

PARAMS = {
    "pseudo_voigt": (0.1, 0.3, 2.0, 0.4),
    "pearson7": (0.1, 0.3, 2.0, 1.7),
    "split_pseudo_voigt": (0.1, 0.25, 0.4, 2.0, 0.4),
}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_jacobian_matches_finite_differences(name):
    f, jac, names = PROFILES[name]
    x = np.linspace(-1.5, 1.8, 701)
    p = list(PARAMS[name])
    val, parts = jac(x, *p)
    np.testing.assert_allclose(val, f(x, *p), rtol=1e-12)
    for i, pname in enumerate(names):
        h = 1e-6 * max(1.0, abs(p[i]))
        up, down = list(p), list(p)
        up[i] += h
        down[i] -= h
        num = (f(x, *up) - f(x, *down)) / (2 * h)
        err = np.max(np.abs(num - parts[i])) / np.max(np.abs(num))
        assert err < 1e-6, f"{name} d/d{pname}: relative error {err:.1e}"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_are_area_normalised(name):
    f = PROFILES[name][0]
    p = PARAMS[name]
    c = p[0]
    total = quad(lambda x: f(x, *p), -np.inf, c, limit=200)[0] + quad(lambda x: f(x, *p), c, np.inf, limit=200)[0]
    assert total == pytest.approx(2.0, rel=1e-7)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_height_is_the_value_at_the_centre(name):
    f, _, names = PROFILES[name]
    p = PARAMS[name]
    kw = dict(zip(names, p))
    if name == "split_pseudo_voigt":
        h = height(name, kw["area"], kw["fwhm_left"], kw["eta"], kw["fwhm_right"])
    else:
        h = height(name, kw["area"], kw["fwhm"], p[-1])
    assert h == pytest.approx(float(f(np.array([p[0]]), *p)[0]), rel=1e-12)
    # and the FWHM is the full width at half that height
    half = lambda x: float(f(np.array([x]), *p)[0]) - h / 2  # noqa: E731
    from scipy.optimize import brentq

    left = brentq(half, p[0] - 5, p[0])
    right = brentq(half, p[0], p[0] + 5)
    width = kw.get("fwhm", None) or (kw["fwhm_left"] + kw["fwhm_right"]) / 2
    assert right - left == pytest.approx(width, rel=1e-9)


def _line(x):
    def fun(p):
        f = p[:, :1] + p[:, 1:2] * x
        jac = np.stack([np.ones_like(f), np.broadcast_to(x, f.shape)], axis=1)
        return f, jac
    return fun


def test_linear_problem_is_solved_exactly_with_its_covariance():
    rng = np.random.default_rng(1)
    x = np.linspace(-1, 1, 40)
    y = np.stack([3.0 + 2.0 * x, -1.0 + 0.5 * x]) + rng.normal(0, 0.1, (2, 40))
    w = np.full((2, 40), 1 / 0.1)
    res = least_squares_batch(_line(x), np.zeros((2, 2)), y, w, lower=[-np.inf] * 2, upper=[np.inf] * 2)
    a = np.column_stack([np.ones_like(x), x]) * 10.0
    for i in range(2):
        coef = np.linalg.lstsq(a, y[i] * 10.0, rcond=None)[0]
        np.testing.assert_allclose(res.p[i], coef, atol=1e-4 * 0.016)  # 1e-4 of the esd
        np.testing.assert_allclose(res.cov[i], np.linalg.inv(a.T @ a), rtol=1e-9)
    assert res.success.all()


def test_bounds_hold_and_a_held_parameter_has_no_esd():
    x = np.linspace(-1, 1, 50)
    y = (1.0 - 0.3 * x)[None, :]  # slope is negative, the bound says >= 0
    res = least_squares_batch(_line(x), np.array([[0.0, 1.0]]), y, np.ones((1, 50)),
                              lower=[-np.inf, 0.0], upper=[np.inf, np.inf])
    assert res.p[0, 1] == 0.0 and res.at_bound[0, 1]
    assert res.p[0, 0] == pytest.approx(1.0, abs=1e-5)  # far below its esd (0.14)
    assert np.isnan(res.cov[0, 1, 1]) and np.isfinite(res.cov[0, 0, 0])


def test_two_columns_of_one_line_lose_their_esds_and_no_other():
    """Two parameters that move the model alike (two areas of one line: only their sum is
    determined) make the normal matrix singular: they have no esd, and the others keep theirs,
    those of the model with the two merged (before, every esd of the row was NaN)."""
    x = np.linspace(-1, 1, 60)
    shape = np.exp(-x ** 2 / 0.1)

    def fun(p):
        f = p[:, :1] + p[:, 1:2] * x + (p[:, 2:3] + p[:, 3:4]) * shape
        jac = np.stack([np.ones_like(f), np.broadcast_to(x, f.shape), np.broadcast_to(shape, f.shape),
                        np.broadcast_to(shape, f.shape)], axis=1)
        return f, jac

    rng = np.random.default_rng(2)
    y = (1.0 + 0.2 * x + 3.0 * shape + rng.normal(0, 0.05, x.size))[None]
    w = np.full((1, x.size), 1 / 0.05)
    res = least_squares_batch(fun, np.array([[0.5, 0.0, 1.0, 1.0]]), y, w, lower=[-np.inf] * 4, upper=[np.inf] * 4)
    assert res.p[0, 2] + res.p[0, 3] == pytest.approx(3.0, abs=0.05)
    assert np.isnan(res.cov[0, 2, 2]) and np.isnan(res.cov[0, 3, 3])
    merged = np.column_stack([np.ones_like(x), x, shape]) / 0.05
    want = np.linalg.inv(merged.T @ merged)
    np.testing.assert_allclose(res.cov[0][np.ix_([0, 1], [0, 1])], want[:2, :2], rtol=1e-6, atol=1e-12)


def test_covariance_inverts_each_rows_free_block():
    """Rows of a batch with different parameters held (or without influence): each row's
    covariance is the inverse of its own free block, NaN in every row and column of the others;
    rows with the same free set are inverted together, a singular one alone."""
    from xrdpipe.batchfit import _covariance

    rng = np.random.default_rng(5)
    k = 9
    a = rng.normal(size=(40, k))
    hess = np.repeat((a.T @ a)[None], 4, axis=0)
    held = np.zeros((4, k), bool)
    held[1, [0, 4]] = True
    held[2, [0, 4]] = True
    hess[3, 6, :] = hess[3, :, 6] = 0.0           # (no influence)
    hess[2, 2] = hess[2, 3]                         # row 2: columns 2 and 3 the same
    hess[2, :, 2] = hess[2, :, 3]
    cov = _covariance(hess, held)
    for r, free in enumerate([np.arange(k), np.delete(np.arange(k), [0, 4]), None, np.delete(np.arange(k), 6)]):
        if free is None:
            continue
        np.testing.assert_allclose(cov[r][np.ix_(free, free)], np.linalg.inv(hess[r][np.ix_(free, free)]), rtol=1e-9)
        dead = np.setdiff1d(np.arange(k), free)
        assert np.isnan(cov[r][dead]).all() and np.isnan(cov[r][:, dead]).all()
    # the singular row: no esd for the two columns of one direction, the others' finite
    assert np.isnan(cov[2][2, 2]) and np.isnan(cov[2][3, 3])
    assert np.isfinite(np.diagonal(cov[2])[[1, 5, 6, 7, 8]]).all() and np.isnan(cov[2][[0, 4]]).all()
