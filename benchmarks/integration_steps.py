"""Where a frame's time goes in the steady state: each step of ``xrdpipe integrate`` timed alone,
one frame after the other on one core, against the bounds of the machine.

Writes N bitshuffle-LZ4 frames (as ``benchmarks/integration.py`` does), builds or loads the
integrator (cache in the work folder), then times per frame, median over the frames:

* read: opening the file and reading the compressed chunk (``read_direct_chunk``);
* check: the walk over the LZ4 blocks of the chunk read (compiled, sequence by sequence) that
  protects against corrupt chunks;
* decompress: bitshuffle's own LZ4 decoder and bit-unshuffle (what HDF5's filter would do);
* integrate: the one-pass kernel (mask, flagged pixels, dark, intensity and variance);
* write: storing the pattern, its errors and the status in the run file;

and, as the bounds: ``memcpy`` of the frame (memory) and one pass of SciPy's CSC product over
the matrix (the streaming bound of the matrix: indices and coefficients read once). With two
cores, the steady state is at most 2 / (sum of the steps) frames/s.

    nice python benchmarks/integration_steps.py --size eiger16m --frames 8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from integration import SIZES, write_stack


def main() -> None:
    import ctypes
    import os

    import h5py

    import xrdpipe
    from xrdpipe.frames import (
        _bitshuffle_lz4_problem,
        _bshuf_decompress,
        _read_bitshuffle_lz4,
        list_frames,
    )
    from xrdpipe.integration import Integrator, _blocks, _product
    from xrdpipe.run.store import RunFile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="eiger16m", choices=list(SIZES))
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cache", default=None, help="integrator cache folder (default: in the work folder)")
    args = ap.parse_args()
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="xrdpipe-steps-"))
    try:
        shape = SIZES[args.size]
        folder = base / args.size
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        path, poni, mask = write_stack(folder, shape, args.frames)
        exp = xrdpipe.load_experiment(folder / "experiment.toml")
        cache = Path(args.cache) if args.cache else folder / "cache"
        cal = xrdpipe.load_calibration(exp.calibration.poni, mask=exp.calibration.mask)
        ispec = exp.integration
        integ = Integrator(cal, shape, npt=ispec.npt, unit=ispec.unit, polarization_factor=ispec.polarization_factor,
                           error_model=ispec.error_model, splitting=ispec.splitting, cache=cache)
        integ.cache_file
        integ = Integrator(cal, shape, npt=ispec.npt, unit=ispec.unit, polarization_factor=ispec.polarization_factor,
                           error_model=ispec.error_model, splitting=ispec.splitting, cache=cache)
        assert integ.cache_hit
        refs = list_frames([path], dataset="/entry/data/data")
        fn = _bshuf_decompress()
        steps: dict[str, list[float]] = {k: [] for k in ("read", "check", "decompress", "integrate", "write",
                                                         "memcpy bound", "one SciPy pass bound")}
        reuse: dict = {}
        data, indices, indptr = integ._matrix
        blocks = _blocks(data, indices, indptr, len(integ.radial))
        integ.integrate(np.zeros(shape, np.uint32))            # compiled before timing
        out = np.empty(shape, np.uint32)
        with RunFile.open_for_writing(folder / "steps.nxs", radial=integ.radial, unit=ispec.unit,
                                      wavelength_A=cal.wavelength_A, fingerprint={}, provenance={},
                                      title="steps", restart=True) as run:
            run.add_frames(refs, [None] * len(refs))
            for k, ref in enumerate(refs):
                t0 = time.perf_counter()
                with h5py.File(ref.file, "r", locking=False) as h5:
                    ds = h5[ref.dataset]
                    raw = ds.id.read_direct_chunk((ref.index, 0, 0))[1]
                    t1 = time.perf_counter()
                    assert _bitshuffle_lz4_problem(raw, out.nbytes, 4) is None
                    t2 = time.perf_counter()
                    start = ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value + 12
                    block = int.from_bytes(raw[8:12], "big") // 4
                    fn(start, out.ctypes.data, out.size, 4, block)
                    t3 = time.perf_counter()
                    frame = _read_bitshuffle_lz4(ds, ref.index, reuse)
                    assert np.array_equal(frame, out)
                t4 = time.perf_counter()
                intensity, sigma = integ.integrate(frame)
                t5 = time.perf_counter()
                run.write_pattern(k, intensity, sigma)
                t6 = time.perf_counter()
                copy = frame.copy()
                t7 = time.perf_counter()
                _product(blocks, copy.reshape(-1).view(np.float32))
                t8 = time.perf_counter()
                for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
                    steps[name].append(dt)
        total = sum(np.median(steps[k]) for k in ("read", "check", "decompress", "integrate", "write"))
        print(f"{args.size} {'x'.join(map(str, shape))}, {args.frames} frames, {data.size / 1e6:.1f} M matrix entries, "
              f"load {os.getloadavg()[0]:.1f}")
        for name, values in steps.items():
            print(f"  {name:>22}: {np.median(values) * 1e3:7.1f} ms  (min {np.min(values) * 1e3:.1f})")
        print(f"  {'sum of the steps':>22}: {total * 1e3:7.1f} ms  -> at most {2 / total:.1f} frames/s on 2 cores")
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
