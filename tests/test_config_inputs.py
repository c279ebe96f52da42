"""The experiment file's inputs: resolved paths, natural order, frame times, what is missing."""

from datetime import timedelta

from config_cases import GOOD, errors_of, write

from xrdpipe.config import TimesFromLog, TimesPeriodic, load_experiment


def test_good_file_resolves_paths_and_sorts_naturally(config_folder):
    exp = load_experiment(write(config_folder, GOOD.format(times='"header"')))
    assert [f.name for f in exp.frames.files] == ["f1.h5", "f9.h5", "f10.h5"]
    assert exp.calibration.poni == config_folder / "cal" / "ceo2.poni"
    assert exp.run.output == config_folder / "results"
    assert exp.run.run_file == config_folder / "results" / "nfm-cell2.nxs"
    assert exp.integration.range == (2.0, 30.0)
    assert exp.frames.times == "header"


def test_default_output_is_beside_the_experiment_file(config_folder):
    text = GOOD.format(times='"header"').replace('output = "results"\n', "")
    exp = load_experiment(write(config_folder, text))
    assert exp.run.output == config_folder / "results"


def test_times_variants(config_folder):
    exp = load_experiment(write(config_folder, GOOD.format(times='{ log = "scans.csv" }')))
    assert isinstance(exp.frames.times, TimesFromLog)
    assert exp.frames.times.log == config_folder / "scans.csv"
    exp = load_experiment(write(config_folder, GOOD.format(
        times='{ start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }')))
    t = exp.frames.times
    assert isinstance(t, TimesPeriodic)
    assert t.period_s == 20.0 and t.start.utcoffset() == timedelta(hours=8)


def test_naive_start_time_is_rejected(config_folder):
    err = errors_of(write(config_folder, GOOD.format(times='{ start = "2025-07-02T19:05:59", period_s = 20.0 }')))
    assert err.problems[0][0] == "frames.times.start"
    assert "timezone" in err.problems[0][1]


def test_times_of_unknown_form(config_folder):
    err = errors_of(write(config_folder, GOOD.format(times="{ every = 3 }")))
    assert err.problems[0][0] == "frames.times"
    assert "expected \"header\"" in err.problems[0][1]


def test_glob_matching_nothing(config_folder):
    err = errors_of(write(config_folder, GOOD.format(times='"header"').replace("raw/*.h5", "raw/*.cbf")))
    assert err.problems[0][0] == "frames.files"
    assert "matches no file" in err.problems[0][1]


def test_missing_poni(config_folder):
    err = errors_of(write(config_folder, GOOD.format(times='"header"').replace("cal/ceo2.poni", "cal/none.poni")))
    assert err.problems[0][0] == "calibration.poni"
    assert "no such file" in err.problems[0][1]


def test_frames_and_patterns_exclusive_and_one_needed(config_folder):
    text = GOOD.format(times='"header"') + '\n[patterns]\nfiles = "raw/*.h5"\nwavelength_A = 0.6\n'
    assert "exclusive" in str(errors_of(write(config_folder, text)))
    text = 'schema_version = 1\n[run]\nname = "x"\n'
    assert "expected a [frames] section" in str(errors_of(write(config_folder, text)))


def test_patterns_in_2theta_need_wavelength(config_folder):
    text = 'schema_version = 1\n[run]\nname = "x"\n[patterns]\nfiles = "raw/*.h5"\n'
    assert "wavelength_A is required" in str(errors_of(write(config_folder, text)))
