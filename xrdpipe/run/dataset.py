"""A run file's results as labelled xarray Datasets: the pattern stack (read lazily), the fitted
peaks (frame x component) and the lattice (frame x phase), each with the frames' time, state of
charge and status as coordinates and units in ``attrs``.

>>> ds = open_dataset("results/nfm.nxs")                       # doctest: +SKIP
>>> ds.intensity.sel(tth=slice(6.2, 7.2)).plot(y="x")          # reads those columns only  # doctest: +SKIP
>>> res = open_results("results/nfm.nxs")                      # doctest: +SKIP
>>> res.lattice.c_A.sel(phase="O3").plot(x="x")                # doctest: +SKIP

The intensities stay in the file until they are asked for: ``intensity`` and
``intensity_errors`` are xarray's lazily indexed arrays over the run file (each access opens it,
reads only the rows and columns indexed, and closes it), as ``xarray.open_dataset`` does without
``chunks``; ``chunks=`` turns them into dask arrays (dask must be installed), for out-of-core
reductions over the whole stack.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from ..tables import PEAK_ARRAYS
from .access import axis_of, decode, reading, text
from .groups import group_arrays, per_frame
from .paths import ECHEM_RECORD, ELECTROCHEMISTRY, ENTRY, LATTICE, PATTERNS, PEAKS, h5path
from .store import DONE, FAILED, PENDING

__all__ = ["open_dataset", "open_results", "Results"]

_UNITS = {"tth": "degree", "q": "1/angstrom", "time_s": "s", "voltage": "V", "current": "mA",
          "capacity": "mAh/g", "x": "1", "intensity": "counts", "intensity_errors": "counts"}
_LONG = {"tth": "2θ", "q": "Q", "time": "middle of the exposure (UTC)",
         "time_s": "time since the first frame's start", "voltage": "cell voltage", "current": "cell current",
         "capacity": "capacity (net charge passed per gram of active material)", "x": "x in Na_xTMO2",
         "half_cycle": "half-cycle (-1: none)", "segment": "charge, discharge or rest",
         "status": f"{PENDING} pending, {DONE} integrated, {FAILED} failed",
         "intensity": "intensity (corrected)", "intensity_errors": "esd of intensity (Poisson)"}
#: coordinate name -> column of /entry/electrochemistry, and its fill where echem has not run
_ECHEM = {"x": ("x", np.nan), "voltage": ("voltage_V", np.nan), "current": ("current_mA", np.nan),
          "capacity": ("capacity_mAh_g", np.nan), "half_cycle": ("half_cycle", -1), "segment": ("segment", ""),
          "echem_status": ("status", "")}
_MOVING = ("charge", "discharge")
_PEAK_UNITS = {"center": "radial", "center_err": "radial", "fwhm": "radial", "fwhm_err": "radial",
               "fwhm_left": "radial", "fwhm_right": "radial", "area": "counts x radial", "area_err": "counts x radial",
               "height": "counts", "d_A": "angstrom", "d_err_A": "angstrom"}


class _StackArray(BackendArray):
    """``/entry/patterns/<name>`` (frame x radial) of a run file, read on demand: only the rows
    and columns indexed (an index list is read as its span when dense, else row by row)."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype):
        self.path, self.name, self.shape, self.dtype = path, name, shape, np.dtype(dtype)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER_1VECTOR,
                                                  self._read)

    def _read(self, key: tuple) -> np.ndarray:
        vec = [i for i, k in enumerate(key) if isinstance(k, np.ndarray)]
        with reading(self.path) as h5:
            ds = h5[h5path(f"{PATTERNS}/{self.name}")]
            if not vec:
                return np.asarray(ds[key])
            i = vec[0]
            rows = np.asarray(key[i], int) % self.shape[i]
            uniq, inverse = np.unique(rows, return_inverse=True)
            axis = i - sum(isinstance(k, (int, np.integer)) for k in key[:i])   # where it lands in the result
            if uniq.size == 0:
                probe = tuple(slice(0, 0) if j == i else k for j, k in enumerate(key))
                return np.asarray(ds[probe])
            span = int(uniq[-1] - uniq[0] + 1)
            if span <= 2 * uniq.size:            # dense: one read of the span, then pick
                block = ds[tuple(slice(int(uniq[0]), int(uniq[-1]) + 1) if j == i else k for j, k in enumerate(key))]
                block = np.take(block, uniq - uniq[0], axis=axis)
            else:
                block = ds[tuple(uniq if j == i else k for j, k in enumerate(key))]
            return np.take(block, inverse.ravel(), axis=axis)


