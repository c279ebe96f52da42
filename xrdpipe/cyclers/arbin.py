"""Arbin .res files (an Access database), read with access-parser (the optional extra ``arbin``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ..errors import CyclerReadError
from .raw import Raw, accumulate, missing_extra


def read_arbin_res(path: Path) -> Raw:
    try:
        from access_parser import AccessParser
    except ImportError:
        raise missing_extra(path, "arbin", "Arbin .res files") from None
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
        counter = accumulate(net * 1e3, cycle)      # Arbin counts per cycle, in Ah
    return Raw(v, i, rel_s=t, origin=origin, step=step, notes=notes, counter_mAh=counter)


def _ole_date(days: float) -> datetime:
    """An OLE automation date (days since 1899-12-30, local time) as a naive datetime."""
    return datetime(1899, 12, 30) + timedelta(days=days)
