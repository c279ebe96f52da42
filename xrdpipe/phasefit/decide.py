"""The decisions of one frame (:func:`fit_frame`): the steady path (the phases of the frame before
followed by least squares alone), else searches, fits and the tests that decide each phase's
presence (ΔBIC, lines shown, area share, reach, order, relative intensities), recorded per
phase."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import FitSpec
from .frame import FrameResult, _Frame
from .model import (
    _BROADENED,
    _CELL_INDEX,
    _CELL_NAME,
    _MISFIT,
    _MISFIT_RISE,
    _SHOWN_Z,
    _TRACK_FWHM,
    _UNLIKE,
    PhaseModel,
    PhaseState,
)
from .neighbours import _coincident, _drawn_towards, _in_place_of, _on_lines_of, _own_share
from .solve import (
    _at_bound,
    _at_edge,
    _failed,
    _fit_rows,
    _fwhm_table,
    _result,
    esd_scale,
    window_chi2,
)
from .tails import _FAR_TAIL_ESD, far_tails, without_far_tails


def fit_frame(model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
              fit: FitSpec, centre: np.ndarray | None = None) -> FrameResult:
    """Fit one frame (``y`` on the concatenated windows) starting from the previous ``state``.

    A frame like the one before (:func:`_fit_steady`: its phases followed by least squares alone
    explain it to its Poisson noise, or leave no more misfit than the frame last searched did,
    or two similar phases side by side keep their split) is done; else see
    :func:`_fit_frame_once`. A phase that may
    not be what it claims to be (dropped because its listed lines are empty, or present with
    areas unlike its own relative intensities) may have misled the searches of the others while
    it was there: the frame is then fitted again without it, and the better of the two (BIC) is
    kept. A phase on an alias of its cell (another of its reflections on its listed line) is
    moved off it (:func:`_unaliased`). A window left far from its noise where it fitted before
    has its phases searched for afresh (:func:`_searched_afresh`). Last, the far tails of the
    frame's lines in the other windows are subtracted and the frame fitted again by least squares
    (:func:`~xrdpipe.phasefit.tails.without_far_tails`)."""
    # the steady path fits the data less the far tails of the lines of the phases as the frame
    # before left them (their areas solved on this frame's data); a frame it does not take is
    # searched on its data themselves, and everything after sees what its first fit saw
    subtracted = _tails_before(model, y, sigma, state)
    steady = _fit_steady(model, y if subtracted is None else y - subtracted, sigma, state, fit)
    checked = None
    if steady is not None and steady.search_due:
        checked, steady = steady, None        # (searched all the same; compared below)
    if steady is None:
        subtracted = None
    seen = y if subtracted is None else y - subtracted
    first = steady if steady is not None else _fit_frame_searched(model, y, sigma, state, fit, centre)
    res = _named_as(_unaliased(model, seen, sigma, first, fit, centre), first)
    res = _named_as(_searched_afresh(model, seen, sigma, state, res, fit, centre), res)
    if not res.success:
        return res
    # (the misfit the next frame compares with is that of the fit the decisions were made on,
    # against the data themselves: the next frame may be searched on them)
    redchi = _window_redchi(res) if subtracted is None else _redchi_on(model, y, sigma, res)
    kept = res is steady and steady.as_before
    decided = res
    res = _named_as(without_far_tails(model, y, sigma, res, fit, subtracted), res)
    res.state.redchi = redchi
    # the steady path's reference misfit: that of the last frame not followed for its misfit
    # being as before (searched, or explained to its noise), on its data less its far tails
    if kept:
        res.state.misfit_ref, res.state.as_before_run = state.misfit_ref, state.as_before_run + 1
    else:
        res.state.misfit_ref = res.chi2_window / np.maximum(res.n_window, 1)
        res.state.as_before_run = 0
    # a search made only because the allowance of frames followed as before was reached, that
    # decided what following found, lengthens the next allowance; a frame the steady path took
    # as it was (explained to its noise, or as before) leaves it as it was, and so does a frame
    # otherwise decided (searched, or the steady path's solution moved off an alias or searched
    # afresh) with the phases where the frame before had them; any other shortens it again
    if checked is not None:
        res.state.as_before_confirmed = (state.as_before_confirmed + 1
                                         if _same_solution(model, y, sigma, checked.state, decided) else 0)
    elif decided is steady or _same_solution(model, y, sigma, state, decided):
        res.state.as_before_confirmed = state.as_before_confirmed
    else:
        res.state.as_before_confirmed = 0
    return res


def _same_solution(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, ref: PhaseState,
                   searched: FrameResult) -> bool:
    """Whether a frame's search (``searched``) found the phases where ``ref`` has them (the
    frame followed by least squares alone, or the frame before): the same phases present, each
    cell parameter within :data:`_CONFIRM_MOVE` FWHM's worth of ``ref``'s (at its most
    sensitive line)."""
    if not searched.success or not ref.present.any() or not np.array_equal(searched.present, ref.present):
        return False
    fr = _Frame(m, y, sigma, ref)
    for p in np.flatnonzero(ref.present):
        steps = fr.track_halves(int(p), _CONFIRM_MOVE)
        for n in m.free[p]:
            i = _CELL_INDEX[n]
            if not abs(searched.state.cell[p, i] - ref.cell[p, i]) <= steps[i]:
                return False
    return True


def _redchi_on(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, res: FrameResult) -> np.ndarray:
    """(W,) each window's reduced chi-square of the solution ``res`` against the data ``y``."""
    fr = _Frame(m, y, sigma, res.state)
    # (the model its result was made from where it has it: the lines it left out are of area 0,
    # and add exactly nothing)
    f = res.fitted if res.fitted is not None else m.value_jac(res.theta[None], res.state.cell)[0][0]
    resid = (fr.y0 - f) * fr.w
    return window_chi2(m, resid) / np.maximum(res.n_window - res.nvary_window, 1)


def _named_as(res: FrameResult, before: FrameResult) -> FrameResult:
    """``res`` (a frame's solution worked on from ``before``) still saying how ``before`` named
    a phase by the typed cells (``FrameResult.named``), where that phase is still present."""
    if res is not before and res.named is None and before.named is not None and res.present[before.named[0]]:
        res.named = before.named
    return res


def _window_redchi(res: FrameResult) -> np.ndarray:
    """(W,) each window's reduced chi-square in a frame's solution."""
    return res.chi2_window / np.maximum(res.n_window - res.nvary_window, 1)


def _searched_afresh(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                     res: FrameResult, fit: FitSpec, centre: np.ndarray | None = None) -> FrameResult:
    """The frame's solution, or a better one with a phase searched for afresh. A window left
    above :data:`_MISFIT` reduced chi-square (with Poisson esds), and :data:`_MISFIT_RISE` times
    above what it had in the frame before, holds a line the phases as followed do not explain:
    a phase followed onto an alias while its lines were hidden under another's (P''2's (100)
    under P2's, its cell then held on the Al line) and left there when the other went (the
    window at χ²/ν 2233, frame after frame). Each present phase with lines in such a window is
    taken as absent and searched over its whole range (around its configured cell); the best
    frame that is better by ``bic_threshold`` is kept, and its decision says so. A frame with no
    frame before it (``state.redchi`` None: a pass's first frame, from no phase) was searched
    for every phase already."""
    if not res.success or sigma is None or not np.isfinite(sigma).any() or state.redchi is None:
        # (no frame before it, a pass's first: its phases were searched for, not followed; on 2D
        # frames every strong window has χ²/ν 4-30 from the bins' shape, and each first frame
        # of a pass was searched again phase by phase, ~1 s each, to find nothing better)
        return res
    now = _window_redchi(res)
    bad = np.flatnonzero((now > _MISFIT) & (now > _MISFIT_RISE * state.redchi))
    if not bad.size:
        return res
    best, best_bic, tried = res, _bic(m, res) - fit.bic_threshold, None
    for p in np.flatnonzero(res.present):
        if not any(m._refl_of[p][w].size for w in bad) or not m.free[p]:
            continue
        start = res.state.copy()
        start.present[p] = False
        start.cell[p] = m.cell0[p]
        alt = _fit_frame_searched(m, y, sigma, start, fit, centre)
        if alt.success and alt.present[p] and (b := _bic(m, alt)) < best_bic:
            best, best_bic, tried = alt, b, p
    if tried is None:
        return res
    names = ", ".join(m.windows[w].name for w in bad)
    worst = float(now[bad].max())
    best.decision[tried] += (f"; searched for afresh: window{'s' if bad.size > 1 else ''} {names} left at "
                             f"χ²/ν {worst:.3g} as followed "
                             f"(ΔBIC {_bic(m, res) - _bic(m, best):+.0f})")
    return best


