"""A synthetic calibrant image (CeO2, LaB6...) on a named detector, for calibration tests."""

from __future__ import annotations

import numpy as np


def calibrant_image(detector: str, *, calibrant: str = "CeO2", wavelength_A: float = 0.6209, dist_m: float,
                    center_px: tuple[float, float], rot1_deg: float = 0.0, rot2_deg: float = 0.0,
                    fwhm_deg: float = 0.04, peak_counts: float = 2000.0, background: float = 50.0,
                    seed: int = 0):
    """A calibrant image with known geometry, for testing calibration: the rings of a pyFAI
    calibrant rendered by pyFAI on ``detector`` (a pyFAI name), Poisson noise, the detector's
    module gaps set to -1. ``center_px`` is the PONI (row, column) in pixels. Returns the image
    and the true geometry (a pyFAI AzimuthalIntegrator)."""
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = detector_factory(detector)
    ai = AzimuthalIntegrator(dist=dist_m, poni1=center_px[0] * det.pixel1, poni2=center_px[1] * det.pixel2,
                             rot1=np.radians(rot1_deg), rot2=np.radians(rot2_deg), rot3=0.0, detector=det,
                             wavelength=wavelength_A * 1e-10)
    cal = get_calibrant(calibrant)
    cal.wavelength = wavelength_A * 1e-10
    ideal = cal.fake_calibration_image(ai, Imax=peak_counts, Imin=background, resolution=fwhm_deg)
    img = np.random.default_rng(seed).poisson(np.maximum(ideal, 0)).astype(np.float64)
    if det.mask is not None:
        img[det.mask.astype(bool)] = -1
    return img, ai
