"""The whole run: every configured stage in order, each skipped when its inputs have not changed.

``run_experiment(exp)`` runs integrate (or import), echem, fit, refine, lattice, plots and export.
Each stage has a key: a digest of its own settings, the files it reads (path, size and
modification time) and the keys of the stages it depends on (:data:`DEPENDS`). A stage whose key
matches the one recorded when it last finished (in ``/entry/process/stages`` of the run file),
whose output files all exist and none of whose upstream stages ran in this run, is skipped. A
stage clears its record when it starts, so an interrupted stage always runs again (and resumes
where it can), and so do the stages that read its results. ``plot_experiment`` and ``export_experiment`` are
the last two stages on their own.

The report (``<output>/report.html``, :mod:`xrdpipe.run.report`) is the last step. Its key
(:func:`report_key`) is kept apart from :func:`stage_keys`, so a run made before the report
existed has every stage up to date and recomputes nothing: only its report is written. It is
rewritten when a stage ran, when its key changed (a new version, a stage key, the self-refresh
of ``xrdpipe watch`` turned on or off) or when the file is missing; it never makes a stage run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..config import Experiment, TimesFromLog
from ..lattice import phase_present
from ..parallel import stop_if_interrupted
from ..safeio import file_stat, transaction
from .echem import echem_experiment
from .fit import fit_experiment
from .groups import has_group, read_electrochemistry, read_table
from .integrate import integrate_experiment
from .lattice import lattice_experiment
from .output import PlotSummary, export_experiment, plot_experiment
from .paths import LATTICE, PEAKS, RunPaths
from .peakstore import read_peaks
from .refine import refine_experiment
from .report import report_experiment, report_path
from .stage import DEPENDS, takes_experiment
from .stagelog import mark_stage, read_stages
from .store import DONE, FAILED, read_frames

__all__ = ["run_experiment", "RunSummary", "stage_keys", "report_key", "DEPENDS", "REPORT"]


# ----------------------------------------------------------------------------------------------
# stage keys

def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: The record of the report step in ``/entry/process/stages`` (not one of :data:`DEPENDS`).
REPORT = "report"


def report_key(keys: dict[str, str], *, refresh_s: float | None = None, figures: Sequence[Path | str] = ()) -> str:
    """The key of the report step: the version, every stage's key, whether the page refreshes
    itself (``refresh_s``, from ``xrdpipe watch``) and the size and time of the ``figures`` it
    embeds (``xrdpipe plot`` redraws them without the plots stage)."""
    return _digest(__version__, keys, refresh_s, [file_stat(f) for f in figures])


def stage_keys(exp: Experiment, *, live_key: str | None = None) -> dict[str, str]:
    """The key of every configured stage, in run order (see the module docstring). ``live_key``
    (from ``xrdpipe watch``: which frames are complete) joins the integrate stage's inputs."""
    if exp.frames is not None:
        f, c = exp.frames, exp.calibration
        inputs = [f.model_dump(mode="json"), [file_stat(p) for p in f.files],
                  c.model_dump(mode="json"), [file_stat(p) for p in (c.poni, c.mask, c.dark, c.flat) if p],
                  exp.integration.model_dump(mode="json", exclude={"workers", "engine"})]
        times = f.times
    else:
        p = exp.patterns
        inputs = [p.model_dump(mode="json"), [file_stat(x) for x in p.files]]
        times = p.times
    if isinstance(times, TimesFromLog):
        inputs.append(file_stat(times.log))
    if live_key is not None:
        inputs.append(live_key)
    own: dict[str, object] = {"integrate": inputs}
    if exp.electrochemistry is not None:
        e = exp.electrochemistry
        own["echem"] = [e.model_dump(mode="json"), file_stat(e.file), [file_stat(p) for p in e.inventory_loss_from]]
    if exp.windows:
        own["fit"] = [[p.model_dump(mode="json") for p in exp.phases], [w.key() for w in exp.windows],
                      exp.fit.key(exclude={"workers"})]
        if exp.fit.model == "phases" and exp.lattice.phase_correction != "none":
            # the phase model fits with the run's zero shift (left out where there is none, as
            # in the keys of runs made before it counted here)
            own["fit"].append({"correction": exp.lattice.phase_correction})
        if exp.phases:
            own["lattice"] = exp.lattice.model_dump(mode="json")
    if exp.refinement is not None:
        cifs = [exp.structure_file(p.structure) for p in exp.refinement.phases if p.structure != "template"]
        own["refine"] = [exp.refinement.model_dump(mode="json"), [p.model_dump(mode="json") for p in exp.phases],
                         [file_stat(c) for c in cifs]]
    own["plots"] = exp.plots.model_dump(mode="json")
    if exp.export.formats:
        own["export"] = exp.export.model_dump(mode="json")
    keys: dict[str, str] = {}
    for stage in DEPENDS:
        if stage in own:
            keys[stage] = _digest(__version__, own[stage], [keys.get(d) for d in DEPENDS[stage]])
    return keys


