"""Whole-pattern refinement speed: seconds per frame of a sequential refinement.

Two cases on 3,000-point patterns (2θ 5-30°, λ = 0.6209 Å, the NFM study), N frames each,
the cells drifting frame by frame (O3 a shrinking, c growing; P3 the other way), patterns
calculated by pymatgen's XRDCalculator (independent structure factors), exact pseudo-Voigt
profiles and Poisson noise:

* two-phase Le Bail (O3 + P3 coexisting);
* one-phase Rietveld (O3: cell, oxygen z, scale, W, Y, zero, background).

Side by side, on the same frames:

* ``xrdpipe``: :class:`xrdpipe.refinement.Refiner`, analytic profile Jacobian, each frame
  started from the previous one;
* ``numerical Jacobian``: the baseline a script gets from a general least-squares code: the
  same model and algorithm with a forward-difference Jacobian (one pattern per parameter).

GSAS-II (not installed here; its sequential Rietveld took about 0.4 s per frame on this machine
for the issue's measurement) is quoted, not run. Printed: seconds per frame, the ratio to the
baseline, and the largest relative error of a and c against the truth over all frames.

A third case, **typical start values** (issue 20): an O3 -> P3 series with Al lines
(:func:`xrdpipe.testing.pattern_series`, 5,000 points 3-24°, beamline-like counts), sequential
Le Bail of O3 + P3 + Al started from cells 1 % (a) and 2 % (c) off (both signs), widths 5x too
narrow. Side by side: ``xrdpipe`` (staged, cell search, restarts, verdict) and the baseline
``direct`` (the same engine with everything refined at once from the start values, no search,
no restart: what xrdpipe did before). Printed: s/frame, frames ``ok``, the worst |Δa| and |Δc|
(Å) over frames where a phase holds >= 30 %, and the median Rwp.

    python benchmarks/refinement.py              # 30 frames per case
    python benchmarks/refinement.py --frames 100
    python benchmarks/refinement.py --typical-only --frames 80
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

WL = 0.6209
ASYM = True
TM = {"Ni": 1 / 3, "Fe": 1 / 3, "Mn": 1 / 3}
B = {"Na": 1.0, "Ni": 0.3, "Fe": 0.3, "Mn": 0.3, "O": 0.6}
X = np.linspace(5.0, 30.0, 3000)


def _sticks(kind: str, a: float, c: float):
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.core import Lattice, Structure

    if kind == "O3":
        st = Structure.from_spacegroup("R-3m", Lattice.hexagonal(a, c), [{"Na": 1.0}, TM, {"O": 1.0}],
                                       [[0, 0, 0], [0, 0, 0.5], [0, 0, 0.23257]])
    else:
        st = Structure.from_spacegroup("R3m", Lattice.hexagonal(a, c), [TM, {"O": 1.0}, {"O": 1.0}, {"Na": 0.6}],
                                       [[0, 0, 0], [0, 0, 1 / 3 + 0.057], [0, 0, 2 / 3 - 0.057], [0, 0, 1 / 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = XRDCalculator(wavelength=WL, debye_waller_factors=B).get_pattern(st, scaled=False, two_theta_range=(2, 40))
    return np.array(p.x), np.array(p.y)


def _profile(sticks, scale, fwhm, eta):
    t, inten = sticks
    u = X[:, None] - t[None, :]
    g = 2 / fwhm * np.sqrt(np.log(2) / np.pi) * np.exp(-4 * np.log(2) * u**2 / fwhm**2)
    lor = 2 / (np.pi * fwhm) / (1 + 4 * u**2 / fwhm**2)
    return ((eta * lor + (1 - eta) * g) * (scale * inten)).sum(axis=1)


def series(n: int, two_phase: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = []
    pats = []
    for i in range(n):
        f = i / max(n - 1, 1)
        a3, c3 = 2.9852 - 0.010 * f, 15.9967 + 0.060 * f
        ap, cp = 2.9300 + 0.005 * f, 16.7200 - 0.040 * f
        y = _profile(_sticks("O3", a3, c3), 0.6e-3 if two_phase else 1e-3, 0.03, 0.4) + 200.0
        if two_phase:
            y = y + _profile(_sticks("P3", ap, cp), 0.5e-3, 0.04, 0.3)
        obs = rng.poisson(y).astype(float)
        pats.append((obs, np.sqrt(np.maximum(obs, 1.0))))
        truth.append({"O3.a": a3, "O3.c": c3, "P3.a": ap, "P3.c": cp})
    return pats, truth


def models(two_phase: bool):
    from xrdpipe.refinement import PhaseModel, RefinementModel
    from xrdpipe.structure import template

    bb = {"Na": 1.0, "TM": 0.3, "O": 0.6}
    if two_phase:
        return RefinementModel([PhaseModel("O3", template("O3", a=2.98, c=16.02)),
                                PhaseModel("P3", template("P3", a=2.935, c=16.70))], wavelength_A=WL, method="lebail", asymmetry=ASYM)
    st = template("O3", a=2.98, c=16.02, z_o=0.236, composition=TM, b_iso=bb)
    return RefinementModel([PhaseModel("O3", st, refine=["z:O"])], wavelength_A=WL, polarization="unpolarised")


def _numerical(refiner):
    """Swap the analytic Jacobian for forward differences of whole patterns (the baseline)."""
    calc = refiner.calc
    analytic = calc.jacobian

    def jacobian(theta, lebail_I, cols, *, extract_from=None, cycles=0):
        y, _, I = analytic(theta, lebail_I, np.zeros(0, int), extract_from=extract_from, cycles=cycles)
        J = np.empty((y.size, cols.size))
        for c, j in enumerate(cols):
            h = max(abs(theta[j]) * 1e-6, 1e-8)
            t2 = theta.copy()
            t2[j] += h
            J[:, c] = (calc.pattern(t2, I) - y) / h
        return y, J, I

    calc.jacobian = jacobian
    return refiner


def run(label: str, two_phase: bool, n: int) -> None:
    from xrdpipe.refinement import Refiner

    pats, truth = series(n, two_phase)
    print(f"\n{label}: {n} frames of {X.size} points")
    print(f"{'engine':<22} {'s/frame':>8} {'vs baseline':>12} {'max |Δa/a|':>11} {'max |Δc/c|':>11} {'GOF':>6}")
    rows = {}
    for engine in ("numerical Jacobian", "xrdpipe"):
        refiner = Refiner(models(two_phase), X)
        if engine != "xrdpipe":
            _numerical(refiner)
        prev = refiner.refine(*pats[0])          # the first frame from the start values (not timed)
        t0 = time.perf_counter()
        errs_a, errs_c, gofs = [], [], []
        for (y, s), tr in zip(pats[1:], truth[1:]):
            prev = refiner.refine(y, s, start=prev)
            phases = ("O3", "P3") if two_phase else ("O3",)
            errs_a.append(max(abs(prev.value(f"{p}.a") / tr[f"{p}.a"] - 1) for p in phases))
            errs_c.append(max(abs(prev.value(f"{p}.c") / tr[f"{p}.c"] - 1) for p in phases))
            gofs.append(prev.gof)
        per = (time.perf_counter() - t0) / (n - 1)
        rows[engine] = per
        base = rows["numerical Jacobian"]
        print(f"{engine:<22} {per:>8.4f} {base / per:>11.1f}x {max(errs_a):>11.1e} {max(errs_c):>11.1e} "
              f"{np.median(gofs):>6.3f}")
    print(f"{'GSAS-II (quoted)':<22} {0.4:>8.4f}  (sequential Rietveld, measured for the issue; not run here)")


def typical(n: int, sign: float) -> None:
    from xrdpipe.refinement import PhaseModel, RefinementModel, Refiner
    from xrdpipe.structure import Structure, template
    from xrdpipe.testing import pattern_series, phase_state

    ps = pattern_series(n, seed=2, counts=0.05, background=2000.0)
    sc = ps.scenario
    o, p = sc.high.cell(1.0), sc.low.cell(sc.coexistence[0])
    prof = {"W": 0.0002, "Y": 0.01}
    print(f"\ntypical start, sign {sign:+g}: O3 + P3 + Al Le Bail, {n} frames of {ps.tth_deg.size} points, "
          f"cells {sign * 1:+g} % (a) and {sign * 2:+g} % (c) off")
    print(f"{'engine':<22} {'s/frame':>8} {'ok':>7} {'max |Δa| Å':>11} {'max |Δc| Å':>11} {'median Rwp %':>13}")
    for engine in ("direct (baseline)", "xrdpipe"):
        kw = {"strategy": "direct", "search": False} if engine.startswith("direct") else {}
        model = RefinementModel([
            PhaseModel("O3", template("O3", a=o[0] * (1 + sign * 0.01), c=o[1] * (1 + sign * 0.02)), profile=prof),
            PhaseModel("P3", template("P3", a=p[0] * (1 + sign * 0.01), c=p[1] * (1 + sign * 0.02)), profile=prof),
            PhaseModel("Al", Structure("Fm-3m", (4.0495,) * 3 + (90.0,) * 3, ()), profile=prof,
                       refine_profile=("W",))],
            wavelength_A=WL, method="lebail", background_terms=12, **kw)
        refiner = Refiner(model, ps.tth_deg)
        prev, da, dc, rwp, ok = None, [0.0], [0.0], [], 0
        t0 = time.perf_counter()
        for i in range(n):
            try:
                res = refiner.refine(ps.intensity[i], ps.sigma[i], start=prev, restart=not engine.startswith("direct"),
                                     gof_limit=None if prev is None else 3 * prev.gof)
            except Exception:                # noqa: BLE001 - a failed frame of the baseline
                continue
            rwp.append(res.rwp)
            ok += res.status == "ok"
            for ph, a, c, frac in phase_state(sc, float(ps.x[i])):
                if frac >= 0.3:
                    da.append(abs(res.value(f"{ph.name}.a") - a))
                    dc.append(abs(res.value(f"{ph.name}.c") - c))
            if res.status != "failed":
                prev = res
        per = (time.perf_counter() - t0) / n
        print(f"{engine:<22} {per:>8.3f} {ok:>3}/{n:<3} {max(da):>11.1e} {max(dc):>11.1e} "
              f"{100 * float(np.median(rwp)):>13.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--typical-only", action="store_true")
    args = ap.parse_args()
    if not args.typical_only:
        run("two-phase Le Bail (O3 + P3)", True, args.frames)
        run("one-phase Rietveld (O3)", False, args.frames)
    for sign in (1, -1):
        typical(args.frames, sign)


if __name__ == "__main__":
    main()
