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
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _load(path: str):
    from .config import load_experiment

    return load_experiment(path)


def _stage(experiment: str, run, kept: str) -> None:
    """Load EXPERIMENT, run one stage on it and print its summary; a domain error is one line
    (exit 2), Ctrl-C says what was kept and how to resume (exit 130)."""
    from .errors import XrdpipeError

    try:
        summary = run(_load(experiment))
    except XrdpipeError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {kept}; run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(str(summary))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xrdpipe")
def main() -> None:
    """Operando X-ray diffraction of battery cathodes: 2D frames in, numbers and figures out.

    Start with `xrdpipe demo`, then point `xrdpipe validate` and `xrdpipe integrate` at your
    own experiment file.
    """


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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def integrate(experiment: str, restart: bool, workers: int | None, quiet: bool) -> None:
    """Integrate the frames of EXPERIMENT into 1D patterns (or import its 1D patterns).

    The run file is written frame by frame; an interrupted run resumes where it stopped.
    """
    from .pipeline import integrate_experiment

    _stage(experiment, lambda exp: integrate_experiment(exp, restart=restart, progress=not quiet, workers=workers),
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
    from .pipeline import fit_experiment

    _stage(experiment, lambda exp: fit_experiment(exp, restart=restart, progress=not quiet, engine=engine),
           "every block fitted so far is in the run file")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def lattice(experiment: str) -> None:
    """Refine the cell of every phase in every frame from the fitted peaks; write lattice.csv.

    Also the cell volumes, the layer geometry of O3/P3/P2 phases with an oxygen z, and the
    phase fractions (see [lattice] in the README).
    """
    from .pipeline import lattice_experiment

    _stage(experiment, lattice_experiment, "nothing is lost: the lattice is recomputed from the peaks")


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
def echem(experiment: str) -> None:
    """Line the frames up with the cycler record: voltage, current, capacity, x and half-cycle
    of every frame (averaged over its exposure); write frames.csv.

    Needs an [electrochemistry] section and a run file with the frames' times (after
    `xrdpipe integrate`). Also fills voltage_V and x of lattice.csv when there is one.
    """
    from .pipeline import echem_experiment

    _stage(experiment, echem_experiment, "nothing is lost: the state of charge is recomputed from the record")


@main.command()
@click.argument("out", type=click.Path(file_okay=False), default="xrdpipe-demo")
@click.option("--frames", "n_frames", type=click.IntRange(5, 100_000), default=50, show_default=True,
              help="Number of frames to simulate.")
@click.option("--scenario", type=click.Choice(["nfm", "mcm"]), default="nfm", show_default=True,
              help="nfm: O3 <-> P3 (NaNi1/3Fe1/3Mn1/3O2); mcm: P2 -> P''2.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def demo(out: str, n_frames: int, scenario: str, seed: int, quiet: bool) -> None:
    """Simulate a small operando experiment of 2D frames in OUT, integrate it, line it up with its
    cycler record, fit its peaks and refine its cells."""
    import time

    from .config import load_experiment
    from .errors import XrdpipeError
    from .pipeline import echem_experiment, fit_experiment, integrate_experiment, lattice_experiment
    from .testing import make_experiment

    t0 = time.perf_counter()
    folder = Path(out)
    click.echo(f"simulating {n_frames} frames ({scenario} scenario) in {folder}/ ...")
    syn = make_experiment(folder, scenario=scenario, n_frames=n_frames, seed=seed, counts=0.002, background=100.0,
                          run_name=f"demo-{scenario}")
    click.echo(f"  wrote {len(syn.frame_files)} EIGER-like HDF5 file(s), demo.poni, mask.edf, cycler.csv, "
               f"truth.csv and experiment.toml ({time.perf_counter() - t0:.1f} s)")
    try:
        exp = load_experiment(syn.experiment_file)
        summary = integrate_experiment(exp, progress=not quiet)
        click.echo(str(summary))
        click.echo(str(echem_experiment(exp)))
        fitted = fit_experiment(exp, progress=not quiet)
        click.echo(str(fitted))
        click.echo(str(lattice_experiment(exp)))
    except XrdpipeError as exc:
        _fail(exc)
    click.echo(f"experiment file: {syn.experiment_file}")
    click.echo(f"look at the patterns: silx view {summary.run_file}   (or h5web)")


if __name__ == "__main__":  # pragma: no cover
    main()
