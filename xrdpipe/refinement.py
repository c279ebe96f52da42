"""Whole-pattern refinement of one pattern: Le Bail, Pawley and Rietveld, several phases at once.

The model of a pattern (2θ in degrees) is

    y(2θ) = Σ_j b_j T_j(t) + Σ_phases Σ_k I_k Ω(2θ - 2θ_k; H_k, η_k) A(z)

* ``T_j``: Chebyshev polynomials over the refined range (``t`` in [-1, 1]);
* ``2θ_k``: from the cell (constrained by the crystal system: a, c for hexagonal...), plus a
  zero shift and a sample-displacement term ``D cos θ``;
* ``Ω``: pseudo-Voigt of area 1 with Thompson-Cox-Hastings widths, H_G² = U tan²θ + V tan θ + W
  and H_L = X tan θ + Y / cos θ (per phase, degrees);
* ``A(z) = 1 + (P1 Fa(z) + P2 Fb(z)) / tan θ``: Bérar-Baldinozzi asymmetry (low angles),
  z = (2θ - 2θ_k)/H;
* ``I_k``: extracted (Le Bail), least-squares parameters (Pawley: non-negative, one per group
  of reflections at the same position, solved with the background by NNLS at every trial of
  the nonlinear parameters: variable projection) or computed (Rietveld) as
  ``S m_k LP(θ_k) |F_k|²`` with IT92 form factors, occupancies and B_iso (see
  :mod:`xrdpipe.structure`).

Least squares: Levenberg-Marquardt on ``(y_obs - y_calc)/σ`` with an analytic Jacobian: the
profile's derivatives in position, width and mixing are exact; how each parameter moves a
reflection's position, width, mixing and intensity is differentiated numerically on the
reflections alone (a few hundred numbers), so a Jacobian costs about as much as three patterns.
Statistics: Rwp, Rexp, GOF = Rwp/Rexp; each refined parameter's esd is sqrt(C_jj) GOF with
C = (JᵀJ)⁻¹. Weight fractions from the scale factors (Hill & Howard):
W_p = S_p (ZMV)_p / Σ S (ZMV).

Start values need not be close (:meth:`Refiner.refine`): without a previous result, or where
the refinement from it is not ``ok``, each phase's cell is searched on a grid (a matched filter,
then linear fits with one non-negative intensity per reflection and the background), and least
squares is staged (background and scales; cells and zero; W, Y; U, V, X; everything).
Parameters stay within bounds (widths and scales positive, cells inside their searched range,
shifts within ±1°); one at a bound is reported in :attr:`RefinementResult.at_bound` without an
esd. :attr:`RefinementResult.status` is ``ok``, ``flagged`` (GOF above ``gof_max``, a parameter
at a bound) or ``failed`` (no convergence, a cell at the edge of its range), the reasons in
``message``. In Le Bail, a phase the fit does not need is *absent* (:attr:`RefinementResult.absent`):
its cell is held and not reported.

Example
-------
>>> model = RefinementModel([PhaseModel("O3", o3_structure)], wavelength_A=0.6209, method="rietveld")
>>> result = refine_pattern(model, tth, y, sigma)           # doctest: +SKIP
>>> result.value("O3.a"), result.esd("O3.a"), result.rwp   # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
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
WINDOW_FWHM = 20.0            # each reflection is computed over ±20 FWHM at least ...
TAIL_AREA = 2e-3              # ... and wider where its Lorentzian tail beyond would hold more of its area
NEAR_FWHM = 10.0              # within ±10 FWHM stored with its derivatives; beyond, the Lorentzian tail
#                               alone (Gaussian < 1e-120, asymmetry < e^-100 there) summed where used
LEBAIL_CYCLES = 8             # Le Bail extractions per least-squares iteration
LEBAIL_CYCLES_FOLLOW = 30     # ... from a previous frame: accelerated, at most this many ...
LEBAIL_CYCLE_TOL = 1e-5       # ... until the intensities change by less than this (relative)
LEBAIL_FLOOR = 1e-9           # an extracted intensity stays above this x the largest (0 only when absent)
LEBAIL_MIN_AREA = 0.02        # a reflection with less of its profile's area in the range is not extracted (0)
SHIFT_ESD = 0.01              # converged when every shift is below 1 % of its esd (Rietveld)
LEBAIL_TOL = 1e-3
SHIFT_ESD_LEBAIL = 0.05       # ... 5 % in Le Bail, whose intensities are re-extracted every step
HOLD_ITERATIONS = 20          # Le Bail from a previous frame: at most this many steps with its intensities held
HOLD_TOL = 5e-2               # ... and fewer once χ² falls by less than 5 % in a step
STAGE_ITER = 12               # least-squares steps of each stage but the last (staged strategy)
ABSENT_CHI2 = 3.0             # a Le Bail phase lowering χ² by less than this per reflection ...
GOF_RISE = 1.5                # a frame whose GOF rose by more than this since the previous one is also restarted
FOLLOW = 0.5                  # a phase followed from the previous frame: half its searched range around it
ABSENT_REL = 0.05             # ... or than this fraction of χ² is absent
WEAK_SHARE = 0.1              # a phase with less of the previous frame's intensity is not judged absent before refining
TREND_ESD = 2.0              # a cell's change in the frame before, when above this x its esd, is extrapolated
GOF_RETEST = 1.1              # a frame this much worse (GOF) than the one before tests its absent phases again
SEARCH_DEFAULT = {"a": 0.015, "b": 0.015, "c": 0.03}    # relative half-ranges of the cell search
SEARCH_ANGLE_DEG = 2.0        # ... and of angles (degrees); angles are searched by least squares only
PRED_TOL = 0.01               # Pawley: converged once a step would lower χ² by less than this x χ²/dof
SHIFT_BOUND_DEG = 1.0         # the zero shift and the displacement term stay within ±1°


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
    deg², deg², deg, deg); ``refine_profile`` which of them are refined. ``lebail``: in a
    Rietveld model, this phase's intensities are extracted (Le Bail) rather than computed from a
    structure (the Al current collector beside Rietveld phases); it has no scale and no weight
    fraction. ``search``: relative half-ranges of the cell search (see :meth:`search_range`).
    """

    name: str
    structure: Structure
    refine: Sequence[str] = ()
    constraints: Sequence[OccupancyConstraint] = ()
    profile: dict[str, float] = field(default_factory=lambda: {"U": 0.0, "V": 0.0, "W": 1e-4, "X": 0.0, "Y": 0.02})
    refine_profile: Sequence[str] = ("W", "Y")
    refine_cell: bool = True
    scale: float = 1.0
    search: dict[str, float] = field(default_factory=dict)
    lebail: bool = False

    def search_range(self, name: str) -> tuple[float, float]:
        """The interval the cell parameter ``name`` is searched (and must stay) in: the
        configured value ± ``search[name]`` (relative, as ``[[phases]] search``), default ±1.5 %
        for a, b as a, ±3 % for c, ±2° for angles."""
        v = dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.structure.cell))[name]
        if name in ("alpha", "beta", "gamma") and name not in self.search:
            return v - SEARCH_ANGLE_DEG, v + SEARCH_ANGLE_DEG
        default = self.search.get("a", SEARCH_DEFAULT["b"]) if name == "b" else SEARCH_DEFAULT.get(name, 0.015)
        h = self.search.get(name, default)
        return v * (1 - h), v * (1 + h)

    @property
    def system(self) -> str:
        return _crystal_system(self.structure.space_group)


@lru_cache(maxsize=256)
def _crystal_system(space_group: str) -> str:
    import gemmi

    s = gemmi.find_spacegroup_by_name(space_group).crystal_system_str()
    return "hexagonal" if s == "trigonal" else s


