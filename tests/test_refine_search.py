"""The cell search over a monoclinic cell's angle: β on the search grid beside the lengths."""

import numpy as np
import pytest

from xrdpipe.refine import PhaseModel, RefinementModel, calculate_pattern, refine_pattern
from xrdpipe.refine.structures import Atom, Structure

WL = 0.6209
X = np.linspace(5.0, 30.0, 3000)
TRUTH = (5.67, 2.86, 5.80, 113.2)          # O'3-like, C2/m


@pytest.mark.parametrize(("method", "dbeta"), [("lebail", 1.0), ("pawley", -1.5)])
def test_monoclinic_beta_searched_from_off_start_values(method, dbeta):
    """C2/m from lengths 0.4 % off and β 1.0° or 1.5° off (inside the default ±2° search
    range): a, b, c within 1e-4 relative and β within 0.01° of the truth, status ok. Before β
    was on the search grid, least squares from these starts ended at the edge of the range."""
    atoms = (Atom("Na", "Na", (0, 0, 0.5), 1.0, 1.0), Atom("Mn", "Mn", (0, 0, 0), 1.0, 0.3),
             Atom("O", "O", (0.28, 0, 0.79), 1.0, 0.6))
    gen = RefinementModel([PhaseModel("M", Structure("C2/m", TRUTH[:3] + (90.0, TRUTH[3], 90.0), atoms),
                                      profile={"W": 9e-4, "Y": 0.006}, scale=2e-2)], wavelength_A=WL,
                          correction="none")
    y0 = calculate_pattern(gen, X, background=300.0)
    y = np.random.default_rng(3).poisson(y0).astype(float)
    start = Structure("C2/m", (5.67 * 1.004, 2.86 * 0.996, 5.80 * 1.004, 90.0, 113.2 + dbeta, 90.0), ())
    r = refine_pattern(RefinementModel([PhaseModel("M", start)], wavelength_A=WL, method=method), X, y,
                       np.sqrt(np.maximum(y, 1.0)))
    assert r.status == "ok", r.message
    for k, v in zip(("a", "b", "c"), TRUTH):
        assert abs(r.value(f"M.{k}") / v - 1) < 1e-4, k
    assert abs(r.value("M.beta") - TRUTH[3]) < 0.01
