"""Vendor text exports with a known layout: Maccor, Basytec, Novonix and Arbin CSV.

Each is a table after a vendor header block; its columns are found by the vendor's names (the
unit read from the header where it says one, else the vendor's fixed unit) and the rows are read
by :func:`~xrdpipe.cyclers.tables.read_table`. Absolute times come from the per-row date-time
column where the file has one (Maccor's DPT Time, Novonix's Date and Time, Arbin's Date Time),
else from the start written in the header (Basytec's "Start of Test", Maccor's "Date of Test");
all are the cycler computer's local time (``timezone`` places them).

Private to :mod:`xrdpipe.cyclers`; use :func:`xrdpipe.cyclers.read_cycler`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import CyclerReadError
from .raw import Raw
from .tables import (
    _find_header,
    _header_and_rows,
    _norm,
    _table_blocks,
    parse_datetime,
    read_table,
    slash_order,
)

# per vendor: the names of each role (compared lower-case without the unit and a leading '~'),
# the unit of a column whose header does not say it, and the header line with the start time
VENDORS: dict[str, dict[str, Any]] = {
    "maccor": {
        "time": ("test time", "testtime"),
        "datetime": ("dpt time", "dpttime"),
        "voltage": ("voltage", "volts"),
        "current": ("current", "amps"),
        # Maccor writes amperes and volts without saying so (its Capacity column is in Ah)
        "units": {"current": "A", "voltage": "V", "time": "s"},
        "start": re.compile(r"^\s*Date of Test\s*:?\s*[,\t]\s*(.+?)\s*[,\t]*$"),
        "day_first": False,                 # a US vendor: 11/05/2023 is 5 November
    },
    "basytec": {
        "time": ("time",),
        "voltage": ("u",),
        "current": ("i",),
        "units": {},
        "start": re.compile(r"^\s*~\s*Start of Test\s*:\s*(.+?)\s*$"),
        "day_first": True,
    },
    "novonix": {
        "time": ("run time",),
        "datetime": ("date and time",),
        "voltage": ("potential", "voltage"),
        "current": ("current",),
        "units": {},
    },
    "arbin": {
        "time": ("test time", "test_time"),
        "datetime": ("date time", "date_time"),
        "voltage": ("voltage",),
        "current": ("current",),
        "units": {},
    },
}

_UNIT_TAIL = re.compile(r"\s*[\[(/]\s*[a-zµμ°%]*\s*[\])]?\s*$")


def _bare(name: Any) -> str:
    """A header cell without its unit and a leading '~': 'Test Time (sec)' -> 'test time'."""
    return _UNIT_TAIL.sub("", _norm(name).lstrip("~").strip())


def _find_columns(rows: list[list[Any]], spec: Mapping[str, Any], limit: int
                  ) -> tuple[int, dict[str, str]] | None:
    """The first row naming a voltage, a current and a time (or date-time) column of the vendor:
    its index and {role: header cell}."""
    for k, row in enumerate(rows[:limit]):
        found = _roles_in(row, spec)
        if "voltage" in found and "current" in found and ("time" in found or "datetime" in found):
            return k, found
    return None


def _roles_in(row: list[Any], spec: Mapping[str, Any]) -> dict[str, str]:
    """{role: header cell} of the vendor's column names found in ``row``."""
    bare = [_bare(c) for c in row]
    found = {}
    for role in ("time", "datetime", "voltage", "current"):
        j = next((bare.index(n) for n in spec.get(role, ()) if n in bare), None)
        if j is not None:
            found[role] = str(row[j]).strip()
    return found


def read_vendor_table(path: Path, fmt: str, columns: Mapping[str, str], units: Mapping[str, str],
                      sheet: str | None) -> Raw:
    """A Maccor, Basytec, Novonix or Arbin export (text or Excel) as a :class:`Raw`.

    ``columns`` and ``units`` given by the user win over the vendor's names and units.
    """
    spec = VENDORS[fmt]
    blocks = _table_blocks(path, fmt, sheet)
    limit = 5000
    found = None
    for _label, rows in blocks:
        # the user's column names first (a renamed vendor header), then the vendor's own
        k = _find_header(rows, columns, limit) if columns else None
        found = (k, {**_roles_in(rows[k], spec), **columns}) if k is not None else _find_columns(rows, spec, limit)
        if found is not None:
            break
    if found is None:
        names = {r: "/".join(spec[r]) for r in ("time", "voltage", "current")}
        raise CyclerReadError(path, f"not a complete {fmt} export: no header row with {names['time']}, "
                                    f"{names['voltage']} and {names['current']} columns in the first "
                                    f"{limit} rows (is the file truncated?)")
    k, named = found
    named.update(columns)
    eff_units = dict(units)
    for role, unit in spec["units"].items():
        header = named.get(role)
        if role not in eff_units and header is not None and _UNIT_TAIL.search(_norm(header)) is None:
            eff_units[role] = unit
    raw = read_table(path, fmt, named, eff_units, sheet, blocks=blocks, limit=limit)
    raw.notes.insert(0, f"{fmt} export")
    if fmt == "maccor":
        _maccor_sign(path, raw, named, sheet, blocks, limit)
    if raw.abs_s is None and "start" in spec:
        raw.origin = _header_start(path, rows[:k], spec, raw.notes)
    return raw


def _maccor_sign(path: Path, raw: Raw, named: Mapping[str, str], sheet: str | None,
                 blocks: list[tuple[str, list[list[Any]]]], limit: int) -> None:
    """Maccor exports with a mode column (``MD``: C charge, D discharge, R rest...) write the
    current unsigned: discharge is made negative. The modes are taken from the very rows the
    current was read from (continuation sheets joined alike)."""
    header, data, label = _header_and_rows(path, "maccor", named, sheet, blocks, limit)
    bare = [_bare(c) for c in header]
    if "md" not in bare:
        return
    j = bare.index("md")
    data = [r for r in data if any(c not in (None, "") for c in r)]
    mode = np.array([str(r[j]).strip().upper() if j < len(r) and r[j] is not None else "" for r in data])
    if mode.size != raw.current_mA.size:     # cannot happen (the same rows); never sign a guess
        raise CyclerReadError(path, f"the MD column of {label} has {mode.size} rows but the current "
                                    f"{raw.current_mA.size}; cannot sign the discharge current")
    if np.nanmin(raw.current_mA) < 0:
        raw.notes.append("current already signed (negative values): the MD column not used")
        return
    raw.current_mA = np.where(mode == "D", -np.abs(raw.current_mA), raw.current_mA)
    raw.notes.append("current signed from the MD column (D: discharge, negative)")


def _header_start(path: Path, lines: list[list[Any]], spec: Mapping[str, Any], notes: list[str]):
    """The start of the test written in the vendor's header block, or None."""
    for n, row in enumerate(lines):
        text = "\t".join(str(c) for c in row if c not in (None, ""))
        m = spec["start"].match(text) or spec["start"].match(",".join(str(c) for c in row))
        if m:
            value = m.group(1).strip(" ,\t")
            order = slash_order(path, [value], "start of the test", spec.get("day_first", False), notes)
            when = parse_datetime(value, day_first=order)
            if when is None:
                raise CyclerReadError(path, f"row {n + 1}, start of the test: cannot read {value!r} as a date and time")
            return when
    return None
