"""The echem stage on an experiment: the cycler record read and analysed (capacity, x, half-cycles),
and every frame of the run file given its voltage, current, capacity and x, into
``/entry/electrochemistry`` and ``frames.csv``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Experiment, TimesFromLog
from ..errors import ConfigError
from .groups import ECHEM_COLUMNS, has_group, write_table
from .lattice import lattice_experiment
from .nexus import Curve, write_nxdata
from .paths import ECHEM_RECORD, ELECTROCHEMISTRY, LATTICE, RunPaths, h5path
from .stage import stage, takes_experiment
from .store import read_frames

__all__ = ["EchemSummary", "echem_experiment"]


@dataclass
class EchemSummary:
    """What an electrochemistry run did."""

    run_file: Path
    csv_file: Path
    record_file: Path
    record_rows: int
    record_start: str
    record_end: str
    frames: int
    status: dict[str, int] = field(default_factory=dict)
    x_range: tuple[float, float] | None = None
    theoretical_capacity_mAh_g: float | None = None
    inventory_loss_mAh_g: float = 0.0
    notes: tuple[str, ...] = ()
    lattice_updated: bool = False
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"cycler record {self.record_file.name}: {self.record_rows} rows, {self.record_start} to "
                 f"{self.record_end}"]
        lines += [f"  {n}" for n in self.notes]
        if self.theoretical_capacity_mAh_g is not None:
            lines.append(f"theoretical capacity {self.theoretical_capacity_mAh_g:.1f} mAh/g"
                         + (f"; inventory loss {self.inventory_loss_mAh_g:.2f} mAh/g" if self.inventory_loss_mAh_g else ""))
        lines.append(f"{self.frames} frame(s): " + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())))
        if self.x_range is not None:
            lines.append(f"x from {self.x_range[0]:.4f} to {self.x_range[1]:.4f}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"frames: {self.csv_file}" + ("  (lattice.csv updated with voltage and x)"
                                                   if self.lattice_updated else ""))
        return "\n".join(lines)


def _frame_timezone(exp: Experiment) -> str | None:
    """The timezone the frame times were read in, if one was given."""
    spec = exp.frames if exp.frames is not None else exp.patterns
    times = getattr(spec, "times", None)
    if isinstance(times, TimesFromLog) and times.timezone:
        return times.timezone
    return getattr(spec, "timezone", None)


def _implausible(states, ec, spec) -> list[str]:
    """Frames whose x or capacity no cell can reach (x below 0 or above x0 + 0.2, a capacity
    above 1.5 times the formula's theoretical one) get the status ``implausible``; the warning
    names the likely causes (a current in A read as mA, the active mass)."""
    x, cap = states.x, states.capacity_mAh_g
    bad = np.zeros(x.size, dtype=bool)
    why = []
    with np.errstate(invalid="ignore"):
        if ec.x0 is not None:
            out = np.isfinite(x) & ((x < 0) | (x > ec.x0 + 0.2))
            if out.any():
                why.append(f"x reaches {np.nanmin(x):.4g} to {np.nanmax(x):.4g}, outside 0 to x0 + 0.2 = "
                           f"{ec.x0 + 0.2:.3g}")
            bad |= out
        theo = ec.theoretical_capacity_mAh_g
        if theo:
            over = np.isfinite(cap) & (np.abs(cap) > 1.5 * theo)
            if over.any():
                why.append(f"the capacity reaches {np.nanmax(np.abs(cap)):.4g} mAh/g, above 1.5 x the theoretical "
                           f"{theo:.1f} mAh/g of {spec.formula}")
            bad |= over
    if not bad.any():
        return []
    states.status[bad] = "implausible"
    return [f"{'; '.join(why)} in {int(bad.sum())} frame(s) (status 'implausible'): check the current's unit "
            f"(header or units = {{ current = \"A\" }}), active_mass_mg ({spec.active_mass_mg}) and x0"]


def _outside_record(states, start_s: np.ndarray, end_s: np.ndarray, start, end, rec, spec) -> list[str]:
    """A warning where no timed frame lies within the cycler record (every one before or after
    it): the two clocks disagree, so no frame gets a voltage or x, and the run would otherwise
    finish as if nothing were wrong."""
    timed = np.flatnonzero(np.isfinite(start_s) & np.isfinite(end_s))
    if not timed.size or np.isin(states.status[timed], ("before_record", "after_record")).sum() < timed.size:
        return []
    first, last = timed[np.argmin(start_s[timed])], timed[np.argmax(end_s[timed])]
    side = {"before_record": "before", "after_record": "after"}
    where = ", ".join(f"{n} {side[k]} it" for k, n in sorted(states.counts().items()) if k in side)
    told = (f"[electrochemistry] start = {spec.start.isoformat()} sets the record's clock; "
            if spec.start is not None else "")
    return [f"no frame lies within the cycler record ({where}): the frames run from {start[first]} to "
            f"{end[last]}, the record ({spec.file}) from {rec.start.isoformat()} to {rec.end.isoformat()}. "
            f"{told}check the frames' times ([frames] times, timezone) and the cycler's start and timezone"]


@takes_experiment
def echem_experiment(exp: Experiment, *, update_lattice: bool = True) -> EchemSummary:
    """Read the cycler file of ``[electrochemistry]``, integrate capacity and x, and give every
    frame of the run file its voltage, current, capacity, x and half-cycle (averaged over its
    exposure): ``/entry/electrochemistry`` (with the whole record in ``record``) and
    ``<output>/frames.csv``. Recomputed whole; it takes seconds. With ``update_lattice`` (and a
    lattice table in the run file) the lattice is recomputed to carry the new voltage and x."""
    from ..echem import frame_states
    from ..timing import iso_seconds

    spec = exp.electrochemistry
    if spec is None:
        raise ConfigError(str(exp.source or "experiment"), [(
            "electrochemistry", "no [electrochemistry] section; add one with file = \"cycler.csv\" (see the README)")])
    rec, loss, notes = _read_record(exp, spec)
    ec = _analyse(exp, spec, rec, loss)
    notes += list(ec.notes)
    fr = read_frames(exp.run.run_file)
    start_s, end_s = iso_seconds(fr.start), iso_seconds(fr.end)
    states = frame_states(ec, start_s, end_s, start=fr.start, end=fr.end, keys=fr.key)
    warnings = [n.removeprefix("warning: ") for n in notes if n.startswith("warning: ")]
    notes = [n for n in notes if not n.startswith("warning: ")]
    warnings += _outside_record(states, start_s, end_s, fr.start, fr.end, rec, spec)
    warnings += _implausible(states, ec, spec)
    timed = np.isfinite(start_s)
    t_first = float(np.nanmin(start_s)) if timed.any() else float(rec.time[0])
    per_frame = {name: getattr(states, name) for name in ECHEM_COLUMNS}
    with stage(exp, "echem"):
        write_table(exp.run.run_file, ELECTROCHEMISTRY, {**per_frame, "record": _record(rec, ec, t_first)},
                    _attrs(spec, rec, ec, loss, notes))
        # the cycler's voltage against time, as NXdata (links into the record)
        record = h5path(ECHEM_RECORD)
        write_nxdata(exp.run.run_file, "voltage", [Curve("voltage", f"{record}/voltage_V")],
                     axis=("time_s", f"{record}/time_s", "s"), units="V", long_name="cell voltage")
    csv_file = states.write_csv(RunPaths.of(exp).frames_csv)
    xs = states.x[np.isfinite(states.x)]
    summary = EchemSummary(exp.run.run_file, csv_file, spec.file, len(rec), rec.start.isoformat(), rec.end.isoformat(),
                           int(states.frame.size), states.counts(),
                           (float(xs.max()), float(xs.min())) if xs.size else None,
                           ec.theoretical_capacity_mAh_g, loss, tuple(notes), warnings=tuple(warnings))
    if update_lattice and exp.phases and has_group(exp.run.run_file, LATTICE):
        lattice_experiment(exp)
        summary.lattice_updated = True
    return summary


def _read_record(exp: Experiment, spec):
    """The cycler record, the inventory loss (mAh/g) and notes on both."""
    from datetime import datetime, timezone

    from ..cyclers import read_cycler
    from ..echem import inventory_loss

    read = dict(format=spec.format, columns=spec.columns, units=spec.units, sheet=spec.sheet,
                timezone=spec.timezone or _frame_timezone(exp))
    rec = read_cycler(spec.file, start=spec.start, **read)
    loss = spec.inventory_loss_mAh_g or 0.0
    notes = list(rec.notes)
    if spec.inventory_loss_from:
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)   # only durations matter here
        history = [read_cycler(p, start=epoch, **{**read, "format": "auto", "columns": {}, "units": {}, "sheet": None})
                   for p in spec.inventory_loss_from]
        loss, n_cycles = inventory_loss(history, active_mass_mg=spec.active_mass_mg,
                                        charge_current=spec.charge_current)
        notes.append(f"inventory loss {loss:.2f} mAh/g from {n_cycles} earlier cycle(s) in "
                     f"{', '.join(p.name for p in spec.inventory_loss_from)}")
    return rec, loss, notes


def _analyse(exp: Experiment, spec, rec, loss: float):
    """Capacity, x and half-cycles of the record (an impossible capacity source: the key named)."""
    from ..echem import analyse_record

    try:
        return analyse_record(rec, active_mass_mg=spec.active_mass_mg, formula=spec.formula, x0=spec.x0, ion=spec.ion,
                              inventory_loss_mAh_g=loss, charge_current=spec.charge_current,
                              rest_current_mA=spec.rest_current_mA, capacity_source=spec.capacity_source)
    except ValueError as exc:
        raise ConfigError(str(exp.source or "experiment"), [("electrochemistry.capacity_source", str(exc))]) from None


def _record(rec, ec, t_first: float) -> dict:
    """The whole cycler record as the ``record`` subgroup of ``/entry/electrochemistry``."""
    return {"arrays": {
        "time": rec.time, "time_s": rec.time - t_first, "voltage_V": rec.voltage_V, "current_mA": rec.current_mA,
        "capacity_mAh_g": ec.capacity_mAh_g, "x": ec.x, "segment": ec.segment, "mode": ec.mode,
        "half_cycle": ec.half_cycle, "cycle": ec.cycle, "half_cycle_capacity_mAh_g": ec.half_cycle_capacity_mAh_g},
        "attrs": {"time_units": "POSIX s (UTC)", "time_s_origin": "the first frame's start"}}


def _attrs(spec, rec, ec, loss: float, notes: list[str]) -> dict:
    """The attributes of ``/entry/electrochemistry``: where the record came from, the cell's numbers."""
    return {
        "file": str(spec.file), "format": rec.format, "notes": "\n".join(notes),
        "record_start": rec.start.isoformat(), "record_end": rec.end.isoformat(),
        "active_mass_mg": spec.active_mass_mg if spec.active_mass_mg else np.nan,
        "formula": spec.formula or "", "ion": ec.ion or "",
        "molar_mass_g_mol": ec.molar_mass if ec.molar_mass else np.nan,
        "theoretical_capacity_mAh_g": ec.theoretical_capacity_mAh_g if ec.theoretical_capacity_mAh_g else np.nan,
        "x0": ec.x0 if ec.x0 is not None else np.nan, "inventory_loss_mAh_g": loss, "x_loss": ec.x_loss,
        "charge_current": spec.charge_current, "rest_current_mA": ec.rest_current_mA,
        "capacity": "net charge passed since the record began, per gram of active material (mAh/g)",
    }
