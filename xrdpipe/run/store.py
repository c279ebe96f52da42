"""The run file: one NeXus/HDF5 file per run, written frame by frame and resumable.

Layout (``@default`` chain set so silx view and h5web show the pattern stack as an image)::

    /                       @default = "entry"
    /entry                  NXentry   @default = "patterns"
      patterns              NXdata    @signal = "intensity", @axes = ["frame", <radial>]
        intensity           (frame, radial) float32, NaN until written
        intensity_errors    (frame, radial) float32 (Poisson esd)
        frame               (frame,)  row number
        tth, q              (radial,) 2θ in degrees and Q in 1/Å (one is the primary axis)
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
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..crystallography import RadialAxis, convert_radial
from ..errors import StoreError
from ..frames import FrameRef
from ..timing import FrameTime, iso_seconds, utc_seconds
from .paths import (
    ELECTROCHEMISTRY,
    ENTRY,
    FINGERPRINT,
    FORMAT,
    FRAMES,
    INSTRUMENT,
    PATTERNS,
    PEAKS,
    PROCESS,
    STAGES,
    h5path,
)

__all__ = ["RunFile", "open_run", "PENDING", "DONE", "FAILED", "Patterns", "RunInfo", "FrameTable", "StageRecord",
           "read_run_info", "read_frames", "write_table", "read_table", "has_group", "read_stages",
           "mark_stage", "read_pattern_block", "Writer", "enter_transaction", "reading", "str_dtype", "decode", "text", "per_frame", "read_electrochemistry", "group_arrays"]

PENDING, DONE, FAILED = 0, 1, -1
_AXIS_NAME = {"2th_deg": "tth", "q_A^-1": "q"}


def str_dtype():
    """The HDF5 dtype of the run file's strings (UTF-8, variable length)."""
    import h5py

    return h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Patterns(RadialAxis):
    """The pattern stack read back from a run file (labelled: frame x radial)."""

    radial: np.ndarray
    unit: str
    wavelength_A: float | None
    intensity: np.ndarray
    sigma: np.ndarray
    frames: dict[str, np.ndarray]


class Writer:
    """The base of every writer of a part of the run file (:class:`RunFile`, the peak and
    refinement stores). A run file open for writing inside a :func:`~xrdpipe.safeio.transaction`: results are
    published every ``checkpoint_s`` and when it closes (also on Ctrl-C), so nothing written is
    lost; the published file is never half-written (see :mod:`xrdpipe.safeio`)."""

    def __init__(self, session, stack, path: Path):
        self._session = session
        self._stack = stack
        self._h5 = session.writable()
        self.path = path

    def maybe_flush(self) -> None:
        self._session.maybe_publish()

    def flush(self) -> None:
        self._session.publish()

    def _on_close(self) -> None:
        pass

    def close(self) -> None:
        self._on_close()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._on_close()
        self._stack.__exit__(*exc)


def enter_transaction(path: Path):
    """A transaction on ``path``, entered on an ExitStack the writer owns."""
    from contextlib import ExitStack

    from ..safeio import transaction

    stack = ExitStack()
    return stack, stack.enter_context(transaction(path))


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
                         provenance: dict[str, str], title: str = "", restart: bool = False) -> "RunFile":
        """Create the run file, or reopen it to resume.

        Raises
        ------
        StoreError
            The existing file was made with other settings (named), unless ``restart`` is True,
            in which case it is replaced.
        """
        path = Path(path)
        stack, session = enter_transaction(path)
        try:
            if (path.exists() or session.readable() is not None) and not restart:
                h5 = session.writable()
                if h5.attrs.get("format") != FORMAT or h5path(FINGERPRINT) not in h5:
                    raise StoreError(f"{path} is not an xrdpipe run file; choose another run name or --restart")
                old = json.loads(h5[h5path(FINGERPRINT)][()])
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                if changed:
                    raise StoreError(
                        f"run file {path} holds patterns made with other settings (changed: {', '.join(changed)}); "
                        "rerun with --restart to discard them and integrate again"
                    )
            else:
                session.create(lambda h5: _create_layout(
                    h5, radial=np.asarray(radial, float), unit=unit, wavelength_A=wavelength_A,
                    fingerprint=fingerprint, provenance=provenance, title=title))
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


def _create_layout(h5, *, radial, unit, wavelength_A, fingerprint, provenance, title) -> None:
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


