"""The synthetic forward model is itself consistent with physics."""

import csv

import numpy as np
import pytest

from xrdpipe.testing import FARADAY, nfm_scenario, phase_state


def test_lever_rule_and_boundaries():
    sc = nfm_scenario()
    lo, hi = sc.coexistence
    assert [s[0].name for s in phase_state(sc, 0.9)] == ["O3"]
    assert [s[0].name for s in phase_state(sc, 0.5)] == ["P3"]
    mid = phase_state(sc, (lo + hi) / 2)
    assert [s[0].name for s in mid] == ["O3", "P3"]
    assert sum(s[3] for s in mid) == pytest.approx(1.0)
    assert mid[0][3] == pytest.approx(0.5)
    # cells are frozen at the phase boundaries inside the coexistence region
    assert mid[0][1:3] == sc.high.cell(hi) and mid[1][1:3] == sc.low.cell(lo)


def test_theoretical_capacity_of_nfm():
    # the NFM study quotes 240.385 mAh/g for NaNi1/3Fe1/3Mn1/3O2
    assert nfm_scenario().capacity_per_x_mAh_g == pytest.approx(240.385, abs=0.05)


def test_cycler_charge_matches_truth_x(synthetic_h5):
    rows = list(csv.DictReader(open(synthetic_h5.cycler_file)))
    t = np.array([float(r["time/s"]) for r in rows])
    i = np.array([float(r["I/mA"]) for r in rows])
    truth = list(csv.DictReader(open(synthetic_h5.truth_file)))
    xs = {int(r["frame"]): float(r["x"]) for r in truth}
    sc = synthetic_h5.scenario
    moles = 7.2e-3 / sc.molar_mass
    # the cycler starts 60 s before the first frame; frame f's middle is at 60 + 20 f + 10 s
    for f in (0, 5, 11):
        t_mid = 60 + 20 * f + 10
        # the current is piecewise constant: each sample holds until the next one
        sel = t <= t_mid
        q_mAs = np.sum(i[sel][:-1] * np.diff(t[sel])) + i[sel][-1] * (t_mid - t[sel][-1])
        x = 1.0 - q_mAs * 1e-3 / FARADAY / moles
        assert x == pytest.approx(xs[f], abs=2e-3)


def test_truth_file_has_the_promised_columns(synthetic_h5):
    with open(synthetic_h5.truth_file) as fh:
        header = next(csv.reader(fh))
    assert header[:2] == ["frame", "time"] and {"x", "phase", "a", "c", "fraction"} <= set(header)


def test_synthetic_lines_keep_their_whole_lorentzian_tails():
    """A detector records every line's tail over the whole pattern: the simulator once cut each
    pseudo-Voigt at 25 FWHM, a step no real pattern has and a background that flattered the
    engine (lines outside the windows left no tail in them). Far from a line the pattern less
    its background is the Lorentzian tail, eta * area * FWHM / (2 pi d^2), and smooth."""
    from xrdpipe.testing import ProfileModel, pattern_1d

    prof = ProfileModel()
    tth = np.linspace(3.0, 24.0, 21001)
    line = {"tth_deg": 10.0, "area": 1000.0}
    net = pattern_1d(tth, [line], profile=prof) - pattern_1d(tth, [], profile=prof)
    fw = float(prof.fwhm(10.0))
    for d in (30 * fw, 60 * fw, 12.0):
        x = 10.0 + d
        got = np.interp(x, tth, net)
        tail = prof.eta * line["area"] * fw / (2 * np.pi * d * d)     # 1 / (1 + 4 u^2) ~ 1 / (4 u^2)
        assert got == pytest.approx(tail, rel=0.01)
    # no step anywhere (the cut left one of ~0.7 counts at 25 FWHM): neighbouring points 0.001° apart
    # differ by what the tail's slope gives, a few thousandths
    far = np.abs(tth - 10.0) > 20 * fw
    assert np.max(np.abs(np.diff(net)[far[:-1] & far[1:]])) < 1e-2
