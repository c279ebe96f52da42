"""The run file: one NeXus/HDF5 file per run, written frame by frame and resumable.

Layout (``@default`` chain set so silx view and h5web show the pattern stack as an image)::

    /                       @default = "entry"
    /entry                  NXentry   @default = "patterns"
      patterns              NXdata    @signal = "intensity", @axes = ["frame", <radial>]
        intensity           (frame, radial) float32, NaN until written
        intensity_errors    (frame, radial) float32 (Poisson esd)
        frame               (frame,)  row number
        tth, q              (radial,) 2θ in degrees and Q in 1/Å (one is the primary axis)
        instrument_sd       (radial,) float64 in the radial unit: per bin, the standard deviation
                                      of the radial positions its value averages over (pixel
                                      area, splitting, bin); absent for imported 1D patterns
        instrument_offset   (radial,) float64: their mean less the bin's radial value
        time_s              (frame,)  middle of the exposure, seconds since the earliest frame's
                                      start (NaN if untimed)
      frames                NXcollection: key, file, index, start, end, timestamp, status, message
      instrument/monochromator/wavelength
      process               NXprocess: program, version, date, experiment text, PONI, package
                            versions, and the fingerprint of the settings the patterns depend on
        stages/<stage>      @key, @finished, @summary of each stage `xrdpipe run` finished
      results               NXcollection of NXdata views (silx view, h5web): centres, lattice_a,
                            lattice_c, volume, fractions, voltage (:mod:`xrdpipe.run.nexus`)

``status`` is 0 (pending), 1 (done) or -1 (failed, ``message`` says why). A rerun reopens the
file, checks the fingerprint and integrates only the rows that are not done.

Every write goes through a :func:`~xrdpipe.safeio.transaction` (copy-on-write): the file itself
is only ever replaced whole, so readers never see it half-written and ``kill -9`` cannot damage it.

This module writes and reads the patterns and the frame table; how the file is opened is
:mod:`xrdpipe.run.access`, the result groups :mod:`xrdpipe.run.groups`, the stage records
:mod:`xrdpipe.run.stagelog`, the fitted peaks :mod:`xrdpipe.run.peakstore`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..crystallography import RadialAxis, convert_radial
from ..errors import StoreError
from ..frames import FrameRef
from ..timing import FrameTime, iso_seconds, utc_seconds
from .access import Writer, axis_of, decode, enter_transaction, reading, str_dtype, text
from .paths import ENTRY, FINGERPRINT, FORMAT, FRAMES, INSTRUMENT, PATTERNS, PEAKS, PROCESS, h5path

__all__ = ["RunFile", "open_run", "PENDING", "DONE", "FAILED", "Patterns", "RunInfo", "FrameTable",
           "read_run_info", "read_frames", "read_pattern_block"]

PENDING, DONE, FAILED = 0, 1, -1
_AXIS_NAME = {"2th_deg": "tth", "q_A^-1": "q"}


@dataclass(frozen=True)
class Patterns(RadialAxis):
    """The pattern stack read back from a run file (labelled: frame x radial)."""

    radial: np.ndarray
    unit: str
    wavelength_A: float | None
    intensity: np.ndarray
    sigma: np.ndarray
    frames: dict[str, np.ndarray]
    #: per bin, the sd of the radial positions it averages over (``unit``); None if not stored
    instrument_sd: np.ndarray | None = None
    #: per bin, the mean of those positions less the bin's radial value; None if not stored
    instrument_offset: np.ndarray | None = None


class RunFile(Writer):
    """A run file open for writing (see the module docstring for its layout).

    Use :meth:`open_for_writing` to create or resume one; as a context manager it is flushed
    and closed on exit, also on Ctrl-C, so nothing written is lost.
    """

    def __init__(self, session, stack, path: Path):
        super().__init__(session, stack, path)
        self._keys: dict[str, int] = {
            text(k): i
            for i, k in enumerate(self._h5[h5path(f"{FRAMES}/key")][()])
        }

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def open_for_writing(cls, path: Path | str, *, radial: np.ndarray, unit: str,
                         wavelength_A: float | None, fingerprint: dict[str, Any],
                         provenance: dict[str, str], title: str = "", restart: bool = False,
                         instrument_sd: np.ndarray | None = None,
                         instrument_offset: np.ndarray | None = None,
                         same_as: dict[str, str] | None = None) -> "RunFile":
        """Create the run file, or reopen it to resume.

        A stored ``fingerprint`` value equal to the new one, or to its earlier form in
        ``same_as`` (what an earlier version of xrdpipe stored for the same settings), is
        unchanged.

        ``instrument_sd`` (per bin, in ``unit``: see
        :attr:`~xrdpipe.integration.Integrator.instrument_sd`) is written once, when the file
        is created, as ``/entry/patterns/instrument_sd``, and ``instrument_offset`` (the mean of
        those positions less the bin's radial value) beside it; a resumed file keeps what it has.

        Raises
        ------
        StoreError
            The existing file holds patterns made with other settings (named), unless
            ``restart`` is True, in which case it is replaced (as one whose every frame failed is).
        """
        path = Path(path)
        stack, session = enter_transaction(path)
        try:
            exists = path.exists() or session.readable() is not None
            if exists and not restart:
                h5 = session.writable()
                if h5.attrs.get("format") != FORMAT or h5path(FINGERPRINT) not in h5:
                    raise StoreError(f"{path} is not an xrdpipe run file; choose another run name or --restart")
                old = json.loads(h5[h5path(FINGERPRINT)][()])
                earlier = same_as or {}
                changed = sorted(k for k in set(old) | set(fingerprint)
                                 if old.get(k) != fingerprint.get(k) and (k not in earlier or old.get(k) != earlier[k]))
                status = h5path(FRAMES) + "/status"
                if changed and status in h5 and (h5[status][()] == DONE).any():
                    raise StoreError(
                        f"run file {path} holds patterns made with other settings (changed: {', '.join(changed)}); "
                        "to discard them and integrate again: xrdpipe integrate EXPERIMENT.toml --restart (from "
                        "Python: integrate_experiment(exp, restart=True))"
                    )
                # (a file whose every frame failed holds no pattern to mix with: with a dataset or
                # a mask put right, it is made anew, as with --restart)
                restart = bool(changed)
            if restart or not exists:
                session.create(lambda h5: _create_layout(
                    h5, radial=np.asarray(radial, float), unit=unit, wavelength_A=wavelength_A,
                    fingerprint=fingerprint, provenance=provenance, title=title,
                    instrument_sd=None if instrument_sd is None else np.asarray(instrument_sd, np.float64),
                    instrument_offset=None if instrument_offset is None else np.asarray(instrument_offset, np.float64)))
            return cls(session, stack, path)
        except BaseException:
            stack.close()
            raise

    # -- frames --------------------------------------------------------------------------
    def add_frames(self, refs: Sequence[FrameRef], times: Sequence[FrameTime | None]) -> list[int]:
        """Register frames (new ones are appended); returns each frame's row."""
        fr = self._h5[h5path(FRAMES)]
        new = [(r, t) for r, t in zip(refs, times) if r.key not in self._keys]
        # a frame registered without a time (its file was still being written) gets it now
        starts = fr["start"][()]
        late = [(self._keys[r.key], t) for r, t in zip(refs, times)
                if t is not None and r.key in self._keys and not starts[self._keys[r.key]]]
        for row, t in late:
            fr["start"][row], fr["end"][row] = t.start.isoformat(), t.end.isoformat()
            fr["timestamp"][row] = utc_seconds(t.mid)
        if new:
            n0 = fr["key"].shape[0]
            n1 = n0 + len(new)
            for name in ("key", "file", "index", "start", "end", "timestamp", "status", "message"):
                fr[name].resize((n1,))
            pat = self._h5[h5path(PATTERNS)]
            for name in ("intensity", "intensity_errors"):
                pat[name].resize((n1, pat[name].shape[1]))
            for name in ("frame", "time_s"):
                pat[name].resize((n1,))
            fr["key"][n0:n1] = [r.key for r, _ in new]
            fr["file"][n0:n1] = [str(r.file) for r, _ in new]
            fr["index"][n0:n1] = [r.index for r, _ in new]
            fr["start"][n0:n1] = [t.start.isoformat() if t else "" for _, t in new]
            fr["end"][n0:n1] = [t.end.isoformat() if t else "" for _, t in new]
            fr["timestamp"][n0:n1] = [utc_seconds(t.mid) if t else np.nan for _, t in new]
            fr["status"][n0:n1] = PENDING
            fr["message"][n0:n1] = [r.error or "" for r, _ in new]
            pat["frame"][n0:n1] = np.arange(n0, n1)
            for i, (r, _) in enumerate(new):
                self._keys[r.key] = n0 + i
        if new or late:
            pat = self._h5[h5path(PATTERNS)]
            stamps = fr["timestamp"][()]
            starts = iso_seconds(decode(fr["start"][()]))
            t0 = np.nanmin(starts) if np.isfinite(starts).any() else np.nan
            pat["time_s"][...] = stamps - t0
        return [self._keys[r.key] for r in refs]

    @property
    def status(self) -> np.ndarray:
        return self._h5[h5path(f"{FRAMES}/status")][()]

    @property
    def frame_count(self) -> int:
        return len(self._keys)

    def write_pattern(self, row: int, intensity: np.ndarray, sigma: np.ndarray | None, *, message: str = "") -> None:
        """Store a frame's pattern (``message``: a remark on a frame kept, e.g. "suspicious: ...")."""
        pat = self._h5[h5path(PATTERNS)]
        pat["intensity"][row] = intensity
        if sigma is not None:
            pat["intensity_errors"][row] = sigma
        fr = self._h5[h5path(FRAMES)]
        fr["message"][row] = message
        fr["status"][row] = DONE  # written last: a row is done only once its data are in
        self.maybe_flush()

    def write_failure(self, row: int, message: str) -> None:
        fr = self._h5[h5path(FRAMES)]
        fr["message"][row] = message
        fr["status"][row] = FAILED
        self.maybe_flush()

    def _on_close(self) -> None:
        if self._h5.id.valid:
            self._h5.attrs["file_update_time"] = datetime.now(timezone.utc).isoformat()


def _create_layout(h5, *, radial, unit, wavelength_A, fingerprint, provenance, title, instrument_sd=None,
                   instrument_offset=None) -> None:
    import h5py

    from .. import __version__

    now = datetime.now(timezone.utc).isoformat()
    npt = radial.size
    h5.attrs.update({"NX_class": "NXroot", "default": "entry", "creator": f"xrdpipe {__version__}",
                     "file_time": now, "format": FORMAT, "HDF5_Version": h5py.version.hdf5_version,
                     "h5py_version": h5py.version.version})
    entry = h5.create_group(ENTRY.strip("/"))
    entry.attrs.update({"NX_class": "NXentry", "default": "patterns"})
    entry.create_dataset("title", data=title or "xrdpipe run")
    entry.create_dataset("start_time", data=now)

    axis = _AXIS_NAME[unit]
    pat = entry.create_group(PATTERNS)
    pat.attrs.update({"NX_class": "NXdata", "signal": "intensity", "axes": ["frame", axis],
                      "frame_indices": 0, "tth_indices": 1, "q_indices": 1, "time_s_indices": 0})
    kw = dict(shape=(0, npt), maxshape=(None, npt), chunks=(1, npt), dtype="f4", fillvalue=np.nan)
    d = pat.create_dataset("intensity", **kw)
    d.attrs.update({"units": "counts", "long_name": "intensity (counts, corrected)", "interpretation": "spectrum"})
    e = pat.create_dataset("intensity_errors", **kw)
    e.attrs.update({"units": "counts", "long_name": "esd of intensity (Poisson)"})
    f = pat.create_dataset("frame", shape=(0,), maxshape=(None,), dtype="i8", chunks=(1024,))
    f.attrs["long_name"] = "frame"
    t = pat.create_dataset("time_s", shape=(0,), maxshape=(None,), dtype="f8", chunks=(1024,), fillvalue=np.nan)
    t.attrs.update({"units": "s", "long_name": "time since the first frame's start (s)"})
    tth = convert_radial(radial, unit, "2th_deg", wavelength_A)
    q = convert_radial(radial, unit, "q_A^-1", wavelength_A)
    a = pat.create_dataset("tth", data=np.asarray(tth, float))
    a.attrs.update({"units": "degree", "long_name": "2θ (degrees)"})
    b = pat.create_dataset("q", data=np.asarray(q, float))
    b.attrs.update({"units": "1/angstrom", "long_name": "Q (1/Å)"})
    for name, values, long_name in (
            ("instrument_sd", instrument_sd,
             "standard deviation of the radial positions a bin averages over (pixel area, splitting, bin)"),
            ("instrument_offset", instrument_offset,
             "mean of the radial positions a bin averages over, less the bin's radial value")):
        if values is not None:
            if values.shape != (npt,):
                raise ValueError(f"{name} has shape {values.shape}, expected ({npt},) like the radial axis")
            ds = pat.create_dataset(name, data=values)
            ds.attrs.update({"units": unit, "long_name": long_name})

    _create_frames(entry)

    ins = entry.create_group(INSTRUMENT)
    ins.attrs["NX_class"] = "NXinstrument"
    mono = ins.create_group("monochromator")
    mono.attrs["NX_class"] = "NXmonochromator"
    if wavelength_A:
        w = mono.create_dataset("wavelength", data=float(wavelength_A))
        w.attrs["units"] = "angstrom"

    proc = entry.create_group(PROCESS)
    proc.attrs["NX_class"] = "NXprocess"
    proc.create_dataset("program", data="xrdpipe")
    proc.create_dataset("version", data=__version__)
    proc.create_dataset("date", data=now)
    proc.create_dataset("fingerprint", data=json.dumps(fingerprint, sort_keys=True))
    for key, value in provenance.items():
        proc.create_dataset(key, data=value)


def _create_frames(entry) -> None:
    """The empty frame table (grown as frames are registered)."""
    s = str_dtype()
    fr = entry.create_group(FRAMES)
    fr.attrs["NX_class"] = "NXcollection"
    for name, dtype, fill in (("key", s, None), ("file", s, None), ("index", "i8", None),
                              ("start", s, None), ("end", s, None), ("timestamp", "f8", np.nan),
                              ("status", "i1", PENDING), ("message", s, None)):
        kw = dict(shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        if fill is not None:
            kw["fillvalue"] = fill
        fr.create_dataset(name, **kw)
    fr["timestamp"].attrs.update({"units": "s", "long_name": "middle of the exposure, POSIX seconds (UTC)"})
    fr["status"].attrs["long_name"] = "0 pending, 1 done, -1 failed"


def open_run(path: Path | str) -> Patterns:
    """Read the pattern stack and frame table of a run file (read-only).

    Example
    -------
    >>> p = open_run("results/nfm-cell2.nxs")                  # doctest: +SKIP
    >>> p.intensity.shape                                       # doctest: +SKIP
    (50, 3000)
    """
    with reading(path) as h5:
        pat = h5[h5path(PATTERNS)]
        axis, unit, wl = axis_of(h5)
        return Patterns(pat[axis][()], unit, wl, pat["intensity"][()], pat["intensity_errors"][()],
                        _frames(h5).as_dict(), *_instrument(pat, axis, path))


@dataclass(frozen=True)
class FrameTable:
    """The frame table of a run file (``/entry/frames``), one entry per frame."""

    key: np.ndarray          # str: file[:index] (what identifies a frame across runs)
    file: np.ndarray         # str
    index: np.ndarray        # int: the frame's place in its file
    start: np.ndarray        # str: ISO time of the exposure's start ("" if untimed)
    end: np.ndarray          # str
    timestamp: np.ndarray    # float: the middle of the exposure, POSIX seconds (NaN if untimed)
    status: np.ndarray       # int: PENDING, DONE or FAILED
    message: np.ndarray      # str: why a frame failed, or a remark on one kept
    time_s: np.ndarray       # float: seconds since the earliest frame's start

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def read_frames(path: Path | str) -> FrameTable:
    """The frame table of a run file without the pattern stack."""
    with reading(path) as h5:
        return _frames(h5)


def _frames(h5) -> FrameTable:
    fr = h5[h5path(FRAMES)]
    return FrameTable(decode(fr["key"][()]), decode(fr["file"][()]), fr["index"][()], decode(fr["start"][()]),
                      decode(fr["end"][()]), fr["timestamp"][()], fr["status"][()], decode(fr["message"][()]),
                      h5[h5path(f"{PATTERNS}/time_s")][()])


@dataclass(frozen=True)
class RunInfo:
    """Everything about a run file's patterns but the pattern stack itself."""

    radial: np.ndarray             # the radial axis (``unit``)
    unit: str                      # "2th_deg" or "q_A^-1"
    wavelength_A: float | None
    status: np.ndarray             # per frame: PENDING, DONE or FAILED
    message: np.ndarray            # per frame (str)
    time_s: np.ndarray             # per frame, seconds since the earliest frame's start
    fingerprint: dict[str, Any]    # the settings the patterns depend on
    had_peaks: bool                # whether ``/entry/peaks`` exists
    instrument_sd: np.ndarray | None = None   # per bin (``unit``); None if not stored
    instrument_offset: np.ndarray | None = None

    @property
    def frame_count(self) -> int:
        return int(self.status.size)


def read_run_info(path: Path | str) -> RunInfo:
    """The :class:`RunInfo` of a run file (read-only)."""
    with reading(path) as h5:
        pat = h5[h5path(PATTERNS)]
        axis, unit, wl = axis_of(h5)
        return RunInfo(pat[axis][()], unit, wl, h5[h5path(f"{FRAMES}/status")][()],
                       decode(h5[h5path(f"{FRAMES}/message")][()]), pat["time_s"][()],
                       json.loads(h5[h5path(FINGERPRINT)][()]), PEAKS in h5[ENTRY], *_instrument(pat, axis, path))


def _instrument(pat, axis: str, path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``instrument_sd`` and ``instrument_offset`` of the patterns group, each None where it is
    not stored (imported 1D patterns, older run files)."""
    out = []
    for name in ("instrument_sd", "instrument_offset"):
        values = pat[name][()].astype(np.float64) if name in pat else None
        if values is not None and values.shape != pat[axis].shape:
            raise StoreError(f"{path}: /entry/patterns/{name} has {values.size} values, the radial axis "
                             f"{pat[axis].size}; integrate again with --restart")
        out.append(values)
    return tuple(out)


def read_pattern_block(path: Path | str, rows: Sequence[int] | np.ndarray | None = None,
                       columns: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Intensities and esds of some frames (``rows``, default every frame) over some radial
    ``columns`` only, so that a map of a window never reads the whole stack."""
    with reading(path) as h5:
        pat = h5[h5path(PATTERNS)]
        n = pat["intensity"].shape[0]
        if rows is None:
            return pat["intensity"][:, columns], pat["intensity_errors"][:, columns]
        rows = np.asarray(rows, int)
        bad = rows[(rows < 0) | (rows >= n)]
        if bad.size:
            raise StoreError(f"{path} has frames 0 to {n - 1}; there is no frame {int(bad[0])}")
        uniq, inverse = np.unique(rows, return_inverse=True)     # h5py reads increasing rows only
        return pat["intensity"][uniq, columns][inverse], pat["intensity_errors"][uniq, columns][inverse]

