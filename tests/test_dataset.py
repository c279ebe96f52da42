"""xrdpipe.open_dataset / open_results: the run file as labelled xarray Datasets, the pattern
stack read lazily (only what is asked for), values equal to the run file's."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import xrdpipe
from xrdpipe.frames import FrameRef
from xrdpipe.run.dataset import Results
from xrdpipe.run.groups import write_table
from xrdpipe.run.paths import ELECTROCHEMISTRY, LATTICE
from xrdpipe.run.store import DONE, FAILED, RunFile, open_run, read_frames
from xrdpipe.timing import FrameTime

xr = pytest.importorskip("xarray")

T0 = datetime(2025, 7, 2, 11, 0, 0, tzinfo=timezone.utc)
EXPOSURE_S, STEP_S = 10.0, 20.0


def synthetic_run(path, n_frames: int, n_points: int, *, failed=(), seed: int = 0):
    """A run file written with the store's own writer (no integration): frame i's pattern is
    i + a ramp over the radial axis (so every value is known), frame i exposed from
    T0 + 20 i s for 10 s; the frames in ``failed`` are recorded as failed."""
    tth = np.linspace(3.0, 15.0, n_points)
    refs = [FrameRef(path.parent / f"f_{i // 1000:03d}.h5", i % 1000) for i in range(n_frames)]
    times = [FrameTime(T0 + timedelta(seconds=STEP_S * i), T0 + timedelta(seconds=STEP_S * i + EXPOSURE_S))
             for i in range(n_frames)]
    ramp = np.linspace(0.0, 1.0, n_points, dtype=np.float32)
    with RunFile.open_for_writing(path, radial=tth, unit="2th_deg", wavelength_A=0.6209,
                                  fingerprint={"synthetic": seed}, provenance={}, title="synthetic") as run:
        rows = run.add_frames(refs, times)
        for row in rows:
            if row in failed:
                run.write_failure(row, f"frame {row}: unreadable (synthetic)")
            else:
                run.write_pattern(row, row + ramp, np.sqrt(row + 1 + ramp))
    return tth


def intensity_of(frame, tth):
    return frame + np.linspace(0.0, 1.0, tth.size, dtype=np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 frames x 500 points, frame 7 failed, with a per-frame electrochemistry table (x falls
    from 1.0 by 0.01 per frame, the first 20 frames a charge) and a lattice table."""
    path = tmp_path_factory.mktemp("ds") / "small.nxs"
    tth = synthetic_run(path, 40, 500, failed={7})
    n = 40
    x = 1.0 - 0.01 * np.arange(n)
    write_table(path, ELECTROCHEMISTRY, {
        "voltage_V": 3.0 + 0.02 * np.arange(n), "x": x, "current_mA": np.full(n, 0.1),
        "capacity_mAh_g": 2.5 * np.arange(n), "half_cycle": np.where(np.arange(n) < 20, 1, 2).astype("i4"),
        "segment": np.array(["charge"] * 20 + ["discharge"] * 18 + ["rest"] * 2, dtype=object),
        "status": np.array(["ok"] * n, dtype=object),
        "record": {"arrays": {"time_s": np.arange(0.0, 800.0, 5.0), "voltage_V": np.linspace(3, 4, 160),
                              "x": np.linspace(1, 0.6, 160)}, "attrs": {}}}, {})
    write_table(path, LATTICE, {
        "frame": np.arange(0, n, 2), "time_s": np.zeros(20), "phase": np.array(["O3", "P3"], dtype=object),
        "c_A": np.column_stack([16.0 + 0.001 * np.arange(20), np.full(20, np.nan)]),
        "c_err_A": np.full((20, 2), 1e-4), "fraction": np.column_stack([np.ones(20), np.zeros(20)]),
        "message": np.full((20, 2), "", dtype=object)}, {"correction": "none"})
    return path, tth


