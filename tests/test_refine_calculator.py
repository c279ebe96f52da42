"""The calculated pattern: far tails summed on the fly against whole profiles computed here."""

import numpy as np
import pytest

pytest.importorskip("pymatgen")

from refine_cases import WL  # noqa: E402

from xrdpipe.refine import (  # noqa: E402
    PhaseModel,
    RefinementModel,
)
from xrdpipe.refine.structures import template  # noqa: E402


def test_far_tails_summed_on_the_fly_give_the_whole_profiles_and_their_derivatives():
    """The profiles are stored within ±NEAR_FWHM and their far Lorentzian tails summed by
    kernels where used: the pattern, the Le Bail products P @ I and P.T @ v and the extraction
    equal those of the whole windows stored (to rounding), and every Jacobian column (cell,
    widths, zero, displacement, asymmetry), tails included, its central difference."""
    from xrdpipe.refine.calculator import Calculator
    from xrdpipe.refine.lebail import extract, profile_matrix
    from xrdpipe.refine.structures import Structure

    x = np.linspace(3.0, 24.0, 5000)
    prof = {"U": 0.0004, "V": 0.0, "W": 0.0009, "X": 0.004, "Y": 0.02}
    model = RefinementModel([PhaseModel("O3", template("O3", a=2.9852, c=15.9967), profile=prof),
                             PhaseModel("Al", Structure("Fm-3m", (4.0495,) * 3 + (90.0,) * 3, ()), profile=prof)],
                            wavelength_A=WL, method="lebail", correction="both", asymmetry=True)
    calc = Calculator(model, x)
    L = calc.layout
    theta = L.start()
    for name, v in {"asym_P1": 0.01, "asym_P2": 0.004, "zero": 0.003, "displacement": 0.002, "bkg_0": 50.0}.items():
        theta[L.index[name]] = v
    inten = np.random.default_rng(3).uniform(1.0, 100.0, int(calc.offsets[-1]))
    st = calc.reflection_state(theta, inten)
    split, whole = calc.profiles(st, theta), calc.profiles(st, theta, full=True)
    assert split["P"].size < whole["P"].size / 3          # most of each window is far tail
    dense = np.zeros((x.size, inten.size))
    np.add.at(dense, (whole["idx"], whole["r"]), whole["P"])
    v = np.random.default_rng(4).uniform(0.5, 2.0, x.size)
    P = profile_matrix(calc, split, inten.size)
    assert np.allclose(P @ inten, dense @ inten, rtol=1e-12, atol=0)
    assert np.allclose(P.T @ v, dense.T @ v, rtol=1e-12, atol=0)
    assert np.allclose(calc.pattern(theta, inten), calc.background(theta) + dense @ inten, rtol=1e-12, atol=0)
    y = calc.pattern(theta, inten * 1.3) + 20.0
    e1 = extract(calc, calc.profiles(st, theta), theta, inten, y, 4)
    e2 = extract(calc, whole, theta, inten, y, 4)
    assert np.allclose(e1, e2, rtol=1e-10, atol=0)
    names = ["O3.a", "O3.c", "O3.U", "O3.W", "O3.X", "O3.Y", "Al.a", "zero", "displacement", "asym_P1", "asym_P2"]
    cols = np.array([L.index[n] for n in names])
    _, J, _ = calc.jacobian(theta, inten, cols)
    for c, (name, j) in enumerate(zip(names, cols)):
        h = 1e-6 * max(abs(theta[j]), 1e-2)
        tp, tm = theta.copy(), theta.copy()
        tp[j] += h
        tm[j] -= h
        num = (calc.pattern(tp, inten) - calc.pattern(tm, inten)) / (2 * h)
        assert np.max(np.abs(J[:, c] - num)) < 2e-4 * np.max(np.abs(num)), name
