"""Integration speed, end to end (read, integrate, store), against the naive loop.

For each detector size, writes N bitshuffle-LZ4 frames of a synthetic O3 pattern into an
EIGER-like HDF5 stack, then times side by side in the same run:

* baseline "naive loop": fabio read -> pyFAI ``integrate1d`` with its default method ->
  ``np.savetxt`` per frame (timed twice: before and after xrdpipe, to show the machine's drift);
* ``xrdpipe integrate`` (``integrate_experiment``): same corrections (mask, polarization 0.99,
  solid angle, Poisson errors), full pixel splitting, into the run file; once **cold** (empty
  integrator cache: the sparse matrix is built) and once **warm** (the matrix comes from the
  cache).

Prints frames/s end to end and the ratio to the naive loop (the mean of its two runs) for both,
the set-up time (everything before the first frame: listing frames, calibration, matrix),
the steady state (frames / (total - setup)) of the warm run and its CPU time per frame (on a
shared machine, what two cores of its own would give), the largest relative difference
of frame 0 to pyFAI's ``integrate1d`` with xrdpipe's method (same accuracy), and the load average
of the machine before and after.

    nice python benchmarks/integration.py                     # 100 frames of EIGER2 X 16M and of 2048 x 2048
    nice python benchmarks/integration.py --frames 60 --sizes 2048
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"eiger16m": (4362, 4148), "2048": (2048, 2048)}


def write_stack(folder: Path, shape, n_frames: int, distinct: int = 4):
    import fabio
    import h5py
    import hdf5plugin
    import pyFAI
    from pyFAI.detectors import Detector

    from xrdpipe.testing import nfm_scenario, pattern_1d, peak_list, phase_state

    det = Detector(pixel1=75e-6, pixel2=75e-6, max_shape=shape)
    ai = pyFAI.load({"detector": det, "dist": 0.25, "poni1": shape[0] * 75e-6 * 0.45,
                     "poni2": shape[1] * 75e-6 * 0.52, "rot1": 0.01, "rot2": -0.005,
                     "wavelength": 0.6209e-10})
    poni = folder / "bench.poni"
    ai.write(str(poni))
    tth = ai.center_array(shape, unit="2th_deg")
    weight = ai.polarization(shape, 0.99) * ai.solidAngleArray(shape)
    grid = np.arange(0, float(tth.max()) + 1, 0.001)
    sc = nfm_scenario()
    mask = np.zeros(shape, np.int8)
    mask[:, shape[1] // 2 - 5: shape[1] // 2 + 5] = 1  # a module gap
    fabio.edfimage.EdfImage(data=mask).write(str(folder / "mask.edf"))
    rng = np.random.default_rng(0)
    path = folder / "raw" / "bench_data_000001.h5"
    path.parent.mkdir()
    chunks = []
    with h5py.File(folder / "tmp.h5", "w") as tmp:
        ds = tmp.create_dataset("d", shape=(distinct, *shape), dtype=np.uint32, chunks=(1, *shape),
                                **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(distinct):
            x = 0.95 - 0.1 * i
            y = pattern_1d(grid, peak_list(phase_state(sc, x), sc.wavelength_A, (1, 40), scale=0.3), background=2.0)
            img = rng.poisson(np.interp(tth, grid, y) * weight).astype(np.uint32)
            img[mask.astype(bool)] = np.iinfo(np.uint32).max
            ds[i] = img
        for i in range(distinct):
            chunks.append(ds.id.read_direct_chunk((i, 0, 0)))
    (folder / "tmp.h5").unlink()
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("/entry/data/data", shape=(n_frames, *shape), dtype=np.uint32,
                               chunks=(1, *shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(n_frames):
            filter_mask, data = chunks[i % distinct]
            ds.id.write_direct_chunk((i, 0, 0), data, filter_mask)
    (folder / "experiment.toml").write_text("""schema_version = 1
