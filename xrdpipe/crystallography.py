"""Pure crystallography: no I/O, no state. Lengths in Å, angles in degrees.

Conversions between 2θ, d and Q at a wavelength; d-spacings, volumes and allowed reflections of
any space group gemmi knows (every crystal system: cubic, tetragonal, hexagonal and trigonal in
hexagonal axes, orthorhombic, monoclinic with unique axis b, triclinic). The cell parameters a
phase refines are those its crystal system leaves free (:data:`CELL_PARAMETERS`).

>>> round(d_from_tth(tth_from_d(2.5, 0.6209), 0.6209), 12)
2.5
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterator

import numpy as np

__all__ = [
    "tth_from_d",
    "d_from_tth",
    "q_from_d",
    "d_from_q",
    "q_from_tth",
    "tth_from_q",
    "convert_radial",
    "d_hexagonal",
    "d_orthorhombic",
    "d_monoclinic",
    "d_spacing",
    "cell_volume",
    "CRYSTAL_SYSTEMS",
    "crystal_system",
    "hexagonal_volume",
    "is_allowed",
    "parse_hkl",
    "reflections",
    "multiplicity",
    "SPACE_GROUPS",
    "CELL_PARAMETERS",
    "full_cell",
    "RadialAxis",
    "system_cell",
    "d_from_cell",
    "reciprocal_cell",
    "space_group_name",
]


def tth_from_d(d_A, wavelength_A):
    """Bragg angle 2θ (degrees) of a d-spacing; NaN where λ > 2d."""
    s = np.asarray(wavelength_A / (2.0 * np.asarray(d_A, dtype=float)))
    with np.errstate(invalid="ignore"):
        out = 2.0 * np.degrees(np.arcsin(np.where(np.abs(s) <= 1, s, np.nan)))
    return out if out.ndim else float(out)


def d_from_tth(tth_deg, wavelength_A):
    """d-spacing (Å) at a diffraction angle 2θ (degrees)."""
    out = np.asarray(wavelength_A / (2.0 * np.sin(np.radians(np.asarray(tth_deg, dtype=float)) / 2.0)))
    return out if out.ndim else float(out)


def q_from_d(d_A):
    """Q = 2π/d (Å⁻¹)."""
    out = np.asarray(2.0 * np.pi / np.asarray(d_A, dtype=float))
    return out if out.ndim else float(out)


def d_from_q(q_invA):
    """d = 2π/Q (Å)."""
    return q_from_d(q_invA)


def q_from_tth(tth_deg, wavelength_A):
    """Q = 4π sin θ / λ (Å⁻¹)."""
    out = np.asarray(4.0 * np.pi * np.sin(np.radians(np.asarray(tth_deg, dtype=float)) / 2.0) / wavelength_A)
    return out if out.ndim else float(out)


def tth_from_q(q_invA, wavelength_A):
    """2θ (degrees) of a momentum transfer Q (Å⁻¹); NaN beyond 4π/λ."""
    s = np.asarray(np.asarray(q_invA, dtype=float) * wavelength_A / (4.0 * np.pi))
    with np.errstate(invalid="ignore"):
        out = 2.0 * np.degrees(np.arcsin(np.where(np.abs(s) <= 1, s, np.nan)))
    return out if out.ndim else float(out)


def convert_radial(values, from_unit: str, to_unit: str, wavelength_A: float | None):
    """Convert a radial axis between ``"2th_deg"`` and ``"q_A^-1"`` (NaN without a wavelength)."""
    if from_unit == to_unit:
        return np.asarray(values, dtype=float)
    if not wavelength_A:
        return np.full(np.shape(values), np.nan)
    if (from_unit, to_unit) == ("2th_deg", "q_A^-1"):
        return np.asarray(q_from_tth(values, wavelength_A))
    if (from_unit, to_unit) == ("q_A^-1", "2th_deg"):
        return np.asarray(tth_from_q(values, wavelength_A))
    raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}; units are '2th_deg' and 'q_A^-1'")


class RadialAxis:
    """``tth_deg`` and ``q_invA`` of anything with a ``radial`` axis in ``unit`` and a
    ``wavelength_A`` (the integrator, a pattern stack)."""

    radial: np.ndarray
    unit: str
    wavelength_A: float | None

    @property
    def tth_deg(self) -> np.ndarray:
        """The radial axis as 2θ (degrees)."""
        return convert_radial(self.radial, self.unit, "2th_deg", self.wavelength_A)

    @property
    def q_invA(self) -> np.ndarray:
        """The radial axis as Q (Å⁻¹)."""
        return convert_radial(self.radial, self.unit, "q_A^-1", self.wavelength_A)


def d_hexagonal(h, k, l, a_A, c_A):
    """d-spacing of (hkl) in a hexagonal cell: 1/d² = 4/3 (h² + hk + k²)/a² + l²/c²."""
    h, k, l = (np.asarray(v, dtype=float) for v in (h, k, l))
    inv_d2 = 4.0 / 3.0 * (h * h + h * k + k * k) / a_A**2 + l * l / c_A**2
    with np.errstate(divide="ignore"):
        out = np.asarray(1.0 / np.sqrt(inv_d2))
    return out if out.ndim else float(out)


def d_orthorhombic(h, k, l, a_A, b_A, c_A):
    """d-spacing of (hkl) in an orthorhombic cell: 1/d² = h²/a² + k²/b² + l²/c²."""
    h, k, l = (np.asarray(v, dtype=float) for v in (h, k, l))
    with np.errstate(divide="ignore"):
        out = np.asarray(1.0 / np.sqrt(h * h / a_A**2 + k * k / b_A**2 + l * l / c_A**2))
    return out if out.ndim else float(out)


def d_monoclinic(h, k, l, a_A, b_A, c_A, beta_deg):
    """d-spacing of (hkl) in a monoclinic cell with unique axis b (angle β between a and c)."""
    h, k, l = (np.asarray(v, dtype=float) for v in (h, k, l))
    beta = np.radians(beta_deg)
    s2, cb = np.sin(beta) ** 2, np.cos(beta)
    inv_d2 = (h * h / a_A**2 + k * k * s2 / b_A**2 + l * l / c_A**2 - 2 * h * l * cb / (a_A * c_A)) / s2
    with np.errstate(divide="ignore"):
        out = np.asarray(1.0 / np.sqrt(inv_d2))
    return out if out.ndim else float(out)


def d_spacing(space_group: str, h, k, l, a_A, c_A=None, b_A=None, beta_deg=None, alpha_deg=None, gamma_deg=None):
    """d-spacing of (hkl) in the crystal system of ``space_group`` (hexagonal axes for the
    hexagonal and trigonal groups): give the cell parameters the system has (``c_A`` for
    tetragonal and hexagonal cells, also ``b_A`` for orthorhombic, ``beta_deg`` for monoclinic,
    all six for triclinic; a cubic cell needs only ``a_A``)."""
    system = crystal_system(space_group)
    if system == "hexagonal":
        return d_hexagonal(h, k, l, a_A, c_A)
    if system == "orthorhombic":
        return d_orthorhombic(h, k, l, a_A, b_A, c_A)
    if system == "monoclinic":
        return d_monoclinic(h, k, l, a_A, b_A, c_A, beta_deg)
    return d_from_cell(h, k, l, full_cell(space_group, a_A, c_A, b_A, beta_deg, alpha_deg, gamma_deg))


def cell_volume(space_group: str, a_A, c_A=None, b_A=None, beta_deg=None, alpha_deg=None, gamma_deg=None):
    """Cell volume (Å³) in the crystal system of ``space_group`` (parameters as :func:`d_spacing`)."""
    system = crystal_system(space_group)
    if system == "hexagonal":
        return hexagonal_volume(a_A, c_A)
    if system == "orthorhombic":
        return np.asarray(a_A) * b_A * c_A
    if system == "monoclinic":
        return np.asarray(a_A) * b_A * c_A * np.sin(np.radians(beta_deg))
    a, b, c, al, be, ga = full_cell(space_group, a_A, c_A, b_A, beta_deg, alpha_deg, gamma_deg)
    ca, cb, cg = (np.cos(np.radians(v)) for v in (al, be, ga))
    return a * b * c * np.sqrt(np.maximum(1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg, 0.0))


#: The cell parameters each crystal system leaves free (hexagonal axes for trigonal groups).
CELL_PARAMETERS = {"cubic": ("a",), "tetragonal": ("a", "c"), "hexagonal": ("a", "c"),
                   "orthorhombic": ("a", "b", "c"), "monoclinic": ("a", "b", "c", "beta"),
                   "triclinic": ("a", "b", "c", "alpha", "beta", "gamma")}


def system_cell(system: str, p) -> tuple:
    """The six cell parameters (a, b, c, α, β, γ) of a crystal ``system`` from its free ones in the
    mapping ``p`` (keys a, b, c, alpha, beta, gamma; only the free ones are read). Values may be
    arrays.

    >>> system_cell("hexagonal", {"a": 2.9, "c": 16.5})
    (2.9, 2.9, 16.5, 90.0, 90.0, 120.0)
    """
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


#: How far each free cell parameter moves in the probe cells of :func:`coincident_groups`
#: (lengths as a share, angles in degrees): different amounts, so that no two reflections of
#: different d at some cell of the system keep one d at all three probes by accident.
_PROBE_MOVES = {"a": 0.0131, "b": 0.0217, "c": -0.0173, "alpha": 0.71, "beta": 1.13, "gamma": -0.89}


def probe_cells(system: str, cell) -> list[tuple]:
    """The cell (a, b, c, α, β, γ) and two cells of its crystal ``system`` moved from it in every
    free parameter by different amounts (:data:`_PROBE_MOVES`, then -0.6 times them), the
    dependent ones following (b = a in a cubic cell). Two reflections with one d at all three
    have one d at every cell of the system."""
    system = "hexagonal" if system == "trigonal" else system
    if system not in CELL_PARAMETERS:
        raise ValueError(f"crystal system {system!r}: expected one of {', '.join(CELL_PARAMETERS)} (or trigonal)")
    names = ("a", "b", "c", "alpha", "beta", "gamma")
    base = dict(zip(names, (float(v) for v in cell)))
    out = [tuple(float(v) for v in system_cell(system, base))]
    for sign in (1.0, -0.6):
        moved = {n: base[n] + sign * _PROBE_MOVES[n] if n in ("alpha", "beta", "gamma")
                 else base[n] * (1 + sign * _PROBE_MOVES[n]) for n in CELL_PARAMETERS[system]}
        out.append(tuple(float(v) for v in system_cell(system, {**base, **moved})))
    return out


def coincident_groups(hkl, system: str, cell) -> np.ndarray:
    """(n,) a group number for each reflection of ``hkl`` (n, 3) of a phase of crystal
    ``system``: reflections at one d for every cell of the system (:func:`probe_cells`; a
    spinel's (511) and (333), a hexagonal hkl and khl where not equivalent) share one, numbered
    from 0 in order of first appearance. No cell of the phase can split them: in a fit they are
    one line (one area), however their intensities differ.

    >>> coincident_groups([(5, 1, 1), (3, 3, 3), (4, 4, 0)], "cubic", (8.24, 8.24, 8.24, 90, 90, 90)).tolist()
    [0, 0, 1]
    """
    hkl = np.asarray(hkl, float).reshape(-1, 3)
    if not len(hkl):
        return np.zeros(0, int)
    d = np.array([d_from_cell(hkl[:, 0], hkl[:, 1], hkl[:, 2], c) for c in probe_cells(system, cell)])
    order = np.lexsort(d[::-1])
    new = np.ones(order.size, bool)
    ds = d[:, order]
    new[1:] = (np.abs(np.diff(ds, axis=1)) > 1e-9 * ds[:, 1:]).any(axis=0)
    group = np.empty(order.size, int)
    group[order] = np.cumsum(new) - 1
    # numbered in order of first appearance
    _, first = np.unique(group, return_index=True)
    rank = np.empty(first.size, int)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[group]


def full_cell(space_group: str, a_A, c_A=None, b_A=None, beta_deg=None, alpha_deg=None, gamma_deg=None):
    """The six cell parameters (a, b, c, α, β, γ) implied by the crystal system's free ones.

    >>> full_cell("Fm-3m", 4.0495)
    (4.0495, 4.0495, 4.0495, 90.0, 90.0, 90.0)
    """
    return system_cell(crystal_system(space_group), {"a": a_A, "b": b_A, "c": c_A, "alpha": alpha_deg,
                                                     "beta": beta_deg, "gamma": gamma_deg})


def d_from_cell(h, k, l, cell):
    """d-spacing of (hkl) from the six cell parameters (any crystal system), via the reciprocal
    metric tensor. Arrays of cell parameters broadcast against the indices."""
    a, b, c, al, be, ga = (np.asarray(v, dtype=float) for v in cell)
    h, k, l = (np.asarray(v, dtype=float) for v in (h, k, l))
    ca, cb, cg = np.cos(np.radians(al)), np.cos(np.radians(be)), np.cos(np.radians(ga))
    sa, sb, sg = np.sin(np.radians(al)), np.sin(np.radians(be)), np.sin(np.radians(ga))
    vol2 = 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg
    inv_d2 = (h * h * sa**2 / a**2 + k * k * sb**2 / b**2 + l * l * sg**2 / c**2
              + 2 * k * l * (cb * cg - ca) / (b * c) + 2 * h * l * (cg * ca - cb) / (a * c)
              + 2 * h * k * (ca * cb - cg) / (a * b)) / vol2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(1.0 / np.sqrt(inv_d2))
    return out if out.ndim else float(out)


def reciprocal_cell(cells: np.ndarray) -> np.ndarray:
    """(T, 6) the reciprocal cells of ``cells`` (T, 6; a, b, c in Å, angles in degrees), or the
    direct cells of reciprocal ones (the map is its own inverse): a* = bc sin α / V, cos α* =
    (cos β cos γ - cos α) / (sin β sin γ), and likewise.

    >>> np.round(reciprocal_cell(np.array([[5.0, 3.0, 6.0, 90.0, 120.0, 90.0]]))[0], 4)
    array([ 0.2309,  0.3333,  0.1925, 90.    , 60.    , 90.    ])
    """
    lengths, rad = cells[:, :3], np.radians(cells[:, 3:])
    cos, sin = np.cos(rad), np.sin(rad)
    omega = np.sqrt(1 - np.sum(cos ** 2, axis=1) + 2 * np.prod(cos, axis=1))       # V / (abc)
    out = np.empty_like(cells, dtype=float)
    out[:, :3] = sin / (lengths * omega[:, None])
    for j, (k, m) in enumerate(((1, 2), (0, 2), (0, 1))):
        out[:, 3 + j] = np.degrees(np.arccos(np.clip((cos[:, k] * cos[:, m] - cos[:, j]) / (sin[:, k] * sin[:, m]), -1, 1)))
    return out


def hexagonal_volume(a_A, c_A):
    """Volume (Å³) of a hexagonal cell: √3/2 a² c."""
    return np.sqrt(3.0) / 2.0 * np.asarray(a_A) ** 2 * np.asarray(c_A)


# Reflection conditions in the hexagonal setting (obverse for the rhombohedral groups).
def _rhombohedral_obverse(h: int, k: int, l: int) -> bool:
    return (-h + k + l) % 3 == 0


def _p63mmc(h: int, k: int, l: int) -> bool:
    # P6_3/mmc (and P6_3mc): hh-2hl (any two of h, k, i equal) and 000l need l = 2n.
    i = -h - k
    if h == k or k == i or h == i:
        return l % 2 == 0
    return True


def _cmcm(h: int, k: int, l: int) -> bool:
    # C-centring h+k=2n; 0kl: k=2n; h0l: h,l=2n; 00l: l=2n (International Tables, No. 63)
    if (h + k) % 2:
        return False
    if k == 0 and (h % 2 or l % 2):
        return False
    if h == 0 and k % 2:
        return False
    if h == 0 and k == 0 and l % 2:
        return False
    return True


def _c2m(h: int, k: int, l: int) -> bool:
    # C-centring h+k=2n (unique axis b; No. 12): covers h0l h=2n, 0kl k=2n, 0k0 k=2n, h00 h=2n
    return (h + k) % 2 == 0


SPACE_GROUPS = {
    "P63/mmc": _p63mmc,   # P2, P''2
    "P63mc": _p63mmc,     # O2
    "R-3m": _rhombohedral_obverse,  # O3
    "R3m": _rhombohedral_obverse,   # P3
    "P-6m2": lambda h, k, l: True,  # OP4 (no systematic absences)
    "Cmcm": _cmcm,        # P'2 (orthorhombic)
    "C2/m": _c2m,         # O'3 (monoclinic, unique axis b)
}
CRYSTAL_SYSTEMS = {"P63/mmc": "hexagonal", "P63mc": "hexagonal", "R-3m": "hexagonal", "R3m": "hexagonal",
                   "P-6m2": "hexagonal", "Cmcm": "orthorhombic", "C2/m": "monoclinic"}


@lru_cache(maxsize=256)
def _gemmi_group(space_group: str):
    import gemmi

    try:
        sg = gemmi.find_spacegroup_by_name(str(space_group))
    except (ValueError, RuntimeError):
        sg = None
    if sg is None:
        raise ValueError(f"unknown space group {space_group!r}; expected a Hermann-Mauguin symbol such as "
                         f"'R-3m', 'P63/mmc', 'Fm-3m', 'Pnma' or 'C2/m'")
    return sg


def space_group_name(space_group: str) -> str:
    """gemmi's full Hermann-Mauguin name of a space group (raises ValueError if unknown)."""
    return _gemmi_group(space_group).xhm()


def crystal_system(space_group: str) -> str:
    """``"cubic"``, ``"tetragonal"``, ``"hexagonal"`` (also trigonal and rhombohedral, in
    hexagonal axes), ``"orthorhombic"``, ``"monoclinic"`` (unique axis b) or ``"triclinic"``."""
    if space_group in CRYSTAL_SYSTEMS:
        return CRYSTAL_SYSTEMS[space_group]
    system = _gemmi_group(space_group).crystal_system_str()
    return "hexagonal" if system == "trigonal" else system


def is_allowed(space_group: str, h: int, k: int, l: int) -> bool:
    """Whether (hkl) is allowed by the space group's reflection conditions (hexagonal axes for
    hexagonal and trigonal groups, the obverse setting for rhombohedral ones)."""
    if h == k == l == 0:
        return False
    rule = SPACE_GROUPS.get(space_group)
    if rule is not None:
        return rule(h, k, l)
    return not _gemmi_group(space_group).operations().is_systematically_absent([int(h), int(k), int(l)])


def parse_hkl(text: str) -> tuple[int, int, int]:
    """Miller indices from ``"104"``, ``"1 0 4"``, ``"1,0,4"``, ``"0 0 12"`` or ``"1-14"``.

    Without separators every index is one digit, optionally signed (``"1-14"`` is 1 -1 4).

    >>> parse_hkl("0 0 12")
    (0, 0, 12)
    """
    s = str(text).strip().strip("()")
    if any(ch in s for ch in " ,;"):
        parts = [p for p in re.split(r"[\s,;]+", s) if p]
    else:
        parts = re.findall(r"[-+]?\d", s)
        if "".join(parts) != s:
            parts = []
    if len(parts) != 3:
        raise ValueError(f"cannot read Miller indices from {text!r}; expected e.g. \"104\" or \"0 0 12\"")
    try:
        h, k, l = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"cannot read Miller indices from {text!r}; expected e.g. \"104\" or \"0 0 12\"") from None
    return h, k, l


