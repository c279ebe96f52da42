"""A charge, then a discharge: the phase that left comes back (O3 → P3 → O3), on the hard series
of :mod:`xrdpipe.testing` (typed cells off, basal lines 1.9 FWHM apart and 1.6x broader where
the phases coexist, per-phase intensities, Al, Poisson noise over 2,000 counts)."""

import pytest

from xrdpipe.config import FitSpec, LatticeSpec
from xrdpipe.lattice import refine_lattice
from xrdpipe.phasefit import fit_phases
from xrdpipe.testing import Difficulty, cycle_series, fit_config, score_phases


@pytest.mark.parametrize("error, separation, dseed, seed", [
    (((0.0093, 0.0059), (0.0099, -0.0104)), 1.85, 606, 417),
    (((0.0061, 0.0092), (-0.0054, -0.0084)), 1.99, 830, 13)])
def test_a_phase_that_left_comes_back_where_it_left(error, separation, dseed, seed):
    """O3 typed 0.6-0.9 % above its a where the charge starts: on the charge it is followed
    into the two-phase region (its a 1-2 % below the typed one by then); on the discharge it
    comes back there. Before, the searches for it were centred on the typed cell only, whose
    ±1.5 % in a did not reach where it came back: O3 was called absent at the edge of its
    reach, P3 moved onto O3's lines and kept them to the end of the run (4 of 16 such series;
    presence 0.69-0.99, fraction MAE 0.17). A phase's last cell, where it lies half a search
    range or more from the typed one, is now searched around too, the better kept: 16 of 16
    (presence 1.000, coexistence fraction MAE ≤ 0.0015)."""
    dif = Difficulty(start_error=error, separation_fwhm=separation, broadening=1.6, intensity_jitter=0.3,
                     hard_windows=True, seed=dseed)
    series = cycle_series(24, scenario="nfm", counts=0.05, background=2000.0, seed=seed, difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    score = score_phases(lat, table, series.states(), series.peaks)
    assert score["n_coexistence"] >= 4
    assert score["presence"] == 1.0, score
    assert score["fraction_mae"] < 0.005 and score["max_dc"] < 1e-3, score
    assert score["median_da"] < 3e-4 and score["median_dc"] < 1e-3, score
    assert 0.5 <= score["within_1esd"] <= 0.85, score
    # the discharge's O3, in the frames where it is alone again, is O3 (not P3 on its lines)
    names = list(lat.phases)
    end = [s for s in range(len(series.x)) if series.states()[s].keys() == {"O3"} and s >= len(series.x) // 2]
    assert lat.values["fraction"][end, names.index("O3")].min() == 1.0
