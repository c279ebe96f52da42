"""The integrate stage on an experiment: every frame not yet in the run file integrated (or, for
``[patterns]``, imported) into ``/entry/patterns``, resumable frame by frame."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Experiment
from ..errors import CalibrationError, ConfigError, FrameReadError, PatternReadError
from ..frames import FrameRef, list_frames, read_frame
from ..parallel import default_workers
from ..safeio import file_stat
from ..timing import frame_times
from .stage import stage, takes_experiment
from .store import DONE, RunFile

__all__ = ["IntegrationSummary", "integrate_experiment", "package_versions"]


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


@takes_experiment
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
    t_start = time.perf_counter()
    fspec = exp.frames
    refs = list_frames(fspec.files, dataset=fspec.dataset)
    if ready is not None:
        refs = ready(refs)
    times = frame_times(refs, fspec.times, timezone=fspec.timezone, where=str(exp.source or "experiment"))
    n_workers = workers or exp.integration.workers or default_workers()
    cal, integ, kept, read_ahead = _integrator(exp, refs, cache, workers=n_workers, scheduler=scheduler,
                                               restart=restart)
    try:
        summary = IntegrationSummary(exp.run.run_file, len(refs), setup_seconds=time.perf_counter() - t_start,
                                     cache_hit=kept or integ.cache_hit)
        summary.untimed = sum(t is None for t in times) if fspec.times is not None else 0
        summary.notes += _time_order(refs, times, fspec.times)
        with stage(exp, "integrate", progress=progress, started=t_start, summary=summary) as st, \
                RunFile.open_for_writing(exp.run.run_file, radial=integ.radial, unit=exp.integration.unit,
                                         wavelength_A=cal.wavelength_A, fingerprint=_fingerprint(exp, cal),
                                         provenance=_provenance(exp, cal, integ), title=exp.run.name,
                                         restart=restart, instrument_sd=integ.instrument_sd,
                                         instrument_offset=integ.instrument_offset,
                                         same_as={"poni": _digest(cal.poni_text)}) as run:
            jobs = _jobs(run, refs, times, summary)
            where_to = _scheduler(exp, scheduler, n_workers, len(jobs))
            # closed before the run file is: on an error (a full disk) no worker still reads a
            # frame while the run file is closed (HDF5 is one library for both)
            if read_ahead is not None and where_to not in ("threads", "serial"):
                read_ahead.close()
                read_ahead = None
            _integrate_frames(run, jobs, integ, summary, st.bar(len(jobs)), workers=n_workers, scheduler=where_to,
                              read_ahead=read_ahead, dark=cal.dark is not None, retry_s=retry_s)
            if fspec.times == "header":
                summary.untimed -= _late_times(run, jobs, times, refs, fspec, str(exp.source or "experiment"))
            summary.cache_file = getattr(integ, "cache_file", None)   # a new entry is written meanwhile
        return summary
    finally:
        if read_ahead is not None:
            read_ahead.close()


def _integrator(exp: Experiment, refs: list[FrameRef], cache: dict | None, *, workers: int, scheduler,
                restart: bool):
    """The calibration and the integrator (from ``cache`` when its set-up is unchanged), whether it
    was kept, and the frames read ahead while it was built (or None)."""
    from ..calibration import load_calibration
    from ..integration import Integrator

    cspec, ispec = exp.calibration, exp.integration
    setup_key = json.dumps([cspec.model_dump(mode="json"), [file_stat(p) for p in (cspec.poni, cspec.mask, cspec.dark,
                                                                                    cspec.flat) if p],
                            ispec.model_dump(mode="json", exclude={"workers"})])
    if cache is not None and cache.get("integrator_key") == setup_key:
        cal, integ = cache["integrator"]                 # live processing: built once, kept
        return cal, integ, True, None
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
        _check_reach(integ, cal, cspec, ispec, str(exp.source or "experiment"))
    except BaseException:
        if read_ahead is not None:
            read_ahead.close()
        raise
    if cache is not None:
        cache.update(integrator_key=setup_key, integrator=(cal, integ))
    return cal, integ, False, read_ahead


def _scheduler(exp: Experiment, scheduler: str | None, n_workers: int, n_frames: int) -> str:
    """Where ``n_frames`` frames are integrated: ``scheduler``, else ``[run] scheduler``; the
    default "processes" on a short batch (and every poll of `watch`) becomes "threads": starting
    a pool and sending it the integrator costs more than it saves (benchmarks/scale.py), and
    threads give the same numbers. A scheduler chosen by name is always obeyed."""
    where_to = scheduler or exp.run.scheduler
    chosen = scheduler is not None or "scheduler" in exp.run.model_fields_set
    if where_to == "processes" and not chosen and n_frames < 32 * n_workers:
        return "threads"
    return where_to


def _read_ahead(exp: Experiment, refs: list[FrameRef], shape, *, workers: int, scheduler, restart: bool):
    """A :class:`~xrdpipe.streaming.FramePrefetch` of the frames, when they will be integrated
    in this process (threads or serial) and all of them are to be integrated (a new run file,
    or a restart); else None."""
    from ..streaming import FramePrefetch

    in_process = _scheduler(exp, scheduler, workers, len(refs)) in ("threads", "serial")
    if not in_process or not refs or (exp.run.run_file.exists() and not restart):
        return None
    return FramePrefetch(refs, shape)


def _fingerprint(exp: Experiment, cal) -> dict:
    """The settings the patterns depend on (others refuse the run file, unless restarted)."""
    return {"integration": exp.integration.model_dump(mode="json", exclude={"workers", "engine"}),
            "poni": _poni_digest(cal.poni_text), "mask": _digest(cal.mask), "dark": _digest(cal.dark),
            "flat": _digest(cal.flat), "dataset": exp.frames.dataset}


def _poni_digest(text: str) -> str:
    """The digest of a PONI file's settings: its lines without comments (``#``, as pyFAI writes
    "Calibration done on ..." with the date of each save) or blank ones, each stripped. A PONI
    saved again with the same geometry is the same; the fingerprint of earlier versions, the
    digest of the whole text, is still taken for it (``same_as``)."""
    lines = (line.strip() for line in text.splitlines())
    return _digest("\n".join(line for line in lines if line and not line.startswith("#")))


def _provenance(exp: Experiment, cal, integ) -> dict[str, str]:
    return {"experiment": exp.text, "experiment_file": str(exp.source or ""), "poni": cal.poni_text,
            "poni_file": str(cal.poni_path), "method": "pyFAI integrate1d " + "/".join(integ.method),
            "packages": json.dumps(package_versions(), sort_keys=True)}


def _jobs(run: RunFile, refs, times, summary: IntegrationSummary) -> list[tuple[int, FrameRef]]:
    """Register the frames in the run file; the (row, frame) pairs still to integrate."""
    known = run.frame_count
    rows = run.add_frames(refs, times)
    summary.added = run.frame_count - known
    status = run.status
    jobs = [(row, ref) for row, ref in zip(rows, refs) if status[row] != DONE]
    summary.skipped = len(refs) - len(jobs)
    return jobs


def _integrate_frames(run: RunFile, jobs, integ, summary: IntegrationSummary, bar, *, workers: int, scheduler: str,
                      read_ahead, dark: bool, retry_s: float | None) -> None:
    """The frames of :func:`integrate_experiment` through the integrator, into the run file."""
    from ..streaming import integrate_frames

    with closing(integrate_frames(jobs, integ, workers=workers, scheduler=scheduler,
                                  read_ahead=read_ahead)) as results:
        for res in results:
            error = res.error
            if error is None and not np.isfinite(res.intensity).any():
                error = ("empty pattern: no valid pixel (every pixel is masked, NaN or at the "
                         "integer maximum, which marks gaps and overflows)")
            if error is None:
                remark = _dark_remark(res.intensity) if dark else ""
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


def _late_times(run: RunFile, jobs, times, refs, fspec, where: str) -> int:
    """Read again the header time of each frame integrated here whose header could not be read
    when the times were (its file was still being written: `watch` found it settled in a pause
    of the writer, and it was whole by the time its frame was read). Returns how many got one."""
    status = run.status
    untimed = {r.key for r, t in zip(refs, times) if t is None and not r.error}
    late = [r for row, r in jobs if r.key in untimed and status[row] == DONE]
    if not late:
        return 0
    try:
        found = frame_times(late, fspec.times, timezone=fspec.timezone, where=where)
    except ConfigError:                      # still none readable: they stay untimed, as reported
        return 0
    run.add_frames(late, found)
    return sum(t is not None for t in found)


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
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return True


def _import_patterns(exp: Experiment, *, restart: bool, progress: bool,
                     ready: Callable[[list[FrameRef]], list[FrameRef]] | None = None) -> IntegrationSummary:
    """Bring 1D patterns into the run file on the grid of the first readable file."""
    t_start = time.perf_counter()
    pspec = exp.patterns
    where = str(exp.source or "experiment")
    refs = [FrameRef(Path(f)) for f in pspec.files]
    if ready is not None:
        refs = ready(refs)
    times = frame_times(refs, pspec.times, where=where)
    grid = _grid(refs, where)
    fingerprint = {"radial_unit": pspec.radial_unit, "wavelength_A": pspec.wavelength_A,
                   "grid": _digest(grid)}
    provenance = {"experiment": exp.text, "experiment_file": str(exp.source or ""),
                  "method": "imported 1D patterns", "packages": json.dumps(package_versions(), sort_keys=True)}
    summary = IntegrationSummary(exp.run.run_file, len(refs))
    summary.untimed = sum(t is None for t in times) if pspec.times is not None else 0
    summary.notes += _time_order(refs, times, pspec.times)
    with stage(exp, "integrate", progress=progress, started=t_start, summary=summary) as st, \
            RunFile.open_for_writing(exp.run.run_file, radial=grid, unit=pspec.radial_unit,
                                     wavelength_A=pspec.wavelength_A, fingerprint=fingerprint,
                                     provenance=provenance, title=exp.run.name, restart=restart) as run:
        jobs = _jobs(run, refs, times, summary)
        bar = st.bar(len(refs), "import")
        bar.update(summary.skipped)
        for row, ref in jobs:
            bar.update(1)
            _import_one(run, row, ref, grid, summary)
    return summary


def _grid(refs: list[FrameRef], where: str) -> np.ndarray:
    """The radial axis of the first readable pattern file (every pattern is put on it)."""
    from ..patterns import read_pattern

    first_error = None
    for ref in refs:
        try:
            return read_pattern(ref.file)[0]
        except PatternReadError as exc:
            first_error = exc
    raise ConfigError(where, [("patterns.files", f"no pattern file could be read ({first_error})")])


def _import_one(run: RunFile, row: int, ref: FrameRef, grid: np.ndarray, summary: IntegrationSummary) -> None:
    """One pattern file into its row, interpolated onto ``grid`` where its axis differs."""
    from ..patterns import read_pattern

    try:
        x, y, e = read_pattern(ref.file)
    except PatternReadError as exc:
        run.write_failure(row, exc.reason)
        summary.failed.append((ref.key, exc.reason))
        return
    if e is None:
        e = np.sqrt(np.clip(y, 0, None))  # counts: Poisson
    if x.shape != grid.shape or not np.allclose(x, grid, rtol=0, atol=1e-9 * max(1.0, abs(grid[-1]))):
        inside = (grid >= x[0]) & (grid <= x[-1])
        y = np.where(inside, np.interp(grid, x, y), np.nan)
        e = np.where(inside, np.interp(grid, x, e), np.nan)
    run.write_pattern(row, y.astype(np.float32), e.astype(np.float32))
    summary.integrated += 1
