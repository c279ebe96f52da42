"""Per-frame peak fitting against synthetic series with known centres, areas and phases."""

import numpy as np
import pytest

import xrdpipe
from xrdpipe.config import FitSpec, PhaseSpec, WindowSpec
from xrdpipe.lineshapes import pearson7, split_pseudo_voigt
from xrdpipe.lmfit_models import lmfit_params
from xrdpipe.peaks import WindowModel, WindowSetupError, fit_peaks, fit_window
from xrdpipe.run.store import Patterns
from xrdpipe.testing import pattern_series

PHASES = [PhaseSpec(name="O3", space_group="R-3m", a=2.985, c=16.0),
          PhaseSpec(name="P3", space_group="R3m", a=2.93, c=16.7)]
W003 = WindowSpec(name="003", range=(6.1, 7.0), peaks=["O3 003", "P3 003"])


@pytest.fixture(scope="module")
def coexistence():
    """O3 -> P3 through the two-phase region (x 0.68 to 0.64), beamline-like counts."""
    return pattern_series(48, x_range=(0.72, 0.60), counts=0.05, background=3000.0, seed=5)


@pytest.fixture(scope="module")
def batched(coexistence):
    return fit_peaks(coexistence.as_patterns(), PHASES, [W003])


@pytest.fixture(scope="module")
def reference(coexistence):
    return fit_peaks(coexistence.as_patterns(), PHASES, [W003], FitSpec(engine="lmfit"))


def _truth(series, label):
    phase, hkl = label.split()
    return series.truth(phase, hkl), series.truth(phase, hkl, "area")


def test_centres_are_at_the_noise_limit_with_honest_esds(coexistence, batched):
    z = []
    for label in ("O3 003", "P3 003"):
        tc, _ = _truth(coexistence, label)
        c, e = batched.column("center", label), batched.column("center_err", label)
        ok = batched.column("present", label) & np.isfinite(tc)
        assert ok.sum() >= 20
        assert np.sqrt(np.mean((c - tc)[ok] ** 2)) < 1e-4  # degrees; FWHM is 0.07
        z.extend(((c - tc) / e)[ok])
    within = np.mean(np.abs(z) < 1)
    assert 0.55 < within < 0.82, within  # ~68 % of the truths within one esd
    assert 0.7 < np.std(z) < 1.35


def test_batched_and_lmfit_find_the_same_peaks(coexistence, batched, reference):
    for label in ("O3 003", "P3 003"):
        tc, _ = _truth(coexistence, label)
        pb, pl = batched.column("present", label), reference.column("present", label)
        assert np.mean(pb == pl) >= 0.97
        both = pb & pl & np.isfinite(tc)
        cb, cl = batched.column("center", label)[both], reference.column("center", label)[both]
        rms_b = np.sqrt(np.mean((cb - tc[both]) ** 2))
        rms_l = np.sqrt(np.mean((cl - tc[both]) ** 2))
        assert rms_b <= 1.2 * rms_l
        esd = reference.column("center_err", label)[both]
        assert np.median(np.abs(cb - cl) / esd) < 0.05  # the same minimum
        eb, el = batched.column("area_err", label)[both], reference.column("area_err", label)[both]
        np.testing.assert_allclose(eb, el, rtol=0.02)


def test_presence_is_detected_where_the_minor_phase_has_5_percent(coexistence, batched):
    areas = {label: _truth(coexistence, label)[1] for label in ("O3 003", "P3 003")}
    total = sum(areas.values())
    right = []
    for label, a in areas.items():
        decidable = (a == 0) | (a >= 0.05 * total)
        right.extend((batched.column("present", label) == (a > 0))[decidable])
    assert np.mean(right) >= 0.95
    assert np.isnan(batched.column("center", "P3 003")[areas["P3 003"] == 0]).mean() > 0.9
    absent = ~batched.column("present", "P3 003")
    assert (batched.column("area", "P3 003")[absent] == 0).all()  # absent: area 0, not a garbage fit


def test_areas_recover_the_phase_fractions(coexistence, batched):
    a_o3, a_p3 = (batched.column("area", label) for label in ("O3 003", "P3 003"))
    t_o3, t_p3 = (_truth(coexistence, label)[1] for label in ("O3 003", "P3 003"))
    both = (t_o3 > 0) & (t_p3 > 0) & np.isfinite(a_o3) & np.isfinite(a_p3)
    np.testing.assert_allclose((a_o3 / (a_o3 + a_p3))[both], (t_o3 / (t_o3 + t_p3))[both], atol=0.01)