def test_the_dataset_is_labelled_and_equals_the_run_file(small):
    path, tth = small
    ds = xrdpipe.open_dataset(path)
    assert dict(ds.sizes) == {"frame": 40, "tth": 500}
    assert ds.intensity.dims == ("frame", "tth") and ds.intensity.attrs["units"] == "counts"
    assert ds.tth.attrs["units"] == "degree" and ds.attrs["wavelength_A"] == pytest.approx(0.6209)
    np.testing.assert_allclose(ds.tth.values, tth)
    # Q beside 2θ: 4π sin(θ)/λ
    np.testing.assert_allclose(ds.q.values, 4 * np.pi * np.sin(np.radians(tth / 2)) / 0.6209, rtol=1e-12)
    p = open_run(path)
    np.testing.assert_array_equal(ds.intensity.values, p.intensity)
    np.testing.assert_array_equal(ds.intensity_errors.values, p.sigma)
    np.testing.assert_array_equal(ds.intensity[12].values, intensity_of(12, tth))
    assert np.isnan(ds.intensity[7].values).all()                 # the failed frame
    # coordinates from the frame table and the electrochemistry
    fr = read_frames(path)
    assert ds.status.values.tolist() == [FAILED if i == 7 else DONE for i in range(40)]
    assert ds.frame_message.values[7] == "frame 7: unreadable (synthetic)"
    np.testing.assert_allclose(ds.time_s.values, STEP_S * np.arange(40) + EXPOSURE_S / 2)
    np.testing.assert_array_equal(ds.time_s.values, fr.time_s)
    assert ds.time.values[3] == np.datetime64("2025-07-02T11:01:05", "ns")    # the middle of the exposure
    np.testing.assert_allclose(ds.x.values, 1.0 - 0.01 * np.arange(40))
    np.testing.assert_allclose(ds.voltage.values, 3.0 + 0.02 * np.arange(40))
    assert ds.voltage.attrs["units"] == "V" and ds.capacity.attrs["units"] == "mAh/g"
    assert ds.half_cycle.values.tolist() == [1] * 20 + [2] * 20
    assert ds.direction.values.tolist() == ["charge"] * 20 + ["discharge"] * 20   # the half-cycle's way


def test_selections_read_only_what_they_index(small):
    path, tth = small
    ds = xrdpipe.open_dataset(path)
    cols = (tth >= 6.2) & (tth <= 7.2)
    frames = [30, 2, 2, 39, 11]                                   # unsorted, repeated, sparse
    got = ds.intensity.sel(tth=slice(6.2, 7.2)).isel(frame=frames).values
    want = np.stack([intensity_of(f, tth)[cols] for f in frames])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.intensity[::-3, 10].values, [intensity_of(f, tth)[10] for f in range(39, -1, -3)])
    assert ds.intensity.isel(frame=[]).shape == (0, 500)
    # a selection by label along a coordinate of frame
    np.testing.assert_array_equal(ds.intensity.where(ds.x < 0.645, drop=True).frame.values, np.arange(36, 40))


def test_the_window_plots_against_x(small):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, tth = small
    ds = xrdpipe.open_dataset(path)
    mesh = ds.intensity.sel(tth=slice(6.2, 7.2)).plot(y="x")
    try:
        cols = (tth >= 6.2) & (tth <= 7.2)
        drawn = np.ma.getdata(mesh.get_array()).reshape(40, cols.sum())
        want = np.stack([intensity_of(f, tth)[cols] for f in range(40)])
        np.testing.assert_array_equal(np.isnan(drawn[7]), True)
        np.testing.assert_array_equal(np.delete(drawn, 7, axis=0), np.delete(want, 7, axis=0))
        assert mesh.axes.get_ylabel().startswith("x") and mesh.axes.get_xlabel().startswith("2θ")
    finally:
        plt.close("all")


def test_results_as_datasets(small, tmp_path):
    path, _ = small
    res = xrdpipe.open_results(path)
    assert res.peaks is None                                      # not fitted
    lat = res.lattice
    assert dict(lat.sizes) == {"frame": 20, "phase": 2} and lat.phase.values.tolist() == ["O3", "P3"]
    np.testing.assert_array_equal(lat.frame.values, np.arange(0, 40, 2))
    np.testing.assert_allclose(lat.c_A.sel(phase="O3").values, 16.0 + 0.001 * np.arange(20))
    assert lat.c_A.attrs["units"] == "angstrom"
    np.testing.assert_allclose(lat.x.values, 1.0 - 0.02 * np.arange(20))   # the frames' x, carried along
    np.testing.assert_allclose(res.record.voltage_V.values, np.linspace(3, 4, 160))
    # a run file without electrochemistry: NaN x and voltage, half-cycle -1
    bare = tmp_path / "bare.nxs"
    synthetic_run(bare, 5, 50)
    ds = xrdpipe.open_dataset(bare)
    assert np.isnan(ds.x.values).all() and np.isnan(ds.voltage.values).all()
    assert ds.half_cycle.values.tolist() == [-1] * 5 and ds.direction.values.tolist() == ["rest"] * 5
    assert xrdpipe.open_results(bare) == Results(None, None, None)