def _fit_frame_searched(model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                        fit: FitSpec, centre: np.ndarray | None = None) -> FrameResult:
    """The frame with the searches (:func:`_fit_frame_once`), and again without a phase that
    may not be what it claims to be (see :func:`fit_frame`)."""
    first = _fit_frame_once(model, y, sigma, state, fit, frozenset(), centre)
    if first.ran_off and first.success and centre is None:
        first = _held_where_it_was(model, y, sigma, state, fit, first)
    impostors = frozenset(p for p, d in enumerate(first.decision)
                          if d.startswith("absent: no line at") or "unlike those it had alone" in d)
    if not impostors or not first.success:
        return first
    second = _named_as(_fit_frame_once(model, y, sigma, state, fit, impostors, centre), first)
    gain = _bic(model, first) - _bic(model, second)
    if not second.success or gain <= 0:
        return first
    for p in impostors:
        d = first.decision[p]
        why = next((part for part in d.split("; ") if part.startswith("its areas are unlike")), "suspect")
        second.decision[p] = (d if d.startswith("absent") else
                              f"absent: {why}; the frame fits better without it (ΔBIC {gain:.0f})")
    return second


def _held_where_it_was(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState, fit: FitSpec,
                       first: FrameResult) -> FrameResult:
    """The frame's solution ``first``, or a better one (BIC) with each phase that ran to the end
    of its step while a similar phase was absent held where the frame before had it, and the
    absent one searched beside it. At a two-phase region's onset a newcomer 1 FWHM from the
    phase followed draws that phase's least squares toward its line (both broadened 1.6x): let
    go, the followed phase was searched for afresh beside nothing, and the two similar phases,
    each fitted alone to both lines, were named by which of them fits the middle better (O3 at
    63 % beside P3 at 37 %: P3 found there first, O3 searched beside it onto P3's own line,
    the names swapped; measured 2026-12-04 on charges and discharges whose two-phase region
    lasts two frames)."""
    alt = _fit_frame_once(m, y, sigma, state, fit, frozenset(), None, hold_drawn=True)
    if not alt.success or not (_bic(m, alt) < _bic(m, first)):
        return first
    for p in first.ran_off:
        if alt.present[p]:
            alt.decision[p] += (f"; held where the frame before had it, a similar phase searched beside it "
                                f"(ΔBIC {_bic(m, first) - _bic(m, alt):+.0f} against it let go)")
    return alt


def _unaliased(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, res: FrameResult,
               fit: FitSpec, centre: np.ndarray | None = None) -> FrameResult:
    """The frame's solution, or that with a phase moved off an alias of its cell. A listed line
    empty (below :data:`_SHOWN_Z` esds) while another reflection of the same phase holds the
    line in that window is an alias: a P''2 a 2.3 % high puts its (101) where its (100) belongs
    (areas are free per reflection, and the two explain the line equally). The phase's cell is
    moved so that its listed line sits where that reflection is, the frame fitted again from
    there, and the result kept unless its BIC is worse by ``bic_threshold``: the user's listed
    line names the line. The frame is fitted again as if this frame's solution, with the cell
    moved, were the frame before: the order of two similar phases then comes from the moved cell
    (the alias may have reversed it)."""
    if not res.success:
        return res
    tried = set()
    for p, i, value, hkl, other in _aliases(m, res):
        if (p, i) in tried:
            continue
        tried.add((p, i))
        start = res.state.copy()
        start.cell[p] = m.trial_cells(p, start.cell[p], i, np.array([value]))[0]
        alt = _fit_frame_searched(m, y, sigma, start, fit, centre)
        if not (alt.success and alt.present[p] and np.array_equal(alt.present, res.present)):
            continue
        if _bic(m, alt) > _bic(m, res) + fit.bic_threshold or (p, i) in {(q, j) for q, j, *_ in _aliases(m, alt)}:
            continue
        name = _CELL_NAME[i]
        before = res.decision[p].split("; ")[0]
        # how the phase was found and named in this frame stays said
        found = [part for part in res.decision[p].split("; ")[1:] if part.startswith("named ")]
        head, *rest = alt.decision[p].split("; ")
        if ", found by the cell search" in before and ", found by the cell search" not in head:
            head += ", found by the cell search"
        alt.decision[p] = "; ".join([head] + found + rest)
        alt.decision[p] += (f"; its listed {hkl} line was held by its {other}: moved off that alias to "
                            f"{name} = {alt.state.cell[p, i]:.5g} (ΔBIC {_bic(m, res) - _bic(m, alt):+.1f})")
        return alt
    return res


def _aliases(m: PhaseModel, res: FrameResult) -> list[tuple[int, int, float, str, str]]:
    """Phases of a frame's solution whose listed line in a window is empty while another of
    their reflections there holds a line, a listed line that moves with one cell parameter only:
    (phase, that parameter, the value that puts the listed line on the other's centre, the two
    reflections' names)."""
    theta = res.theta
    cells = m.cells(theta[None], res.state.cell)[0]
    zero = float(theta[m.zero_col])
    fw = m.fwhm_table(theta)
    inner = m.inside(cells, zero, fw)
    area = theta[m.area_col]
    # (from bounds on the esds where they settle it, without making them: see WindowEsds)
    above = None if res.esds is None else res.esds.area_shown(area, _SHOWN_Z)
    if above is None:
        err = res.err
        above = area > _SHOWN_Z * np.where(np.isfinite(err[m.area_col]), err[m.area_col], 0.0)
    shown = inner & above
    out = []
    for p in np.flatnonzero(res.present):
        free = [_CELL_INDEX[n] for n in m.free[p]]
        for w in range(m.W):
            rows = m._refl_of[p][w]
            listed = [r for r in rows if m.r_listed[r] and inner[r] and not shown[r]]
            holders = [r for r in rows if not m.r_listed[r] and shown[r]]
            if not listed or not holders:
                continue
            r, h = listed[0], max(holders, key=lambda q: area[q])
            deps = [i for i in free if m.r_dep[r, i]]
            if len(deps) != 1:
                continue
            i = deps[0]
            col = m.cell_cols[p][m.free[p].index(_CELL_NAME[i])]
            values = np.linspace(m.lower[col], m.upper[col], 2001)
            pos = m.positions(m.r_hkl[[r]], m.trial_cells(p, cells[p], i, values)[:, None, :], zero)[:, 0]
            target = m.centres(cells[None], np.array([zero]), np.array([h]))[0, 0]
            k = int(np.argmin(np.abs(pos - target)))
            if abs(pos[k] - target) > 0.25 * fw[p, w]:
                continue            # no cell within its reach puts the listed line there
            out.append((int(p), i, float(values[k]), _hkl_text(m.r_hkl[r]), _hkl_text(m.r_hkl[h])))
    return out


def _hkl_text(hkl) -> str:
    """(101), or (1 -2 10) where an index is negative or has two digits."""
    idx = [int(v) for v in hkl]
    sep = "" if all(0 <= v < 10 for v in idx) else " "
    return "(" + sep.join(str(v) for v in idx) + ")"