def _equivalents(h: int, k: int, l: int, laue: str) -> set[tuple[int, int, int]]:
    """All (h, k, l) equivalent to (hkl) in the Laue class, hexagonal axes."""
    # generators acting on (h, k, l): 3-fold, inversion, and a mirror / 2-fold
    def rot3(v):
        h, k, l = v
        return (k, -h - k, l)

    def inv(v):
        return (-v[0], -v[1], -v[2])

    def two_fold_110(v):  # (hkl) -> (k h -l), present in -3m (hexagonal axes, 'm1' setting)
        return (v[1], v[0], -v[2])

    gens = [rot3, inv, two_fold_110]
    if laue == "6/mmm":
        gens.append(lambda v: (-v[0], -v[1], v[2]))  # 6-fold-related 2-fold along c
    orbit = {(h, k, l)}
    frontier = [(h, k, l)]
    while frontier:
        v = frontier.pop()
        for g in gens:
            w = g(v)
            if w not in orbit:
                orbit.add(w)
                frontier.append(w)
    return orbit


def multiplicity(h: int, k: int, l: int, laue: str = "6/mmm") -> int:
    """Powder multiplicity of (hkl), hexagonal axes, Laue class ``"6/mmm"`` or ``"-3m"``."""
    return len(_equivalents(h, k, l, laue))


