"""Whole-pattern refinement of one pattern: Le Bail and Rietveld, several phases at once.

The model of a pattern (2θ in degrees) is

    y(2θ) = Σ_j b_j T_j(t) + Σ_phases Σ_k I_k Ω(2θ - 2θ_k; H_k, η_k) A(z)

* ``T_j``: Chebyshev polynomials over the refined range (``t`` in [-1, 1]);
* ``2θ_k``: from the cell (constrained by the crystal system: a, c for hexagonal...), plus a
  zero shift and a sample-displacement term ``D cos θ``;
* ``Ω``: pseudo-Voigt of area 1 with Thompson-Cox-Hastings widths, H_G² = U tan²θ + V tan θ + W
  and H_L = X tan θ + Y / cos θ (per phase, degrees);
* ``A(z) = 1 + (P1 Fa(z) + P2 Fb(z)) / tan θ``: Bérar-Baldinozzi asymmetry (low angles),
  z = (2θ - 2θ_k)/H;
* ``I_k``: extracted (Le Bail) or computed (Rietveld) as ``S m_k LP(θ_k) |F_k|²`` with IT92
  form factors, occupancies and B_iso (see :mod:`xrdpipe.structure`).

Least squares: Levenberg-Marquardt on ``(y_obs - y_calc)/σ`` with an analytic Jacobian: the
profile's derivatives in position, width and mixing are exact; how each parameter moves a
reflection's position, width, mixing and intensity is differentiated numerically on the
reflections alone (a few hundred numbers), so a Jacobian costs about as much as three patterns.
Statistics: Rwp, Rexp, GOF = Rwp/Rexp; each refined parameter's esd is sqrt(C_jj) GOF with
C = (JᵀJ)⁻¹. Weight fractions from the scale factors (Hill & Howard):
W_p = S_p (ZMV)_p / Σ S (ZMV).

Example
-------
>>> model = RefinementModel([PhaseModel("O3", o3_structure)], wavelength_A=0.6209, method="rietveld")
>>> result = refine_pattern(model, tth, y, sigma)           # doctest: +SKIP
>>> result.value("O3.a"), result.esd("O3.a"), result.rwp   # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

import numpy as np

from .errors import XrdpipeError
from .structure import (
    Reflections,
    Structure,
    _expand,
    reflections,
    site_multiplicity,
    space_group_ops,
    structure_factors_sq,
)

__all__ = ["PhaseModel", "RefinementModel", "RefinementResult", "RefinementError", "refine_pattern", "Refiner",
           "calculate_pattern", "cell_parameters", "OccupancyConstraint"]

_LN2 = math.log(2.0)
_CG = 2.0 * math.sqrt(_LN2 / math.pi)
_CL = 2.0 / math.pi
WINDOW_FWHM = 20.0            # each reflection is computed over ±20 FWHM
LEBAIL_CYCLES = 8             # Le Bail extractions per least-squares iteration
SHIFT_ESD = 0.01              # converged when every shift is below 1 % of its esd (Rietveld)
LEBAIL_TOL = 1e-3
SHIFT_ESD_LEBAIL = 0.05       # ... 5 % in Le Bail, whose intensities are re-extracted every step
HOLD_ITERATIONS = 20          # Le Bail from a previous frame: at most this many steps with its intensities held
HOLD_TOL = 5e-2               # ... and fewer once χ² falls by less than 5 % in a step


class RefinementError(XrdpipeError):
    """A refinement cannot be set up or did not converge (which frame or key, and why)."""


def cell_parameters(system: str) -> tuple[str, ...]:
    """The free cell parameters of a crystal system."""
    return {"cubic": ("a",), "tetragonal": ("a", "c"), "hexagonal": ("a", "c"), "trigonal": ("a", "c"),
            "orthorhombic": ("a", "b", "c"), "monoclinic": ("a", "b", "c", "beta"),
            "triclinic": ("a", "b", "c", "alpha", "beta", "gamma")}[system]


def _full_cell(system: str, p: dict[str, float]) -> tuple[float, ...]:
    a = p["a"]
    if system == "cubic":
        return (a, a, a, 90.0, 90.0, 90.0)
    if system == "tetragonal":
        return (a, a, p["c"], 90.0, 90.0, 90.0)
    if system in ("hexagonal", "trigonal"):
        return (a, a, p["c"], 90.0, 90.0, 120.0)
    if system == "orthorhombic":
        return (a, p["b"], p["c"], 90.0, 90.0, 90.0)
    if system == "monoclinic":
        return (a, p["b"], p["c"], 90.0, p["beta"], 90.0)
    return (a, p["b"], p["c"], p["alpha"], p["beta"], p["gamma"])


@dataclass(frozen=True)
class OccupancyConstraint:
    """The atoms ``atoms`` (labels) of one phase keep their number per cell: ``per_cell``, or
    (None) the number at the start occupancies, counted with each site's multiplicity. The
    occupancies of the first ones are refined; the last takes what is left (Fe moving from
    the TM layer to the Na layer keeps the composition)."""

    atoms: tuple[str, ...]
    per_cell: float | None = None


@dataclass
class PhaseModel:
    """One phase of a refinement.

    ``structure``: its space group, starting cell and (for Rietveld) atoms. ``refine`` names
    structural parameters by atom label: ``"z:O"`` (the z coordinate of atom O; atoms on one
    special position line move together when given as ``"z:O1,O2"`` with opposite signs written
    ``"z:O1,-O2"``), ``"occ:Fe_tet"``, ``"b:Na"``, ``"b:*"`` (one B_iso shared by every atom).
    ``constraints``: :class:`OccupancyConstraint`. ``profile``: starting U, V, W, X, Y (deg²,
    deg², deg², deg, deg); ``refine_profile`` which of them are refined.
    """

    name: str
    structure: Structure
    refine: Sequence[str] = ()
    constraints: Sequence[OccupancyConstraint] = ()
    profile: dict[str, float] = field(default_factory=lambda: {"U": 0.0, "V": 0.0, "W": 1e-4, "X": 0.0, "Y": 0.02})
    refine_profile: Sequence[str] = ("W", "Y")
    refine_cell: bool = True
    scale: float = 1.0

    @property
    def system(self) -> str:
        import gemmi

        s = gemmi.find_spacegroup_by_name(self.structure.space_group).crystal_system_str()
        return "hexagonal" if s == "trigonal" else s


@dataclass
class RefinementModel:
    """Phases plus the instrument and the pattern's range.

    ``method``: ``"lebail"`` (intensities extracted, no structure needed) or ``"rietveld"``.
    ``polarization``: ``"corrected"`` (pyFAI already divided it out: Lorentz factor only) or
    ``"unpolarised"`` (a laboratory tube: (1 + cos² 2θ)/2). ``correction``: ``"zero"``,
    ``"displacement"``, ``"both"`` or ``"none"``.
    """

    phases: list[PhaseModel]
    wavelength_A: float
    method: Literal["lebail", "rietveld"] = "rietveld"
    background_terms: int = 6
    correction: Literal["none", "zero", "displacement", "both"] = "zero"
    asymmetry: bool = True
    polarization: Literal["corrected", "unpolarised"] = "corrected"
    max_iter: int = 60


# ----------------------------------------------------------------------------------------------
# parameters

@dataclass
class _Param:
    name: str
    value: float
    refined: bool
    step: float
    kind: str                     # cell, profile, scale, struct, zero, disp, asym, bkg
    phase: int = -1
    key: str = ""


class _Layout:
    """The parameter vector of a model: names, start values, which are refined, and how
    structural parameters act on the atoms."""

    def __init__(self, model: RefinementModel):
        self.model = model
        ps: list[_Param] = []
        c = model.correction
        ps.append(_Param("zero", 0.0, c in ("zero", "both"), 1e-5, "zero"))
        ps.append(_Param("displacement", 0.0, c in ("displacement", "both"), 1e-5, "disp"))
        ps.append(_Param("asym_P1", 0.0, model.asymmetry, 1e-5, "asym"))
        ps.append(_Param("asym_P2", 0.0, model.asymmetry, 1e-5, "asym"))
        for j in range(model.background_terms):
            ps.append(_Param(f"bkg_{j}", 0.0, True, 1.0, "bkg", key=str(j)))
        self.struct_links: list[list[tuple[int, str, float]]] = []    # per phase: (param index, what, sign)
        self.constraints: list[list[tuple[list[tuple[int, int]], tuple[int, int], float]]] = []
        for p, ph in enumerate(model.phases):
            st = ph.structure
            cell = dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), st.cell))
            for name in cell_parameters(ph.system):
                ps.append(_Param(f"{ph.name}.{name}", cell[name], ph.refine_cell, 1e-7 * max(cell[name], 1.0),
                                 "cell", p, name))
            for name in ("U", "V", "W", "X", "Y"):
                ps.append(_Param(f"{ph.name}.{name}", float(ph.profile.get(name, 0.0)), name in ph.refine_profile,
                                 1e-7, "profile", p, name))
            if model.method == "rietveld":
                ps.append(_Param(f"{ph.name}.scale", ph.scale, True, 0.0, "scale", p))
            links, cons = self._structural(ph, p, ps, model.method)
            self.struct_links.append(links)
            self.constraints.append(cons)
        self.params = ps
        self.names = [q.name for q in ps]
        self.free = np.array([i for i, q in enumerate(ps) if q.refined], int)
        self.index = {n: i for i, n in enumerate(self.names)}

    def _structural(self, ph: PhaseModel, p: int, ps: list[_Param], method: str):
        labels = [a.label for a in ph.structure.atoms]
        links: list[tuple[int, str, float]] = []
        cons: list[tuple[list[tuple[int, int]], tuple[int, int], float]] = []
        if method != "rietveld":
            return links, cons

        def atoms_of(spec: str, what: str) -> list[tuple[int, float]]:
            out = []
            for part in spec.split(","):
                part = part.strip()
                sign = -1.0 if part.startswith("-") else 1.0
                part = part.lstrip("-")
                if part == "*":
                    out += [(i, 1.0) for i in range(len(labels))]
                    continue
                hit = [i for i, lab in enumerate(labels) if lab == part]
                if not hit:
                    raise RefinementError(f"phase {ph.name}: refine {what}:{spec}: no atom labelled {part!r} "
                                          f"(atoms: {', '.join(labels)})")
                out += [(i, sign) for i in hit]
            return out

        for item in ph.refine:
            what, _, spec = item.partition(":")
            if what not in ("x", "y", "z", "occ", "b") or not spec:
                raise RefinementError(f"phase {ph.name}: cannot refine {item!r}; expected z:LABEL, x:LABEL, y:LABEL, "
                                      "occ:LABEL or b:LABEL (b:* for one B shared by every atom)")
            targets = atoms_of(spec, what)
            first = ph.structure.atoms[targets[0][0]]
            if what in "xyz":
                axis = "xyz".index(what)
                start = first.xyz[axis]
                ops = space_group_ops(ph.structure.space_group)
                for i, _ in targets:
                    xyz = np.array(ph.structure.atoms[i].xyz, float)
                    moved = xyz.copy()
                    moved[axis] += 0.0123
                    if site_multiplicity(ops, moved) != site_multiplicity(ops, xyz):
                        raise RefinementError(f"phase {ph.name}: {what} of atom {labels[i]} is fixed by symmetry "
                                              f"(site {tuple(round(v, 4) for v in xyz)} in {ph.structure.space_group})")
                step = 1e-6
            elif what == "occ":
                start, step = first.occupancy, 1e-6
            else:
                start, step = first.b_iso, 1e-5
            k = len(ps)
            ps.append(_Param(f"{ph.name}.{what}:{spec}", float(start), True, step, "struct", p, item))
            links += [(k, f"{what}:{i}", s) for i, s in targets]
        for c in ph.constraints:
            idx = []
            for lab in c.atoms:
                hit = [i for i, a in enumerate(labels) if a == lab]
                if not hit:
                    raise RefinementError(f"phase {ph.name}: occupancy constraint names {lab!r}, which is not an atom "
                                          f"(atoms: {', '.join(labels)})")
                idx.append(hit[0])
            ops = space_group_ops(ph.structure.space_group)
            mult = [site_multiplicity(ops, ph.structure.atoms[i].xyz) for i in idx]
            total = c.per_cell if c.per_cell is not None else sum(
                m * ph.structure.atoms[i].occupancy for m, i in zip(mult, idx))
            free = []
            for i, m in zip(idx[:-1], mult):
                k = len(ps)
                ps.append(_Param(f"{ph.name}.occ:{labels[i]}", ph.structure.atoms[i].occupancy, True, 1e-6,
                                 "struct", p, f"occ:{labels[i]}"))
                links.append((k, f"occ:{i}", 1.0))
                free.append((k, m))
            cons.append((free, (idx[-1], mult[-1]), float(total)))
        return links, cons

    def start(self) -> np.ndarray:
        return np.array([q.value for q in self.params], float)

    def structure(self, p: int, theta: np.ndarray) -> Structure:
        """Phase ``p``'s structure at parameter values ``theta``."""
        ph = self.model.phases[p]
        st = ph.structure
        vals = {q.key: theta[i] for i, q in enumerate(self.params) if q.phase == p and q.kind == "cell"}
        atoms = list(st.atoms)
        if self.struct_links[p] or self.constraints[p]:
            xyz = [list(a.xyz) for a in atoms]
            occ = [a.occupancy for a in atoms]
            b = [a.b_iso for a in atoms]
            base = {i: list(a.xyz) for i, a in enumerate(st.atoms)}
            for k, what, sign in self.struct_links[p]:
                kind, _, i = what.partition(":")
                i = int(i)
                if kind in ("x", "y", "z"):
                    axis = "xyz".index(kind)
                    first = self.params[k].value
                    xyz[i][axis] = base[i][axis] + sign * (theta[k] - first)
                elif kind == "occ":
                    occ[i] = theta[k]
                else:
                    b[i] = theta[k]
            for free, (last, m_last), total in self.constraints[p]:
                occ[last] = (total - sum(m * occ[self._atom_of(p, k)] for k, m in free)) / m_last
            atoms = [replace(a, xyz=tuple(xyz[i]), occupancy=occ[i], b_iso=b[i]) for i, a in enumerate(atoms)]
        return replace(st, cell=_full_cell(ph.system, {**dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), st.cell)),
                                                      **vals}), atoms=tuple(atoms))

    def _atom_of(self, p: int, k: int) -> int:
        for kk, what, _ in self.struct_links[p]:
            if kk == k:
                return int(what.partition(":")[2])
        raise KeyError(k)