def _fit_steady(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                fit: FitSpec) -> FrameResult | None:
    """The frame fitted as a continuation of the one before, without any search: the phases
    present there, from their cells, widths and eta, in one batch of least squares (all of
    them, and without each). Accepted only if the frame is then explained to its Poisson noise
    (χ² - ν below 3 √(2ν) plus what any phase would have to explain to pass the BIC test: no
    absent phase can be there, no other cell can do much better) and every present phase passes
    every test of :func:`_fit_frame_once` at once (ΔBIC, lines shown, area share, cell inside its
    reach, order kept, areas like its own); otherwise None, and the frame gets the full search.
    Never taken without esds (nothing to measure "explained" against), nor where a line's width
    moved as at a two-phase region's onset (:func:`_rewidened`) or became a hump on its bound
    (:func:`_hump`). Two phases that could be
    confused, both present, share lines: taken for them only where each shows its own lines
    clearly, apart from the other's, and moved little (:func:`_pair_trouble`), else their
    shared lines need the joint search. A frame of such a pair not explained to its noise (a
    two-phase region broadens lines beyond the model) is taken only with every phase present
    (none absent that could be there) and the joint search's coarse grid finding no other split
    of their lines (:func:`_pair_settled`)."""
    fr = _Frame(m, y, sigma, state)
    st = fr.state
    present = [p for p in range(m.P) if st.present[p] and np.all(np.isfinite(st.cell[p]))]
    n_valid = int(np.count_nonzero(fr.w > 0))
    if not fr.has_errors or not present or n_valid < m.k // 2 + 2:
        return None
    # two similar phases side by side share lines: least squares from where they were can leave
    # a parameter of the weaker one where its line is hidden under the other's (the joint search
    # splits them); followed here only where each shows its own lines clearly (_pair_trouble)
    paired = any(p in present and q in present for p, q, _, _ in m.order)
    for p in range(m.P):
        if not np.all(np.isfinite(st.cell[p])):
            st.cell[p] = m.cell0[p]
    rows = [tuple(present)] + [tuple(q for q in present if q != p) for p in present]
    res = _fit_rows(m, fr, rows, fit, descend=True)
    if res is None or res.status[0] != 1 or _rewidened(m, res.p[0], res.cov[0], st, present):
        return None
    if _hump(m, res, present):
        return None
    chi2 = float(res.chi2[0])
    least = min(_n_params(m, p) for p in range(m.P)) * np.log(max(n_valid, 2)) + fit.bic_threshold
    explained = chi2 - n_valid - 3 * np.sqrt(2 * n_valid) < least
    as_before = (not explained and not paired and st.misfit_ref is not None
                 and _misfit_as_before(m, fr, res, st.misfit_ref, least))
    due = as_before and st.as_before_run >= _as_before_allowance(st)
    if not explained and not as_before and not (paired and len(present) == m.P):
        return None
    held: set[int] = set()
    gains, fails, passed, areas, inner = _judge(m, fr, res, present, held, set(), fit, n_valid)
    if fails or held or any("unlike those it had alone" in d for d in passed.values()):
        return None
    if paired and _pair_trouble(m, fr, res, present, areas, inner, n_valid):
        return None
    if not explained and not as_before and not _pair_settled(m, fr, res, present):
        return None
    decision = [""] * m.P
    for p in range(m.P):
        decision[p] = passed.get(p, f"absent: nothing left to explain (χ²/ν {chi2 / max(n_valid, 1):.2f}"
                                    + (", each window's as in the frame last searched)" if as_before else ")"))
        if as_before and p in passed:
            decision[p] += "; followed, each window's misfit as in the frame last searched"
    out = _finish(m, fr, res, present, decision, held, fit, areas, inner)
    out.as_before = as_before
    out.search_due = due
    return out


#: How many esds of the difference between two frames' widths (√2 times this frame's esd: the
#: frame before measured the same line as well) a width must move to be "rewidened"
#: (:func:`_rewidened`), besides :data:`~xrdpipe.phasefit.model._BROADENED`. A frame has ten or
#: more widths and a run thousands of frames: a family-wise test, not one of a single width. At 3
#: esds of this frame alone (before 2026-12-03) the Al (200) line of the benchmark's series (area
#: ~50 beside O3's 1,300; its width 0.07° ± 0.004°, eta between 0 and 0.8) sent 31 of its 1,000
#: frames to the searches (~40 ms each, a fifth of the run's time) for nothing; at 3 esds of the
#: difference, 8. A two-phase region's onset moves the strong lines' widths by 100 esds or more.
_REWIDEN_Z = 5.0


#: A line whose width sits on its window's upper bound (a third of the window) and more than this
#: many times its phase's median width in its other windows is a hump, not a line (:func:`_hump`).
_HUMP = 2.0


def _hump(m: PhaseModel, res, present: list[int]) -> bool:
    """Whether the steady fit (``res``, row 0) made a line of a present phase a hump: its width on
    its window's upper bound and above :data:`_HUMP` times the phase's median width in its other
    windows (three or more). Not a frame to follow: the bound, not the data, holds that width.
    At P3's onset in the benchmark's O3 -> P3 series the (015) window holds O3's and P3's (015)
    lines and Al's (200): O3's (015) widened onto its bound (0.333° beside 0.11° elsewhere),
    its area taking part of P3's, and least squares followed it so for 40 frames (the fraction MAE
    of the 1,000-frame series 0.0033; searched there, 0.11° and 0.0012)."""
    cols = m.fwhm_col[present]
    on_bound = (cols >= 0) & (res.p[0, np.maximum(cols, 0)] >= res.upper[np.maximum(cols, 0)] * (1.0 - 1e-9))
    if not on_bound.any():               # (nearly every frame)
        return False
    widths = m.fwhm_table(res.p[0])[present]
    have = (cols >= 0) & np.isfinite(widths)
    for i, w in zip(*np.nonzero(on_bound & have)):
        others = widths[i, have[i] & (np.arange(m.W) != w)]
        if others.size >= 2 and widths[i, w] > _HUMP * float(np.median(others)):
            return True
    return False


def _rewidened(m: PhaseModel, theta: np.ndarray, cov: np.ndarray, st: PhaseState, present: list[int]) -> bool:
    """Whether a phase's lines in some window are more than :data:`_BROADENED` times broader
    (or narrower) in the solution ``theta`` (covariance ``cov``) than in the frame before
    (``st``), by more than 3 esds of the width: not a frame like the one before. A two-phase
    region's onset broadens the lines a frame before the newcomer shows (O3's 0.070 → 0.112°
    where P3 held 0.2 %); followed there by least squares alone, the frame after searched P3
    from its typed cell, 2 % off, and placed it off its lines (the fraction MAE of a 300-frame
    series 0.21), where searching that frame placed it near them. (A weak line's width may move
    by that share from frame to frame: no sign of anything; hence a change beyond
    :data:`_REWIDEN_Z` esds of the difference of two frames' widths as well.)"""
    cols = m.fwhm_col[present]
    now = m.fwhm_table(theta)[present]
    err = np.sqrt(np.abs(np.diagonal(cov)))[np.maximum(cols, 0)]
    before = st.fwhm[present]
    with np.errstate(invalid="ignore"):
        changed = ((cols >= 0) & np.isfinite(now) & np.isfinite(before) & (before > 0) & (now > 0)
                   & ((now > _BROADENED * before) | (now * _BROADENED < before))
                   & (np.abs(now - before) > _REWIDEN_Z * np.sqrt(2.0) * err))
    return bool(changed.any())