def _unique_representatives(hmax: int, lmax: int, laue: str) -> Iterator[tuple[int, int, int]]:
    done: set[tuple[int, int, int]] = set()
    for h in range(-hmax, hmax + 1):
        for k in range(-hmax, hmax + 1):
            for l in range(-lmax, lmax + 1):
                if (h, k, l) in done or h == k == l == 0:
                    continue
                orbit = _equivalents(h, k, l, laue)
                done |= orbit
                yield max(orbit, key=lambda v: (v[2] >= 0, v[0] >= 0, v[1] >= 0, v))


def _lower_symmetry_reflections(space_group, a_A, c_A, d_min_A, b_A, beta_deg):
    system = crystal_system(space_group)
    hmax = int(np.ceil(a_A / d_min_A)) + 1
    kmax = int(np.ceil(b_A / d_min_A)) + 1
    lmax = int(np.ceil(c_A / d_min_A)) + 1
    seen: set[tuple[int, int, int]] = set()
    out = []
    for h in range(-hmax, hmax + 1):
        for k in range(-kmax, kmax + 1):
            for l in range(-lmax, lmax + 1):
                if (h, k, l) in seen or h == k == l == 0:
                    continue
                if system == "orthorhombic":
                    orbit = {(sh * h, sk * k, sl * l) for sh in (1, -1) for sk in (1, -1) for sl in (1, -1)}
                else:  # 2/m, unique axis b
                    orbit = {(h, k, l), (-h, -k, -l), (-h, k, -l), (h, -k, l)}
                seen |= orbit
                if not is_allowed(space_group, h, k, l):
                    continue
                d = float(d_spacing(space_group, h, k, l, a_A, c_A, b_A, beta_deg))
                if d < d_min_A:
                    continue
                rep = max(orbit, key=lambda v: (v[2] >= 0, v[0] >= 0, v[1] >= 0, v))
                out.append((rep[0], rep[1], rep[2], d, len(orbit)))
    out.sort(key=lambda r: -r[3])
    return out


