"""Reproduce the authors' pyFAI integration of a real Diamond I12 CeO2 frame."""

import numpy as np

from xrdpipe import Integrator, load_calibration
from xrdpipe.frames import FrameRef, read_frame


def test_diamond_i12_ceo2_reproduces_reference(data_dir):
    d = data_dir / "diamond-i12-ceo2"
    cal = load_calibration(d / "DLS_CeO2_1200mm_pyFAI.poni")
    assert abs(cal.wavelength_A - 0.1393) < 1e-6
    frame = read_frame(FrameRef(d / "pixium_03150.tif"))
    assert frame.shape == (1441, 1440)
    integ = Integrator(cal, frame.shape, npt=5000, unit="2th_deg", polarization_factor=0.99,
                       splitting="full")
    intensity, sigma = integ.integrate(frame)
    ref = np.loadtxt(d / "integrated.dat")
    # compare on the reference's grid over the common range
    ours = np.interp(ref[:, 0], integ.radial, intensity, left=np.nan, right=np.nan)
    ok = np.isfinite(ours) & (ref[:, 1] > 0)
    assert ok.sum() > 4900
    r = np.corrcoef(ours[ok], ref[ok, 1])[0, 1]
    ratio = np.median(ours[ok] / ref[ok, 1])
    assert r >= 0.99999, r
    assert abs(ratio - 1) < 1e-3, ratio
    # Poisson esd: positive where there is signal, and about sqrt(counts)/normalisation
    good = np.isfinite(sigma) & (intensity > 0)
    assert (sigma[good] > 0).all()