def _tails_before(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState) -> np.ndarray | None:
    """The far tails (:func:`~xrdpipe.phasefit.tails.far_tails`) of the lines of the phases
    present in ``state`` as the frame before left them (cells, widths, eta; their areas solved
    on this frame's data ``y``), or None where they stay below
    :data:`~xrdpipe.phasefit.tails._FAR_TAIL_ESD` of an esd (or there is no phase yet, or no
    esds).

    The steady path (:func:`_fit_steady`) fits the data less them: on raw 2D data O3's (104)
    tail left the 015 window at χ²/ν ~800, and least squares started from the Al line's width of
    the frame before's tail-free fit settled 23,000 in χ² above what the searches found by
    broadening Al over the tail, so no frame could be followed without a search. A phase gone
    has no area here, so leaves no hole. The searches see the data themselves: searched on the
    data less these tails, P3 at its onset 1.1 FWHM from O3 (whose areas, solved at its cell,
    take P3's share of their lines and of their tails) was placed on one of its five lines, and
    the benchmark's 1,000-frame series came out with a fraction MAE of 0.057 for 0.0012. Drawn
    from the carried state and this frame's data alone, the tails are the same in a straight
    run and in one resumed at any frame."""
    present = [p for p in range(m.P) if state.present[p] and np.all(np.isfinite(state.cell[p]))]
    if not present or sigma is None or not np.isfinite(sigma).any():
        return None          # (without esds: the frame's own tails, after its fit, as before)
    fr = _Frame(m, y, sigma, state)
    on = np.zeros(m.P, bool)
    on[present] = True
    theta, _ = fr.linear(fr.state.cell, present, fr.state.zero)
    tails = far_tails(m, theta, fr.state.cell, on)
    return tails if float(np.max(np.abs(tails) * fr.w, initial=0.0)) >= _FAR_TAIL_ESD else None


#: Frames followed in a row because their misfit is as in the frame last searched
#: (:func:`_misfit_as_before`) at most, at first; the next one takes the searches
#: (:func:`_as_before_allowance` lengthens it where the searches keep confirming). A searched frame that
#: decided wrong would otherwise be followed as it was, frame after frame, its own misfit the
#: reference; the searches after each such run give its successors a chance to put it right (and
#: find a phase whose first lines explain less than a window's misfit varies: the bins' misfit
#: on 2D frames moves by several of its standard deviations from frame to frame, as lines cross
#: the bins). The frames of the run's zero estimate take no reference, each explained to its
#: noise or searched (:meth:`~xrdpipe.phasefit.fitter.PhaseFitter._estimate_zero`). Measured
#: against every third frame (2026-12-01): the same verdicts on the sweeps of 1D and 2D series
#: (own simulator 30/32 and 7/8, foreign 16/16 and 6/6, long series 10/10; the failures are the
#: crossed typed cells' ties, README *Known limits*), the same scores but for a few esd shares
#: and one series' basal rms (3e-6° -> 1.7e-5°); searched frames on the 200-frame 2D benchmark
#: 103 -> 59.
_AS_BEFORE_RUN = 8

#: The most frames followed in a row for their misfit being as before, however many searches
#: confirmed them. A phase whose first lines explain less than the windows' misfit varies is
#: then found at most this many frames late by the forward pass, and the backward pass
#: (:meth:`~xrdpipe.phasefit.fitter.PhaseFitter.backward`) goes back from where it is strong,
#: at most :data:`~xrdpipe.phasefit.model._BACKWARD_MAX` (60) frames: well within its reach.
_AS_BEFORE_MAX = 32

#: How far (FWHM at a parameter's most sensitive line) a search's cell may lie from the
#: followed one and still confirm it (:func:`_same_solution`): another basin is a line width
#: or more away; the search fits the data with the far tails, the steady path without them.
_CONFIRM_MOVE = 0.1


def _as_before_allowance(st: PhaseState) -> int:
    """Frames followed in a row for their misfit being as before (:func:`_misfit_as_before`)
    before the next is searched: :data:`_AS_BEFORE_RUN`, doubled for each search in a row so made
    that found what following would have found (``st.as_before_confirmed``), at most
    :data:`_AS_BEFORE_MAX`. On 2D frames every strong window keeps a misfit the model cannot
    remove (the bins' shape), no frame is explained to its noise, and with a fixed allowance of
    eight one frame in nine took the searches, ~0.1 s each against ~5 ms followed."""
    return min(_AS_BEFORE_RUN << min(st.as_before_confirmed, 16), _AS_BEFORE_MAX)


#: How much a window's misfit beyond its noise (the reference's reduced chi-square less 1) may
#: grow, as a share of itself, and still be as before (:func:`_misfit_as_before`).
_MISFIT_DRIFT = 1.0


def _misfit_as_before(m: PhaseModel, fr: "_Frame", res, ref: np.ndarray, least: float) -> bool:
    """Whether the steady fit (``res``, row 0) leaves no more to explain than the frame last
    decided by the searches (``ref``, its windows' chi-squares per point) did: in every window
    and over all, the chi-square exceeds ``ref`` times the points (the part of ``ref`` beyond the
    noise grown by :data:`_MISFIT_DRIFT`: on 2D frames each window's moves by 0.6-1.8x from frame
    to frame as lines cross the bins) by less than three standard deviations plus ``least`` (what
    any phase must explain to pass the BIC test). A misfit the
    model cannot remove (a profile's shape: a Voigt line fitted by a pseudo-Voigt, a bin not
    quite the mixture of its pixels' footprints; reduced chi-squares of 4-30 on 2D frames) is
    in every frame alike; it kept the frames of a 2D series from being explained to their
    Poisson noise, and every one took the searches (3 frames/s). A chi-square of a misfit m per
    point varies 2 + 4 m as much as a point's. The reference stays that of the last searched
    frame (not the frame before), so a misfit cannot creep up frame after frame unsearched."""
    f = m.value_jac(res.p[:1], fr.state.cell)[0][0]
    chi2 = window_chi2(m, (fr.y0 - f) * fr.w)
    total = allowed = var = 0.0
    for w, win in enumerate(m.windows):
        n = int(np.count_nonzero(fr.w[win.points] > 0))
        if not n:
            continue
        r = max(float(ref[w]), 1.0) if np.isfinite(ref[w]) else 1.0
        c2 = float(chi2[w])
        v = n * (2.0 + 4.0 * (r - 1.0))
        r += _MISFIT_DRIFT * (r - 1.0)
        if c2 - r * n - 3.0 * np.sqrt(v) >= least:
            return False
        total, allowed, var = total + c2, allowed + r * n, var + v
    return total - allowed - 3.0 * np.sqrt(var) < least


#: Two similar phases followed side by side without a search (:func:`_pair_trouble`): most
#: of their listed lines shown above this many esds, each cell parameter placed by a line of its own at
#: least this many FWHM from the other phase's lines, and moved at most this many FWHM at its
#: most sensitive line since the frame before.
_PAIR_Z = 2 * _SHOWN_Z
_PAIR_APART = 0.5
_PAIR_MOVE = 0.25


def _pair_trouble(m: PhaseModel, fr: "_Frame", res, present: list[int], areas: np.ndarray, inner: np.ndarray,
                  n_valid: int) -> str:
    """Why the steady fit (``res``, row 0) of two phases that could be confused, both present,
    cannot stand for the joint search, or "": the failure it must exclude is a parameter of the
    weaker one left where its line is hidden under the other's. So each of the two must show
    most of its listed lines clearly (:data:`_PAIR_Z` esds), have every cell parameter placed
    by a line of its own that is clearly shown and at least :data:`_PAIR_APART` FWHM from every
    line of the other in its window, and have moved less than :data:`_PAIR_MOVE` FWHM's worth
    since the frame before (a larger move is what the joint search is for)."""
    st = fr.state
    cells = m.cells(res.p[:1], st.cell)[0]
    if np.array_equal(cells[present], st.cell[present]):
        # no step taken (least squares may stop where a step cut by the bounds promises a rise):
        # that is not a fit of this frame
        return "no step from the cells of the frame before"
    fw = m.fwhm_table(res.p[0])
    cen = m.centres(cells[None], np.array([st.zero]))[0]
    err = _area_esds(m, fr, res, n_valid)
    shown = inner & np.isfinite(err) & (areas > _PAIR_Z * np.where(np.isfinite(err), err, 0.0))
    done = set()
    for p, q, _, _ in m.order:
        if p not in present or q not in present or (q, p) in done:
            continue
        done.add((p, q))
        for a, b in ((p, q), (q, p)):
            name = m.phases[a].name
            listed = np.flatnonzero(m.r_listed & (m.r_phase == a) & m.r_has_data)
            if np.count_nonzero(shown[listed]) < (listed.size + 1) // 2:
                return f"{name}: most of its listed lines not above {_PAIR_Z:g} esds"
            theirs = np.flatnonzero((m.r_phase == b) & inner)
            mine = np.flatnonzero((m.r_phase == a) & shown)
            gap = np.full(mine.size, np.inf)
            for k, r in enumerate(mine):
                other = theirs[m.r_window[theirs] == m.r_window[r]]
                if other.size:
                    gap[k] = np.min(np.abs(cen[other] - cen[r])) / fw[a, m.r_window[r]]
            steps = fr.track_halves(a, _PAIR_MOVE)
            for n in m.free[a]:
                i = _CELL_INDEX[n]
                if n in m.undetermined[a]:
                    continue
                if not np.any(m.r_dep[mine, i] & (gap >= _PAIR_APART)):
                    return f"{name}: no line of its own apart from {m.phases[b].name}'s places {n}"
                if abs(cells[a, i] - fr.before[a, i]) > steps[i]:
                    return f"{name}: {n} moved more than {_PAIR_MOVE:g} FWHM"
    return ""


