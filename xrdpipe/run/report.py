"""The report step: gather what the run file and the figures hold, write ``<output>/report.html``.

``report_experiment(exp)`` reads the frame table, the electrochemistry and lattice tables, the
stage records and the provenance of the run file, and the figure files the plots stage wrote,
hands them to :func:`xrdpipe.report.build_report` and writes the page atomically (a browser
reloading it never sees half a page). It is the last step of ``xrdpipe run``; ``xrdpipe report``
rewrites it; ``xrdpipe watch`` writes it with a self-refresh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Experiment
from ..lattice import phase_present
from ..report import Figure, ReportData, StageRow, build_report
from ..safeio import write_text_atomic
from .access import reading, text
from .groups import read_electrochemistry, read_table
from .paths import LATTICE, PROCESS, RunPaths, h5path
from .stage import DEPENDS, takes_experiment
from .stagelog import read_stages
from .store import DONE, FAILED, read_frames

__all__ = ["report_experiment", "ReportSummary", "report_path"]

_MIME = {".png": "image/png", ".svg": "image/svg+xml"}


@dataclass
class ReportSummary:
    """What the report step wrote."""

    path: Path
    frames: int = 0
    failed: int = 0
    figures: int = 0
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"report: {self.path} ({self.frames} frame(s), {self.failed} failed, {self.figures} figure(s))"]
        lines += [f"  not in the report: {m}" for m in self.missing]
        return "\n".join(lines)


def report_path(exp: Experiment) -> Path:
    """``<output>/report.html``."""
    return RunPaths.of(exp).output / "report.html"


@takes_experiment
def report_experiment(exp: Experiment, *, keys: dict[str, str] | None = None,
                      refresh_s: float | None = None) -> ReportSummary:
    """Write ``<output>/report.html`` from the run file of ``exp`` (see the module docstring).

    ``keys`` are the current stage keys (:func:`~xrdpipe.run.workflow.stage_keys`): with them
    each stage is said to be up to date, out of date, not run yet or not configured. With
    ``refresh_s`` the page reloads itself every that many seconds (for ``xrdpipe watch``).

    Raises
    ------
    StoreError
        The run file does not exist or is not a run file (nothing has been integrated yet).
    """
    run_file = Path(exp.run.run_file)
    paths = RunPaths.of(exp)
    fr = read_frames(run_file)        # a clear error when there is no run file
    status = np.where(fr.status == DONE, "done", np.where(fr.status == FAILED, "failed", "pending"))
    missing: list[str] = []
    ec = read_electrochemistry(run_file, names=("x",))
    x = np.asarray(ec.x, float) if ec is not None and ec.x is not None else None
    if ec is not None and ec.frames_without:
        missing.append(f"electrochemistry: {ec.frames_without} frame(s) were integrated after the echem stage "
                       "ran and have no x yet (run 'xrdpipe echem' again)")
    if ec is None:
        missing.append("electrochemistry: the echem stage has not run"
                       + ("" if exp.electrochemistry is not None else " (no [electrochemistry] section)")
                       + "; no x per frame")
    lat = read_table(run_file, LATTICE, names=("frame", "phase", "a_A", "c_A", "fraction"))
    phases = frames_l = present = None
    if lat is not None:
        seen = phase_present(lat["a_A"], lat["c_A"], lat["fraction"])
        keep = np.asarray(fr.status)[lat["frame"]] == DONE        # frames not integrated are not compared
        phases, frames_l, present = [str(p) for p in lat["phase"]], lat["frame"][keep], seen[keep]
    else:
        missing.append("lattice: the fit and lattice stages have not run" if exp.windows and exp.phases
                       else "lattice: no [[windows]] and [[phases]] configured")
    records = read_stages(run_file)
    figures, notes = _figures(exp, records, paths)
    if "plots" not in records:
        missing.append("figures: the plots stage has not run (or has not finished)")
    prov = _provenance(run_file)
    data = ReportData(
        title=exp.run.name, generated=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=__version__,
        frame_key=list(fr.key), status=list(status), message=list(fr.message), time_s=np.asarray(fr.time_s, float),
        x=x, phases=phases, lattice_frame=frames_l, present=present, figures=figures, figure_notes=notes,
        stages=_stages(records, keys), missing=missing, refresh_s=refresh_s,
        experiment_text=prov.get("experiment", "") or (exp.text or ""),
        experiment_file=prov.get("experiment_file", "") or (f"{exp.source or 'the experiment'} (the current file: "
                                                            "the run file recorded none)"),
        poni_text=prov.get("poni", ""), poni_file=prov.get("poni_file", ""), method=prov.get("method", ""),
        packages=_packages(prov.get("packages", "")))
    target = report_path(exp)
    write_text_atomic(target, build_report(data))
    return ReportSummary(target, int(status.size), int((status == "failed").sum()), len(figures), missing)


def _figures(exp: Experiment, records, paths: RunPaths) -> tuple[list[Figure], list[str]]:
    """The figures the plots stage wrote (PNG, else SVG, per figure) and notes on the others."""
    notes: list[str] = []
    if "plots" in records:
        files = [Path(p) for p in records["plots"].outputs]
        notes += [line.strip() for line in records["plots"].summary.splitlines() if " not drawn: " in line]
    else:
        files = sorted(paths.figures.glob(f"{exp.run.name}_*")) if paths.figures.is_dir() else []
        if files:
            notes.append(f"figures found in {paths.figures} (not recorded by a plots stage of 'xrdpipe run')")
    by_stem: dict[Path, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.with_suffix(""), []).append(f)
    out: list[Figure] = []
    prefix = f"{exp.run.name}_"
    for stem, group in by_stem.items():
        shown = next((f for suffix in (".png", ".svg") for f in group if f.suffix.lower() == suffix), None)
        if shown is None:
            notes.append(f"{', '.join(f.name for f in group)}: not embeddable (only PNG and SVG are shown)")
            continue
        try:
            data = shown.read_bytes()
        except OSError as exc:
            notes.append(f"{shown}: cannot be read ({exc.strerror or exc})")
            continue
        kind = stem.name[len(prefix):] if stem.name.startswith(prefix) else stem.name
        out.append(Figure(kind, shown.name, data, _MIME[shown.suffix.lower()]))
    return out, notes


def _stages(records, keys: dict[str, str] | None) -> list[StageRow]:
    names = [s for s in DEPENDS if (keys is not None and s in keys) or s in records]
    rows = []
    for s in names:
        rec = records.get(s)
        if rec is None:
            state = "not run yet"
        elif keys is None:
            state = "finished"
        elif s not in keys:
            state = "not configured now"
        else:
            state = "up to date" if rec.key == keys[s] else "out of date (settings or inputs changed)"
        rows.append(StageRow(s, state, rec.key if rec else "", rec.finished if rec else "", rec.summary if rec else ""))
    if keys is not None:
        rows += [StageRow(s, "not configured") for s in DEPENDS if s not in names]
    return rows


def _provenance(run_file: Path) -> dict[str, str]:
    """The strings of ``/entry/process`` (experiment text, PONI, versions...)."""
    out: dict[str, str] = {}
    with reading(run_file) as h5:
        g = h5[h5path(PROCESS)]
        for name, item in g.items():
            if hasattr(item, "shape") and item.shape == ():
                v = item[()]
                out[name] = text(v)
    return out


def _packages(text: str) -> dict[str, str]:
    try:
        d = json.loads(text) if text else {}
    except ValueError:
        return {"packages": text}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}