def reflections(space_group: str, a_A: float, c_A: float | None, d_min_A: float, b_A: float | None = None,
                beta_deg: float | None = None, alpha_deg: float | None = None, gamma_deg: float | None = None):
    """Allowed unique reflections with d >= d_min.

    Returns a list of ``(h, k, l, d_A, multiplicity)`` sorted by decreasing d. For the
    rhombohedral groups the hexagonal axes and the obverse setting are used; Friedel pairs
    are merged (powder diffraction). Orthorhombic and monoclinic groups need ``b_A`` (and
    ``beta_deg``); any other space group gemmi knows is listed from its symmetry operations.
    """
    system = crystal_system(space_group)
    if space_group not in SPACE_GROUPS:
        return _general_reflections(space_group, full_cell(space_group, a_A, c_A, b_A, beta_deg, alpha_deg,
                                                           gamma_deg), d_min_A)
    if system != "hexagonal":
        if b_A is None or (system == "monoclinic" and beta_deg is None):
            raise ValueError(f"{space_group} needs b (and beta for monoclinic cells)")
        return _lower_symmetry_reflections(space_group, a_A, c_A, d_min_A, b_A, beta_deg)
    laue = "-3m" if space_group in ("R-3m", "R3m") else "6/mmm"
    hmax = int(np.ceil(a_A / d_min_A)) + 1
    lmax = int(np.ceil(c_A / d_min_A)) + 1
    out = []
    for h, k, l in _unique_representatives(hmax, lmax, laue):
        d = d_hexagonal(h, k, l, a_A, c_A)
        if d < d_min_A:
            continue
        # a reflection family is allowed if any member is (conditions are symmetry-invariant
        # for these groups, but the obverse rule is only invariant within the family)
        members = _equivalents(h, k, l, laue)
        if not any(is_allowed(space_group, *m) for m in members):
            continue
        allowed = [m for m in members if is_allowed(space_group, *m)]
        rep = max(allowed, key=lambda v: (v[2] >= 0, v[0] >= 0, v[1] >= 0, v))
        out.append((rep[0], rep[1], rep[2], float(d), len(allowed)))
    out.sort(key=lambda r: -r[3])
    return out