# ----------------------------------------------------------------------------------------------
# the calculator

def _tch(hg2: np.ndarray, hl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hg = np.sqrt(np.maximum(hg2, 1e-12))
    hl = np.maximum(hl, 0.0)
    h5 = hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3 + 0.07842 * hg * hl**4 + hl**5
    h = h5 ** 0.2
    q = hl / h
    eta = np.clip(1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3, 0.0, 1.0)
    return h, eta


class _Calculator:
    """Reflection lists and the pattern model of one :class:`RefinementModel` over one 2θ grid."""

    def __init__(self, model: RefinementModel, tth: np.ndarray):
        self.model = model
        self.layout = _Layout(model)
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
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.expanded = [_expand(ph.structure) if model.method == "rietveld" else None for ph in model.phases]
        t = (2 * self.x - (self.lo + self.hi)) / max(self.hi - self.lo, 1e-12)
        self.cheb = np.polynomial.chebyshev.chebvander(t, max(model.background_terms - 1, 0))[:, :model.background_terms]
        self.step = float(np.median(np.diff(self.x))) if self.x.size > 1 else 1.0
        self.valid = np.ones(self.x.size, bool)
        L = self.layout
        self.profile_index = [np.array([L.index[f"{ph.name}.{k}"] for k in "UVWXY"]) for ph in model.phases]
        self.scale_index = [L.index.get(f"{ph.name}.scale", -1) for ph in model.phases]

    # per-reflection quantities ------------------------------------------------------------
    def phase_state(self, p: int, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Position (before zero and displacement), FWHM, mixing, tan θ, cos θ and (Rietveld)
        intensity of phase ``p``'s reflections."""
        from .structure import d_spacings

        L = self.layout
        st = L.structure(p, theta)
        refl = self.refl[p]
        d = d_spacings(refl.hkl, st.cell)
        th = np.arcsin(np.clip(self.model.wavelength_A / (2 * d), -1.0, 1.0))
        tn, cs = np.tan(th), np.cos(th)
        U, V, W, X, Y = theta[self.profile_index[p]]
        h, e = _tch(U * tn**2 + V * tn + W, X * tn + Y / cs)
        out = {"pos": np.degrees(2 * th), "fwhm": h, "eta": e, "tan": tn, "cos": cs}
        if self.model.method == "rietveld":
            fsq = structure_factors_sq(st, refl.hkl, expanded=_moved(self.expanded[p], st))
            lp = 1.0 / (np.sin(th) ** 2 * cs)
            if self.model.polarization == "unpolarised":
                lp = lp * (1 + np.cos(2 * th) ** 2) / 2
            out["I"] = theta[self.scale_index[p]] * refl.multiplicity * lp * fsq
        return out

    def reflection_state(self, theta: np.ndarray, lebail_I: np.ndarray | None = None,
                         phases: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Position, FWHM, mixing and intensity of every reflection (phases concatenated)."""
        L = self.layout
        parts = phases if phases is not None else [self.phase_state(p, theta) for p in range(len(self.model.phases))]
        out = {k: np.concatenate([q[k] for q in parts]) for k in ("pos", "fwhm", "eta", "tan", "cos")}
        out["pos"] = out["pos"] + theta[L.index["zero"]] + theta[L.index["displacement"]] * out["cos"]
        out["I"] = (np.concatenate([q["I"] for q in parts]) if self.model.method == "rietveld"
                    else np.asarray(lebail_I, float))
        return out

    # the pattern ---------------------------------------------------------------------------
    def _windows(self, pos: np.ndarray, fwhm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(self.x, pos - WINDOW_FWHM * fwhm)
        hi = np.searchsorted(self.x, pos + WINDOW_FWHM * fwhm)
        width = int(max(1, (hi - lo).max()))
        idx = lo[:, None] + np.arange(width)[None, :]
        ok = idx < hi[:, None]
        return np.minimum(idx, self.x.size - 1), ok

    def profiles(self, st: dict[str, np.ndarray], theta: np.ndarray, derivatives: bool = False):
        L = self.layout
        p1, p2 = theta[L.index["asym_P1"]], theta[L.index["asym_P2"]]
        idx, ok = self._windows(st["pos"], st["fwhm"])
        u = self.x[idx] - st["pos"][:, None]
        H = st["fwhm"][:, None]
        eta = st["eta"][:, None]
        u2h2 = (u / H) ** 2
        g = _CG / H * np.exp(-4 * _LN2 * u2h2)
        q = 1 + 4 * u2h2
        lor = _CL / H / q
        prof = eta * lor + (1 - eta) * g
        z = u / H
        ez = np.exp(-z * z)
        fa = 2 * z * ez
        fb = 2 * (2 * z * z - 3) * fa
        inv_tan = 1.0 / np.maximum(st["tan"], 1e-6)[:, None]
        asym = 1 + (p1 * fa + p2 * fb) * inv_tan
        out = {"idx": idx, "ok": ok, "P": np.where(ok, prof * asym, 0.0)}
        if derivatives:
            dg_dx0 = g * 8 * _LN2 * u / H**2
            dg_dh = g * (-1 / H + 8 * _LN2 * u**2 / H**3)
            dl_dx0 = lor * (8 * u / H**2) / q
            dl_dh = -lor / H + lor * (8 * u**2 / H**3) / q
            dfa = 2 * ez * (1 - 2 * z * z)
            dfb = 8 * z * fa + 2 * (2 * z * z - 3) * dfa
            da_dz = (p1 * dfa + p2 * dfb) * inv_tan
            dp_dx0 = eta * dl_dx0 + (1 - eta) * dg_dx0
            dp_dh = eta * dl_dh + (1 - eta) * dg_dh
            out["dx0"] = np.where(ok, asym * dp_dx0 - prof * da_dz / H, 0.0)
            out["dH"] = np.where(ok, asym * dp_dh - prof * da_dz * u / H**2, 0.0)
            out["deta"] = np.where(ok, (lor - g) * asym, 0.0)
            out["dP1"] = np.where(ok, prof * fa * inv_tan, 0.0)
            out["dP2"] = np.where(ok, prof * fb * inv_tan, 0.0)
        return out

    def background(self, theta: np.ndarray) -> np.ndarray:
        L = self.layout
        b = theta[[L.index[f"bkg_{j}"] for j in range(self.model.background_terms)]]
        return self.cheb @ b

    def pattern(self, theta: np.ndarray, lebail_I: np.ndarray | None = None, *, per_phase: bool = False):
        st = self.reflection_state(theta, lebail_I)
        pr = self.profiles(st, theta)
        contrib = pr["P"] * st["I"][:, None]
        bkg = self.background(theta)
        y = bkg + np.bincount(pr["idx"].ravel(), weights=contrib.ravel(), minlength=self.x.size)
        if not per_phase:
            return y
        parts = []
        for p in range(len(self.model.phases)):
            a, b = self.offsets[p], self.offsets[p + 1]
            parts.append(np.bincount(pr["idx"][a:b].ravel(), weights=contrib[a:b].ravel(), minlength=self.x.size))
        return y, bkg, parts, st

    def jacobian(self, theta: np.ndarray, lebail_I: np.ndarray | None, cols: np.ndarray, *,
                 extract_from: np.ndarray | None = None, cycles: int = 0):
        """The model and its derivatives in the parameters ``cols`` (N, len(cols)), and the
        intensities used: with ``extract_from`` (the observed pattern), Le Bail intensities are
        first extracted ``cycles`` times with the same profiles."""
        L = self.layout
        parts = [self.phase_state(p, theta) for p in range(len(self.model.phases))]
        st = self.reflection_state(theta, lebail_I, parts)
        pr = self.profiles(st, theta, derivatives=True)
        if extract_from is not None and cycles:
            st["I"] = _extract(self, pr, theta, st["I"], extract_from, cycles)
        I = st["I"][:, None]
        y = self.background(theta) + np.bincount(pr["idx"].ravel(), weights=(pr["P"] * I).ravel(),
                                                 minlength=self.x.size)
        J = np.zeros((self.x.size, cols.size))
        flat = pr["idx"].ravel()
        for c, j in enumerate(cols):
            q = L.params[j]
            if q.kind == "bkg":
                J[:, c] = self.cheb[:, int(q.key)]
                continue
            if q.kind == "asym":
                w = pr["dP1"] if q.name == "asym_P1" else pr["dP2"]
                J[:, c] = np.bincount(flat, weights=(w * I).ravel(), minlength=self.x.size)
                continue
            if q.kind in ("zero", "disp"):       # positions move by 1 or cos θ
                dx0 = np.ones_like(st["pos"]) if q.kind == "zero" else st["cos"]
                J[:, c] = np.bincount(flat, weights=(I * pr["dx0"] * dx0[:, None]).ravel(), minlength=self.x.size)
                continue
            # a phase's parameter: differentiate that phase's reflections numerically
            p = q.phase
            h = q.step if q.step > 0 else 1e-7 * max(abs(theta[j]), 1e-30)
            t2 = theta.copy()
            t2[j] += h
            s2 = self.phase_state(p, t2)
            s1 = parts[p]
            rows = slice(int(self.offsets[p]), int(self.offsets[p + 1]))
            dx0 = (s2["pos"] - s1["pos"]) / h + theta[L.index["displacement"]] * (s2["cos"] - s1["cos"]) / h
            dH = (s2["fwhm"] - s1["fwhm"]) / h
            de = (s2["eta"] - s1["eta"]) / h
            w = I[rows] * (pr["dx0"][rows] * dx0[:, None] + pr["dH"][rows] * dH[:, None]
                           + pr["deta"][rows] * de[:, None])
            if self.model.method == "rietveld":
                w = w + pr["P"][rows] * ((s2["I"] - s1["I"]) / h)[:, None]
            J[:, c] = np.bincount(pr["idx"][rows].ravel(), weights=w.ravel(), minlength=self.x.size)
        return y, J, st["I"]


def _moved(ex, st: Structure):
    """The expanded positions of a structure whose coordinates may have moved."""
    if ex is None:
        return None
    ops = space_group_ops(st.space_group)
    xyz = np.array([a.xyz for a in st.atoms], float).reshape(-1, 3)
    pos = np.einsum("gij,aj->agi", ops.rot, xyz) + ops.tran[None]
    return replace(ex, pos=pos)


# ----------------------------------------------------------------------------------------------
# results

@dataclass
class RefinementResult:
    """One refined pattern: every parameter's value and esd (NaN when not refined), the
    statistics, the Le Bail intensities, weight fractions and the calculated pattern."""

    names: list[str]
    values: np.ndarray
    esds: np.ndarray
    refined: np.ndarray
    rwp: float
    rexp: float
    gof: float
    n_points: int
    n_params: int
    n_iter: int
    converged: bool
    message: str
    tth: np.ndarray
    observed: np.ndarray
    calculated: np.ndarray
    background: np.ndarray
    phase_patterns: list[np.ndarray]
    ticks: list[np.ndarray]
    lebail_I: np.ndarray | None
    phase_names: list[str]
    weight_fractions: dict[str, tuple[float, float]] = field(default_factory=dict)
    theta: np.ndarray | None = None

    def value(self, name: str) -> float:
        return float(self.values[self.names.index(name)])

    def esd(self, name: str) -> float:
        return float(self.esds[self.names.index(name)])

    def table(self) -> str:
        """The refined parameters, one per line, value(esd)."""
        lines = [f"Rwp {100 * self.rwp:.2f} %, Rexp {100 * self.rexp:.2f} %, GOF {self.gof:.3f} "
                 f"({self.n_params} parameters, {self.n_points} points, {self.n_iter} iterations)"]
        for n, v, e, r in zip(self.names, self.values, self.esds, self.refined):
            if r and not n.startswith("bkg_"):
                lines.append(f"  {n:<24} {v:.6g} ± {e:.2g}")
        for ph, (w, e) in self.weight_fractions.items():
            lines.append(f"  {ph + ' weight fraction':<24} {w:.4f} ± {e:.4f}")
        return "\n".join(lines)


def refine_pattern(model: RefinementModel, tth: np.ndarray, y: np.ndarray, sigma: np.ndarray | None = None, *,
                   start: RefinementResult | None = None, tol: float = 1e-7) -> RefinementResult:
    """Refine ``model`` against one pattern (2θ in degrees, intensities, esds; NaN points are
    left out). ``start``: a previous result of the same model (sequential refinement) whose
    values (and Le Bail intensities) are the starting point. To refine many patterns on one
    grid, make a :class:`Refiner` once instead."""
    tth = np.asarray(tth, float)
    keep = np.isfinite(tth)
    sig = None if sigma is None else np.asarray(sigma, float)[keep]
    return Refiner(model, tth[keep]).refine(np.asarray(y, float)[keep], sig, start=start, tol=tol)


class Refiner:
    """A :class:`RefinementModel` set up on one 2θ grid (reflection lists, background basis),
    to refine pattern after pattern on it."""

    def __init__(self, model: RefinementModel, tth: np.ndarray):
        tth = np.asarray(tth, float)
        if tth.size < 20:
            raise RefinementError(f"only {tth.size} points in the refined range; 20 at least are needed")
        self.model = model
        self.calc = _Calculator(model, tth)

    @property
    def names(self) -> list[str]:
        return list(self.calc.layout.names)

    def refine(self, y: np.ndarray, sigma: np.ndarray | None = None, *, start: RefinementResult | None = None,
               tol: float = 1e-7) -> RefinementResult:
        """Refine against ``y`` (on the grid; NaN points and points without a positive esd get
        no weight), from ``start`` (a previous result) or from the model's start values."""
        return _refine(self.calc, np.asarray(y, float), sigma, start, tol)


def _lm_step(calc, theta, I, free, As, gs, dscale, wt, y, chi2_now, lam):
    """One Levenberg-Marquardt step on the scaled normal equations ``As``, ``gs`` (scaled by
    ``dscale``): (step, θ, λ, χ²) after it, or step None (θ unchanged) when no damping lowers χ²."""
    for _ in range(12):
        try:
            step = np.linalg.solve(As + lam * np.eye(As.shape[0]), gs) / dscale
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        t_new = theta.copy()
        t_new[free] += step
        t_new = _clip(calc, t_new)
        rn = (y - calc.pattern(t_new, I)) * wt
        c_new = float(rn @ rn)
        if np.isfinite(c_new) and c_new < chi2_now:
            return step, t_new, max(lam / 5, 1e-9), c_new
        lam *= 8
    return None, theta, lam, chi2_now


def _refine(calc: "_Calculator", y: np.ndarray, sigma, start, tol) -> RefinementResult:
    model = calc.model
    sig = np.sqrt(np.maximum(np.nan_to_num(y), 1.0)) if sigma is None else np.asarray(sigma, float)
    valid = np.isfinite(y) & np.isfinite(sig) & (sig > 0)
    n_valid = int(valid.sum())
    if n_valid < 20:
        raise RefinementError(f"only {n_valid} usable points in the refined range")
    y = np.where(valid, y, 0.0)
    wt = np.where(valid, 1.0 / np.where(valid, sig, 1.0), 0.0)
    calc.valid = valid
    L = calc.layout
    theta = L.start()
    lebail = model.method == "lebail"
    n_refl = int(calc.offsets[-1])
    I = None
    if start is not None and start.theta is not None and len(start.theta) == len(theta):
        theta = start.theta.copy()
        if lebail and start.lebail_I is not None and start.lebail_I.size == n_refl:
            I = start.lebail_I.copy()
    if start is None or start.theta is None:
        theta = _initial_guess(calc, theta, y[valid] if n_valid else y, lebail)
    if lebail and I is None:
        I = _lebail_start(calc, theta, y)
    free = L.free.copy()
    n_iter = 0
    converged = False
    lam = 1e-3
    chi2 = None
    # Le Bail from a previous frame: its intensities are first held fixed (a structure-like model)
    # while the cell and profile follow the pattern; extracting at positions that are off by more
    # than a peak width would give the peaks away to the background and the cell would wander
    hold = lebail and start is not None and start.lebail_I is not None and I is not None
    held = 0
    outer = 0
    while outer < model.max_iter:
        extracting = lebail and not hold
        yc, J, I_used = calc.jacobian(theta, I, free, extract_from=y if extracting else None, cycles=LEBAIL_CYCLES)
        if extracting:
            I = I_used
        r = (y - yc) * wt
        Jw = J * wt[:, None]
        chi2_now = float(r @ r)
        if hold:
            if held >= HOLD_ITERATIONS or (chi2 is not None and chi2 - chi2_now <= HOLD_TOL * chi2_now):
                hold, chi2, lam = False, None, 1e-3     # the held stage is done: now extract
                continue
        # Le Bail: the re-extracted intensities converge slowly (a fixed point), so it stops,
        # as GSAS-II does, once χ² changes by less than 0.1 % in an iteration
        elif chi2 is not None and abs(chi2 - chi2_now) <= (max(tol, LEBAIL_TOL) if lebail else tol) * chi2_now \
                and outer > 1:
            converged = True
            chi2 = chi2_now
            break
        chi2 = chi2_now
        A = Jw.T @ Jw
        dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
        As = A / np.outer(dscale, dscale)
        step, theta, lam, c_new = _lm_step(calc, theta, I, free, As, (Jw.T @ r) / dscale, dscale, wt, y, chi2_now, lam)
        n_iter += 1
        if hold:
            held += 1
            if step is None:
                held = HOLD_ITERATIONS
            continue
        if step is None:
            converged = not lebail or outer > 2
            break
        # converged when every shift is a small fraction of its esd (as Rietveld programs do)
        try:
            var = np.diag(np.linalg.inv(As)) / dscale**2 * c_new / max(n_valid - free.size, 1)
            limit = SHIFT_ESD_LEBAIL if lebail else SHIFT_ESD
            if outer >= (2 if lebail else 1) and np.all(np.abs(step) <= limit * np.sqrt(np.maximum(var, 1e-300))):
                converged = True
                break
        except np.linalg.LinAlgError:
            pass
        outer += 1
    # final statistics and esds
    yc, J, I_used = calc.jacobian(theta, I, free, extract_from=y if lebail else None, cycles=1)
    if lebail:
        I = I_used
    r = (y - yc) * wt
    Jw = J * wt[:, None]
    chi2 = float(r @ r)
    n_p = int(free.size)
    dof = max(n_valid - n_p, 1)
    sw = float(np.sum((y * wt) ** 2))
    rwp = math.sqrt(chi2 / sw)
    rexp = math.sqrt(dof / sw)
    gof = rwp / rexp
    esd = np.full(theta.size, np.nan)
    cov = None
    try:
        A = Jw.T @ Jw
        dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
        cov = np.linalg.pinv(A / np.outer(dscale, dscale), rcond=1e-12) / np.outer(dscale, dscale)
        esd[free] = np.sqrt(np.maximum(np.diag(cov), 0.0)) * gof
    except np.linalg.LinAlgError:
        pass
    _, bkg, parts, st = calc.pattern(theta, I, per_phase=True)
    ticks = [st["pos"][calc.offsets[p]:calc.offsets[p + 1]] for p in range(len(model.phases))]
    refined = np.zeros(theta.size, bool)
    refined[free] = True
    res = RefinementResult(list(L.names), theta.copy(), esd, refined, rwp, rexp, gof, n_valid, n_p, n_iter,
                           converged, "" if converged else f"not converged in {model.max_iter} iterations",
                           calc.x, np.where(valid, y, np.nan), yc, bkg, parts, ticks, None if I is None else I.copy(),
                           [ph.name for ph in model.phases], theta=theta.copy())
    if not lebail:
        res.weight_fractions = _weight_fractions(calc, theta, cov, free, gof)
    return res


def _clip(calc: _Calculator, theta: np.ndarray) -> np.ndarray:
    """Keep widths and cells physical during a step."""
    L = calc.layout
    for i, q in enumerate(L.params):
        if q.kind == "profile" and q.refined:
            if q.key in ("X", "Y"):
                theta[i] = max(theta[i], 0.0)
            elif q.key == "W":
                theta[i] = max(theta[i], 1e-8)      # a Gaussian width at every angle
        if q.kind == "cell":
            theta[i] = max(theta[i], 1e-3)
    return theta


def _initial_guess(calc: _Calculator, theta: np.ndarray, y: np.ndarray, lebail: bool) -> np.ndarray:
    """Background from the low percentiles; Rietveld scales from the pattern's area."""
    L = calc.layout
    nb = calc.model.background_terms
    if nb:
        base = np.percentile(y, 10)
        theta[L.index["bkg_0"]] = base
    if not lebail:
        net = float(np.sum(np.maximum(y - np.percentile(y, 10), 0.0)) * calc.step)
        t = theta.copy()
        for p, ph in enumerate(calc.model.phases):
            t[L.index[f"{ph.name}.scale"]] = 1.0
        st = calc.reflection_state(t)
        for p, ph in enumerate(calc.model.phases):
            a, b = calc.offsets[p], calc.offsets[p + 1]
            inside = (st["pos"][a:b] >= calc.lo) & (st["pos"][a:b] <= calc.hi)
            tot = float(np.sum(st["I"][a:b][inside]))
            if tot > 0 and ph.scale == 1.0:
                theta[L.index[f"{ph.name}.scale"]] = net / tot / len(calc.model.phases)
    return theta


def _lebail_start(calc: _Calculator, theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    st = calc.reflection_state(theta, np.ones(int(calc.offsets[-1])))
    net = float(np.sum(np.maximum(y - calc.background(theta), 0.0)[calc.valid]) * calc.step)
    inside = (st["pos"] >= calc.lo) & (st["pos"] <= calc.hi)
    I = np.where(inside, net / max(int(inside.sum()), 1), 0.0)
    return _lebail_cycle(calc, theta, I, y, cycles=5)


def _lebail_cycle(calc: _Calculator, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int = 1) -> np.ndarray:
    """Le Bail extraction: each reflection takes its share of the observed net intensity
    (``cycles`` times; the profiles do not change in between, so they are computed once)."""
    return _extract(calc, calc.profiles(calc.reflection_state(theta, I), theta), theta, I, y, cycles)


def _extract(calc: _Calculator, pr: dict, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int) -> np.ndarray:
    net = y - calc.background(theta)
    area = pr["P"].sum(axis=1) * calc.step
    flat = pr["idx"].ravel()
    for _ in range(cycles):
        contrib = pr["P"] * I[:, None]
        yc_net = np.bincount(flat, weights=contrib.ravel(), minlength=calc.x.size)
        ratio = np.where(yc_net > 1e-12 * max(yc_net.max(), 1e-300), net / np.maximum(yc_net, 1e-300), 0.0)
        ratio = np.where(calc.valid, ratio, 1.0)          # no data: the model keeps its share
        share = (contrib * ratio[pr["idx"]]).sum(axis=1) * calc.step
        I = np.maximum(np.where(area > 0.05, share / np.maximum(area, 1e-12), I), 0.0)
    return I


def _weight_fractions(calc: _Calculator, theta, cov, free, gof) -> dict[str, tuple[float, float]]:
    L = calc.layout
    zmv, s_idx = [], []
    for p, ph in enumerate(calc.model.phases):
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
    for p, ph in enumerate(calc.model.phases):
        err = np.nan
        if cov is not None and all(i in pos for i in s_idx):
            # dW_p/dS_q = (δpq zmv_p total - w_p zmv_q) / total²
            grad = np.array([((p == q) * zmv[p] * total - w[p] * zmv[q]) / total**2 for q in range(len(s_idx))])
            sub = cov[np.ix_([pos[i] for i in s_idx], [pos[i] for i in s_idx])]
            err = float(np.sqrt(max(grad @ sub @ grad, 0.0)) * gof)
        out[ph.name] = (float(frac[p]), err)
    return out


def calculate_pattern(model: RefinementModel, tth: np.ndarray, *, background: float = 0.0,
                      values: dict[str, float] | None = None) -> np.ndarray:
    """The pattern of ``model`` at its start values (Rietveld intensities), plus a flat
    ``background``: synthetic data for tests and for checking a model before refining it."""
    calc = _Calculator(model, np.asarray(tth, float))
    theta = calc.layout.start()
    for k, v in (values or {}).items():
        theta[calc.layout.index[k]] = v
    theta[calc.layout.index["bkg_0"]] = background if model.background_terms else 0.0
    return calc.pattern(theta)


