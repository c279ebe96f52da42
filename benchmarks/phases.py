"""The phase model against independent peaks and a plain lmfit loop, on a hard synthetic series.

A synthetic O3 <-> P3 charge (the NFM study, λ = 0.6209 Å) made harder than the demo with
:class:`xrdpipe.testing.Difficulty`: the experiment's start cells 1 % (a) and 2 % (c) off, the
coexisting basal lines 1.1 FWHM apart and 1.6x broader in the two-phase region, per-phase
intensities the model cannot assume, Al lines in a window, Poisson noise over a background of
2,000 counts. Five windows (003, 104, 015 with Al 200, 107, 018), two phases and Al.

Side by side in the same run:

* ``phase model``: ``xrdpipe.fit_phases`` then the cells and fractions (``refine_lattice``);
* ``independent peaks``: ``xrdpipe.fit_peaks`` (batched engine) then ``refine_lattice``;
* ``lmfit loop`` (the baseline): per frame and window, lmfit's ``PseudoVoigtModel`` per listed
  peak + ``LinearModel``, started from the configured cells, on ``--loop-frames`` frames.

* ``phase model @ COMMIT`` (with ``--baseline COMMIT``): the same, with the ``xrdpipe`` package
  of that commit of this repository (``git archive``), in a child process, side by side: the two
  run alternately ``--repeat`` times (default 3), and the table gives their median rates, then
  the median of the paired ratios and their range (this machine's speed drifts by 10-20 % from
  one minute to the next: one pair can say 0.9x or 1.3x for the same change).
* ``phase model, bins averaged`` (with ``--instrument-sd SD``): the same with every line averaged
  over an instrument triangle of standard deviation SD (what 2D frames integrated by xrdpipe
  get, ``[fit] instrument``): its cost, an upper bound. The series' points are point samples,
  so a model of bins misfits them and more frames take the searches; its accuracy columns are
  left out.

* ``--series mcm-tie``: instead, a P2 -> P''2 charge (the MCM study, λ = 0.6884 Å) whose first
  lines are nearer P''2's typed cell than P2's (typed cells 1.25-1.33 % below in c): the
  whole-series naming check fits it a second time with the other name, beside the first on a
  second core where it can (``xrdpipe/phasefit/ahead.py``); with ``--two-d`` too.

* ``--two-d``: the same series rendered as 2D EIGER-like frames (pixel splitting, polarization,
  module gaps; a background of 300 counts) and integrated, then the phase model through the run
  file (``xrdpipe fit``: the run's zero estimate, forward and backward passes) and the cells and
  fractions; only the phase model (with ``--baseline``, side by side as above). Integrated bins
  are averages over their pixels, which the model's point profiles misfit (χ²/ν 4-30 in the
  strong windows): the frames that take the searches, and the speed, differ from the 1D series'.

Printed: frames per second (end to end, one process, after a warm-up on a dozen frames spread
over the series that loads or compiles the Numba kernels), the ratio to the lmfit loop, and the accuracy against the truth
(:func:`xrdpipe.testing.score_phases`).

    python benchmarks/phases.py                   # 200 frames
    python benchmarks/phases.py --frames 1000 --baseline e7aa8d1
    python benchmarks/phases.py --two-d --frames 200 --baseline 7cba979
    python benchmarks/phases.py --series mcm-tie --frames 400 --baseline 6fcbe52
    python benchmarks/phases.py --series mcm-tie --two-d --frames 200 --baseline 6fcbe52
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--loop-frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--series", choices=sorted(SERIES), default="nfm",
                    help="the hard O3 <-> P3 charge (default), or a P2 -> P''2 charge whose first lines the "
                         "naming check names again (mcm-tie)")
    ap.add_argument("--baseline", default=None, help="a commit of this repository whose phase model runs side by side")
    ap.add_argument("--repeat", type=int, default=3,
                    help="with --baseline: how many times each runs, alternately (medians and paired ratios)")
    ap.add_argument("--instrument-sd", type=float, default=None,
                    help="also time the phase model with lines averaged over this instrument sd (degrees)")
    ap.add_argument("--two-d", action="store_true",
                    help="the series as 2D frames, integrated, then fitted through the run file (phase model only)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # (the baseline's child process)
    args = ap.parse_args()
    if args.json:
        rate, score = (_phase_model_2d(args.frames, args.seed, args.series) if args.two_d
                       else _phase_model(args.frames, args.seed, kind=args.series))
        print(json.dumps({"rate": rate, "score": score}))
        return
    if args.two_d:
        compare_2d(args.frames, args.seed, args.baseline, max(args.repeat, 1), args.series)
        return

    compare(args.frames, args.loop_frames, args.seed, args.baseline, args.instrument_sd, max(args.repeat, 1),
            args.series)


def compare(frames: int, loop_frames: int, seed: int, baseline: str | None = None,
            instrument_sd: float | None = None, repeat: int = 3, kind: str = "nfm") -> None:
    """The table: the phase model (and that of ``baseline``, the two run alternately ``repeat``
    times, their median rates and paired ratios), independent peaks and the lmfit loop on the
    hard series of ``frames`` frames (the loop on ``loop_frames`` of them)."""
    from xrdpipe.config import FitSpec, LatticeSpec
    from xrdpipe.lattice import refine_lattice
    from xrdpipe.peaks import fit_peaks
    from xrdpipe.testing import fit_config, score_phases

    series, dif = _series(frames, seed, kind)
    phases, windows = fit_config(SERIES[kind][0], dif)
    pat = series.as_patterns()
    lam = series.scenario.wavelength_A
    rows = []
    ratio = ""
    if baseline:
        # side by side, alternately, ``repeat`` times: the speed of this machine drifts by 10-20 %
        # from one minute to the next (the same code measured 59-88 frames/s), so one pair of
        # runs can say 0.9x or 1.3x for the same change; the medians and the paired ratios say more
        ratio = _side_by_side(rows, baseline, repeat, lambda: _baseline(baseline, frames, seed, kind=kind),
                              lambda: _phase_model(frames, seed, kind=kind))
    else:
        rows.append(("phase model", *_phase_model(frames, seed, kind=kind)))
    if instrument_sd is not None:
        rows.append(("phase model, bins averaged", _phase_model(frames, seed, instrument_sd, kind)[0], {}))

    t0 = time.perf_counter()
    table = fit_peaks(pat, phases, windows, FitSpec(model="peaks"))
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=lam)
    dt = time.perf_counter() - t0
    rows.append(("independent peaks (batched)", frames / dt, score_phases(lat, table, series.states(),
                                                                               series.peaks)))

    loop_rate, loop_rms = _lmfit_loop(series, phases, windows, loop_frames)
    rows.append(("lmfit loop (baseline)", loop_rate, {"basal_rms_deg": loop_rms}))

    print(f"{frames} frames, {len(windows)} windows, phases {', '.join(p.name for p in phases)}")
    _print_table(rows, loop_rate, ratio)


def _side_by_side(rows: list, baseline: str, repeat: int, run_base, run_here) -> str:
    """Run ``run_base`` and ``run_here`` (each returning frames/s and a score) alternately
    ``repeat`` times; append the two rows (median rates, the first runs' scores) to ``rows``
    and return the line of the median paired ratio and its range."""
    base, here = [], []
    for _ in range(repeat):
        base.append(run_base())
        here.append(run_here())
    ratios = sorted(h[0] / b[0] for b, h in zip(base, here))
    rows.append((f"phase model @ {baseline}", float(np.median([b[0] for b in base])), base[0][1]))
    rows.append(("phase model", float(np.median([h[0] for h in here])), here[0][1]))
    return (f"phase model / phase model @ {baseline}: {np.median(ratios):.2f}x (median of {repeat} pairs run "
            f"alternately, {ratios[0]:.2f}-{ratios[-1]:.2f})")


def _print_table(rows, loop_rate: float | None, ratio: str) -> None:
    head = f"{'engine':30s} {'frames/s':>9s} " + (f"{'vs loop':>8s} " if loop_rate else "")
    print(head + f"{'presence':>9s} {'basal rms':>10s} {'|da| med':>9s} {'|dc| med':>9s} {'frac MAE':>9s} "
          f"{'in 1 esd':>8s}")
    for name, rate, s in rows:
        def f(key, fmt):
            v = s.get(key, np.nan)
            return format(v, fmt) if np.isfinite(v) else "-"
        print(f"{name:30s} {rate:9.2f} " + (f"{rate / loop_rate:8.2f} " if loop_rate else "")
              + f"{f('presence', '9.3f')} {f('basal_rms_deg', '10.2e')} {f('median_da', '9.1e')} "
              f"{f('median_dc', '9.1e')} {f('fraction_mae', '9.4f')} {f('within_1esd', '8.2f')}")
    if ratio:
        print(ratio)


def compare_2d(frames: int, seed: int, baseline: str | None = None, repeat: int = 3, kind: str = "nfm") -> None:
    """The table of ``--two-d``: the phase model on the series as 2D frames (and that of
    ``baseline``, the two run alternately ``repeat`` times)."""
    rows, ratio = [], ""
    if baseline:
        ratio = _side_by_side(rows, baseline, repeat, lambda: _baseline(baseline, frames, seed, two_d=True, kind=kind),
                              lambda: _phase_model_2d(frames, seed, kind))
    else:
        rows.append(("phase model", *_phase_model_2d(frames, seed, kind)))
    print(f"{frames} 2D frames (integrated), the phase model through the run file")
    _print_table(rows, None, ratio)


#: The series (``--series``): scenario, the typed cells' errors ((a, c) of each phase), the
#: coexisting basal lines' separation (FWHM), and the seed of the difficulty's draws (None: the
#: series' seed). ``mcm-tie``: the draw of tests/test_naming.py whose first frame, named by the
#: typed cells, is named wrong (the check fits the series again and takes that run).
SERIES = {"nfm": ("nfm", ((0.01, 0.02), (0.01, 0.02)), 1.1, None),
          "mcm-tie": ("mcm", ((0.0032, -0.0125), (0.0070, -0.0133)), 1.5, 57)}


def _difficulty(seed: int, kind: str = "nfm"):
    from xrdpipe.testing import Difficulty

    _, errors, separation, drawn = SERIES[kind]
    return Difficulty(start_error=errors, separation_fwhm=separation, broadening=1.6,
                      intensity_jitter=0.3, hard_windows=True, seed=seed if drawn is None else drawn)


def _series(frames: int, seed: int, kind: str = "nfm"):
    from xrdpipe.testing import pattern_series

    dif = _difficulty(seed, kind)
    return pattern_series(frames, scenario=SERIES[kind][0], counts=0.05, background=2000.0, seed=seed,
                          difficulty=dif), dif


def _phase_model_2d(frames: int, seed: int, kind: str = "nfm") -> tuple[float, dict]:
    """The series as 2D frames, integrated (not timed), then the phase model through the run
    file and the cells and fractions: frames/s, score. A warm-up on a 6-frame experiment first
    (not timed) loads or compiles the kernels."""
    from xrdpipe.config import load_experiment
    from xrdpipe.lattice import refine_lattice
    from xrdpipe.run.fit import fit_experiment
    from xrdpipe.run.integrate import integrate_experiment
    from xrdpipe.run.peakstore import read_peak_table
    from xrdpipe.testing import make_experiment, score_phases

    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for name, n in (("warm", 6), ("timed", frames)):
            syn = make_experiment(Path(tmp) / name, scenario=SERIES[kind][0], n_frames=n, n_rest=0, frac_charge=1.0,
                                  counts=0.05, background=300.0, seed=seed + 10, difficulty=_difficulty(seed, kind))
            exp = load_experiment(syn.experiment_file)
            integrate_experiment(exp, progress=False)
            runs.append((syn, exp))
        fit_experiment(runs[0][1], progress=False)
        syn, exp = runs[1]
        t0 = time.perf_counter()
        fit_experiment(exp, progress=False)
        table = read_peak_table(exp.run.run_file)
        lat = refine_lattice(table, exp.phases, exp.lattice, unit="2th_deg", wavelength_A=syn.scenario.wavelength_A)
        dt = time.perf_counter() - t0
        score = {k: float(v) for k, v in score_phases(lat, table, syn.states(), syn.peaks).items()}
    return frames / dt, score


def _phase_model(frames: int, seed: int, instrument_sd: float | None = None, kind: str = "nfm") -> tuple[float, dict]:
    """The phase model end to end (fit_phases, then the cells and fractions): frames/s, score.
    With ``instrument_sd``, every line averaged over that instrument sd."""
    from xrdpipe.config import FitSpec, LatticeSpec
    from xrdpipe.lattice import refine_lattice
    from xrdpipe.phasefit import fit_phases
    from xrdpipe.testing import fit_config, score_phases

    series, dif = _series(frames, seed, kind)
    phases, windows = fit_config(SERIES[kind][0], dif)
    pat = series.as_patterns()
    # warm-up on a dozen frames spread over the series (the searches, the two-phase region and
    # the backward pass among them), not timed: the compiled kernels loaded, or compiled where the
    # package is new (the baseline's, unpacked afresh, has no disk cache of its own)
    some = np.unique(np.linspace(0, frames - 1, 12).astype(int))
    first = dataclasses.replace(pat, intensity=pat.intensity[some], sigma=pat.sigma[some],
                                frames={k: np.asarray(v)[some] for k, v in pat.frames.items()})
    spec = FitSpec() if instrument_sd is None else FitSpec(instrument_sd=instrument_sd)
    fit_phases(first, phases, windows, spec)
    t0 = time.perf_counter()
    table = fit_phases(pat, phases, windows, spec)
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    dt = time.perf_counter() - t0
    score = {k: float(v) for k, v in score_phases(lat, table, series.states(), series.peaks).items()}
    return frames / dt, score


def _baseline(commit: str, frames: int, seed: int, two_d: bool = False, kind: str = "nfm") -> tuple[float, dict]:
    """:func:`_phase_model` (or :func:`_phase_model_2d`) with the ``xrdpipe`` package of
    ``commit``, in a child process."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "xrdpipe"], capture_output=True)
        if archive.returncode:
            sys.exit(f"--baseline {commit}: not a commit of {repo} with an xrdpipe package "
                     f"({archive.stderr.decode(errors='replace').strip()})")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        env = dict(os.environ, PYTHONPATH=tmp)
        run = subprocess.run([sys.executable, __file__, "--frames", str(frames), "--seed", str(seed), "--json"]
                             + (["--two-d"] if two_d else []) + (["--series", kind] if kind != "nfm" else []),
                             env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"--baseline {commit}: its phase model failed:\n{run.stderr.strip()[-2000:]}")
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return got["rate"], got["score"]


def _lmfit_loop(series, phases, windows, n: int) -> tuple[float, float]:
    """What a script does: every window of every frame fitted alone with lmfit, one
    pseudo-Voigt per listed peak started at the configured cell's position."""
    from lmfit.models import LinearModel, PseudoVoigtModel

    from xrdpipe.crystallography import parse_hkl, tth_from_d

    specs = {p.name: p for p in phases}
    lam = series.scenario.wavelength_A
    frames = np.linspace(0, len(series.x) - 1, min(n, len(series.x))).astype(int)
    err = []
    t0 = time.perf_counter()
    for i in frames:
        for w in windows:
            sel = (series.tth_deg >= w.range[0]) & (series.tth_deg <= w.range[1])
            x, y, s = series.tth_deg[sel], series.intensity[i, sel], series.sigma[i, sel]
            model = LinearModel(prefix="bg_")
            params = model.make_params(intercept=float(np.median(y)), slope=0.0)
            for j, label in enumerate(w.peaks):
                ph, hkl = label.split(" ", 1)
                c0 = float(tth_from_d(specs[ph].d_spacing(*parse_hkl(hkl)), lam))
                pv = PseudoVoigtModel(prefix=f"p{j}_")
                model = model + pv
                params.update(pv.make_params(center=dict(value=c0, min=w.range[0], max=w.range[1]),
                                             sigma=dict(value=0.04, min=0.005, max=0.5), amplitude=dict(value=50.0, min=0),
                                             fraction=dict(value=0.5, min=0, max=1)))
            try:
                res = model.fit(y, params, x=x, weights=1 / s, max_nfev=2000)
            except Exception:
                continue
            if w is windows[0]:
                for j, label in enumerate(w.peaks):
                    ph, hkl = label.split(" ", 1)
                    true = series.truth(ph, hkl)[i]
                    if np.isfinite(true):
                        err.append(res.params[f"p{j}_center"].value - true)
    dt = time.perf_counter() - t0
    return len(frames) / dt, float(np.sqrt(np.mean(np.square(err)))) if err else np.nan


if __name__ == "__main__":
    main()
