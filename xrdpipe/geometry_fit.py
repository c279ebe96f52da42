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

:func:`check_calibration` integrates a calibrant image with a given PONI, fits every expected
ring's position in the 1D pattern, and reports the 2θ offset per ring and a verdict.

Example
-------
>>> cal = calibrate("ceo2.cbf", calibrant="CeO2", wavelength_A=0.6209, detector="eiger2_16m",
...                 guess_distance_mm=250)                                       # doctest: +SKIP
>>> cal.write("calibrations/i12/ceo2.poni")                                      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CalibrationError
from .lineshapes import pseudo_voigt

__all__ = ["calibrate", "check_calibration", "CalibrationResult", "CalibrationCheck", "RingCheck",
           "read_calibrant_image", "calibrant_names"]

#: Sectors the image is cut into for the ring search, and their width.
SECTORS = 72
#: A sector's radial peak must stand this many noise esds above its surroundings.
PEAK_SIGMA = 6.0
#: How far (pixels) a peak may lie from a ring and still match it, in the ring search: at least
#: MATCH_PX, and MATCH_REL of the radius (a tilted detector turns rings into ellipses whose
#: departure from the shifted circles grows with the radius).
MATCH_PX = 3.0
MATCH_REL = 0.004
#: Fewer matched rings than this, or a smaller share of the peaks matched: no calibrant there.
MIN_RINGS = 3
MIN_MATCHED_SHARE = 0.5
#: How far (pixels) a sector's offset may differ from that of the fitted centre and still be used.
SECTOR_SLACK_PX = 8.0
#: Fewer sector peaks than this: no rings on the image (one ring crosses many sectors).
MIN_PEAKS = 12


def calibrant_names() -> list[str]:
    """The calibrants pyFAI knows (its calibrant library)."""
    from pyFAI.calibrant import CALIBRANT_FACTORY

    return sorted(CALIBRANT_FACTORY.all.keys(), key=str.lower)


def _calibrant(name: str, wavelength_A: float):
    from pyFAI.calibrant import CALIBRANT_FACTORY

    known = {k.lower(): k for k in CALIBRANT_FACTORY.all.keys()}
    key = known.get(name.lower())
    if key is None:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(known), n=3)
        hint = f"; did you mean {', '.join(known[c] for c in close)}?" if close else ""
        raise CalibrationError(f"unknown calibrant {name!r}{hint} (pyFAI knows {len(known)}: "
                               f"{', '.join(calibrant_names()[:12])}, ...)")
    cal = CALIBRANT_FACTORY(key)
    cal.wavelength = wavelength_A * 1e-10
    return cal


