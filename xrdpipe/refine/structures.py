"""Crystal structures for whole-pattern refinement: space groups, reflections, structure factors.

A :class:`Structure` is a space group (gemmi's tables), a cell and a list of :class:`Atom`
(element, fractional position, occupancy, isotropic B). Structures come from CIF files (read
with gemmi) or from the built-in layered-oxide templates (:func:`template`: P2, O3, P3 with
their Na, TM and O sites). :func:`reflections` lists the reflections of a cell between two
d-spacings with their multiplicities (systematic absences from the space group);
:func:`structure_factors_sq` gives |F|² with IT92 X-ray form factors and Debye-Waller factors.

Conventions: hexagonal axes for rhombohedral groups; B in Å²; s = sin θ / λ = 1 / (2d).

Example
-------
>>> o3 = template("O3", a=2.985, c=16.0, z_o=0.2326, composition={"Ni": 1/3, "Fe": 1/3, "Mn": 1/3}, na=1.0)
>>> refl = reflections(o3.space_group, o3.cell, d_min=1.0, d_max=10.0)
>>> fsq = structure_factors_sq(o3, refl.hkl)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import StructureError

__all__ = ["Atom", "Structure", "StructureError", "Reflections", "template", "read_cif", "reflections",
           "structure_factors_sq", "cell_metric", "TEMPLATES", "space_group_ops"]

TEMPLATES = ("P2", "O3", "P3")


@dataclass(frozen=True)
class Atom:
    """One element on one site: ``xyz`` fractional, ``occupancy`` 0..1, ``b_iso`` in Å²."""

    label: str
    element: str
    xyz: tuple[float, float, float]
    occupancy: float = 1.0
    b_iso: float = 0.5


@dataclass(frozen=True)
class Structure:
    """A space group (Hermann-Mauguin, as gemmi reads it), a cell (Å, degrees) and atoms."""

    space_group: str
    cell: tuple[float, float, float, float, float, float]
    atoms: tuple[Atom, ...]
    name: str = ""

    def with_cell(self, cell: Sequence[float]) -> "Structure":
        return replace(self, cell=tuple(float(v) for v in cell))

    def with_atoms(self, atoms: Sequence[Atom]) -> "Structure":
        return replace(self, atoms=tuple(atoms))

    @property
    def volume(self) -> float:
        return float(np.sqrt(np.linalg.det(cell_metric(self.cell))))

    def cell_mass(self) -> float:
        """Mass of the unit cell's contents (g/mol): Z M of Hill and Howard."""
        from gemmi import Element

        ops = space_group_ops(self.space_group)
        return float(sum(a.occupancy * Element(a.element).weight * site_multiplicity(ops, a.xyz) for a in self.atoms))


# ----------------------------------------------------------------------------------------------
# space groups (gemmi)

@dataclass(frozen=True)
class _Ops:
    name: str
    rot: np.ndarray        # (G, 3, 3) rotations of every operation, centrings included
    tran: np.ndarray       # (G, 3) translations
    hkl_rot: np.ndarray    # (G0, 3, 3) rotation parts for hkl (h' = h R)
    gemmi_ops: object


@lru_cache(maxsize=64)
def space_group_ops(name: str) -> _Ops:
    """Every symmetry operation of a space group (by any name gemmi knows: ``R-3m``,
    ``P63/mmc``, ``R -3 m:H``...); rhombohedral groups in hexagonal axes."""
    import gemmi

    sg = gemmi.find_spacegroup_by_name(name)
    if sg is None:
        raise StructureError(f"unknown space group {name!r} (a Hermann-Mauguin symbol such as 'R-3m' or 'P63/mmc')")
    ops = sg.operations()
    rot, tran = [], []
    for op in ops:                                   # symmetry operations times centrings
        rot.append(np.array(op.rot, float) / op.DEN)
        tran.append(np.array(op.tran, float) / op.DEN)
    hkl_rot = np.array([np.array(op.rot, float) / op.DEN for op in ops.sym_ops])
    return _Ops(sg.xhm(), np.array(rot), np.array(tran), hkl_rot, ops)


