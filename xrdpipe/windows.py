"""A fit window as a model: its components (one per "phase hkl"), parameter layout, ties, bounds
and start values, with the Jacobian the batched solver needs.

The parameters of component ``j`` are ``p{j}_center, p{j}_fwhm (or _fwhm_left, _fwhm_right),
p{j}_area, p{j}_eta (or _m)``; the background is ``bg_c0 ... bg_cN`` in the reduced abscissa.
Fitting it is :mod:`xrdpipe.peaks`; its lmfit composite model (the reference definition) is
built by :func:`xrdpipe.lmfit_models.lmfit_model`: this module never imports lmfit nor calls
back into the fitting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.ndimage import maximum_filter1d, uniform_filter1d

from .config import PhaseSpec, WindowSpec
from .config.fitting import FREE_PEAK_REACH
from .crystallography import d_from_q, d_from_tth, q_from_d, tth_from_d
from .lineshapes import PROFILES

__all__ = ["Component", "WindowModel", "radial_from_d", "d_from_radial"]

_SHAPE_START = {"pseudo_voigt": 0.5, "pearson7": 2.0, "split_pseudo_voigt": 0.5}
_SHAPE_BOUNDS = {"pseudo_voigt": (0.0, 1.0), "pearson7": (0.6, 30.0), "split_pseudo_voigt": (0.0, 1.0)}


@dataclass(frozen=True)
class Component:
    """One peak of a window: ``label`` ``"O3 003"``, its phase, hkl and start centre; a line of
    no phase (``free_peaks``) is ``"free <centre>"`` of phase ``"free"``, hkl None."""

    label: str
    phase: str
    hkl: tuple[int, int, int] | None
    center0: float

    @property
    def hkl_text(self) -> str:
        """The peak table's ``hkl``: "104", "1 0 10"; a line of no phase's typed centre."""
        if self.hkl is None:
            return f"{self.center0:g}"
        return " ".join(map(str, self.hkl)) if max(map(abs, self.hkl)) > 9 else "".join(map(str, self.hkl))


def radial_from_d(d_A, unit: str, wavelength_A: float | None):
    """Position of a d-spacing on the radial axis (2θ degrees or Q in 1/Å)."""
    if unit == "q_A^-1":
        return q_from_d(d_A)
    return tth_from_d(d_A, wavelength_A) if wavelength_A else np.full(np.shape(d_A), np.nan)


def d_from_radial(center, err, unit: str, wavelength_A: float | None):
    """d-spacing (Å) and its esd from a centre on the radial axis and the centre's esd."""
    center = np.asarray(center, float)
    if unit == "q_A^-1":
        with np.errstate(all="ignore"):
            d = d_from_q(center)
            return d, np.abs(d / center) * err
    if not wavelength_A:
        nan = np.full(center.shape, np.nan)
        return nan, nan
    with np.errstate(all="ignore"):
        d = d_from_tth(center, wavelength_A)
        half = np.radians(center) / 2
        return d, np.abs(d / np.tan(half) / 2 * np.radians(err))