def _detector(name: str | None, shape: tuple[int, int], pixel_um: float | None):
    from pyFAI.detectors import Detector, detector_factory

    if name:
        from pyFAI.detectors import ALL_DETECTORS

        try:
            if name.lower() not in ALL_DETECTORS and not Path(name).exists():
                raise KeyError(name)          # pyFAI would log its whole list of detectors
            det = detector_factory(name)
        except Exception as exc:
            if name.lower() in ALL_DETECTORS or Path(name).exists():
                raise CalibrationError(f"detector {name!r} cannot be set up: "
                                       f"{str(exc).splitlines()[0][:200]}") from None
            import difflib

            close = difflib.get_close_matches(name.lower(), [k for k in ALL_DETECTORS if "_" in k],
                                              n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CalibrationError(f"unknown detector {name!r}{hint} (list pyFAI's detectors with: python -c "
                                   "\"import pyFAI.detectors as d; print(*sorted(d.ALL_DETECTORS))\")") from None
        if det.max_shape is not None and tuple(det.max_shape) != tuple(shape):
            raise CalibrationError(f"the image is {shape[0]} x {shape[1]} pixels, but the {det.name} is "
                                   f"{det.max_shape[0]} x {det.max_shape[1]}")
        return det
    if pixel_um is None:
        raise CalibrationError("give the detector (e.g. --detector eiger2_16m) or its pixel size (--pixel-um)")
    return Detector(pixel1=pixel_um * 1e-6, pixel2=pixel_um * 1e-6, max_shape=shape)


def read_calibrant_image(path: Path | str, *, frame: int = 0) -> np.ndarray:
    """One frame of a calibrant image file (any format xrdpipe reads) as float64."""
    from .errors import FrameReadError
    from .frames import list_frames, read_frame

    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibrant image {path} does not exist")
    refs = list_frames([path])
    if not 0 <= frame < len(refs):
        raise CalibrationError(f"{path} has {len(refs)} frame(s); frame {frame} does not exist")
    try:
        return np.asarray(read_frame(refs[frame]), dtype=np.float64)
    except FrameReadError as exc:
        raise CalibrationError(str(exc)) from None


def _full_mask(image: np.ndarray, detector, mask: np.ndarray | Path | str | None, path: Path) -> np.ndarray:
    """True where a pixel is excluded: the detector's own mask (module gaps), the user's (an
    array, True where excluded, or an image file, non-zero where excluded), and pixels that are
    not finite, negative or at the counter's overflow value."""
    from .calibration import read_image

    bad = ~np.isfinite(image) | (image < 0)
    det_mask = detector.mask if getattr(detector, "mask", None) is not None else None
    if det_mask is not None and det_mask.shape == image.shape:
        bad |= det_mask.astype(bool)
    if mask is not None:
        where = "the mask"
        if not isinstance(mask, np.ndarray):
            where = f"mask {mask}"
            mask = read_image(Path(mask), "mask") != 0
        if mask.shape != image.shape:
            raise CalibrationError(f"{where} is {mask.shape[0]} x {mask.shape[1]} pixels, the image {path} "
                                   f"is {image.shape[0]} x {image.shape[1]}")
        bad |= mask.astype(bool)
    finite = image[np.isfinite(image)]
    if finite.size:
        top = finite.max()
        # an integer detector's overflow value (2^n - 1) on many pixels marks gaps or dead pixels
        if top > 0 and np.log2(top + 1) % 1 == 0 and (image == top).mean() > 1e-4:
            bad |= image == top
    return bad


# ----------------------------------------------------------------------------------------------
# 1. ring finding

@dataclass
class _SectorPeaks:
    phi: np.ndarray        # sector centre angle (rad) per peak
    r: np.ndarray          # radius (pixels) from the guessed centre
    sector: np.ndarray     # sector index per peak
    strength: np.ndarray   # prominence in noise esds


def _sector_peaks(image: np.ndarray, bad: np.ndarray, c1: float, c2: float) -> _SectorPeaks:
    """Radial-profile peaks of every azimuthal sector around (c1, c2) (row, column)."""
    from scipy.ndimage import minimum_filter1d, uniform_filter1d
    from scipy.signal import find_peaks

    d1 = (np.arange(image.shape[0], dtype=np.float32) - np.float32(c1))[:, None]
    d2 = (np.arange(image.shape[1], dtype=np.float32) - np.float32(c2))[None, :]
    r = np.hypot(d1, d2)            # float32: a 16-Mpixel image costs 64 MB per array
    phi = np.arctan2(d1, d2)
    good = ~bad
    nr = int(np.ceil(r[good].max())) + 2 if good.any() else 2
    sec = np.minimum(((phi + np.pi) / (2 * np.pi) * SECTORS).astype(np.int64), SECTORS - 1)
    idx = (sec * nr + r.astype(np.int64))[good]
    val = image[good]
    rv = r[good]
    n = np.bincount(idx, minlength=SECTORS * nr).reshape(SECTORS, nr)
    s = np.bincount(idx, weights=val, minlength=SECTORS * nr).reshape(SECTORS, nr)
    sr = np.bincount(idx, weights=rv, minlength=SECTORS * nr).reshape(SECTORS, nr)
    del d1, d2, r, phi, idx, val, rv
    out_phi, out_r, out_s, out_k = [], [], [], []
    centres = -np.pi + (np.arange(SECTORS) + 0.5) * 2 * np.pi / SECTORS
    for k in range(SECTORS):
        cnt = n[k]
        ok = cnt >= 3
        if ok.sum() < 20:
            continue
        mean = np.where(ok, s[k] / np.maximum(cnt, 1), np.nan)
        rad = np.where(ok, sr[k] / np.maximum(cnt, 1), np.arange(nr) + 0.5)
        # fill gaps (masked radii) by interpolation so that they make no peaks
        x = np.arange(nr)
        prof = np.interp(x, x[ok], mean[ok])
        noise = np.sqrt(np.maximum(prof, 1.0) / np.maximum(cnt, 1))
        noise = np.where(ok, noise, np.inf)
        base = uniform_filter1d(minimum_filter1d(prof, 25), 25)
        z = (prof - base) / np.where(np.isfinite(noise), noise, np.nan)
        z = np.nan_to_num(z, nan=0.0)
        peaks, props = find_peaks(z, height=PEAK_SIGMA, prominence=PEAK_SIGMA, distance=3)
        for p, h in zip(peaks, props["prominences"]):
            if not (ok[p] and 0 < p < nr - 1 and ok[p - 1] and ok[p + 1]):
                continue
            y0, y1, y2 = prof[p - 1] - base[p - 1], prof[p] - base[p], prof[p + 1] - base[p + 1]
            den = y0 - 2 * y1 + y2
            shift = 0.5 * (y0 - y2) / den if den < 0 else 0.0
            shift = float(np.clip(shift, -0.5, 0.5))
            out_r.append(float(np.interp(p + shift, x, rad)))
            out_phi.append(centres[k])
            out_s.append(float(h))
            out_k.append(k)
    return _SectorPeaks(np.array(out_phi), np.array(out_r), np.array(out_k, int), np.array(out_s))


def _match(peaks: _SectorPeaks, tan_tth: np.ndarray, d_guess_px: float, search: float, max_shift_px: float):
    """The distance (pixels) and per-sector offsets that put most peaks on rings.

    Returns (distance_px, offsets per sector (NaN where a sector had no match))."""
    r_max = float(peaks.r.max())
    step = 0.5 / max(r_max, 1.0)
    scales = np.exp(np.arange(np.log(1 - search), np.log(1 + search) + step, step))
    shifts = np.arange(-max_shift_px, max_shift_px + 1.0, 1.0)
    best = (-1.0, None, None)
    secs = np.unique(peaks.sector)
    by_sec = [np.flatnonzero(peaks.sector == k) for k in secs]
    tol = int(round(max(MATCH_PX, MATCH_REL * float(np.median(peaks.r)))))
    kernel = np.ones(2 * tol + 1)
    for scale in scales:
        D = d_guess_px * scale
        radii = D * tan_tth
        total = 0.0
        offs = np.full(secs.size, np.nan)
        for j, sel in enumerate(by_sec):
            diff = peaks.r[sel, None] - radii[None, :]
            diff = diff[np.abs(diff) <= max_shift_px + tol]
            if diff.size == 0:
                continue
            hist = np.bincount(np.round(diff + max_shift_px + tol).astype(int),
                               minlength=shifts.size + 2 * tol + 1).astype(float)
            # each shift counts the peaks within ±tol of it
            score = np.convolve(hist, kernel, mode="valid")[:shifts.size]
            i = int(np.argmax(score))
            total += score[i]
            offs[j] = shifts[i]
        if total > best[0]:
            best = (total, D, offs)
    total, D, offs = best
    per_sector = np.full(SECTORS, np.nan)
    per_sector[secs] = offs
    return D, per_sector


@dataclass
class _Coarse:
    distance_px: float
    c1: float
    c2: float
    points: np.ndarray       # (n, 3): row, column, ring index
    share: float


def _find_rings(image, bad, c1, c2, tan_tth: np.ndarray, d_guess_px: float, search: float,
                max_shift_px: float, path: str) -> _Coarse:
    from scipy.optimize import least_squares

    peaks = _sector_peaks(image, bad, c1, c2)
    if peaks.r.size < MIN_PEAKS:
        raise CalibrationError(f"{path}: no diffraction rings found (only {peaks.r.size} peak(s) in the radial "
                               f"profiles around the guessed centre, row {c1:.0f}, column {c2:.0f}); check the "
                               f"image, the mask and the guessed centre")
    D, offs = _match(peaks, tan_tth, d_guess_px, search, max_shift_px)
    # centre: the offsets of the sectors along their directions
    centres = -np.pi + (np.arange(SECTORS) + 0.5) * 2 * np.pi / SECTORS
    ok = np.isfinite(offs)
    if ok.sum() >= 3:
        phi = centres[ok]
        fit = least_squares(lambda p: p[0] * np.cos(phi) + p[1] * np.sin(phi) - offs[ok], [0.0, 0.0],
                            loss="soft_l1", f_scale=2.0)
        ex, ey = fit.x
    else:
        ex = ey = 0.0
    c1n, c2n = c1 + ey, c2 + ex
    # the matched peaks, as control points around the new centre
    pred = D * tan_tth
    pts, rings = [], set()
    for i in range(peaks.r.size):
        # the sector's own offset where it agrees with the centre found (a tilted detector makes
        # ellipses: a few pixels more than the shifted circles), else the centre's
        off = ex * math.cos(peaks.phi[i]) + ey * math.sin(peaks.phi[i])
        own = offs[peaks.sector[i]]
        if np.isfinite(own) and abs(own - off) <= SECTOR_SLACK_PX:
            off = own
        k = int(np.argmin(np.abs(peaks.r[i] - off - pred)))
        if abs(peaks.r[i] - off - pred[k]) <= max(MATCH_PX, MATCH_REL * peaks.r[i]):
            rr = peaks.r[i]
            pts.append((c1 + rr * math.sin(peaks.phi[i]), c2 + rr * math.cos(peaks.phi[i]), k))
            rings.add(k)
    share = len(pts) / peaks.r.size
    if len(rings) < MIN_RINGS or share < MIN_MATCHED_SHARE:
        raise CalibrationError(
            f"{path}: the rings do not match the calibrant: at best {100 * share:.0f} % of the {peaks.r.size} "
            f"ring peaks found lie on {len(rings)} of its rings (distance searched within ±{100 * search:.0f} % of "
            f"the guess); check the calibrant, the wavelength and the guessed distance")
    return _Coarse(D, c1n, c2n, np.array(pts, float), share)


# ----------------------------------------------------------------------------------------------
# 2. refinement with pyFAI

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
        from .safeio import atomic_output

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
            from .plots import plot_calibration

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
    cal = _calibrant(calibrant, wavelength_A)
    det = _detector(detector, img.shape, pixel_um)
    bad = _full_mask(img, det, mask, path)
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
    coarse = _find_rings(img, bad, c1, c2, tan_tth, d_px, search, max_shift_px, str(path))

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

@dataclass
class RingCheck:
    """One expected ring in the integrated calibrant pattern."""

    ring: int
    d_A: float
    expected_deg: float
    found_deg: float
    offset_deg: float
    esd_deg: float
    fwhm_deg: float
    status: str          # ok, off, not seen, overlapped


@dataclass
class CalibrationCheck:
    """The verdict of :func:`check_calibration`."""

    image_path: Path
    poni_path: Path
    calibrant: str
    tolerance_deg: float
    rings: list[RingCheck]
    distance_error: tuple[float, float] | None    # relative distance error the offsets imply, esd
    unexplained_deg: float = math.nan             # rms offset left once that distance error is removed

    @property
    def fitted(self) -> list[RingCheck]:
        return [r for r in self.rings if r.status in ("ok", "off")]

    @property
    def mismatch(self) -> bool:
        """The peaks found near the expected rings do not follow the calibrant: offsets that no
        distance error explains (another substance, calibrant or wavelength), or too few rings."""
        off = [r for r in self.fitted if r.status == "off"]
        if len(self.fitted) < 2:
            return True
        if not off:
            return False
        rms = math.sqrt(np.mean([r.offset_deg**2 for r in self.fitted]))
        return self.unexplained_deg > max(5 * self.tolerance_deg, 0.5 * rms)

    @property
    def passed(self) -> bool:
        return bool(self.fitted) and not self.mismatch and all(r.status == "ok" for r in self.fitted)

    def __str__(self) -> str:
        lines = [f"calibrant image: {self.image_path}", f"geometry: {self.poni_path}",
                 f"calibrant: {self.calibrant}; tolerance {self.tolerance_deg:g}° 2θ", "",
                 f"{'ring':>4} {'d (Å)':>9} {'expected (°)':>13} {'found (°)':>10} {'offset (°)':>11} "
                 f"{'esd (°)':>9}  status"]
        for r in self.rings:
            if r.status in ("ok", "off"):
                lines.append(f"{r.ring:>4} {r.d_A:>9.5f} {r.expected_deg:>13.4f} {r.found_deg:>10.4f} "
                             f"{r.offset_deg:>11.5f} {r.esd_deg:>9.5f}  {r.status}")
            else:
                lines.append(f"{r.ring:>4} {r.d_A:>9.5f} {r.expected_deg:>13.4f} {'':>10} {'':>11} {'':>9}  "
                             f"{r.status}")
        fitted = self.fitted
        if self.distance_error is not None:
            e, s = self.distance_error
            lines.append(f"the offsets are those of a distance {100 * e:+.4f} % ± {100 * s:.4f} % from the PONI's "
                         f"(rms {self.unexplained_deg:.5f}° left unexplained)")
        if self.mismatch:
            lines.append(f"verdict: FAIL - the image does not match {self.calibrant} with this geometry: "
                         + (f"only {len(fitted)} of its rings found" if len(fitted) < 2 else
                            f"the peaks near its rings are off by amounts no distance error explains "
                            f"(rms {self.unexplained_deg:.4f}° left)")
                         + "; check the calibrant, the image and the wavelength")
        elif self.passed:
            worst = max(abs(r.offset_deg) for r in fitted)
            lines.append(f"verdict: OK - {len(fitted)} rings within {self.tolerance_deg:g}° (largest offset "
                         f"{worst:.5f}°)")
        else:
            off = [r for r in fitted if r.status == "off"]
            lines.append(f"verdict: WARNING - {len(off)} of {len(fitted)} rings off by more than "
                         f"{self.tolerance_deg:g}° (largest {max(abs(r.offset_deg) for r in off):.5f}°): "
                         f"recalibrate before trusting this geometry")
        return "\n".join(lines)


def _pv(x, area, centre, fwhm, eta, b0, b1):
    """One ring in the 1D pattern: the project's area-normalised pseudo-Voigt on a sloping line."""
    return pseudo_voigt(x, centre, fwhm, area, eta) + b0 + b1 * (x - centre)


def check_calibration(image: np.ndarray | Path | str, *, poni: Path | str, calibrant: str,
                      tolerance_deg: float = 0.005, mask: np.ndarray | Path | str | None = None, frame: int = 0,
                      npt: int | None = None) -> CalibrationCheck:
    """Integrate a calibrant image with ``poni`` and fit every expected ring's 2θ (see the
    module docstring). A ring is ``off`` when its offset exceeds ``tolerance_deg`` by more than
    twice its esd; rings too close to a neighbour to fit alone are ``overlapped``, rings with no
    peak above the noise ``not seen``."""
    from .calibration import load_calibration

    path = Path(image) if not isinstance(image, np.ndarray) else Path("<array>")
    img = read_calibrant_image(path, frame=frame) if not isinstance(image, np.ndarray) else np.asarray(image, float)
    calib = load_calibration(poni)
    ai = calib.geometry
    cal = _calibrant(calibrant, calib.wavelength_A)
    det = ai.detector
    if det.max_shape is not None and tuple(det.max_shape) != img.shape:
        raise CalibrationError(f"{path} is {img.shape[0]} x {img.shape[1]} pixels but the detector in {poni} is "
                               f"{det.max_shape[0]} x {det.max_shape[1]}")
    bad = _full_mask(img, det, mask, path)
    tth_img = ai.center_array(img.shape, unit="2th_deg")
    lo, hi = float(np.nanmin(tth_img[~bad])), float(np.nanmax(tth_img[~bad]))
    # bins of about a third of a pixel's 2θ at the middle of the pattern
    if npt is None:
        npt = int(min(max(3 * math.hypot(*img.shape), 500), 20000))
    res = ai.integrate1d(np.where(bad, 0, img), npt, unit="2th_deg", mask=bad.astype(np.int8), error_model="poisson",
                         radial_range=(lo, hi), correctSolidAngle=True)
    x, y = np.asarray(res.radial), np.asarray(res.intensity)
    sig = np.asarray(res.sigma) if res.sigma is not None else np.sqrt(np.maximum(y, 1.0))
    step = float(np.median(np.diff(x)))
    tth_all = np.degrees(np.array([t for t in cal.get_2th() if t is not None], float))
    d_all = np.asarray(cal.dspacing, float)[:tth_all.size]
    rings = [_check_ring(k, t, tth_all, d_all, x, y, sig, step, tolerance_deg)
             for k, t in enumerate(tth_all) if lo + 0.05 < t < hi - 0.05]
    derr, left = _distance_error([r for r in rings if r.status in ("ok", "off")])
    return CalibrationCheck(path, Path(poni), calibrant, tolerance_deg, rings, derr, left)


def _check_ring(k: int, t: float, tth_all: np.ndarray, d_all: np.ndarray, x: np.ndarray, y: np.ndarray,
                sig: np.ndarray, step: float, tolerance_deg: float) -> RingCheck:
    """Ring ``k`` (expected at ``t`` degrees) in the integrated pattern: a pseudo-Voigt on a
    line fitted within half the gap to its neighbours, or why it cannot be (overlapped, not seen)."""
    from scipy.optimize import curve_fit

    def unfit(why: str) -> RingCheck:
        return RingCheck(k, float(d_all[k]), float(t), math.nan, math.nan, math.nan, math.nan, why)

    gap = min(abs(t - tth_all[j]) for j in (k - 1, k + 1) if 0 <= j < tth_all.size)
    half = min(0.45 * gap, 0.5)
    if half < 6 * step:
        return unfit("overlapped")
    sel = (x > t - half) & (x < t + half) & np.isfinite(y) & (sig > 0)
    xs, ys, ss = x[sel], y[sel], sig[sel]
    if xs.size < 10:
        return unfit("not seen")
    b0 = float(np.median(np.concatenate([ys[:3], ys[-3:]])))
    peak = float(ys.max() - b0)
    noise = float(np.median(ss))
    if peak < 8 * noise:
        return unfit("not seen")
    c0 = float(xs[np.argmax(ys)])
    w0 = max(3 * step, 0.02)
    p0 = [peak * w0, c0, w0, 0.5, b0, 0.0]
    try:
        popt, pcov = curve_fit(_pv, xs, ys, p0=p0, sigma=ss, absolute_sigma=True, maxfev=4000,
                               bounds=([0, t - half, step, 0, -np.inf, -np.inf],
                                       [np.inf, t + half, half, 1, np.inf, np.inf]))
    except (RuntimeError, ValueError):
        return unfit("not seen")
    chi2 = float(np.sum(((ys - _pv(xs, *popt)) / ss) ** 2) / max(xs.size - 6, 1))
    esd = float(np.sqrt(max(pcov[1, 1], 0.0)) * math.sqrt(max(chi2, 1.0)))
    off = float(popt[1] - t)
    if not esd < half / 4:
        return unfit("not seen")
    status = "off" if abs(off) - 2 * esd > tolerance_deg else "ok"
    return RingCheck(k, float(d_all[k]), float(t), float(popt[1]), off, esd, float(popt[2]), status)


def _distance_error(fitted: list[RingCheck]) -> tuple[tuple[float, float] | None, float]:
    """The relative distance error (and its esd) that best explains the fitted rings' offsets,
    and the RMS offset (degrees) it leaves; (None, NaN) with fewer than 2 rings."""
    if len(fitted) < 2:
        return None, math.nan
    # tan 2θ_obs = tan 2θ D_true / D_poni: a relative distance error δ moves 2θ by
    # δ sin 2θ cos 2θ (radians) to first order
    g = np.array([math.sin(math.radians(2 * r.expected_deg)) / 2 for r in fitted])
    o = np.radians([r.offset_deg for r in fitted])
    w = 1 / np.radians([max(r.esd_deg, 1e-6) for r in fitted]) ** 2
    delta = float(np.sum(w * g * o) / np.sum(w * g * g))
    chi2 = float(np.sum(w * (o - delta * g) ** 2) / max(len(fitted) - 1, 1))
    derr = (delta, float(math.sqrt(max(chi2, 1.0) / np.sum(w * g * g))))
    return derr, float(np.degrees(np.sqrt(np.mean((o - delta * g) ** 2))))
