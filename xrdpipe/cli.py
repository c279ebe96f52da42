"""The ``xrdpipe`` command: thin adapters over the pipeline.

Heavy imports happen inside the commands so that ``xrdpipe --help`` is instant; domain errors
(:class:`~xrdpipe.errors.XrdpipeError`) become clean messages and exit status 2; Ctrl-C keeps
what was written and says how to resume (exit status 130).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__


def _fail(exc: Exception) -> None:
    from .safeio import hdf5_write_failed

    click.echo(f"error: {exc}", err=True)
    if hdf5_write_failed():
        # HDF5 cannot close a file it failed to write (a full disk) and may crash while the
        # interpreter exits: end here, the message said it all and the work copy is gone
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(2)


def _load(path: str):
    from .config import load_experiment

    return load_experiment(path)


def _frame_list(option: str, text: str | None) -> list[int] | None:
    """Frame numbers given as ``0,25,49``; a clear one-line error otherwise."""
    if not text:
        return None
    try:
        return [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        _fail(ValueError(f"{option}: expected frame numbers such as 0,25,49, got {text!r}"))


def _interrupted(kept: str) -> None:
    import signal

    from .parallel import forget_interrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # said once: a second Ctrl-C or a late echo of
    forget_interrupt()                               # the first must not turn the exit into a traceback
    click.echo(f"\ninterrupted: {kept}; run the same command again to resume", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is closed and published by now (the transaction ended as the interrupt passed
    # through it). The interpreter's own exit can still end in SIGINT instead of status 130 (it
    # remembers a KeyboardInterrupt that reached any code it ran with PyRun_String), so end here.
    import os

    os._exit(130)


def _stage(experiment: str, run, kept: str) -> None:
    """Load EXPERIMENT, run one stage on it and print its summary; a domain error is one line
    (exit 2), Ctrl-C says what was kept and how to resume (exit 130)."""
    from .errors import XrdpipeError
    from .parallel import interrupted

    try:
        summary = run(_load(experiment))
    except KeyboardInterrupt:
        _interrupted(kept)
    except Exception as exc:
        if interrupted():               # whatever broke after Ctrl-C (a pool losing its workers...)
            _interrupted(kept)
        if isinstance(exc, XrdpipeError):
            _fail(exc)
        raise
    if interrupted():                   # a Ctrl-C that something swallowed
        _interrupted(kept)
    click.echo(str(summary))


class _Main(click.Group):
    """The command group: Ctrl-C anywhere (loading modules, reading the experiment) is the
    clean "interrupted" line and exit status 130, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted("nothing is lost")


def _check_scheduler(ctx, param, value):
    if value is None:
        return None
    from .parallel import check_scheduler

    try:
        return check_scheduler(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_SCHEDULER = click.option(
    "--scheduler", default=None, callback=_check_scheduler, metavar="NAME|ADDRESS",
    help="Where frames are integrated: processes (default), threads, serial, or a Dask scheduler such as "
         "tcp://host:8786 (overrides [run] scheduler).")


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xrdpipe")
def main() -> None:
    """Operando X-ray diffraction of battery cathodes: 2D frames in, numbers and figures out.

    Start with `xrdpipe demo`, then point `xrdpipe validate` and `xrdpipe integrate` at your
    own experiment file.
    """
    from .parallel import catch_interrupts
    from .safeio import quiet_h5py_write_noise

    quiet_h5py_write_noise()
    catch_interrupts()


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def validate(experiment: str) -> None:
    """Check EXPERIMENT (a TOML file) and print it resolved, or list every error."""
    from .config import experiment_summary
    from .errors import XrdpipeError

    try:
        exp = _load(experiment)
    except XrdpipeError as exc:
        _fail(exc)
    click.echo(experiment_summary(exp))
    click.echo("valid")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help="Discard the run file's patterns and integrate everything again.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Frames integrated at once (default: [integration] workers, else the number of cores).")
