"""`xrdpipe init`: an experiment file written from the demo's raw data is valid, and running it
gives the demo's cells and fractions within their tolerances (those of test_workflow); bad
input gets one-line errors naming what is wrong."""

import csv
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from xrdpipe.cli import main
from xrdpipe.config import load_experiment
from xrdpipe.scaffold import InitError, choose_windows, scaffold
from xrdpipe.testing import make_experiment


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # the demo's raw data (xrdpipe demo: counts 0.002, background 100), 12 frames with one at open
    # circuit so that two of them fall in the O3 + P3 coexistence
    folder = tmp_path_factory.mktemp("init") / "demo"
    syn = make_experiment(folder, n_frames=12, n_rest=1, counts=0.002, background=100.0, run_name="demo-nfm")
    (folder / "experiment.toml").unlink()       # the user has frames, PONI, mask and cycler file only
    return syn


def test_init_then_run_gives_the_demos_cells_and_fractions(demo):
    folder = demo.folder
    out = folder / "exp" / "init.toml"
    runner = CliRunner()
    res = runner.invoke(main, ["init", str(folder / "raw"), "--poni", str(folder / "demo.poni"), "--mask",
                               str(folder / "mask.edf"), "--cycler", str(folder / "cycler.csv"), "--phases", "O3,P3",
                               "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {out}: 12 frame(s) (.h5), times from the headers, 2θ 4.82-24.94°, ")
    text = out.read_text()
    data = tomllib.loads(text)
    assert data["frames"] == {"files": "../raw/*.h5", "dataset": "/entry/data/data", "times": "header"}
    assert data["calibration"] == {"poni": "../demo.poni", "mask": "../mask.edf"}
    assert data["electrochemistry"] == {"file": "../cycler.csv", "format": "csv", "columns": {
        "time": "time/s", "datetime": "datetime", "voltage": "Ewe/V", "current": "I/mA"}}
    assert [p["name"] for p in data["phases"]] == ["O3", "P3"]
    # basal first: the 003 window holds both phases' 003 and nothing else
    assert data["windows"][0]["name"] == "003" and sorted(data["windows"][0]["peaks"]) == ["O3 003", "P3 003"]
    assert "# the detector covers 2θ 4.82-24.94° (Q 0.852-4.371 1/Å) at 0.6209 Å, 130.0 mm" in text
    assert "# times from the file headers: first frame 2025-07-02T19:05:59+08:00" in text
    res = runner.invoke(main, ["validate", str(out)])
    assert res.exit_code == 0 and res.output.rstrip().endswith("valid"), res.output
    res = runner.invoke(main, ["init", str(folder / "raw"), "--poni", str(folder / "demo.poni"), "--phases", "O3",
                               "-o", str(out)])
    assert res.exit_code == 2 and res.output.strip() == f"error: {out} exists; give another -o or --force to overwrite it"

    res = runner.invoke(main, ["run", str(out), "--workers", "1", "--scheduler", "serial"])
    assert res.exit_code == 0, res.output
    exp = load_experiment(out)
    truth = {}
    for r in csv.DictReader(open(folder / "truth.csv")):
        truth.setdefault(int(r["frame"]), {})[r["phase"]] = r
    lattice = {(int(r["frame"]), r["phase"]): r for r in csv.DictReader(open(exp.run.output / "lattice.csv"))}
    frames = {int(r["frame"]): r for r in csv.DictReader(open(exp.run.output / "frames.csv"))}
    assert len(frames) == 12 and all(r["status"] == "ok" for r in frames.values())
    n_two = 0
    for f, phases in truth.items():
        n_two += len(phases) == 2
        for name in ("O3", "P3"):
            row = lattice[(f, name)]
            if name in phases:        # the tolerances of test_workflow's end-to-end test
                t = phases[name]
                assert abs(float(row["a_A"]) - float(t["a"])) < 2e-4, (f, name)
                assert abs(float(row["c_A"]) - float(t["c"])) < 3e-3, (f, name)
                assert abs(float(row["fraction"]) - float(t["fraction"])) < 0.03, (f, name)
            else:
                assert row["a_A"] == "" and float(row["fraction"] or 0) < 0.03
    assert n_two == 2
    # the cycler record is on the frames' clock: the voltage of each frame is the cycler's
    assert float(frames[0]["voltage_V"]) == pytest.approx(2.4)


def test_windows_fall_inside_the_detector_and_hold_coexisting_phases():
    windows, notes = choose_windows(["P2", "P''2", "Al"], 0.6884, (5.0, 18.0))
    assert notes == []
    assert windows[0].name == "002" and set(windows[0].peaks) == {"P2 002", "P''2 002"}
    for w in windows:
        assert 5.0 <= w.range[0] < w.range[1] <= 18.0
        assert len(w.peaks) <= 8
    # a range below every reflection of a phase says so
    _, notes = choose_windows(["O3"], 0.6209, (1.0, 5.0))
    assert notes == ["no reflection of O3 falls inside the detector's range 1.00-5.00°"]


def test_clear_errors(demo, tmp_path):
    folder = demo.folder
    poni = folder / "demo.poni"
    with pytest.raises(InitError) as err:
        scaffold(str(tmp_path / "nothing" / "*.h5"), poni=poni, phases=["O3"], out=tmp_path / "e.toml")
    assert str(err.value).startswith(f"no frames matched {str(tmp_path / 'nothing' / '*.h5')!r}: expected HDF5/NeXus")
    with pytest.raises(InitError) as err:
        scaffold(str(folder / "raw"), poni=poni, phases=["O3", "P33"], out=tmp_path / "e.toml")
    assert str(err.value).startswith("unknown phase 'P33'; did you mean 'P3'?; the library has P2, P''2, O3, P3")
    bad = tmp_path / "bad.poni"
    bad.write_text("Distance: lots\n")
    with pytest.raises(InitError) as err:
        scaffold(str(folder / "raw"), poni=bad, phases=["O3"], out=tmp_path / "e.toml")
    assert str(err.value).startswith(f"cannot read the PONI file {bad}: ")
    assert "\n" not in str(err.value)


def test_a_cycler_file_with_relative_times_asks_for_its_start(demo, tmp_path):
    from datetime import datetime, timezone

    from xrdpipe.scaffold import init_experiment

    folder = demo.folder
    mpt = tmp_path / "cell.mpt"
    mpt.write_bytes((Path(__file__).parent / "data" / "cyclers" / "pyprobe" / "biologic"
                     / "Sample_data_biologic_no_header.mpt").read_bytes())
    kw = dict(poni=folder / "demo.poni", phases=["O3", "P3"], mask=folder / "mask.edf", cycler=mpt)
    out, s = init_experiment(str(folder / "raw"), out=tmp_path / "a.toml", **kw)
    text = out.read_text()
    assert s.cycler.needs == "start" and s.cycler.format == "biologic" and s.cycler.rows == 13
    assert "# CHECK: the file has relative times only: give when its time 0 was" in text
    assert '# [electrochemistry]\n# file = "cell.mpt"\n# format = "biologic"\n' in text
    assert load_experiment(out).electrochemistry is None          # valid, echem left to the user
    start = datetime(2025, 7, 2, 11, 0, tzinfo=timezone.utc)
    out, s = init_experiment(str(folder / "raw"), out=tmp_path / "b.toml", cycler_start=start, **kw)
    exp = load_experiment(out)
    assert exp.electrochemistry.format == "biologic" and exp.electrochemistry.start == start
