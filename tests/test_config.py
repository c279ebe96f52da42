"""The experiment file: validation, resolved paths and the wording of errors."""

import textwrap
from datetime import timedelta

import pytest
from click.testing import CliRunner

from xrdpipe.cli import main
from xrdpipe.config import TimesFromLog, TimesPeriodic, load_experiment
from xrdpipe.errors import ConfigError

GOOD = """
schema_version = 1
[run]
name = "nfm-cell2"
output = "results"
[frames]
files = "raw/*.h5"
dataset = "/entry/data/data"
times = {times}
[calibration]
poni = "cal/ceo2.poni"
mask = "cal/mask.edf"
[integration]
npt = 3000
unit = "2th_deg"
range = [2.0, 30.0]
polarization_factor = 0.99
error_model = "poisson"
splitting = "full"
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "raw").mkdir()
    for name in ("f10.h5", "f9.h5", "f1.h5"):
        (tmp_path / "raw" / name).write_bytes(b"")
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "ceo2.poni").write_text("Distance: 0.1\n")
    (tmp_path / "cal" / "mask.edf").write_bytes(b"")
    (tmp_path / "scans.csv").write_text("file,start,end\n")
    return tmp_path


def write(folder, text, name="exp.toml"):
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def errors_of(path):
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    return info.value


def test_good_file_resolves_paths_and_sorts_naturally(folder):
    exp = load_experiment(write(folder, GOOD.format(times='"header"')))
    assert [f.name for f in exp.frames.files] == ["f1.h5", "f9.h5", "f10.h5"]
    assert exp.calibration.poni == folder / "cal" / "ceo2.poni"
    assert exp.run.output == folder / "results"
    assert exp.run.run_file == folder / "results" / "nfm-cell2.nxs"
    assert exp.integration.range == (2.0, 30.0)
    assert exp.frames.times == "header"


def test_default_output_is_beside_the_experiment_file(folder):
    text = GOOD.format(times='"header"').replace('output = "results"\n', "")
    exp = load_experiment(write(folder, text))
    assert exp.run.output == folder / "results"


def test_times_variants(folder):
    exp = load_experiment(write(folder, GOOD.format(times='{ log = "scans.csv" }')))
    assert isinstance(exp.frames.times, TimesFromLog)
    assert exp.frames.times.log == folder / "scans.csv"
    exp = load_experiment(write(folder, GOOD.format(
        times='{ start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }')))
    t = exp.frames.times
    assert isinstance(t, TimesPeriodic)
    assert t.period_s == 20.0 and t.start.utcoffset() == timedelta(hours=8)


def test_typo_suggests_closest_key(folder):
    text = GOOD.format(times='"header"').replace("npt = 3000", "nmp = 3000")
    err = errors_of(write(folder, text))
    assert err.problems[0][0] == "integration.nmp"
    assert err.problems[0][1].startswith("unknown key; did you mean 'npt'?")
    assert "exp.toml" in str(err)


def test_bad_choice_names_key_and_valid_values(folder):
    text = GOOD.format(times='"header"').replace('splitting = "full"', 'splitting = "fast"')
    err = errors_of(write(folder, text))
    assert err.problems == [("integration.splitting", "expected 'no', 'bbox' or 'full', got 'fast'")]


def test_every_error_reported_at_once(folder):
    text = GOOD.format(times='"header"').replace("npt = 3000", "npt = 2").replace(
        "polarization_factor = 0.99", "polarization_factor = 3")
    keys = [k for k, _ in errors_of(write(folder, text)).problems]
    assert keys == ["integration.npt", "integration.polarization_factor"]


def test_naive_start_time_is_rejected(folder):
    err = errors_of(write(folder, GOOD.format(times='{ start = "2025-07-02T19:05:59", period_s = 20.0 }')))
    assert err.problems[0][0] == "frames.times.start"
    assert "timezone" in err.problems[0][1]


def test_times_of_unknown_form(folder):
    err = errors_of(write(folder, GOOD.format(times="{ every = 3 }")))
    assert err.problems[0][0] == "frames.times"
    assert "expected \"header\"" in err.problems[0][1]


def test_glob_matching_nothing(folder):
    err = errors_of(write(folder, GOOD.format(times='"header"').replace("raw/*.h5", "raw/*.cbf")))
    assert err.problems[0][0] == "frames.files"
    assert "matches no file" in err.problems[0][1]


def test_missing_poni(folder):
    err = errors_of(write(folder, GOOD.format(times='"header"').replace("cal/ceo2.poni", "cal/none.poni")))
    assert err.problems[0][0] == "calibration.poni"
    assert "no such file" in err.problems[0][1]


def test_schema_version(folder):
    err = errors_of(write(folder, GOOD.format(times='"header"').replace("schema_version = 1", "schema_version = 7")))
    assert err.problems[0][0] == "schema_version"
    err = errors_of(write(folder, GOOD.format(times='"header"').replace("schema_version = 1", "")))
    assert err.problems[0] == ("schema_version", "required key is missing; add schema_version = 1")


def test_frames_and_patterns_exclusive_and_one_needed(folder):
    text = GOOD.format(times='"header"') + '\n[patterns]\nfiles = "raw/*.h5"\nwavelength_A = 0.6\n'
    assert "exclusive" in str(errors_of(write(folder, text)))
    text = 'schema_version = 1\n[run]\nname = "x"\n'
    assert "expected a [frames] section" in str(errors_of(write(folder, text)))


def test_patterns_in_2theta_need_wavelength(folder):
    text = 'schema_version = 1\n[run]\nname = "x"\n[patterns]\nfiles = "raw/*.h5"\n'
    assert "wavelength_A is required" in str(errors_of(write(folder, text)))


def test_a_misspelt_section_is_named_with_the_right_one(folder):
    text = GOOD.format(times='"header"') + '\n[refine]\nphases = ["O3"]\n'
    err = errors_of(write(folder, text))
    assert err.problems[0][0] == "refine"
    assert "did you mean 'refinement'?" in err.problems[0][1]


def test_toml_syntax_error_names_file(folder):
    p = write(folder, "schema_version = \n")
    err = errors_of(p)
    assert str(p) in str(err) and "not valid TOML" in str(err)


def test_cli_validate(folder):
    runner = CliRunner()
    good = write(folder, GOOD.format(times='"header"'))
    res = runner.invoke(main, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output and "npt = 3000" in res.output
    bad = write(folder, GOOD.format(times='"header"').replace("npt", "nptt"), name="bad.toml")
    res = runner.invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "integration.nptt: unknown key; did you mean 'npt'?" in res.output


PHASES = """
[[phases]]
name = "O3"
space_group = "R-3m"
a = 2.985
c = 16.0
[[phases]]
name = "P3"
space_group = "R3m"
a = 2.93
c = 16.7
"""


def test_phases_and_windows_are_read(folder):
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
    exp = load_experiment(write(folder, text))
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
])
def test_window_errors_name_the_key(folder, window, key, words):
    text = GOOD.format(times='"header"') + PHASES + f'\n[[windows]]\nname = "003"\nrange = [6.2, 7.2]\n{window}\n'
    err = errors_of(write(folder, text))
    keys = [k for k, _ in err.problems]
    assert key in keys, err.problems
    assert words in dict(err.problems)[key]


def test_unknown_space_group_suggests_one(folder):
    text = GOOD.format(times='"header"') + PHASES.replace('"R3m"', '"R3-m"')
    err = errors_of(write(folder, text))
    assert err.problems[0][0] == "phases.1.space_group" and "did you mean 'R3m'" in err.problems[0][1]


def test_the_readme_peak_fitting_example_is_valid(folder):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Peak fitting")[1].split("```toml")[1].split("```")[0]
    exp = load_experiment(write(folder, GOOD.format(times='"header"') + block))
    assert [w.name for w in exp.windows] == ["003"] and exp.windows[0].center_bounds["P3 003"] == (6.2, 6.5)
    assert exp.fit.block_frames == 256


def test_the_readme_lattice_example_is_valid(folder):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Lattice parameters")[1].split("```toml")[1].split("```")[0]
    text = GOOD.format(times='"header"') + block + '\n[[windows]]\nname = "104"\nrange = [16.2, 16.7]\npeaks = ["O3 104"]\n'
    exp = load_experiment(write(folder, text))
    assert [p.name for p in exp.phases] == ["O3", "P3", "P2-Mg"] and exp.phases[1].c == 16.7
    assert exp.phases[2].space_group == "P63/mmc" and exp.lattice.fraction_window == "104"