@_SCHEDULER
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def integrate(experiment: str, restart: bool, workers: int | None, scheduler: str | None, quiet: bool) -> None:
    """Integrate the frames of EXPERIMENT into 1D patterns (or import its 1D patterns).

    The run file is written frame by frame; an interrupted run resumes where it stopped.
    """
    from .run.integrate import integrate_experiment

    _stage(experiment, lambda exp: integrate_experiment(exp, restart=restart, progress=not quiet, workers=workers,
                                                        scheduler=scheduler),
           "everything integrated so far is in the run file")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help="Discard the fitted peaks and fit every frame again.")
@click.option("--engine", type=click.Choice(["batched", "lmfit"]), default=None,
              help="Override [fit] engine: batched (fast) or lmfit (frame by frame, the reference).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def fit(experiment: str, restart: bool, engine: str | None, quiet: bool) -> None:
    """Fit the [[windows]] of EXPERIMENT in every integrated frame; write peaks.csv.

    Results are written block by block into the run file; an interrupted fit resumes, and
    changed phases, windows or [fit] settings fit every frame again.
    """
    from .run.fit import fit_experiment

    _stage(experiment, lambda exp: fit_experiment(exp, restart=restart, progress=not quiet, engine=engine),
           "every block fitted so far is in the run file")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--frames", "frame_range", default=None, metavar="FIRST,LAST",
              help="Refine these frames only (overrides [refinement] frames).")
@click.option("--restart", is_flag=True, help="Discard earlier refinement results and refine again.")
@click.option("--compare", is_flag=True,
              help="Refine the base model and every [[refinement.models]] on one frame; print them side by side.")
@click.option("--frame", type=int, default=None, help="The frame --compare refines (default: the first).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def refine(experiment: str, frame_range: str | None, restart: bool, compare: bool, frame: int | None,
           quiet: bool) -> None:
    """Whole-pattern refinement ([refinement]: Le Bail, Pawley or Rietveld) of every integrated frame.

    Frames are refined in order, each starting from the last successful one; a frame that
    fails is recorded and the run goes on. Results: /entry/refinement of the run file and
    refine.csv (cells, weight fractions, Rwp/Rexp/GOF and esds per frame and phase). With
    --compare: the alternative models of [[refinement.models]] on one frame, side by side
    (refine_compare.csv).
    """
    from .run.refine import compare_models, refine_experiment

    if compare:
        def run(exp):
            f, results, path = compare_models(exp, frame)
            return _comparison_text(f, results, path)

        _stage(experiment, run, "nothing is written before the comparison ends")
        return
    rng = _frame_list("--frames", frame_range)
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] <= rng[1]):
        _fail(ValueError(f"--frames: expected FIRST,LAST with 0 <= FIRST <= LAST, got {frame_range!r}"))
    _stage(experiment, lambda exp: refine_experiment(exp, progress=not quiet, restart=restart,
                                                     frames=tuple(rng) if rng else None),
           "every frame refined so far is in the run file")


