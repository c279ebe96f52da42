"""Tied tails: a line's Lorentzian tail where it reaches a neighbouring window.

A strong line's tail is still about 1e-3 of its height 10 FWHM away: in the window next to it,
a bin averaged over thousands of pixels sees it at tens of esds, and a window's linear
background cannot follow its curvature (a χ²/ν of 100-300 in the window beside a strong line of
2D frames). The line is fitted in its own window (its home); in each neighbouring window within
:data:`_TIED_REACH` window widths of where the line can go, the same line is drawn again with
the same area, centre, width and eta: its tail there costs no parameter. The neighbouring
window's own row for that reflection (listed there for the search) is then held at 0, so the
line is counted once (:func:`held_twins`).
"""

from __future__ import annotations

import numpy as np

#: A line's tail is drawn in another window whose nearer edge lies within this many of that
#: window's widths from the line's reach (windows that overlap its own excepted: there the line
#: is its own row).
_TIED_REACH = 1.0


def tied_tails(m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tied tails of model ``m`` (a :class:`~xrdpipe.phasefit.model.PhaseModel` with its
    reflections listed): per tail its source row (the line in its home window), the window it
    is drawn in, and the row of the same reflection listed in that window (-1: none)."""
    src, win, twin = [], [], []
    spans = [s.range for s in m.specs]
    for r in range(m.R):
        home = int(m.r_window[r])
        lo_h, hi_h = spans[home]
        r_lo, r_hi = m.r_reach[r]
        if r_hi < lo_h or r_lo > hi_h:
            continue                        # never inside its own window: never fitted there
        for w in range(m.W):
            if w == home or not m.windows[w].x.size:
                continue
            lo_w, hi_w = spans[w]
            if lo_w < hi_h and lo_h < hi_w:
                continue                    # overlapping windows: the line is a row of both
            gap = max(lo_w - r_hi, r_lo - hi_w, 0.0)
            if gap > _TIED_REACH * (hi_w - lo_w):
                continue
            same = np.flatnonzero((m.r_window == w) & (m.r_phase == m.r_phase[r]) & (m.r_key == m.r_key[r]))
            src.append(r)
            win.append(w)
            twin.append(int(same[0]) if same.size else -1)
    as_int = lambda v: np.asarray(v, np.int64)     # noqa: E731
    return as_int(src), as_int(win), as_int(twin)


def held_twins(m, inner: np.ndarray, free: np.ndarray) -> np.ndarray:
    """(R,) rows whose area is held at 0 because their line is drawn by a tied tail: a row in a
    window whose reflection is a line inside its home window (``inner``) there. Where a tied
    tail's source is only a free tail in its own window (``free``: near the edge, outside it)
    and the row of the same reflection in the other window is free too, the line would be
    counted twice: the source is held (the other row, or its own tied tail, draws it)."""
    held = np.zeros(m.R, bool)
    for r, t in zip(m.tail_src, m.tail_twin):
        if t < 0:
            continue
        if inner[r]:
            held[t] = True
        elif free[r] and free[t]:
            held[r] = True
    return held
