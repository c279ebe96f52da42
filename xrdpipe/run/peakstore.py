"""``/entry/peaks`` of the run file: fitted peaks (frame x peak) and the phase model's per-frame
arrays, written block by block (resumable), and read back (:func:`read_peaks` -> :class:`PeakArrays`
as stored, :func:`read_peak_table` -> :class:`~xrdpipe.peaks.PeakTable` of the done frames)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import StoreError
from ..tables import PEAK_ARRAYS
from .access import Writer, axis_of, decode, enter_transaction, reading, str_dtype
from .nexus import Curve, put_nxdata
from .paths import ENTRY, FRAMES, PATTERNS, PEAKS, PEAKS_OTHER, h5path

__all__ = ["PeakStore", "PHASE_DATASETS", "PeakArrays", "read_peaks", "read_peak_table"]

_PEAK_UNITS = {"d_A": "angstrom", "d_err_A": "angstrom", "area": "counts x radial unit",
               "area_err": "counts x radial unit", "height": "counts"}


class PeakStore(Writer):
    """The ``/entry/peaks`` group of a run file, open for writing.

    Layout: one (frame, peak) dataset per quantity (``center``, ``center_err``, ``fwhm``, ...,
    ``present``), one (frame, window) dataset for ``success``, ``redchi`` and ``message``, the
    labels ``peak_window``, ``peak_phase``, ``peak_hkl``, ``peak_profile`` (peak,) and ``window``
    (window,), and ``done`` (frame,), set once a frame's results are written. ``@fingerprint``
    holds the settings; other settings start the group again.
    """

    def __init__(self, session, stack, path: Path, group: str = PEAKS):
        super().__init__(session, stack, path)
        self._group = group
        self._g = self._h5[h5path(group)]
        self._layout: tuple = ()

    @classmethod
    def open(cls, path: Path | str, *, windows: Sequence[str], peaks: Sequence[tuple[str, str, str, str]],
             fingerprint: dict[str, Any], restart: bool = False,
             phases: Sequence[str] | None = None) -> tuple["PeakStore", bool]:
        """Open (or create) the group; returns the store and whether earlier results were kept.
        ``phases``: the phase model's phases, whose per-frame arrays (:data:`PHASE_DATASETS`)
        are kept beside the peaks."""
        path = Path(path)
        stack, session = enter_transaction(path)
        try:
            h5 = session.writable()
            n = h5[h5path(f"{FRAMES}/key")].shape[0]
            entry = h5[ENTRY]
            kept = False
            text = json.dumps(fingerprint, sort_keys=True)
            if PEAKS in entry:
                same = entry[PEAKS].attrs.get("fingerprint") == text
                if same and not restart:
                    kept = True
                else:
                    del entry[PEAKS]
            if not kept:
                if PEAKS_OTHER in entry:        # the naming check's other run of those results
                    del entry[PEAKS_OTHER]
                _create_peaks(entry, n, windows, peaks, text, phases)
            store = cls(session, stack, path)
            store._layout = (tuple(windows), tuple(peaks), None if phases is None else tuple(phases))
            store._grow(n)
            return store, kept
        except BaseException:
            stack.close()
            raise

    def _on_close(self) -> None:
        if self._group == PEAKS and self._h5.id.valid:
            _put_centres(self._h5)

    def other_naming(self, fingerprint: dict[str, Any]) -> "PeakStore":
        """``/entry/peaks_other_naming``, in the same transaction: the phase model's naming
        check fits the series again there with the other name of the first frame's phase (see
        :func:`xrdpipe.phasefit.fitter.naming_verdict`). Its results are kept while
        ``fingerprint`` stays the same, so that frames added later extend that run (and an
        interrupted check resumes) instead of fitting it again."""
        entry = self._h5[ENTRY]
        text = json.dumps(fingerprint, sort_keys=True)
        if PEAKS_OTHER in entry and entry[PEAKS_OTHER].attrs.get("fingerprint") != text:
            del entry[PEAKS_OTHER]
        if PEAKS_OTHER not in entry:
            windows, peaks, phases = self._layout
            _create_peaks(entry, self.done.size, windows, peaks, text, phases, group=PEAKS_OTHER)
        other = PeakStore(self._session, None, self.path, PEAKS_OTHER)
        other._grow(self.done.size)
        return other

    def drop_other_naming(self) -> None:
        """``/entry/peaks_other_naming`` removed (a second run fitted for a check that, in the
        end, had nothing to check)."""
        entry = self._h5[ENTRY]
        if PEAKS_OTHER in entry:
            del entry[PEAKS_OTHER]
        self.maybe_flush()

    def take(self, other: "PeakStore", other_fingerprint: dict[str, Any]) -> None:
        """The results of ``other`` (:meth:`other_naming`) become this group's, and this
        group's become ``other``'s (whose fingerprint is then ``other_fingerprint``: the name it
        now holds). Each group keeps its own passes over the series (``backward_through``)."""
        entry = self._h5[ENTRY]
        mine = self._g.attrs["fingerprint"]
        entry.move(PEAKS, "peaks_swapping")
        entry.move(PEAKS_OTHER, PEAKS)
        entry.move("peaks_swapping", PEAKS_OTHER)
        self._g, other._g = entry[PEAKS], entry[PEAKS_OTHER]
        self._g.attrs["fingerprint"] = mine
        for attr in ("zero_estimate",):        # (both runs held the same zero shift)
            if attr in other._g.attrs and attr not in self._g.attrs:
                self._g.attrs[attr] = other._g.attrs[attr]
        other._g.attrs["fingerprint"] = json.dumps(other_fingerprint, sort_keys=True)
        self.maybe_flush()

    def add_decision(self, row: int, phase: int, text: str, *, replacing: str | None = None) -> None:
        """Append ``text`` to how the phase model decided on ``phase`` in frame ``row`` (in place
        of what an earlier call added, from ``replacing`` on)."""
        d = self._g["phase_decision"]
        old = d[row, phase]
        old = old.decode() if isinstance(old, bytes) else str(old)
        if replacing is not None and replacing in old:
            old = old[:old.index(replacing)]
        d[row, phase] = old + text

    def _grow(self, n: int) -> None:
        g = self._g
        if g["done"].shape[0] < n:
            for name, ds in g.items():
                if isinstance(ds, type(g["done"])) and ds.maxshape and ds.maxshape[0] is None:
                    ds.resize((n, *ds.shape[1:]))

    @property
    def done(self) -> np.ndarray:
        return self._g["done"][()].astype(bool)

    @property
    def backward_through(self) -> int:
        """Rows ``0:n`` the phase model's backward pass has been over (0: none yet)."""
        return int(self._g.attrs.get("backward_through", 0))

    @backward_through.setter
    def backward_through(self, n: int) -> None:
        self._g.attrs["backward_through"] = int(n)

    @property
    def zero_estimate(self) -> tuple[float, float, int, float, float] | None:
        """The phase model's zero shift held for the run and its esd (NaN: the calibration's),
        the number of frames it was estimated on, and that estimate with its esd (None: not
        estimated)."""
        got = self._g.attrs.get("zero_estimate")
        if got is None or len(got) < 5:
            return None
        return float(got[0]), float(got[1]), int(got[2]), float(got[3]), float(got[4])

    @zero_estimate.setter
    def zero_estimate(self, value: tuple[float, float, int, float, float]) -> None:
        self._g.attrs["zero_estimate"] = np.array(value, float)

    def forget(self) -> None:
        """Every row to be fitted again (and the naming check's other run with them): what they
        were fitted with (the run's zero shift) has changed."""
        self._g["done"][:] = 0
        self.backward_through = 0
        self.named_through = 0
        entry = self._h5[ENTRY]
        if self._group == PEAKS and PEAKS_OTHER in entry:
            del entry[PEAKS_OTHER]
        self.maybe_flush()

    @property
    def named_through(self) -> int:
        """Rows ``0:n`` the phase model's whole-series naming check has been over (0: none yet)."""
        return int(self._g.attrs.get("named_through", 0))

    @named_through.setter
    def named_through(self, n: int) -> None:
        self._g.attrs["named_through"] = int(n)

    def read_patterns(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` of the pattern stack: intensity and its esd (NaN if none)."""
        pat = self._h5[h5path(PATTERNS)]
        return pat["intensity"][start:stop].astype(float), pat["intensity_errors"][start:stop].astype(float)

    def stored(self, stop: int) -> dict[str, np.ndarray]:
        """Results of rows ``0:stop`` (to carry start values into a resumed fit)."""
        g = self._g
        out = {name: g[name][:stop] for name in PEAK_ARRAYS}
        out.update(present=g["present"][:stop].astype(bool), success=g["success"][:stop].astype(bool),
                   done=g["done"][:stop].astype(bool))
        for name in PHASE_DATASETS:
            if name in g and name != "phase_decision":
                out[name] = g[name][:stop]
        return out

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray], present: np.ndarray, success: np.ndarray,
              redchi: np.ndarray, message: np.ndarray, phase: dict[str, np.ndarray] | None = None) -> None:
        """Write the results of ``rows`` (ascending) and mark them done (``phase``: the phase
        model's arrays of the same rows)."""
        rows = np.asarray(rows)
        g = self._g
        sel = slice(int(rows[0]), int(rows[-1]) + 1) if np.all(np.diff(rows) == 1) else rows
        for name in PEAK_ARRAYS:
            g[name][sel] = values[name]
        for name, value in (phase or {}).items():
            if name not in g:           # a run file written before this array existed
                continue
            if name == "phase_decision":
                g[name][sel] = np.asarray(value).astype(str).astype(object)
            else:
                g[name][sel] = value.astype(g[name].dtype)
        g["present"][sel] = present.astype(np.int8)
        g["success"][sel] = success.astype(np.int8)
        g["redchi"][sel] = redchi
        g["message"][sel] = message.astype(str).astype(object)
        g["done"][sel] = 1  # last: a row is done only once its results are in
        self.maybe_flush()


def _put_centres(h5) -> None:
    """``/entry/results/centres``: the fitted centre of every component per frame (NaN where it
    is absent or its fit failed), with esds, an NXdata that silx view and h5web plot at once."""
    g = h5[h5path(PEAKS)]
    phase, hkl, window = (decode(g[k][()]) for k in ("peak_phase", "peak_hkl", "peak_window"))
    if not len(phase):
        return
    shown = g["present"][()].astype(bool) & g["done"][()].astype(bool)[:, None]
    center = np.where(shown, g["center"][()], np.nan)
    err = np.where(shown, g["center_err"][()], np.nan)
    labels = [f"{p} {k}" for p, k in zip(phase, hkl)]
    labels = [f"{lab} [{w}]" if labels.count(lab) > 1 else lab for lab, w in zip(labels, window)]
    axis, _, _ = axis_of(h5)
    units = h5[h5path(f"{PATTERNS}/{axis}")].attrs.get("units", "")
    put_nxdata(h5[ENTRY], "centres", [Curve(lab, center[:, j], err[:, j]) for j, lab in enumerate(labels)],
               axis=("frame", np.arange(center.shape[0]), ""), units=units, long_name="fitted centre")


#: The phase model's per-frame datasets in ``/entry/peaks`` (frame x phase [x window or cell]).
PHASE_DATASETS = ("phase_cell", "phase_cell_err", "phase_present", "phase_area", "phase_area_err", "phase_fwhm",
                  "phase_eta", "zero", "phase_decision", "phase_volume", "phase_volume_err", "phase_ref_area",
                  "phase_bic", "forward_cell", "forward_present", "forward_fwhm", "forward_eta", "forward_ref_area",
                  "phase_named", "phase_misfit", "zero_err", "misfit_ref", "misfit_ref_run", "misfit_ref_confirmed",
                  "state_redchi")


def _create_peaks(entry, n: int, windows, peaks, fingerprint: str, phases=None, group: str = PEAKS) -> None:
    s = str_dtype()
    g = entry.create_group(group)
    g.attrs.update({"NX_class": "NXcollection", "fingerprint": fingerprint})
    p, w = len(peaks), len(windows)
    for name in PEAK_ARRAYS:
        d = g.create_dataset(name, shape=(n, p), maxshape=(None, p), dtype="f8", fillvalue=np.nan,
                             chunks=(min(max(n, 1), 1024), max(p, 1)))
        if name in _PEAK_UNITS:
            d.attrs["units"] = _PEAK_UNITS[name]
    g.create_dataset("present", shape=(n, p), maxshape=(None, p), dtype="i1", chunks=(1024, max(p, 1)))
    g.create_dataset("success", shape=(n, w), maxshape=(None, w), dtype="i1", chunks=(1024, max(w, 1)))
    g.create_dataset("redchi", shape=(n, w), maxshape=(None, w), dtype="f8", fillvalue=np.nan,
                     chunks=(1024, max(w, 1)))
    g.create_dataset("message", shape=(n, w), maxshape=(None, w), dtype=s, chunks=(1024, max(w, 1)))
    g.create_dataset("done", shape=(n,), maxshape=(None,), dtype="i1", chunks=(1024,))
    g.create_dataset("window", data=np.array(list(windows), dtype=object), dtype=s)
    for i, name in enumerate(("peak_window", "peak_phase", "peak_hkl", "peak_profile")):
        g.create_dataset(name, data=np.array([pk[i] for pk in peaks], dtype=object), dtype=s)
    if phases:
        q = len(phases)
        g.create_dataset("phase", data=np.array(list(phases), dtype=object), dtype=s)
        shapes = {"phase_cell": (q, 6), "phase_cell_err": (q, 6), "phase_present": (q,), "phase_area": (q, w),
                  "phase_area_err": (q, w), "phase_fwhm": (q, w), "phase_eta": (q,), "zero": (), "phase_decision": (q,),
                  "phase_volume": (q,), "phase_volume_err": (q,), "phase_ref_area": (q, w), "phase_bic": (),
                  # a frame the backward pass replaced: the state the forward pass carried on from
                  # it (NaN elsewhere), where an interrupted fit resumes
                  "forward_cell": (q, 6), "forward_present": (q,), "forward_fwhm": (q, w), "forward_eta": (q,),
                  "forward_ref_area": (q, w),
                  # the phase another could have been named instead, by the typed cells (its index)
                  "phase_named": (q,),
                  # the misfit term of phase_bic, n ln(chi-square / n): what the naming check compares
                  "phase_misfit": (),
                  # the esd of the run's zero shift where the phase model estimated it
                  "zero_err": (),
                  # the steady path's reference: each window's chi-square per point in the last
                  # frame searched (or explained to its noise), and how many frames since were
                  # followed for their misfit being as there (what the next frame starts from),
                  # and how many searches in a row made for that run's length alone confirmed
                  # it (each doubles the next run allowed)
                  "misfit_ref": (w,), "misfit_ref_run": (), "misfit_ref_confirmed": (),
                  # each window's reduced chi-square handed to the next frame (against the data
                  # its decisions were made on), what a window's rise is measured from
                  "state_redchi": (w,)}
        for name, shape in shapes.items():
            kind = {"phase_present": "i1", "phase_decision": s}.get(name, "f8")
            extra = {} if kind != "f8" else {"fillvalue": np.nan}
            g.create_dataset(name, shape=(n, *shape), maxshape=(None, *shape), dtype=kind,
                             chunks=(min(max(n, 1), 1024), *[max(v, 1) for v in shape]), **extra)
        g["phase_cell"].attrs["columns"] = "a b c (angstrom) alpha beta gamma (degrees)"
        g["zero"].attrs["units"] = "degree (2theta)"
        g["zero_err"].attrs["units"] = "degree (2theta)"


#: The per-frame arrays of ``/entry/peaks`` besides the per-peak quantities (fields of :class:`PeakArrays`).
_ROW_ARRAYS = ("present", "success", "redchi", "done", "message")


@dataclass(frozen=True)
class PeakArrays:
    """``/entry/peaks`` of a run file as stored (every frame, done or not; see :class:`PeakStore`).

    ``values`` holds the per-peak quantities read (:data:`~xrdpipe.tables.PEAK_ARRAYS`, frame x
    peak), ``phase_arrays`` the phase model's arrays read (:data:`PHASE_DATASETS`; empty for
    independent peaks); an array not asked for is None (or left out of those dicts).
    """

    window: tuple[str, ...]                    # the windows (columns of success, redchi, message)
    peak_window: tuple[str, ...]               # per peak: its window, phase, hkl and profile
    peak_phase: tuple[str, ...]
    peak_hkl: tuple[str, ...]
    peak_profile: tuple[str, ...]
    time_s: np.ndarray                         # per frame, seconds since the earliest frame's start
    fingerprint: dict[str, Any]                # the settings of the fit
    values: dict[str, np.ndarray] = field(default_factory=dict)
    present: np.ndarray | None = None          # (frame, peak) int8
    success: np.ndarray | None = None          # (frame, window) int8
    redchi: np.ndarray | None = None           # (frame, window)
    done: np.ndarray | None = None             # (frame,) int8: 1 once a frame's results are in
    message: np.ndarray | None = None          # (frame, window) str
    phase: tuple[str, ...] | None = None       # the phase model's phases (None: independent peaks)
    phase_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def peaks(self) -> tuple[tuple[str, str, str, str], ...]:
        """(window, phase, hkl, profile) per peak, as :class:`~xrdpipe.peaks.PeakTable` has them."""
        return tuple(zip(self.peak_window, self.peak_phase, self.peak_hkl, self.peak_profile))


def read_peaks(path: Path | str, arrays: Sequence[str] | None = None) -> PeakArrays:
    """``/entry/peaks`` of a run file (see :class:`PeakStore`), with ``time_s``; ``arrays`` names
    the per-frame arrays wanted (default all, ``message`` included), so that a figure of
    thousands of frames reads only what it draws."""
    with reading(path) as h5:
        if PEAKS not in h5[ENTRY]:
            raise StoreError(f"{path} holds no fitted peaks yet; run 'xrdpipe fit' first")
        g = h5[h5path(PEAKS)]
        wanted = (*PEAK_ARRAYS, *_ROW_ARRAYS) if arrays is None else arrays
        unknown = [a for a in wanted if a not in g or not hasattr(g[a], "dtype")]
        if unknown:
            known = sorted(k for k, v in g.items() if hasattr(v, "dtype"))
            raise StoreError(f"{path}: /entry/peaks holds no {', '.join(map(repr, unknown))} "
                             f"(it holds {', '.join(known)})")
        rows = {name: decode(g[name][()]) if name == "message" else g[name][()]
                for name in wanted if name in _ROW_ARRAYS}
        labels = {name: tuple(decode(g[name][()])) for name in ("window", "peak_window", "peak_phase", "peak_hkl",
                                                                 "peak_profile")}
        phase, phase_arrays = None, {}
        if "phase" in g and (arrays is None or any(a in PHASE_DATASETS for a in wanted)):
            phase = tuple(decode(g["phase"][()]))
            phase_arrays = {name: decode(g[name][()]) if name == "phase_decision" else g[name][()]
                            for name in PHASE_DATASETS if name in g and (arrays is None or name in arrays)}
        return PeakArrays(**labels, time_s=h5[h5path(f"{PATTERNS}/time_s")][()],
                          fingerprint=json.loads(g.attrs["fingerprint"]),
                          values={name: g[name][()] for name in wanted if name in PEAK_ARRAYS}, **rows,
                          phase=phase, phase_arrays=phase_arrays)


def read_peak_table(run_file: Path | str):
    """The fitted peaks of a run file as a :class:`~xrdpipe.peaks.PeakTable` (done rows only)."""
    from ..peaks import PeakTable

    d = read_peaks(run_file)
    rows = np.flatnonzero(d.done)
    phase = {k: v[rows] for k, v in d.phase_arrays.items()} if d.phase is not None else None
    return PeakTable(rows, d.time_s[rows], d.window, d.peaks, {k: v[rows] for k, v in d.values.items()},
                     d.present[rows].astype(bool), d.success[rows].astype(bool), d.redchi[rows],
                     d.message[rows], phase, d.phase)
