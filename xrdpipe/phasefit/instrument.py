"""What an integrated bin is to the phase model: where each point of the radial axis is and
over how much of it a line is averaged there (the integration's ``instrument_sd`` and
``instrument_offset`` records, or ``[fit] instrument_sd``)."""

from __future__ import annotations

import numpy as np

from ..config import FitSpec


def instrument_profile(fit: FitSpec, radial: np.ndarray, instrument_sd: np.ndarray | None,
                       instrument_offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where each point of ``radial`` is, and the half-width of the triangle each line is
    averaged over there (:func:`xrdpipe.kernels.phase._line_terms`): (M,) and (M,).

    With ``[fit] instrument = "auto"`` a point is the mean of the radial positions it averages
    over (``radial + instrument_offset``: an integrated bin's pixels are not spread evenly about
    its centre) and the half-width is sqrt(6) times their standard deviation
    (``instrument_sd``, or the constant ``[fit] instrument_sd`` where given; the recorded
    offsets apply either way). With ``instrument = "none"``: the radial value and 0, a point
    sample. Without an sd (none recorded, none given) or where it is not finite: a half-width
    of 0; without an offset or where it is not finite: the radial value."""
    radial = np.asarray(radial, float)
    point = (radial, np.zeros(radial.size))
    if fit.instrument == "none":
        return point
    where = radial
    if instrument_offset is not None:
        off = _per_point(instrument_offset, radial, "instrument_offset")
        where = radial + np.where(np.isfinite(off), off, 0.0)
    if fit.instrument_sd is not None:
        sd = np.full(radial.size, float(fit.instrument_sd))
    elif instrument_sd is None:
        return where, point[1]
    else:
        sd = _per_point(instrument_sd, radial, "instrument_sd")
    return where, np.where(np.isfinite(sd) & (sd > 0), np.sqrt(6.0) * sd, 0.0)


def _per_point(values, radial: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(values, float)
    if out.shape != radial.shape:
        raise ValueError(f"{name} has {out.size} points; the radial axis has {radial.size}")
    return out


def binned_lines(x: np.ndarray, hw: np.ndarray, centre, fwhm, area, eta) -> np.ndarray:
    """Lines as the phase model evaluates them (each averaged over the instrument's triangle of
    half-width ``hw`` (M,) at the points ``x`` (M,): :func:`xrdpipe.kernels.phase._line_terms`),
    one row per line of ``centre``, ``fwhm``, ``area``, ``eta`` (n,): (n, M). What a figure
    draws of a phase-model fit."""
    from .. import kernels

    x = np.ascontiguousarray(x, dtype=float)
    hw = np.ascontiguousarray(np.broadcast_to(hw, x.shape), dtype=float)
    cen = np.atleast_1d(np.asarray(centre, float))
    n, m = cen.size, x.size
    out = np.zeros((n, m))
    lo, hi = np.zeros(1, np.int64), np.full(1, m, np.int64)
    cols = np.zeros(1, np.int64), np.ones(1, np.int64), np.full(1, 2, np.int64)
    none = -np.ones((1, 1), np.int64)
    for i, (c, f, a, e) in enumerate(zip(cen, np.broadcast_to(fwhm, n), np.broadcast_to(area, n),
                                         np.broadcast_to(eta, n))):
        f_row, jac = np.zeros((1, m)), np.zeros((1, 3, m))
        kernels.phase_value_jac(x, hw, lo, hi, np.array([[c]]), np.array([[f, e, a]], float), *cols, none,
                                np.zeros((1, 1, 1)), f_row, jac)
        out[i] = f_row[0]
    return out