def _comparison_text(frame: int, results, path) -> str:
    names = [n for n, _ in results]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"frame {frame}: " + ", ".join(names), f"{'':<26}" + "".join(f"{n:>{width}}" for n in names)]
    for label, get in (("Rwp (%)", lambda r: f"{100 * r.rwp:.3f}"), ("Rexp (%)", lambda r: f"{100 * r.rexp:.3f}"),
                       ("GOF", lambda r: f"{r.gof:.4f}"), ("parameters", lambda r: str(r.n_params))):
        lines.append(f"{label:<26}" + "".join(f"{get(r):>{width}}" for _, r in results))
    params = list(dict.fromkeys(n for _, r in results for n, f in zip(r.names, r.refined)
                                if f and not n.startswith("bkg_") and ("occ:" in n or "z:" in n or "b:" in n)))
    for p in params:
        cells = []
        for _, r in results:
            cells.append(f"{r.value(p):.4f}({r.esd(p):.1g})" if p in r.names and r.refined[r.names.index(p)] else "-")
        lines.append(f"{p:<26}" + "".join(f"{c:>{width}}" for c in cells))
    best = min(results, key=lambda nr: nr[1].rwp)[0]
    lines.append(f"lowest Rwp: {best}; table: {path}")
    return "\n".join(lines)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def lattice(experiment: str) -> None:
    """Refine the cell of every phase in every frame from the fitted peaks; write lattice.csv.

    Also the cell volumes, the layer geometry of O3/P3/P2 phases with an oxygen z, and the
    phase fractions (see [lattice] in the README).
    """
    from .run.lattice import lattice_experiment

    _stage(experiment, lattice_experiment, "nothing is lost: the lattice is recomputed from the peaks")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def echem(experiment: str) -> None:
    """Line the frames up with the cycler record: voltage, current, capacity, x and half-cycle
    of every frame (averaged over its exposure); write frames.csv.

    Needs an [electrochemistry] section and a run file with the frames' times (after
    `xrdpipe integrate`). Also fills voltage_V and x of lattice.csv when there is one.
    """
    from .run.echem import echem_experiment

    _stage(experiment, echem_experiment, "nothing is lost: the state of charge is recomputed from the record")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False, exists=True))
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=2.0, show_default=True,
              help="Seconds between polls for new frames.")
@click.option("--settle", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              help="A file is complete once unchanged for this long (a growing HDF5 stack: all but its last frame).")
@click.option("--retry", type=click.FloatRange(0, 86400), default=30.0, show_default=True,
              help="A frame that cannot be read is retried until its file has been unchanged this long.")
@click.option("--stop-after-idle", type=click.FloatRange(0, None), default=None,
              help="Stop after this many seconds without a new frame (default: run until Ctrl-C).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Frames integrated at once.")
@_SCHEDULER
def watch(experiment: str, interval: float, settle: float, retry: float, stop_after_idle: float | None,
          workers: int | None, scheduler: str | None) -> None:
    """Follow EXPERIMENT live: poll for new frames (new files, or frames appended to an HDF5
    stack) and run every configured stage on them; figures and the run file are updated
    atomically. Stop with Ctrl-C; `xrdpipe run` or `xrdpipe watch` goes on from there."""
    from .errors import XrdpipeError
    from .run.watch import watch_experiment

    click.echo(f"watching {experiment} every {interval:g} s (Ctrl-C to stop)")
    try:
        summary = watch_experiment(experiment, interval_s=interval, settle_s=settle, retry_s=retry,
                                   idle_stop_s=stop_after_idle, scheduler=scheduler, workers=workers,
                                   echo=click.echo)
    except XrdpipeError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("\nstopped: everything processed so far is in the run file; `xrdpipe run` or "
                   "`xrdpipe watch` goes on from there")
        return
    click.echo(str(summary))


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Run every stage, even those whose inputs have not changed.")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Frames integrated at once.")
@_SCHEDULER
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def run(experiment: str, force: bool, workers: int | None, scheduler: str | None, quiet: bool) -> None:
    """Run every configured stage of EXPERIMENT in order: integrate, echem, fit, refine, lattice,
    plots, export; then writes <output>/report.html. A stage whose inputs have not changed since it
    last finished is skipped; an interrupted run resumes. Ends with a summary: frames, failures,
    phases and their x ranges, and where the outputs are."""
    from .run.workflow import run_experiment

    _stage(experiment, lambda exp: run_experiment(exp, force=force, progress=not quiet, workers=workers,
                                                  scheduler=scheduler, echo=click.echo),
           "every stage finished so far is kept, and the interrupted one resumes")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def report(experiment: str) -> None:
    """Write <output>/report.html for EXPERIMENT from its run file: one self-contained page with
    the summary (frames, failures and why, phases and their frame and x ranges), every figure,
    the phase transitions and the provenance (versions, experiment file, PONI, stage keys).
    `xrdpipe run` writes it as its last step; this rewrites it (e.g. after `xrdpipe plot`)."""
    from .run.report import report_experiment
    from .run.workflow import stage_keys

    _stage(experiment, lambda exp: report_experiment(exp, keys=stage_keys(exp)), "nothing is lost")


