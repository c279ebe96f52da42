"""What opening a run file as a Dataset costs, against reading it whole.

A synthetic run file of N frames x P points (written with the store's own writer, no
integration) is opened in fresh processes, side by side: ``open_run`` (the baseline: the whole
stack read into memory), ``open_dataset`` (coordinates read, the stack left in the file) and
``open_dataset`` then one 2θ window of every frame. Printed: seconds and the RSS each holds
beyond what the imports hold (the first xarray Dataset imports dask.array for its duck-array
check; that import is timed apart, as "cold").

    python benchmarks/open_dataset.py                    # 2000 x 4000
    python benchmarks/open_dataset.py --frames 5000 --points 4000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

CHILD = r"""
import gc, sys, time, psutil, numpy as np
import xrdpipe
from xrdpipe.run.store import open_run
proc = psutil.Process()
path, how = sys.argv[1], sys.argv[2]
t = time.perf_counter()
import xarray as xr
xr.Dataset({"a": ("x", np.zeros(2))})          # xarray's own first-use imports (dask.array)
cold = time.perf_counter() - t
gc.collect()
rss0 = proc.memory_info().rss
t = time.perf_counter()
if how == "open_run":
    p = open_run(path)
elif how == "open_dataset":
    ds = xrdpipe.open_dataset(path)
else:
    ds = xrdpipe.open_dataset(path)
    w = ds.intensity.sel(tth=slice(6.2, 7.2)).values
print(f"{time.perf_counter() - t:.3f} {(proc.memory_info().rss - rss0) / 1e6:.1f} {cold:.2f}")
"""


def write(path: Path, n: int, p: int) -> None:
    from xrdpipe.frames import FrameRef
    from xrdpipe.run.store import RunFile
    from xrdpipe.timing import FrameTime

    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    refs = [FrameRef(path.parent / "f.h5", i) for i in range(n)]
    times = [FrameTime(t0 + timedelta(seconds=20 * i), t0 + timedelta(seconds=20 * i + 10)) for i in range(n)]
    ramp = np.linspace(0, 1, p, dtype=np.float32)
    with RunFile.open_for_writing(path, radial=np.linspace(3, 15, p), unit="2th_deg", wavelength_A=0.6209,
                                  fingerprint={}, provenance={}) as run:
        for row in run.add_frames(refs, times):
            run.write_pattern(row, row + ramp, ramp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--points", type=int, default=4000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.nxs"
        write(path, args.frames, args.points)
        print(f"{args.frames} frames x {args.points} points, {path.stat().st_size / 1e6:.0f} MB")
        base = None
        for how in ("open_run", "open_dataset", "open_dataset+window"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True,
                                 check=True).stdout.split()
            secs, mb, cold = float(out[0]), float(out[1]), float(out[2])
            base = base or secs
            print(f"{how:22s} {secs:7.3f} s ({secs / base:5.2f} x open_run)  {mb:7.1f} MB held"
                  f"   [xarray first use {cold:.2f} s]")


if __name__ == "__main__":
    main()
