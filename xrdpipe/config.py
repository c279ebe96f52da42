"""The experiment file: TOML in, frozen validated specs out.

``load_experiment(path)`` reads a TOML file with ``schema_version = 1`` and returns an
:class:`Experiment`. Every problem is reported at once in a :class:`~xrdpipe.errors.ConfigError`
naming the file and the key path, saying what was expected and, for a mistyped key, the closest
valid one. Relative paths resolve against the folder of the experiment file.

Each stage receives only its own section (``exp.frames``, ``exp.integration``...), never the
whole experiment.

Example
-------
>>> exp = load_experiment("experiment.toml")          # doctest: +SKIP
>>> exp.integration.npt
3000
"""

from __future__ import annotations

import difflib
import glob
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from natsort import natsorted
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .plotspec import ExportSpec, PlotsSpec, strict_numbers

__all__ = [
    "SCHEMA_VERSION",
    "Experiment",
    "RunSpec",
    "FramesSpec",
    "PatternsSpec",
    "CalibrationSpec",
    "IntegrationSpec",
    "TimesFromLog",
    "TimesPeriodic",
    "PhaseSpec",
    "WindowSpec",
    "FitSpec",
    "LatticeSpec",
    "ElectrochemistrySpec",
    "PlotsSpec",
    "ExportSpec",
    "load_experiment",
    "parse_experiment",
    "RADIAL_UNITS",
]

