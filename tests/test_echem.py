"""State of charge: formulas, capacity integration, half-cycles, x per frame and time alignment."""

import csv
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

import xrdpipe
from xrdpipe.composition import FARADAY, molar_mass, parse_formula, theoretical_capacity
from xrdpipe.cyclers import CyclerRecord
from xrdpipe.echem import FRAME_COLUMNS, analyse_record, frame_states, inventory_loss
from xrdpipe.errors import ConfigError
from xrdpipe.testing import make_experiment

T0 = datetime(2025, 7, 2, 11, 0, 0, tzinfo=timezone.utc).timestamp()


def test_theoretical_capacity_of_nfm_and_known_cathodes():
    assert theoretical_capacity("NaNi1/3Fe1/3Mn1/3O2") == pytest.approx(240.4, rel=1e-3)
    assert molar_mass("NaNi1/3Fe1/3Mn1/3O2") == pytest.approx(22.98977 + (58.6934 + 55.845 + 54.938044) / 3 + 31.998,
                                                              rel=1e-5)
    assert theoretical_capacity("LiCoO2") == pytest.approx(273.8, rel=1e-3)          # textbook value
    assert theoretical_capacity("LiFePO4") == pytest.approx(169.9, rel=1e-3)
    atoms = parse_formula("Na0.8Mg0.13[Mn0.6Co0.2Mg0.07]O2")
    assert atoms == pytest.approx({"Na": 0.8, "Mg": 0.2, "Mn": 0.6, "Co": 0.2, "O": 2.0})
    # the MCM cathode: 0.8 Na per formula unit
    assert theoretical_capacity("Na0.8Mg0.13[Mn0.6Co0.2Mg0.07]O2") == pytest.approx(
        0.8 * FARADAY / 3.6 / molar_mass("Na0.8Mg0.2Mn0.6Co0.2O2"))
    with pytest.raises(ValueError, match="cannot read the formula 'NaXy2'"):
        parse_formula("NaXy2")


def _record(t, v, i, step=None):
    return CyclerRecord(None, "test", T0 + np.asarray(t, float), np.asarray(v, float), np.asarray(i, float),
                        None if step is None else np.asarray(step))


def test_capacity_half_cycles_and_cc_cv_on_an_analytic_record():
    # rest 600 s; CC charge 1 mA for 3600 s; CV at 4.2 V with the current decaying; CC discharge; rest
    t1 = np.arange(0, 600, 10.0)
    t2 = np.arange(600, 4200, 10.0)
    t3 = np.arange(4200, 6000, 10.0)
    t4 = np.arange(6000, 9000, 10.0)
    t5 = np.arange(9000, 9600, 10.0)
    i3 = np.exp(-(t3 - 4200) / 600.0)
    t = np.concatenate([t1, t2, t3, t4, t5])
    i = np.concatenate([0 * t1, 1 + 0 * t2, i3, -1.2 + 0 * t4, 0 * t5])
    v = np.concatenate([3.0 + 0 * t1, 3.0 + 1.2 * (t2 - 600) / 3600, 4.2 + 0 * t3, 4.1 - (t4 - 6000) / 3000, 3.1 + 0 * t5])
    ec = analyse_record(_record(t, v, i), active_mass_mg=5.0, formula="NaNi1/3Fe1/3Mn1/3O2", x0=1.0)
    # charge passed: analytic integrals (trapezoid is exact for constant and step-held currents)
    q_cc = 3600.0
    q_cv = 600.0 * (1 - np.exp(-1790 / 600.0))
    k_end_cv = np.flatnonzero(t == 5990)[0]
    assert ec.charge_mAs[k_end_cv] == pytest.approx(q_cc + q_cv, rel=2e-4)
    assert ec.capacity_mAh_g[k_end_cv] == pytest.approx((q_cc + q_cv) / 3600 / 5e-3, rel=2e-4)
    # across a step change the current holds until the row that starts the next step:
    # the last CV current for [5990, 6000], then -1.2 mA for [6000, 9000]
    assert ec.charge_mAs[-1] == pytest.approx(q_cc + q_cv + 10 * np.exp(-1790 / 600) - 1.2 * 3000, rel=2e-4)
    # x = x0 - Q M / (F m)
    m = molar_mass("NaNi1/3Fe1/3Mn1/3O2")
    assert ec.x[k_end_cv] == pytest.approx(1.0 - ec.charge_mAs[k_end_cv] / 1000 * m / (FARADAY * 5e-3), rel=1e-9)
    # labels
    seg = dict(zip(t, ec.segment))
    assert seg[0] == "rest" and seg[1000] == "charge" and seg[5000] == "charge" and seg[7000] == "discharge"
    assert seg[9100] == "rest"
    mode = dict(zip(t, ec.mode))
    assert mode[1000] == "CC" and mode[5000] == "CV" and mode[7000] == "CC" and mode[0] == "rest"
    hc = dict(zip(t, ec.half_cycle))
    assert (hc[0], hc[1000], hc[5000], hc[7000], hc[9100]) == (0, 1, 1, 2, 2)
    hcap = dict(zip(t, ec.half_cycle_capacity_mAh_g))
    assert hcap[8990] == pytest.approx(1.2 * 2990 / 3.6 / 5.0, rel=1e-3)


