"""The fit stage on an experiment: the ``[[windows]]`` fitted in every integrated frame into
``/entry/peaks`` and ``peaks.csv`` (block by block, resumable); cells and fractions from them are
the lattice stage (:mod:`xrdpipe.run.lattice`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Experiment
from ..errors import ConfigError
from .groups import has_group
from .paths import LATTICE, RunPaths
from .peakstore import PeakStore, read_peak_table
from .stage import stage, takes_experiment
from .store import FAILED, PENDING, RunInfo, read_run_info

__all__ = ["FitSummary", "fit_experiment"]


@dataclass
class FitSummary:
    """What a peak-fitting run did."""

    run_file: Path
    csv_file: Path | None
    total: int
    fitted: int = 0
    skipped: int = 0
    waiting: int = 0
    restarted: bool = False
    seconds: float = 0.0
    present: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    #: frames whose solution the phase model's backward pass replaced
    revised: int = 0
    #: what the phase model's whole-series naming check found ("" if it did not run)
    naming: str = ""
    #: the run's zero shift the phase model holds, and how it was found ("" without one)
    zero: str = ""
    #: the lattice table (cells and fractions) was made again from the new peaks
    lattice_updated: bool = False

    def __str__(self) -> str:
        lines = [f"{self.total} frame(s): {self.fitted} fitted now, {self.skipped} already done"
                 + (f", {self.waiting} not integrated yet" if self.waiting else "")
                 + f" ({self.seconds:.1f} s)"]
        if self.revised:
            lines.append(f"backward pass: {self.revised} frame(s) fitted better going back from where a phase "
                         "that appeared is strong")
        if self.naming:
            lines.append(f"naming check: {self.naming}")
        if self.zero:
            lines.append(f"zero shift: {self.zero}")
        if self.restarted:
            lines.append("the fit settings changed since the last run: every frame was fitted again")
        if self.phases:
            lines.append("frames with each phase present (phase model): "
                         + ", ".join(f"{k} {v}" for k, v in self.phases.items()))
        if self.present:
            lines.append("frames with each peak present: "
                         + ", ".join(f"{k} {v}" for k, v in self.present.items()))
        for msg, count in sorted(self.failures.items(), key=lambda kv: -kv[1])[:8]:
            lines.append(f"  {count} window fit(s) failed: {msg}")
        lines.append(f"run file: {self.run_file}")
        if self.csv_file:
            lines.append(f"peaks: {self.csv_file}" + ("  (lattice.csv made again from them)" if self.lattice_updated
                                                      else ""))
        return "\n".join(lines)


@takes_experiment
def fit_experiment(exp: Experiment, *, restart: bool = False, progress: bool = True,
                   engine: str | None = None, update_lattice: bool = True) -> FitSummary:
    """Fit the ``[[windows]]`` of an experiment in every integrated frame of its run file.

    Results go into ``/entry/peaks`` block by block (an interrupted fit resumes where it
    stopped; changed settings start it again) and to ``peaks.csv`` beside the run file. With
    ``update_lattice``, a lattice table already in the run file (cells and fractions, from the
    peaks before) is made again from the new peaks, where any frame was fitted now
    (:func:`~xrdpipe.run.lattice.lattice_experiment`), so that it never describes other peaks.
    """
    t_start = time.perf_counter()
    if not exp.windows:
        raise ConfigError(str(exp.source or "experiment"), [
            ("windows", "no [[windows]] to fit; add at least one (see README)")])
    fit = exp.fit if engine is None else exp.fit.model_copy(update={"engine": engine})
    info = read_run_info(exp.run.run_file)
    phase_model = fit.model == "phases"
    fitter = _fitter(exp, fit, info)
    # memory stays bounded: at most ~160 MB of patterns (and their esds) at a time. The block
    # decides the start values (below), so it is part of the fingerprint.
    block = max(16, min(fit.block_frames, 10_000_000 // max(info.radial.size, 1)))
    n = info.frame_count
    summary = FitSummary(exp.run.run_file, None, n)
    with stage(exp, "fit", progress=progress, started=t_start, summary=summary) as st:
        store, kept = PeakStore.open(exp.run.run_file, windows=fitter.windows, peaks=fitter.peaks,
                                     fingerprint=_fingerprint(exp, fit, info, block), restart=restart,
                                     phases=list(fitter.phase_names) if phase_model else None)
        summary.restarted = not kept and not restart and info.had_peaks
        with store:
            done = store.done
            # frames are fitted in order, up to the first one not integrated yet: a frame's start
            # values then never depend on when it was fitted (see _forward)
            pending = np.flatnonzero(info.status == PENDING)
            reach = int(pending[0]) if pending.size else n
            rows = np.flatnonzero(~done & (np.arange(n) < reach))
            summary.skipped = int(done.sum())
            summary.waiting = int((~done & (np.arange(n) >= reach)).sum())
            if phase_model:
                rows = _with_zero(fitter, store, info, rows, reach, summary)
            if phase_model and rows.size:
                store.backward_through = 0      # the backward pass goes over the series again
                store.named_through = 0         # and so does the naming check
            checked = phase_model and fit.naming == "series" and reach == n
            with _NamingBeside(fitter, store, info, rows, _fingerprint(exp, fit, info, block), checked) as beside:
                summary.fitted = _forward(fitter, store, info, rows, block, st.bar(int(rows.size)), phase_model,
                                          beside)
                beside.end()
                if phase_model and fit.backward and reach == n and store.backward_through < n:
                    # every frame is there: the backward pass over the whole series (once; again
                    # when frames were added)
                    summary.revised = _backward(fitter, store, st.bar(n, "fit (backward pass)"))
                    store.backward_through = n
                beside.collect()
            if checked and store.named_through < n:
                summary.naming = _naming(fitter, store, info, block, st, _fingerprint(exp, fit, info, block))
                store.named_through = n
                if not summary.naming and beside.other is not None:
                    store.drop_other_naming()   # (fitted beside, for a check that found nothing to check)
        _count(summary, read_peak_table(exp.run.run_file), RunPaths.of(exp))
    if update_lattice and summary.fitted and exp.phases and has_group(exp.run.run_file, LATTICE):
        from .lattice import lattice_experiment

        lattice_experiment(exp)
        summary.lattice_updated = True
    return summary


def _fitter(exp: Experiment, fit, info: RunInfo):
    """The peak fitter (or, with ``[fit] model = "phases"``, the phase model) of the run's axis."""
    from ..peaks import PeakFitter, WindowSetupError
    from ..phasefit import PhaseFitter

    axis = dict(radial=info.radial, unit=info.unit, wavelength_A=info.wavelength_A)
    try:
        if fit.model == "phases":
            return PhaseFitter(exp.phases, exp.windows, fit, exp.lattice, **axis,
                               instrument_sd=info.instrument_sd, instrument_offset=info.instrument_offset)
        return PeakFitter(exp.phases, exp.windows, fit, **axis)
    except WindowSetupError as exc:
        raise ConfigError(str(exp.source or "experiment"),
                          [(f"windows.{i}.{exc.key}", msg) for i, msg in exc.problems]) from None