def site_multiplicity(ops: _Ops, xyz: Sequence[float], tol: float = 1e-4) -> int:
    """Number of distinct positions a site generates in the unit cell."""
    pos = np.einsum("gij,j->gi", ops.rot, np.asarray(xyz, float)) + ops.tran
    pos = np.mod(pos + tol / 2, 1.0) - tol / 2
    keep: list[np.ndarray] = []
    for p in pos:
        if not any(np.all(np.abs(((p - q) + 0.5) % 1.0 - 0.5) < tol) for q in keep):
            keep.append(p)
    return len(keep)


def cell_metric(cell: Sequence[float]) -> np.ndarray:
    """Direct metric tensor G of a cell (a, b, c in Å; α, β, γ in degrees)."""
    a, b, c, al, be, ga = cell
    ca, cb, cg = (np.cos(np.radians(v)) for v in (al, be, ga))
    return np.array([[a * a, a * b * cg, a * c * cb], [a * b * cg, b * b, b * c * ca], [a * c * cb, b * c * ca, c * c]])


# ----------------------------------------------------------------------------------------------
# reflections

@dataclass(frozen=True)
class Reflections:
    """Unique reflections: ``hkl`` (K, 3) one representative each, ``multiplicity`` (K,),
    ``d`` (K,) in Å at the cell they were listed for."""

    hkl: np.ndarray
    multiplicity: np.ndarray
    d: np.ndarray

    def __len__(self) -> int:
        return int(self.hkl.shape[0])


def reflections(space_group: str, cell: Sequence[float], d_min: float, d_max: float = np.inf) -> Reflections:
    """Every allowed reflection with d_min <= d <= d_max, symmetry-equivalents (and Friedel
    mates) merged into one with its multiplicity, sorted by decreasing d."""
    ops = space_group_ops(space_group)
    g_star = np.linalg.inv(cell_metric(cell))
    lim = np.floor(np.sqrt(np.diag(cell_metric(cell))) / d_min).astype(int) + 1
    grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in lim], indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    inv_d2 = np.einsum("ni,ij,nj->n", grid, g_star, grid)
    grid = grid[(inv_d2 <= 1 / d_min**2) & (inv_d2 >= (0 if np.isinf(d_max) else 1 / d_max**2))]
    if grid.size == 0:
        return Reflections(np.zeros((0, 3), int), np.zeros(0, int), np.zeros(0))
    absent = np.asarray(ops.gemmi_ops.systematic_absences(grid.astype(np.int32)), bool)
    grid = grid[~absent]
    # canonical representative: the largest key over the equivalents and their Friedel mates
    eq = np.rint(np.einsum("ni,gij->gnj", grid, ops.hkl_rot)).astype(np.int64)
    eq = np.concatenate([eq, -eq])
    base = 2 * int(lim.max()) + 3
    keys = ((eq[..., 0] + base) * base + (eq[..., 1] + base)) * base + (eq[..., 2] + base)
    best = keys.argmax(axis=0)
    canon = keys[best, np.arange(grid.shape[0])]
    uniq, first, count = np.unique(canon, return_index=True, return_counts=True)
    hkl = eq[best[first], first]
    d = 1 / np.sqrt(np.einsum("ni,ij,nj->n", hkl, g_star, hkl))
    order = np.lexsort((-hkl[:, 2], -hkl[:, 1], -hkl[:, 0], -d))
    return Reflections(hkl[order].astype(int), count[order].astype(int), d[order])


def d_spacings(hkl: np.ndarray, cell: Sequence[float]) -> np.ndarray:
    g_star = np.linalg.inv(cell_metric(cell))
    return 1 / np.sqrt(np.einsum("ni,ij,nj->n", hkl, g_star, hkl))


# ----------------------------------------------------------------------------------------------
# structure factors