# ----------------------------------------------------------------------------------------------
# the whole run

@dataclass
class RunSummary:
    """What ``xrdpipe run`` did: per stage ``"ran"`` or ``"skipped"``, and the run's state."""

    run_file: Path
    stages: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    integrated: int = 0
    failed_frames: list[str] = field(default_factory=list)
    failed_fits: int = 0
    window_fits: int = 0
    phases: dict[str, tuple[int, float, float, str]] = field(default_factory=dict)  # frames, lo, hi, over
    #: lines of no phase (``free_peaks``): "<centre> (window <name>)" -> frames where present
    free_peaks: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    frames_without_echem: int = 0   # frames integrated after the echem stage last ran
    report: str = ""      # the report step: "ran", "skipped" (up to date) or "" (not reached)
    results: dict[str, object] = field(default_factory=dict, repr=False)   # each stage's own summary

    @property
    def did_work(self) -> bool:
        return any(v == "ran" for v in self.stages.values())

    def __str__(self) -> str:
        lines = []
        if not self.did_work:
            lines.append("nothing changed since the last run: every stage is up to date, no work done")
        else:
            ran = [k for k, v in self.stages.items() if v == "ran"]
            kept = [k for k, v in self.stages.items() if v != "ran"]
            lines.append(f"ran {', '.join(ran)}" + (f"; unchanged, skipped: {', '.join(kept)}" if kept else "")
                         + f" ({self.seconds:.1f} s)")
        lines.append(f"frames: {self.frames}, integrated {self.integrated}, failed {len(self.failed_frames)}"
                     + (f" ({', '.join(self.failed_frames[:3])}{' ...' if len(self.failed_frames) > 3 else ''})"
                        if self.failed_frames else ""))
        if self.window_fits:
            lines.append(f"window fits: {self.window_fits}, failed {self.failed_fits}")
        if self.frames_without_echem:
            lines.append(f"{self.frames_without_echem} frame(s) have no state of charge yet (integrated after "
                         "the echem stage ran): run 'xrdpipe echem' again")
        for name, (count, lo, hi, over) in self.phases.items():
            span = f"{over} {lo:.3f} to {hi:.3f}" if np.isfinite(lo) else "no state of charge"
            lines.append(f"phase {name}: in {count} frame(s), {span}")
        for name, count in self.free_peaks.items():
            lines.append(f"free peak {name}: in {count} frame(s)")
        for what, where in self.outputs.items():
            lines.append(f"{what}: {where}")
        for p in self.figures:
            lines.append(f"figure: {p}")
        for stage, result in self.results.items():
            lines += [f"warning ({stage}): {w}" for w in getattr(result, "warnings", ())]
        return "\n".join(lines)


@takes_experiment
def run_experiment(exp: Experiment, *, force: bool = False, progress: bool = True, workers: int | None = None,
                   echo: Callable[[str], None] | None = None, scheduler: str | None = None,
                   ready: Callable | None = None, retry_s: float | None = None,
                   cache: dict | None = None, live_key: str | None = None,
                   report_refresh_s: float | None = None) -> RunSummary:
    """Run every configured stage of ``exp`` in order, skipping those whose inputs have not
    changed since they last finished (``force`` runs them all). ``echo`` receives a line per
    stage as it goes. ``scheduler`` overrides ``[run] scheduler``; ``ready``, ``retry_s`` and
    ``cache`` are for live processing (see :func:`~xrdpipe.run.integrate.integrate_experiment`), as is
    ``live_key`` (see :func:`stage_keys`). A stage that ran but changed nothing (integrate with no
    new frame) is ``"checked"``: the stages after it do not run for it. The report is written
    last (see the module docstring); ``report_refresh_s`` makes it reload itself in a browser
    (``xrdpipe watch``).

    The run file is written in one transaction (:mod:`xrdpipe.safeio`): it is published at
    the end of every stage and every ``[run] checkpoint_s`` within one, never half-written.
    """
    t0 = time.perf_counter()
    say = echo or (lambda _line: None)
    run_file = exp.run.run_file
    keys = stage_keys(exp, live_key=live_key)
    summary = RunSummary(run_file)
    stages: dict[str, Callable[[], object]] = {
        "integrate": lambda: integrate_experiment(exp, progress=progress, workers=workers, scheduler=scheduler,
                                                  ready=ready, retry_s=retry_s, cache=cache),
        "echem": lambda: echem_experiment(exp, update_lattice=False),
        "fit": lambda: fit_experiment(exp, progress=progress, update_lattice=False),
        "refine": lambda: _refine(exp, progress),
        "lattice": lambda: lattice_experiment(exp),
        "plots": lambda: plot_experiment(exp, strict=False),
        "export": lambda: export_experiment(exp, progress=progress),
    }
    order = [s for s in stages if s in keys]
    with transaction(run_file, checkpoint_s=exp.run.checkpoint_s) as session:
        done = {} if force else read_stages(run_file)
        for i, stage in enumerate(order, start=1):
            stop_if_interrupted()
            prior = done.get(stage)
            outputs_ok = prior is not None and all(Path(p).exists() for p in prior.outputs)
            upstream_ran = any(summary.stages.get(d) == "ran" for d in DEPENDS[stage])
            if prior is not None and prior.key == keys[stage] and outputs_ok and not upstream_ran:
                summary.stages[stage] = "skipped"
                say(f"[{i}/{len(order)}] {stage}: unchanged since {prior.finished or '?'}, skipped")
                continue
            say(f"[{i}/{len(order)}] {stage} ...")
            result = stages[stage]()
            text = str(result)
            say("\n".join("    " + line for line in text.splitlines()))
            mark_stage(run_file, stage, keys[stage], text, outputs=_outputs_of(result))
            session.publish()
            summary.stages[stage] = "ran" if getattr(result, "changed", True) else "checked"
            summary.results[stage] = result
        _report(summary, exp, keys, force, report_refresh_s, say)
        _fill_state(summary, exp)
    summary.seconds = time.perf_counter() - t0
    return summary


