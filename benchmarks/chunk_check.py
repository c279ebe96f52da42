"""What checking bitshuffle-LZ4 chunks before HDF5 decompresses them costs.

``xrdpipe.frames.read_frame`` reads every bitshuffle-LZ4 chunk of a frame raw and walks its LZ4
blocks sequence by sequence (a compiled check, no decoding) before bitshuffle's decoder (which
can crash on a corrupt chunk) decompresses it. Side by side, per frame: the plain h5py read (the
baseline: decompression by the filter), the check alone (``check_chunks``: the raw chunk read and
walked), and ``read_frame`` (a frame's one chunk read once, checked and decoded). Frames are Poisson counts (mean 2, as a diffraction frame's background) in
uint32, one chunk per frame, as an EIGER writes them.

    python benchmarks/chunk_check.py                  # 2048 x 2048 and 4362 x 4148 (EIGER2 16M)
    python benchmarks/chunk_check.py --sizes 1024 --frames 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from xrdpipe.frames import check_chunks, list_frames, read_frame


def _per_frame(fn, n: int, repeats: int) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        for i in range(n):
            fn(i)
    return (time.perf_counter() - t) / (n * repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4362x4148", help="detector sizes: N (N x N) or RxC, comma-separated")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'detector':>12} {'h5py read (baseline)':>22} {'check':>10} {'read_frame':>12} {'read_frame / read':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            shape = tuple(int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
            path = Path(tmp) / f"frames_{shape[0]}x{shape[1]}.h5"
            with h5py.File(path, "w") as h5:
                ds = h5.create_dataset("/entry/data/data", shape=(args.frames, *shape), dtype=np.uint32,
                                       chunks=(1, *shape), **hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
                for i in range(args.frames):
                    ds[i] = rng.poisson(2.0, size=shape).astype(np.uint32)
            refs = list_frames([path])
            read_frame(refs[0])         # the compiled check loaded once per process, not timed
            with h5py.File(path) as h5:
                ds = h5["/entry/data/data"]
                base = _per_frame(lambda i: ds[i], args.frames, args.repeats)
                check = _per_frame(lambda i: check_chunks(ds, i), args.frames, args.repeats)
            full = _per_frame(lambda i: read_frame(refs[i]), args.frames, args.repeats)
            print(f"{shape[0]:>5} x {shape[1]:<5} {base * 1e3:>19.1f} ms {check * 1e3:>7.1f} ms {full * 1e3:>9.1f} ms "
                  f"{full / base:>17.2f}x")


if __name__ == "__main__":
    main()
