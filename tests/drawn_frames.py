"""Frames of drawn lines for the phase-model tests of any crystal (``test_phasefit``,
``test_phasefit_reactions``): each reflection's area drawn at random, the Al collector's lines,
the model's own profile or lines it does not share (Voigt, a curved background), Poisson noise."""

import numpy as np


def _as_patterns(tth: np.ndarray, lam: float, y: np.ndarray):
    """Frames ``y`` (n, points) of counts on ``tth`` as a run's patterns, Poisson esds, 20 s apart."""
    from xrdpipe.run.store import Patterns

    n = y.shape[0]
    return Patterns(tth, "2th_deg", lam, y, np.sqrt(np.maximum(y, 1)),
                    {"status": np.ones(n, int), "message": np.array([""] * n, dtype=object), "time_s": np.arange(n) * 20.0})


def _drawn_lines(lam: float, refl, rng, al_d_min: float | None = None) -> list[tuple[float, float]]:
    """(2θ, area) of the reflections ``refl`` ((h, k, l, d, multiplicity) rows), each area drawn
    (20-200 times its multiplicity), and of the Al collector's lines down to ``al_d_min`` (area
    300; None: none)."""
    from xrdpipe.crystallography import reflections, tth_from_d

    lines = [(float(tth_from_d(d, lam)), float(mult * rng.uniform(20, 200))) for *_, d, mult in refl]
    if al_d_min is not None:
        lines += [(float(tth_from_d(d, lam)), 300.0) for *_, d, _ in reflections("Fm-3m", 4.0495, None, al_d_min)]
    return lines


def _one_frame(tth: np.ndarray, lam: float, refl, rng, al_d_min: float | None = None):
    """One frame of :func:`_drawn_lines` (the model's own profile) over a background of 500
    counts, Poisson noise."""
    from xrdpipe.testing import pattern_1d

    peaks = [{"tth_deg": t, "area": a} for t, a in _drawn_lines(lam, refl, rng, al_d_min)]
    return _as_patterns(tth, lam, rng.poisson(pattern_1d(tth, peaks, background=500.0)).astype(float)[None])


def _voigt_one_frame(tth: np.ndarray, lam: float, refl, rng, al_d_min: float | None = None):
    """One frame of :func:`_drawn_lines` on lines the model does not share
    (:func:`foreign_series.voigt_frame`: Voigt, mostly Gaussian, a curved background with an
    amorphous hump), Poisson noise."""
    from foreign_series import voigt_frame

    return _as_patterns(tth, lam, voigt_frame(tth, _drawn_lines(lam, refl, rng, al_d_min), rng)[None])