def _pair_settled(m: PhaseModel, fr: "_Frame", res, present: list[int]) -> bool:
    """Whether the joint search of every pair of similar phases, over its tracking span around
    the steady fit's cells (``res``, row 0) and at its widths, finds its best coarse point
    within one coarse step of them (:meth:`_Frame.pair_search` with ``check``): no other split
    of their shared lines to be found. The working state is left as it was."""
    st = fr.state
    saved = st.cell.copy(), st.fwhm.copy()
    st.cell[:] = m.cells(res.p[:1], st.cell)[0]
    widths = m.fwhm_table(res.p[0])
    st.fwhm[:] = np.where(np.isfinite(widths), widths, st.fwhm)
    try:
        done = set()
        for p, q, _, _ in m.order:
            if p not in present or q not in present or (q, p) in done or (p, q) in done:
                continue
            done.add((p, q))
            ordered = {jj for a, b, jj, _ in m.order if a == p and b == q}
            first = True
            for name in m.search_order[p]:          # c before a, as in the search
                if _CELL_INDEX[name] in ordered:
                    if not fr.pair_search(p, q, _CELL_INDEX[name], present, widths, True, pure=first, check=True):
                        return False
                    first = False
        return True
    finally:
        st.cell[:], st.fwhm[:] = saved


#: The start of the decision of a phase that took the place of a similar one (a label swap).
_SWAP = "absent: took the place that"


def _bic(m: PhaseModel, res: FrameResult) -> float:
    """The BIC of a frame's solution: its chi-square (:func:`_misfit`) and the parameters of its phases."""
    n = max(int(res.n_window.sum()), 2)
    k = sum(_n_params(m, p) for p in range(m.P) if res.present[p])
    return _misfit(res) + k * np.log(n)


def _misfit(res: FrameResult) -> float:
    """The misfit term of a frame's BIC, n ln(chi-square / n) (-2 ln L up to a constant)."""
    n = max(int(res.n_window.sum()), 2)
    return n * np.log(max(float(res.chi2_window.sum()), 1e-300) / n)


def _fit_frame_once(model: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState,
                    fit: FitSpec, banned: frozenset, centre: np.ndarray | None = None,
                    hold_drawn: bool = False) -> FrameResult:
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
    before = _fwhm_table(m, fr)            # the widths of the frame before, for the pair searches
    # where each phase is looked for: around its configured cell (a last cell from a frame where
    # it was wrongly there would lead the search astray for good)
    fr.centre = m.cell0.copy() if centre is None else np.where(np.isfinite(centre), centre, m.cell0)
    fr.going_back = centre is not None
    if present:
        _track(m, fr, present, before, fit, hold_drawn)
    absent = [p for p in range(m.P) if p not in present and p not in banned]
    joined = _join(m, fr, present, absent, decision, fit, n_valid)
    if len(joined) > 1:
        _place_again(m, fr, present, joined)
    present.sort()
    if joined:
        _split_pairs(m, fr, present, joined, before)
    res = _decide(m, fr, state, present, set(joined), decision, fit, n_valid)
    res.ran_off = tuple(fr.ran_off)
    return res


def _track(m: PhaseModel, fr: "_Frame", present: list[int], before: np.ndarray, fit: FitSpec,
           hold_drawn: bool = False) -> None:
    """Step 1: the phases of the frame before, each searched around its last cell (and similar
    pairs jointly), then fitted alone; a cell that runs to the end of its step has jumped, or is
    chasing another phase: it leaves ``present`` to be searched for afresh. One that has a
    similar phase absent is noted in ``fr.ran_off``; with ``hold_drawn`` it stays, held where
    the frame before had it, for that phase to be searched beside it."""
    st = fr.state
    for p in present:
        st.cell[p], _, _ = fr.search(p, present, around=st.cell[p], halves=fr.track_halves(p, _TRACK_FWHM))
    _pair_searches(m, fr, present, before, tracked=True)
    sol = _fit_rows(m, fr, [tuple(present)], fit)
    if sol is not None and np.isfinite(sol.chi2[0]):
        _adopt(m, st, sol.p[0], present)
        for p in [q for q in present if _at_edge(m, sol, q)]:
            # its widths as they were: chasing another's line broadened them (Al's (200) from
            # 0.069 to 0.100° after P3's (015) beside it), and its search then found nothing
            st.fwhm[p] = fr.before_fwhm[p]
            drawn = fr.tracked[p] and any(a == p and q not in present for a, q, _, _ in m.order)
            if drawn:
                fr.ran_off.append(p)
            if drawn and hold_drawn:
                st.cell[p] = fr.before[p]
            else:
                present.remove(p)


