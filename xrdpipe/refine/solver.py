"""Refining a pattern: :class:`Refiner` (one model on one 2θ grid, frame after frame, from the
previous result or from a cell search), :func:`refine_pattern`, and the staged strategy.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..errors import RefinementError
from .absence import find_absent, find_needed, phase_params, put_back, shares
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
    tth = np.asarray(tth, float)
    keep = np.isfinite(tth)
    sig = None if sigma is None else np.asarray(sigma, float)[keep]
    return Refiner(model, tth[keep]).refine(np.asarray(y, float)[keep], sig, start=start, tol=tol)


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
            # the search compares the configured cells with its own best trials (linear fits)
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
        tried.append(r)
        return _best(tried, gof_limit)


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


def _refine(calc: "Calculator", y: np.ndarray, sigma, start, tol, *, staged: bool = False,
            theta0: np.ndarray | None = None, I0: np.ndarray | None = None,
            centre: np.ndarray | None = None, followed: Sequence[int] = (),
            fresh: bool = False) -> RefinementResult:
    model = calc.model
    sig = np.sqrt(np.maximum(np.nan_to_num(y), 1.0)) if sigma is None else np.asarray(sigma, float)
    valid = np.isfinite(y) & np.isfinite(sig) & (sig > 0)
    n_valid = int(valid.sum())
    if n_valid < 20:
        raise RefinementError(f"only {n_valid} usable points in the refined range")
    y = np.where(valid, y, 0.0)
    wt = np.where(valid, 1.0 / np.where(valid, sig, 1.0), 0.0)
    calc.valid = valid
    L = calc.layout
    theta = L.start()
    lebail = calc.any_extracted
    all_lebail = model.method in ("lebail", "pawley")
    n_refl = int(calc.offsets[-1])
    I = None
    from_previous = start is not None and start.theta is not None and len(start.theta) == len(theta)
    if from_previous:
        theta = start.theta.copy()
        trend = start.cell_trend
        if trend is not None and trend.shape == theta.shape and start.start_from == "previous" and start.ok:
            # the cells moved on by their change in the frame before (linear extrapolation; a
            # cell that keeps moving started one frame's change off costs the alternation of
            # extraction and least squares 7-10 steps instead of 2-3), where that change was
            # larger than TREND_ESD esds (a weak phase's cell only scatters)
            moved = np.abs(trend) > TREND_ESD * np.where(np.isfinite(start.esds), start.esds, np.inf)
            theta = theta + np.where(moved, trend, 0.0)
        if lebail and start.lebail_I is not None and start.lebail_I.size == n_refl:
            I = start.lebail_I.copy()
            if fresh:                        # the previous cells, intensities extracted afresh
                I = lebail_start(calc, theta, y)
            for p, ph in enumerate(model.phases):          # absent in the previous frame: held absent
                if ph.name in start.absent:
                    I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    elif theta0 is not None:
        theta = theta0.copy()
        if lebail and I0 is not None:
            I = I0.copy()
        if not all_lebail:
            theta = initial_guess(calc, theta, y[valid], all_lebail, background=False)
    else:
        theta = initial_guess(calc, theta, y[valid], all_lebail)
    # bounds: the cells within their searched range around the start (the configured cell, or
    # the previous frame's)
    if from_previous:
        lower, upper = cell_bounds(calc, start.theta, [p for p, ph in enumerate(model.phases)
                                                          if ph.name not in start.absent])
    else:
        lower, upper = cell_bounds(calc, centre, followed)
    bounds = (lower, upper)
    theta = np.clip(theta, lower, upper)
    if calc.pawley:                          # intensities and background solved at the start cells
        gone0 = [p for p, ph in enumerate(model.phases) if from_previous and ph.name in start.absent]
        _, I, theta, _ = pawley_solve(calc, theta, y, wt, [p for p in range(len(model.phases)) if p not in gone0])
    elif lebail and I is None:
        I = lebail_start(calc, theta, y)
    free = L.free.copy()
    # a Le Bail phase with (next to) no intensity at the start is absent: its cell and widths are held
    absent: list[int] = []
    retest: list[int] = []
    if all_lebail and len(model.phases) > 1:
        empty = [p for p in range(len(model.phases))
                 if not np.any(I[int(calc.offsets[p]):int(calc.offsets[p + 1])] > 0)]
        # from a frame with one phase left, the others stay absent (no test needed)
        absent = empty if from_previous and len(empty) >= len(model.phases) - 1 else find_absent(calc, theta, I, y, wt)
        if from_previous and not calc.pawley and start.lebail_I is not None:
            # a weak phase of the previous frame (the Al current collector) stays: judged before
            # the widths and cells are refined, it looked absent in most frames and was refined
            # back in after (a second refinement); one that is gone is found after convergence
            # (Pawley refines no phase back in: tested here as before)
            weak = shares(calc, start.theta, start.lebail_I) < WEAK_SHARE
            absent = [p for p in absent if p in empty or not weak[p]]
        # judged before the widths and cells are refined, when χ² is mostly their misfit: a weak
        # phase with narrow lines (the Al current collector) may look absent; tested again below
        retest = [p for p in absent if p not in empty]
        I_start = I.copy()
        if absent and len(absent) < len(model.phases):
            hold_idx = {i for p in absent for i in phase_params(calc, p)}
            free = np.array([i for i in free if int(i) not in hold_idx], int)
            for p in absent:                 # no intensity: they take none from the others' peaks
                I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
        else:
            absent = []
    stages = _stages(calc, free) if staged else [free]
    hold = lebail and not calc.pawley and from_previous and I is not None and start.lebail_I is not None \
        and not fresh
    n_iter = 0
    converged = False
    for k, cols in enumerate(stages):
        last = k == len(stages) - 1
        theta, I, converged, it = minimise(calc, y, wt, theta, I, cols, max_iter=model.max_iter if last else STAGE_ITER,
                                       tol=tol, hold=hold and k == 0, n_valid=n_valid, bounds=bounds, absent=absent,
                                       follow=from_previous)
        n_iter += it
    # phases found absent at the start that the converged fit does need: refined again with them
    if all_lebail and not calc.pawley and absent and retest:
        back = find_needed(calc, theta, I, I_start, y, wt, [p for p in retest if p in absent])
        if back:
            theta, I, free, absent, converged, it = put_back(calc, y, wt, theta, I, free, absent, back, I_start,
                                                              cycles=5, tol=tol, n_valid=n_valid, bounds=bounds,
                                                              follow=from_previous)
            n_iter += it
    # phases the converged fit does not need: removed, and the last stage refined again without them
    if all_lebail and len(model.phases) > 1:
        gone = [p for p in find_absent(calc, theta, I, y, wt) if p not in absent]
        if gone and len(gone) + len(absent) < len(model.phases):
            hold_idx = {i for p in gone for i in phase_params(calc, p)}
            free = np.array([i for i in free if int(i) not in hold_idx], int)
            for p in gone:
                I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
            absent = sorted(absent + gone)
            theta, I, converged, it = minimise(calc, y, wt, theta, I, free, max_iter=model.max_iter, tol=tol, hold=False,
                                           n_valid=n_valid, bounds=bounds, absent=absent, follow=from_previous)
            n_iter += it
    res = make_result(calc, y, wt, valid, theta, I, free, n_iter, converged, absent, bounds)
    # a frame that fits clearly worse than the one before while a phase is held absent: that
    # phase is refined back in (its intensities extracted afresh, its cell and widths free) and
    # kept if the fit then needs it as a present phase is needed (a weak phase, the Al current
    # collector, judged absent from a poor start would otherwise never return)
    if (all_lebail and not calc.pawley and from_previous and absent and math.isfinite(start.gof)
            and res.gof > GOF_RETEST * start.gof):
        t2, I2, free2, _, conv2, it = put_back(calc, y, wt, theta, I, free, absent, absent,
                                                lebail_start(calc, theta, y), cycles=0, tol=tol,
                                                n_valid=n_valid, bounds=bounds, follow=from_previous)
        back = [p for p in absent if p not in find_absent(calc, t2, I2, y, wt)]
        if back:
            still = [p for p in absent if p not in back]
            for p in still:
                I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
            held = {j for p in still for j in phase_params(calc, p)}
            free3 = np.array([i for i in free2 if int(i) not in held], int)
            alt = make_result(calc, y, wt, valid, t2, I2, free3, n_iter + it, conv2, still, bounds)
            if alt.rwp < res.rwp:
                res, theta, I, absent, free = alt, t2, I2, still, free3
    # a Le Bail phase pinned at the edge of its searched range may be a ghost taking another's
    # misfit: refined again without it, the better verdict kept
    pinned = sorted({L.params[L.index[nm]].phase for nm in res.at_bound if L.params[L.index[nm]].kind == "cell"}
                    - set(absent))
    if all_lebail and pinned and len(pinned) + len(absent) < len(model.phases) and res.status != "ok":
        hold_idx = {i for p in pinned for i in phase_params(calc, p)}
        free2 = np.array([i for i in free if int(i) not in hold_idx], int)
        I2 = I.copy()
        for p in pinned:
            I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
        t2 = theta.copy()
        for p in pinned:
            t2[cell_idx(calc, p)] = np.clip(L.start(), lower, upper)[cell_idx(calc, p)]
        t2, I2, conv2, it = minimise(calc, y, wt, t2, I2, free2, max_iter=model.max_iter, tol=tol, hold=False,
                                 n_valid=n_valid, bounds=bounds, absent=sorted(absent + pinned), follow=from_previous)
        alt = make_result(calc, y, wt, valid, t2, I2, free2, n_iter + it, conv2, sorted(absent + pinned), bounds)
        res = _best([res, alt], None)
    return res