def test_cycles_count_charges_after_discharges():
    t = np.arange(0, 8 * 100, 10.0)
    i = np.where((t // 100) % 2 == 0, 1.0, -1.0)
    ec = analyse_record(_record(t, 3.5 + 0 * t, i))
    assert list(np.unique(ec.half_cycle)) == list(range(1, 9))
    assert ec.cycle[t == 0][0] == 1 and ec.cycle[t == 150][0] == 1 and ec.cycle[t == 250][0] == 2
    assert ec.cycle[-1] == 4
    # a negative-on-charge cycler
    flipped = analyse_record(_record(t, 3.5 + 0 * t, -i), charge_current="negative")
    np.testing.assert_allclose(flipped.charge_mAs, ec.charge_mAs)
    assert (flipped.segment == ec.segment).all()


def test_frame_values_are_averaged_over_the_exposure_and_outside_frames_flagged():
    t = np.arange(0, 1000, 10.0)
    v = 3.0 + 1e-3 * t                          # a linear voltage ramp
    i = np.where(t < 200, 0.0, 0.5)             # rest, then charge from t = 200 s
    ec = analyse_record(_record(t, v, i), active_mass_mg=2.0, formula="NaNi1/3Fe1/3Mn1/3O2")
    starts = T0 + np.array([-100.0, -5.0, 300.0, 190.0, 975.0, 2000.0, np.nan])   # the record ends at 990
    ends = starts + np.array([20, 20, 60, 20, 20, 20, 20])
    fs = frame_states(ec, starts, ends)
    assert list(fs.status) == ["before_record", "partly_outside_record", "ok", "ok", "partly_outside_record",
                               "after_record", "untimed"]
    assert np.isnan(fs.voltage_V[[0, 5, 6]]).all() and np.isnan(fs.x[[0, 5, 6]]).all()
    # the mean of a ramp over [300, 360] is its middle; of a charge at 0.5 mA is 0.5 mA
    assert fs.voltage_V[2] == pytest.approx(3.0 + 1e-3 * 330)
    assert fs.current_mA[2] == pytest.approx(0.5)
    # capacity mean over [300, 360]: 0.5 mA x (330 - 200) s
    assert fs.capacity_mAh_g[2] == pytest.approx(0.5 * 130 / 3600 / 2e-3)
    # a frame across the rest -> charge step [190, 210]: half at rest, half charging
    assert fs.current_mA[3] == pytest.approx(0.25)
    assert fs.segment[3] == "charge" and fs.segment[2] == "charge"
    # partly outside: averaged over the covered part [0, 15]
    assert fs.voltage_V[1] == pytest.approx(3.0 + 1e-3 * 7.5)
    assert fs.time_s[2] == pytest.approx(300 + 30 - (-100))


def test_inventory_loss_shifts_x():
    t = np.arange(0, 2000, 10.0)
    i = np.where(t < 1000, 1.0, -0.8)
    history = _record(t, 3.5 + 0 * t, i)
    loss, cycles = inventory_loss([history], active_mass_mg=1.0)
    # charge for [0, 1000] s (held to the first discharge row), discharge for [1000, 1990] s
    assert loss == pytest.approx((1000 - 0.8 * 990) / 3600 / 1e-3, rel=1e-6) and cycles == 1
    now = _record(t, 3.5 + 0 * t, 0 * t)
    ec = analyse_record(now, active_mass_mg=1.0, formula="NaNi1/3Fe1/3Mn1/3O2", inventory_loss_mAh_g=loss)
    assert ec.x[0] == pytest.approx(1.0 - loss / theoretical_capacity("NaNi1/3Fe1/3Mn1/3O2"))


def test_synthetic_experiment_x_within_0p002_and_lattice_gets_voltage_and_x(tmp_path):
    n = 12              # 3 at rest, 5 charging, 4 discharging: every segment, every x estimate checked
    syn = make_experiment(tmp_path / "syn", n_frames=n, frame_format="xye", seed=3)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    xrdpipe.fit_experiment(exp, progress=False)
    from xrdpipe.run.lattice import lattice_experiment

    lattice_experiment(exp)
    summary = xrdpipe.echem_experiment(exp)
    assert summary.status == {"ok": n} and summary.lattice_updated
    rows = list(csv.DictReader(open(summary.csv_file)))
    assert list(rows[0])[:10] == list(FRAME_COLUMNS[:10])
    assert list(FRAME_COLUMNS[:10]) == ["frame", "time_s", "start", "end", "voltage_V", "current_mA",
                                        "capacity_mAh_g", "x", "segment", "status"]
    truth = {}
    for r in csv.DictReader(open(syn.truth_file)):
        truth[int(r["frame"])] = r
    x = np.array([float(r["x"]) for r in rows])
    x_true = np.array([float(truth[i]["x"]) for i in range(n)])
    assert np.max(np.abs(x - x_true)) < 0.002
    t_s = np.array([float(r["time_s"]) for r in rows])
    np.testing.assert_allclose(t_s, [float(truth[i]["time_s"]) for i in range(n)], atol=1e-3)
    segs = [r["segment"] for r in rows]
    assert segs[:3] == ["rest"] * 3 and "charge" in segs and segs[-1] == "discharge"
    # absolute times are kept with the frames' own offset
    assert rows[0]["start"] == syn.times[0][0].isoformat()
    # lattice.csv: voltage_V and x filled from the same states
    lat = list(csv.DictReader(open(exp.run.output / "lattice.csv")))
    by_frame = {int(r["frame"]): r for r in rows}
    for r in lat:
        assert r["x"] == by_frame[int(r["frame"])]["x"] and r["voltage_V"] == by_frame[int(r["frame"])]["voltage_V"]
    # the run file keeps the per-frame states and the whole record
    from xrdpipe.run.groups import read_table

    stored = read_table(exp.run.run_file, "electrochemistry")
    np.testing.assert_allclose(stored["x"], x, rtol=1e-8)
    assert stored["attrs"]["theoretical_capacity_mAh_g"] == pytest.approx(240.4, rel=1e-3)


def test_a_cycler_clock_that_misses_every_frame_is_a_warning_naming_both_spans(tmp_path):
    """A cycler start typed a day off puts every frame before the record: no frame gets a voltage
    or x. That is a warning giving the frames' span, the record's and the key that set its clock
    (it was a status count, before_record 4, and a run that finished as if nothing were wrong);
    a record that covers the frames gives none."""
    syn = make_experiment(tmp_path / "syn", n_frames=4, n_rest=0, frame_format="xye", seed=3)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    assert not xrdpipe.echem_experiment(exp).warnings
    toml = syn.experiment_file
    toml.write_text(toml.read_text().replace('start = "2025-07-02T19:04:59+08:00"',
                                             'start = "2025-07-03T19:04:59+08:00"'))
    summary = xrdpipe.echem_experiment(xrdpipe.load_experiment(toml))
    assert summary.status == {"before_record": 4}
    (warning,) = summary.warnings
    assert warning.startswith("no frame lies within the cycler record (4 before it): the frames run from "
                              f"{syn.times[0][0].isoformat()} to {syn.times[-1][1].isoformat()}, the record "
                              "(") and "cycler.csv) from 2025-07-03T11:04:59+00:00 to " in warning
    assert "[electrochemistry] start = 2025-07-03T19:04:59+08:00 sets the record's clock" in warning
    assert f"warning: {warning}" in str(summary)


def test_datalab_coin_cell_scans_matched_by_absolute_time(data_dir, coincell8):
    src = data_dir / "datalab-coincell8"
    exp = coincell8('[electrochemistry]\nfile = "cc8.ndax"\n')     # local times: the frames' timezone is used
    xrdpipe.integrate_experiment(exp, progress=False)
    summary = xrdpipe.echem_experiment(exp)
    rows = list(csv.DictReader(open(summary.csv_file)))
    assert [r["key"].split("_")[0] for r in rows] == ["1355639", "1355647", "1355655", "1355663", "1355671"]
    # the record starts at 19:08:11; the first scan (19:05:59-19:06:56) is before it: flagged, no values
    assert rows[0]["status"] == "before_record" and rows[0]["voltage_V"] == "" and rows[0]["segment"] == ""
    # scans 2-4 fall in the 30 min rest (19:08:11-19:38:11); scan 5 in the CC charge
    assert [r["segment"] for r in rows[1:]] == ["rest", "rest", "rest", "charge"]
    assert all(r["status"] == "ok" for r in rows[1:])
    # voltages: the mean of the Neware rows inside each exposure (read independently)
    import NewareNDA

    df = NewareNDA.read(str(src / "cc8.ndax"))
    stamps = df["Timestamp"].dt.tz_localize("Europe/London")
    for r in rows[1:]:
        s, e = datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])
        sel = ((stamps >= s - timedelta(seconds=10)) & (stamps <= e + timedelta(seconds=10))).to_numpy()
        v = df["Voltage"].to_numpy()[sel]
        assert v.min() - 1e-4 <= float(r["voltage_V"]) <= v.max() + 1e-4
    assert all(abs(float(r["voltage_V"]) - 3.0976) < 1e-3 for r in rows[1:4])
    assert 3.55 < float(rows[4]["voltage_V"]) < 3.60 and float(rows[4]["current_mA"]) == pytest.approx(0.3059, rel=1e-3)
    # no active mass: no capacity or x, and the summary says why
    assert rows[4]["x"] == "" and any("active_mass_mg" in n for n in summary.notes)


