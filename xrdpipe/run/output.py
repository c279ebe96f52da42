"""The last two stages on an experiment: figures drawn from the run file's Datasets
(``plot_experiment``: the run file is opened here and :mod:`xrdpipe.plots` draws from arrays) and
patterns exported for other programs (``export_experiment``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import PLOT_KINDS, Experiment, PlotsSpec
from ..config.base import did_you_mean
from ..errors import PlotError, XrdpipeError
from .groups import has_group, read_electrochemistry, read_table
from .paths import LATTICE, PEAKS, REFINEMENT, RunPaths
from .refinestore import FLAGGED, OK, read_refined_frame, read_refinement
from .stage import takes_experiment
from .store import DONE, read_frames, read_pattern_block, read_run_info

__all__ = ["plot_experiment", "PlotSummary", "export_experiment", "export_run_file"]


# ----------------------------------------------------------------------------------------------
# figures and exports of a whole experiment

@dataclass
class PlotSummary:
    """The figures written (kind -> files) and the kinds that could not be drawn (kind -> why)."""

    folder: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [p for files in self.files.values() for p in files]

    def __str__(self) -> str:
        lines = [f"{len(self.files)} figure(s) in {self.folder}"]
        lines += [f"  {kind}: {', '.join(p.name if p.parent == self.folder else str(p) for p in files)}"
                  for kind, files in self.files.items()]
        lines += [f"  {kind} not drawn: {why}" for kind, why in self.skipped.items()]
        return "\n".join(lines)


def _possible_kinds(exp: Experiment, run_file: Path) -> list[str]:
    kinds = ["contour", "waterfall"]
    if exp.windows and has_group(run_file, PEAKS):
        kinds.insert(1, "fit")
    if has_group(run_file, LATTICE):
        kinds[1:1] = ["lattice", "fractions"]
    if has_group(run_file, REFINEMENT):
        kinds.append("refinement")
    return [k for k in PLOT_KINDS if k in kinds]


def _last_refined(run_file: Path) -> int:
    """The last frame whose refinement succeeded (the refinement figure's default)."""
    d = read_table(run_file, REFINEMENT, names=("status",))
    ok = np.flatnonzero(d["status"] == OK) if d is not None else np.zeros(0, int)
    if not ok.size:
        raise PlotError(f"{run_file} has no successfully refined frame; run 'xrdpipe refine'")
    return int(ok[-1])


def _contour_windows(exp: Experiment, spec, radial: np.ndarray) -> list[tuple[str, float, float]]:
    named = {w.name: w.range for w in exp.windows}
    unit = "°" if exp.radial_unit == "2th_deg" else " Å$^{-1}$"
    chosen = spec.windows or list(named)
    if not chosen:
        return [("pattern", float(radial[0]), float(radial[-1]))]
    out = []
    for w in chosen:
        if isinstance(w, str):
            if w not in named:
                raise PlotError(f"contour window {w!r} is not one of the [[windows]] {list(named)}"
                                + did_you_mean(w, named, 0.5))
            out.append((w, *named[w]))
        else:
            out.append((f"{w[0]:g}–{w[1]:g}{unit}", float(w[0]), float(w[1])))
    return out


@takes_experiment
def plot_experiment(exp: Experiment, *, kinds: Sequence[str] | None = None, plots: PlotsSpec | None = None,
                    stem: Path | str | None = None, strict: bool | None = None) -> PlotSummary:
    """Draw the figures of ``kinds`` (default: ``[plots] kinds``, else every kind the run file
    can give) from the run file, as ``<output>/<folder>/<run>_<kind>.<format>``.

    The run file is opened here (:func:`~xrdpipe.run.dataset.open_dataset`, lazily, and
    :func:`~xrdpipe.run.dataset.open_results`) and the figures draw from those Datasets. With
    ``strict`` (the default when ``kinds`` are named) a figure that cannot be drawn is an error;
    otherwise it is skipped and the reason kept.
    """
    from ..plots import save_figure

    spec = plots or exp.plots
    run_file = exp.run.run_file
    wanted = list(kinds or spec.kinds or _possible_kinds(exp, run_file))
    strict = bool(kinds) if strict is None else strict
    folder = exp.run.output / spec.folder     # `plots` may name another [plots]
    summary = PlotSummary(folder)
    makers = _makers(exp, spec, run_file)
    for kind in wanted:
        try:
            fig = makers[kind]()
        except XrdpipeError as exc:
            if strict:
                raise
            summary.skipped[kind] = str(exc)
            continue
        target = Path(stem) if stem is not None and len(wanted) == 1 else RunPaths.of(exp).figure(kind, folder)
        summary.files[kind] = save_figure(fig, target, formats=spec.formats, dpi=spec.dpi)
    return summary


def _makers(exp: Experiment, spec: PlotsSpec, run_file: Path) -> dict[str, Callable]:
    """Each kind of figure, drawn from the run file's Datasets (opened once, when first needed)."""
    from ..plots import (
        plot_contour,
        plot_fit_check,
        plot_fractions,
        plot_lattice,
        plot_refinement,
        plot_waterfall,
    )
    from ..plots.style import radial_of
    from .dataset import open_dataset, open_results

    opened: dict[str, Any] = {}

    def patterns():
        if "patterns" not in opened:
            opened["patterns"] = open_dataset(run_file)
        return opened["patterns"]

    def results():
        if "results" not in opened:
            opened["results"] = open_results(run_file)
        return opened["results"]

    def lattice():
        if results().lattice is None:
            raise PlotError(f"{run_file} holds no lattice parameters yet; run 'xrdpipe lattice' (after 'xrdpipe fit')")
        return results().lattice

    common = dict(dpi=spec.dpi, font_size=spec.font_size)
    return {
        "contour": lambda: plot_contour(patterns(), windows=_contour_windows(exp, spec.contour, radial_of(patterns())[0]),
                                        spec=spec.contour, peaks=results().peaks, record=results().record, **common),
        "lattice": lambda: plot_lattice(lattice(), spec=spec.lattice, **common),
        "fractions": lambda: plot_fractions(lattice(), spec=spec.fractions, **common),
        "fit": lambda: plot_fit_check(patterns(), results().peaks, phases=exp.phases, windows=exp.windows,
                                      spec=spec.fit, **common),
        "waterfall": lambda: plot_waterfall(patterns(), spec=spec.waterfall, **common),
        "refinement": lambda: plot_refinement(read_refined_frame(run_file, _last_refined(run_file)), **common),
    }


@takes_experiment
def export_experiment(exp: Experiment, *, formats: Sequence[str] | None = None, frames: Sequence[int] | None = None,
                      progress: bool = False):
    """Every integrated pattern (or ``frames``) as ``[export] formats`` in ``<output>/<folder>``;
    see :mod:`xrdpipe.export`."""
    spec = exp.export
    # pyFAI corrected the polarization (frames integrated with a polarization factor): GSAS-II
    # must apply none (Polariz. 1.0)
    pol = 1.0 if exp.frames is not None and exp.integration.polarization_factor is not None else None
    profile, zero = _refined_profile(exp)
    return export_run_file(exp.run.run_file, RunPaths.of(exp).exports, formats=formats or spec.formats,
                           frames=frames if frames is not None else spec.frames, polarization=pol,
                           progress=progress, profile=profile, zero_deg=zero)


def export_run_file(run_file: Path | str, folder: Path | str, **options):
    """The patterns of a run file exported into ``folder`` (``options``: those of
    :func:`~xrdpipe.export.export_patterns`)."""
    from ..export import ExportSource, export_patterns

    run_file = Path(run_file)
    info = read_run_info(run_file)
    fr = read_frames(run_file)
    ec = read_electrochemistry(run_file)
    unknown = np.full(info.frame_count, np.nan)
    source = ExportSource(run_file.stem, info.radial, info.unit, info.wavelength_A, info.status == DONE,
                          info.time_s, fr.key, fr.start, fr.end, ec.x if ec is not None and ec.x is not None else unknown,
                          ec.voltage_V if ec is not None and ec.voltage_V is not None else unknown, info.fingerprint,
                          lambda rows: read_pattern_block(run_file, rows), where=str(run_file))
    return export_patterns(source, folder, **options)


def _refined_profile(exp: Experiment) -> tuple[dict[str, float] | None, float]:
    """U, V, W, X, Y of the first phase and the zero shift of the last successfully refined
    frame, where ``xrdpipe refine`` has run (else None and 0)."""
    d = read_refinement(exp.run.run_file) if Path(exp.run.run_file).exists() else None
    if d is None or not {"status", "parameter", "phase", "values"} <= d.keys() or not len(d["phase"]):
        return None, 0.0               # no usable refinement: GSAS-II's defaults
    good = np.flatnonzero(np.isin(d["status"], (OK, FLAGGED)))
    if not good.size:
        return None, 0.0
    r = int(good[-1])
    names = list(d["parameter"])
    ph = list(d["phase"])[0]
    vals = d["values"][r]
    prof = {k: float(vals[names.index(f"{ph}.{k}")]) for k in "UVWXY" if f"{ph}.{k}" in names}
    zero = float(vals[names.index("zero")]) if "zero" in names else 0.0
    return prof, zero if np.isfinite(zero) else 0.0
