"""The least squares of a frame (:func:`_fit_rows`: every phase subset in one batch, within the
reach and order of the phases), the columns held for a subset, and a frame's result with its
derived quantities (centres, d-spacings, volumes and their esds)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import kernels
from ..batchfit import least_squares_batch
from ..config import FitSpec
from ..windows import d_from_radial
from .frame import FrameResult, _Frame, _median
from .model import _CELL_INDEX, _CELL_NAME, _TRACK_FWHM, PhaseModel, PhaseState


def _fwhm_table(m: PhaseModel, fr: "_Frame") -> np.ndarray:
    """(P, W) the widths the frame's fit starts from."""
    known = fr.state.fwhm
    if np.all((np.isfinite(known) & (known > 0))[m.has]):     # (each the state's own: fwhm_of's)
        return np.where(m.has, known, np.nan)
    return np.array([[fr.fwhm_of(p, w) if m.has[p, w] else np.nan for w in range(m.W)] for p in range(m.P)])


def _at_bound(res, c: int, row: int = 0) -> bool:
    return bool(res.p[row, c] <= res.lower[c] + 1e-9 * abs(res.lower[c])
                or res.p[row, c] >= res.upper[c] - 1e-9 * abs(res.upper[c]))


def _fit_rows(m: PhaseModel, fr: "_Frame", rows: list[tuple[int, ...]], fit: FitSpec, found: set[int] = frozenset(),
              held: set[int] = frozenset(), descend: bool = False):
    """Least squares of the frame for each phase subset in ``rows`` at once (one batch), from
    the working state's cells, areas and background solved linearly. The first row is the
    largest model: if it ends above a nested one (a local minimum), it is started again from
    that one; its covariance is the only one computed (the nested rows serve the tests of
    presence by their chi-square). None if the first row diverged. With ``descend`` the first
    row ends only where a step promises no more than the tolerance (never on a step cut by the
    bounds that promises a rise: ``must_descend``), as every row does in a frame that follows no
    phase."""
    st = fr.state
    outside = ~m.inside(st.cell, st.zero, _fwhm_table(m, fr), tails=True)
    starts, holds = [], []
    for subset, theta in zip(rows, fr.linear_rows(st.cell, rows, st.zero)):
        hold = _held(m, subset)
        hold[list(held)] = True
        hold[m.area_col[outside]] = True
        theta[m.area_col[outside]] = 0.0
        starts.append(theta)
        holds.append(hold)
    theta0, hold = np.array(starts), np.array(holds)
    base = st.cell.copy()
    lower, upper, order_cols, signs = _bounds(m, fr, rows[0], found)

    # a frame that follows no phase (a pass's first, or after frames with none) starts from
    # the searches' cells, not from a converged solution: its fits end only where a step
    # promises no more than the tolerance (see least_squares_batch's ``must_descend``)
    fresh = not fr.tracked.any()

    def run(theta, hold_rows):
        n = theta.shape[0]
        return least_squares(m, fr, base, theta, hold_rows, lower, upper, fit.max_iter, amplitudes=m.lone_lines,
                             weak_z=2.0, must_move=np.arange(n) == 0,
                             must_descend=np.full(n, fresh) | ((np.arange(n) == 0) & descend),
                             covariance=[0])

    res = run(theta0, hold)
    res.chi2 = np.where(res.status >= 0, res.chi2, np.inf)
    if len(rows) > 1 and np.isfinite(res.chi2[1:]).any() and res.chi2[1:].min() < res.chi2[0]:
        j = 1 + int(np.argmin(res.chi2[1:]))
        theta = res.p[j].copy()
        lin, _ = fr.linear(m.cells(theta[None], base)[0], rows[0], st.zero)
        dropped = ~m.of_phases(rows[j])
        theta[m.area_col[dropped]] = np.where(outside[dropped], 0.0, lin[m.area_col[dropped]])
        again = run(theta[None], hold[:1])
        if again.status[0] >= 0 and again.chi2[0] < res.chi2[0]:
            for name in ("p", "cov", "chi2", "status"):
                getattr(res, name)[0] = getattr(again, name)[0]
    if not np.isfinite(res.chi2[0]):
        return None
    res.lower, res.upper, res.order_cols, res.signs = lower, upper, order_cols, signs
    return res