def _datetimes(posix_s: np.ndarray) -> np.ndarray:
    """POSIX seconds (UTC, NaN if unknown) as datetime64[ns] (NaT if unknown)."""
    out = np.full(posix_s.shape, np.datetime64("NaT"), dtype="datetime64[ns]")
    ok = np.isfinite(posix_s)
    out[ok] = np.round(posix_s[ok] * 1e9).astype("int64").astype("datetime64[ns]")
    return out


def _frame_coords(h5, n: int) -> dict[str, Any]:
    """The per-frame coordinates: the frame table's and, where echem has run, the cell's."""
    fr = h5[h5path("frames")]
    stamps = fr["timestamp"][()]
    coords: dict[str, Any] = {
        "frame": ("frame", np.arange(n), {"long_name": "frame"}),
        "time": ("frame", _datetimes(stamps[:n]), {"long_name": _LONG["time"]}),
        "time_s": ("frame", h5[h5path(f"{PATTERNS}/time_s")][:n], {"units": "s", "long_name": _LONG["time_s"]}),
        "status": ("frame", fr["status"][:n], {"long_name": _LONG["status"]}),
        "frame_message": ("frame", decode(fr["message"][:n]), {"long_name": "why a frame failed, or a remark"}),
        "key": ("frame", decode(fr["key"][:n]), {"long_name": "file[:index] of the frame"}),
    }
    ec = group_arrays(h5, ELECTROCHEMISTRY, names={col for col, _ in _ECHEM.values()})
    for name, (col, fill) in _ECHEM.items():
        values = per_frame(None if ec is None else ec.get(col), n, fill)
        attrs = {"long_name": _LONG.get(name, name)}
        if name in _UNITS:
            attrs["units"] = _UNITS[name]
        coords[name] = ("frame", values, attrs)
    coords["direction"] = ("frame", _directions(coords["half_cycle"][1], coords["segment"][1]),
                           {"long_name": "charge, discharge or rest: what the frame's half-cycle mostly does"})
    return coords


