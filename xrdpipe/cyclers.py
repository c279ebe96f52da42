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

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence
from zoneinfo import ZoneInfo

import numpy as np

from .errors import CyclerReadError

__all__ = ["CyclerRecord", "read_cycler", "FORMATS", "EXTRAS", "detect_format"]

FORMATS = ("auto", "csv", "biologic", "neware", "arbin", "land")

#: the optional extra each binary format needs: (distribution, licence, extra)
EXTRAS = {
    "neware": ("NewareNDA", "BSD-3-Clause", "neware"),
    "biologic": ("galvani", "GPL-3.0", "biologic"),
    "arbin": ("access-parser", "Apache-2.0", "arbin"),
}

_EXCEL = (".xlsx", ".xlsm", ".xls", ".xlsb", ".ods")
_TEXT = (".csv", ".tsv", ".txt", ".dat")


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


# --------------------------------------------------------------------------------------------
# the raw form every reader returns; one function turns it into absolute times

@dataclass
class _Raw:
    voltage_V: np.ndarray
    current_mA: np.ndarray
    rel_s: np.ndarray | None = None          # seconds since ``origin`` (or since the file's time 0)
    origin: datetime | None = None           # naive (local) or aware
    abs_s: np.ndarray | None = None          # POSIX seconds; wall clock read as UTC when ``naive``
    naive: bool = False
    step: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    counter_mAh: np.ndarray | None = None


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


# --------------------------------------------------------------------------------------------
# tables: CSV/TSV/text and Excel, generic or vendor exports

# header names recognised without a mapping, most specific first (compared lower-case, spaces squeezed)
_NAMES = {
    "datetime": ("datetime", "date_time", "date time", "timestamp", "time stamp", "realtime", "real time",
                 "systime", "sys time", "system time", "absolute time", "abs time", "absolute_time", "date"),
    "time": ("time/s", "time /s", "time(s)", "time (s)", "time_s", "test_time(s)", "test time(s)", "test_time",
             "test time", "total time", "total time(s)", "testtime", "testtime/s", "testtime/h", "testtime/min",
             "elapsed time", "elapsed_time", "time/h", "time/min", "time"),
    "voltage": ("ewe/v", "ewe /v", "ecell/v", "voltage(v)", "voltage/v", "voltage (v)", "voltage_v", "voltage",
                "e /v", "e/v", "potential/v", "potential (v)", "potential", "u/v", "volt"),
    "current": ("i/ma", "<i>/ma", "i /ma", "current(ma)", "current/ma", "current (ma)", "current_ma", "current(a)",
                "current/a", "current (a)", "current(ua)", "current/ua", "i/a", "<i>/a", "current"),
}
# the data sheets of vendor exports
_SHEETS = {"neware": ("record",), "arbin": ("channel",), "land": ("record",)}

_UNITS = {
    "current": {"a": 1e3, "ma": 1.0, "ua": 1e-3, "µa": 1e-3, "μa": 1e-3, "na": 1e-6},
    "voltage": {"v": 1.0, "mv": 1e-3},
    "time": {"s": 1.0, "sec": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "d": 86400.0},
}


def _norm(name: Any) -> str:
    return re.sub(r"\s+", " ", str(name if name is not None else "").strip().lower())


def _header_unit(name: str) -> str | None:
    m = re.search(r"[/(\[]\s*([a-zµμ]+)\s*[)\]]?\s*$", _norm(name))
    return m.group(1) if m else None


def _sheet_names(path: Path) -> list[str]:
    try:
        from python_calamine import CalamineWorkbook

        return list(CalamineWorkbook.from_path(str(path)).sheet_names)
    except Exception as exc:
        raise CyclerReadError(path, f"cannot read it as a spreadsheet: {exc}") from None


