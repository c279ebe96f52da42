"""One frame's data against the phase model from a carried state (:class:`_Frame`): start widths,
the linear solve of areas and backgrounds in every window at fixed cells (variable projection),
the grid search of a phase's cell and the joint search of two coexisting similar phases; and a
frame's result (:class:`FrameResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import kernels
from ..parallel import lasting_pool
from .model import (
    _CELL_INDEX,
    _CELL_NAME,
    _JOINT,
    _PRIOR,
    _STEP,
    _TAIL_FWHM,
    _TRACK_FWHM,
    _WIDTH_FACTORS,
    _WIDTH_FACTORS_SEARCH,
    PhaseModel,
    PhaseState,
)

#: How many orders of its cell parameters a search runs where the first parameter's first round
#: hears only some of the phase's lines (:meth:`_Frame.search`): the configured order and the
#: next ones rotated to the front.
_FIRST_ORDERS = 3

#: Lines x points x trials below which a search round's windows are solved on one thread (at
#: ~100 ns each, a millisecond: handing the windows to the threads costs more than they save).
_THREAD_WORK = 10_000


@dataclass
class _WindowCall:
    """One window's linear solves at many trials, ready for :func:`kernels.window_trials`: its
    arguments (None: a window beyond the data) and the arrays it writes, ``coef`` and ``chi2``."""
    args: tuple | None
    coef: np.ndarray
    chi2: np.ndarray
    work: int


def _run(call: _WindowCall) -> None:
    kernels.window_trials(*call.args, call.coef, call.chi2)


def solve_windows(threads: int, calls: Sequence[_WindowCall]) -> None:
    """Run the windows' compiled solves ``calls``, on up to ``threads`` threads at once where
    there are two or more and enough work. Each call runs without the GIL on arrays of its own
    (everything else was prepared before, on this thread), so the results are the same numbers
    whatever the threads; the callers add them up in their own order."""
    todo = [c for c in calls if c.args is not None]
    threads = min(threads, len(todo))
    if threads < 2 or sum(c.work for c in todo) < _THREAD_WORK:
        for c in todo:
            _run(c)
        return
    # (the largest first: the threads finish together)
    list(lasting_pool(threads, "xrdpipe-windows").map(_run, sorted(todo, key=lambda c: -c.work)))


def _median(values: list) -> float:
    """``np.median`` of a short list of finite numbers (the same value, without NumPy's overhead
    on a few elements)."""
    s = sorted(float(v) for v in values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2.0


def _polish(value: float, step: float, evaluate, scored, known=None) -> tuple[float, np.ndarray, float, float]:
    """The minimum of a search score near grid point ``value`` (grid ``step``): nine finer
    points over ± one step, then the vertex of the parabola through the best and its
    neighbours, kept if it scores better. Returns (value, trial cell (6,), chi², score).
    ``known``: (values, trial cells, chi²) already evaluated (the grid), taken for the points
    that coincide with them (the grid point itself, and its neighbours one step away) instead
    of evaluating them again."""
    if step <= 0:
        trial, chi2 = evaluate(np.array([value]))
        return value, trial[0], float(chi2[0]), float(scored(trial, chi2)[0])
    values = value + step * np.linspace(-1, 1, 9)
    trial, chi2 = _evaluated(values, evaluate, known)
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


def _evaluated(values: np.ndarray, evaluate, known) -> tuple[np.ndarray, np.ndarray]:
    """``evaluate(values)``, with the values that coincide (to 1e-12 of their magnitude) with
    ``known`` ones (values, trial cells, chi²) taken from those: a trial's chi-square does not
    depend on the other trials evaluated with it."""
    if known is None:
        return evaluate(values)
    grid, trials, chi2s = known
    at = np.clip(np.searchsorted(grid, values), 0, grid.size - 1)
    near = np.stack([np.clip(at - 1, 0, grid.size - 1), at])
    k = near[np.argmin(np.abs(grid[near] - values), axis=0), np.arange(values.size)]
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    same = np.abs(grid[k] - values) <= 1e-12 * scale
    if not same.any():
        return evaluate(values)
    need = np.flatnonzero(~same)
    trial = np.empty((values.size,) + trials.shape[1:])
    chi2 = np.empty(values.size)
    trial[same], chi2[same] = trials[k[same]], chi2s[k[same]]
    if need.size:
        trial[need], chi2[need] = evaluate(values[need])
    return trial, chi2


@dataclass
class FrameResult:
    """One frame's phase-model solution."""

    success: bool
    message: str
    theta: np.ndarray            # (k,) final parameters
    _err: np.ndarray | None      # (k,) esds (NaN where held or at a bound): ``err``
    _cov: np.ndarray | None      # (k, k): ``cov``
    present: np.ndarray          # (P,)
    decision: list[str]          # per phase: how presence was decided
    chi2_window: np.ndarray      # (W,)
    n_window: np.ndarray         # (W,) valid points
    nvary_window: np.ndarray     # (W,) parameters that touch the window
    state: PhaseState
    #: (p, q): in this frame phase p was named by the typed cells where the similar phase q
    #: could have carried its lines (neither seen before), or None; the whole-series naming
    #: check fits the series again with q there (:meth:`~xrdpipe.phasefit.fitter.PhaseFitter.other_naming`)
    named: tuple[int, int] | None = None
    #: followed by the steady path because its misfit is as in the frame last searched
    #: (:func:`~xrdpipe.phasefit.decide._misfit_as_before`), not because it fits to its noise
    as_before: bool = False
    #: the steady path's solution of a frame that would have been followed for its misfit being
    #: as before, had the frames so followed in a row not reached their allowance: the frame is
    #: searched, and the search's solution compared with this one
    #: (:func:`~xrdpipe.phasefit.decide._as_before_allowance`)
    search_due: bool = False
    #: (M,) the model at ``theta`` on the concatenated windows, where the result was made from
    #: it (:func:`~xrdpipe.phasefit.solve._result`), or None
    fitted: np.ndarray | None = None
    #: what computes ``err`` and ``cov`` when first asked for (``_err`` and ``_cov`` None), or
    #: None: :class:`~xrdpipe.phasefit.solve.WindowEsds`, whose numbers only the record and a
    #: few decisions read (in the fitter, the record is made beside the next frame's least squares)
    esds: object | None = None
    #: phases followed from the frame before that ran to the end of their step while a similar
    #: phase was absent (:func:`~xrdpipe.phasefit.decide._track`): the frame is tried again with
    #: them held where they were (:func:`~xrdpipe.phasefit.decide._fit_frame_searched`)
    ran_off: tuple = ()

    @property
    def err(self) -> np.ndarray:
        return self._made()[0]

    @property
    def cov(self) -> np.ndarray:
        return self._made()[1]

    def _made(self) -> tuple[np.ndarray, np.ndarray]:
        if self.esds is not None:
            self._err, self._cov = self.esds.done()
            self.esds = None
        return self._err, self._cov


