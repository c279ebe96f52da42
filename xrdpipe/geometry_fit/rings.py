"""Finding the rings of a calibrant on an image, headless (step 1 of :func:`~xrdpipe.geometry_fit.calibrate`):
sector profiles, peaks, and the distance and centre that match most peaks to the calibrant's rings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError

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


def load_calibrant(name: str, wavelength_A: float):
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


def detector_for(name: str | None, shape: tuple[int, int], pixel_um: float | None):
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
    from ..errors import FrameReadError
    from ..frames import list_frames, read_frame

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


def full_mask(image: np.ndarray, detector, mask: np.ndarray | Path | str | None, path: Path) -> np.ndarray:
    """True where a pixel is excluded: the detector's own mask (module gaps), the user's (an
    array, True where excluded, or an image file, non-zero where excluded), and pixels that are
    not finite, negative or at the counter's overflow value."""
    from ..calibration import read_image

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


def find_rings(image, bad, c1, c2, tan_tth: np.ndarray, d_guess_px: float, search: float,
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