def _patterns(x, y, sigma, status=None, messages=None):
    n = len(y)
    frames = {"status": np.ones(n, int) if status is None else np.asarray(status),
              "message": np.array(messages or [""] * n, dtype=object), "time_s": np.arange(n) * 20.0}
    return Patterns(x, "2th_deg", 0.6209, np.asarray(y, float), np.asarray(sigma, float), frames)


def test_failures_are_recorded_and_the_run_completes(coexistence):
    y = coexistence.intensity[:6].copy()
    s = coexistence.sigma[:6].copy()
    y[1] = np.nan                          # a NaN frame
    y[2] = 3000.0                          # a flat frame
    s[2] = np.sqrt(3000.0)
    y[3, :] = y[3, ::-1]                   # garbage, but numbers
    status = [1, 1, 1, 1, -1, 1]           # frame 4 failed integration
    pat = _patterns(coexistence.tth_deg, y, s, status, ["", "", "", "", "truncated file", ""])
    windows = [W003,
               WindowSpec(name="outside", range=(30.0, 31.0), peaks=["O3 110"]),
               WindowSpec(name="empty", range=(13.3708, 13.3711), peaks=["O3 006"])]
    table = fit_peaks(pat, PHASES, windows[:1], FitSpec())
    assert table.success[[0, 5], 0].all()
    assert not table.success[1, 0] and "valid points" in table.message[1, 0]
    assert table.success[2, 0] and table.message[2, 0] == "no component present"
    assert not table.present[2].any()
    assert not table.success[4, 0] and table.message[4, 0] == "frame not integrated: truncated file"
    with pytest.raises(WindowSetupError, match="outside the window"):
        fit_peaks(pat, PHASES, [windows[1]])
    outside = WindowSpec(name="outside", range=(30.0, 31.0), peaks=["O3 0 0 33"])
    table = fit_peaks(pat, [PhaseSpec(name="O3", space_group="R-3m", a=2.985, c=38.96)], [outside])
    assert not table.success.any() and "has no data points" in table.message[0, 0]
    table = fit_peaks(pat, PHASES, [windows[2]])  # narrower than one step of the grid
    assert not table.success.any() and "has no data points" in table.message[0, 0]


def test_pearson7_and_split_pseudo_voigt_recover_their_parameters():
    rng = np.random.default_rng(3)
    x = np.linspace(13.0, 13.8, 400)
    phases = {"O3": PHASES[0]}
    for profile, fn, truth in (("pearson7", pearson7, dict(center=13.37, fwhm=0.06, area=400.0, m=1.8)),
                               ("split_pseudo_voigt", split_pseudo_voigt,
                                dict(center=13.37, fwhm_left=0.05, fwhm_right=0.08, area=400.0, eta=0.3))):
        clean = fn(x, *truth.values()) + 200.0 + 30 * (x - 13.4)
        y = rng.poisson(np.tile(clean, (30, 1))).astype(float)
        model = WindowModel(WindowSpec(name="006", range=(13.0, 13.8), peaks=["O3 006"], profile=profile),
                            phases, x, "2th_deg", 0.6209)
        res = fit_window(model, y, np.sqrt(y))
        assert res.success.all() and res.present.all()
        for name, value in truth.items():
            col = model.index(0, name)
            got = res.full_params[:, col]
            if name == "center":
                z = (res.values["center"][:, 0] - value) / res.values["center_err"][:, 0]
                assert np.mean(np.abs(z) < 2) > 0.85
            assert np.mean(got) == pytest.approx(value, rel=0.03), (profile, name)


def test_shared_fwhm_is_one_parameter(coexistence):
    w = WindowSpec(name="003", range=(6.1, 7.0), peaks=["O3 003", "P3 003"], share=["fwhm", "shape"],
                   presence="always")
    pat = coexistence.as_patterns()
    table = fit_peaks(pat, PHASES, [w])
    np.testing.assert_array_equal(table.column("fwhm", "O3 003"), table.column("fwhm", "P3 003"))
    model = WindowModel(w, {p.name: p for p in PHASES}, pat.radial, "2th_deg", 0.6209)
    assert model.n_free == 8  # 2 centres, 2 areas, one FWHM, one eta, 2 background


