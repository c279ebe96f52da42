"""Cycler files in, one time-stamped record out: time (absolute), voltage, current.

``read_cycler(path)`` reads BioLogic (.mpr, .mpt), Neware (.nda, .ndax, .xlsx), Arbin (.res,
.xlsx), LAND (.xlsx) and generic CSV/TSV/Excel tables (with a column mapping) into a
:class:`CyclerRecord`: POSIX seconds (UTC), volts and milliamperes, in time order.

Vendor binaries are read with maintained libraries, installed as optional extras:

=============  ===================  ==================  ======================
format         files                library             extra
=============  ===================  ==================  ======================
``neware``     .nda, .ndax          NewareNDA (BSD)     ``xrdpipe[neware]``
``biologic``   .mpr                 galvani (GPL-3.0)   ``xrdpipe[biologic]``
``arbin``      .res                 access-parser       ``xrdpipe[arbin]``
=============  ===================  ==================  ======================

Text and Excel exports (.mpt, .csv, .tsv, .txt, .xlsx, .xls) need no extra (Excel through
python-calamine).

Time: a file either stores absolute times (a time stamp per row, or a start time plus the time
since it) or only relative ones. Absolute times with a UTC offset are used as they are; local
times without one are placed in ``timezone`` (an IANA name; the error says so when it is
missing). A ``start`` replaces the file's own origin: the file's time 0 is placed at ``start``.

Example
-------
>>> rec = read_cycler("cycler.csv", columns={"time": "time/s", "voltage": "Ewe/V", "current": "I/mA"},
...                   start=datetime.fromisoformat("2025-07-02T19:00:00+08:00"))   # doctest: +SKIP
>>> rec.voltage_V[:3]                                                                # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping
from zoneinfo import ZoneInfo

import numpy as np

from .cycler_tables import _EXCEL, _TEXT, _numbers, _parse_datetime, _Raw, _read_table, _sheet_names
from .errors import CyclerReadError

__all__ = ["CyclerRecord", "read_cycler", "FORMATS", "EXTRAS", "detect_format"]

FORMATS = ("auto", "csv", "biologic", "neware", "arbin", "land")

#: the optional extra each binary format needs: (distribution, licence, extra)
EXTRAS = {
    "neware": ("NewareNDA", "BSD-3-Clause", "neware"),
    "biologic": ("galvani", "GPL-3.0", "biologic"),
    "arbin": ("access-parser", "Apache-2.0", "arbin"),
}



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

    def __len__(self) -> int:
        return int(self.time.size)

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(float(self.time[0]), timezone.utc)

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(float(self.time[-1]), timezone.utc)


def detect_format(path: Path | str) -> str:
    """The cycler format of a file from its extension (and, for Excel, its sheet names)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".mpr", ".mpt"):
        return "biologic"
    if ext in (".nda", ".ndax"):
        return "neware"
    if ext == ".res":
        return "arbin"
    if ext in _TEXT:
        try:
            with open(path, "rb") as fh:
                head = fh.read(64)
        except OSError as exc:
            raise CyclerReadError(path, f"cannot read the file: {exc}") from None
        return "biologic" if head.lstrip().upper().startswith(b"EC-LAB") else "csv"
    if ext in _EXCEL:
        names = _sheet_names(path)
        if "record" in names:                      # Neware: 'record' beside 'unit', 'test', 'cycle'...
            return "neware"
        if any(n.lower().startswith("channel") and "chart" not in n.lower() for n in names):
            return "arbin"
        if any(n.lower().startswith("record") for n in names):    # LAND: 'Record', 'Record1'...
            return "land"
        return "csv"
    raise CyclerReadError(path, f"cannot tell the cycler format from the extension {ext or '(none)'!r}; "
                                f"set [electrochemistry] format to one of {', '.join(FORMATS[1:])}")


