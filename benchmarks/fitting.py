"""Peak-fitting speed and precision: xrdpipe's batched engine against a plain lmfit loop.

A synthetic O3 -> P3 charge (the NFM study, λ = 0.6209 Å, exact pseudo-Voigt peaks, Poisson
noise, beamline-like counts) of N frames is fitted in three windows, one of them with two
components (O3 003 + P3 003, which coexist near Na0.66), side by side in the same run:

* ``xrdpipe``: ``fit_peaks`` with the default batched engine (presence tests included);
* ``lmfit loop``: the baseline, what a script does: per frame and window, lmfit's
  ``PseudoVoigtModel`` (one per component) + ``LinearModel``, started afresh from the phase
  cells (and, as ``carried``, started from the previous frame's result);
* ``xrdpipe lmfit``: xrdpipe's reference engine on the first frames (same model, frame by frame);
* ``xrdfit``: if installed (GPL, optional, never a dependency of xrdpipe).

Then the phase model in frames per second (:func:`benchmarks.phases.compare`, ``--phase-frames``
frames of the hard O3 <-> P3 series: typed cells off, overlapping basal lines, Al in a window;
five windows, O3 + P3 + Al) side by side with the independent-peak engine and the lmfit loop on
the same series (``--phase-frames 0`` leaves it out).

Printed: window fits per second, the ratio to the lmfit loop, and the centre rms error against
the truth over the components that hold at least 5 % of their window's area.

    python benchmarks/fitting.py                  # 1000 frames
    python benchmarks/fitting.py --frames 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

WINDOWS = (("003", (6.1, 7.0), ("O3 003", "P3 003")),
           ("O3 006", (13.0, 13.6), ("O3 006",)),
           ("P3 006", (12.45, 12.98), ("P3 006",)))


def truth_table(series):
    labels = [lab for _, _, labs in WINDOWS for lab in labs]
    centres = {lab: series.truth(*lab.split()) for lab in labels}
    areas = {lab: series.truth(*lab.split(), key="area") for lab in labels}
    judged = {}
    for _, _, labs in WINDOWS:
        total = sum(areas[lab] for lab in labs)
        for lab in labs:
            judged[lab] = areas[lab] >= 0.05 * np.maximum(total, 1e-300)
    return centres, judged


def rms(found: dict, centres, judged) -> tuple[float, int]:
    """Centre rms over the judged components (a component not found counts as missed)."""
    err, missed = [], 0
    for lab, c in found.items():
        sel = judged[lab]
        d = (c - centres[lab])[sel]
        missed += int(np.isnan(d).sum())
        err.extend(d[np.isfinite(d)])
    return float(np.sqrt(np.mean(np.square(err)))), missed


def run_xrdpipe(series, engine: str):
    from xrdpipe.config import FitSpec, PhaseSpec, WindowSpec
    from xrdpipe.peaks import fit_peaks

    phases = [PhaseSpec(name="O3", space_group="R-3m", a=2.985, c=16.0),
              PhaseSpec(name="P3", space_group="R3m", a=2.93, c=16.7)]
    windows = [WindowSpec(name=n, range=r, peaks=list(p)) for n, r, p in WINDOWS]
    pat = series.as_patterns()
    t0 = time.perf_counter()
    table = fit_peaks(pat, phases, windows, FitSpec(engine=engine))
    dt = time.perf_counter() - t0
    found = {}
    for _, _, labs in WINDOWS:
        for lab in labs:
            c = table.column("center", lab).copy()
            found[lab] = c
    return dt, len(table) * len(WINDOWS), found


def run_lmfit_loop(series, rows: np.ndarray, judged, *, carry: bool):
    """The baseline on the frames ``rows``; returns the time, the number of fits, the centres and
    the time and number of the fits where every component of the window is really there."""
    from lmfit.models import LinearModel, PseudoVoigtModel

    from xrdpipe.crystallography import d_hexagonal, tth_from_d

    cells = {"O3": (2.985, 16.0), "P3": (2.93, 16.7)}
    x = series.tth_deg
    n = series.intensity.shape[0]
    found = {lab: np.full(n, np.nan) for _, _, labs in WINDOWS for lab in labs}
    t_all, t_full, n_full = 0.0, 0.0, 0
    for name, (lo, hi), labs in WINDOWS:
        sel = (x >= lo) & (x <= hi)
        xs = x[sel]
        model = LinearModel(prefix="bg_")
        for j, _ in enumerate(labs):
            model = model + PseudoVoigtModel(prefix=f"p{j}_")
        params = None
        for i in rows:
            y = series.intensity[i, sel]
            w = 1 / series.sigma[i, sel]
            t0 = time.perf_counter()
            if params is None or not carry:
                params = model.make_params(bg_slope=0.0, bg_intercept=float(np.median(y)))
                for j, lab in enumerate(labs):
                    phase, hkl = lab.split()
                    c0 = float(tth_from_d(d_hexagonal(*map(int, hkl), *cells[phase]), series.scenario.wavelength_A))
                    params[f"p{j}_center"].set(value=c0, min=lo, max=hi)
                    params[f"p{j}_sigma"].set(value=0.035, min=0.001, max=0.5)
                    params[f"p{j}_amplitude"].set(value=float(y.max() - np.median(y)) * 0.08, min=0)
            try:
                res = model.fit(y, params, x=xs, weights=w)
                params = res.params  # with carry, the next frame starts here
                for j, lab in enumerate(labs):
                    found[lab][i] = res.params[f"p{j}_center"].value
            except ValueError:
                pass
            dt = time.perf_counter() - t0
            t_all += dt
            if all(judged[lab][i] for lab in labs):
                t_full += dt
                n_full += 1
    return t_all, len(rows) * len(WINDOWS), found, t_full, n_full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--reference-frames", type=int, default=100,
                    help="frames (every k-th) for the slow engines: the lmfit loop and xrdpipe's lmfit engine")
    ap.add_argument("--phase-frames", type=int, default=1000, help="frames of the phase-model comparison (0: none)")
    args = ap.parse_args()
    from xrdpipe.testing import pattern_series

    t0 = time.perf_counter()
    series = pattern_series(args.frames, counts=0.05, background=3000.0, seed=1)
    print(f"{args.frames} synthetic frames (O3 -> P3, 5000 points) in {time.perf_counter() - t0:.1f} s; "
          f"windows: {', '.join(n for n, _, _ in WINDOWS)}")
    centres, judged = truth_table(series)
    nref = min(args.reference_frames, args.frames)

    rows = np.unique(np.linspace(0, args.frames - 1, nref).astype(int))  # the slow ones: every k-th frame
    on_rows = {k: v & np.isin(np.arange(args.frames), rows) for k, v in judged.items()}
    results = []
    run_xrdpipe(_subset(series, np.arange(min(20, args.frames))), "batched")  # warm-up: imports, first calls
    dt, n, found = run_xrdpipe(series, "batched")
    results.append(("xrdpipe (batched)", dt, n, *rms(found, centres, judged), *rms(found, centres, on_rows)))
    dt, n, found, t_full, n_full = run_lmfit_loop(series, rows, judged, carry=False)
    results.append(("lmfit loop (baseline)", dt, n, np.nan, 0, *rms(found, centres, on_rows)))
    base, base_full = n / dt, n_full / t_full
    dt, n, found, _, _ = run_lmfit_loop(series, rows, judged, carry=True)
    results.append(("lmfit loop, carried", dt, n, np.nan, 0, *rms(found, centres, on_rows)))
    sub = _subset(series, rows)
    dt, n, found = run_xrdpipe(sub, "lmfit")
    full = {k: np.full(args.frames, np.nan) for k in found}
    for k in found:
        full[k][rows] = found[k]
    results.append(("xrdpipe (lmfit engine)", dt, n, np.nan, 0, *rms(full, centres, on_rows)))
    print(f"{'engine':24s} {'fits':>6s} {'fits/s':>8s} {'vs lmfit':>9s}   centre rms in degrees (missed): "
          f"all frames / the {len(rows)} reference frames")
    for name, dt, n, r_all, m_all, r_ref, m_ref in results:
        all_txt = f"{r_all:.2e} ({m_all})" if np.isfinite(r_all) else "-"
        print(f"{name:24s} {n:6d} {n / dt:8.0f} {n / dt / base:8.1f}x   {all_txt:>16s} / {r_ref:.2e} ({m_ref})")
    print(f"lmfit loop where every component is present: {base_full:.0f} fits/s "
          f"(xrdpipe batched is {results[0][2] / results[0][1] / base_full:.0f}x that); where one is absent the loop "
          "chases noise until lmfit's evaluation limit")
    print("xrdfit: " + ("installed, but not measured (it needs its own file-based workflow)" if _has_xrdfit()
                        else "not installed (optional, GPL)"))
    if args.phase_frames:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from phases import compare

        print("\nThe phase model, frames per second on the hard series of benchmarks/phases.py:")
        compare(args.phase_frames, 40, 1)


def _subset(series, rows):
    from xrdpipe.testing import PatternSeries

    return PatternSeries(series.tth_deg, series.intensity[rows], series.sigma[rows], series.x[rows],
                         [series.peaks[i] for i in rows], series.scenario)


def _has_xrdfit() -> bool:
    try:
        import xrdfit  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