def _table_blocks(path: Path, fmt: str, sheet: str | None) -> list[tuple[str, list[list[Any]]]]:
    """(label, rows) of the sheets or text table that hold the record."""
    ext = path.suffix.lower()
    if ext not in _EXCEL:
        return [(path.name, _text_rows(path))]
    from python_calamine import CalamineWorkbook

    try:
        wb = CalamineWorkbook.from_path(str(path))
    except Exception as exc:
        raise CyclerReadError(path, f"cannot read it as a spreadsheet: {exc}") from None
    names = list(wb.sheet_names)
    if sheet is not None:
        if sheet not in names:
            raise CyclerReadError(path, f"no sheet {sheet!r} (sheets: {', '.join(names)})")
        chosen = [sheet]
    else:
        prefixes = _SHEETS.get(fmt, ())
        if fmt == "neware":
            chosen = [n for n in names if n.lower() == "record"]
        else:
            chosen = [n for n in names if prefixes and n.lower().startswith(prefixes) and "chart" not in n.lower()]
        chosen = chosen or names
    return [(n, wb.get_sheet_by_name(n).to_python(skip_empty_area=False)) for n in chosen]


def _text_rows(path: Path) -> list[list[str]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CyclerReadError(path, f"cannot read the file: {exc}") from None
    for enc in ("utf-8-sig", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    lines = text.splitlines()
    sample = "\n".join(lines[:200])
    counts = {d: sample.count(d) for d in ("\t", ";", ",")}
    delim = "\t" if counts["\t"] >= max(1, counts[","] // 4) and counts["\t"] else (
        ";" if counts[";"] > counts[","] // 2 and counts[";"] else ",")
    return [row for row in csv.reader(io.StringIO(text), delimiter=delim)]


def _find_header(rows: list[list[Any]], wanted: Mapping[str, str]) -> int | None:
    """Index of the header row: the first row naming every mapped column, or (without a mapping)
    a known voltage, current and time column."""
    want = {_norm(v) for v in wanted.values()}
    for k, row in enumerate(rows[:60]):
        names = {_norm(c) for c in row if c not in (None, "")}
        if want:
            if want <= names:
                return k
            continue
        has = {kind: any(n in names for n in _NAMES[kind]) for kind in _NAMES}
        if has["voltage"] and has["current"] and (has["time"] or has["datetime"]):
            return k
    return None


def _read_table(path: Path, fmt: str, columns: Mapping[str, str], units: Mapping[str, str],
                sheet: str | None) -> _Raw:
    bad = set(columns) - {"time", "voltage", "current", "datetime"}
    if bad:
        raise CyclerReadError(path, f"unknown column role(s) {sorted(bad)}; expected time, voltage, current, datetime")
    header: list[Any] | None = None
    data: list[list[Any]] = []
    label = ""
    for name, rows in _table_blocks(path, fmt, sheet):
        k = _find_header(rows, columns)
        if header is None:
            if k is None:
                continue
            header, label = [str(c).strip() if c is not None else "" for c in rows[k]], name
            data.extend(rows[k + 1:])
        elif k is not None and [str(c).strip() if c is not None else "" for c in rows[k]] == header:
            data.extend(rows[k + 1:])          # a continuation sheet with its own header
        elif k is None:
            data.extend(rows)                  # a continuation sheet without a header
    if header is None:
        want = ", ".join(f"{r} = {c!r}" for r, c in columns.items()) or "time, voltage and current columns"
        raise CyclerReadError(path, f"cannot find a header row with {want} in the first 60 rows; "
                                    "set [electrochemistry] columns = { time = ..., voltage = ..., current = ... }")
    normed = [_norm(h) for h in header]

    def pick(role: str) -> int | None:
        if role in columns:
            try:
                return normed.index(_norm(columns[role]))
            except ValueError:
                close = [h for h in header if _norm(columns[role]) in _norm(h) or _norm(h) in _norm(columns[role])]
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise CyclerReadError(path, f"no column {columns[role]!r} ({role}){hint} in {label}; "
                                            f"columns: {', '.join(h for h in header if h)}") from None
        for name in _NAMES[role]:
            if name in normed:
                return normed.index(name)
        return None

    c_time, c_abs, c_volt, c_cur = pick("time"), pick("datetime"), pick("voltage"), pick("current")
    if c_abs is not None and c_abs == c_time:
        c_abs = None
    missing = [r for r, c in (("voltage", c_volt), ("current", c_cur)) if c is None]
    if c_time is None and c_abs is None:
        missing.insert(0, "time")
    if missing:
        raise CyclerReadError(path, f"cannot find the {', '.join(missing)} column(s) in {label} "
                                    f"(columns: {', '.join(h for h in header if h)}); "
                                    "name them in [electrochemistry] columns")
    rows = [r for r in data if any(c not in (None, "") for c in r)]

    def column(j: int) -> list[Any]:
        return [r[j] if j < len(r) else None for r in rows]

    notes = [f"table {label}: " + ", ".join(
        f"{role} = {header[j]!r}" for role, j in (("time", c_time), ("datetime", c_abs), ("voltage", c_volt),
                                                  ("current", c_cur)) if j is not None)]
    volt = _scaled(path, _numbers(column(c_volt), strict=True, where=header[c_volt], path=path), "voltage",
                   header[c_volt], units, default="v", notes=notes)
    cur = _scaled(path, _numbers(column(c_cur), strict=True, where=header[c_cur], path=path), "current",
                  header[c_cur], units, default="ma" if fmt == "land" else None, notes=notes)
    raw = _Raw(volt, cur, notes=notes)
    rel = None
    if c_time is not None:
        kind, vals = _time_values(path, column(c_time), header[c_time])
        if kind == "relative":
            rel = _scaled(path, vals, "time", header[c_time], units, default="s" if fmt != "csv" else None,
                          notes=notes)
        elif kind == "duration":
            rel = vals
        else:
            raw.abs_s, raw.naive = vals, kind == "naive"
    if c_abs is not None and raw.abs_s is None:
        kind, vals = _time_values(path, column(c_abs), header[c_abs], absolute=True)
        if kind in ("relative", "duration"):
            raise CyclerReadError(path, f"column {header[c_abs]!r} does not hold date and time")
        raw.abs_s, raw.naive, raw.rel_s = vals, kind == "naive", rel
        ok = np.isfinite(vals) & np.isfinite(rel) if rel is not None else None
        if ok is not None and ok.any() and np.all(np.diff(rel[ok]) >= 0):
            # the relative clock is finer than rounded time stamps: place it by the absolute one
            raw.abs_s = float(np.median(vals[ok] - rel[ok])) + rel
            notes.append(f"{header[c_time]!r} placed on the clock of {header[c_abs]!r}")
        return raw
    raw.rel_s = rel
    if raw.abs_s is None and rel is None:
        raise CyclerReadError(path, "no usable time column")
    return raw


def _is_number_column(values: Sequence[Any]) -> bool:
    for v in values:
        if v in (None, ""):
            continue
        if isinstance(v, (int, float)):
            return True
        try:
            float(str(v).replace(",", "."))
            return True
        except ValueError:
            return False
    return False


def _scaled(path: Path, values: np.ndarray, kind: str, header: str, units: Mapping[str, str], *,
            default: str | None, notes: list[str]) -> np.ndarray:
    given = units.get(kind)
    unit = (given or _header_unit(header) or default or "").lower().replace("μ", "µ")
    if unit == "":
        example = {"current": "mA", "voltage": "V", "time": "s"}[kind]
        raise CyclerReadError(path, f"the {kind} column {header!r} does not say its unit; set [electrochemistry] "
                                    f"units = {{ {kind} = \"{example}\" }}")
    table = _UNITS[kind]
    if unit not in table:
        if given:
            raise CyclerReadError(path, f"unknown {kind} unit {given!r}; expected one of {', '.join(table)}")
        if default:
            unit = default
        else:
            raise CyclerReadError(path, f"cannot tell the unit of the {kind} column {header!r}; set "
                                        f"[electrochemistry] units = {{ {kind} = ... }} ({', '.join(table)})")
    if unit != {"current": "ma", "voltage": "v", "time": "s"}[kind]:
        notes.append(f"{kind} column {header!r} in {unit}")
    return values * table[unit]


def _numbers(values: Sequence[Any], *, strict: bool = False, where: str = "", path: Path | None = None
             ) -> np.ndarray | None:
    """Floats from cells (numbers or text, decimal point or comma); None (or an error) if not numeric."""
    out = np.full(len(values), np.nan)
    bad = 0
    for k, v in enumerate(values):
        if v is None or v == "":
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
            continue
        s = str(v).strip()
        try:
            out[k] = float(s)
        except ValueError:
            try:
                out[k] = float(s.replace(",", "."))
            except ValueError:
                bad += 1
                if bad > 3 or k < 3:
                    if strict:
                        raise CyclerReadError(path, f"column {where!r}: {s!r} (row {k + 1} of the table) "
                                                    "is not a number") from None
                    return None
    return out


_DURATION = re.compile(r"^\s*(?:(\d+)\s*(?:d|day|days)?[\s,-]+)?(\d+):(\d{1,2}):(\d{1,2}(?:[.,]\d+)?)\s*$")


def _duration(s: str) -> float | None:
    m = _DURATION.match(s)
    if not m:
        return None
    d, h, mi, sec = m.groups()
    return (int(d or 0) * 24 + int(h)) * 3600.0 + int(mi) * 60.0 + float(sec.replace(",", "."))


_DT_FORMATS = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S",
               "%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M", "%d.%m.%Y %H:%M:%S.%f", "%d.%m.%Y %H:%M:%S")


def _parse_datetime(s: str, *, day_first: bool | None = None) -> datetime | None:
    """A date and time in ISO or a common cycler form; None if it is not one.

    Slash dates with the year last are read month first (EC-Lab's form) unless ``day_first``.
    """
    s = s.strip()
    if not s or not any(ch.isdigit() for ch in s[:4]):
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        pass
    for fmt in _DT_FORMATS:
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            continue
    first = ("%d/%m/%Y", "%m/%d/%Y") if day_first else ("%m/%d/%Y", "%d/%m/%Y")
    for date in first:
        for tail in (" %H:%M:%S.%f", " %H:%M:%S", " %H:%M"):
            try:
                return datetime.strptime(s, date + tail)
            except ValueError:
                continue
    return None


def _time_values(path: Path, values: Sequence[Any], header: str, *, absolute: bool = False
                 ) -> tuple[str, np.ndarray]:
    """('relative', numbers in the column's unit), ('duration', seconds from h:mm:ss) or
    ('naive'|'aware', POSIX seconds; naive ones read as if UTC)."""
    first = next((v for v in values if v not in (None, "")), None)
    if first is None:
        raise CyclerReadError(path, f"the time column {header!r} is empty")
    if isinstance(first, timedelta):
        return "duration", np.array([v.total_seconds() if isinstance(v, timedelta) else np.nan for v in values])
    if isinstance(first, datetime) or (isinstance(first, str) and _parse_datetime(first) is not None
                                       and _duration(first) is None and not _is_number_column([first])):
        stamps = [v if isinstance(v, datetime) else (_parse_datetime(str(v)) if v not in (None, "") else None)
                  for v in values]
        bad = next((k for k, v in enumerate(stamps) if v is None and values[k] not in (None, "")), None)
        if bad is not None:
            raise CyclerReadError(path, f"column {header!r}, row {bad + 1}: cannot read {values[bad]!r} as a date and time")
        aware = [v.tzinfo is not None for v in stamps if v is not None]
        if any(aware) and not all(aware):
            raise CyclerReadError(path, f"column {header!r} mixes times with and without UTC offset")
        if all(aware):
            return "aware", np.array([v.timestamp() if v else np.nan for v in stamps])
        return "naive", np.array([v.replace(tzinfo=timezone.utc).timestamp() if v else np.nan for v in stamps])
    if isinstance(first, str) and _duration(first) is not None:
        out = np.array([_duration(str(v)) if v not in (None, "") else np.nan for v in values], dtype=float)
        if np.isnan(out[[k for k, v in enumerate(values) if v not in (None, "")]]).any():
            raise CyclerReadError(path, f"column {header!r} mixes durations (h:mm:ss) with other values")
        return "duration", out
    nums = _numbers(values, strict=True, where=header, path=path)
    if absolute:
        lo = np.nanmin(nums)
        if lo > 1e8:
            return "aware", nums
        if 2e4 < lo < 1e5:   # Excel/OLE serial days (local time)
            return "naive", (nums - 25569.0) * 86400.0
        raise CyclerReadError(path, f"column {header!r} holds numbers that are not dates ({lo:g}...)")
    return "relative", nums
