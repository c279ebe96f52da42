"""Runs that do not go once from the first phase to the second, on the hard series of
:mod:`xrdpipe.testing` (typed cells off, basal lines apart by 1.3-2 FWHM and 1.6x broader where
the phases coexist, per-phase intensities, Al, Poisson noise over 2,000 counts): a charge then a
discharge (the phase that left comes back, O3 → P3 → O3), and a run that starts in the
two-phase region (the first phase never alone)."""

import numpy as np
import pytest

from xrdpipe.config import FitSpec, LatticeSpec
from xrdpipe.lattice import refine_lattice
from xrdpipe.phasefit import fit_phases
from xrdpipe.testing import Difficulty, cycle_series, fit_config, pattern_series, score_phases


@pytest.mark.parametrize("scenario, seed", [("nfm", 3), ("mcm", 1)])
def test_a_charge_and_discharge_simulated_without_the_projects_simulator(scenario, seed):
    """O3 -> P3 -> O3 and P2 -> P''2 -> P2 (24 + 24 frames) from ``tests/foreign_series.py``:
    Voigt lines, a zero shift, a curved background, the library's typed cells, the cells staying
    put in the two-phase region and the phase that left coming back where it left. Presence
    right, the fractions where the phases coexist, the cells where a phase holds 30 % and their
    esds. Measured (outside the tests) on seeds 1-4 of NFM and 1-3 of MCM: presence 1.000,
    fraction MAE 0.0013-0.0020, median |Δa| ≤ 1e-5 Å and |Δc| ≤ 6e-5 Å, 47-85 % of the cell
    errors within one esd (the zero shift's error, common to the series, moves that share)."""
    from foreign_series import foreign_cycle, score

    series = foreign_cycle(scenario, 24, seed)
    phases, windows = series.config()
    table = fit_phases(series.patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.wavelength_A)
    s = score(series, lat)
    assert s["presence"] >= 0.98 and s["n_coexistence"] >= 6, s
    assert s["fraction_mae"] <= 0.005 and s["median_da"] <= 1e-4 and s["median_dc"] <= 2e-4, s
    assert 0.5 <= s["within_1esd"] <= 0.9, s


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
    names, states = list(lat.phases), series.states()
    end = [s for s in range(len(states)) if states[s].keys() == {"O3"} and s >= len(states) // 2]
    assert lat.values["fraction"][end, names.index("O3")].min() == 1.0


def test_a_run_that_starts_in_the_two_phase_region():
    """P2 → P''2 from the middle of the two-phase region (P2 at 58 %, never alone in the run;
    P''2 alone from the sixth frame): P2's own intensities are learned beside P''2 (whose scale
    leaves it 20 % or more of the sum of 1), and the fractions are the phases' (fraction MAE
    < 0.005; measured 0.0002). Before, P2 had only its raw areas and every frame with it a
    fraction of diffracted intensity (MAE 0.073 here; 0.012-0.073 over 6 such series of both studies)."""
    dif = Difficulty(start_error=((0.0063, 0.0194), (-0.0069, 0.0155)), separation_fwhm=1.32, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=457)
    series = pattern_series(30, scenario="mcm", x_range=(0.595, 0.35), counts=0.05, background=2000.0, seed=650,
                            difficulty=dif)
    phases, windows = fit_config("mcm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    score = score_phases(lat, table, series.states(), series.peaks)
    assert score["presence"] == 1.0 and score["n_coexistence"] >= 4, score
    assert score["fraction_mae"] < 0.005, score
    both = np.array([len(s) == 2 for s in series.states()])
    assert set(lat.fraction_method[both, list(lat.phases).index("P2")]) == {"scale-sum"}