def _fingerprint(exp: Experiment, fit, info: RunInfo, block: int) -> dict:
    """The settings the fitted peaks depend on (others start ``/entry/peaks`` again)."""
    out = {"xrdpipe": __version__, "phases": [p.model_dump(mode="json") for p in exp.phases],
           "windows": [w.key() for w in exp.windows],
           "fit": fit.key(exclude={"workers", "block_frames"}),
           "block": block, "patterns": info.fingerprint}
    if fit.model == "phases":   # frames carry their state one to the next: the block plays no part
        out.update(block=None, correction=exp.lattice.correction)
    return out


def _with_zero(fitter, store: PeakStore, info: RunInfo, rows: np.ndarray, reach: int, summary: FitSummary) -> np.ndarray:
    """The rows to fit, once the phase model's zero shift for the run is known: estimated on
    the run's first :data:`~xrdpipe.phasefit.fitter.ZERO_FRAMES` integrated frames, the same
    frames whenever the run is fitted. A run that had fewer of them (a live one) has it
    estimated again when more are there, and every frame fitted again with it, so that it ends
    as a straight run would (at most ``ZERO_FRAMES`` times). ``summary.zero`` says which."""
    from ..phasefit.fitter import ZERO_FRAMES

    if not fitter.needs_zero:           # (no correction)
        return rows
    n = info.status.size
    some = np.flatnonzero((np.arange(n) < reach) & (info.status != FAILED))[:ZERO_FRAMES]
    got = store.zero_estimate
    if got is not None and got[2] >= some.size:
        fitter.zero = got[:2]
        summary.zero = _zero_text(fitter, got[3:], got[2])
        return rows
    if not some.size:
        return rows
    frames = [store.read_patterns(int(r), int(r) + 1) for r in some]
    found = fitter.estimate_zero(np.concatenate([f[0] for f in frames]), np.concatenate([f[1] for f in frames]))
    store.zero_estimate = (*fitter.zero, int(some.size), *found)
    summary.zero = _zero_text(fitter, found, some.size)
    if store.done.any():
        store.forget()
        summary.zero += " (again, on more frames: every frame fitted again)"
        summary.skipped = 0
        rows = np.flatnonzero(np.arange(n) < reach)
    return rows


