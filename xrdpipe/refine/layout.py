"""The parameter layout of a model: every refined and fixed parameter (name, start, bounds, phase)
in one vector, and the structure of a phase at a parameter vector.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..crystallography import system_cell
from ..errors import RefinementError
from .model import PhaseModel, RefinementModel, cell_parameters
from .structures import Structure, site_multiplicity, space_group_ops

SHIFT_BOUND_DEG = 1.0         # the zero shift and the displacement term stay within ±1°


@dataclass
class _Param:
    name: str
    value: float
    refined: bool
    step: float
    kind: str                     # cell, profile, scale, struct, zero, disp, asym, bkg
    phase: int = -1
    key: str = ""


class Layout:
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
        """Rietveld: the structural parameters ``ph.refine`` names (appended to ``ps``) and its
        occupancy constraints. Returns the links (parameter, ``what:atom``, sign) and the
        constraints ([(free parameter, multiplicity)], (last atom, multiplicity), total)."""
        labels = [a.label for a in ph.structure.atoms]
        links: list[tuple[int, str, float]] = []
        cons: list[tuple[list[tuple[int, int]], tuple[int, int], float]] = []
        if method != "rietveld":
            return links, cons
        for item in ph.refine:
            what, _, spec = item.partition(":")
            if what not in ("x", "y", "z", "occ", "b") or not spec:
                raise RefinementError(f"phase {ph.name}: cannot refine {item!r}; expected z:LABEL, x:LABEL, y:LABEL, "
                                      "occ:LABEL or b:LABEL (b:* for one B shared by every atom)")
            targets = _atoms_of(ph, labels, spec, what)
            first = ph.structure.atoms[targets[0][0]]
            if what in "xyz":
                start, step = _free_coordinate(ph, labels, targets, "xyz".index(what), what), 1e-6
            elif what == "occ":
                start, step = first.occupancy, 1e-6
            else:
                start, step = first.b_iso, 1e-5
            k = len(ps)
            ps.append(_Param(f"{ph.name}.{what}:{spec}", float(start), True, step, "struct", p, item))
            links += [(k, f"{what}:{i}", s) for i, s in targets]
        for c in ph.constraints:
            cons.append(_occupancy_constraint(ph, labels, c, p, ps, links))
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
        return replace(st, cell=system_cell(ph.system, {**dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), st.cell)),
                                                      **vals}), atoms=tuple(atoms))

    def _atom_of(self, p: int, k: int) -> int:
        for kk, what, _ in self.struct_links[p]:
            if kk == k:
                return int(what.partition(":")[2])
        raise KeyError(k)


def _atoms_of(ph: PhaseModel, labels: list[str], spec: str, what: str) -> list[tuple[int, float]]:
    """The atoms (index, sign) that ``what:spec`` names: labels separated by commas, ``-LABEL``
    for an opposite sign, ``*`` for every atom."""
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


def _free_coordinate(ph: PhaseModel, labels: list[str], targets: list[tuple[int, float]], axis: int,
                     what: str) -> float:
    """The start of a refined coordinate (that of the first atom), after checking that no target
    atom sits where symmetry fixes it (moving it would change its site's multiplicity)."""
    ops = space_group_ops(ph.structure.space_group)
    for i, _ in targets:
        xyz = np.array(ph.structure.atoms[i].xyz, float)
        moved = xyz.copy()
        moved[axis] += 0.0123
        if site_multiplicity(ops, moved) != site_multiplicity(ops, xyz):
            raise RefinementError(f"phase {ph.name}: {what} of atom {labels[i]} is fixed by symmetry "
                                  f"(site {tuple(round(float(v), 4) for v in xyz)} in {ph.structure.space_group})")
    return ph.structure.atoms[targets[0][0]].xyz[axis]


def _occupancy_constraint(ph: PhaseModel, labels: list[str], c, p: int, ps: list[_Param],
                          links: list[tuple[int, str, float]]):
    """One occupancy constraint: the occupancies of its atoms but the last become parameters
    (appended to ``ps``, linked in ``links``); the last takes what is left of the total."""
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
    return free, (idx[-1], mult[-1]), float(total)
