"""The raw form every cycler reader returns, before :func:`~xrdpipe.cyclers.record.read_cycler`
puts it on the absolute clock; the optional extras of the vendor binaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import CyclerReadError

#: the optional extra each binary format needs: (distribution, licence, extra)
EXTRAS = {
    "neware": ("NewareNDA", "BSD-3-Clause", "neware"),
    "biologic": ("galvani", "GPL-3.0", "biologic"),
    "arbin": ("access-parser", "Apache-2.0", "arbin"),
}


@dataclass
class Raw:
    """What a reader found: voltage and current, times in one of three forms (relative to an
    origin, absolute, or wall clock without offset), steps, notes and the cycler's own counter."""

    voltage_V: np.ndarray
    current_mA: np.ndarray
    rel_s: np.ndarray | None = None          # seconds since ``origin`` (or since the file's time 0)
    origin: datetime | None = None           # naive (local) or aware
    abs_s: np.ndarray | None = None          # POSIX seconds; wall clock read as UTC when ``naive``
    naive: bool = False
    step: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    counter_mAh: np.ndarray | None = None
    columns: dict[str, str] = field(default_factory=dict)   # role (time, datetime, voltage, current) -> header


def accumulate(counter: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """A continuous count from one that restarts at 0 in each segment (step or cycle)."""
    new = np.r_[True, segment[1:] != segment[:-1]]
    ends = np.flatnonzero(np.r_[new[1:], True])
    before = np.r_[0.0, np.cumsum(counter[ends])]     # the finals of the earlier segments
    return before[np.cumsum(new) - 1] + counter


def missing_extra(path: Path, fmt: str, what: str) -> CyclerReadError:
    dist, licence, extra = EXTRAS[fmt]
    return CyclerReadError(
        path, f"reading {what} needs the optional extra '{extra}' ({dist}, {licence}): "
              f"pip install 'xrdpipe[{extra}]'", extra=extra)