[run]
name = "bench"
output = "results"
cache_dir = "cache"
[frames]
files = "raw/*.h5"
dataset = "/entry/data/data"
times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }
[calibration]
poni = "bench.poni"
mask = "mask.edf"
[integration]
npt = 3000
unit = "2th_deg"
polarization_factor = 0.99
error_model = "poisson"
splitting = "full"
""")
    return path, poni, folder / "mask.edf"


def naive_loop(path: Path, poni: Path, mask_path: Path, n_frames: int, out: Path):
    """The baseline: fabio read -> pyFAI integrate1d (default method) -> np.savetxt."""
    import fabio
    import hdf5plugin  # noqa: F401
    import pyFAI

    out.mkdir(exist_ok=True)
    ai = pyFAI.load(str(poni))
    mask = fabio.open(str(mask_path)).data
    img = fabio.open(f"{path}::/entry/data/data")
    first = None
    t0 = time.perf_counter()
    for i in range(n_frames):
        data = img.getframe(i).data if i else img.data
        res = ai.integrate1d(data, 3000, unit="2th_deg", mask=mask, polarization_factor=0.99,
                             correctSolidAngle=True, error_model="poisson",
                             dummy=float(np.iinfo(np.uint32).max), delta_dummy=0.5)
        np.savetxt(out / f"frame_{i:05d}.xye", np.column_stack([res.radial, res.intensity, res.sigma]))
        if first is None:
            first = (res.radial, res.intensity, str(res.method))
    return time.perf_counter() - t0, first


def pyfai_same_method(path: Path, poni: Path, mask_path: Path):
    """pyFAI integrate1d on frame 0 with xrdpipe's settings (full splitting, CSR): the accuracy reference."""
    import fabio
    import h5py
    import pyFAI

    ai = pyFAI.load(str(poni))
    with h5py.File(path, "r") as h5:
        data = h5["/entry/data/data"][0]
    res = ai.integrate1d(data, 3000, unit="2th_deg", mask=fabio.open(str(mask_path)).data,
                         polarization_factor=0.99, correctSolidAngle=True, error_model="poisson",
                         method=("full", "csr", "cython"), dummy=float(np.iinfo(np.uint32).max), delta_dummy=0.5)
    return res.radial, res.intensity


def _cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its finished children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_xrdpipe(folder: Path):
    import xrdpipe

    exp = xrdpipe.load_experiment(folder / "experiment.toml")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    summary = xrdpipe.integrate_experiment(exp, progress=False, restart=True)
    dt = time.perf_counter() - t0
    run_xrdpipe.cpu_seconds = _cpu_seconds() - c0
    p = xrdpipe.open_run(exp.run.run_file)
    return dt, summary, (p.radial, p.intensity[0])



def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--sizes", default="eiger16m,2048", help="comma list of: " + ", ".join(SIZES))
    ap.add_argument("--workdir", default=None, help="folder for the data (default: a temporary one, removed)")
    args = ap.parse_args()
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xrdpipe-bench-"))
    print(f"{'detector':>20} {'frames':>6} {'naive f/s':>15} {'cold f/s':>9} {'ratio':>6} {'warm f/s':>9} "
          f"{'ratio':>6} {'setup cold s':>12} {'setup warm s':>12} {'steady f/s':>10}  "
          f"max rel diff vs pyFAI (frame 0)   load avg before/after")
    try:
        for name in args.sizes.split(","):
            shape = SIZES[name]
            folder = base / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            path, poni, mask = write_stack(folder, shape, args.frames)
            load_before = os.getloadavg()[0]
            t_naive1, (r_n, i_n, method) = naive_loop(path, poni, mask, args.frames, folder / "naive")
            t_cold, cold, _ = run_xrdpipe(folder)
            assert cold.integrated == args.frames and not cold.failed and not cold.cache_hit, cold
            t_warm, warm, (r_x, i_x) = run_xrdpipe(folder)
            cpu_warm = run_xrdpipe.cpu_seconds
            assert warm.integrated == args.frames and not warm.failed and warm.cache_hit, warm
            t_naive2, _ = naive_loop(path, poni, mask, args.frames, folder / "naive")
            load_after = os.getloadavg()[0]
            r_p, i_p = pyfai_same_method(path, poni, mask)
            assert np.allclose(r_p, r_x)
            ok = np.isfinite(i_x) & (i_p > 0)
            diff = np.max(np.abs(i_x[ok] - i_p[ok]) / i_p[ok])
            f_naive = args.frames / ((t_naive1 + t_naive2) / 2)
            f_cold = args.frames / t_cold
            f_warm = args.frames / t_warm
            f_steady = args.frames / (t_warm - warm.setup_seconds)
            naive_txt = f"{args.frames / t_naive1:.2f}/{args.frames / t_naive2:.2f}"
            print(f"{name + ' ' + 'x'.join(map(str, shape)):>20} {args.frames:>6} {naive_txt:>15} {f_cold:>9.2f} "
                  f"{f_cold / f_naive:>6.2f} {f_warm:>9.2f} {f_warm / f_naive:>6.2f} {cold.setup_seconds:>12.2f} "
                  f"{warm.setup_seconds:>12.2f} {f_steady:>10.2f}  {diff:.1e}{'':>26}{load_before:.1f}/{load_after:.1f}")
            print(f"{'':>20} baseline: fabio -> pyFAI {method} -> np.savetxt (two runs: before/after xrdpipe)")
            print(f"{'':>20} warm run: {cpu_warm / args.frames * 1e3:.0f} ms of CPU per frame (set-up included, "
                  f"{cpu_warm / t_warm:.2f} cores busy on average): {2 * args.frames / cpu_warm:.1f} frames/s "
                  "if it had two cores to itself")
            shutil.rmtree(folder)
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
