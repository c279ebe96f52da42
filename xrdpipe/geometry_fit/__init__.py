"""Calibration from a calibrant image, headless: a PONI, and a check of any PONI.

:func:`calibrate` finds the rings of a calibrant (CeO2, LaB6, Si... from pyFAI's calibrant
library) on an image without anyone clicking, then leaves the geometry to pyFAI:

1. **Ring finding** (what pyFAI lacks headless). Around the guessed beam centre the image is cut
   into azimuthal sectors; each sector's radial profile is searched for peaks (prominence against
   the Poisson noise of the profile). The rings of the calibrant are then matched to all those
   peaks at once: for every trial distance (a grid over ``±search`` of the guess, one pixel of
   the outermost ring per step) each sector may shift by its own offset (the centre is off), and
   the distance that places most peaks within a few pixels of a ring wins. The sector offsets give
   the centre (a least-squares fit of ``e = ex cos φ + ey sin φ``). Peaks that match a ring become
   the first control points.
2. **Refinement** with pyFAI's :class:`~pyFAI.geometryRefinement.GeometryRefinement` (distance,
   PONI, rot1, rot2; the wavelength when asked; rot3 stays, being degenerate with the others for
   rings), then control points re-extracted on every ring with pyFAI's own extraction
   (:meth:`~pyFAI.goniometer.SingleGeometry.extract_cp`) from the refined geometry, and refined
   again, until the geometry stops moving.

The result carries the rings used, the points per ring and the residual 2θ per ring; it writes
the PONI, a text report, a CSV of the rings and a figure (the image with the fitted rings).

Modules: ``rings`` (step 1), ``solve`` (step 2, :func:`calibrate`, :class:`CalibrationResult`),
``check`` (:func:`check_calibration`).

:func:`check_calibration` integrates a calibrant image with a given PONI, fits every expected
ring's position in the 1D pattern, and reports the 2θ offset per ring and a verdict.

Example
-------
>>> cal = calibrate("ceo2.cbf", calibrant="CeO2", wavelength_A=0.6209, detector="eiger2_16m",
...                 guess_distance_mm=250)                                       # doctest: +SKIP
>>> cal.write("calibrations/i12/ceo2.poni")                                      # doctest: +SKIP
"""

from __future__ import annotations

from .check import CalibrationCheck, RingCheck, check_calibration
from .rings import calibrant_names, read_calibrant_image
from .solve import CalibrationResult, calibrate

__all__ = ["calibrate", "check_calibration", "CalibrationResult", "CalibrationCheck", "RingCheck",
           "read_calibrant_image", "calibrant_names"]

