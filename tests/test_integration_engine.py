"""The frame-parallel engine gives pyFAI's own answers."""

import numpy as np
import pytest

from xrdpipe.calibration import Calibration
from xrdpipe.frames import FrameRef
from xrdpipe.integration import Integrator
from xrdpipe.streaming import integrate_frames
from xrdpipe.testing import demo_geometry, demo_mask


@pytest.fixture(scope="module")
def setup():
    shape = (256, 256)
    ai = demo_geometry(shape)
    rng = np.random.default_rng(1)
    mask = demo_mask(shape)
    dark = rng.uniform(0, 2, shape).astype(np.float32)
    flat = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    frame = rng.poisson(50 + 30 * np.sin(np.arange(shape[1]) / 7.0)[None, :], shape).astype(np.uint32)
    frame[mask] = np.iinfo(np.uint32).max
    frame[100, 17] = np.iinfo(np.uint32).max  # a hot pixel outside the mask: must be ignored
    cal = Calibration(None, ai, 0.6209, shape, mask, dark, flat)
    return cal, frame, shape


@pytest.mark.parametrize("splitting", ["no", "bbox", "full"])
@pytest.mark.parametrize("unit", ["2th_deg", "q_A^-1"])
def test_same_answers_as_pyfai(setup, splitting, unit):
    cal, frame, shape = setup
    kw = dict(npt=500, unit=unit, splitting=splitting, polarization_factor=0.95)
    fast = Integrator(cal, shape, engine="xrdpipe", **kw)
    ref = Integrator(cal, shape, engine="pyfai", **kw)
    assert fast.engine == "xrdpipe"
    np.testing.assert_allclose(fast.radial, ref.radial)
    i1, s1 = fast.integrate(frame)
    i2, s2 = ref.integrate(frame)
    ok = np.isfinite(i2)
    assert ok.sum() > 400
    np.testing.assert_array_equal(np.isfinite(i1), ok)
    np.testing.assert_allclose(i1[ok], i2[ok], rtol=1e-5)
    np.testing.assert_allclose(s1[ok], s2[ok], rtol=1e-5)
    # the hot pixel really was dropped: setting it to a normal value changes nothing much
    clean = frame.copy()
    clean[100, 17] = 50
    i3, _ = fast.integrate(clean)
    assert np.nanmax(np.abs(i3 - i1) / i1) < 0.05


def test_streaming_keeps_order_and_reports_failures(setup, tmp_path):
    cal, frame, shape = setup
    import h5py

    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry/data/data"] = np.stack([frame] * 5)
    refs = [FrameRef(path, i, "/entry/data/data") for i in range(5)] + [FrameRef(tmp_path / "gone.h5", 0)]
    integ = Integrator(cal, shape, npt=300)
    out = list(integrate_frames(list(enumerate(refs)), integ, workers=2, prefetch=2))
    assert [o.position for o in out] == list(range(6))
    assert all(o.error is None for o in out[:5])
    assert out[5].intensity is None and "cannot read the frame" in out[5].error
    np.testing.assert_array_equal(out[0].intensity, out[4].intensity)


@pytest.mark.parametrize("radial_range, azimuth_range", [(None, None), ((5.0, 20.0), (-90.0, 45.0))])
def test_parallel_full_split_is_pyfais_own_matrix(setup, monkeypatch, radial_range, azimuth_range):
    """Built band by band (here 7 bands) by xrdpipe's kernel, the matrix is exactly the one
    pyFAI's integrate1d uses (masked pixels, the radial and azimuth ranges)."""
    from concurrent.futures import ThreadPoolExecutor

    import xrdpipe.integration as integration

    cal, frame, shape = setup
    monkeypatch.setattr(integration, "_BAND_PIX", 10_000)
    integ = Integrator(cal, shape, npt=500, radial_range=radial_range, azimuth_range=azimuth_range)
    with ThreadPoolExecutor(2) as pool:
        data, indices, indptr, radial = integ._full_split(integ._ai.detector.mask, pool, 2)
    p_data, p_indices, p_indptr, p_radial = integ._probe_matrix()   # pyFAI's CSR matrix, transposed
    np.testing.assert_array_equal(radial, p_radial)
    np.testing.assert_array_equal(indptr, p_indptr)
    np.testing.assert_array_equal(indices, p_indices)
    np.testing.assert_array_equal(data, p_data)
    split = np.diff(indptr) > 1
    assert split.sum() > 20_000                  # most pixels are split: the areas were compared
    assert data.size > 50_000


