"""The instrument profile of integrated 2D patterns: Integrator.instrument_sd against the
analytic pixel footprint, against the width of an integrated line, and in the run file."""

import h5py
import numpy as np
import pytest

import xrdpipe
from xrdpipe.calibration import Calibration
from xrdpipe.integration import Integrator
from xrdpipe.run.store import open_run, read_run_info
from xrdpipe.testing import make_experiment
from xrdpipe.testing.experiment import _Camera
from xrdpipe.testing.scenarios import nfm_scenario

PIXEL_M, DIST_M, WAVELENGTH_A = 75e-6, 0.100, 0.6209


@pytest.fixture(scope="module")
def flat_calibration():
    """An untilted flat detector perpendicular to the beam: 1000 x 1000 pixels of 75 µm at
    100 mm, the beam at its centre."""
    import pyFAI
    from pyFAI.detectors import Detector

    shape = (1000, 1000)
    det = Detector(pixel1=PIXEL_M, pixel2=PIXEL_M, max_shape=shape)
    ai = pyFAI.load({"detector": det, "dist": DIST_M, "poni1": 500 * PIXEL_M, "poni2": 500 * PIXEL_M,
                     "rot1": 0.0, "rot2": 0.0, "rot3": 0.0, "wavelength": WAVELENGTH_A * 1e-10})
    return Calibration(None, ai, WAVELENGTH_A, shape)


def _pixel_extent_deg(tth_deg):
    """The radial extent of one pixel on the flat detector: R = D tan 2θ, so
    d2θ/dR = cos²2θ / D; a square pixel at any azimuth projects on the radial direction with
    variance (D1² + D2²)/12 = p²/12 (D1 = p cos χ, D2 = p sin χ)."""
    return np.degrees(PIXEL_M * np.cos(np.radians(tth_deg)) ** 2 / DIST_M)


@pytest.mark.parametrize("tth", [10.0, 20.0])
def test_full_splitting_narrow_bins_is_twice_the_pixel_variance(flat_calibration, tth):
    # bins of 0.004°, a tenth of a pixel: the pixel's own area (p²/12) plus its spread over the
    # bins by the splitting (p²/12 again); the bin's own width adds 0.2 % here
    integ = Integrator(flat_calibration, flat_calibration.shape, npt=250, radial_range=(tth - 0.5, tth + 0.5),
                       splitting="full")
    p = _pixel_extent_deg(integ.radial)
    analytic = np.sqrt(2 * p**2 / 12)
    assert integ.instrument_sd.dtype == np.float64 and integ.instrument_sd.shape == (250,)
    b = int(np.argmin(np.abs(integ.radial - tth)))
    assert integ.instrument_sd[b] == pytest.approx(analytic[b], rel=0.05)
    # bin by bin the square lattice of pixels against the ring scatters it by ~1 %; over ±0.1°
    near = np.abs(integ.radial - tth) < 0.1
    assert np.mean(integ.instrument_sd[near] / analytic[near]) == pytest.approx(1.0, abs=0.01)


def test_q_unit_is_the_same_profile_in_q(flat_calibration):
    # in Q (1/Å) the same footprint scaled by dQ/d2θ = 2π cos θ / λ (per radian)
    tth = 20.0
    q0 = 4 * np.pi * np.sin(np.radians(tth / 2)) / WAVELENGTH_A
    in_q = Integrator(flat_calibration, flat_calibration.shape, npt=250, unit="q_A^-1",
                      radial_range=(q0 - 0.09, q0 + 0.09), splitting="full")
    dq_dtth = 2 * np.pi * np.cos(np.radians(tth / 2)) / WAVELENGTH_A * np.pi / 180
    near = np.abs(in_q.radial - q0) < 0.018
    analytic = np.sqrt(2 * _pixel_extent_deg(tth) ** 2 / 12) * dq_dtth
    assert np.mean(in_q.instrument_sd[near]) == pytest.approx(analytic, rel=0.01)


@pytest.mark.parametrize("tth", [10.0, 20.0])
def test_no_splitting_is_pixel_and_bin(flat_calibration, tth):
    # whole pixels into the bin of their centre: the pixel's area and the centres spread
    # uniformly over the bin (0.04°, about one pixel)
    integ = Integrator(flat_calibration, flat_calibration.shape, npt=25, radial_range=(tth - 0.5, tth + 0.5),
                       splitting="no")
    bin_deg = integ.radial[1] - integ.radial[0]
    b = int(np.argmin(np.abs(integ.radial - tth)))
    p = _pixel_extent_deg(integ.radial[b])
    assert integ.instrument_sd[b] == pytest.approx(np.sqrt(p**2 / 12 + bin_deg**2 / 12), rel=0.05)


