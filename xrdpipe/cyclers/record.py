"""The cycler record: format detection, dispatch to the reader of each format, and the step from
a reader's raw times (relative, local or absolute) to POSIX seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping
from zoneinfo import ZoneInfo

import numpy as np

from ..errors import CyclerReadError
from .arbin import read_arbin_res
from .biologic import read_mpr, read_mpt
from .neware import read_neware_binary
from .raw import Raw
from .sniff import container, sniff_text
from .tables import read_table, sheet_names
from .vendors import VENDORS, read_vendor_table

FORMATS = ("auto", "csv", "biologic", "neware", "arbin", "land", "maccor", "basytec", "novonix")


@dataclass(frozen=True)
class CyclerRecord:
    """A cycler record in time order.

    ``time`` is POSIX seconds (UTC); ``voltage_V`` in volts; ``current_mA`` in milliamperes,
    positive on charge when the cycler follows the usual sign (see ``[electrochemistry]
    charge_current``); ``step`` the cycler's step number where the file has one. ``notes`` says
    how times and units were read. ``counter_mAh`` is the cycler's own count of the net charge
    passed since the first row (mAh, charge positive), where the file keeps one: a cycler counts
    at its internal rate, which a sparse record of a pulsed current does not resolve.
    """

    file: Path
    format: str
    time: np.ndarray
    voltage_V: np.ndarray
    current_mA: np.ndarray
    step: np.ndarray | None = None
    notes: tuple[str, ...] = ()
    counter_mAh: np.ndarray | None = None
    #: the table columns read, by role (``time``, ``datetime``, ``voltage``, ``current``: the
    #: header as written); empty for the binary formats, whose fields have fixed names
    columns: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.time.size)

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(float(self.time[0]), timezone.utc)

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(float(self.time[-1]), timezone.utc)


def detect_format(path: Path | str) -> str:
    """The cycler format of a file from its content (the first kilobytes: a vendor binary's
    signature, a spreadsheet's sheet names, a text export's header lines), whatever its name."""
    path = Path(path)
    if not path.is_file():
        raise CyclerReadError(path, "no such cycler file")
    kind = container(path)
    if kind == "mpr":
        return "biologic"
    if kind in ("nda", "ndax"):
        return "neware"
    if kind == "res":
        return "arbin"
    if kind == "excel":
        names = sheet_names(path)
        if "record" in names:                      # Neware: 'record' beside 'unit', 'test', 'cycle'...
            return "neware"
        if any(n.lower().startswith("channel") and "chart" not in n.lower() for n in names):
            return "arbin"
        if any(n.lower().startswith("record") for n in names):    # LAND: 'Record', 'Record1'...
            return "land"
        return "csv"
    if kind == "text":
        return sniff_text(path) or "csv"
    raise CyclerReadError(path, "not a cycler file this reader knows: neither text nor a BioLogic .mpr, "
                                "Neware .nda/.ndax, Arbin .res or Excel workbook; set [electrochemistry] "
                                f"format to one of {', '.join(FORMATS[1:])} if it is one")


def read_cycler(path: Path | str, *, format: str = "auto", columns: Mapping[str, str] | None = None,
                units: Mapping[str, str] | None = None, start: datetime | None = None,
                timezone: str | None = None, sheet: str | None = None) -> CyclerRecord:
    """Read a cycler file into a :class:`CyclerRecord`.

    Parameters
    ----------
    path : the cycler file
    format : ``"auto"`` (from the content), ``"csv"`` (any CSV/TSV/Excel table with
        ``columns``), ``"biologic"``, ``"neware"``, ``"arbin"``, ``"land"``, ``"maccor"``,
        ``"basytec"`` or ``"novonix"``
    columns : for tables: ``{"time": ..., "voltage": ..., "current": ...}`` and optionally
        ``"datetime"`` (an absolute time column); unnamed ones are recognised from common names
    units : units of the table columns when their headers do not say (``{"current": "A"}``)
    start : when the file's time 0 was (aware), for files with relative times only, or to
        override the file's own clock
    timezone : IANA name of the local time a file stores without UTC offset
    sheet : the Excel sheet to read (default: the vendor's data sheet or the first table)

    Raises
    ------
    CyclerReadError
        The file cannot be read, its columns or units cannot be told, or its format needs an
        optional extra that is not installed (the message names the extra).
    """
    path = Path(path)
    if not path.exists():
        raise CyclerReadError(path, "no such cycler file")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS[1:]:
        raise CyclerReadError(path, f"unknown cycler format {format!r}; expected one of {', '.join(FORMATS)}")
    kind = container(path)
    if fmt == "biologic" and kind in ("mpr", "text"):
        raw = read_mpr(path) if kind == "mpr" else read_mpt(path)
    elif fmt == "neware" and kind in ("nda", "ndax"):
        raw = read_neware_binary(path, kind)
    elif fmt == "arbin" and kind == "res":
        raw = read_arbin_res(path)
    elif fmt in VENDORS and not (fmt == "arbin" and kind == "excel"):
        raw = read_vendor_table(path, fmt, columns or {}, units or {}, sheet)
    else:
        raw = read_table(path, fmt, columns or {}, units or {}, sheet)
    return _finish(path, fmt, raw, start=start, tz=timezone)


def _finish(path: Path, fmt: str, raw: Raw, *, start: datetime | None, tz: str | None) -> CyclerRecord:
    """A reader's raw rows on the absolute clock (:func:`_absolute_times`), cleaned and in time
    order (:func:`_clean`); the counter starts at 0."""
    if raw.voltage_V.size == 0:
        raise CyclerReadError(path, "the file holds no data rows")
    notes = list(raw.notes)
    t = _absolute_times(path, raw, start, tz, notes)
    t, v, i, step, counter = _clean(path, [np.asarray(t, float), np.asarray(raw.voltage_V, float),
                                           np.asarray(raw.current_mA, float), raw.step, raw.counter_mAh], notes)
    if counter is not None:
        counter = counter - counter[0]
    return CyclerRecord(path, fmt, t, v, i, step, tuple(notes), counter, dict(raw.columns))


def _absolute_times(path: Path, raw: Raw, start: datetime | None, tz: str | None, notes: list[str]) -> np.ndarray:
    """POSIX seconds of every row: from ``start`` (which wins over the file's own clock), the
    file's absolute times (local ones placed in ``tz``), or its origin plus relative times.
    What was done is added to ``notes``."""
    if start is not None:
        notes[:] = [n for n in notes if "placed on the clock" not in n]    # start wins over the file's clock
        if start.tzinfo is None:
            if tz is None:
                raise CyclerReadError(path, "start has no UTC offset; give one (2025-07-02T19:00:00+08:00) or a timezone")
            start = start.replace(tzinfo=ZoneInfo(tz))
        if raw.rel_s is not None:
            t = start.timestamp() + raw.rel_s
        else:
            t = start.timestamp() + (raw.abs_s - raw.abs_s[np.isfinite(raw.abs_s)][0])
            notes.append("the file's own time stamps were replaced: its first row is placed at start")
        notes.append(f"time 0 of the file at {start.isoformat()} (start)")
        return t
    if raw.abs_s is not None:
        t = raw.abs_s
        if raw.naive:
            t = _localise(path, t, tz)
            notes.append(f"local times read in {tz}")
        return t
    if raw.origin is not None:
        origin = raw.origin
        if origin.tzinfo is None:
            origin = _localise_one(path, origin, tz)
            notes.append(f"local times read in {tz}")
        notes.append(f"time 0 of the file at {origin.isoformat()} (from the file)")
        return origin.timestamp() + raw.rel_s
    raise CyclerReadError(path, "the file has relative times only; set [electrochemistry] start "
                                "(when the file's time 0 was, e.g. \"2025-07-02T19:00:00+08:00\")")


def _clean(path: Path, cols: list, notes: list[str]) -> list:
    """``cols`` = [time, voltage, current, step or None, counter or None] without the rows that
    lack a time, voltage or current, in time order (a few backward jumps of the clock: the rows
    the corrected clock overlaps dropped), a row written twice kept once. What was done is
    added to ``notes``."""

    def take(sel):
        return [None if c is None else c[sel] for c in cols]

    t, v, i = cols[:3]
    keep = np.isfinite(t) & np.isfinite(v) & np.isfinite(i)
    if not keep.any():
        raise CyclerReadError(path, "no row has a finite time, voltage and current")
    if (~keep).sum():
        notes.append(f"{int((~keep).sum())} row(s) without time, voltage or current dropped")
    cols = take(keep)
    t = cols[0]
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size > max(3, t.size // 100):
        cols = take(np.argsort(t, kind="stable"))
        notes.append("rows were not in time order and were sorted")
    elif back.size:
        # a few backward jumps: the cycler's clock was corrected. Rows are in acquisition order;
        # the later clock is trusted, and earlier rows it overlaps are dropped.
        later_min = np.minimum.accumulate(t[::-1])[::-1]
        keep = t <= np.append(later_min[1:], np.inf)
        for k in back:
            notes.append(f"the cycler clock went back {t[k] - t[k + 1]:.3g} s after row {k + 1}")
        notes.append(f"{int((~keep).sum())} row(s) overlapped by the corrected clock dropped")
        cols = take(keep)
    # one time stamp twice with two voltages in one step: a row written twice (a logger's retry, a
    # merge of two exports). Kept: the later row, as the cycler's last word at that instant.
    t, v, step = cols[0], cols[1], cols[3]
    same = (np.diff(t) == 0) & (np.abs(np.diff(v)) > 1e-4)
    if step is not None:
        same &= step[1:] == step[:-1]
    if same.any():
        k = np.flatnonzero(same)
        shown = "; ".join(f"rows {j + 1} and {j + 2} at {t[j] - t[0]:.6g} s: {v[j]:.5g} V and {v[j + 1]:.5g} V"
                          for j in k[:5]) + (" ..." if k.size > 5 else "")
        notes.append(f"warning: {k.size} time stamp(s) appear twice with different voltages ({shown}); "
                     "the later row of each pair is kept")
        keep = np.ones(t.size, dtype=bool)
        keep[k] = False
        cols = take(keep)
    return cols


def _need_tz(path: Path, tz: str | None) -> ZoneInfo:
    if tz is None:
        raise CyclerReadError(path, "the file stores local times without a UTC offset; set [electrochemistry] "
                                    "timezone to the cycler computer's zone (an IANA name such as 'Europe/London')")
    return ZoneInfo(tz)


def _localise_one(path: Path, t: datetime, tz: str | None) -> datetime:
    return t.replace(tzinfo=_need_tz(path, tz))


def _localise(path: Path, wall_s: np.ndarray, tz: str | None) -> np.ndarray:
    """POSIX seconds from wall-clock seconds (local time read as if UTC), DST-aware."""
    zone = _need_tz(path, tz)
    finite = wall_s[np.isfinite(wall_s)]

    def offset(s: float) -> float:
        wall = datetime.fromtimestamp(float(s), timezone.utc).replace(tzinfo=None)
        return wall.replace(tzinfo=zone).utcoffset().total_seconds()

    first, last = offset(finite[0]), offset(finite[-1])
    if first == last:
        return wall_s - first
    # the record crosses a change of UTC offset: one offset per hour of wall clock
    hours = np.floor(wall_s / 3600.0)
    out = np.empty_like(wall_s)
    for h in np.unique(hours[np.isfinite(hours)]):
        sel = hours == h
        out[sel] = wall_s[sel] - offset(h * 3600.0 + 1800.0)
    out[~np.isfinite(wall_s)] = np.nan
    return out
