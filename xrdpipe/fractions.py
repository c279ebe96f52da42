"""Phase fractions per frame: from the peak areas of coexisting phases, or a refinement's weight
fractions, and which of the two ``fraction`` is.

From the areas of corresponding peaks of coexisting phases in the same window (e.g. the (003) of
O3 against the (003) of P3), each scaled by its area in the nearest frame where that phase was
alone (the same reflection is not equally strong in two structures), inverse-variance averaged
over such windows (:func:`combine_ratios`); with the phase model, from the phases' fitted areas
(:func:`phase_fractions`); or, with ``fraction_window``, the window's area of each phase against
that of the whole window in a reference frame. Where a Rietveld refinement of the frame
succeeded, ``fraction`` is its Hill-Howard weight fraction instead (:func:`choose_fractions`,
``[lattice] fractions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import LatticeSpec, PhaseSpec

__all__ = ["WeightFractions", "combine_ratios", "phase_fractions", "peak_fractions", "choose_fractions"]


def combine_ratios(ratio: np.ndarray, var: np.ndarray, *, cut: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row, one scale from several windows' estimates ``ratio`` (n, W) with variances
    ``var`` (NaN: no estimate); returns the scale (n,) and its variance.

    The windows' esds come from the fit's noise alone, and the windows disagree by more than
    that (profile mismatch, overlapping lines), so the estimates are combined as a random-effects
    mean (DerSimonian-Laird: weights 1 / (var + τ²), τ² the spread between windows beyond their
    esds), after leaving out, where three or more windows agree, a window more than ``cut``
    robust deviations from their median (a phase's line swallowed by another phase's line, its
    area pressed to 0 with a small esd). The variance includes τ²: it is as large as the
    windows' disagreement says."""
    r = np.asarray(ratio, float)
    v = np.asarray(var, float)
    good = np.isfinite(r) & np.isfinite(v) & (v >= 0)
    n_good = good.sum(axis=1)
    rm = np.where(good, r, np.nan)
    out_s = np.full(r.shape[0], np.nan)
    out_v = np.full(r.shape[0], np.nan)
    rows = n_good > 0
    if not rows.any():
        return out_s, out_v
    with np.errstate(all="ignore"):
        med = np.nanmedian(rm[rows], axis=1)
        dev = np.abs(rm[rows] - med[:, None])
        mad = 1.4826 * np.nanmedian(dev, axis=1)
        outlier = (n_good[rows, None] >= 3) & (dev > cut * np.sqrt(mad[:, None] ** 2 + v[rows]))
        use = good[rows] & ~outlier
        vv = np.where(use, np.maximum(v[rows], 1e-300), np.inf)
        w = 1.0 / vv
        sw = w.sum(axis=1)
        mean_fe = (w * np.where(use, rm[rows], 0.0)).sum(axis=1) / sw
        q = (w * np.where(use, rm[rows] - mean_fe[:, None], 0.0) ** 2).sum(axis=1)
        dof = use.sum(axis=1) - 1
        tau2 = np.where(dof > 0, np.maximum(0.0, (q - dof) / (sw - (w ** 2).sum(axis=1) / sw)), 0.0)
        w2 = np.where(use, 1.0 / (vv + tau2[:, None]), 0.0)
        out_s[rows] = (w2 * np.where(use, rm[rows], 0.0)).sum(axis=1) / w2.sum(axis=1)
        out_v[rows] = 1.0 / w2.sum(axis=1)
    return out_s, out_v