def least_squares(m: PhaseModel, fr: "_Frame", base: np.ndarray, theta: np.ndarray, fixed: np.ndarray,
                  lower: np.ndarray, upper: np.ndarray, max_iter: int, **options):
    """:func:`~xrdpipe.batchfit.least_squares_batch` of parameter rows ``theta`` (r, k) of the
    phase model against the frame's data (``fr``), cells not in a row from ``base``, its normal
    equations straight from the model's lines (:meth:`PhaseModel.normal`); ``options`` go to
    the batch (amplitudes, must_move, covariance...). The iterations are compiled
    (:meth:`PhaseModel.iterate`) unless ``m.compiled_iterations`` is off (the same numbers)."""
    rows = theta.shape[:1]
    return least_squares_batch(lambda t: m.value_jac(t, base), theta, np.broadcast_to(fr.y0, rows + fr.y0.shape),
                               np.broadcast_to(fr.w, rows + fr.w.shape), lower=lower, upper=upper, fixed=fixed,
                               max_iter=max_iter, normal=lambda t, _y, _w, held: m.normal(t, base, fr.y0, fr.w, held),
                               iterate=m.iterate(base, fr.y0, fr.w) if m.compiled_iterations else None, **options)


#: A phase's width in a window is kept above this share of its median width in its other windows
#: (anisotropic broadening of layered oxides, 00l against h0l, stays well within it).
_WIDTH_FLOOR = 1.0 / 3.0


def _bounds(m: PhaseModel, fr: "_Frame", largest: Sequence[int], found: set[int]):
    """The bounds of a frame's least squares: a phase just found (``found``) stays within the
    range it was searched over, a tracked one moves a line width or so, and two phases that could
    be confused (both in ``largest``, the first row's subset) stay each on its side of the
    midpoint between their start values. Returns lower, upper (k,), the columns bounded by that
    order, and the signs of the order (:meth:`_Frame.sign`) per pair and parameter."""
    st = fr.state
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
    # a phase's width in one window stays above a third of its median width in the others: a
    # weak line beside a similar phase's strong one otherwise collapses onto the lower bound
    # (one radial step), fitting the other's profile (P3's (104) at its onset beside O3's)
    for p in range(m.P):
        cols = [(w, int(m.fwhm_col[p, w])) for w in range(m.W) if m.fwhm_col[p, w] >= 0]
        widths = [float(st.fwhm[p, w]) for w, _ in cols]
        if sum(np.isfinite(v) for v in widths) >= 3:
            for k, (w, col) in enumerate(cols):
                others = [v for j, v in enumerate(widths) if j != k and np.isfinite(v)]
                floor = _WIDTH_FLOOR * _median(others)
                lower[col] = min(max(lower[col], floor), upper[col])
    # two phases that could be confused do not cross in the least squares either: each stays on
    # its side of the midpoint between their start values
    order_cols: set[int] = set()
    signs = {}
    for p, q, j, _ in m.order:
        n = _CELL_NAME[j]
        sign = signs[p, q, j] = fr.sign(p, q, j)
        if n in m.free[p] and sign and p in largest and q in largest:
            col = m.cell_cols[p][m.free[p].index(n)]
            mid = 0.5 * (st.cell[p, j] + st.cell[q, j])
            if sign > 0 and mid > lower[col]:
                lower[col] = min(mid, upper[col])
                order_cols.add(col)
            elif sign < 0 and mid < upper[col]:
                upper[col] = max(mid, lower[col])
                order_cols.add(col)
    return lower, upper, order_cols, signs


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


