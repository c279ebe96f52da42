"""Rules about a similar phase beside the one searched (:mod:`xrdpipe.phasefit.decide`): a
followed phase drawn toward a newcomer's line, a newcomer that lands on a followed phase's
lines, and a phase that took the place another held in the frame before."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .model import _BROADENED, _DRAWN, _ONE_LINE, _SAME_LINE, PhaseModel

if TYPE_CHECKING:
    from .frame import _Frame


def _on_lines_of(m: PhaseModel, fr: "_Frame", p: int, cell: np.ndarray, present: list[int],
                 placed: Sequence[int] = ()) -> tuple[int, float] | None:
    """(q, distance) when phase ``p`` at ``cell`` puts every listed line within :data:`_SAME_LINE`
    FWHM of the same reflection of a similar phase ``q`` present and followed from the frame
    before, or within :data:`_ONE_LINE` FWHM of those of one ``placed`` (found) in this frame
    before ``p`` (the largest distance, in q's narrower width of this frame and the one
    before); else None."""
    st = fr.state
    cells = st.cell.copy()
    cells[p] = cell
    cen = m.centres(cells[None], np.array([st.zero]))[0]
    mine = m.listed_of[p]
    for a, q, _, _ in m.order:
        if a != p or q not in present or not (fr.tracked[q] or q in placed) or not mine.size:
            continue
        far = 0.0
        for i in mine:
            twin = _twin(m, q, i)
            if twin is None:
                far = np.inf
                break
            far = max(far, abs(cen[i] - cen[twin]) / _narrower_width(fr, q, int(m.r_window[i])))
        if far <= (_SAME_LINE if fr.tracked[q] else _ONE_LINE):
            return q, far
    return None


def _coincident(m: PhaseModel, fr: "_Frame", p: int, cells: np.ndarray, widths: np.ndarray,
                present: list[int]) -> tuple[int, float] | None:
    """(q, distance) when phases ``p`` and ``q``, both present in a fit with ``cells`` and FWHM
    ``widths`` (P, W), are similar and every listed line of ``p`` lies within
    :data:`_ONE_LINE` FWHM (the narrower of the two phases' widths there) of ``q``'s same
    reflection: one set of lines, not two phases (the second one explains what the profile
    leaves of the first: a real line is not exactly the model's pseudo-Voigt, and at beamline
    counts the rest is many esds). The largest distance; else None."""
    cen = m.centres(cells[None], np.array([fr.state.zero]))[0]
    mine = m.listed_of[p]
    if not mine.size:
        return None
    for a, q, _, _ in m.order:
        if a != p or q not in present:
            continue
        far = 0.0
        for i in mine:
            far = max(far, _apart(m, cen, widths, p, q, int(i))[1])
            if far == np.inf:
                break
        if far <= _ONE_LINE:
            return q, far
    return None


def _own_share(m: PhaseModel, fr: "_Frame", p: int, cells: np.ndarray, widths: np.ndarray, present: list[int],
               areas: np.ndarray, inner: np.ndarray, total_area: np.ndarray) -> tuple[float, int] | None:
    """(share, q): phase ``p``'s share of the area (``areas`` (R,) of the lines ``inner``,
    ``total_area`` (W,) per window) counted only over its lines that are its own, not within
    :data:`_ONE_LINE` FWHM of the same reflection of a similar phase ``q`` present (``cells``
    (P, 6), FWHM ``widths`` (P, W)): where two such lines coincide their areas are free, and
    the split between them follows the profile's shape, not the phases. None where none of its
    lines, or all of them, lie on such a line (the whole set is :func:`_coincident`'s)."""
    similar = [q for a, q, _, _ in m.order if a == p and q in present]
    if not similar:
        return None
    cen = m.centres(cells[None], np.array([fr.state.zero]))[0]
    rows = m._refl_of_phase[p]
    rows = rows[inner[rows]]
    own, on = [], None
    for i in rows:
        for q in similar:
            twin, far = _apart(m, cen, widths, p, q, int(i))
            if twin is not None and inner[twin] and far <= _ONE_LINE:
                on = q
                break
        else:
            own.append(int(i))
    if on is None or not own:
        return None
    windows = np.zeros(m.W, bool)
    windows[m.r_window[own]] = True
    touched = float(total_area[windows].sum())
    return (float(areas[own].sum()) / touched if touched > 0 else 0.0), on


def _apart(m: PhaseModel, cen: np.ndarray, widths: np.ndarray, p: int, q: int, i: int) -> tuple[int | None, float]:
    """(q's row of reflection ``i`` of phase ``p``, how far apart their centres ``cen`` (R,)
    lie in the narrower of the two phases' FWHM ``widths`` (P, W) in its window); the distance
    is infinite where ``q`` has no such reflection there or no width."""
    twin = _twin(m, q, i)
    w = int(m.r_window[i])
    width = _nanmin2(float(widths[p, w]), float(widths[q, w]))
    if twin is None or not np.isfinite(width) or width <= 0:
        return twin, np.inf
    return twin, abs(cen[i] - cen[twin]) / width


def _nanmin2(a: float, b: float) -> float:
    """``np.nanmin([a, b])`` of two floats (NaN where both are), without its overhead."""
    if a != a:
        return b
    if b != b:
        return a
    return b if b < a else a


def _twin(m: PhaseModel, q: int, i: int) -> int | None:
    """Phase ``q``'s row of reflection ``i``'s hkl in the same window, or None."""
    twin = int(m.twins[q, i])
    return twin if twin >= 0 else None


def _narrower_width(fr: "_Frame", q: int, w: int) -> float:
    """Phase ``q``'s narrower FWHM in window ``w``, now or in the frame before: the unit of the
    rules of one line (q broadens where a newcomer grows beside it: two lines 1 FWHM apart are
    not one)."""
    now = fr.fwhm_of(q, w)
    return min(now, fr.before_fwhm[q, w]) if np.isfinite(fr.before_fwhm[q, w]) else now


def _in_place_of(m: PhaseModel, fr: "_Frame", p: int, cells: np.ndarray,
                 shown: Callable[[], np.ndarray] | None = None) -> tuple[int, float] | None:
    """(q, distance) when phase ``p`` at ``cells[p]`` took the place of a similar phase ``q``
    followed from the frame before, a label swap (the largest of the distances below, in q's
    narrower width of this frame and the one before); else None. Either

    * ``p``, present in the frame before, puts at least half its listed lines within
      :data:`_SAME_LINE` FWHM of q's same reflections where q was, each nearer to it than to
      where ``p``'s own line was. A phase that vanished beside a similar one 1 FWHM away reaches
      the other's line with its local search, or is found there by the cell search (its a on an
      alias: its 00l lines on the other's, its (100) elsewhere), while the other is pushed aside
      and then found to have no lines: P2 named on P''2's line for the rest of a run; or
    * of its lines ``shown()`` (R,) in the fit (:func:`~xrdpipe.phasefit.decide._shown`), at least
      two, and more than half, lie within :data:`_ONE_LINE` FWHM of q's same reflections where q
      was (and, for a phase present in the frame before, nearer to them than to its own): P2,
      gone, found again with its 00l lines on P''2's (c as P''2's within 0.0014 Å) and its (100)
      on an impurity's line, its other lines empty, P''2 pushed aside with its c held.

    A newcomer with every listed line on a followed phase's is :func:`_on_lines_of`'s."""
    others = [q for a, q, _, _ in m.order if a == p and fr.tracked[q]]
    mine = m.listed_of[p]
    if not others or not mine.size or (not fr.tracked[p] and shown is None):
        return None
    zero = np.array([fr.state.zero])
    now = m.centres(cells[None], zero)[0]
    was = m.centres(np.where(np.isfinite(fr.before), fr.before, cells)[None], zero)[0]
    seen = np.zeros(0, int) if shown is None else np.flatnonzero(shown()[mine])
    for q in others:
        far = np.full(mine.size, np.inf)
        own = np.full(mine.size, np.inf)
        for k, i in enumerate(mine):
            twin = _twin(m, q, i)
            if twin is not None:
                width = _narrower_width(fr, q, int(m.r_window[i]))
                far[k] = abs(now[i] - was[twin]) / width
                own[k] = abs(now[i] - was[i]) / width if fr.tracked[p] else np.inf
        nearer = far < own
        taken = np.flatnonzero(nearer & (far <= _SAME_LINE))
        if fr.tracked[p] and taken.size and 2 * taken.size >= mine.size:
            return q, float(far[taken].max())
        on = seen[nearer[seen] & (far[seen] <= _ONE_LINE)]
        if on.size >= 2 and 2 * on.size > seen.size:
            return q, float(far[on].max())
    return None


def _drawn_towards(m: PhaseModel, fr: "_Frame", p: int, present: list[int]) -> list[int]:
    """The present phases similar to the absent phase ``p``, followed from the frame before, that
    moved toward ``p``'s search centre by more than :data:`_DRAWN` of the distance between them
    in a parameter that orders the pair, or broadened by more than :data:`_BROADENED`: a newcomer's
    line half-way taken by the phase beside it (fast changes between frames)."""
    st = fr.state
    out = []
    for a, r, j, _ in m.order:
        if a != p or r not in present or not fr.tracked[r]:
            continue
        gap = fr.centre[p, j] - fr.before[r, j]
        moved = (st.cell[r, j] - fr.before[r, j]) * np.sign(gap)
        with np.errstate(invalid="ignore"):
            broader = np.nanmax(st.fwhm[r] / fr.before_fwhm[r]) if np.isfinite(fr.before_fwhm[r]).any() else 0.0
        if (abs(gap) > 0 and moved > _DRAWN * abs(gap)) or broader > _BROADENED:
            out.append(r)
    return sorted(set(out))
