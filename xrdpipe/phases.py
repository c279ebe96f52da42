"""The phase library of layered sodium oxides and the geometry of their layers.

``LIBRARY`` holds sensible defaults (space group, typical cell, layers per cell, oxygen z where
the structure is simple enough) for P2, P''2, O3, P3, O2, OP4, P'2 and O'3, and the aluminium current collector (Al): a ``[[phases]]``
table that gives only ``name = "O3"`` starts from them, and any key it gives wins.

:func:`layer_geometry` computes, from fractional coordinates, the TM-O, Na-O and Na-TM
distances and the TM-layer and Na-layer slab thicknesses of O3, P3 and P2 cells.

>>> round(layer_geometry("O3", 2.985, 16.0, 0.2326)["tm_o_A"], 3)
2.02
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LibraryPhase", "LIBRARY", "layer_geometry", "GEOMETRY_KEYS"]


@dataclass(frozen=True)
class LibraryPhase:
    """A phase's defaults: space group, cell (Å, degrees), layers per cell, oxygen z."""

    space_group: str
    a: float
    c: float | None
    layers: int
    b: float | None = None
    beta: float | None = None
    z_o: float | None = None
    note: str = ""
    fraction: bool = True
    #: the phase model's search half-ranges, where the defaults do not suit the phase
    search: tuple[tuple[str, float], ...] = ()


#: Typical cells of sodium layered oxides NaxTMO2 (hexagonal axes where hexagonal).
LIBRARY: dict[str, LibraryPhase] = {
    "P2": LibraryPhase("P63/mmc", 2.85, 11.20, 2, z_o=0.09, note="prismatic Na, ABBA oxygen stacking"),
    "P''2": LibraryPhase("P63/mmc", 2.83, 11.35, 2, z_o=0.092, note="P2 with Na/vacancy order, longer c"),
    "O3": LibraryPhase("R-3m", 2.985, 16.00, 3, z_o=0.2326, note="octahedral Na, alpha-NaFeO2 type"),
    "P3": LibraryPhase("R3m", 2.93, 16.70, 3, z_o=0.057, note="prismatic Na, ABBCCA stacking"),
    "O2": LibraryPhase("P63mc", 2.84, 8.90, 2, note="octahedral Na after P2 glides, ABAC stacking"),
    "OP4": LibraryPhase("P-6m2", 2.84, 20.20, 4, note="intergrowth of O2 and P2 layers"),
    "P'2": LibraryPhase("Cmcm", 2.87, 11.20, 2, b=5.28, note="orthorhombic P2 (Jahn-Teller Mn3+)"),
    "O'3": LibraryPhase("C2/m", 5.67, 5.80, 1, b=2.86, beta=113.2, note="monoclinic O3 (alpha-NaMnO2)"),
    # the current collector's cell does not change with the state of charge (a sample
    # displacement moves its lines, and that is the shared zero's job): a narrow search keeps
    # its weak lines from wandering under the cathode's
    "Al": LibraryPhase("Fm-3m", 4.0495, None, 0, note="aluminium current collector (room temperature)",
                       fraction=False, search=(("a", 0.003),)),
}

_R = [(0.0, 0.0, 0.0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)]