def test_pyfai_engine_gives_the_same_numbers(flat_calibration):
    kw = dict(npt=100, radial_range=(9.5, 10.5), splitting="full")
    ours = Integrator(flat_calibration, flat_calibration.shape, **kw)
    theirs = Integrator(flat_calibration, flat_calibration.shape, engine="pyfai", **kw)
    np.testing.assert_allclose(theirs.instrument_sd, ours.instrument_sd, rtol=1e-4)


def test_bins_no_pixel_reaches_are_nan(flat_calibration):
    # the corner of the detector is at 2θ = 27.9°: bins beyond it receive no pixel
    integ = Integrator(flat_calibration, flat_calibration.shape, npt=40, radial_range=(27.0, 29.0), splitting="full")
    outside = integ.radial > 28.0
    assert np.isnan(integ.instrument_sd[outside]).all()
    assert np.isnan(integ.instrument_offset[outside]).all()
    assert np.isfinite(integ.instrument_sd[integ.radial < 27.8]).all()


def test_the_mean_of_a_bin_is_its_centre_on_full_rings_and_inside_it_at_the_edge(flat_calibration):
    # where whole rings fall on the detector a bin's pixels are spread evenly about its centre
    # (within the lattice's aliasing, ~1 % of a bin); near the detector's corner (27.9°) only its
    # inner part is covered, so the mean of what it averages lies below its centre
    integ = Integrator(flat_calibration, flat_calibration.shape, npt=200, radial_range=(19.0, 28.5), splitting="full")
    bin_deg = integ.radial[1] - integ.radial[0]
    full = (integ.radial > 19.1) & (integ.radial < 20.0)    # (the first bin is cut by the range)
    assert np.abs(np.mean(integ.instrument_offset[full])) < 0.01 * bin_deg
    last = np.flatnonzero(np.isfinite(integ.instrument_offset))[-1]
    assert integ.instrument_offset[last] < -0.1 * bin_deg


@pytest.fixture(scope="module")
def demo_camera():
    return _Camera(nfm_scenario(), "h5", (512, 512), 2000)


@pytest.fixture(scope="module")
def demo_integrator(demo_camera):
    cal = Calibration(None, demo_camera.ai, WAVELENGTH_A, (512, 512))
    return Integrator(cal, (512, 512), npt=2000, splitting="full", polarization_factor=0.99)


@pytest.mark.parametrize("centre, sigma_line", [(8.0, 0.02), (20.0, 0.03)])
def test_integrated_line_width_is_line_plus_instrument(demo_camera, demo_integrator, centre, sigma_line):
    # one Gaussian line, no background, no noise, on the demo detector (tilted, 75 µm at 130 mm)
    # through the simulator's pixels (each the mean over its area) and full splitting
    y = 1e6 * np.exp(-0.5 * ((demo_camera.grid - centre) / sigma_line) ** 2)
    intensity, _ = demo_integrator.integrate(demo_camera.expected(y).astype(np.float32))
    r = demo_integrator.radial
    sel = (np.abs(r - centre) < 10 * sigma_line) & np.isfinite(intensity)
    w = intensity[sel].astype(np.float64)
    mean = np.sum(w * r[sel]) / np.sum(w)
    second_moment = np.sum(w * (r[sel] - mean) ** 2) / np.sum(w)
    sd = demo_integrator.instrument_sd[int(np.argmin(np.abs(r - mean)))]
    assert 0.010 < sd < 0.016        # about 0.4 to 0.6 of sigma_line: it matters
    assert second_moment == pytest.approx(sigma_line**2 + sd**2, rel=0.03)
    assert second_moment != pytest.approx(sigma_line**2, rel=0.10)   # the line alone is too narrow


def test_cached_and_pickled_integrators_keep_it(demo_camera, tmp_path):
    import pickle

    cal = Calibration(None, demo_camera.ai, WAVELENGTH_A, (512, 512))
    built = Integrator(cal, (512, 512), npt=500, cache=tmp_path)
    assert built.cache_file is not None and not built.cache_hit
    hit = Integrator(cal, (512, 512), npt=500, cache=tmp_path)
    assert hit.cache_hit
    assert np.isfinite(built.instrument_sd).sum() > 400
    np.testing.assert_array_equal(hit.instrument_sd, built.instrument_sd)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(hit)).instrument_sd, built.instrument_sd)


