"""Lattice parameters, fractions, layer geometry and trends against known truth."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xrdpipe.config import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from xrdpipe.crystallography import d_from_tth, d_spacing, is_allowed, reflections, tth_from_d
from xrdpipe.fractions import combine_ratios
from xrdpipe.lattice import LATTICE_COLUMNS, refine_lattice, trend
from xrdpipe.peaks import PeakTable, fit_peaks
from xrdpipe.phases import LIBRARY, layer_geometry
from xrdpipe.tables import PEAK_ARRAYS
from xrdpipe.testing import pattern_series, phase_state

WL = 0.6209
CELLS = {
    "R-3m": dict(a=2.985, c=16.0),
    "Cmcm": dict(a=2.87, b=5.28, c=11.2),
    "C2/m": dict(a=5.67, b=2.86, c=5.80, beta=113.2),
}


@settings(max_examples=60, deadline=None)
@given(sg=st.sampled_from(sorted(CELLS)), h=st.integers(-4, 4), k=st.integers(-4, 4), l=st.integers(-8, 8),
       scale=st.floats(0.97, 1.03))
def test_hkl_to_d_to_two_theta_and_back(sg, h, k, l, scale):
    if h == k == l == 0:
        return
    cell = {key: v * (scale if key != "beta" else 1.0) for key, v in CELLS[sg].items()}
    d = d_spacing(sg, h, k, l, cell["a"], cell["c"], cell.get("b"), cell.get("beta"))
    tth = tth_from_d(d, WL)
    if np.isfinite(tth):
        assert d_from_tth(tth, WL) == pytest.approx(d, rel=1e-12)


def test_reflection_rules_of_the_lower_symmetry_groups():
    assert is_allowed("Cmcm", 0, 0, 2) and not is_allowed("Cmcm", 0, 0, 1)
    assert is_allowed("Cmcm", 1, 1, 0) and not is_allowed("Cmcm", 1, 0, 0)
    assert not is_allowed("Cmcm", 1, 0, 1) and is_allowed("Cmcm", 2, 0, 2)
    assert is_allowed("C2/m", 0, 0, 1) and is_allowed("C2/m", 1, 1, 0) and not is_allowed("C2/m", 0, 1, 0)
    refl = reflections("C2/m", 5.67, 5.80, 2.0, b_A=2.86, beta_deg=113.2)
    assert refl[0][:3] == (0, 0, 1) and refl[0][3] == pytest.approx(5.80 * np.sin(np.radians(113.2)))
    assert all((h + k) % 2 == 0 for h, k, *_ in refl)


def _table_from(cells, phases, hkls, *, err=1e-4, shift=0.0, rng=None, unit="2th_deg"):
    """A PeakTable whose centres are computed from known cells (one frame per cell set)."""
    peaks = [("w", p.name, "".join(map(str, hkl)) if max(map(abs, hkl)) < 10 else " ".join(map(str, hkl)),
              "pseudo_voigt") for p, hkl in hkls]
    n = len(cells)
    values = {name: np.full((n, len(peaks)), np.nan) for name in PEAK_ARRAYS}
    for r, cell in enumerate(cells):
        for i, (p, hkl) in enumerate(hkls):
            c = cell[p.name]
            d = d_spacing(p.space_group, *hkl, c["a"], c["c"], c.get("b"), c.get("beta"))
            tth = tth_from_d(d, WL) + shift
            noise = rng.normal(0, err) if rng is not None else 0.0
            values["center"][r, i] = (tth if unit == "2th_deg" else 4 * np.pi * np.sin(np.radians(tth) / 2) / WL) + noise
            values["center_err"][r, i] = err
            values["area"][r, i], values["area_err"][r, i] = 100.0, 1.0
    return PeakTable(np.arange(n), np.arange(n) * 20.0, ("w",), tuple(peaks), values, np.ones((n, len(peaks)), bool),
                     np.ones((n, 1), bool), np.ones((n, 1)), np.full((n, 1), "", dtype=object))


@pytest.mark.parametrize("name, hkls", [
    ("O3", [(0, 0, 3), (1, 0, 4), (0, 1, 8), (1, 1, 0), (1, 0, 7)]),
    ("P'2", [(0, 0, 2), (0, 2, 1), (1, 1, 1), (2, 0, 0), (1, 1, 3), (0, 2, 4)]),
    ("O'3", [(0, 0, 1), (1, 1, 0), (-1, 1, 1), (2, 0, -1), (1, 1, 1), (2, 0, 1), (0, 0, 2)]),
])
def test_cell_to_d_list_to_cell(name, hkls):
    phase = PhaseSpec(name=name)
    truth = {key: getattr(phase, key) * 1.01 if key != "beta" else phase.beta + 0.5
             for key in ("a", "b", "c", "beta") if getattr(phase, key) is not None}
    table = _table_from([{name: truth}], [phase], [(phase, h) for h in hkls])
    lat = refine_lattice(table, [phase], unit="2th_deg", wavelength_A=WL)
    assert lat.column("a_A", name)[0] == pytest.approx(truth["a"], rel=1e-9)
    assert lat.column("c_A", name)[0] == pytest.approx(truth["c"], rel=1e-9)
    if "b" in truth:
        assert lat.column("b_A", name)[0] == pytest.approx(truth["b"], rel=1e-9)
    if "beta" in truth:
        assert lat.column("beta_deg", name)[0] == pytest.approx(truth["beta"], abs=1e-7)
    assert lat.message[0, 0] == ""


def test_zero_shift_is_refined_and_shared():
    o3, p3 = PhaseSpec(name="O3"), PhaseSpec(name="P3")
    cells = [{"O3": dict(a=2.96, c=16.2), "P3": dict(a=2.93, c=16.7)}]
    hkls = [(o3, (0, 0, 3)), (o3, (1, 0, 4)), (o3, (1, 0, 7)), (o3, (0, 1, 8)),
            (p3, (0, 0, 3)), (p3, (1, 0, 1)), (p3, (1, 0, 7)), (p3, (0, 1, 8))]
    table = _table_from(cells, [o3, p3], hkls, shift=0.012)
    biased = refine_lattice(table, [o3, p3], unit="2th_deg", wavelength_A=WL)
    fixed = refine_lattice(table, [o3, p3], LatticeSpec(correction="zero"), unit="2th_deg", wavelength_A=WL)
    assert abs(biased.column("c_A", "O3")[0] - 16.2) > 0.01
    assert fixed.column("c_A", "O3")[0] == pytest.approx(16.2, abs=1e-8)
    assert fixed.column("a_A", "P3")[0] == pytest.approx(2.93, abs=1e-9)
    assert fixed.column("correction_deg", "O3")[0] == pytest.approx(0.012, abs=1e-9)


def test_only_00l_gives_c_alone_and_says_so():
    o3 = PhaseSpec(name="O3")
    table = _table_from([{"O3": dict(a=2.96, c=16.2)}], [o3], [(o3, (0, 0, 3)), (o3, (0, 0, 6))])
    lat = refine_lattice(table, [o3], unit="2th_deg", wavelength_A=WL)
    assert lat.column("c_A", "O3")[0] == pytest.approx(16.2, rel=1e-10)
    assert np.isnan(lat.column("a_A", "O3")[0]) and np.isnan(lat.column("volume_A3", "O3")[0])
    assert "a not determined (only 00l reflections)" in lat.message[0, 0]


def test_fitting_in_q_gives_the_same_cell():
    o3 = PhaseSpec(name="O3")
    hkls = [(o3, (0, 0, 3)), (o3, (1, 0, 4)), (o3, (1, 1, 0))]
    table = _table_from([{"O3": dict(a=2.97, c=16.1)}], [o3], hkls, unit="q_A^-1", err=1e-5)
    lat = refine_lattice(table, [o3], unit="q_A^-1", wavelength_A=WL)
    assert lat.column("a_A", "O3")[0] == pytest.approx(2.97, rel=1e-10)
    assert lat.column("volume_A3", "O3")[0] == pytest.approx(np.sqrt(3) / 2 * 2.97**2 * 16.1, rel=1e-9)


@pytest.fixture(scope="module")
def series_lattice():
    series = pattern_series(40, x_range=(0.74, 0.58), counts=0.05, background=3000.0, seed=5)
    phases = [PhaseSpec(name="O3"), PhaseSpec(name="P3")]
    windows = [WindowSpec(name="003", range=(6.1, 7.0), peaks=["O3 003", "P3 003"]),
               WindowSpec(name="006", range=(12.4, 13.8), peaks=["O3 006", "P3 006"]),
               WindowSpec(name="107", range=(20.35, 21.1), peaks=["O3 107", "P3 107"]),
               WindowSpec(name="018", range=(21.95, 22.9), peaks=["O3 018", "P3 018"])]
    table = fit_peaks(series.as_patterns(), phases, windows, FitSpec())
    return series, refine_lattice(table, phases, unit="2th_deg", wavelength_A=WL)


def test_cells_and_fractions_of_a_synthetic_series(series_lattice):
    series, lat = series_lattice
    za, zc = [], []
    for name in ("O3", "P3"):
        states = [{p.name: (a, c, f) for p, a, c, f in phase_state(series.scenario, x)} for x in series.x]
        ta = np.array([s.get(name, (np.nan,) * 3)[0] for s in states])
        tc = np.array([s.get(name, (np.nan,) * 3)[1] for s in states])
        tf = np.array([s.get(name, (0, 0, 0.0))[2] for s in states])
        a, c = lat.column("a_A", name), lat.column("c_A", name)
        there = np.isfinite(ta)
        assert np.isfinite(a[there]).all() and np.isnan(a[~there]).all()
        assert np.max(np.abs(a - ta)[there]) < 2e-4
        assert np.max(np.abs(c - tc)[there]) < 3e-3
        za.extend(((a - ta) / lat.column("a_err_A", name))[there])
        zc.extend(((c - tc) / lat.column("c_err_A", name))[there])
        coexist = (series.x > 0.64) & (series.x < 0.68)
        assert coexist.sum() >= 5
        assert np.max(np.abs(lat.column("fraction", name) - tf)[coexist]) < 0.03
        assert np.max(np.abs(lat.column("fraction", name) - tf)) < 0.03
    assert 0.5 < np.mean(np.abs(za) < 1) < 0.86
    assert 0.5 < np.mean(np.abs(zc) < 1) < 0.86
    # the layer geometry follows the cell
    o3 = lat.phases.index("O3")
    r = np.flatnonzero(np.isfinite(lat.values["a_A"][:, o3]))[0]
    geo = layer_geometry("O3", lat.values["a_A"][r, o3], lat.values["c_A"][r, o3], LIBRARY["O3"].z_o)
    assert lat.values["tm_o_A"][r, o3] == pytest.approx(geo["tm_o_A"])


def test_layer_geometry_from_fractional_coordinates():
    a, c, z = 2.96, 16.2, 0.2326
    # O3, R-3m (hexagonal axes): Na 3a (0,0,0), TM 3b (0,0,1/2), O 6c (0,0,z) + centring.
    # TM (0,0,1/2) to O (2/3,1/3,1/3+z): in-plane a/sqrt(3), along c (z - 1/6) c
    # Na (0,0,0) to O (2/3,1/3,1/3-z): in-plane a/sqrt(3), along c (1/3 - z) c
    # Na (0,0,0) to TM (1/3,2/3,1/6): in-plane a/sqrt(3), along c c/6
    g = layer_geometry("O3", a, c, z)
    assert g["tm_o_A"] == pytest.approx(np.sqrt(a**2 / 3 + (c * (z - 1 / 6)) ** 2), rel=1e-12)
    assert g["na_o_A"] == pytest.approx(np.sqrt(a**2 / 3 + (c * (1 / 3 - z)) ** 2), rel=1e-12)
    assert g["na_tm_A"] == pytest.approx(np.sqrt(a**2 / 3 + (c / 6) ** 2), rel=1e-12)
    assert g["tm_slab_A"] == pytest.approx(2 * c * (z - 1 / 6), rel=1e-12)
    assert g["na_slab_A"] == pytest.approx(2 * c * (1 / 3 - z), rel=1e-12)
    # P2, P63/mmc: TM 2a (0,0,0), O 4f (1/3,2/3,z), Na 2b (0,0,1/4) right above TM
    a, c, z = 2.85, 11.2, 0.09
    g = layer_geometry("P2", a, c, z)
    assert g["tm_o_A"] == pytest.approx(np.sqrt(a**2 / 3 + (c * z) ** 2), rel=1e-12)
    assert g["na_o_A"] == pytest.approx(np.sqrt(a**2 / 3 + (c * (0.25 - z)) ** 2), rel=1e-12)
    assert g["na_tm_A"] == pytest.approx(c / 4, rel=1e-12)
    assert g["tm_slab_A"] + g["na_slab_A"] == pytest.approx(c / 2, rel=1e-12)


def test_library_fills_phases_and_users_override():
    assert PhaseSpec(name="O3").space_group == "R-3m"
    p = PhaseSpec(name="P2", c=11.31)
    assert (p.a, p.c, p.z_o) == (LIBRARY["P2"].a, 11.31, LIBRARY["P2"].z_o)
    q = PhaseSpec(name="P2-ordered", kind="P2")
    assert q.space_group == "P63/mmc" and q.structure_kind == "P2"
    assert PhaseSpec(name="P'2").b == LIBRARY["P'2"].b
    with pytest.raises(ValueError, match="give b"):
        PhaseSpec(name="X", space_group="Cmcm", a=2.9, c=11.0)


def test_trend_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    x = np.linspace(0.4, 0.9, 60)
    y = 16.9 - 1.2 * x + rng.normal(0, 0.002, x.size)
    t = trend(x, y, np.full(x.size, 0.002), x_range=(0.45, 0.85))
    assert abs(t["slope"] + 1.2) < 3 * t["slope_err"] and t["slope_err"] < 0.01
    assert t["n"] == np.count_nonzero((x >= 0.45) & (x <= 0.85))
    with pytest.raises(ValueError, match="at least 3 points"):
        trend([1, 2], [1, 2])


def test_lattice_command_writes_lattice_csv(tmp_path):
    import csv

    from click.testing import CliRunner

    from xrdpipe.cli import main
    from xrdpipe.testing import make_experiment

    syn = make_experiment(tmp_path / "exp", n_frames=10, frame_format="xye", counts=0.05, background=3000.0,
                          npt=5000, seed=4, frac_charge=0.9)
    runner = CliRunner()
    for cmd in ("integrate", "fit"):
        assert runner.invoke(main, [cmd, str(syn.experiment_file), "-q"]).exit_code == 0
    res = runner.invoke(main, ["lattice", str(syn.experiment_file)])
    assert res.exit_code == 0, res.output
    with open(syn.folder / "results" / "lattice.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == LATTICE_COLUMNS
    assert len(rows) == 20 and rows[0]["voltage_V"] == "" and rows[0]["x"] == ""
    truth = {(int(r["frame"]), r["phase"]): float(r["c"]) for r in csv.DictReader(open(syn.truth_file))}
    for r in rows:
        if r["c_A"]:
            assert abs(float(r["c_A"]) - truth[(int(r["frame"]), r["phase"])]) < 3e-3


def test_fraction_from_a_window_against_a_reference_frame(series_lattice):
    series, _ = series_lattice
    phases = [PhaseSpec(name="O3"), PhaseSpec(name="P3")]
    windows = [WindowSpec(name="003", range=(6.1, 7.0), peaks=["O3 003", "P3 003"])]
    table = fit_peaks(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(fraction_window="003", reference_frame=0), unit="2th_deg",
                         wavelength_A=WL)
    f = lat.column("fraction", "O3")
    assert f[0] == pytest.approx(1.0, abs=1e-12)
    tf = np.array([next((fr for p, a, c, fr in phase_state(series.scenario, x) if p.name == "O3"), 0.0)
                   for x in series.x])
    coexist = (series.x > 0.64) & (series.x < 0.68)
    assert np.max(np.abs(f - tf)[coexist]) < 0.05  # the O3 (003) intensity drifts a little with x
    assert np.all(lat.column("fraction_err", "O3")[coexist] > 0)


def test_window_scales_combine_robustly():
    """Windows agree on a phase's scale to within more than their esds, and one window's line
    is swallowed by another phase's (its area pressed to 0 with a small esd): the scale is the
    others' mean, with an esd as large as their spread, not the swallowed window's 0."""
    rng = np.random.default_rng(3)
    truth = 0.67
    n, w = 400, 5
    spread = 0.01                                    # between windows, beyond their esds
    var = np.full((n, w), 0.002**2)
    ratio = truth + rng.normal(0, spread, (n, w)) + rng.normal(0, 0.002, (n, w))
    ratio[:, 2] = 0.0005                             # the swallowed window
    var[:, 2] = 0.0013**2
    scale, scale_var = combine_ratios(ratio, var)
    assert abs(np.mean(scale) - truth) < 0.002
    # the esd reflects the windows' disagreement: about spread / 2 for four windows
    assert 0.6 < np.median(np.sqrt(scale_var)) / (spread / 2) < 1.6
    within = np.abs(scale - truth) < np.sqrt(scale_var)
    assert 0.5 < within.mean() < 0.9
    # no window, no scale; one window: its own value and variance
    one = np.full((2, 3), np.nan)
    one[1, 0] = 0.4
    v1 = np.full((2, 3), np.nan)
    v1[1, 0] = 1e-4
    s, v = combine_ratios(one, v1)
    assert np.isnan(s[0]) and s[1] == pytest.approx(0.4) and v[1] == pytest.approx(1e-4)


def test_a_phase_never_alone_learns_its_intensities_beside_one_that_was():
    """A run that starts in a two-phase region: phase 0 is never the only one present, phase 1
    is alone at the end. Phase 0's own intensities per window (2, 1 and 0.5 per unit of phase)
    differ from phase 1's (2, 6 and 0.4): its raw areas gave fractions of diffracted intensity
    (up to 0.2 off here). Learned in the frames where phase 1's scale leaves it 20 % or
    more of the sum of 1, they give the true fractions (1 % noise on each area)."""
    from xrdpipe.fractions import _phase_scales

    rng = np.random.default_rng(0)
    f0 = np.clip(np.linspace(0.7, -0.3, 30), 0, 1)         # phase 0's fraction: 0.7 down to 0
    per_unit = np.array([[2.0, 1.0, 0.5], [2.0, 6.0, 0.4]])
    present = np.stack([f0 > 0, np.ones(30, bool)], axis=1)
    area = np.stack([f0, 1 - f0], axis=1)[:, :, None] * per_unit[None] * (1 + rng.normal(0, 0.01, (30, 2, 3)))
    area = np.where(present[:, :, None], area, 0.0)
    sd = np.where(present[:, :, None], 0.01 * area + 1e-3, np.nan)
    scale, scale_var, how = _phase_scales(present, area, np.nan_to_num(sd) ** 2, sd)
    assert list(how) == ["scale-sum", "scale"]
    both = present.all(axis=1)
    frac = scale[both, 0] / scale[both].sum(axis=1)
    assert np.abs(frac - f0[both]).max() < 0.01, frac - f0[both]
    raw = area[both, 0].sum(axis=1) / area[both].sum(axis=(1, 2))
    assert np.abs(raw - f0[both]).max() > 0.15               # what the raw areas said


def test_a_cubic_phase_is_present_where_its_a_is_refined():
    """Al (Fm-3m) has no c: present where a is refined or a fraction is above zero (the report
    and the run summary never showed it)."""
    from xrdpipe.lattice import phase_present

    a = np.array([[4.0495, 2.98], [np.nan, 2.97], [np.nan, np.nan]])
    c = np.array([[np.nan, 16.0], [np.nan, 16.1], [np.nan, np.nan]])
    fraction = np.array([[np.nan, 1.0], [0.0, 1.0], [np.nan, 0.2]])
    assert phase_present(a, c, fraction).tolist() == [[True, True], [False, True], [False, True]]
