"""BioLogic EC-Lab / BT-Lab files: .mpr binaries (galvani, the optional extra ``biologic``) and
their text exports (.mpt/.txt, with or without the header block; ``time/s`` holding seconds or,
in BT-Lab's "absolute time" export, date-times)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import CyclerReadError
from .raw import Raw, missing_extra
from .sniff import decode
from .tables import _time_values, numbers, parse_datetime


def read_mpr(path: Path) -> Raw:
    try:
        from galvani import BioLogic
    except ImportError:
        raise missing_extra(path, "biologic", "BioLogic .mpr files") from None
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


def _biologic_columns(path: Path, cols: dict[str, np.ndarray], abs_s: np.ndarray | None = None,
                      naive: bool = True) -> Raw:
    """Time, voltage and current from EC-Lab's column names (.mpr and .mpt alike); ``abs_s``:
    the rows' date-times when ``time/s`` holds them (``naive``: wall clock read as UTC, else
    POSIX seconds from stamps with a UTC offset)."""
    if abs_s is not None:
        cols = {**cols, "time/s": abs_s}
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
    if abs_s is not None:
        notes.append("time/s holds date-times " + ("(the cycler computer's local time)" if naive
                                                   else "with a UTC offset"))
        return Raw(volt, cur, abs_s=abs_s, naive=naive, step=step, notes=notes, counter_mAh=counter)
    return Raw(volt, cur, rel_s=t, step=step, notes=notes, counter_mAh=counter)


def read_mpt(path: Path) -> Raw:
    """An EC-Lab/BT-Lab text export (.mpt, .txt): an optional header block ("Nb header lines"),
    then a tab-separated table whose first row names the columns."""
    try:
        text = decode(path.read_bytes(), partial=False)
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
            origin = parse_datetime(m.group(1).strip(), day_first=False)
            if origin is None:
                raise CyclerReadError(path, f"cannot read the acquisition start {m.group(1).strip()!r}")
    if n_header < 1 or n_header > len(lines):
        raise CyclerReadError(path, f"truncated: 'Nb header lines' says {n_header} but the file ends after "
                                    f"{len(lines)} lines (expected the column names on line {n_header})")
    header = [h.strip() for h in lines[n_header - 1].split("\t")]
    if "time/s" not in header:
        line = lines[n_header - 1]
        sep = next((c for c in ",;" if c in line and "\t" not in line), None)
        hint = (f": a BioLogic export separates its columns by tabs, this line by {sep!r} (another table: "
                f"[electrochemistry] format = \"auto\", or \"csv\" with its columns)" if sep else "")
        raise CyclerReadError(path, f"line {n_header} (after the header block) should name the columns "
                                    f"(time/s, Ewe/V or Ecell/V, I/mA), tab-separated; it reads {line[:80]!r}{hint}")
    body = [ln.split("\t") for ln in lines[n_header:] if ln.strip()]
    cols: dict[str, np.ndarray] = {}
    abs_s, naive, notes = None, True, []
    for j, name in enumerate(header):
        if not name:
            continue
        vals = [row[j] if j < len(row) else "" for row in body]
        arr = numbers(vals)
        if arr is not None:
            cols[name] = arr
        elif name == "time/s" and vals:
            kind, stamps = _time_values(path, vals, name, notes=notes)
            if kind in ("naive", "aware"):
                abs_s, naive = stamps, kind == "naive"
            elif kind == "duration":
                cols[name] = stamps
                notes.append("time/s holds durations (h:mm:ss), read as seconds")
            else:
                raise CyclerReadError(path, f"column time/s holds {kind} values ({vals[0]!r}) that are "
                                            "neither seconds, durations nor date-times")
    raw = _biologic_columns(path, cols, abs_s, naive)
    raw.notes.extend(notes)
    if abs_s is not None:
        return raw
    raw.origin = origin
    if origin is None:
        raw.notes.append("no 'Acquisition started on' line: relative times only")
    return raw
