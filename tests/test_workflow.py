"""The whole run: a synthetic 2D experiment end to end against its truth, figures of the requested
size, exports other programs read, and stages skipped when nothing changed."""

import csv
import os
import shutil
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from demo_checks import assert_lattice_row, read_truth

from xrdpipe import open_dataset, open_results
from xrdpipe.cli import main
from xrdpipe.config import ContourSpec, load_experiment
from xrdpipe.patterns import read_pattern
from xrdpipe.plots import PlotError, plot_contour
from xrdpipe.run.stagelog import mark_stage, read_stages
from xrdpipe.run.store import open_run
from xrdpipe.run.workflow import run_experiment
from xrdpipe.testing import make_experiment

# sizes chosen to differ from the defaults, so the test sees that they are obeyed
PLOTS = """
[plots]
formats = ["png", "svg"]
dpi = 120
[plots.contour]
windows = ["003", "107"]
width_mm = 150
height_mm = 80
[plots.lattice]
width_mm = 85
height_mm = 100
[plots.fractions]
width_mm = 90
height_mm = 55
[plots.fit]
frames = [0, 20]
windows = ["003"]
width_mm = 120
height_mm = 90
[plots.waterfall]
count = 6
range = [5.0, 15.0]
width_mm = 85
height_mm = 85
"""
SIZES = {"contour": (150, 80), "lattice": (85, 100), "fractions": (90, 55), "fit": (120, 90), "waterfall": (85, 85)}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "exp"
    syn = make_experiment(folder, n_frames=48, counts=0.002, background=100.0, seed=4, run_name="e2e")
    text = syn.experiment_file.read_text()
    text = text[:text.index("# Figures of")] + PLOTS       # our own [plots], the default [export]
    syn.experiment_file.write_text(text)
    exp = load_experiment(syn.experiment_file)
    lines = []
    summary = run_experiment(exp, progress=False, echo=lines.append)
    return syn, exp, summary, lines


def test_end_to_end_against_the_truth(whole_run):
    syn, exp, summary, _ = whole_run
    truth = read_truth(syn.folder)
    lattice = {(int(r["frame"]), r["phase"]): r for r in csv.DictReader(open(exp.run.output / "lattice.csv"))}
    frames = {int(r["frame"]): r for r in csv.DictReader(open(exp.run.output / "frames.csv"))}
    assert len(frames) == 48 == summary.integrated
    n_two = 0
    for f, phases in truth.items():
        x_true = float(next(iter(phases.values()))["x"])
        assert abs(float(frames[f]["x"]) - x_true) < 0.002
        assert abs(float(lattice[(f, "O3")]["x"]) - x_true) < 0.002
        n_two += len(phases) == 2
        for name in ("O3", "P3"):       # the crystallography issue's tolerances
            assert_lattice_row(lattice[(f, name)], phases.get(name), (f, name))
    assert n_two >= 2          # the coexistence region is in the run
    assert set(summary.phases) == {"O3", "P3"}
    assert summary.phases["P3"][1] == pytest.approx(min(float(r["x"]) for r in frames.values()), abs=1e-9)


