"""Sequential whole-pattern refinement speed: this engine against a named baseline commit's,
side by side in one process on the same frames.

The case of issue 20: an O3 -> P3 series with Al lines (:func:`xrdpipe.testing.pattern_series`,
5,000 points 3-24°, beamline-like counts), sequential refinement of O3 + P3 + Al started from
cells 1 % (a) and 2 % (c) off (both signs), widths 5x too narrow; each frame from the last good
one, with the restarts (cell search) the engine decides on. The baseline is the
engine (``xrdpipe/refine/``, or ``xrdpipe/refinement.py`` before that package) of ``--baseline``
(default: 07417fe, before this work), loaded from ``git show`` into this process (same kernels,
same numpy, same load), and the two
engines alternate run by run so that a change of machine load hits both (SciPy's sparse and
optimize modules are imported, and each engine refines two other frames, before any timing:
the one-off cost of loading Numba's compiled kernels, about 2 s, is not counted). Printed per engine and method: wall-clock and
CPU (process) seconds per frame, each the least of ``--repeat`` runs (the machine's other load
only adds), frames ``ok``, frames converged, the worst |Δa| and |Δc| (Å) over frames where a phase
holds >= 30 %, the median Rwp, the ratio baseline / this engine (CPU), and apart: the cell
searches (how many, their CPU seconds in all: a fixed cost of the first frame and of restarts)
and the CPU seconds per frame of everything else.

    python benchmarks/refinement_speed.py                       # Le Bail, 40 frames
    python benchmarks/refinement_speed.py --frames 80 --repeat 3 --method lebail --method pawley
    python benchmarks/refinement_speed.py --profile              # cProfile of this engine's Le Bail run
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WL = 0.6209


def baseline_module(commit: str):
    """The refinement engine of ``commit``, loaded into this process beside this checkout's: its
    ``xrdpipe/refine/`` package as ``xrdpipe._baseline_refine``, or, for a commit before that
    package, its ``xrdpipe/refinement.py`` as ``xrdpipe._baseline_refinement`` (its
    ``from .structure import`` read as ``from .refine.structures import``). Either runs on this
    checkout's kernels (and, for the single module, structures)."""
    import xrdpipe

    tmp = Path(tempfile.mkdtemp())
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", commit, "xrdpipe/refine/"],
                            check=True, capture_output=True, text=True).stdout.split()
    if listed:
        for path in listed:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True,
                                 capture_output=True, text=True).stdout
            (tmp / Path(path).name).write_text(src)
        spec = importlib.util.spec_from_file_location("xrdpipe._baseline_refine", tmp / "__init__.py",
                                                      submodule_search_locations=[str(tmp)])
    else:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:xrdpipe/refinement.py"], check=True,
                             capture_output=True, text=True).stdout
        src = re.sub(r"\b_expand\b", "expand_sites",
                     src.replace("from .structure import", "from .refine.structures import"))
        (tmp / "_baseline_refinement.py").write_text(src)
        spec = importlib.util.spec_from_file_location("xrdpipe._baseline_refinement", tmp / "_baseline_refinement.py",
                                                      submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert Path(xrdpipe.__file__).resolve().parent == ROOT / "xrdpipe", "run from this checkout's environment"
    return mod


def run(engine, ps, sign: float, method: str) -> dict:
    from xrdpipe.refine.structures import Structure, template
    from xrdpipe.testing import phase_state

    sc = ps.scenario
    o, p = sc.high.cell(1.0), sc.low.cell(sc.coexistence[0])
    prof = {"W": 0.0002, "Y": 0.01}
    model = engine.RefinementModel([
        engine.PhaseModel("O3", template("O3", a=o[0] * (1 + sign * 0.01), c=o[1] * (1 + sign * 0.02)), profile=prof),
        engine.PhaseModel("P3", template("P3", a=p[0] * (1 + sign * 0.01), c=p[1] * (1 + sign * 0.02)), profile=prof),
        engine.PhaseModel("Al", Structure("Fm-3m", (4.0495,) * 3 + (90.0,) * 3, ()), profile=prof,
                          refine_profile=("W",))],
        wavelength_A=WL, method=method, background_terms=12)
    refiner = engine.Refiner(model, ps.tth_deg)
    n = len(ps.x)
    # where Refiner looks the cell search up: this checkout's solver module, or the baseline's one module
    home, name = (engine.solver, "search_cells") if hasattr(engine, "solver") else (engine, "_search")
    search, searched = getattr(home, name), [0, 0.0]

    def timed_search(*a, **k):                # the cell searches: counted and timed apart
        c = time.process_time()
        try:
            return search(*a, **k)
        finally:
            searched[0] += 1
            searched[1] += time.process_time() - c

    setattr(home, name, timed_search)
    prev, da, dc, rwp, ok, conv = None, [0.0], [0.0], [], 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        res = refiner.refine(ps.intensity[i], ps.sigma[i], start=prev,
                             gof_limit=None if prev is None else 3 * prev.gof)
        rwp.append(res.rwp)
        ok += res.status == "ok"
        conv += bool(res.converged)
        for ph, a, c, frac in phase_state(sc, float(ps.x[i])):
            if frac >= 0.3:
                da.append(abs(res.value(f"{ph.name}.a") - a))
                dc.append(abs(res.value(f"{ph.name}.c") - c))
        if res.status != "failed":
            prev = res
    cpu = time.process_time() - c0
    setattr(home, name, search)
    return {"s": (time.perf_counter() - t0) / n, "cpu": cpu / n, "ok": ok, "conv": conv, "da": max(da), "dc": max(dc),
            "rwp": float(np.median(rwp)), "n_search": searched[0], "search": searched[1],
            "rest": (cpu - searched[1]) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--baseline", default="07417fe")
    ap.add_argument("--method", action="append", choices=["lebail", "pawley"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import scipy.optimize  # noqa: F401 - imported before any timing
    import scipy.sparse  # noqa: F401
    from threadpoolctl import threadpool_limits

    import xrdpipe.refine as current
    from xrdpipe.testing import pattern_series

    ps = pattern_series(args.frames, seed=2, counts=0.05, background=2000.0)
    if args.profile:
        import cProfile
        import pstats

        with threadpool_limits(limits=1, user_api="blas"):
            cProfile.runctx("run(current, ps, 1.0, 'lebail')", globals(), {"run": run, "current": current, "ps": ps},
                            "/tmp/refinement_speed.prof")
        pstats.Stats("/tmp/refinement_speed.prof").sort_stats("tottime").print_stats(30)
        return
    warm = pattern_series(2, seed=3, counts=0.05, background=2000.0)
    old = baseline_module(args.baseline)
    print(f"{args.frames} frames of {ps.tth_deg.size} points, O3 + P3 + Al from cells 1 % (a) / 2 % (c) off; "
          f"baseline {args.baseline}")
    print(f"{'method':<7} {'sign':>4} {'engine':<10} {'s/frame':>8} {'CPU s':>7} {'ok':>7} {'conv':>7} "
          f"{'max |Δa| Å':>11} {'max |Δc| Å':>11} {'Rwp %':>6} {'ratio':>6} {'searches':>8} {'CPU s':>6} "
          f"{'other CPU s/frame':>17}")
    for eng in (old, current):       # imports and Numba's compiled kernels (from its disk cache) loaded
        run(eng, warm, 1.0, "lebail")                    # before any timing
    for method in args.method or ["lebail"]:
        for sign in (1, -1):
            with_base = method == "lebail" or hasattr(old, "_lm_pawley")      # the baseline has Pawley
            engines = [("baseline", old), ("this", current)] if with_base else [("this", current)]
            runs: dict[str, list[dict]] = {label: [] for label, _ in engines}
            for _ in range(args.repeat):                 # alternating: the load hits both
                for label, eng in engines:
                    runs[label].append(run(eng, ps, sign, method))
            got = {label: min(rs, key=lambda d: d["cpu"]) for label, rs in runs.items()}
            for label, r in got.items():
                ratio = f"{got['baseline']['cpu'] / r['cpu']:.2f}x" if "baseline" in got and label == "this" else ""
                wall = min(d["s"] for d in runs[label])
                print(f"{method:<7} {sign:>+4g} {label:<10} {wall:>8.3f} {r['cpu']:>7.3f} {r['ok']:>3}/{args.frames:<3} "
                      f"{r['conv']:>3}/{args.frames:<3} {r['da']:>11.1e} {r['dc']:>11.1e} {100 * r['rwp']:>6.2f} "
                      f"{ratio:>6} {r['n_search']:>8} {r['search']:>6.2f} {r['rest']:>17.3f}", flush=True)


if __name__ == "__main__":
    main()
