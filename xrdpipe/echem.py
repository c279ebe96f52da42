"""Electrochemistry: capacity, half-cycles, composition and the state of charge of each frame.

A :class:`~xrdpipe.cyclers.CyclerRecord` (absolute time, voltage, current) becomes an
:class:`Electrochemistry`: the charge passed per gram of active material, integrated from the
current; half-cycles (charge, discharge, rest) with their CC and CV parts; and the alkali content
``x`` in A_xTMO2::

    x(t) = x0 - x_loss - Q(t) M / (F m)

with ``Q`` the net charge passed since the start of the record, ``M`` the molar mass of the
formula, ``m`` the active mass and ``x_loss`` an optional loss of alkali inventory from earlier
cycles (the sum of charge minus discharge capacity over them, as in the NFM study's
Supplementary Note 1). :func:`frame_states` then averages voltage, current, capacity and ``x``
over each frame's exposure and flags frames outside the record.

Example
-------
>>> rec = read_cycler("cycler.csv", timezone="Asia/Shanghai")                    # doctest: +SKIP
>>> ec = analyse_record(rec, active_mass_mg=7.2, formula="NaNi1/3Fe1/3Mn1/3O2")  # doctest: +SKIP
>>> states = frame_states(ec, frame_start_s, frame_end_s)                        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .composition import (
    FARADAY,
    capacity_per_x,
    carrier_ion,
    electrons,
    molar_mass,
    parse_formula,
    theoretical_capacity,
)
from .cyclers import CyclerRecord

__all__ = ["FARADAY", "parse_formula", "molar_mass", "theoretical_capacity", "capacity_per_x", "carrier_ion",
           "Electrochemistry", "analyse_record", "FrameStates", "frame_states", "FRAME_COLUMNS",
           "inventory_loss"]


#: frames.csv: the columns kept as a public interface, then the extras
FRAME_COLUMNS = ("frame", "time_s", "start", "end", "voltage_V", "current_mA", "capacity_mAh_g", "x", "segment",
                 "status", "half_cycle", "cycle", "mode", "half_cycle_capacity_mAh_g", "key", "time")


# --------------------------------------------------------------------------------------------
# the analysed record

@dataclass(frozen=True)
class Electrochemistry:
    """A cycler record with capacity, half-cycles and composition (one value per record row).

    ``capacity_mAh_g`` is the net charge passed since the start of the record per gram of
    active material (positive on charge); ``half_cycle`` counts charge and discharge half-cycles
    (0 before the first; a rest belongs to the half-cycle before it); ``cycle`` starts at 1 and
    grows on each charge that follows a discharge; ``segment`` is ``rest``, ``charge`` or
    ``discharge``; ``mode`` is ``rest``, ``CC`` or ``CV``; ``x`` is NaN without a formula.
    """

    record: CyclerRecord
    capacity_mAh_g: np.ndarray
    charge_mAs: np.ndarray
    segment: np.ndarray
    mode: np.ndarray
    half_cycle: np.ndarray
    cycle: np.ndarray
    half_cycle_capacity_mAh_g: np.ndarray
    x: np.ndarray
    active_mass_mg: float | None = None
    formula: str | None = None
    ion: str | None = None
    molar_mass: float | None = None
    theoretical_capacity_mAh_g: float | None = None
    x0: float | None = None
    inventory_loss_mAh_g: float = 0.0
    x_loss: float = 0.0
    rest_current_mA: float = 0.0
    sign: int = 1
    hold: np.ndarray = field(default=None, repr=False)   # interval k held at row k's current (a step change)
    notes: tuple[str, ...] = ()
    counted: bool = False                                 # charge from the cycler's counter
    half_cycle_start: np.ndarray = field(default=None, repr=False)  # first active row of half-cycle h (-1 for 0)
    capacity_per_x_mAh_g: float | None = None             # mAh/g per unit of x (with a formula)

    @property
    def time(self) -> np.ndarray:
        return self.record.time

    @property
    def voltage_V(self) -> np.ndarray:
        return self.record.voltage_V

    @property
    def current_mA(self) -> np.ndarray:
        return self.record.current_mA


def _direction(current: np.ndarray, sign: int, rest_mA: float) -> np.ndarray:
    i = sign * current
    return np.where(np.abs(i) <= rest_mA, 0, np.sign(i)).astype(np.int8)


def analyse_record(record: CyclerRecord, *, active_mass_mg: float | None = None, formula: str | None = None,
                   x0: float | None = None, ion: str | None = None, inventory_loss_mAh_g: float = 0.0,
                   charge_current: str = "positive", rest_current_mA: float | None = None,
                   capacity_source: str = "current") -> Electrochemistry:
    """Capacity, half-cycles and x of a cycler record.

    Parameters
    ----------
    record : the cycler record
    active_mass_mg : mass of active material (capacity per gram and x need it)
    formula : the cathode formula at ``x0`` (``"NaNi1/3Fe1/3Mn1/3O2"``); x needs it
    x0 : alkali content at the start of the record (default: the formula's)
    ion : the mobile ion (default: the first of Na, Li, K, Mg, Zn in the formula)
    inventory_loss_mAh_g : charge minus discharge capacity of earlier cycles not in the record
    charge_current : ``"positive"`` (the usual convention) or ``"negative"``
    rest_current_mA : currents at or below this are rest (default: 0.1 % of the largest)
    capacity_source : ``"current"`` (integrate the recorded current) or ``"cycler"`` (the
        cycler's own charge counter, for records too sparse to resolve a pulsed current)

    The current is integrated by the trapezoid rule inside a half-cycle or step; across a
    change of direction or step, the previous current is held until the row that starts the
    new one (cyclers write a row when a step starts).
    """
    t, cur = record.time, record.current_mA
    sign = 1 if charge_current == "positive" else -1
    peak = float(np.max(np.abs(cur))) if cur.size else 0.0
    rest = float(rest_current_mA) if rest_current_mA is not None else max(1e-3 * peak, 1e-12)
    direction = _direction(cur, sign, rest)
    notes = []
    same, charge_mAs = _charge(record, direction, sign, notes)
    counted = capacity_source == "cycler"
    if counted:
        if record.counter_mAh is None:
            raise ValueError(f"{record.file}: capacity_source = 'cycler', but this file keeps no charge counter")
        charge_mAs = record.counter_mAh * 3600.0
    mass_g = active_mass_mg * 1e-3 if active_mass_mg else None
    cap = charge_mAs / 3600.0 / mass_g if mass_g else np.full(t.size, np.nan)
    if not mass_g:
        notes.append("no active_mass_mg: capacity per gram and x are not computed")
    hc, hc_dir, cycle = _half_cycles(direction)
    segment, mode, hcap, hc_start = _segments(record, direction, hc, hc_dir, cap if mass_g else None)
    x = np.full(t.size, np.nan)
    mm = theo = per_x = None
    x_loss = 0.0
    if formula:
        ion = ion or carrier_ion(formula)
        mm = molar_mass(formula)
        theo = theoretical_capacity(formula, ion=ion)
        x0 = parse_formula(formula).get(ion, 0.0) if x0 is None else x0
        per_x = capacity_per_x(formula, electrons=electrons(ion))
        x_loss = inventory_loss_mAh_g / per_x
        if mass_g:
            x = x0 - x_loss - cap / per_x
    elif x0 is not None:
        notes.append("x0 without a formula: x is not computed (the molar mass is needed)")
    return Electrochemistry(record, cap, charge_mAs, segment, mode, hc, cycle, hcap, x, active_mass_mg, formula,
                            ion, mm, theo, x0, inventory_loss_mAh_g, x_loss, rest, sign, ~same, tuple(notes), counted,
                            hc_start, per_x)


def _charge(record: CyclerRecord, direction: np.ndarray, sign: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Whether each row continues the half-cycle and step of the one before (n - 1,) and the
    charge passed since the first row (mAs, by the trapezoid rule inside a half-cycle or step);
    a note where it disagrees with the cycler's own counter."""
    t, cur = record.time, record.current_mA
    same = direction[1:] == direction[:-1]
    if record.step is not None:
        same &= record.step[1:] == record.step[:-1]
    dt = np.diff(t)
    i_eff = sign * cur
    dq = np.where(same, 0.5 * (i_eff[1:] + i_eff[:-1]), i_eff[:-1]) * dt
    charge_mAs = np.concatenate([[0.0], np.cumsum(dq)])
    counter = record.counter_mAh
    if counter is not None and t.size > 1:
        throughput = float(np.sum(np.abs(dq))) / 3600.0
        gap = float(np.max(np.abs(charge_mAs / 3600.0 - counter)))
        if throughput > 0 and gap > 0.02 * throughput:
            notes.append(f"the integrated current differs from the cycler's own charge count by up to {gap:.4g} mAh "
                         f"({100 * gap / throughput:.0f} % of the charge passed): the record is too sparse for its "
                         "current (pulses?); capacity_source = \"cycler\" uses the cycler's count")
    return same, charge_mAs


def _half_cycles(direction: np.ndarray) -> tuple[np.ndarray, dict[int, int], np.ndarray]:
    """The half-cycle of each row (a change of direction between active rows starts a new one;
    rests inherit the one before them, 0 before the first), each half-cycle's direction and the
    cycle of each row (a charge after a discharge starts a new one)."""
    n = direction.size
    active = direction != 0
    hc = np.zeros(n, dtype=np.int32)
    if active.any():
        act_dir = direction[active]
        starts = np.concatenate([[True], act_dir[1:] != act_dir[:-1]])
        hc_active = np.cumsum(starts)
        idx = np.flatnonzero(active)
        hc[idx] = hc_active
        filled = np.maximum.accumulate(np.where(active, np.arange(n), -1))
        hc = np.where(filled >= 0, hc[np.maximum(filled, 0)], 0).astype(np.int32)
        hc_dir = {int(h): int(d) for h, d in zip(hc_active[starts], act_dir[starts])}
    else:
        hc_dir = {}
    cycle_of = np.ones(len(hc_dir) + 1, dtype=np.int32)        # half-cycle -> cycle
    prev = None
    for h in sorted(hc_dir):
        cycle_of[h] = cycle_of[h - 1] + (1 if hc_dir[h] > 0 and prev is not None and prev < 0 else 0)
        prev = hc_dir[h]
    return hc, hc_dir, cycle_of[hc]


def _segments(record: CyclerRecord, direction: np.ndarray, hc: np.ndarray, hc_dir: dict[int, int],
              cap: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row the segment (charge/discharge/rest), the mode (CC/CV/rest) and the capacity
    since its half-cycle began (NaN without ``cap``); the first active row of each half-cycle."""
    n, cur, volt = direction.size, record.current_mA, record.voltage_V
    active = direction != 0
    # labels per cycler row as references to three shared strings (8 bytes a row, not a string each)
    segment = np.array(["discharge", "rest", "charge"], dtype=object)[np.sign(direction).astype(int) + 1]
    mode = np.array(["rest", "CC"], dtype=object)[active.astype(int)]
    hcap = np.zeros(n)
    hc_start = np.full(len(hc_dir) + 1, -1, dtype=np.int64)
    for h, d in hc_dir.items():
        rows = np.arange(np.searchsorted(hc, h, side="left"), np.searchsorted(hc, h, side="right"))  # hc ascends
        act = rows[active[rows]]
        first = hc_start[h] = act[0]
        hcap[rows] = d * (cap[rows] - cap[first]) if cap is not None else np.nan
        i_ref = np.percentile(np.abs(cur[act]), 95)
        v_lim = volt[act].max() if d > 0 else volt[act].min()
        tol = max(3e-3, 1e-3 * abs(v_lim))
        cv = (np.abs(cur[act]) < 0.97 * i_ref) & (np.abs(volt[act] - v_lim) <= tol)
        mode[act[cv]] = "CV"
    if cap is None:
        hcap[:] = np.nan
    return segment, mode, hcap, hc_start


def inventory_loss(records: Sequence[CyclerRecord], *, active_mass_mg: float,
                   charge_current: str = "positive") -> tuple[float, int]:
    """Loss of alkali inventory from earlier records: the sum over their cycles of charge minus
    discharge capacity (mAh/g), and the number of charge half-cycles it covers."""
    total, cycles = 0.0, 0
    for rec in records:
        ec = analyse_record(rec, active_mass_mg=active_mass_mg, charge_current=charge_current)
        total += float(ec.capacity_mAh_g[-1])
        cycles += int(np.sum(ec.segment[ec.half_cycle_start[1:]] == "charge"))
    return total, cycles


# --------------------------------------------------------------------------------------------
# frames

@dataclass(frozen=True)
class FrameStates:
    """The electrochemical state of each frame, averaged over its exposure.

    ``status`` is ``ok``, ``untimed`` (the frame has no time), ``before_record`` or
    ``after_record`` (its middle is outside the cycler record: values NaN), or
    ``partly_outside_record`` (averaged over the part of the exposure the record covers).
    """

    frame: np.ndarray
    key: np.ndarray
    start: np.ndarray          # ISO 8601 with offset ('' when untimed)
    end: np.ndarray
    start_s: np.ndarray        # POSIX seconds
    end_s: np.ndarray
    time_s: np.ndarray         # middle of the exposure, seconds since the first frame's start
    voltage_V: np.ndarray
    current_mA: np.ndarray
    capacity_mAh_g: np.ndarray
    x: np.ndarray
    segment: np.ndarray
    status: np.ndarray
    half_cycle: np.ndarray
    cycle: np.ndarray
    mode: np.ndarray
    half_cycle_capacity_mAh_g: np.ndarray

    def rows(self):
        from .tables import csv_number

        for r in range(self.frame.size):
            mid = (self.start_s[r] + self.end_s[r]) / 2
            tz = datetime.fromisoformat(self.start[r]).tzinfo if self.start[r] else timezone.utc
            yield {
                "frame": int(self.frame[r]), "time_s": csv_number(self.time_s[r]), "start": self.start[r],
                "end": self.end[r], "voltage_V": csv_number(self.voltage_V[r]),
                "current_mA": csv_number(self.current_mA[r]), "capacity_mAh_g": csv_number(self.capacity_mAh_g[r]),
                "x": csv_number(self.x[r]), "segment": self.segment[r], "status": self.status[r],
                "half_cycle": "" if self.half_cycle[r] < 0 else int(self.half_cycle[r]),
                "cycle": "" if self.cycle[r] < 0 else int(self.cycle[r]), "mode": self.mode[r],
                "half_cycle_capacity_mAh_g": csv_number(self.half_cycle_capacity_mAh_g[r]), "key": self.key[r],
                "time": datetime.fromtimestamp(mid, tz).isoformat() if np.isfinite(mid) else "",
            }

    def write_csv(self, path: Path | str) -> Path:
        from .tables import write_csv

        return write_csv(path, FRAME_COLUMNS, self.rows())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.status:
            out[s] = out.get(s, 0) + 1
        return out


def _at(t: np.ndarray, y: np.ndarray, tq: np.ndarray, hold: np.ndarray | None = None) -> np.ndarray:
    """Piecewise-linear value at ``tq`` (t non-decreasing; a repeated time takes the later row);
    across an interval flagged in ``hold`` (a step change) the earlier row's value holds."""
    if t.size == 1:
        return np.full(np.shape(tq), y[0], dtype=float)
    k = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, t.size - 2)
    dt = t[k + 1] - t[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.clip(np.where(dt > 0, (tq - t[k]) / dt, 1.0), 0.0, 1.0)
    if hold is not None:
        f = np.where(hold[k] & (tq < t[k + 1]), 0.0, f)
    return y[k] + (y[k + 1] - y[k]) * f


def _charge_at(ec: Electrochemistry, tq: np.ndarray) -> np.ndarray:
    """Charge passed (mA s) at ``tq``, exactly as the record integrates it."""
    t, i = ec.time, ec.sign * ec.current_mA
    if t.size == 1:
        return np.zeros(np.shape(tq))
    if ec.counted:
        return _at(t, ec.charge_mAs, tq)
    k = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, t.size - 2)
    i_q = _at(t, i, tq, ec.hold)
    return ec.charge_mAs[k] + (np.minimum(tq, t[k + 1]) - t[k]) * 0.5 * (i[k] + i_q) + \
        np.maximum(tq - t[k + 1], 0.0) * i[k + 1]


def _mean_over(t: np.ndarray, fn, a: float, b: float) -> float:
    """Mean of ``fn`` over [a, b]: Simpson's rule between the record's rows (exact for the
    piecewise-linear voltage and the piecewise-quadratic charge)."""
    if b <= a:
        return float(fn(np.array([a]))[0])
    lo, hi = np.searchsorted(t, a, side="right"), np.searchsorted(t, b, side="left")
    pts = np.unique(np.concatenate([[a], t[lo:hi], [b]]))
    left = fn(pts[:-1])
    right = fn(np.nextafter(pts[1:], -np.inf))      # left limits: a step change happens at a row
    m = fn(0.5 * (pts[1:] + pts[:-1]))
    w = np.diff(pts)
    return float(np.sum(w * (left + 4 * m + right) / 6.0) / (b - a))


def _exposure_means(ec: Electrochemistry, a: float, b: float) -> dict[str, float]:
    """Voltage, current and (with a mass) capacity and x averaged over [a, b] (POSIX seconds,
    inside the record)."""
    t = ec.time
    mass = ec.active_mass_mg * 1e-3 if ec.active_mass_mg else None
    per_x = ec.capacity_per_x_mAh_g if mass else None
    out = {"voltage_V": _mean_over(t, lambda q: _at(t, ec.voltage_V, q, ec.hold), a, b)}
    if b > a:
        q = _charge_at(ec, np.array([a, b]))
        out["current_mA"] = ec.sign * (q[1] - q[0]) / (b - a)
    else:
        out["current_mA"] = float(_at(t, ec.current_mA, np.array([a]), ec.hold)[0])
    if mass:
        q_mean = _mean_over(t, lambda q: _charge_at(ec, q), a, b)
        out["capacity_mAh_g"] = q_mean / 3600.0 / mass
        if per_x is not None:
            out["x"] = ec.x0 - ec.x_loss - out["capacity_mAh_g"] / per_x
    return out


def frame_states(ec: Electrochemistry, start_s: np.ndarray, end_s: np.ndarray, *,
                 start: Sequence[str] | None = None, end: Sequence[str] | None = None,
                 keys: Sequence[str] | None = None) -> FrameStates:
    """The state of each frame, averaged over its exposure [start_s, end_s] (POSIX seconds,
    NaN for untimed frames). ``start``/``end`` are the frames' own ISO times (kept as given)."""
    start_s = np.asarray(start_s, float)
    end_s = np.asarray(end_s, float)
    n = start_s.size
    t = ec.time
    t0, t1 = float(t[0]), float(t[-1])
    timed = np.isfinite(start_s) & np.isfinite(end_s)
    first = float(np.min(start_s[timed])) if timed.any() else np.nan
    mid = 0.5 * (start_s + end_s)
    out = {k: np.full(n, np.nan) for k in ("voltage_V", "current_mA", "capacity_mAh_g", "x", "half_cycle_capacity_mAh_g")}
    status = np.full(n, "untimed", dtype=object)
    segment = np.full(n, "", dtype=object)
    mode = np.full(n, "", dtype=object)
    half = np.full(n, -1, dtype=np.int32)
    cyc = np.full(n, -1, dtype=np.int32)
    mass = ec.active_mass_mg * 1e-3 if ec.active_mass_mg else None
    for r in np.flatnonzero(timed):
        a, b, m = start_s[r], end_s[r], mid[r]
        if m < t0:
            status[r] = "before_record"
            continue
        if m > t1:
            status[r] = "after_record"
            continue
        status[r] = "ok"
        if a < t0 or b > t1:
            status[r] = "partly_outside_record"
            a, b = max(a, t0), min(b, t1)
        for name, v in _exposure_means(ec, a, b).items():
            out[name][r] = v
        k = int(np.clip(np.searchsorted(t, m, side="right") - 1, 0, t.size - 1))
        segment[r], mode[r] = ec.segment[k], ec.mode[k]
        half[r], cyc[r] = ec.half_cycle[k], ec.cycle[k]
        if mass and ec.half_cycle[k] > 0:
            row0 = ec.half_cycle_start[ec.half_cycle[k]]
            d = 1 if ec.segment[row0] == "charge" else -1
            out["half_cycle_capacity_mAh_g"][r] = d * (out["capacity_mAh_g"][r] - ec.capacity_mAh_g[row0])
        elif mass:
            out["half_cycle_capacity_mAh_g"][r] = 0.0
    iso = lambda v: np.array([datetime.fromtimestamp(s, timezone.utc).isoformat() if np.isfinite(s) else ""  # noqa: E731
                              for s in v], dtype=object)
    return FrameStates(
        frame=np.arange(n), key=np.asarray(keys if keys is not None else [""] * n, dtype=object),
        start=np.asarray(start, dtype=object) if start is not None else iso(start_s),
        end=np.asarray(end, dtype=object) if end is not None else iso(end_s),
        start_s=start_s, end_s=end_s, time_s=mid - first, segment=segment, status=status, half_cycle=half,
        cycle=cyc, mode=mode, **out)