def _png_size(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape[1], img.shape[0], img


def test_every_figure_is_written_at_the_requested_size(whole_run):
    _, exp, summary, _ = whole_run
    folder = exp.run.output / "figures"
    for kind, (w_mm, h_mm) in SIZES.items():
        png, svg = folder / f"e2e_{kind}.png", folder / f"e2e_{kind}.svg"
        assert png in summary.figures and svg in summary.figures
        w, h, img = _png_size(png)
        assert (w, h) == (int(w_mm / 25.4 * 120), int(h_mm / 25.4 * 120)), kind     # matplotlib truncates
        rgb = img[..., :3]
        assert (rgb.std(axis=(0, 1)) > 0.05).any(), f"{kind} looks blank"
        assert (rgb < 0.5).mean() > 0.005, f"{kind} has almost no ink"
        root = ET.parse(svg).getroot()
        assert float(root.get("width").removesuffix("pt")) == pytest.approx(w_mm / 25.4 * 72, rel=1e-3)
        assert float(root.get("height").removesuffix("pt")) == pytest.approx(h_mm / 25.4 * 72, rel=1e-3)
        assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 20, kind


def test_exports_are_read_back(whole_run):
    _, exp, summary, _ = whole_run
    folder = exp.run.output / "export"
    p = open_run(exp.run.run_file)
    index = list(csv.DictReader(open(folder / "index.csv")))
    assert len(index) == 3 * 48 and {r["format"] for r in index} == {"xye", "fxye", "topas"}
    f = 17
    ok = np.isfinite(p.intensity[f])
    x, y, e = read_pattern(folder / "xye" / f"e2e_{f:05d}.xye")
    np.testing.assert_allclose(x, p.radial[ok], atol=5e-7)
    np.testing.assert_allclose(y, p.intensity[f][ok], rtol=1e-6, atol=5e-7)
    np.testing.assert_allclose(e, p.sigma[f][ok], rtol=1e-6, atol=5e-7)
    gx, gy, ge = read_pattern(folder / "gsas2" / f"e2e_{f:05d}.fxye")
    np.testing.assert_allclose(gx, p.tth_deg[ok], atol=1e-7)
    np.testing.assert_allclose(gy, y, atol=1e-6)
    np.testing.assert_allclose(ge, e, atol=1e-6)
    head = (folder / "gsas2" / f"e2e_{f:05d}.fxye").read_text().splitlines()[:3]
    assert head[1] == "Instrument parameter file:e2e.instprm"
    assert head[2].split()[:5] == ["BANK", "1", str(ok.sum()), str(ok.sum()), "CONS"] and head[2].endswith("FXYE")
    instprm = dict(line.split(":", 1) for line in (folder / "gsas2" / "e2e.instprm").read_text().splitlines()[1:])
    assert float(instprm["Lam"]) == pytest.approx(0.6209) and instprm["Type"] == "PXC"
    topas = (folder / "topas" / f"e2e_{f:05d}.xye").read_text().splitlines()
    first = [float(v) for v in topas[0].split()]                       # no header: numbers from line 1
    assert len(first) == 3 and first[0] == pytest.approx(p.tth_deg[ok][0], abs=1e-6)
    row = next(r for r in index if r["frame"] == str(f) and r["format"] == "xye")
    frames = {int(r["frame"]): r for r in csv.DictReader(open(exp.run.output / "frames.csv"))}
    assert float(row["x"]) == pytest.approx(float(frames[f]["x"]), abs=1e-9)


def test_a_second_run_does_no_work_and_says_so(whole_run):
    _, exp, first, lines = whole_run
    assert first.did_work and all(v == "ran" for v in first.stages.values())
    assert [s for s in first.stages] == ["integrate", "echem", "fit", "lattice", "plots", "export"]
    watched = [exp.run.run_file, *first.figures, exp.run.output / "lattice.csv", exp.run.output / "peaks.csv"]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    again = run_experiment(load_experiment(exp.source), progress=False)
    assert not again.did_work and set(again.stages.values()) == {"skipped"}
    assert "nothing changed since the last run" in str(again) and "no work done" in str(again)
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
    assert again.phases == first.phases


def _light_copy(whole_run, folder):
    """A copy of the whole run whose figures are one waterfall as SVG (the figures of the run
    are not what is checked; a copy runs again what reads its paths), brought up to date."""
    syn, exp, _, _ = whole_run
    shutil.copytree(syn.folder, folder)                # copy2: the files keep their times
    path = folder / exp.source.name
    text = path.read_text()
    path.write_text(text[:text.index("\n[plots]\n")] + '\n[plots]\nkinds = ["waterfall"]\nformats = ["svg"]\ndpi = 60\n')
    exp = load_experiment(path)
    run_experiment(exp, progress=False)
    return SimpleNamespace(folder=folder), exp


def test_only_the_stages_downstream_of_a_change_run_again(whole_run, tmp_path):
    syn, exp = _light_copy(whole_run, tmp_path / "exp")
    s = run_experiment(load_experiment(exp.source), progress=False)
    assert set(s.stages.values()) == {"skipped"}
    # a deleted figure reruns the figures only
    (exp.run.output / "figures" / "e2e_waterfall.svg").unlink()
    s = run_experiment(load_experiment(exp.source), progress=False)
    assert [k for k, v in s.stages.items() if v == "ran"] == ["plots"]
    assert (exp.run.output / "figures" / "e2e_waterfall.svg").exists()
    # a new cycler file: echem and everything that reads x
    cyc = syn.folder / "cycler.csv"
    st = os.stat(cyc)
    os.utime(cyc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = run_experiment(load_experiment(exp.source), progress=False)
    assert [k for k, v in s.stages.items() if v == "ran"] == ["echem", "lattice", "plots", "export"]
    # a stage interrupted (its record cleared when it started) runs again, from what it kept
    mark_stage(exp.run.run_file, "fit", None)
    lines = []
    s = run_experiment(load_experiment(exp.source), progress=False, echo=lines.append)
    assert s.stages["fit"] == "ran" and s.stages["integrate"] == "skipped"
    assert any("0 fitted now, 48 already done" in line for line in lines)
    assert "fit" in read_stages(exp.run.run_file)


def _contour(run_file, **options):
    """A contour map as ``xrdpipe plot`` draws it: from the run file's Datasets."""
    res = open_results(run_file)
    return plot_contour(open_dataset(run_file), peaks=res.peaks, record=res.record, **options)


def test_a_map_against_x_of_a_charge_and_discharge_is_refused(whole_run):
    _, exp, summary, _ = whole_run
    with pytest.raises(PlotError, match="x goes down and up again"):
        _contour(exp.run.run_file, windows=[("003", 6.0, 7.1)], spec=ContourSpec(vertical="x"))
    fig = _contour(exp.run.run_file, windows=[("003", 6.0, 7.1)],
                   spec=ContourSpec(vertical="frame", scale="log"))
    assert len(fig.axes) == 3        # map, voltage panel, colour bar
    # within the first charge x only falls: the map is drawn, the first frame (highest x) at the top
    frames = {int(r["frame"]): r for r in csv.DictReader(open(exp.run.output / "frames.csv"))}
    charge = [f for f, r in frames.items() if r["segment"] == "charge"]
    fig = _contour(exp.run.run_file, windows=[("003", 6.0, 7.1)],
                       spec=ContourSpec(vertical="x", frame_range=(min(charge), max(charge))))
    bottom, top = fig.axes[0].get_ylim()
    assert top > bottom and top >= float(frames[min(charge)]["x"]) > float(frames[max(charge)]["x"]) >= bottom
    voltage = fig.axes[1].lines[0].get_xdata()
    assert voltage.max() <= max(float(frames[f]["voltage_V"]) for f in charge) + 0.05     # the charge only


def test_a_map_of_more_frames_than_pixel_rows_shows_their_means_and_keeps_pauses_blank(whole_run):
    from xrdpipe.plots.contour import binned_image, pixel_rows
    from xrdpipe.run.store import read_pattern_block

    # 7 frames, a pause (-1), 3 frames; at most 4 image rows: frames go in runs of 3, the pause stays alone
    frame_rows = np.array([0, 1, 2, 3, 4, 5, 6, -1, 7, 8, 9])
    group, edges = pixel_rows(frame_rows, np.arange(12.0), max_rows=4)
    assert group.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 4, 4, 4]
    assert edges.tolist() == [0, 3, 6, 7, 8, 11]
    _, exp, _, _ = whole_run
    cols = slice(200, 260)
    z = binned_image(open_dataset(exp.run.run_file).intensity, frame_rows, group, 5, cols, chunk=4)    # chunks cut across rows
    inten, _ = read_pattern_block(exp.run.run_file, rows=np.arange(10), columns=cols)
    np.testing.assert_allclose(z[0], inten[0:3].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(z[2], inten[6], rtol=1e-6)
    np.testing.assert_allclose(z[4], inten[7:10].mean(axis=0), rtol=1e-6)
    assert np.isnan(z[3]).all()
    # in a figure: no more image rows than pixel rows (48 frames, 25 px high), the same extent
    fig = _contour(exp.run.run_file, windows=[("003", 6.0, 7.1)],
                       spec=ContourSpec(vertical="frame", voltage=False, height_mm=25.4), dpi=25)
    full = _contour(exp.run.run_file, windows=[("003", 6.0, 7.1)],
                        spec=ContourSpec(vertical="frame", voltage=False, height_mm=25.4), dpi=300)
    rows = fig.axes[0].collections[0].get_array().shape[0]
    assert rows <= 25 < full.axes[0].collections[0].get_array().shape[0] == 48
    assert fig.axes[0].get_ylim() == full.axes[0].get_ylim()


def test_plot_and_export_commands(whole_run, tmp_path):
    _, exp, _, _ = whole_run
    runner = CliRunner()
    target = tmp_path / "q-map"
    res = runner.invoke(main, ["plot", str(exp.source), "--kind", "contour", "--axis", "d", "--window", "006",
                               "--format", "png", "--width-mm", "85", "--height-mm", "60", "--dpi", "100",
                               "-o", str(target)])
    assert res.exit_code == 0, res.output
    w, h, _ = _png_size(target.with_suffix(".png"))
    assert (w, h) == (int(85 / 25.4 * 100), int(60 / 25.4 * 100))
    res = runner.invoke(main, ["plot", str(exp.source), "--kind", "fit", "--frames", "999"])
    assert res.exit_code == 2 and "frame 999" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["export", str(exp.source), "--format", "topas", "--frames", "0,1", "-q"])
    assert res.exit_code == 0 and "exported 2 pattern(s) as 2 topas" in res.output
    res = runner.invoke(main, ["run", str(exp.source), "-q"])
    assert res.exit_code == 0 and "nothing changed since the last run" in res.output


def test_plots_config_names_unknown_windows(tmp_path):
    from xrdpipe.errors import ConfigError

    syn = make_experiment(tmp_path / "exp", n_frames=5, frame_format="xye")
    text = syn.experiment_file.read_text().replace('windows = ["003", "006", "107", "018"]', 'windows = ["03", [7.0, 6.0]]')
    syn.experiment_file.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_experiment(syn.experiment_file)
    msgs = dict(err.value.problems)
    assert "did you mean '003'?" in msgs["plots.contour.windows.0"]
    assert msgs["plots.contour.windows.1"] == "expected [low, high], got [7.0, 6.0]"


def test_the_readme_plots_example_is_valid(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### The whole run, figures and exports")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "p.xy").write_text("1 2\n2 3\n")
    (tmp_path / "e.toml").write_text(
        'schema_version = 1\n[run]\nname = "r"\n[patterns]\nfiles = "p.xy"\nwavelength_A = 0.6209\n'
        '[[phases]]\nname = "O3"\n[[windows]]\nname = "003"\nrange = [6.0, 7.1]\npeaks = ["O3 003"]\n'
        '[[windows]]\nname = "104"\nrange = [16.0, 16.8]\npeaks = ["O3 104"]\n' + block)
    exp = load_experiment(tmp_path / "e.toml")
    assert exp.plots.contour.windows == ["003", "104", (16.0, 16.8)] and exp.plots.contour.height_mm == 90
    assert exp.plots.fit.frames == [0, 44, 119] and exp.export.formats == ["xye", "fxye", "topas"]


def test_the_two_phase_band_covers_each_two_phase_region_and_nothing_between():
    """Against time, a charge's two-phase region and the discharge's are two grey bands, each over
    its own frames; the frames of one phase between them are not shaded (one band from the first
    two-phase frame to the last covered them). Against x the two regions may overlap: each is
    drawn all the same."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xrdpipe.plots.series import _shade_x

    t = np.arange(12, dtype=float)                       # hours
    together = np.zeros(12, bool)
    together[[2, 3, 4, 8, 9]] = True                     # charge: 2-4; discharge: 8-9
    fig, ax = plt.subplots()
    _shade_x(ax, t, together)
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    assert spans == [(1.5, 4.5), (7.5, 9.5)]
    for one_phase in (5.0, 6.0, 7.0):
        assert not any(lo <= one_phase <= hi for lo, hi in spans)
    plt.close(fig)