def _best_basin(grid: np.ndarray, trial: np.ndarray, chi2: np.ndarray, score: np.ndarray, evaluate, scored,
                tracking: bool, unheard: float, best_cell: np.ndarray, best: float) -> tuple[np.ndarray, float]:
    """The cell and chi-square a search round ends at (``best_cell``, ``best`` if it finds no
    basin): at high counts a basin of chi-square is narrower than a grid step, and which basin
    looks best on the grid depends on where its points happen to fall, so the best few local
    minima of ``score`` are each searched finely (:func:`_polish`) before one is chosen; when
    ``tracking``, the first basin is enough (the least squares that follows finds its bottom).
    ``unheard``: the chi-square of the windows the round did not listen to."""
    step = float(np.median(np.diff(grid))) if grid.size > 1 else 0.0
    best_s = np.inf
    basin = False               # an interior minimum of chi-square itself, not only of the score
    for j in _minima(score)[:3]:
        if tracking:
            return trial[j], float(chi2[j]) + unheard
        basin |= 0 < j < grid.size - 1 and chi2[j] < min(chi2[j - 1], chi2[j + 1])
        _, t1, c1, s1 = _polish(grid[j], step, evaluate, scored, (grid, trial, chi2))
        if s1 < best_s:
            best_s, best_cell = s1, t1
            best = c1 + unheard
    # no interior basin of chi-square, only the weak pull to the typed cell on flat chi-square,
    # and an end of the range scoring below it: a basin narrower than a grid step whose bottom
    # lies between the end and its neighbour (a monoclinic a typed 1.2 % off, its line's basin
    # just inside the ±1.5 % range); kept only if the fine search about the end finds a bottom
    # inside the range, not the slope of something beyond it
    for j in (0, grid.size - 1):
        if tracking or basin or grid.size < 3 or not score[j] < best_s:
            continue
        v1, t1, c1, s1 = _polish(grid[j], step, evaluate, scored, (grid, trial, chi2))
        inside = grid[0] <= v1 <= grid[-1]
        if inside and s1 < best_s:
            best_s, best_cell = s1, t1
            best = c1 + unheard
    return best_cell, best


