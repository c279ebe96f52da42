"""Where the data come from: ``[run]``, ``[frames]`` or ``[patterns]`` (files, times),
``[calibration]`` and ``[integration]``.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from natsort import natsorted
from pydantic import (
    AwareDatetime,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import ExistingPath, RadialUnit, ResolvedPath, Spec, Timezone, resolve_path


class RunSpec(Spec):
    """``[run]``: the run's name and its output folder."""

    name: str = Field(min_length=1)
    output: ResolvedPath = Field(default=Path("results"), validate_default=True)
    #: seconds between publications of the run file during a long stage (what kill -9 can cost)
    checkpoint_s: float = Field(default=30.0, gt=0, le=3600)
    #: where per-frame work runs: "processes" (a local pool), "threads", "serial", or the address
    #: of a Dask distributed scheduler ("tcp://host:8786")
    scheduler: str = "processes"
    #: keep integrators (their sparse matrices) in the integrator cache, to reuse across runs
    cache: bool = True
    #: the integrator cache's folder (default: the user's cache folder, honouring XDG_CACHE_HOME)
    cache_dir: ResolvedPath | None = None

    @field_validator("name")
    @classmethod
    def _file_name(cls, v: str) -> str:
        # the run file is <output>/<name>.nxs and the figures <name>_<kind>: a file name, never a path
        if "/" in v or "\\" in v or "\0" in v or v in (".", "..") or v.startswith(".."):
            raise ValueError(f"a run name is a file name (the run file is <output>/<name>.nxs): expected no "
                             f"'/', '\\' or '..', got {v!r}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        from ..parallel import check_scheduler

        return check_scheduler(v)

    @property
    def run_file(self) -> Path:
        """The NeXus/HDF5 file that holds everything computed for this run."""
        return self.output / f"{self.name}.nxs"


class TimesFromLog(Spec):
    """``times = { log = "scans.csv" }``: one row per frame with absolute start and end times.

    The row is matched to the frame by file name, or by a scan number found in the file name.
    """

    log: ResolvedPath
    timezone: Timezone | None = None


class TimesPeriodic(Spec):
    """``times = { start = ..., period_s = ... }``: frame i starts at start + i * period_s.

    ``exposure_s`` (default: the period) sets how long each frame counts; the frame's time is
    the middle of its exposure.
    """

    start: AwareDatetime
    period_s: float = Field(gt=0)
    exposure_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exposure(self) -> "TimesPeriodic":
        if self.exposure_s is not None and self.exposure_s > self.period_s:
            raise ValueError(
                f"exposure_s ({self.exposure_s}) is longer than period_s ({self.period_s})"
            )
        return self


def _times_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "header"
    if isinstance(v, TimesFromLog):
        return "log"
    if isinstance(v, TimesPeriodic):
        return "periodic"
    if isinstance(v, dict):
        if "log" in v:
            return "log"
        if "start" in v or "period_s" in v:
            return "periodic"
    return None


TimesSpec = Annotated[
    Union[
        Annotated[Literal["header"], Tag("header")],
        Annotated[TimesFromLog, Tag("log")],
        Annotated[TimesPeriodic, Tag("periodic")],
    ],
    Discriminator(
        _times_kind,
        custom_error_type="times_kind",
        custom_error_message=(
            "expected \"header\", { log = \"scans.csv\" } or "
            "{ start = \"2025-07-02T19:05:59+08:00\", period_s = 20.0 }"
        ),
    ),
]
TAGS = {"header", "log", "periodic", "str", "poly"}


def _expand_files(v: Any, info: ValidationInfo) -> Any:
    """A glob (natural sort) or a list of paths/globs -> list of existing files."""
    if isinstance(v, (str, Path)):
        items = [str(v)]
    elif isinstance(v, (list, tuple)) and v and all(isinstance(i, (str, Path)) for i in v):
        items = [str(i) for i in v]
    else:
        raise ValueError("expected a glob such as \"raw/*.h5\" or a non-empty list of paths")
    files: list[Path] = []
    origin: list[str] = []
    live = bool((info.context or {}).get("live"))      # `xrdpipe watch`: files may not exist yet
    for item in items:
        p = resolve_path(item, info)
        if glob.has_magic(str(p)):
            hits = natsorted(glob.glob(str(p)))
            if not hits and not live:
                raise ValueError(f"the glob {str(p)!r} matches no file")
            files.extend(Path(h) for h in hits)
            origin.extend(item for _ in hits)
        else:
            if not p.exists():
                if live:
                    continue
                raise ValueError(f"no such file: {str(p)!r}")
            files.append(p)
            origin.append(item)
    _check_unique(files, origin)
    return files


def _check_unique(files: list[Path], origin: list[str]) -> None:
    """Every file once, and no two with the same name: a frame is known in the run file by its
    file's name and index, so a file listed twice, or a namesake in another folder, would be
    taken for the first one (half a run, silently)."""
    seen: dict[Path, str] = {}
    names: dict[str, Path] = {}
    for f, item in zip(files, origin):
        real = Path(f).resolve()
        if real in seen:
            how = f" (by {seen[real]!r} and by {item!r})" if seen[real] != item else ""
            raise ValueError(f"{str(f)!r} is listed twice{how}; list every file once")
        seen[real] = item
        other = names.get(f.name)
        if other is not None:
            raise ValueError(f"two files are named {f.name!r}: {str(other)!r} and {str(f)!r}; frames are known by "
                             "file name and index in the run file, so give every file its own name (a link will do)")
        names[f.name] = f


class FramesSpec(Spec):
    """``[frames]``: 2D detector frames (HDF5/NeXus stacks, CBF, EDF, TIFF)."""

    files: list[Path]
    dataset: str | None = None
    times: TimesSpec | None = None
    timezone: Timezone | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: Any, info: ValidationInfo) -> Any:
        return _expand_files(v, info)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"expected an absolute HDF5 path such as '/entry/data/data', got {v!r}")
        return v


