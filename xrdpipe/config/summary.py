"""A human-readable, resolved view of an experiment (what ``xrdpipe validate`` prints).
"""

from __future__ import annotations

from typing import Any

from .experiment import Experiment
from .inputs import TimesFromLog


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
    e = exp.electrochemistry
    if e is not None:
        lines.append(f"[electrochemistry] file = {e.file} (format {e.format})"
                     + (f", start = {e.start.isoformat()}" if e.start else "")
                     + (f", timezone = {e.timezone}" if e.timezone else ""))
        if e.formula:
            from ..composition import molar_mass, theoretical_capacity

            lines.append(f"  {e.formula}: M = {molar_mass(e.formula):.3f} g/mol, theoretical capacity "
                         f"{theoretical_capacity(e.formula, ion=e.ion):.1f} mAh/g; x0 = "
                         f"{e.x0 if e.x0 is not None else 'from the formula'}, active mass = {e.active_mass_mg} mg")
    pl = exp.plots
    lines.append(f"[plots] {', '.join(pl.kinds) if pl.kinds is not None else 'every kind the data allows'} "
                 f"as {'+'.join(pl.formats)} at {pl.dpi} dpi in {exp.run.output / pl.folder}")
    lines.append(f"[export] {', '.join(exp.export.formats)} in {exp.run.output / exp.export.folder}")
    return "\n".join(lines)


def _times_text(t: Any) -> str:
    if t is None:
        return "none (frames are numbered, not timed)"
    if isinstance(t, str):
        return t
    if isinstance(t, TimesFromLog):
        return f"from log {t.log}" + (f" ({t.timezone})" if t.timezone else "")
    return f"start {t.start.isoformat()}, every {t.period_s} s"