@lru_cache(maxsize=128)
def _it92(element: str) -> tuple[np.ndarray, np.ndarray, float]:
    import gemmi

    try:
        el = gemmi.Element(element)
    except Exception:
        el = None
    if el is None or el.atomic_number == 0 or el.it92 is None:
        raise StructureError(f"no X-ray form factor for element {element!r}")
    c = el.it92.get_coefs()
    return np.array(c[:4]), np.array(c[4:8]), float(c[8])


def form_factor(element: str, s: np.ndarray) -> np.ndarray:
    """IT92 (International Tables C, 6.1.1.4) X-ray form factor of a neutral atom at s = sin θ/λ."""
    a, b, c = _it92(element)
    s2 = np.asarray(s, float) ** 2
    return np.exp(-np.multiply.outer(s2, b)) @ a + c


@dataclass
class _Expanded:
    """Positions of every atom under every operation (not merged: each atom's sum is divided by
    the size of its site's stabiliser, which stays exact while a refined coordinate moves along
    its special position)."""

    pos: np.ndarray            # (A, G, 3)
    weight: np.ndarray         # (A,) 1 / stabiliser size
    elements: list[str]


def expand_sites(structure: Structure) -> _Expanded:
    ops = space_group_ops(structure.space_group)
    xyz = np.array([a.xyz for a in structure.atoms], float).reshape(-1, 3)
    pos = np.einsum("gij,aj->agi", ops.rot, xyz) + ops.tran[None]
    mult = np.array([site_multiplicity(ops, a.xyz) for a in structure.atoms], float)
    return _Expanded(pos, mult / ops.rot.shape[0], [a.element for a in structure.atoms])


def structure_factors_sq(structure: Structure, hkl: np.ndarray, *, expanded: _Expanded | None = None) -> np.ndarray:
    """|F(hkl)|² of the unit cell contents (electrons²), IT92 form factors, exp(-B s²)."""
    hkl = np.asarray(hkl, float).reshape(-1, 3)
    ex = expanded or expand_sites(structure)
    s = 0.5 / d_spacings(hkl, structure.cell)
    occ = np.array([a.occupancy for a in structure.atoms])
    b = np.array([a.b_iso for a in structure.atoms])
    f = np.stack([form_factor(e, s) for e in ex.elements], axis=1) if ex.elements else np.zeros((s.size, 0))
    amp = f * occ * ex.weight * np.exp(-np.multiply.outer(s**2, b))          # (K, A)
    phase = 2 * np.pi * np.einsum("ki,agi->kag", hkl, ex.pos)                  # (K, A, G)
    re = np.einsum("ka,kag->k", amp, np.cos(phase))
    im = np.einsum("ka,kag->k", amp, np.sin(phase))
    return re**2 + im**2


# ----------------------------------------------------------------------------------------------
# structures: CIF files and layered-oxide templates

def read_cif(path: Path | str) -> Structure:
    """A structure from a CIF file (the first block with atom sites), read with gemmi."""
    import gemmi

    path = Path(path)
    try:
        small = gemmi.read_small_structure(str(path))
    except Exception as exc:
        raise StructureError(f"{path}: cannot read it as a CIF file: {exc}") from None
    cell = small.cell
    missing = [what for what, gone in (
        ("no unit cell (_cell_length_a, _cell_length_b, _cell_length_c, _cell_angle_alpha, _cell_angle_beta, "
         "_cell_angle_gamma)", not cell.is_crystal() or min(cell.a, cell.b, cell.c) <= 0),
        ("no atom sites (_atom_site_label, _atom_site_fract_x, _atom_site_fract_y, _atom_site_fract_z)",
         not small.sites)) if gone]
    if missing:
        raise StructureError(f"{path}: {' and '.join(missing)} in the CIF file; a structure needs both")
    sg = small.spacegroup_hm or (small.spacegroup.xhm() if small.spacegroup else "")
    if not sg:
        raise StructureError(f"{path}: no space group (_symmetry_space_group_name_H-M or _space_group_name_H-M_alt)")
    atoms = []
    for site in small.sites:
        el = site.element.name if site.element.atomic_number else site.type_symbol
        b = 8 * np.pi**2 * site.u_iso if site.u_iso > 0 else 0.5
        atoms.append(Atom(site.label, el, tuple(float(v) for v in site.fract), float(site.occ), float(b)))
    return Structure(sg, (cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma), tuple(atoms), name=path.stem)


