"""The lattice stage on an experiment: cells, volumes, layer geometry and phase fractions from the
fitted peaks (and the refinement's weight fractions, where there are) into ``/entry/lattice`` and
``lattice.csv``; recomputed whole, also after ``echem`` and ``refine`` bring it voltage, x and
weight fractions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Experiment
from ..errors import ConfigError
from .groups import read_electrochemistry, write_table
from .nexus import Curve, write_nxdata
from .paths import LATTICE, RunPaths
from .peakstore import read_peak_table
from .refinestore import read_weight_fractions
from .stage import stage, takes_experiment
from .store import read_run_info

__all__ = ["LatticeSummary", "lattice_experiment"]


@dataclass
class LatticeSummary:
    """What a lattice run did."""

    run_file: Path
    csv_file: Path
    frames: int
    cells: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.frames} frame(s); cells refined per phase: "
                 + ", ".join(f"{k} {v}" for k, v in self.cells.items())]
        for msg, count in sorted(self.flagged.items(), key=lambda kv: -kv[1])[:6]:
            lines.append(f"  {count} frame-phase pair(s): {msg}")
        lines.append(f"lattice: {self.csv_file}")
        return "\n".join(lines)


@takes_experiment
def lattice_experiment(exp: Experiment) -> LatticeSummary:
    """Cells, volumes, layer geometry and phase fractions from the fitted peaks of a run file:
    written to ``/entry/lattice`` and ``<output>/lattice.csv`` (recomputed whole; it is quick)."""
    from ..lattice import refine_lattice

    if not exp.phases:
        raise ConfigError(str(exp.source or "experiment"), [("phases", "no [[phases]] to refine")])
    info = read_run_info(exp.run.run_file)
    table = read_peak_table(exp.run.run_file)
    lat = refine_lattice(table, exp.phases, exp.lattice, unit=info.unit, wavelength_A=info.wavelength_A,
                         weights=read_weight_fractions(exp.run.run_file))
    arrays = {"frame": lat.frame, "time_s": lat.time_s, "phase": np.array(lat.phases, dtype=object),
              "message": lat.message, "fraction_source": lat.fraction_source, **lat.values}
    for name in ("fraction_method", "presence"):
        if getattr(lat, name) is not None:
            arrays[name] = getattr(lat, name)
    with stage(exp, "lattice"):
        write_table(exp.run.run_file, LATTICE, arrays, {"correction": exp.lattice.correction})
        _write_views(exp.run.run_file, lat)
    states = read_electrochemistry(exp.run.run_file)
    if states is not None:
        lat.voltage_V, lat.x = states.voltage_V[lat.frame], states.x[lat.frame]
    summary = LatticeSummary(exp.run.run_file, lat.write_csv(RunPaths.of(exp).lattice_csv), len(lat.frame))
    for i, name in enumerate(lat.phases):
        summary.cells[name] = int(np.isfinite(lat.values["c_A"][:, i]).sum())
    for msg in lat.message.ravel():
        if msg:
            summary.flagged[msg] = summary.flagged.get(msg, 0) + 1
    return summary




#: the NXdata views of the lattice in ``/entry/results``: name, field, esd, units, title
_VIEWS = (("lattice_a", "a_A", "a_err_A", "angstrom", "a"), ("lattice_c", "c_A", "c_err_A", "angstrom", "c"),
          ("volume", "volume_A3", "volume_err_A3", "angstrom^3", "V"),
          ("fractions", "fraction", "fraction_err", "", "fraction"))


def _write_views(run_file: Path, lat) -> None:
    """a, c, V and the fractions of every phase against the frame, as NXdata (one curve per
    phase) that silx view and h5web plot at once."""
    frames = np.asarray(lat.frame)
    for name, field_, err, units, title in _VIEWS:
        curves = [Curve(ph, lat.values[field_][:, i], lat.values[err][:, i]) for i, ph in enumerate(lat.phases)]
        if curves:
            write_nxdata(run_file, name, curves, axis=("frame", frames, ""), units=units, long_name=title)