def test_lmfit_model_is_the_window_model():
    """xrdpipe.lmfit_model (built in lmfit_models, the one lmfit module) computes what the window model does,
    shared widths tied, on a start that is not the truth."""
    x = np.linspace(6.1, 7.0, 400)
    w = WindowSpec(name="003", range=(6.1, 7.0), peaks=["O3 003", "P3 003"], share=["fwhm"])
    model = WindowModel(w, {p.name: p for p in PHASES}, x, "2th_deg", 0.6209)
    y = 300.0 + 20.0 * np.exp(-0.5 * ((x - 6.66) / 0.03) ** 2)[None, :]
    theta, lo, hi = model.start(y, np.isfinite(y), None)
    theta[0, model.index(1, "area")] = 3.0
    lm = xrdpipe.lmfit_model(model)
    assert lm.param_names[:len(model.full_names)] == list(model.full_names)
    params = lmfit_params(model, lm, theta[0], lo[0], hi[0], np.zeros(model.n_free, bool))
    assert params["p1_fwhm"].expr == "p0_fwhm"
    np.testing.assert_allclose(lm.eval(params, x=model.x), model.value(theta[0])[0], rtol=1e-10)


def test_fitting_in_q():
    series = pattern_series(12, x_range=(0.9, 0.8), counts=0.05, background=3000.0, seed=2)
    from xrdpipe.crystallography import q_from_tth

    q = q_from_tth(series.tth_deg, 0.6209)
    pat = Patterns(q, "q_A^-1", 0.6209, series.intensity, series.sigma,
                   {"status": np.ones(12, int), "message": np.array([""] * 12, dtype=object)})
    w = WindowSpec(name="003", range=(1.08, 1.22), peaks=["O3 003"])
    table = fit_peaks(pat, PHASES, [w])
    truth_q = q_from_tth(series.truth("O3", "003"), 0.6209)
    z = (table.column("center", "O3 003") - truth_q) / table.column("center_err", "O3 003")
    assert np.all(np.abs(z) < 4)
    np.testing.assert_allclose(table.column("d_A", "O3 003"), 2 * np.pi / truth_q, rtol=2e-5)


def test_without_errors_the_esd_is_scaled_by_the_reduced_chi_square():
    rng = np.random.default_rng(7)
    x = np.linspace(6.3, 7.0, 300)
    from xrdpipe.lineshapes import pseudo_voigt

    clean = pseudo_voigt(x, 6.675, 0.07, 50.0, 0.4) + 100.0
    y = clean + rng.normal(0, 5.0, (80, x.size))  # errors the fit is not told about
    model = WindowModel(WindowSpec(name="003", range=(6.3, 7.0), peaks=["O3 003"]), {"O3": PHASES[0]},
                        x, "2th_deg", 0.6209)
    res = fit_window(model, y, None)
    z = (res.values["center"][:, 0] - 6.675) / res.values["center_err"][:, 0]
    assert 0.55 < np.mean(np.abs(z) < 1) < 0.82
    assert np.median(res.redchi) == pytest.approx(25.0, rel=0.15)  # sigma² in the data's units


def test_window_setup_errors_name_the_reflection():
    x = np.linspace(3, 24, 1000)
    with pytest.raises(WindowSetupError, match=r"O3 003 of a = 2.985, c = 16.0 Å lies at 6.674"):
        fit_peaks(_patterns(x, np.ones((1, 1000)), np.ones((1, 1000))), PHASES,
                  [WindowSpec(name="w", range=(7.0, 8.0), peaks=["O3 003"])])


# ---------------------------------------------------------------------------------------------
# the stage on a run file: xrdpipe fit, peaks.csv, resuming

REQUIRED_COLUMNS = ["frame", "time_s", "window", "phase", "hkl", "center", "center_err", "fwhm", "fwhm_err", "eta",
                    "area", "area_err", "height", "redchi", "present", "success", "message"]


@pytest.fixture()
def xye_experiment(tmp_path):
    from xrdpipe.testing import make_experiment

    return make_experiment(tmp_path / "exp", n_frames=16, frame_format="xye", counts=0.05, background=3000.0,
                           npt=5000, seed=4, frac_charge=0.9)


