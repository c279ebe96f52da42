"""``/entry/results`` of the run file: NXdata views of what a user plots (fitted centres, a, c,
V, fractions, the cycler's voltage), each a valid NXdata with its axes and units, so that silx
view and h5web draw them at once. Written by the writers of what they show (the peak store, the
lattice and echem stages); links into the results where the data are already whole datasets,
small copies where a view is a column of one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .paths import ENTRY, RESULTS

__all__ = ["Curve", "put_nxdata", "write_nxdata"]


@dataclass(frozen=True)
class Curve:
    """One curve of an NXdata view: its name, values (or the path of a dataset of the run file to
    link to) and esds (the same), in ``units``."""

    name: str
    values: np.ndarray | str
    errors: np.ndarray | str | None = None


def put_nxdata(entry, name: str, curves: Sequence[Curve], *, axis: tuple[str, np.ndarray | str, str],
               units: str, long_name: str) -> None:
    """Replace ``/entry/results/<name>`` with an NXdata of ``curves`` (the first the signal, the
    others its auxiliary signals, each with ``<name>_errors``) against ``axis`` ((name, values or
    a path to link to, units)); a path becomes an h5py SoftLink, so nothing is stored twice.
    ``entry``: the ``/entry`` group of a run file open for writing."""
    import h5py

    results = entry.require_group(RESULTS)
    results.attrs["NX_class"] = "NXcollection"
    if name in results:
        del results[name]
    g = results.create_group(name)

    def put(key: str, value, attrs: dict[str, str]) -> None:
        if isinstance(value, str):
            g[key] = h5py.SoftLink(value)
            target = g.file[value]
            if "units" in attrs and "units" not in target.attrs:   # silx reads them on the target
                target.attrs["units"] = attrs["units"]
        else:
            g.create_dataset(key, data=np.asarray(value)).attrs.update(attrs)

    names = [c.name.replace("/", "_") for c in curves]
    for c, key in zip(curves, names):
        put(key, c.values, {"units": units, "long_name": f"{long_name} {c.name}".strip()})
        if c.errors is not None:
            put(f"{key}_errors", c.errors, {"units": units})
    axis_name, axis_values, axis_units = axis
    put(axis_name, axis_values, {"units": axis_units} if axis_units else {})
    g.attrs.update({"NX_class": "NXdata", "signal": names[0], "axes": [axis_name], "title": long_name})
    if len(names) > 1:
        g.attrs["auxiliary_signals"] = names[1:]


def write_nxdata(path: Path | str, name: str, curves: Sequence[Curve], **options) -> None:
    """:func:`put_nxdata` in a transaction on the run file ``path``."""
    from ..safeio import transaction

    with transaction(path) as session:
        put_nxdata(session.writable()[ENTRY], name, curves, **options)