def _directions(half_cycle: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Per frame, the segment (charge or discharge) most of its half-cycle's frames are in;
    "rest" for a half-cycle that only rests and for frames outside the record."""
    out = np.full(half_cycle.size, "rest", dtype=object)
    for h in np.unique(half_cycle[half_cycle >= 0]):
        sel = half_cycle == h
        moving = [s for s in segment[sel] if s in _MOVING]
        if moving:
            out[sel] = Counter(moving).most_common(1)[0][0]     # a tie: the first seen
    return out


def open_dataset(run_file: Path | str, *, chunks: dict | str | None = None) -> xr.Dataset:
    """The pattern stack of a run file as an :class:`xarray.Dataset` (dims ``frame`` and the
    run's radial axis, ``tth`` or ``q``; the other axis a coordinate too when the wavelength is
    known), ``intensity`` and ``intensity_errors`` read lazily, and per bin (2D frames integrated
    by xrdpipe) ``instrument_sd`` and ``instrument_offset`` (what each bin averages over).

    Coordinates per frame: ``time`` (datetime64, UTC), ``time_s``, ``status`` (1 integrated,
    0 pending, -1 failed), ``frame_message``, ``key``, and from the electrochemistry (NaN, -1 or "" until
    ``xrdpipe echem`` has run) ``x``, ``voltage`` (V), ``current`` (mA), ``capacity`` (mAh/g),
    ``half_cycle``, ``segment``, ``echem_status`` and ``direction`` (what the frame's half-cycle
    mostly does: charge, discharge or rest). ``chunks``: as for :meth:`xarray.Dataset.chunk`
    (needs dask); default lazy without dask.

    Example
    -------
    >>> ds = open_dataset("results/nfm.nxs")                        # doctest: +SKIP
    >>> ds.intensity.sel(tth=slice(6.2, 7.2)).plot(y="x")           # doctest: +SKIP
    """
    path = Path(run_file)
    with reading(path) as h5:
        pat = h5[h5path(PATTERNS)]
        axis, unit, wl = axis_of(h5)
        other = "q" if axis == "tth" else "tth"
        shape, dtype = pat["intensity"].shape, pat["intensity"].dtype
        n = shape[0]
        coords = _frame_coords(h5, n)
        coords[axis] = (axis, pat[axis][()], {"units": _UNITS[axis], "long_name": _LONG[axis]})
        if wl:
            coords[other] = (axis, pat[other][()], {"units": _UNITS[other], "long_name": _LONG[other]})
        title = h5[ENTRY]["title"][()] if "title" in h5[ENTRY] else b""
        instrument = {name: xr.Variable((axis,), pat[name][()].astype(np.float64),
                                        {"units": _UNITS[axis], "long_name": text(pat[name].attrs.get("long_name", ""))})
                      for name in ("instrument_sd", "instrument_offset") if name in pat}
    data = {name: xr.Variable(("frame", axis), indexing.LazilyIndexedArray(_StackArray(path, name, shape, dtype)),
                              {"units": "counts", "long_name": _LONG[name]})
            for name in ("intensity", "intensity_errors")}
    data.update(instrument)
    attrs = {"run_file": str(path), "radial_unit": unit, "title": text(title)}
    if wl:
        attrs["wavelength_A"] = float(wl)
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    return ds.chunk(chunks) if chunks is not None else ds


@dataclass(frozen=True)
class Results:
    """The results of a run file as Datasets, each None until its stage has run."""

    peaks: xr.Dataset | None       # frame x component (xrdpipe fit)
    lattice: xr.Dataset | None     # frame x phase (xrdpipe lattice)
    record: xr.Dataset | None      # the whole cycler record, dim ``record`` (xrdpipe echem)


def open_results(run_file: Path | str) -> Results:
    """The fitted peaks, the lattice and the cycler record of a run file as Datasets (read whole:
    they are small beside the pattern stack).

    ``peaks`` (dims ``frame``, ``component``): ``center``, ``center_err``, ``fwhm``, ``area``,
    ``height``, ``d_A``, ... (NaN where a component is absent or a fit failed), ``present``,
    ``success``, ``redchi`` and ``message`` (of the component's window), ``done``; coordinates on
    ``component``: ``window``, ``phase``, ``hkl``, ``profile``. ``lattice`` (dims ``frame``,
    ``phase``): ``a_A``, ``a_err_A``, ``c_A``, ``volume_A3``, ``fraction``, ``fraction_err``, ...,
    ``message``, ``fraction_source``, ``fraction_method``, ``presence``. Both carry the per-frame
    coordinates of :func:`open_dataset` (time, x, voltage, ...).

    Example
    -------
    >>> res = open_results("results/nfm.nxs")                               # doctest: +SKIP
    >>> res.peaks.center.where(res.peaks.present).sel(component="O3 003")   # doctest: +SKIP
    """
    path = Path(run_file)
    with reading(path) as h5:
        n = h5[h5path(f"{PATTERNS}/intensity")].shape[0]
        axis, unit, _ = axis_of(h5)
        coords = _frame_coords(h5, n)
        peaks = _peaks(h5, n, coords, axis) if PEAKS in h5[ENTRY] else None
        lattice = _lattice(h5, coords) if LATTICE in h5[ENTRY] else None
        record = _record(h5)
    attrs = {"run_file": str(path), "radial_unit": unit}
    for ds in (peaks, lattice, record):
        if ds is not None:
            ds.attrs.update(attrs)
    return Results(peaks, lattice, record)


def _component_labels(phase, hkl, window) -> list[str]:
    """``"O3 003"`` per component (with `` [window]`` where that alone is not unique)."""
    labels = [f"{p} {h}" for p, h in zip(phase, hkl)]
    return [f"{lab} [{w}]" if labels.count(lab) > 1 else lab for lab, w in zip(labels, window)]


def _peaks(h5, n: int, coords: dict, axis: str) -> xr.Dataset:
    g = h5[h5path(PEAKS)]
    labels = {name: decode(g[name][()]) for name in ("window", "peak_window", "peak_phase", "peak_hkl", "peak_profile")}
    windows = list(labels["window"])
    of_window = np.array([windows.index(w) for w in labels["peak_window"]], int)   # each component's window
    data = {}
    for name in PEAK_ARRAYS:
        unit = _PEAK_UNITS.get(name, "")
        unit = {"radial": _UNITS[axis], "counts x radial": f"counts x {_UNITS[axis]}"}.get(unit, unit)
        data[name] = (("frame", "component"), per_frame(g[name][()], n, np.nan), {"units": unit} if unit else {})
    data["present"] = (("frame", "component"), per_frame(g["present"][()], n, 0).astype(bool))
    for name, fill in (("success", 0), ("redchi", np.nan)):
        per_window = per_frame(g[name][()], n, fill)
        data[name] = (("frame", "component"), per_window[:, of_window].astype(bool if name == "success" else float))
    message = per_frame(decode(g["message"][()]), n, "")
    data["message"] = (("frame", "component"), message[:, of_window] if of_window.size else message[:, :0])
    data["done"] = ("frame", per_frame(g["done"][()], n, 0).astype(bool))
    comp = {"component": _component_labels(labels["peak_phase"], labels["peak_hkl"], labels["peak_window"]),
            "window": ("component", labels["peak_window"]), "phase": ("component", labels["peak_phase"]),
            "hkl": ("component", labels["peak_hkl"]), "profile": ("component", labels["peak_profile"])}
    fit = json.loads(g.attrs["fingerprint"]).get("fit", {}) if "fingerprint" in g.attrs else {}
    # (a key at its default is left out of the fingerprint: FitSpec.key)
    binned = fit.get("model", "phases") == "phases" and fit.get("instrument", "auto") == "auto"
    sd = fit.get("instrument_sd")
    return xr.Dataset(data, coords={**coords, **comp},
                      attrs={"windows": windows, "instrument": "auto" if binned else "none",
                             "instrument_sd": float(sd) if binned and sd is not None else float("nan")})


def _lattice(h5, coords: dict) -> xr.Dataset:
    t = group_arrays(h5, LATTICE)
    stored = t.pop("attrs")
    frames = np.asarray(t.pop("frame"), int)
    phases = list(t.pop("phase"))
    t.pop("time_s", None)
    data = {}
    for name, v in t.items():
        v = np.asarray(v)
        if v.ndim == 2 and v.shape == (frames.size, len(phases)):
            data[name] = (("frame", "phase"), v, _lattice_attrs(name))
        elif v.ndim == 1 and v.size == frames.size:
            data[name] = ("frame", v)
    sub = {k: ("frame", np.asarray(v[1])[frames], v[2]) for k, v in coords.items() if k != "frame"}
    sub["frame"] = ("frame", frames, {"long_name": "frame"})
    sub["phase"] = ("phase", np.array(phases, dtype=object))
    attrs = {k: (text(v) if isinstance(v, bytes) else v) for k, v in stored.items() if k != "NX_class"}
    return xr.Dataset(data, coords=sub, attrs=attrs)


def _lattice_attrs(name: str) -> dict[str, str]:
    if name.endswith("_A"):
        return {"units": "angstrom"}
    if name.endswith("_A3"):
        return {"units": "angstrom^3"}
    if name.endswith("_deg"):
        return {"units": "degree"}
    return {}


def _record(h5) -> xr.Dataset | None:
    t = group_arrays(h5, ECHEM_RECORD)
    if t is None:
        return None
    n = t["time_s"].size
    units = {"time_s": "s", "voltage_V": "V", "current_mA": "mA", "capacity_mAh_g": "mAh/g",
             "half_cycle_capacity_mAh_g": "mAh/g", "time": "s (POSIX, UTC)"}
    data = {k: ("record", v, {"units": units[k]} if k in units else {}) for k, v in t.items()
            if np.ndim(v) == 1 and np.size(v) == n}
    return xr.Dataset(data, coords={"record": np.arange(n)})
