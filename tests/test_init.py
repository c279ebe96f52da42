"""`xrdpipe init`: an experiment file written from the demo's raw data is valid, and running it
gives the demo's cells and fractions within their tolerances (those of test_workflow); bad
input gets one-line errors naming what is wrong."""

import csv
import glob
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from demo_checks import assert_lattice_row, read_truth

from xrdpipe.cli import main
from xrdpipe.config import load_experiment
from xrdpipe.scaffold import InitError, choose_windows, init_experiment, scaffold
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

    # the figures are not what is checked here: one contour map (of the windows init chose) as a
    # 60 dpi PNG, instead of five figures as PNG and PDF at 300 dpi
    assert text.count("[plots.contour]\n") == 1
    out.write_text(text.replace("[plots.contour]\n", '[plots]\nkinds = ["contour"]\nformats = ["png"]\ndpi = 60\n'
                                "[plots.contour]\n"))
    res = runner.invoke(main, ["run", str(out), "--workers", "1", "--scheduler", "serial"])
    assert res.exit_code == 0, res.output
    exp = load_experiment(out)
    truth = read_truth(folder)
    lattice = {(int(r["frame"]), r["phase"]): r for r in csv.DictReader(open(exp.run.output / "lattice.csv"))}
    frames = {int(r["frame"]): r for r in csv.DictReader(open(exp.run.output / "frames.csv"))}
    assert len(frames) == 12 and all(r["status"] == "ok" for r in frames.values())
    n_two = 0
    for f, phases in truth.items():
        n_two += len(phases) == 2
        for name in ("O3", "P3"):       # the tolerances of test_workflow's end-to-end test
            assert_lattice_row(lattice[(f, name)], phases.get(name), (f, name))
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


# ---------------------------------------------------------------------------------------------
# review findings (issue 23): globs, 1D patterns, quoting, shapes, phases without fractions


def _poni_without_shape(folder: Path, text: str) -> Path:
    """The demo's PONI with the detector's max_shape taken out (as many beamlines write it)."""
    poni = folder / "noshape.poni"
    poni.write_text("\n".join(
        'Detector_config: {"pixel1": 7.5e-05, "pixel2": 7.5e-05}' if line.startswith("Detector_config") else line
        for line in text.splitlines()) + "\n")
    return poni


def _travel(name: str, label: str, wavelength_A: float, unit: str) -> tuple[float, float]:
    """Where reflection ``label`` ("O3 003") of library phase ``name`` goes while the cell moves
    through half the phase model's default search range (every corner of a and c)."""
    from xrdpipe.config import PhaseSpec
    from xrdpipe.crystallography import d_spacing, q_from_d, tth_from_d
    from xrdpipe.phasefit import DEFAULT_SEARCH

    ph = PhaseSpec(name=name)
    hkl = [int(x) for x in label.split()[1]]
    vals = []
    for fa in (1 - DEFAULT_SEARCH["a"] / 2, 1 + DEFAULT_SEARCH["a"] / 2):
        for fc in (1 - DEFAULT_SEARCH["c"] / 2, 1 + DEFAULT_SEARCH["c"] / 2):
            d = d_spacing(ph.space_group, *hkl, ph.a * fa, ph.c * fc)
            vals.append(tth_from_d(d, wavelength_A) if unit == "2th_deg" else q_from_d(d))
    return min(vals), max(vals)


def _assert_windows_cover(windows, phases, wavelength_A, unit, lo, hi):
    """Basal (00l) windows first; each window inside lo-hi and covering the travel of its first
    reflection (a pick) in every phase listing it."""
    basal = [w.name[:2] == "00" for w in windows]
    assert basal[0] and basal == sorted(basal, reverse=True), [w.name for w in windows]
    for w in windows:
        assert lo <= w.range[0] < w.range[1] <= hi, (w.name, w.range)
        first = w.peaks[0].split()[1]
        for label in w.peaks:
            name, hkl = label.split()
            if hkl == first and name in phases:
                t_lo, t_hi = _travel(name, label, wavelength_A, unit)
                assert w.range[0] < t_lo and t_hi < w.range[1], (w.name, label, w.range, (t_lo, t_hi))


