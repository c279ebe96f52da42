"""Frame after frame (:class:`PhaseFitter`): the state carried between frames, the peak table
and the phase arrays of a block of frames, the backward pass from frames where a phase that
appeared is strong, and :func:`fit_phases` for an in-memory pattern stack."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ..config import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from ..crystallography import (
    parse_hkl,
)
from ..peaks import PEAK_FIELDS, PeakTable, WindowSetupError, concat_tables
from .ahead import AheadRun, patience
from .ahead import available as ahead_available
from .decide import _bic, _misfit, fit_frame
from .frame import FrameResult, _Frame
from .model import _BACKWARD_MAX, _CELL_INDEX, PhaseModel, PhaseState
from .solve import _failed, _held, _volume, centre_esd, d_of, initial_state, least_squares
from .tails import far_tails

# ----------------------------------------------------------------------------------------------
# every frame of a block, in order, into a peak table

class PhaseFitter:
    """Fits the phase model frame after frame, carrying the state from each frame to the next;
    ``fit_block`` returns a :class:`~xrdpipe.peaks.PeakTable` whose listed peaks (the windows'
    ``peaks``) are read off the phase model, with the phase results in ``table.phase``.

    ``state`` is the whole memory between frames; :meth:`resume` sets it from stored results.
    Where ``[lattice] correction`` asks for one, the run's zero shift is estimated once
    (:meth:`estimate_zero` on the run's first usable frames, before the first is fitted) and
    held; a resumed run takes it from its stored rows.
    """

    def __init__(self, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
                 lattice: LatticeSpec = LatticeSpec(), *, radial: np.ndarray, unit: str, wavelength_A: float | None,
                 instrument_sd: np.ndarray | None = None, instrument_offset: np.ndarray | None = None):
        self.fit = fit
        try:
            self.model = PhaseModel(phases, windows, fit, lattice, radial=radial, unit=unit, wavelength_A=wavelength_A,
                                    instrument_sd=instrument_sd, instrument_offset=instrument_offset)
        except ValueError as exc:
            raise WindowSetupError([(0, str(exc))]) from None
        m = self.model
        self.windows = tuple(w.name for w in windows)
        problems, comps, peaks = [], [], []
        for wi, w in enumerate(windows):
            for label in w.peaks:
                phase, hkl = label.split(" ", 1)
                try:
                    comps.append(m.label_index(wi, phase, hkl))
                except ValueError as exc:
                    problems.append((wi, f"window {w.name!r}: {exc}"))
                    continue
                h = parse_hkl(hkl)
                peaks.append((w.name, phase, " ".join(map(str, h)) if max(map(abs, h)) > 9 else "".join(map(str, h)),
                              "pseudo_voigt"))
        if problems:
            raise WindowSetupError(problems)
        # the lines of no phase (free peaks): each its phase's one line, "free <centre>" in peaks.csv
        for p, (wi, centre) in m.free_line.items():
            comps.append(int(np.flatnonzero(m.r_phase == p)[0]))
            peaks.append((windows[wi].name, "free", f"{centre:g}", "pseudo_voigt"))
        self.components = np.array(comps, int)
        self.peaks = tuple(peaks)
        self.comp_window = np.array([self.windows.index(p[0]) for p in peaks], int)
        self.phase_names = tuple(p.name for p in m.phases)
        #: the run's zero shift and its esd, once known ((0, NaN) without a correction)
        self.zero: tuple[float, float] | None = (0.0, np.nan) if m.correction == "none" else None
        self.state = self._fresh_state()
        #: the zero estimate's first frame (the state it started from, its data, its result):
        #: the run's first frame, fitted once where it starts from the same state (:meth:`_first_frame`)
        self._first: tuple[PhaseState, np.ndarray, np.ndarray | None, FrameResult] | None = None

    @property
    def needs_zero(self) -> bool:
        """Whether the run's zero shift is still to be estimated (:meth:`estimate_zero`)."""
        return self.zero is None

    def _fresh_state(self) -> PhaseState:
        st = initial_state(self.model, self.zero[0] if self.zero else 0.0)
        st.zero_err = self.zero[1] if self.zero else np.nan
        return st

    def estimate_zero(self, intensity: np.ndarray, sigma: np.ndarray | None) -> tuple[float, float]:
        """Estimate the run's zero shift on frames ``intensity`` (n, npt; the run's first
        :data:`ZERO_FRAMES` usable ones, in order; :meth:`_estimate_zero`) and hold it for every
        frame, with its esd; or hold the calibration's (0, no esd) where the estimate lies within
        :data:`ZERO_AGREES` esds of it. Returns the estimate and its esd.

        The zero's error is common to every frame of the run: where the first frames place it
        poorly (lines at few angles), its esd can outweigh a frame's own in the cells' esds, and a
        series' share of errors within one esd then follows one draw. Data that do not
        contradict the calibration keep it."""
        cols = self.model.columns
        y, e = intensity[:, cols], None if sigma is None else sigma[:, cols]
        found = self._estimate_zero(y, e)
        if np.isfinite(found[1]) and abs(found[0]) > ZERO_AGREES * found[1]:
            # the frames were decided with the calibration's zero, which the data contradict:
            # decided again with the zero found, the estimate is taken from those decisions (a
            # first frame decided wrong for want of 0.006°, a second phase on the first's lines
            # and the Al line lost, is followed by the next five; where they did not put it
            # right, 0.0059 ± 0.00014°, an esd 14x that of the run decided again)
            again = self._estimate_zero(y, e, found[0])
            found = again if np.isfinite(again[1]) else found
        agrees = abs(found[0]) <= ZERO_AGREES * found[1]         # (False without an esd)
        self.zero = (0.0, np.nan) if agrees else found
        self.state.zero, self.state.zero_err = self.zero
        return found

    def resume(self, stored: dict | None) -> None:
        """Take the state after the last stored row (``stored`` holds the phase arrays of rows
        before the ones to fit), or start afresh."""
        m = self.model
        self.state = self._fresh_state()
        if not stored or "phase_cell" not in stored or not len(stored["phase_cell"]):
            return
        done = np.flatnonzero(stored["done"])
        if not done.size:
            return
        r = done[-1]
        self.state = _stored_state(m, stored, r, forward=True)
        if self.zero is None and np.isfinite(stored["zero"][r]):
            self.zero = (float(stored["zero"][r]), _zero_err(stored, r))

    def fit_block(self, intensity: np.ndarray, sigma: np.ndarray | None, *, frame: np.ndarray,
                  time_s: np.ndarray | None = None, usable: np.ndarray | None = None,
                  reasons: Sequence[str] | None = None, progress=None,
                  on_named: Callable[[int, int], None] | None = None):
        """Fit frames ``intensity`` (n, npt) in order (``sigma`` alike or None); rows not
        ``usable`` are recorded as failures with their ``reasons`` and change nothing.
        ``on_named(p, q)`` is called for each frame whose lines phase ``p`` took by its typed
        cell where the similar phase ``q`` could have (``phase_named``), once the frame is
        recorded."""
        m = self.model
        n = intensity.shape[0]
        usable = np.ones(n, bool) if usable is None else np.asarray(usable, bool)
        cols = m.columns
        values, present, success, redchi, message, ph = self._arrays(n)
        if self.needs_zero and usable.any():
            # (not estimated on the run's first frames beforehand, as fit_phases and the run's
            # fit stage do: on this block's)
            some = np.flatnonzero(usable)[:ZERO_FRAMES]
            self.estimate_zero(intensity[some], None if sigma is None else sigma[some])
        numbers = np.asarray(frame)
        # a frame's record (its centres, d-spacings, volumes and their esds: what nothing after
        # it reads) is made in a second thread while the next frame's least squares run in this
        # one (PhaseModel.idle), else before that frame is recorded: the same numbers, in the
        # same rows, off the path from one frame to the next
        pending: list[tuple[int, FrameResult]] = []
        failed: list[Exception] = []

        def record() -> None:
            while pending:
                self._record(*pending.pop(), values, present, success, redchi, message, ph)

        def record_aside() -> None:
            try:
                record()
            except Exception as exc:        # (raised again below, where the record would have)
                failed.append(exc)

        with threadpool_limits(1):        # small matrices: BLAS threads only get in each other's way
            try:
                for i in range(n):
                    if usable[i]:
                        y, e = intensity[i, cols], None if sigma is None else sigma[i, cols]
                        m.idle = record_aside if pending else None
                        try:
                            res = self._first_frame(y, e)
                            if res is None:
                                res = _guarded(m, y, e, self.state, self.fit, f"frame {int(numbers[i])}")
                        finally:
                            m.idle = None
                        if failed:
                            raise failed.pop()
                        record()
                        pending.append((i, res))
                        self.state = res.state
                        if on_named is not None and res.success and res.named is not None:
                            record()
                            on_named(*res.named)
                    else:
                        message[i, :] = (reasons[i] if reasons is not None and reasons[i] else "frame not integrated")
                    self._store_state(i, ph)
                    if progress is not None:
                        progress.update(1)
                record()
            finally:
                m.idle = None
        table = PeakTable(np.asarray(frame), np.full(n, np.nan) if time_s is None else np.asarray(time_s, float),
                          self.windows, self.peaks, values, present, success, redchi, message)
        table.phase = ph
        table.phase_names = self.phase_names
        return table

    def _first_frame(self, y: np.ndarray, sigma: np.ndarray | None) -> FrameResult | None:
        """The zero estimate's result for its first frame where this frame is that one (the same
        data) and starts from the same state (a fresh one with the zero it was estimated from):
        :func:`fit_frame` of the same inputs, so the same result, without searching the run's first
        frame twice (~0.15 s on the benchmark's series, ~1 s on 2D frames). Taken once; None
        otherwise."""
        first, self._first = self._first, None
        if first is None:
            return None
        state, y0, sigma0, res = first
        same_data = np.array_equal(y, y0) and (sigma is None if sigma0 is None
                                                else sigma is not None and np.array_equal(sigma, sigma0, equal_nan=True))
        return res if same_data and _same_state(self.state, state) else None

    def _arrays(self, n: int):
        """Empty result arrays for ``n`` frames: peak values, present, success, redchi, message
        and the phase arrays."""
        m = self.model
        n_c, P, W = len(self.peaks), m.P, m.W
        values = {k: np.full((n, n_c), np.nan) for k in PEAK_FIELDS}
        ph = {"phase_cell": np.full((n, P, 6), np.nan), "phase_cell_err": np.full((n, P, 6), np.nan),
              "phase_present": np.zeros((n, P), bool), "phase_area": np.full((n, P, W), np.nan),
              "phase_area_err": np.full((n, P, W), np.nan), "phase_fwhm": np.full((n, P, W), np.nan),
              "phase_eta": np.full((n, P), np.nan), "zero": np.full(n, np.nan),
              "phase_decision": np.full((n, P), "", dtype=object), "phase_volume": np.full((n, P), np.nan),
              "phase_volume_err": np.full((n, P), np.nan), "phase_ref_area": np.full((n, P, W), np.nan),
              "phase_bic": np.full(n, np.nan), "forward_cell": np.full((n, P, 6), np.nan),
              "forward_present": np.full((n, P), np.nan), "forward_fwhm": np.full((n, P, W), np.nan),
              "forward_eta": np.full((n, P), np.nan), "forward_ref_area": np.full((n, P, W), np.nan),
              "phase_named": np.full((n, P), np.nan), "phase_misfit": np.full(n, np.nan),
              "zero_err": np.full(n, np.nan), "misfit_ref": np.full((n, W), np.nan),
              "misfit_ref_run": np.full(n, np.nan), "misfit_ref_confirmed": np.full(n, np.nan),
              "state_redchi": np.full((n, W), np.nan)}
        return (values, np.zeros((n, n_c), bool), np.zeros((n, W), bool), np.full((n, W), np.nan),
                np.full((n, W), "", dtype=object), ph)

    def _store_state(self, i: int, ph: dict, state: PhaseState | None = None) -> None:
        st = self.state if state is None else state
        ph["phase_cell"][i] = st.cell
        ph["phase_present"][i] = st.present
        ph["phase_fwhm"][i] = st.fwhm
        ph["phase_eta"][i] = st.eta
        ph["zero"][i] = st.zero
        ph["zero_err"][i] = st.zero_err
        if st.ref_area is not None:
            ph["phase_ref_area"][i] = st.ref_area
        if st.misfit_ref is not None:
            ph["misfit_ref"][i] = st.misfit_ref
            ph["misfit_ref_run"][i] = st.as_before_run
            ph["misfit_ref_confirmed"][i] = st.as_before_confirmed
        if st.redchi is not None:
            ph["state_redchi"][i] = st.redchi

    def _record(self, i, res: FrameResult, values, present, success, redchi, message, ph) -> None:
        m = self.model
        success[i, :] = res.success
        message[i, :] = res.message
        for w, win in enumerate(m.windows):
            if not win.x.size:      # a window beyond the data: failed, the others go on
                success[i, w] = False
                message[i, w] = (f"window {win.name!r} {list(m.specs[w].range)} has no data points "
                                 f"(the data span {m.data_span[0]:g} to {m.data_span[1]:g} {m.unit})")
        ph["phase_decision"][i] = res.decision
        if not res.success:
            return
        if res.named is not None:
            ph["phase_named"][i, res.named[0]] = res.named[1]
        ph["phase_bic"][i] = _bic(m, res)
        ph["phase_misfit"][i] = _misfit(res)
        with np.errstate(all="ignore"):
            redchi[i] = res.chi2_window / np.maximum(res.n_window - res.nvary_window, 1)
        theta, err, cov = res.theta, res.err, res.cov
        cen, cen_err = centre_esd(m, theta, cov, res.state.cell)
        d, d_err = d_of(m, cen, cen_err)
        fw_table = m.fwhm_table(theta)
        inner = m.inside(m.cells(theta[None], res.state.cell)[0], theta[m.zero_col], fw_table)
        cov0 = np.nan_to_num(cov)
        for p in range(m.P):
            if not res.present[p]:
                continue
            for n, col in zip(m.free[p], m.cell_cols[p]):
                ph["phase_cell_err"][i, p, _CELL_INDEX[n]] = err[col]
            ph["phase_volume"][i, p], ph["phase_volume_err"][i, p] = _volume(m, p, theta, cov, res.state.cell)
            for w in range(m.W):
                rows = m._refl_of[p][w]
                rows = rows[inner[rows]]          # lines in the window; a tail's area is not one
                if not rows.size:
                    continue
                a_cols = m.area_col[rows]
                ph["phase_area"][i, p, w] = theta[a_cols].sum()
                total = float(cov0[a_cols[0], a_cols[0]]) if a_cols.size == 1 else float(cov0[np.ix_(a_cols, a_cols)].sum())
                ph["phase_area_err"][i, p, w] = np.sqrt(max(total, 0.0))
        # the listed peaks, all at once: those of an absent phase empty, in a window with data
        comps = self.components
        p_of = m.r_phase[comps]
        shown = m.r_has_data[comps]
        gone = shown & ~res.present[p_of]
        values["area"][i, gone] = 0.0
        values["height"][i, gone] = 0.0
        j = np.flatnonzero(shown & res.present[p_of])
        r, p = comps[j], p_of[j]
        fw_col, eta_col, a_col = m.fwhm_col[p, m.r_window[r]], m.eta_col[p], m.area_col[r]
        area, fw, eta = theta[a_col], theta[fw_col], theta[eta_col]
        present[i, j] = area > 0
        values["center"][i, j], values["center_err"][i, j] = cen[r], cen_err[r]
        values["fwhm"][i, j], values["fwhm_err"][i, j] = fw, err[fw_col]
        values["fwhm_left"][i, j] = values["fwhm_right"][i, j] = fw
        values["shape"][i, j], values["shape_err"][i, j] = eta, err[eta_col]
        values["area"][i, j], values["area_err"][i, j] = area, err[a_col]
        values["height"][i, j] = area / fw * (eta * 2 / np.pi + (1 - eta) * np.sqrt(4 * np.log(2) / np.pi))
        values["d_A"][i, j], values["d_err_A"][i, j] = d[r], d_err[r]

    def backward(self, stored: dict, read, *, progress=None):
        """The backward pass: decisions over the whole series.

        A phase that appears is found, in the forward pass, by a search beside phases whose
        lines it shares, in the frames where it is weakest. From the first frame where it holds
        ``[fit] backward_share`` of the area (its cell well determined), the frames before it
        are fitted again going back, each starting from the one after it (every phase followed
        from there, an absent one searched for around its cell in the forward pass), until the
        phase is absent in both passes for two frames; every frame keeps the solution with the
        lower BIC (by more than 2) and says so in its decisions, unless it swaps a phase for one
        it could be confused with (one gone, the other come: the same lines under another name;
        ``PhaseModel.confusable``, phases of any crystal systems with lines in one window).

        ``stored``: the phase arrays of rows ``0:n`` (``phase_bic`` included, ``done``);
        ``read(start, stop)``: the intensity and esd (NaN if none) of those rows on the run's
        radial axis. Returns the revised rows (ascending) and their results as a
        :class:`~xrdpipe.peaks.PeakTable` (``table.phase`` holds their phase arrays), or
        ``None`` if no frame changed.
        """
        m, fit = self.model, self.fit
        if "phase_bic" not in stored or not len(stored["phase_bic"]):
            return None
        n = len(stored["phase_bic"])
        done = np.asarray(stored.get("done", np.ones(n, bool)), bool)
        bic = np.where(done, np.asarray(stored["phase_bic"], float), np.nan)
        usable = np.isfinite(bic)
        present = np.asarray(stored["phase_present"], bool) & usable[:, None]
        cell = np.array(stored["phase_cell"], float)
        starts = _backward_starts(m, fit, stored, present)
        if not starts:
            return None
        revised: dict[int, FrameResult] = {}
        states: dict[int, PhaseState] = {}
        walked: dict[int, int] = {}        # a row a walk revised -> the row that walk started from
        if progress is not None:         # at most this many frames fitted again
            progress.reset(total=sum(min(_BACKWARD_MAX, s) for s in starts))
        with threadpool_limits(1):
            for s_row in sorted(starts):
                self._walk_back(s_row, starts[s_row], read, stored, bic, usable, present, cell, revised, states,
                                progress, walked)
            self._forward_again(read, bic, usable, present, cell, revised, states, walked)
        if progress is not None:         # (each walk ends where its phases are gone: the bar ends there)
            progress.total = progress.n
            progress.refresh()
        if not revised:
            return None
        return self._revised_table(revised, stored)

    def _walk_back(self, s_row: int, followed: list[int], read, stored: dict, bic: np.ndarray, usable: np.ndarray,
                   present: np.ndarray, cell: np.ndarray, revised: dict, states: dict, bar,
                   walked: dict) -> None:
        """The frames before ``s_row`` fitted again going back, each from the one after it, until
        the ``followed`` phases are absent in both passes for two frames; a frame keeps the new
        solution where its BIC is lower by more than 2 and it swaps no phase for one it could be
        confused with (``bic``, ``present``, ``cell``, ``revised`` and ``states`` updated, and
        ``walked``: each row it revised -> ``s_row``, for :meth:`_forward_again`)."""
        m, fit, cols = self.model, self.fit, self.model.columns
        lo = max(0, s_row - _BACKWARD_MAX)        # the rows this start may revisit, read at once
        intensity, sigma = read(lo, s_row)
        carry = states.get(s_row) or _stored_state(m, stored, s_row)
        gone = 0
        for j in range(s_row - 1, lo - 1, -1):
            if not usable[j]:
                continue
            y = intensity[j - lo, cols]
            e = sigma[j - lo, cols]
            res = _guarded(m, y, e if np.isfinite(e).any() else None, carry, fit, f"row {j} going back",
                           _nearest_cells(present, cell, j))
            new_bic = _bic(m, res) if res.success else np.inf
            # a phase that takes the place of one it could be confused with (the one there
            # going forward gone, the other come) is a label swap, not a better solution: the
            # two explain the same lines
            swap = any(res.present[q] and not present[j, q] and present[j, p] and not res.present[p]
                       for p, q in m.confusable)
            if new_bic < bic[j] - 2.0 and not swap:
                res.decision = [d + f" (going back from frame {s_row})" if d else d for d in res.decision]
                revised[j], states[j] = res, res.state
                bic[j], present[j] = new_bic, res.present & usable[j]
                cell[j] = np.where(res.present[:, None], res.state.cell, cell[j])
                carry = res.state
                walked[j] = s_row
            else:
                carry = states.get(j) or _stored_state(m, stored, j)
            if bar is not None:
                bar.update(1)
            if not any(res.present[p] or present[j, p] for p in followed):
                gone += 1
                if gone >= 2:
                    break
            else:
                gone = 0

    def _forward_again(self, read, bic: np.ndarray, usable: np.ndarray, present: np.ndarray, cell: np.ndarray,
                       revised: dict, states: dict, walked: dict) -> None:
        """The frames after each frame a walk back revised (``walked``: row -> the row the walk
        started from), fitted again going forward from it up to the walk's start, as long as each
        is fitted better so (the same test as going back: a BIC lower by more than 2, no phase
        swapped for one it could be confused with). (Within the walk's span only, its start
        excluded: a chain that ran on to the series' last frame stopped where a live run's frames
        ended, and one that took in the start refitted a frame the walks of frames not yet come
        revisit: frames added later were then fitted otherwise than in one go.) A walk back that put a frame
        right may have reached it from a frame after it that it left wrong (P3 alone in the frame
        it started from, O3 at 19 % beside it searched for and found crossed over P3's line, c
        0.19 Å off, χ²/ν 33): the forward pass had come to that frame from the one before it as
        it was then, wrong; from the frame put right it is explained to its noise (BIC 329 for
        3,418)."""
        m, fit, cols = self.model, self.fit, self.model.columns
        n = len(bic)
        for j in sorted(walked):
            carry, k = states[j], j + 1
            while k < min(n, walked[j]) and usable[k]:
                intensity, sigma = read(k, k + 1)
                e = sigma[0, cols]
                res = _guarded(m, intensity[0, cols], e if np.isfinite(e).any() else None, carry, fit,
                               f"row {k} fitted again going forward")
                new_bic = _bic(m, res) if res.success else np.inf
                swap = any(res.present[q] and not present[k, q] and present[k, p] and not res.present[p]
                           for p, q in m.confusable)
                if not (new_bic < bic[k] - 2.0) or swap:
                    break
                res.decision = [d + f" (fitted again going forward from frame {j}, which the backward pass revised)" if d else d
                                for d in res.decision]
                revised[k], states[k] = res, res.state
                bic[k], present[k] = new_bic, res.present & usable[k]
                cell[k] = np.where(res.present[:, None], res.state.cell, cell[k])
                carry, k = res.state, k + 1

    def _revised_table(self, revised: dict, stored: dict):
        """The revised rows (ascending) and their results as a PeakTable with phase arrays, and
        for each what the forward pass carried on from it (an interrupted fit that resumes after
        it goes on as the forward pass did)."""
        m = self.model
        rows = np.array(sorted(revised))
        values, pres, success, redchi, message, ph = self._arrays(rows.size)
        for k, j in enumerate(rows):
            self._record(k, revised[j], values, pres, success, redchi, message, ph)
            self._store_state(k, ph, revised[j].state)
            fwd = _stored_state(m, stored, j, forward=True)
            ph["forward_cell"][k], ph["forward_present"][k] = fwd.cell, fwd.present
            ph["forward_fwhm"][k], ph["forward_eta"][k] = fwd.fwhm, fwd.eta
            ph["forward_ref_area"][k] = fwd.ref_area if fwd.ref_area is not None else np.nan
            for name in ("misfit_ref", "misfit_ref_run", "misfit_ref_confirmed", "state_redchi"):  # (the forward pass's)
                if name in stored:
                    ph[name][k] = stored[name][j]
            if "phase_named" in stored:     # how the forward pass named the phases stays known
                ph["phase_named"][k] = np.where(np.isnan(ph["phase_named"][k]), stored["phase_named"][j],
                                                ph["phase_named"][k])
        time_s = stored.get("time_s")
        table = PeakTable(rows, np.full(rows.size, np.nan) if time_s is None else np.asarray(time_s, float)[rows],
                          self.windows, self.peaks, values, pres, success, redchi, message)
        table.phase = ph
        table.phase_names = self.phase_names
        return rows, table

    def other_naming(self, p: int, q: int) -> "PhaseFitter":
        """A fitter for the whole-series naming check: like this one, started afresh, except that
        where lines either of the similar phases ``p`` and ``q`` could carry are named by their
        typed cells (neither seen yet), ``q`` takes them (see :func:`naming_verdict`)."""
        other = copy.copy(self)
        other.model = copy.copy(self.model)
        other.model.naming = {**self.model.naming, frozenset((p, q)): q}
        other.state = other._fresh_state()      # (the run's zero shift: the same)
        # (the zero estimate's first frame was named the first way: not this fitter's result)
        other._first = None
        return other

    def _estimate_zero(self, y: np.ndarray, sigma: np.ndarray | None, start: float = 0.0) -> tuple[float, float]:
        """The run's zero shift (or displacement) and its esd: the median over the first frames
        of a fit in which it is free, from each frame's solution with the zero held at ``start``
        (the frames fitted one after the other, as the run fits them, from a first one found
        afresh). The
        esd is that of a median (1.2533 times that of a mean) of estimates as far apart as these
        are (robustly), and at least as large as their own esds say (unscaled: a misfit of the
        profile's shape, many esds on a strong line at beamline counts, moves no line); (0, NaN)
        where no frame gave one."""
        m = self.model
        zeros, errs = [], []
        state = initial_state(m, start)
        self._first = None
        for i in range(y.shape[0]):
            before = state.copy() if i == 0 else None
            res = _guarded(m, y[i], None if sigma is None else sigma[i], state, self.fit,
                           f"the zero shift's estimate, its frame {i}")
            if before is not None:
                res.err         # (its esds made: what a deep copy takes is the result's, not a frame's)
                self._first = (before, y[0], None if sigma is None else sigma[0], copy.deepcopy(res))
            if not res.success or not res.present.any():
                continue
            state = res.state
            # (every frame of the estimate decided as a frame explained to its noise or by the
            # searches: one wrong decision is then one frame's, not that of the frames after it)
            state.misfit_ref = None
            # (on the data less the far tails of the frame's lines, as the frame's own fit was:
            # a strong line's tail across a window is a slope that moves the zero)
            tails = far_tails(m, res.theta, res.state.cell, res.present)
            fr = _Frame(m, y[i] - tails, None if sigma is None else sigma[i], res.state)
            present = tuple(np.flatnonzero(res.present))
            theta = res.theta.copy()
            hold = _held(m, present)
            hold[m.zero_col] = False
            hold[m.area_col[~m.inside(res.state.cell, 0.0)]] = True
            lo, hi = m.lower.copy(), m.upper.copy()
            lo[m.zero_col], hi[m.zero_col] = -0.5, 0.5
            again = least_squares(m, fr, res.state.cell, theta[None], hold[None], lo, hi, self.fit.max_iter)
            if again.success[0] and abs(again.p[0, m.zero_col]) < 0.5:
                zeros.append(float(again.p[0, m.zero_col]))
                errs.append(float(np.sqrt(again.cov[0, m.zero_col, m.zero_col])))
        if not zeros:
            return 0.0, np.nan
        errs = np.array(errs)
        errs = errs[np.isfinite(errs) & (errs > 0)]
        used = len(zeros)
        own = float(np.median(errs)) / np.sqrt(used) if errs.size else 0.0
        # (their spread robustly, as 1.4826 median absolute deviations: a frame whose fit took
        # another solution must not set the esd of the run's zero)
        mad = float(np.median(np.abs(np.asarray(zeros) - np.median(zeros))))
        spread = 1.4826 * mad / np.sqrt(used) if len(zeros) > 2 else 0.0
        err = 1.2533 * max(own, spread)
        return float(np.median(zeros)), (err if err > 0 else np.nan)


def first_tie(named: np.ndarray) -> tuple[int, int, int] | None:
    """(row, p, q): the first frame where phase ``p`` was named by the typed cells while the
    similar phase ``q`` could have carried its lines (``phase_named``, (frame, phase): the index
    of that other phase, NaN elsewhere), or None."""
    named = np.asarray(named, float)
    rows, ps = np.nonzero(np.isfinite(named))
    if not rows.size:
        return None
    return int(rows[0]), int(ps[0]), int(named[rows[0], ps[0]])


#: Typed-cell distances (:func:`typed_distance`, in search half-ranges) closer than this are
#: the same: the first frame's name stays.
_NAMING_DISTANCE = 0.05
#: A phase's cell that moves more than this between two consecutive frames where it is present
#: (rms over its free parameters, in search half-ranges) has jumped to other lines
#: (:func:`name_jumps`); a reaction moves a cell a few hundredths of that a frame.
_NAMING_JUMP = 0.3


@dataclass(frozen=True)
class NamingVerdict:
    """What the whole-series naming check found (:func:`naming_verdict`)."""

    taken: bool                   # the run with the other name is kept
    delta: float                  # summed misfit n ln(χ²/n), other run minus first, over frames both fitted
    margin: float                 # what |delta| must exceed for the fit to decide
    distance: tuple[float, float]  # how far each run puts the two phases from their typed cells
    jumps: tuple[int, int] = (0, 0)  # how often each run's names jump from one set of lines to another
    both_seen: bool = True        # both runs show both phases somewhere (else the cells cannot decide)

    @property
    def by_fit(self) -> bool:
        return abs(self.delta) > self.margin

    def note(self, names: Sequence[str], other: int) -> str:
        """What the check adds to the decision of the phase that keeps the first frame's lines,
        ``other`` the name it did not keep (the same words whichever run was fitted first: a live
        run's checks end as a straight run's)."""
        worse = -self.delta if self.taken else self.delta
        d_kept, d_other = self.distance[::-1] if self.taken else self.distance
        head = f"{NAMING_NOTE}{names[other]} here"
        if self.by_fit:
            return f"{head} fits worse (summed n·ln χ² {worse:.0f} higher)"
        j_kept, j_other = self.jumps[::-1] if self.taken else self.jumps
        if j_other != j_kept:
            return (f"{head} fits it as well (summed n·ln χ² {worse:+.0f}, within {self.margin:.0f}) but its names "
                    f"jump from one phase's lines to the other's ({j_other} against {j_kept} times)")
        cells = f"({d_other:.2f} against {d_kept:.2f} of the search range)"
        if abs(d_other - d_kept) < _NAMING_DISTANCE or not self.both_seen:
            near = "the series shows one of them" if not self.both_seen else f"the two phases as near their typed cells {cells}"
            return (f"{head} fits it as well (summed n·ln χ² {worse:+.0f}, within {self.margin:.0f}), {near}: the "
                    "data cannot tell the names apart, the first frame's stays")
        return (f"{head} fits it as well (summed n·ln χ² {worse:+.0f}, within {self.margin:.0f}) but puts the two "
                f"phases farther from their typed cells {cells}")


def typed_distance(m: PhaseModel, cell: np.ndarray, present: np.ndarray, phases: Sequence[int]) -> float:
    """How far a run puts ``phases`` from their typed cells: the rms over them of each one's
    nearest approach (a typed cell is the phase's cell somewhere in the run), in search
    half-ranges (rms over its free parameters); a phase never present counts 0."""
    total = []
    for p in phases:
        rows = _rows_with(cell, present, p)
        total.append(float(np.min(m.range_distance(p, cell[rows, p], m.cell0[p])) ** 2) if rows.size else 0.0)
    return float(np.sqrt(np.mean(total))) if total else 0.0


def name_jumps(m: PhaseModel, cell: np.ndarray, present: np.ndarray, phases: Sequence[int]) -> int:
    """How often a run's ``phases`` jump: a cell that moves more than :data:`_NAMING_JUMP` of its
    search range between consecutive frames where the phase is present (the name carried from
    one phase's lines to the other's, as a run named wrong in its first frame does where the
    other phase appears)."""
    count = 0
    for p in phases:
        rows = _rows_with(cell, present, p)
        if rows.size < 2:
            continue
        step = m.range_distance(p, cell[rows[1:], p], cell[rows[:-1], p])
        count += int(np.count_nonzero((np.diff(rows) == 1) & (step > _NAMING_JUMP)))
    return count


def _rows_with(cell: np.ndarray, present: np.ndarray, p: int) -> np.ndarray:
    """The frames where phase ``p`` is present with a cell."""
    return np.flatnonzero(np.asarray(present, bool)[:, p] & np.all(np.isfinite(cell[:, p]), axis=1))


def naming_verdict(m: PhaseModel, first: dict, other: dict, pair: Sequence[int], fit: FitSpec) -> NamingVerdict:
    """Whether the series fitted again with the other name (:meth:`PhaseFitter.other_naming`) is
    kept instead of the first run; ``first`` and ``other`` are their phase arrays
    (``phase_misfit``, else ``phase_bic`` from a run file made before it; ``phase_cell``,
    ``phase_present``), ``pair`` the two similar phases.

    Two similar phases (P2 and P''2, O3 and P3) typed a percent or two off can each be nearer the
    first lines seen: the first frame cannot tell which phase they are. The whole series can, in
    three ways taken in turn. (1) The fit: the other phase appears later, within its own search range, with its
    own intensities; one name may then fit the series better. The runs are compared by their
    summed misfit n ln(χ²/n), not their BIC: the two phases' models can hold different numbers of
    reflections (O3's and P3's in the same windows), and the BIC's parameter term would then
    decide by the reflection count (7.6 a frame, 160 over 23 frames: measured, the wrong name
    taken). The other run is kept if it is lower by ``max(bic_threshold, 10 √n)`` (n frames):
    runs that differ by noise wander by a few units per √frame. (2) Within that margin,
    continuity: the run whose names jump less often from one phase's lines to the other's
    (:func:`name_jumps`; a run named wrong where it began puts it right by such a jump where the
    other phase appears, and then fits as well). (3) Then the cells: the run that puts both phases
    nearer their typed cells (each at its nearest approach, :func:`typed_distance`), by more than
    0.05 of the search range, where both runs show both phases (the first frame's name knew only
    the first phase; a series of one phase knows no more). A run that fails
    in a frame the first one fitted is never kept. Frames where the runs differ in a phase outside
    the pair (the Al current collector lost beside the newcomer in one run only: n ln χ² 200-650
    a frame, measured, enough to take the wrong name) are left out of the sums, unless they also
    hold different numbers of the pair (a run that lost O3 and Al where P3 appeared is worse)."""
    key = "phase_misfit" if "phase_misfit" in first and "phase_misfit" in other else "phase_bic"
    a, b = np.asarray(first[key], float), np.asarray(other[key], float)
    # frames where the runs hold as many of the pair but differ in a phase outside it are left
    # out: a current collector lost in one run and not the other (a fault of its own) would
    # decide the names
    rest = [r for r in range(m.P) if r not in pair]
    pa, pb = np.asarray(first["phase_present"], bool), np.asarray(other["phase_present"], bool)
    aside = np.any(pa[:, rest] != pb[:, rest], axis=1) & (pa[:, list(pair)].sum(1) == pb[:, list(pair)].sum(1))
    both = np.isfinite(a) & np.isfinite(b) & ~aside
    delta = float(np.sum(b[both] - a[both]))
    margin = max(fit.bic_threshold, 10.0 * np.sqrt(max(int(both.sum()), 1)))
    lost = bool(np.any(np.isfinite(a) & ~np.isfinite(b)))
    runs = [(np.asarray(r["phase_cell"], float), np.asarray(r["phase_present"], bool)) for r in (first, other)]
    distance = tuple(typed_distance(m, c, pr, pair) for c, pr in runs)
    jumps = tuple(name_jumps(m, c, pr, pair) for c, pr in runs)
    # (the cells decide only where the series shows both phases: with one it knows no more than
    # its first frame)
    seen = all(pr[:, list(pair)].any(axis=0).all() for _, pr in runs)
    if lost:
        taken = False
    elif abs(delta) > margin:
        taken = delta < 0
    elif jumps[0] != jumps[1]:
        taken = jumps[1] < jumps[0]
    else:
        taken = seen and distance[1] < distance[0] - _NAMING_DISTANCE
    return NamingVerdict(taken, delta, margin, distance, jumps, seen)


#: How every note of the naming check in a frame's decision begins (:meth:`NamingVerdict.note`).
NAMING_NOTE = "; the whole series named "


def _guarded(m: PhaseModel, y: np.ndarray, sigma: np.ndarray | None, state: PhaseState, fit: FitSpec, where: str,
             centre: np.ndarray | None = None) -> FrameResult:
    """:func:`fit_frame`, with an error raised inside it (a bug, a numerical corner no test
    reached) recorded as that frame's failure, its message naming the error, and the series
    going on from the state before it: one frame never ends a 5,000-frame fit. (An interrupt,
    Ctrl-C, is not caught.)"""
    try:
        return fit_frame(m, y, sigma, state, fit, centre)
    except Exception as exc:            # noqa: BLE001 - recorded as the frame's failure, see above
        text = f"fit failed: {type(exc).__name__}: {exc}".strip()
        warnings.warn(f"phase model, {where}: {text}; recorded as a failed frame, the fit goes on",
                      RuntimeWarning, stacklevel=2)
        res = _failed(m, state, text)
        res.decision = [text] * m.P
        return res


def _backward_starts(m: PhaseModel, fit: FitSpec, stored: dict, present: np.ndarray) -> dict[int, list[int]]:
    """Where the backward pass starts: for each phase counted in the fractions, at every onset,
    the first frame from which it holds ``[fit] backward_share`` of the area, and every frame
    within :data:`~xrdpipe.phasefit.model._BACKWARD_MAX` of an onset where its lines jumped more
    than :data:`_JUMP_FWHM` widths from the frame before (:func:`cell_jumps`) (row -> phases)."""
    area = np.nan_to_num(np.asarray(stored["phase_area"], float)).sum(axis=2)
    counted = np.array([p.fraction for p in m.phases], bool)
    total = (area * (present & counted)).sum(axis=1)
    share = np.where(total[:, None] > 0, area / np.where(total[:, None] > 0, total[:, None], 1.0), 0.0)
    starts: dict[int, list[int]] = {}
    for p in np.flatnonzero(counted):
        onsets = np.flatnonzero(present[1:, p] & ~present[:-1, p]) + 1
        for e in onsets:
            strong = np.flatnonzero(present[e:, p] & (share[e:, p] >= fit.backward_share))
            if strong.size:
                starts.setdefault(int(e + strong[0]), []).append(int(p))
    # and from every frame where a phase that appeared (within the backward pass's reach of its
    # onset) jumped from where the frame before had its lines: the frames since its onset were
    # followed on other lines (a newcomer found at its onset in a wrong basin can hold the
    # share there already: the start above then comes too early to revisit them). (A phase there
    # from the first frame that jumps is a question of names: the whole-series naming check's.)
    if "phase_fwhm" not in stored:          # (a run file stored before the widths were)
        return starts
    jumps = cell_jumps(m, np.asarray(stored["phase_cell"], float), np.asarray(stored["phase_fwhm"], float), present)
    for j, p in np.argwhere(np.nan_to_num(jumps) > _JUMP_FWHM):
        if not counted[p]:
            continue
        onsets = np.flatnonzero(present[1:, p] & ~present[:-1, p]) + 1
        near = np.any((onsets < j) & (j <= onsets + _BACKWARD_MAX))
        if near and int(p) not in starts.get(int(j), []):
            starts.setdefault(int(j), []).append(int(p))
    return starts


#: A phase's lines that move more than this many widths (of its most sensitive line) from one
#: frame to the next have jumped (:func:`cell_jumps`): the backward pass goes back from there. A
#: reaction moves them 0.02-0.05 widths a frame (the benchmark's 200-frame charge).
_JUMP_FWHM = 0.3


def cell_jumps(m: PhaseModel, cell: np.ndarray, fwhm: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(n, P) how far each phase's lines moved from the frame before (``cell`` (n, P, 6),
    ``fwhm`` (n, P, W), ``present`` (n, P)), in widths of its most sensitive line with data: the
    largest over its free cell parameters of the change times that line's shift per unit, over
    its width in the frame. NaN where the phase is not present in both frames. A reaction moves
    a line a few hundredths of its width a frame; a chain that found the phase on other lines,
    and then its own, moves it a good part of one."""
    n = cell.shape[0]
    out = np.full((n, m.P), np.nan)
    for p in range(m.P):
        if not m.free[p] or not ((m.r_phase == p) & m.r_has_data).any():
            continue
        idx = [_CELL_INDEX[name] for name in m.free[p]]
        for j in np.flatnonzero(present[1:, p] & present[:-1, p]) + 1:
            if not (np.all(np.isfinite(cell[j, p])) and np.all(np.isfinite(cell[j - 1, p]))):
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                per_width = m.shift_per_width(p, cell[j, p], lambda w: fwhm[j, p, w])
            move = np.abs(cell[j, p, idx] - cell[j - 1, p, idx]) * per_width
            out[j, p] = float(np.nanmax(move)) if np.isfinite(move).any() else np.nan
    return out


def _nearest_cells(present: np.ndarray, cell: np.ndarray, j: int) -> np.ndarray:
    """Where an absent phase is looked for in row ``j``: its cell in the nearest row that has it."""
    out = np.full((cell.shape[1], 6), np.nan)
    for p in range(cell.shape[1]):
        have = np.flatnonzero(present[:, p])
        if have.size:
            out[p] = cell[have[np.argmin(np.abs(have - j))], p]
    return out


def _stored_state(m: PhaseModel, stored: dict, r: int, forward: bool = False) -> PhaseState:
    """The state after row ``r`` of stored phase arrays (``forward``: the one the forward pass
    carried on from that row, where the backward pass replaced its solution)."""
    st = _stored_solution(m, stored, r, forward)
    # the steady path's reference misfit (that of the forward pass: kept where the backward pass
    # replaced a row); none in a run file made before it was stored
    ref = stored["misfit_ref"][r] if "misfit_ref" in stored else None
    if ref is not None and not np.isnan(ref).all():
        st.misfit_ref = np.array(ref, float)
        st.as_before_run = int(stored["misfit_ref_run"][r])
        # (a run file stored before it was: the allowance starts again from its shortest)
        confirmed = stored["misfit_ref_confirmed"][r] if "misfit_ref_confirmed" in stored else np.nan
        st.as_before_confirmed = int(confirmed) if np.isfinite(confirmed) else 0
    # each window's misfit there, what the next frame's search afresh compares with (stored
    # since 2026-12-01: a state stored before has none, and the next frame is not searched afresh)
    redchi = stored["state_redchi"][r] if "state_redchi" in stored else None
    if redchi is not None and not np.isnan(redchi).all():
        st.redchi = np.array(redchi, float)
    return st


def _stored_solution(m: PhaseModel, stored: dict, r: int, forward: bool) -> PhaseState:
    """:func:`_stored_state` without the steady path's reference misfit."""
    if forward and "forward_cell" in stored and np.isfinite(stored["forward_present"][r]).all():
        return PhaseState(np.array(stored["forward_cell"][r], float), np.array(stored["forward_present"][r]) > 0,
                          np.array(stored["forward_fwhm"][r], float), np.array(stored["forward_eta"][r], float),
                          float(stored["zero"][r]) if np.isfinite(stored["zero"][r]) else 0.0,
                          np.array(stored["forward_ref_area"][r], float), zero_err=_zero_err(stored, r))
    return PhaseState(np.array(stored["phase_cell"][r], float), np.array(stored["phase_present"][r], bool),
                      np.array(stored["phase_fwhm"][r], float), np.array(stored["phase_eta"][r], float),
                      float(stored["zero"][r]) if np.isfinite(stored["zero"][r]) else 0.0,
                      np.array(stored["phase_ref_area"][r], float) if "phase_ref_area" in stored
                      else np.full((m.P, m.W), np.nan), zero_err=_zero_err(stored, r))


def _same_state(a: PhaseState, b: PhaseState) -> bool:
    """Whether two states are equal in every field (NaN equal to NaN; None only to None)."""
    for f in fields(PhaseState):
        u, v = getattr(a, f.name), getattr(b, f.name)
        if u is None or v is None:
            if u is not v:
                return False
        elif not np.array_equal(np.asarray(u), np.asarray(v), equal_nan=np.asarray(u).dtype.kind == "f"):
            return False
    return True


def _zero_err(stored: dict, r: int) -> float:
    """The stored esd of the run's zero shift at row ``r`` (NaN in a run file made before it)."""
    return float(stored["zero_err"][r]) if "zero_err" in stored else np.nan


#: How many of the first usable frames estimate the run's zero shift (:meth:`PhaseFitter._estimate_zero`):
#: its error is common to every frame's cells, so it is measured on many.
ZERO_FRAMES = 16
#: An estimated zero shift within this many of its esds of 0 leaves the calibration's zero (0).
ZERO_AGREES = 3.0


def fit_phases(patterns, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec], fit: FitSpec = FitSpec(),
               lattice: LatticeSpec = LatticeSpec()) -> PeakTable:
    """The phase model in every frame of an in-memory :class:`~xrdpipe.run.store.Patterns` stack,
    frame after frame; frames that failed integration are kept as failed rows. Then the backward
    pass (``fit.backward``) and the whole-series naming check (``fit.naming``,
    :func:`naming_verdict`). For a run file on disk (streamed, resumable) use
    :func:`xrdpipe.run.fit.fit_experiment`.

    Example
    -------
    >>> table = fit_phases(series.as_patterns(), phases, windows)          # doctest: +SKIP
    >>> table.phase["phase_cell"][:, 0, 2]                                  # doctest: +SKIP
    """
    n = patterns.intensity.shape[0]
    status = np.asarray(patterns.frames.get("status", np.ones(n)))
    fitter = PhaseFitter(phases, windows, fit, lattice, radial=patterns.radial, unit=patterns.unit,
                         wavelength_A=patterns.wavelength_A, instrument_sd=getattr(patterns, "instrument_sd", None),
                         instrument_offset=getattr(patterns, "instrument_offset", None))
    usable = status == 1
    reasons = [("frame not integrated: " + str(msg)) if not u else "" for u, msg in
               zip(usable, patterns.frames.get("message", [""] * n))]
    sigma = patterns.sigma if patterns.sigma is not None else np.full(patterns.intensity.shape, np.nan)

    def series(fitter: PhaseFitter, on_named=None) -> PeakTable:
        table = fitter.fit_block(patterns.intensity, patterns.sigma, frame=np.arange(n),
                                 time_s=patterns.frames.get("time_s", np.full(n, np.nan)), usable=usable,
                                 reasons=reasons, on_named=on_named)
        if fit.backward:
            back = fitter.backward(table.phase, lambda a, b: (patterns.intensity[a:b], sigma[a:b]))
            if back is not None:
                _replace_rows(table, *back)
        return table

    if fitter.needs_zero and usable.any():
        some = np.flatnonzero(usable)[:ZERO_FRAMES]
        fitter.estimate_zero(patterns.intensity[some], None if patterns.sigma is None else patterns.sigma[some])
    checked = fit.naming == "series"
    # the naming check's second run needs only the pair the forward pass names first: fitted
    # from then on beside this run, on a second core (ahead.py; the same numbers)
    with AheadRun(lambda p, q: series(fitter.other_naming(p, q))) as ahead:
        early = ahead.start if checked and ahead_available(fitter.model.threads) else None
        t0 = time.monotonic()
        table = series(fitter, early)
        tie = first_tie(table.phase["phase_named"]) if checked else None
        if tie is not None:
            row, p, q = tie
            other = ahead.result(p, q, patience(time.monotonic() - t0)) if early is not None else None
            if other is None:
                other = series(fitter.other_naming(p, q))
            verdict = naming_verdict(fitter.model, table.phase, other.phase, (p, q), fit)
            table, named = (other, q) if verdict.taken else (table, p)
            table.phase["phase_decision"][row, named] += verdict.note(fitter.phase_names, p + q - named)
    return concat_tables([table])


def _replace_rows(table: PeakTable, rows: np.ndarray, new: PeakTable) -> None:
    """Put the results of ``new`` (rows ``rows`` of ``table``) into ``table``."""
    for name in table.values:
        table.values[name][rows] = new.values[name]
    for name in ("present", "success", "redchi", "message"):
        getattr(table, name)[rows] = getattr(new, name)
    for name in table.phase:
        table.phase[name][rows] = new.phase[name]
