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
    (``instrument_sd``, or the constant ``[fit] instrument_sd`` where given). Without a record,
    with ``instrument = "none"``, or where a value is not finite: the radial value and 0, a
    point sample."""
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