def _join(m: PhaseModel, fr: "_Frame", present: list[int], absent: list[int], decision: list[str],
          fit: FitSpec, n_valid: int) -> list[int]:
    """Step 2: every other phase searched over its range against what is present; the one that
    improves the fit most plausibly (BIC, then nearest its last cell) joins, and the others are
    searched again beside it. Returns the phases that joined, in order (``present`` grows,
    ``absent`` shrinks, ``decision`` says why a phase stayed out)."""
    st = fr.state
    n_log = np.log(max(n_valid, 2))
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
            if (last := _last_seen(m, fr, p)) is not None:
                # a phase that comes back (O3 on discharge) comes back where it left, which its
                # cell may have reached from the typed one by a solid solution; searched there
                # too, the better kept (around the typed cell alone its a was 1.9 % off, beyond
                # the ±1.5 % searched, and P3 took O3's lines instead)
                again = fr.search(p, present, around=last)
                if again[1] < chi2_with:
                    (cell, chi2_with, chi2_without), fr.centre[p] = again, last
            gain = _gain(m, p, chi2_with, chi2_without, n_valid)
            kept = None
            if not fr.going_back and (drawn := _drawn_towards(m, fr, p, present)):
                # a similar phase followed from the frame before moved toward where p would be:
                # it may have taken p's line (half-way between the two); p is searched again
                # beside it where it was, and the joint search splits them. Where p was found
                # beside it as it moved, the better of the two searches is kept: the moved phase
                # broadened over p's lines leaves p only a wrong basin of its weakly placed
                # parameters (P3 at 11 % beside O3 broadened 1.9x: its a 1.5 % low, then run to
                # its bound by least squares and P3 dropped, 'no line at 3 of its 5 listed
                # reflections'; searched beside O3 where it was, 0.03 % from the truth)
                kept = st.cell.copy()
                st.cell[drawn] = fr.before[drawn]
                again = fr.search(p, present, around=fr.centre[p])
                gain_again = _gain(m, p, again[1], again[2], n_valid)
                taken = gain <= fit.bic_threshold or (gain_again > fit.bic_threshold and again[1] < chi2_with)
                if taken:
                    (cell, chi2_with, chi2_without), gain = again, gain_again
                if not taken or gain <= fit.bic_threshold:
                    st.cell[:] = kept
            if gain > fit.bic_threshold and (on := _on_lines_of(m, fr, p, cell, present, joined)):
                decision[p] = f"absent: on the lines of {m.phases[on[0]].name} ({on[1]:.2f} FWHM apart): one line, not two phases"
                if kept is not None:        # the drawn phase back where this frame's search put it
                    st.cell[:] = kept
                continue
            if gain > fit.bic_threshold:
                dist = float(m.range_distance(p, cell, st.cell[p]))
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
        tied = sorted((t for t in found if t[3] <= tie), key=lambda t: t[0])
        dist, p, cell, _ = tied[0]
        if (line := _declared_instead(m, fr, p, found, present, fit, n_valid)) is not None:
            # a line of no phase the experiment declares, found too, explains what made the
            # phase look present: the declared line joins first, and the phase is searched again
            # beside it (P''2 named on an impurity line by its (100), its c held)
            dist, p, cell, _ = line
            tied = [line]
        elif (nearer := _nearer_instead(m, fr, p, dist, found, present, fit, n_valid)) is not None:
            # another kind of phase found nearer its cell explains, once fitted, all that made
            # this one look present (FePO4 searched 2 % from its typed cell onto the Al
            # collector's lines and the misfit beside LiFePO4, Al then left out): it joins first
            dist, p, cell, _ = nearer
            tied = [nearer]
        # a phase of lower symmetry that can take the lines of one of higher symmetry (P'2,
        # orthorhombic, P2's: its (11l) on P2's (10l), its own (02l) left empty; O'3 and O3):
        # where both explain them within the noise, the one with fewer cell parameters is named
        # (the other's extra lines, free areas, fit nothing the data show); once the distortion
        # splits the lines, the simpler one no longer explains them within the tie (scaled, as
        # below, by the misfit left: lines no phase searched so far explains, the current
        # collector's, are taken up a little better by the one with more lines and free areas)
        loose = best + (2 * np.sqrt(2 * n_valid) + fit.bic_threshold) * max(1.0, best / max(n_valid, 1))
        # (phases of the electrode: the current collector's lines are its own, and it joins in
        # its turn)
        simpler = [t for t in found if t[1] != p and t[3] <= loose and (p, t[1]) in m.confusable
                   and m.phases[p].fraction and m.phases[t[1]].fraction and len(m.free[t[1]]) < len(m.free[p])]
        if simpler:
            other = tied[0]
            dist, p, cell, _ = min(simpler, key=lambda t: (len(m.free[t[1]]), t[0]))
            fr.named[p] = (other[1], dist, other[0], "simpler")
        similar = {b for a, b, _, _ in m.order if a == p}
        rival = next((t for t in tied[1:] if t[1] in similar), None)
        unseen = [r for r in range(m.P) if np.array_equal(st.cell[r], m.cell0[r])]
        which = "typed"
        if rival is None and p in unseen:
            # lines no phase searched so far explains (another phase's, the current
            # collector's) inflate the chi-square of every search alike: two similar phases
            # fitted to the same lines then differ by more than the noise. Within the tie scaled
            # by the misfit left, the other stays a rival for the whole-series naming check
            rival = next((t for t in found if t[1] in similar and t[1] != p and t[3] <= loose), None)
            which = "fit"
        if rival is not None and not simpler:
            # (distances from each phase's last cell: the typed one until the phase is seen)
            typed = p in unseen and rival[1] in unseen
            if typed and m.naming.get(frozenset((p, rival[1]))) == rival[1]:
                # the whole-series naming check's other run: the other name, whatever is nearer
                (dist, p, cell, _), rival = rival, tied[0]
                fr.named[p] = (rival[1], dist, rival[0], "series")
            else:
                fr.named[p] = (rival[1], dist, rival[0], which if typed else "last")
        st.cell[p] = cell
        present.append(p)
        absent.remove(p)
        joined.append(p)
        null_chi2 = np.inf
        if absent:
            # the others are searched beside what is present fitted by least squares, as the
            # phases of the frame before are (:func:`_track`): beside a phase as the search
            # placed it (widths guessed, eta unfitted) its misfit outweighs a weak phase's lines
            # (the Al of a run's first frame went unseen: ΔBIC -14 there, +4600 a frame later)
            sol = _fit_rows(m, fr, [tuple(present)], fit)
            if sol is not None and np.isfinite(sol.chi2[0]):
                _adopt(m, st, sol.p[0], present)
    return joined


#: A phase's last cell this far from where it is searched for (rms over its free parameters, in
#: search half-ranges) is searched around too (:func:`_last_seen`).
_LAST_SEEN_APART = 0.5


def _last_seen(m: PhaseModel, fr: "_Frame", p: int) -> np.ndarray | None:
    """The cell the working state keeps for an absent phase (where it was last present in this
    pass, or where a search last placed it before the frame's tests dropped it), where the
    forward pass searches for it around its typed cell and that cell lies
    :data:`_LAST_SEEN_APART` or more from it; else None. Searched around as well as the typed
    cell, the better kept: a last cell where the phase was wrongly placed leads no search astray
    on its own. (Going back, the search is already around the nearest cell the forward pass
    found for it.)"""
    if fr.going_back or np.array_equal(fr.state.cell[p], m.cell0[p]):
        return None
    last = fr.state.cell[p]
    if not np.all(np.isfinite(last)) or m.range_distance(p, last, fr.centre[p]) < _LAST_SEEN_APART:
        return None
    return last.copy()


def _nearer_instead(m: PhaseModel, fr: "_Frame", p: int, dist: float, found: list, present: list[int],
                    fit: FitSpec, n_valid: int) -> tuple | None:
    """The found phase (a (dist, phase, cell, chi²) of ``found``) to join instead of phase ``p``:
    the first (best fitting) of another kind (not a similar pair of ``m.order``, whose naming has
    its own rules; not a line of no phase) found nearer its cell than ``p`` (``dist``, in search
    half-ranges) beside which, fitted by least squares with what is present, ``p`` searched
    again no longer passes the presence test. A search's chi-square compares the candidates
    beside what is present as the search left it: a phase with many lines and free areas
    takes up that misfit too and can outscore the phase whose lines are there. None where no
    such phase was found; the working state is as it was."""
    similar = {b for a, b, _, _ in m.order if a == p} | {a for a, b, _, _ in m.order if b == p}
    others = [t for t in found if t[1] != p and t[1] not in similar and t[1] not in m.free_line and t[0] < dist]
    if p in m.free_line or not others:
        return None
    st = fr.state
    kept = st.cell.copy(), st.fwhm.copy(), st.eta.copy()
    for other in sorted(others, key=lambda t: t[3]):
        q = other[1]
        st.cell[q] = other[2]
        sol = _fit_rows(m, fr, [tuple(sorted(present + [q]))], fit)
        gain = np.inf
        if sol is not None and np.isfinite(sol.chi2[0]):
            _adopt(m, st, sol.p[0], present + [q])
            _, chi2_with, chi2_without = fr.search(p, present + [q], around=fr.centre[p])
            gain = _gain(m, p, chi2_with, chi2_without, n_valid)
        st.cell[:], st.fwhm[:], st.eta[:] = kept
        if gain <= fit.bic_threshold:
            return other
    return None


def _declared_instead(m: PhaseModel, fr: "_Frame", p: int, found: list, present: list[int], fit: FitSpec,
                      n_valid: int) -> tuple | None:
    """The found line of no phase (``[[windows]] free_peaks``: a (dist, phase, cell, chi²) of
    ``found``) to join instead of phase ``p``: the first (best fitting) beside which ``p``,
    searched again, no longer passes the presence test. None where ``p`` is such a line, none
    was found, or ``p`` passes beside each."""
    lines = [t for t in found if t[1] in m.free_line and t[1] != p]
    if p in m.free_line or not lines:
        return None
    st = fr.state
    kept = st.cell.copy()
    for line in sorted(lines, key=lambda t: t[3]):
        st.cell[line[1]] = line[2]
        _, chi2_with, chi2_without = fr.search(p, present + [line[1]], around=fr.centre[p])
        st.cell[:] = kept
        gain = _gain(m, p, chi2_with, chi2_without, n_valid)
        if gain <= fit.bic_threshold:
            return line
    return None


