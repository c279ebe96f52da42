"""The cell search: a grid of trial cells around the start, intensities (Pawley-like,
non-negative) and background solved linearly at every trial, a matched filter for each phase;
and the bounds a cell stays in.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..crystallography import system_cell
from .calculator import LN2, Calculator
from .least_squares import linear_fit
from .model import cell_parameters

FOLLOW = 0.5                  # a phase followed from the previous frame: half its searched range around it


def cell_bounds(calc, centre: np.ndarray | None, followed: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The bounds of every parameter; the cells' searched range around ``centre``'s cells
    (default: the configured ones), as wide as around the configured cells, and half as wide
    for the phases ``followed`` from a previous frame (a cell moves little from frame to frame;
    a wider range would let two phases of one lattice type swap their cells)."""
    L = calc.layout
    lower, upper = L.lower.copy(), L.upper.copy()
    if centre is None:
        return lower, upper
    c0 = L.start()
    for i, q in enumerate(L.params):
        if q.kind == "cell" and q.phase in followed:
            if q.key in ("a", "b", "c"):
                lower[i] = centre[i] * (1 - FOLLOW * (1 - L.lower[i] / c0[i]))
                upper[i] = centre[i] * (1 + FOLLOW * (L.upper[i] / c0[i] - 1))
            else:
                lower[i] = centre[i] - FOLLOW * (c0[i] - L.lower[i])
                upper[i] = centre[i] + FOLLOW * (L.upper[i] - c0[i])
        elif q.kind == "cell":
            if q.key in ("a", "b", "c"):
                lower[i], upper[i] = L.lower[i] * centre[i] / c0[i], L.upper[i] * centre[i] / c0[i]
            else:
                lower[i], upper[i] = L.lower[i] + centre[i] - c0[i], L.upper[i] + centre[i] - c0[i]
    return lower, upper


def _set_width(calc, theta: np.ndarray, fwhm_deg: float | None = None, factor: float = 1.0) -> np.ndarray:
    """θ with every phase's widths replaced by a constant Gaussian FWHM, or scaled by ``factor``."""
    t = theta.copy()
    for idx in calc.profile_index:
        if fwhm_deg is not None:
            t[idx] = [0.0, 0.0, fwhm_deg**2, 0.0, 0.0]
        else:
            t[idx] = t[idx] * np.array([factor**2, factor**2, factor**2, factor, factor])
    return t


def search_cells(calc, y: np.ndarray, sigma, centre: np.ndarray | None = None,
                 followed: Sequence[int] = (), hold: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, str]:
    """A start from a search of every phase's cell around the configured one (the searched
    range of :meth:`PhaseModel.search_range`). Phase after phase (the best-matching first), a
    fine grid of trial cells is scored by a matched filter (how many reflections fall on peaks
    of what the phases already placed leave unexplained); the best few trials are compared by a
    linear fit (intensities non-negative, one per reflection, and the background solved at each
    trial, the configured cell among them); then the widths are scaled to the pattern. Returns
    θ, the intensities and ``"searched"`` (or ``"configured"`` when no configured cell moved).
    The phases ``hold`` keep their cells at ``centre`` (placed first, not searched)."""
    model = calc.model
    L = calc.layout
    sig = np.sqrt(np.maximum(np.nan_to_num(y), 1.0)) if sigma is None else np.asarray(sigma, float)
    valid = np.isfinite(y) & np.isfinite(sig) & (sig > 0)
    wt = np.where(valid, 1.0 / np.where(valid, sig, 1.0), 0.0)
    y0 = np.where(valid, y, 0.0)
    yw = y0 * wt
    lower, upper = cell_bounds(calc, centre, followed)
    theta = np.clip(L.start() if centre is None else centre, lower, upper)
    rows = np.flatnonzero(valid)
    # the widths: the configured ones scaled by the best of a few factors (at the configured cells)
    theta = _scale_widths(calc, theta, yw, wt, rows[::2])
    remaining = [p for p, ph in enumerate(model.phases) if ph.refine_cell and p not in hold]
    placed = [p for p, ph in enumerate(model.phases) if not ph.refine_cell or p in hold]
    resid = y0.copy()
    searched = False
    missing: list[int] = []
    if placed:
        resid = y0 - _phase_fit(calc, theta, yw, wt, rows, placed)
    while remaining:
        scored = [(_match(calc, p, theta, resid, sig, valid, (lower, upper)), p) for p in remaining]
        (best_score, cands, steps_rel), p = max(scored, key=lambda t: t[0][0])
        remaining.remove(p)
        idx = cell_idx(calc, p, angles=True)
        if not np.isfinite(best_score) or not len(cands):
            missing.append(p)
            continue
        configured = np.clip(L.start() if centre is None else centre, lower, upper)[idx]
        chosen = _best_cell(calc, theta, idx, [configured] + list(cands), steps_rel, (lower, upper),
                            yw, wt, rows[::2], placed + [p])
        if np.any(chosen != configured):
            searched = True
        theta[idx] = chosen
        placed.append(p)
        resid = y0 - _phase_fit(calc, theta, yw, wt, rows, placed)
    theta = _scale_widths(calc, theta, yw, wt, rows[::2])
    _, inten, bk = linear_fit(calc, theta, yw, wt, rows, [p for p in range(len(model.phases)) if p not in missing])
    if model.background_terms:
        theta[[L.index[f"bkg_{j}"] for j in range(model.background_terms)]] = bk
    return theta, inten, "searched" if searched else "configured"