def esd_scale(m: PhaseModel, fr: _Frame, redchi: float) -> float:
    """The factor on a frame's covariance: its reduced chi-square always without data esds or with
    esd_scale = "redchi"; with Poisson esds ("auto") when it exceeds 1, so that a misfit the model
    cannot remove (background shape, profile) widens them rather than being ignored; else 1."""
    if not fr.has_errors or m.fit.esd_scale == "redchi" or redchi > 1:
        return redchi
    return 1.0


def _unit_covariance(cov: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The free block of ``cov`` scaled to unit diagonal, and the esds ``d`` it was scaled by (1
    where 0): the sandwiches below are formed in these units (well conditioned), then scaled back."""
    idx = np.flatnonzero(free)
    sub = cov[idx[:, None], idx]
    d = np.sqrt(np.diagonal(sub))
    d = np.where(d > 0, d, 1.0)
    return sub / np.outer(d, d), d


def window_scaled(m: PhaseModel, w: np.ndarray, jac: np.ndarray, cov: np.ndarray, redchi_w: np.ndarray,
                  position_w: np.ndarray | None = None, correlation_w: np.ndarray | None = None) -> np.ndarray:
    """The covariance ``cov`` = (JᵀW²J)⁻¹ = C (k, k; NaN where not free) with each window's
    information scaled by its reduced chi-square where that exceeds 1: C (Σ_w s_w H_w) C,
    s_w = max(redchi_w, 1), H_w = J_wᵀW²J_w with J_w the Jacobian ``jac`` (k, M) on window w's
    points.

    A misfit the model cannot remove (a neighbour's tail under a window's background, a shape
    the profile lacks) then widens the esds of what that window determines, and not those of
    the parameters other windows fix: one frame-wide factor spreads the worst window's misfit
    over every cell parameter. Equal to ``cov`` where every window fits to its noise.

    With ``position_w`` (W,), the esds of the columns that place the lines (cells, zero) are
    those of C (Σ_w p_w H_w) C instead, p_w = ``position_w`` clipped to [1, s_w k_w] (the part
    of the misfit that moves a centre, :func:`position_redchi`; k_w = ``correlation_w``, the
    factor (1 + ρ) / (1 - ρ) by which noise correlated between neighbouring bins widens what a
    sum over a line's points determines, 1 where None or NaN: a 2D frame's integration shares
    pixels between bins, so its cells' esds widen by it even where the window's reduced
    chi-square, blind to the correlation, is 1), their correlations with every column as above
    (the matrix stays positive semi-definite; every other esd is unchanged)."""
    scale = np.maximum(np.nan_to_num(redchi_w, nan=1.0), 1.0)
    free = np.isfinite(np.diagonal(cov))
    corr = np.ones_like(scale) if correlation_w is None else np.maximum(np.nan_to_num(correlation_w, nan=1.0), 1.0)
    pos = scale if position_w is None else np.clip(np.nan_to_num(position_w, nan=1.0), 1.0, scale * corr)
    if not free.any() or (np.all(scale == 1.0) and np.all(pos == 1.0)):
        return cov
    unit, d = _unit_covariance(cov, free)
    meat, meat_pos = np.zeros((d.size, d.size)), np.zeros((d.size, d.size))
    jf = jac[free]
    for i, win in enumerate(m.windows):
        if scale[i] != 1.0 or pos[i] != 1.0:
            jp = jf[:, win.points] * w[win.points] * d[:, None]   # scaled to the esds: well conditioned
            h = jp @ jp.T
            meat += (scale[i] - 1.0) * h
            meat_pos += (pos[i] - 1.0) * h
    whole = unit + unit @ meat @ unit
    if position_w is not None and not np.array_equal(pos, scale):
        placing = np.zeros(cov.shape[0], bool)
        placing[[c for cols in m.cell_cols for c in cols] + [m.zero_col]] = True
        placing = placing[free]
        if placing.any():
            ratio = np.ones(d.size)
            with np.errstate(invalid="ignore", divide="ignore"):
                odd = np.einsum("ij,jk,ki->i", unit[placing], meat_pos, unit[:, placing]) + np.diagonal(unit)[placing]
                ratio[placing] = np.sqrt(odd / np.diagonal(whole)[placing])
            ratio = np.where(np.isfinite(ratio), ratio, 1.0)
            whole = whole * np.outer(ratio, ratio)
    out = cov.copy()
    idx = np.flatnonzero(free)
    out[idx[:, None], idx] = whole * np.outer(d, d)
    return out


def position_redchi(m: PhaseModel, cell: np.ndarray, w: np.ndarray, theta: np.ndarray, resid: np.ndarray,
                    reach: float = 2.5, windows: np.ndarray | None = None) -> np.ndarray:
    """(W,) each window's reduced chi-square of the part of its residual that is odd about its
    lines: what moves a line's centre. A profile the model lacks in shape only (a Voigt fitted
    by a pseudo-Voigt, a line averaged over bins) leaves an even misfit, many esds at beamline
    counts, that no centre can take up: scaling the cells' esds by the whole window's reduced
    chi-square (15 on a strong basal line) made them 4x too large. A tail of a line the model
    lacks, an asymmetry, a shifted shoulder is odd about the line and counts here.

    For every line inside the window holding at least a tenth of its largest area, the weighted
    residual at the points within ``reach`` FWHM above its centre less the residual mirrored
    below it (linear interpolation), halved; each squared over its variance for unit
    independent noise, (1 + t² + (1 - t)²) / 4 with t the interpolation weight; summed over the
    lines and divided by their number of points; times (1 + ρ) / (1 - ρ), ρ the lag-one
    correlation of those odd values (clipped to [0, 0.9]), for noise correlated between
    neighbouring bins. NaN where a window has no such line, or is not among ``windows``
    (indices; None: all). ``cell`` (P, 6): the cells a row does not set (a frame's working
    cells); ``w`` (M,): the frame's weights."""
    out = np.full(m.W, np.nan)
    cells = m.cells(theta[None], cell)[0]
    zero = float(theta[m.zero_col])
    fw = m.fwhm_table(theta)
    inner = m.inside(cells, zero, fw)
    cen = m.centres(cells[None], np.array([zero]))[0]
    area = theta[m.area_col]
    for i in (range(m.W) if windows is None else windows):
        win = m.windows[i]
        lines = np.flatnonzero(inner & (m.r_window == i) & (area > 0))
        if not lines.size or win.x.size < 3:
            continue
        lines = lines[area[lines] >= 0.1 * area[lines].max()]
        r, valid = resid[win.points], w[win.points] > 0
        odd = np.empty(win.x.size * lines.size)
        counts = np.empty(lines.size, np.int64)
        kernels.odd_about_lines(win.x, r, valid, cen[lines], fw[m.r_phase[lines], i], float(reach), odd, counts)
        chi2 = count = 0.0
        pairs = []          # consecutive normalised odd values, for their correlation
        start = 0
        for used in counts[counts > 0].tolist():
            part = odd[start:start + used]
            start += used
            chi2 += float(np.sum(part ** 2))
            count += used
            if used > 1:
                pairs.append((part[:-1], part[1:]))
        if count:
            # neighbouring bins that share pixels (a 2D frame's integration) carry correlated
            # noise: a sum over a line's points varies (1 + ρ) / (1 - ρ) times as much as their
            # count says, ρ the lag-one correlation of the odd part (not of the whole residual,
            # whose even misfit is as smooth as a line)
            rho = 0.0
            if pairs:
                a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
                den = float(np.sqrt((a @ a) * (b @ b)))
                rho = float(np.clip((a @ b) / den, 0.0, 0.9)) if den > 0 else 0.0
            out[i] = chi2 / count * (1 + rho) / (1 - rho)
    return out