def test_run_file_round_trip(tmp_path):
    syn = make_experiment(tmp_path / "two_d", n_frames=2, shape=(192, 192), seed=3, npt=400)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    spec = exp.integration
    integ = Integrator(xrdpipe.load_calibration(exp.calibration.poni, mask=exp.calibration.mask), (192, 192),
                       npt=spec.npt, unit=spec.unit, polarization_factor=spec.polarization_factor,
                       splitting=spec.splitting)
    info, patterns = read_run_info(exp.run.run_file), open_run(exp.run.run_file)
    assert info.instrument_sd.shape == (400,) and info.instrument_sd.dtype == np.float64
    np.testing.assert_array_equal(info.instrument_sd, integ.instrument_sd)
    np.testing.assert_array_equal(patterns.instrument_sd, integ.instrument_sd)
    assert 0.005 < np.nanmedian(info.instrument_sd) < 0.03       # degrees: a 75 µm pixel at 130 mm
    with h5py.File(exp.run.run_file, "r") as h5:
        ds = h5["/entry/patterns/instrument_sd"]
        assert ds.attrs["units"] == "2th_deg"
        assert ds.attrs["long_name"] == ("standard deviation of the radial positions a bin averages over "
                                         "(pixel area, splitting, bin)")
    # a resumed run keeps it
    xrdpipe.integrate_experiment(exp, progress=False)
    np.testing.assert_array_equal(read_run_info(exp.run.run_file).instrument_sd, integ.instrument_sd)
    np.testing.assert_array_equal(read_run_info(exp.run.run_file).instrument_offset, integ.instrument_offset)
    np.testing.assert_array_equal(open_run(exp.run.run_file).instrument_offset, integ.instrument_offset)


def test_imported_patterns_have_no_instrument_sd(tmp_path):
    syn = make_experiment(tmp_path / "one_d", n_frames=2, frame_format="xye", seed=3, npt=400)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    assert read_run_info(exp.run.run_file).instrument_sd is None
    assert open_run(exp.run.run_file).instrument_sd is None
    assert open_run(exp.run.run_file).instrument_offset is None


def test_the_fit_check_draws_the_lines_as_the_phase_model_fitted_them(tmp_path, monkeypatch):
    """The fit-check figure of a 2D run rebuilds each line averaged over what each bin averages
    over, as the phase model fitted it: its residual is the fit's own (the window's reduced χ²).
    Drawn as point samples with the same (instrument-free) widths it is 20 times larger."""
    from xrdpipe.config import FitCheckSpec
    from xrdpipe.plots import fits

    syn = make_experiment(tmp_path / "exp", scenario="nfm", n_frames=2, n_rest=0, seed=5)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    xrdpipe.fit_experiment(exp, progress=False)
    patterns, res = xrdpipe.open_dataset(exp.run.run_file), xrdpipe.open_results(exp.run.run_file)
    assert res.peaks.attrs["instrument"] == "auto" and "instrument_offset" in patterns
    spec = FitCheckSpec(frames=[1], windows=[exp.windows[0].name])

    def residual_rms() -> float:
        fig = fits.plot_fit_check(patterns, res.peaks, phases=exp.phases, windows=exp.windows, spec=spec)
        resid = fig.axes[1].lines[0].get_ydata()
        return float(np.sqrt(np.nanmean(np.square(resid))))

    binned = residual_rms()
    monkeypatch.setattr(fits, "_instrument", lambda *a: None)
    point = residual_rms()
    # the figure's residual is the fit's own misfit (these demo lines peak at ~1e5 σ per bin)...
    redchi = float(res.peaks.redchi.sel(frame=1).where(res.peaks.window == exp.windows[0].name, drop=True).max())
    assert binned < 1.5 * np.sqrt(redchi), (binned, redchi)
    # ... and drawn as point samples it is not
    assert point > 10 * binned, (point, binned)


def test_a_damaged_instrument_record_names_the_file(tmp_path):
    from xrdpipe.errors import StoreError
    from xrdpipe.run.store import RunFile

    path = tmp_path / "run.nxs"
    radial = np.linspace(5.0, 6.0, 11)
    with RunFile.open_for_writing(path, radial=radial, unit="2th_deg", wavelength_A=0.62, fingerprint={},
                                  provenance={}, instrument_sd=np.full(11, 0.01), instrument_offset=np.zeros(11)):
        pass
    np.testing.assert_array_equal(read_run_info(path).instrument_sd, np.full(11, 0.01))
    with h5py.File(path, "r+") as h5:
        del h5["/entry/patterns/instrument_sd"]
        h5["/entry/patterns/instrument_sd"] = np.full(7, 0.01)
    with pytest.raises(StoreError, match=r"run\.nxs: /entry/patterns/instrument_sd has 7 values, the radial axis 11"):
        read_run_info(path)
