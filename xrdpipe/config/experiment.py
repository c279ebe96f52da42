"""The whole experiment (:class:`Experiment`) and reading it: TOML in, every problem found at once
(types and values, then the cross-checks), frozen validated specs out.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError
from .base import Spec
from .checks import cross_check
from .electrochemistry import ElectrochemistrySpec
from .fitting import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from .inputs import CalibrationSpec, FramesSpec, IntegrationSpec, PatternsSpec, RunSpec
from .messages import describe
from .outputs import ExportSpec, PlotsSpec
from .whole_pattern import RefinementSpec

SCHEMA_VERSION = 1


class Experiment(Spec):
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

    def structure_file(self, structure: str) -> Path | None:
        """The CIF file a ``[[refinement.phases]] structure`` names (relative to the experiment
        file), or None for ``"template"``."""
        if structure == "template":
            return None
        path = Path(structure)
        return path if path.is_absolute() or self.source is None else self.source.parent / path


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
        raise ConfigError(source, [describe(e, Experiment) for e in exc.errors()]) from None
    exp = exp.model_copy(update={"source": Path(source) if source != "<experiment>" else None, "text": text})
    problems = cross_check(exp)       # with the source known: relative CIF paths are the file's
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
