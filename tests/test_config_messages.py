"""The wording of experiment-file errors (pydantic's in the file's words), and `xrdpipe validate`."""


from click.testing import CliRunner
from config_cases import GOOD, errors_of, write

from xrdpipe.cli import main


def test_typo_suggests_closest_key(config_folder):
    text = GOOD.format(times='"header"').replace("npt = 3000", "nmp = 3000")
    err = errors_of(write(config_folder, text))
    assert err.problems[0][0] == "integration.nmp"
    assert err.problems[0][1].startswith("unknown key; did you mean 'npt'?")
    assert "exp.toml" in str(err)


def test_bad_choice_names_key_and_valid_values(config_folder):
    text = GOOD.format(times='"header"').replace('splitting = "full"', 'splitting = "fast"')
    err = errors_of(write(config_folder, text))
    assert err.problems == [("integration.splitting", "expected 'no', 'bbox' or 'full', got 'fast'")]


def test_every_error_reported_at_once(config_folder):
    text = GOOD.format(times='"header"').replace("npt = 3000", "npt = 2").replace(
        "polarization_factor = 0.99", "polarization_factor = 3")
    keys = [k for k, _ in errors_of(write(config_folder, text)).problems]
    assert keys == ["integration.npt", "integration.polarization_factor"]


def test_a_misspelt_section_is_named_with_the_right_one(config_folder):
    text = GOOD.format(times='"header"') + '\n[refine]\nphases = ["O3"]\n'
    err = errors_of(write(config_folder, text))
    assert err.problems[0][0] == "refine"
    assert "did you mean 'refinement'?" in err.problems[0][1]


def test_toml_syntax_error_names_file(config_folder):
    p = write(config_folder, "schema_version = \n")
    err = errors_of(p)
    assert str(p) in str(err) and "not valid TOML" in str(err)


def test_schema_version(config_folder):
    err = errors_of(write(config_folder, GOOD.format(times='"header"').replace("schema_version = 1", "schema_version = 7")))
    assert err.problems[0][0] == "schema_version"
    err = errors_of(write(config_folder, GOOD.format(times='"header"').replace("schema_version = 1", "")))
    assert err.problems[0] == ("schema_version", "required key is missing; add schema_version = 1")


def test_cli_validate(config_folder):
    runner = CliRunner()
    good = write(config_folder, GOOD.format(times='"header"'))
    res = runner.invoke(main, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output and "npt = 3000" in res.output
    bad = write(config_folder, GOOD.format(times='"header"').replace("npt", "nptt"), name="bad.toml")
    res = runner.invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "integration.nptt: unknown key; did you mean 'npt'?" in res.output