def _best_cell(calc, theta: np.ndarray, idx: list[int], cells: list[np.ndarray], steps_rel: np.ndarray, bounds,
               yw: np.ndarray, wt: np.ndarray, rows: np.ndarray, phases: list[int]) -> np.ndarray:
    """Of the trial ``cells`` (the parameters ``idx`` of one phase), the one whose linear fit
    (intensities and background, with ``phases``) has the lowest χ²; then closer: a third of
    the grid step ``steps_rel`` around it, twice."""
    lower, upper = bounds
    chosen, low = theta[idx].copy(), np.inf
    for cell in cells:
        t = theta.copy()
        t[idx] = cell
        c2 = linear_fit(calc, t, yw, wt, rows, phases, full=False)[0]
        if c2 < low:
            chosen, low = cell, c2
    grid = np.array(np.meshgrid(*[[-1.0, 0.0, 1.0]] * len(idx), indexing="ij")).reshape(len(idx), -1).T
    for _ in range(2):
        best_here = chosen
        for d in grid:
            if not d.any():
                continue
            t = theta.copy()
            t[idx] = np.clip(chosen * (1 + d * steps_rel / 3), lower[idx], upper[idx])
            c2 = linear_fit(calc, t, yw, wt, rows, phases, full=False)[0]
            if c2 < low:
                best_here, low = t[idx].copy(), c2
        chosen = best_here
    return chosen


def _scale_widths(calc, theta, yw, wt, rows) -> np.ndarray:
    """``theta`` with its widths scaled by the best of a few factors (linear fits with each
    profile within ±NEAR_FWHM, as the search's trial cells: the whole windows of the widest
    trials cost several times as much and choose the same factor)."""
    best = (np.inf, theta)
    for f in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        t = _set_width(calc, theta, factor=f)
        c2 = linear_fit(calc, t, yw, wt, rows, full=False)[0]
        if c2 < best[0]:
            best = (c2, t)
    return best[1]


def _phase_fit(calc, theta, yw, wt, rows, phases) -> np.ndarray:
    """The pattern of ``phases`` (no background) in their best linear fit at ``theta``."""
    _, inten, _ = linear_fit(calc, theta, yw, wt, rows, phases)
    return calc.pattern(theta, inten) - calc.background(theta)


def _matched_filter(calc, p: int, theta: np.ndarray, resid: np.ndarray, sig: np.ndarray, valid: np.ndarray):
    """The significance ``z`` of a peak of phase ``p``'s width at every point of a uniform grid
    ``u`` over the range: ``resid`` filtered by a peak of that width (``H``, degrees) minus a
    three times broader one (blind to a smooth background). Returns u, z, H."""
    st = calc.phase_state(p, theta)
    inside = (st["pos"] >= calc.lo) & (st["pos"] <= calc.hi)
    H = float(np.median(st["fwhm"][inside])) if inside.any() else 0.05
    step = max(calc.step, 1e-6)
    H = max(H, 3 * step)
    u = np.arange(calc.lo, calc.hi + step / 2, step)
    yu = np.interp(u, calc.x, np.where(valid, resid, 0.0))
    vu = np.interp(u, calc.x, np.where(valid, sig**2, 0.0))
    half = int(math.ceil(3 * 3 * H / step))
    k = np.arange(-half, half + 1) * step
    g1 = np.exp(-4 * LN2 * (k / H) ** 2)
    g3 = np.exp(-4 * LN2 * (k / (3 * H)) ** 2)
    kern = g1 / g1.sum() - g3 / g3.sum()
    num = np.convolve(yu, kern, mode="same")
    den = np.sqrt(np.maximum(np.convolve(vu, kern**2, mode="same"), 1e-300))
    return u, np.where(den > 0, num / den, 0.0), H


