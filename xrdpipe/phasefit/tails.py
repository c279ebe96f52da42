"""The far tails of a frame's lines in the other windows (:func:`far_tails`), and the frame
fitted again with them subtracted (:func:`without_far_tails`).

A window's model holds the reflections within its reach: its lines, and the tails of lines
within :data:`~xrdpipe.phasefit.model._TAIL_FWHM` widths of its edges, or, for a reflection that
is a line in no window (seen by its tail alone), as far out as it is listed
(:meth:`~xrdpipe.phasefit.model.PhaseModel.inside`); a reflection farther out has its area held
at 0 there. A strong line farther away still reaches the window with its
Lorentzian tail, eta * area * FWHM / (2 pi d^2) at a distance d: on 2D frames O3's (104) line,
11 FWHM below the 015 window, put ~530 counts on its lower edge and ~100 on its upper one (bins
with esds of ~1 count), a curvature its linear background could not take: the window fitted to a
reduced chi-square of ~600, which widened the esds of everything it determines.

The tails are drawn from the frame's own solution (each line's area, centre, width and eta in
the window where it is a line) and subtracted from the data of the windows where the model does
not fit that reflection; those are then fitted again by least squares from that solution, with
the same phases. The decisions (which phases, found how) are those of the frame's first fit, made
without the tails by the searches and the least squares alike (a model whose searches and least
squares see different tails misplaced a phase at its onset); the second fit only moves the
parameters (cells, areas, widths, backgrounds) to what the data less the tails say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import kernels
from ..lineshapes import pseudo_voigt
from .frame import FrameResult, _Frame
from .solve import _fit_rows, _fwhm_table, _held, _result, least_squares

if TYPE_CHECKING:
    from ..config import FitSpec
    from .model import PhaseModel

#: Tails are subtracted where they reach this share of an esd at some point of a window (less
#: changes nothing a reader would see, and costs a least-squares fit).
_FAR_TAIL_ESD = 0.5


def far_tails(m: PhaseModel, theta: np.ndarray, base: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(M,) on the concatenated windows: the sum, over the lines of the ``present`` phases of a
    solution ``theta`` (cells from ``base``), of each line's profile in the windows whose model
    does not fit that reflection (not listed there, or listed beyond the zone where its tail is
    fitted, its area held at 0). A line is a reflection inside its window (its area measured
    there, not a tail's); its profile is its pseudo-Voigt (its phase's FWHM there, and eta)."""
    cells = m.cells(theta[None], base)[0]
    zero = float(theta[m.zero_col])
    fw = m.fwhm_table(theta)
    inner, fitted = m.inside_both(cells, zero, fw)        # lines; and the tails fitted as such
    area = theta[m.area_col]
    cen = m.centres(cells[None], np.array([zero]))[0]
    width = fw[m.r_phase, m.r_window]                    # each line's width where it is a line
    eta = theta[m.eta_col[m.r_phase]]
    out = np.zeros(m.n_points)
    with np.errstate(invalid="ignore"):
        lines = np.flatnonzero(inner & (area > 0) & present[m.r_phase] & np.isfinite(width) & (width > 0)
                               & np.isfinite(eta))
    if not lines.size:
        return out
    # the windows whose model fits a reflection (as a line or a tail), per reflection of a phase
    modelled = np.zeros((int(m.r_group.max()) + 1, m.W), bool)
    modelled[m.r_group[fitted], m.r_window[fitted]] = True
    reach = ~modelled[m.r_group[lines]] & m.window_has_data[None, :]      # (lines, W)
    if lines.size <= 128:          # (compiled, every window in one call: the same numbers as below)
        _, win_lo, win_hi, _ = m.linear_layout()
        kernels.add_lines_reach(m.x_all, win_lo, win_hi, np.ascontiguousarray(reach), cen[lines], width[lines],
                                area[lines], eta[lines], out)
        return out
    for w in np.flatnonzero(reach.any(axis=0)):
        sel = lines[reach[:, w]]
        win = m.windows[w]
        if sel.size <= 128:        # (compiled: the same numbers as below)
            kernels.add_lines(win.x, cen[sel], width[sel], area[sel], eta[sel], out[win.points])
        else:
            out[win.points] += pseudo_voigt(win.x[:, None], cen[sel], width[sel], area[sel], eta[sel]).sum(axis=1)
    return out