def _general_reflections(space_group: str, cell, d_min_A: float):
    """Reflections of any space group from gemmi's operations: equivalents and Friedel mates
    merged, the representative the largest in (l, h, k) order for hexagonal axes, (h, k, l) else."""
    sg = _gemmi_group(space_group)
    ops = sg.operations()
    a, b, c, al, be, ga = cell
    lim = [int(np.floor(v / d_min_A)) + 1 for v in (a, b, c)]
    grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in lim], indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    d = d_from_cell(grid[:, 0], grid[:, 1], grid[:, 2], cell)
    grid, d = grid[d >= d_min_A], d[d >= d_min_A]
    if grid.size == 0:
        return []
    absent = np.asarray(ops.systematic_absences(grid.astype(np.int32)), bool)
    grid, d = grid[~absent], d[~absent]
    rot = np.array([np.array(op.rot, float) / op.DEN for op in ops.sym_ops])
    eq = np.rint(np.einsum("ni,gij->gnj", grid, rot)).astype(np.int64)
    eq = np.concatenate([eq, -eq])
    base = 2 * max(lim) + 3
    if crystal_system(space_group) == "hexagonal":   # (l, h, k): 0 0 l, 1 0 l... as for the layered oxides
        keys = ((eq[..., 2] + base) * base + (eq[..., 0] + base)) * base + (eq[..., 1] + base)
    else:                                            # (h, k, l): 2 0 0, 3 1 1, 1 1 -1...
        keys = ((eq[..., 0] + base) * base + (eq[..., 1] + base)) * base + (eq[..., 2] + base)
    best = keys.argmax(axis=0)
    canon = keys[best, np.arange(grid.shape[0])]
    _, first, count = np.unique(canon, return_index=True, return_counts=True)
    out = [(int(eq[best[i], i, 0]), int(eq[best[i], i, 1]), int(eq[best[i], i, 2]), float(d[i]), int(n))
           for i, n in zip(first, count)]
    out.sort(key=lambda r: (-r[3], -r[0], -r[1], -r[2]))
    return out
