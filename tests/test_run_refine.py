"""The refine stage (`xrdpipe refine`) on synthetic series: every frame tracked, refine.csv,
model comparison, config errors, weight fractions into the lattice, failed and flagged frames,
excluded regions."""

import csv

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymatgen")

from pymatgen.core import Lattice  # noqa: E402
from refine_cases import (  # noqa: E402
    NFM_O3,
    O3_TYPED,
    X,
    experiment_in,
    noisy,
    o3,
    o3_series_in,
    p3,
    profile,
    refine_rows,
)

from xrdpipe.cli import main  # noqa: E402
from xrdpipe.config import ConfigError, load_experiment  # noqa: E402


def test_sequential_refinement_tracks_the_cell_in_every_frame(tmp_path):
    a, c = o3_series_in(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["integrate", str(tmp_path / "exp.toml"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["refine", str(tmp_path / "exp.toml"), "-q"])
    assert res.exit_code == 0, res.output
    assert "refined 8 frame(s) (lebail)" in res.output and "1 failed" in res.output and "frame 3:" in res.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "refine.csv")))
    assert [r["frame"] for r in rows] == [str(i) for i in range(8)]
    for r in rows:
        i = int(r["frame"])
        if i == 3:
            assert r["status"] == "failed" and "usable points" in r["message"] and r["a_A"] == ""
            continue
        assert r["status"] == "ok" and float(r["gof"]) < 1.3
        assert abs(float(r["a_A"]) / a[i] - 1) < 1e-4 and abs(float(r["c_A"]) / c[i] - 1) < 1e-4
        v = np.sqrt(3) / 2 * a[i] ** 2 * c[i]
        assert abs(float(r["volume_A3"]) / v - 1) < 3e-4 and float(r["volume_err_A3"]) > 0
    # a second call finds everything done
    res = runner.invoke(main, ["refine", str(tmp_path / "exp.toml"), "-q"])
    assert "refined 0 frame(s)" in res.output and "8 already done" in res.output
    # the refinement figure: observed, calculated, difference and tick marks
    from xrdpipe.plots import plot_refinement
    from xrdpipe.run.refinestore import read_refined_frame

    fig = plot_refinement(read_refined_frame(tmp_path / "out" / "seq.nxs", 5))
    assert len(fig.axes) == 2


def test_model_comparison_from_the_experiment_file(tmp_path):
    y, s = noisy(profile(o3(fe_tet=0.02), 2e-3) + 200.0, seed=7)
    np.savetxt(tmp_path / "p_000.xye", np.column_stack([X, y, s]))
    experiment_in(tmp_path, "cmp", O3_TYPED + """[refinement]
method = "rietveld"
polarization = "unpolarised"
""" + NFM_O3 + """[[refinement.models]]
name = "Fe octahedral"
phase = "O3"
sites = [{ label = "Fe_Na", element = "Fe", xyz = [0, 0, 0], occupancy = 0.005, b_iso = 0.3 }]
occupancy = [{ atoms = ["Fe_Na", "Fe"] }]
[[refinement.models]]
name = "Fe tetrahedral"
phase = "O3"
sites = [{ label = "Fe_tet", element = "Fe", xyz = [0, 0, 0.3837], occupancy = 0.005, b_iso = 0.3 }]
occupancy = [{ atoms = ["Fe_tet", "Fe"], total = 0.3333333 }]
""")
    runner = CliRunner()
    assert runner.invoke(main, ["integrate", str(tmp_path / "exp.toml"), "-q"]).exit_code == 0
    res = runner.invoke(main, ["refine", str(tmp_path / "exp.toml"), "--compare"])
    assert res.exit_code == 0, res.output
    assert "lowest Rwp: Fe tetrahedral" in res.output
    table = {r[0]: r[1:] for r in csv.reader(open(tmp_path / "out" / "refine_compare.csv"))}
    assert table["quantity"] == ["base", "Fe octahedral", "Fe tetrahedral"]
    assert abs(float(table["O3.occ:Fe_tet"][2]) - 0.02) < 0.004