def template(kind: str, *, a: float, c: float, z_o: float | None = None,
             composition: Mapping[str, float] | None = None, na: float = 1.0,
             b_iso: Mapping[str, float] | None = None, extra: Sequence[Atom] = ()) -> Structure:
    """A layered-oxide structure NaxTMO2 with hexagonal axes.

    * ``P2`` (P6₃/mmc): TM 2a (0,0,0); Na_f 2b (0,0,1/4) and Na_e 2d (1/3,2/3,3/4) sharing the
      sodium ``na`` per formula unit (1/3 and 2/3); O 4f (1/3,2/3,z_O), z_O ~ 0.09.
    * ``O3`` (R-3m): Na 3a (0,0,0); TM 3b (0,0,1/2); O 6c (0,0,z_O), z_O ~ 0.233.
    * ``P3`` (R3m): TM 3a (0,0,0); O1 3a (0,0,1/3+z_O), O2 3a (0,0,2/3-z_O), z_O ~ 0.057;
      prismatic Na 3a (0,0,1/6).

    ``composition`` gives the TM site's elements per formula unit (default Mn); each becomes an
    atom of its own on the TM site (labels are the element symbols; sodium is ``Na``, or
    ``Na_f``/``Na_e`` in P2; oxygen ``O``, or ``O1``/``O2`` in P3). ``extra`` atoms are added
    as given (e.g. Fe on the tetrahedral sites of the Na layer).
    """
    comp = dict(composition or {"Mn": 1.0})
    bb = {"Na": 1.0, "TM": 0.3, "O": 0.6, **(b_iso or {})}
    if kind == "P2":
        z = 0.09 if z_o is None else z_o
        atoms = [Atom(el, el, (0.0, 0.0, 0.0), occ, bb["TM"]) for el, occ in comp.items()]
        atoms += [Atom("Na_f", "Na", (0.0, 0.0, 0.25), na / 3, bb["Na"]),
                  Atom("Na_e", "Na", (1 / 3, 2 / 3, 0.75), 2 * na / 3, bb["Na"]),
                  Atom("O", "O", (1 / 3, 2 / 3, z), 1.0, bb["O"])]
        sg = "P63/mmc"
    elif kind == "O3":
        z = 0.2326 if z_o is None else z_o
        atoms = [Atom("Na", "Na", (0.0, 0.0, 0.0), na, bb["Na"])]
        atoms += [Atom(el, el, (0.0, 0.0, 0.5), occ, bb["TM"]) for el, occ in comp.items()]
        atoms += [Atom("O", "O", (0.0, 0.0, z), 1.0, bb["O"])]
        sg = "R-3m"
    elif kind == "P3":
        z = 0.057 if z_o is None else z_o
        atoms = [Atom(el, el, (0.0, 0.0, 0.0), occ, bb["TM"]) for el, occ in comp.items()]
        atoms += [Atom("O1", "O", (0.0, 0.0, 1 / 3 + z), 1.0, bb["O"]),
                  Atom("O2", "O", (0.0, 0.0, 2 / 3 - z), 1.0, bb["O"]),
                  Atom("Na", "Na", (0.0, 0.0, 1 / 6), na, bb["Na"])]
        sg = "R3m"
    else:
        raise StructureError(f"no built-in structure for {kind!r}; templates: {', '.join(TEMPLATES)} "
                             "(or give a CIF file)")
    return Structure(sg, (a, a, c, 90.0, 90.0, 120.0), tuple(atoms) + tuple(extra), name=kind)