def without_far_tails(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, res: FrameResult,
                      fit: FitSpec, subtracted: np.ndarray | None = None) -> FrameResult:
    """The frame ``res`` fitted again by least squares, from its solution and with its phases,
    on the data less the far tails of its own lines (:func:`far_tails`); ``res`` itself where
    the tails stay below :data:`_FAR_TAIL_ESD` of an esd everywhere (or, without esds, below
    that share of the data's scatter), where ``res`` was fitted on data less ``subtracted``
    (its tails as the frame before left them, the steady path's) that differ from them by less
    than that, or where the second fit fails. The decisions are ``res``'s, each present phase's
    ending with the largest tail subtracted."""
    if not res.success or not res.present.any():
        return res
    tails = far_tails(m, res.theta, res.state.cell, res.present)
    fr = _Frame(m, y - tails, sigma, res.state)
    before = np.zeros_like(tails) if subtracted is None else subtracted
    if fr.has_errors:
        reach = float(np.max(np.abs(tails) * fr.w))
        moved = float(np.max(np.abs(tails - before) * fr.w))
    else:
        resid = (fr.y0 - m.value_jac(res.theta[None], res.state.cell)[0][0]) * fr.w
        scatter = float(np.sqrt(np.mean(resid[fr.valid] ** 2))) if fr.valid.any() else 0.0
        reach = float(np.max(np.abs(tails))) / scatter if scatter > 0 else 0.0
        moved = float(np.max(np.abs(tails - before))) / scatter if scatter > 0 else 0.0
    if reach < _FAR_TAIL_ESD and subtracted is None:
        return res
    unit = "esd" if fr.has_errors else "of the scatter"
    decision = [d + (f"; far tails of other windows' lines subtracted (up to {reach:.3g} {unit})" if res.present[p]
                     else "") for p, d in enumerate(res.decision)]
    if moved < _FAR_TAIL_ESD:
        # (its decisions and least squares saw the data less its tails as the frame before
        # left them, within half an esd of its own: nothing to fit again)
        res.decision = decision
        return res
    present = [int(p) for p in np.flatnonzero(res.present)]
    held = {int(c) for p in present for c in m.cell_cols[p] if not np.isfinite(res.err[c])}
    if any(res.present[p] and res.present[q] for p, q, _, _ in m.order):
        # two similar phases share lines: the split of them may move, from areas solved afresh
        sol = _fit_rows(m, fr, [tuple(present)], fit, frozenset(), held)
    else:
        sol = _refit(m, fr, res.theta, present, held, fit)
    if sol is None or not np.isfinite(sol.chi2[0]) or sol.status[0] == -1:
        return res
    message = res.message if sol.status[0] == 1 else f"no convergence in {fit.max_iter} iterations"
    return _result(m, fr, sol.p[0], sol.cov[0], res.present.copy(), decision, True, message)


def _refit(m: PhaseModel, fr: _Frame, theta: np.ndarray, present: list[int], held: set[int], fit: FitSpec):
    """Least squares of the frame's data less the far tails (``fr``, its state the solution's)
    from the frame's solution ``theta`` itself, with the phases ``present`` and the columns
    ``held`` held, within the model's own bounds. The tails are smooth and small beside the
    lines: the solution moves by a small fraction of an esd (areas and backgrounds, linear, the
    most), so it is not solved linearly afresh, nor bounded as a frame's first fit is (each
    tracked cell within a line width of the frame before, two similar phases each on its side):
    those bounds hold the solution it starts from. Two or three iterations, where a fit from
    the state took four to five and its set-up as long again."""
    st = fr.state
    hold = _held(m, present)
    hold[list(held)] = True
    outside = ~m.inside(st.cell, st.zero, _fwhm_table(m, fr), tails=True)
    hold[m.area_col[outside]] = True
    start = theta.copy()
    start[m.area_col[outside]] = 0.0
    base = st.cell.copy()
    return least_squares(m, fr, base, start[None], hold[None], m.lower, m.upper, fit.max_iter,
                         amplitudes=m.lone_lines, weak_z=2.0, covariance=[0])