class PatternsSpec(Spec):
    """``[patterns]``: 1D patterns (.xy .xye .dat .chi, GSAS .fxye) instead of frames."""

    files: list[Path]
    radial_unit: RadialUnit = "2th_deg"
    wavelength_A: float | None = Field(default=None, gt=0, lt=10)
    times: Annotated[
        Union[Annotated[TimesFromLog, Tag("log")], Annotated[TimesPeriodic, Tag("periodic")]],
        Discriminator(
            _times_kind,
            custom_error_type="times_kind",
            custom_error_message=(
                "expected { log = \"scans.csv\" } or "
                "{ start = \"2025-07-02T19:05:59+08:00\", period_s = 20.0 }"
            ),
        ),
    ] | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: Any, info: ValidationInfo) -> Any:
        return _expand_files(v, info)

    @model_validator(mode="after")
    def _wavelength(self) -> "PatternsSpec":
        if self.radial_unit == "2th_deg" and self.wavelength_A is None:
            raise ValueError(
                "wavelength_A is required for patterns in 2th_deg (to give Q and d); "
                "add e.g. wavelength_A = 0.6209"
            )
        return self


class CalibrationSpec(Spec):
    """``[calibration]``: the PONI geometry and optional mask, dark and flat images."""

    poni: ExistingPath
    mask: ExistingPath | None = None
    dark: ExistingPath | None = None
    flat: ExistingPath | None = None


class IntegrationSpec(Spec):
    """``[integration]``: how frames become 1D patterns."""

    npt: int = Field(default=3000, ge=10, le=100_000)
    unit: RadialUnit = "2th_deg"
    range: tuple[float, float] | None = None
    azimuth_range: tuple[float, float] | None = None
    polarization_factor: float | None = Field(default=0.99, ge=-1, le=1)
    solid_angle: bool = True
    error_model: Literal["poisson", "none"] = "poisson"
    splitting: Literal["no", "bbox", "full"] = "full"
    workers: int | None = Field(default=None, ge=1, le=64)
    engine: Literal["xrdpipe", "pyfai"] = "xrdpipe"

    @field_validator("range", "azimuth_range")
    @classmethod
    def _increasing(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v
