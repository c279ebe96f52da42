"""The refinement model: phases (structure, refined parameters, constraints, profile, cell search
range), the instrument and the range (:class:`RefinementModel`), and the result of one pattern
(:class:`RefinementResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np

from ..crystallography import CELL_PARAMETERS, crystal_system
from .structures import Structure

SEARCH_DEFAULT = {"a": 0.015, "b": 0.015, "c": 0.03}    # relative half-ranges of the cell search
SEARCH_ANGLE_DEG = 2.0        # ... and of angles (degrees); angles are searched by least squares only


def cell_parameters(system: str) -> tuple[str, ...]:
    """The free cell parameters of a crystal system (:data:`xrdpipe.crystallography.CELL_PARAMETERS`)."""
    return CELL_PARAMETERS[system]


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
    return crystal_system(space_group)


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