_KIND_HELP = ("contour, lattice, fractions, fit, waterfall or refinement (the last refined frame) "
              "(repeat for several; default: [plots] kinds)")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--kind", "kinds", multiple=True,
              type=click.Choice(["contour", "lattice", "fractions", "fit", "waterfall", "refinement"]),
              help=_KIND_HELP)
@click.option("--format", "formats", multiple=True, type=click.Choice(["png", "pdf", "svg"]),
              help="Output formats (repeat; default: [plots] formats).")
@click.option("--window", "windows", multiple=True, help="contour/fit: a [[windows]] name (repeat).")
@click.option("--axis", type=click.Choice(["tth", "q", "d"]), default=None, help="contour/waterfall: the radial axis.")
@click.option("--vertical", type=click.Choice(["time", "x", "frame"]), default=None, help="contour: down the map.")
@click.option("--scale", type=click.Choice(["linear", "sqrt", "log"]), default=None, help="contour: intensity scale.")
@click.option("--against", type=click.Choice(["x", "capacity", "time"]), default=None,
              help="lattice/fractions: the abscissa.")
@click.option("--frames", default=None,
              help="fit/waterfall: frame numbers, e.g. 0,25,49; contour: the first and last frame shown.")
@click.option("--width-mm", type=click.FloatRange(20, 500), default=None)
@click.option("--height-mm", type=click.FloatRange(20, 500), default=None)
@click.option("--dpi", type=click.IntRange(50, 1200), default=None)
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="The figure's file (one kind only): x.png, x.pdf or x.svg, or a name without suffix for "
                   "[plots] formats (default: <output>/figures/<run>_<kind>).")
def plot(experiment: str, kinds, formats, windows, axis, vertical, scale, against, frames, width_mm, height_mm,
         dpi, output) -> None:
    """Draw figures of EXPERIMENT from its run file alone (PNG plus PDF or SVG). Options
    override the [plots] section of the experiment file."""
    from pydantic import ValidationError

    from .errors import ConfigError
    from .run.output import plot_experiment

    if output and len(kinds) != 1:
        _fail(ValueError("-o/--output needs exactly one --kind"))
    if output:
        # the name the user gave is the file written: its suffix chooses the format (no suffix:
        # [plots] formats, each added to the name); a folder is never created on a guess
        target = Path(output)
        suffix = target.suffix.lower().lstrip(".")
        if suffix in ("png", "pdf", "svg"):
            if formats and set(formats) != {suffix}:
                _fail(ValueError(f"-o {output} is a {suffix.upper()} file, but --format asks for "
                                 f"{', '.join(formats)}; give one or the other"))
            formats, output = (suffix,), str(target.with_suffix(""))
        if not target.parent.is_dir():
            _fail(ValueError(f"-o {target}: no folder {str(target.parent)!r}; create it first"))
    frame_list = _frame_list("--frames", frames)

    def draw(exp):
        spec = exp.plots
        top = {k: v for k, v in (("formats", list(formats)), ("dpi", dpi)) if v}
        for kind in kinds or spec.kinds or ["contour", "lattice", "fractions", "fit", "waterfall"]:
            sub = getattr(spec, kind, None)
            if sub is None:          # refinement: no options of its own yet (the last refined frame)
                continue
            upd = {"width_mm": width_mm, "height_mm": height_mm}
            if kind in ("contour", "fit") and windows:
                upd["windows"] = list(windows)
            if kind in ("contour", "waterfall"):
                upd["axis"] = axis
            if kind == "contour":
                upd.update(vertical=vertical, scale=scale)
                if frame_list is not None:
                    upd["frame_range"] = (min(frame_list), max(frame_list))
            if kind in ("lattice", "fractions"):
                upd["against"] = against
            if kind in ("fit", "waterfall") and frame_list is not None:
                upd["frames"] = frame_list
            upd = {k: v for k, v in upd.items() if v is not None}
            try:
                top[kind] = type(sub).model_validate({**sub.model_dump(), **upd})
            except ValidationError as exc:
                raise ConfigError("the command line", [
                    (f"plots.{kind}." + ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()]) from None
        return plot_experiment(exp, kinds=list(kinds) or None, plots=spec.model_copy(update=top), stem=output,
                               strict=bool(kinds))

    _stage(experiment, draw, "figures already written are kept")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--format", "formats", multiple=True, type=click.Choice(["xye", "fxye", "topas"]),
              help="xye (x y esd with a header), fxye (GSAS-II, with an .instprm), topas (2θ y esd); "
                   "repeat for several (default: [export] formats).")
