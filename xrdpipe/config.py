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
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from natsort import natsorted
from pydantic import (
    AwareDatetime,
    BaseModel,
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
    "load_experiment",
    "parse_experiment",
    "RADIAL_UNITS",
]

SCHEMA_VERSION = 1
RADIAL_UNITS = ("2th_deg", "q_A^-1")
RadialUnit = Literal["2th_deg", "q_A^-1"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


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


class RunSpec(_Spec):
    """``[run]``: the run's name and its output folder."""

    name: str = Field(min_length=1)
    output: Path = Field(default=Path("results"), validate_default=True)

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, v: Any, info: ValidationInfo) -> Any:
        return _resolve(v, info)

    @property
    def run_file(self) -> Path:
        """The NeXus/HDF5 file that holds everything computed for this run."""
        return self.output / f"{self.name}.nxs"


class TimesFromLog(_Spec):
    """``times = { log = "scans.csv" }``: one row per frame with absolute start and end times.

    The row is matched to the frame by file name, or by a scan number found in the file name.
    """

    log: Path
    timezone: str | None = None

    @field_validator("log", mode="before")
    @classmethod
    def _log(cls, v: Any, info: ValidationInfo) -> Any:
        return _resolve(v, info)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return _check_timezone(v)


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
_TAGS = {"header", "log", "periodic", "str"}


def _expand_files(v: Any, info: ValidationInfo) -> Any:
    """A glob (natural sort) or a list of paths/globs -> list of existing files."""
    if isinstance(v, (str, Path)):
        items = [str(v)]
    elif isinstance(v, (list, tuple)) and v and all(isinstance(i, (str, Path)) for i in v):
        items = [str(i) for i in v]
    else:
        raise ValueError("expected a glob such as \"raw/*.h5\" or a non-empty list of paths")
    files: list[Path] = []
    for item in items:
        p = _resolve(item, info)
        if glob.has_magic(str(p)):
            hits = natsorted(glob.glob(str(p)))
            if not hits:
                raise ValueError(f"the glob {str(p)!r} matches no file")
            files.extend(Path(h) for h in hits)
        else:
            if not p.exists():
                raise ValueError(f"no such file: {str(p)!r}")
            files.append(p)
    return files


class FramesSpec(_Spec):
    """``[frames]``: 2D detector frames (HDF5/NeXus stacks, CBF, EDF, TIFF)."""

    files: list[Path]
    dataset: str | None = None
    times: TimesSpec | None = None
    timezone: str | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: Any, info: ValidationInfo) -> Any:
        return _expand_files(v, info)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        return _check_timezone(v)

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

    poni: Path
    mask: Path | None = None
    dark: Path | None = None
    flat: Path | None = None

    @field_validator("poni", "mask", "dark", "flat", mode="before")
    @classmethod
    def _paths(cls, v: Any, info: ValidationInfo) -> Any:
        p = _resolve(v, info)
        if p is not None and not Path(p).exists():
            raise ValueError(f"no such file: {str(p)!r}")
        return p


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


class Experiment(_Spec):
    """A whole validated experiment. ``source`` is the file it came from, ``text`` its content."""

    schema_version: Literal[1]
    run: RunSpec
    frames: FramesSpec | None = None
    patterns: PatternsSpec | None = None
    calibration: CalibrationSpec | None = None
    integration: IntegrationSpec = IntegrationSpec()
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


# --------------------------------------------------------------------------------------------
# loading and error reporting

_SECTION_HINTS = {
    "phases": "peak fitting", "windows": "peak fitting", "electrochemistry": "state of charge",
    "refine": "whole-pattern refinement", "lattice": "lattice refinement",
    "plots": "figures", "export": "exports",
}


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
    if etype not in ("value_error", "times_kind") and "input" in err and not isinstance(
        err["input"], (dict, list)
    ):
        msg = f"{msg[0].lower()}{msg[1:]}, got {err['input']!r}"
    return key, msg


def parse_experiment(data: dict[str, Any], *, base: Path | str = ".", source: str = "<experiment>",
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
        exp = Experiment.model_validate(data, context={"base": Path(base)})
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None
    return exp.model_copy(update={"source": Path(source) if source != "<experiment>" else None,
                                  "text": text})


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file.

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
    return parse_experiment(data, base=path.resolve().parent, source=str(path), text=text)


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
    return "\n".join(lines)


def _times_text(t: Any) -> str:
    if t is None:
        return "none (frames are numbered, not timed)"
    if isinstance(t, str):
        return t
    if isinstance(t, TimesFromLog):
        return f"from log {t.log}" + (f" ({t.timezone})" if t.timezone else "")
    return f"start {t.start.isoformat()}, every {t.period_s} s"