def _place_again(m: PhaseModel, fr: "_Frame", present: list[int], joined: list[int]) -> None:
    """Phases found one after another in this frame: the first was placed before the others
    explained their own lines (an Al line, a second phase), and may sit on an alias. Each is
    searched again in the order they joined, beside the phases there before, those it cannot be
    confused with, and those already placed again."""
    st = fr.state
    settled = [q for q in present if q not in joined]
    for p in joined:
        similar = {b for a, b, _, _ in m.order if a == p}
        beside = settled + [q for q in joined if q != p and q not in similar and q not in settled]
        st.cell[p], _, _ = fr.search(p, beside, around=fr.centre[p])
        settled.append(p)


def _split_pairs(m: PhaseModel, fr: "_Frame", present: list[int], joined: list[int], before: np.ndarray) -> None:
    """Similar pairs split jointly where a phase joined in this frame. A new phase beside one it
    is like: the joint search split their shared line in the parameter it listens to first (c);
    the new phase's other parameters were searched before that split, beside a line not yet
    split: searched again, over its whole range, and the pair split again from there (kept only
    if the frame is explained better: a phase that may be an impostor must not be given a second
    chance to take the other's lines)."""
    st = fr.state
    widths = np.where(np.isfinite(before), before, _fwhm_table(m, fr))
    _pair_searches(m, fr, present, widths)
    if any(q in joined for a, q, _, _ in m.order if a in present):
        kept = (st.cell.copy(), st.fwhm.copy(), float(fr.linear(st.cell, present, st.zero)[1].sum()))
        for p in joined:
            st.cell[p], _, _ = fr.search(p, present, around=fr.centre[p])
        _pair_searches(m, fr, present, widths)
        if float(fr.linear(st.cell, present, st.zero)[1].sum()) >= kept[2]:
            st.cell[:], st.fwhm[:] = kept[0], kept[1]


def _decide(m: PhaseModel, fr: "_Frame", state: PhaseState, present: list[int], found_now: set[int],
            decision: list[str], fit: FitSpec, n_valid: int) -> FrameResult:
    """Step 3: all candidates fitted at once, with, in the same batch, the fits without each of
    them; the weakest that fails (:func:`_judge`) is dropped and the rest fitted again."""
    st = fr.state
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
        # a phase that took another's place goes first: the other's failure (pushed off its
        # lines) follows from it
        swaps = [q for q, text in fails.items() if text.startswith(_SWAP)]
        worst = min(swaps or fails, key=lambda q: gains[q])
        redundant = [(a, b) for a, b, _, _ in m.order if a < b and fails.get(a, "").startswith("absent: ΔBIC")
                     and fails.get(b, "").startswith("absent: ΔBIC")]
        if redundant:
            # two phases that could be confused, each redundant beside the other (one line
            # left, both can fit it): the one that stays where it was in the frame before is
            # kept, the other would have to jump onto its line (no label swap)
            a, b = redundant[0]
            worst = b if _moved(m, res, present, st, state, keep=a, drop=b) <= \
                _moved(m, res, present, st, state, keep=b, drop=a) else a
        if worst in swaps and (took := fr.took.get(worst)):
            # the phase it pushed aside starts again where it was in the frame before
            st.cell[took[0]] = fr.before[took[0]]
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
    area_err = _area_esds(m, fr, res, n_valid)
    total_area = np.array([areas[m.in_window[w]].sum() for w in range(m.W)])
    gains, fails, passed = {}, {}, {}
    widths = m.fwhm_table(res.p[0])
    for i, p in enumerate(present):
        gains[p] = n_valid * np.log(max(chi2[i + 1], 1e-300) / max(chi2[0], 1e-300)) - _n_params(m, p) * n_log

    for i, p in enumerate(present):
        gain = gains[p]
        mine = areas[m._refl_of_phase[p]].sum()
        windows = np.zeros(m.W, bool)             # (the windows of its lines, in order)
        windows[m.r_window[m._refl_of_phase[p][inner[m._refl_of_phase[p]]]]] = True
        touched = total_area[windows].sum()
        share = mine / touched if touched > 0 else 0.0
        gains[p] = gain
        if gain <= fit.bic_threshold:
            fails[p] = f"absent: ΔBIC {gain:.1f} <= {fit.bic_threshold:g}"
        elif missing := _lines_missing(m, areas, inner, p, area_err, held):
            fails[p] = missing
        elif share < fit.min_fraction and m.phases[p].fraction:
            # (a phase kept out of the fractions, the current collector, is there when the
            # data say so: its lines are narrow and weak, and left out they pull others')
            fails[p] = f"absent: {100 * share:.2g} % of the area < min_fraction"
        elif (same := _coincident(m, fr, p, cells_now, widths, present)) and _goes(fr, p, same[0], gains):
            fails[p] = (f"absent: on the lines of {m.phases[same[0]].name} ({same[1]:.2f} FWHM apart): "
                        f"one line, not two phases")
        elif took := _in_place_of(m, fr, p, cells_now, lambda p=p: _shown(m, areas, inner, p, area_err, held)):
            fr.took[p] = took
            fails[p] = f"{_SWAP} {m.phases[took[0]].name} held in the frame before ({took[1]:.2f} FWHM from its lines there)"
        elif m.phases[p].fraction and (own := _own_share(m, fr, p, cells_now, widths, present, areas, inner,
                                                         total_area)) and own[0] < fit.min_fraction:
            # a line of one phase split between it and the same reflection of a similar phase
            # (areas free, the two coincident: O3's and P3's (015) 0.001° apart) makes the second
            # look present by the shape of the first's profile: its share counts where its lines
            # are its own (a P3 at 0.6 % of the 003 and 104 windows held 80 % of the 015 line for
            # 19 frames of O3 alone, and biased the run's zero shift by 0.001°)
            fails[p] = (f"absent: {100 * own[0]:.2g} % of the area where its lines are not on "
                        f"{m.phases[own[1]].name}'s < min_fraction")
        elif trouble := _cell_trouble(m, res, p, present, held, found_now, gains, cells_now):
            fails[p] = trouble
        else:
            passed[p] = _present_text(m, fr, p, gain, found_now, areas, inner)
    return gains, fails, passed, areas, inner


def _goes(fr: "_Frame", p: int, q: int, gains: dict) -> bool:
    """Of two phases on one set of lines (:func:`~xrdpipe.phasefit.neighbours._coincident`),
    whether ``p`` is the one that goes: the one not followed from the frame before where the
    other is, else the one whose absence costs less (ΔBIC; ``q`` first on a tie)."""
    if fr.tracked[p] != fr.tracked[q]:
        return not fr.tracked[p]
    return gains[p] < gains.get(q, np.inf) or (gains[p] == gains.get(q, np.inf) and p > q)


def _cell_trouble(m: PhaseModel, res, p: int, present: list[int], held: set[int], found_now: set[int],
                  gains: dict, cells: np.ndarray) -> str:
    """What is wrong with a phase's cell in a frame's fit, or "": "refit" where a cell column
    was added to ``held`` (pressed against a phase it could be confused with, run to the edge of
    its reach while its other parameters are not, or crossed another phase's where it is the
    minor one or new), else its "absent: ..." reason."""
    pressed = [c for c in m.cell_cols[p] if c in res.order_cols and c not in held and _at_bound(res, c)]
    crossed = [(q, j) for a, q, j, _ in m.order
               if a == p and q in present and res.signs[a, q, j]
               and np.sign(cells[p, j] - cells[q, j]) != res.signs[a, q, j]]
    swapped = [m.phases[q].name for q, _ in crossed]
    if pressed and len(pressed) < len(m.cell_cols[p]):
        # pressed against another phase it could be confused with: the lines do not tell
        # them apart in this parameter; hold it and fit again
        held.update(pressed)
        return "refit"
    if _at_edge(m, res, p):
        edge = [c for c in m.cell_cols[p] if c not in held and _at_bound(res, c)]
        if edge and len(edge) < len(m.cell_cols[p]):
            # the phase is there, but a cell parameter runs away (its lines lie under
            # another phase's): hold it and fit again
            held.update(edge)
            return "refit"
        return "absent: cell at the edge of its reach"
    if swapped and (p in found_now or gains[p] < min(gains.get(q, np.inf) for q in range(m.P)
                                                     if m.phases[q].name in swapped)):
        cols = [m.cell_cols[p][m.free[p].index(n)] for n in m.free[p]
                if _CELL_INDEX[n] in {j for _, j in crossed}]
        cols = [c for c in cols if c not in held]
        if cols and len(cols) < len(m.cell_cols[p]):
            # a parameter of a minor phase crossed another phase's (its lines lie
            # under the other's): hold it where the search put it and fit again
            held.update(cols)
            return "refit"
        return f"absent: would take the place of {', '.join(swapped)}"
    return ""