def test_a_glob_counts_eiger_masters_once_and_writes_a_glob_of_exactly_them(demo, tmp_path):
    import h5py

    folder = demo.folder
    raw = tmp_path / "raw"
    raw.mkdir()
    src = sorted((folder / "raw").glob("*.h5"))[0]
    with h5py.File(src) as f:
        n = f["/entry/data/data"].shape[0]
    (raw / "scan_data_000001.h5").write_bytes(src.read_bytes())
    with h5py.File(raw / "scan_master.h5", "w") as f:
        f["/entry/data/data_000001"] = h5py.ExternalLink("scan_data_000001.h5", "/entry/data/data")
    (raw / "scan.log").write_text("beamline log\n")
    (raw / "notes.txt").write_text("cell 2\n")
    for spec in (str(raw / "*"), str(raw / "*.h5"), str(raw)):
        s = scaffold(spec, poni=folder / "demo.poni", phases=["O3", "P3"], out=tmp_path / "exp" / "e.toml")
        # the frames counted once, and the glob written matches exactly the file(s) counted: the
        # master where xrdpipe reads through it, else its data file (frames.py reads a master's
        # external link under the data file's dataset name)
        assert (s.frames.files, s.frames.frames) == (1, n), spec
        assert s.frames.pattern in ("../raw/*_master.h5", "../raw/*_data_*.h5")
        assert glob.glob(os.path.normpath(tmp_path / "exp" / s.frames.pattern)) == [str(raw / "scan_master.h5")] \
            if "master" in s.frames.pattern else [str(raw / "scan_data_000001.h5")]
        assert s.frames.note.endswith("2 other file(s) left out (.log, .txt)") == (not spec.endswith(".h5"))
        assert s.name == "scan"
    # a master that cannot be read is said so, with the reason
    if s.frames.pattern.endswith("_data_*.h5"):
        assert s.frames.note.startswith("the EIGER master files are not read (no dataset '/entry/data/data' in the file")
    # plain frames: raw/* is narrowed to the frames' suffix
    (raw / "scan_master.h5").unlink()
    (raw / "scan_data_000001.h5").rename(raw / "cell2_0001.h5")
    s = scaffold(str(raw / "*"), poni=folder / "demo.poni", phases=["O3"], out=tmp_path / "e.toml")
    assert (s.frames.pattern, s.frames.frames) == ("raw/*.h5", n)


def test_q_patterns_get_q_windows_from_their_header_and_a_poni_without_shape(demo, tmp_path):

    folder = demo.folder
    poni = _poni_without_shape(tmp_path, (folder / "demo.poni").read_text())
    pats = tmp_path / 'beam "time" \\ run'          # a quote and a backslash in the path
    pats.mkdir()
    q = np.linspace(0.85, 4.37, 2000)
    for i in range(3):
        np.savetxt(pats / f"p_{i:04d}.xy", np.column_stack([q, 100 + q]), fmt="%.6f",
                   header="== pyFAI calibration ==\nWavelength: 6.209e-11\n--> p.edf\n      q_A^-1             I ")
    (pats / "p.log").write_text("integration log\n")
    out = tmp_path / "q.toml"
    res = CliRunner().invoke(main, ["init", str(pats), "--poni", str(poni), "--phases", "O3,P3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = tomllib.loads(out.read_text())
    assert data["patterns"]["files"] == 'beam "time" \\ run/*.xy'
    assert data["patterns"]["radial_unit"] == "q_A^-1" and data["patterns"]["wavelength_A"] == pytest.approx(0.6209)
    assert "radial_unit = \"q_A^-1\"   # from the header of the first of" in out.read_text()
    exp = load_experiment(out)
    assert len(exp.patterns.files) == 3
    _, s = init_experiment(str(pats), poni=poni, phases=["O3", "P3"], out=tmp_path / "q2.toml")
    assert s.tth == pytest.approx((5.0, 25.0), abs=0.3)
    _assert_windows_cover(s.windows, ("O3", "P3"), 0.6209, "q_A^-1", 0.85, 4.37)
    assert [w.name for w in exp.windows] == [w.name for w in s.windows]
    # --radial-unit wins over the header (and says so); 2θ windows then
    _, s2 = init_experiment(str(pats), poni=poni, phases=["O3"], out=tmp_path / "q3.toml", radial_unit="2th_deg")
    assert s2.radial_unit == "2th_deg" and s2.notes[0].startswith("--radial-unit 2th_deg given, but the header")
    assert s2.windows == () or all(w.range[1] <= 4.37 for w in s2.windows)


def test_windows_of_2d_frames_cover_the_travel_of_their_reflections(demo):
    s = scaffold(str(demo.folder / "raw"), poni=demo.folder / "demo.poni", phases=["O3", "P3", "Al"],
                 out=demo.folder / "x.toml")
    _assert_windows_cover(s.windows, ("O3", "P3"), 0.6209, "2th_deg", *s.tth)
    assert [w.name for w in s.windows][:2] == ["003", "006"]


def test_a_mask_not_of_the_frames_shape_and_a_phase_list_without_a_cathode(demo, tmp_path):
    import fabio

    folder = demo.folder
    poni = _poni_without_shape(tmp_path, (folder / "demo.poni").read_text())
    mask = tmp_path / "small.edf"
    fabio.edfimage.EdfImage(data=np.zeros((10, 12), np.uint8)).write(str(mask))
    with pytest.raises(InitError) as err:
        scaffold(str(folder / "raw"), poni=poni, phases=["O3"], mask=mask, out=tmp_path / "e.toml")
    assert str(err.value) == f"the mask {mask} is 10 x 12 pixels but the frames ({folder / 'raw'}) are 512 x 512"
    windows, notes = choose_windows(["Al"], 0.6209, (4.8, 25.0))
    assert windows == [] and notes == ["no window written: none of Al is a cathode phase (one in the phase "
                                       "fractions); add one such as O3 or P2 to --phases, or write [[windows]] by hand"]
