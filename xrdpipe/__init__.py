"""xrdpipe: operando X-ray diffraction of battery cathodes, from 2D frames to numbers and figures.

The public API is small; everything else lives in private-by-convention stage modules.

>>> import xrdpipe
>>> exp = xrdpipe.load_experiment("experiment.toml")       # doctest: +SKIP
>>> summary = xrdpipe.integrate_experiment(exp)             # doctest: +SKIP
>>> patterns = xrdpipe.open_run(exp.run.run_file)           # doctest: +SKIP
>>> peaks = xrdpipe.fit_experiment(exp)                     # doctest: +SKIP
>>> states = xrdpipe.echem_experiment(exp)                  # doctest: +SKIP
>>> print(xrdpipe.run_experiment(exp))                      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .calibration import Calibration, load_calibration
from .config import Experiment, load_experiment
from .cyclers import read_cycler
from .errors import (
    CalibrationError,
    ConfigError,
    CyclerReadError,
    FrameReadError,
    PatternReadError,
    StoreError,
    XrdpipeError,
)
from .integration import Integrator
from .peaks import WindowModel, fit_peaks
from .phasefit import fit_phases
from .pipeline import echem_experiment, fit_experiment, integrate_experiment
from .store import open_run
from .workflow import export_experiment, plot_experiment, run_experiment

__all__ = [
    "__version__",
    "Calibration",
    "CalibrationError",
    "ConfigError",
    "CyclerReadError",
    "Experiment",
    "FrameReadError",
    "Integrator",
    "PatternReadError",
    "StoreError",
    "WindowModel",
    "XrdpipeError",
    "echem_experiment",
    "fit_experiment",
    "fit_peaks",
    "fit_phases",
    "integrate_experiment",
    "load_calibration",
    "load_experiment",
    "open_run",
    "read_cycler",
    "run_experiment",
    "plot_experiment",
    "export_experiment",
]
