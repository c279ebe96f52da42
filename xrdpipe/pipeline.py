"""Composes the stages for a whole experiment. Each stage gets only its own config section."""

from __future__ import annotations

import hashlib
import json
import platform
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import Experiment
from .errors import CalibrationError, ConfigError, FrameReadError, PatternReadError
from .frames import FrameRef, frame_times, list_frames, read_frame
from .parallel import default_workers
from .safeio import file_stat, transaction
from .store import DONE, RunFile, mark_stage

__all__ = ["IntegrationSummary", "integrate_experiment", "package_versions", "FitSummary", "fit_experiment",
           "LatticeSummary", "lattice_experiment", "EchemSummary", "echem_experiment"]


@dataclass
class IntegrationSummary:
    """What an integration run did."""

    run_file: Path
    total: int
    integrated: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    untimed: int = 0
    waiting: int = 0
    added: int = 0
    suspicious: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    setup_seconds: float = 0.0
    cache_hit: bool = False
    cache_file: Path | None = None

    @property
    def warnings(self) -> list[str]:
        """What deserves a look: suspicious frames, scan-log times out of order..."""
        out = list(self.notes)
        if self.suspicious:
            shown = ", ".join(self.suspicious[:5]) + (" ..." if len(self.suspicious) > 5 else "")
            out.append(f"{len(self.suspicious)} frame(s) are mostly negative after dark subtraction, so the dark "
                       f"is probably not for these frames (recorded as suspicious: {shown})")
        return out

    @property
    def changed(self) -> bool:
        """Whether the run file's frames or patterns changed (else the stages after need not run)."""
        return bool(self.integrated or self.failed or self.added)

    def __str__(self) -> str:
        lines = [
            f"{self.total} frame(s): {self.integrated} integrated now, {self.skipped} already done, "
            f"{len(self.failed)} failed" + (f", {self.waiting} still being written (retried next time)"
                                            if self.waiting else "") + f" ({self.seconds:.1f} s)",
            f"run file: {self.run_file}",
        ]
        if self.integrated or self.failed:
            source = ("integrator reused" if self.cache_hit else
                      "integrator built" + (" and cached" if self.cache_file else ""))
            lines.append(f"setup {self.setup_seconds:.1f} s ({source}), then "
                         f"{self.seconds - self.setup_seconds:.1f} s for the frames")
        if self.untimed:
            lines.append(f"{self.untimed} frame(s) have no time (no entry in the time source)")
        lines += [f"warning: {n}" for n in self.warnings]
        for key, msg in self.failed[:10]:
            lines.append(f"  failed {key}: {msg}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more (see /entry/frames/message)")
        return "\n".join(lines)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("xrdpipe", "numpy", "scipy", "pyFAI", "fabio", "h5py", "hdf5plugin", "lmfit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _digest(*arrays_or_text) -> str:
    h = hashlib.sha1()
    for a in arrays_or_text:
        if a is None:
            h.update(b"none")
        elif isinstance(a, str):
            h.update(a.encode())
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _detector_shape(cal, refs: list[FrameRef]) -> tuple[int, int]:
    if cal.shape is not None:
        return tuple(cal.shape)
    for ref in refs:
        if ref.error:
            continue
        try:
            return tuple(read_frame(ref).shape)
        except FrameReadError:
            continue
    raise CalibrationError("no frame could be read, so the detector's shape is unknown (and the PONI does not say)")


def integrate_experiment(exp: Experiment, *, restart: bool = False, progress: bool = True,
                         workers: int | None = None, scheduler: str | None = None,
                         ready: Callable[[list[FrameRef]], list[FrameRef]] | None = None,
                         retry_s: float | None = None, cache: dict | None = None) -> IntegrationSummary:
    """Integrate (or, for ``[patterns]``, import) every frame not yet in the run file.

    ``scheduler`` (default ``[run] scheduler``) says where frames are integrated
    (:mod:`xrdpipe.parallel`). For live processing, ``ready`` picks the frames that are complete
    (the others are left for later), and a frame that cannot be read while its file changed less
    than ``retry_s`` seconds ago stays pending, to be retried, instead of being recorded as failed;
    ``cache`` (a dict the caller keeps) holds the integrator from one call to the next.
    """
    if exp.patterns is not None:
        return _import_patterns(exp, restart=restart, progress=progress, ready=ready)
    import time

    from .calibration import load_calibration
    from .integration import Integrator

    t_start = time.perf_counter()
    fspec, cspec, ispec = exp.frames, exp.calibration, exp.integration
    where = str(exp.source or "experiment")
    refs = list_frames(fspec.files, dataset=fspec.dataset)
    if ready is not None:
        refs = ready(refs)
    times = frame_times(refs, fspec.times, timezone=fspec.timezone, where=where)
    setup_key = json.dumps([cspec.model_dump(mode="json"), [file_stat(p) for p in (cspec.poni, cspec.mask, cspec.dark,
                                                                                    cspec.flat) if p],
                            ispec.model_dump(mode="json", exclude={"workers"})])
    kept = cache is not None and cache.get("integrator_key") == setup_key
    read_ahead = None
    if kept:
        cal, integ = cache["integrator"]                 # live processing: built once, kept
    else:
        cal = load_calibration(cspec.poni, mask=cspec.mask, dark=cspec.dark, flat=cspec.flat)
        shape = _detector_shape(cal, refs)
        # the first frames are read and decompressed while the integrator is built
        read_ahead = _read_ahead(exp, refs, shape, workers=workers, scheduler=scheduler, restart=restart)
        try:
            with _quiet_empty_matrix():   # a range holding no pixel: said below, once, naming the key
                integ = Integrator(cal, shape, npt=ispec.npt, unit=ispec.unit, radial_range=ispec.range,
                                   azimuth_range=ispec.azimuth_range, polarization_factor=ispec.polarization_factor,
                                   solid_angle=ispec.solid_angle, error_model=ispec.error_model,
                                   splitting=ispec.splitting, engine=ispec.engine,
                                   cache=(exp.run.cache_dir or True) if exp.run.cache else None)
            if read_ahead is not None:
                read_ahead.stop()
            _check_reach(integ, cal, cspec, ispec, where)
        except BaseException:
            if read_ahead is not None:
                read_ahead.close()
            raise
        if cache is not None:
            cache.update(integrator_key=setup_key, integrator=(cal, integ))
    try:
        return _integrate_frames(exp, refs, times, cal, integ, kept=kept, read_ahead=read_ahead, t_start=t_start,
                                 restart=restart, workers=workers, scheduler=scheduler, progress=progress,
                                 retry_s=retry_s)
    finally:
        if read_ahead is not None:
            read_ahead.close()


def _read_ahead(exp: Experiment, refs: list[FrameRef], shape, *, workers, scheduler, restart: bool):
    """A :class:`~xrdpipe.integration.FramePrefetch` of the frames, when they will be integrated
    in this process (threads or serial) and all of them are to be integrated (a new run file,
    or a restart); else None."""
    from .integration import FramePrefetch

    n_workers = workers or exp.integration.workers or default_workers()
    where_to = scheduler or exp.run.scheduler
    chosen = scheduler is not None or "scheduler" in exp.run.model_fields_set
    in_process = where_to in ("threads", "serial") or (
        where_to == "processes" and not chosen and len(refs) < 32 * n_workers)
    if not in_process or not refs or (exp.run.run_file.exists() and not restart):
        return None
    return FramePrefetch(refs, shape)


def _integrate_frames(exp: Experiment, refs, times, cal, integ, *, kept: bool, read_ahead, t_start: float,
                      restart: bool, workers, scheduler, progress, retry_s) -> IntegrationSummary:
    """The frames of :func:`integrate_experiment` through the integrator, into the run file."""
    import time

    from .integration import integrate_frames

    fspec, ispec = exp.frames, exp.integration
    t_setup = time.perf_counter() - t_start
    fingerprint = {
        "integration": ispec.model_dump(mode="json", exclude={"workers", "engine"}),
        "poni": _digest(cal.poni_text),
        "mask": _digest(cal.mask), "dark": _digest(cal.dark), "flat": _digest(cal.flat),
        "dataset": fspec.dataset,
    }
    provenance = {
        "experiment": exp.text,
        "experiment_file": str(exp.source or ""),
        "poni": cal.poni_text,
        "poni_file": str(cal.poni_path),
        "method": "pyFAI integrate1d " + "/".join(integ.method),
        "packages": json.dumps(package_versions(), sort_keys=True),
    }
    summary = IntegrationSummary(exp.run.run_file, len(refs), setup_seconds=t_setup,
                                 cache_hit=kept or integ.cache_hit)
    summary.untimed = sum(t is None for t in times) if fspec.times is not None else 0
    summary.notes += _time_order(refs, times, fspec.times)
    with transaction(exp.run.run_file, checkpoint_s=exp.run.checkpoint_s):
        mark_stage(exp.run.run_file, "integrate", None)
        with RunFile.open_for_writing(exp.run.run_file, radial=integ.radial, unit=ispec.unit,
                                      wavelength_A=cal.wavelength_A, fingerprint=fingerprint,
                                      provenance=provenance, title=exp.run.name, restart=restart) as run:
            known = run.frame_count
            rows = run.add_frames(refs, times)
            summary.added = run.frame_count - known
            status = run.status
            jobs = [(row, ref) for row, ref in zip(rows, refs) if status[row] != DONE]
            summary.skipped = len(refs) - len(jobs)
            n_workers = workers or ispec.workers or default_workers()
            where_to = scheduler or exp.run.scheduler
            chosen = scheduler is not None or "scheduler" in exp.run.model_fields_set
            if where_to == "processes" and not chosen and len(jobs) < 32 * n_workers:
                # the default, on a short batch (and every poll of `watch`): starting a pool and
                # sending it the integrator costs more than it saves (benchmarks/scale.py);
                # threads give the same numbers. A scheduler chosen by name is always obeyed.
                where_to = "threads"
            bar = _progress(len(jobs), "integrate", progress)
            # closed before the run file is: on an error (a full disk) no worker still reads a
            # frame while the run file is closed (HDF5 is one library for both)
            try:
                if read_ahead is not None and where_to not in ("threads", "serial"):
                    read_ahead.close()
                    read_ahead = None
                with closing(integrate_frames(jobs, integ, workers=n_workers, scheduler=where_to,
                                              read_ahead=read_ahead)) as results:
                    for res in results:
                        error = res.error
                        if error is None and not np.isfinite(res.intensity).any():
                            error = ("empty pattern: no valid pixel (every pixel is masked, NaN or at the "
                                     "integer maximum, which marks gaps and overflows)")
                        if error is None:
                            remark = _dark_remark(res.intensity) if cal.dark is not None else ""
                            run.write_pattern(res.position, res.intensity, res.sigma, message=remark)
                            summary.integrated += 1
                            if remark:
                                summary.suspicious.append(res.ref.key)
                        elif retry_s is not None and _recent(res.ref.file, retry_s):
                            summary.waiting += 1          # probably still being written: next time
                        else:
                            run.write_failure(res.position, error)
                            summary.failed.append((res.ref.key, error))
                        bar.update(1)
            finally:
                bar.close()
    summary.cache_file = getattr(integ, "cache_file", None)   # a new entry is written meanwhile
    summary.seconds = time.perf_counter() - t_start
    return summary


def _time_order(refs, times, source) -> list[str]:
    """A warning when frame times go back in frame order (a scan log whose rows do not follow
    the files): each frame keeps its own time and its place, and the frames are named."""
    back = [k for k in range(1, len(times)) if times[k] is not None and times[k - 1] is not None
            and times[k].start < times[k - 1].start]
    if not back:
        return []
    where = f"the scan log {source.log.name}" if getattr(source, "log", None) is not None else "the frame times"
    shown = "; ".join(f"frame {k} ({refs[k].key}) starts at {times[k].start.isoformat()}, before frame {k - 1} "
                      f"({refs[k - 1].key}) at {times[k - 1].start.isoformat()}" for k in back[:3])
    return [f"{where}: times are not in frame order at {len(back)} frame(s) ({shown}{' ...' if len(back) > 3 else ''}); "
            "every frame keeps its own time and its place in the file order"]


class _quiet_empty_matrix:
    """Drop pyFAI's "Sparse matrix is empty" warning while the integrator is built (the empty
    range it means is reported by :func:`_check_reach` as an error naming the key)."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("pyFAI.ext.sparse_builder")
        self.drop = lambda record: "Sparse matrix is empty" not in record.getMessage()
        self.logger.addFilter(self.drop)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.drop)


def _check_reach(integ, cal, cspec, ispec, where: str) -> None:
    """A mask that hides every pixel, or an ``[integration] range`` that holds none, is an error
    of the set-up (every frame would give an empty pattern), said once, naming the key."""
    if cal.mask is not None and np.asarray(cal.mask).all():
        raise CalibrationError(f"the mask {cspec.mask} masks every pixel of the detector; nothing can be integrated")
    probe, _ = integ.integrate(np.ones(integ.shape, np.float32))
    if np.isfinite(probe).any():
        return
    lo, hi = integ.detector_tth_span_deg()
    if ispec.range is not None:
        unit = "°" if ispec.unit == "2th_deg" else " Å⁻¹"
        raise ConfigError(where, [("integration.range", f"{list(ispec.range)}{unit} holds no pixel of the detector, "
                                   f"whose 2θ span is {lo:.2f} to {hi:.2f}°")])
    raise CalibrationError(f"no pixel of the detector can be integrated (2θ span {lo:.2f} to {hi:.2f}°; check "
                           f"the mask {cspec.mask} and the azimuth range)")


def _dark_remark(intensity: np.ndarray) -> str:
    """"suspicious: ..." when most of a dark-subtracted pattern is negative (a dark taken with a
    longer exposure or another gain than the data), else ""."""
    ok = np.isfinite(intensity)
    negative = float(np.mean(intensity[ok] < 0)) if ok.any() else 0.0
    if negative <= 0.5:
        return ""
    return (f"suspicious: {100 * negative:.0f} % of the pattern is negative after dark subtraction "
            "(is the dark for this exposure?)")


def _recent(path: Path, seconds: float) -> bool:
    """Whether ``path`` changed less than ``seconds`` ago (or has vanished)."""
    import time

    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled or total == 0,
                dynamic_ncols=True, leave=False)


def _import_patterns(exp: Experiment, *, restart: bool, progress: bool,
                     ready: Callable[[list[FrameRef]], list[FrameRef]] | None = None) -> IntegrationSummary:
    """Bring 1D patterns into the run file on the grid of the first readable file."""
    import time

    from .patterns import read_pattern

    t_start = time.perf_counter()
    pspec = exp.patterns
    where = str(exp.source or "experiment")
    refs = [FrameRef(Path(f)) for f in pspec.files]
    if ready is not None:
        refs = ready(refs)
    times = frame_times(refs, pspec.times, where=where)
    grid = None
    first_error = None
    for ref in refs:
        try:
            grid = read_pattern(ref.file)[0]
            break
        except PatternReadError as exc:
            first_error = exc
    if grid is None:
        raise ConfigError(where, [("patterns.files", f"no pattern file could be read ({first_error})")])
    fingerprint = {"radial_unit": pspec.radial_unit, "wavelength_A": pspec.wavelength_A,
                   "grid": _digest(grid)}
    provenance = {"experiment": exp.text, "experiment_file": str(exp.source or ""),
                  "method": "imported 1D patterns", "packages": json.dumps(package_versions(), sort_keys=True)}
    summary = IntegrationSummary(exp.run.run_file, len(refs))
    summary.untimed = sum(t is None for t in times) if pspec.times is not None else 0
    summary.notes += _time_order(refs, times, pspec.times)
    with transaction(exp.run.run_file, checkpoint_s=exp.run.checkpoint_s), \
            RunFile.open_for_writing(exp.run.run_file, radial=grid, unit=pspec.radial_unit,
                                     wavelength_A=pspec.wavelength_A, fingerprint=fingerprint,
                                     provenance=provenance, title=exp.run.name, restart=restart) as run:
        mark_stage(exp.run.run_file, "integrate", None)
        known = run.frame_count
        rows = run.add_frames(refs, times)
        summary.added = run.frame_count - known
        status = run.status
        bar = _progress(len(refs), "import", progress)
        try:
            for row, ref in zip(rows, refs):
                bar.update(1)
                if status[row] == DONE:
                    summary.skipped += 1
                    continue
                try:
                    x, y, e = read_pattern(ref.file)
                except PatternReadError as exc:
                    run.write_failure(row, exc.reason)
                    summary.failed.append((ref.key, exc.reason))
                    continue
                if e is None:
                    e = np.sqrt(np.clip(y, 0, None))  # counts: Poisson
                if x.shape != grid.shape or not np.allclose(x, grid, rtol=0, atol=1e-9 * max(1.0, abs(grid[-1]))):
                    inside = (grid >= x[0]) & (grid <= x[-1])
                    y = np.where(inside, np.interp(grid, x, y), np.nan)
                    e = np.where(inside, np.interp(grid, x, e), np.nan)
                run.write_pattern(row, y.astype(np.float32), e.astype(np.float32))
                summary.integrated += 1
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - t_start
    return summary





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

    def __str__(self) -> str:
        lines = [f"{self.total} frame(s): {self.fitted} fitted now, {self.skipped} already done"
                 + (f", {self.waiting} not integrated yet" if self.waiting else "")
                 + f" ({self.seconds:.1f} s)"]
        if self.revised:
            lines.append(f"backward pass: {self.revised} frame(s) fitted better going back from where a phase "
                         "that appeared is strong")
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
            lines.append(f"peaks: {self.csv_file}")
        return "\n".join(lines)


def fit_experiment(exp: Experiment, *, restart: bool = False, progress: bool = True,
                   engine: str | None = None) -> FitSummary:
    """Fit the ``[[windows]]`` of an experiment in every integrated frame of its run file.

    Results go into ``/entry/peaks`` block by block (an interrupted fit resumes where it
    stopped; changed settings start it again) and to ``peaks.csv`` beside the run file.
    """
    import time

    from . import __version__
    from .peaks import PeakFitter, WindowSetupError
    from .phasefit import PhaseFitter
    from .store import FAILED, PENDING, PeakStore, open_run_info

    t_start = time.perf_counter()
    where = str(exp.source or "experiment")
    if not exp.windows:
        raise ConfigError(where, [("windows", "no [[windows]] to fit; add at least one (see README)")])
    fit = exp.fit if engine is None else exp.fit.model_copy(update={"engine": engine})
    info = open_run_info(exp.run.run_file)
    phase_model = fit.model == "phases"
    try:
        if phase_model:
            fitter = PhaseFitter(exp.phases, exp.windows, fit, exp.lattice, radial=info["radial"], unit=info["unit"],
                                 wavelength_A=info["wavelength_A"])
        else:
            fitter = PeakFitter(exp.phases, exp.windows, fit, radial=info["radial"], unit=info["unit"],
                                wavelength_A=info["wavelength_A"])
    except WindowSetupError as exc:
        raise ConfigError(where, [(f"windows.{i}.peaks", msg) for i, msg in exc.problems]) from None
    # memory stays bounded: at most ~160 MB of patterns (and their esds) at a time. The block
    # decides the start values (below), so it is part of the fingerprint.
    block = max(16, min(fit.block_frames, 10_000_000 // max(info["radial"].size, 1)))
    fingerprint = {"xrdpipe": __version__, "phases": [p.model_dump(mode="json") for p in exp.phases],
                   "windows": [w.model_dump(mode="json") for w in exp.windows],
                   "fit": fit.model_dump(mode="json", exclude={"workers", "block_frames"}),
                   "block": block, "patterns": info["fingerprint"]}
    if phase_model:   # frames carry their state one to the next: the block plays no part
        fingerprint.update(block=None, correction=exp.lattice.correction)
    status = info["status"]
    n = status.size
    summary = FitSummary(exp.run.run_file, None, n)
    with transaction(exp.run.run_file, checkpoint_s=exp.run.checkpoint_s):
        mark_stage(exp.run.run_file, "fit", None)
        store, kept = PeakStore.open(exp.run.run_file, windows=fitter.windows, peaks=fitter.peaks,
                                     fingerprint=fingerprint, restart=restart,
                                     phases=[p.name for p in exp.phases] if phase_model else None)
        summary.restarted = not kept and not restart and info["had_peaks"]
        with store:
            done = store.done
            # frames are fitted in order, up to the first one not integrated yet: a frame's start
            # values then never depend on when it was fitted (see below)
            pending = np.flatnonzero(status == PENDING)
            reach = int(pending[0]) if pending.size else n
            todo = ~done & (np.arange(n) < reach)
            summary.skipped = int(done.sum())
            summary.waiting = int((~done & (np.arange(n) >= reach)).sum())
            rows = np.flatnonzero(todo)
            if phase_model and rows.size:
                store.backward_through = 0      # the backward pass goes over the series again
            bar = _progress(int(rows.size), "fit", progress)
            try:
                for start, chunk in _blocks(rows, block):
                    # start values come from the results before the block's fixed start only (the
                    # phase model: from the frame before the first one to fit), so a resumed,
                    # interrupted or live run fits every frame exactly as one straight run
                    fitter.resume(store.stored(int(chunk[0]) if phase_model else start))
                    a, b = int(chunk[0]), int(chunk[-1]) + 1
                    intensity, sigma = store.read_patterns(a, b)
                    pick = chunk - a
                    usable = status[chunk] != FAILED
                    reasons = [("frame not integrated: " + str(info["message"][r])) if status[r] == FAILED else ""
                               for r in chunk]
                    kw = {"progress": bar} if phase_model else {}
                    table = fitter.fit_block(intensity[pick], sigma[pick], frame=chunk,
                                             time_s=info["time_s"][chunk], usable=usable, reasons=reasons, **kw)
                    store.write(chunk, table.values, table.present, table.success, table.redchi, table.message,
                                table.phase)
                    summary.fitted += chunk.size
                    if not phase_model:
                        bar.update(chunk.size)
            finally:
                bar.close()
            if phase_model and fit.backward and reach == n and store.backward_through < n:
                # every frame is there: the backward pass over the whole series (once; again
                # when frames were added)
                back_bar = _progress(n, "fit (backward pass)", progress)     # its total set by the pass
                try:
                    back = fitter.backward(store.stored(n), store.read_patterns, progress=back_bar)
                finally:
                    back_bar.close()
                if back is not None:
                    rows, revised = back
                    store.write(rows, revised.values, revised.present, revised.success, revised.redchi,
                                revised.message, revised.phase)
                    summary.revised = int(rows.size)
                store.backward_through = n
    table = _stored_table(exp.run.run_file)
    summary.csv_file = table.write_csv(exp.run.output / "peaks.csv")
    if table.phase is not None:
        for i, name in enumerate(table.phase_names):
            summary.phases[name] = int((table.phase["phase_present"][:, i].astype(bool) & table.success.any(axis=1)).sum())
    for i, (w, ph, hkl, _) in enumerate(table.peaks):
        summary.present[f"{ph} {hkl}"] = int(table.present[:, i].sum())
    for msg in table.message[~table.success]:
        if msg:
            key = msg if len(msg) < 90 else msg[:87] + "..."
            summary.failures[key] = summary.failures.get(key, 0) + 1
    summary.seconds = time.perf_counter() - t_start
    return summary


def _stored_table(run_file: Path):
    """The fitted peaks of a run file as a :class:`~xrdpipe.peaks.PeakTable` (done rows only)."""
    from .peaks import PeakTable
    from .store import PEAK_ARRAYS, PHASE_DATASETS, read_peaks

    d = read_peaks(run_file)
    rows = np.flatnonzero(d["done"])
    peaks = tuple(zip(d["peak_window"], d["peak_phase"], d["peak_hkl"], d["peak_profile"]))
    phase = {k: d[k][rows] for k in PHASE_DATASETS} if "phase" in d else None
    return PeakTable(rows, d["time_s"][rows], d["window"], peaks, {k: d[k][rows] for k in PEAK_ARRAYS},
                     d["present"][rows].astype(bool), d["success"][rows].astype(bool), d["redchi"][rows],
                     d["message"][rows], phase, d.get("phase"))


def _blocks(rows: np.ndarray, size: int):
    """Ascending rows grouped by the fixed blocks ``[k*size, (k+1)*size)``: (block start, rows)."""
    if rows.size == 0:
        return
    key = rows // size
    breaks = np.flatnonzero(np.diff(key)) + 1
    for part in np.split(rows, breaks):
        yield int(part[0] // size * size), part


@dataclass
class LatticeSummary:
    """What a lattice run did."""

    run_file: Path
    csv_file: Path
    frames: int
    cells: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.frames} frame(s); cells refined per phase: "
                 + ", ".join(f"{k} {v}" for k, v in self.cells.items())]
        for msg, count in sorted(self.flagged.items(), key=lambda kv: -kv[1])[:6]:
            lines.append(f"  {count} frame-phase pair(s): {msg}")
        lines.append(f"lattice: {self.csv_file}")
        return "\n".join(lines)


def lattice_experiment(exp: Experiment) -> LatticeSummary:
    """Cells, volumes, layer geometry and phase fractions from the fitted peaks of a run file:
    written to ``/entry/lattice`` and ``<output>/lattice.csv`` (recomputed whole; it is quick)."""
    from .lattice import refine_lattice
    from .refining import read_weight_fractions
    from .store import open_run_info, read_table, write_table

    if not exp.phases:
        raise ConfigError(str(exp.source or "experiment"), [("phases", "no [[phases]] to refine")])
    info = open_run_info(exp.run.run_file)
    table = _stored_table(exp.run.run_file)
    lat = refine_lattice(table, exp.phases, exp.lattice, unit=info["unit"], wavelength_A=info["wavelength_A"],
                         weights=read_weight_fractions(exp.run.run_file))
    arrays = {"frame": lat.frame, "time_s": lat.time_s, "phase": np.array(lat.phases, dtype=object),
              "message": lat.message, "fraction_source": lat.fraction_source, **lat.values}
    for name in ("fraction_method", "presence"):
        if getattr(lat, name) is not None:
            arrays[name] = getattr(lat, name)
    with transaction(exp.run.run_file, checkpoint_s=exp.run.checkpoint_s):
        mark_stage(exp.run.run_file, "lattice", None)
        write_table(exp.run.run_file, "lattice", arrays, {"correction": exp.lattice.correction})
    states = read_table(exp.run.run_file, "electrochemistry")
    if states is not None:
        lat.voltage_V, lat.x = states["voltage_V"][lat.frame], states["x"][lat.frame]
    summary = LatticeSummary(exp.run.run_file, lat.write_csv(exp.run.output / "lattice.csv"), len(lat.frame))
    for i, name in enumerate(lat.phases):
        summary.cells[name] = int(np.isfinite(lat.values["c_A"][:, i]).sum())
    for msg in lat.message.ravel():
        if msg:
            summary.flagged[msg] = summary.flagged.get(msg, 0) + 1
    return summary


@dataclass
class EchemSummary:
    """What an electrochemistry run did."""

    run_file: Path
    csv_file: Path
    record_file: Path
    record_rows: int
    record_start: str
    record_end: str
    frames: int
    status: dict[str, int] = field(default_factory=dict)
    x_range: tuple[float, float] | None = None
    theoretical_capacity_mAh_g: float | None = None
    inventory_loss_mAh_g: float = 0.0
    notes: tuple[str, ...] = ()
    lattice_updated: bool = False
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"cycler record {self.record_file.name}: {self.record_rows} rows, {self.record_start} to "
                 f"{self.record_end}"]
        lines += [f"  {n}" for n in self.notes]
        if self.theoretical_capacity_mAh_g is not None:
            lines.append(f"theoretical capacity {self.theoretical_capacity_mAh_g:.1f} mAh/g"
                         + (f"; inventory loss {self.inventory_loss_mAh_g:.2f} mAh/g" if self.inventory_loss_mAh_g else ""))
        lines.append(f"{self.frames} frame(s): " + ", ".join(f"{k} {v}" for k, v in sorted(self.status.items())))
        if self.x_range is not None:
            lines.append(f"x from {self.x_range[0]:.4f} to {self.x_range[1]:.4f}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"frames: {self.csv_file}" + ("  (lattice.csv updated with voltage and x)"
                                                   if self.lattice_updated else ""))
        return "\n".join(lines)


def _frame_timezone(exp: Experiment) -> str | None:
    """The timezone the frame times were read in, if one was given."""
    from .config import TimesFromLog

    spec = exp.frames if exp.frames is not None else exp.patterns
    times = getattr(spec, "times", None)
    if isinstance(times, TimesFromLog) and times.timezone:
        return times.timezone
    return getattr(spec, "timezone", None)


def _implausible(states, ec, spec) -> list[str]:
    """Frames whose x or capacity no cell can reach (x below 0 or above x0 + 0.2, a capacity
    above 1.5 times the formula's theoretical one) get the status ``implausible``; the warning
    names the likely causes (a current in A read as mA, the active mass)."""
    x, cap = states.x, states.capacity_mAh_g
    bad = np.zeros(x.size, dtype=bool)
    why = []
    with np.errstate(invalid="ignore"):
        if ec.x0 is not None:
            out = np.isfinite(x) & ((x < 0) | (x > ec.x0 + 0.2))
            if out.any():
                why.append(f"x reaches {np.nanmin(x):.4g} to {np.nanmax(x):.4g}, outside 0 to x0 + 0.2 = "
                           f"{ec.x0 + 0.2:.3g}")
            bad |= out
        theo = ec.theoretical_capacity_mAh_g
        if theo:
            over = np.isfinite(cap) & (np.abs(cap) > 1.5 * theo)
            if over.any():
                why.append(f"the capacity reaches {np.nanmax(np.abs(cap)):.4g} mAh/g, above 1.5 x the theoretical "
                           f"{theo:.1f} mAh/g of {spec.formula}")
            bad |= over
    if not bad.any():
        return []
    states.status[bad] = "implausible"
    return [f"{'; '.join(why)} in {int(bad.sum())} frame(s) (status 'implausible'): check the current's unit "
            f"(header or units = {{ current = \"A\" }}), active_mass_mg ({spec.active_mass_mg}) and x0"]


def echem_experiment(exp: Experiment, *, update_lattice: bool = True) -> EchemSummary:
    """Read the cycler file of ``[electrochemistry]``, integrate capacity and x, and give every
    frame of the run file its voltage, current, capacity, x and half-cycle (averaged over its
    exposure): ``/entry/electrochemistry`` (with the whole record in ``record``) and
    ``<output>/frames.csv``. Recomputed whole; it takes seconds. With ``update_lattice`` (and a
    lattice table in the run file) the lattice is recomputed to carry the new voltage and x."""
    from datetime import datetime, timezone

    from .cyclers import read_cycler
    from .echem import analyse_record, frame_states, inventory_loss
    from .frames import iso_seconds
    from .store import has_group, read_frames, write_table

    spec = exp.electrochemistry
    if spec is None:
        raise ConfigError(str(exp.source or "experiment"), [(
            "electrochemistry", "no [electrochemistry] section; add one with file = \"cycler.csv\" (see the README)")])
    tz = spec.timezone or _frame_timezone(exp)
    read = dict(format=spec.format, columns=spec.columns, units=spec.units, sheet=spec.sheet, timezone=tz)
    rec = read_cycler(spec.file, start=spec.start, **read)
    loss = spec.inventory_loss_mAh_g or 0.0
    notes = list(rec.notes)
    if spec.inventory_loss_from:
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)   # only durations matter here
        history = [read_cycler(p, start=epoch, **{**read, "format": "auto", "columns": {}, "units": {}, "sheet": None})
                   for p in spec.inventory_loss_from]
        loss, n_cycles = inventory_loss(history, active_mass_mg=spec.active_mass_mg,
                                        charge_current=spec.charge_current)
        notes.append(f"inventory loss {loss:.2f} mAh/g from {n_cycles} earlier cycle(s) in "
                     f"{', '.join(p.name for p in spec.inventory_loss_from)}")
    try:
        ec = analyse_record(rec, active_mass_mg=spec.active_mass_mg, formula=spec.formula, x0=spec.x0, ion=spec.ion,
                            inventory_loss_mAh_g=loss, charge_current=spec.charge_current,
                            rest_current_mA=spec.rest_current_mA, capacity_source=spec.capacity_source)
    except ValueError as exc:
        raise ConfigError(str(exp.source or "experiment"), [("electrochemistry.capacity_source", str(exc))]) from None
    notes += list(ec.notes)
    fr = read_frames(exp.run.run_file)
    start_s, end_s = iso_seconds(fr["start"]), iso_seconds(fr["end"])
    states = frame_states(ec, start_s, end_s, start=fr["start"], end=fr["end"], keys=fr["key"])
    warnings = [n.removeprefix("warning: ") for n in notes if n.startswith("warning: ")]
    notes = [n for n in notes if not n.startswith("warning: ")]
    warnings += _implausible(states, ec, spec)
    timed = np.isfinite(start_s)
    t_first = float(np.nanmin(start_s)) if timed.any() else float(rec.time[0])
    per_frame = {name: getattr(states, name) for name in (
        "time_s", "start_s", "end_s", "voltage_V", "current_mA", "capacity_mAh_g", "x", "segment", "status",
        "half_cycle", "cycle", "mode", "half_cycle_capacity_mAh_g")}
    record = {"arrays": {
        "time": rec.time, "time_s": rec.time - t_first, "voltage_V": rec.voltage_V, "current_mA": rec.current_mA,
        "capacity_mAh_g": ec.capacity_mAh_g, "x": ec.x, "segment": ec.segment, "mode": ec.mode,
        "half_cycle": ec.half_cycle, "cycle": ec.cycle, "half_cycle_capacity_mAh_g": ec.half_cycle_capacity_mAh_g},
        "attrs": {"time_units": "POSIX s (UTC)", "time_s_origin": "the first frame's start"}}
    attrs = {
        "file": str(spec.file), "format": rec.format, "notes": "\n".join(notes),
        "record_start": rec.start.isoformat(), "record_end": rec.end.isoformat(),
        "active_mass_mg": spec.active_mass_mg if spec.active_mass_mg else np.nan,
        "formula": spec.formula or "", "ion": ec.ion or "",
        "molar_mass_g_mol": ec.molar_mass if ec.molar_mass else np.nan,
        "theoretical_capacity_mAh_g": ec.theoretical_capacity_mAh_g if ec.theoretical_capacity_mAh_g else np.nan,
        "x0": ec.x0 if ec.x0 is not None else np.nan, "inventory_loss_mAh_g": loss, "x_loss": ec.x_loss,
        "charge_current": spec.charge_current, "rest_current_mA": ec.rest_current_mA,
        "capacity": "net charge passed since the record began, per gram of active material (mAh/g)",
    }
    with transaction(exp.run.run_file, checkpoint_s=exp.run.checkpoint_s):
        mark_stage(exp.run.run_file, "echem", None)
        write_table(exp.run.run_file, "electrochemistry", {**per_frame, "record": record}, attrs)
    csv_file = states.write_csv(exp.run.output / "frames.csv")
    xs = states.x[np.isfinite(states.x)]
    summary = EchemSummary(exp.run.run_file, csv_file, spec.file, len(rec), rec.start.isoformat(), rec.end.isoformat(),
                           int(states.frame.size), states.counts(),
                           (float(xs.max()), float(xs.min())) if xs.size else None,
                           ec.theoretical_capacity_mAh_g, loss, tuple(notes), warnings=tuple(warnings))
    if update_lattice and exp.phases and has_group(exp.run.run_file, "lattice"):
        lattice_experiment(exp)
        summary.lattice_updated = True
    return summary
