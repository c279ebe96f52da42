"""The phase model's layout: which reflections of which phase fall in which window, the columns
of a frame's parameter vector (cells, zero shift, widths, eta, areas, backgrounds) and their
bounds, and the model's value, Jacobian and normal equations for parameter rows
(:class:`PhaseModel`); the state carried from frame to frame (:class:`PhaseState`) and the
constants of the tracking. See :mod:`xrdpipe.phasefit` for the whole method."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import kernels
from ..config import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from ..config.fitting import DEFAULT_SEARCH, FREE_PEAK_REACH
from ..crystallography import (
    CELL_PARAMETERS,
    coincident_groups,
    crystal_system,
    d_from_cell,
    d_from_q,
    d_from_tth,
    full_cell,
    parse_hkl,
    q_from_tth,
    reciprocal_cell,
    reflections,
    tth_from_d,
)
from ..errors import WindowSetupError
from ..parallel import default_workers, lasting_pool
from .instrument import instrument_profile

_CELL_INDEX = {"a": 0, "b": 1, "c": 2, "alpha": 3, "beta": 4, "gamma": 5}
_CELL_NAME = {v: k for k, v in _CELL_INDEX.items()}
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
                "phase_bic", "forward_cell", "forward_present", "forward_fwhm", "forward_eta", "forward_ref_area",
                "phase_named", "phase_misfit", "zero_err")
#: How many frames the backward pass goes back from a frame where a phase that appeared is
#: strong, at most.
_BACKWARD_MAX = 60
#: A phase whose areas over the windows leave more than this share (of their sum of squares)
#: unexplained by the relative intensities it had alone is not that phase.
_UNLIKE = 0.5
#: A listed line is shown (:func:`decide._lines_missing`) when its area exceeds this many esds
#: (an empty line's area, never negative, is above zero half the time and above 1 esd one time in six).
_SHOWN_Z = 3.0
#: A phase followed from the frame before that moved this share of the way toward an absent
#: similar phase's search centre, or broadened by this factor, may have taken its line: the
#: absent phase is searched again beside it where it was (:func:`decide._drawn_towards`).
_DRAWN = 0.2
#: A window the frame's solution leaves at a reduced chi-square above this (with Poisson esds),
#: and above :data:`_MISFIT_RISE` times what it had in the frame before, holds lines the phases
#: followed from there do not explain: each phase with lines there is searched for afresh
#: (:func:`decide._searched_afresh`).
_MISFIT = 10.0
_MISFIT_RISE = 4.0
_BROADENED = 1.2
#: A phase found with every listed line within this many FWHM of the same reflection of a
#: similar phase followed from the frame before explains that phase's lines (the rest a
#: search left, e.g. a line a little off), not lines of its own: one line, not two phases.
_SAME_LINE = 0.75
#: Two similar phases of one fit whose listed lines all lie within this many FWHM of each
#: other's are one set of lines (:func:`~xrdpipe.phasefit.neighbours._coincident`): the second
#: explains the rest a profile of the wrong shape leaves (at beamline counts, many esds). Well
#: below the closest coexisting lines the model must split (1 FWHM apart, the two-phase
#: region broadening them 1.6x: 0.6 of their FWHM there).
_ONE_LINE = 0.35


@dataclass
class PhaseState:
    """What one frame hands to the next: per phase its cell (P, 6), presence (P,), FWHM per
    window (P, W) and eta (P,); the run's zero shift; per phase and window the area of its
    lines in the last frame where it was the only phase (of those with fractions) present,
    ``ref_area`` (P, W), NaN until then: its own relative intensities, learned from the data;
    ``redchi`` (W,), the reduced chi-square of each window in the frame that handed it over
    (None where unknown: a pass's first frame, or a state stored before it was stored);
    ``zero_err``, the esd of the run's zero shift where it was estimated (NaN: none, or held
    at a given value);
    ``misfit_ref`` (W,), each window's chi-square per point (on its data less the far tails) in
    the last frame not followed for its misfit being as before (searched, or explained to its
    noise), what the steady path compares a frame's misfit with (None where unknown: the first
    frame; stored with each frame, so a resumed run has it); ``as_before_run``, how many frames
    in a row since that one were followed by the steady path because their misfit was as there;
    ``as_before_confirmed``, how many searches in a row, each made only because that many frames
    had been followed so (:func:`~xrdpipe.phasefit.decide._as_before_allowance`), found what
    following would have found: each doubles the frames followed before the next."""

    cell: np.ndarray
    present: np.ndarray
    fwhm: np.ndarray
    eta: np.ndarray
    zero: float = 0.0
    ref_area: np.ndarray | None = None
    redchi: np.ndarray | None = None
    zero_err: float = np.nan
    misfit_ref: np.ndarray | None = None
    as_before_run: int = 0
    as_before_confirmed: int = 0

    def copy(self) -> "PhaseState":
        return PhaseState(self.cell.copy(), self.present.copy(), self.fwhm.copy(), self.eta.copy(), self.zero,
                          None if self.ref_area is None else self.ref_area.copy(),
                          None if self.redchi is None else self.redchi.copy(), self.zero_err,
                          None if self.misfit_ref is None else self.misfit_ref.copy(), self.as_before_run,
                          self.as_before_confirmed)


@dataclass(frozen=True)
class _Window:
    name: str
    columns: slice
    x: np.ndarray
    t: np.ndarray
    degree: int
    points: slice      # its part of the concatenated abscissa
    hw: np.ndarray     # the instrument's half-width at each point (0: a point sample)


def _free_line_phase(window: WindowSpec, centre: float, unit: str, wavelength_A: float | None,
                     taken: Sequence[str]) -> PhaseSpec:
    """A line of no phase at ``centre`` (the run's radial unit) of ``window`` as a phase the
    model can carry: a cubic cell whose a is the line's d-spacing, its one line (100), searched
    and moved within :data:`~xrdpipe.config.fitting.FREE_PEAK_REACH` of the window's width of
    the centre, its own width, eta and area, kept out of the fractions. Named ``free <centre>``
    (and the window's name where that is taken)."""
    def d_of(v: float) -> float:
        return float(d_from_q(v) if unit == "q_A^-1" else d_from_tth(v, wavelength_A))

    reach = FREE_PEAK_REACH * (window.range[1] - window.range[0])
    d = d_of(centre)
    if not d < _MAX_FREE_D:
        raise ValueError(f"the free peak at {centre:g} {unit} has d = {d:.4g} Å; a line of no phase is carried as a "
                         f"cubic cell of a = d, which expects d below {_MAX_FREE_D:g} Å (a centre further out on the axis)")
    near, far = d_of(centre + reach), d_of(max(centre - reach, 1e-3))
    name = f"free {centre:g}"
    if name in taken:
        name += f" ({window.name})"
    # the reach in d, at most the search's ±20 % (a wide window at low angle reaches further)
    return PhaseSpec(name=name, space_group="Pm-3m", a=d, fraction=False,
                     search={"a": min((far - near) / 2 / d, _MAX_FREE_SEARCH)})


#: The longest d (Å) a line of no phase may have: a cell's a is below 100 Å.
_MAX_FREE_D = 100.0
#: The widest search of a line of no phase's d (relative): a phase's search is at most ±20 %.
_MAX_FREE_SEARCH = 0.2


#: How many cells (and zero shifts) :meth:`PhaseModel.centres` keeps the centres of.
_CENTRES_KEPT = 16


class PhaseModel:
    """Phases x windows on a run's radial grid: reflections, parameter layout, model, search.

    Parameters
    ----------
    phases, windows : the experiment's ``[[phases]]`` and ``[[windows]]``
    fit, lattice : ``[fit]`` (presence test, iterations) and ``[lattice]`` (zero correction)
    radial, unit, wavelength_A : the run's radial axis
    instrument_sd, instrument_offset : (radial points,) the standard deviation of the radial
        positions each point averages over, and their mean less the point's radial value (the run
        file's records), or None: point samples at the radial values (see
        :func:`~xrdpipe.phasefit.instrument.instrument_profile`)
    """

    #: The least squares' iterations compiled (:meth:`iterate`); off, they run in NumPy
    #: (:func:`xrdpipe.batchfit._iterate`), the same steps (a test compares the two).
    compiled_iterations = True

    def __init__(self, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
                 lattice: LatticeSpec = LatticeSpec(), *, radial: np.ndarray, unit: str, wavelength_A: float | None,
                 instrument_sd: np.ndarray | None = None, instrument_offset: np.ndarray | None = None):
        if unit == "2th_deg" and not wavelength_A:
            raise ValueError("the phase model needs the wavelength of a 2θ axis")
        self.phases = tuple(phases)
        self.fit = fit
        self._centres_kept: dict[bytes, np.ndarray] = {}
        #: threads that solve a search's windows side by side (``[fit] workers``, else the cores)
        self.threads = fit.workers or default_workers()
        #: work (a callable) the next least squares with nested rows hands to a second thread
        #: while its rows run in this one (:meth:`iterate`): the record of the frame before; taken
        #: once
        self.idle = None
        #: the whole-series naming check's other run (:meth:`~xrdpipe.phasefit.fitter.PhaseFitter.other_naming`):
        #: {frozenset((p, q)): r}, where lines that either of two similar phases could carry are
        #: named by their typed cells (neither seen yet), phase r takes them whichever cell is nearer
        self.naming: dict[frozenset, int] = {}
        self.correction = lattice.phase_correction
        self.unit, self.wavelength_A = unit, wavelength_A
        #: lines of no phase (``[[windows]] free_peaks``), each a phase of its own after the
        #: configured ones (:func:`_free_line_phase`): phase index -> (its window, typed centre)
        self.free_line: dict[int, tuple[int, float]] = {}
        extra: list[PhaseSpec] = []
        for wi, w in enumerate(windows):
            for centre in w.free_peaks:
                self.free_line[len(self.phases) + len(extra)] = (wi, centre)
                try:
                    extra.append(_free_line_phase(w, centre, unit, wavelength_A,
                                                  [p.name for p in self.phases + tuple(extra)]))
                except ValueError as exc:   # its d, or the stand-in cell's own checks
                    raise WindowSetupError([(wi, str(exc))], key="free_peaks") from None
        self.phases += tuple(extra)
        radial = np.asarray(radial, float)
        self.step = float(np.median(np.abs(np.diff(radial)))) if radial.size > 1 else 1.0
        self.data_span = (float(radial.min()), float(radial.max())) if radial.size else (np.nan, np.nan)
        radial_eff, hw = instrument_profile(fit, radial, instrument_sd, instrument_offset)
        wins, start = [], 0
        for w in windows:
            idx = np.flatnonzero((radial >= w.range[0]) & (radial <= w.range[1]))
            cols = slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)
            x = radial_eff[cols]
            mid, half = (w.range[0] + w.range[1]) / 2, (w.range[1] - w.range[0]) / 2
            wins.append(_Window(w.name, cols, x, (x - mid) / half, w.background_degree, slice(start, start + x.size),
                                hw[cols]))
            start += x.size
        self.windows = tuple(wins)
        #: (W,) the instrument's FWHM in each window, as a Gaussian's of the same standard
        #: deviation (2 sqrt(2 ln 2) of them; the triangle's is hw / sqrt(6)), median over its points
        self.blur = np.array([2.3548 * float(np.median(w.hw)) / np.sqrt(6.0) if w.hw.size else 0.0 for w in wins])
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
        #: (P, R) phase q's row of reflection i's hkl in the same window, or -1 (:func:`~.neighbours._twin`)
        self.twins = np.full((self.P, self.R), -1)
        for q in range(self.P):
            for i in range(self.R):
                twin = np.flatnonzero((self.r_phase == q) & (self.r_window == self.r_window[i])
                                      & np.all(self.r_hkl == self.r_hkl[i], axis=1))
                if twin.size:
                    self.twins[q, i] = twin[0]
        # per phase, its reflections in windows with data: how many, their hkl, their windows
        # (each once, in order) and each one's window (shift_per_width's)
        self._with_data = []
        for p in range(self.P):
            rows = np.flatnonzero((self.r_phase == p) & self.r_has_data)
            windows = self.r_window[rows].tolist()
            self._with_data.append((rows.size, self.r_hkl[rows].astype(float), list(dict.fromkeys(windows)), windows))
        #: (W,) windows that have data points
        self.window_has_data = np.array([w.x.size > 0 for w in self.windows], bool)
        #: (R,) one number per reflection of a phase (its rows in every window it reaches share it)
        keys = np.column_stack([self.r_phase, self.r_hkl])
        self.r_group = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1) if self.R else np.zeros(0, int)
        # (R,) the first and last point of each reflection's window (none: nothing is inside)
        self._r_lo = np.array([w.x[0] if w.x.size else np.inf for w in self.windows])[self.r_window]
        self._r_hi = np.array([w.x[-1] if w.x.size else -np.inf for w in self.windows])[self.r_window]
        self.n_groups = int(self.r_group.max()) + 1 if self.R else 0
        #: (R,) how far beyond its window's edges a reflection is listed (:data:`_TAIL_REACH` of
        #: the window's configured width): the reach of the tails of a line in no window
        self._r_reach = self._listing_reach()[self.r_window] if self.R else np.zeros(0)
        #: (area column, (width column,)) of each line alone in its window for its phase: the
        #: peaks whose shape the least squares holds while they are weak (``amplitudes``)
        self.lone_lines = [(int(self.area_col[r]), (int(self.fwhm_col[self.r_phase[r], self.r_window[r]]),))
                           for r in range(self.R) if len(self._refl_of[self.r_phase[r]][self.r_window[r]]) == 1]
        #: (R,) reflections listed as a window's peaks ("phase hkl", and the free peaks' lines)
        self.r_listed = np.isin(self.r_phase, list(self.free_line))
        names = [p.name for p in self.phases]
        for wi, w in enumerate(self.specs):
            for label in w.peaks:
                phase, _, hkl = label.partition(" ")
                if phase in names:
                    try:
                        self.r_listed[self.label_index(wi, phase, hkl)] = True
                    except ValueError:
                        pass                # reported by the fitter that lists the peaks
        #: per phase, its listed reflections in windows with data
        self.listed_of = [np.flatnonzero(self.r_listed & (self.r_phase == p) & self.r_has_data) for p in range(self.P)]

    def range_distance(self, p: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """How far cells ``a`` are from ``b`` (``(..., 6)``, broadcast) for phase ``p``: the rms over
        its free parameters of the differences in search half-ranges."""
        free = [_CELL_INDEX[n] for n in self.free[p]]
        d = (np.asarray(a, float)[..., free] - np.asarray(b, float)[..., free]) / self.box[p, free]
        return np.sqrt(np.mean(d ** 2, axis=-1))

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
        listing = self._listing_reach()
        for p, spec in enumerate(self.phases):
            if p in self.free_line:             # a line of no phase: its one line, in its window
                phase.append(p)
                window.append(self.free_line[p][0])
                hkl.append((1, 0, 0))
                mult.append(1)
                continue
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
            # reflections at one d for every cell of the crystal system are one line: moving the
            # cell outside its system (a ≠ b in a cubic one) kept apart lines no cell of the
            # phase can split, (511) and (333) of a spinel: two area columns of one line, a
            # singular fit, and no esd at all for the frame
            seen: dict[tuple, int] = {}
            group = coincident_groups([row[:3] for row in listed], self.system[p], self.cell0[p])
            for (h, k, l, _, m), key in zip(listed, group):
                lo_d, hi_d = self._d_range(p, (h, k, l))
                r_lo, r_hi = sorted(np.atleast_1d(self.radial_of_d(np.array([hi_d, lo_d]))))
                for wi, reach in enumerate(listing):
                    lo_w, hi_w = self.specs[wi].range          # the window as configured,
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
        self._hkl_float = self.r_hkl.astype(float)      # (as the compiled positions take them)
        self.r_mult = np.array(mult, int)
        self.R = len(phase)

    def _listing_reach(self) -> np.ndarray:
        """(W,) how far beyond its configured edges a window lists reflections (whether the data
        reach it or not): :data:`_TAIL_REACH` of its width."""
        return np.array([_TAIL_REACH * (w.range[1] - w.range[0]) for w in self.specs], float)

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
        ``values``, the dependent ones (b = a, ...) following by its crystal system.

        A free angle (β of a monoclinic cell, the triclinic ones) moves as a reciprocal angle, the
        reciprocal axes and the other reciprocal angles held (:func:`_moving_angle`): the (100),
        (010) and (001) spacings stay, so the 00l, h00 and 0k0 lines stay where a, b and c put
        them and the angle moves only the lines that mix the two axes it lies between. In direct
        axes a step of β moves every h0l line (d(001) = c sin β), and the search, one parameter at
        a time, could not undo a start 1 % off in a and 0.4° in β (a C2/m cell found 2 % off in a,
        its χ² 400 times the true one's); a triclinic angle moved with only the reciprocal axes
        held moved all three reciprocal angles, and 4 of 8 P-1 cells typed 0.5-1 % and 0.1-0.4°
        off were found elsewhere."""
        if i >= 3:
            t = _moving_angle(np.asarray(base, float), i, values)
        else:
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
        #: every window's background columns, window after window, and where each window's start
        self.bg_cols = np.concatenate(self.bg_col).astype(np.int64) if self.bg_col else np.zeros(0, np.int64)
        self.bg_lo = np.cumsum([0] + [c.size for c in self.bg_col[:-1]]).astype(np.int64)
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
        #: (M,) the instrument's half-width at each point of :attr:`x_all` (0: a point sample)
        self.hw_all = np.concatenate([w.hw for w in self.windows]) if self.W else np.zeros(0)
        #: per window, its background's columns (points, degree + 1): powers of the reduced abscissa
        self.bg_columns = [np.stack([w.t ** d for d in range(w.degree + 1)], axis=1) for w in self.windows]
        #: (M,) the columns of the run's radial axis that make the concatenated windows
        self.columns = (np.concatenate([np.arange(w.columns.start, w.columns.stop) for w in self.windows])
                        if self.W else np.zeros(0, int))
        self.point_window = np.concatenate([np.full(w.x.size, i) for i, w in enumerate(self.windows)]) \
            if self.W else np.zeros(0, int)
        self._refl_of = [[np.flatnonzero((self.r_phase == p) & (self.r_window == w)) for w in range(self.W)]
                         for p in range(self.P)]
        #: per phase, its reflections, and the index of its cell columns' block of a covariance
        #: (what a frame's record asks for again and again: NumPy's np.ix_ of a list costs more than
        #: the product it indexes)
        self._refl_of_phase = [np.flatnonzero(self.r_phase == p) for p in range(self.P)]
        #: per window, its reflections
        self.in_window = [np.flatnonzero(self.r_window == w) for w in range(self.W)]
        # (every phase's free cell columns and where in a (P, 6) table of cells they are; every
        # (phase, window, width column) of a phase with a line there)
        self._free_cols = np.array([c for cols in self.cell_cols for c in cols], np.intp)
        at = [(p, _CELL_INDEX[n]) for p in range(self.P) for n in self.free[p]]
        self._free_at = (np.array([a[0] for a in at], np.intp), np.array([a[1] for a in at], np.intp))
        self._fwhm_slots = [(p, w, int(self.fwhm_col[p, w])) for p in range(self.P) for w in range(self.W)
                            if self.fwhm_col[p, w] >= 0]
        #: per phase, the indices (into a full cell) of its free cell parameters
        self._free_index = [[_CELL_INDEX[n] for n in self.free[p]] for p in range(self.P)]
        self._cell_block = [np.ix_(np.asarray(c, np.intp), np.asarray(c, np.intp)) for c in self.cell_cols]
        #: per phase, the parameters it adds to a frame's model: its free cell, widths per window,
        #: eta and areas (the presence tests' and the BIC's count)
        self.n_params = [len(self.free[p]) + int(self.has[p].sum()) + 1 + int(np.count_nonzero(self.r_phase == p))
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
                # (as the search moves it: an angle as a reciprocal one, trial_cells)
                up = self.trial_cells(p, self.cell0[p], i, np.array([self.cell0[p, i] * (1 + 1e-4)]))[0]
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
        #: pairs of phases that can take each other's lines: a pair above, or two with lines in
        #: one window (of any crystal systems: a monoclinic O'3 can put lines on each of an O3's
        #: in the windows a user draws around both)
        share = [{w for w in range(self.W) if self.windows[w].x.size and self._refl_of[p][w].size}
                 for p in range(self.P)]
        self.confusable = {(p, q) for p, q, _, _ in self.order} | {
            (p, q) for p in range(self.P) for q in range(self.P) if p != q and share[p] & share[q]}

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

    def of_phases(self, phases) -> np.ndarray:
        """(R,) which reflections belong to one of ``phases`` (np.isin's answer, by look-up)."""
        mask = np.zeros(self.P, bool)
        mask[list(phases)] = True
        return mask[self.r_phase]

    def inside(self, cells: np.ndarray, zero: float, fwhm: np.ndarray | None = None, tails: bool = False) -> np.ndarray:
        """(R,) reflections whose centre at ``cells`` (P, 6) lies inside their window, at least
        half a FWHM (``fwhm`` (P, W)) from its edges: a line cut by the edge cannot be fitted;
        with ``tails``, also those within :data:`_TAIL_FWHM` widths outside it, and a reflection
        that is a line in no window within the reach it is listed at (:data:`_TAIL_REACH` of the
        window's width), whatever its width: its tail is the only measure of its area, and a
        reach that moved with the width left MCM's (102), ~4 FWHM above the 100 window, out as
        the lines narrowed (the window at χ²/ν ~900 on 2D frames). (The searches' trials still
        fit tails within :data:`_TAIL_FWHM` widths only; the least squares after them, this
        reach.)"""
        cen = self.centres(cells[None], np.array([zero]))[0]
        if fwhm is None:
            return (cen >= self._r_lo) & (cen <= self._r_hi)
        inner, fw = self._inner(cen, fwhm)
        return self._fitted(cen, inner, fw) if tails else inner

    def inside_both(self, cells: np.ndarray, zero: float, fwhm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`inside` without and with ``tails``, the centres placed once."""
        cen = self.centres(cells[None], np.array([zero]))[0]
        inner, fw = self._inner(cen, fwhm)
        return inner, self._fitted(cen, inner, fw)

    def _inner(self, cen: np.ndarray, fwhm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fw = fwhm[self.r_phase, self.r_window]
        fw = np.where(np.isnan(fw), 0.0, fw)        # (no line there: no margin; widths are finite)
        return (cen >= self._r_lo + 0.5 * fw) & (cen <= self._r_hi - 0.5 * fw), fw

    def _fitted(self, cen: np.ndarray, inner: np.ndarray, fw: np.ndarray) -> np.ndarray:
        # a reflection that is a line in no window is seen by its tails alone: fitted by them as
        # far out as it is listed (its area is measured nowhere else, and the far tails of
        # :mod:`~xrdpipe.phasefit.tails` come from lines only)
        line = np.zeros(self.n_groups, bool)
        line[self.r_group[inner]] = True
        reach = np.where(line[self.r_group], _TAIL_FWHM * fw, np.maximum(_TAIL_FWHM * fw, self._r_reach))
        return (cen >= self._r_lo - reach) & (cen <= self._r_hi + reach)

    def label_index(self, window: int, phase_name: str, hkl_text: str) -> int:
        """The reflection of a listed ``"phase hkl"`` in a window (an equivalent one counts)."""
        p = [s.name for s in self.phases].index(phase_name)
        h = parse_hkl(hkl_text)
        rows = self._refl_of[p][window]
        group = coincident_groups([h, *self.r_hkl[rows]], self.system[p], self.cell0[p])
        for r, g in zip(rows, group[1:]):
            if g == group[0]:
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

    def shift_per_unit(self, p: int, cell: np.ndarray, i: int, hkl: np.ndarray) -> np.ndarray:
        """How far reflections ``hkl`` (n, 3) of phase ``p`` move on the run's axis per unit of
        cell parameter ``i`` alone at ``cell`` (6,), by central differences (the parameters its
        crystal system ties to it held: :meth:`free_shifts` moves them too); an angle as the
        search moves it (:meth:`trial_cells`: as a reciprocal angle)."""
        h = 1e-4 * max(abs(cell[i]), 1.0)
        up, dn = np.array(cell, float), np.array(cell, float)
        up[i] += h
        dn[i] -= h
        if i >= 3:
            up, dn = _moving_angle(np.asarray(cell, float), i, np.array([up[i], dn[i]]))
        return np.abs(self.positions(hkl, up) - self.positions(hkl, dn)) / (2 * h)

    def free_shifts(self, p: int, cell: np.ndarray, hkl: np.ndarray) -> np.ndarray:
        """(len(free[p]), n) how far reflections ``hkl`` (n, 3) of phase ``p`` move on the run's
        axis per unit of each of its free cell parameters at ``cell`` (6,), the parameters its
        crystal system ties to each moving with it (b = a in the hexagonal system): central
        differences, every parameter's in one evaluation of the positions."""
        cell = np.asarray(cell, float)
        out = np.empty((len(self.free[p]), hkl.shape[0]))
        kernels.free_shifts(np.asarray(hkl, float), np.where(self._has_const[p], self._cell_const[p], cell),
                            self._tied_mask[p], cell[self._free_index[p]], float(self.wavelength_A or 0.0),
                            int(self.unit == "q_A^-1"), self.correction == "displacement", out)
        return out

    def shift_per_width(self, p: int, cell: np.ndarray, fwhm_of) -> np.ndarray:
        """(len(free[p]),) how many widths phase ``p``'s most sensitive line with data moves per
        unit of each free cell parameter at ``cell`` (6,); ``fwhm_of(w)`` is the phase's FWHM
        in window ``w`` (asked once per window with such a line). Empty: no line with data."""
        n, hkl, distinct, windows = self._with_data[p]
        if not n:
            return np.empty(0)
        widths = {w: fwhm_of(w) for w in distinct}
        fw = np.array([widths[w] for w in windows])
        return np.fmax.reduce(self.free_shifts(p, cell, hkl) / fw, axis=1)   # (nanmax, no overhead)

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
        # per phase, the cell parameters each of its free columns sets (b with a: hexagonal)
        self._tied = [[np.flatnonzero(self._cell_src[p] == col) for col in self.cell_cols[p]] for p in range(self.P)]
        self._tied_mask = [np.array([self._cell_src[p] == col for col in self.cell_cols[p]], bool).reshape(-1, 6)
                           for p in range(self.P)]
        self._has_const = np.isfinite(self._cell_const)
        # (cells' indices into a flat (P * 6) row, and what goes there)
        self._const_flat = self._const_at[0] * 6 + self._const_at[1]
        self._const_values = self._cell_const[self._const_at]
        self._src_flat = self._src_at[0] * 6 + self._src_at[1]
        self._src_cols = self._cell_src[self._src_at]

    def shifted_cells(self, p: int, values: np.ndarray, h: np.ndarray, base: np.ndarray) -> np.ndarray:
        """(1 + 2 n, 6) full cells of phase ``p`` with its n free cell parameters at ``values``
        (n,), then each moved by ``+h`` and ``-h`` in turn (the parameters its crystal system ties
        to it moving with it); ``base`` (6,) fills the others: :meth:`cells` of those parameter
        rows, for this phase alone."""
        row = np.where(np.isfinite(self._cell_const[p]), self._cell_const[p], base)
        out = np.repeat(row[None], 1 + 2 * len(values), axis=0)
        for k, tied in enumerate(self._tied[p]):
            out[:, tied] = values[k]
            out[1 + 2 * k, tied] = values[k] + h[k]
            out[2 + 2 * k, tied] = values[k] - h[k]
        return out

    def fwhm_table(self, theta: np.ndarray) -> np.ndarray:
        """(P, W) each phase's width per window in a parameter row ``theta`` (k,); NaN where it
        has no line."""
        return np.where(self.fwhm_col >= 0, theta[np.maximum(self.fwhm_col, 0)], np.nan)

    def cells(self, theta: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Full cells (r, P, 6) from parameter rows (r, k); ``base`` (P, 6) fills fixed values."""
        out = np.broadcast_to(base, (theta.shape[0], self.P, 6)).copy()
        flat = out.reshape(theta.shape[0], self.P * 6)
        flat[:, self._const_flat] = self._const_values
        flat[:, self._src_flat] = theta[:, self._src_cols]
        return out

    def centres(self, cells: np.ndarray, zero: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Centres (r, R) of every reflection for cells (r, P, 6) and zero shifts (r,). Those of
        one row are kept for the last :data:`_CENTRES_KEPT` cells and zeros asked for (a frame's
        fit asks for the same ones again and again: the state's, the solution's), as copies."""
        if rows is None and cells.shape[0] == 1:
            cells, zero = np.asarray(cells, dtype=float), np.asarray(zero, dtype=float).reshape(-1)
            key = cells.tobytes() + zero.tobytes()
            got = self._centres_kept.get(key)
            if got is None:
                got = self.positions(self._hkl_float, cells[:, self.r_phase, :], zero)
                if len(self._centres_kept) >= _CENTRES_KEPT:
                    del self._centres_kept[next(iter(self._centres_kept))]      # the oldest
                self._centres_kept[key] = got
            return got.copy()
        if rows is None:
            return self.positions(self._hkl_float, cells[:, self.r_phase, :], zero)
        return self.positions(self._hkl_float[rows], cells[:, self.r_phase[rows], :], zero)

    def value_jac(self, theta: np.ndarray, base: np.ndarray, lines: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Model (r, M) on the concatenated windows and its Jacobian (r, k, M). With ``lines``
        (indices), only those lines are evaluated: leave out only lines of area 0 whose area's
        column is not wanted (such a line adds nothing to the model, nor to any other column)."""
        r = theta.shape[0]
        f = np.zeros((r, self.n_points))
        jac = np.zeros((r, self.k, self.n_points))
        cen, dval = self._centre_derivs(theta, base)
        for w, win in enumerate(self.windows):
            sl = win.points
            for d in range(win.degree + 1):
                td = self.bg_columns[w][:, d]
                f[:, sl] += theta[:, self.bg_col[w][d]][:, None] * td
                jac[:, self.bg_col[w][d], sl] = td
        # the lines, compiled: every line's value and Jacobian columns in one pass
        lo, hi, fw_col, eta_col, a_col, dcol = self._line_layout()
        if lines is not None:
            lo, hi, fw_col, eta_col, a_col, dcol = (v[lines] for v in (lo, hi, fw_col, eta_col, a_col, dcol))
            cen, dval = np.ascontiguousarray(cen[:, lines]), np.ascontiguousarray(dval[:, lines])
        kernels.phase_value_jac(self.x_all, self.hw_all, lo, hi, cen, np.ascontiguousarray(theta, dtype=float),
                                fw_col, eta_col, a_col, dcol, dval, f, jac)
        return f, jac

    def normal(self, theta: np.ndarray, base: np.ndarray, y: np.ndarray, w: np.ndarray,
               held: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """chi² (r,), JᵀW²J (r, k, k) and JᵀW²(y - f) (r, k) of parameter rows ``theta`` (r, k)
        against one frame's data ``y`` and weights ``w`` (M,): what :meth:`value_jac` gives the
        least squares, summed window by window over the columns each window depends on
        (:func:`xrdpipe.kernels.phase_normal_rows`, the compiled iterations' own) instead of over
        a dense (r, k, M) Jacobian.

        ``held`` (r, k): the columns the least squares holds in each row. A line whose area is
        held at 0 (a phase left out of the row, a line outside its window) adds nothing to the
        model and every derivative of it but its area's is 0: it is left out, and its area's
        entries are 0 (the least squares does not use a held column's)."""
        r = theta.shape[0]
        _, _, fw_col, eta_col, a_col, _ = self._line_layout()
        lay = self._normal_layout()
        theta = np.ascontiguousarray(theta, dtype=float)
        held = np.zeros(theta.shape, bool) if held is None else np.ascontiguousarray(held, dtype=bool)
        chi2, hess, grad = np.zeros(r), np.zeros((r, self.k, self.k)), np.zeros((r, self.k))
        kernels.phase_normal_rows(self.x_all, self.hw_all, np.ascontiguousarray(y, dtype=float),
                                  np.ascontiguousarray(w, dtype=float), *lay[:9], fw_col, eta_col, a_col, *lay[9:],
                                  *self._geometry(base), theta, held, chi2, hess, grad)
        return chi2, hess, grad

    def iterate(self, base: np.ndarray, y: np.ndarray, w: np.ndarray):
        """The least squares' iterations against one frame's data ``y`` and weights ``w`` (M,),
        cells not in a row from ``base`` (P, 6), compiled (:func:`xrdpipe.kernels.phase_lm`): the
        ``iterate`` of :func:`~xrdpipe.batchfit.least_squares_batch`, the steps of its
        :func:`~xrdpipe.batchfit._iterate` with :meth:`normal`, without the Python of each."""
        _, _, fw_col, eta_col, a_col, _ = self._line_layout()
        lay = self._normal_layout()
        y = np.ascontiguousarray(y, dtype=float)
        w = np.ascontiguousarray(w, dtype=float)
        geometry = self._geometry(base)

        def run(p, _y, _w, lower, upper, fixed, stop, *, max_iter, xtol, amplitudes, weak_z, must_move,
                must_descend=None):
            n, k = p.shape
            cols, shape = amplitudes
            moved = np.ones(n, bool) if must_move is None else ~np.asarray(must_move, bool)
            rise_ends = np.ones(n, bool) if must_descend is None else ~np.asarray(must_descend, bool)
            chi2, hess = np.zeros(n), np.zeros((n, k, k))
            n_iter, status = np.zeros(n, np.int32), np.zeros(n, np.int8)
            lower, upper = np.ascontiguousarray(lower), np.ascontiguousarray(upper)
            fixed, stop = np.ascontiguousarray(fixed), np.ascontiguousarray(stop, dtype=float)

            def rows(sl: slice) -> None:
                # (each row's steps are its own, so rows run apart give the numbers they give
                # together; the kernel updates its own copies, written back here)
                part = [np.ascontiguousarray(v[sl]) for v in (p, lower, upper, fixed, stop)]
                flags = [np.ascontiguousarray(v[sl]) for v in (moved, rise_ends)]
                out = [np.ascontiguousarray(v[sl]) for v in (chi2, hess, n_iter, status)]
                kernels.phase_lm(self.x_all, self.hw_all, y, w, *lay[:9], fw_col, eta_col, a_col, *lay[9:],
                                 *geometry, *part, int(max_iter), float(xtol), cols, shape, float(weak_z),
                                 *flags, *out)
                p[sl], moved[sl] = part[0], flags[0]
                for whole, got in zip((chi2, hess, n_iter, status), out):
                    whole[sl] = got

            if n >= 2 and self.threads >= 2:
                # the nested rows (the presence tests') on a second core beside the first row: the
                # kernel runs without the GIL
                pool = lasting_pool(1, "xrdpipe-rows")
                work, self.idle = self.idle, None
                if work is None:
                    nested = pool.submit(rows, slice(1, n))
                    try:
                        rows(slice(0, 1))
                    finally:
                        nested.result()         # (never left writing into a call that raised)
                else:
                    # every row here, and the work left for this call in a second thread: its
                    # Python runs while the rows are in their kernel, which runs without the GIL
                    # (two busy threads on two cores, not three; this thread's Python meanwhile
                    # only writes back the rows' own arrays)
                    call = pool.submit(work)
                    try:
                        rows(slice(0, n))
                    finally:
                        futures.wait([call])
                    call.result()
            else:
                rows(slice(0, n))
            return chi2, hess, n_iter, status
        return run

    def _centre_derivs(self, theta: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every line's centre (r, R) for parameter rows ``theta`` (r, k) and its derivatives (r,
        R, width) by the columns that move it (:meth:`_line_layout`'s ``dcol``): central
        differences on the tiny parameter vector, compiled (:func:`kernels.centre_derivs`)."""
        geometry = self._geometry(base)
        theta = np.ascontiguousarray(theta, dtype=float)
        cen = np.empty((theta.shape[0], self.R))
        dval = np.zeros((theta.shape[0], self.R, geometry[4].shape[1]))
        kernels.centre_derivs(*geometry[:4], theta, *geometry[4:], cen, dval)
        return cen, dval

    def _geometry(self, base: np.ndarray) -> tuple:
        """What the compiled kernels take to place the lines (:func:`kernels.centre_derivs`), the
        parameter rows aside: reflections, their phases, where each cell parameter comes from,
        the full cells with ``base`` (P, 6) where a row does not set them, the columns that move
        each line, the zero's column, the wavelength, the unit (1: Q) and the correction."""
        return (self._hkl_float, self.r_phase, self._cell_src,
                np.where(np.isfinite(self._cell_const), self._cell_const, base), self._line_layout()[5],
                self.zero_col, float(self.wavelength_A or 0.0), int(self.unit == "q_A^-1"),
                self.correction == "displacement")

    def linear_layout(self):
        """For the windows' linear solves (:func:`xrdpipe.kernels.windows_linear`): the powers
        of each window's reduced abscissa, the windows' points (start, stop) and their numbers of
        background columns."""
        lay = self._normal_layout()
        return lay[0], lay[1], lay[2], lay[5]

    def _normal_layout(self):
        """For :meth:`normal`: per window its points, its columns (background, then its lines'
        areas, widths, eta and the columns that move their centres, sorted), its background's
        local columns and values, its lines; per line the local columns of its area, width, eta
        and centre derivatives."""
        if self._normal is None:
            lo, hi, fw_col, eta_col, a_col, dcol = self._line_layout()
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
        phase's cell columns, padded with -1, then the zero shift)."""
        if self._lines is None:
            lo = np.array([self.windows[w].points.start for w in self.r_window], np.int64)
            hi = np.array([self.windows[w].points.stop for w in self.r_window], np.int64)
            fw_col = np.array([self.fwhm_col[p, w] for p, w in zip(self.r_phase, self.r_window)], np.int64)
            eta_col = np.array([self.eta_col[p] for p in self.r_phase], np.int64)
            a_col = np.asarray(self.area_col, np.int64)
            width = max(len(c) for c in self.cell_cols) + 1
            dcol = np.full((self.R, width), -1, np.int64)
            for i, p in enumerate(self.r_phase):
                dcol[i, :len(self.cell_cols[p])] = self.cell_cols[p]
                dcol[i, -1] = self.zero_col
            self._lines = (lo, hi, fw_col, eta_col, a_col, dcol)
        return self._lines


def _moving_angle(base: np.ndarray, i: int, values: np.ndarray) -> np.ndarray:
    """(T, 6) the cells ``base`` (6,) with angle ``i`` (3-5: α, β, γ) moved to about each of
    ``values`` (degrees) as a reciprocal angle: its reciprocal counterpart moved by the opposite
    step, the reciprocal axes a*, b*, c* and the other two reciprocal angles held. Only the lines
    that mix the two axes the angle lies between move (α: the 0kl lines with k, l ≠ 0); 00l, h00
    and 0k0 stay where a, b and c put them. A monoclinic β is then exactly ``values`` (β* = 180° -
    β), a and c following with a sin β and c sin β held; a triclinic angle is ``values`` to first
    order (moving a direct angle with the reciprocal axes held moves all three reciprocal angles,
    and with them every line but the axial ones)."""
    star = reciprocal_cell(np.asarray(base, float)[None])[0]
    t = np.broadcast_to(star, (np.size(values), 6)).copy()
    t[:, i] = star[i] - (np.asarray(values, float) - base[i])
    return reciprocal_cell(t)
