"""Every name of a run's outputs, said once: the files beside the run file and the groups inside it.

>>> paths = RunPaths.of(exp)                                  # doctest: +SKIP
>>> paths.peaks_csv                                           # doctest: +SKIP
PosixPath('results/peaks.csv')
>>> h5path(PEAKS)
'/entry/peaks'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPaths", "h5path", "FORMAT", "ENTRY", "PATTERNS", "FRAMES", "PEAKS", "PEAKS_OTHER", "LATTICE", "ELECTROCHEMISTRY",
           "ECHEM_RECORD", "REFINEMENT", "RESULTS", "PROCESS", "STAGES", "FINGERPRINT", "INSTRUMENT", "WAVELENGTH"]

#: the ``@format`` of a run file's root
FORMAT = "xrdpipe-run-1"

#: groups of ``/entry`` (see :mod:`xrdpipe.run.store` for the layout)
ENTRY = "/entry"
PATTERNS = "patterns"                    # NXdata: intensity (frame x radial), its esd, axes
FRAMES = "frames"                        # NXcollection: key, file, index, start, end, ..., status
PEAKS = "peaks"                          # fitted peaks, frame x peak (xrdpipe fit)
PEAKS_OTHER = "peaks_other_naming"       # the phase model's naming check: the run with the other name
LATTICE = "lattice"                      # cells and fractions, frame x phase (xrdpipe lattice)
ELECTROCHEMISTRY = "electrochemistry"    # per-frame voltage, x ... (xrdpipe echem)
ECHEM_RECORD = "electrochemistry/record"  # the whole cycler record
REFINEMENT = "refinement"                # whole-pattern results, frame x parameter (xrdpipe refine)
PROCESS = "process"                      # NXprocess: provenance, fingerprint, stages
STAGES = "process/stages"                # what each stage of `xrdpipe run` last finished
FINGERPRINT = "process/fingerprint"      # the settings the patterns depend on
RESULTS = "results"                      # NXdata views for silx view and h5web: centres, lattice, ...
INSTRUMENT = "instrument"
WAVELENGTH = "instrument/monochromator/wavelength"


def h5path(group: str) -> str:
    """The absolute path of a group or dataset of ``/entry``: ``h5path(PEAKS)`` is ``/entry/peaks``."""
    return f"{ENTRY}/{group}"


@dataclass(frozen=True)
class RunPaths:
    """The files of a run: the run file, and the CSV files, figures and exports beside it."""

    run_file: Path
    output: Path
    name: str
    figures: Path
    exports: Path

    @classmethod
    def of(cls, exp) -> "RunPaths":
        """The paths of an :class:`~xrdpipe.config.Experiment`."""
        return cls(Path(exp.run.run_file), Path(exp.run.output), exp.run.name,
                   Path(exp.run.output) / exp.plots.folder, Path(exp.run.output) / exp.export.folder)

    @property
    def peaks_csv(self) -> Path:
        """One row per frame and peak (``xrdpipe fit``)."""
        return self.output / "peaks.csv"

    @property
    def lattice_csv(self) -> Path:
        """One row per frame and phase (``xrdpipe lattice``)."""
        return self.output / "lattice.csv"

    @property
    def frames_csv(self) -> Path:
        """One row per frame: voltage, x, half-cycle (``xrdpipe echem``)."""
        return self.output / "frames.csv"

    @property
    def refine_csv(self) -> Path:
        """One row per refined frame and phase (``xrdpipe refine``)."""
        return self.output / "refine.csv"

    @property
    def refine_compare_csv(self) -> Path:
        """The models of ``xrdpipe refine --compare`` side by side."""
        return self.output / "refine_compare.csv"

    def figure(self, kind: str, folder: Path | None = None) -> Path:
        """A figure's path without its suffix: ``<figures>/<run>_<kind>`` (or in ``folder``)."""
        return (self.figures if folder is None else Path(folder)) / f"{self.name}_{kind}"

