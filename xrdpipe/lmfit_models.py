"""A window model (:class:`~xrdpipe.windows.WindowModel`) as an lmfit composite model: the
user-facing definition of every model and the reference engine of :mod:`xrdpipe.peaks`. The only
module that imports lmfit; it imports neither the window model nor the fitting (no cycle)."""

from __future__ import annotations

import numpy as np

from .lineshapes import PROFILES

__all__ = ["lmfit_model", "lmfit_params"]


def lmfit_model(model):
    """A window as an lmfit composite model: one line shape per component with
    ``prefix="p{j}_"`` plus a polynomial background ``bg_``; the user-facing definition."""
    from lmfit import Model

    out = None
    for j in range(len(model.components)):
        part = Model(PROFILES[model.profile][0], prefix=f"p{j}_")
        out = part if out is None else out + part
    bg = Model(_background, prefix="bg_")
    return bg if out is None else out + bg


def lmfit_params(model, lm, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, hold: np.ndarray):
    """lmfit Parameters equivalent to a free vector, its bounds and held columns."""
    params = lm.make_params()
    for i, name in enumerate(model.full_names):
        col = model.tie[i]
        owner = model.names[col]
        if owner != name:
            params[name].set(expr=owner)
            continue
        params[name].set(value=theta[col], min=lo[col], max=hi[col], vary=not hold[col])
    for d in range(model.degree + 1, 5):
        params[f"bg_c{d}"].set(value=0.0, vary=False)
    params["bg_x_mid"].set(value=model.x_mid, vary=False)
    params["bg_half"].set(value=model.half, vary=False)
    return params


def _background(x, c0=0.0, c1=0.0, c2=0.0, c3=0.0, c4=0.0, x_mid=0.0, half=1.0):
    """Polynomial background in the reduced abscissa (for the lmfit model)."""
    t = (x - x_mid) / half
    return c0 + t * (c1 + t * (c2 + t * (c3 + t * c4)))