def _zero_text(fitter, found: tuple[float, float], frames: int) -> str:
    """What ``xrdpipe fit`` says of the run's zero shift: held at the estimate ``found`` (value,
    esd) on the first ``frames`` frames, or the calibration's kept."""
    from ..phasefit.fitter import ZERO_AGREES

    unit = "°" if fitter.model.unit == "2th_deg" else " " + str(fitter.model.unit)
    value, where = f"{found[0]:+.6f}{unit} ± {found[1]:.2g}{unit}", f"on the first {frames} integrated frames"
    if fitter.zero is not None and np.isnan(fitter.zero[1]):
        return f"the calibration's (0) kept: estimated at {value} {where}, within {ZERO_AGREES:g} esds of it"
    return f"{value}, estimated {where}"


def _forward(fitter, store: PeakStore, info: RunInfo, rows: np.ndarray, block: int, bar, phase_model: bool,
             beside: "_NamingBeside | None" = None) -> int:
    """Fit ``rows`` in order, block by block, into the store; the number of frames fitted.
    ``beside``: the naming check's second run, fitted beside this one where it starts."""
    fitted = 0
    for start, chunk in _blocks(rows, block):
        # start values come from the results before the block's fixed start only (the
        # phase model: from the frame before the first one to fit), so a resumed,
        # interrupted or live run fits every frame exactly as one straight run
        fitter.resume(store.stored(int(chunk[0]) if phase_model else start))
        inputs = _block_inputs(store, info, chunk)
        kw = {"progress": bar} if phase_model else {}
        if beside is not None and beside.wanted:
            kw["on_named"] = lambda p, q: beside.named(p, q, inputs)
        table = fitter.fit_block(inputs[1], inputs[2], frame=chunk, time_s=inputs[3], usable=inputs[4],
                                 reasons=inputs[5], **kw)
        store.write(chunk, table.values, table.present, table.success, table.redchi, table.message, table.phase)
        if beside is not None:
            beside.after(inputs)
        fitted += chunk.size
        if not phase_model:
            bar.update(chunk.size)
    return fitted


def _block_inputs(store: PeakStore, info: RunInfo, chunk: np.ndarray) -> tuple:
    """What a block of rows ``chunk`` is fitted from: (frames, intensity, sigma, time_s, usable,
    reasons)."""
    status = info.status
    a, b = int(chunk[0]), int(chunk[-1]) + 1
    intensity, sigma = store.read_patterns(a, b)
    pick = chunk - a
    reasons = [("frame not integrated: " + str(info.message[r])) if status[r] == FAILED else "" for r in chunk]
    return chunk, intensity[pick], sigma[pick], info.time_s[chunk], status[chunk] != FAILED, reasons


