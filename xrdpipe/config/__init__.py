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

The package, one module per concern (each imports only those above it):

* :mod:`~xrdpipe.config.base`          the strict frozen spec base, resolved paths, timezones, units
* :mod:`~xrdpipe.config.inputs`        ``[run]``, ``[frames]``/``[patterns]``, ``[calibration]``,
  ``[integration]``
* :mod:`~xrdpipe.config.electrochemistry` ``[electrochemistry]``
* :mod:`~xrdpipe.config.fitting`       ``[[phases]]``, ``[[windows]]``, ``[fit]``, ``[lattice]``
* :mod:`~xrdpipe.config.whole_pattern` ``[refinement]``
* :mod:`~xrdpipe.config.outputs`       ``[plots]``, ``[export]``
* :mod:`~xrdpipe.config.messages`      error translation: pydantic errors in the file's words
* :mod:`~xrdpipe.config.checks`        cross-checks between sections
* :mod:`~xrdpipe.config.experiment`    :class:`Experiment`, :func:`parse_experiment`, :func:`load_experiment`
* :mod:`~xrdpipe.config.summary`       :func:`experiment_summary` (``xrdpipe validate``)
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import RADIAL_UNITS
from .electrochemistry import ElectrochemistrySpec
from .experiment import SCHEMA_VERSION, Experiment, load_experiment, parse_experiment
from .fitting import (
    PROFILE_NAMES,
    FitSpec,
    LatticeSpec,
    PhaseSpec,
    PolynomialBackground,
    WindowSpec,
)
from .inputs import (
    CalibrationSpec,
    FramesSpec,
    IntegrationSpec,
    PatternsSpec,
    RunSpec,
    TimesFromLog,
    TimesPeriodic,
)
from .outputs import (
    EXPORT_FORMATS,
    PLOT_KINDS,
    ContourSpec,
    ExportSpec,
    FitCheckSpec,
    FractionsPlotSpec,
    LatticePlotSpec,
    PlotsSpec,
    WaterfallSpec,
)
from .summary import experiment_summary
from .whole_pattern import (
    OccupancySpec,
    RefineAtomSpec,
    RefinementSpec,
    RefineModelSpec,
    RefinePhaseSpec,
)

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
    # beside those: the specs of every other section, and what the command line uses
    "ConfigError",
    "PROFILE_NAMES",
    "PolynomialBackground",
    "RefinementSpec",
    "RefinePhaseSpec",
    "RefineModelSpec",
    "RefineAtomSpec",
    "OccupancySpec",
    "PLOT_KINDS",
    "EXPORT_FORMATS",
    "ContourSpec",
    "LatticePlotSpec",
    "FractionsPlotSpec",
    "FitCheckSpec",
    "WaterfallSpec",
    "experiment_summary",
]
