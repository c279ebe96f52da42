"""A refined vector into a :class:`~xrdpipe.refine.model.RefinementResult`: R factors, GOF,
esds (Pawley: the covariance of the projected problem), weight fractions (Hill & Howard) and
the ok / flagged / failed verdict.
"""

from __future__ import annotations

import math

import numpy as np

from .calculator import Calculator
from .least_squares import pawley_solve
from .model import RefinementResult


def make_result(calc, y, wt, valid, theta, I, free, n_iter, converged, absent, bounds) -> RefinementResult:
    """Statistics, esds (parameters at a bound left out) and the verdict of a refined θ."""
    model = calc.model
    L = calc.layout
    lebail = calc.any_extracted
    n_valid = int(valid.sum())
    extra = None
    if calc.pawley:
        # the intensities (per overlap group) and the background are least-squares parameters too
        phases = [p for p in range(len(model.phases)) if p not in set(absent)]
        _, I, theta, extra = pawley_solve(calc, theta, y, wt, phases)
        free = np.array([i for i in free if L.params[i].kind != "bkg"]
                        + [L.index[f"bkg_{j}"] for j in range(model.background_terms)], int)
    yc, J, I_used = calc.jacobian(theta, I, free, extract_from=y if lebail and not calc.pawley else None, cycles=1)
    if lebail and not calc.pawley:
        I = I_used
    r = (y - yc) * wt
    Jw = J * wt[:, None]
    chi2 = float(r @ r)
    n_p = int(free.size)
    if extra is not None:
        n_p += int(np.count_nonzero(extra["G"] > 0))
    dof = max(n_valid - n_p, 1)
    sw = float(np.sum((y * wt) ** 2))
    rwp = math.sqrt(chi2 / sw) if sw > 0 else math.nan
    rexp = math.sqrt(dof / sw) if sw > 0 else math.nan
    gof = rwp / rexp if rexp > 0 else math.nan
    bound, inner = _at_bounds(L.names, theta, free, bounds)
    esd = np.full(theta.size, np.nan)
    I_esd = None
    if extra is not None:
        cov, I_esd = _pawley_covariance(calc, extra, Jw, free, inner, gof)
        esd[free[inner]] = np.sqrt(np.maximum(np.diag(cov)[inner], 0.0)) * gof
    else:
        cov = _covariance(Jw, free, inner)
        if cov is not None:
            esd[free[inner]] = np.sqrt(np.maximum(np.diag(cov)[inner], 0.0)) * gof
    _, bkg, parts, st = calc.pattern(theta, I, per_phase=True)
    ticks = [st["pos"][calc.offsets[p]:calc.offsets[p + 1]] for p in range(len(model.phases))]
    refined = np.zeros(theta.size, bool)
    refined[free] = True
    share = calc.shares(theta, I)
    res = RefinementResult(list(L.names), theta.copy(), esd, refined, rwp, rexp, gof, n_valid, n_p, n_iter,
                           converged, "", calc.x, np.where(valid, y, np.nan), yc, bkg, parts, ticks,
                           None if I is None else I.copy(), [ph.name for ph in model.phases], theta=theta.copy(),
                           at_bound=bound, shares={ph.name: float(share[p]) for p, ph in enumerate(model.phases)},
                           intensity_esd=I_esd)
    # phases absent at the start or found absent at the end (see solver._refine)
    gone = set(absent)
    res.absent = [model.phases[p].name for p in sorted(gone)]
    if res.lebail_I is not None:
        for p in gone:                       # the next frame starts with them absent
            res.lebail_I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    if model.method == "rietveld":
        res.weight_fractions = _weight_fractions(calc, theta, cov, free, gof)
    _verdict(calc, res, sorted(gone), bounds)
    return res


def _at_bounds(names, theta: np.ndarray, free: np.ndarray, bounds) -> tuple[dict[str, str], np.ndarray]:
    """Parameters at a bound, reported as such (``{name: "lower" or "upper"}``), without an esd
    and out of the covariance; and the positions in ``free`` of the others."""
    bound: dict[str, str] = {}
    inner = []
    lower, upper = bounds
    for c, j in enumerate(free):
        if theta[j] <= lower[j]:
            bound[names[j]] = "lower"
        elif theta[j] >= upper[j]:
            bound[names[j]] = "upper"
        else:
            inner.append(c)
    return bound, np.array(inner, int)


def _covariance(Jw: np.ndarray, free: np.ndarray, inner: np.ndarray) -> np.ndarray | None:
    """(JᵀJ)⁻¹ of the parameters ``free[inner]`` (scaled to unit diagonal before the
    pseudo-inverse), NaN for those at a bound; None when there is none or it cannot be made."""
    if not inner.size:
        return None
    try:
        Ji = Jw[:, inner]
        A = Ji.T @ Ji
        dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
        ci = np.linalg.pinv(A / np.outer(dscale, dscale), rcond=1e-12) / np.outer(dscale, dscale)
    except np.linalg.LinAlgError:
        return None
    cov = np.full((free.size, free.size), np.nan)
    cov[np.ix_(inner, inner)] = ci
    return cov


