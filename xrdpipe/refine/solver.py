"""Refining a pattern: :class:`Refiner` (one model on one 2θ grid, frame after frame, from the
previous result or from a cell search), :func:`refine_pattern`, and the staged strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import RefinementError
from .absence import find_absent, find_needed, phase_params, put_back
from .calculator import Calculator
from .least_squares import minimise, pawley_solve
from .lebail import lebail_start
from .model import RefinementModel, RefinementResult
from .results import make_result
from .search import cell_bounds, cell_idx, initial_guess, search_cells

STAGE_ITER = 12               # least-squares steps of each stage but the last (staged strategy)
GOF_RISE = 1.5                # a frame whose GOF rose by more than this since the previous one is also restarted
WEAK_SHARE = 0.1              # a phase with less of the previous frame's intensity is not judged absent before refining
TREND_ESD = 2.0              # a cell's change in the frame before, when above this x its esd, is extrapolated
GOF_RETEST = 1.1              # a frame this much worse (GOF) than the one before tests its absent phases again


def refine_pattern(model: RefinementModel, tth: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None, *,
                   start: RefinementResult | None = None, tol: float = 1e-7) -> RefinementResult:
    """Refine ``model`` against one pattern (2θ in degrees, intensities, esds; NaN points are
    left out). ``start``: a previous result of the same model (sequential refinement) whose
    values (and Le Bail intensities) are the starting point. To refine many patterns on one
    grid, make a :class:`Refiner` once instead."""
    tth, y = np.asarray(tth, float), np.asarray(y, float)
    for name, v in (("y", y), ("sigma", sigma)):
        if v is not None and np.shape(v) != tth.shape:
            raise RefinementError(f"refine_pattern: {name} has shape {np.shape(v)}, expected that of tth {tth.shape}")
    keep = np.isfinite(tth)
    sig = None if sigma is None else np.asarray(sigma, float)[keep]
    return Refiner(model, tth[keep]).refine(y[keep], sig, start=start, tol=tol)


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, inspected once (``threadpool_limits``
    inspects them again at every call: a few ms, as long as a tracked frame's refinement)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class Refiner:
    """A :class:`RefinementModel` set up on one 2θ grid (reflection lists, background basis),
    to refine pattern after pattern on it."""

    def __init__(self, model: RefinementModel, tth: np.ndarray):
        tth = np.asarray(tth, float)
        if tth.size < 20:
            raise RefinementError(f"only {tth.size} points in the refined range; 20 at least are needed")
        self.model = model
        self.calc = Calculator(model, tth)

    def refine(self, y: np.ndarray, sigma: np.ndarray | None = None, *, start: RefinementResult | None = None,
               tol: float = 1e-7, gof_limit: float | None = None, restart: bool = True) -> RefinementResult:
        """Refine against ``y`` (on the grid; NaN points and points without a positive esd get
        no weight).

        From ``start`` (a previous result, e.g. the last frame) all parameters are refined at
        once. Where that result is not ``ok`` (or its GOF exceeds ``gof_limit``), and always
        without ``start``, the pattern is refined again (staged, see :class:`RefinementModel`)
        from the better of the configured cells and a cell search around them (``search``;
        compared by a linear fit), and the better result (``ok`` first, then the lowest Rwp)
        is returned; :attr:`~RefinementResult.start_from` says which start won (``previous``,
        ``configured`` or ``searched``). ``restart=False``: only the first attempt.
        """
        n = self.calc.x.size
        for name, v in (("y", y), ("sigma", sigma)):
            if v is not None and np.shape(v) != (n,):
                raise RefinementError(f"{name} has shape {np.shape(v)}; the refiner's 2θ grid has {n} points")
        # small dense matrices: BLAS threads only contend with each other (and with other processes)
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._refine(y, sigma, start=start, tol=tol, gof_limit=gof_limit, restart=restart)

    @property
    def names(self) -> list[str]:
        return list(self.calc.layout.names)

    def _refine(self, y, sigma, *, start, tol, gof_limit, restart) -> RefinementResult:
        calc = self.calc
        model = self.model
        y = np.asarray(y, float)
        staged = model.strategy == "staged"

        def good(r: RefinementResult) -> bool:
            # flagged is good enough where the previous frame was flagged too (no restart every frame)
            fine = r.ok or (r.status == "flagged" and start is not None and start.status == "flagged")
            # a GOF that rose notably since the previous frame is worth a second start
            rose = start is not None and np.isfinite(start.gof) and start.gof > 0 and r.gof > GOF_RISE * start.gof
            return fine and not rose and (gof_limit is None or r.gof <= gof_limit)

        tried: list[RefinementResult] = []
        if start is not None and start.theta is not None:
            # Le Bail with several phases: from the previous cells with the intensities extracted
            # afresh (phase fractions change from frame to frame), then with the previous
            # intensities held while the cells move (a cell that jumped by peak widths)
            variants = [True, False] if (calc.any_extracted and not calc.pawley and len(model.phases) > 1
                                         and start.lebail_I is not None) else [False]
            for fresh in variants:
                r = _refine(calc, y, sigma, start, tol, fresh=fresh)
                r.start_from = "previous"
                # (Le Bail only: in Pawley, whose intensities are solved at every step, it
                # brought a restart at frame 44 of the 80-frame O3/P3/Al series, sign +1)
                if (calc.any_extracted and not calc.pawley and set(r.absent) == set(start.absent)
                        and len(start.theta) == len(r.theta)):
                    r.cell_trend = np.where(calc.is_cell, r.theta - start.theta, 0.0)
                if good(r) or not restart:
                    return r
                tried.append(r)
        if not model.search:
            r = _refine(calc, y, sigma, None, tol, staged=staged)
            r.start_from = "configured"
        else:
            r = self._searched(y, sigma, start=start, tol=tol, good=good, tried=tried)
        tried.append(r)
        return _best(tried, gof_limit)

    def _searched(self, y, sigma, *, start, tol, good, tried: list) -> RefinementResult:
        """A refinement from the cell search, which compares the configured cells with its own
        best trials (linear fits), around the previous frame's cells where there is one; a
        failed result that only followed some phases is kept in ``tried`` and the search run
        again with those phases held."""
        calc, model = self.calc, self.model
        staged = model.strategy == "staged"
        centre, followed = None, []
        if start is not None and start.theta is not None:
            # around the previous frame's cells (the configured ones for phases it lacked)
            centre = calc.layout.start()
            gone = set(start.absent)
            for p, ph in enumerate(model.phases):
                if ph.name not in gone:
                    followed.append(p)
                    for i in cell_idx(calc, p, angles=True):
                        centre[i] = start.theta[i]
        theta0, I0, source = search_cells(calc, y, sigma, centre, followed)
        r = _refine(calc, y, sigma, None, tol, staged=staged, theta0=theta0, I0=I0, centre=centre,
                    followed=followed)
        r.start_from = source
        if followed and len(followed) < len(model.phases) and not good(r):
            # the phases followed held at their previous cells, the others searched: the
            # grid may put a weak followed phase (Al) on a new phase's lines, where its cell
            # then stays (a frame where P3 appears: Al 0.01 Å off, GOF 2.96 against 1.33)
            tried.append(r)
            theta0, I0, _ = search_cells(calc, y, sigma, centre, followed, hold=followed)
            r = _refine(calc, y, sigma, None, tol, staged=staged, theta0=theta0, I0=I0, centre=centre,
                        followed=followed)
            r.start_from = "previous"
        return r


def _best(tried: list[RefinementResult], gof_limit: float | None) -> RefinementResult:
    rank = {"ok": 0, "flagged": 1, "failed": 2}

    def key(r: RefinementResult):
        over = gof_limit is not None and not r.gof <= gof_limit
        return (rank[r.status] + (2 if over else 0), r.rwp if np.isfinite(r.rwp) else np.inf)

    return min(tried, key=key)


def _stages(calc, free: np.ndarray) -> list[np.ndarray]:
    """The staged release of ``free``: background and scales; + cells and zero; + the main
    widths (W, Y); + the other widths (U, V, X); + everything else (asymmetry, structure)."""
    L = calc.layout
    groups = [
        lambda q: q.kind in ("bkg", "scale"),
        lambda q: q.kind in ("cell", "zero", "disp"),
        lambda q: q.kind == "profile" and q.key in ("W", "Y"),
        lambda q: q.kind == "profile",
        lambda q: True,
    ]
    stages: list[np.ndarray] = []
    acc: set[int] = set()
    for test in groups:
        acc |= {int(i) for i in free if test(L.params[i])}
        if acc and (not stages or len(acc) > stages[-1].size):
            stages.append(np.array(sorted(acc), int))
    return stages or [free]


@dataclass
class _Problem:
    """One pattern being refined: the calculator, the weighted data and what every step shares."""

    calc: Calculator
    y: np.ndarray                 # the observed pattern, 0 where not valid
    wt: np.ndarray                # 1/σ, 0 where not valid
    valid: np.ndarray
    n_valid: int
    tol: float
    follow: bool                  # started from the previous frame's result
    bounds: tuple[np.ndarray, np.ndarray] | None = None

    def minimise(self, theta, I, cols, *, max_iter: int, hold: bool, absent: Sequence[int]):
        return minimise(self.calc, self.y, self.wt, theta, I, cols, max_iter=max_iter, tol=self.tol, hold=hold,
                        n_valid=self.n_valid, bounds=self.bounds, absent=absent, follow=self.follow)

    def put_back(self, theta, I, free, absent, back, I_back, *, cycles: int):
        return put_back(self.calc, self.y, self.wt, theta, I, free, absent, back, I_back, cycles=cycles,
                        tol=self.tol, n_valid=self.n_valid, bounds=self.bounds, follow=self.follow)

    def result(self, theta, I, free, n_iter, converged, absent) -> RefinementResult:
        return make_result(self.calc, self.y, self.wt, self.valid, theta, I, free, n_iter, converged, absent,
                           self.bounds)


def _refine(calc: Calculator, y: np.ndarray, sigma, start, tol, *, staged: bool = False,
            theta0: np.ndarray | None = None, I0: np.ndarray | None = None,
            centre: np.ndarray | None = None, followed: Sequence[int] = (),
            fresh: bool = False) -> RefinementResult:
    """Refine one pattern from ``start`` (the previous frame's result), from ``theta0``/``I0``
    (a cell search's) or from the model's start values, staged or direct; then phases held
    absent, found absent, or pinned at the edge of their range are settled."""
    model, L = calc.model, calc.layout
    from_previous = start is not None and start.theta is not None and len(start.theta) == len(L.start())
    pb = _weighted(calc, y, sigma, tol, from_previous)
    theta, I = _start_values(pb, start, theta0, I0, fresh)
    # bounds: the cells within their searched range around the start (the configured cell, or
    # the previous frame's)
    if from_previous:
        pb.bounds = cell_bounds(calc, start.theta, [p for p, ph in enumerate(model.phases)
                                                     if ph.name not in start.absent])
    else:
        pb.bounds = cell_bounds(calc, centre, followed)
    theta = np.clip(theta, *pb.bounds)
    if calc.pawley:                          # intensities and background solved at the start cells
        gone0 = [p for p, ph in enumerate(model.phases) if from_previous and ph.name in start.absent]
        _, I, theta, _ = pawley_solve(calc, theta, pb.y, pb.wt, [p for p in range(len(model.phases)) if p not in gone0])
    elif calc.any_extracted and I is None:
        I = lebail_start(calc, theta, pb.y)
    free, absent, retest, I_start = _held_absent(pb, theta, I, start)
    hold = calc.any_extracted and not calc.pawley and from_previous and I is not None \
        and start.lebail_I is not None and not fresh
    theta, I, free, absent, converged, n_iter = _converge(pb, theta, I, free, absent, retest, I_start,
                                                          staged=staged, hold=hold)
    res = pb.result(theta, I, free, n_iter, converged, absent)
    if (model.method in ("lebail", "pawley") and not calc.pawley and from_previous and absent
            and math.isfinite(start.gof) and res.gof > GOF_RETEST * start.gof):
        res, theta, I, absent, free = _retest_absent(pb, res, theta, I, free, absent, n_iter)
    return _without_pinned(pb, res, theta, I, free, absent, n_iter)


def _weighted(calc: Calculator, y: np.ndarray, sigma, tol: float, follow: bool) -> _Problem:
    """The pattern and its weights (σ from counting statistics when not given); NaN points and
    those without a positive σ are left out (``calc.valid``)."""
    sig = np.sqrt(np.maximum(np.nan_to_num(y), 1.0)) if sigma is None else np.asarray(sigma, float)
    valid = np.isfinite(y) & np.isfinite(sig) & (sig > 0)
    n_valid = int(valid.sum())
    if n_valid < 20:
        raise RefinementError(f"only {n_valid} usable points in the refined range")
    calc.valid = valid
    return _Problem(calc, np.where(valid, y, 0.0), np.where(valid, 1.0 / np.where(valid, sig, 1.0), 0.0), valid,
                    n_valid, tol, follow)


def _start_values(pb: _Problem, start, theta0, I0, fresh: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The start vector and Le Bail intensities: the previous frame's (its cells moved on by
    their trend), a cell search's, or the model's own refined linearly first."""
    calc = pb.calc
    theta = calc.layout.start()
    lebail = calc.any_extracted
    all_lebail = calc.model.method in ("lebail", "pawley")
    I = None
    if pb.follow:
        theta = start.theta.copy()
        trend = start.cell_trend
        if trend is not None and trend.shape == theta.shape and start.start_from == "previous" and start.ok:
            # the cells moved on by their change in the frame before (linear extrapolation; a
            # cell that keeps moving started one frame's change off costs the alternation of
            # extraction and least squares 7-10 steps instead of 2-3), where that change was
            # larger than TREND_ESD esds (a weak phase's cell only scatters)
            moved = np.abs(trend) > TREND_ESD * np.where(np.isfinite(start.esds), start.esds, np.inf)
            theta = theta + np.where(moved, trend, 0.0)
        if lebail and start.lebail_I is not None and start.lebail_I.size == int(calc.offsets[-1]):
            I = start.lebail_I.copy()
            if fresh:                        # the previous cells, intensities extracted afresh
                I = lebail_start(calc, theta, pb.y)
            for p, ph in enumerate(calc.model.phases):     # absent in the previous frame: held absent
                if ph.name in start.absent:
                    I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    elif theta0 is not None:
        theta = theta0.copy()
        if lebail and I0 is not None:
            I = I0.copy()
        if not all_lebail:
            theta = initial_guess(calc, theta, pb.y[pb.valid], all_lebail, background=False)
    else:
        theta = initial_guess(calc, theta, pb.y[pb.valid], all_lebail)
    return theta, I


def _held_absent(pb: _Problem, theta, I, start):
    """Le Bail / Pawley with several phases: a phase with (next to) no intensity at the start is
    absent, its cell and widths held and its intensities 0 (``I`` is changed in place). Returns
    the free columns, the absent phases, those to test again after convergence, and the
    intensities before any was zeroed."""
    calc = pb.calc
    n_ph = len(calc.model.phases)
    free = calc.layout.free.copy()
    if calc.model.method not in ("lebail", "pawley") or n_ph <= 1:
        return free, [], [], None
    empty = [p for p in range(n_ph) if not np.any(I[int(calc.offsets[p]):int(calc.offsets[p + 1])] > 0)]
    # from a frame with one phase left, the others stay absent (no test needed)
    absent = empty if pb.follow and len(empty) >= n_ph - 1 else find_absent(calc, theta, I, pb.y, pb.wt)
    if pb.follow and not calc.pawley and start.lebail_I is not None:
        # a weak phase of the previous frame (the Al current collector) stays: judged before
        # the widths and cells are refined, it looked absent in most frames and was refined
        # back in after (a second refinement); one that is gone is found after convergence
        # (Pawley refines no phase back in: tested here as before)
        weak = calc.shares(start.theta, start.lebail_I) < WEAK_SHARE
        absent = [p for p in absent if p in empty or not weak[p]]
    # judged before the widths and cells are refined, when χ² is mostly their misfit: a weak
    # phase with narrow lines (the Al current collector) may look absent; tested again below
    retest = [p for p in absent if p not in empty]
    I_start = I.copy()
    if not absent or len(absent) >= n_ph:
        return free, [], retest, I_start
    free = _without_phases(calc, free, absent)
    for p in absent:                         # no intensity: they take none from the others' peaks
        I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    return free, absent, retest, I_start


def _without_phases(calc, free: np.ndarray, phases) -> np.ndarray:
    """``free`` without the parameters of ``phases`` (cell, widths: held)."""
    held = {i for p in phases for i in phase_params(calc, p)}
    return np.array([i for i in free if int(i) not in held], int)


def _converge(pb: _Problem, theta, I, free, absent, retest, I_start, *, staged: bool, hold: bool):
    """Least squares stage after stage; then the phases held absent at the start that the
    converged fit needs are refined back in, and those it does not need are removed."""
    calc, model = pb.calc, pb.calc.model
    all_lebail = model.method in ("lebail", "pawley")
    stages = _stages(calc, free) if staged else [free]
    n_iter = 0
    converged = False
    for k, cols in enumerate(stages):
        last = k == len(stages) - 1
        theta, I, converged, it = pb.minimise(theta, I, cols, max_iter=model.max_iter if last else STAGE_ITER,
                                              hold=hold and k == 0, absent=absent)
        n_iter += it
    # phases found absent at the start that the converged fit does need: refined again with them
    if all_lebail and not calc.pawley and absent and retest:
        back = find_needed(calc, theta, I, I_start, pb.y, pb.wt, [p for p in retest if p in absent])
        if back:
            theta, I, free, absent, converged, it = pb.put_back(theta, I, free, absent, back, I_start, cycles=5)
            n_iter += it
    # phases the converged fit does not need: removed, and the last stage refined again without them
    if all_lebail and len(model.phases) > 1:
        gone = [p for p in find_absent(calc, theta, I, pb.y, pb.wt) if p not in absent]
        if gone and len(gone) + len(absent) < len(model.phases):
            free = _without_phases(calc, free, gone)
            for p in gone:
                I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
            absent = sorted(absent + gone)
            theta, I, converged, it = pb.minimise(theta, I, free, max_iter=model.max_iter, hold=False, absent=absent)
            n_iter += it
    return theta, I, free, absent, converged, n_iter


def _retest_absent(pb: _Problem, res, theta, I, free, absent, n_iter):
    """A frame that fits clearly worse than the one before while a phase is held absent: that
    phase is refined back in (its intensities extracted afresh, its cell and widths free) and
    kept if the fit then needs it as a present phase is needed (a weak phase, the Al current
    collector, judged absent from a poor start would otherwise never return)."""
    calc = pb.calc
    t2, I2, free2, _, conv2, it = pb.put_back(theta, I, free, absent, absent, lebail_start(calc, theta, pb.y),
                                              cycles=0)
    back = [p for p in absent if p not in find_absent(calc, t2, I2, pb.y, pb.wt)]
    if back:
        still = [p for p in absent if p not in back]
        for p in still:
            I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
        free3 = _without_phases(calc, free2, still)
        alt = pb.result(t2, I2, free3, n_iter + it, conv2, still)
        if alt.rwp < res.rwp:
            return alt, t2, I2, still, free3
    return res, theta, I, absent, free


def _without_pinned(pb: _Problem, res, theta, I, free, absent, n_iter) -> RefinementResult:
    """A Le Bail phase pinned at the edge of its searched range may be a ghost taking another's
    misfit: refined again without it, the better verdict kept."""
    calc, L = pb.calc, pb.calc.layout
    pinned = sorted({L.params[L.index[nm]].phase for nm in res.at_bound if L.params[L.index[nm]].kind == "cell"}
                    - set(absent))
    if not (calc.model.method in ("lebail", "pawley") and pinned and len(pinned) + len(absent) < len(calc.model.phases)
            and res.status != "ok"):
        return res
    free2 = _without_phases(calc, free, pinned)
    I2 = I.copy()
    for p in pinned:
        I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    t2 = theta.copy()
    for p in pinned:
        t2[cell_idx(calc, p)] = np.clip(L.start(), *pb.bounds)[cell_idx(calc, p)]
    gone = sorted(absent + pinned)
    t2, I2, conv2, it = pb.minimise(t2, I2, free2, max_iter=calc.model.max_iter, hold=False, absent=gone)
    alt = pb.result(t2, I2, free2, n_iter + it, conv2, gone)
    return _best([res, alt], None)