def test_electrochemistry_keys_are_validated(tmp_path):
    (tmp_path / "c.csv").write_text("time/s,Ewe/V,I/mA\n0,3,0\n")
    base = 'schema_version = 1\n[run]\nname = "r"\n[patterns]\nfiles = "c.csv"\nwavelength_A = 0.7\n'
    (tmp_path / "p.xy").write_text("1 2\n")

    def load(section):
        (tmp_path / "e.toml").write_text(base.replace("c.csv\"\nwave", "p.xy\"\nwave") + section)
        return xrdpipe.load_experiment(tmp_path / "e.toml")

    exp = load('[electrochemistry]\nfile = "c.csv"\nstart = 2025-07-02T19:00:00+08:00\nactive_mass_mg = 7.2\n'
               'formula = "NaNi1/3Fe1/3Mn1/3O2"\nx0 = 1.0\n')
    assert exp.electrochemistry.start.utcoffset() == timedelta(hours=8)
    with pytest.raises(ConfigError) as err:
        load('[electrochemistry]\nfile = "missing.csv"\nformula = "NaQq2"\nactive_mas_mg = 3\n'
             'start = "2025-07-02T19:00:00"\nunits = { current = "furlong" }\n')
    text = str(err.value)
    assert "electrochemistry.file: no such cycler file" in text
    assert "electrochemistry.formula: cannot read the formula 'NaQq2'" in text
    assert "electrochemistry.active_mas_mg: unknown key; did you mean 'active_mass_mg'?" in text
    assert "unknown current unit 'furlong'" in text
    with pytest.raises(ConfigError, match="start has no UTC offset"):
        load('[electrochemistry]\nfile = "c.csv"\nstart = "2025-07-02T19:00:00"\n')


