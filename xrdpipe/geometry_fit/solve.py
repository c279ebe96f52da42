"""The geometry from a calibrant image (:func:`calibrate`): rings found, then pyFAI's refinement
until the geometry stops moving; the result writes the PONI, a report, a CSV and a figure."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError
from .rings import (
    MIN_RINGS,
    detector_for,
    find_rings,
    full_mask,
    load_calibrant,
    read_calibrant_image,
)


@dataclass
class RingResidual:
    """One ring of the calibrant as used by the refinement."""

    ring: int
    tth_deg: float
    d_A: float
    points: int
    mean_deg: float      # mean residual 2θ (observed - calculated)
    rms_deg: float


@dataclass
class CalibrationResult:
    """A refined geometry and how it was found (see :func:`calibrate`)."""

    image_path: Path
    calibrant: str
    geometry: Any                 # pyFAI AzimuthalIntegrator
    rings: list[RingResidual]
    points: np.ndarray            # (n, 3) control points: row, column, ring
    guess: dict[str, float]
    refined_wavelength: bool
    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    @property
    def rms_deg(self) -> float:
        n = sum(r.points for r in self.rings)
        return math.sqrt(sum(r.rms_deg**2 * r.points for r in self.rings) / max(n, 1))

    def fit2d(self) -> dict[str, float]:
        """The geometry in Fit2D terms: direct beam distance (mm), centre (pixels), tilt and
        tilt plane rotation (degrees)."""
        return dict(self.geometry.getFit2D())

    def report(self) -> str:
        g = self.geometry
        f2 = self.fit2d()
        lines = [f"calibrant image: {self.image_path}",
                 f"calibrant: {self.calibrant}, wavelength {g.wavelength * 1e10:.6f} Å"
                 + (" (refined)" if self.refined_wavelength else " (fixed)"),
                 f"detector: {g.detector.name}, {g.detector.max_shape[0]} x {g.detector.max_shape[1]} pixels of "
                 f"{g.detector.pixel1 * 1e6:.1f} x {g.detector.pixel2 * 1e6:.1f} µm",
                 f"start: distance {self.guess['dist'] * 1e3:.2f} mm, beam centre row {self.guess['row']:.1f}, "
                 f"column {self.guess['col']:.1f} (pixels)",
                 f"refined: distance {g.dist * 1e3:.4f} mm, PONI1 {g.poni1 * 1e3:.4f} mm, PONI2 {g.poni2 * 1e3:.4f} mm, "
                 f"rot1 {math.degrees(g.rot1):.4f}°, rot2 {math.degrees(g.rot2):.4f}°, rot3 {math.degrees(g.rot3):.4f}°",
                 f"Fit2D: direct beam distance {f2['directDist']:.4f} mm, beam centre x {f2['centerX']:.3f}, "
                 f"y {f2['centerY']:.3f} pixels, tilt {f2['tilt']:.4f}°, tilt plane {f2['tiltPlanRotation']:.3f}°",
                 f"{len(self.rings)} rings, {len(self.points)} control points, rms residual "
                 f"{self.rms_deg:.5f}° 2θ", "",
                 f"{'ring':>4} {'d (Å)':>9} {'2θ (°)':>9} {'points':>7} {'mean (°)':>10} {'rms (°)':>9}"]
        for r in self.rings:
            lines.append(f"{r.ring:>4} {r.d_A:>9.5f} {r.tth_deg:>9.4f} {r.points:>7} {r.mean_deg:>10.5f} "
                         f"{r.rms_deg:>9.5f}")
        return "\n".join(lines)

    def write(self, poni: Path | str, *, figure: bool = True, dpi: int = 150) -> list[Path]:
        """Write the PONI and, beside it, ``<stem>_report.txt``, ``<stem>_rings.csv`` and (with
        ``figure``) ``<stem>_rings.png``; returns the paths written."""
        from ..safeio import atomic_output

        poni = Path(poni)
        poni.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(poni) as tmp:
            self.geometry.write(str(tmp))
        out = [poni]
        report = poni.with_name(poni.stem + "_report.txt")
        with atomic_output(report) as tmp:
            Path(tmp).write_text(self.report() + "\n", encoding="utf-8")
        out.append(report)
        table = poni.with_name(poni.stem + "_rings.csv")
        with atomic_output(table) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["ring", "d_A", "tth_deg", "points", "mean_residual_deg", "rms_residual_deg"])
            for r in self.rings:
                w.writerow([r.ring, f"{r.d_A:.6f}", f"{r.tth_deg:.6f}", r.points, f"{r.mean_deg:.6g}",
                            f"{r.rms_deg:.6g}"])
        out.append(table)
        if figure:
            from ..plots import plot_calibration

            png = poni.with_name(poni.stem + "_rings.png")
            fig = plot_calibration(self.image, self.mask, self.geometry.center_array(self.image.shape,
                                                                                      unit="2th_deg"),
                                   [r.tth_deg for r in self.rings], self.points,
                                   title=f"{self.image_path.name}: {self.calibrant}, rms {self.rms_deg:.4f}° 2θ")
            with atomic_output(png) as tmp:
                fig.savefig(tmp, dpi=dpi, format="png")
            out.append(png)
        return out


def _residuals(gr, points: np.ndarray, calibrant) -> list[RingResidual]:
    tth_obs = gr.tth(points[:, 0], points[:, 1])
    tth_cal = np.asarray(calibrant.get_2th(), float)
    d = np.asarray(calibrant.dspacing, float)
    ring = points[:, 2].astype(int)
    res = np.degrees(tth_obs - tth_cal[ring])
    out = []
    for k in np.unique(ring):
        sel = ring == k
        out.append(RingResidual(int(k), float(np.degrees(tth_cal[k])), float(d[k]), int(sel.sum()),
                                float(res[sel].mean()), float(np.sqrt(np.mean(res[sel] ** 2)))))
    return out


def calibrate(image: np.ndarray | Path | str, *, calibrant: str, wavelength_A: float, detector: str | None = None,
              pixel_um: float | None = None, guess_distance_mm: float | None = None,
              guess_center: tuple[float, float] | None = None, mask: np.ndarray | Path | str | None = None,
              refine_wavelength: bool = False, search: float = 0.15, max_shift_px: float = 60.0,
              max_rings: int | None = None, frame: int = 0) -> CalibrationResult:
    """Refine a detector geometry from a calibrant image (see the module docstring).

    ``guess_center`` is (row, column) of the direct beam in pixels (default: the image centre);
    ``guess_distance_mm`` defaults to a distance that puts the calibrant's first ring a quarter
    of the detector from the centre. ``search`` is how far (relative) the distance may be from
    the guess; ``max_shift_px`` how far the centre may be. ``mask``: an array, True where
    excluded, or a mask image file (non-zero where excluded).

    Raises
    ------
    CalibrationError
        Unreadable image, unknown calibrant or detector, no rings, or rings that do not match
        the calibrant.
    """
    path = Path(image) if not isinstance(image, np.ndarray) else Path("<array>")
    img = read_calibrant_image(path, frame=frame) if not isinstance(image, np.ndarray) else np.asarray(image, float)
    if img.ndim != 2:
        raise CalibrationError(f"{path}: expected a 2D image, got shape {img.shape}")
    cal = load_calibrant(calibrant, wavelength_A)
    det = detector_for(detector, img.shape, pixel_um)
    bad = full_mask(img, det, mask, path)
    if bad.all():
        raise CalibrationError(f"{path}: every pixel is masked")
    tth = np.array([t for t in cal.get_2th() if t is not None], float)
    if tth.size < MIN_RINGS:
        raise CalibrationError(f"calibrant {calibrant} has fewer than {MIN_RINGS} rings at {wavelength_A} Å")
    c1, c2 = guess_center if guess_center is not None else ((img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2)
    p1 = det.pixel1
    if guess_distance_mm is None:
        guess_distance_mm = 0.25 * min(img.shape) * p1 * 1e3 / math.tan(tth[0])
    d_px = guess_distance_mm * 1e-3 / p1
    # the rings out to the farthest corner, plus a margin for the distance search
    corners = np.hypot(np.array([c1, c1, img.shape[0] - c1, img.shape[0] - c1]),
                       np.array([c2, img.shape[1] - c2, c2, img.shape[1] - c2])).max()
    tan_tth = np.tan(tth[tth < math.pi / 2 - 1e-3])
    tan_tth = tan_tth[tan_tth * d_px * (1 - search) <= corners + max_shift_px]
    coarse = find_rings(img, bad, c1, c2, tan_tth, d_px, search, max_shift_px, str(path))

    det.mask = bad.astype(np.int8)
    gr, points = _refine_geometry(coarse, img, bad, det, cal, wavelength_A, refine_wavelength, max_rings)
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    ai = AzimuthalIntegrator(dist=gr.dist, poni1=gr.poni1, poni2=gr.poni2, rot1=gr.rot1, rot2=gr.rot2, rot3=gr.rot3,
                             detector=det, wavelength=gr.wavelength)
    rings = _residuals(gr, points, cal)
    return CalibrationResult(path, calibrant, ai, rings, points,
                             {"dist": guess_distance_mm * 1e-3, "row": c1, "col": c2}, refine_wavelength, img, bad)


def _refine_geometry(coarse, img: np.ndarray, bad: np.ndarray, det, cal, wavelength_A: float,
                     refine_wavelength: bool, max_rings: int | None):
    """pyFAI's least squares from the rings found: distance and centre, then the tilts (and the
    wavelength when asked); then control points extracted again on every ring from the refined
    geometry and refined again, until the geometry stops moving (at most 6 rounds). Returns the
    refinement and the control points it ended with."""
    import logging

    from pyFAI.geometryRefinement import GeometryRefinement
    from pyFAI.goniometer import SingleGeometry

    gr = GeometryRefinement(coarse.points, dist=coarse.distance_px * det.pixel1, poni1=(coarse.c1 + 0.5) * det.pixel1,
                            poni2=(coarse.c2 + 0.5) * det.pixel2, detector=det, wavelength=wavelength_A * 1e-10,
                            calibrant=cal)
    gr.auto_gc = False      # (pyFAI's own switch: no full garbage collection at every geometry reset)
    fix = ["rot3"] + ([] if refine_wavelength else ["wavelength"])
    quiet = logging.getLogger("pyFAI")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        gr.refine3(fix=["rot3", "wavelength", "rot1", "rot2"])     # distance and centre first, then the tilts
        gr.refine3(fix=["rot3", "wavelength"])
        if refine_wavelength:
            gr.refine3(fix=fix)
            cal.setWavelength_change2th(gr.wavelength)
        points = coarse.points
        clean = np.where(bad, 0.0, img)
        for _ in range(6):
            sg = SingleGeometry("calibrant", image=clean, calibrant=cal, detector=det,
                                geometry=gr)
            sg.geometry_refinement = gr
            cp = sg.extract_cp(max_rings=max_rings, pts_per_deg=1.0)
            new = np.asarray(cp.getList(), float)
            if new.shape[0] < 10:
                break
            before = np.array([gr.dist, gr.poni1, gr.poni2, gr.rot1, gr.rot2, gr.wavelength])
            gr.data = new
            points = new
            gr.refine3(fix=fix)
            if refine_wavelength:
                cal.setWavelength_change2th(gr.wavelength)     # pyFAI checks the two agree
            after = np.array([gr.dist, gr.poni1, gr.poni2, gr.rot1, gr.rot2, gr.wavelength])
            moved = np.abs(after - before) / np.array([gr.dist, det.pixel1, det.pixel2, 1e-4, 1e-4, gr.wavelength])
            if moved[0] < 1e-5 and moved[1] < 0.01 and moved[2] < 0.01 and moved[3] < 0.01 and moved[4] < 0.01:
                break
    finally:
        quiet.setLevel(level)
    return gr, points


# ----------------------------------------------------------------------------------------------
# check a geometry