def _sites(kind: str, z_o: float) -> dict[str, list[tuple[float, float, float]]]:
    """Fractional coordinates (hexagonal axes) of TM, Na and O in O3, P3 or P2."""
    if kind == "O3":  # R-3m: Na 3a (0,0,0), TM 3b (0,0,1/2), O 6c (0,0,±z)
        base = {"Na": [(0, 0, 0)], "TM": [(0, 0, 0.5)], "O": [(0, 0, z_o), (0, 0, -z_o)]}
    elif kind == "P3":  # R3m: TM (0,0,0), O at 1/3+dz and 2/3-dz, prismatic Na at 1/6
        base = {"TM": [(0, 0, 0)], "O": [(0, 0, 1 / 3 + z_o), (0, 0, 2 / 3 - z_o)], "Na": [(0, 0, 1 / 6)]}
    elif kind == "P2":  # P63/mmc: TM 2a, O 4f (1/3,2/3,z), Na 2b (0,0,1/4) and 2d (1/3,2/3,3/4)
        return {"TM": [(0, 0, 0), (0, 0, 0.5)],
                "O": [(1 / 3, 2 / 3, z_o), (2 / 3, 1 / 3, z_o + 0.5), (2 / 3, 1 / 3, -z_o), (1 / 3, 2 / 3, 0.5 - z_o)],
                "Na": [(0, 0, 0.25), (0, 0, 0.75), (1 / 3, 2 / 3, 0.75), (2 / 3, 1 / 3, 0.25)]}
    else:
        raise ValueError(f"layer geometry is known for O3, P3 and P2 cells, not {kind!r}")
    return {el: [((u + cu) % 1, (v + cv) % 1, (w + cw) % 1) for (u, v, w) in pos for cu, cv, cw in _R]
            for el, pos in base.items()}


def _cart(frac, a, c):
    """Cartesian coordinates (Å) of fractional ``frac`` (..., 3) in hexagonal cells ``a``, ``c``
    (scalars, or arrays (n,) of n cells: then (n, ..., 3))."""
    f = np.asarray(frac, float)
    a, c = (np.asarray(v, float).reshape(np.shape(v) + (1,) * (f.ndim - 1)) for v in (a, c))
    x = a * (f[..., 0] - 0.5 * f[..., 1])
    y = a * (np.sqrt(3) / 2) * f[..., 1]
    return np.stack([x, y, c * f[..., 2]], axis=-1)


def _nearest(frac_a, frac_b, a, c):
    """Shortest distance between any site of A and any periodic image of a site of B (a float;
    an array (n,) for cells ``a``, ``c`` given as arrays (n,))."""
    shifts = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], float)
    pa = _cart(np.asarray(frac_a, float), a, c)
    pb = _cart(np.asarray(frac_b, float)[:, None, :] + shifts[None, :, :], a, c)
    pb = pb.reshape(pb.shape[:-3] + (-1, 3))
    dist = np.linalg.norm(pa[..., :, None, :] - pb[..., None, :, :], axis=-1)
    dist = np.where(dist > 1e-9, dist, np.inf).min(axis=(-2, -1))
    dist = np.where(np.isfinite(dist), dist, np.nan)      # (a cell not known: NaN)
    return float(dist) if dist.ndim == 0 else dist


def _slab(frac_center, frac_o, c):
    """Height between the oxygen layers just above and just below a layer of cations (a float,
    or an array for ``c`` given as an array)."""
    z0 = frac_center[0][2]
    dz = ((np.array([p[2] for p in frac_o]) - z0 + 0.5) % 1.0) - 0.5
    span = dz[dz > 0].min() - dz[dz < 0].max()
    return float(c * span) if np.ndim(c) == 0 else np.asarray(c, float) * span


GEOMETRY_KEYS = ("tm_o_A", "na_o_A", "na_tm_A", "tm_slab_A", "na_slab_A")


def layer_geometry(kind: str, a_A, c_A, z_o: float) -> dict:
    """TM-O, Na-O and Na-TM distances and TM / Na slab thicknesses (Å) of an O3, P3 or P2 cell
    (floats), or of n cells at once (``a_A``, ``c_A`` arrays (n,): arrays (n,)).

    ``z_o`` is the oxygen coordinate of the library's setting (O3: O 6c (0,0,z) with Na at 0;
    P3: the shift of O from 1/3 and 2/3; P2: O 4f (1/3,2/3,z)).
    """
    s = _sites(kind, z_o)
    return {"tm_o_A": _nearest(s["TM"], s["O"], a_A, c_A), "na_o_A": _nearest(s["Na"], s["O"], a_A, c_A),
            "na_tm_A": _nearest(s["Na"], s["TM"], a_A, c_A), "tm_slab_A": _slab(s["TM"], s["O"], c_A),
            "na_slab_A": _slab(s["Na"], s["O"], c_A)}
