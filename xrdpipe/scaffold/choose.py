"""The windows ``xrdpipe init`` writes: around the strongest reflections of the named library
phases inside the detector's range (basal first; coexisting phases in one window)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..config import PhaseSpec
from ..config.base import did_you_mean
from ..crystallography import d_spacing, q_from_tth, tth_from_d, tth_from_q
from ..errors import (
    InitError,
)
from ..phasefit import DEFAULT_SEARCH
from ..phases import LIBRARY
from ..refine.structures import (
    Atom,
    Structure,
    reflections,
    space_group_ops,
    structure_factors_sq,
    template,
)
from .found import MAX_PEAKS, MAX_WINDOWS, Window


def phase_specs(names: Sequence[str]):
    specs = []
    for name in names:
        if name not in LIBRARY:
            hint = did_you_mean(name, LIBRARY, 0.5)
            raise InitError(f"unknown phase {name!r}{hint}; the library has {', '.join(LIBRARY)} "
                            "(write other phases into [[phases]] by hand: name, space_group, a, c)")
        specs.append(PhaseSpec(name=name))
    return specs


def _intensities(ph, wavelength_A: float, d_min: float):
    """(hkl (K,3), d (K,), relative intensity (K,)) of a library phase's reflections."""
    refl = reflections(ph.space_group, ph.cell, d_min)
    kind = {"P''2": "P2"}.get(ph.name, ph.name)
    if kind in ("O3", "P3", "P2"):
        st = template(kind, a=ph.a, c=ph.c, z_o=ph.z_o)
        fsq = structure_factors_sq(st, refl.hkl)
    elif ph.name == "Al":
        fsq = structure_factors_sq(Structure(ph.space_group, ph.cell, (Atom("Al", "Al", (0.0, 0.0, 0.0)),)), refl.hkl)
    else:
        fsq = np.ones(len(refl))
    theta = np.arcsin(np.clip(wavelength_A / (2 * refl.d), 0, 1))
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    inten = fsq * refl.multiplicity * lp
    return refl.hkl, refl.d, inten / inten.max() if inten.size else inten


def _nice_hkl(ph, hkl) -> tuple[int, int, int]:
    """The equivalent of (hkl) written most simply: no negative index where one exists, l >= 0."""
    rot = space_group_ops(ph.space_group).hkl_rot
    eq = np.rint(np.einsum("i,gij->gj", np.asarray(hkl, float), rot)).astype(int)
    eq = np.concatenate([eq, -eq])
    best = min(eq.tolist(), key=lambda v: (sum(x < 0 for x in v), v[2] < 0, [-x for x in v]))
    return tuple(int(x) for x in best)


def _label(ph_name: str, hkl) -> str:
    if all(0 <= x <= 9 for x in hkl):
        return f"{ph_name} {''.join(str(x) for x in hkl)}"
    return f"{ph_name} {' '.join(str(x) for x in hkl)}"


def _reflections_in_range(ph, wavelength_A: float, d_min: float, lo: float, hi: float) -> list[tuple]:
    """A phase's reflections as (hkl, 2θ, relative intensity, (2θ low, 2θ high)) whose whole
    travel lies inside ``lo``-``hi``: where the reflection goes while the cell moves through half
    the phase model's search range (a phase's own cell moves less than that over a cycle)."""
    hkl, d, inten = _intensities(ph, wavelength_A, d_min)
    search = {**DEFAULT_SEARCH, **dict(ph.search)}
    rows = []
    for h, dd, ii in zip(hkl, d, inten):
        h = _nice_hkl(ph, h)
        corners = []
        for fa in (1 - search["a"] / 2, 1 + search["a"] / 2):
            for fc in (1 - search["c"] / 2, 1 + search["c"] / 2):
                c = ph.c * fc if ph.c else None
                b = ph.b * fa if ph.b else None
                corners.append(float(tth_from_d(d_spacing(ph.space_group, *h, ph.a * fa, c, b, ph.beta), wavelength_A)))
        rows.append((h, float(tth_from_d(dd, wavelength_A)), float(ii), (min(corners), max(corners))))
    return [r for r in rows if lo <= r[3][0] and r[3][1] <= hi]


def _picks(refl: dict[str, list[tuple]], cathode) -> list[tuple[int, int, int]]:
    """The reflections windows are made for. A reflection's score is its weakest relative
    intensity over the cathode phases that have it in range (coexisting phases are told apart
    where every one of them shows): the two strongest basal (00l) reflections first, then the
    three strongest others."""
    score: dict[tuple[int, int, int], float] = {}
    for ph in cathode:
        for r in refl[ph.name]:
            score[r[0]] = min(score.get(r[0], np.inf), r[2])
    ranked = sorted(score, key=lambda h: -score[h])
    basal = [h for h in ranked if h[0] == h[1] == 0 and score[h] >= 0.02][:2]
    other = [h for h in ranked if not h[0] == h[1] == 0 and score[h] >= 0.02][:3]
    return basal + other


