"""Whole-pattern refinement speed: seconds per frame of a sequential refinement.

Two cases on 3,000-point patterns (2θ 5-30°, λ = 0.6209 Å, the NFM study), N frames each,
the cells drifting frame by frame (O3 a shrinking, c growing; P3 the other way), patterns
calculated by pymatgen's XRDCalculator (independent structure factors), exact pseudo-Voigt
profiles and Poisson noise:

* two-phase Le Bail (O3 + P3 coexisting);
* one-phase Rietveld (O3: cell, oxygen z, scale, W, Y, zero, background).

Side by side, on the same frames:

* ``xrdpipe``: :class:`xrdpipe.refine.Refiner`, analytic profile Jacobian, each frame
  started from the previous one;
* ``numerical Jacobian``: the baseline a script gets from a general least-squares code: the
  same model and algorithm with a forward-difference Jacobian (one pattern per parameter).

GSAS-II's sequential Rietveld (about 0.4 s per frame on this machine for the issue's
measurement) is quoted for these two cases, not run. Printed: seconds per frame, the ratio to
the baseline, and the largest relative error of a and c against the truth over all frames.

**Typical start values** (issue 20): an O3 -> P3 series with Al lines
(:func:`xrdpipe.testing.pattern_series`, 3-22.9°, beamline-like counts over a background of
2,000), sequential Le Bail of O3 + P3 + Al started from the experiment file's typed cells
(:func:`xrdpipe.testing.fit_config` with ``Difficulty(start_error=...)``: 1 % (a) and 2 % (c)
off, both signs; O3 at the start, P3 where it appears), widths 5x too narrow. Side by side on
the same patterns:

* ``direct (baseline)``: xrdpipe with everything refined at once from the start values, no
  search, no restart (what xrdpipe did before issue 20);
* ``xrdpipe Le Bail``: staged, cell search, restarts, verdict; ``xrdpipe Pawley`` too where this
  xrdpipe has ``method = "pawley"`` (detected);
* ``GSAS-II Le Bail`` (with ``--gsas2 PYTHON``, a Python where GSAS-II is installed; it is never
  a dependency of xrdpipe): the patterns exported by xrdpipe's own writers (one .fxye per frame,
  one .instprm), then a driver script run in a subprocess with that Python: per frame a
  GSASIIscriptable project (histogram from the .fxye + .instprm, phases from cell and space
  group, Le Bail; sample broadening off, histogram scale held), GSAS-II's auto background
  (needs pybaselines in GSAS-II's Python) fitted on the first frame, then the stages of a
  careful GSAS-II user, each a Le Bail extraction ("Le Bail fit", 10 cycles) and a refinement:
  background -> cells + zero -> U, V, W -> X, Y -> all (the last again until Rwp settles, at most
  4 more), each frame from the previous frame's values; once more from the first frame's true
  cells (``GSAS-II, true start``), to show GSAS-II started near the answer. The GSAS-II venv of
  the measurement in the README: GSAS-II's source (v5.7.9) built with meson-python, gfortran,
  numpy, scipy, pycifrw and pybaselines into ``python3 -m venv`` outside the repository.

Printed per engine: s/frame (GSAS-II: set-up, file I/O and refinement calls; the refinement calls
alone in brackets), frames ``ok`` (GSAS-II: converged), frames whose cells are on the truth
(|Δa| <= 5e-4 Å, |Δc| <= 2e-3 Å where a phase holds >= 30 %), the median and worst |Δa|, |Δc|
over those (phase, frame) pairs, the median Rwp, and the s/frame ratio xrdpipe / GSAS-II.

**Profiles**: one O3 pattern (pymatgen's intensities, 4-40°, 4,000 points) with
Thompson-Cox-Hastings peaks of known U, V, W, X, Y computed over the whole range (no tail
cut-off), Le Bail with U, V, W, X, Y, cell, zero and background refined together from widths 2x
off: Rwp of each engine against the generating model's, and the widths' relative errors.

    python benchmarks/refinement.py              # 30 frames per case, xrdpipe only
    python benchmarks/refinement.py --frames 100
    python benchmarks/refinement.py --typical-only --frames 20 --gsas2 /work/gsas2/venv/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np

WL = 0.6209
ASYM = True
TM = {"Ni": 1 / 3, "Fe": 1 / 3, "Mn": 1 / 3}
B = {"Na": 1.0, "Ni": 0.3, "Fe": 0.3, "Mn": 0.3, "O": 0.6}
X = np.linspace(5.0, 30.0, 3000)


def _sticks(kind: str, a: float, c: float, tth_range=(2, 40)):
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
        p = XRDCalculator(wavelength=WL, debye_waller_factors=B).get_pattern(st, scaled=False, two_theta_range=tth_range)
    return np.array(p.x), np.array(p.y)


def _profile(sticks, scale, fwhm, eta):
    t, inten = sticks
    u = X[:, None] - t[None, :]
    g = 2 / fwhm * np.sqrt(np.log(2) / np.pi) * np.exp(-4 * np.log(2) * u**2 / fwhm**2)
    lor = 2 / (np.pi * fwhm) / (1 + 4 * u**2 / fwhm**2)
    return ((eta * lor + (1 - eta) * g) * (scale * inten)).sum(axis=1)


def _tch_pattern(x, sticks, scale, w):
    """Thompson-Cox-Hastings pseudo-Voigt peaks (widths ``w``: U, V, W, X, Y as in xrdpipe,
    H_G² = U tan²θ + V tanθ + W, H_L = X tanθ + Y / cosθ), each over the whole range (no tail
    cut-off: neither program's own truncation is built into the data)."""
    t, inten = sticks
    th = np.radians(t / 2)
    hg = np.sqrt(w["U"] * np.tan(th) ** 2 + w["V"] * np.tan(th) + w["W"])
    hl = w["X"] * np.tan(th) + w["Y"] / np.cos(th)
    h = (hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3 + 0.07842 * hg * hl**4
         + hl**5) ** 0.2
    q = hl / h
    eta = 1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3
    u = (x[:, None] - t[None, :]) / h[None, :]
    g = 2 / h * np.sqrt(np.log(2) / np.pi) * np.exp(-4 * np.log(2) * u**2)
    lor = 2 / (np.pi * h) / (1 + 4 * u**2)
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
    from xrdpipe.refine import PhaseModel, RefinementModel
    from xrdpipe.refine.structures import template

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
    from xrdpipe.refine import Refiner

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


def _has_pawley() -> bool:
    """Whether this xrdpipe has ``method = "pawley"`` (issue 20's third method)."""
    from xrdpipe.refine import RefinementModel

    return "pawley" in str(RefinementModel.__annotations__.get("method", ""))


def _typical_series(n: int, sign: float):
    """The O3 -> P3 series with Al lines and the typed start cells 1 % (a) / 2 % (c) off (the
    experiment file's, :func:`xrdpipe.testing.fit_config`: O3 at the start, P3 where it appears)."""
    from dataclasses import replace

    from xrdpipe.testing import Difficulty, fit_config, pattern_series

    dif = Difficulty(start_error=((0.01 * sign, 0.02 * sign), (0.01 * sign, 0.02 * sign)))
    ps = pattern_series(n, seed=2, counts=0.05, background=2000.0, difficulty=dif)
    # up to 22.9°: GSAS-II lists only the reflections inside the refined range, and a strong
    # reflection just above 24° would leave its flank unmodelled there (xrdpipe's engines get
    # the same points)
    keep = ps.tth_deg <= 22.9
    ps = replace(ps, tth_deg=ps.tth_deg[keep], intensity=ps.intensity[:, keep], sigma=ps.sigma[:, keep])
    phases, _ = fit_config(ps.scenario, dif)
    return ps, {p.name: (p.a, p.c) for p in phases}


def _score(ps, frames) -> dict:
    """Cells vs the truth where a phase holds >= 30 %, per engine: ``frames`` is a list (one per
    frame) of None (failed) or dict with ``ok``, ``rwp`` (fraction) and ``cells`` {phase: (a, c)}."""
    from xrdpipe.testing import phase_state

    da, dc, rwp, ok, on_truth, good_frames = [], [], [], 0, 0, []
    for i, fr in enumerate(frames):
        if fr is None:
            good_frames.append(False)
            continue
        rwp.append(fr["rwp"])
        ok += bool(fr["ok"])
        good = True
        for ph, a, c, frac in phase_state(ps.scenario, float(ps.x[i])):
            if frac >= 0.3:
                ga, gc = fr["cells"].get(ph.name, (np.nan, np.nan))
                da.append(abs(ga - a) if np.isfinite(ga) else np.inf)
                dc.append(abs(gc - c) if np.isfinite(gc) else np.inf)
                good &= da[-1] <= 5e-4 and dc[-1] <= 2e-3
        on_truth += good
        good_frames.append(bool(good))
    return {"da": np.array(da), "dc": np.array(dc), "rwp": float(np.median(rwp)) if rwp else np.nan,
            "ok": ok, "on_truth": on_truth, "failed": sum(fr is None for fr in frames), "good": good_frames}


def _xrdpipe_engine(ps, start_cells, engine: str) -> tuple[list, float]:
    from xrdpipe.refine import PhaseModel, RefinementModel, Refiner
    from xrdpipe.refine.structures import Structure, template

    prof = {"W": 0.0002, "Y": 0.01}             # widths 5x too narrow
    direct = engine.startswith("direct")
    kw = {"strategy": "direct", "search": False} if direct else {}
    method = "pawley" if "Pawley" in engine else "lebail"
    (ao, co), (ap, cp) = start_cells["O3"], start_cells["P3"]
    model = RefinementModel([
        PhaseModel("O3", template("O3", a=ao, c=co), profile=prof),
        PhaseModel("P3", template("P3", a=ap, c=cp), profile=prof),
        PhaseModel("Al", Structure("Fm-3m", (4.0495,) * 3 + (90.0,) * 3, ()), profile=prof,
                   refine_profile=("W",))],
        wavelength_A=WL, method=method, background_terms=12, **kw)
    refiner = Refiner(model, ps.tth_deg)
    prev, out = None, []
    # the baseline diverges: its overflows are what it does, not news
    quiet = np.errstate(over="ignore", invalid="ignore", divide="ignore") if direct else contextlib.nullcontext()
    t0 = time.perf_counter()
    for i in range(len(ps.x)):
        try:
            with quiet:
                res = refiner.refine(ps.intensity[i], ps.sigma[i], start=prev, restart=not direct,
                                     gof_limit=None if prev is None else 3 * prev.gof)
        except Exception:                    # noqa: BLE001 - a failed frame (the baseline raises)
            out.append(None)
            continue
        cells = {ph: (res.value(f"{ph}.a"), res.value(f"{ph}.c") if ph != "Al" else np.nan)
                 for ph in ("O3", "P3", "Al") if ph not in res.absent}
        out.append({"ok": res.status == "ok", "rwp": res.rwp, "cells": cells})
        if res.status != "failed":
            prev = res
    return out, (time.perf_counter() - t0) / len(ps.x)


# the stages of a careful GSAS-II user (Le Bail: no scale, the extracted intensities carry it)
GSAS2_STAGES = [["background"], ["background", "cell", "zero"], ["background", "UVW"], ["background", "XY"],
                ["background", "cell", "zero", "UVW", "XY"]]


def _export(tth, intensity, sigma, wavelength_A: float, folder, profile: dict) -> tuple[list[str], str]:
    """xrdpipe's own exports of the series: one .fxye per frame and one .instprm (Polariz. 1.0:
    the synthetic patterns carry no polarization factor; the start widths in GSAS-II's units)."""
    from xrdpipe.export import write_fxye, write_instprm

    inst = write_instprm(folder / "series.instprm", wavelength_A=wavelength_A, polarization=1.0, profile=profile)
    files = [str(write_fxye(folder / f"frame{i:04d}.fxye", tth, y, e, title=f"benchmark frame {i}",
                            instprm=inst.name)) for i, (y, e) in enumerate(zip(intensity, sigma))]
    return files, str(inst)


def _gsas2_run(python: str, folder, frames: list[str], instprm: str, phases: list[dict], *,
               stages=GSAS2_STAGES, background_terms: int = 12, cycles: int = 10, lebail_cycles: int = 10,
               repeat_last: int = 4, shl=None) -> list[dict] | None:
    """GSAS-II's staged sequential Le Bail in a subprocess with its own Python (the driver,
    written next to the patterns): the driver's per-frame results, or None (and why, printed)."""
    import json
    import subprocess
    from pathlib import Path

    folder = Path(folder)
    (folder / "gsas2_driver.py").write_text(GSAS2_DRIVER)
    job = {"frames": frames, "instprm": instprm, "phases": phases, "background_terms": background_terms,
           "cycles": cycles, "lebail_cycles": lebail_cycles, "repeat_last": repeat_last, "stages": stages,
           "shl": shl, "workdir": str(folder)}
    (folder / "job.json").write_text(json.dumps(job))
    with open(folder / "gsas2.log", "w") as log:
        proc = subprocess.run([python, str(folder / "gsas2_driver.py"), str(folder / "job.json"),
                               str(folder / "result.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    if proc.returncode != 0 or not (folder / "result.json").exists():
        tail = (folder / "gsas2.log").read_text().strip().splitlines()[-3:]
        print(f"  GSAS-II driver failed (exit {proc.returncode}): " + " | ".join(tail))
        return None
    return json.loads((folder / "result.json").read_text())["frames"]


def _gsas2_engine(python: str, ps, start_cells, folder) -> tuple[list, float, float]:
    files, inst = _export(ps.tth_deg, ps.intensity, ps.sigma, ps.scenario.wavelength_A, folder,
                          {"W": 0.0002, "Y": 0.01})
    hexa = [90.0, 90.0, 120.0]
    phases = [{"name": "O3", "space_group": "R -3 m", "cell": [start_cells["O3"][0]] * 2 + [start_cells["O3"][1]] + hexa},
              {"name": "P3", "space_group": "R 3 m", "cell": [start_cells["P3"][0]] * 2 + [start_cells["P3"][1]] + hexa},
              {"name": "Al", "space_group": "F m -3 m", "cell": [4.0495] * 3 + [90.0] * 3}]
    res = _gsas2_run(python, folder, files, inst, phases)
    if res is None:
        return [None] * len(files), np.nan, np.nan
    out = []
    for r in res:
        if r["error"]:
            out.append(None)
            continue
        cells = {ph: (c[0], c[2] if ph != "Al" else np.nan) for ph, c in r["cells"].items()}
        out.append({"ok": r["converged"], "rwp": r["rwp"] / 100, "cells": cells})
    per = float(np.mean([r["seconds"] for r in res]))                  # every frame, failed ones too
    per_refine = float(np.mean([r["refine_seconds"] if not r["error"] else r["seconds"] for r in res]))
    return out, per, per_refine


def typical(n: int, sign: float, gsas2: str | None, *, true_start: bool = False) -> None:
    import tempfile
    from pathlib import Path

    from xrdpipe.testing import phase_state

    ps, start_cells = _typical_series(n, sign)
    print(f"\ntypical start, sign {sign:+g}: O3 + P3 + Al Le Bail, {n} frames of {ps.tth_deg.size} points, "
          f"typed cells {sign * 1:+g} % (a) and {sign * 2:+g} % (c) off; cells scored where a phase holds >= 30 %")
    print(f"{'engine':<20} {'s/frame':>8} {'ok/conv':>8} {'on truth':>9} {'med |Δa|':>9} {'max |Δa|':>9} "
          f"{'med |Δc|':>9} {'max |Δc|':>9} {'med Rwp %':>10}")
    engines = ["direct (baseline)", "xrdpipe Le Bail"] + (["xrdpipe Pawley"] if _has_pawley() else [])
    per = {}
    rows = []
    for engine in engines:
        frames, per[engine] = _xrdpipe_engine(ps, start_cells, engine)
        rows.append((engine, frames, per[engine], ""))
    if gsas2:
        # typed start cells; and (once) the first frame's true cells: GSAS-II started near the answer
        starts = [("GSAS-II Le Bail", start_cells)]
        if true_start:
            truth = {ph.name: (a, c) for ph, a, c, _ in phase_state(ps.scenario, float(ps.x[0]))}
            truth["P3"] = ps.scenario.low.cell(ps.scenario.coexistence[0])
            starts.append(("GSAS-II, true start", truth))
        for label, cells in starts:
            with tempfile.TemporaryDirectory(prefix="xrdpipe-gsas2-") as tmp:
                frames, sec, per_refine = _gsas2_engine(gsas2, ps, cells, Path(tmp))
            per[label] = sec
            rows.append((label, frames, sec,
                         f"  (refinement calls {per_refine:.2f} s/frame)" if np.isfinite(per_refine) else ""))
    for engine, frames, sec, note in rows:
        s = _score(ps, frames)
        cols = []
        for v, f in ((s["da"], np.median), (s["da"], np.max), (s["dc"], np.median), (s["dc"], np.max)):
            cols.append(f"{f(v):>9.1e}" if v.size else f"{'-':>9}")
        print(f"{engine:<20} {sec:>8.3f} {s['ok']:>3}/{n:<4} {s['on_truth']:>4}/{n:<4} {' '.join(cols)} "
              f"{100 * s['rwp']:>10.2f}{note}")
    glabels = [label for label in per if label.startswith("GSAS-II") and np.isfinite(per[label])]
    if glabels:
        for label in glabels:
            ratios = ", ".join(f"{e} {per[e] / per[label]:.2f}" for e in engines if not e.startswith("direct"))
            print(f"s/frame ratio xrdpipe / {label}: {ratios}")
        # Rwp frame by frame where both engines are on the truth
        ours = {engine: frames for engine, frames, _, _ in rows if engine.startswith("xrdpipe")}
        for label, gframes, _, _ in rows:
            if not label.startswith("GSAS-II"):
                continue
            g_good = _score(ps, gframes)["good"]
            for engine, frames in ours.items():
                both = [i for i, (a, b) in enumerate(zip(_score(ps, frames)["good"], g_good)) if a and b]
                if both:
                    r = np.array([frames[i]["rwp"] / gframes[i]["rwp"] for i in both])
                    print(f"Rwp ratio {engine} / {label}, frame by frame where both are on the truth "
                          f"({len(both)} frames): median {np.median(r):.2f}, {r.min():.2f}-{r.max():.2f}")


def profiles(gsas2: str | None) -> None:
    """One O3 pattern (4-40°, 4,000 points) calculated with known widths, no asymmetry; Le Bail
    with cell, zero, background and U, V, W, X, Y all refined, widths started 2x off (V 0.5x)."""
    import tempfile
    from pathlib import Path

    from xrdpipe.export import gsas2_profile
    from xrdpipe.refine import PhaseModel, RefinementModel, Refiner
    from xrdpipe.refine.structures import template

    x = np.linspace(4.0, 40.0, 4000)
    truth = {"U": 0.02, "V": -0.004, "W": 0.001, "X": 0.02, "Y": 0.01}
    y0 = _tch_pattern(x, _sticks("O3", 2.9852, 15.9967, tth_range=(2.0, 42.0)), 1e-2, truth) + 300.0
    rng = np.random.default_rng(9)
    y = rng.poisson(y0).astype(float)
    s = np.sqrt(np.maximum(y, 1.0))
    ref = float(np.sqrt(np.sum(((y - y0) / s) ** 2) / np.sum((y / s) ** 2)))
    start = {k: v * (2.0 if k != "V" else 0.5) for k, v in truth.items()}
    print(f"\nprofiles: one O3 pattern, {x.size} points, U, V, W, X, Y refined together from widths 2x off; "
          f"the generating model's Rwp {100 * ref:.2f} %")
    print(f"{'engine':<20} {'Rwp %':>7} {'/ gen.':>7} {'s':>7}   " + " ".join(f"{k + ' rel.err':>10}" for k in truth))
    rows = {}
    methods = ["lebail"] + (["pawley"] if _has_pawley() else [])
    for method in methods:
        st_off = template("O3", a=2.9852 * 1.002, c=15.9967 * 0.998)
        model = RefinementModel([PhaseModel("O3", st_off, profile=start, refine_profile=("U", "V", "W", "X", "Y"))],
                                wavelength_A=WL, method=method, asymmetry=False, background_terms=6)
        t0 = time.perf_counter()
        r = Refiner(model, x).refine(y, s)
        rows[f"xrdpipe {'Le Bail' if method == 'lebail' else 'Pawley'}"] = (
            r.rwp, time.perf_counter() - t0, {k: r.value(f"O3.{k}") for k in truth}, r.status)
    if gsas2:
        with tempfile.TemporaryDirectory(prefix="xrdpipe-gsas2-") as tmp:
            files, inst = _export(x, [y], [s], WL, Path(tmp), start)
            hexa = [90.0, 90.0, 120.0]
            res = _gsas2_run(gsas2, tmp, files, inst, [{"name": "O3", "space_group": "R -3 m",
                                                        "cell": [2.9852 * 1.002] * 2 + [15.9967 * 0.998] + hexa}],
                             background_terms=6, cycles=20, shl=0.0)
        if res and not res[0]["error"]:
            g = res[0]["profile"]
            k = gsas2_profile({"U": 1.0, "V": 1.0, "W": 1.0, "X": 1.0, "Y": 1.0})     # xrdpipe -> GSAS-II factors
            back = {"U": g["U"] / k["U"], "V": g["V"] / k["V"], "W": g["W"] / k["W"], "X": g["Y"] / k["Y"],
                    "Y": g["X"] / k["X"]}
            rows["GSAS-II Le Bail"] = (res[0]["rwp"] / 100, res[0]["seconds"], back,
                                       "converged" if res[0]["converged"] else "not converged")
        elif res:
            print(f"  GSAS-II: {res[0]['error']}")
    for engine, (rwp, sec, vals, status) in rows.items():
        errs = " ".join(f"{vals[k] / v - 1:>+10.3f}" for k, v in truth.items())
        print(f"{engine:<20} {100 * rwp:>7.2f} {rwp / ref:>7.3f} {sec:>7.2f}   {errs}  {status}")
    if "GSAS-II Le Bail" in rows:
        g = rows["GSAS-II Le Bail"][0]
        print("Rwp ratio xrdpipe / GSAS-II: " + ", ".join(f"{e} {v[0] / g:.3f}" for e, v in rows.items()
                                                         if e.startswith("xrdpipe")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--typical-only", action="store_true", help="only the typical-start and profile cases")
    ap.add_argument("--gsas2", metavar="PYTHON",
                    help="a Python with GSAS-II (GSASII.GSASIIscriptable) and pybaselines installed, e.g. "
                         "/work/gsas2/venv/bin/python; GSAS-II then runs side by side in a subprocess")
    args = ap.parse_args()
    gsas2 = args.gsas2
    if gsas2 and not _gsas2_ok(gsas2):
        gsas2 = None
    elif not gsas2:
        print("GSAS-II: not given (--gsas2 PYTHON); running xrdpipe only")
    print(f"xrdpipe: methods lebail{', pawley' if _has_pawley() else ' (no pawley in this version)'}")
    if not args.typical_only:
        run("two-phase Le Bail (O3 + P3)", True, args.frames)
        run("one-phase Rietveld (O3)", False, args.frames)
    for sign in (1, -1):
        typical(args.frames, sign, gsas2, true_start=sign > 0)
    profiles(gsas2)


def _gsas2_ok(python: str) -> bool:
    """Whether ``python`` runs and imports GSAS-II's scripting module (else say why)."""
    import subprocess

    try:
        proc = subprocess.run([python, "-c", "from GSASII import GSASIIscriptable"], capture_output=True,
                              text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"GSAS-II: {python} cannot be run ({exc}); running xrdpipe only")
        return False
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"GSAS-II: {python} cannot import GSASII.GSASIIscriptable ({last}); running xrdpipe only")
        return False
    return True


#: The GSAS-II side, written next to the exported patterns and run with GSAS-II's own Python
#: (xrdpipe never imports GSAS-II).
GSAS2_DRIVER = r'''"""GSAS-II side of xrdpipe's ``benchmarks/refinement.py``, written there and run with GSAS-II's
own Python (xrdpipe never imports GSAS-II): sequential Le Bail of exported .fxye + .instprm
patterns through GSASIIscriptable, staged as a careful GSAS-II user does, each frame started
from the previous frame's result (a failed frame is recorded and skipped).

    python gsas2_driver.py job.json result.json

job.json: ``frames`` (.fxye paths), ``instprm``, ``phases`` (name, space_group, cell of six
numbers), ``background_terms`` (Chebyshev), ``cycles`` (least-squares cycles per refinement),
``lebail_cycles`` (Le Bail extraction cycles before each refinement), ``stages`` (lists of
``background``, ``cell``, ``zero``, ``UVW``, ``XY``, ``SH/L``), ``repeat_last`` (the last stage
again, at most this often, until Rwp changes by less than 0.5 %), ``shl`` (SH/L or null),
``workdir``. result.json: per frame ``seconds`` (project set-up and every stage),
``refine_seconds`` (Le Bail extractions and refinements), ``rwp`` (%), ``gof``, ``converged``
(GSAS-II's flag of the last refinement), ``cells`` {name: [a, b, c, alpha, beta, gamma]},
``profile`` {Zero, U, V, W, X, Y, SH/L}, ``background``, ``error``.
"""

import json
import math
import os
import sys
import time

from GSASII import GSASIIscriptable as G2sc
from GSASII import GSASIIstrMain as G2strMain

G2sc.SetPrintLevel("none")


def frame(job, i, path, start):
    """One frame: a new project (histogram + phases from cell and space group, Le Bail), start
    values from ``start`` (the previous frame's result), then the stages."""
    gpx = G2sc.G2Project(newgpx=os.path.join(job["workdir"], f"frame{i:04d}.gpx"))
    h = gpx.add_powder_histogram(path, job["instprm"], fmthint="GSAS powder")
    phases = []
    for ph in job["phases"]:
        cell = start["cells"].get(ph["name"], ph["cell"]) if start else ph["cell"]
        p = gpx.add_phase(phasename=ph["name"], spacegroup=ph["space_group"], cell=list(cell), histograms=[h])
        p.set_refinements({"LeBail": True})
        # the instrument profile carries every width: no sample broadening
        p.setSampleProfile(h.name, "size", "isotropic", 1000.0)
        p.setSampleProfile(h.name, "microstrain", "isotropic", 0.0)
        phases.append(p)
    h.data["Sample Parameters"]["Scale"][1] = False       # Le Bail: the extracted intensities carry the scale
    inst = h.data["Instrument Parameters"][0]
    if job.get("shl") is not None:
        inst["SH/L"][1] = float(job["shl"])
    bkg = h.data["Background"][0]
    h.set_refinements({"Background": {"type": "chebyschev-1", "no. coeffs": int(job["background_terms"]),
                                      "refine": False}})
    if start:
        for k, v in start["profile"].items():
            inst[k][1] = v
        bkg[3:3 + len(start["background"])] = start["background"]
    else:
        # GSAS-II's auto background (pybaselines' arpls) as fixed points, and the background
        # function fitted to them: the start a GSAS-II user makes before any Le Bail extraction
        h.calc_autobkg()
        h.set_refinements({"Background": {"fit fixed points": True}})
    gpx.set_Controls("cycles", int(job["cycles"]))
    gpx.data["Controls"]["data"]["newLeBail"] = True       # new reflection lists, intensities from unity
    t_refine = 0.0
    stages = list(job["stages"]) + [job["stages"][-1]] * int(job.get("repeat_last", 0))
    last = math.inf
    for n, stage in enumerate(stages):
        h, phases = gpx.histogram(0), gpx.phases()         # (a refinement reloads the project)
        inst = h.data["Instrument Parameters"][0]
        h.set_refinements({"Background": {"refine": "background" in stage}})
        for k in ("Zero", "U", "V", "W", "X", "Y", "SH/L"):
            inst[k][2] = False
        for group, keys in (("zero", ["Zero"]), ("UVW", ["U", "V", "W"]), ("XY", ["X", "Y"]), ("SH/L", ["SH/L"])):
            if group in stage:
                h.set_refinements({"Instrument Parameters": keys})
        for p in phases:
            if "cell" in stage:
                p.set_refinements({"Cell": True})
            else:
                p.clear_refinements({"Cell": True})
        t0 = time.perf_counter()
        # Le Bail intensities extracted at the stage's start values (GSAS-II's "Le Bail fit"; a
        # refinement re-extracts them only once, after its last cycle), then least squares
        gpx.index_ids()                    # saves the project, which DoLeBail reads
        ok, msg = G2strMain.DoLeBail(gpx.filename, cycles=int(job["lebail_cycles"]))
        if not ok:
            raise RuntimeError(f"Le Bail extraction: {msg}")
        gpx.reload()
        gpx.refine()
        t_refine += time.perf_counter() - t0
        rv = gpx.data["Covariance"]["data"].get("Rvals", {})
        rwp = float(rv.get("Rwp", math.nan))
        print(f"  frame {i} stage {'+'.join(stage)}: Rwp {rwp:.2f} %, converged {rv.get('converged')}",
              file=sys.stderr, flush=True)
        # the last stage again ("refine" pressed again) until Rwp settles
        if n >= len(job["stages"]) - 1 and rv.get("converged") and abs(last - rwp) <= 0.005 * rwp:
            break
        if n >= len(job["stages"]) - 1:
            last = rwp
    rvals = gpx.data["Covariance"]["data"].get("Rvals", {})
    h = gpx.histogram(0)
    inst = h.data["Instrument Parameters"][0]
    out = {"rwp": float(rvals.get("Rwp", math.nan)), "gof": float(rvals.get("GOF", math.nan)),
           "converged": bool(rvals.get("converged", False)),
           "cells": {p.name: cell_of(p) for p in gpx.phases()},
           "profile": {k: float(inst[k][1]) for k in ("Zero", "U", "V", "W", "X", "Y", "SH/L")},
           "background": [float(v) for v in h.data["Background"][0][3:]],
           "refine_seconds": t_refine}
    return out


def cell_of(p):
    c = p.get_cell()
    return [c["length_a"], c["length_b"], c["length_c"], c["angle_alpha"], c["angle_beta"], c["angle_gamma"]]


def main():
    job = json.load(open(sys.argv[1]))
    results, prev = [], None
    for i, path in enumerate(job["frames"]):
        t0 = time.perf_counter()
        try:
            res = frame(job, i, path, prev)
            res["error"] = ""
            if not all(math.isfinite(v) for c in res["cells"].values() for v in c) or not math.isfinite(res["rwp"]):
                raise ValueError("non-finite result")
            prev = res                 # the next frame starts here (a failed frame is skipped)
        except Exception as exc:       # one bad frame is recorded, the run goes on
            res = {"error": f"{type(exc).__name__}: {exc}", "rwp": math.nan, "converged": False, "cells": {},
                   "refine_seconds": math.nan}
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(f"frame {i}: Rwp {res['rwp']:.2f} % {res['error']}", file=sys.stderr, flush=True)
    json.dump({"frames": results}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
'''


if __name__ == "__main__":
    main()