def read_cycler(path: Path | str, *, format: str = "auto", columns: Mapping[str, str] | None = None,
                units: Mapping[str, str] | None = None, start: datetime | None = None,
                timezone: str | None = None, sheet: str | None = None) -> CyclerRecord:
    """Read a cycler file into a :class:`CyclerRecord`.

    Parameters
    ----------
    path : the cycler file
    format : ``"auto"`` (from the extension and content), ``"csv"`` (any CSV/TSV/Excel table
        with ``columns``), ``"biologic"``, ``"neware"``, ``"arbin"`` or ``"land"``
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
    ext = path.suffix.lower()
    if fmt == "biologic":
        raw = _read_mpr(path) if ext == ".mpr" else _read_mpt(path)
    elif fmt == "neware" and ext in (".nda", ".ndax"):
        raw = _read_neware_binary(path)
    elif fmt == "arbin" and ext == ".res":
        raw = _read_arbin_res(path)
    else:
        raw = _read_table(path, fmt, columns or {}, units or {}, sheet)
    return _finish(path, fmt, raw, start=start, tz=timezone)


def _finish(path: Path, fmt: str, raw: _Raw, *, start: datetime | None, tz: str | None) -> CyclerRecord:
    notes = list(raw.notes)
    n = raw.voltage_V.size
    if n == 0:
        raise CyclerReadError(path, "the file holds no data rows")
    if start is not None:
        notes = [n for n in notes if "placed on the clock" not in n]    # start wins over the file's clock
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
    elif raw.abs_s is not None:
        t = raw.abs_s
        if raw.naive:
            t = _localise(path, t, tz)
            notes.append(f"local times read in {tz}")
    elif raw.origin is not None:
        origin = raw.origin
        if origin.tzinfo is None:
            origin = _localise_one(path, origin, tz)
            notes.append(f"local times read in {tz}")
        t = origin.timestamp() + raw.rel_s
        notes.append(f"time 0 of the file at {origin.isoformat()} (from the file)")
    else:
        raise CyclerReadError(path, "the file has relative times only; set [electrochemistry] start "
                                    "(when the file's time 0 was, e.g. \"2025-07-02T19:00:00+08:00\")")
    v = np.asarray(raw.voltage_V, float)
    i = np.asarray(raw.current_mA, float)
    t = np.asarray(t, float)
    keep = np.isfinite(t) & np.isfinite(v) & np.isfinite(i)
    if not keep.any():
        raise CyclerReadError(path, "no row has a finite time, voltage and current")
    if (~keep).sum():
        notes.append(f"{int((~keep).sum())} row(s) without time, voltage or current dropped")
    step = raw.step[keep] if raw.step is not None else None
    counter = raw.counter_mAh[keep] if raw.counter_mAh is not None else None
    t, v, i = t[keep], v[keep], i[keep]
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size > max(3, t.size // 100):
        order = np.argsort(t, kind="stable")
        t, v, i = t[order], v[order], i[order]
        step = step[order] if step is not None else None
        counter = counter[order] if counter is not None else None
        notes.append("rows were not in time order and were sorted")
    elif back.size:
        # a few backward jumps: the cycler's clock was corrected. Rows are in acquisition order;
        # the later clock is trusted, and earlier rows it overlaps are dropped.
        later_min = np.minimum.accumulate(t[::-1])[::-1]
        keep = t <= np.append(later_min[1:], np.inf)
        for k in back:
            notes.append(f"the cycler clock went back {t[k] - t[k + 1]:.3g} s after row {k + 1}")
        notes.append(f"{int((~keep).sum())} row(s) overlapped by the corrected clock dropped")
        t, v, i = t[keep], v[keep], i[keep]
        step = step[keep] if step is not None else None
        counter = counter[keep] if counter is not None else None
    # one time stamp twice with two voltages in one step: a row written twice (a logger's retry, a
    # merge of two exports). Kept: the later row, as the cycler's last word at that instant.
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
        t, v, i = t[keep], v[keep], i[keep]
        step = step[keep] if step is not None else None
        counter = counter[keep] if counter is not None else None
    if counter is not None:
        counter = counter - counter[0]
    return CyclerRecord(path, fmt, t, v, i, step, tuple(notes), counter)


def _accumulate(counter: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """A continuous count from one that restarts at 0 in each segment (step or cycle)."""
    new = np.r_[True, segment[1:] != segment[:-1]]
    ends = np.flatnonzero(np.r_[new[1:], True])
    before = np.r_[0.0, np.cumsum(counter[ends])]     # the finals of the earlier segments
    return before[np.cumsum(new) - 1] + counter


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


def _missing_extra(path: Path, fmt: str, what: str) -> CyclerReadError:
    dist, licence, extra = EXTRAS[fmt]
    return CyclerReadError(
        path, f"reading {what} needs the optional extra '{extra}' ({dist}, {licence}): "
              f"pip install 'xrdpipe[{extra}]'", extra=extra)


# --------------------------------------------------------------------------------------------
# vendor binaries

def _read_neware_binary(path: Path) -> _Raw:
    try:
        import NewareNDA
    except ImportError:
        raise _missing_extra(path, "neware", "Neware .nda/.ndax files") from None
    import logging

    logging.getLogger("newarenda").setLevel(logging.WARNING)
    import warnings

    try:
        with warnings.catch_warnings():       # the library's own deprecation warnings are not the user's
            warnings.simplefilter("ignore")
            df = NewareNDA.read(str(path))
    except Exception as exc:  # the library raises many kinds on a damaged file
        raise CyclerReadError(path, f"NewareNDA cannot read it: {exc}") from None
    ts = df["Timestamp"]
    aware = getattr(ts.dt, "tz", None) is not None
    if aware:
        stamps = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    else:
        stamps = ts
    wall = (stamps.to_numpy(dtype="datetime64[ns]").astype("int64") / 1e9).astype(float)
    wall[stamps.isna().to_numpy()] = np.nan
    notes = ["Neware time stamps " + ("with UTC offset" if aware else "in the cycler's local time")]
    step = df["Step_Index"].to_numpy(int)
    net = df["Charge_Capacity(mAh)"].to_numpy(float) - np.abs(df["Discharge_Capacity(mAh)"].to_numpy(float))
    return _Raw(df["Voltage"].to_numpy(float), df["Current(mA)"].to_numpy(float), abs_s=wall, naive=not aware,
                step=step, notes=notes, counter_mAh=_accumulate(net, step))


def _read_mpr(path: Path) -> _Raw:
    try:
        from galvani import BioLogic
    except ImportError:
        raise _missing_extra(path, "biologic", "BioLogic .mpr files") from None
    try:
        mpr = BioLogic.MPRfile(str(path))
    except Exception as exc:
        raise CyclerReadError(path, f"galvani cannot read it: {exc}") from None
    d = mpr.data
    names = d.dtype.names or ()
    cols = {n: np.asarray(d[n], float) for n in names if d[n].dtype.kind in "fiu"}
    origin = getattr(mpr, "timestamp", None)
    if origin is None and getattr(mpr, "startdate", None) is not None:
        origin = datetime.combine(mpr.startdate, datetime.min.time())
    raw = _biologic_columns(path, cols)
    raw.origin = origin
    return raw


def _biologic_columns(path: Path, cols: dict[str, np.ndarray]) -> _Raw:
    """Time, voltage and current from EC-Lab's column names (.mpr and .mpt alike)."""
    if "time/s" not in cols:
        raise CyclerReadError(path, f"no time/s column (columns: {', '.join(cols)})")
    t = cols["time/s"]
    volt = next((cols[c] for c in ("Ewe/V", "Ecell/V", "<Ewe>/V", "<Ewe/V>") if c in cols), None)
    if volt is None:
        raise CyclerReadError(path, f"no Ewe/V or Ecell/V column (columns: {', '.join(cols)})")
    notes = []
    cur = next((cols[c] for c in ("I/mA", "<I>/mA") if c in cols), None)
    if cur is None and "dq/mA.h" in cols:
        dt = np.diff(t, prepend=t[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            cur = np.where(dt > 0, cols["dq/mA.h"] * 3600.0 / dt, 0.0)
        notes.append("current from dq/mA.h over each time step (the file has no I/mA)")
    elif cur is None and "(Q-Qo)/mA.h" in cols:
        q = cols["(Q-Qo)/mA.h"]
        dt = np.diff(t, prepend=t[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            cur = np.where(dt > 0, np.diff(q, prepend=q[0]) * 3600.0 / dt, 0.0)
        notes.append("current from (Q-Qo)/mA.h over each time step (the file has no I/mA)")
    elif cur is None and "control/V/mA" not in cols:
        cur = np.zeros_like(t)
        notes.append("no current column: an open-circuit (OCV) record, current 0")
    elif cur is None:
        cur = cols["control/V/mA"]
        notes.append("current from control/V/mA (the set point)")
    step = cols["Ns"].astype(int) if "Ns" in cols else None
    counter = cols.get("(Q-Qo)/mA.h")
    if counter is None and "dq/mA.h" in cols:
        counter = np.cumsum(cols["dq/mA.h"])
    return _Raw(volt, cur, rel_s=t, step=step, notes=notes, counter_mAh=counter)


def _read_mpt(path: Path) -> _Raw:
    """An EC-Lab text export (.mpt): header block, then a tab-separated table."""
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise CyclerReadError(path, f"cannot read the file: {exc}") from None
    lines = text.splitlines()
    n_header = 1
    origin = None
    for line in lines[:400]:
        m = re.match(r"\s*Nb header lines\s*:\s*(\d+)", line)
        if m:
            n_header = int(m.group(1))
        m = re.match(r"\s*Acquisition started on\s*:\s*(.+)$", line)
        if m:
            origin = _parse_datetime(m.group(1).strip(), day_first=False)
            if origin is None:
                raise CyclerReadError(path, f"cannot read the acquisition start {m.group(1).strip()!r}")
    if n_header < 1 or n_header > len(lines):
        raise CyclerReadError(path, f"'Nb header lines' says {n_header}, the file has {len(lines)} lines")
    header = [h.strip() for h in lines[n_header - 1].split("\t")]
    body = [ln.split("\t") for ln in lines[n_header:] if ln.strip()]
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        if not name:
            continue
        vals = [row[j] if j < len(row) else "" for row in body]
        arr = _numbers(vals)
        if arr is not None:
            cols[name] = arr
    raw = _biologic_columns(path, cols)
    raw.origin = origin
    if origin is None:
        raw.notes.append("no 'Acquisition started on' line: relative times only")
    return raw


def _read_arbin_res(path: Path) -> _Raw:
    try:
        from access_parser import AccessParser
    except ImportError:
        raise _missing_extra(path, "arbin", "Arbin .res files") from None
    try:
        db = AccessParser(str(path))
        data = db.parse_table("Channel_Normal_Table")
        glob = db.parse_table("Global_Table")
    except Exception as exc:
        raise CyclerReadError(path, f"cannot read it as an Arbin .res (Access) database: {exc}") from None
    need = ("Test_Time", "Voltage", "Current")
    missing = [c for c in need if c not in data]
    if missing:
        raise CyclerReadError(path, f"Channel_Normal_Table lacks {', '.join(missing)}")
    test_id = np.asarray(data.get("Test_ID", [1] * len(data["Test_Time"])))
    first = test_id == test_id[0]
    notes = []
    if not first.all():
        notes.append(f"only test {test_id[0]} of {len(np.unique(test_id))} in the file read")
    order = np.argsort(np.asarray(data.get("Data_Point", np.arange(test_id.size)))[first], kind="stable")
    t = np.asarray(data["Test_Time"], float)[first][order]
    v = np.asarray(data["Voltage"], float)[first][order]
    i = np.asarray(data["Current"], float)[first][order] * 1e3
    step = np.asarray(data["Step_Index"], int)[first][order] if "Step_Index" in data else None
    origin = None
    starts = glob.get("Start_DateTime") or []
    ids = list(glob.get("Test_ID") or [])
    if starts:
        k = ids.index(test_id[0]) if test_id[0] in ids else 0
        origin = _ole_date(float(starts[k]))
    elif "DateTime" in data:
        dt = np.asarray(data["DateTime"], float)[first][order]
        origin = _ole_date(float(dt[0])) - timedelta(seconds=float(t[0]))
    notes.append("Arbin .res: Test_Time (s) from Start_DateTime (local time); Current in A")
    counter = None
    if "Charge_Capacity" in data and "Discharge_Capacity" in data:
        net = (np.asarray(data["Charge_Capacity"], float) - np.asarray(data["Discharge_Capacity"], float))[first][order]
        cycle = np.asarray(data.get("Cycle_Index", np.ones(test_id.size)), int)[first][order]
        counter = _accumulate(net * 1e3, cycle)      # Arbin counts per cycle, in Ah
    return _Raw(v, i, rel_s=t, origin=origin, step=step, notes=notes, counter_mAh=counter)


def _ole_date(days: float) -> datetime:
    """An OLE automation date (days since 1899-12-30, local time) as a naive datetime."""
    return datetime(1899, 12, 30) + timedelta(days=days)