def _spans(refl: dict[str, list[tuple]], cathode, picks) -> list[list]:
    """One span per picked reflection, covering it in every cathode phase (0.1° more on each
    side); overlapping spans merged: [low, high, [hkl, ...]], by low."""
    names = {ph.name for ph in cathode}
    spans = []
    for h in picks:
        rows = [r for name in refl if name in names for r in refl[name] if r[0] == h]
        if rows:
            spans.append([min(r[3][0] for r in rows) - 0.1, max(r[3][1] for r in rows) + 0.1, h])
    spans.sort(key=lambda s: s[0])
    merged: list[list] = []
    for s in spans:
        if merged and s[0] <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s[1])
            merged[-1][2].append(s[2])
        else:
            merged.append([s[0], s[1], [s[2]]])
    return merged


def _window(refl: dict[str, list[tuple]], w_lo: float, w_hi: float, hkls: list, notes: list[str],
            unit: str = "2th_deg", wavelength_A: float = 1.0) -> Window:
    """The window of a merged span (2θ ``w_lo``-``w_hi``): named after its first pick, listing
    the strongest reflections of every phase inside it (its picks first); its range in ``unit``."""
    inside = [(name, r) for name in refl for r in refl[name] if w_lo <= r[1] <= w_hi and r[2] >= 0.02]
    inside.sort(key=lambda nr: (nr[1][0] not in hkls, -nr[1][2]))
    labels = [_label(name, r[0]) for name, r in inside][:MAX_PEAKS]
    if len(inside) > MAX_PEAKS:
        notes.append(f"window at 2θ {w_lo:.2f}-{w_hi:.2f}° lists the {MAX_PEAKS} strongest of its {len(inside)} reflections")
    name = "".join(str(x) for x in hkls[0]) if all(0 <= x <= 9 for x in hkls[0]) else "_".join(map(str, hkls[0]))
    return Window(name, from_tth(w_lo, w_hi, unit, wavelength_A), tuple(labels))


def to_tth(values: tuple[float, float], unit: str, wavelength_A: float) -> tuple[float, float]:
    """A radial range in ``unit`` as 2θ degrees (Q beyond 4π/λ: 180°)."""
    if unit == "2th_deg":
        return float(values[0]), float(values[1])
    lo, hi = (float(np.nan_to_num(tth_from_q(v, wavelength_A), nan=180.0)) for v in values)
    return lo, hi


def from_tth(lo: float, hi: float, unit: str, wavelength_A: float) -> tuple[float, float]:
    """A 2θ window in ``unit``: 2θ rounded to 0.01°, Q to 0.0001 1/Å (far below the 0.1° margin)."""
    if unit == "2th_deg":
        return round(lo, 2), round(hi, 2)
    return round(float(q_from_tth(lo, wavelength_A)), 4), round(float(q_from_tth(hi, wavelength_A)), 4)


def range_text(lo: float, hi: float, unit: str) -> str:
    return f"{lo:.2f}-{hi:.2f}°" if unit == "2th_deg" else f"{lo:.3f}-{hi:.3f} 1/Å"


def choose_windows(names: Sequence[str], wavelength_A: float, radial: tuple[float, float], *,
                   unit: str = "2th_deg") -> tuple[list[Window], list[str]]:
    """Windows around the strongest reflections of the phases ``names`` inside ``radial`` (in
    ``unit``: ``"2th_deg"`` or ``"q_A^-1"``; the windows are in that unit): basal windows first,
    then by the strength of their first pick; at most MAX_WINDOWS, in radial order, with unique
    names. Returns the windows and notes on what was left out."""
    specs = phase_specs(names)
    lo, hi = to_tth(radial, unit, wavelength_A)
    d_min = wavelength_A / (2 * math.sin(math.radians(hi / 2)))
    notes: list[str] = []
    refl = {ph.name: _reflections_in_range(ph, wavelength_A, d_min, lo, hi) for ph in specs}
    notes += [f"no reflection of {name} falls inside the detector's range {range_text(*radial, unit)}"
              for name, rows in refl.items() if not rows]
    cathode = [ph for ph in specs if ph.fraction]
    if not cathode:
        notes.append(f"no window written: none of {', '.join(names)} is a cathode phase (one in the phase "
                     "fractions); add one such as O3 or P2 to --phases, or write [[windows]] by hand")
        return [], notes
    picks = _picks(refl, cathode)
    windows = [(hkls[0], _window(refl, max(w_lo, lo), min(w_hi, hi), hkls, notes, unit, wavelength_A))
               for w_lo, w_hi, hkls in _spans(refl, cathode, picks)]
    order = {h: i for i, h in enumerate(picks)}
    windows.sort(key=lambda hw: order[hw[0]])
    if len(windows) > MAX_WINDOWS:
        notes.append(f"{len(windows) - MAX_WINDOWS} weaker window(s) left out")
    chosen = sorted((w for _, w in windows[:MAX_WINDOWS]), key=lambda w: w.range[0])
    seen: dict[str, int] = {}
    out = []
    for w in chosen:          # unique names
        n = seen.get(w.name, 0)
        seen[w.name] = n + 1
        out.append(w if n == 0 else Window(f"{w.name}_{n + 1}", w.range, w.peaks))
    return out, notes


