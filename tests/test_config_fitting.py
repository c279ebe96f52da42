"""[[phases]] and [[windows]]: read, cross-checked, and the README's examples valid."""


import pytest
from config_cases import GOOD, PHASES, errors_of, write

from xrdpipe.config import load_experiment


def test_phases_and_windows_are_read(config_folder):
    text = GOOD.format(times='"header"') + PHASES + """
[[windows]]
name = "003"
range = [6.2, 7.2]
peaks = ["O3 003", "P3 003"]
profile = "split_pseudo_voigt"
background = { polynomial = 2 }
share = ["fwhm"]
center_bounds = { "P3 003" = [6.2, 6.5] }
[fit]
presence = "ftest"
"""
    exp = load_experiment(write(config_folder, text))
    w = exp.windows[0]
    assert w.peaks == ["O3 003", "P3 003"] and w.background_degree == 2 and w.seed == "previous"
    assert w.split_peak("P3 003") == ("P3", (0, 0, 3))
    assert exp.fit.presence == "ftest" and exp.fit.engine == "batched"


@pytest.mark.parametrize("window, key, words", [
    ('peaks = ["O4 003"]', "windows.0.peaks", "names phase 'O4', which is not in [[phases]]; did you mean 'O3'?"),
    ('peaks = ["O3 001"]', "windows.0.peaks", "(0 0 1) is not allowed in R-3m (phase O3)"),
    ('peaks = ["O3 1a4"]', "windows.0.peaks", "cannot read Miller indices from '1a4'"),
    ('peaks = ["O3 003", "O3 003"]', "windows.0.peaks", "listed twice"),
    ('peaks = ["O3 003"]\ncenter_bounds = { "P3 003" = [6.2, 6.5] }', "windows.0.center_bounds",
     "'P3 003' is not one of the window's peaks"),
    ('peaks = ["O3 003"]\nprofile = "voigt"', "windows.0.profile", "expected 'pseudo_voigt', 'pearson7'"),
    ('peaks = ["O3 003"]\nbackground = "cubic"', "windows.0.background",
     "expected 'constant', 'linear' or 'quadratic', got 'cubic'"),
    ('peaks = ["O3 003"]\nbackground = 3', "windows.0.background", "{ polynomial = 0 to 4 }"),
    ('peaks = ["O3 003"]\nfree_peaks = [7.5]', "windows.0.free_peaks",
     "a free peak's centre must lie inside the window's range [6.2, 7.2], got 7.5"),
    ('peaks = ["O3 003"]\nfree_peaks = [6.5, 6.5]', "windows.0.free_peaks", "a free peak is listed twice"),
    ('peaks = ["O3 003"]\nfree_peaks = [6.512341, 6.512344]', "windows.0.free_peaks",
     "closer than 6 significant figures"),
])
def test_window_errors_name_the_key(config_folder, window, key, words):
    text = GOOD.format(times='"header"') + PHASES + f'\n[[windows]]\nname = "003"\nrange = [6.2, 7.2]\n{window}\n'
    err = errors_of(write(config_folder, text))
    keys = [k for k, _ in err.problems]
    assert key in keys, err.problems
    assert words in dict(err.problems)[key]


@pytest.mark.parametrize("model", ["phases", "peaks"])
def test_free_peaks_are_read_for_either_engine(config_folder, model):
    text = (GOOD.format(times='"header"') + PHASES + '\n[[windows]]\nname = "003"\nrange = [6.2, 7.2]\n'
            f'peaks = ["O3 003"]\nfree_peaks = [6.5, 6.95]\n[fit]\nmodel = "{model}"\n')
    exp = load_experiment(write(config_folder, text))
    assert exp.windows[0].free_peaks == [6.5, 6.95] and exp.fit.model == model


def test_unknown_space_group_suggests_one(config_folder):
    text = GOOD.format(times='"header"') + PHASES.replace('"R3m"', '"R3-m"')
    err = errors_of(write(config_folder, text))
    assert err.problems[0][0] == "phases.1.space_group" and "did you mean 'R3m'" in err.problems[0][1]


def test_the_readme_peak_fitting_example_is_valid(config_folder):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Peak fitting")[1].split("```toml")[1].split("```")[0]
    exp = load_experiment(write(config_folder, GOOD.format(times='"header"') + block))
    assert [w.name for w in exp.windows] == ["003"] and exp.windows[0].center_bounds["P3 003"] == (6.2, 6.5)
    assert exp.fit.block_frames == 256


def test_the_readme_lattice_example_is_valid(config_folder):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Lattice parameters")[1].split("```toml")[1].split("```")[0]
    text = GOOD.format(times='"header"') + block + '\n[[windows]]\nname = "104"\nrange = [16.2, 16.7]\npeaks = ["O3 104"]\n'
    exp = load_experiment(write(config_folder, text))
    assert [p.name for p in exp.phases] == ["O3", "P3", "P2-Mg"] and exp.phases[1].c == 16.7
    assert exp.phases[2].space_group == "P63/mmc" and exp.lattice.fraction_window == "104"


def test_fit_keys_added_later_leave_old_runs_up_to_date():
    """[fit] instrument / instrument_sd / naming at their defaults are not part of the stage and
    run-file keys (a run made before them is not refitted); set, they are."""
    from xrdpipe.config import FitSpec

    old = FitSpec().model_dump(mode="json", exclude={"workers"})
    old = {k: v for k, v in old.items() if k not in ("instrument", "instrument_sd", "naming")}
    assert FitSpec().key(exclude={"workers"}) == old
    assert FitSpec(instrument="none").key(exclude={"workers"})["instrument"] == "none"
    assert FitSpec(instrument_sd=0.013).key(exclude={"workers"})["instrument_sd"] == 0.013
    assert FitSpec(naming="frame").key(exclude={"workers"})["naming"] == "frame"


def test_a_phase_named_free_is_refused(config_folder):
    """"free" is the peak tables' phase of the lines of no phase: a phase of that name would be
    taken for one (no fraction, no cell), so it is refused by its key."""
    text = (GOOD.format(times='"header"') + PHASES + '\n[[phases]]\nname = "free"\nspace_group = "Fm-3m"\na = 4.05\n'
            '\n[[windows]]\nname = "003"\nrange = [6.2, 7.2]\npeaks = ["O3 003"]\n')
    err = errors_of(write(config_folder, text))
    (key, words), = [(k, w) for k, w in err.problems if k.endswith(".name")]
    assert key.startswith("phases.") and "'free' is reserved" in words and "free_peaks" in words