def test_the_readme_electrochemistry_example_is_valid(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Electrochemistry")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "cycler.csv").write_text("time/s,Ewe/V,I/mA\n0,3,0\n")
    (tmp_path / "p.xy").write_text("1 2\n")
    (tmp_path / "e.toml").write_text('schema_version = 1\n[run]\nname = "r"\n[patterns]\nfiles = "p.xy"\n'
                                     'wavelength_A = 0.6209\n' + block)
    e = xrdpipe.load_experiment(tmp_path / "e.toml").electrochemistry
    assert e.columns["current"] == "I/mA" and e.timezone == "Asia/Shanghai" and e.x0 == 1.0
    assert e.start == datetime(2025, 7, 2, 11, 0, tzinfo=timezone.utc) and e.inventory_loss_mAh_g == 12.5


def test_frames_integrated_after_echem_have_no_state_and_break_nothing(tmp_path):
    """Frames integrated after `xrdpipe echem` ran (the electrochemistry table is shorter than the
    frame table): the lattice, the export and the run summary give them no state of charge (NaN)
    and say so, instead of an IndexError."""
    from xrdpipe.run.groups import read_electrochemistry
    from xrdpipe.run.lattice import lattice_experiment
    from xrdpipe.run.workflow import RunSummary, _fill_state

    syn = make_experiment(tmp_path / "syn", n_frames=10, frame_format="xye", seed=3)
    later = sorted(syn.frame_files)[7:]
    aside = tmp_path / "aside"
    aside.mkdir()
    for f in later:
        f.rename(aside / f.name)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    xrdpipe.echem_experiment(exp)
    for f in later:
        (aside / f.name).rename(f)
    exp = xrdpipe.load_experiment(syn.experiment_file)      # the glob finds 3 frames more
    xrdpipe.integrate_experiment(exp, progress=False)       # echem not run again
    xrdpipe.fit_experiment(exp, progress=False)
    lattice_experiment(exp)
    ec = read_electrochemistry(exp.run.run_file)
    assert ec.frames_without == 3 and ec.x.shape == (10,)
    assert np.isfinite(ec.x[:7]).all() and np.isnan(ec.x[7:]).all() and list(ec.half_cycle[7:]) == [-1] * 3
    only_x = read_electrochemistry(exp.run.run_file, names=("x",))       # the columns asked for alone
    assert only_x.voltage_V is None and only_x.frames_without == 3
    np.testing.assert_array_equal(only_x.x, ec.x)
    lat = list(csv.DictReader(open(exp.run.output / "lattice.csv")))
    assert {r["x"] for r in lat if int(r["frame"]) >= 7} == {""} and all(r["x"] for r in lat if int(r["frame"]) < 7)
    xrdpipe.export_experiment(exp, formats=["xye"])
    summary = RunSummary(exp.run.run_file)
    _fill_state(summary, exp)
    assert summary.frames_without_echem == 3
    assert "3 frame(s) have no state of charge yet" in str(summary)


def test_a_fit_made_again_makes_the_lattice_table_again(tmp_path):
    """Stage by stage: a lattice table made from the phase model's peaks, then the frames fitted
    again with independent peaks (``[fit] model = "peaks"``): lattice.csv is made again from the
    new peaks (it kept the phase model's fractions and presence, describing peaks no longer in
    the run file); ``run_experiment`` makes it once, as its own stage."""
    syn = make_experiment(tmp_path / "syn", n_frames=6, n_rest=0, frame_format="xye", seed=3)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    xrdpipe.integrate_experiment(exp, progress=False)
    assert not xrdpipe.fit_experiment(exp, progress=False).lattice_updated      # (no lattice yet)
    xrdpipe.lattice_experiment(exp)
    lattice_csv = exp.run.output / "lattice.csv"
    before = list(csv.DictReader(open(lattice_csv)))
    assert "scale" in {r["fraction_method"] for r in before}
    toml = syn.experiment_file
    toml.write_text(toml.read_text() + '\n[fit]\nmodel = "peaks"\n')
    exp = xrdpipe.load_experiment(toml)
    summary = xrdpipe.fit_experiment(exp, progress=False)
    assert summary.fitted == 6 and summary.lattice_updated
    assert "(lattice.csv made again from them)" in str(summary)
    after = list(csv.DictReader(open(lattice_csv)))
    assert "scale" not in {r["fraction_method"] for r in after}
    assert not any("cell search" in r["presence"] for r in after)
    xrdpipe.lattice_experiment(exp)
    assert list(csv.DictReader(open(lattice_csv))) == after
