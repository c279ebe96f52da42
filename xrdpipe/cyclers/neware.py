"""Neware .nda/.ndax binaries, read with NewareNDA (the optional extra ``neware``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CyclerReadError
from .raw import Raw, accumulate, missing_extra


def read_neware_binary(path: Path, kind: str | None = None) -> Raw:
    """A Neware binary; ``kind`` ("nda" or "ndax", from the content; else from the extension,
    in any case). NewareNDA's reader of that kind is called directly, whatever the file's name."""
    kind = kind or path.suffix.lower().lstrip(".")
    if kind not in ("nda", "ndax"):
        raise CyclerReadError(path, f"not a Neware binary (expected an .nda or .ndax file, got {kind!r})")
    try:
        import NewareNDA  # noqa: F401  (the package first: its absence is the missing extra)
        from NewareNDA.NewareNDA import read_nda
        from NewareNDA.NewareNDAx import read_ndax
    except ImportError:
        raise missing_extra(path, "neware", "Neware .nda/.ndax files") from None
    import logging

    logging.getLogger("newarenda").setLevel(logging.WARNING)
    import warnings

    try:
        with warnings.catch_warnings():       # the library's own deprecation warnings are not the user's
            warnings.simplefilter("ignore")
            # the arguments NewareNDA.read passes (software cycle numbers, charge-first cycles)
            df = read_nda(str(path), True, "chg") if kind == "nda" else read_ndax(str(path), True, "chg")
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
    notes = [f"read as a Neware .{kind}", "Neware time stamps " + ("with UTC offset" if aware else "in the cycler's local time")]
    step = df["Step_Index"].to_numpy(int)
    net = df["Charge_Capacity(mAh)"].to_numpy(float) - np.abs(df["Discharge_Capacity(mAh)"].to_numpy(float))
    return Raw(df["Voltage"].to_numpy(float), df["Current(mA)"].to_numpy(float), abs_s=wall, naive=not aware,
               step=step, notes=notes, counter_mAh=accumulate(net, step))
