"""Beamline scale: throughput against workers, watch latency, peak memory against frames.

1. **Throughput** of ``integrate_experiment`` on 2D frames (an EIGER-like bitshuffle-LZ4 stack,
   written as in ``benchmarks/integration.py``) on each scheduler with 1 and 2 workers, side by
   side in one run. Baseline: ``serial`` with 1 worker. Frames/s are counted after the set-up
   (pyFAI's sparse matrix, built once), and include starting the pool.
2. **Watch latency**: a "detector" thread writes CBF frames into a folder every ``--period``
   seconds while ``watch_experiment`` runs (poll 0.5 s, settle 0.5 s); latency is from a frame's
   file written to the contour figure rewritten with that frame integrated and fitted.
3. **Peak memory** of a whole ``xrdpipe run`` (integrate, echem, fit, lattice, figures, exports)
   in a fresh process, for 200 and 2,000 frames of the same detector: the peak resident set of
   the largest process (the ratio shows whether memory grows with the number of frames).

    python benchmarks/scale.py                       # all three, default sizes
    python benchmarks/scale.py --parts throughput --frames 40 --size 1024
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def throughput(base: Path, shape, n_frames: int) -> None:
    from integration import write_stack

    import xrdpipe
    from xrdpipe.run.integrate import integrate_experiment

    folder = base / "throughput"
    folder.mkdir()
    write_stack(folder, shape, n_frames)
    exp = xrdpipe.load_experiment(folder / "experiment.toml")
    print(f"\n1. throughput: {n_frames} frames of {shape[0]} x {shape[1]}, integrate (read, integrate, store)")
    print(f"{'scheduler':>10} {'workers':>7} {'frames/s':>9} {'vs serial x1':>13}  identical to serial")
    ref = None
    rows = [("serial", 1), ("threads", 1), ("threads", 2), ("processes", 1), ("processes", 2)]
    for scheduler, workers in rows:
        s = integrate_experiment(exp, restart=True, progress=False, scheduler=scheduler, workers=workers)
        rate = n_frames / (s.seconds - s.setup_seconds)
        y = xrdpipe.open_run(exp.run.run_file).intensity
        if ref is None:
            ref, base_rate = y, rate
        same = np.array_equal(y, ref, equal_nan=True)
        print(f"{scheduler:>10} {workers:>7} {rate:>9.2f} {rate / base_rate:>13.2f}  {same}")


def latency(base: Path, n_frames: int, period_s: float, shape) -> None:
    from xrdpipe.run.peakstore import read_peaks
    from xrdpipe.run.store import read_frames
    from xrdpipe.run.watch import watch_experiment
    from xrdpipe.testing import make_experiment

    folder = base / "watch"
    syn = make_experiment(folder, n_frames=n_frames, shape=shape, frame_format="cbf", counts=0.02,
                          background=20.0, npt=1500, run_name="live")
    text = syn.experiment_file.read_text()
    syn.experiment_file.write_text(text[:text.index("# Figures of")]
                                   + '[plots]\nkinds = ["contour", "lattice"]\nformats = ["png"]\n[export]\nformats = []\n')
    staging = folder / "staging"
    (folder / "raw").rename(staging)
    (folder / "raw").mkdir()
    written: dict[str, float] = {}
    done: dict[str, float] = {}
    run_file = folder / "results" / "live.nxs"

    def detector():
        time.sleep(1.0)
        for src in sorted(staging.glob("*.cbf")):
            dst = folder / "raw" / src.name
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            tmp.rename(dst)
            written[f"{src.name}:0"] = time.time()
            time.sleep(period_s)

    def on_poll(result):
        if result is None or not result.did_work:
            return
        now = time.time()
        fr, pk = read_frames(run_file), read_peaks(run_file)
        for key, st, fitted in zip(fr.key, fr.status, pk.done):
            if st == 1 and fitted and key not in done:
                done[key] = now

    t = threading.Thread(target=detector)
    t.start()
    summary = watch_experiment(syn.experiment_file, interval_s=0.5, settle_s=0.5, idle_stop_s=4 * period_s + 5,
                               on_poll=on_poll)
    t.join()
    lag = np.array([done[k] - written[k] for k in written if k in done])
    print(f"\n2. watch latency: {n_frames} CBF frames of {shape[0]} x {shape[1]}, one every {period_s:g} s "
          f"(poll 0.5 s, settle 0.5 s); figures: contour and lattice")
    print(f"   processed {lag.size}/{len(written)} frames; frame written -> run file, contour and lattice "
          f"figures updated: median {np.median(lag):.2f} s, max {lag.max():.2f} s; "
          f"busy polls {summary.busy}")


def memory(base: Path, counts, shape) -> None:
    from xrdpipe.testing import make_experiment

    print(f"\n3. peak memory of a whole `xrdpipe run` in a fresh process ({shape[0]} x {shape[1]} frames, "
          "figures and exports included)")
    print(f"{'frames':>7} {'peak RSS MB':>12} {'vs first':>9} {'seconds':>8}")
    first = None
    for n in counts:
        folder = base / f"mem{n}"
        syn = make_experiment(folder, n_frames=n, shape=shape, frames_per_file=100, counts=0.02,
                              background=20.0, npt=1500, run_name="mem")
        code = ("import resource, subprocess, sys\n"
                "subprocess.run([sys.executable, '-m', 'xrdpipe', 'run', sys.argv[1], '--quiet'], check=True,"
                " stdout=subprocess.DEVNULL)\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, str(syn.experiment_file)], capture_output=True,
                             text=True, check=True).stdout
        dt = time.perf_counter() - t0
        mb = int(out.split()[-1]) / 1024
        first = first or mb
        print(f"{n:>7} {mb:>12.0f} {mb / first:>9.2f} {dt:>8.1f}")
        shutil.rmtree(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,latency,memory")
    ap.add_argument("--frames", type=int, default=60, help="frames for the throughput part")
    ap.add_argument("--size", type=int, default=2048, help="detector side (pixels) for the throughput part")
    ap.add_argument("--period", type=float, default=3.0, help="seconds between frames for the latency part")
    ap.add_argument("--live-frames", type=int, default=15)
    ap.add_argument("--memory-frames", default="200,2000")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xrdpipe-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    try:
        if "throughput" in parts:
            throughput(base, (args.size, args.size), args.frames)
        if "latency" in parts:
            latency(base, args.live_frames, args.period, (512, 512))
        if "memory" in parts:
            memory(base, [int(v) for v in args.memory_frames.split(",")], (256, 256))
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