def noise_correlation(m: PhaseModel, w: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """(W,) each window's (1 + ρ) / (1 - ρ), ρ the correlation of the noise of neighbouring
    bins, from the differences of the weighted residual ``resid`` (M,) between them: with data
    esds the noise has unit variance, and a difference of two bins 2 (1 - ρ), whatever smooth
    misfit the model leaves (it barely changes from one bin to the next; a misfit that does
    only makes ρ look smaller). A 2D frame's integration shares pixels between neighbouring
    bins (ρ 0.3-0.7 on the EIGER-like frames of ``xrdpipe.testing``); independent bins give
    ρ near 0. ρ clipped to [0, 0.9]; 1 where a window has fewer than 10 pairs of valid
    neighbouring bins. ``w`` (M,): the frame's weights (0 where a bin is not valid)."""
    out = np.ones(m.W)
    for i, win in enumerate(m.windows):
        r, ok = resid[win.points], w[win.points] > 0
        pair = ok[1:] & ok[:-1]
        if np.count_nonzero(pair) < 10:
            continue
        d = (r[1:] - r[:-1])[pair]
        rho = min(max(1.0 - float(d @ d) / (2 * d.size), 0.0), 0.9)
        out[i] = (1 + rho) / (1 - rho)
    return out


def residual_scaled(w: np.ndarray, jac: np.ndarray, cov: np.ndarray, resid: np.ndarray, n: int) -> np.ndarray:
    """The covariance of a fit without data esds (``cov`` = (JᵀW²J)⁻¹, k x k, NaN where not
    free) from its own residuals ``resid`` (M,, weighted): C (Σ_j r_j² W_j² J_j J_jᵀ) C · n/(n - k),
    the heteroscedasticity-consistent estimate (HC1). Counts are noisier on a line than beside
    it, so one variance for every point (the reduced chi-square) makes the esds of what the
    lines determine too small."""
    free = np.isfinite(np.diagonal(cov))
    k = int(free.sum())
    if not k or n <= k:
        return cov
    unit, d = _unit_covariance(cov, free)
    jr = jac[free] * (w * resid) * d[:, None]
    out = cov.copy()
    out[np.ix_(free, free)] = unit @ (jr @ jr.T) @ unit * np.outer(d, d) * (n / (n - k))
    return out


def window_chi2(m: PhaseModel, resid: np.ndarray) -> np.ndarray:
    """(W,) each window's chi-square of a weighted residual ``resid`` (M,) on the concatenated
    windows."""
    return np.array([float(resid[w.points] @ resid[w.points]) for w in m.windows])


def _result(m: PhaseModel, fr: _Frame, theta: np.ndarray, cov: np.ndarray, present: np.ndarray, decision, ok: bool,
            message: str) -> FrameResult:
    free = np.isfinite(np.diagonal(cov))
    # (the Jacobian is wanted in the free columns only: an empty line of an area not free, a
    # phase left out, adds nothing there)
    f, jac = m.value_jac(theta[None], fr.state.cell, np.flatnonzero((theta[m.area_col] != 0) | free[m.area_col]))
    resid = (fr.y0 - f[0]) * fr.w
    chi2_w = window_chi2(m, resid)
    n_w = np.array([int(np.count_nonzero(fr.w[w.points] > 0)) for w in m.windows])
    # the free parameters that move a valid point of each window
    touched = (np.abs(jac[0, free]) > 0) & (fr.w > 0)          # (at a valid point)
    nv = np.array([int(np.count_nonzero(touched[:, w.points].any(axis=1))) for w in m.windows])
    with np.errstate(invalid="ignore"):
        err = np.sqrt(np.diagonal(cov))
    # the run's zero shift, held at its estimate, moves the cells by its own error: how much
    # (least squares' response to a unit zero shift) for the covariance below
    zero_err = float(fr.state.zero_err)
    lever = None
    if np.isfinite(zero_err) and zero_err > 0 and not free[m.zero_col] and free.any():
        jz = jac[0, m.zero_col] * fr.w
        lever = -np.nan_to_num(cov[np.ix_(free, free)]) @ ((jac[0][free] * fr.w) @ jz)
    esds = None
    if fr.has_errors and m.fit.esd_scale == "auto":
        # (made when first asked for: the record, made beside the next frame's least squares)
        esds = WindowEsds(m, fr.state.cell.copy(), fr.w, theta, resid, jac[0], cov, chi2_w / np.maximum(n_w - nv, 1),
                          free, lever, zero_err, err)
        err = cov = None
    else:
        if m.fit.esd_scale == "auto":
            cov = residual_scaled(fr.w, jac[0], cov, resid, n_w.sum())
            with np.errstate(invalid="ignore"):
                err = np.sqrt(np.diagonal(cov))
        else:
            scale = esd_scale(m, fr, chi2_w.sum() / max(n_w.sum() - int(free.sum()), 1))
            if scale != 1.0:
                cov = cov * scale
                err = err * np.sqrt(scale)
        if lever is not None:
            cov, err = _with_lever(cov, free, lever, zero_err)
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
    return FrameResult(ok, message, theta, err, cov, present, decision, chi2_w, n_w, nv, new, fitted=f[0], esds=esds)


def _with_lever(cov: np.ndarray, free: np.ndarray, lever: np.ndarray, zero_err: float) -> tuple[np.ndarray, np.ndarray]:
    """``cov`` with the run's zero shift's error carried into the free columns through ``lever``
    (their response to a unit zero shift), and its esds."""
    cov = cov.copy()
    cov[np.ix_(free, free)] += np.outer(lever, lever) * zero_err ** 2
    with np.errstate(invalid="ignore"):
        return cov, np.sqrt(np.diagonal(cov))


class WindowEsds:
    """A frame's esds with data esds (``esd_scale = "auto"``), made when first asked for
    (:meth:`done`): each window's information scaled by its reduced chi-square
    (:func:`window_scaled`, the cells' by the part of the misfit odd about the lines,
    :func:`position_redchi`), then the run's zero shift's error carried in (``lever``). Holds
    copies of what it reads of the frame (``cell``: its working cells; the weights ``w`` are
    never changed in place).

    :meth:`area_shown` says which lines' areas stand above a multiple of their esds from bounds
    on those esds, without making them, where the bounds settle it: the information only grows
    (each window's scale is at least 1, and the zero's share is added), so an esd is at least
    that of the least squares (``raw``), and at most that times the root of the largest scale,
    with the zero's share."""

    def __init__(self, m: PhaseModel, cell: np.ndarray, w: np.ndarray, theta: np.ndarray, resid: np.ndarray,
                 jac: np.ndarray, cov: np.ndarray, redchi_w: np.ndarray, free: np.ndarray, lever: np.ndarray | None,
                 zero_err: float, raw: np.ndarray):
        # (the solution's rows are views of its least squares' arrays: copied)
        self.m, self.cell, self.w, self.theta, self.resid, self.jac = m, cell, w, theta.copy(), resid, jac
        self.cov, self.redchi_w, self.free, self.lever, self.zero_err, self.raw = (cov, redchi_w, free, lever,
                                                                                    zero_err, raw)
        self.cov = cov.copy()
        self._top = None            # (area_shown's upper bounds, made when first asked for)

    def done(self) -> tuple[np.ndarray, np.ndarray]:
        """The esds (k,) and the covariance (k, k)."""
        m, redchi_w = self.m, self.redchi_w
        position = position_redchi(m, self.cell, self.w, self.theta, self.resid)
        cov = window_scaled(m, self.w, self.jac, self.cov, redchi_w, position, noise_correlation(m, self.w, self.resid))
        with np.errstate(invalid="ignore"):
            err = np.sqrt(np.diagonal(cov))
        if self.lever is not None:
            cov, err = _with_lever(cov, self.free, self.lever, self.zero_err)
        return err, cov

    def area_shown(self, area: np.ndarray, z: float) -> np.ndarray | None:
        """(R,) whether each line's area (``area``) exceeds ``z`` times its esd (0 where the
        esd is not finite), where the bounds on the esds settle every line; else None."""
        if self._top is None:
            m = self.m
            raw = self.raw[m.area_col]
            scale = float(np.max(np.maximum(np.nan_to_num(self.redchi_w, nan=1.0), 1.0), initial=1.0))
            with np.errstate(invalid="ignore"):
                top = raw ** 2 * scale
                if self.lever is not None:
                    extra = np.zeros(m.k)
                    extra[self.free] = self.lever ** 2 * self.zero_err ** 2
                    top = top + extra[m.area_col]
                top = np.sqrt(top)
            finite = np.isfinite(raw)
            # (margins: for the rounding of the sums the esds are made of, and for a covariance
            # that is not the plain inverse of the information, where a frame's is singular)
            self._top = (np.where(finite, top * 2.0, 0.0), np.where(finite, raw * 0.99, 0.0),
                         bool(np.all(np.isfinite(top[finite]))))
        top, low, bounded = self._top
        if not bounded:
            return None
        above = area > z * top
        return above if np.all(above | (area <= z * low)) else None



def initial_state(m: PhaseModel, zero: float = 0.0) -> PhaseState:
    """The state before the first frame: configured cells, nothing present, widths unknown."""
    return PhaseState(m.cell0.copy(), np.zeros(m.P, bool), np.full((m.P, m.W), np.nan), np.full(m.P, np.nan), zero,
                      np.full((m.P, m.W), np.nan))


def _volume(m: PhaseModel, p: int, theta: np.ndarray, cov: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """A phase's cell volume and its esd (gradient by central differences, full covariance)."""
    cols = m.cell_cols[p]
    h = 1e-6 * np.maximum(np.abs(theta[cols]), 1.0)
    c = m.shifted_cells(p, theta[cols], h, base[p])
    vol = _cell_volumes(c)
    grad = (vol[1::2] - vol[2::2]) / (2 * h)
    with np.errstate(invalid="ignore"):
        return float(vol[0]), float(np.sqrt(grad @ cov[m._cell_block[p]] @ grad))


def _cell_volumes(cells: np.ndarray) -> np.ndarray:
    """(n,) volumes (Å³) of full cells (n, 6): :func:`~xrdpipe.crystallography.cell_volume` of
    a triclinic cell, its operations in its order (the same numbers, without its look-ups)."""
    ca, cb, cg = (np.cos(np.radians(cells[:, j])) for j in (3, 4, 5))
    return cells[:, 0] * cells[:, 1] * cells[:, 2] * np.sqrt(np.maximum(1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg, 0.0))


def centre_esd(m: PhaseModel, theta: np.ndarray, cov: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres (R,) of every reflection and their esds from the cell covariance (the centres'
    derivatives by central differences, :meth:`PhaseModel._centre_derivs`)."""
    cen, dval = m._centre_derivs(theta[None], base)
    err = np.full(m.R, np.nan)
    for p in range(m.P):
        refl = m._refl_of_phase[p]
        if not refl.size:
            continue
        # (lines, cell columns) laid out as the einsum has always been given it: the product's
        # order of summation follows the layout
        jac = np.ascontiguousarray(dval[0][refl][:, :len(m.cell_cols[p])].T).T
        with np.errstate(invalid="ignore"):
            err[refl] = np.sqrt(np.einsum("ri,ij,rj->r", jac, cov[m._cell_block[p]], jac))
    return cen[0], err


def d_of(m: PhaseModel, cen: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return d_from_radial(cen, err, m.unit, m.wavelength_A)