def test_refinement_config_errors_name_the_key(tmp_path):
    o3_series_in(tmp_path, n=2)
    text = (tmp_path / "exp.toml").read_text()
    (tmp_path / "bad.toml").write_text(text.replace('[[refinement.phases]]\nname = "O3"',
                                                    '[[refinement.phases]]\nname = "O2x"'))
    with pytest.raises(ConfigError, match=r"refinement\.phases\.0\.name.*'O2x' is not in \[\[phases\]\]"):
        load_experiment(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text(text.replace('name = "O3"\n[refinement]', 'name = "OP4"\n[refinement]')
                                       .replace('method = "lebail"', 'method = "rietveld"')
                                       .replace('[[refinement.phases]]\nname = "O3"', '[[refinement.phases]]\nname = "OP4"'))
    with pytest.raises(ConfigError, match="no built-in structure for 'OP4'.*CIF"):
        load_experiment(tmp_path / "bad.toml")
    (tmp_path / "bad.toml").write_text(text.replace('[[refinement.phases]]\nname = "O3"',
                                                    '[[refinement.phases]]\nname = "O3"\nstructure = "missing.cif"'))
    with pytest.raises(ConfigError, match="no such CIF file"):
        load_experiment(tmp_path / "bad.toml")


def test_rietveld_weight_fractions_become_the_phase_fractions_of_the_lattice(tmp_path):
    """O3 turning into P3 over four frames: `xrdpipe run` fits the (003) peaks and refines the
    whole patterns; lattice.csv takes the weight fractions (within 0.02 of the truth) and keeps
    the peak-area fractions beside them; `fractions = "peaks"` gives the area fractions back."""
    s_o3, s_p3 = o3(), p3()
    dens = {k: float(st.density) for k, st in (("O3", s_o3), ("P3", s_p3))}
    vol = {k: float(st.volume) for k, st in (("O3", s_o3), ("P3", s_p3))}
    w_o3 = np.array([0.8, 0.6, 0.4, 0.2])
    for i, w in enumerate(w_o3):
        y = (profile(s_o3, 4e3 * w / dens["O3"] / vol["O3"] ** 2)
             + profile(s_p3, 4e3 * (1 - w) / dens["P3"] / vol["P3"] ** 2, fwhm=0.04, eta=0.3) + 200.0)
        y, s = noisy(y, seed=20 + i)
        np.savetxt(tmp_path / f"p_{i:03d}.xye", np.column_stack([X, y, s]))
    sections = """[[phases]]
name = "O3"
space_group = "R-3m"
a = 2.98
c = 16.0
[[phases]]
name = "P3"
space_group = "R3m"
a = 2.935
c = 16.70
z_o = 0.057
[[windows]]
name = "003"
range = [6.2, 6.9]
peaks = ["P3 003", "O3 003"]
[refinement]
method = "rietveld"
polarization = "unpolarised"
""" + NFM_O3 + """[[refinement.phases]]
name = "P3"
composition = { Ni = 0.3333333, Fe = 0.3333333, Mn = 0.3333333 }
na = 0.6
b_iso = { Na = 1.0, TM = 0.3, O = 0.6 }
"""
    experiment_in(tmp_path, "wf", sections)
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(tmp_path / "exp.toml"), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "lattice.csv")))
    assert len(rows) == 8
    for r in rows:
        i, truth = int(r["frame"]), {"O3": w_o3[int(r["frame"])], "P3": 1 - w_o3[int(r["frame"])]}[r["phase"]]
        assert r["fraction_source"] == "refinement"
        assert float(r["fraction"]) == float(r["weight_fraction"])
        assert abs(float(r["fraction"]) - truth) < 0.02 and 0 < float(r["fraction_err"]) < 0.02
        assert r["area_fraction"] != "" and float(r["area_fraction"]) != float(r["fraction"])
    # the same numbers as refine.csv
    ref = {(r["frame"], r["phase"]): r for r in csv.DictReader(open(tmp_path / "out" / "refine.csv"))}
    assert all(float(ref[r["frame"], r["phase"]]["weight_fraction"]) == pytest.approx(float(r["fraction"]), rel=1e-6)
               for r in rows)
    # peak areas only, on request
    experiment_in(tmp_path, "wf", sections + '[lattice]\nfractions = "peaks"\n')
    res = runner.invoke(main, ["lattice", str(tmp_path / "exp.toml")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "lattice.csv")))
    assert all(r["fraction_source"] == "peaks" and r["fraction"] == r["area_fraction"] and r["weight_fraction"] == ""
               for r in rows)


def test_a_frame_that_diverges_is_recorded_failed_and_the_next_starts_from_the_last_good_one(tmp_path):
    """Frame 2 is a P3 pattern, a phase the O3 model lacks: refined from frame 1, then from the
    start values and a cell search, its GOF stays far above gof_jump times frame 1's, so it is
    recorded failed as diverged, and frame 3 refines from frame 1 again."""
    cells = [(2.9852, 15.9967), (2.9850, 15.9980), (2.9852 * 0.99, 15.9967 * 1.01), (2.9848, 15.9990)]
    for i, (a, c) in enumerate(cells):
        y, s = noisy((profile(o3(a, c), 1e-3) if i != 2 else profile(p3(), 1e-3)) + 200.0, seed=30 + i)
        np.savetxt(tmp_path / f"p_{i:03d}.xye", np.column_stack([X, y, s]))
    experiment_in(tmp_path, "div", O3_TYPED + """[refinement]
range = [6.0, 29.0]
[[refinement.phases]]
name = "O3"
""")
    rows = refine_rows(tmp_path)
    assert rows[2]["status"] == "failed" and rows[2]["message"].startswith("diverged: GOF")
    assert "frame 1, the last good one" in rows[2]["message"] and rows[2]["a_A"] == ""
    for i in (0, 1, 3):
        assert rows[i]["status"] == "ok" and float(rows[i]["gof"]) < 1.3
        assert abs(float(rows[i]["a_A"]) / cells[i][0] - 1) < 1e-4 and abs(float(rows[i]["c_A"]) / cells[i][1] - 1) < 1e-4


