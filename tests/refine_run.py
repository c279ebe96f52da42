"""Shared by the refinement tests: an experiment file for the ``p_*.xye`` patterns of a test's
folder, and ``xrdpipe integrate`` then ``xrdpipe refine`` on it through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

from click.testing import CliRunner


def write_experiment(folder: Path, name: str, sections: str, wavelength_A: float) -> Path:
    """exp.toml for the .xye patterns p_*.xye in ``folder``, results in out/, then ``sections``."""
    path = folder / "exp.toml"
    path.write_text(f"""schema_version = 1
[run]
name = "{name}"
output = "out"
[patterns]
files = "p_*.xye"
wavelength_A = {wavelength_A}
""" + sections)
    return path


def integrate_and_refine(folder: Path) -> tuple[dict[int, dict[str, str]], str]:
    """``xrdpipe integrate`` then ``xrdpipe refine`` on ``folder/exp.toml``: refine.csv rows by
    frame, and what ``refine`` printed."""
    from xrdpipe.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["integrate", str(folder / "exp.toml"), "-q"]).exit_code == 0
    res = runner.invoke(main, ["refine", str(folder / "exp.toml"), "-q"])
    assert res.exit_code == 0, res.output
    with open(folder / "out" / "refine.csv") as fh:
        return {int(r["frame"]): r for r in csv.DictReader(fh)}, res.output
