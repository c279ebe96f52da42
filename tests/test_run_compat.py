"""A run written before the run layer moved to ``xrdpipe/run/`` is up to date for the code of today:
no stage recomputes, and every stage's fingerprint still matches (see
``tests/data/pre_move_run/make_fixture.py`` for how the run was made, with main 7616d01), as
long as its settings mean what they meant then. The phase model's default zero shift changed
since (``[lattice] correction = "auto"``: one estimated for the run, where the run was fitted
with none): the run with the setting it was made with (``"none"``) stays up to date, and with
today's default its fit and what follows from it are redone."""

import fcntl
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import xrdpipe
from xrdpipe.config import load_experiment

DATA = Path(__file__).parent / "data" / "pre_move_run"
ROOT = Path("/tmp/xrdpipe-pre-move-run")      # stage keys hold absolute paths: the run's own place


@pytest.fixture
def old_run():
    record = json.loads((DATA / "record.json").read_text())
    with open(f"{ROOT}.lock", "w") as lock:        # one test session at a time uses the path
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ROOT.exists():
            shutil.rmtree(ROOT)
        ROOT.mkdir()
        with tarfile.open(DATA / "inputs.tar.gz") as tar:
            tar.extractall(ROOT, filter="data")
        toml = ROOT / "experiment.toml"
        default_text = toml.read_text()
        toml.write_text(default_text + '\n[lattice]\ncorrection = "none"     # what the run was made with\n')
        for name, ns in record["mtime_ns"].items():
            os.utime(ROOT / name, ns=(ns, ns))
        try:
            yield load_experiment(ROOT / "experiment.toml"), record, default_text
        finally:
            shutil.rmtree(ROOT, ignore_errors=True)


def test_a_run_made_before_the_move_does_not_recompute(old_run):
    from xrdpipe.run.refine import refine_experiment
    from xrdpipe.run.workflow import stage_keys

    exp, record, default_text = old_run
    assert stage_keys(exp) == record["stage_keys"]
    summary = xrdpipe.run_experiment(exp, progress=False)
    assert summary.stages == {s: "skipped" for s in record["stage_keys"]}
    assert not summary.did_work
    # each resumable stage's fingerprint of the run file still matches: nothing is redone
    integ = xrdpipe.integrate_experiment(exp, progress=False)
    assert (integ.integrated, integ.skipped, integ.failed) == (0, 6, [])
    fit = xrdpipe.fit_experiment(exp, progress=False)
    assert (fit.fitted, fit.skipped, fit.restarted) == (0, 6, False)
    ref = refine_experiment(exp, progress=False, update_lattice=False)
    assert (ref.refined, ref.skipped) == (0, 6)
    # today's default: the run's zero shift estimated, so the fit (and the stages after it) redone
    (ROOT / "experiment.toml").write_text(default_text)
    now = load_experiment(ROOT / "experiment.toml")
    keys = stage_keys(now)
    assert keys["fit"] != record["stage_keys"]["fit"] and keys["lattice"] != record["stage_keys"]["lattice"]
    assert keys["integrate"] == record["stage_keys"]["integrate"] and keys["echem"] == record["stage_keys"]["echem"]
    fit = xrdpipe.fit_experiment(now, progress=False)
    assert (fit.fitted, fit.restarted) == (6, True) and "on the first 6 integrated frames" in fit.zero, fit