@click.option("--frames", default=None, help="Frame numbers, e.g. 0,25,49 (default: every integrated frame).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(experiment: str, formats, frames, quiet: bool) -> None:
    """Write every integrated pattern of EXPERIMENT for refinement elsewhere (GSAS-II, TOPAS...),
    with index.csv (frame, time, x, voltage per file)."""
    from .run.output import export_experiment

    frame_list = _frame_list("--frames", frames)
    _stage(experiment, lambda exp: export_experiment(exp, formats=list(formats) or None, frames=frame_list,
                                                     progress=not quiet),
           "files already written are complete")


def _pair(option: str, text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        _fail(ValueError(f"{option}: expected two numbers ROW,COLUMN such as 1200,1100, got {text!r}"))
    return a, b


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--calibrant", required=True, help="A calibrant of pyFAI's library: CeO2, LaB6, Si, alpha_Al2O3...")
@click.option("--wavelength-A", "wavelength_a", type=click.FloatRange(min=0, min_open=True), required=True,
              help="X-ray wavelength in Å.")
@click.option("--detector", default=None, help="pyFAI detector name, e.g. eiger2_16m, pilatus1m, perkin.")
@click.option("--pixel-um", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Pixel size in µm, for a detector pyFAI does not know.")
@click.option("--guess-distance-mm", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Starting sample-detector distance (searched within ±15 %).")
@click.option("--guess-center", default=None, help="Starting beam centre ROW,COLUMN in pixels (default: the "
                                                   "image centre; searched within 60 pixels).")
@click.option("--mask", default=None, type=click.Path(dir_okay=False),
              help="Mask image (non-zero = excluded), added to the detector's own (module gaps).")
@click.option("--frame", type=click.IntRange(min=0), default=0, show_default=True,
              help="Frame of a multi-frame image file.")
@click.option("--refine-wavelength", is_flag=True, help="Refine the wavelength too (needs rings at high angle).")
@click.option("--output", "-o", default="geometry.poni", show_default=True, type=click.Path(dir_okay=False),
              help="The PONI to write; the report, ring table and figure go beside it.")
def calibrate(image: str, calibrant: str, wavelength_a: float, detector: str | None, pixel_um: float | None,
              guess_distance_mm: float | None, guess_center: str | None, mask: str | None, frame: int,
              refine_wavelength: bool, output: str) -> None:
    """Find the rings of a calibrant on IMAGE and refine the detector geometry (distance, beam
    centre, tilts; the wavelength with --refine-wavelength): writes the PONI, <stem>_report.txt
    (rings, points per ring, residual 2θ per ring), <stem>_rings.csv and <stem>_rings.png."""
    from .errors import XrdpipeError
    from .geometry_fit import calibrate as run

    try:
        res = run(image, calibrant=calibrant, wavelength_A=wavelength_a, detector=detector, pixel_um=pixel_um,
                  guess_distance_mm=guess_distance_mm, guess_center=_pair("--guess-center", guess_center),
                  mask=mask, refine_wavelength=refine_wavelength, frame=frame)
        paths = res.write(output)
    except XrdpipeError as exc:
        _fail(exc)
    click.echo(res.report())
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@main.command("check-calibration")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--poni", required=True, type=click.Path(dir_okay=False), help="The geometry to check.")
@click.option("--calibrant", required=True, help="The calibrant on IMAGE (pyFAI's library: CeO2, LaB6, Si...).")
@click.option("--tolerance-deg", type=click.FloatRange(min=0, min_open=True), default=0.005, show_default=True,
              help="Largest acceptable offset of a ring, in degrees 2θ.")
@click.option("--mask", default=None, type=click.Path(dir_okay=False), help="Mask image (non-zero = excluded).")
@click.option("--frame", type=click.IntRange(min=0), default=0, show_default=True)
def check_calibration(image: str, poni: str, calibrant: str, tolerance_deg: float, mask: str | None,
                      frame: int) -> None:
    """Integrate the calibrant IMAGE with PONI, fit every expected ring and report its 2θ offset
    and a verdict. Exit status 0 when every ring is within the tolerance, 1 when not (or when
    the image does not match the calibrant), 2 on an error."""
    from .errors import XrdpipeError
    from .geometry_fit import check_calibration as run

    try:
        chk = run(image, poni=poni, calibrant=calibrant, tolerance_deg=tolerance_deg, mask=mask,
                  frame=frame)
    except XrdpipeError as exc:
        _fail(exc)
    click.echo(str(chk))
    sys.exit(0 if chk.passed else 1)


@main.command()
@click.argument("frames")
@click.option("--poni", required=True, type=click.Path(dir_okay=False), help="The PONI file of the detector geometry.")
@click.option("--mask", type=click.Path(dir_okay=False), default=None, help="The mask image (non-zero = excluded).")
@click.option("--cycler", type=click.Path(dir_okay=False), default=None, help="The cycler file of the cell.")
@click.option("--phases", required=True, help="Library phases to follow, comma-separated: O3,P3 (add Al for the current collector).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default="experiment.toml", show_default=True,
              help="The experiment file to write (paths in it are relative to its folder).")
@click.option("--name", default=None, help="The run's name (default: from the frame files' names).")
@click.option("--timezone", default=None,
              help="IANA zone of local times without UTC offset (cycler computer, frame headers), e.g. Europe/London.")
@click.option("--cycler-start", default=None,
              help="When the cycler file's time 0 was, for a file with relative times only: 2025-07-02T19:00:00+08:00.")
@click.option("--radial-unit", type=click.Choice(["2th_deg", "q_A^-1"]), default=None,
              help="Radial unit of the integration, or of the 1D patterns (default: what their header names, "
                   "else 2th_deg); the windows are written in it.")
@click.option("--force", is_flag=True, help="Overwrite the experiment file if it exists.")
def init(frames: str, poni: str, mask: str | None, cycler: str | None, phases: str, out: str, name: str | None,
         timezone: str | None, cycler_start: str | None, radial_unit: str | None, force: bool) -> None:
    """Write a commented experiment file from FRAMES (a folder or a glob of frames or 1D patterns),
    the PONI, the cycler file and the phases: frame format, count and times, the detector's 2θ
    range, windows around the phases' strongest reflections in it, the cycler's columns and clock.
    Then `xrdpipe validate` and `xrdpipe run` it."""
    from datetime import datetime

    from .errors import XrdpipeError
    from .scaffold import init_experiment

    start = None
    if cycler_start:
        try:
            start = datetime.fromisoformat(cycler_start)
        except ValueError:
            _fail(ValueError(f"--cycler-start: expected a date and time such as 2025-07-02T19:00:00+08:00, got {cycler_start!r}"))
        if start.tzinfo is None and timezone is None:
            _fail(ValueError("--cycler-start has no UTC offset: write it as 2025-07-02T19:00:00+08:00 or give --timezone"))
    names = [p.strip() for p in phases.split(",") if p.strip()]
    try:
        path, found = init_experiment(frames, poni=poni, phases=names, out=out, mask=mask, cycler=cycler, name=name,
                                      timezone=timezone, cycler_start=start, radial_unit=radial_unit, force=force)
    except XrdpipeError as exc:
        _fail(exc)
    f = found.frames
    click.echo(f"wrote {path}: {f.frames} {'frame' if f.kind == 'frames' else 'pattern'}(s) ({f.suffix}), "
               f"times {'from the headers' if f.times else 'not found (see CHECK)'}, 2θ {found.tth[0]:.2f}-"
               f"{found.tth[1]:.2f}°, {len(found.windows)} window(s) for {', '.join(found.phases)}"
               + (f", cycler {found.cycler.format}" + (f" (needs {found.cycler.needs}: see CHECK)" if found.cycler.needs else "")
                  if found.cycler else ""))
    for note in found.notes:
        click.echo(f"note: {note}")
    click.echo(f"next: xrdpipe validate {path} && xrdpipe run {path}")


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="xrdpipe-demo")
@click.option("--frames", "n_frames", type=click.IntRange(5, 100_000), default=120, show_default=True,
              help="Number of frames to simulate.")
@click.option("--scenario", type=click.Choice(["nfm", "mcm"]), default="nfm", show_default=True,
              help="nfm: O3 <-> P3 (NaNi1/3Fe1/3Mn1/3O2); mcm: P2 -> P''2.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def demo(out: str, n_frames: int, scenario: str, seed: int, quiet: bool) -> None:
    """Simulate a small operando experiment in OUT (EIGER-like HDF5 frames, PONI, mask, cycler
    file, experiment.toml) and run the whole chain on it: integrate, echem, fit, lattice,
    figures and exports. A second call reuses the simulated data and does no work."""
    import time

    from .config import load_experiment
    from .errors import XrdpipeError
    from .run.workflow import run_experiment
    from .testing import make_experiment

    t0 = time.perf_counter()
    folder = Path(out)
    exp_file = folder / "experiment.toml"
    if exp_file.exists() and (folder / "truth.csv").exists():
        click.echo(f"using the experiment already simulated in {folder}/ (delete the folder to simulate again)")
        _demo_differs(folder, exp_file, n_frames, scenario)
    else:
        click.echo(f"simulating {n_frames} frames ({scenario} scenario) in {folder}/ ...")
        syn = make_experiment(folder, scenario=scenario, n_frames=n_frames, seed=seed, counts=0.002,
                              background=100.0, run_name=f"demo-{scenario}")
        exp_file = syn.experiment_file
        click.echo(f"  wrote {len(syn.frame_files)} EIGER-like HDF5 file(s), demo.poni, mask.edf, cycler.csv, "
                   f"truth.csv and experiment.toml ({time.perf_counter() - t0:.1f} s)")
    try:
        summary = run_experiment(load_experiment(exp_file), progress=not quiet, echo=click.echo)
    except XrdpipeError as exc:
        _fail(exc)
    click.echo(str(summary))
    click.echo(f"experiment file: {exp_file}; the truth is in {folder / 'truth.csv'}")
    click.echo(f"look at the patterns: silx view {summary.run_file}   (or h5web)")


def _demo_differs(folder: Path, exp_file: Path, n_frames: int, scenario: str) -> None:
    """Say so where the options given on the command line ask for another simulation than the
    one the folder holds (it is used as it is)."""
    import csv

    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = {name for name in ("n_frames", "scenario") if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if not given:
        return
    with open(folder / "truth.csv", newline="") as fh:
        held = len({row["frame"] for row in csv.DictReader(fh)})
    from .config import load_experiment

    held_scenario = load_experiment(exp_file).run.name.removeprefix("demo-")
    differ = []
    if "n_frames" in given and n_frames != held:
        differ.append(f"--frames {n_frames} (it holds {held})")
    if "scenario" in given and scenario != held_scenario:
        differ.append(f"--scenario {scenario} (it holds {held_scenario})")
    if differ:
        click.echo(f"  not simulated again for {' and '.join(differ)}: delete {folder}/ or give another folder")


if __name__ == "__main__":  # pragma: no cover
    main()