def _pawley_covariance(calc, extra: dict, Jw: np.ndarray, free: np.ndarray, inner: np.ndarray, gof: float):
    """Pawley's covariance: the nonlinear parameters ``free`` (those not at a bound, ``inner``)
    together with the intensities above zero and the background. Returns the covariance of
    ``free`` (NaN where at a bound) and every reflection's intensity esd (NaN at zero: at its
    bound; reflections sharing a position share the group's esd by multiplicity)."""
    rows = extra["rows"]
    act = np.flatnonzero(extra["G"] > 0)
    Ji = Jw[rows][:, inner]
    M = extra["M"][:, act]
    k, n_a = inner.size, act.size
    N = np.zeros((k + n_a,) * 2)
    N[:k, :k] = Ji.T @ Ji
    MJ = np.asarray(M.T @ Ji)
    N[k:, :k], N[:k, k:] = MJ, MJ.T
    N[k:, k:] = extra["amm"][np.ix_(act, act)]
    # the background terms are among ``free`` (their columns in Ji); the intensities' cross terms
    # with them are amb
    d = np.sqrt(np.maximum(np.diag(N), 1e-300))
    C = np.linalg.pinv(N / np.outer(d, d), rcond=1e-12, hermitian=True) / np.outer(d, d)
    cov = np.full((free.size, free.size), np.nan)
    cov[np.ix_(inner, inner)] = C[:k, :k]
    gidx, share, n_col = calc.groups
    g_esd = np.full(n_col, np.nan)
    g_esd[act] = np.sqrt(np.maximum(np.diag(C)[k:], 0.0)) * gof
    return cov, g_esd[gidx] * share


def _verdict(calc, res: RefinementResult, absent: list[int], bounds) -> None:
    """``ok``, ``flagged`` (GOF above ``gof_max``, a refined parameter at a bound) or
    ``failed`` (not finite, not converged, a cell at the edge of its searched range), the
    reasons in ``message``."""
    model = calc.model
    L = calc.layout
    fail: list[str] = []
    flag: list[str] = []
    notes: list[str] = []
    if not (np.isfinite(res.gof) and np.all(np.isfinite(res.values))):
        fail.append("no finite result")
    elif not res.converged:
        fail.append(f"not converged in {model.max_iter} iterations")
    if np.isfinite(res.gof) and res.gof > model.gof_max:
        flag.append(f"GOF {res.gof:.3g} above gof_max = {model.gof_max:g} (Rwp {100 * res.rwp:.2f} %, "
                    f"Rexp {100 * res.rexp:.2f} %): the model does not describe this pattern well")
    skip = {model.phases[p].name for p in absent}
    for name, side in res.at_bound.items():
        j = L.index[name]
        q = L.params[j]
        if q.phase >= 0 and model.phases[q.phase].name in skip and q.kind != "scale":
            continue
        b = bounds[0][j] if side == "lower" else bounds[1][j]
        if q.kind == "cell":
            lo, hi = bounds[0][j], bounds[1][j]
            fail.append(f"{name} = {res.values[j]:.5g} at the edge of its searched range [{lo:.5g}, {hi:.5g}]")
        elif q.kind == "scale" and model.phases[q.phase].name in skip:
            continue
        else:
            flag.append(f"{name} at its {side} bound {b:g}")
    for p in absent:
        ph = model.phases[p].name
        notes.append(f"{ph} absent (the fit does not need it; {100 * max(res.shares.get(ph, 0.0), 0.0):.1f} % of "
                     "the intensity): its cell is not determined")
    res.status = "failed" if fail else "flagged" if flag else "ok"
    res.message = "; ".join(fail + flag + notes)


def _weight_fractions(calc: Calculator, theta, cov, free, gof) -> dict[str, tuple[float, float]]:
    L = calc.layout
    zmv, s_idx = [], []
    phases = [(p, ph) for p, ph in enumerate(calc.model.phases) if calc.computed[p]]
    if not phases:
        return {}
    for p, ph in phases:
        st = L.structure(p, theta)
        zmv.append(st.cell_mass() * st.volume)
        s_idx.append(L.index[f"{ph.name}.scale"])
    s = theta[s_idx]
    w = s * np.array(zmv)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        return {}
    frac = w / total
    out = {}
    pos = {int(j): c for c, j in enumerate(free)}
    for k, (_, ph) in enumerate(phases):
        err = np.nan
        if cov is not None and all(i in pos for i in s_idx):
            # dW_k/dS_q = (δkq zmv_k total - w_k zmv_q) / total²
            grad = np.array([((k == q) * zmv[k] * total - w[k] * zmv[q]) / total**2 for q in range(len(s_idx))])
            sub = cov[np.ix_([pos[i] for i in s_idx], [pos[i] for i in s_idx])]
            err = float(np.sqrt(max(grad @ sub @ grad, 0.0)) * gof)
        out[ph.name] = (float(frac[k]), err)
    return out