def test_peaks_as_a_dataset_equal_the_peak_table(tmp_path):
    from xrdpipe.run.peakstore import read_peaks
    from xrdpipe.testing import make_experiment

    # a small detector: its 2θ span ends before windows 107 and 018, whose fits fail (the
    # Dataset must carry failures as the table does)
    syn = make_experiment(tmp_path / "exp", n_frames=6, shape=(192, 192), npt=800, counts=0.002, background=100.0,
                          seed=2, run_name="p")
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    xrdpipe.fit_experiment(exp, progress=False)
    peaks = xrdpipe.open_results(exp.run.run_file).peaks
    d = read_peaks(exp.run.run_file)
    assert peaks.center.dims == ("frame", "component") and peaks.sizes["frame"] == 6
    assert peaks.phase.values.tolist() == list(d.peak_phase) and peaks.hkl.values.tolist() == list(d.peak_hkl)
    assert peaks.window.values.tolist() == list(d.peak_window)
    for name in ("center", "center_err", "fwhm", "area", "area_err", "d_A"):
        np.testing.assert_array_equal(peaks[name].values, d.values[name])
    np.testing.assert_array_equal(peaks.present.values, d.present.astype(bool))
    of_window = [list(d.window).index(w) for w in d.peak_window]
    np.testing.assert_array_equal(peaks.success.values, d.success[:, of_window].astype(bool))
    assert not d.success.all() and d.success.any()
    assert peaks.center.attrs["units"] == "degree"
    first = peaks.component.values[0]
    assert first == f"{d.peak_phase[0]} {d.peak_hkl[0]}"
    np.testing.assert_array_equal(peaks.center.sel(component=first).values, d.values["center"][:, 0])
    some = read_peaks(exp.run.run_file, arrays=("done", "area"))          # only what a figure draws
    assert list(some.values) == ["area"] and some.present is None and some.message is None
    np.testing.assert_array_equal(some.done, d.done)
    assert some.peaks == tuple(zip(d.peak_window, d.peak_phase, d.peak_hkl, d.peak_profile))


MEASURE = r"""
import gc, json, sys, time
import numpy as np, psutil, xarray as xr
import xrdpipe
xrdpipe.open_dataset(sys.argv[2]).intensity.values       # imports (xarray's dask check, h5py) done
proc = psutil.Process()
gc.collect()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
ds = xrdpipe.open_dataset(sys.argv[1])
out = {"seconds": time.perf_counter() - t0, "open": proc.memory_info().rss - rss0}
window = ds.intensity.sel(tth=slice(6.2, 7.2)).values
out["window"] = proc.memory_info().rss - rss0
cols = (ds.tth.values >= 6.2) & (ds.tth.values <= 7.2)
out["window_ok"] = bool(window.shape == (2000, cols.sum())
                        and np.array_equal(window[1234], 1234 + np.linspace(0, 1, 4000, dtype=np.float32)[cols]))
whole = ds.intensity.values
out["whole"] = proc.memory_info().rss - rss0
print(json.dumps(out))
"""


def test_a_2000_frame_run_opens_in_under_a_second_and_holds_under_50_mb(tmp_path):
    """2,000 frames x 4,000 points (2 x 32 MB of float32 in the file), measured in a fresh
    process: opening reads the coordinates only; the stack is read when asked for (and then
    costs its size)."""
    pytest.importorskip("psutil")
    import json
    import subprocess
    import sys

    path, warm = tmp_path / "big.nxs", tmp_path / "warm.nxs"
    synthetic_run(path, 2000, 4000)
    synthetic_run(warm, 3, 20)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(warm)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["seconds"] < 1.0, f"open_dataset took {m['seconds']:.2f} s"
    assert m["open"] < 50e6, f"open_dataset holds {m['open'] / 1e6:.0f} MB"
    assert m["window_ok"] and m["window"] < 50e6, f"a window of every frame holds {m['window'] / 1e6:.0f} MB"
    assert m["whole"] > 30e6                  # asked for, the stack (32 MB) is in memory: the measure sees it


def test_chunks_make_the_stack_a_dask_array(small):
    pytest.importorskip("dask")
    path, _ = small
    ds = xrdpipe.open_dataset(path, chunks={"frame": 16})
    assert ds.intensity.chunks == ((16, 16, 8), (500,))
    mean = ds.intensity.mean("frame").compute()                  # NaN of the failed frame skipped
    np.testing.assert_allclose(mean.values, np.nanmean(open_run(path).intensity, axis=0), rtol=1e-6)