def _minima(score: np.ndarray) -> list[int]:
    """The best few local minima of a search's scores over its grid (at most 8 looked at), an
    interior one preferred: a minimum on the edge of the range is a basin cut by it (its bottom
    is outside, or it is the slope of one). At high counts a basin of chi-square is narrower
    than a grid step, and which basin looks best on the grid depends on where its points happen
    to fall: each is then searched finely before one is chosen."""
    n = score.size
    cands = [j for j in np.argsort(score)[:8] if np.isfinite(score[j])
             and (j == 0 or score[j] <= score[j - 1]) and (j == n - 1 or score[j] <= score[j + 1])]
    return [j for j in cands if 0 < j < n - 1] or cands


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
        self.before_fwhm = state.fwhm.copy()
        #: phases that took the place of a similar one (decide._judge): phase -> (the other,
        #: distance), for the other to start again where it was
        self.took: dict[int, tuple[int, float]] = {}
        self.going_back = False                # the backward pass (fit_frame given centres)
        #: phases followed from the frame before that ran to the end of their step while a
        #: similar phase was absent (decide._track): drawn toward its line, or a jump
        self.ran_off: list[int] = []
        #: a phase named by the nearer typed cell where a similar phase could have taken its
        #: lines: phase -> (the other, their distances in search half-ranges, "typed" or "last":
        #: from which cells, "fit": its search fitted a little better (typed cells), or
        #: "series": the whole-series naming check's other name)
        self.named: dict[int, tuple[int, float, float, str]] = {}
        self._width_guess: dict[int, float] = {}     # width_guess per window (the data's, fixed)
        # track_halves and _width by their arguments and the state they read (the searches ask
        # for the same ones again and again)
        self._halves: dict[tuple, np.ndarray] = {}
        self._widths: dict[tuple, float] = {}

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
        seen = above * self.m.step
        # the lines' own width: what the data show less the instrument's blur, in quadrature
        blur = self.m.blur[w]
        own = np.sqrt(max(seen * seen - blur * blur, 0.25 * seen * seen))
        return float(np.clip(own, 2 * self.m.step, width / 6))

    def fwhm_of(self, p: int, w: int) -> float:
        v = float(self.state.fwhm[p, w])
        if math.isfinite(v) and v > 0:
            return v
        others = [self.state.fwhm[q, w] for q in range(self.m.P) if self.state.present[q] and q != p
                  and np.isfinite(self.state.fwhm[q, w])]
        return _median(others) if others else self.width_guess(w)

    # -- linear solve of areas + background in every window at given nonlinear values ---------
    def linear(self, cells: np.ndarray, phases: Sequence[int], zero: float) -> tuple[np.ndarray, np.ndarray]:
        """Areas and backgrounds (as a full parameter row) at fixed cells (P, 6) for ``phases``;
        returns the row and the chi² of every window."""
        theta = np.zeros(self.m.k)
        self.fill_nonlinear(theta, cells, zero)
        rows, chi2 = self._linear_rows(theta, cells, zero, self.m.of_phases(phases)[None])
        return rows[0], chi2[0]

    def linear_rows(self, cells: np.ndarray, subsets: Sequence[Sequence[int]], zero: float) -> np.ndarray:
        """:meth:`linear` for each phase subset of ``subsets`` at once (a line of a phase not in a
        row's subset an empty column there): the rows (len(subsets), k)."""
        theta = np.zeros(self.m.k)
        self.fill_nonlinear(theta, cells, zero)
        return self._linear_rows(theta, cells, zero, np.array([self.m.of_phases(s) for s in subsets]))[0]

    def _linear_rows(self, theta: np.ndarray, cells: np.ndarray, zero: float, on: np.ndarray):
        """Rows of ``theta`` (its widths, eta, cells and zero) with the areas and backgrounds
        solved in every window, row r with the lines ``on[r]`` (R,); and each row's χ² per
        window. One compiled call (:func:`xrdpipe.kernels.windows_linear`): each window as
        :meth:`_window_solve` solves it, every line's tail allowed."""
        m = self.m
        n_rows = on.shape[0]
        out = np.repeat(theta[None], n_rows, axis=0)
        cen = m.centres(cells[None], np.array([zero]))[0]
        lines = np.flatnonzero(on.any(axis=0))
        lines = lines[np.argsort(m.r_window[lines], kind="stable")]         # window by window
        bounds = np.searchsorted(m.r_window[lines], np.arange(m.W + 1))
        tpow, win_lo, win_hi, nbg = m.linear_layout()
        fw = theta[m.fwhm_col[m.r_phase[lines], m.r_window[lines]]]
        eta = theta[m.eta_col[m.r_phase[lines]]]
        areas, bg, chi2 = np.zeros((n_rows, lines.size)), np.zeros((n_rows, m.bg_cols.size)), np.zeros((n_rows, m.W))
        kernels.windows_linear(m.x_all, m.hw_all, tpow, nbg, self.y0, self.w, win_lo, win_hi, bounds[:-1], bounds[1:],
                               np.ascontiguousarray(np.repeat(cen[lines][None], n_rows, axis=0)),
                               np.ascontiguousarray(fw, dtype=float), np.ascontiguousarray(eta, dtype=float),
                               np.ascontiguousarray(on[:, lines]), float(_TAIL_FWHM), areas, bg, m.bg_lo, chi2)
        out[:, m.area_col[lines]] = areas
        out[:, m.bg_cols] = bg
        return out, chi2

    def _window_solve(self, w: int, refl: np.ndarray, cen: np.ndarray, theta: np.ndarray,
                      tails: np.ndarray | None = None, fw: np.ndarray | None = None,
                      use: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        call = self._window_call(w, refl, cen, theta, tails, fw, use)
        solve_windows(1, [call])
        return call.coef, call.chi2

    def _window_call(self, w: int, refl: np.ndarray, cen: np.ndarray, theta: np.ndarray,
                     tails: np.ndarray | None = None, fw: np.ndarray | None = None,
                     use: np.ndarray | None = None) -> _WindowCall:
        """Areas of ``refl`` (not negative) and background of window ``w`` at trial centres
        ``cen`` (T, len(refl)), and the window's chi² per trial: coefficients (T, len(refl) +
        degree + 1) and (T,), by :func:`xrdpipe.kernels.window_trials`. Widths ``fw``
        (len(refl),) or (T, len(refl)), default the frame's.

        A reflection whose centre lies outside the window, or within half a width of its edge, is
        not fitted there (a line cut by the edge cannot be placed): its column is empty. Where
        ``tails`` (len(refl),) allows it, a line of a phase already placed by its other lines keeps
        its tail within :data:`_TAIL_FWHM` widths of the window (it is in the data). ``use``
        (T, len(refl)): lines fitted in each trial (the others' columns empty).

        :meth:`_window_call` prepares the solve (:class:`_WindowCall`, run by
        :func:`solve_windows`); :meth:`_window_solve` runs it at once."""
        m = self.m
        win = m.windows[w]
        n_trials = cen.shape[0]
        k = refl.size + win.degree + 1
        if not win.x.size:                      # a window beyond the data
            return _WindowCall(None, np.zeros((n_trials, k)), np.zeros(n_trials), 0)
        if fw is None:
            fw = theta[m.fwhm_col[m.r_phase[refl], w]] if refl.size else np.zeros(0)
        fw_in, fw = fw, np.empty(cen.shape)       # (a writable copy: one compiled signature)
        fw[...] = fw_in
        eta = np.ascontiguousarray(theta[m.eta_col[m.r_phase[refl]]] if refl.size else np.zeros(0), dtype=float)
        keep = (cen >= win.x[0] + fw / 2) & (cen <= win.x[-1] - fw / 2)
        if tails is not None and refl.size:
            near = (cen >= win.x[0] - _TAIL_FWHM * fw) & (cen <= win.x[-1] + _TAIL_FWHM * fw)
            keep |= near & tails
        if use is not None:
            keep &= use
        args = (win.x, win.hw, m.bg_columns[w], self.y0[win.points], self.w[win.points],
                np.ascontiguousarray(cen, dtype=float), fw, eta, np.ascontiguousarray(keep))
        return _WindowCall(args, np.zeros((n_trials, k)), np.zeros(n_trials), win.x.size * n_trials * max(refl.size, 1))

    def fill_nonlinear(self, theta: np.ndarray, cells: np.ndarray, zero: float) -> None:
        m = self.m
        theta[m._free_cols] = cells[m._free_at]
        for p, w, col in m._fwhm_slots:
            theta[col] = self.fwhm_of(p, w)
        for p in range(m.P):
            eta = float(self.state.eta[p])
            theta[m.eta_col[p]] = eta if math.isfinite(eta) else 0.5
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
        fixed = {w: np.flatnonzero(m.of_phases(others) & (m.r_window == w)) for w in windows}
        best_cell, best = centre.copy(), np.inf
        # a phase looked for beside others (not followed from the frame before): with their
        # widths and its own scaled together
        factors = np.array(_WIDTH_FACTORS_SEARCH if others and halves is None else (1.0,))
        # half-width steps over the range, parameter by parameter, twice (the first round
        # listening only to the windows placed by the parameters searched so far), then
        # fifth-width steps around the best
        def schedule_of(order: tuple) -> list:
            return ([(n, 0.5, None, True) for n in order] + [(n, 0.5, None, False) for n in order]
                    + [(n, 0.2, 1.5, False) for n in order])

        order = m.search_order[p]
        schedule = schedule_of(order)
        free = [_CELL_INDEX[n] for n in m.free[p]]

        heard_some: list[bool] = []          # (the first round heard some lines only)

        def one_round(step: tuple, best_cell: np.ndarray, best: float, coarse: dict, known: set,
                      others_too: bool = False) -> tuple[np.ndarray, float, list]:
            """A round of the schedule from ``best_cell``; with ``others_too``, also the other
            basins of its grid (polished: (cell, chi-square)) where it listened to some lines
            only (and then ``heard_some`` says so)."""
            name, frac, around_best, first = step
            i = _CELL_INDEX[name]
            known.add(i)
            use, lines = self._round_windows(p, windows, known, i) if first else (windows, None)
            span = m.box[p, i] * scale if halves is None else halves[i]
            # (some lines heard, each a narrow basin wherever it sits on a line of the data:
            # quarter-width steps)
            grid = self._round_grid(p, name, theta, centre[i], best_cell[i], span, frac if lines is None else frac / 2,
                                    around_best, coarse, use)

            def evaluate(values: np.ndarray, base=best_cell, i=i, use=use, lines=lines) -> tuple[np.ndarray, np.ndarray]:
                trial = m.trial_cells(p, base, i, values)
                return trial, self._trial_chi2(p, trial, use, fixed, cen_all, theta, factors, per_w, lines)

            per_w: dict[int, np.ndarray] = {}
            trial, chi2 = evaluate(grid)
            explained = self._explained(p, i, use, per_w, chi2_w)

            def scored(trial: np.ndarray, chi2: np.ndarray) -> np.ndarray:
                rel = (trial[:, free] - prior_at[free]) / m.box[p, free]
                prior = _PRIOR * explained * np.sum(rel ** 2, axis=1)
                # the order is kept in the parameter searched now (the others' start values may
                # not keep it yet: P3's configured a above the O3 a tracked so far)
                return np.where(self._ordered(p, trial, others, theta, only=i), chi2 + prior, np.inf)

            score = scored(trial, chi2)
            unheard = float(chi2_w[[w for w in windows if w not in use]].sum())
            cell, chi2_best = _best_basin(grid, trial, chi2, score, evaluate, scored, halves is not None, unheard,
                                          best_cell, best)
            extra = []
            if others_too and lines is not None and halves is None:
                heard_some.append(True)
                step_size = float(np.median(np.diff(grid))) if grid.size > 1 else 0.0
                for j in _minima(score)[:3]:
                    _, t1, c1, _ = _polish(grid[j], step_size, evaluate, scored, (grid, trial, chi2))
                    if abs(t1[i] - cell[i]) > step_size:
                        extra.append((t1, c1 + unheard))
            return cell, chi2_best, extra

        def rounds(steps: list, best_cell: np.ndarray, best: float, coarse: dict, known: set) -> tuple[np.ndarray, float]:
            for step in steps:
                best_cell, best, _ = one_round(step, best_cell, best, coarse, known)
            return best_cell, best

        coarse: dict[str, float] = {}
        known: set[int] = set()
        best_cell, best, extra = one_round(schedule[0], best_cell, best, coarse, known, others_too=True)
        # a first round that heard only some of the phase's lines (no window whose lines the
        # first parameter alone places: an orthorhombic a heard through the h00 lines, the others
        # left out) has a basin wherever such a line sits on another line of the data: the best
        # two others are followed through the rest of the schedule too, and the best end kept
        # (LiFePO4 typed 0.5-1.2 % off in a, b and c: the a of the wrong basin, 1.5 % low, held)
        ends = [rounds(schedule[1:], best_cell, best, dict(coarse), set(known))]
        for cell, chi2_alt in extra[:2]:
            ends.append(rounds(schedule[1:], cell, chi2_alt, dict(coarse), set(known)))
        if heard_some:
            # ... and the whole schedule again with each of the next parameters first (up to
            # _FIRST_ORDERS orders in all): the first parameter's lines heard alone may have no
            # basin at all where the phase is (LiFePO4's h00 lines, weak in a frame of Gaussian
            # lines 0.08° wide: one basin, 1.4 % low in a, and b and c then placed to suit it)
            for k in range(1, min(len(order), _FIRST_ORDERS)):
                again = schedule_of(order[k:] + order[:k])
                coarse_k: dict[str, float] = {}
                known_k: set[int] = set()
                cell, chi2_k, _ = one_round(again[0], centre.copy(), np.inf, coarse_k, known_k)
                ends.append(rounds(again[1:], cell, chi2_k, coarse_k, known_k))
        best_cell, best = min(ends, key=lambda e: e[1])
        return best_cell, best + rest, chi2_without

    def _explained(self, p: int, i: int, use: Sequence[int], per_w: dict, chi2_w: np.ndarray) -> float:
        """How much of the chi-square phase ``p`` explains at best over a search round's grid in
        the windows whose lines parameter ``i`` moves: the weight of the weak pull to the phase's
        last cell (the configured one until it is seen), so that where two cells explain the
        lines equally (another reflection of the same phase on the line, areas being free) the
        nearer one names them."""
        m = self.m
        moved = [w for w in use if m.r_dep[m._refl_of[p][w], i].any()] or list(use)
        in_moved = np.sum([per_w[w] for w in moved], axis=0)
        return max(float(chi2_w[moved].sum()) - float(np.min(in_moved)), 0.0)

    def _round_windows(self, p: int, windows: Sequence[int], known: set[int],
                       i: int) -> tuple[list[int], dict[int, np.ndarray] | None]:
        """The windows a first round of a search (of parameter ``i``) listens to: those whose
        reflections of ``p`` depend on nothing but the parameters searched so far (``known``;
        the 00l lines for c): a strong line placed by a parameter not yet searched must not pull
        this one astray. Where none of those has a line that ``i`` moves (a monoclinic a after c:
        every window with a line of a (200) has one of β too (-201)), or there is none of those
        (an orthorhombic a first: every window mixes its h00 with hkl lines), the windows with such a
        line, each with only its lines that depend on nothing else unknown (the others left out
        of the round's model, their data unexplained alike at every trial): the second
        parameter's round otherwise listened to the 00l window alone, moved nothing, and β was
        searched with a still 1 % off. Returns the windows and, in that case, the lines of ``p``
        each keeps (else None: all)."""
        m = self.m
        unknown = [_CELL_INDEX[n] for n in m.free[p] if _CELL_INDEX[n] not in known]
        pure = [w for w in windows if not m.r_dep[np.ix_(m._refl_of[p][w], unknown)].any()]
        if pure and any(m.r_dep[m._refl_of[p][w], i].any() for w in pure):
            return pure, None
        lines = {}
        for w in windows:
            mine = m._refl_of[p][w]
            mine = mine[~m.r_dep[np.ix_(mine, unknown)].any(axis=1)]
            if m.r_dep[mine, i].any():
                lines[w] = mine
        if not lines:
            return pure or list(windows), None
        return list(lines), lines

    def _round_grid(self, p: int, name: str, theta: np.ndarray, centre: float, best: float, span: float,
                    frac: float, around_best: float | None, coarse: dict[str, float], use: Sequence[int]) -> np.ndarray:
        """The trial values of one round of a search: steps of ``frac`` of a line width over
        ``centre ± span`` (the coarse rounds; their step is kept in ``coarse``), or around the
        best so far (the fine round), kept within the range searched (a phase is not found
        outside it)."""
        if around_best is None:
            grid, coarse[name] = self._grid(p, name, theta, centre, span, frac, use)
            return grid
        grid, _ = self._grid(p, name, theta, best, around_best * coarse[name], frac, use)
        return np.unique(np.clip(grid, centre - span, centre + span))

    def _trial_chi2(self, p: int, trial: np.ndarray, use: Sequence[int], fixed: dict, cen_all: np.ndarray,
                    theta: np.ndarray, factors: np.ndarray, per_w: dict,
                    lines: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """χ² over the windows ``use`` of each trial cell of phase ``p`` (the lines of the phases
        ``fixed`` per window held at ``cen_all``), each trial at the width factor that suits it
        best (a two-phase region broadens the lines in this frame); ``per_w`` gets each window's
        share. ``lines``: per window the lines of ``p`` modelled (None: all)."""
        m, zero = self.m, self.state.zero
        n = trial.shape[0]
        chi2 = np.zeros((factors.size, n))
        per_w.clear()

        def call(w: int) -> _WindowCall:
            mine = m._refl_of[p][w] if lines is None else lines[w]
            cen_p = m.positions(m.r_hkl[mine], trial[:, None, :], zero)                 # (T, n_mine)
            cen_f = np.broadcast_to(cen_all[fixed[w]], (n, fixed[w].size))
            refl = np.concatenate([mine, fixed[w]])
            tails = np.concatenate([np.zeros(mine.size, bool), np.ones(fixed[w].size, bool)])
            cen = np.concatenate([cen_p, cen_f], axis=1)
            fw0 = theta[m.fwhm_col[m.r_phase[refl], w]] if refl.size else np.zeros(0)
            # every width factor's trials in one compiled call (rows: factor-major)
            fw = np.broadcast_to(factors[:, None, None] * fw0, (factors.size,) + cen.shape)
            return self._window_call(w, refl, np.tile(cen, (factors.size, 1)), theta, tails,
                                     fw.reshape(factors.size * n, refl.size))

        calls = [call(w) for w in use]
        solve_windows(m.threads, calls)
        for w, c in zip(use, calls):
            c2 = c.chi2.reshape(factors.size, n)
            chi2 += c2
            per_w[w] = c2
        k = np.argmin(chi2, axis=0)
        for w in per_w:
            per_w[w] = per_w[w][k, np.arange(n)]
        return chi2[k, np.arange(n)]

    def track_halves(self, p: int, limit: float) -> np.ndarray:
        """(6,) how far each cell parameter of a tracked phase may move in one frame: ``limit``
        FWHM at its most sensitive line in a window with data, at most its tracking share of
        the search range (a larger move is a jump: the phase is searched for afresh)."""
        st = self.state
        key = (p, limit, st.cell[p].tobytes(), st.fwhm.tobytes(), st.present.tobytes())
        got = self._halves.get(key)
        if got is None:
            got = self._halves[key] = self._track_halves(p, limit)
        return got.copy()

    def _track_halves(self, p: int, limit: float) -> np.ndarray:
        m = self.m
        out = m.box[p] * _STEP
        ratios = m.shift_per_width(p, self.state.cell[p], lambda w: self.fwhm_of(p, w))
        for k, i in zip(range(ratios.size), (_CELL_INDEX[n] for n in m.free[p])):
            if ratios[k] > 0:
                out[i] = min(out[i], limit / ratios[k])
        return out

    def pair_search(self, p: int, q: int, j: int, present: Sequence[int], widths: np.ndarray,
                    tracked: bool = False, pure: bool = False, check: bool = False) -> bool | None:
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
        two may be nearly equal).

        With ``check``, nothing is updated: returns whether the best of the coarse grid lies
        within one coarse step of the state's cells for both phases (no other split of the lines
        to be found there)."""
        m = self.m
        others = [r for r in present if r not in (p, q)]
        zero = self.state.zero
        theta = np.zeros(m.k)
        self.fill_nonlinear(theta, self.state.cell, zero)
        cen_all = m.centres(self.state.cell[None], np.array([zero]))[0]
        name = _CELL_NAME[j]
        windows = [w for w in range(m.W) if m._refl_of[p][w].size and m._refl_of[q][w].size]
        if not windows or name not in m.free[p] or name not in m.free[q]:
            return True if check else None
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
        if check:
            return bool(cands) and all(abs(v - c) <= 1.0001 * step for v, c, step in zip(cands[0][:2], start, steps))
        if not cands:
            return
        vp, vq, s, _ = self._pair_polish(p, q, j, name, cands, steps, halves, windows, others, widths, theta,
                                         cen_all, sign, start, weight, pure)
        self.state.cell[p] = m.trial_cells(p, self.state.cell[p], j, np.array([vp]))[0]
        self.state.cell[q] = m.trial_cells(q, self.state.cell[q], j, np.array([vq]))[0]
        for r in (p, q):
            self.state.fwhm[r, windows] = s * widths[r, windows]

    def _pair_polish(self, p: int, q: int, j: int, name: str, cands: list, steps: list, halves: list,
                     windows: list[int], others: list[int], widths: np.ndarray, theta: np.ndarray, cen_all: np.ndarray,
                     sign: int, start: np.ndarray, weight, pure: bool) -> tuple:
        """The best of a joint search's coarse candidates ``cands`` (the pair's values, width
        factor, score), each searched finely (see :meth:`pair_search`)."""
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
        return best

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
        name = _CELL_NAME[j]
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

        def call(w: int) -> _WindowCall:
            cens, refl = [], []
            for r in (p, q):
                mine = m._refl_of[r][w]
                hkl = m.r_hkl[mine]
                cens.append(m.positions(hkl, trials[r][:, None, :], zero))
                refl.append(mine)
            fixed = np.flatnonzero(m.of_phases(others) & (m.r_window == w))
            cens.append(np.broadcast_to(cen_all[fixed], (sel.size, fixed.size)))
            pair = np.concatenate(refl)
            refl = np.concatenate(refl + [fixed])
            fw = np.concatenate([np.outer(gs[sel], widths[m.r_phase[pair], w]),
                                 np.broadcast_to(theta[m.fwhm_col[m.r_phase[fixed], w]], (sel.size, fixed.size))], axis=1)
            tails = np.ones(refl.size, bool)
            return self._window_call(w, refl, np.concatenate(cens, axis=1), theta, tails, fw)

        calls = [call(w) for w in windows]
        solve_windows(m.threads, calls)
        for c in calls:
            part += c.chi2
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
        key = (p, name, tuple(windows), self.state.cell[p].tobytes(), theta[m.fwhm_col[p]].tobytes())
        got = self._widths.get(key)
        if got is None:
            got = self._widths[key] = self._width_of(p, name, theta, windows)
        return got

    def _width_of(self, p: int, name: str, theta: np.ndarray, windows: Sequence[int]) -> float:
        m = self.m
        i = _CELL_INDEX[name]
        chosen = np.zeros(m.W, bool)
        chosen[list(windows)] = True
        rows = np.flatnonzero((m.r_phase == p) & chosen[m.r_window])
        cell = self.state.cell[p] if np.all(np.isfinite(self.state.cell[p])) else m.cell0[p]
        shift = m.shift_per_unit(p, cell, i, m.r_hkl[rows])
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
        least half a line width away from it, on either side. Two phases both tracked keep their
        order and that distance too."""
        m = self.m
        ok = np.ones(trial.shape[0], bool)
        for a, b, j, _ in m.order:
            if a != p or b not in present or (only is not None and j != only):
                continue
            windows = m.pure_windows.get((p, b, j))
            gap = 0.0
            if windows and self.tracked[b]:
                name = _CELL_NAME[j]
                gap = 0.5 * self._width(b, name, theta, windows)
            if gap and not self.tracked[p]:
                ok &= np.abs(trial[:, j] - self.state.cell[b, j]) >= gap
                continue
            ok &= np.sign(trial[:, j] - self.state.cell[b, j]) == self.sign(p, b, j)
            # both tracked: p's lines may not move onto b's either, within a width of them
            # (where p's own line fades at the end of a coexistence, the nearest line is the
            # other phase's: no label swap)
            ok &= np.abs(trial[:, j] - self.state.cell[b, j]) >= 2 * gap
        return ok