def _csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_fit_command_writes_peaks_csv_and_resumes(xye_experiment):
    import h5py
    from click.testing import CliRunner

    from xrdpipe.cli import main

    runner = CliRunner()
    exp_file = str(xye_experiment.experiment_file)
    assert runner.invoke(main, ["integrate", exp_file, "-q"]).exit_code == 0
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert res.exit_code == 0, res.output
    assert "16 frame(s): 16 fitted now" in res.output
    csv_file = xye_experiment.folder / "results" / "peaks.csv"
    rows = _csv(csv_file)
    assert list(rows[0])[:17] == REQUIRED_COLUMNS
    assert len(rows) == 16 * 8  # four windows, two components each
    first = _csv(csv_file)
    truth = {(int(r["frame"]), r["phase"], r["hkl"]): float(r["tth_deg"]) for r in _csv(xye_experiment.truth_peaks_file)}
    for r in rows:
        key = (int(r["frame"]), r["phase"], r["hkl"])
        assert (r["present"] == "1") == (key in truth)
        if key in truth:
            assert abs(float(r["center"]) - truth[key]) < 4 * float(r["center_err"]) + 1e-5
    # nothing to do the second time
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert "0 fitted now, 16 already done" in res.output
    # an interrupted fit (rows not marked done) resumes with the same answers
    with h5py.File(xye_experiment.folder / "results" / "synthetic-nfm.nxs", "r+") as h5:
        h5["/entry/peaks/done"][9:] = 0
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert "7 fitted now, 9 already done" in res.output
    again = _csv(csv_file)
    for a, b in zip(first, again):
        if a["center"]:
            assert float(a["center"]) == pytest.approx(float(b["center"]), abs=0.05 * float(a["center_err"]))
        assert a["present"] == b["present"]
    # other settings: every frame again
    text = xye_experiment.experiment_file.read_text().replace('range = [6.0, 7.1]', 'range = [6.05, 7.1]')
    xye_experiment.experiment_file.write_text(text)
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert "16 fitted now" in res.output and "settings changed" in res.output


def test_fit_before_integrate_and_bad_windows_are_clean_errors(xye_experiment):
    from click.testing import CliRunner

    from xrdpipe.cli import main

    runner = CliRunner()
    exp_file = str(xye_experiment.experiment_file)
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert res.exit_code == 2 and "run 'xrdpipe integrate' first" in res.output
    assert runner.invoke(main, ["integrate", exp_file, "-q"]).exit_code == 0
    text = xye_experiment.experiment_file.read_text().replace('range = [6.0, 7.1]', 'range = [7.5, 8.1]')
    xye_experiment.experiment_file.write_text(text)
    res = runner.invoke(main, ["fit", exp_file, "-q"])
    assert res.exit_code == 2 and "windows.0.peaks" in res.output and "outside the window's range" in res.output
    assert "Traceback" not in res.output


def test_esd_scale_redchi_scales_measured_errors(coexistence):
    pat = coexistence.as_patterns()
    plain = fit_peaks(pat, PHASES, [W003])
    scaled = fit_peaks(pat, PHASES, [W003], FitSpec(esd_scale="redchi"))
    ok = plain.column("present", "O3 003")
    ratio = scaled.column("center_err", "O3 003")[ok] / plain.column("center_err", "O3 003")[ok]
    np.testing.assert_allclose(ratio, np.sqrt(plain.redchi[ok, 0]), rtol=1e-9)


@pytest.mark.parametrize("engine", ["batched", "lmfit"])
def test_a_free_line_does_not_count_in_a_phases_min_fraction(engine):
    """``min_fraction`` (1 %) compares a phase's line with the phases' lines of its window, not
    with a line of no phase beside them: P3's (003) at 1.5 % of the phases' area and 0.5 % of
    the window's, beside an impurity line twice O3's, is found (by the presence test), at its
    area; and the impurity line, far above 1 %, and O3's are found at theirs (Poisson noise at
    a 500-count background, centres typed 0.004-0.01° off, peak start values from the data)."""
    from xrdpipe.lineshapes import pseudo_voigt

    x = np.arange(6.1, 7.0, 0.002)
    o3, p3 = (float(WindowModel(W003, {p.name: p for p in PHASES}, x, "2th_deg", 0.6209).components[j].center0)
              for j in (0, 1))
    truth = {"O3": (o3 + 0.004, 0.03, 20000.0), "P3": (p3 - 0.006, 0.03, 300.0), "free": (6.88, 0.04, 40000.0)}
    rng = np.random.default_rng(4)
    clean = 500.0 + sum(pseudo_voigt(x, c, f, a, 0.4) for c, f, a in truth.values())
    y = rng.poisson(np.tile(clean, (6, 1))).astype(float)
    w = W003.model_copy(update={"free_peaks": [6.87]})
    model = WindowModel(w, {p.name: p for p in PHASES}, x, "2th_deg", 0.6209)
    res = fit_window(model, y, np.sqrt(y), fit=FitSpec(model="peaks", engine=engine))
    assert res.success.all() and res.present.all(), res.present
    for j, (c, f, a) in enumerate(truth.values()):
        assert np.all(np.abs(res.values["center"][:, j] - c) < 3 * res.values["center_err"][:, j] + 1e-4)
        assert np.all(np.abs(res.values["area"][:, j] / a - 1) < (0.25 if a < 1000 else 0.02)), res.values["area"][:, j]
