"""Exports for other programs."""

import numpy as np
import pytest


def test_instprm_carries_the_refined_profile_in_gsas2_units(tmp_path):
    """xrdpipe's FWHM² (deg²) -> GSAS-II's variance (centideg²), X/Y swapped (GSAS-II: X / cos θ,
    Y tan θ, centideg); Polariz. 1.0 when pyFAI already corrected the polarization."""
    from xrdpipe.export import write_instprm

    path = write_instprm(tmp_path / "a.instprm", wavelength_A=0.6209, polarization=1.0, zero_deg=-0.0123,
                         profile={"U": 0.02, "V": -0.004, "W": 0.001, "X": 0.02, "Y": 0.01})
    got = dict(line.split(":", 1) for line in path.read_text().splitlines()[1:])
    k = 1e4 / (8 * np.log(2))
    assert float(got["U"]) == pytest.approx(0.02 * k, rel=1e-5) and float(got["V"]) == pytest.approx(-0.004 * k, rel=1e-5)
    assert float(got["W"]) == pytest.approx(0.001 * k, rel=1e-5)
    assert float(got["X"]) == pytest.approx(1.0) and float(got["Y"]) == pytest.approx(2.0)
    assert float(got["Polariz."]) == 1.0 and float(got["Zero"]) == pytest.approx(-0.0123)
    # a Gaussian FWHM at 2θ = 20° from both parameter sets agrees
    t = np.tan(np.radians(10.0))
    ours = np.sqrt(0.02 * t * t - 0.004 * t + 0.001)
    gsas = 2.3548 * np.sqrt(float(got["U"]) * t * t + float(got["V"]) * t + float(got["W"])) / 100
    assert gsas == pytest.approx(ours, rel=1e-4)