SCHEMA_VERSION = 1
RADIAL_UNITS = ("2th_deg", "q_A^-1")
RadialUnit = Literal["2th_deg", "q_A^-1"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # numbers are numbers: npt = "2000" is an error (pydantic's strict mode for numbers)
        return strict_numbers(cls, value, info)


def _resolve(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the experiment file's folder (from the context)."""
    if value is None:
        return None
    base = (info.context or {}).get("base", Path.cwd())
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (Path(base) / p)


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {value!r}; expected an IANA name such as 'Europe/London' or 'UTC'"
        ) from None
    return value


def _existing(value: Any, info: ValidationInfo) -> Any:
    p = _resolve(value, info)
    if p is not None and not Path(p).exists():
        raise ValueError(f"no such file: {str(p)!r}")
    return p


#: a path resolved against the experiment file's folder
ResolvedPath = Annotated[Path, BeforeValidator(_resolve)]
#: the same, which must exist
ExistingPath = Annotated[Path, BeforeValidator(_existing)]
#: an IANA timezone name
Timezone = Annotated[str, AfterValidator(_check_timezone)]


class RunSpec(_Spec):
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
        from .parallel import check_scheduler

        return check_scheduler(v)

    @property
    def run_file(self) -> Path:
        """The NeXus/HDF5 file that holds everything computed for this run."""
        return self.output / f"{self.name}.nxs"


class TimesFromLog(_Spec):
    """``times = { log = "scans.csv" }``: one row per frame with absolute start and end times.

    The row is matched to the frame by file name, or by a scan number found in the file name.
    """

    log: ResolvedPath
    timezone: Timezone | None = None


class TimesPeriodic(_Spec):
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
_TAGS = {"header", "log", "periodic", "str", "poly"}


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
        p = _resolve(item, info)
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


class FramesSpec(_Spec):
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


class PatternsSpec(_Spec):
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


class CalibrationSpec(_Spec):
    """``[calibration]``: the PONI geometry and optional mask, dark and flat images."""

    poni: ExistingPath
    mask: ExistingPath | None = None
    dark: ExistingPath | None = None
    flat: ExistingPath | None = None


class IntegrationSpec(_Spec):
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


class PhaseSpec(_Spec):
    """``[[phases]]``: a phase to follow, with its cell (Å, degrees) as the starting point.

    A name from the library (P2, P''2, O3, P3, O2, OP4, P'2, O'3, Al) fills every key not
    given: ``name = "O3"`` alone is a whole phase. Any space group gemmi knows is accepted; give
    the cell parameters its crystal system has: ``a`` (cubic), ``a`` and ``c`` (tetragonal,
    hexagonal and trigonal in hexagonal axes), ``a``, ``b``, ``c`` (orthorhombic), also ``beta``
    (monoclinic, unique axis b), all six (triclinic). ``z_o`` (oxygen z) enables the layer
    geometry of O3/P3/P2. ``kind`` names the structure type of a phase with another name
    (``kind = "P2"``). ``search`` is how far (relative, ±) the phase-model fit looks for the
    phase's cell around the configured one before calling it absent: ``{ a = 0.015, c = 0.03 }``
    by default (b as a, angles ±2°; the library's Al: ``{ a = 0.003 }``). ``fraction = false``
    keeps a phase out of the phase fractions (the library's Al current collector, an internal
    standard).
    """

    name: str = Field(min_length=1)
    space_group: str
    a: float = Field(gt=0, lt=100)
    c: float | None = Field(default=None, gt=0, lt=200)
    b: float | None = Field(default=None, gt=0, lt=100)
    beta: float | None = Field(default=None, gt=60, lt=150)
    alpha: float | None = Field(default=None, gt=30, lt=150)
    gamma: float | None = Field(default=None, gt=30, lt=150)
    z_o: float | None = Field(default=None, gt=-1, lt=1)
    kind: str | None = None
    fraction: bool = True
    search: dict[Literal["a", "b", "c", "alpha", "beta", "gamma"], Annotated[float, Field(ge=0, le=0.2)]] = {}

    @model_validator(mode="before")
    @classmethod
    def _library(cls, data: Any) -> Any:
        from .phases import LIBRARY

        if isinstance(data, dict):
            lib = LIBRARY.get(str(data.get("kind") or data.get("name", "")))
            if lib is not None:
                defaults = {"space_group": lib.space_group, "a": lib.a, "c": lib.c, "b": lib.b, "beta": lib.beta,
                            "z_o": lib.z_o, "fraction": lib.fraction, "search": dict(lib.search) or None}
                data = {**{k: v for k, v in defaults.items() if v is not None}, **data}
        return data

    @field_validator("space_group")
    @classmethod
    def _sg(cls, v: str) -> str:
        from .crystallography import SPACE_GROUPS, crystal_system

        try:
            crystal_system(v)
        except ValueError:
            close = difflib.get_close_matches(v, list(SPACE_GROUPS) + ["Fm-3m", "Fd-3m", "Pnma", "Pm-3m", "P-3m1"],
                                              n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown space group {v!r}{hint} (a Hermann-Mauguin symbol gemmi knows, such as "
                             f"'R-3m', 'P63/mmc', 'Fm-3m', 'Pnma' or 'C2/m')") from None
        return v

    @model_validator(mode="after")
    def _cell(self) -> "PhaseSpec":
        from .crystallography import CELL_PARAMETERS, crystal_system

        system = crystal_system(self.space_group)
        units = {"a": "Å", "b": "Å", "c": "Å", "alpha": "degrees", "beta": "degrees", "gamma": "degrees"}
        missing = [f"{k} ({units[k]})" for k in CELL_PARAMETERS[system] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{self.space_group} is {system}: give {', '.join(missing)}")
        return self

    @property
    def structure_kind(self) -> str:
        """The structure type for the layer geometry (``kind``, else the name)."""
        return self.kind or self.name

    @property
    def crystal_system(self) -> str:
        from .crystallography import crystal_system

        return crystal_system(self.space_group)

    @property
    def cell_parameters(self) -> tuple[str, ...]:
        """The cell parameters this phase's crystal system leaves free, e.g. ``("a", "c")``."""
        from .crystallography import CELL_PARAMETERS

        return CELL_PARAMETERS[self.crystal_system]

    @property
    def cell(self) -> tuple[float, float, float, float, float, float]:
        """All six cell parameters (a, b, c, α, β, γ) implied by the given ones."""
        from .crystallography import full_cell

        return full_cell(self.space_group, self.a, self.c, self.b, self.beta, self.alpha, self.gamma)

    def d_spacing(self, h, k, l):
        from .crystallography import d_spacing

        return d_spacing(self.space_group, h, k, l, self.a, self.c, self.b, self.beta, self.alpha, self.gamma)


PROFILE_NAMES = ("pseudo_voigt", "pearson7", "split_pseudo_voigt")


class PolynomialBackground(_Spec):
    """``background = { polynomial = 2 }``."""

    polynomial: int = Field(ge=0, le=4)


class WindowSpec(_Spec):
    """``[[windows]]``: a radial range fitted with one peak per listed ``"phase hkl"``.

    ``range`` and every width or shift are in the run's radial unit (2θ degrees or 1/Å).
    """

    name: str = Field(min_length=1)
    range: tuple[float, float]
    peaks: list[str] = Field(min_length=1, max_length=8)
    profile: Literal["pseudo_voigt", "pearson7", "split_pseudo_voigt"] = "pseudo_voigt"
    background: Annotated[
        Union[Annotated[Literal["constant", "linear", "quadratic"], Tag("str")],
              Annotated[PolynomialBackground, Tag("poly")]],
        Discriminator(
            lambda v: "str" if isinstance(v, str) else ("poly" if isinstance(v, (dict, PolynomialBackground)) else None),
            custom_error_type="background_kind",
            custom_error_message='expected "constant", "linear", "quadratic" or { polynomial = 0 to 4 }',
        ),
    ] = "linear"
    seed: Literal["previous", "config"] = "previous"
    share: list[Literal["fwhm", "shape"]] = []
    fwhm: float | None = Field(default=None, gt=0)
    fwhm_range: tuple[float, float] | None = None
    max_shift: float | None = Field(default=None, gt=0)
    center_bounds: dict[str, tuple[float, float]] = {}
    presence: Literal["bic", "ftest", "always"] | None = None

    @field_validator("range", "fwhm_range")
    @classmethod
    def _increasing(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v

    @field_validator("peaks")
    @classmethod
    def _peaks(cls, v: list[str]) -> list[str]:
        from .crystallography import parse_hkl

        out = []
        for item in v:
            phase, _, hkl = item.strip().partition(" ")
            if not hkl.strip():
                raise ValueError(f'expected "phase hkl" such as "O3 003", got {item!r}')
            try:
                h, k, l = parse_hkl(hkl)
            except ValueError as exc:
                raise ValueError(f"{item!r}: {exc}") from None
            out.append(f"{phase} {hkl.strip()}")
        if len(set(out)) != len(out):
            raise ValueError(f"a peak is listed twice in {v}")
        return out

    @property
    def background_degree(self) -> int:
        if isinstance(self.background, PolynomialBackground):
            return self.background.polynomial
        return {"constant": 0, "linear": 1, "quadratic": 2}[self.background]

    def split_peak(self, label: str) -> tuple[str, tuple[int, int, int]]:
        """``"O3 003"`` -> ``("O3", (0, 0, 3))``."""
        from .crystallography import parse_hkl

        phase, _, hkl = label.partition(" ")
        return phase, parse_hkl(hkl)


class FitSpec(_Spec):
    """``[fit]``: how every window is fitted in every frame.

    ``model = "phases"`` (default) fits every window of a frame at once with each peak's centre
    computed from its phase's cell (:mod:`xrdpipe.phasefit`: every allowed reflection of every
    phase in the windows, phases found by a search over their cell, cells with esds straight
    from the fit); ``"peaks"`` fits each listed peak as an independent profile, window by window
    (:mod:`xrdpipe.peaks`), and the lattice stage refines the cells from the fitted centres.
    For the independent peaks, ``engine = "batched"`` fits a block of frames at once (vectorised
    Levenberg-Marquardt with analytic derivatives); ``"lmfit"`` fits frame by frame with lmfit,
    the reference.
    ``presence`` decides whether each component is there: ``"bic"`` keeps it when removing it
    raises the Bayesian information criterion by more than ``bic_threshold``; ``"ftest"`` when
    the F-test rejects its absence at ``ftest_alpha``; ``"always"`` never removes one. Beside
    other components, one with less than ``min_fraction`` of the window's peak area is absent
    (in the phase model: of the area of the windows its lines reach, except for a phase with
    ``fraction = false``, the current collector, whose presence the BIC alone decides),
    and so is any whose centre ends on the edge of its allowed range. ``esd_scale = "auto"``
    scales the esds by the reduced chi-square only when the data carry no errors (the phase
    model: also when it exceeds 1, a misfit the model cannot remove); ``"redchi"`` always does
    (as lmfit does by default), for data whose errors understate the misfit. The phase model
    uses ``presence`` "bic" (the F-test and "always" apply to independent peaks only).
    ``backward = true`` (default; the phase model) goes back over the frames before each frame
    where a phase that appeared holds ``backward_share`` of the area, following the phases from
    there, and keeps in every frame the solution with the lower BIC.
    """

    model: Literal["phases", "peaks"] = "phases"
    engine: Literal["batched", "lmfit"] = "batched"
    presence: Literal["bic", "ftest", "always"] = "bic"
    bic_threshold: float = Field(default=10.0, ge=0)
    ftest_alpha: float = Field(default=1e-3, gt=0, lt=1)
    min_fraction: float = Field(default=0.01, ge=0, lt=1)
    esd_scale: Literal["auto", "redchi"] = "auto"
    block_frames: int = Field(default=256, ge=1, le=100_000)
    workers: int | None = Field(default=None, ge=1, le=64)
    max_iter: int = Field(default=200, ge=5, le=10_000)
    backward: bool = True
    backward_share: float = Field(default=0.3, gt=0, le=1)


class LatticeSpec(_Spec):
    """``[lattice]``: how cells and phase fractions come from the fitted peaks.

    ``correction`` adds a 2θ zero shift (``"zero"``) or a sample-displacement term
    (``"displacement"``, ∝ cos θ) shared by the phases of a frame. Peak-area fractions come from
    the areas of corresponding peaks of coexisting phases, or, with ``fraction_window``, from that
    window's area of each phase against the whole window in ``reference_frame``. ``fractions``
    says which fraction the ``fraction`` column holds: ``"auto"`` (default) the Rietveld weight
    fractions of ``xrdpipe refine`` in the frames it refined, peak areas elsewhere;
    ``"refinement"`` weight fractions only; ``"peaks"`` peak areas only.
    """

    correction: Literal["none", "zero", "displacement"] = "none"
    fractions: Literal["auto", "refinement", "peaks"] = "auto"
    fraction_window: str | None = None
    reference_frame: int = Field(default=0, ge=0)


_UNIT_NAMES = {"time": ("s", "ms", "min", "h", "d"), "voltage": ("V", "mV"), "current": ("A", "mA", "uA", "µA", "nA")}


class ElectrochemistrySpec(_Spec):
    """``[electrochemistry]``: the cycler file of the cell and what is needed for x.

    ``format`` is ``auto`` (from the extension and content) or one of ``csv`` (any CSV/TSV/Excel
    table; name its ``columns``), ``biologic``, ``neware``, ``arbin``, ``land``. ``start`` is
    when the file's time 0 was, for files with relative times only (it also overrides a file's
    own clock); ``timezone`` places local times stored without UTC offset (default: the
    timezone of the frame times). ``x`` is ``x0 - Q M / (F m)`` with ``Q`` the net charge
    passed since the record began; ``inventory_loss_mAh_g`` (or ``inventory_loss_from``:
    earlier cycler files of the same cell) shifts it by the loss of alkali inventory of earlier
    cycles. ``capacity_source = "cycler"`` takes the charge from the cycler's own counter instead
    of integrating the recorded current (for records too sparse for a pulsed current).
    """

    file: ResolvedPath
    format: Literal["auto", "csv", "biologic", "neware", "arbin", "land"] = "auto"
    columns: dict[Literal["time", "voltage", "current", "datetime"], str] = {}
    units: dict[Literal["time", "voltage", "current"], str] = {}
    sheet: str | None = None
    start: datetime | None = None
    timezone: Timezone | None = None
    active_mass_mg: float | None = Field(default=None, gt=0)
    formula: str | None = None
    x0: float | None = Field(default=None, ge=0)
    ion: Literal["Na", "Li", "K", "Mg", "Zn"] | None = None
    charge_current: Literal["positive", "negative"] = "positive"
    rest_current_mA: float | None = Field(default=None, ge=0)
    capacity_source: Literal["current", "cycler"] = "current"
    inventory_loss_mAh_g: float | None = None
    inventory_loss_from: list[Path] = []

    @field_validator("file")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError(f"no such cycler file: {v}")
        return v

    @field_validator("inventory_loss_from", mode="before")
    @classmethod
    def _history(cls, v: Any, info: ValidationInfo) -> Any:
        v = [v] if isinstance(v, str) else v
        out = [_resolve(p, info) for p in v]
        missing = [str(p) for p in out if not Path(p).exists()]
        if missing:
            raise ValueError(f"no such cycler file(s): {', '.join(missing)}")
        return out

    @field_validator("units")
    @classmethod
    def _units(cls, v: dict[str, str]) -> dict[str, str]:
        for kind, unit in v.items():
            if unit.replace("μ", "µ") not in _UNIT_NAMES[kind] and unit.lower() not in {
                    u.lower() for u in _UNIT_NAMES[kind]}:
                raise ValueError(f"unknown {kind} unit {unit!r}; expected one of {', '.join(_UNIT_NAMES[kind])}")
        return v

    @field_validator("formula")
    @classmethod
    def _formula(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from .composition import parse_formula

        parse_formula(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ElectrochemistrySpec":
        if self.start is not None and self.start.tzinfo is None and self.timezone is None:
            raise ValueError("start has no UTC offset: write it as 2025-07-02T19:00:00+08:00 or set timezone")
        if self.inventory_loss_mAh_g is not None and self.inventory_loss_from:
            raise ValueError("give inventory_loss_mAh_g or inventory_loss_from, not both")
        if self.inventory_loss_from and self.active_mass_mg is None:
            raise ValueError("inventory_loss_from needs active_mass_mg")
        if self.formula is not None and self.ion is None:
            from .composition import carrier_ion

            carrier_ion(self.formula)
        return self


class RefineAtomSpec(_Spec):
    """An atom added to a refined structure (``sites`` of a phase or a model)."""

    label: str = Field(min_length=1)
    element: str = Field(min_length=1, max_length=2)
    xyz: tuple[float, float, float]
    occupancy: float = Field(default=1.0, ge=0, le=1)
    b_iso: float = Field(default=0.5, ge=-1, le=20)


class OccupancySpec(_Spec):
    """Occupancies of ``atoms`` (labels) that keep their number per cell (or ``total`` per
    formula unit): the first ones are refined, the last takes what is left."""

    atoms: list[str] = Field(min_length=2)
    total: float | None = Field(default=None, ge=0)


class RefinePhaseSpec(_Spec):
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


class RefineModelSpec(_Spec):
    """``[[refinement.models]]``: an alternative to compare (``xrdpipe refine --compare``): the
    phase ``phase`` with atoms added, occupancy constraints and refined parameters changed."""

    name: str = Field(min_length=1)
    phase: str
    sites: list[RefineAtomSpec] = []
    occupancy: list[OccupancySpec] = []
    refine: list[str] | None = None


class RefinementSpec(_Spec):
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


class Experiment(_Spec):
    """A whole validated experiment. ``source`` is the file it came from, ``text`` its content."""

    schema_version: Literal[1]
    run: RunSpec
    frames: FramesSpec | None = None
    patterns: PatternsSpec | None = None
    calibration: CalibrationSpec | None = None
    integration: IntegrationSpec = IntegrationSpec()
    phases: list[PhaseSpec] = []
    windows: list[WindowSpec] = []
    fit: FitSpec = FitSpec()
    lattice: LatticeSpec = LatticeSpec()
    electrochemistry: ElectrochemistrySpec | None = None
    plots: PlotsSpec = PlotsSpec()
    export: ExportSpec = ExportSpec()
    refinement: RefinementSpec | None = None
    source: Path | None = Field(default=None, exclude=True)
    text: str = Field(default="", exclude=True, repr=False)

    @model_validator(mode="after")
    def _inputs(self) -> "Experiment":
        if self.frames is None and self.patterns is None:
            raise ValueError("expected a [frames] section (2D input) or a [patterns] section (1D input)")
        if self.frames is not None and self.patterns is not None:
            raise ValueError("[frames] and [patterns] are exclusive: give 2D frames or 1D patterns")
        if self.frames is not None and self.calibration is None:
            raise ValueError("[frames] needs a [calibration] section with at least poni = \"...\"")
        return self

    @property
    def radial_unit(self) -> str:
        """The radial unit of the run's patterns (and of every window range)."""
        return self.patterns.radial_unit if self.patterns is not None else self.integration.unit


def _cross_check(exp: Experiment) -> list[tuple[str, str]]:
    """Problems that span sections: windows must name known phases and allowed reflections."""
    from .crystallography import is_allowed

    problems: list[tuple[str, str]] = []
    phases: dict[str, PhaseSpec] = {}
    for i, ph in enumerate(exp.phases):
        if ph.name in phases:
            problems.append((f"phases.{i}.name", f"phase {ph.name!r} is defined twice"))
        phases[ph.name] = ph
    seen: set[str] = set()
    top = 180.0 if exp.radial_unit == "2th_deg" else 40.0
    for i, w in enumerate(exp.windows):
        if w.name in seen:
            problems.append((f"windows.{i}.name", f"window {w.name!r} is defined twice"))
        seen.add(w.name)
        if w.range[0] < 0 or w.range[1] > top:
            problems.append((f"windows.{i}.range", f"{list(w.range)} is not a range of {exp.radial_unit}"))
        for label in w.peaks:
            name, (h, k, l) = w.split_peak(label)
            if name not in phases:
                close = difflib.get_close_matches(name, list(phases), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(phases) or "none: add a [[phases]] table"
                problems.append((f"windows.{i}.peaks",
                                 f"window {w.name!r} names phase {name!r}, which is not in [[phases]]{hint} "
                                 f"(phases: {known})"))
            elif not is_allowed(phases[name].space_group, h, k, l):
                problems.append((f"windows.{i}.peaks",
                                 f"window {w.name!r}: ({h} {k} {l}) is not allowed in {phases[name].space_group} "
                                 f"(phase {name})"))
        for label, (lo, hi) in w.center_bounds.items():
            if label not in w.peaks:
                problems.append((f"windows.{i}.center_bounds",
                                 f"{label!r} is not one of the window's peaks {w.peaks}"))
            elif not lo < hi:
                problems.append((f"windows.{i}.center_bounds", f"{label!r}: expected [low, high], got {[lo, hi]}"))
    if exp.refinement is not None:
        problems += _refinement_problems(exp, phases)
    fw = exp.lattice.fraction_window
    if fw is not None and fw not in seen:
        problems.append(("lattice.fraction_window", f"{fw!r} is not one of the windows {sorted(seen)}"))
    for key, names in (("plots.contour.windows", exp.plots.contour.windows), ("plots.fit.windows", exp.plots.fit.windows)):
        for i, w in enumerate(names):
            if isinstance(w, str) and w not in seen:
                close = difflib.get_close_matches(w, sorted(seen), n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                also = " (or give a range [low, high] in the run's unit)" if "contour" in key else ""
                problems.append((f"{key}.{i}", f"{w!r} is not one of the windows {sorted(seen)}{hint}{also}"))
            elif not isinstance(w, str) and not w[0] < w[1]:
                problems.append((f"{key}.{i}", f"expected [low, high], got {list(w)}"))
    return problems


def _refinement_problems(exp: Experiment, phases: dict[str, PhaseSpec]) -> list[tuple[str, str]]:
    from .refine.structures import TEMPLATES

    ref = exp.refinement
    problems: list[tuple[str, str]] = []
    names = [p.name for p in ref.phases]
    for i, rp in enumerate(ref.phases):
        if rp.name not in phases:
            close = difflib.get_close_matches(rp.name, list(phases), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((f"refinement.phases.{i}.name", f"{rp.name!r} is not in [[phases]]{hint} "
                             f"(phases: {', '.join(phases) or 'none'})"))
            continue
        kind = phases[rp.name].structure_kind
        if ref.method == "rietveld" and rp.structure == "template" and kind not in TEMPLATES and not rp.lebail:
            problems.append((f"refinement.phases.{i}.structure",
                             f"no built-in structure for {kind!r} (templates: {', '.join(TEMPLATES)}); "
                             "give a CIF file: structure = \"file.cif\""))
        if rp.structure != "template":
            path = Path(rp.structure)
            if not path.is_absolute() and exp.source is not None:
                path = exp.source.parent / path
            if not path.exists():
                problems.append((f"refinement.phases.{i}.structure", f"no such CIF file: {path}"))
    for i, m in enumerate(ref.models):
        if m.phase not in names:
            problems.append((f"refinement.models.{i}.phase",
                             f"{m.phase!r} is not one of the [[refinement.phases]] ({', '.join(names)})"))
    if exp.radial_unit != "2th_deg" and ref.range is not None and ref.range[1] > 40:
        problems.append(("refinement.range", f"{list(ref.range)} is not a range of {exp.radial_unit}"))
    return problems


# --------------------------------------------------------------------------------------------
# loading and error reporting

_SECTION_HINTS: dict[str, str] = {}      # sections of later versions: name -> what they are


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The valid keys of the table at ``loc`` (used for 'did you mean')."""
    current: Any = model
    for part in loc:
        if part in _TAGS or isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [k for k, f in current.model_fields.items() if not f.exclude]
    return None


def _model_in(annotation: Any) -> Any:
    """The first BaseModel inside an annotation such as ``X | None`` or a tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        return _model_in(origin)
    return None


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    loc = tuple(p for p in err["loc"] if p not in _TAGS)
    key = ".".join(str(p) for p in loc)
    etype = err["type"]
    if etype == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        valid = _fields_at(Experiment, loc[:-1]) or []
        if len(loc) == 1 and name in _SECTION_HINTS:
            return key, (
                f"the [{name}] section ({_SECTION_HINTS[name]}) is not supported by this version "
                "of xrdpipe yet"
            )
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f"[{'.'.join(str(p) for p in loc[:-1])}]" if len(loc) > 1 else "the top level"
        return key, f"unknown key{hint} (valid keys in {where}: {', '.join(valid)})"
    if etype == "missing":
        return key, "required key is missing"
    if etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return key, f"expected {expected}, got {err.get('input')!r}"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if etype not in ("value_error", "times_kind", "background_kind") and "input" in err and not isinstance(
        err["input"], (dict, list)
    ):
        msg = f"{msg[0].lower()}{msg[1:]}, got {err['input']!r}"
    return key, msg


def parse_experiment(data: dict[str, Any], *, base: Path | str = ".", source: str = "<experiment>", live: bool = False,
                     text: str = "") -> Experiment:
    """Validate an already-parsed experiment mapping; relative paths resolve against ``base``."""
    if "schema_version" not in data:
        raise ConfigError(source, [("schema_version", f"required key is missing; add schema_version = {SCHEMA_VERSION}")])
    if data["schema_version"] != SCHEMA_VERSION:
        raise ConfigError(source, [(
            "schema_version",
            f"this xrdpipe reads schema_version = {SCHEMA_VERSION}, the file says {data['schema_version']!r}",
        )])
    try:
        exp = Experiment.model_validate(data, context={"base": Path(base), "live": live})
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None
    exp = exp.model_copy(update={"source": Path(source) if source != "<experiment>" else None, "text": text})
    problems = _cross_check(exp)       # with the source known: relative CIF paths are the file's
    if problems:
        raise ConfigError(source, problems)
    return exp


def load_experiment(path: str | Path, *, live: bool = False) -> Experiment:
    """Read and validate an experiment file. With ``live`` (``xrdpipe watch``), frame files
    that do not exist yet are not an error: they are waited for.

    Raises
    ------
    ConfigError
        With every problem found, each naming its key path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [("", "no such experiment file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("", f"cannot read the file: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("", f"not valid TOML: {exc}")]) from None
    return parse_experiment(data, base=path.resolve().parent, source=str(path), text=text, live=live)


def experiment_summary(exp: Experiment) -> str:
    """A human-readable, resolved view of an experiment (what ``xrdpipe validate`` prints)."""
    lines = [f"experiment {exp.source or ''} (schema_version {exp.schema_version})"]
    lines.append(f"[run] name = {exp.run.name!r}; run file = {exp.run.run_file}")
    if exp.frames is not None:
        f = exp.frames
        lines.append(f"[frames] {len(f.files)} file(s): {f.files[0]}" + (" ..." if len(f.files) > 1 else ""))
        if f.dataset:
            lines.append(f"  dataset = {f.dataset}")
        lines.append(f"  times = {_times_text(f.times)}")
    if exp.patterns is not None:
        p = exp.patterns
        lines.append(f"[patterns] {len(p.files)} file(s): {p.files[0]}" + (" ..." if len(p.files) > 1 else ""))
        lines.append(f"  radial_unit = {p.radial_unit}, wavelength_A = {p.wavelength_A}")
        lines.append(f"  times = {_times_text(p.times)}")
    if exp.calibration is not None:
        c = exp.calibration
        for k in ("poni", "mask", "dark", "flat"):
            v = getattr(c, k)
            if v is not None:
                lines.append(f"[calibration] {k} = {v}")
    i = exp.integration
    lines.append(
        f"[integration] npt = {i.npt}, unit = {i.unit}, range = {list(i.range) if i.range else 'full'}, "
        f"polarization_factor = {i.polarization_factor}, solid_angle = {i.solid_angle}, "
        f"error_model = {i.error_model}, splitting = {i.splitting}"
    )
    e = exp.electrochemistry
    if e is not None:
        lines.append(f"[electrochemistry] file = {e.file} (format {e.format})"
                     + (f", start = {e.start.isoformat()}" if e.start else "")
                     + (f", timezone = {e.timezone}" if e.timezone else ""))
        if e.formula:
            from .composition import molar_mass, theoretical_capacity

            lines.append(f"  {e.formula}: M = {molar_mass(e.formula):.3f} g/mol, theoretical capacity "
                         f"{theoretical_capacity(e.formula, ion=e.ion):.1f} mAh/g; x0 = "
                         f"{e.x0 if e.x0 is not None else 'from the formula'}, active mass = {e.active_mass_mg} mg")
    pl = exp.plots
    lines.append(f"[plots] {', '.join(pl.kinds) if pl.kinds is not None else 'every kind the data allows'} "
                 f"as {'+'.join(pl.formats)} at {pl.dpi} dpi in {exp.run.output / pl.folder}")
    lines.append(f"[export] {', '.join(exp.export.formats)} in {exp.run.output / exp.export.folder}")
    return "\n".join(lines)


def _times_text(t: Any) -> str:
    if t is None:
        return "none (frames are numbered, not timed)"
    if isinstance(t, str):
        return t
    if isinstance(t, TimesFromLog):
        return f"from log {t.log}" + (f" ({t.timezone})" if t.timezone else "")
    return f"start {t.start.isoformat()}, every {t.period_s} s"