def _report(summary: RunSummary, exp: Experiment, keys: dict[str, str], force: bool,
            refresh_s: float | None, say: Callable[[str], None]) -> None:
    """The last step: write report.html unless it is up to date (see the module docstring)."""
    records = read_stages(exp.run.run_file)           # as the stages of this run left them
    figures = records["plots"].outputs if "plots" in records else ()
    key = report_key(keys, refresh_s=refresh_s, figures=figures)
    prior = records.get(REPORT)
    target = report_path(exp)
    if (not force and prior is not None and prior.key == key and target.exists()
            and not any(v == "ran" for v in summary.stages.values())):
        summary.report = "skipped"
        return
    result = report_experiment(exp, keys=keys, refresh_s=refresh_s)
    mark_stage(exp.run.run_file, REPORT, key, str(result), outputs=[target])
    say(str(result))
    summary.report = "ran"
    summary.results[REPORT] = result


def _refine(exp: Experiment, progress: bool):
    return refine_experiment(exp, progress=progress, update_lattice=False)   # the lattice stage follows


def _outputs_of(result) -> list[str]:
    """The files a stage wrote, kept with its record so that deleting one reruns the stage."""
    files: list[Path] = []
    for name in ("csv_file", "index", "instprm"):
        v = getattr(result, name, None)
        if v:
            files.append(Path(v))
    if isinstance(result, PlotSummary):
        files += result.paths
    return [str(p) for p in files]


def _fill_state(summary: RunSummary, exp: Experiment) -> None:
    """Frames, failures, phases and their x ranges, and where the outputs are, from the run file."""
    run_file = exp.run.run_file
    paths = RunPaths.of(exp)
    fr = read_frames(run_file)
    status = fr.status
    summary.frames = int(status.size)
    summary.integrated = int((status == DONE).sum())
    summary.failed_frames = [str(k) for k in fr.key[status == FAILED]]
    summary.outputs["run file"] = str(run_file)
    if has_group(run_file, PEAKS):
        d = read_peaks(run_file, arrays=("done", "success", "present"))
        usable = d.done.astype(bool) & (status == DONE)
        summary.window_fits = int(usable.sum() * len(d.window))
        summary.failed_fits = int((~d.success.astype(bool))[usable].sum())
        for j, (window, phase, hkl) in enumerate(zip(d.peak_window, d.peak_phase, d.peak_hkl)):
            if phase == "free":
                summary.free_peaks[f"{hkl} (window {window})"] = int((d.present[:, j].astype(bool) & usable).sum())
        summary.outputs["peaks"] = str(paths.peaks_csv)
    ec = read_electrochemistry(run_file)
    if ec is not None:
        summary.outputs["frames"] = str(paths.frames_csv)
        summary.frames_without_echem = ec.frames_without
    lat = read_table(run_file, LATTICE)
    if lat is not None:
        summary.outputs["lattice"] = str(paths.lattice_csv)
        x = ec.x[lat["frame"]] if ec is not None and ec.x is not None else None
        present = phase_present(lat["a_A"], lat["c_A"], lat["fraction"])
        for i, name in enumerate(lat["phase"]):
            seen = present[:, i]
            xs = x[seen] if x is not None else np.array([])
            xs = xs[np.isfinite(xs)]
            if seen.any():
                summary.phases[str(name)] = (int(seen.sum()), float(xs.min()) if xs.size else np.nan,
                                             float(xs.max()) if xs.size else np.nan, "x")
    stages = read_stages(run_file)
    if "plots" in stages:
        summary.figures = [Path(p) for p in stages["plots"].outputs]
        summary.outputs["figures"] = str(paths.figures)
    if "export" in stages:
        summary.outputs["exports"] = str(paths.exports)
    if summary.report:
        summary.outputs["report"] = str(report_path(exp))
