"""The run file's result groups under ``/entry`` (lattice, electrochemistry, refinement, ...):
each written whole in one transaction (:func:`write_table`) and read back, as a dict of arrays
for any group (:func:`read_table`) or typed where the columns are fixed
(:func:`read_electrochemistry` -> :class:`FrameElectrochemistry`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .access import decode, reading, str_dtype, text
from .paths import ELECTROCHEMISTRY, ENTRY, FRAMES, h5path

__all__ = ["write_table", "read_table", "group_arrays", "has_group", "per_frame", "ECHEM_COLUMNS",
           "FrameElectrochemistry", "read_electrochemistry"]


def write_table(path: Path | str, group: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Replace ``/entry/<group>`` of a run file with the given arrays (an NXcollection); a dict
    value becomes a subgroup (``{"arrays": {...}, "attrs": {...}}``)."""
    from ..safeio import transaction

    with transaction(path) as session:
        entry = session.writable()[ENTRY]
        session.check_room(_nbytes(arrays))
        if group in entry:
            del entry[group]
        _fill(entry.create_group(group), arrays, attrs)


def _nbytes(arrays: dict[str, Any]) -> int:
    """Roughly the bytes a table takes (strings counted at 64 bytes), for the room check."""
    total = 0
    for v in arrays.values():
        if isinstance(v, dict):
            total += _nbytes(v.get("arrays", {}))
            continue
        a = np.asarray(v)
        total += a.size * 64 if a.dtype == object or a.dtype.kind in "US" else a.nbytes
    return total


def _fill(g, arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
    g.attrs.update({"NX_class": "NXcollection", **attrs})
    for name, value in arrays.items():
        if isinstance(value, dict):       # a subgroup: {"arrays": {...}, "attrs": {...}} or plain arrays
            sub = value if "arrays" not in value else value["arrays"]
            _fill(g.create_group(name), sub, value.get("attrs", {}) if "arrays" in value else {})
            continue
        value = np.asarray(value)
        if value.dtype.kind in "OU":
            g.create_dataset(name, data=value.astype(object), dtype=str_dtype())
        else:
            g.create_dataset(name, data=value)


def read_table(path: Path | str, group: str, names: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``/entry/<group>`` of a run file as arrays (strings decoded) with its attributes under
    ``"attrs"``; only the arrays in ``names`` when given; None when the run file has no such group.

    A dict, not a record: it reads any group, whose arrays depend on the group and on the run
    (the refinement's columns on its phases and parameters). The groups whose columns are fixed
    have typed readers: :func:`read_electrochemistry`, :func:`xrdpipe.run.peakstore.read_peaks`."""
    with reading(path) as h5:
        return group_arrays(h5, group, names)


def group_arrays(h5, group: str, names: Sequence[str] | None = None) -> dict[str, Any] | None:
    """:func:`read_table` on a run file open for reading (``h5``)."""
    if group not in h5[ENTRY]:
        return None
    g = h5[ENTRY][group]
    out: dict[str, Any] = {"attrs": dict(g.attrs)}
    for name, item in g.items():
        if hasattr(item, "dtype") and (names is None or name in names):
            v = item[()]
            if item.shape == ():                     # a scalar: a string (bytes) or a number
                out[name] = text(v) if isinstance(v, (bytes, str)) else v
            else:
                out[name] = decode(v) if v.dtype.kind in "OS" else v
    return out


def per_frame(values: np.ndarray | None, n: int, fill) -> np.ndarray:
    """A per-frame column cut or padded (with ``fill``) to ``n`` frames (a table written before
    more frames came in is shorter)."""
    if values is None:
        return np.full(n, fill, dtype=object) if isinstance(fill, str) else np.full(n, fill)
    values = np.asarray(values)
    if values.shape[0] >= n:
        return values[:n]
    pad = np.full((n - values.shape[0], *values.shape[1:]), fill, dtype=values.dtype)
    return np.concatenate([values, pad])


#: The per-frame columns of ``/entry/electrochemistry`` (the fields of :class:`FrameElectrochemistry`).
ECHEM_COLUMNS = ("time_s", "start_s", "end_s", "voltage_V", "current_mA", "capacity_mAh_g", "x", "segment",
                 "status", "half_cycle", "cycle", "mode", "half_cycle_capacity_mAh_g")


@dataclass(frozen=True)
class FrameElectrochemistry:
    """``/entry/electrochemistry`` of a run file: the cell's state per frame (one row per frame of
    the run file; see :class:`xrdpipe.echem.FrameStates` for the meaning of each column). A
    column not asked for (``names``), or not in a run file written before it existed, is None.
    ``frames_without`` counts the frames integrated after echem last ran (no state yet: NaN,
    -1 or ""); ``attrs`` holds where the record came from and the cell's numbers."""

    attrs: dict[str, Any]
    frames_without: int
    time_s: np.ndarray | None = None          # middle of the exposure, s since the first frame's start
    start_s: np.ndarray | None = None         # POSIX seconds
    end_s: np.ndarray | None = None
    voltage_V: np.ndarray | None = None
    current_mA: np.ndarray | None = None
    capacity_mAh_g: np.ndarray | None = None
    x: np.ndarray | None = None
    segment: np.ndarray | None = None         # str: charge, discharge, rest
    status: np.ndarray | None = None          # str: ok, untimed, before_record, ...
    half_cycle: np.ndarray | None = None      # int (-1: no state)
    cycle: np.ndarray | None = None
    mode: np.ndarray | None = None            # str: CC, CV, rest
    half_cycle_capacity_mAh_g: np.ndarray | None = None


def read_electrochemistry(path: Path | str, names: Sequence[str] | None = None) -> FrameElectrochemistry | None:
    """``/entry/electrochemistry`` (the cell's state per frame; only the columns ``names`` when
    given) with one row per frame of the run file, or None when the echem stage has not run.
    Frames integrated after echem last ran have no state yet: their rows are NaN (numbers), -1
    (integers) or "" (strings), and ``frames_without`` counts them (run ``xrdpipe echem`` again)."""
    ec = read_table(path, ELECTROCHEMISTRY, [c for c in ECHEM_COLUMNS if names is None or c in names])
    if ec is None:
        return None
    with reading(path) as h5:
        n = int(h5[h5path(f"{FRAMES}/status")].shape[0])
    attrs = ec.pop("attrs")
    rows = max((len(v) for v in ec.values() if np.ndim(v) >= 1), default=n)
    for k, v in list(ec.items()):
        if np.ndim(v) >= 1 and len(v) != n:
            kind = np.asarray(v).dtype.kind
            ec[k] = per_frame(np.asarray(v, float) if kind == "f" else v, n,
                              np.nan if kind == "f" else -1 if kind in "iu" else False if kind == "b" else "")
    return FrameElectrochemistry(attrs, max(n - rows, 0), **ec)


def has_group(path: Path | str, group: str) -> bool:
    """Whether the run file holds ``/entry/<group>``."""
    with reading(path) as h5:
        return group in h5[ENTRY]