def test_rietveld_with_the_al_collector_as_le_bail_and_an_excluded_region(tmp_path):
    """`xrdpipe refine`: O3 by Rietveld, Al (library phase: Fm-3m, only a) by Le Bail beside it,
    a spurious line (a cell window) left out with `excluded`: refine.csv has both cells, status
    ok, no c for the cubic phase."""
    from pymatgen.core import Structure as Pmg

    al = Pmg.from_spacegroup("Fm-3m", Lattice.cubic(4.0495), ["Al"], [[0, 0, 0]])
    spike = 3000 * np.exp(-0.5 * ((X - 20.0) / 0.02) ** 2)
    for i in range(2):
        y, s = noisy(profile(o3(), 1e-3) + profile(al, 3e-4, fwhm=0.025, eta=0.2) + spike + 200.0, seed=40 + i)
        np.savetxt(tmp_path / f"p_{i:03d}.xye", np.column_stack([X, y, s]))
    experiment_in(tmp_path, "al", """[[phases]]
name = "O3"
a = 2.98
c = 16.03
[[phases]]
name = "Al"
a = 4.045
[refinement]
method = "rietveld"
polarization = "unpolarised"
range = [6.0, 29.0]
excluded = [[19.8, 20.2]]
""" + NFM_O3 + """[[refinement.phases]]
name = "Al"
lebail = true
""")
    runner = CliRunner()
    assert runner.invoke(main, ["integrate", str(tmp_path / "exp.toml"), "-q"]).exit_code == 0
    res = runner.invoke(main, ["refine", str(tmp_path / "exp.toml"), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "refine.csv")))
    assert len(rows) == 4
    for r in rows:
        assert r["status"] == "ok" and float(r["gof"]) < 1.3, r["message"]
        if r["phase"] == "Al":
            assert abs(float(r["a_A"]) - 4.0495) < 2e-4 and r["c_A"] == "" and r["weight_fraction"] == ""
        else:
            assert abs(float(r["a_A"]) / 2.9852 - 1) < 1e-4 and abs(float(r["c_A"]) / 15.9967 - 1) < 1e-4


def test_a_frame_whose_rwp_is_far_above_the_runs_median_is_flagged(tmp_path):
    """Frame 2 has an unmodelled line: its fit converges with GOF under gof_max and under
    gof_jump, but its Rwp is 3x the run's median, so the run flags it (never `ok`)."""
    for i in range(5):
        spike = 700 * np.exp(-0.5 * ((X - 20.0) / 0.05) ** 2) if i == 2 else 0.0
        y, s = noisy(profile(o3(), 1e-3) + spike + 200.0, seed=70 + i)
        np.savetxt(tmp_path / f"p_{i:03d}.xye", np.column_stack([X, y, s]))
    experiment_in(tmp_path, "out", O3_TYPED + """[refinement]
method = "lebail"
gof_jump = 5.0
[[refinement.phases]]
name = "O3"
""")
    rows = refine_rows(tmp_path)
    med = np.median([float(r["rwp"]) for r in rows.values()])
    assert float(rows[2]["rwp"]) > 2.5 * med and float(rows[2]["gof"]) < 5
    assert rows[2]["status"] == "flagged" and "above 2.5 x the run's median" in rows[2]["message"]
    assert rows[2]["a_A"] != ""                                    # flagged: the values are kept
    assert all(rows[i]["status"] == "ok" for i in (0, 1, 3, 4))


def test_a_resumed_refinement_carries_the_cells_trend_on_as_an_unbroken_one(tmp_path):
    """Refined in two calls (frames 0-5, then the rest), the series gives the same values to the
    bit as in one call: the resumed frame starts from the last success with its cells moved on
    by their change since the success before it (frame 3 is dead, so frame 5's start is frame 4
    moved by frame 4 - frame 2), and that change is read back from the run file."""
    from xrdpipe.run.groups import read_table
    from xrdpipe.run.refine import refine_experiment

    runs = {}
    for name in ("whole", "resumed"):
        folder = tmp_path / name
        folder.mkdir()
        o3_series_in(folder)
        exp = load_experiment(folder / "exp.toml")
        CliRunner().invoke(main, ["integrate", str(folder / "exp.toml"), "-q"])
        if name == "resumed":
            refine_experiment(exp, progress=False, frames=(0, 5))
        refine_experiment(exp, progress=False)
        runs[name] = read_table(exp.run.run_file, "refinement", names=("values", "status", "start_from"))
    assert list(runs["whole"]["start_from"][[4, 5, 6, 7]]) == ["previous"] * 4
    np.testing.assert_array_equal(runs["resumed"]["status"], runs["whole"]["status"])
    np.testing.assert_array_equal(runs["resumed"]["values"], runs["whole"]["values"])