def text(v) -> str:
    """One string of a run file (a dataset's value or an attribute) as str (h5py hands back bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def decode(arr) -> np.ndarray:
    """Strings of any shape as str objects (h5py hands back bytes)."""
    arr = np.asarray(arr)
    out = np.empty(arr.shape, dtype=object)
    out.ravel()[:] = [v.decode() if isinstance(v, bytes) else v for v in arr.ravel()]
    return out


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
                        _frames(h5).as_dict())


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


@contextmanager
def reading(path: Path | str):
    """A run file open read-only, checked; errors name the file."""
    import h5py

    from ..safeio import active

    path = Path(path)
    session = active(path)
    if session is not None and session.readable() is not None:   # our own work in progress
        yield session.readable()
        return
    if not path.exists():
        raise StoreError(f"run file {path} does not exist; run 'xrdpipe integrate' first")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"cannot read run file {path}: {exc}") from None
    with h5:
        if h5.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not an xrdpipe run file")
        yield h5


def axis_of(h5) -> tuple[str, str, float | None]:
    """The pattern axis dataset name, its radial unit and the wavelength (Å) of a run file."""
    axis = h5[h5path(PATTERNS)].attrs["axes"][1]
    axis = text(axis)
    wl = h5[h5path("instrument/monochromator")].get("wavelength")
    return axis, "2th_deg" if axis == "tth" else "q_A^-1", float(wl[()]) if wl is not None else None


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
                       json.loads(h5[h5path(FINGERPRINT)][()]), PEAKS in h5[ENTRY])


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
    ``"attrs"``; only the arrays in ``names`` when given; None when the run file has no such group."""
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


def read_electrochemistry(path: Path | str, names: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``/entry/electrochemistry`` (the cell's state per frame) with one row per frame of the run
    file, or None when the echem stage has not run. Frames integrated after echem last ran have
    no state yet: their rows are NaN (numbers), -1 (integers) or "" (strings), and
    ``"frames_without"`` counts them (run ``xrdpipe echem`` again)."""
    ec = read_table(path, ELECTROCHEMISTRY, names)
    if ec is None:
        return None
    with reading(path) as h5:
        n = int(h5[h5path(f"{FRAMES}/status")].shape[0])
    rows = max((len(v) for k, v in ec.items() if k != "attrs" and np.ndim(v) >= 1), default=n)
    for k, v in list(ec.items()):
        if k != "attrs" and np.ndim(v) >= 1 and len(v) != n:
            kind = np.asarray(v).dtype.kind
            ec[k] = per_frame(np.asarray(v, float) if kind == "f" else v, n,
                              np.nan if kind == "f" else -1 if kind in "iu" else False if kind == "b" else "")
    ec["frames_without"] = max(n - rows, 0)
    return ec


def has_group(path: Path | str, group: str) -> bool:
    """Whether the run file holds ``/entry/<group>``."""
    with reading(path) as h5:
        return group in h5[ENTRY]


# ----------------------------------------------------------------------------------------------
# /entry/process/stages: what each stage of `xrdpipe run` last finished, from which inputs

@dataclass(frozen=True)
class StageRecord:
    """What a stage of ``xrdpipe run`` last finished: from which inputs (``key``), when, its
    summary and the files it wrote."""

    key: str
    finished: str = ""
    summary: str = ""
    outputs: tuple[str, ...] = ()


def read_stages(path: Path | str) -> dict[str, StageRecord]:
    """The finished stages of a run file. A stage appears only once it has finished; empty for a
    run file that does not exist yet."""
    from ..safeio import active

    session = active(path)
    if not Path(path).exists() and (session is None or session.readable() is None):
        return {}
    with reading(path) as h5:
        g = h5[ENTRY].get(STAGES)
        if g is None:
            return {}
        out = {}
        for name, sub in g.items():
            a = {k: text(v) for k, v in sub.attrs.items()}
            out[name] = StageRecord(a.get("key", ""), a.get("finished", ""), a.get("summary", ""),
                                    tuple(json.loads(a.get("outputs") or "[]")))
        return out


def mark_stage(path: Path | str, stage: str, key: str | None, summary: str = "",
               outputs: Sequence[Path | str] = ()) -> None:
    """Record that ``stage`` finished from inputs ``key``, writing ``outputs`` (or, with None,
    forget it: the stage has started and its outputs are in flux until it finishes)."""
    from ..safeio import active, transaction

    session = active(path)
    if not Path(path).exists() and (session is None or session.readable() is None):
        return
    with transaction(path) as session:
        h5 = session.writable()
        if h5.attrs.get("format") != FORMAT or h5path(PROCESS) not in h5:
            return                       # not a run file: whoever opens it next says so
        g = h5[ENTRY].require_group(STAGES)
        if stage in g:
            del g[stage]
        if key is not None:
            sub = g.create_group(stage)
            sub.attrs.update({"key": key, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "summary": summary, "outputs": json.dumps([str(p) for p in outputs])})


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

