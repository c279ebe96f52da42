"""Peak profiles as pure functions, each with its analytic derivatives.

Every profile is *area-normalised*: ``area`` is the integrated intensity and ``fwhm`` the full
width at half maximum, both in the units of ``x``. Arguments broadcast, so one call evaluates a
batch of frames (parameters of shape ``(n, 1)`` against ``x`` of shape ``(m,)``).

=====================  =====================================  ===================================
profile                parameters                              shape parameter
=====================  =====================================  ===================================
``pseudo_voigt``       center, fwhm, area, eta                 eta: Lorentzian fraction, 0..1
``pearson7``           center, fwhm, area, m                   m: 1 Lorentzian, -> inf Gaussian
``split_pseudo_voigt`` center, fwhm_left, fwhm_right, area,    eta, shared by both halves
                       eta
=====================  =====================================  ===================================

The ``*_jac`` functions return the value and a tuple with the partial derivatives in the order
of the parameters; ``tests/test_lineshapes.py`` checks them against finite differences.

Example
-------
>>> import numpy as np
>>> x = np.linspace(-1, 1, 2001)
>>> y = pseudo_voigt(x, 0.0, 0.1, 2.0, 0.5)
>>> round(float(y.sum() * (x[1] - x[0])), 2)   # the area, less the tails beyond ±10 FWHM
1.97
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln

__all__ = ["pseudo_voigt", "pseudo_voigt_jac", "pearson7", "pearson7_jac", "split_pseudo_voigt",
           "split_pseudo_voigt_jac", "height", "PROFILES"]

_LN2 = np.log(2.0)
_AG = np.sqrt(4 * _LN2 / np.pi)  # peak value of a unit-area Gaussian times its FWHM
_AL = 2 / np.pi                  # the same for a Lorentzian


def pseudo_voigt(x, center, fwhm, area, eta):
    """Area-normalised pseudo-Voigt: ``area * (eta * L + (1 - eta) * G)`` with one FWHM."""
    u = (x - center) / fwhm
    g = _AG * np.exp(-4 * _LN2 * u * u)
    lo = _AL / (1 + 4 * u * u)
    return area / fwhm * (eta * lo + (1 - eta) * g)


def pseudo_voigt_jac(x, center, fwhm, area, eta):
    """Value and derivatives with respect to (center, fwhm, area, eta).

    Written for speed (it is the inner loop of the batched fit): the per-peak factors are formed
    on the small parameter arrays, so each point costs one exp and about twenty multiplications.
    """
    inv_f = 1.0 / fwhm
    u = (x - center) * inv_f
    u2 = u * u
    gauss = np.exp(u2 * (-4 * _LN2))
    lor = 1.0 / (1.0 + 4.0 * u2)
    g_unit = (1 - eta) * _AG * inv_f      # per-peak factors
    l_unit = eta * _AL * inv_f
    t1 = (area * g_unit) * gauss
    t2 = (area * l_unit) * lor
    val = t1 + t2
    unit = g_unit * gauss + l_unit * lor
    s = _LN2 * t1 + t2 * lor
    d_c = (8 * inv_f) * u * s
    d_f = inv_f * (8 * u2 * s - val)
    d_eta = (area * _AL * inv_f) * lor - (area * _AG * inv_f) * gauss
    return val, (d_c, d_f, unit, d_eta)


def _p7_parts(fwhm, m):
    k = np.power(2.0, 1.0 / m) - 1
    w = fwhm / (2 * np.sqrt(k))
    log_c = gammaln(m) - gammaln(m - 0.5) - 0.5 * np.log(np.pi)
    return k, w, np.exp(log_c)


def pearson7(x, center, fwhm, area, m):
    """Area-normalised Pearson VII: ``area * C(m) / w * (1 + ((x - center) / w)**2) ** -m``."""
    _, w, c = _p7_parts(fwhm, m)
    s = (x - center) / w
    return area * c / w * np.power(1 + s * s, -m)


def pearson7_jac(x, center, fwhm, area, m):
    """Value and derivatives with respect to (center, fwhm, area, m)."""
    k, w, c = _p7_parts(fwhm, m)
    s = (x - center) / w
    b = 1 + s * s
    unit = c / w * np.power(b, -m)
    val = area * unit
    d_c = val * (2 * m * s / (w * b))
    d_w = val / w * (2 * m * s * s / b - 1)
    d_f = d_w * (w / fwhm)
    dk_dm = -np.power(2.0, 1.0 / m) * _LN2 / (m * m)
    dw_dm = -w / (2 * k) * dk_dm
    d_m = val * (digamma(m) - digamma(m - 0.5) - np.log(b)) + d_w * dw_dm
    return val, (d_c, d_f, unit, d_m)


def _split_unit(u, eta):
    """Unit-area pseudo-Voigt kernel in the reduced coordinate u (and its derivative)."""
    b = 1 + 4 * u * u
    ge = _AG * np.exp(-4 * _LN2 * u * u)
    lo = _AL / b
    h = eta * lo + (1 - eta) * ge
    dh_du = eta * lo * (-8 * u / b) + (1 - eta) * ge * (-8 * _LN2 * u)
    return h, dh_du, lo, ge


def split_pseudo_voigt(x, center, fwhm_left, fwhm_right, area, eta):
    """Pseudo-Voigt with one FWHM below the centre and another above it, continuous at the top."""
    return split_pseudo_voigt_jac(x, center, fwhm_left, fwhm_right, area, eta)[0]


def split_pseudo_voigt_jac(x, center, fwhm_left, fwhm_right, area, eta):
    """Value and derivatives with respect to (center, fwhm_left, fwhm_right, area, eta)."""
    left = x < center
    fs = np.where(left, fwhm_left, fwhm_right)
    u = (x - center) / fs
    h, dh_du, lo, ge = _split_unit(u, eta)
    s = fwhm_left + fwhm_right
    unit = 2 / s * h
    val = area * unit
    common = -val / s
    own = area * 2 / s * dh_du * (-u / fs)
    return val, (area * 2 / s * dh_du * (-1 / fs),
                 common + np.where(left, own, 0.0),
                 common + np.where(left, 0.0, own),
                 unit,
                 area * 2 / s * (lo - ge))


def height(profile: str, area, fwhm, shape, fwhm_right=None):
    """Peak height of a profile from its area, FWHM (left FWHM for the split profile) and shape."""
    if profile == "pseudo_voigt":
        return area / fwhm * (shape * _AL + (1 - shape) * _AG)
    if profile == "pearson7":
        _, w, c = _p7_parts(fwhm, shape)
        return area * c / w
    if profile == "split_pseudo_voigt":
        return area * 2 / (fwhm + fwhm_right) * (shape * _AL + (1 - shape) * _AG)
    raise ValueError(f"unknown profile {profile!r}")


#: name -> (function, jacobian, parameter names); the shape parameter is always last.
PROFILES = {
    "pseudo_voigt": (pseudo_voigt, pseudo_voigt_jac, ("center", "fwhm", "area", "eta")),
    "pearson7": (pearson7, pearson7_jac, ("center", "fwhm", "area", "m")),
    "split_pseudo_voigt": (split_pseudo_voigt, split_pseudo_voigt_jac,
                           ("center", "fwhm_left", "fwhm_right", "area", "eta")),
}
