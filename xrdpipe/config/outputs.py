"""The ``[plots]`` and ``[export]`` sections of the experiment file: which figures and exports a
run writes, and how they look.

Sizes are in millimetres, as journals give them: one column is about 85 mm wide, two columns
about 180 mm. A PNG is written at ``dpi``, so its pixel size is ``width_mm / 25.4 * dpi``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Spec, did_you_mean

PLOT_KINDS = ("contour", "lattice", "fractions", "fit", "waterfall", "refinement")
EXPORT_FORMATS = ("xye", "fxye", "topas")
Axis = Literal["tth", "q", "d"]


class _Figure(Spec):
    width_mm: float = Field(default=85.0, ge=20, le=500)
    height_mm: float = Field(default=70.0, ge=20, le=500)


class ContourSpec(_Figure):
    """Contour maps of windows side by side, with the voltage curve in a panel sharing the
    vertical axis."""

    windows: list[str | tuple[float, float]] = []   # [[windows]] names or [low, high] in the run's unit
    axis: Axis = "tth"
    vertical: Literal["time", "x", "frame"] = "time"
    frame_range: tuple[int, int] | None = None    # first and last frame shown (e.g. one half-cycle for x)
    scale: Literal["linear", "sqrt", "log"] = "sqrt"
    centres: bool = True
    voltage: bool = True
    cmap: str = "viridis"
    width_mm: float = Field(default=180.0, ge=20, le=500)
    height_mm: float = Field(default=90.0, ge=20, le=500)

    @field_validator("cmap")
    @classmethod
    def _known_cmap(cls, v: str) -> str:
        if v == "viridis":
            return v
        from matplotlib import colormaps  # only when another map is asked for

        if v not in colormaps:
            raise ValueError(f"unknown matplotlib colour map {v!r}" + did_you_mean(v, colormaps)
                             + " (e.g. viridis, cividis, magma, inferno, gray)")
        return v

    @field_validator("frame_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError(f"expected [first, last] frame numbers, got {list(v)}")
        return v


class LatticePlotSpec(_Figure):
    """a, c and V against x (or capacity, or time) with esd bars, charge and discharge apart."""

    against: Literal["x", "capacity", "time"] = "x"
    height_mm: float = Field(default=110.0, ge=20, le=500)


class FractionsPlotSpec(_Figure):
    """Phase fractions against x (or capacity, or time)."""

    against: Literal["x", "capacity", "time"] = "x"
    height_mm: float = Field(default=60.0, ge=20, le=500)


class FitCheckSpec(_Figure):
    """Data, fit, components and residual of chosen frames in every window (or the chosen ones)."""

    frames: list[int] = []       # default: the first frame, the frame with the most phases, the last
    windows: list[str] = []
    width_mm: float = Field(default=180.0, ge=20, le=500)
    height_mm: float = Field(default=110.0, ge=20, le=500)

    @field_validator("frames")
    @classmethod
    def _few(cls, v: list[int]) -> list[int]:
        if len(v) > 8:
            raise ValueError(f"at most 8 frames fit on one figure, got {len(v)}")
        if any(f < 0 for f in v):
            raise ValueError("frame numbers start at 0")
        return v


class WaterfallSpec(_Figure):
    """Chosen frames stacked with an offset, coloured by time."""

    frames: list[int] = []       # default: up to `count` frames evenly spread over the run
    count: int = Field(default=15, ge=2, le=200)
    range: tuple[float, float] | None = None   # in the run's radial unit; default: the whole pattern
    axis: Axis = "tth"
    offset: float | None = Field(default=None, ge=0)   # default: a tenth of the largest intensity
    height_mm: float = Field(default=110.0, ge=20, le=500)

    @model_validator(mode="after")
    def _range(self) -> "WaterfallSpec":
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range: expected [low, high], got {list(self.range)}")
        return self


class PlotsSpec(Spec):
    """``[plots]``: the figures ``xrdpipe run`` draws (and the defaults of ``xrdpipe plot``)."""

    kinds: list[Literal["contour", "lattice", "fractions", "fit", "waterfall", "refinement"]] | None = None
    formats: list[Literal["png", "pdf", "svg"]] = ["png", "pdf"]
    dpi: int = Field(default=300, ge=50, le=1200)
    folder: str = "figures"
    font_size: float = Field(default=7.0, ge=4, le=16)
    contour: ContourSpec = ContourSpec()
    lattice: LatticePlotSpec = LatticePlotSpec()
    fractions: FractionsPlotSpec = FractionsPlotSpec()
    fit: FitCheckSpec = FitCheckSpec()
    waterfall: WaterfallSpec = WaterfallSpec()

    @field_validator("formats")
    @classmethod
    def _png_first(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one format: png, pdf or svg")
        return list(dict.fromkeys(v))


class ExportSpec(Spec):
    """``[export]``: every integrated pattern in formats other programs read."""

    formats: list[Literal["xye", "fxye", "topas"]] = ["xye", "fxye", "topas"]
    frames: list[int] | None = None   # default: every integrated frame
    folder: str = "export"

    @field_validator("frames")
    @classmethod
    def _non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(f < 0 for f in v):
            raise ValueError("frame numbers start at 0")
        return v