def _present_text(m: PhaseModel, fr: "_Frame", p: int, gain: float, found_now: set[int], areas: np.ndarray,
                  inner: np.ndarray) -> str:
    """The decision of a phase that passes every test: its ΔBIC, how it was found and named, and
    whether its areas make it a suspect."""
    text = f"present: ΔBIC {gain:.0f}" + (", found by the cell search" if p in found_now else "")
    if p in found_now and p in fr.named:
        # the lines could have been either phase's: say why they carry this name
        q, d_p, d_q, which = fr.named[p]
        if which == "simpler":
            text += (f"; named {m.phases[p].name}, not {m.phases[q].name}: fewer cell parameters explain its lines "
                     f"within the noise (typed cells {d_p:.2f} against {d_q:.2f} of the search range)")
        elif which == "series":
            text += (f"; named {m.phases[p].name}, not {m.phases[q].name}, by the whole-series naming check "
                     f"(typed cells {d_p:.2f} against {d_q:.2f} of the search range)")
        elif which == "fit":
            text += (f"; named {m.phases[p].name}, not {m.phases[q].name}: its search fits the lines a little "
                     f"better (typed cells {d_p:.2f} against {d_q:.2f} of the search range)")
        else:
            text += (f"; named {m.phases[p].name}, not {m.phases[q].name}: its {which} cell is nearer "
                     f"({d_p:.2f} against {d_q:.2f} of the search range)")
    # (a phase whose areas are unlike its own is a suspect: the frame is fitted again without
    # it, and the better of the two kept, in fit_frame)
    if suspect := _unlike(m, fr.state, areas, inner, p):
        text += "; " + suspect
    return text


def _area_esds(m: PhaseModel, fr: "_Frame", res, n_valid: int) -> np.ndarray:
    """(R,) the esds of the line areas of a frame's fit (row 0), scaled by the frame's reduced
    chi-square (with data esds only where it exceeds 1: :func:`~xrdpipe.phasefit.solve.esd_scale`); NaN for an area
    at its bound. Deliberately the frame-wide factor, not the per-window one of the recorded
    esds (:func:`~xrdpipe.phasefit.solve.window_scaled`): the line test stays as cautious in a
    window that fits well as in the worst one."""
    with np.errstate(invalid="ignore"):
        err = np.sqrt(np.diagonal(res.cov[0]))[m.area_col]
    free = int(np.count_nonzero(np.isfinite(np.diagonal(res.cov[0]))))
    return err * np.sqrt(esd_scale(m, fr, float(res.chi2[0]) / max(n_valid - free, 1)))


def _lines_missing(m: PhaseModel, areas: np.ndarray, inner: np.ndarray, p: int, area_err: np.ndarray,
                   held: set[int] = frozenset()) -> str:
    """Why phase ``p`` is not the phase the user named, or "": a phase that is there shows its
    listed reflections; one that explains a line of another phase with one reflection while its
    listed ones (its basal line) stay empty is not it (a listed line that left its window, or
    sits on its edge, counts as not shown). A line is shown when its area exceeds
    :data:`_SHOWN_Z` esds: the areas are not negative, and an empty line's noise leaves it above
    zero half the time. A line placed by held cell parameters only (``held``: columns the data
    did not determine) is not shown either: where the data do not place it, its area is
    whatever lies there (another phase's Voigt tail under P''2's (002) while its (100) took an
    impurity's line)."""
    listed = m.listed_of[p]
    shown = int(np.count_nonzero(_shown(m, areas, inner, p, area_err, held)[listed]))
    if listed.size >= 2 and shown < (listed.size + 1) // 2:
        return f"absent: no line at {listed.size - shown} of its {listed.size} listed reflections"
    return ""


def _shown(m: PhaseModel, areas: np.ndarray, inner: np.ndarray, p: int, area_err: np.ndarray,
           held: set[int] = frozenset()) -> np.ndarray:
    """(R,) the listed lines of phase ``p`` (with data) shown in a fit (:func:`_lines_missing`):
    inside their window, an area above :data:`_SHOWN_Z` esds (above 0 where it has none), and
    placed by a cell parameter not ``held``."""
    listed = m.listed_of[p]
    err = area_err[listed]
    above = np.where(np.isfinite(err), areas[listed] > _SHOWN_Z * err, areas[listed] > 0)
    fixed = [_CELL_INDEX[n] for n, c in zip(m.free[p], m.cell_cols[p]) if c in held]
    if fixed:
        moving = [_CELL_INDEX[n] for n, c in zip(m.free[p], m.cell_cols[p]) if c not in held]
        above &= m.r_dep[np.ix_(listed, moving)].any(axis=1) if moving else False
    out = np.zeros(m.R, bool)
    out[listed] = above & inner[listed]
    return out


def _unlike(m: PhaseModel, st: PhaseState, areas: np.ndarray, inner: np.ndarray, p: int) -> str:
    """Why phase ``p`` is a suspect, or "": a phase seen alone before has its relative
    intensities; one whose areas over the windows are far from a multiple of them explains
    fragments of other phases' lines (areas are free per line) and is not that phase."""
    ref = None if st.ref_area is None else st.ref_area[p]
    if ref is None or not m.phases[p].fraction:
        return ""
    mine = np.array([areas[m._refl_of[p][w]].sum() for w in range(m.W)])
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
    out.named = next(((p, q) for p, (q, _, _, which) in fr.named.items() if keep[p] and which not in ("last", "simpler")), None)
    alone = [p for p in present if m.phases[p].fraction]
    if ok and len(alone) == 1:
        # the only phase (with a fraction) present: its areas are its own relative intensities
        p = alone[0]
        ref = np.full(m.W, np.nan)
        for w in range(m.W):
            rows = m._refl_of[p][w]
            rows = rows[inner[rows]]
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
    if not (before.present[keep] and np.isfinite(m.range_distance(keep, prev, prev))):
        return np.inf
    return float(m.range_distance(keep, cell, prev))


def _gain(m: PhaseModel, p: int, chi2_with: float, chi2_without: float, n_valid: int) -> float:
    """The presence test's ΔBIC of phase ``p`` from a search: what its place lowers the misfit
    (``chi2_without`` to ``chi2_with`` over ``n_valid`` points) less what its parameters cost."""
    return n_valid * np.log(max(chi2_without, 1e-300) / max(chi2_with, 1e-300)) - _n_params(m, p) * np.log(max(n_valid, 2))


def _n_params(m: PhaseModel, p: int) -> int:
    """Parameters a phase adds: its free cell, widths per window, eta and areas."""
    return m.n_params[p]


def _adopt(m: PhaseModel, st: PhaseState, theta: np.ndarray, phases: Sequence[int]) -> None:
    """Take the cells, widths and eta of ``phases`` from a solution into the working state."""
    cells = m.cells(theta[None], st.cell)[0]
    for p in phases:
        st.cell[p] = cells[p]
        for w in range(m.W):
            if m.fwhm_col[p, w] >= 0 and theta[m.area_col[m._refl_of[p][w]]].sum() > 0:
                st.fwhm[p, w] = theta[m.fwhm_col[p, w]]
        st.eta[p] = theta[m.eta_col[p]]