@pytest.mark.parametrize("chi_disc_at_pi", [True, False])
def test_full_split_around_the_beam_centre(chi_disc_at_pi):
    """The beam centre on the detector: pixels around it span many bins, and a column of pixels
    straddles the azimuthal discontinuity (at 180° or at 0°), whose azimuths are unwrapped as
    pyFAI's full-splitting engine does: exactly its matrix.

    (Compared with the engine itself: pyFAI's ``integrate1d`` hands it ``chiDiscAtPi=True``
    whatever the geometry says, so with the cut at 0° it splits the pixels across the cut as
    polygons spanning 2π; xrdpipe keeps the geometry's own cut.)"""
    from concurrent.futures import ThreadPoolExecutor

    import pyFAI
    from pyFAI import units
    from pyFAI.detectors import Detector
    from pyFAI.ext.splitPixelFullCSC import FullSplitCSC_1d

    shape = (96, 112)
    det = Detector(pixel1=75e-6, pixel2=75e-6, max_shape=shape)
    ai = pyFAI.load({"detector": det, "dist": 0.05, "poni1": 40.3 * 75e-6, "poni2": 61.7 * 75e-6,
                     "rot1": 0.01, "rot2": -0.02, "wavelength": 0.6209e-10})
    ai.chiDiscAtPi = chi_disc_at_pi
    integ = Integrator(Calibration(None, ai, 0.6209, shape), shape, npt=300)
    with ThreadPoolExecutor(2) as pool:
        data, indices, indptr, radial = integ._full_split(None, pool, 2)
    pos = integ._ai.array_from_unit(shape, "corner", units.to_unit("2th_deg"), scale=False)
    engine = FullSplitCSC_1d(pos, bins=300, pos0_range=(max(0.0, float(pos[..., 0].min())), float(pos[..., 0].max())),
                             unit=units.to_unit("2th_deg"), chiDiscAtPi=chi_disc_at_pi)
    p_data, p_indices, p_indptr = engine.lut
    np.testing.assert_allclose(radial, engine.bin_centers * units.to_unit("2th_deg").scale, rtol=1e-12)
    np.testing.assert_array_equal(indptr, p_indptr)
    np.testing.assert_array_equal(indices, p_indices)
    np.testing.assert_array_equal(data, p_data)
    chi = pos[..., 1]
    across = np.ptp(chi, axis=-1) > np.pi                 # corners on both sides of the cut
    assert across.sum() >= 20
    assert np.diff(indptr).max() >= 3


def test_frames_read_ahead_give_the_same_patterns(setup, tmp_path):
    """Frames read ahead while the integrator is built (FramePrefetch) are integrated as if read
    then: same numbers bit for bit, a missing file still a failure record, the budget obeyed."""
    import h5py

    from xrdpipe.streaming import FramePrefetch

    cal, frame, shape = setup
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5["/entry/data/data"] = np.stack([frame + i for i in range(4)])
    refs = [FrameRef(path, i, "/entry/data/data") for i in range(4)] + [FrameRef(tmp_path / "gone.h5", 0)]
    ahead = FramePrefetch(refs, shape)
    integ = Integrator(cal, shape, npt=300)
    ahead._thread.join()                         # (here all of them, whatever the timing)
    ahead.stop()
    assert ahead.read == 5                       # the four frames and the missing file's error
    jobs = list(enumerate(refs))
    read = list(integrate_frames(jobs, integ, workers=2, read_ahead=ahead))
    plain = list(integrate_frames(jobs, integ, workers=2))
    assert ahead.take(refs[0]) is None           # taken once
    for a, b in zip(read, plain):
        assert a.error == b.error
        if a.error is None:
            np.testing.assert_array_equal(a.intensity, b.intensity)
            np.testing.assert_array_equal(a.sigma, b.sigma)
    assert read[4].intensity is None and "cannot read the frame" in read[4].error
    small = FramePrefetch(refs, shape, budget_bytes=frame.nbytes + 1)
    small._thread.join()
    assert small.read == 2                        # stops once the budget is held
    small.close()
    assert small.take(refs[0]) is None
    with pytest.raises(ValueError, match="frames read ahead stay in this process: scheduler 'processes'"):
        next(integrate_frames(jobs, integ, scheduler="processes", read_ahead=FramePrefetch(refs, shape)))
