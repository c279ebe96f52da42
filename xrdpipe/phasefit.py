"""The phase model: every window of a frame fitted at once, peak centres from each phase's cell.

Where :mod:`xrdpipe.peaks` fits one free peak per listed ``"phase hkl"``, the phase model
(``[fit] model = "phases"``, the default) fits, in one least-squares problem per frame:

* every allowed reflection of every ``[[phases]]`` phase that falls in a window (listed or not:
  a weak line of one phase under another's window is explained by its own phase), its centre
  computed from the phase's cell (the parameters its crystal system leaves free) and one zero
  shift shared by the frame (held: 0 unless ``[lattice] correction`` asks for one, then
  estimated once on the first frames and held for the run);
* a free area per reflection (>= 0), a FWHM per phase and window, an eta per phase;
* a polynomial background per window.

The cells with their esds come straight out of this fit. Phases are tracked frame by frame: a
phase present in the previous frame starts from its cell there; a phase that is not is looked for
over a grid of cells around the configured one (``[[phases]] search``, default c ±3 %, a ±1.5 %),
the areas and background solved linearly at every trial (variable projection), and the best
trial refined; a tracked phase moves about a line width per frame at most (a larger move is a
jump, searched for afresh). Two coexisting phases of one crystal system are also searched
jointly (both cells and a common width factor). Presence is decided by model selection over
the phases (BIC, the same threshold as the peak engine) plus a minimum area fraction; how it was
decided is recorded per frame and phase. Two phases whose reaches overlap are named by
continuity, not by the order of their typed cells: both present in the frame before, they keep
the order their cells had there (in the searches, by midpoint bounds in the least squares, in
the test of a phase that would take the other's place, and so going back); a newcomer beside a
phase present before is kept half a line width off that phase's lines in the parameter that
alone places their shared lines (c for 00l), on whichever side the data put it, and that order
holds from then on. The configured order is used where there is no continuity (both appear in
one frame, the first) and, for a newcomer, in a parameter no line places alone (a of two
layered phases, nearly equal: an alias of the newcomer's a would otherwise pass).

A phase's relative intensities are learned in the frames where it is the only phase present
(areas being free per line, a phase can otherwise be made of fragments of another's lines): a
phase whose listed lines are empty is absent, and one whose areas are unlike its own is a suspect;
the frame is then fitted again without it and the better BIC kept.

A frame's fit depends only on its own data and the state of the frame before it (cells, widths,
presence, learned intensities), which is stored with the results: a resumed or live run fits
every frame exactly as one straight run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from . import kernels
from .batchfit import least_squares_batch
from .config import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from .crystallography import (
    CELL_PARAMETERS,
    crystal_system,
    d_from_cell,
    full_cell,
    parse_hkl,
    q_from_tth,
    reflections,
    tth_from_d,
)
from .peaks import PEAK_FIELDS, PeakTable, WindowSetupError, concat_tables
from .windows import d_from_radial

__all__ = ["PhaseModel", "PhaseFitter", "PhaseState", "fit_phases", "fit_frame", "DEFAULT_SEARCH", "PHASE_ARRAYS"]

#: Default search half-ranges: relative for lengths, degrees for angles.
DEFAULT_SEARCH = {"a": 0.015, "b": 0.015, "c": 0.03, "alpha": 2.0, "beta": 2.0, "gamma": 2.0}
_CELL_INDEX = {"a": 0, "b": 1, "c": 2, "alpha": 3, "beta": 4, "gamma": 5}
_ANGLES = ("alpha", "beta", "gamma")
#: How far a tracked phase may move in one frame, at its most sensitive line, in FWHM (twice:
#: the local search, then the least squares); a larger move is a jump, searched for afresh.
_TRACK_FWHM = 0.6
#: A line of a placed phase outside a window but within this many FWHM of it is fitted by its
#: tail; reflections are listed for a window within this share of its width beyond its edges.
_TAIL_FWHM = 4.0
_TAIL_REACH = 0.25
#: Weight of the pull to the configured cell in the search, relative to the chi-square the phase
#: explains, per search half-range squared.
_PRIOR = 0.02
#: The joint search of two coexisting similar phases, in search half-ranges around each.
_JOINT = 0.3
_WIDTH_FACTORS = (0.8, 1.0, 1.25, 1.6, 2.0)
#: Width factors of a search for a phase beside others (the widths they had alone, or before).
_WIDTH_FACTORS_SEARCH = (0.625, 0.8, 1.0, 1.25, 1.6)
#: How far a cell may move within one frame's least squares from where the search put it, in
#: search half-ranges (a larger move is another phase, or a jump the search must confirm).
_STEP = 0.15
#: How far a tracked cell may move from the configured one, in search half-ranges: a phase is
#: found within its search range and then followed wherever it goes within this reach.
_REACH = 3.0
#: Per (frame, phase[, window]) arrays the phase model stores beside the peaks.
PHASE_ARRAYS = ("phase_cell", "phase_cell_err", "phase_present", "phase_area", "phase_area_err", "phase_fwhm",
                "phase_eta", "zero", "phase_decision", "phase_volume", "phase_volume_err", "phase_ref_area",
                "phase_bic", "forward_cell", "forward_present", "forward_fwhm", "forward_eta", "forward_ref_area")
#: How many frames the backward pass goes back from a frame where a phase that appeared is
#: strong, at most.
_BACKWARD_MAX = 60
#: A phase whose areas over the windows leave more than this share (of their sum of squares)
#: unexplained by the relative intensities it had alone is not that phase.
_UNLIKE = 0.5


@dataclass
class PhaseState:
    """What one frame hands to the next: per phase its cell (P, 6), presence (P,), FWHM per
    window (P, W) and eta (P,); the run's zero shift; per phase and window the area of its
    lines in the last frame where it was the only phase (of those with fractions) present,
    ``ref_area`` (P, W), NaN until then: its own relative intensities, learned from the data."""

    cell: np.ndarray
    present: np.ndarray
    fwhm: np.ndarray
    eta: np.ndarray
    zero: float = 0.0
    ref_area: np.ndarray | None = None

    def copy(self) -> "PhaseState":
        return PhaseState(self.cell.copy(), self.present.copy(), self.fwhm.copy(), self.eta.copy(), self.zero,
                          None if self.ref_area is None else self.ref_area.copy())


@dataclass(frozen=True)
class _Window:
    name: str
    columns: slice
    x: np.ndarray
    t: np.ndarray
    degree: int
    points: slice      # its part of the concatenated abscissa


class PhaseModel:
    """Phases x windows on a run's radial grid: reflections, parameter layout, model, search.

    Parameters
    ----------
    phases, windows : the experiment's ``[[phases]]`` and ``[[windows]]``
    fit, lattice : ``[fit]`` (presence test, iterations) and ``[lattice]`` (zero correction)
    radial, unit, wavelength_A : the run's radial axis
    """

    def __init__(self, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
                 lattice: LatticeSpec = LatticeSpec(), *, radial: np.ndarray, unit: str, wavelength_A: float | None):
        if unit == "2th_deg" and not wavelength_A:
            raise ValueError("the phase model needs the wavelength of a 2θ axis")
        self.phases = tuple(phases)
        self.fit = fit
        self.correction = lattice.correction
        self.unit, self.wavelength_A = unit, wavelength_A
        radial = np.asarray(radial, float)
        self.step = float(np.median(np.abs(np.diff(radial)))) if radial.size > 1 else 1.0
        self.data_span = (float(radial.min()), float(radial.max())) if radial.size else (np.nan, np.nan)
        wins, start = [], 0
        for w in windows:
            idx = np.flatnonzero((radial >= w.range[0]) & (radial <= w.range[1]))
            cols = slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)
            x = radial[cols]
            mid, half = (w.range[0] + w.range[1]) / 2, (w.range[1] - w.range[0]) / 2
            wins.append(_Window(w.name, cols, x, (x - mid) / half, w.background_degree, slice(start, start + x.size)))
            start += x.size
        self.windows = tuple(wins)
        self.specs = tuple(windows)
        self.n_points = start
        self.P, self.W = len(self.phases), len(self.windows)
        self.system = [crystal_system(p.space_group) for p in self.phases]
        self.free = [CELL_PARAMETERS[s] for s in self.system]
        self.cell0 = np.array([p.cell for p in self.phases], float).reshape(self.P, 6)
        self.box = np.array([[self._half_range(p, name) for name in ("a", "b", "c", "alpha", "beta", "gamma")]
                             for p in self.phases], float).reshape(self.P, 6)
        self._reflections()
        self._layout()
        self._cell_map()
        self._order_pairs()
        self._search_order()
        self._pure_windows()
        #: (R,) reflections in a window that has data points
        self.r_has_data = np.array([self.windows[w].x.size > 0 for w in self.r_window], bool)
        #: (R,) reflections listed as a window's peaks ("phase hkl")
        self.r_listed = np.zeros(self.R, bool)
        names = [p.name for p in self.phases]
        for wi, w in enumerate(self.specs):
            for label in w.peaks:
                phase, _, hkl = label.partition(" ")
                if phase in names:
                    try:
                        self.r_listed[self.label_index(wi, phase, hkl)] = True
                    except ValueError:
                        pass                # reported by the fitter that lists the peaks

    # -- set-up -------------------------------------------------------------------------------
    def _half_range(self, phase: PhaseSpec, name: str) -> float:
        v = phase.search.get(name, DEFAULT_SEARCH[name])
        if name in _ANGLES:
            return float(v)
        return float(v) * float(phase.cell[_CELL_INDEX[name]])

    def radial_of_d(self, d: np.ndarray, zero: float = 0.0) -> np.ndarray:
        """Position on the run's axis of d-spacings (with the zero shift or displacement, 2θ deg)."""
        tth = tth_from_d(d, self.wavelength_A) if self.wavelength_A else np.full(np.shape(d), np.nan)
        if self.correction == "displacement":
            tth = tth + zero * np.cos(np.radians(tth) / 2)
        else:
            tth = tth + zero
        if self.unit == "q_A^-1":
            return q_from_tth(tth, self.wavelength_A) if self.wavelength_A else 2 * np.pi / np.asarray(d)
        return tth

    def _reflections(self) -> None:
        """Every allowed reflection of every phase whose position over the search box reaches a
        window; reflections at the same d for every cell (e.g. 1 0 1 and 0 1 1 in P-3m1) merged."""
        hi_all = max(w.range[1] for w in self.specs) if self.specs else np.nan
        phase, window, hkl, mult = [], [], [], []
        for p, spec in enumerate(self.phases):
            grow = np.array(self.cell0[p])
            for i in range(3):
                grow[i] += self.box[p, i] * 1.05 * _REACH
            d_min = self._d_of_radial(hi_all) * 0.98
            if not np.isfinite(d_min):
                continue
            # list at the largest cell the fit can reach so that no reflection it can bring into
            # a window is missed
            listed = reflections(spec.space_group, grow[0], grow[2], d_min, b_A=grow[1], beta_deg=grow[4],
                                 alpha_deg=grow[3], gamma_deg=grow[5])
            seen: dict[tuple, int] = {}
            for h, k, l, _, m in listed:
                key = tuple(np.round([self._d(p, (h, k, l), self.cell0[p]),
                                      self._d(p, (h, k, l), self.cell0[p] * [1.01, 1.02, 0.99, 1, 1, 1])], 10))
                lo_d, hi_d = self._d_range(p, (h, k, l))
                r_lo, r_hi = sorted(np.atleast_1d(self.radial_of_d(np.array([hi_d, lo_d]))))
                for wi, w in enumerate(self.windows):
                    lo_w, hi_w = self.specs[wi].range          # the window as configured,
                    reach = _TAIL_REACH * (hi_w - lo_w)           # whether the data reach it or not
                    if r_hi < lo_w - reach or r_lo > hi_w + reach:
                        continue
                    if (key, wi) in seen:
                        mult[seen[(key, wi)]] += m
                        continue
                    seen[(key, wi)] = len(phase)
                    phase.append(p)
                    window.append(wi)
                    hkl.append((h, k, l))
                    mult.append(m)
        self.r_phase = np.array(phase, int)
        self.r_window = np.array(window, int)
        self.r_hkl = np.array(hkl, int).reshape(-1, 3)
        self.r_mult = np.array(mult, int)
        self.R = len(phase)

    def _d_of_radial(self, v: float) -> float:
        if self.unit == "q_A^-1":
            return 2 * np.pi / v
        return float(self.wavelength_A / (2 * np.sin(np.radians(v) / 2)))

    def _d(self, p: int, hkl, cell) -> float:
        return float(d_from_cell(hkl[0], hkl[1], hkl[2], cell))

    def _d_range(self, p: int, hkl) -> tuple[float, float]:
        """Smallest and largest d of (hkl) over the phase's search box (corners)."""
        names = self.free[p]
        corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(names))).reshape(len(names), -1).T
        ds = []
        for c in corners:
            cell = self._cell_from(p, {n: self.cell0[p, _CELL_INDEX[n]] + s * self.box[p, _CELL_INDEX[n]] * _REACH
                                       for n, s in zip(names, c)})
            ds.append(self._d(p, hkl, cell))
        return min(ds), max(ds)

    def trial_cells(self, p: int, base: np.ndarray, i: int, values: np.ndarray) -> np.ndarray:
        """(T, 6) full cells of phase ``p``: ``base`` with cell parameter ``i`` set to each of
        ``values``, the dependent ones (b = a, ...) following by its crystal system."""
        t = np.broadcast_to(base, (values.size, 6)).copy()
        t[:, i] = values
        return np.stack([np.asarray(v, float) * np.ones(values.size) for v in full_cell(
            self.phases[p].space_group, *[t[:, _CELL_INDEX[n]] if n in self.free[p] else None
                                          for n in ("a", "c", "b", "beta", "alpha", "gamma")])], axis=1)

    def _cell_from(self, p: int, values: dict) -> np.ndarray:
        sg = self.phases[p].space_group
        v = {n: values.get(n) for n in ("a", "b", "c", "alpha", "beta", "gamma")}
        return np.array(full_cell(sg, v["a"], v["c"], v["b"], v["beta"], v["alpha"], v["gamma"]), float)

    def _layout(self) -> None:
        """Free-parameter columns of a frame's vector."""
        self._lines = None                  # the compiled model's layout, made when first needed
        self._normal = None                 # ... and that of its normal equations
        names: list[str] = []
        self.cell_cols: list[list[int]] = []
        for p, spec in enumerate(self.phases):
            cols = []
            for n in self.free[p]:
                cols.append(len(names))
                names.append(f"{spec.name}.{n}")
            self.cell_cols.append(cols)
        self.zero_col = len(names)
        names.append("zero")
        self.has = np.zeros((self.P, self.W), bool)
        self.has[self.r_phase, self.r_window] = True
        self.fwhm_col = np.full((self.P, self.W), -1)
        for p in range(self.P):
            for w in range(self.W):
                if self.has[p, w]:
                    self.fwhm_col[p, w] = len(names)
                    names.append(f"{self.phases[p].name}.fwhm.{self.windows[w].name}")
        self.eta_col = np.arange(self.P) + len(names)
        names += [f"{p.name}.eta" for p in self.phases]
        self.area_col = np.arange(self.R) + len(names)
        names += [f"{self.phases[p].name}.{''.join(map(str, h))}.{self.windows[w].name}"
                  for p, h, w in zip(self.r_phase, self.r_hkl, self.r_window)]
        self.bg_col = []
        for w in self.windows:
            self.bg_col.append(np.arange(w.degree + 1) + len(names))
            names += [f"bg.{w.name}.{d}" for d in range(w.degree + 1)]
        self.names = tuple(names)
        self.k = len(names)
        # bounds of the nonlinear parameters
        self.lower = np.full(self.k, -np.inf)
        self.upper = np.full(self.k, np.inf)
        for p in range(self.P):
            for n, col in zip(self.free[p], self.cell_cols[p]):
                i = _CELL_INDEX[n]
                self.lower[col] = self.cell0[p, i] - _REACH * self.box[p, i]
                self.upper[col] = self.cell0[p, i] + _REACH * self.box[p, i]
        for w, spec in enumerate(self.specs):
            width = spec.range[1] - spec.range[0]
            lo, hi = (spec.fwhm_range if spec.fwhm_range is not None else (self.step, width / 3))
            for p in range(self.P):
                if self.fwhm_col[p, w] >= 0:
                    self.lower[self.fwhm_col[p, w]], self.upper[self.fwhm_col[p, w]] = lo, hi
        self.lower[self.eta_col], self.upper[self.eta_col] = 0.0, 1.0
        self.lower[self.area_col] = 0.0
        self.x_all = np.concatenate([w.x for w in self.windows]) if self.W else np.zeros(0)
        #: per window, its background's columns (points, degree + 1): powers of the reduced abscissa
        self.bg_columns = [np.stack([w.t ** d for d in range(w.degree + 1)], axis=1) for w in self.windows]
        #: (M,) the columns of the run's radial axis that make the concatenated windows
        self.columns = (np.concatenate([np.arange(w.columns.start, w.columns.stop) for w in self.windows])
                        if self.W else np.zeros(0, int))
        self.point_window = np.concatenate([np.full(w.x.size, i) for i, w in enumerate(self.windows)]) \
            if self.W else np.zeros(0, int)
        self._refl_of = [[np.flatnonzero((self.r_phase == p) & (self.r_window == w)) for w in range(self.W)]
                         for p in range(self.P)]

    def _search_order(self) -> None:
        """Per phase, its cell parameters in the order the search takes them: first the one that
        alone places the most reflections (c for 00l lines), so that the first pass is not
        misled by the others' start values."""
        self.search_order = []
        self.undetermined: dict[int, tuple[str, ...]] = {}
        #: (R, 6): whether a reflection's position depends on each cell parameter
        self.r_dep = np.zeros((self.R, 6), bool)
        for p in range(self.P):
            rows = np.flatnonzero(self.r_phase == p)
            hkl = self.r_hkl[rows]
            dep = []
            for n in self.free[p]:
                i = _CELL_INDEX[n]
                up = self._cell_from(p, {k: self.cell0[p, _CELL_INDEX[k]] * (1 + 1e-4 * (k == n)) for k in self.free[p]})
                dep.append(np.abs(d_from_cell(hkl[:, 0], hkl[:, 1], hkl[:, 2], up)
                                  - d_from_cell(hkl[:, 0], hkl[:, 1], hkl[:, 2], self.cell0[p])) > 1e-12)
                self.r_dep[rows, i] = dep[-1]
            dep = np.array(dep).reshape(len(self.free[p]), -1)
            # parameters no line in a window with data depends on (a, with 00l lines only)
            seen = np.array([self.windows[w].x.size > 0 for w in self.r_window[rows]], bool)
            self.undetermined[p] = tuple(n for n, d in zip(self.free[p], dep) if not (d & seen).any())
            alone = [(int(np.sum(dep[j] & (dep.sum(axis=0) == 1))), -j) for j in range(len(self.free[p]))]
            order = tuple(self.free[p][-j] for _, j in sorted(alone, reverse=True))
            self.search_order.append(tuple(n for n in order if n not in self.undetermined[p]))

    def _order_pairs(self) -> None:
        """Pairs of phases of one crystal system whose reaches overlap: each parameter in which
        their configured cells differ by more than a quarter of the search range (else the one
        where they differ most), and the sign of that difference."""
        self.order: list[tuple[int, int, int, float]] = []
        for p in range(self.P):
            for q in range(self.P):
                if p == q or self.system[p] != self.system[q]:
                    continue
                idx = [_CELL_INDEX[n] for n in self.free[p]]
                gap = np.abs(self.cell0[p, idx] - self.cell0[q, idx])
                reach = _REACH * (self.box[p, idx] + self.box[q, idx])
                if np.all(gap < reach):
                    # every parameter in which the configured cells differ clearly keeps its order
                    rel = gap / np.maximum(self.box[p, idx], 1e-12)
                    for j in [i for i, r in zip(idx, rel) if r > 0.25] or [idx[int(np.argmax(rel))]]:
                        sign = np.sign(self.cell0[p, j] - self.cell0[q, j])
                        if sign != 0:
                            self.order.append((p, q, j, float(sign)))
        #: the configured order of each pair and parameter
        self.order_sign = {(p, q, j): s for p, q, j, s in self.order}

    def _pure_windows(self) -> None:
        """Per ordered pair and parameter ``j``, the windows with data in which both phases have
        lines and all of them depend on nothing but ``j`` (their 00l lines for c): where a
        newcomer is kept off a tracked phase's lines."""
        self.pure_windows: dict[tuple[int, int, int], list[int]] = {}
        for p, q, j, _ in self.order:
            rest = [i for i in range(6) if i != j]
            self.pure_windows[p, q, j] = [
                w for w in range(self.W) if self.windows[w].x.size and self._refl_of[p][w].size
                and self._refl_of[q][w].size
                and not self.r_dep[np.ix_(np.concatenate([self._refl_of[p][w], self._refl_of[q][w]]), rest)].any()]

    def inside(self, cells: np.ndarray, zero: float, fwhm: np.ndarray | None = None, tails: bool = False) -> np.ndarray:
        """(R,) reflections whose centre at ``cells`` (P, 6) lies inside their window, at least
        half a FWHM (``fwhm`` (P, W)) from its edges: a line cut by the edge cannot be fitted;
        with ``tails``, also those within :data:`_TAIL_FWHM` widths outside it."""
        cen = self.centres(cells[None], np.array([zero]))[0]
        margin = 0.0 if fwhm is None else np.nan_to_num(0.5 * fwhm[self.r_phase, self.r_window])
        if tails and fwhm is not None:
            margin = -_TAIL_FWHM * np.nan_to_num(fwhm[self.r_phase, self.r_window])
        lo = np.array([w.x[0] if w.x.size else np.inf for w in self.windows])[self.r_window]
        hi = np.array([w.x[-1] if w.x.size else -np.inf for w in self.windows])[self.r_window]
        return (cen >= lo + margin) & (cen <= hi - margin)

    def label_index(self, window: int, phase_name: str, hkl_text: str) -> int:
        """The reflection of a listed ``"phase hkl"`` in a window (an equivalent one counts)."""
        p = [s.name for s in self.phases].index(phase_name)
        h = parse_hkl(hkl_text)
        probe = [self.cell0[p], self.cell0[p] * [1.01, 1.02, 0.99, 1, 1, 1]]
        want = [self._d(p, h, c) for c in probe]
        for r in self._refl_of[p][window]:
            if all(abs(self._d(p, self.r_hkl[r], c) - v) < 1e-9 * v for c, v in zip(probe, want)):
                return int(r)
        spec = self.phases[p]
        where = float(self.radial_of_d(np.array(spec.d_spacing(*h))))
        at = f"{where:.4g} {self.unit}" if np.isfinite(where) else "nowhere (beyond the reach of the wavelength)"
        raise ValueError(f"{phase_name} {hkl_text} of a = {spec.a}, c = {spec.c} Å lies at {at}, outside the window's "
                         f"range {list(self.specs[window].range)}, and no cell within the phase's search range "
                         f"brings it in; check the cell, the window or the wavelength")

    # -- the model ----------------------------------------------------------------------------
    def positions(self, hkl: np.ndarray, cells: np.ndarray, zero=0.0) -> np.ndarray:
        """Positions on the run's axis of reflections ``hkl`` (n, 3) in full cells: (T, n, 6) one
        per reflection and trial, (T, 1, 6) one per trial, or (6,) one for all (then (n,) out),
        with zero shifts (T,) or one; (T, n) out. Compiled (:func:`kernels.radial_positions`):
        the values of :meth:`radial_of_d` of :func:`d_from_cell`."""
        single = np.ndim(cells) == 1
        cells = np.asarray(cells, dtype=float).reshape(1, 1, 6) if single else np.asarray(cells, dtype=float)
        zero = np.asarray(zero, dtype=float).reshape(-1)
        if zero.size == 1:
            zero = np.full(cells.shape[0], zero[0])
        hkl = np.asarray(hkl, dtype=float)
        out = np.empty((cells.shape[0], hkl.shape[0]))
        kernels.radial_positions(hkl, cells, zero, float(self.wavelength_A or 0.0), int(self.unit == "q_A^-1"),
                                 self.correction == "displacement", out)
        return out[0] if single else out

    def shift_per_unit(self, p: int, cell: np.ndarray, i: int, hkl: np.ndarray, follow: bool = True) -> np.ndarray:
        """How far reflections ``hkl`` (n, 3) of phase ``p`` move on the run's axis per unit of
        cell parameter ``i`` at ``cell`` (6,), by central differences; with ``follow`` the
        parameters its crystal system ties to it move too (b = a in the hexagonal system)."""
        h = 1e-4 * max(abs(cell[i]), 1.0)
        up, dn = np.array(cell, float), np.array(cell, float)
        up[i] += h
        dn[i] -= h
        if follow:
            up = self._cell_from(p, {k: up[_CELL_INDEX[k]] for k in self.free[p]})
            dn = self._cell_from(p, {k: dn[_CELL_INDEX[k]] for k in self.free[p]})
        return np.abs(self.positions(hkl, up) - self.positions(hkl, dn)) / (2 * h)

    def _cell_map(self) -> None:
        """Where each of a phase's six cell parameters comes from: a free column (b = a follows a
        in the hexagonal system), a constant of its crystal system (γ = 120°), or the base cell."""
        self._cell_src = np.full((self.P, 6), -1)
        self._cell_const = np.full((self.P, 6), np.nan)
        for p in range(self.P):
            probe = {n: 1000.0 + j for j, n in enumerate(self.free[p])}
            full = full_cell(self.phases[p].space_group, *[probe.get(n) for n in ("a", "c", "b", "beta", "alpha", "gamma")])
            for i, v in enumerate(full):
                if v is not None and float(v) >= 1000.0:
                    self._cell_src[p, i] = self.cell_cols[p][int(float(v) - 1000.0)]
                elif v is not None:
                    self._cell_const[p, i] = float(v)
        self._src_at = np.nonzero(self._cell_src >= 0)
        self._const_at = np.nonzero(np.isfinite(self._cell_const))

    def cells(self, theta: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Full cells (r, P, 6) from parameter rows (r, k); ``base`` (P, 6) fills fixed values."""
        out = np.broadcast_to(base, (theta.shape[0], self.P, 6)).copy()
        out[:, self._const_at[0], self._const_at[1]] = self._cell_const[self._const_at]
        out[:, self._src_at[0], self._src_at[1]] = theta[:, self._cell_src[self._src_at]]
        return out

    def centres(self, cells: np.ndarray, zero: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Centres (r, R) of every reflection for cells (r, P, 6) and zero shifts (r,)."""
        r_sel = np.arange(self.R) if rows is None else rows
        return self.positions(self.r_hkl[r_sel], cells[:, self.r_phase[r_sel], :], zero)

    def value_jac(self, theta: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model (r, M) on the concatenated windows and its Jacobian (r, k, M)."""
        r = theta.shape[0]
        f = np.zeros((r, self.n_points))
        jac = np.zeros((r, self.k, self.n_points))
        cen, dval = self._centre_derivs(theta, base)
        for w, win in enumerate(self.windows):
            sl = win.points
            for d in range(win.degree + 1):
                td = win.t ** d
                f[:, sl] += theta[:, self.bg_col[w][d]][:, None] * td
                jac[:, self.bg_col[w][d], sl] = td
        # the lines, compiled: every line's value and Jacobian columns in one pass
        lo, hi, fw_col, eta_col, a_col, dcol, _ = self._line_layout()
        kernels.phase_value_jac(self.x_all, lo, hi, cen, np.ascontiguousarray(theta, dtype=float),
                                fw_col, eta_col, a_col, dcol, dval, f, jac)
        return f, jac

    def normal(self, theta: np.ndarray, base: np.ndarray, y: np.ndarray, w: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """chi² (r,), JᵀW²J (r, k, k) and JᵀW²(y - f) (r, k) of parameter rows ``theta`` (r, k)
        against one frame's data ``y`` and weights ``w`` (M,): what :meth:`value_jac` gives the
        least squares, summed window by window over the columns each window depends on
        (:func:`xrdpipe.kernels.phase_normal`) instead of over a dense (r, k, M) Jacobian."""
        r = theta.shape[0]
        cen, dval = self._centre_derivs(theta, base)
        _, _, fw_col, eta_col, a_col, _, _ = self._line_layout()
        lay = self._normal_layout()
        chi2, hess, grad = np.zeros(r), np.zeros((r, self.k, self.k)), np.zeros((r, self.k))
        kernels.phase_normal(self.x_all, np.ascontiguousarray(y, dtype=float), np.ascontiguousarray(w, dtype=float),
                             *lay[:9], cen, np.ascontiguousarray(theta, dtype=float), fw_col, eta_col, a_col,
                             *lay[9:], dval, chi2, hess, grad)
        return chi2, hess, grad

    def _centre_derivs(self, theta: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every line's centre (r, R) for parameter rows ``theta`` (r, k) and its derivatives (r,
        R, width) by the columns that move it (:meth:`_line_layout`'s ``dcol``)."""
        r = theta.shape[0]
        zero = theta[:, self.zero_col]
        # d centre / d (cell parameter, zero) by central differences on the tiny parameter
        # vector: every shifted row's centres in one call (rows: as given, then +h and -h for
        # each cell column, then the zero shifted by +-hz)
        cols = [c for cc in self.cell_cols for c in cc]
        steps = [1e-6 * max(abs(float(np.nanmax(np.abs(theta[:, c])))), 1.0) for c in cols]
        shifted = [theta]
        for c, h in zip(cols, steps):
            for sign in (1.0, -1.0):
                t = theta.copy()
                t[:, c] += sign * h
                shifted.append(t)
        hz = 1e-4
        stack = np.concatenate(shifted + [theta, theta])
        zeros = np.concatenate([np.tile(zero, 1 + 2 * len(cols)), zero + hz, zero - hz])
        all_cen = self.centres(self.cells(stack, base), zeros).reshape(-1, r, self.R)
        cen = all_cen[0]
        dcell = (all_cen[1:1 + 2 * len(cols):2] - all_cen[2:2 + 2 * len(cols):2]) / (2 * np.array(steps))[:, None, None]
        dzero = (all_cen[-2] - all_cen[-1]) / (2 * hz)
        # the centres' derivatives per cell column of the line's phase and per zero shift
        _, _, _, _, _, dcol, (line, slot, which) = self._line_layout()
        dval = np.zeros((r, self.R, dcol.shape[1]))
        dval[:, line, slot] = dcell[which, :, line].T
        dval[:, :, -1] = dzero
        return np.ascontiguousarray(cen), dval

    def _normal_layout(self):
        """For :meth:`normal`: per window its points, its columns (background, then its lines'
        areas, widths, eta and the columns that move their centres, sorted), its background's
        local columns and values, its lines; per line the local columns of its area, width, eta
        and centre derivatives."""
        if self._normal is None:
            lo, hi, fw_col, eta_col, a_col, dcol, _ = self._line_layout()
            W = self.W
            win_lo = np.array([w.points.start for w in self.windows], np.int64)
            win_hi = np.array([w.points.stop for w in self.windows], np.int64)
            n_deg = max([w.degree + 1 for w in self.windows], default=1)
            tpow = np.zeros((self.n_points, n_deg))
            nbg = np.zeros(W, np.int64)
            lbg = np.zeros((W, n_deg), np.int64)
            wcols, ptr, lines, line_ptr = [], [0], [], [0]
            la, lf, le = (np.zeros(self.R, np.int64) for _ in range(3))
            ld = np.full(dcol.shape, -1, np.int64)
            for w, win in enumerate(self.windows):
                mine = np.flatnonzero(self.r_window == w)
                cols = set(int(c) for c in self.bg_col[w])
                for i in mine:
                    cols |= {int(a_col[i]), int(fw_col[i]), int(eta_col[i])} | {int(c) for c in dcol[i] if c >= 0}
                cols = sorted(cols)
                local = {c: n for n, c in enumerate(cols)}
                for d in range(win.degree + 1):
                    tpow[win.points, d] = win.t ** d
                    lbg[w, d] = local[int(self.bg_col[w][d])]
                nbg[w] = win.degree + 1
                for i in mine:
                    la[i], lf[i], le[i] = local[int(a_col[i])], local[int(fw_col[i])], local[int(eta_col[i])]
                    ld[i] = [local[int(c)] if c >= 0 else -1 for c in dcol[i]]
                wcols += cols
                ptr.append(len(wcols))
                lines += [int(i) for i in mine]
                line_ptr.append(len(lines))
            as64 = lambda v: np.asarray(v, np.int64)     # noqa: E731
            self._normal = (tpow, win_lo, win_hi, as64(ptr), as64(wcols), nbg, lbg, as64(line_ptr), as64(lines),
                            la, lf, le, ld)
        return self._normal

    def _line_layout(self):
        """For the compiled model: each line's points (start, stop) on the concatenated
        abscissa, its width, eta and area columns, and the columns that move its centre (its
        phase's cell columns, padded with -1, then the zero shift), and where each line's cell
        derivatives come from (line, slot, index of the cell column among all phases' cell
        columns in order)."""
        if self._lines is None:
            lo = np.array([self.windows[w].points.start for w in self.r_window], np.int64)
            hi = np.array([self.windows[w].points.stop for w in self.r_window], np.int64)
            fw_col = np.array([self.fwhm_col[p, w] for p, w in zip(self.r_phase, self.r_window)], np.int64)
            eta_col = np.array([self.eta_col[p] for p in self.r_phase], np.int64)
            a_col = np.asarray(self.area_col, np.int64)
            width = max(len(c) for c in self.cell_cols) + 1
            dcol = np.full((self.R, width), -1, np.int64)
            first = np.cumsum([0] + [len(c) for c in self.cell_cols])
            line, slot, which = [], [], []
            for i, p in enumerate(self.r_phase):
                dcol[i, :len(self.cell_cols[p])] = self.cell_cols[p]
                dcol[i, -1] = self.zero_col
                for q in range(len(self.cell_cols[p])):
                    line.append(i)
                    slot.append(q)
                    which.append(first[p] + q)
            self._lines = (lo, hi, fw_col, eta_col, a_col, dcol,
                           tuple(np.array(v, np.int64) for v in (line, slot, which)))
        return self._lines


def _median(values: list) -> float:
    """``np.median`` of a short list of finite numbers (the same value, without NumPy's overhead
    on a few elements)."""
    s = sorted(float(v) for v in values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2.0


def _polish(value: float, step: float, evaluate, scored) -> tuple[float, np.ndarray, float, float]:
    """The minimum of a search score near grid point ``value`` (grid ``step``): five finer
    points over ± one step, then the vertex of the parabola through the best and its
    neighbours, kept if it scores better. Returns (value, trial cell (6,), chi², score)."""
    if step <= 0:
        trial, chi2 = evaluate(np.array([value]))
        return value, trial[0], float(chi2[0]), float(scored(trial, chi2)[0])
    values = value + step * np.linspace(-1, 1, 9)
    trial, chi2 = evaluate(values)
    score = scored(trial, chi2)
    k = int(np.argmin(score))
    best = (float(values[k]), trial[k], float(chi2[k]), float(score[k]))
    if 0 < k < values.size - 1 and np.all(np.isfinite(score[k - 1:k + 2])):
        s0, s1, s2 = score[k - 1:k + 2]
        curv = s0 - 2 * s1 + s2
        if curv > 0:
            h = values[1] - values[0]
            v = float(values[k] + 0.5 * h * (s0 - s2) / curv)
            t, c = evaluate(np.array([v]))
            s = float(scored(t, c)[0])
            if s < best[3]:
                best = (v, t[0], float(c[0]), s)
    return best


@dataclass
class FrameResult:
    """One frame's phase-model solution."""

    success: bool
    message: str
    theta: np.ndarray            # (k,) final parameters
    err: np.ndarray              # (k,) esds (NaN where held or at a bound)
    cov: np.ndarray              # (k, k)
    present: np.ndarray          # (P,)
    decision: list[str]          # per phase: how presence was decided
    chi2_window: np.ndarray      # (W,)
    n_window: np.ndarray         # (W,) valid points
    nvary_window: np.ndarray     # (W,) parameters that touch the window
    state: PhaseState


class _Frame:
    """The fit of one frame (data on the concatenated windows) from a carried state."""

    def __init__(self, model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState):
        self.m = model
        self.y = y
        valid = np.isfinite(y)
        if sigma is not None and np.isfinite(sigma).any():
            valid &= np.isfinite(sigma) & (sigma > 0)
            self.w = np.where(valid, 1.0 / np.where(valid, sigma, 1.0), 0.0)
            self.has_errors = True
        else:
            self.w = valid.astype(float)
            self.has_errors = False
        self.y0 = np.where(valid, y, 0.0)
        self.valid = valid
        self.state = state.copy()
        self.centre = self.state.cell.copy()   # where absent phases are searched for (fit_frame sets it)
        #: phases present in the frame before (with their cells there): the continuity that
        #: names two similar phases
        self.tracked = np.asarray(state.present, bool) & np.all(np.isfinite(state.cell), axis=1)
        self.before = state.cell.copy()
        self._width_guess: dict[int, float] = {}     # width_guess per window (the data's, fixed)

    # -- start widths from the data ----------------------------------------------------------
    def width_guess(self, w: int) -> float:
        """A start width for window ``w`` from its data (its configured ``fwhm`` if given):
        the points above half the highest net value; computed once per frame."""
        got = self._width_guess.get(w)
        if got is None:
            got = self._width_guess[w] = self._guess_width(w)
        return got

    def _guess_width(self, w: int) -> float:
        spec = self.m.specs[w]
        if spec.fwhm is not None:
            return float(spec.fwhm)
        win = self.m.windows[w]
        y = self.y0[win.points]
        v = self.valid[win.points]
        if not v.any():
            return 5 * self.m.step
        edge = max(2, y.size // 10)
        base = np.median(np.concatenate([y[:edge][v[:edge]], y[-edge:][v[-edge:]]]) if v[:edge].any() else y[v])
        net = np.where(v, y - base, 0.0)
        top = net.max()
        above = np.count_nonzero(net > top / 2)
        width = spec.range[1] - spec.range[0]
        return float(np.clip(above * self.m.step, 2 * self.m.step, width / 6))

    def fwhm_of(self, p: int, w: int) -> float:
        v = self.state.fwhm[p, w]
        if np.isfinite(v) and v > 0:
            return float(v)
        others = [self.state.fwhm[q, w] for q in range(self.m.P) if self.state.present[q] and q != p
                  and np.isfinite(self.state.fwhm[q, w])]
        return _median(others) if others else self.width_guess(w)

    # -- linear solve of areas + background in every window at given nonlinear values ---------
    def linear(self, cells: np.ndarray, phases: Sequence[int], zero: float) -> tuple[np.ndarray, np.ndarray]:
        """Areas and backgrounds (as a full parameter row) at fixed cells (P, 6) for ``phases``;
        returns the row and the chi² of every window."""
        m = self.m
        theta = np.zeros(m.k)
        self.fill_nonlinear(theta, cells, zero)
        cen = m.centres(cells[None], np.array([zero]))[0]
        chi2 = np.zeros(m.W)
        on = np.isin(m.r_phase, list(phases))
        for w, win in enumerate(m.windows):
            refl = np.flatnonzero(on & (m.r_window == w))
            coef, c2 = self._window_solve(w, refl, cen[refl][None], theta, np.ones(refl.size, bool))
            theta[m.area_col[refl]] = coef[0, :refl.size]
            theta[m.bg_col[w]] = coef[0, refl.size:]
            chi2[w] = float(c2[0])
        return theta, chi2

    def _window_solve(self, w: int, refl: np.ndarray, cen: np.ndarray, theta: np.ndarray,
                      tails: np.ndarray | None = None, fw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Areas of ``refl`` (not negative) and background of window ``w`` at trial centres
        ``cen`` (T, len(refl)), and the window's chi² per trial: coefficients (T, len(refl) +
        degree + 1) and (T,), by :func:`xrdpipe.kernels.window_trials`. Widths ``fw``
        (len(refl),) or (T, len(refl)), default the frame's.

        A reflection whose centre lies outside the window, or within half a width of its edge, is
        not fitted there (a line cut by the edge cannot be placed): its column is empty. Where
        ``tails`` (len(refl),) allows it, a line of a phase already placed by its other lines keeps
        its tail within :data:`_TAIL_FWHM` widths of the window (it is in the data)."""
        m = self.m
        win = m.windows[w]
        n_trials = cen.shape[0]
        k = refl.size + win.degree + 1
        if not win.x.size:                      # a window beyond the data
            return np.zeros((n_trials, k)), np.zeros(n_trials)
        if fw is None:
            fw = theta[m.fwhm_col[m.r_phase[refl], w]] if refl.size else np.zeros(0)
        fw = np.array(np.broadcast_to(fw, cen.shape), dtype=float)       # (a writable copy: one compiled signature)
        eta = np.ascontiguousarray(theta[m.eta_col[m.r_phase[refl]]] if refl.size else np.zeros(0), dtype=float)
        keep = (cen >= win.x[0] + fw / 2) & (cen <= win.x[-1] - fw / 2)
        if tails is not None and refl.size:
            near = (cen >= win.x[0] - _TAIL_FWHM * fw) & (cen <= win.x[-1] + _TAIL_FWHM * fw)
            keep |= near & tails
        coef, chi2 = np.zeros((n_trials, k)), np.zeros(n_trials)
        kernels.window_trials(win.x, m.bg_columns[w], self.y0[win.points], self.w[win.points],
                              np.ascontiguousarray(cen, dtype=float), fw, eta, np.ascontiguousarray(keep), coef, chi2)
        return coef, chi2

    def fill_nonlinear(self, theta: np.ndarray, cells: np.ndarray, zero: float) -> None:
        m = self.m
        for p in range(m.P):
            for n, col in zip(m.free[p], m.cell_cols[p]):
                theta[col] = cells[p, _CELL_INDEX[n]]
            for w in range(m.W):
                if m.fwhm_col[p, w] >= 0:
                    theta[m.fwhm_col[p, w]] = self.fwhm_of(p, w)
            eta = self.state.eta[p]
            theta[m.eta_col[p]] = eta if np.isfinite(eta) else 0.5
        theta[m.zero_col] = zero

    # -- the search for a phase not present --------------------------------------------------
    def search(self, p: int, present: Sequence[int], *, around: np.ndarray | None = None,
               scale: float = 1.0, halves: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        """Grid search of phase ``p``'s cell (coordinate by coordinate, twice) with the phases
        ``present`` (p excluded) held at their state: over ``scale`` times its search range around
        ``around`` (default the configured cell). Returns the best cell (6,), the chi² with p
        there and the chi² without p."""
        m = self.m
        others = [q for q in present if q != p]
        cells = self.state.cell.copy()
        prior_at = self.state.cell[p].copy()          # the phase's last cell (or the configured one)
        centre = m.cell0[p] if around is None else np.asarray(around, float)
        cells[p] = centre
        zero = self.state.zero
        theta, chi2_w = self.linear(cells, others, zero)
        chi2_without = float(chi2_w.sum())
        cen_all = m.centres(cells[None], np.array([zero]))[0]
        windows = [w for w in range(m.W) if m._refl_of[p][w].size]
        if not windows:
            return cells[p], chi2_without, chi2_without
        rest = float(chi2_w[[w for w in range(m.W) if w not in windows]].sum())
        fixed = {w: np.flatnonzero(np.isin(m.r_phase, others) & (m.r_window == w)) for w in windows}
        best_cell, best = centre.copy(), np.inf
        # a phase looked for beside others (not followed from the frame before): with their
        # widths and its own scaled together
        factors = np.array(_WIDTH_FACTORS_SEARCH if others and halves is None else (1.0,))
        # half-width steps over the range, parameter by parameter, twice (the first round
        # listening only to the windows placed by the parameters searched so far), then
        # fifth-width steps around the best
        order = m.search_order[p]
        schedule = ([(n, 0.5, None, True) for n in order] + [(n, 0.5, None, False) for n in order]
                    + [(n, 0.2, 1.5, False) for n in order])
        coarse: dict[str, float] = {}
        known: set[int] = set()
        for name, frac, around_best, first in schedule:
            i = _CELL_INDEX[name]
            known.add(i)
            use = windows
            if first:
                # the first round listens only to the windows whose reflections of p depend on
                # nothing but the parameters searched so far (the 00l lines for c): a strong
                # line placed by a parameter not yet searched must not pull this one astray
                unknown = [_CELL_INDEX[n] for n in m.free[p] if _CELL_INDEX[n] not in known]
                pure = [w for w in windows if not m.r_dep[np.ix_(m._refl_of[p][w], unknown)].any()]
                use = pure or windows
            if around_best is None:
                half = m.box[p, i] * scale if halves is None else halves[i]
                grid, coarse[name] = self._grid(p, name, theta, centre[i], half, frac, use)
            else:
                grid, _ = self._grid(p, name, theta, best_cell[i], around_best * coarse[name], frac, use)
                # the fine pass stays within the range searched (a phase is not found outside it)
                span = m.box[p, i] * scale if halves is None else halves[i]
                grid = np.unique(np.clip(grid, centre[i] - span, centre[i] + span))
            free = [_CELL_INDEX[n] for n in m.free[p]]

            def evaluate(values: np.ndarray, base=best_cell, i=i, use=use) -> tuple[np.ndarray, np.ndarray]:
                trial = m.trial_cells(p, base, i, values)
                chi2 = np.zeros((factors.size, values.size))
                per_w.clear()
                for w in use:
                    mine = m._refl_of[p][w]
                    hkl = m.r_hkl[mine]
                    cen_p = m.positions(hkl, trial[:, None, :], zero)                     # (T, n_mine)
                    cen_f = np.broadcast_to(cen_all[fixed[w]], (values.size, fixed[w].size))
                    refl = np.concatenate([mine, fixed[w]])
                    tails = np.concatenate([np.zeros(mine.size, bool), np.ones(fixed[w].size, bool)])
                    cen = np.concatenate([cen_p, cen_f], axis=1)
                    fw0 = theta[m.fwhm_col[m.r_phase[refl], w]] if refl.size else np.zeros(0)
                    # every width factor's trials in one compiled call (rows: factor-major)
                    fw = np.broadcast_to(factors[:, None, None] * fw0, (factors.size,) + cen.shape)
                    c2 = self._window_solve(w, refl, np.tile(cen, (factors.size, 1)), theta, tails,
                                            fw.reshape(factors.size * values.size, refl.size))[1].reshape(factors.size, values.size)
                    chi2 += c2
                    per_w[w] = c2
                # the widths of the lines there may have changed in this frame (a two-phase
                # region broadens them): each trial at the width factor that suits it best
                k = np.argmin(chi2, axis=0)
                for w in per_w:
                    per_w[w] = per_w[w][k, np.arange(values.size)]
                return trial, chi2[k, np.arange(values.size)]

            per_w: dict[int, np.ndarray] = {}
            trial, chi2 = evaluate(grid)
            # a weak pull to the phase's last cell (the configured one until it is seen), in
            # proportion to what the phase explains in the windows whose lines this parameter
            # moves: where two cells explain the lines equally (another reflection of the same
            # phase on the line, areas being free) the nearer one names them
            moved = [w for w in use if m.r_dep[m._refl_of[p][w], i].any()] or list(use)
            in_moved = np.sum([per_w[w] for w in moved], axis=0)
            explained = max(float(chi2_w[moved].sum()) - float(np.min(in_moved)), 0.0)

            def scored(trial: np.ndarray, chi2: np.ndarray) -> np.ndarray:
                rel = (trial[:, free] - prior_at[free]) / m.box[p, free]
                prior = _PRIOR * explained * np.sum(rel ** 2, axis=1)
                # the order is kept in the parameter searched now (the others' start values may
                # not keep it yet: P3's configured a above the O3 a tracked so far)
                return np.where(self._ordered(p, trial, others, theta, only=i), chi2 + prior, np.inf)

            score = scored(trial, chi2)
            # at high counts a basin of chi-square is narrower than a grid step, and which basin
            # looks best on the grid depends on where its points happen to fall: the best few
            # local minima are each searched finely before one is chosen
            step = float(np.median(np.diff(grid))) if grid.size > 1 else 0.0
            cands = [j for j in np.argsort(score)[:8] if np.isfinite(score[j])
                     and (j == 0 or score[j] <= score[j - 1]) and (j == grid.size - 1 or score[j] <= score[j + 1])]
            # a minimum on the edge of the range is a basin cut by it (its bottom is outside, or
            # it is the slope of one): an interior one is preferred
            inner_c = [j for j in cands if 0 < j < grid.size - 1]
            cands = inner_c or cands
            best_s = np.inf
            for j in cands[:3]:
                if halves is not None:
                    # tracking: the grid only has to find the basin; the least squares that
                    # follows finds its bottom
                    best_cell, best_s = trial[j], score[j]
                    best = float(chi2[j]) + float(chi2_w[[w for w in windows if w not in use]].sum())
                    break
                v, t1, c1, s1 = _polish(grid[j], step, evaluate, scored)
                if s1 < best_s:
                    best_s, best_cell = s1, t1
                    best = c1 + float(chi2_w[[w for w in windows if w not in use]].sum())
        return best_cell, best + rest, chi2_without

    def track_halves(self, p: int, limit: float) -> np.ndarray:
        """(6,) how far each cell parameter of a tracked phase may move in one frame: ``limit``
        FWHM at its most sensitive line in a window with data, at most its tracking share of
        the search range (a larger move is a jump: the phase is searched for afresh)."""
        m = self.m
        out = m.box[p] * _STEP
        rows = np.flatnonzero((m.r_phase == p) & np.array([m.windows[w].x.size > 0 for w in m.r_window], bool))
        if not rows.size:
            return out
        fw = np.array([self.fwhm_of(p, w) for w in m.r_window[rows]])
        hkl = m.r_hkl[rows]
        for n in m.free[p]:
            i = _CELL_INDEX[n]
            ratio = np.nanmax(m.shift_per_unit(p, self.state.cell[p], i, hkl) / fw)
            if ratio > 0:
                out[i] = min(out[i], limit / ratio)
        return out

    def pair_search(self, p: int, q: int, j: int, present: Sequence[int], widths: np.ndarray,
                    tracked: bool = False, pure: bool = False) -> None:
        """A joint grid over cell parameter ``j`` of two present phases whose lines overlap
        (coexisting similar structures): one at a time, each can only settle between the two
        true positions; together they split the lines. The state's cells are updated.

        Over :data:`_JOINT` search ranges around each (a pair that was already split in the
        frame before, ``tracked``: over three tracking steps), with a common factor on both
        widths; coarse steps first (0.7 of a width at the most sensitive line), then finer ones
        around the best few basins. With ``pure``, only the windows whose lines of both depend on
        nothing but parameter ``j`` are listened to (the 00l lines for c), where there are such:
        lines placed by another parameter, not yet right, would pull this one astray; and those
        lines, split, stay half a width apart (in another parameter, as a of P2 and P''2, the
        two may be nearly equal)."""
        m = self.m
        others = [r for r in present if r not in (p, q)]
        zero = self.state.zero
        theta = np.zeros(m.k)
        self.fill_nonlinear(theta, self.state.cell, zero)
        cen_all = m.centres(self.state.cell[None], np.array([zero]))[0]
        name = {v: k for k, v in _CELL_INDEX.items()}[j]
        windows = [w for w in range(m.W) if m._refl_of[p][w].size and m._refl_of[q][w].size]
        if not windows or name not in m.free[p] or name not in m.free[q]:
            return
        if pure:
            rest = [i for i in range(6) if i != j]
            windows = [w for w in windows if not m.r_dep[np.ix_(np.concatenate([m._refl_of[p][w], m._refl_of[q][w]]),
                                                                rest)].any()] or windows
        halves = []
        for r in (p, q):
            half = _JOINT * m.box[r, j]
            if tracked:
                half = min(half, 3 * self.track_halves(r, _TRACK_FWHM)[j])
            halves.append(half)
        sign = self.sign(p, q, j)
        # coarse: the whole span and every width factor
        grids, steps = [], []
        for r, half in zip((p, q), halves):
            g, step = self._grid(r, name, theta, self.state.cell[r, j], half, 0.7, windows)
            grids.append(g)
            steps.append(step)
        start = self.state.cell[[p, q], j].copy()
        # (the pull to where the two were holds for a pair followed from the frame before; a
        # phase just found was placed by a search beside the other, not by the data of both)
        cands, weight = self._pair_trials(p, q, j, grids, np.array(_WIDTH_FACTORS), windows, others, widths, theta,
                                          cen_all, sign, start, None if tracked else 0.0, pure)
        if not cands:
            return
        # then finer and finer steps (0.2, 0.07, 0.025 of a width) around each of the best few
        # basins, the neighbouring width factors: at beamline counts a basin is narrower than a
        # coarse step, and the best coarse point need not lie in the deepest basin
        best = None
        for vp, vq, s, score in cands[:3]:
            k = _WIDTH_FACTORS.index(s)
            factors = np.array(_WIDTH_FACTORS[max(k - 1, 0):k + 2])
            span = list(steps)
            for frac in (0.2, 0.07, 0.025):
                fine = []
                for i, (r, v, half) in enumerate(zip((p, q), (vp, vq), halves)):
                    g, span[i] = self._grid(r, name, theta, v, span[i], frac, windows)
                    fine.append(np.clip(g, self.state.cell[r, j] - half, self.state.cell[r, j] + half))
                found, _ = self._pair_trials(p, q, j, fine, factors, windows, others, widths, theta, cen_all, sign,
                                             start, weight, pure)
                if not found:
                    break
                vp, vq, s, score = found[0]
                factors = np.array([s])
            if best is None or score < best[3]:
                best = (vp, vq, s, score)
        vp, vq, s, _ = best
        self.state.cell[p] = m.trial_cells(p, self.state.cell[p], j, np.array([vp]))[0]
        self.state.cell[q] = m.trial_cells(q, self.state.cell[q], j, np.array([vq]))[0]
        for r in (p, q):
            self.state.fwhm[r, windows] = s * widths[r, windows]

    def _pair_trials(self, p: int, q: int, j: int, grids: list[np.ndarray], factors: np.ndarray,
                     windows: Sequence[int], others: Sequence[int], widths: np.ndarray, theta: np.ndarray,
                     cen_all: np.ndarray, sign: float, start: np.ndarray, weight: float | None = None,
                     apart: bool = False):
        """The local minima (value of p, value of q, width factor, score) over the joint grid,
        best first (an empty list if no trial keeps the order), and the weight of the pull to the
        ``start`` values: where two splits explain the lines equally (one line left, either phase
        can take it) the phases stay where they were. ``apart``: the lines the parameter places
        (the pair's shared lines) stay half a width apart."""
        m = self.m
        zero = self.state.zero
        name = {v: k for k, v in _CELL_INDEX.items()}[j]
        shape = (grids[0].size, grids[1].size, factors.size)
        gp, gq, gs = (v.ravel() for v in np.meshgrid(*grids, factors, indexing="ij"))
        ok = np.sign(gp - gq) == sign if sign else np.ones(gp.size, bool)
        if apart:
            # two phases on one line is not a split of it (a second component there only follows
            # the noise or the profile's shape): their lines stay half a width apart at least
            ok &= np.abs(gp - gq) >= 0.5 * min(self._width(p, name, theta, windows),
                                               self._width(q, name, theta, windows))
        if not ok.any():
            return [], weight
        chi2 = np.full(gp.size, np.inf)
        sel = np.flatnonzero(ok)
        trials = {p: m.trial_cells(p, self.state.cell[p], j, gp[sel]), q: m.trial_cells(q, self.state.cell[q], j, gq[sel])}
        part = np.zeros(sel.size)
        for w in windows:
            cens, refl = [], []
            for r in (p, q):
                mine = m._refl_of[r][w]
                hkl = m.r_hkl[mine]
                cens.append(m.positions(hkl, trials[r][:, None, :], zero))
                refl.append(mine)
            fixed = np.flatnonzero(np.isin(m.r_phase, others) & (m.r_window == w))
            cens.append(np.broadcast_to(cen_all[fixed], (sel.size, fixed.size)))
            pair = np.concatenate(refl)
            refl = np.concatenate(refl + [fixed])
            fw = np.concatenate([np.outer(gs[sel], widths[m.r_phase[pair], w]),
                                 np.broadcast_to(theta[m.fwhm_col[m.r_phase[fixed], w]], (sel.size, fixed.size))], axis=1)
            tails = np.ones(refl.size, bool)
            _, c2 = self._window_solve(w, refl, np.concatenate(cens, axis=1), theta, tails, fw)
            part += c2
        chi2[sel] = part
        if weight is None:
            weight = _PRIOR * float(np.ptp(part)) if np.all(np.isfinite(part)) else 0.0
        rel = ((gp - start[0]) / m.box[p, j]) ** 2 + ((gq - start[1]) / m.box[q, j]) ** 2
        score = (chi2 + weight * rel).reshape(shape)
        best_s = np.argmin(score, axis=2)
        plane = np.min(score, axis=2)
        # local minima of the (p, q) plane, each at its best width factor
        padded = np.pad(plane, 1, constant_values=np.inf)
        n_p, n_q = plane.shape
        low = np.isfinite(plane)
        for dp in (-1, 0, 1):
            for dq in (-1, 0, 1):
                if dp or dq:
                    low &= plane <= padded[1 + dp:1 + dp + n_p, 1 + dq:1 + dq + n_q]
        out = [(float(grids[0][a]), float(grids[1][b]), float(factors[best_s[a, b]]), float(plane[a, b]))
               for a, b in zip(*np.nonzero(low))]
        return sorted(out, key=lambda t: t[3]), weight

    def _width(self, p: int, name: str, theta: np.ndarray, windows: Sequence[int]) -> float:
        """How far cell parameter ``name`` of phase ``p`` moves its most sensitive reflection (in
        ``windows``) by one width (infinite if it moves none)."""
        m = self.m
        i = _CELL_INDEX[name]
        rows = np.flatnonzero((m.r_phase == p) & np.isin(m.r_window, list(windows)))
        cell = self.state.cell[p] if np.all(np.isfinite(self.state.cell[p])) else m.cell0[p]
        shift = m.shift_per_unit(p, cell, i, m.r_hkl[rows], follow=False)
        fw = theta[m.fwhm_col[p, m.r_window[rows]]]
        ratio = np.nanmax(shift / fw) if rows.size else 0.0
        return 1.0 / ratio if ratio > 0 else np.inf

    def _grid(self, p: int, name: str, theta: np.ndarray, centre: float, half: float,
              frac: float, windows: Sequence[int]) -> tuple[np.ndarray, float]:
        """Trial values of one cell parameter over ``centre ± half``: steps that move the most
        sensitive reflection (in ``windows``) by ``frac`` of its width. Returns the values and
        the step."""
        if half <= 0:
            return np.array([centre]), 0.0
        step = frac * self._width(p, name, theta, windows)
        step = step if np.isfinite(step) else half
        n = int(min(400, max(2, np.ceil(half / step))))
        return centre + np.linspace(-half, half, 2 * n + 1), half / n

    def sign(self, p: int, q: int, j: int) -> float:
        """The order of phases ``p`` and ``q`` (that could be confused) in cell parameter ``j``,
        from the data where they give it: both present in the frame before, the order of their
        cells there; one of them only, in the parameter that alone places their shared lines (c
        for 00l), the order of their cells now (the newcomer was placed beside the tracked one's
        lines, on whichever side the data put it); otherwise the order of the configured cells
        (both appear in this frame, or a parameter no line tells apart alone: a of two layered
        phases, nearly equal, where a newcomer's alias would otherwise pass)."""
        configured = self.m.order_sign.get((p, q, j), 0.0)
        if self.tracked[p] and self.tracked[q]:
            cells = self.before
        elif (self.tracked[p] or self.tracked[q]) and self.m.pure_windows.get((p, q, j)):
            cells = self.state.cell
        else:
            return configured
        s = float(np.sign(cells[p, j] - cells[q, j]))
        return s or configured

    def _ordered(self, p: int, trial: np.ndarray, present: Sequence[int], theta: np.ndarray,
                 only: int | None = None) -> np.ndarray:
        """Trials that keep the order (:meth:`sign`) of ``p`` against every present phase it
        could be confused with (in cell parameter ``only``, or in all). A newcomer beside a
        phase tracked from the frame before is not held to an order in the parameter that alone
        places their shared lines (c for 00l) but kept off the tracked phase's lines there: at
        least half a line width away from it, on either side."""
        m = self.m
        ok = np.ones(trial.shape[0], bool)
        for a, b, j, _ in m.order:
            if a != p or b not in present or (only is not None and j != only):
                continue
            windows = m.pure_windows.get((p, b, j))
            if self.tracked[b] and not self.tracked[p] and windows:
                name = {v: k for k, v in _CELL_INDEX.items()}[j]
                gap = 0.5 * self._width(b, name, theta, windows)
                ok &= np.abs(trial[:, j] - self.state.cell[b, j]) >= gap
                continue
            ok &= np.sign(trial[:, j] - self.state.cell[b, j]) == self.sign(p, b, j)
        return ok


def fit_frame(model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
              fit: FitSpec, centre: np.ndarray | None = None) -> FrameResult:
    """Fit one frame (``y`` on the concatenated windows) starting from the previous ``state``.

    A frame like the one before (:func:`_fit_steady`: its phases followed by least squares alone
    explain it to its Poisson noise) is done; else see :func:`_fit_frame_once`. A phase that may
    not be what it claims to be (dropped because its listed lines are empty, or present with
    areas unlike its own relative intensities) may have misled the searches of the others while
    it was there: the frame is then fitted again without it, and the better of the two (BIC) is
    kept."""
    steady = _fit_steady(model, y, sigma, state, fit)
    if steady is not None:
        return steady
    first = _fit_frame_once(model, y, sigma, state, fit, frozenset(), centre)
    impostors = frozenset(p for p, d in enumerate(first.decision)
                          if d.startswith("absent: no line at") or "unlike those it had alone" in d)
    if not impostors or not first.success:
        return first
    second = _fit_frame_once(model, y, sigma, state, fit, impostors, centre)
    gain = _bic(model, first) - _bic(model, second)
    if not second.success or gain <= 0:
        return first
    for p in impostors:
        d = first.decision[p]
        second.decision[p] = (d if d.startswith("absent") else
                              "absent: " + d.split("; ", 1)[-1] + f"; the frame fits better without it (ΔBIC {gain:.0f})")
    return second


def _fit_steady(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                fit: FitSpec) -> FrameResult | None:
    """The frame fitted as a continuation of the one before, without any search: the phases
    present there, from their cells, widths and eta, in one batch of least squares (all of
    them, and without each). Accepted only if the frame is then explained to its Poisson noise
    (χ² - ν below 3 √(2ν) plus what any phase would have to explain to pass the BIC test: no
    absent phase can be there, no other cell can do much better) and every present phase passes
    every test of :func:`_fit_frame_once` at once (ΔBIC, lines shown, area share, cell inside its
    reach, order kept, areas like its own); otherwise None, and the frame gets the full search.
    Never taken without esds (nothing to measure "explained" against) or where two phases that
    could be confused are both present (their shared lines need the joint search)."""
    fr = _Frame(m, y, sigma, state)
    st = fr.state
    present = [p for p in range(m.P) if st.present[p] and np.all(np.isfinite(st.cell[p]))]
    n_valid = int(np.count_nonzero(fr.w > 0))
    if not fr.has_errors or not present or n_valid < m.k // 2 + 2:
        return None
    if any(p in present and q in present for p, q, _, _ in m.order):
        # two similar phases side by side share lines: least squares from where they were can
        # leave a parameter of the weaker one where its line is hidden under the other's (the
        # joint search splits them)
        return None
    for p in range(m.P):
        if not np.all(np.isfinite(st.cell[p])):
            st.cell[p] = m.cell0[p]
    rows = [tuple(present)] + [tuple(q for q in present if q != p) for p in present]
    res = _fit_rows(m, fr, rows, fit)
    if res is None or res.status[0] != 1:
        return None
    chi2 = float(res.chi2[0])
    least = min(_n_params(m, p) for p in range(m.P)) * np.log(max(n_valid, 2)) + fit.bic_threshold
    if chi2 - n_valid - 3 * np.sqrt(2 * n_valid) >= least:
        return None
    held: set[int] = set()
    gains, fails, passed, areas, inner = _judge(m, fr, res, present, held, set(), fit, n_valid)
    if fails or held or any("unlike those it had alone" in d for d in passed.values()):
        return None
    decision = [""] * m.P
    for p in range(m.P):
        decision[p] = passed.get(p, f"absent: nothing left to explain (χ²/ν {chi2 / max(n_valid, 1):.2f})")
    return _finish(m, fr, res, present, decision, held, fit, areas, inner)


def _bic(m: PhaseModel, res: FrameResult) -> float:
    """The BIC of a frame's solution: its chi-square and the parameters of its phases."""
    n = max(int(res.n_window.sum()), 2)
    k = sum(_n_params(m, p) for p in range(m.P) if res.present[p])
    return n * np.log(max(float(res.chi2_window.sum()), 1e-300) / n) + k * np.log(n)


def _fit_frame_once(model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                    fit: FitSpec, banned: frozenset, centre: np.ndarray | None = None) -> FrameResult:
    """One attempt at a frame (``banned`` phases left out), from the previous ``state``.

    1. Phases present in the previous frame: a local cell search around their last cell, then a
       fit of those phases alone (the null model for what follows).
    2. Every other phase: a grid search over its search range against that null model; the one
       that improves the fit most plausibly (BIC, then nearest its configured cell) joins, and
       the others are searched again beside it.
    3. One fit of all candidate phases at once, with, in the same batch, the fits without each
       of them; a phase whose removal does not raise the BIC by ``bic_threshold``, or with less
       than ``min_fraction`` of the area where it has reflections, or whose cell ends at the
       edge of its reach, is dropped (the weakest first) and the rest fitted again.
    """
    m = model
    fr = _Frame(m, y, sigma, state)
    n_valid = int(np.count_nonzero(fr.w > 0))
    decision = [""] * m.P
    if n_valid < m.k // 2 + 2:
        return _failed(m, state, f"only {n_valid} valid points in the windows")
    st = fr.state
    present = [p for p in range(m.P) if st.present[p] and np.all(np.isfinite(st.cell[p])) and p not in banned]
    for p in range(m.P):                # an absent phase keeps its last cell (the prior of its search)
        if not np.all(np.isfinite(st.cell[p])):
            st.cell[p] = m.cell0[p]
    n_log = np.log(max(n_valid, 2))
    before = _fwhm_table(m, fr)            # the widths of the frame before, for the pair searches
    # where each phase is looked for: around its configured cell (a last cell from a frame where
    # it was wrongly there would lead the search astray for good)
    fr.centre = m.cell0.copy() if centre is None else np.where(np.isfinite(centre), centre, m.cell0)
    if present:
        for p in present:
            st.cell[p], _, _ = fr.search(p, present, around=st.cell[p], halves=fr.track_halves(p, _TRACK_FWHM))
        _pair_searches(m, fr, present, before, tracked=True)
        sol = _fit_rows(m, fr, [tuple(present)], fit)
        if sol is not None and np.isfinite(sol.chi2[0]):
            _adopt(m, st, sol.p[0], present)
            # a cell that runs to the end of its step has jumped, or is chasing another phase:
            # search for it afresh
            for p in [q for q in present if _at_edge(m, sol, q)]:
                present.remove(p)
    absent = [p for p in range(m.P) if p not in present and p not in banned]
    found_now: set[int] = set()
    joined: list[int] = []
    null_chi2 = float(fr.linear(st.cell, present, st.zero)[1].sum()) if present else np.inf
    while absent:
        found = []
        for p in absent:
            if fr.has_errors and null_chi2 - n_valid - 3 * np.sqrt(2 * n_valid) < _n_params(m, p) * n_log + fit.bic_threshold:
                # with Poisson esds, the fit without it leaves too little misfit for any phase to
                # pass the test: no need to search
                decision[p] = f"absent: nothing left to explain (χ²/ν {null_chi2 / max(n_valid, 1):.2f})"
                continue
            cell, chi2_with, chi2_without = fr.search(p, present, around=fr.centre[p])
            gain = n_valid * np.log(max(chi2_without, 1e-300) / max(chi2_with, 1e-300)) - _n_params(m, p) * n_log
            if gain > fit.bic_threshold:
                free = [_CELL_INDEX[n] for n in m.free[p]]
                dist = np.sqrt(np.mean(((cell - st.cell[p])[free] / m.box[p][free]) ** 2))
                found.append((dist, p, cell, chi2_with))
            else:
                decision[p] = f"absent: not found over the search range (ΔBIC {gain:.1f})"
        if not found:
            break
        # the phase that explains the most joins first; between phases that explain the lines
        # equally well within the noise (similar structures), the one whose cell (its last one,
        # else the configured one) is nearer
        best = min(c for _, _, _, c in found)
        tie = best + 2 * np.sqrt(2 * n_valid) + fit.bic_threshold
        _, p, cell, _ = min((t for t in found if t[3] <= tie), key=lambda t: t[0])
        st.cell[p] = cell
        present.append(p)
        absent.remove(p)
        found_now.add(p)
        joined.append(p)
        null_chi2 = np.inf
    if len(joined) > 1:
        # phases found one after another in this frame: the first was placed before the others
        # explained their own lines (an Al line, a second phase), and may sit on an alias. Each
        # is searched again in the order they joined, beside the phases there before, those it
        # cannot be confused with, and those already placed again
        settled = [q for q in present if q not in found_now]
        for p in joined:
            similar = {b for a, b, _, _ in m.order if a == p}
            beside = settled + [q for q in joined if q != p and q not in similar and q not in settled]
            st.cell[p], _, _ = fr.search(p, beside, around=fr.centre[p])
            settled.append(p)
    present.sort()
    if found_now:
        widths = np.where(np.isfinite(before), before, _fwhm_table(m, fr))
        _pair_searches(m, fr, present, widths)
        if any(q in found_now for a, q, _, _ in m.order if a in present):
            # a new phase beside one it is like: the joint search split their shared line in
            # the parameter it listens to first (c); the new phase's other parameters were
            # searched before that split, beside a line not yet split: searched again, over its
            # whole range, and the pair split again from there
            # (kept only if the frame is explained better: a phase that may be an impostor must
            # not be given a second chance to take the other's lines)
            kept = (st.cell.copy(), st.fwhm.copy(), float(fr.linear(st.cell, present, st.zero)[1].sum()))
            for p in joined:
                st.cell[p], _, _ = fr.search(p, present, around=fr.centre[p])
            _pair_searches(m, fr, present, widths)
            if float(fr.linear(st.cell, present, st.zero)[1].sum()) >= kept[2]:
                st.cell[:], st.fwhm[:] = kept[0], kept[1]
    held: set[int] = set()      # cell columns the data do not determine, held where the search put them
    areas = inner = None
    while present:
        rows = [tuple(present)] + [tuple(q for q in present if q != p) for p in present]
        res = _fit_rows(m, fr, rows, fit, found_now, held)
        if res is None:
            return _failed(m, state, "fit diverged (non-finite chi-square)")
        gains, fails, passed, areas, inner = _judge(m, fr, res, present, held, found_now, fit, n_valid)
        for p, text in passed.items():
            decision[p] = text
        if not fails:
            break
        if "refit" in fails.values():
            # what is held stays where this fit put it (not where the search started it)
            _adopt(m, st, res.p[0], present)
            continue
        worst = min(fails, key=lambda q: gains[q])
        redundant = [(a, b) for a, b, _, _ in m.order if a < b and fails.get(a, "").startswith("absent: ΔBIC")
                     and fails.get(b, "").startswith("absent: ΔBIC")]
        if redundant:
            # two phases that could be confused, each redundant beside the other (one line
            # left, both can fit it): the one that stays where it was in the frame before is
            # kept, the other would have to jump onto its line (no label swap)
            a, b = redundant[0]
            worst = b if _moved(m, res, present, st, state, keep=a, drop=b) <= \
                _moved(m, res, present, st, state, keep=b, drop=a) else a
        decision[worst] = fails[worst]
        present.remove(worst)
        held.clear()            # what was held against the dropped phase is free again
    if not present:
        theta, _ = fr.linear(st.cell, [], st.zero)
        return _result(m, fr, theta, np.full((m.k, m.k), np.nan), np.zeros(m.P, bool), decision, True,
                       "no phase present")
    return _finish(m, fr, res, present, decision, held, fit, areas, inner)


def _judge(m: PhaseModel, fr: "_Frame", res, present: list[int], held: set[int], found_now: set[int],
           fit: FitSpec, n_valid: int):
    """The verdict on each present phase from a fit of the frame (``res``: row 0 with every
    phase of ``present``, then one row without each). Returns the gains (ΔBIC of leaving each
    out), the failures (a phase's "absent: ..." reason, or "refit" where a cell column was added
    to ``held``), the decisions of the phases that pass, and the line areas with the mask of
    lines inside the windows (row 0)."""
    st = fr.state
    n_log = np.log(max(n_valid, 2))
    chi2 = res.chi2
    # shares of the area of the lines inside the windows (a tail's area is not a line's)
    cells_now = m.cells(res.p[:1], st.cell)[0]
    inner = m.inside(cells_now, st.zero, _fwhm_table(m, fr))
    areas = np.where(inner, res.p[0, m.area_col], 0.0)
    total_area = np.array([areas[m.r_window == w].sum() for w in range(m.W)])
    gains, fails, passed = {}, {}, {}

    def lines_missing(p: int) -> str:
        # a phase that is there shows its listed reflections: one that explains a line of
        # another phase with one reflection while its listed ones (its basal line) stay
        # empty is not the phase the user named
        # (a listed line that left its window, or sits on its edge, counts as not shown)
        listed = np.flatnonzero(m.r_listed & (m.r_phase == p) & m.r_has_data)
        shown = int(np.count_nonzero((areas[listed] > 0) & inner[listed]))
        if listed.size >= 2 and shown < (listed.size + 1) // 2:
            return f"absent: no line at {listed.size - shown} of its {listed.size} listed reflections"
        return ""

    def unlike(p: int) -> str:
        # a phase seen alone before has its relative intensities: one whose areas over the
        # windows are far from a multiple of them explains fragments of other phases' lines
        # (areas are free per line) and is not that phase
        ref = None if st.ref_area is None else st.ref_area[p]
        if ref is None or not m.phases[p].fraction:
            return ""
        mine = np.array([areas[(m.r_phase == p) & (m.r_window == w)].sum() for w in range(m.W)])
        use = np.isfinite(ref) & (ref > 0) & np.array([bool(((m.r_phase == p) & (m.r_window == w) & inner).any())
                                                       for w in range(m.W)])
        if use.sum() < 2 or mine[use].sum() <= 0:
            return ""
        r, a = ref[use], mine[use]
        s = float(a @ r) / float(r @ r)
        left = float(np.sum((a - s * r) ** 2)) / float(a @ a)
        if left > _UNLIKE:
            return (f"its areas are unlike those it had alone ({100 * (1 - left):.0f} % explained by its "
                    f"own intensities)")
        return ""

    for i, p in enumerate(present):
        gain = n_valid * np.log(max(chi2[i + 1], 1e-300) / max(chi2[0], 1e-300)) - _n_params(m, p) * n_log
        mine = areas[m.r_phase == p].sum()
        touched = total_area[np.unique(m.r_window[(m.r_phase == p) & inner])].sum()
        share = mine / touched if touched > 0 else 0.0
        at_edge = _at_edge(m, res, p)
        pressed = [c for c in m.cell_cols[p] if c in res.order_cols and c not in held and _at_bound(res, c)]
        cells = cells_now
        crossed = [(q, j) for a, q, j, _ in m.order
                   if a == p and q in present and res.signs[a, q, j]
                   and np.sign(cells[p, j] - cells[q, j]) != res.signs[a, q, j]]
        swapped = [m.phases[q].name for q, _ in crossed]
        gains[p] = gain
        if gain <= fit.bic_threshold:
            fails[p] = f"absent: ΔBIC {gain:.1f} <= {fit.bic_threshold:g}"
        elif missing := lines_missing(p):
            fails[p] = missing
        elif share < fit.min_fraction and m.phases[p].fraction:
            # (a phase kept out of the fractions, the current collector, is there when the
            # data say so: its lines are narrow and weak, and left out they pull others')
            fails[p] = f"absent: {100 * share:.2g} % of the area < min_fraction"
        elif pressed and len(pressed) < len(m.cell_cols[p]):
            # pressed against another phase it could be confused with: the lines do not tell
            # them apart in this parameter; hold it and fit again
            held.update(pressed)
            fails[p] = "refit"
        elif at_edge:
            edge = [c for c in m.cell_cols[p] if c not in held and _at_bound(res, c)]
            if edge and len(edge) < len(m.cell_cols[p]):
                # the phase is there, but a cell parameter runs away (its lines lie under
                # another phase's): hold it and fit again
                held.update(edge)
                fails[p] = "refit"
            else:
                fails[p] = "absent: cell at the edge of its reach"
        elif swapped and (p in found_now or gain < min(gains.get(q, np.inf) for q in range(m.P)
                                                       if m.phases[q].name in swapped)):
            cols = [m.cell_cols[p][m.free[p].index(n)] for n in m.free[p]
                    if _CELL_INDEX[n] in {j for _, j in crossed}]
            cols = [c for c in cols if c not in held]
            if cols and len(cols) < len(m.cell_cols[p]):
                # a parameter of a minor phase crossed another phase's (its lines lie
                # under the other's): hold it where the search put it and fit again
                held.update(cols)
                fails[p] = "refit"
            else:
                fails[p] = f"absent: would take the place of {', '.join(swapped)}"
        else:
            passed[p] = f"present: ΔBIC {gain:.0f}" + (", found by the cell search" if p in found_now else "")
            # (a phase whose areas are unlike its own is a suspect: the frame is fitted
            # again without it, and the better of the two kept, in fit_frame)
            if suspect := unlike(p):
                passed[p] += "; " + suspect
    return gains, fails, passed, areas, inner


def _finish(m: PhaseModel, fr: "_Frame", res, present: list[int], decision: list[str], held: set[int],
            fit: FitSpec, areas: np.ndarray, inner: np.ndarray) -> FrameResult:
    """The frame's result from its final fit (row 0 of ``res``, the phases ``present``); a
    phase alone (with a fraction) leaves its areas as its relative intensities."""
    keep = np.zeros(m.P, bool)
    keep[present] = True
    for c in held:
        p = next(q for q in range(m.P) if c in m.cell_cols[q])
        if keep[p]:
            decision[p] += f"; {m.names[c].split('.')[-1]} not determined (held)"
    ok = bool(res.status[0] != -1)
    message = "" if res.status[0] == 1 else f"no convergence in {fit.max_iter} iterations"
    out = _result(m, fr, res.p[0], res.cov[0], keep, decision, ok, message)
    alone = [p for p in present if m.phases[p].fraction]
    if ok and len(alone) == 1:
        # the only phase (with a fraction) present: its areas are its own relative intensities
        p = alone[0]
        ref = np.full(m.W, np.nan)
        for w in range(m.W):
            rows = np.flatnonzero((m.r_phase == p) & (m.r_window == w) & inner)
            if rows.size:
                ref[w] = areas[rows].sum()
        if out.state.ref_area is None:
            out.state.ref_area = np.full((m.P, m.W), np.nan)
        out.state.ref_area[p] = ref
    return out


def _pair_searches(m: PhaseModel, fr: "_Frame", present: Sequence[int], widths: np.ndarray,
                   tracked: bool = False) -> None:
    """Joint searches of every present pair of phases that could be confused, over each
    parameter in which their configured cells differ (``tracked``: both were there in the
    frame before, a narrower search)."""
    done = set()
    for p, q, _, _ in m.order:
        if p in present and q in present and (q, p) not in done and (p, q) not in done:
            ordered = {jj for a, b, jj, _ in m.order if a == p and b == q}
            first = True
            for name in m.search_order[p]:          # c before a, as in the search
                if _CELL_INDEX[name] in ordered:
                    fr.pair_search(p, q, _CELL_INDEX[name], present, widths, tracked, pure=first)
                    first = False
            done.add((p, q))


def _moved(m: PhaseModel, res, present: Sequence[int], st: PhaseState, before: PhaseState, *, keep: int,
           drop: int) -> float:
    """How far (in search half-ranges, rms) phase ``keep`` moves from its cell in the frame
    before when ``drop`` is left out of the fit; infinite if it was not there."""
    row = 1 + present.index(drop)
    cell = m.cells(res.p[row:row + 1], st.cell)[0][keep]
    prev = before.cell[keep]
    free = [_CELL_INDEX[n] for n in m.free[keep]]
    if not (before.present[keep] and np.all(np.isfinite(prev[free]))):
        return np.inf
    return float(np.sqrt(np.mean(((cell - prev)[free] / m.box[keep][free]) ** 2)))


def _n_params(m: PhaseModel, p: int) -> int:
    """Parameters a phase adds: its free cell, widths per window, eta and areas."""
    return len(m.free[p]) + int(m.has[p].sum()) + 1 + int(np.count_nonzero(m.r_phase == p))


def _adopt(m: PhaseModel, st: PhaseState, theta: np.ndarray, phases: Sequence[int]) -> None:
    """Take the cells, widths and eta of ``phases`` from a solution into the working state."""
    cells = m.cells(theta[None], st.cell)[0]
    for p in phases:
        st.cell[p] = cells[p]
        for w in range(m.W):
            if m.fwhm_col[p, w] >= 0 and theta[m.area_col[m._refl_of[p][w]]].sum() > 0:
                st.fwhm[p, w] = theta[m.fwhm_col[p, w]]
        st.eta[p] = theta[m.eta_col[p]]


def _fwhm_table(m: PhaseModel, fr: "_Frame") -> np.ndarray:
    """(P, W) the widths the frame's fit starts from."""
    return np.array([[fr.fwhm_of(p, w) if m.has[p, w] else np.nan for w in range(m.W)] for p in range(m.P)])


def _at_bound(res, c: int, row: int = 0) -> bool:
    return bool(res.p[row, c] <= res.lower[c] + 1e-9 * abs(res.lower[c])
                or res.p[row, c] >= res.upper[c] - 1e-9 * abs(res.upper[c]))


def _fit_rows(m: PhaseModel, fr: "_Frame", rows: list[tuple[int, ...]], fit: FitSpec, found: set[int] = frozenset(),
              held: set[int] = frozenset()):
    """Least squares of the frame for each phase subset in ``rows`` at once (one batch), from
    the working state's cells, areas and background solved linearly. The first row is the
    largest model: if it ends above a nested one (a local minimum), it is started again from
    that one. None if the first row diverged."""
    st = fr.state
    outside = ~m.inside(st.cell, st.zero, _fwhm_table(m, fr), tails=True)
    starts, holds = [], []
    for subset in rows:
        theta, _ = fr.linear(st.cell, subset, st.zero)
        hold = _held(m, subset)
        hold[list(held)] = True
        hold[m.area_col[outside]] = True
        theta[m.area_col[outside]] = 0.0
        starts.append(theta)
        holds.append(hold)
    theta0, hold = np.array(starts), np.array(holds)
    amps = [(int(m.area_col[r]), (int(m.fwhm_col[m.r_phase[r], m.r_window[r]]),)) for r in range(m.R)
            if len(m._refl_of[m.r_phase[r]][m.r_window[r]]) == 1]
    base = st.cell.copy()
    lower, upper = m.lower.copy(), m.upper.copy()
    for p in range(m.P):
        # a phase just found stays within the range it was searched over; a tracked one moves
        # a line width or so
        steps = fr.track_halves(p, _TRACK_FWHM)
        for n, col in zip(m.free[p], m.cell_cols[p]):
            i = _CELL_INDEX[n]
            if p in found:
                lower[col] = max(lower[col], fr.centre[p, i] - m.box[p, i])
                upper[col] = min(upper[col], fr.centre[p, i] + m.box[p, i])
            else:
                lower[col] = max(lower[col], st.cell[p, i] - steps[i])
                upper[col] = min(upper[col], st.cell[p, i] + steps[i])
    # two phases that could be confused do not cross in the least squares either: each stays on
    # its side of the midpoint between their start values
    order_cols: set[int] = set()
    signs = {}
    for p, q, j, _ in m.order:
        n = {v: k for k, v in _CELL_INDEX.items()}[j]
        sign = signs[p, q, j] = fr.sign(p, q, j)
        if n in m.free[p] and sign and p in rows[0] and q in rows[0]:
            col = m.cell_cols[p][m.free[p].index(n)]
            mid = 0.5 * (st.cell[p, j] + st.cell[q, j])
            if sign > 0 and mid > lower[col]:
                lower[col] = min(mid, upper[col])
                order_cols.add(col)
            elif sign < 0 and mid < upper[col]:
                upper[col] = max(mid, lower[col])
                order_cols.add(col)

    def run(theta, hold_rows):
        return least_squares_batch(lambda t: m.value_jac(t, base), theta, np.broadcast_to(fr.y0, theta.shape[:1] + fr.y0.shape),
                                   np.broadcast_to(fr.w, theta.shape[:1] + fr.w.shape), lower=lower, upper=upper,
                                   fixed=hold_rows, max_iter=fit.max_iter, amplitudes=amps, weak_z=2.0,
                                   normal=lambda t, _y, _w: m.normal(t, base, fr.y0, fr.w))

    res = run(theta0, hold)
    res.chi2 = np.where(res.status >= 0, res.chi2, np.inf)
    if len(rows) > 1 and np.isfinite(res.chi2[1:]).any() and res.chi2[1:].min() < res.chi2[0]:
        j = 1 + int(np.argmin(res.chi2[1:]))
        theta = res.p[j].copy()
        lin, _ = fr.linear(m.cells(theta[None], base)[0], rows[0], st.zero)
        dropped = ~np.isin(m.r_phase, rows[j])
        theta[m.area_col[dropped]] = np.where(outside[dropped], 0.0, lin[m.area_col[dropped]])
        again = run(theta[None], hold[:1])
        if again.status[0] >= 0 and again.chi2[0] < res.chi2[0]:
            for name in ("p", "cov", "chi2", "status"):
                getattr(res, name)[0] = getattr(again, name)[0]
    if not np.isfinite(res.chi2[0]):
        return None
    res.lower, res.upper, res.order_cols, res.signs = lower, upper, order_cols, signs
    return res


def _at_edge(m: PhaseModel, res, p: int, row: int = 0) -> bool:
    """Whether a phase's cell ended on the bound of its reach in a frame's fit (a bound that
    keeps it from crossing another phase is not its reach)."""
    return any(_at_bound(res, c, row) for c in m.cell_cols[p] if c not in res.order_cols)


def _held(m: PhaseModel, subset: Sequence[int]) -> np.ndarray:
    """Columns held for a fit of the phases ``subset``: the others' cells, widths and areas, and
    the zero shift (estimated once per run, not per frame)."""
    hold = np.zeros(m.k, bool)
    hold[m.zero_col] = True
    for p in range(m.P):
        for n in m.undetermined.get(p, ()):
            hold[m.cell_cols[p][m.free[p].index(n)]] = True
        if p in subset:
            continue
        hold[m.cell_cols[p]] = True
        hold[m.fwhm_col[p][m.fwhm_col[p] >= 0]] = True
        hold[m.eta_col[p]] = True
        hold[m.area_col[m.r_phase == p]] = True
    return hold


def _failed(m: PhaseModel, state: PhaseState, message: str) -> FrameResult:
    nan = np.full(m.k, np.nan)
    return FrameResult(False, message, nan, nan, np.full((m.k, m.k), np.nan), np.zeros(m.P, bool), [""] * m.P,
                       np.full(m.W, np.nan), np.zeros(m.W, int), np.zeros(m.W, int), state.copy())


def _result(m: PhaseModel, fr: _Frame, theta: np.ndarray, cov: np.ndarray, present: np.ndarray, decision, ok: bool,
            message: str) -> FrameResult:
    f, jac = m.value_jac(theta[None], fr.state.cell)
    resid = (fr.y0 - f[0]) * fr.w
    chi2_w = np.array([float(resid[w.points] @ resid[w.points]) for w in m.windows])
    n_w = np.array([int(np.count_nonzero(fr.w[w.points] > 0)) for w in m.windows])
    touched = np.abs(jac[0]) * (fr.w > 0) > 0
    free = np.isfinite(np.diagonal(cov))
    nv = np.array([int(np.count_nonzero(free & touched[:, w.points].any(axis=1))) for w in m.windows])
    with np.errstate(invalid="ignore"):
        err = np.sqrt(np.diagonal(cov))
    # esds scaled by the reduced chi-square: always without data esds or with esd_scale =
    # "redchi"; with Poisson esds ("auto") when it exceeds 1, so that a misfit the model cannot
    # remove (background shape, profile) widens them rather than being ignored
    redchi = chi2_w.sum() / max(n_w.sum() - int(free.sum()), 1)
    if not fr.has_errors or m.fit.esd_scale == "redchi" or redchi > 1:
        cov = cov * redchi
        err = err * np.sqrt(redchi)
    new = fr.state.copy()
    cells = m.cells(theta[None], fr.state.cell)[0]
    for p in range(m.P):
        if present[p]:
            new.cell[p] = cells[p]
            for w in range(m.W):
                if m.fwhm_col[p, w] >= 0 and theta[m.area_col[m._refl_of[p][w]]].sum() > 0:
                    new.fwhm[p, w] = theta[m.fwhm_col[p, w]]
            new.eta[p] = theta[m.eta_col[p]]
    new.present = present.copy()
    if not ok:
        new = fr.state.copy()
    return FrameResult(ok, message, theta, err, cov, present, decision, chi2_w, n_w, nv, new)


def initial_state(m: PhaseModel, zero: float = 0.0) -> PhaseState:
    """The state before the first frame: configured cells, nothing present, widths unknown."""
    return PhaseState(m.cell0.copy(), np.zeros(m.P, bool), np.full((m.P, m.W), np.nan), np.full(m.P, np.nan), zero,
                      np.full((m.P, m.W), np.nan))


def _volume(m: PhaseModel, p: int, theta: np.ndarray, cov: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """A phase's cell volume and its esd (gradient by central differences, full covariance)."""
    from .crystallography import cell_volume

    def vol(t):
        c = m.cells(t[None], base)[0, p]
        return float(cell_volume("P1", c[0], c[2], c[1], c[4], c[3], c[5]))

    cols = m.cell_cols[p]
    grad = np.zeros(len(cols))
    for j, col in enumerate(cols):
        h = 1e-6 * max(abs(theta[col]), 1.0)
        up, dn = theta.copy(), theta.copy()
        up[col] += h
        dn[col] -= h
        grad[j] = (vol(up) - vol(dn)) / (2 * h)
    with np.errstate(invalid="ignore"):
        return vol(theta), float(np.sqrt(grad @ cov[np.ix_(cols, cols)] @ grad))


def centre_esd(m: PhaseModel, theta: np.ndarray, cov: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (R,) of every reflection and their esds from the cell covariance."""
    cells = m.cells(theta[None], base)
    zero = np.array([theta[m.zero_col]])
    cen = m.centres(cells, zero)[0]
    err = np.full(m.R, np.nan)
    for p in range(m.P):
        cols = m.cell_cols[p]
        rows = np.flatnonzero(m.r_phase == p)
        if not rows.size:
            continue
        jac = np.zeros((rows.size, len(cols)))
        for j, col in enumerate(cols):
            h = 1e-6 * max(abs(theta[col]), 1.0)
            up, dn = theta.copy(), theta.copy()
            up[col] += h
            dn[col] -= h
            jac[:, j] = (m.centres(m.cells(up[None], base), zero, rows)[0]
                         - m.centres(m.cells(dn[None], base), zero, rows)[0]) / (2 * h)
        sub = cov[np.ix_(cols, cols)]
        with np.errstate(invalid="ignore"):
            err[rows] = np.sqrt(np.einsum("ri,ij,rj->r", jac, sub, jac))
    return cen, err


def d_of(m: PhaseModel, cen: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return d_from_radial(cen, err, m.unit, m.wavelength_A)


# ----------------------------------------------------------------------------------------------
# every frame of a block, in order, into a peak table

class PhaseFitter:
    """Fits the phase model frame after frame, carrying the state from each frame to the next;
    ``fit_block`` returns a :class:`~xrdpipe.peaks.PeakTable` whose listed peaks (the windows'
    ``peaks``) are read off the phase model, with the phase results in ``table.phase``.

    ``state`` is the whole memory between frames; :meth:`resume` sets it from stored results.
    """

    def __init__(self, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
                 lattice: LatticeSpec = LatticeSpec(), *, radial: np.ndarray, unit: str, wavelength_A: float | None):
        self.fit = fit
        try:
            self.model = PhaseModel(phases, windows, fit, lattice, radial=radial, unit=unit, wavelength_A=wavelength_A)
        except ValueError as exc:
            raise WindowSetupError([(0, str(exc))]) from None
        m = self.model
        self.windows = tuple(w.name for w in windows)
        problems, comps, peaks = [], [], []
        for wi, w in enumerate(windows):
            for label in w.peaks:
                phase, hkl = label.split(" ", 1)
                try:
                    comps.append(m.label_index(wi, phase, hkl))
                except ValueError as exc:
                    problems.append((wi, f"window {w.name!r}: {exc}"))
                    continue
                h = parse_hkl(hkl)
                peaks.append((w.name, phase, " ".join(map(str, h)) if max(map(abs, h)) > 9 else "".join(map(str, h)),
                              "pseudo_voigt"))
        if problems:
            raise WindowSetupError(problems)
        self.components = np.array(comps, int)
        self.peaks = tuple(peaks)
        self.comp_window = np.array([self.windows.index(p[0]) for p in peaks], int)
        self.phase_names = tuple(p.name for p in phases)
        self.state = initial_state(m)
        self._zero_known = lattice.correction == "none"

    def resume(self, stored: dict | None) -> None:
        """Take the state after the last stored row (``stored`` holds the phase arrays of rows
        before the ones to fit), or start afresh."""
        m = self.model
        self.state = initial_state(m)
        self._zero_known = self.model.correction == "none"
        if not stored or "phase_cell" not in stored or not len(stored["phase_cell"]):
            return
        done = np.flatnonzero(stored["done"])
        if not done.size:
            return
        r = done[-1]
        self.state = _stored_state(m, stored, r, forward=True)
        self._zero_known = self._zero_known or bool(np.isfinite(stored["zero"][r]))

    def fit_block(self, intensity: np.ndarray, sigma: np.ndarray | None, *, frame: np.ndarray,
                  time_s: np.ndarray | None = None, usable: np.ndarray | None = None,
                  reasons: Sequence[str] | None = None, progress=None):
        """Fit frames ``intensity`` (n, npt) in order (``sigma`` alike or None); rows not
        ``usable`` are recorded as failures with their ``reasons`` and change nothing."""
        m = self.model
        n = intensity.shape[0]
        usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
        cols = m.columns
        values, present, success, redchi, message, ph = self._arrays(n)
        if not self._zero_known and usable.any():
            self.state.zero = self._estimate_zero(intensity[usable][:8][:, cols],
                                                  None if sigma is None else sigma[usable][:8][:, cols])
            self._zero_known = True
        with threadpool_limits(1):        # small matrices: BLAS threads only get in each other's way
            for i in range(n):
                if usable[i]:
                    res = fit_frame(m, intensity[i, cols], None if sigma is None else sigma[i, cols], self.state,
                                    self.fit)
                    self._record(i, res, values, present, success, redchi, message, ph)
                    self.state = res.state
                else:
                    message[i, :] = (reasons[i] if reasons is not None and reasons[i] else "frame not integrated")
                self._store_state(i, ph)
                if progress is not None:
                    progress.update(1)
        table = PeakTable(np.asarray(frame), np.full(n, np.nan) if time_s is None else np.asarray(time_s, float),
                          self.windows, self.peaks, values, present, success, redchi, message)
        table.phase = ph
        table.phase_names = self.phase_names
        return table

    def _arrays(self, n: int):
        """Empty result arrays for ``n`` frames: peak values, present, success, redchi, message
        and the phase arrays."""
        m = self.model
        n_c, P, W = len(self.peaks), m.P, m.W
        values = {k: np.full((n, n_c), np.nan) for k in PEAK_FIELDS}
        ph = {"phase_cell": np.full((n, P, 6), np.nan), "phase_cell_err": np.full((n, P, 6), np.nan),
              "phase_present": np.zeros((n, P), bool), "phase_area": np.full((n, P, W), np.nan),
              "phase_area_err": np.full((n, P, W), np.nan), "phase_fwhm": np.full((n, P, W), np.nan),
              "phase_eta": np.full((n, P), np.nan), "zero": np.full(n, np.nan),
              "phase_decision": np.full((n, P), "", dtype=object), "phase_volume": np.full((n, P), np.nan),
              "phase_volume_err": np.full((n, P), np.nan), "phase_ref_area": np.full((n, P, W), np.nan),
              "phase_bic": np.full(n, np.nan), "forward_cell": np.full((n, P, 6), np.nan),
              "forward_present": np.full((n, P), np.nan), "forward_fwhm": np.full((n, P, W), np.nan),
              "forward_eta": np.full((n, P), np.nan), "forward_ref_area": np.full((n, P, W), np.nan)}
        return (values, np.zeros((n, n_c), bool), np.zeros((n, W), bool), np.full((n, W), np.nan),
                np.full((n, W), "", dtype=object), ph)

    def _store_state(self, i: int, ph: dict, state: PhaseState | None = None) -> None:
        st = self.state if state is None else state
        ph["phase_cell"][i] = st.cell
        ph["phase_present"][i] = st.present
        ph["phase_fwhm"][i] = st.fwhm
        ph["phase_eta"][i] = st.eta
        ph["zero"][i] = st.zero
        if st.ref_area is not None:
            ph["phase_ref_area"][i] = st.ref_area

    def _record(self, i, res: FrameResult, values, present, success, redchi, message, ph) -> None:
        m = self.model
        success[i, :] = res.success
        message[i, :] = res.message
        for w, win in enumerate(m.windows):
            if not win.x.size:      # a window beyond the data: failed, the others go on
                success[i, w] = False
                message[i, w] = (f"window {win.name!r} {list(m.specs[w].range)} has no data points "
                                 f"(the data span {m.data_span[0]:g} to {m.data_span[1]:g} {m.unit})")
        ph["phase_decision"][i] = res.decision
        if not res.success:
            return
        ph["phase_bic"][i] = _bic(m, res)
        with np.errstate(all="ignore"):
            redchi[i] = res.chi2_window / np.maximum(res.n_window - res.nvary_window, 1)
        theta, err, cov = res.theta, res.err, res.cov
        cen, cen_err = centre_esd(m, theta, cov, res.state.cell)
        d, d_err = d_of(m, cen, cen_err)
        fw_table = np.where(m.fwhm_col >= 0, theta[np.maximum(m.fwhm_col, 0)], np.nan)
        inner = m.inside(m.cells(theta[None], res.state.cell)[0], theta[m.zero_col], fw_table)
        for p in range(m.P):
            if not res.present[p]:
                continue
            for n, col in zip(m.free[p], m.cell_cols[p]):
                ph["phase_cell_err"][i, p, _CELL_INDEX[n]] = err[col]
            ph["phase_volume"][i, p], ph["phase_volume_err"][i, p] = _volume(m, p, theta, cov, res.state.cell)
            for w in range(m.W):
                rows = m._refl_of[p][w]
                rows = rows[inner[rows]]          # lines in the window; a tail's area is not one
                if not rows.size:
                    continue
                a_cols = m.area_col[rows]
                ph["phase_area"][i, p, w] = theta[a_cols].sum()
                sub = np.nan_to_num(cov[np.ix_(a_cols, a_cols)])
                ph["phase_area_err"][i, p, w] = np.sqrt(max(float(sub.sum()), 0.0))
        for j, r in enumerate(self.components):
            p, w = m.r_phase[r], m.r_window[r]
            if not m.windows[w].x.size:
                continue
            area = theta[m.area_col[r]]
            if not res.present[p]:
                values["area"][i, j] = 0.0
                values["height"][i, j] = 0.0
                continue
            fw_col = m.fwhm_col[p, w]
            fw, eta = theta[fw_col], theta[m.eta_col[p]]
            present[i, j] = area > 0
            values["center"][i, j], values["center_err"][i, j] = cen[r], cen_err[r]
            values["fwhm"][i, j], values["fwhm_err"][i, j] = fw, err[fw_col]
            values["fwhm_left"][i, j] = values["fwhm_right"][i, j] = fw
            values["shape"][i, j], values["shape_err"][i, j] = eta, err[m.eta_col[p]]
            values["area"][i, j], values["area_err"][i, j] = area, err[m.area_col[r]]
            values["height"][i, j] = area / fw * (eta * 2 / np.pi + (1 - eta) * np.sqrt(4 * np.log(2) / np.pi))
            values["d_A"][i, j], values["d_err_A"][i, j] = d[r], d_err[r]

    def backward(self, stored: dict, read, *, progress=None):
        """The backward pass: decisions over the whole series.

        A phase that appears is found, in the forward pass, by a search beside phases whose
        lines it shares, in the frames where it is weakest. From the first frame where it holds
        ``[fit] backward_share`` of the area (its cell well determined), the frames before it
        are fitted again going back, each starting from the one after it (every phase followed
        from there, an absent one searched for around its cell in the forward pass), until the
        phase is absent in both passes for two frames; every frame keeps the solution with the
        lower BIC (by more than 2) and says so in its decisions, unless it swaps a phase for one
        it could be confused with (one gone, the other come: the same lines under another name).

        ``stored``: the phase arrays of rows ``0:n`` (``phase_bic`` included, ``done``);
        ``read(start, stop)``: the intensity and esd (NaN if none) of those rows on the run's
        radial axis. Returns the revised rows (ascending) and their results as a
        :class:`~xrdpipe.peaks.PeakTable` (``table.phase`` holds their phase arrays), or
        ``None`` if no frame changed.
        """
        m, fit = self.model, self.fit
        if "phase_bic" not in stored or not len(stored["phase_bic"]):
            return None
        n = len(stored["phase_bic"])
        done = np.asarray(stored.get("done", np.ones(n, bool)), bool)
        bic = np.where(done, np.asarray(stored["phase_bic"], float), np.nan)
        usable = np.isfinite(bic)
        present = np.asarray(stored["phase_present"], bool) & usable[:, None]
        cell = np.array(stored["phase_cell"], float)
        area = np.nan_to_num(np.asarray(stored["phase_area"], float)).sum(axis=2)
        counted = np.array([p.fraction for p in m.phases], bool)
        total = (area * (present & counted)).sum(axis=1)
        share = np.where(total[:, None] > 0, area / np.where(total[:, None] > 0, total[:, None], 1.0), 0.0)
        cols = m.columns
        starts: dict[int, list[int]] = {}
        for p in np.flatnonzero(counted):
            onsets = np.flatnonzero(present[1:, p] & ~present[:-1, p]) + 1
            for e in onsets:
                strong = np.flatnonzero(present[e:, p] & (share[e:, p] >= fit.backward_share))
                if strong.size:
                    starts.setdefault(int(e + strong[0]), []).append(int(p))
        if not starts:
            return None
        revised: dict[int, FrameResult] = {}
        states: dict[int, PhaseState] = {}
        bar = progress
        if bar is not None:         # at most this many frames fitted again
            bar.reset(total=sum(min(_BACKWARD_MAX, s) for s in starts))

        def hint(j: int) -> np.ndarray:
            # where an absent phase is looked for: its cell in the nearest frame that has it
            out = np.full((m.P, 6), np.nan)
            for p in range(m.P):
                have = np.flatnonzero(present[:, p])
                if have.size:
                    out[p] = cell[have[np.argmin(np.abs(have - j))], p]
            return out

        with threadpool_limits(1):
            for s_row in sorted(starts):
                # the rows this start may revisit, read at once
                lo = max(0, s_row - _BACKWARD_MAX)
                intensity, sigma = read(lo, s_row)
                carry = states.get(s_row) or _stored_state(m, stored, s_row)
                gone = 0
                for j in range(s_row - 1, lo - 1, -1):
                    if not usable[j]:
                        continue
                    y = intensity[j - lo, cols]
                    e = sigma[j - lo, cols]
                    res = fit_frame(m, y, e if np.isfinite(e).any() else None, carry, fit, hint(j))
                    new_bic = _bic(m, res) if res.success else np.inf
                    # a phase that takes the place of one it could be confused with (the one
                    # there going forward gone, the other come) is a label swap, not a better
                    # solution: the two explain the same lines
                    swap = any(res.present[q] and not present[j, q] and present[j, p] and not res.present[p]
                               for p, q, _, _ in m.order)
                    if new_bic < bic[j] - 2.0 and not swap:
                        res.decision = [d + f" (going back from frame {s_row})" if d else d for d in res.decision]
                        revised[j], states[j] = res, res.state
                        bic[j], present[j] = new_bic, res.present & usable[j]
                        cell[j] = np.where(res.present[:, None], res.state.cell, cell[j])
                        carry = res.state
                    else:
                        carry = states.get(j) or _stored_state(m, stored, j)
                    if bar is not None:
                        bar.update(1)
                    followed = starts[s_row]
                    if not any(res.present[p] or present[j, p] for p in followed):
                        gone += 1
                        if gone >= 2:
                            break
                    else:
                        gone = 0
        if not revised:
            return None
        rows = np.array(sorted(revised))
        values, pres, success, redchi, message, ph = self._arrays(rows.size)
        for k, j in enumerate(rows):
            self._record(k, revised[j], values, pres, success, redchi, message, ph)
            self._store_state(k, ph, revised[j].state)
            # what the forward pass carried on from this frame: an interrupted fit that resumes
            # after it goes on as the forward pass did
            fwd = _stored_state(m, stored, j, forward=True)
            ph["forward_cell"][k], ph["forward_present"][k] = fwd.cell, fwd.present
            ph["forward_fwhm"][k], ph["forward_eta"][k] = fwd.fwhm, fwd.eta
            ph["forward_ref_area"][k] = fwd.ref_area if fwd.ref_area is not None else np.nan
        time_s = stored.get("time_s")
        table = PeakTable(rows, np.full(rows.size, np.nan) if time_s is None else np.asarray(time_s, float)[rows],
                          self.windows, self.peaks, values, pres, success, redchi, message)
        table.phase = ph
        table.phase_names = self.phase_names
        return rows, table

    def _estimate_zero(self, y: np.ndarray, sigma: np.ndarray | None) -> float:
        """The run's zero shift (or displacement): the median over the first frames of a fit in
        which it is free, each frame started afresh."""
        m = self.model
        zeros = []
        for i in range(y.shape[0]):
            state = initial_state(m)
            res = fit_frame(m, y[i], None if sigma is None else sigma[i], state, self.fit)
            if not res.success or not res.present.any():
                continue
            fr = _Frame(m, y[i], None if sigma is None else sigma[i], res.state)
            present = tuple(np.flatnonzero(res.present))
            theta = res.theta.copy()
            hold = _held(m, present)
            hold[m.zero_col] = False
            hold[m.area_col[~m.inside(res.state.cell, 0.0)]] = True
            lo, hi = m.lower.copy(), m.upper.copy()
            lo[m.zero_col], hi[m.zero_col] = -0.5, 0.5
            again = least_squares_batch(lambda t: m.value_jac(t, res.state.cell), theta[None], fr.y0[None],
                                        fr.w[None], lower=lo, upper=hi, fixed=hold[None], max_iter=self.fit.max_iter,
                                        normal=lambda t, _y, _w: m.normal(t, res.state.cell, fr.y0, fr.w))
            if again.success[0] and abs(again.p[0, m.zero_col]) < 0.5:
                zeros.append(float(again.p[0, m.zero_col]))
        return float(np.median(zeros)) if zeros else 0.0


def _stored_state(m: PhaseModel, stored: dict, r: int, forward: bool = False) -> PhaseState:
    """The state after row ``r`` of stored phase arrays (``forward``: the one the forward pass
    carried on from that row, where the backward pass replaced its solution)."""
    if forward and "forward_cell" in stored and np.isfinite(stored["forward_present"][r]).all():
        return PhaseState(np.array(stored["forward_cell"][r], float), np.array(stored["forward_present"][r]) > 0,
                          np.array(stored["forward_fwhm"][r], float), np.array(stored["forward_eta"][r], float),
                          float(stored["zero"][r]) if np.isfinite(stored["zero"][r]) else 0.0,
                          np.array(stored["forward_ref_area"][r], float))
    return PhaseState(np.array(stored["phase_cell"][r], float), np.array(stored["phase_present"][r], bool),
                      np.array(stored["phase_fwhm"][r], float), np.array(stored["phase_eta"][r], float),
                      float(stored["zero"][r]) if np.isfinite(stored["zero"][r]) else 0.0,
                      np.array(stored["phase_ref_area"][r], float) if "phase_ref_area" in stored
                      else np.full((m.P, m.W), np.nan))


def fit_phases(patterns, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
               lattice: LatticeSpec = LatticeSpec()) -> PeakTable:
    """The phase model in every frame of an in-memory :class:`~xrdpipe.run.store.Patterns` stack,
    frame after frame; frames that failed integration are kept as failed rows. For a run file
    on disk (streamed, resumable) use :func:`xrdpipe.run.fit.fit_experiment`.

    Example
    -------
    >>> table = fit_phases(series.as_patterns(), phases, windows)          # doctest: +SKIP
    >>> table.phase["phase_cell"][:, 0, 2]                                  # doctest: +SKIP
    """
    n = patterns.intensity.shape[0]
    status = np.asarray(patterns.frames.get("status", np.ones(n)))
    fitter = PhaseFitter(phases, windows, fit, lattice, radial=patterns.radial, unit=patterns.unit,
                         wavelength_A=patterns.wavelength_A)
    usable = status == 1
    reasons = [("frame not integrated: " + str(msg)) if not u else "" for u, msg in
               zip(usable, patterns.frames.get("message", [""] * n))]
    table = fitter.fit_block(patterns.intensity, patterns.sigma, frame=np.arange(n),
                             time_s=patterns.frames.get("time_s", np.full(n, np.nan)), usable=usable, reasons=reasons)
    if fit.backward:
        sigma = patterns.sigma if patterns.sigma is not None else np.full(patterns.intensity.shape, np.nan)
        back = fitter.backward(table.phase, lambda a, b: (patterns.intensity[a:b], sigma[a:b]))
        if back is not None:
            _replace_rows(table, *back)
    return concat_tables([table])


def _replace_rows(table: PeakTable, rows: np.ndarray, new: PeakTable) -> None:
    """Put the results of ``new`` (rows ``rows`` of ``table``) into ``table``."""
    for name in table.values:
        table.values[name][rows] = new.values[name]
    for name in ("present", "success", "redchi", "message"):
        getattr(table, name)[rows] = getattr(new, name)
    for name in table.phase:
        table.phase[name][rows] = new.phase[name]
