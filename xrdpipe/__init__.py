"""xrdpipe: operando X-ray diffraction of battery cathodes, from 2D frames to numbers and figures.

The public API is small; everything else lives in private-by-convention stage modules.

>>> import xrdpipe
>>> exp = xrdpipe.load_experiment("experiment.toml")       # doctest: +SKIP
>>> summary = xrdpipe.integrate_experiment(exp)             # doctest: +SKIP
>>> patterns = xrdpipe.open_run(exp.run.run_file)           # doctest: +SKIP
>>> ds = xrdpipe.open_dataset(exp.run.run_file)             # labelled, lazy  # doctest: +SKIP
>>> peaks = xrdpipe.fit_experiment(exp)                     # doctest: +SKIP
>>> states = xrdpipe.echem_experiment(exp)                  # doctest: +SKIP
>>> cells = xrdpipe.lattice_experiment(exp)                 # cells, fractions  # doctest: +SKIP
>>> print(xrdpipe.run_experiment(exp))                      # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

#: the public names and the module each lives in; imported when first used, so that the
#: command line starts (and answers Ctrl-C) at once
_HOME = {
    "Calibration": "calibration", "load_calibration": "calibration",
    "Experiment": "config", "load_experiment": "config",
    "read_cycler": "cyclers",
    "CalibrationError": "errors", "ConfigError": "errors", "CyclerReadError": "errors", "FrameReadError": "errors",
    "PatternReadError": "errors", "PlotError": "errors", "RefinementError": "errors", "StoreError": "errors",
    "StructureError": "errors", "WindowSetupError": "errors", "XrdpipeError": "errors",
    "Integrator": "integration",
    "WindowModel": "peaks", "fit_peaks": "peaks", "lmfit_model": "lmfit_models", "fit_phases": "phasefit",
    "echem_experiment": "run.echem", "fit_experiment": "run.fit", "integrate_experiment": "run.integrate",
    "open_run": "run.store", "open_dataset": "run.dataset", "open_results": "run.dataset",
    "export_experiment": "run.output", "plot_experiment": "run.output", "run_experiment": "run.workflow",
    "lattice_experiment": "run.lattice", "refine_experiment": "run.refine", "report_experiment": "run.report",
}


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        try:                                   # a submodule: xrdpipe.testing, xrdpipe.plots...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


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
    "PlotError",
    "RefinementError",
    "StoreError",
    "StructureError",
    "WindowSetupError",
    "WindowModel",
    "XrdpipeError",
    "echem_experiment",
    "fit_experiment",
    "fit_peaks",
    "fit_phases",
    "integrate_experiment",
    "load_calibration",
    "load_experiment",
    "lmfit_model",
    "open_run",
    "open_dataset",
    "open_results",
    "read_cycler",
    "run_experiment",
    "plot_experiment",
    "export_experiment",
    "lattice_experiment",
    "refine_experiment",
    "report_experiment",
]