class _NamingBeside:
    """The naming check's second run (:func:`_naming`), fitted beside the first one's forward
    pass on a second core: where that pass, started at the run's first frame, names lines by
    the typed cells in its first block (``fit_block``'s ``on_named``), a child forked then
    (:class:`~xrdpipe.phasefit.ahead.StreamedRun`) fits the series with the other name, block by
    block as this process reads them, and its tables go into ``/entry/peaks_other_naming``
    under the settings :func:`_naming` would give that group. :func:`_naming` then finds those
    rows done and goes on from there (its backward pass, its verdict); where it asks for
    another pair, the group is started again, as before. The same numbers as the second run
    fitted afterwards (tested). Not where the check is not to run now, on one worker, or on a
    run resumed past its first frame (the second run is then fitted afterwards)."""

    def __init__(self, fitter, store: PeakStore, info: RunInfo, rows: np.ndarray, fingerprint: dict, checked: bool):
        from ..phasefit.ahead import StreamedRun, available, patience

        self.fitter, self.store, self.fingerprint = fitter, store, fingerprint
        self._patience = patience
        #: when the last block of the first run ended, and the longest it took for one
        self._since, self._block_s = 0.0, 0.0
        self.wanted = bool(checked and rows.size and rows[0] == 0 and available(fitter.model.threads)
                           and np.array_equal(rows, np.arange(rows.size)))
        self.run = StreamedRun()
        self.other: PeakStore | None = None
        self._first_block: np.ndarray | None = None

    def named(self, p: int, q: int, inputs: tuple) -> None:
        """``on_named`` of the first run's forward pass: fork the second run at the first frame
        named, if it is in the run's first block."""
        if not self.wanted:
            return
        self.wanted = False
        if inputs[0][0] != 0:
            return
        other = self.store.other_naming(_other_fingerprint(self.fingerprint, self.fitter.phase_names, p, q, q))
        if other.done.any():            # (a check under way: it resumes afterwards)
            return
        if self.run.start(self.fitter.other_naming(p, q), inputs):
            self.other, self._first_block = other, inputs[0]
            self._since = time.monotonic()
        else:                           # (no process to be had: the group is made afterwards if needed)
            self.store.drop_other_naming()

    def after(self, inputs: tuple) -> None:
        """After each block of the first run: the block to the second run (the one it was forked
        with aside), and what came back into the store. The child is waited for at most
        :func:`~xrdpipe.phasefit.ahead.patience` of the time this run took for its block."""
        if self.other is None:
            return
        now = time.monotonic()
        self._block_s, self._since = max(self._block_s, now - self._since), now
        if inputs[0] is not self._first_block:
            self.run.send(inputs, self._patience(self._block_s))
        self._write(self.run.tables())

    def end(self) -> None:
        if self.other is not None:
            self.run.end(self._patience(self._block_s))

    def collect(self) -> None:
        """Every table still to come, into the store; the child ended."""
        if self.other is not None:
            self._write(self.run.tables(self._patience(2 * self._block_s), wait=True))

    def _write(self, tables) -> None:
        for frames, t in tables:
            self.other.write(frames, t.values, t.present, t.success, t.redchi, t.message, t.phase)

    def __enter__(self) -> "_NamingBeside":
        return self

    def __exit__(self, *exc) -> None:
        self.run.close()


def _other_fingerprint(fingerprint: dict, names, p: int, q: int, named: int) -> dict:
    """The settings of ``/entry/peaks_other_naming`` for the pair ``p``, ``q`` with ``named``'s name."""
    return {**fingerprint, "naming": {"phases": [names[i] for i in sorted((p, q))], "named": names[named]}}