def _scale_to_alone(area: np.ndarray, var: np.ndarray, sd: np.ndarray, alone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A phase's scale in every frame (n,) and its variance: each window's area (n, W) against
    the same window's in the nearest frame ``alone`` where the phase was the only one present,
    combined robustly over the windows (a window where the phase's lines are swallowed by
    another phase's disagrees with the rest and is left out; one where its area rests at 0
    without an esd has no say)."""
    n = area.shape[0]
    pos = np.clip(np.searchsorted(alone, np.arange(n)), 0, alone.size - 1)
    prev = alone[np.maximum(pos - 1, 0)]
    near = np.where(np.abs(alone[pos] - np.arange(n)) <= np.abs(prev - np.arange(n)), alone[pos], prev)
    return _scale_to(area, var, sd, area[near, :])


def _scale_to(area: np.ndarray, var: np.ndarray, sd: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A phase's scale (n,) and its variance: its areas per window (n, W) over the reference
    areas ``ref`` (n, W, or (1, W) for one reference), combined over the windows
    (:func:`combine_ratios`); a window without a reference or an esd has no say."""
    with np.errstate(all="ignore"):
        ratio = area / ref
        r_var = var / ref**2
        good = (ref > 0) & np.isfinite(sd) & (sd > 0) & np.isfinite(ratio)
    return combine_ratios(np.where(good, ratio, np.nan), np.where(good, r_var, np.nan))


def _phase_scales(present: np.ndarray, area: np.ndarray, var: np.ndarray,
                  sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each phase's scale and its variance (n, K) from its areas (n, K, W), and how (K,):
    ``"scale"`` relative to the frames where it is alone, ``"scale-sum"`` beside phases that
    were (:func:`_scale_beside`), ``"area"`` (raw sum) if neither."""
    n, n_k = present.shape
    scale = np.zeros((n, n_k))
    scale_var = np.zeros((n, n_k))
    how = np.full(n_k, "scale", dtype=object)
    for k in range(n_k):
        alone = np.flatnonzero(present[:, k] & (present.sum(axis=1) == 1))
        if alone.size:
            scale[:, k], scale_var[:, k] = _scale_to_alone(area[:, k, :], var[:, k, :], sd[:, k, :], alone)
            # the reference frame itself has ratio 1 and no spread: it is its own scale
            single = present[:, k] & (present.sum(axis=1) == 1)
            scale[single, k], scale_var[single, k] = 1.0, 0.0
        else:
            how[k] = "area"
            scale[:, k] = area[:, k, :].sum(axis=1)
            scale_var[:, k] = var[:, k, :].sum(axis=1)
    for k in np.flatnonzero(how == "area"):
        if (beside := _scale_beside(k, present, area, var, sd, scale, how)) is not None:
            scale[:, k], scale_var[:, k] = beside
            how[k] = "scale-sum"
    return scale, scale_var, how


#: The least share a phase never seen alone must hold, by the other phases' scales, in a frame
#: that teaches its own intensities (:func:`_scale_beside`): below it, the others' errors
#: would be amplified more than 1 / 0.2.
_SUM_SHARE = 0.2


def _scale_beside(k: int, present: np.ndarray, area: np.ndarray, var: np.ndarray, sd: np.ndarray,
                  scale: np.ndarray, how: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The scale (n,) and its variance of phase ``k``, never the only phase present, from the
    frames where every other phase present has a scale of its own (``how`` "scale") and those
    leave it :data:`_SUM_SHARE` or more of the sum of 1: there its areas per window over that
    share are its areas alone (the median over such frames: its own relative intensities, as a
    frame alone would have given them), the same assumption the scales make of frames where a
    phase is alone (the electrode's whole diffracting amount the same in every frame). A run
    that starts in a two-phase region (O3 never alone before P3 takes over) otherwise gives
    the first phase its raw areas and every frame with it fractions of diffracted intensity
    (MAE 0.012-0.073 on 6 hard series). None where no frame qualifies."""
    others = np.delete(np.arange(present.shape[1]), k)
    known = np.all(~present[:, others] | (how[others] == "scale")[None, :], axis=1)
    with np.errstate(all="ignore"):
        share = 1.0 - np.where(present[:, others], scale[:, others], 0.0).sum(axis=1)
    teach = present[:, k] & known & (present.sum(axis=1) > 1) & np.isfinite(share) & (share >= _SUM_SHARE)
    if not teach.any():
        return None
    with np.errstate(all="ignore"):
        alone = area[teach, k, :] / share[teach, None]
        ok = np.isfinite(sd[teach, k, :]) & (sd[teach, k, :] > 0) & (alone > 0)
        taught = ok.any(axis=0)                       # (a window where it never has a line: none)
        ref = np.full(area.shape[2], np.nan)
        ref[taught] = np.nanmedian(np.where(ok, alone, np.nan)[:, taught], axis=0)     # (W,)
    if not (taught & (ref > 0)).any():
        return None
    return _scale_to(area[:, k, :], var[:, k, :], sd[:, k, :], ref[None, :])


def phase_fractions(table, phases: Sequence[PhaseSpec], spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase fractions (n, P), their esds and the method, from the phase model's areas.

    A phase's scale in a frame is the sum of its fitted areas over the windows divided by the
    same sum in the nearest frame where it was the only phase present (its intensities as that
    structure gives them): ``"scale"``. A phase never seen alone learns its intensities beside
    phases that were, where their scales leave it a share of the sum of 1 (``"scale-sum"``,
    :func:`_scale_beside`); else it has its raw area sum (``"area"``: the fraction of diffracted
    intensity, not of the phase). The fractions are the
    scales normalised over the phases present that take part (``fraction = true``); esds from the
    fit's area covariance (the reference frames' errors neglected). A frame with one such phase
    has fraction 1 (``"single phase"``); an absent phase has 0.
    """
    ph, model_names = table.phase, tuple(table.phase_names)
    n = len(table.frame)
    frac = np.full((n, len(phases)), np.nan)
    err = np.full((n, len(phases)), np.nan)
    method = np.full((n, len(phases)), "", dtype=object)
    ok = np.asarray(table.success).any(axis=1)
    win = list(table.windows)
    use_w = np.ones(len(win), bool) if spec.fraction_window is None else np.array([w == spec.fraction_window for w in win])
    part = [i for i, p in enumerate(phases) if p.fraction and p.name in model_names]
    cols = [model_names.index(phases[i].name) for i in part]
    if not part:
        return frac, err, method
    present = ph["phase_present"][:, cols].astype(bool) & ok[:, None]
    area = np.where(use_w[None, None, :], np.nan_to_num(ph["phase_area"][:, cols]), 0.0)
    sd = np.where(use_w[None, None, :], ph["phase_area_err"][:, cols], np.nan)
    var = np.nan_to_num(sd) ** 2
    scale, scale_var, how = _phase_scales(present, area, var, sd)
    # one method per frame: where a present phase was never seen alone, every phase of that
    # frame takes its raw area sum (a scale and an area cannot be normalised together)
    raw = (present & (how == "area")[None, :]).any(axis=1)
    if raw.any():
        scale[raw] = area[raw].sum(axis=2)
        scale_var[raw] = var[raw].sum(axis=2)
    scale = np.where(present, scale, 0.0)
    scale_var = np.where(present, scale_var, 0.0)
    total = scale.sum(axis=1)
    several = present.sum(axis=1) > 1
    for k, i in enumerate(part):
        with np.errstate(all="ignore"):
            f = scale[:, k] / total
            # d f_k / d s_j = (δ_kj S - s_k) / S²
            v = ((total - scale[:, k]) ** 2 * scale_var[:, k]
                 + scale[:, k] ** 2 * (scale_var.sum(axis=1) - scale_var[:, k])) / total**4
        rows = several & np.isfinite(f)
        frac[rows, i], err[rows, i] = f[rows], np.sqrt(v[rows])
        method[rows & present[:, k], i] = np.where(raw[rows & present[:, k]], "area", how[k])
        single = ok & (present.sum(axis=1) == 1)
        frac[single, i] = np.where(present[single, k], 1.0, 0.0)
        err[single, i] = 0.0
        method[single & present[:, k], i] = "single phase"
    return frac, err, method


@dataclass
class WeightFractions:
    """Weight fractions of a whole-pattern refinement: ``fraction`` and ``esd`` (rows, R) for
    the run-file rows ``0..rows-1`` and the refined phases ``phases``; NaN where a frame was not
    refined, failed, or was refined without a structure (Le Bail)."""

    phases: tuple[str, ...]
    fraction: np.ndarray
    esd: np.ndarray


def choose_fractions(vals, frames: np.ndarray, names: Sequence[str], weights: WeightFractions | None,
                      mode: str) -> np.ndarray:
    """Fill ``weight_fraction`` and choose ``fraction`` per frame; returns its source (n, P).

    A frame takes the refinement's fractions when every refined phase has one there; phases of
    the experiment that the refinement left out are 0 in such a frame (the refinement says what
    the pattern is made of)."""
    n, p = len(frames), len(names)
    use = np.zeros(n, bool)
    if weights is not None and mode != "peaks":
        inside = (frames >= 0) & (frames < weights.fraction.shape[0])
        rows = np.where(inside, frames, 0)
        wf, we = weights.fraction[rows], weights.esd[rows]
        wf[~inside], we[~inside] = np.nan, np.nan
        use = np.isfinite(wf).all(axis=1) if wf.shape[1] else use
        for i, name in enumerate(names):
            if name in weights.phases:
                j = weights.phases.index(name)
                vals["weight_fraction"][:, i], vals["weight_fraction_err"][:, i] = wf[:, j], we[:, j]
            else:
                vals["weight_fraction"][use, i], vals["weight_fraction_err"][use, i] = 0.0, 0.0
    source = np.full((n, p), "", dtype=object)
    if mode == "refinement":
        vals["fraction"], vals["fraction_err"] = vals["weight_fraction"].copy(), vals["weight_fraction_err"].copy()
        source[use] = "refinement"
        return source
    peaks = ~use
    vals["fraction"] = np.where(use[:, None], vals["weight_fraction"], vals["area_fraction"])
    vals["fraction_err"] = np.where(use[:, None], vals["weight_fraction_err"], vals["area_fraction_err"])
    source[use] = "refinement"
    source[peaks[:, None] & np.isfinite(vals["area_fraction"])] = "peaks"
    return source


def _reference_frame_fractions(table, names: Sequence[str], spec: LatticeSpec, frac: np.ndarray,
                               err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractions (into ``frac``, ``err``) as each phase's area in ``spec.fraction_window``
    relative to the window's total area in ``spec.reference_frame``."""
    area, aerr, present = table.values["area"], table.values["area_err"], table.present
    col_phase = [ph for _, ph, _, _ in table.peaks]
    cols = [i for i, (w, ph, _, _) in enumerate(table.peaks) if w == spec.fraction_window and ph in names]
    ref = int(np.searchsorted(table.frame, spec.reference_frame))
    total_ref = np.nansum(area[ref, cols]) if ref < len(table.frame) else np.nan
    for p, name in enumerate(names):
        mine = [i for i in cols if col_phase[i] == name]
        if mine and total_ref > 0:
            frac[:, p] = np.nansum(np.where(present[:, mine], area[:, mine], 0.0), axis=1) / total_ref
            err[:, p] = np.sqrt(np.nansum(np.where(present[:, mine], aerr[:, mine], 0.0) ** 2, axis=1)) / total_ref
    return frac, err


def _scale_to_nearest_alone(a: np.ndarray, e: np.ndarray, present: np.ndarray) -> None:
    """The same reflection is not equally strong in two phases: scale (in place) each column's
    area ``a`` and esd ``e`` (n, J) by its area in the nearest frame where it was alone in the
    window (if there is one)."""
    n = len(a)
    for j in range(a.shape[1]):
        alone = np.flatnonzero(present[:, j] & (present.sum(axis=1) == 1) & np.isfinite(a[:, j]))
        if alone.size:
            pos = np.clip(np.searchsorted(alone, np.arange(n)), 0, alone.size - 1)
            prev = alone[np.maximum(pos - 1, 0)]
            near = np.where(np.abs(alone[pos] - np.arange(n)) <= np.abs(prev - np.arange(n)), alone[pos], prev)
            ref = a[near, j]
            a[:, j], e[:, j] = a[:, j] / ref, e[:, j] / ref


def peak_fractions(table, phases: Sequence[PhaseSpec], spec: LatticeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Phase fractions (n, P) with esds, from peak areas."""
    n, names = len(table.frame), [p.name for p in phases]
    frac = np.full((n, len(names)), np.nan)
    err = np.full((n, len(names)), np.nan)
    area, aerr, present = table.values["area"], table.values["area_err"], table.present
    col_phase = [ph for _, ph, _, _ in table.peaks]
    col_window = [w for w, _, _, _ in table.peaks]
    if spec.fraction_window is not None:
        return _reference_frame_fractions(table, names, spec, frac, err)
    # (i) areas of corresponding peaks of coexisting phases, window by window
    num = np.zeros((n, len(names)))
    wsum = np.zeros((n, len(names)))
    for window in dict.fromkeys(col_window):
        # (the phases' lines: a line of no phase, free_peaks, is no phase's share)
        cols = [i for i, w in enumerate(col_window) if w == window and col_phase[i] in names]
        phs = [col_phase[i] for i in cols]
        if len(set(phs)) < 2:
            continue
        a = np.where(present[:, cols], area[:, cols], 0.0)
        e = np.where(present[:, cols], aerr[:, cols], 0.0)
        _scale_to_nearest_alone(a, e, present[:, cols])
        tot = a.sum(axis=1)
        ok = (tot > 0) & np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(e) | (a == 0), axis=1)
        for j, i in enumerate(cols):
            p = names.index(col_phase[i])
            with np.errstate(all="ignore"):
                f = a[:, j] / tot
                # d f_j / d a_k = (δjk tot - a_j) / tot²
                var = ((tot - a[:, j]) ** 2 * e[:, j] ** 2 + (a[:, j] ** 2) * (np.sum(e**2, axis=1) - e[:, j] ** 2)) / tot**4
            with np.errstate(divide="ignore"):
                wgt = np.where(var > 0, 1.0 / var, 1e12)
            use = ok & np.isfinite(f)
            num[use, p] += (f * wgt)[use]
            wsum[use, p] += wgt[use]
    seen = wsum > 0
    with np.errstate(all="ignore"):
        frac[seen] = num[seen] / wsum[seen]
        err[seen] = np.where(wsum[seen] >= 1e12, 0.0, 1.0 / np.sqrt(wsum[seen]))
    # frames where only one phase shows up anywhere: it is all there is
    shows = np.stack([present[:, [i for i, ph in enumerate(col_phase) if ph == name]].any(axis=1)
                      if name in col_phase else np.zeros(n, bool) for name in names], axis=1)
    alone = shows.sum(axis=1) == 1
    for p in range(len(names)):
        frac[alone & shows[:, p], p], err[alone & shows[:, p], p] = 1.0, 0.0
        frac[alone & ~shows[:, p], p], err[alone & ~shows[:, p], p] = 0.0, 0.0
        gone = ~shows[:, p] & shows.any(axis=1) & np.isnan(frac[:, p])
        frac[gone, p], err[gone, p] = 0.0, 0.0
    return frac, err


