"""Tables of cycler data: CSV/TSV/text and Excel exports, generic or vendor (Neware, Arbin,
LAND), found by their header row and read into the raw form :mod:`xrdpipe.cyclers.record` finishes.

Private to :mod:`xrdpipe.cyclers`; use :func:`xrdpipe.cyclers.read_cycler`.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CyclerReadError
from .raw import Raw
from .sniff import container, decode

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


def sheet_names(path: Path) -> list[str]:
    try:
        from python_calamine import CalamineWorkbook

        return list(CalamineWorkbook.from_path(str(path)).sheet_names)
    except Exception as exc:
        raise CyclerReadError(path, f"cannot read it as a spreadsheet: {exc}") from None


def _table_blocks(path: Path, fmt: str, sheet: str | None) -> list[tuple[str, list[list[Any]]]]:
    """(label, rows) of the sheets or text table that hold the record."""
    if container(path) != "excel":
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
    text = decode(raw, partial=False)
    lines = text.splitlines()
    sample = "\n".join(lines[:200])
    counts = {d: sample.count(d) for d in ("\t", ";", ",")}
    delim = "\t" if counts["\t"] >= max(1, counts[","] // 4) and counts["\t"] else (
        ";" if counts[";"] > counts[","] // 2 and counts[";"] else ",")
    return [row for row in csv.reader(io.StringIO(text), delimiter=delim)]


def _find_header(rows: list[list[Any]], wanted: Mapping[str, str], limit: int = 60) -> int | None:
    """Index of the header row: the first row (of the first ``limit``) naming every mapped
    column, or (without a mapping) a known voltage, current and time column."""
    want = {_norm(v) for v in wanted.values()}
    for k, row in enumerate(rows[:limit]):
        names = {_norm(c) for c in row if c not in (None, "")}
        if want:
            if want <= names:
                return k
            continue
        has = {kind: any(n in names for n in _NAMES[kind]) for kind in _NAMES}
        if has["voltage"] and has["current"] and (has["time"] or has["datetime"]):
            return k
    return None


def _header_and_rows(path: Path, fmt: str, columns: Mapping[str, str], sheet: str | None,
                     blocks: list[tuple[str, list[list[Any]]]] | None = None, limit: int = 60
                     ) -> tuple[list[str], list[list[Any]], str]:
    """The header row (found by the named or the usual column names), the data rows after it
    (continuation sheets with or without their own header joined) and where it was found."""
    header: list[Any] | None = None
    data: list[list[Any]] = []
    label = ""
    blocks = _table_blocks(path, fmt, sheet) if blocks is None else blocks
    for name, rows in blocks:
        k = _find_header(rows, columns, limit)
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
        _not_data(path, blocks)
        want = ", ".join(f"{r} = {c!r}" for r, c in columns.items()) or "time, voltage and current columns"
        raise CyclerReadError(path, f"cannot find a header row with {want} in the first {limit} rows; "
                                    "set [electrochemistry] columns = { time = ..., voltage = ..., current = ... }")
    return header, data, label


def _not_data(path: Path, blocks: list[tuple[str, list[list[Any]]]]) -> None:
    """Raise a clear error for a file that is known not to be a cycler record."""
    for label, rows in blocks:
        first = {_norm(c) for c in (rows[0] if rows else []) if c not in (None, "")}
        if "name" in first and first & {"chemistry", "start date", "nominal capacity [ah]"}:
            raise CyclerReadError(path, f"{label!r} is an experiment record (one row per cell: "
                                        f"{', '.join(str(c) for c in rows[0] if c not in (None, ''))}), "
                                        "not cycler data; give the cycler's data export of the cell "
                                        "(.nda/.ndax, .mpr/.mpt, or a CSV/Excel of time, voltage and current)")


def _column_indices(path: Path, header: list[str], label: str, columns: Mapping[str, str]
                    ) -> tuple[int | None, int | None, int, int]:
    """The columns of time, absolute date-time, voltage and current: named in ``columns``, or
    recognised from the usual names; a named column that is not there is an error with a hint."""
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
    return c_time, c_abs, c_volt, c_cur


def read_table(path: Path, fmt: str, columns: Mapping[str, str], units: Mapping[str, str],
               sheet: str | None, *, blocks: list[tuple[str, list[list[Any]]]] | None = None,
               limit: int = 60) -> Raw:
    """The rows of a table (CSV/TSV/text or Excel, continuation sheets joined) as a :class:`Raw`:
    voltage and current scaled to V and mA, times relative, absolute or local. ``blocks``: the
    (label, rows) already read; ``limit``: the rows searched for the header."""
    bad = set(columns) - {"time", "voltage", "current", "datetime"}
    if bad:
        raise CyclerReadError(path, f"unknown column role(s) {sorted(bad)}; expected time, voltage, current, datetime")
    header, data, label = _header_and_rows(path, fmt, columns, sheet, blocks, limit)
    c_time, c_abs, c_volt, c_cur = _column_indices(path, header, label, columns)
    rows = [r for r in data if any(c not in (None, "") for c in r)]

    def column(j: int) -> list[Any]:
        return [r[j] if j < len(r) else None for r in rows]

    used = {role: header[j] for role, j in (("time", c_time), ("datetime", c_abs), ("voltage", c_volt),
                                            ("current", c_cur)) if j is not None}
    notes = [f"table {label}: " + ", ".join(f"{role} = {name!r}" for role, name in used.items())]
    volt = _scaled(path, numbers(column(c_volt), strict=True, where=header[c_volt], path=path), "voltage",
                   header[c_volt], units, default="v", notes=notes)
    cur = _scaled(path, numbers(column(c_cur), strict=True, where=header[c_cur], path=path), "current",
                  header[c_cur], units, default="ma" if fmt == "land" else None, notes=notes)
    raw = Raw(volt, cur, notes=notes, columns=used)
    rel = None
    if c_time is not None:
        kind, vals = _time_values(path, column(c_time), header[c_time], day_first=DAY_FIRST.get(fmt, False),
                                  notes=notes)
        if kind == "relative":
            rel = _scaled(path, vals, "time", header[c_time], units, default="s" if fmt != "csv" else None,
                          notes=notes)
        elif kind == "duration":
            rel = vals
        else:
            raw.abs_s, raw.naive = vals, kind == "naive"
    if c_abs is not None and raw.abs_s is None:
        kind, vals = _time_values(path, column(c_abs), header[c_abs], absolute=True,
                                  day_first=DAY_FIRST.get(fmt, False), notes=notes)
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


def numbers(values: Sequence[Any], *, strict: bool = False, where: str = "", path: Path | None = None
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
               "%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M", "%d.%m.%Y %H:%M:%S.%f", "%d.%m.%Y %H:%M:%S",
               "%d-%b-%y %I:%M:%S %p", "%d-%b-%Y %I:%M:%S %p", "%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")
# the times after a slash date (day/month/year or month/day/year), 24 h or 12 h with AM/PM
_SLASH_TAILS = (" %H:%M:%S.%f", " %H:%M:%S", " %H:%M", " %I:%M:%S.%f %p", " %I:%M:%S %p", " %I:%M %p")
_SLASH = re.compile(r"^\s*(\d{1,2})/(\d{1,2})/(\d{2,4})(?:\s|$)")
# a cell that looks like a date (digits and separators, or a month name), read or not
_DATE_LIKE = re.compile(r"^\s*(?:\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}|\d{1,2}-[A-Za-z]{3}-\d{2,4})(?:[ T]|$)")

#: the order of slash dates a vendor writes when a column cannot tell (no field above 12):
#: month first for the US vendors (Maccor, Arbin) and EC-Lab, day first for Basytec (German)
DAY_FIRST = {"basytec": True}


def parse_datetime(s: str, *, day_first: bool | None = None) -> datetime | None:
    """A date and time in ISO or a common cycler form; None if it is not one.

    Slash dates with the year last are read in the order ``day_first`` says; without it, in the
    order the value itself tells (a first field above 12: day first), else month first.
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
    if day_first is None:
        m = _SLASH.match(s)
        day_first = bool(m) and int(m.group(1)) > 12
    for date in (("%d/%m/%Y", "%d/%m/%y") if day_first else ("%m/%d/%Y", "%m/%d/%y")):
        for tail in _SLASH_TAILS:
            try:
                return datetime.strptime(s.upper() if "%p" in tail else s, date + tail)
            except ValueError:
                continue
    return None


