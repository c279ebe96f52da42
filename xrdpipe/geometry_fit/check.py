"""A check of any PONI against a calibrant image (:func:`check_calibration`): every expected ring
fitted in the 1D pattern, its 2θ offset, and a verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError
from ..lineshapes import pseudo_voigt
from .rings import full_mask, load_calibrant, read_calibrant_image


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
    from ..calibration import load_calibration

    path = Path(image) if not isinstance(image, np.ndarray) else Path("<array>")
    img = read_calibrant_image(path, frame=frame) if not isinstance(image, np.ndarray) else np.asarray(image, float)
    calib = load_calibration(poni)
    ai = calib.geometry
    cal = load_calibrant(calibrant, calib.wavelength_A)
    det = ai.detector
    if det.max_shape is not None and tuple(det.max_shape) != img.shape:
        raise CalibrationError(f"{path} is {img.shape[0]} x {img.shape[1]} pixels but the detector in {poni} is "
                               f"{det.max_shape[0]} x {det.max_shape[1]}")
    bad = full_mask(img, det, mask, path)
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