class WindowModel:
    """A window's model on the run's radial grid: components + background, parameter layout,
    bounds and start values.

    The parameters of component ``j`` are ``p{j}_center, p{j}_fwhm (or _fwhm_left, _fwhm_right),
    p{j}_area, p{j}_eta (or _m)``; the background is ``bg_c0 ... bg_cN`` in the reduced
    abscissa ``t = (x - x_mid) / half`` (-1 to 1 across the window). ``share = ["fwhm"]`` ties the
    widths of all components to component 0's, ``"shape"`` the eta or m; the lines of no phase
    (``free_peaks``, after the listed peaks) keep their own, each centre within
    :data:`~xrdpipe.config.fitting.FREE_PEAK_REACH` of the window's width of its typed one.
    """

    def __init__(self, spec: WindowSpec, phases: Mapping[str, PhaseSpec], radial: np.ndarray, unit: str,
                 wavelength_A: float | None):
        self.spec = spec
        self.name = spec.name
        self.profile = spec.profile
        self.degree = spec.background_degree
        self.unit = unit
        self.wavelength_A = wavelength_A
        radial = np.asarray(radial, float)
        lo, hi = spec.range
        idx = np.flatnonzero((radial >= lo) & (radial <= hi))
        self.columns = slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)
        self.x = radial[self.columns]
        self.x_mid, self.half = (lo + hi) / 2, (hi - lo) / 2
        self.t = (self.x - self.x_mid) / self.half
        self.step = float(np.median(np.diff(radial))) if radial.size > 1 else 1.0
        self.data_span = (float(radial.min()), float(radial.max())) if radial.size else (np.nan, np.nan)
        comps = []
        for label in spec.peaks:
            phase, hkl = spec.split_peak(label)
            ph = phases[phase]
            c0 = float(radial_from_d(ph.d_spacing(*hkl), unit, wavelength_A))
            if not spec.range[0] < c0 < spec.range[1]:
                where = f"{c0:.4g} {unit}" if np.isfinite(c0) else "nowhere (beyond the reach of the wavelength)"
                raise ValueError(f"{label} of a = {ph.a}, c = {ph.c} Å lies at {where}, outside the window's range "
                                 f"{list(spec.range)}; check the cell, the window or the wavelength")
            comps.append(Component(label, phase, hkl, c0))
        comps += [Component(f"free {c:g}", "free", None, c) for c in spec.free_peaks]
        self.components = tuple(comps)
        shape_names = PROFILES[self.profile][2]
        self.block = len(shape_names)
        self._fn, self._jac = PROFILES[self.profile][:2]
        # full layout and ties
        full, tie, free_names = [], [], []
        first: dict[str, int] = {}
        for j in range(len(comps)):
            for name in shape_names:
                full.append(f"p{j}_{name}")
                kind = "shape" if name in ("eta", "m") else ("fwhm" if name.startswith("fwhm") else name)
                if kind in spec.share and j > 0 and comps[j].hkl is not None:   # (a free line: its own)
                    tie.append(first[name])
                    continue
                first.setdefault(name, len(free_names))
                tie.append(len(free_names))
                free_names.append(f"p{j}_{name}")
        for d in range(self.degree + 1):
            full.append(f"bg_c{d}")
            tie.append(len(free_names))
            free_names.append(f"bg_c{d}")
        self.full_names = tuple(full)
        self.names = tuple(free_names)
        self.tie = np.array(tie)
        self._t_matrix = np.zeros((len(full), len(free_names)))
        self._t_matrix[np.arange(len(full)), self.tie] = 1.0
        self.n_free = len(free_names)
        # hard limits per component: the window, any center_bounds, a free line's reach
        lo_w, hi_w = spec.range
        reach = FREE_PEAK_REACH * (hi_w - lo_w)
        bounds = {k.label: (k.center0 - reach, k.center0 + reach) for k in comps if k.hkl is None}
        bounds.update(spec.center_bounds)
        self.limits = np.array([[max(lo_w, bounds.get(k.label, (lo_w, hi_w))[0]),
                                 min(hi_w, bounds.get(k.label, (lo_w, hi_w))[1])] for k in comps])

    def boxes(self, centers: np.ndarray) -> np.ndarray:
        """(K, 2) centre bounds for the seed ``centers``. By default each component keeps to its
        territory, between the midpoints to its neighbours' seeds (neighbours in the order of the
        start centres), so two components never swap phases; with ``max_shift`` the box is the
        seed ± max_shift instead. Always inside the window and any ``center_bounds``."""
        box = self.limits.copy()
        if self.spec.max_shift is not None:
            box[:, 0] = np.maximum(box[:, 0], centers - self.spec.max_shift)
            box[:, 1] = np.minimum(box[:, 1], centers + self.spec.max_shift)
            return box
        order = np.argsort([k.center0 for k in self.components])
        for a, b in zip(order[:-1], order[1:]):
            mid = (centers[a] + centers[b]) / 2
            box[a, 1] = min(box[a, 1], mid)
            box[b, 0] = max(box[b, 0], mid)
        return box

    # -- layout helpers ------------------------------------------------------------------------
    @property
    def amplitudes(self) -> list[tuple[int, tuple[int, ...]]]:
        """(area column, columns only this component uses) per component, for the solver."""
        out = []
        counts = np.bincount(self.tie, minlength=self.n_free)
        for j in range(len(self.components)):
            cols = self.component_columns(j)
            area = self.index(j, "area")
            own = tuple(int(c) for c in cols if c != area and counts[c] == 1)
            out.append((area, own))
        return out

    def index(self, j: int, name: str) -> int:
        """Free-parameter column of component ``j``'s ``name`` (``"center"``, ``"area"``...)."""
        return int(self.tie[j * self.block + PROFILES[self.profile][2].index(name)])

    def component_columns(self, j: int) -> np.ndarray:
        return self.tie[j * self.block:(j + 1) * self.block]

    def drop_mask(self, dropped: Sequence[int]) -> np.ndarray:
        """Free columns to hold when ``dropped`` components are removed (shared ones stay free
        while a kept component uses them)."""
        used_by_kept = set()
        for j in range(len(self.components)):
            if j not in dropped:
                used_by_kept.update(self.component_columns(j).tolist())
        mask = np.zeros(self.n_free, bool)
        for j in dropped:
            for col in self.component_columns(j):
                if col not in used_by_kept:
                    mask[col] = True
        return mask

    # -- model ---------------------------------------------------------------------------------
    def value_jac(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model (r, m) and Jacobian (r, n_free, m) for parameters ``theta`` (r, n_free)."""
        full = theta[:, self.tie]
        r, m = theta.shape[0], self.x.size
        jac = np.empty((r, full.shape[1], m))
        base = len(self.components) * self.block
        f = full[:, base:base + 1] * np.ones(m)
        jac[:, base] = 1.0
        for d in range(1, self.degree + 1):
            td = self.t ** d
            f += full[:, base + d:base + d + 1] * td
            jac[:, base + d] = td
        for j in range(len(self.components)):
            cols = full[:, j * self.block:(j + 1) * self.block]
            val, parts = self._jac(self.x, *(cols[:, i:i + 1] for i in range(self.block)))
            f += val
            for i, part in enumerate(parts):
                jac[:, j * self.block + i] = part
        if self.n_free != full.shape[1]:
            jac = np.matmul(self._t_matrix.T, jac)
        return f, jac

    def value(self, theta: np.ndarray) -> np.ndarray:
        return self.value_jac(np.atleast_2d(theta))[0]

    # -- start values and bounds -----------------------------------------------------------------
    def start(self, y: np.ndarray, valid: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start values and bounds (each (n, n_free)) for data ``y`` (n, m).

        ``seeds`` (K, block) holds each component's carried parameters (NaN: use the phase cell
        and estimates from the data). A carried value stuck at a bound is not used.
        """
        n, m = y.shape
        k = len(self.components)
        left, right, net = self._net(y, valid)
        fw_guess, fw_lo, fw_hi = self._widths(net)
        smooth, peak_top = self._peak_tops(net, fw_guess)
        theta = np.zeros((n, self.n_free))
        lo = np.full((n, self.n_free), -np.inf)
        hi = np.full((n, self.n_free), np.inf)
        names = PROFILES[self.profile][2]
        seeds = np.full((k, self.block), np.nan) if seeds is None else np.asarray(seeds, float)
        c_seeds = np.array([c if np.isfinite(c) and lim[0] < c < lim[1] else comp.center0
                            for c, lim, comp in zip(seeds[:, 0], self.limits, self.components)])
        boxes = self.boxes(c_seeds)
        for j in range(k):
            sd = dict(zip(names, seeds[j]))
            c_lo, c_hi = boxes[j]
            c_start = np.full(n, min(max(c_seeds[j], c_lo), c_hi))
            if m:
                c_start = self._centre_start(c_start, (c_lo, c_hi), smooth, peak_top, np.isfinite(sd["center"]))
            self._fill_component(j, sd, c_start, (c_lo, c_hi), (fw_guess, fw_lo, fw_hi), theta, lo, hi)
            # area from the net height at the start centre
            if m:
                at = np.clip(np.searchsorted(self.x, c_start), 0, m - 1)
                h = smooth[np.arange(n), at]
                fw = theta[:, self.index(j, names[1])]
                a = np.maximum(h, 0.02 * np.maximum(net.max(axis=1), 0) + 1e-12) * fw * 1.2
                theta[:, self.index(j, "area")] = a
        base = self.index(k - 1, names[-1]) + 1 if k else 0
        if m:
            theta[:, base] = (left + right) / 2
            if self.degree >= 1:
                theta[:, base + 1] = (right - left) / 2
        np.clip(theta, lo, hi, out=theta)
        return theta, lo, hi

    def _net(self, y: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The background levels at the left and right edge of each frame (n,) and the data net
        of the straight line between them (n, m), 0 where not valid."""
        n, m = y.shape
        edge = max(2, m // 10)
        yv = np.where(valid, y, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames fail later, with a message
            left = np.nanmedian(yv[:, :edge], axis=1) if m else np.zeros(n)
            right = np.nanmedian(yv[:, -edge:], axis=1) if m else np.zeros(n)
        left = np.where(np.isfinite(left), left, 0.0)
        right = np.where(np.isfinite(right), right, left)
        bg = left[:, None] + (right - left)[:, None] * (self.t + 1) / 2 if m else np.zeros((n, 0))
        return left, right, np.where(valid, y - bg, 0.0)

    def _widths(self, net: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Start FWHM of each frame and its bounds (n,): the spec's, or from the net data."""
        n, m = net.shape
        width = self.spec.range[1] - self.spec.range[0]
        fw_guess = np.full(n, self.spec.fwhm if self.spec.fwhm else np.nan)
        if self.spec.fwhm is None and m:
            top = net.max(axis=1)
            above = np.count_nonzero(net > top[:, None] / 2, axis=1)
            fw_guess = np.clip(above * abs(self.step), 2 * abs(self.step), width / 4)
        if self.spec.fwhm_range is not None:
            fw_lo, fw_hi = (np.full(n, v) for v in self.spec.fwhm_range)
            fw_guess = np.clip(fw_guess, fw_lo, fw_hi)
        else:
            # narrower than a bin is noise; far broader than the window's main peak is background
            fw_lo = np.full(n, abs(self.step))
            fw_hi = np.minimum(width / 3, 4 * fw_guess)
        return fw_guess, fw_lo, fw_hi

    def _peak_tops(self, net: np.ndarray, fw_guess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The net data smoothed over a third of each frame's width and its local maxima (n, m)."""
        m = net.shape[1]
        width = self.spec.range[1] - self.spec.range[0]
        smooth, peak_top = net.copy(), np.zeros_like(net, bool)
        if m:
            # smoothing and peak-top search on each frame's own width: a frame's start values never
            # depend on the other frames of its block (live, resumed and straight runs agree)
            bins = np.where(np.isfinite(fw_guess), fw_guess, width / 10) / abs(self.step)
            size = np.maximum(1, np.round(0.3 * bins)).astype(int)
            reach = 2 * np.maximum(1, np.round(0.5 * bins)).astype(int) + 1
            for sz, rc in set(zip(size.tolist(), reach.tolist())):
                rows = np.flatnonzero((size == sz) & (reach == rc))
                if sz > 1:
                    smooth[rows] = uniform_filter1d(net[rows], sz, axis=1, mode="nearest")
                peak_top[rows] = (maximum_filter1d(smooth[rows], rc, axis=1, mode="nearest") == smooth[rows]) \
                    & (smooth[rows] > 0)
            peak_top[:, [0, -1]] = False  # a window edge is not a peak top
        return smooth, peak_top

    def _centre_start(self, c_start: np.ndarray, box: tuple[float, float], smooth: np.ndarray,
                      peak_top: np.ndarray, seeded: bool) -> np.ndarray:
        """Start at the tallest local maximum in the component's box (the flank of a neighbour
        is not one) unless the seed still sits on a peak at least half as tall (a peak that
        moved since the seed was taken); no maximum: the seed."""
        n, m = smooth.shape
        inbox = (self.x >= box[0]) & (self.x <= box[1])
        cand = np.where(inbox & peak_top, smooth, -np.inf)
        best = cand.argmax(axis=1)
        rows = np.arange(n)
        found = np.isfinite(cand[rows, best])
        at_seed = np.clip(np.searchsorted(self.x, c_start), 0, m - 1)
        keep = ~found | (seeded & (smooth[rows, at_seed] >= 0.5 * cand[rows, best]))
        return np.where(keep, c_start, self.x[best])

    def _fill_component(self, j: int, sd: dict[str, float], c_start: np.ndarray, box: tuple[float, float],
                        widths: tuple[np.ndarray, np.ndarray, np.ndarray], theta: np.ndarray,
                        lo: np.ndarray, hi: np.ndarray) -> None:
        """Start values and bounds of component ``j`` into ``theta``, ``lo``, ``hi`` (the area's
        start value is set by the caller): carried values ``sd`` where inside their bounds."""
        fw_guess, fw_lo, fw_hi = widths
        s_lo, s_hi = _SHAPE_BOUNDS[self.profile]
        for name in PROFILES[self.profile][2]:
            col = self.index(j, name)
            if name == "center":
                theta[:, col], lo[:, col], hi[:, col] = c_start, box[0], box[1]
            elif name.startswith("fwhm"):
                v = sd[name]
                use = np.isfinite(v) & (fw_lo < v) & (v < fw_hi)
                theta[:, col] = np.where(use, v, fw_guess)
                lo[:, col], hi[:, col] = fw_lo, fw_hi
            elif name == "area":
                lo[:, col] = 0.0
            else:
                v = sd[name]
                theta[:, col] = v if (np.isfinite(v) and s_lo < v < s_hi) else _SHAPE_START[self.profile]
                lo[:, col], hi[:, col] = s_lo, s_hi

    # -- lmfit, the reference and the user-facing definition -------------------------------------
    def lmfit_model(self):
        """The window as an lmfit composite model (components with ``prefix="p{j}_"``)."""
        from .lmfit_models import lmfit_model

        return lmfit_model(self)
