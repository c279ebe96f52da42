"""Runs that do not go once from the first phase to the second, on the hard series of
:mod:`xrdpipe.testing` (typed cells off, basal lines apart by 1.3-2 FWHM and 1.6x broader where
the phases coexist, per-phase intensities, Al, Poisson noise over 2,000 counts): a charge then a
discharge (the phase that left comes back, O3 → P3 → O3), and a run that starts in the
two-phase region (the first phase never alone). And a strong line in no window just above one
(MCM's (102) above the "100" window), whose tail the window fits whatever the lines' width."""

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


def _cycle(scenario: str, error, separation: float, dseed: int, seed: int):
    """A charge then a discharge of 24 + 24 frames from :func:`xrdpipe.testing.cycle_series`
    (typed cells ``error`` off, basal lines ``separation`` FWHM apart), fitted and scored: the
    series, its cells and fractions, the score."""
    dif = Difficulty(start_error=error, separation_fwhm=separation, broadening=1.6, intensity_jitter=0.3,
                     hard_windows=True, seed=dseed)
    series = cycle_series(24, scenario=scenario, counts=0.05, background=2000.0, seed=seed, difficulty=dif)
    phases, windows = fit_config(scenario, dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    return series, lat, score_phases(lat, table, series.states(), series.peaks)


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
    series, lat, score = _cycle("nfm", error, separation, dseed, seed)
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


def test_a_strong_line_in_no_window_is_fitted_by_its_tail_whatever_its_width():
    """MCM's P2 (102) lies in no window, ~0.28° above the "100" window (a third of its
    width): 4.0 FWHM of P2's narrow lines, 2.5 FWHM of the lines broadened 1.6x where P2 and
    P''2 coexist. Its tail was fitted only within 4 FWHM, a reach that moved with the width:
    where the two-phase region ended and the lines narrowed, the (102) (area ~3x the (100))
    dropped out, its tail left on the window's edge (Al's eta pushed to 0, the window at
    χ²/ν 3.6 for 0.9). A line in no window is now fitted by its tail as far out as it is
    listed, whatever its width."""
    from xrdpipe.phasefit.model import _TAIL_FWHM, _TAIL_REACH, PhaseModel

    dif = Difficulty(start_error=((0.008, 0.010), (0.009, -0.015)), separation_fwhm=1.15, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=3)
    pat = pattern_series(2, scenario="mcm", counts=0.05, background=2000.0, seed=1, difficulty=dif).as_patterns()
    phases, windows = fit_config("mcm", dif)
    m = PhaseModel(phases, windows, FitSpec(), LatticeSpec(), radial=pat.radial, unit=pat.unit,
                   wavelength_A=pat.wavelength_A)
    w = [s.name for s in windows].index("100")
    r = int(np.flatnonzero((m.r_phase == 0) & (m.r_window == w) & np.all(m.r_hkl == (1, 0, 2), axis=1))[0])
    cells = m.cell0.copy()
    cells[0, 0], cells[0, 2] = 2.8383, 11.2585
    beyond = m.centres(cells[None], np.array([0.0]))[0][r] - m.windows[w].x[-1]
    assert 0.26 < beyond < _TAIL_REACH * np.ptp(windows[w].range)
    assert _TAIL_FWHM * 0.069 < beyond < _TAIL_FWHM * 0.111
    for fwhm in (0.04, 0.069, 0.111):       # beyond 4 FWHM of the narrow lines, within of the broad
        assert m.inside(cells, 0.0, np.full((m.P, m.W), fwhm), tails=True)[r]
        assert not m.inside(cells, 0.0, np.full((m.P, m.W), fwhm))[r]


@pytest.mark.parametrize("dseed, seed", [(28, 203), (5, 7)])
def test_the_window_beside_a_line_in_no_window_fits_to_its_noise(dseed, seed):
    """P2 -> P''2 (40 frames, P2 typed -0.6 %/+1.3 % (a/c), P''2 -0.5 %/+1.9 %): where P''2 is
    alone (19 frames) its (102), in no window 4.2 FWHM above the "100" window, was left out of
    the window's model; its tail sat on the window's upper edge, the window at χ²/ν 1.5-1.75 and
    the Al line's eta pressed to 0 taking up what it could. (On the same reaction as 2D frames,
    the window's χ²/ν was ~900 and the 002/004 windows' ~10, through the shared cells.) Now the
    window fits to its noise and Al's eta is its own (~0.4)."""
    dif = Difficulty(start_error=((-0.006, 0.013), (-0.005, 0.019)), separation_fwhm=1.0, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=dseed)
    series = pattern_series(40, scenario="mcm", counts=0.05, background=2000.0, seed=seed, difficulty=dif)
    phases, windows = fit_config("mcm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    states = series.states()
    alone = [r for r in range(len(states)) if list(states[r]) == ["P''2"]]
    assert len(alone) >= 15
    w = list(table.windows).index("100")
    assert np.median(table.redchi[alone, w]) < 1.2 and np.max(table.redchi[alone, w]) < 1.4, table.redchi[alone, w]
    al = [p.name for p in phases].index("Al")
    assert np.nanmedian(table.phase["phase_eta"][alone, al]) > 0.2


def test_a_cycle_whose_two_phase_region_ends_beside_a_line_in_no_window():
    """P2 -> P''2 -> P2 (24 + 24 frames) with P2 typed 1 % above in c and P''2 1.5 % below: the
    first frame's lines (P2's, c 11.19 Å) lie nearer P''2's typed cell, and the naming check
    fits the series with both names. Where the discharge's two-phase region ended, the run
    named right lost P2's (102) tail above the "100" window (tests above): +1,300 in summed
    n·ln χ² over frames 38-39, the wrong name kept (presence 0.125, fraction MAE 0.49). Now the
    right name fits the series better by ~490."""
    _, _, score = _cycle("mcm", ((0.008021761537284755, 0.010156783190028416),
                                 (0.00889559550806468, -0.015331920585695717)), 1.152528635623245, 3, 353)
    assert score["n_coexistence"] >= 4
    assert score["presence"] == 1.0, score
    assert score["fraction_mae"] < 0.005 and score["basal_rms_deg"] < 1e-4, score
    assert score["median_da"] < 3e-4 and score["median_dc"] < 1e-3, score
    assert 0.5 <= score["within_1esd"] <= 0.85, score