def slash_order(path: Path, values: Sequence[Any], header: str, default_day_first: bool,
                notes: list[str] | None = None) -> bool:
    """The one order of the slash dates of a column, True for day first: a first field above
    12 says day first, a second field above 12 month first; when no field tells, the vendor's
    ``default_day_first`` (said in ``notes``). Both in one column is an error."""
    day = month = None
    for v in values:
        m = _SLASH.match(v) if isinstance(v, str) else None
        if m is None:
            continue
        a, b = int(m.group(1)), int(m.group(2))
        if a > 12 and day is None:
            day = v
        if b > 12 and month is None:
            month = v
    if day is not None and month is not None:
        raise CyclerReadError(path, f"column {header!r} mixes day-first ({day.strip()!r}) and month-first "
                                    f"({month.strip()!r}) dates")
    if day is not None or month is not None:
        return day is not None
    if notes is not None and any(isinstance(v, str) and _SLASH.match(v) for v in values):
        notes.append(f"column {header!r}: no slash date has a field above 12; read "
                     f"{'day' if default_day_first else 'month'} first (the vendor's order)")
    return default_day_first


def _time_values(path: Path, values: Sequence[Any], header: str, *, absolute: bool = False,
                 day_first: bool = False, notes: list[str] | None = None) -> tuple[str, np.ndarray]:
    """('relative', numbers in the column's unit), ('duration', seconds from h:mm:ss) or
    ('naive'|'aware', POSIX seconds; naive ones read as if UTC). Slash dates are read in one
    order for the whole column (:func:`slash_order`; ``day_first``: the vendor's order)."""
    first = next((v for v in values if v not in (None, "")), None)
    if first is None:
        raise CyclerReadError(path, f"the time column {header!r} is empty")
    if isinstance(first, timedelta):
        return "duration", np.array([v.total_seconds() if isinstance(v, timedelta) else np.nan for v in values])
    if isinstance(first, datetime) or (isinstance(first, str) and parse_datetime(first) is not None
                                       and _duration(first) is None and not _is_number_column([first])):
        order = slash_order(path, values, header, day_first, notes)
        stamps = [v if isinstance(v, datetime) else (parse_datetime(str(v), day_first=order)
                                                     if v not in (None, "") else None) for v in values]
        bad = next((k for k, v in enumerate(stamps) if v is None and values[k] not in (None, "")), None)
        if bad is not None:
            raise CyclerReadError(path, f"column {header!r}, row {bad + 1}: cannot read {values[bad]!r} as a date and time")
        aware = [v.tzinfo is not None for v in stamps if v is not None]
        if any(aware) and not all(aware):
            raise CyclerReadError(path, f"column {header!r} mixes times with and without UTC offset")
        if all(aware):
            return "aware", np.array([v.timestamp() if v else np.nan for v in stamps])
        return "naive", np.array([v.replace(tzinfo=timezone.utc).timestamp() if v else np.nan for v in stamps])
    if isinstance(first, str) and _DATE_LIKE.match(first) and _duration(first) is None \
            and not _is_number_column([first]):
        k = next(k for k, v in enumerate(values) if v not in (None, ""))
        raise CyclerReadError(path, f"column {header!r}, row {k + 1}: cannot read {first!r} as a date and time")
    if isinstance(first, str) and _duration(first) is not None:
        out = np.array([_duration(str(v)) if v not in (None, "") else np.nan for v in values], dtype=float)
        if np.isnan(out[[k for k, v in enumerate(values) if v not in (None, "")]]).any():
            raise CyclerReadError(path, f"column {header!r} mixes durations (h:mm:ss) with other values")
        return "duration", out
    nums = numbers(values, strict=True, where=header, path=path)
    if absolute:
        lo = np.nanmin(nums)
        if lo > 1e8:
            return "aware", nums
        if 2e4 < lo < 1e5:   # Excel/OLE serial days (local time)
            return "naive", (nums - 25569.0) * 86400.0
        raise CyclerReadError(path, f"column {header!r} holds numbers that are not dates ({lo:g}...)")
    return "relative", nums
