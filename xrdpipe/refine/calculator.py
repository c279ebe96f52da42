"""The calculator: the pattern of a model at a parameter vector, reflection by reflection
(positions, TCH widths, asymmetry, intensities), and its analytic Jacobian.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np

from ..crystallography import coincident_groups, system_cell
from ..errors import RefinementError
from .layout import Layout
from .lebail import extract
from .model import RefinementModel
from .structures import (
    Reflections,
    Structure,
    expand_sites,
    reflections,
    space_group_ops,
    structure_factors_sq,
)

LN2 = math.log(2.0)
_CG = 2.0 * math.sqrt(LN2 / math.pi)
_CL = 2.0 / math.pi
WINDOW_FWHM = 20.0            # each reflection is computed over ±20 FWHM at least ...
TAIL_AREA = 2e-3              # ... and wider where its Lorentzian tail beyond would hold more of its area
NEAR_FWHM = 10.0              # within ±10 FWHM stored with its derivatives; beyond, the Lorentzian tail
#                               alone (Gaussian < 1e-120, asymmetry < e^-100 there) summed where used


class Calculator:
    """Reflection lists and the pattern model of one :class:`RefinementModel` over one 2θ grid."""

    def __init__(self, model: RefinementModel, tth: np.ndarray):
        self.model = model
        self.layout = Layout(model)
        self.x = np.asarray(tth, float)
        self.lo, self.hi = float(self.x[0]), float(self.x[-1])
        lam = model.wavelength_A
        # reflections that can reach the range (a margin for cell changes and tails)
        margin = 1.0
        t_hi = min(self.hi + margin, 179.0)
        d_min = lam / (2 * math.sin(math.radians(t_hi / 2)))
        d_max = lam / (2 * math.sin(math.radians(max(self.lo - margin, 0.05) / 2)))
        self.refl: list[Reflections] = []
        for ph in model.phases:
            r = reflections(ph.structure.space_group, ph.structure.cell, d_min=d_min, d_max=d_max)
            if len(r) == 0:
                raise RefinementError(f"phase {ph.name} has no reflection between {self.lo:g} and {self.hi:g}° 2θ")
            self.refl.append(r)
        self.sizes = [len(r) for r in self.refl]
        self.hkl = [np.ascontiguousarray(r.hkl, float) for r in self.refl]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.computed = [model.method == "rietveld" and not ph.lebail for ph in model.phases]
        self.expanded = [expand_sites(ph.structure) if c else None for ph, c in zip(model.phases, self.computed)]
        # reflections whose intensities are extracted (Le Bail): every one in a Le Bail model,
        # those of Le Bail phases in a Rietveld one
        self.extracted = np.concatenate([np.full(n, not c) for n, c in zip(self.sizes, self.computed)])
        self.any_extracted = bool(self.extracted.any())
        self.is_cell = np.array([q.kind == "cell" for q in self.layout.params])
        # Pawley: intensities are least-squares parameters, solved linearly (with the background)
        self.pawley = model.method == "pawley"
        self.groups = _overlap_groups(model, self.refl, self.sizes) if self.pawley else None
        t = (2 * self.x - (self.lo + self.hi)) / max(self.hi - self.lo, 1e-12)
        self.cheb = np.polynomial.chebyshev.chebvander(t, max(model.background_terms - 1, 0))[:, :model.background_terms]
        self.step = float(np.median(np.diff(self.x))) if self.x.size > 1 else 1.0
        self._local = threading.local()       # the valid-point mask of the refinement running in this thread
        L = self.layout
        self.profile_index = [np.array([L.index[f"{ph.name}.{k}"] for k in "UVWXY"]) for ph in model.phases]
        self.scale_index = [L.index.get(f"{ph.name}.scale", -1) for ph in model.phases]
        self.bkg_index = np.array([L.index[f"bkg_{j}"] for j in range(model.background_terms)], int)
        self.systems = [ph.system for ph in model.phases]
        self.base_cell = [dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), ph.structure.cell)) for ph in model.phases]
        self.cell_keys = [[(q.key, i) for i, q in enumerate(L.params) if q.phase == p and q.kind == "cell"]
                          for p in range(len(model.phases))]

    @property
    def valid(self) -> np.ndarray:
        """The points with a weight in the refinement running in this thread (all by default):
        one Refiner can refine patterns in several threads at once."""
        v = getattr(self._local, "valid", None)
        return np.ones(self.x.size, bool) if v is None else v

    @valid.setter
    def valid(self, mask: np.ndarray) -> None:
        self._local.valid = mask

    # per-reflection quantities ------------------------------------------------------------
    def phase_state(self, p: int, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Position (before zero and displacement), FWHM, mixing, tan θ, cos θ and (Rietveld)
        intensity of phase ``p``'s reflections."""
        from ..kernels import reflection_geometry

        refl = self.refl[p]
        if self.computed[p]:
            st = self.layout.structure(p, theta)
            cell = st.cell
        else:                                # no structure: the cell alone
            v = dict(self.base_cell[p])
            for k, i in self.cell_keys[p]:
                v[k] = theta[i]
            cell = system_cell(self.systems[p], v)
        n = len(refl.hkl)
        out = {k: np.empty(n) for k in ("pos", "fwhm", "eta", "tan", "cos")}
        U, V, W, X, Y = (float(v) for v in theta[self.profile_index[p]])
        reflection_geometry(self.hkl[p], np.asarray(cell, float), float(self.model.wavelength_A), U, V, W, X, Y,
                            out["pos"], out["fwhm"], out["eta"], out["tan"], out["cos"])
        if self.computed[p]:
            th, cs = np.radians(out["pos"]) / 2, out["cos"]
            fsq = structure_factors_sq(st, refl.hkl, expanded=_moved(self.expanded[p], st))
            lp = 1.0 / (np.sin(th) ** 2 * cs)
            if self.model.polarization == "unpolarised":
                lp = lp * (1 + np.cos(2 * th) ** 2) / 2
            out["I"] = theta[self.scale_index[p]] * refl.multiplicity * lp * fsq
        return out

    def _widths_moved(self, p: int, s1: dict[str, np.ndarray], theta: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`phase_state` of phase ``p`` (no computed intensities) at ``theta`` that differs
        from the θ of ``s1`` in widths only: the positions kept, FWHM and mixing recomputed."""
        from ..kernels import tch_widths

        h, e = np.empty(s1["tan"].size), np.empty(s1["tan"].size)
        tch_widths(s1["tan"], s1["cos"], *(float(v) for v in theta[self.profile_index[p]]), h, e)
        return {**s1, "fwhm": h, "eta": e}

    def reflection_state(self, theta: np.ndarray, lebail_I: np.ndarray | None = None,
                         phases: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Position, FWHM, mixing and intensity of every reflection (phases concatenated)."""
        L = self.layout
        parts = phases if phases is not None else [self.phase_state(p, theta) for p in range(len(self.model.phases))]
        out = {k: np.concatenate([q[k] for q in parts]) for k in ("pos", "fwhm", "eta", "tan", "cos")}
        out["pos"] = out["pos"] + theta[L.index["zero"]] + theta[L.index["displacement"]] * out["cos"]
        if not self.any_extracted:
            out["I"] = np.concatenate([q["I"] for q in parts])
        else:
            I = np.zeros(int(self.offsets[-1])) if lebail_I is None else np.array(lebail_I, float)
            for p, q in enumerate(parts):
                if "I" in q:
                    I[int(self.offsets[p]):int(self.offsets[p + 1])] = q["I"]
            out["I"] = I
        return out

    def shares(self, theta: np.ndarray, I: np.ndarray | None) -> np.ndarray:
        """Each phase's share of the calculated intensity inside the range (NaN when there is none)."""
        st = self.reflection_state(theta, I)
        inside = (st["pos"] >= self.lo) & (st["pos"] <= self.hi)
        tot = np.array([float(np.sum(np.maximum(st["I"][a:b], 0.0)[inside[a:b]]))
                        for a, b in zip(self.offsets[:-1], self.offsets[1:])])
        s = tot.sum()
        return tot / s if s > 0 and np.isfinite(s) else np.full(tot.size, np.nan)

    # the pattern ---------------------------------------------------------------------------
    def _windows(self, pos: np.ndarray, fwhm: np.ndarray, eta: np.ndarray,
                 empty: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Each reflection's window, the points within ±k FWHM (``lo_far ... hi_far``), and
        its core within ±NEAR_FWHM (``lo_near ... hi_near``). k is WINDOW_FWHM, or more where
        the pseudo-Voigt's Lorentzian tail beyond it, a share η (1 - (2/π) atan 2k) of the
        area, would exceed TAIL_AREA (k = 64 at η = 0.4): a tail cut off is area missing from
        the model, which the widths and the background then distort themselves to make up
        for. Reflections ``empty`` get none."""
        k = 0.5 * np.tan(0.5 * np.pi * (1.0 - TAIL_AREA / np.maximum(eta, TAIL_AREA)))
        half = np.maximum(k, WINDOW_FWHM) * fwhm
        lo = np.searchsorted(self.x, pos - half)
        hi = np.maximum(np.searchsorted(self.x, pos + half), lo)
        if empty is not None:
            hi = np.where(empty, lo, hi)
        lo_n = np.clip(np.searchsorted(self.x, pos - NEAR_FWHM * fwhm), lo, hi)
        hi_n = np.clip(np.searchsorted(self.x, pos + NEAR_FWHM * fwhm), lo_n, hi)
        return tuple(a.astype(np.int64) for a in (lo, lo_n, hi_n, hi))

    def profiles(self, st: dict[str, np.ndarray], theta: np.ndarray, derivatives: bool = False,
                 full: bool = False):
        """Every reflection's profile (area 1, asymmetry included) on the points of its near
        window (its whole window with ``full``), flat: ``r`` (reflection), ``idx`` (point),
        ``ptr`` (where each reflection's entries start) and ``P``; with ``derivatives`` also
        its derivatives in position (``dx0``), FWHM (``dH``), mixing (``deta``) and the
        asymmetry parameters (``dP1``, ``dP2``) (:func:`xrdpipe.kernels.pv_profiles`). Without
        ``full``, ``far`` holds what the ``tail_*`` kernels of :mod:`xrdpipe.kernels` need for
        the rest of the window (positions, FWHM, mixing, window bounds): the far Lorentzian
        tails hold most of a window's points, and are only ever summed."""
        L = self.layout
        p1, p2 = float(theta[L.index["asym_P1"]]), float(theta[L.index["asym_P2"]])
        # the last profiles computed in this thread: a least-squares step evaluates the
        # pattern, then its derivatives, at the same point
        # a phase without intensity (absent) adds nothing to the pattern nor its derivatives:
        # its reflections get no window
        I = st.get("I")
        dead = tuple([False] * len(self.sizes)) if I is None else \
            tuple(np.add.reduceat(np.asarray(I) != 0, self.offsets[:-1]) == 0)
        key = b"".join(np.ascontiguousarray(st[k], float).tobytes() for k in ("pos", "fwhm", "eta", "tan")) \
            + repr((p1, p2, dead, full)).encode()
        last = getattr(self._local, "profiles", None)
        if last is not None and last[0] == key:
            out = last[1]
            if not derivatives or "dx0" in out:
                return out
        out = self._profiles(st, p1, p2, derivatives, dead, full)
        self._local.profiles = (key, out)
        return out

    def _profiles(self, st: dict[str, np.ndarray], p1: float, p2: float, derivatives: bool,
                  dead: tuple[bool, ...], full: bool) -> dict:
        from ..kernels import pv_profiles

        pos, fwhm, eta = (np.ascontiguousarray(st[k], float) for k in ("pos", "fwhm", "eta"))
        lo_f, lo_n, hi_n, hi_f = self._windows(pos, fwhm, eta, np.repeat(np.array(dead, bool), self.sizes))
        lo, hi = (lo_f, hi_f) if full else (lo_n, hi_n)
        ptr = np.zeros(pos.size + 1, np.int64)
        np.cumsum(hi - lo, out=ptr[1:])
        n = int(ptr[-1])
        asym_on = bool(self.model.asymmetry or p1 or p2)
        inv_tan = 1.0 / np.maximum(np.ascontiguousarray(st["tan"], float), 1e-6)
        r = np.empty(n, np.int64)
        idx = np.empty(n, np.int64)
        P = np.empty(n)
        d = [np.empty(n if derivatives else 0) for _ in range(5)]
        pv_profiles(self.x, pos, fwhm, eta, inv_tan, lo, ptr, p1, p2, asym_on, derivatives, r, idx, P, *d)
        out = {"r": r, "idx": idx, "ptr": ptr, "P": P}
        if not full:
            out["far"] = (pos, fwhm, eta, lo_f, lo_n, hi_n, hi_f)
        if derivatives:
            out.update(zip(("dx0", "dH", "deta", "dP1", "dP2"), d))
        return out

    def background(self, theta: np.ndarray) -> np.ndarray:
        return self.cheb @ theta[self.bkg_index]

    def pattern(self, theta: np.ndarray, lebail_I: np.ndarray | None = None, *, per_phase: bool = False):
        st = self.reflection_state(theta, lebail_I)
        from ..kernels import tail_matvec

        pr = self.profiles(st, theta)
        I = np.ascontiguousarray(st["I"], float)
        contrib = pr["P"] * I[pr["r"]]
        bkg = self.background(theta)
        peaks = np.bincount(pr["idx"], weights=contrib, minlength=self.x.size).astype(float)
        tail_matvec(self.x, *pr["far"], 0, I.size, I, peaks)
        y = bkg + peaks
        if not per_phase:
            return y
        parts = []
        for p in range(len(self.model.phases)):
            a, b = pr["ptr"][self.offsets[p]], pr["ptr"][self.offsets[p + 1]]
            part = np.bincount(pr["idx"][a:b], weights=contrib[a:b], minlength=self.x.size).astype(float)
            tail_matvec(self.x, *pr["far"], int(self.offsets[p]), int(self.offsets[p + 1]), I, part)
            parts.append(part)
        return y, bkg, parts, st

    def _phase_coefficients(self, p: int, s1: dict[str, np.ndarray], params: list[int], theta: np.ndarray,
                            disp: float) -> np.ndarray:
        """(4, reflections, len(params)): how the positions, widths, mixing (and computed
        intensities) of phase ``p``'s reflections move with each of its parameters ``params``,
        differentiated numerically from its state ``s1`` at ``theta``."""
        L = self.layout
        coef = np.zeros((4, s1["pos"].size, len(params)))
        for k, j in enumerate(params):
            q = L.params[j]
            h = q.step if q.step > 0 else 1e-7 * max(abs(theta[j]), 1e-30)
            t2 = theta.copy()
            t2[j] += h
            s2 = self._widths_moved(p, s1, t2) if q.kind == "profile" else self.phase_state(p, t2)
            coef[0, :, k] = (s2["pos"] - s1["pos"]) / h + disp * (s2["cos"] - s1["cos"]) / h
            coef[1, :, k] = (s2["fwhm"] - s1["fwhm"]) / h
            coef[2, :, k] = (s2["eta"] - s1["eta"]) / h
            if "I" in s1:
                coef[3, :, k] = (s2["I"] - s1["I"]) / h
        return coef

    def jacobian(self, theta: np.ndarray, lebail_I: np.ndarray | None, cols: np.ndarray, *,
                 extract_from: np.ndarray | None = None, cycles: int = 0):
        """The model and its derivatives in the parameters ``cols`` (N, len(cols)), and the
        intensities used: with ``extract_from`` (the observed pattern), Le Bail intensities are
        first extracted ``cycles`` times with the same profiles."""
        from ..kernels import profile_columns, tail_columns, tail_matvec

        L = self.layout
        parts = [self.phase_state(p, theta) for p in range(len(self.model.phases))]
        st = self.reflection_state(theta, lebail_I, parts)
        pr = self.profiles(st, theta, derivatives=True)
        if extract_from is not None and cycles:
            st["I"] = extract(self, pr, theta, st["I"], extract_from, cycles)

        I_r = np.ascontiguousarray(st["I"], float)
        I = I_r[pr["r"]]
        peaks = np.bincount(pr["idx"], weights=pr["P"] * I, minlength=self.x.size).astype(float)
        far = pr["far"]
        tail_matvec(self.x, *far, 0, I_r.size, I_r, peaks)
        y = self.background(theta) + peaks
        J = np.zeros((self.x.size, cols.size))
        flat = pr["idx"]
        n_refl = I_r.size
        by_phase: dict[int, list[int]] = {}
        shift_cols: list[int] = []
        bkg_cols, bkg_terms = [], []
        for c, j in enumerate(cols):
            q = L.params[j]
            if q.kind == "bkg":
                bkg_cols.append(c)
                bkg_terms.append(int(q.key))
            elif q.kind == "asym":
                w = pr["dP1"] if q.name == "asym_P1" else pr["dP2"]
                J[:, c] = np.bincount(flat, weights=w * I, minlength=self.x.size)
            elif q.kind in ("zero", "disp"):       # positions move by 1 or cos θ
                shift_cols.append(c)
            else:
                by_phase.setdefault(q.phase, []).append(c)
        if bkg_cols:
            J[:, bkg_cols] = self.cheb[:, bkg_terms]
        args = (pr["r"], flat, I_r, pr["P"], pr["dx0"], pr["dH"], pr["deta"])
        if shift_cols:
            cx0 = np.column_stack([np.ones(n_refl) if L.params[cols[c]].kind == "zero" else st["cos"]
                                   for c in shift_cols])
            zero = np.zeros_like(cx0)
            profile_columns(0, int(pr["ptr"][-1]), *args[:2], 0, *args[2:], cx0, zero, zero, zero,
                            np.array(shift_cols, np.int64), J)
            tail_columns(self.x, *far, 0, n_refl, I_r, cx0, zero, zero, np.array(shift_cols, np.int64), J)
        disp = theta[L.index["displacement"]]
        for p, cs in by_phase.items():
            coef = self._phase_coefficients(p, parts[p], [int(cols[c]) for c in cs], theta, disp)
            a, b = int(pr["ptr"][self.offsets[p]]), int(pr["ptr"][self.offsets[p + 1]])
            profile_columns(a, b, *args[:2], int(self.offsets[p]), *args[2:], *coef, np.array(cs, np.int64), J)
            tail_columns(self.x, *far, int(self.offsets[p]), int(self.offsets[p + 1]), I_r, *coef[:3],
                         np.array(cs, np.int64), J)
        return y, J, st["I"]


def _moved(ex, st: Structure):
    """The expanded positions of a structure whose coordinates may have moved."""
    if ex is None:
        return None
    ops = space_group_ops(st.space_group)
    xyz = np.array([a.xyz for a in st.atoms], float).reshape(-1, 3)
    pos = np.einsum("gij,aj->agi", ops.rot, xyz) + ops.tran[None]
    return replace(ex, pos=pos)


def _overlap_groups(model: RefinementModel, refl: list[Reflections], sizes: list[int]):
    """Pawley: reflections of one phase at the same position for every cell of its crystal
    system (cubic 333 and 511, hexagonal hkl and khl where they are not equivalent:
    :func:`~xrdpipe.crystallography.coincident_groups`) cannot be told apart; they share one
    intensity, split by multiplicity. Returns (the group of each reflection, its share of the
    group's intensity, the number of groups)."""
    gidx = np.empty(int(sum(sizes)), int)
    share = np.empty(gidx.size)
    n, off = 0, 0
    for ph, r in zip(model.phases, refl):
        g = coincident_groups(r.hkl, ph.system, ph.structure.cell)
        m = r.multiplicity.astype(float)
        tot = np.bincount(g, weights=m)
        gidx[off:off + g.size] = g + n
        share[off:off + g.size] = m / tot[g]
        n += int(g.max()) + 1 if g.size else 0
        off += g.size
    return gidx, share, n


def calculate_pattern(model: RefinementModel, tth: np.ndarray, *, background: float = 0.0,
                      values: dict[str, float] | None = None) -> np.ndarray:
    """The pattern of ``model`` at its start values (Rietveld intensities), plus a flat
    ``background``: synthetic data for tests and for checking a model before refining it."""
    calc = Calculator(model, np.asarray(tth, float))
    theta = calc.layout.start()
    for k, v in (values or {}).items():
        theta[calc.layout.index[k]] = v
    theta[calc.layout.index["bkg_0"]] = background if model.background_terms else 0.0
    return calc.pattern(theta)