@dataclass
class RefinementModel:
    """Phases plus the instrument and the pattern's range.

    ``method``: ``"lebail"`` (intensities extracted, no structure needed), ``"pawley"``
    (intensities least-squares parameters, non-negative, solved linearly with the background at
    every step: variable projection; no structure needed) or ``"rietveld"``.
    ``polarization``: ``"corrected"`` (pyFAI already divided it out: Lorentz factor only) or
    ``"unpolarised"`` (a laboratory tube: (1 + cos² 2θ)/2). ``correction``: ``"zero"``,
    ``"displacement"``, ``"both"`` or ``"none"``. ``strategy``: ``"staged"`` (from the start
    values: background and scales, then cells and zero, then widths, then everything, as a
    careful GSAS-II user does) or ``"direct"`` (everything at once). ``gof_max``: a result is
    ``ok`` only with GOF = Rwp/Rexp at most this (else ``flagged``). ``search``: where a start does not fit, each
    phase's cell is searched on a grid (intensities and background solved linearly at every
    trial) before least squares.
    """

    phases: list[PhaseModel]
    wavelength_A: float
    method: Literal["lebail", "pawley", "rietveld"] = "rietveld"
    background_terms: int = 6
    correction: Literal["none", "zero", "displacement", "both"] = "zero"
    asymmetry: bool = True
    polarization: Literal["corrected", "unpolarised"] = "corrected"
    max_iter: int = 60
    strategy: Literal["staged", "direct"] = "staged"
    gof_max: float = 5.0
    search: bool = True


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
            computed = model.method == "rietveld" and not ph.lebail
            if computed:
                ps.append(_Param(f"{ph.name}.scale", ph.scale, True, 0.0, "scale", p))
            links, cons = self._structural(ph, p, ps, "rietveld" if computed else "lebail")
            self.struct_links.append(links)
            self.constraints.append(cons)
        self.params = ps
        self.names = [q.name for q in ps]
        # bounds: widths and scales positive, cells inside their searched range, shifts within ±1°
        self.lower = np.full(len(ps), -np.inf)
        self.upper = np.full(len(ps), np.inf)
        for i, q in enumerate(ps):
            if q.kind == "profile" and q.key in ("U", "W", "X", "Y"):
                self.lower[i] = 0.0
            elif q.kind == "scale":
                self.lower[i] = 0.0
            elif q.kind == "cell":
                self.lower[i], self.upper[i] = model.phases[q.phase].search_range(q.key)
            elif q.kind in ("zero", "disp"):
                self.lower[i], self.upper[i] = -SHIFT_BOUND_DEG, SHIFT_BOUND_DEG
            elif q.kind == "struct" and q.key.startswith("occ:"):
                self.lower[i], self.upper[i] = 0.0, 1.0
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
        self.hkl = [np.ascontiguousarray(r.hkl, float) for r in self.refl]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.computed = [model.method == "rietveld" and not ph.lebail for ph in model.phases]
        self.expanded = [_expand(ph.structure) if c else None for ph, c in zip(model.phases, self.computed)]
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
        from .kernels import reflection_geometry

        refl = self.refl[p]
        if self.computed[p]:
            st = self.layout.structure(p, theta)
            cell = st.cell
        else:                                # no structure: the cell alone
            v = dict(self.base_cell[p])
            for k, i in self.cell_keys[p]:
                v[k] = theta[i]
            cell = _full_cell(self.systems[p], v)
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
        from .kernels import tch_widths

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
        from .kernels import pv_profiles

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
        from .kernels import tail_matvec

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

    def jacobian(self, theta: np.ndarray, lebail_I: np.ndarray | None, cols: np.ndarray, *,
                 extract_from: np.ndarray | None = None, cycles: int = 0):
        """The model and its derivatives in the parameters ``cols`` (N, len(cols)), and the
        intensities used: with ``extract_from`` (the observed pattern), Le Bail intensities are
        first extracted ``cycles`` times with the same profiles."""
        from .kernels import profile_columns, tail_columns, tail_matvec

        L = self.layout
        parts = [self.phase_state(p, theta) for p in range(len(self.model.phases))]
        st = self.reflection_state(theta, lebail_I, parts)
        pr = self.profiles(st, theta, derivatives=True)
        if extract_from is not None and cycles:
            st["I"] = _extract(self, pr, theta, st["I"], extract_from, cycles)

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
            # a phase's parameters: its reflections' positions, widths, mixing (and computed
            # intensities) differentiated numerically
            s1 = parts[p]
            m = s1["pos"].size
            coef = np.zeros((4, m, len(cs)))
            for k, c in enumerate(cs):
                j = int(cols[c])
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
    status: str = "ok"
    at_bound: dict[str, str] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    start_from: str = ""
    intensity_esd: np.ndarray | None = None
    # the change of the cells since the result this one was refined from (sequential, same
    # phases present; else None): the next frame starts from the cells moved on by it
    cell_trend: np.ndarray | None = None

    def value(self, name: str) -> float:
        return float(self.values[self.names.index(name)])

    def esd(self, name: str) -> float:
        """The esd of a refined parameter; NaN when not refined or held at a bound (see
        :attr:`at_bound`: parameter name -> ``"lower"`` or ``"upper"``)."""
        return float(self.esds[self.names.index(name)])

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def table(self) -> str:
        """The refined parameters, one per line, value(esd)."""
        lines = [f"Rwp {100 * self.rwp:.2f} %, Rexp {100 * self.rexp:.2f} %, GOF {self.gof:.3f} "
                 f"({self.n_params} parameters, {self.n_points} points, {self.n_iter} iterations): {self.status}"
                 + (f" ({self.message})" if self.message else "")]
        for n, v, e, r in zip(self.names, self.values, self.esds, self.refined):
            if r and not n.startswith("bkg_"):
                lines.append(f"  {n:<24} {v:.6g} " + (f"at its {self.at_bound[n]} bound" if n in self.at_bound
                                                       else f"± {e:.2g}"))
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


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, inspected once (``threadpool_limits``
    inspects them again at every call: a few ms, as long as a tracked frame's refinement)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class Refiner:
    """A :class:`RefinementModel` set up on one 2θ grid (reflection lists, background basis),
    to refine pattern after pattern on it."""

    def __init__(self, model: RefinementModel, tth: np.ndarray):
        tth = np.asarray(tth, float)
        if tth.size < 20:
            raise RefinementError(f"only {tth.size} points in the refined range; 20 at least are needed")
        self.model = model
        self.calc = _Calculator(model, tth)

    def refine(self, y: np.ndarray, sigma: np.ndarray | None = None, *, start: RefinementResult | None = None,
               tol: float = 1e-7, gof_limit: float | None = None, restart: bool = True) -> RefinementResult:
        """Refine against ``y`` (on the grid; NaN points and points without a positive esd get
        no weight).

        From ``start`` (a previous result, e.g. the last frame) all parameters are refined at
        once. Where that result is not ``ok`` (or its GOF exceeds ``gof_limit``), and always
        without ``start``, the pattern is refined again (staged, see :class:`RefinementModel`)
        from the better of the configured cells and a cell search around them (``search``;
        compared by a linear fit), and the better result (``ok`` first, then the lowest Rwp)
        is returned; :attr:`~RefinementResult.start_from` says which start won (``previous``,
        ``configured`` or ``searched``). ``restart=False``: only the first attempt.
        """
        # small dense matrices: BLAS threads only contend with each other (and with other processes)
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._refine(y, sigma, start=start, tol=tol, gof_limit=gof_limit, restart=restart)

    @property
    def names(self) -> list[str]:
        return list(self.calc.layout.names)

    def _refine(self, y, sigma, *, start, tol, gof_limit, restart) -> RefinementResult:
        calc = self.calc
        model = self.model
        y = np.asarray(y, float)
        staged = model.strategy == "staged"

        def good(r: RefinementResult) -> bool:
            # flagged is good enough where the previous frame was flagged too (no restart every frame)
            fine = r.ok or (r.status == "flagged" and start is not None and start.status == "flagged")
            # a GOF that rose notably since the previous frame is worth a second start
            rose = start is not None and np.isfinite(start.gof) and start.gof > 0 and r.gof > GOF_RISE * start.gof
            return fine and not rose and (gof_limit is None or r.gof <= gof_limit)

        tried: list[RefinementResult] = []
        if start is not None and start.theta is not None:
            # Le Bail with several phases: from the previous cells with the intensities extracted
            # afresh (phase fractions change from frame to frame), then with the previous
            # intensities held while the cells move (a cell that jumped by peak widths)
            variants = [True, False] if (calc.any_extracted and not calc.pawley and len(model.phases) > 1
                                         and start.lebail_I is not None) else [False]
            for fresh in variants:
                r = _refine(calc, y, sigma, start, tol, fresh=fresh)
                r.start_from = "previous"
                # (Le Bail only: in Pawley, whose intensities are solved at every step, it
                # brought a restart at frame 44 of the 80-frame O3/P3/Al series, sign +1)
                if (calc.any_extracted and not calc.pawley and set(r.absent) == set(start.absent)
                        and len(start.theta) == len(r.theta)):
                    r.cell_trend = np.where(calc.is_cell, r.theta - start.theta, 0.0)
                if good(r) or not restart:
                    return r
                tried.append(r)
        if not model.search:
            r = _refine(calc, y, sigma, None, tol, staged=staged)
            r.start_from = "configured"
        else:
            # the search compares the configured cells with its own best trials (linear fits)
            centre, followed = None, []
            if start is not None and start.theta is not None:
                # around the previous frame's cells (the configured ones for phases it lacked)
                centre = calc.layout.start()
                gone = set(start.absent)
                for p, ph in enumerate(model.phases):
                    if ph.name not in gone:
                        followed.append(p)
                        for i in _cell_idx(calc, p, angles=True):
                            centre[i] = start.theta[i]
            theta0, I0, source = _search(calc, y, sigma, centre, followed)
            r = _refine(calc, y, sigma, None, tol, staged=staged, theta0=theta0, I0=I0, centre=centre,
                        followed=followed)
            r.start_from = source
            if followed and len(followed) < len(model.phases) and not good(r):
                # the phases followed held at their previous cells, the others searched: the
                # grid may put a weak followed phase (Al) on a new phase's lines, where its cell
                # then stays (a frame where P3 appears: Al 0.01 Å off, GOF 2.96 against 1.33)
                tried.append(r)
                theta0, I0, _ = _search(calc, y, sigma, centre, followed, hold=followed)
                r = _refine(calc, y, sigma, None, tol, staged=staged, theta0=theta0, I0=I0, centre=centre,
                            followed=followed)
                r.start_from = "previous"
        tried.append(r)
        return _best(tried, gof_limit)


def _best(tried: list[RefinementResult], gof_limit: float | None) -> RefinementResult:
    rank = {"ok": 0, "flagged": 1, "failed": 2}

    def key(r: RefinementResult):
        over = gof_limit is not None and not r.gof <= gof_limit
        return (rank[r.status] + (2 if over else 0), r.rwp if np.isfinite(r.rwp) else np.inf)

    return min(tried, key=key)


def _scaled_normal(Jw: np.ndarray, r: np.ndarray, t: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """The Levenberg-Marquardt normal equations of the parameters ``t`` not pinned at a bound
    (at a bound with the gradient pushing outwards): their indices, the scaled normal matrix,
    the scaled gradient and the scales; None when every parameter is pinned."""
    g = Jw.T @ r
    pinned = ((t <= lo) & (g < 0)) | ((t >= hi) & (g > 0))
    move = np.flatnonzero(~pinned)
    if move.size == 0:
        return None
    Jm = Jw[:, move]
    A = Jm.T @ Jm
    dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
    return move, A / np.outer(dscale, dscale), g[move] / dscale, dscale


def _lm_step(calc, theta, I, free, As, gs, dscale, wt, y, chi2_now, lam, bounds):
    """One Levenberg-Marquardt step on the scaled normal equations ``As``, ``gs`` (scaled by
    ``dscale``), kept inside the bounds: (step, θ, λ, χ²) after it, or step None (θ unchanged)
    when no damping lowers χ²."""
    lower, upper = bounds
    for _ in range(12):
        try:
            step = np.linalg.solve(As + lam * np.eye(As.shape[0]), gs) / dscale
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        t_new = theta.copy()
        t_new[free] = np.clip(t_new[free] + step, lower[free], upper[free])
        rn = (y - calc.pattern(t_new, I)) * wt
        c_new = float(rn @ rn)
        if np.isfinite(c_new) and c_new < chi2_now:
            return t_new[free] - theta[free], t_new, max(lam / 5, 1e-9), c_new
        lam *= 8
    return None, theta, lam, chi2_now


def _lm(calc, y, wt, theta, I, free, *, max_iter, tol, hold, n_valid, bounds, follow=False):
    """Levenberg-Marquardt over the parameters ``free`` (Le Bail: intensities re-extracted at
    every step, or first held at ``I`` with ``hold``). A parameter at a bound that the gradient
    pushes outward is left out of a step. Returns θ, I, converged, steps taken."""
    lower, upper = bounds
    lebail = calc.any_extracted
    n_iter = 0
    converged = False
    lam = 1e-3
    chi2 = None
    held = 0
    outer = 0
    best, last, rises = None, np.inf, 0
    if free.size == 0:
        return theta, I, True, 0
    while outer < max_iter:
        extracting = lebail and not hold
        # from a previous frame (cells close), the extraction runs to its fixed point at every
        # step (accelerated), so overlapping phases no longer creep there step by step; from far
        # starts a few plain cycles, whose partial extraction keeps a wrong phase from fitting
        # another's misplaced peaks
        if extracting and follow:            # (the profiles are computed once for both)
            I = _lebail_cycle(calc, theta, I, y, cycles=LEBAIL_CYCLES_FOLLOW, tol=LEBAIL_CYCLE_TOL)
        yc, J, I_used = calc.jacobian(theta, I, free, extract_from=y if extracting and not follow else None,
                                      cycles=LEBAIL_CYCLES)
        if extracting:
            I = I_used
        r = (y - yc) * wt
        Jw = J * wt[:, None]
        chi2_now = float(r @ r)
        if extracting and follow:
            # from a previous frame: where χ² after the re-extraction rose in two steps in a row,
            # the least-squares step and the extraction pull apart (the background and the
            # intensities of overlapping lines creep together, half an esd a step, for ever):
            # the best state met is the Le Bail fixed point
            rises = rises + 1 if best is not None and chi2_now > last else 0
            last = chi2_now
            if best is None or chi2_now < best[0]:
                best = (chi2_now, theta, I)
            if rises >= 2:
                _, theta, I = best
                converged = True
                break
        if hold:
            if held >= HOLD_ITERATIONS or (chi2 is not None and chi2 - chi2_now <= HOLD_TOL * chi2_now):
                hold, chi2, lam = False, None, 1e-3     # the held stage is done: now extract
                continue
        # Le Bail: the re-extracted intensities converge slowly (a fixed point), so it stops,
        # as GSAS-II does, once χ² changes by less than 0.1 % in an iteration
        elif chi2 is not None and abs(chi2 - chi2_now) <= (max(tol, LEBAIL_TOL) if lebail else tol) * chi2_now \
                and outer > 1:
            converged = True
            break
        chi2 = chi2_now
        normal = _scaled_normal(Jw, r, theta[free], lower[free], upper[free])
        if normal is None:
            converged = True
            break
        move, As, gs, dscale = normal
        step, theta, lam, c_new = _lm_step(calc, theta, I, free[move], As, gs, dscale, wt, y, chi2_now, lam, bounds)
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
    return theta, I, converged, n_iter


def _pawley_solve(calc, theta: np.ndarray, y: np.ndarray, wt: np.ndarray, phases: Sequence[int] | None):
    """Pawley's linear part at ``theta``: χ², the intensities, θ with the background terms set,
    and the basis (see :func:`_linear_core`)."""
    rows = np.flatnonzero(wt > 0)
    c2, I, bk, extra = _linear_core(calc, theta, y * wt, wt, rows, phases, calc.groups)
    t = theta.copy()
    if calc.model.background_terms and extra is not None:
        t[[calc.layout.index[f"bkg_{j}"] for j in range(calc.model.background_terms)]] = bk
    return c2, I, t, extra


def _lm_pawley(calc, y, wt, theta, free, *, max_iter, tol, n_valid, bounds, phases):
    """Pawley by variable projection: Levenberg-Marquardt over the nonlinear parameters of
    ``free`` (cells, zero, widths, asymmetry); at every trial the intensities (non-negative) and
    the background are solved linearly, and the step uses the projected Jacobian
    (:func:`_project`). Returns θ, I, converged, steps taken."""
    L = calc.layout
    lower, upper = bounds
    nl = np.array([i for i in free if L.params[i].kind != "bkg"], int)
    chi2, I, theta, extra = _pawley_solve(calc, theta, y, wt, phases)
    if extra is None:
        return theta, I, False, 0
    if nl.size == 0:
        return theta, I, True, 0
    rows = extra["rows"]
    lam, n_iter, converged = 1e-3, 0, False
    for _ in range(max_iter):
        yc, J, _ = calc.jacobian(theta, I, nl)
        Jw = _project(extra, (J * wt[:, None])[rows])
        r = ((y - yc) * wt)[rows]
        normal = _scaled_normal(Jw, r, theta[nl], lower[nl], upper[nl])
        if normal is None:
            converged = True
            break
        move, As, gs, dscale = normal
        accepted, settled = None, False
        unit = PRED_TOL * max(chi2 / max(n_valid - free.size, 1), 1.0)
        for _ in range(12):
            try:
                ds = np.linalg.solve(As + lam * np.eye(As.shape[0]), gs)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            # the fall of χ² the linear model predicts: below a hundredth of a reduced χ², the
            # minimum is reached (no trial, which would only meet the rounding of χ²)
            if 2 * gs @ ds - ds @ As @ ds <= unit:
                settled = True
                break
            step = ds / dscale
            t_new = theta.copy()
            t_new[nl[move]] = np.clip(t_new[nl[move]] + step, lower[nl[move]], upper[nl[move]])
            trial = _pawley_solve(calc, t_new, y, wt, phases)
            if trial[3] is not None and np.isfinite(trial[0]) and trial[0] < chi2:
                accepted = trial
                lam = max(lam / 5, 1e-9)
                break
            lam *= 8
        if settled:
            converged = True
            break
        n_iter += 1
        if accepted is None:                 # no damping lowers χ²: at the minimum
            converged = True
            break
        c_new, I, t_new, extra = accepted
        shift = t_new[nl[move]] - theta[nl[move]]
        theta, drop, chi2 = t_new, chi2 - c_new, c_new
        # converged when every shift is a small fraction of its esd, or χ² no longer moves
        try:
            var = np.diag(np.linalg.inv(As)) / dscale**2 * c_new / max(n_valid - free.size, 1)
            if np.all(np.abs(shift) <= SHIFT_ESD * np.sqrt(np.maximum(var, 1e-300))):
                converged = True
                break
        except np.linalg.LinAlgError:
            pass
        if drop <= tol * chi2:
            converged = True
            break
    return theta, I, converged, n_iter


def _fit(calc, y, wt, theta, I, cols, *, max_iter, tol, hold, n_valid, bounds, absent: Sequence[int] = (),
         follow: bool = False):
    """Least squares over ``cols``: Pawley (:func:`_lm_pawley`, the phases not ``absent``) or
    Le Bail / Rietveld (:func:`_lm`)."""
    if calc.pawley:
        phases = [p for p in range(len(calc.model.phases)) if p not in set(absent)]
        return _lm_pawley(calc, y, wt, theta, cols, max_iter=max_iter, tol=tol, n_valid=n_valid, bounds=bounds,
                          phases=phases)
    return _lm(calc, y, wt, theta, I, cols, max_iter=max_iter, tol=tol, hold=hold, n_valid=n_valid, bounds=bounds,
               follow=follow)


def _stages(calc, free: np.ndarray) -> list[np.ndarray]:
    """The staged release of ``free``: background and scales; + cells and zero; + the main
    widths (W, Y); + the other widths (U, V, X); + everything else (asymmetry, structure)."""
    L = calc.layout
    groups = [
        lambda q: q.kind in ("bkg", "scale"),
        lambda q: q.kind in ("cell", "zero", "disp"),
        lambda q: q.kind == "profile" and q.key in ("W", "Y"),
        lambda q: q.kind == "profile",
        lambda q: True,
    ]
    stages: list[np.ndarray] = []
    acc: set[int] = set()
    for test in groups:
        acc |= {int(i) for i in free if test(L.params[i])}
        if acc and (not stages or len(acc) > stages[-1].size):
            stages.append(np.array(sorted(acc), int))
    return stages or [free]


def _shares(calc, theta: np.ndarray, I: np.ndarray | None) -> np.ndarray:
    """Each phase's share of the calculated intensity inside the range."""
    st = calc.reflection_state(theta, I)
    inside = (st["pos"] >= calc.lo) & (st["pos"] <= calc.hi)
    tot = np.array([float(np.sum(np.maximum(st["I"][a:b], 0.0)[inside[a:b]]))
                    for a, b in zip(calc.offsets[:-1], calc.offsets[1:])])
    s = tot.sum()
    return tot / s if s > 0 and np.isfinite(s) else np.full(tot.size, np.nan)


def _absent(calc, theta: np.ndarray, I: np.ndarray, y: np.ndarray, wt: np.ndarray) -> list[int]:
    """Le Bail phases that do not improve the fit: with their intensities removed and the other
    phases' re-extracted, χ² rises by less than ABSENT_CHI2 per reflection (at least 25) or than
    ABSENT_REL of χ² (a phase that only takes over another's misfit)."""
    st = calc.reflection_state(theta, I)
    pr = calc.profiles(st, theta)
    bkg = calc.background(theta)

    P = _profile_matrix(calc, pr, I.size)

    def chi2(inten):
        yc = bkg + P @ inten
        r = (y - yc) * wt
        return float(r @ r)

    base = chi2(I)
    out = []
    for p in range(len(calc.model.phases)):
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        if not np.any(I[a:b] > 0):
            out.append(p)
            continue
        I2 = I.copy()
        I2[a:b] = 0.0
        I2 = _extract(calc, pr, theta, I2, y, 3)
        if chi2(I2) - base <= max(25.0, ABSENT_CHI2 * (b - a), ABSENT_REL * base):
            out.append(p)
    return out


def _needed(calc, theta: np.ndarray, I: np.ndarray, I_start: np.ndarray, y: np.ndarray, wt: np.ndarray,
            phases: Sequence[int]) -> list[int]:
    """Of the absent Le Bail ``phases``, those whose lines (from their start intensities,
    re-extracted with the others') lower χ² by more than :func:`_absent` asks of a present phase."""
    with_lines = I.copy()                    # the profiles of the tested phases too
    for p in phases:
        with_lines[int(calc.offsets[p]):int(calc.offsets[p + 1])] = I_start[int(calc.offsets[p]):int(calc.offsets[p + 1])]
    st = calc.reflection_state(theta, with_lines)
    pr = calc.profiles(st, theta)
    bkg = calc.background(theta)
    P = _profile_matrix(calc, pr, I.size)

    def chi2(inten):
        r = (y - bkg - P @ inten) * wt
        return float(r @ r)

    base = chi2(I)
    out = []
    for p in phases:
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        I2 = I.copy()
        I2[a:b] = I_start[a:b]
        I2 = _extract(calc, pr, theta, I2, y, 5)
        if base - chi2(I2) > max(25.0, ABSENT_CHI2 * (b - a), ABSENT_REL * base):
            out.append(p)
    return out


def _phase_params(calc, p: int) -> list[int]:
    """The cell and width parameters of phase ``p`` (held while it is absent)."""
    return [i for i, q in enumerate(calc.layout.params) if q.phase == p and q.kind in ("cell", "profile", "struct")]


def _put_back(calc, y, wt, theta, I, free, absent: Sequence[int], back: Sequence[int], I_back: np.ndarray, *,
              cycles: int, tol: float, n_valid: int, bounds, follow: bool):
    """Refined again with the ``absent`` Le Bail phases ``back`` put back: their intensities from
    ``I_back`` (then ``cycles`` Le Bail cycles of all), their cell and widths free. Returns θ,
    intensities, free parameters, the phases still absent, convergence and iterations."""
    I = I.copy()
    for p in back:
        a, b = int(calc.offsets[p]), int(calc.offsets[p + 1])
        I[a:b] = I_back[a:b]
    if cycles:
        I = _lebail_cycle(calc, theta, I, y, cycles=cycles)
    still = [p for p in absent if p not in back]
    L = calc.layout
    free = np.array(sorted(set(int(i) for i in free) | {i for p in back for i in _phase_params(calc, p)
                                                       if L.params[i].refined}), int)
    theta, I, converged, it = _fit(calc, y, wt, theta.copy(), I, free, max_iter=calc.model.max_iter, tol=tol,
                                   hold=False, n_valid=n_valid, bounds=bounds, absent=still, follow=follow)
    return theta, I, free, still, converged, it


def _cell_bounds(calc, centre: np.ndarray | None, followed: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
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


def _refine(calc: "_Calculator", y: np.ndarray, sigma, start, tol, *, staged: bool = False,
            theta0: np.ndarray | None = None, I0: np.ndarray | None = None,
            centre: np.ndarray | None = None, followed: Sequence[int] = (),
            fresh: bool = False) -> RefinementResult:
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
    lebail = calc.any_extracted
    all_lebail = model.method in ("lebail", "pawley")
    n_refl = int(calc.offsets[-1])
    I = None
    from_previous = start is not None and start.theta is not None and len(start.theta) == len(theta)
    if from_previous:
        theta = start.theta.copy()
        trend = start.cell_trend
        if trend is not None and trend.shape == theta.shape and start.start_from == "previous" and start.ok:
            # the cells moved on by their change in the frame before (linear extrapolation; a
            # cell that keeps moving started one frame's change off costs the alternation of
            # extraction and least squares 7-10 steps instead of 2-3), where that change was
            # larger than TREND_ESD esds (a weak phase's cell only scatters)
            moved = np.abs(trend) > TREND_ESD * np.where(np.isfinite(start.esds), start.esds, np.inf)
            theta = theta + np.where(moved, trend, 0.0)
        if lebail and start.lebail_I is not None and start.lebail_I.size == n_refl:
            I = start.lebail_I.copy()
            if fresh:                        # the previous cells, intensities extracted afresh
                I = _lebail_start(calc, theta, y)
            for p, ph in enumerate(model.phases):          # absent in the previous frame: held absent
                if ph.name in start.absent:
                    I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    elif theta0 is not None:
        theta = theta0.copy()
        if lebail and I0 is not None:
            I = I0.copy()
        if not all_lebail:
            theta = _initial_guess(calc, theta, y[valid], all_lebail, background=False)
    else:
        theta = _initial_guess(calc, theta, y[valid], all_lebail)
    # bounds: the cells within their searched range around the start (the configured cell, or
    # the previous frame's)
    if from_previous:
        lower, upper = _cell_bounds(calc, start.theta, [p for p, ph in enumerate(model.phases)
                                                          if ph.name not in start.absent])
    else:
        lower, upper = _cell_bounds(calc, centre, followed)
    bounds = (lower, upper)
    theta = np.clip(theta, lower, upper)
    if calc.pawley:                          # intensities and background solved at the start cells
        gone0 = [p for p, ph in enumerate(model.phases) if from_previous and ph.name in start.absent]
        _, I, theta, _ = _pawley_solve(calc, theta, y, wt, [p for p in range(len(model.phases)) if p not in gone0])
    elif lebail and I is None:
        I = _lebail_start(calc, theta, y)
    free = L.free.copy()
    # a Le Bail phase with (next to) no intensity at the start is absent: its cell and widths are held
    absent: list[int] = []
    retest: list[int] = []
    if all_lebail and len(model.phases) > 1:
        empty = [p for p in range(len(model.phases))
                 if not np.any(I[int(calc.offsets[p]):int(calc.offsets[p + 1])] > 0)]
        # from a frame with one phase left, the others stay absent (no test needed)
        absent = empty if from_previous and len(empty) >= len(model.phases) - 1 else _absent(calc, theta, I, y, wt)
        if from_previous and not calc.pawley and start.lebail_I is not None:
            # a weak phase of the previous frame (the Al current collector) stays: judged before
            # the widths and cells are refined, it looked absent in most frames and was refined
            # back in after (a second refinement); one that is gone is found after convergence
            # (Pawley refines no phase back in: tested here as before)
            weak = _shares(calc, start.theta, start.lebail_I) < WEAK_SHARE
            absent = [p for p in absent if p in empty or not weak[p]]
        # judged before the widths and cells are refined, when χ² is mostly their misfit: a weak
        # phase with narrow lines (the Al current collector) may look absent; tested again below
        retest = [p for p in absent if p not in empty]
        I_start = I.copy()
        if absent and len(absent) < len(model.phases):
            hold_idx = {i for p in absent for i in _phase_params(calc, p)}
            free = np.array([i for i in free if int(i) not in hold_idx], int)
            for p in absent:                 # no intensity: they take none from the others' peaks
                I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
        else:
            absent = []
    stages = _stages(calc, free) if staged else [free]
    hold = lebail and not calc.pawley and from_previous and I is not None and start.lebail_I is not None \
        and not fresh
    n_iter = 0
    converged = False
    for k, cols in enumerate(stages):
        last = k == len(stages) - 1
        theta, I, converged, it = _fit(calc, y, wt, theta, I, cols, max_iter=model.max_iter if last else STAGE_ITER,
                                       tol=tol, hold=hold and k == 0, n_valid=n_valid, bounds=bounds, absent=absent,
                                       follow=from_previous)
        n_iter += it
    # phases found absent at the start that the converged fit does need: refined again with them
    if all_lebail and not calc.pawley and absent and retest:
        back = _needed(calc, theta, I, I_start, y, wt, [p for p in retest if p in absent])
        if back:
            theta, I, free, absent, converged, it = _put_back(calc, y, wt, theta, I, free, absent, back, I_start,
                                                              cycles=5, tol=tol, n_valid=n_valid, bounds=bounds,
                                                              follow=from_previous)
            n_iter += it
    # phases the converged fit does not need: removed, and the last stage refined again without them
    if all_lebail and len(model.phases) > 1:
        gone = [p for p in _absent(calc, theta, I, y, wt) if p not in absent]
        if gone and len(gone) + len(absent) < len(model.phases):
            hold_idx = {i for p in gone for i in _phase_params(calc, p)}
            free = np.array([i for i in free if int(i) not in hold_idx], int)
            for p in gone:
                I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
            absent = sorted(absent + gone)
            theta, I, converged, it = _fit(calc, y, wt, theta, I, free, max_iter=model.max_iter, tol=tol, hold=False,
                                           n_valid=n_valid, bounds=bounds, absent=absent, follow=from_previous)
            n_iter += it
    res = _result(calc, y, wt, valid, theta, I, free, n_iter, converged, absent, bounds)
    # a frame that fits clearly worse than the one before while a phase is held absent: that
    # phase is refined back in (its intensities extracted afresh, its cell and widths free) and
    # kept if the fit then needs it as a present phase is needed (a weak phase, the Al current
    # collector, judged absent from a poor start would otherwise never return)
    if (all_lebail and not calc.pawley and from_previous and absent and math.isfinite(start.gof)
            and res.gof > GOF_RETEST * start.gof):
        t2, I2, free2, _, conv2, it = _put_back(calc, y, wt, theta, I, free, absent, absent,
                                                _lebail_start(calc, theta, y), cycles=0, tol=tol,
                                                n_valid=n_valid, bounds=bounds, follow=from_previous)
        back = [p for p in absent if p not in _absent(calc, t2, I2, y, wt)]
        if back:
            still = [p for p in absent if p not in back]
            for p in still:
                I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
            held = {j for p in still for j in _phase_params(calc, p)}
            free3 = np.array([i for i in free2 if int(i) not in held], int)
            alt = _result(calc, y, wt, valid, t2, I2, free3, n_iter + it, conv2, still, bounds)
            if alt.rwp < res.rwp:
                res, theta, I, absent, free = alt, t2, I2, still, free3
    # a Le Bail phase pinned at the edge of its searched range may be a ghost taking another's
    # misfit: refined again without it, the better verdict kept
    pinned = sorted({L.params[L.index[nm]].phase for nm in res.at_bound if L.params[L.index[nm]].kind == "cell"}
                    - set(absent))
    if all_lebail and pinned and len(pinned) + len(absent) < len(model.phases) and res.status != "ok":
        hold_idx = {i for p in pinned for i in _phase_params(calc, p)}
        free2 = np.array([i for i in free if int(i) not in hold_idx], int)
        I2 = I.copy()
        for p in pinned:
            I2[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
        t2 = theta.copy()
        for p in pinned:
            t2[_cell_idx(calc, p)] = np.clip(L.start(), lower, upper)[_cell_idx(calc, p)]
        t2, I2, conv2, it = _fit(calc, y, wt, t2, I2, free2, max_iter=model.max_iter, tol=tol, hold=False,
                                 n_valid=n_valid, bounds=bounds, absent=sorted(absent + pinned), follow=from_previous)
        alt = _result(calc, y, wt, valid, t2, I2, free2, n_iter + it, conv2, sorted(absent + pinned), bounds)
        res = _best([res, alt], None)
    return res


def _result(calc, y, wt, valid, theta, I, free, n_iter, converged, absent, bounds) -> RefinementResult:
    """Statistics, esds (parameters at a bound left out) and the verdict of a refined θ."""
    model = calc.model
    L = calc.layout
    lebail = calc.any_extracted
    n_valid = int(valid.sum())
    extra = None
    if calc.pawley:
        # the intensities (per overlap group) and the background are least-squares parameters too
        phases = [p for p in range(len(model.phases)) if p not in set(absent)]
        _, I, theta, extra = _pawley_solve(calc, theta, y, wt, phases)
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
    # parameters at a bound: reported as such, without an esd, and out of the covariance
    bound: dict[str, str] = {}
    inner = []
    lower, upper = bounds
    for c, j in enumerate(free):
        if theta[j] <= lower[j]:
            bound[L.names[j]] = "lower"
        elif theta[j] >= upper[j]:
            bound[L.names[j]] = "upper"
        else:
            inner.append(c)
    inner = np.array(inner, int)
    esd = np.full(theta.size, np.nan)
    cov = None
    I_esd = None
    if extra is not None:
        cov, I_esd = _pawley_covariance(calc, extra, Jw, free, inner, gof)
        esd[free[inner]] = np.sqrt(np.maximum(np.diag(cov)[inner], 0.0)) * gof
    elif inner.size:
        try:
            Ji = Jw[:, inner]
            A = Ji.T @ Ji
            dscale = np.sqrt(np.maximum(np.diag(A), 1e-300))
            ci = np.linalg.pinv(A / np.outer(dscale, dscale), rcond=1e-12) / np.outer(dscale, dscale)
            cov = np.full((free.size, free.size), np.nan)
            cov[np.ix_(inner, inner)] = ci
            esd[free[inner]] = np.sqrt(np.maximum(np.diag(ci), 0.0)) * gof
        except np.linalg.LinAlgError:
            cov = None
    _, bkg, parts, st = calc.pattern(theta, I, per_phase=True)
    ticks = [st["pos"][calc.offsets[p]:calc.offsets[p + 1]] for p in range(len(model.phases))]
    refined = np.zeros(theta.size, bool)
    refined[free] = True
    share = _shares(calc, theta, I)
    res = RefinementResult(list(L.names), theta.copy(), esd, refined, rwp, rexp, gof, n_valid, n_p, n_iter,
                           converged, "", calc.x, np.where(valid, y, np.nan), yc, bkg, parts, ticks,
                           None if I is None else I.copy(), [ph.name for ph in model.phases], theta=theta.copy(),
                           at_bound=bound, shares={ph.name: float(share[p]) for p, ph in enumerate(model.phases)},
                           intensity_esd=I_esd)
    # phases absent at the start or found absent at the end (see _refine)
    gone = set(absent)
    res.absent = [model.phases[p].name for p in sorted(gone)]
    if res.lebail_I is not None:
        for p in gone:                       # the next frame starts with them absent
            res.lebail_I[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 0.0
    if model.method == "rietveld":
        res.weight_fractions = _weight_fractions(calc, theta, cov, free, gof)
    _verdict(calc, res, sorted(gone), bounds)
    return res


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


# ----------------------------------------------------------------------------------------------
# the cell search: a grid of trial cells, intensities (Pawley-like, non-negative) and background
# solved linearly at every trial



def _linear_fit(calc, theta: np.ndarray, yw: np.ndarray, wt: np.ndarray, rows: np.ndarray,
                phases: Sequence[int] | None = None, full: bool = True):
    """χ² of the best pattern at ``theta`` with free non-negative reflection intensities and a
    free background (the points ``rows`` only), the intensities and the background terms.
    ``full=False`` (the trial cells of the search): each profile within ±NEAR_FWHM only (the
    far Lorentzian tail, about 1 % of a profile's area at η = 0.4, is left to the background),
    at a fraction of the cost."""
    c2, inten, bk, _ = _linear_core(calc, theta, yw, wt, rows, phases, full=full)
    return c2, inten, bk


def _linear_core(calc, theta: np.ndarray, yw: np.ndarray, wt: np.ndarray, rows: np.ndarray,
                 phases: Sequence[int] | None = None, groups: tuple | None = None, pr: dict | None = None,
                 full: bool = True):
    """The linear part of a pattern at ``theta``: non-negative intensities (one per reflection,
    or per overlap group of ``groups`` = (group of each reflection, its share, number of
    groups), split by the shares) and the background, by least squares over the points
    ``rows``. Returns χ², the intensity of every reflection, the background terms and what
    :func:`_project` and the Pawley covariance need (the weighted basis and its normal
    matrix). ``full=False``: the profiles within ±NEAR_FWHM only."""
    import scipy.sparse as sp
    from scipy.optimize import nnls

    n_refl = int(calc.offsets[-1])
    if pr is None:                           # the profiles of the phases used only
        ones = np.ones(n_refl)
        if phases is not None:
            ones[:] = 0.0
            for p in phases:
                ones[int(calc.offsets[p]):int(calc.offsets[p + 1])] = 1.0
        st = calc.reflection_state(theta, ones)
        pr = calc.profiles(st, theta, full=full)
    gidx, share, n_col = (np.arange(n_refl), np.ones(n_refl), n_refl) if groups is None else groups
    rowmap = np.full(calc.x.size, -1)
    rowmap[rows] = np.arange(rows.size)
    sel = rowmap[pr["idx"]] >= 0
    if phases is not None:
        use = np.zeros(n_refl, bool)
        for p in phases:
            use[int(calc.offsets[p]):int(calc.offsets[p + 1])] = True
        sel &= use[pr["r"]]
    r_i = rowmap[pr["idx"][sel]]
    c_i = pr["r"][sel]
    vals = pr["P"][sel] * wt[pr["idx"][sel]] * share[c_i]
    if groups is None:                       # the entries are in column order already
        ptr = np.concatenate([[0], np.cumsum(np.bincount(c_i, minlength=n_col))])
        M = sp.csc_matrix((vals, r_i, ptr), shape=(rows.size, n_col))
    else:
        M = sp.csr_matrix((vals, (r_i, gidx[c_i])), shape=(rows.size, n_col))
    B = calc.cheb[rows] * wt[rows, None]
    yv = yw[rows]
    amm = (M.T @ M).toarray()
    amb = np.asarray(M.T @ B)
    abb = B.T @ B
    bm = np.asarray(M.T @ yv).ravel()
    bb = B.T @ yv
    fail = (np.inf, np.zeros(n_refl), np.zeros(B.shape[1]), None)
    try:
        S = np.linalg.solve(abb + 1e-12 * np.trace(abb) * np.eye(abb.shape[0]), np.column_stack([amb.T, bb]))
        ar = amm - amb @ S[:, :n_col]
        br = bm - amb @ S[:, n_col]
        ridge = 1e-10 * max(np.trace(ar) / max(n_col, 1), 1e-300)
        lc = np.linalg.cholesky(ar + ridge * np.eye(n_col))
        inten, _ = nnls(lc.T, np.linalg.solve(lc, br), maxiter=20 * n_col)
    except (np.linalg.LinAlgError, RuntimeError):
        return fail
    bk = S[:, n_col] - S[:, :n_col] @ inten
    res = yv - M @ inten - B @ bk
    extra = {"M": M, "B": B, "amm": amm, "amb": amb, "abb": abb, "G": inten, "rows": rows}
    return float(res @ res), inten[gidx] * share, bk, extra


def _overlap_groups(model: RefinementModel, refl: list[Reflections], sizes: list[int]):
    """Pawley: reflections of one phase at the same position for every cell of its crystal
    system (cubic 333 and 511, hexagonal hkl and khl where they are not equivalent) cannot be
    told apart; they share one intensity, split by multiplicity. Returns (the group of each
    reflection, its share of the group's intensity, the number of groups)."""
    from .structure import d_spacings

    gidx = np.empty(int(sum(sizes)), int)
    share = np.empty(gidx.size)
    n, off = 0, 0
    bumps = {"a": 0.0123, "b": -0.0171, "c": 0.0311, "alpha": 0.7, "beta": -0.9, "gamma": 1.3}
    for ph, r in zip(model.phases, refl):
        cell = dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), ph.structure.cell))
        moved = {k: (v * (1 + bumps[k]) if k in ("a", "b", "c") else v + bumps[k]) for k, v in cell.items()
                 if k in cell_parameters(ph.system)}
        d1 = d_spacings(r.hkl, _full_cell(ph.system, cell))
        d2 = d_spacings(r.hkl, _full_cell(ph.system, {**cell, **moved}))
        order = np.lexsort((d2, d1))
        new = np.ones(order.size, bool)
        new[1:] = (np.abs(np.diff(d1[order])) > 1e-9 * d1[order][1:]) | (np.abs(np.diff(d2[order])) > 1e-9 * d2[order][1:])
        g = np.empty(order.size, int)
        g[order] = np.cumsum(new) - 1
        m = r.multiplicity.astype(float)
        tot = np.bincount(g, weights=m)
        gidx[off:off + order.size] = g + n
        share[off:off + order.size] = m / tot[g]
        n += int(g.max()) + 1 if g.size else 0
        off += order.size
    return gidx, share, n


def _project(extra: dict, Jw: np.ndarray) -> np.ndarray:
    """Variable projection (Kaufman): the weighted Jacobian ``Jw`` (rows of ``extra['rows']``)
    with its part in the span of the active linear basis (intensities above zero, background)
    removed, so a Gauss-Newton step accounts for the intensities and background following."""
    act = np.flatnonzero(extra["G"] > 0)
    M, B = extra["M"][:, act], extra["B"]
    n_a = act.size
    N = np.zeros((n_a + B.shape[1],) * 2)
    N[:n_a, :n_a] = extra["amm"][np.ix_(act, act)]
    N[:n_a, n_a:] = extra["amb"][act]
    N[n_a:, :n_a] = extra["amb"][act].T
    N[n_a:, n_a:] = extra["abb"]
    rhs = np.vstack([np.asarray(M.T @ Jw), B.T @ Jw])
    d = np.sqrt(np.maximum(np.diag(N), 1e-300))
    coef = np.linalg.lstsq(N / np.outer(d, d), rhs / d[:, None], rcond=1e-12)[0] / d[:, None]
    return Jw - (M @ coef[:n_a]) - B @ coef[n_a:]


def _set_width(calc, theta: np.ndarray, fwhm_deg: float | None = None, factor: float = 1.0) -> np.ndarray:
    """θ with every phase's widths replaced by a constant Gaussian FWHM, or scaled by ``factor``."""
    t = theta.copy()
    for idx in calc.profile_index:
        if fwhm_deg is not None:
            t[idx] = [0.0, 0.0, fwhm_deg**2, 0.0, 0.0]
        else:
            t[idx] = t[idx] * np.array([factor**2, factor**2, factor**2, factor, factor])
    return t


def _search(calc, y: np.ndarray, sigma, centre: np.ndarray | None = None,
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
    lower, upper = _cell_bounds(calc, centre, followed)
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
        idx = _cell_idx(calc, p, angles=True)
        if not np.isfinite(best_score) or not len(cands):
            missing.append(p)
            continue
        chosen, low = theta[idx].copy(), np.inf
        configured = np.clip(L.start() if centre is None else centre, lower, upper)[idx]
        for cell in [configured] + list(cands):
            t = theta.copy()
            t[idx] = cell
            c2 = _linear_fit(calc, t, yw, wt, rows[::2], placed + [p], full=False)[0]
            if c2 < low:
                chosen, low = cell, c2
        # then closer: a third of the grid step around the best, twice
        grid = np.array(np.meshgrid(*[[-1.0, 0.0, 1.0]] * len(idx), indexing="ij")).reshape(len(idx), -1).T
        for _ in range(2):
            best_here = chosen
            for d in grid:
                if not d.any():
                    continue
                t = theta.copy()
                t[idx] = np.clip(chosen * (1 + d * steps_rel / 3), lower[idx], upper[idx])
                c2 = _linear_fit(calc, t, yw, wt, rows[::2], placed + [p], full=False)[0]
                if c2 < low:
                    best_here, low = t[idx].copy(), c2
            chosen = best_here
        if np.any(chosen != configured):
            searched = True
        theta[idx] = chosen
        placed.append(p)
        resid = y0 - _phase_fit(calc, theta, yw, wt, rows, placed)
    theta = _scale_widths(calc, theta, yw, wt, rows[::2])
    _, inten, bk = _linear_fit(calc, theta, yw, wt, rows, [p for p in range(len(model.phases)) if p not in missing])
    if model.background_terms:
        theta[[L.index[f"bkg_{j}"] for j in range(model.background_terms)]] = bk
    return theta, inten, "searched" if searched else "configured"


def _scale_widths(calc, theta, yw, wt, rows) -> np.ndarray:
    """``theta`` with its widths scaled by the best of a few factors (linear fits with each
    profile within ±NEAR_FWHM, as the search's trial cells: the whole windows of the widest
    trials cost several times as much and choose the same factor)."""
    best = (np.inf, theta)
    for f in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        t = _set_width(calc, theta, factor=f)
        c2 = _linear_fit(calc, t, yw, wt, rows, full=False)[0]
        if c2 < best[0]:
            best = (c2, t)
    return best[1]


def _phase_fit(calc, theta, yw, wt, rows, phases) -> np.ndarray:
    """The pattern of ``phases`` (no background) in their best linear fit at ``theta``."""
    _, inten, _ = _linear_fit(calc, theta, yw, wt, rows, phases)
    return calc.pattern(theta, inten) - calc.background(theta)


def _match(calc, p: int, theta: np.ndarray, resid: np.ndarray, sig: np.ndarray, valid: np.ndarray, bounds,
           n_best: int = 6):
    """Phase ``p``'s trial cells (a grid of its lengths over the searched range) scored by a
    matched filter of ``resid``: Σ log(1 + z) over its reflections, z the significance of a peak
    at the reflection's position. Returns the best score and the best few distinct cells."""
    L = calc.layout
    ph = calc.model.phases[p]
    lam = calc.model.wavelength_A
    keys = _searched(ph.system)
    idx = _cell_idx(calc, p, angles=True)
    # the matched filter: a peak of the phase's width minus a three times broader one (blind to
    # a smooth background), on a uniform grid
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
    g1 = np.exp(-4 * _LN2 * (k / H) ** 2)
    g3 = np.exp(-4 * _LN2 * (k / (3 * H)) ** 2)
    kern = g1 / g1.sum() - g3 / g3.sum()
    num = np.convolve(yu, kern, mode="same")
    den = np.sqrt(np.maximum(np.convolve(vu, kern**2, mode="same"), 1e-300))
    z = np.where(den > 0, num / den, 0.0)
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
        gstar = np.linalg.inv(_metrics(np.array(np.broadcast_arrays(*_full_cell(ph.system, v))).T))
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


def _cell_idx(calc, p: int, angles: bool = False) -> list[int]:
    """Phase ``p``'s cell lengths (with ``angles``: every parameter the search grid covers)."""
    ph = calc.model.phases[p]
    keys = _searched(ph.system) if angles else [k for k in cell_parameters(ph.system) if k in ("a", "b", "c")]
    return [calc.layout.index[f"{ph.name}.{k}"] for k in keys]


def _initial_guess(calc: _Calculator, theta: np.ndarray, y: np.ndarray, lebail: bool, *,
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


def _lebail_start(calc: _Calculator, theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Le Bail intensities from scratch: the net observed intensity shared evenly by every
    reflection the extraction uses (LEBAIL_MIN_AREA of its profile in the range: a strong line
    centred just beyond the range, whose tail is in the data, too; started at 0 it would stay
    near LEBAIL_FLOOR), then five extraction cycles."""
    n = int(calc.offsets[-1])
    st = calc.reflection_state(theta, np.ones(n))
    area = _profile_matrix(calc, calc.profiles(st, theta), n).T @ np.ones(calc.x.size) * calc.step
    net = float(np.sum(np.maximum(y - calc.background(theta), 0.0)[calc.valid]) * calc.step)
    inside = area > LEBAIL_MIN_AREA
    I = np.where(inside, net / max(int(inside.sum()), 1), 0.0)
    return _lebail_cycle(calc, theta, I, y, cycles=5)


def _lebail_cycle(calc: _Calculator, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int = 1,
                  tol: float = 0.0) -> np.ndarray:
    """Le Bail extraction: each reflection takes its share of the observed net intensity
    (``cycles`` times; the profiles do not change in between, so they are computed once; see
    :func:`_extract` for ``tol``)."""
    st = calc.reflection_state(theta, I)          # computed (Rietveld) intensities filled in
    return _extract(calc, calc.profiles(st, theta), theta, st["I"], y, cycles, tol=tol)


def _extract(calc: _Calculator, pr: dict, theta: np.ndarray, I: np.ndarray, y: np.ndarray, cycles: int,
             tol: float = 0.0) -> np.ndarray:
    """``cycles`` Le Bail extractions from ``I``: each reflection takes its share of the
    observed net intensity. The extraction is a fixed-point iteration (the EM algorithm of a
    mixture), slow where reflections overlap. With ``tol``, every three cycles are one SQUAREM
    step (Varadhan & Roland 2008: two cycles, an extrapolation along them, one cycle from
    there), which reaches the same fixed point in far fewer cycles (an extrapolation that leaves
    the fixed point farther than it found it is dropped), and the extraction stops once a step
    changes the intensities by less than ``tol`` relative; without, plain cycles (one is
    :func:`xrdpipe.kernels.lebail_cycle`)."""
    from .kernels import lebail_cycle

    net = y - calc.background(theta)
    P = _profile_matrix(calc, pr, I.size)
    PT = P.T
    area = PT @ np.ones(calc.x.size) * calc.step
    valid = calc.valid
    use = calc.extracted & (area > LEBAIL_MIN_AREA)
    n_ph = len(calc.sizes)
    phase_of = np.repeat(np.arange(n_ph), calc.sizes)
    # the extraction is multiplicative: an intensity at exactly 0 would stay there for good (a
    # weak line set to 0 by the cell search's non-negative solution, or whose net intensity was
    # negative in one cycle under a background not yet refined). The lines of a present phase
    # are kept above a floor, from which they recover in one cycle where the data show them; an
    # absent phase's (all 0) stay 0
    net = np.ascontiguousarray(net, float)
    valid = np.ascontiguousarray(valid, bool)
    work = (np.empty(calc.x.size), np.empty(calc.x.size))

    def cycle(I):
        out = np.empty(I.size)
        lebail_cycle(*P.args, np.ascontiguousarray(I, float), net, valid, area, use, calc.extracted, phase_of, n_ph,
                     float(calc.step), LEBAIL_FLOOR, *work, out)
        return out

    left = cycles
    while tol and left >= 3:
        I1 = cycle(I)
        I2 = cycle(I1)
        r = I1 - I
        v = I2 - I1 - r
        nv = float(np.sqrt(v @ v))
        left -= 3
        if not nv > 0:
            I = cycle(I2)
            continue
        a = min(-float(np.sqrt(r @ r)) / nv, -1.0)
        # extrapolated, kept positive (an intensity at zero would stay there)
        Ix = np.where(use, np.maximum(I - 2 * a * r + a * a * v, 0.1 * I2), I2)
        I3 = cycle(Ix)
        new = I3 if float(np.sum((I3 - Ix) ** 2)) <= float(np.sum((I2 - I1) ** 2)) else cycle(I2)
        moved = float(np.sqrt(np.sum((new - I) ** 2)))
        I = new
        if tol and moved <= tol * float(np.sqrt(I @ I)):
            return I
    for _ in range(left):
        I = cycle(I)
    return I


def _profile_matrix(calc, pr: dict, n_refl: int) -> "_ProfileMatrix":
    """The profiles as a (points x reflections) matrix, built once per profile state."""
    P = pr.get("matrix")
    if P is None:
        P = pr["matrix"] = _ProfileMatrix(calc, pr, n_refl)
    return P


class _ProfileMatrix:
    """The profiles of :meth:`_Calculator.profiles` as a (points x reflections) matrix for
    products ``P @ I`` and ``P.T @ v`` (:func:`xrdpipe.kernels.profile_matvec`,
    :func:`~xrdpipe.kernels.profile_rmatvec`: the near entries, in column order already, and the
    far Lorentzian tails)."""

    def __init__(self, calc, pr: dict, n_refl: int):
        far = pr.get("far")
        if far is None:                      # whole windows: no far tails
            e = np.zeros(n_refl, np.int64)
            far = (np.zeros(n_refl), np.ones(n_refl), np.zeros(n_refl), e, e, e, e)
        self.args = (pr["P"], pr["idx"], pr["ptr"], calc.x, *far)
        self.n_points = calc.x.size
        self.n_refl = n_refl
        self.T = _Transposed(self)

    def __matmul__(self, I: np.ndarray) -> np.ndarray:
        from .kernels import profile_matvec

        out = np.empty(self.n_points)
        profile_matvec(*self.args, np.ascontiguousarray(I, float), out)
        return out


class _Transposed:
    def __init__(self, P: _ProfileMatrix):
        self.P = P

    def __matmul__(self, v: np.ndarray) -> np.ndarray:
        from .kernels import profile_rmatvec

        out = np.empty(self.P.n_refl)
        profile_rmatvec(*self.P.args, np.ascontiguousarray(v, float), out)
        return out


def _weight_fractions(calc: _Calculator, theta, cov, free, gof) -> dict[str, tuple[float, float]]:
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