def _backward(fitter, store: PeakStore, bar) -> int:
    """The phase model's backward pass over every frame (``bar``: its total set by the pass);
    the number of frames it revised."""
    n = store.done.size
    back = fitter.backward(store.stored(n), store.read_patterns, progress=bar)
    if back is None:
        return 0
    rows, revised = back
    store.write(rows, revised.values, revised.present, revised.success, revised.redchi, revised.message,
                revised.phase)
    return int(rows.size)


def _naming(fitter, store: PeakStore, info: RunInfo, block: int, st, fingerprint: dict) -> str:
    """The phase model's whole-series naming check (:func:`~xrdpipe.phasefit.fitter.naming_verdict`):
    where the first frame's lines were named by the nearer of two similar phases' typed cells,
    the series fitted again with the other name in ``/entry/peaks_other_naming`` (resumable;
    frames added later extend it), and that run's results taken into ``/entry/peaks`` if it fits
    the series better. What it found, for the summary ("" if there was no such frame)."""
    from ..phasefit.fitter import NAMING_NOTE, first_tie, naming_verdict

    n = store.done.size
    stored = store.stored(n)
    tie = first_tie(stored["phase_named"]) if "phase_named" in stored else None   # (an older run file)
    if tie is None:
        return ""
    row, p, q = tie
    names = fitter.phase_names

    def other_fingerprint(named: int) -> dict:
        return _other_fingerprint(fingerprint, names, p, q, named)

    other_fitter = fitter.other_naming(p, q)
    other = store.other_naming(other_fingerprint(q))
    rows = np.flatnonzero(~other.done)
    _forward(other_fitter, other, info, rows, block, st.bar(int(rows.size), "fit (naming check)"), True)
    if other_fitter.fit.backward and other.backward_through < n:
        _backward(other_fitter, other, st.bar(n, "fit (naming check, backward pass)"))
        other.backward_through = n
    verdict = naming_verdict(fitter.model, stored, other.stored(n), (p, q), fitter.fit)
    if verdict.taken:
        store.take(other, other_fingerprint(p))
    named = q if verdict.taken else p
    # (a live run checks again as frames come: the note of the last check only)
    store.add_decision(row, named, verdict.note(names, p + q - named), replacing=NAMING_NOTE)
    why = ("fits the series better" if verdict.by_fit else
           f"fits it as well, with both phases nearer their typed cells ({min(verdict.distance):.2f} against "
           f"{max(verdict.distance):.2f} of the search range)")
    if verdict.taken:
        return (f"the lines first seen in frame {row} are now {names[q]}'s, not {names[p]}'s: that name {why} "
                f"(summed n·ln χ² {verdict.delta:+.0f})")
    return (f"the lines first seen in frame {row} stay {names[p]}'s (as {names[q]}'s: summed n·ln χ² "
            f"{verdict.delta:+.0f}, search-range distance {verdict.distance[1]:.2f} against "
            f"{verdict.distance[0]:.2f})")


def _count(summary: FitSummary, table, paths: RunPaths) -> None:
    """``peaks.csv``, and the frames with each phase and peak and the failures, into ``summary``."""
    summary.csv_file = table.write_csv(paths.peaks_csv)
    if table.phase is not None:
        for i, name in enumerate(table.phase_names):
            summary.phases[name] = int((table.phase["phase_present"][:, i].astype(bool)
                                        & table.success.any(axis=1)).sum())
    for i, (w, ph, hkl, _) in enumerate(table.peaks):
        summary.present[f"{ph} {hkl}"] = int(table.present[:, i].sum())
    for msg in table.message[~table.success]:
        if msg:
            key = msg if len(msg) < 90 else msg[:87] + "..."
            summary.failures[key] = summary.failures.get(key, 0) + 1


def _blocks(rows: np.ndarray, size: int):
    """Ascending rows grouped by the fixed blocks ``[k*size, (k+1)*size)``: (block start, rows)."""
    if rows.size == 0:
        return
    key = rows // size
    breaks = np.flatnonzero(np.diff(key)) + 1
    for part in np.split(rows, breaks):
        yield int(part[0] // size * size), part
