"""The ``[refinement]`` section: whole-pattern Le Bail / Pawley / Rietveld of chosen frames.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Spec


class RefineAtomSpec(Spec):
    """An atom added to a refined structure (``sites`` of a phase or a model)."""

    label: str = Field(min_length=1)
    element: str = Field(min_length=1, max_length=2)
    xyz: tuple[float, float, float]
    occupancy: float = Field(default=1.0, ge=0, le=1)
    b_iso: float = Field(default=0.5, ge=-1, le=20)


class OccupancySpec(Spec):
    """Occupancies of ``atoms`` (labels) that keep their number per cell (or ``total`` per
    formula unit): the first ones are refined, the last takes what is left."""

    atoms: list[str] = Field(min_length=2)
    total: float | None = Field(default=None, ge=0)


class RefinePhaseSpec(Spec):
    """``[[refinement.phases]]``: a phase of ``[[phases]]`` (space group, starting cell) to refine.

    ``structure``: ``"template"`` (P2, O3, P3: Na, TM and O sites) or a CIF file (Rietveld only).
    ``composition``: the TM site's elements per formula unit; ``na``: sodium per formula unit.
    ``refine``: structural parameters (``z:O``, ``occ:LABEL``, ``b:LABEL``, ``b:*``); the default
    for a template is its oxygen z. ``profile``: starting U, V, W (deg²), X, Y (deg);
    ``refine_profile``: which are refined. ``lebail = true``: in a Rietveld refinement, this
    phase's intensities are extracted (Le Bail), no structure needed: the Al current collector
    (``name = "Al"``) beside Rietveld phases.
    """

    name: str = Field(min_length=1)
    structure: str = "template"
    composition: dict[str, float] = {"Mn": 1.0}
    na: float = Field(default=1.0, ge=0, le=1.2)
    b_iso: dict[Literal["Na", "TM", "O"], float] = {}
    refine: list[str] | None = None
    sites: list[RefineAtomSpec] = []
    occupancy: list[OccupancySpec] = []
    profile: dict[Literal["U", "V", "W", "X", "Y"], float] = {}
    refine_profile: list[Literal["U", "V", "W", "X", "Y"]] = ["W", "Y"]
    formula_units: int | None = Field(default=None, ge=1, le=64)
    lebail: bool = False


class RefineModelSpec(Spec):
    """``[[refinement.models]]``: an alternative to compare (``xrdpipe refine --compare``): the
    phase ``phase`` with atoms added, occupancy constraints and refined parameters changed."""

    name: str = Field(min_length=1)
    phase: str
    sites: list[RefineAtomSpec] = []
    occupancy: list[OccupancySpec] = []
    refine: list[str] | None = None


class RefinementSpec(Spec):
    """``[refinement]``: whole-pattern refinement of every frame (Le Bail, Pawley or Rietveld).

    ``gof_jump``: a frame whose GOF, refined from the last good frame, exceeds this multiple of
    that frame's GOF is refined again from the start values (``[[phases]]``); when that does no
    better, it is recorded as failed (diverged) and the next frame starts from the last good one.
    ``strategy``: ``"staged"`` (from start values: background, then cells and zero, then widths,
    then everything) or ``"direct"``. ``search``: search each phase's cell (``[[phases]] search``
    ranges) where a start does not fit. A frame is ``ok`` only with GOF <= ``gof_max``, every
    cell inside its searched range and no refined parameter at a bound (else ``flagged`` or
    ``failed``, with the reason); after the run, frames whose Rwp exceeds ``rwp_outlier`` times
    the run's median are flagged. ``ranges``: several 2θ ranges instead of ``range``;
    ``excluded``: ``[[low, high], ...]`` left out.
    """

    method: Literal["lebail", "pawley", "rietveld"] = "lebail"
    range: tuple[float, float] | None = None
    frames: tuple[int, int] | None = None
    background_terms: int = Field(default=6, ge=1, le=24)
    correction: Literal["none", "zero", "displacement", "both"] = "zero"
    asymmetry: bool = True
    polarization: Literal["corrected", "unpolarised"] = "corrected"
    max_iter: int = Field(default=60, ge=2, le=1000)
    gof_jump: float = Field(default=3.0, gt=1)
    strategy: Literal["staged", "direct"] = "staged"
    search: bool = True
    gof_max: float = Field(default=5.0, gt=1)
    rwp_outlier: float = Field(default=2.5, gt=1)
    ranges: list[tuple[float, float]] = []
    excluded: list[tuple[float, float]] = []
    phases: list[RefinePhaseSpec] = Field(min_length=1)
    models: list[RefineModelSpec] = []

    @model_validator(mode="after")
    def _ranges(self) -> "RefinementSpec":
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range: expected [low, high], got {list(self.range)}")
        if self.range is not None and self.ranges:
            raise ValueError("give range (one) or ranges (several), not both")
        for key in ("ranges", "excluded"):
            for r in getattr(self, key):
                if not r[0] < r[1]:
                    raise ValueError(f"{key}: expected [[low, high], ...], got {list(r)}")
        if self.frames is not None and not 0 <= self.frames[0] <= self.frames[1]:
            raise ValueError(f"frames: expected [first, last], got {list(self.frames)}")
        return self