def _match(calc, p: int, theta: np.ndarray, resid: np.ndarray, sig: np.ndarray, valid: np.ndarray, bounds,
           n_best: int = 6):
    """Phase ``p``'s trial cells (a grid of its lengths over the searched range) scored by a
    matched filter of ``resid``: Σ log(1 + z) over its reflections, z the significance of a peak
    at the reflection's position. Returns the best score and the best few distinct cells."""
    L = calc.layout
    ph = calc.model.phases[p]
    lam = calc.model.wavelength_A
    keys = _searched(ph.system)
    idx = cell_idx(calc, p, angles=True)
    u, z, H = _matched_filter(calc, p, theta, resid, sig, valid)
    # trial cells: relative step so that a step moves the highest reflection by H / 3
    t_hi = math.radians(calc.hi / 2)
    rel = max(math.radians(H) / 3 / (2 * math.tan(t_hi)), 1e-4)
    axes = []
    for key, i in zip(keys, idx):
        lo, hi = float(bounds[0][i]), float(bounds[1][i])
        # an angle: a step of rel radians moves d by about rel (relative) at most
        n = max(int(math.ceil((hi - lo) / (math.degrees(rel) if key == "beta" else rel * theta[i]))) + 1, 2)
        axes.append(np.linspace(lo, hi, n))
    while math.prod(len(a) for a in axes) > 40000:
        axes = [np.linspace(a[0], a[-1], max(len(a) * 2 // 3, 2)) for a in axes]
    mesh = np.meshgrid(*axes, indexing="ij")
    trials = np.column_stack([m.ravel() for m in mesh])
    base = dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), L.structure(p, theta).cell))
    hkl = calc.refl[p].hkl.astype(float)
    scores = np.empty(len(trials))
    zero = theta[L.index["zero"]]
    for s0 in range(0, len(trials), 4000):
        chunk = trials[s0:s0 + 4000]
        v = {k: np.full(len(chunk), float(val)) for k, val in base.items()}
        v.update({k: chunk[:, j] for j, k in enumerate(keys)})
        gstar = np.linalg.inv(_metrics(np.array(np.broadcast_arrays(*system_cell(ph.system, v))).T))
        q2 = np.einsum("ni,tij,nj->tn", hkl, gstar, hkl)
        sin_t = np.clip(lam * np.sqrt(np.maximum(q2, 0)) / 2, 0, 1)
        pos = np.degrees(2 * np.arcsin(sin_t)) + zero
        zs = np.interp(pos, u, z, left=0.0, right=0.0)
        scores[s0:s0 + 4000] = np.log1p(np.maximum(zs, 0.0)).sum(axis=1)
    order = np.argsort(scores)[::-1]
    chosen: list[np.ndarray] = []
    steps = np.array([(a[1] - a[0]) if len(a) > 1 else 1.0 for a in axes])
    for j in order:
        if all(np.any(np.abs(trials[j] - c) > 2.5 * steps) for c in chosen):
            chosen.append(trials[j])
            if len(chosen) >= n_best:
                break
    return float(scores[order[0]]), chosen, steps / np.array([theta[i] for i in idx])


def _metrics(cells: np.ndarray) -> np.ndarray:
    """The metric tensors of cells (n, 6): (n, 3, 3)."""
    a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
    ca, cb, cg = (np.cos(np.radians(cells[:, k])) for k in (3, 4, 5))
    return np.stack([np.stack([a * a, a * b * cg, a * c * cb], -1), np.stack([a * b * cg, b * b, b * c * ca], -1),
                     np.stack([a * c * cb, b * c * ca, c * c], -1)], 1)


def _searched(system: str) -> list[str]:
    """The cell parameters on the search grid: the lengths, and β of a monoclinic cell (a
    triclinic cell's three angles are left to least squares: a six-dimensional grid of at most
    40,000 trials would be too coarse to find anything)."""
    keys = [k for k in cell_parameters(system) if k in ("a", "b", "c")]
    return keys + (["beta"] if system == "monoclinic" else [])


def cell_idx(calc, p: int, angles: bool = False) -> list[int]:
    """Phase ``p``'s cell lengths (with ``angles``: every parameter the search grid covers)."""
    ph = calc.model.phases[p]
    keys = _searched(ph.system) if angles else [k for k in cell_parameters(ph.system) if k in ("a", "b", "c")]
    return [calc.layout.index[f"{ph.name}.{k}"] for k in keys]


def initial_guess(calc: Calculator, theta: np.ndarray, y: np.ndarray, lebail: bool, *,
                  background: bool = True) -> np.ndarray:
    """Background from the low percentiles; Rietveld scales from the pattern's area."""
    L = calc.layout
    nb = calc.model.background_terms
    if nb and background:
        base = np.percentile(y, 10)
        theta[L.index["bkg_0"]] = base
    if not lebail:
        net = float(np.sum(np.maximum(y - np.percentile(y, 10), 0.0)) * calc.step)
        t = theta.copy()
        for p, ph in enumerate(calc.model.phases):
            if calc.computed[p]:
                t[L.index[f"{ph.name}.scale"]] = 1.0
        st = calc.reflection_state(t)
        for p, ph in enumerate(calc.model.phases):
            if not calc.computed[p]:
                continue
            a, b = calc.offsets[p], calc.offsets[p + 1]
            inside = (st["pos"][a:b] >= calc.lo) & (st["pos"][a:b] <= calc.hi)
            tot = float(np.sum(st["I"][a:b][inside]))
            if tot > 0 and ph.scale == 1.0:
                theta[L.index[f"{ph.name}.scale"]] = net / tot / len(calc.model.phases)     # Le Bail phases: a share too
    return theta
