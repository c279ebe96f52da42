"""The faster paths of the phase model against the truth: two similar phases side by side
followed by least squares alone where they show their own lines (and refused where they do
not), and the least squares that may not stop before its first step."""

import numpy as np
import pytest
from table_checks import same_tables

from xrdpipe.batchfit import least_squares_batch
from xrdpipe.config import FitSpec, LatticeSpec
from xrdpipe.lattice import refine_lattice
from xrdpipe.phasefit import fit_phases
from xrdpipe.testing import Difficulty, fit_config, pattern_series, score_phases


def _coexistence(x_range, n, seed):
    """An O3 + P3 series inside the coexistence (basal lines 1.1 FWHM apart, lines 1.6x broader,
    per-phase intensities, Al lines, Poisson noise over 2,000 counts), the start cells those of
    the coexistence 0.5 % (a) and 1 % (c) off."""
    dif = Difficulty(separation_fwhm=1.1, broadening=1.6, intensity_jitter=0.3, hard_windows=True, seed=seed)
    series = pattern_series(n, scenario="nfm", x_range=x_range, counts=0.05, background=2000.0, seed=seed,
                            difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    truth = series.states()[-1]            # (both phases there)
    off = {"O3": (1.005, 1.01), "P3": (0.995, 0.99)}
    phases = [p.model_copy(update={"a": truth[p.name][0] * off[p.name][0], "c": truth[p.name][1] * off[p.name][1]})
              if p.name in off else p for p in phases]
    return series, phases, windows


_SERIES = {}


def _series():
    """O3 alone, then P3 appearing and growing to 75 % (14 frames), fitted with every path and
    with the searches in every frame."""
    if not _SERIES:
        _SERIES["data"] = _coexistence((0.69, 0.65), 14, 3)
    return _SERIES["data"]


def _score(series, table, phases):
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    return score_phases(lat, table, series.states(), series.peaks)


def test_coexisting_pair_followed_by_least_squares(monkeypatch):
    """Once P3 shows its own lines beside O3, the steady path follows the pair in most frames
    (least squares alone from the frame before); its cells and fractions are right, and those
    the searches in every frame give."""
    import xrdpipe.phasefit.decide as decide

    series, phases, windows = _series()
    taken = []
    steady = decide._fit_steady

    def counting(m, y, sigma, state, fit):
        out = steady(m, y, sigma, state, fit)
        if all(state.present[[p, q]].all() for p, q, _, _ in m.order):
            taken.append(out is not None)
        return out

    monkeypatch.setattr(decide, "_fit_steady", counting)
    # (one run over the series: the naming check's other run would be counted too)
    fast = fit_phases(series.as_patterns(), phases, windows, FitSpec(backward=False, naming="frame"))
    assert len(taken) >= 8 and sum(taken) >= len(taken) - 2, taken
    score = _score(series, fast, phases)
    assert score["presence"] == 1.0 and score["n_coexistence"] >= 9, score
    assert score["median_da"] < 1e-4 and score["median_dc"] < 5e-4 and score["max_dc"] < 3e-3, score
    assert score["basal_rms_deg"] < 5e-4, score
    # the searches in every frame: the same phases, the same fractions; where both phases hold
    # 10 %, cells within an esd of each other and within 3 esds of the truth (at P3's onset, 6 %,
    # the two paths can reach different solutions, and P3's a can lie several esds off: its
    # (10l) lines are weak there)
    monkeypatch.setattr(decide, "_fit_steady", lambda *args: None)
    full = fit_phases(series.as_patterns(), phases, windows, FitSpec(backward=False, naming="frame"))
    np.testing.assert_array_equal(fast.phase["phase_present"], full.phase["phase_present"])
    states = series.states()
    share = np.array([[st.get(name, (0, 0, 0.0))[2] for name in ("O3", "P3")] for st in states])
    truth = np.array([[[st.get(name, (np.nan, np.nan))[k] for k in (0, 1)] for name in ("O3", "P3")] for st in states])
    both = fast.phase["phase_present"][:, :2]
    for j, k in ((0, 0), (2, 1)):
        strong = both & (share >= 0.1).all(axis=1)[:, None]
        off = np.abs(fast.phase["phase_cell"][:, :2, j] - truth[:, :, k])[strong]
        assert np.all(off < 3 * fast.phase["phase_cell_err"][:, :2, j][strong]), (j, off)
        off_full = np.abs(full.phase["phase_cell"][:, :2, j] - truth[:, :, k])[strong]
        assert np.all(off_full < 3 * full.phase["phase_cell_err"][:, :2, j][strong]), (j, off_full)
        # the two paths may end in neighbouring optima of the same frame (with whole line tails
        # P3's a at 67 % lay 1.01 esd apart, the full search's chi-square 1.7 lower): within 1.5 esd
        diff = np.abs(fast.phase["phase_cell"][:, :2, j] - full.phase["phase_cell"][:, :2, j])[strong]
        esd = full.phase["phase_cell_err"][:, :2, j][strong]
        assert np.all(diff < 1.5 * esd), (j, diff / esd)
    assert score["fraction_mae"] < 0.08
    assert abs(score["fraction_mae"] - _score(series, full, phases)["fraction_mae"]) < 0.005


def test_pair_refused_where_a_cell_moved(monkeypatch):
    """A frame of the pair whose P3 c, in the frame before, sat half a FWHM's worth off: least
    squares from there moves it more than a quarter of a FWHM, so the steady path refuses the
    frame (it is what the joint search is for), and the searches put c back on the truth."""
    import xrdpipe.phasefit.decide as decide
    from xrdpipe.phasefit.fitter import _stored_state
    from xrdpipe.phasefit.frame import _Frame

    series, pat, fitter, table = _fitted()
    m, i = fitter.model, 10
    p3 = fitter.phase_names.index("P3")
    before = _stored_state(m, table.phase, i - 1)
    assert before.present[:2].all()
    y, sigma = pat.intensity[i, m.columns], pat.sigma[i, m.columns]
    assert decide._fit_steady(m, y, sigma, before, fitter.fit) is not None      # as it was: taken
    before.cell[p3, 2] += _Frame(m, y, sigma, before).track_halves(p3, 0.5)[2]
    reasons = []
    trouble = decide._pair_trouble
    monkeypatch.setattr(decide, "_pair_trouble", lambda *args: reasons.append(trouble(*args)) or reasons[-1])
    assert decide._fit_steady(m, y, sigma, before, fitter.fit) is None
    assert reasons[0] == "P3: c moved more than 0.25 FWHM", reasons
    res = decide.fit_frame(m, y, sigma, before, fitter.fit)
    c_true = series.states()[i]["P3"][1]
    assert res.present[p3] and abs(res.state.cell[p3, 2] - c_true) < 1e-3, (res.state.cell[p3], c_true)
    assert abs(res.state.cell[p3, 2] - table.phase["phase_cell"][i, p3, 2]) < 0.5 * table.phase["phase_cell_err"][i, p3, 2]


def _fitted():
    """The series fitted frame after frame (no backward pass): the series, its patterns, the
    fitter and the table."""
    if "fitted" not in _SERIES:
        from xrdpipe.phasefit.fitter import PhaseFitter

        series, phases, windows = _series()
        pat = series.as_patterns()
        fitter = PhaseFitter(phases, windows, FitSpec(backward=False), radial=pat.radial, unit=pat.unit,
                             wavelength_A=pat.wavelength_A)
        table = fitter.fit_block(pat.intensity, pat.sigma, frame=np.arange(pat.intensity.shape[0]))
        _SERIES["fitted"] = series, pat, fitter, table
    return _SERIES["fitted"]


def test_pair_settled_only_at_the_split_of_the_lines():
    """The check that lets a pair not explained to its noise continue by least squares alone:
    at the fit of a frame of the pair, the coarse joint grid finds its best split there; with
    P3's c put 1.5 FWHM's worth further off the truth, it finds a better split elsewhere."""
    import xrdpipe.phasefit.decide as decide
    from xrdpipe.phasefit.fitter import _stored_state
    from xrdpipe.phasefit.frame import _Frame
    from xrdpipe.phasefit.solve import _fit_rows

    series, pat, fitter, table = _fitted()
    m, i = fitter.model, 9
    p3 = fitter.phase_names.index("P3")
    fr = _Frame(m, pat.intensity[i, m.columns], pat.sigma[i, m.columns], _stored_state(m, table.phase, i - 1))
    present = [p for p in range(m.P) if fr.state.present[p]]
    res = _fit_rows(m, fr, [tuple(present)], fitter.fit)
    c_true = series.states()[i]["P3"][1]
    col = m.cell_cols[p3][m.free[p3].index("c")]
    assert abs(res.p[0, col] - c_true) < 1e-3
    cells = fr.state.cell.copy()
    assert decide._pair_settled(m, fr, res, present)
    np.testing.assert_array_equal(fr.state.cell, cells)                 # left as it was
    res.p[0, col] += fr.track_halves(p3, 1.5)[2]
    assert not decide._pair_settled(m, fr, res, present)


def test_least_squares_must_move_from_its_start():
    """A line fitted from far along its valley, the intercept's step cut by its bound: the
    lightly damped step promises a rise, and by default the fit stops where it started; a row
    that must move goes on to the constrained optimum (the intercept on its bound, the slope
    the least-squares one there)."""
    x = np.linspace(10, 11, 21)

    def line(p):
        jac = np.stack([np.ones((len(p), x.size)), np.broadcast_to(x, (len(p), x.size))], 1)
        return p[:, :1] + p[:, 1:] * x, jac.copy()

    y = 1.0 + 1.0 * x
    start = np.array([[-17.273, 2.7719]])
    lower, upper = np.full(2, -np.inf), np.array([-17.223, np.inf])
    stuck = least_squares_batch(line, start, y[None], np.ones((1, x.size)), lower=lower, upper=upper)
    np.testing.assert_array_equal(stuck.p, start)
    moved = least_squares_batch(line, start, y[None], np.ones((1, x.size)), lower=lower, upper=upper,
                                must_move=np.array([True]))
    slope = np.sum((y + 17.223) * x) / np.sum(x * x)
    assert moved.success[0]
    assert moved.p[0, 0] == -17.223
    assert abs(moved.p[0, 1] - slope) < 1e-5
    assert moved.chi2[0] < 0.7 * stuck.chi2[0]


def test_least_squares_must_descend_past_a_step_cut_by_a_bound():
    """A Gaussian fitted with its width's upper bound below the data's (0.1 for 0.15): from a
    start near that bound the lightly damped step, cut by it, promises a rise, and by default
    the fit ends where it started, 21 % above the constrained optimum in chi-square; a row that
    must descend goes on to that optimum (the width on its bound), the one SciPy's bounded
    least squares finds."""
    from scipy.optimize import least_squares

    x = np.linspace(0, 1, 60)

    def gauss(p):
        g = np.exp(-((x - p[:, 1:2]) / p[:, 2:3]) ** 2)
        d_cen = p[:, :1] * g * 2 * (x - p[:, 1:2]) / p[:, 2:3] ** 2
        d_wid = p[:, :1] * g * 2 * (x - p[:, 1:2]) ** 2 / p[:, 2:3] ** 3
        return p[:, :1] * g, np.stack([g, d_cen, d_wid], 1)

    rng = np.random.default_rng(735)
    y = gauss(np.array([[2.0, 0.5, 0.15]]))[0][0] + rng.normal(0, 0.01, x.size)
    start = np.array([2.0, 0.5, 0.15]) * (1 + rng.normal(0, 0.3, 3))
    lower, upper = np.array([0.0, 0.2, 0.03]), np.array([5.0, 0.8, 0.1])
    w = np.full((1, x.size), 100.0)
    stuck = least_squares_batch(gauss, start[None], y[None], w, lower=lower, upper=upper)
    np.testing.assert_allclose(stuck.p[0], start, rtol=1e-3)
    done = least_squares_batch(gauss, start[None], y[None], w, lower=lower, upper=upper,
                               must_descend=np.array([True]))
    ref = least_squares(lambda p: 100.0 * (gauss(p[None])[0][0] - y), start, bounds=(lower, upper),
                        xtol=1e-12, ftol=1e-12, gtol=1e-12)
    assert done.success[0]
    assert done.p[0, 2] == 0.1
    # within the tolerance of chi-square (1e-3 of its value per point) of SciPy's optimum, and
    # a twentieth of an esd (scaled by the reduced chi-square, ~570: the width is held short)
    assert done.chi2[0] - 2 * ref.cost < 1e-3 * done.chi2[0] / x.size
    err = np.sqrt(np.diagonal(done.cov[0]) * done.chi2[0] / (x.size - 2))   # (the width's, on its bound: NaN)
    assert np.all(np.abs(done.p[0, :2] - ref.x[:2]) < 0.05 * err[:2])
    assert stuck.chi2[0] > 1.2 * done.chi2[0]


def test_least_squares_row_flags_of_the_wrong_shape_are_refused_by_name():
    """must_move and must_descend take one boolean per row: another shape is an error that
    names the option and the shape wanted."""
    x = np.linspace(0, 1, 5)

    def line(p):
        return p[:, :1] + p[:, 1:] * x, np.stack(np.broadcast_arrays(np.ones((len(p), 5)), p[:, 1:] * 0 + x), 1)

    for name in ("must_move", "must_descend"):
        with pytest.raises(ValueError, match=rf"{name} must be one boolean per row, shape \(2,\); got shape \(3,\)"):
            least_squares_batch(line, np.zeros((2, 2)), np.ones((2, 5)), np.ones((2, 5)), lower=np.full(2, -np.inf),
                                upper=np.full(2, np.inf), **{name: np.ones(3, bool)})


def test_a_search_basin_polished_takes_its_grid_points_without_evaluating_them_again():
    """The fine points of a search basin (:func:`xrdpipe.phasefit.frame._polish`) that fall on
    the grid (the basin's point and its neighbours one step away) are taken from the grid's
    evaluation: the same minimum, the same chi-square and score, three trials fewer."""
    from xrdpipe.phasefit.frame import _polish

    calls = []

    def evaluate(values):
        calls.append(values.size)
        trial = np.zeros((values.size, 6))
        trial[:, 2] = values
        return trial, (values - 14.3217) ** 2 * 1e6 + np.cos(40 * values)

    def scored(trial, chi2):
        return chi2 + 0.1 * (trial[:, 2] - 14.3) ** 2

    grid = 14.2 + np.linspace(-0.3, 0.3, 25)
    g_trial, g_chi2 = evaluate(grid)
    j = int(np.argmin(scored(g_trial, g_chi2)))
    step = float(np.median(np.diff(grid)))
    calls.clear()
    alone = _polish(grid[j], step, evaluate, scored)
    n_alone = sum(calls)
    calls.clear()
    reused = _polish(grid[j], step, evaluate, scored, (grid, g_trial, g_chi2))
    assert sum(calls) == n_alone - 3
    assert abs(reused[0] - alone[0]) <= 1e-12 * abs(alone[0])
    assert abs(reused[2] - alone[2]) <= 1e-9 * abs(alone[2]) and abs(reused[3] - alone[3]) <= 1e-9 * abs(alone[3])
    np.testing.assert_allclose(reused[1], alone[1], rtol=1e-12)


def test_search_windows_on_two_threads_give_the_same_numbers(monkeypatch):
    """The searches solve their windows side by side on ``[fit] workers`` threads, and a batch of
    least squares runs its nested rows (the presence tests') on a thread beside its first: the
    same tables, bit for bit, as on one thread (the first eight frames of the coexistence series:
    the run's zero estimate, P3 found and the pair split by the joint search), and the windows
    did run on two threads at once, the nested rows on their own."""
    import threading

    import xrdpipe.kernels as kernels
    import xrdpipe.phasefit.frame as frame
    from xrdpipe.phasefit.fitter import PhaseFitter

    series, phases, windows = _series()
    pat = series.as_patterns()

    def fit(workers):
        fitter = PhaseFitter(phases, windows, FitSpec(backward=False, workers=workers), radial=pat.radial,
                             unit=pat.unit, wavelength_A=pat.wavelength_A)
        return fitter.fit_block(pat.intensity[:8], pat.sigma[:8], frame=np.arange(8))

    one = fit(1)
    trials = kernels.window_trials
    lock, running, most = threading.Lock(), [0], [0]

    def counting(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            trials(*args)
        finally:
            with lock:
                running[0] -= 1

    joint = frame._Frame.pair_search
    pairs = []

    def counting_pairs(self, *args, **kwargs):
        pairs.append(args[:2])
        return joint(self, *args, **kwargs)

    import inspect

    lm = kernels.phase_lm
    rows_at = list(inspect.signature(lm.py_func).parameters).index("p")      # (the parameter rows)
    lm_threads = []

    def naming_threads(*args):
        lm_threads.append((threading.current_thread().name.split("_")[0], args[rows_at].shape[0]))
        lm(*args)

    monkeypatch.setattr(kernels, "window_trials", counting)
    monkeypatch.setattr(kernels, "phase_lm", naming_threads)
    monkeypatch.setattr(frame._Frame, "pair_search", counting_pairs)
    two = fit(2)
    assert most[0] == 2 and len(pairs) >= 4, (most, pairs)
    assert ("xrdpipe-rows", 2) in lm_threads and ("MainThread", 1) in lm_threads, set(lm_threads)
    assert one.phase["phase_present"][:, [p.name for p in phases].index("P3")].any()
    same_tables(one, two)


def test_compiled_least_squares_iterations_take_the_same_steps(monkeypatch):
    """The phase model's least squares iterate in one compiled call (``PhaseModel.iterate``)
    instead of NumPy calls per iteration (``batchfit._iterate``): the same steps, so the same
    tables (every decision, presence and message alike; the numbers within the steps' tolerance)
    on the coexistence series' first eight frames (the zero estimate, P3 found, the pair split)
    as point samples and as bins averaged over the instrument; and the compiled iterations did
    run, as far as the steps that hold weak lines' shapes (from the third iteration)."""
    import xrdpipe.kernels as kernels
    from xrdpipe.phasefit import PhaseModel
    from xrdpipe.phasefit.fitter import PhaseFitter

    series, phases, windows = _series()
    pat = series.as_patterns()
    calls = []
    lm = kernels.phase_lm

    def counting(*args):
        lm(*args)
        calls.append(int(args[-2].max()))       # (the most iterations of a row)

    monkeypatch.setattr(kernels, "phase_lm", counting)
    for sd in (None, 0.02):
        def fit():
            fitter = PhaseFitter(phases, windows, FitSpec(backward=False, instrument_sd=sd), radial=pat.radial,
                                 unit=pat.unit, wavelength_A=pat.wavelength_A)
            return fitter.fit_block(pat.intensity[:8], pat.sigma[:8], frame=np.arange(8))

        calls.clear()
        compiled = fit()
        assert len(calls) >= 8 and max(calls) >= 3, calls
        monkeypatch.setattr(PhaseModel, "compiled_iterations", False)
        calls.clear()
        plain = fit()
        assert not calls
        monkeypatch.setattr(PhaseModel, "compiled_iterations", True)
        assert compiled.phase["phase_present"][:, [p.name for p in phases].index("P3")].any()
        # every decision the same; the numbers within what the steps' tolerance leaves (xtol and
        # ftol 1e-8: one last-bit difference in a step can end a row one small step earlier).
        # Bit for bit until 2026-12-03, where NumPy's and the compiled kernels' LAPACK solved
        # alike; on a fresh install that day (NumPy 2.4.6, Numba 0.68.1, SciPy 1.17.1) they part
        # by 1e-14 a step, and the tables by up to 7.5e-9 (esds of widths, bins averaged)
        same_tables(compiled, plain, rtol=1e-7)


def test_the_far_tails_kernel_sums_lines_as_numpy_does():
    """The far tails' compiled sum of lines (``kernels.add_lines``) against
    ``pseudo_voigt(...).sum(axis=1)``, from one line to 128 (NumPy's pairwise sum changes its
    order at eight): the same numbers, to an exp's last bit (NumPy's vectorised exp may differ
    from the C library's by one unit there)."""
    from xrdpipe.kernels import add_lines
    from xrdpipe.lineshapes import pseudo_voigt

    rng = np.random.default_rng(1)
    x = np.linspace(5.0, 9.0, 300)
    for n in (1, 3, 7, 8, 9, 15, 16, 17, 64, 100, 128):
        cen, fw = rng.uniform(4, 10, n), rng.uniform(0.02, 0.2, n)
        area, eta = rng.uniform(0, 1e4, n), rng.uniform(0, 1, n)
        base = rng.normal(size=x.size)
        want = base + pseudo_voigt(x[:, None], cen, fw, area, eta).sum(axis=1)
        got = base.copy()
        add_lines(x, cen, fw, area, eta, got)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-12 * np.abs(want).max(), err_msg=str(n))


def _frames_to_solve(instrument_sd):
    """Frames 4-7 of the coexistence series (O3 alone, then P3 appearing) with the state the
    fit left before each, and cells as a user types them (O3 +1 % a, -2 % c; P3 -1 %, +1.5 %),
    as point samples or (``instrument_sd``) as bins."""
    from xrdpipe.phasefit.fitter import PhaseFitter, _stored_state
    from xrdpipe.phasefit.frame import _Frame

    series, phases, windows = _series()
    pat = series.as_patterns()
    fitter = PhaseFitter(phases, windows, FitSpec(backward=False, instrument_sd=instrument_sd), radial=pat.radial,
                         unit=pat.unit, wavelength_A=pat.wavelength_A)
    table = fitter.fit_block(pat.intensity[:8], pat.sigma[:8], frame=np.arange(8))
    m = fitter.model
    out = []
    for r in range(4, 8):
        state = _stored_state(m, table.phase, r - 1)
        typed = state.cell.copy()
        typed[:, 0] *= np.array([1.01, 0.99, 1.0])[:m.P]
        typed[:, 2] *= np.array([0.98, 1.015, 1.0])[:m.P]
        out.append((m, _Frame(m, pat.intensity[r, m.columns], pat.sigma[r, m.columns], state), typed, table, r))
    return out


def test_every_window_solved_in_one_call_as_one_by_one():
    """The areas and backgrounds of every window at given cells come from one compiled call
    (``kernels.windows_linear``) where each window had its own (``_Frame._window_solve``): the
    same numbers bit for bit, for phase subsets with a phase left out, at the fit's cells and at
    cells typed 1-2 % off (lines moved toward and past the windows' edges), as point samples and
    as bins."""
    for sd in (None, 0.013):
        for m, fr, typed, _, _ in _frames_to_solve(sd):
            subsets = [tuple(range(m.P)), (0,), tuple(range(1, m.P)), ()]
            for cells in (fr.state.cell, typed):
                theta = np.zeros(m.k)
                fr.fill_nonlinear(theta, cells, fr.state.zero)
                want = np.repeat(theta[None], len(subsets), axis=0)
                want_chi2 = np.zeros((len(subsets), m.W))
                cen = m.centres(cells[None], np.array([fr.state.zero]))[0]
                on = np.array([m.of_phases(s) for s in subsets])
                for w in range(m.W):
                    refl = np.flatnonzero(on.any(axis=0) & (m.r_window == w))
                    coef, c2 = fr._window_solve(w, refl, np.repeat(cen[refl][None], len(subsets), axis=0), theta,
                                                np.ones(refl.size, bool), use=on[:, refl])
                    want[:, m.area_col[refl]] = coef[:, :refl.size]
                    want[:, m.bg_col[w]] = coef[:, refl.size:]
                    want_chi2[:, w] = c2
                got = fr.linear_rows(cells, subsets, fr.state.zero)
                assert got.tobytes() == want.tobytes(), np.abs(got - want).max()
                for s, subset in enumerate(subsets):
                    row, chi2 = fr.linear(cells, subset, fr.state.zero)
                    assert row.tobytes() == want[s].tobytes() and chi2.tobytes() == want_chi2[s].tobytes()
                    assert (row[m.area_col[~m.of_phases(subset)]] == 0).all()


def _position_redchi_numpy(m, fr, theta, resid, reach=2.5):
    """``position_redchi`` as it was written in NumPy (before its compiled kernel)."""
    out = np.full(m.W, np.nan)
    cells = m.cells(theta[None], fr.state.cell)[0]
    zero = float(theta[m.zero_col])
    fw = m.fwhm_table(theta)
    inner = m.inside(cells, zero, fw)
    cen = m.centres(cells[None], np.array([zero]))[0]
    area = theta[m.area_col]
    for i in range(m.W):
        win = m.windows[i]
        lines = np.flatnonzero(inner & (m.r_window == i) & (area > 0))
        if not lines.size or win.x.size < 3:
            continue
        lines = lines[area[lines] >= 0.1 * area[lines].max()]
        r, valid, x = resid[win.points], fr.w[win.points] > 0, win.x
        chi2 = count = 0.0
        pairs = []
        for k in lines:
            width = fw[m.r_phase[k], i]
            if not (np.isfinite(width) and width > 0):
                continue
            up = np.flatnonzero(valid & (x > cen[k]) & (x <= cen[k] + reach * width))
            mirror = 2 * cen[k] - x[up]
            j = np.searchsorted(x, mirror) - 1
            ok = (j >= 0) & (j + 1 < up)
            up, mirror, j = up[ok], mirror[ok], j[ok]
            ok = valid[j] & valid[j + 1]
            up, mirror, j = up[ok], mirror[ok], j[ok]
            if not up.size:
                continue
            t = (mirror - x[j]) / (x[j + 1] - x[j])
            odd = (r[up] - ((1 - t) * r[j] + t * r[j + 1])) / 2 / np.sqrt((1 + t ** 2 + (1 - t) ** 2) / 4)
            chi2 += float(np.sum(odd ** 2))
            count += up.size
            if up.size > 1:
                pairs.append((odd[:-1], odd[1:]))
        if count:
            rho = 0.0
            if pairs:
                a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
                den = float(np.sqrt((a @ a) * (b @ b)))
                rho = float(np.clip((a @ b) / den, 0.0, 0.9)) if den > 0 else 0.0
            out[i] = chi2 / count * (1 + rho) / (1 - rho)
    return out


def test_the_odd_part_of_a_windows_misfit_as_numpy_took_it():
    """The misfit odd about each line (what scales the cells' esds, ``position_redchi``) comes
    from a compiled kernel: the same numbers bit for bit as the NumPy it replaced, on the
    residuals of the fitted frames (point samples fitted to their noise, and bins whose strong
    windows a point-sample model misfits), with a few points taken out (a masked pixel's bin),
    and at cells typed 1-2 % off (lines near the windows' edges). The reduced chi-squares are
    > 1 where the misfit is odd, so the comparison is not of empty windows."""
    from xrdpipe.phasefit.solve import position_redchi

    seen = []
    for sd in (None, 0.013):
        for m, fr, typed, table, r in _frames_to_solve(sd):
            theta = fr.linear(fr.state.cell, np.flatnonzero(fr.state.present), fr.state.zero)[0]
            for cells in (fr.state.cell, typed):
                theta_c = theta.copy()
                fr.fill_nonlinear(theta_c, cells, fr.state.zero)
                f = m.value_jac(theta_c[None], fr.state.cell)[0][0]
                resid = (fr.y0 - f) * fr.w
                got = position_redchi(m, fr.state.cell, fr.w, theta_c, resid)
                want = _position_redchi_numpy(m, fr, theta_c, resid)
                assert got.tobytes() == want.tobytes(), (got, want)
                seen.append(got)
            fr.w[::7] = 0.0
            got = position_redchi(m, fr.state.cell, fr.w, theta, (fr.y0 - m.value_jac(theta[None], fr.state.cell)[0][0]) * fr.w)
            assert got.tobytes() == _position_redchi_numpy(m, fr, theta, (fr.y0 - m.value_jac(
                theta[None], fr.state.cell)[0][0]) * fr.w).tobytes()
    seen = np.array(seen)
    assert np.isfinite(seen).mean() > 0.5 and np.nanmax(seen) > 10


def test_compiled_solve_of_a_non_finite_system_gives_nan_not_a_crash():
    """A least-squares step whose normal equations hold a NaN or an infinity (a model value
    overflowed in one trial row): NaN, as NumPy's solve gives, which the iterations take as a
    failed step. Numba's solve raises there, and the least-squares fallback raised again inside
    the handler: "Unreachable condition reached (op code RERAISE executed)" stopped the whole
    fit of the series (seen on a P'2 -> P2 series while trying a search rule)."""
    from xrdpipe.kernels.phase import _lm_solve

    assert np.all(np.isnan(_lm_solve(np.full((3, 3), np.nan), np.ones(3))))
    assert np.all(np.isnan(_lm_solve(np.eye(2), np.array([np.inf, 1.0]))))
    np.testing.assert_array_equal(_lm_solve(np.array([[2.0, 0.0], [0.0, 4.0]]), np.ones(2)), [0.5, 0.25])
    np.testing.assert_array_equal(_lm_solve(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones(2)), [1.0, 0.0])   # singular


def test_a_kernel_divides_by_zero_as_numpy_does():
    """A line of zero width (a trial row at its lower bound): inf or NaN in that row, as NumPy
    gives, not a ZeroDivisionError out of the compiled kernel that ends the whole fit."""
    from xrdpipe.kernels.phase import add_lines

    out = np.zeros(3)
    add_lines(np.array([0.9, 1.0, 1.1]), np.array([1.0]), np.array([0.0]), np.array([1.0]), np.array([0.5]), out)
    assert not np.all(np.isfinite(out))


def test_a_weak_lines_width_moving_within_its_noise_sends_no_frame_to_the_searches(monkeypatch):
    """O3 alone (x 0.98 -> 0.75, its cells drifting), the Al (200) line under O3's (015) window
    (area ~50 against O3's ~1,300: its width 0.07° ± 0.004°, eta anywhere in 0-0.8 from frame to
    frame), Poisson noise over 2,000 counts, typed cells 1 % (a) and 2 % (c) off. A width that
    moves 20 % at 3 esds of this frame alone was taken for the onset of a two-phase region
    (``_rewidened``) in ~3 % of the frames, each then sent to the searches (~40 ms against ~4 ms)
    for nothing: 4 of these 160 frames. Now a width must move 5 esds of the difference of the
    two frames' widths: none is; O3 and Al are still found in every frame, P3 in none."""
    import xrdpipe.phasefit.decide as decide

    dif = Difficulty(start_error=((0.01, 0.02), (0.01, 0.02)), separation_fwhm=1.1, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=4)
    series = pattern_series(160, scenario="nfm", x_range=(0.98, 0.75), counts=0.05, background=2000.0, seed=4,
                            difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    rewidened = []
    real = decide._rewidened

    def counted(*a, **k):
        out = real(*a, **k)
        rewidened.append(out)
        return out

    monkeypatch.setattr(decide, "_rewidened", counted)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    assert len(rewidened) >= 150 and sum(rewidened) == 0, f"{sum(rewidened)} of {len(rewidened)} frames rewidened"
    names = list(table.phase_names)
    present = table.phase["phase_present"]
    assert present[:, names.index("O3")].all() and present[:, names.index("Al")].all()
    assert not present[:, names.index("P3")].any()


def test_a_line_widened_onto_its_bound_is_not_followed():
    """The benchmark's O3 -> P3 series (``benchmarks/phases.py``, seed 1: typed cells 1 % (a) and
    2 % (c) off, basal lines 1.1 FWHM apart and 1.6x broader in the coexistence, per-phase
    intensities, Al (200) under the (015) window), its first 640 frames (P3 appears at frame 582).
    At the onset, O3's (015) line, beside P3's and Al's in one window, widened onto its bound
    (0.333°, a third of the window, against 0.11° in O3's other windows): a hump that took part
    of P3's area. Once a weak line's width no longer sent frames to the searches for its noise
    (the test above), least squares followed that hump for ~40 frames (the O3 fraction off by up
    to 0.017, MAE 0.0032; before, one of those searches had happened to set it right). A line on
    its bound at more than twice its phase's other widths is not followed now: searched, the
    frame finds the line's width again."""
    from xrdpipe.testing import score_phases

    dif = Difficulty(start_error=((0.01, 0.02), (0.01, 0.02)), separation_fwhm=1.1, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=1)
    end = float(np.linspace(1.0, 0.45, 1000)[639])
    series = pattern_series(640, scenario="nfm", x_range=(1.0, end), counts=0.05, background=2000.0, seed=1,
                            difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    s = score_phases(lat, table, series.states(), series.peaks)
    assert s["presence"] >= 0.98 and s["n_coexistence"] >= 40 and s["fraction_mae"] <= 0.002, s
    o3 = list(table.phase_names).index("O3")
    held = np.array([st.get("O3", (0, 0, 0.0))[2] for st in series.states()])
    bound = np.array([(w.range[1] - w.range[0]) / 3 for w in windows])     # (the model's default)
    on_bound = table.phase["phase_fwhm"][held >= 0.3, o3, :] >= bound * (1 - 1e-6)
    assert not on_bound.any(), f"{int(on_bound.any(axis=1).sum())} frames with an O3 line on its bound"


def test_the_runs_first_frame_is_fitted_once_for_the_zero_estimate_and_the_run(monkeypatch):
    """The run's zero estimate fits the first frames from a fresh state, the first one searched
    from the typed cells; the run then fitted that frame again from the same state (a search,
    ~0.15 s on 1D data, ~1 s on 2D frames, in every run). It is taken from the estimate now where
    the frame and its start are the same: the tables identical to the last bit, one frame fit
    fewer. A state that is not the estimate's start (a resumed run) fits the frame itself."""
    import xrdpipe.phasefit.fitter as fitter_module
    from xrdpipe.phasefit.fitter import PhaseFitter

    dif = Difficulty(start_error=((0.01, 0.02), (0.01, 0.02)), separation_fwhm=1.1, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=2)
    series = pattern_series(20, scenario="nfm", x_range=(0.70, 0.66), counts=0.05, background=2000.0, seed=2,
                            difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    pat = series.as_patterns()
    calls = []
    real = fitter_module.fit_frame
    monkeypatch.setattr(fitter_module, "fit_frame", lambda *a, **k: calls.append(1) or real(*a, **k))
    once = fit_phases(pat, phases, windows, FitSpec())
    n_once = len(calls)
    monkeypatch.setattr(PhaseFitter, "_first_frame", lambda self, y, e: None)
    calls.clear()
    twice = fit_phases(pat, phases, windows, FitSpec())
    assert len(calls) == n_once + 1
    same_tables(once, twice)

    monkeypatch.undo()
    fitter = PhaseFitter(phases, windows, FitSpec(), radial=pat.radial, unit=pat.unit, wavelength_A=pat.wavelength_A)
    fitter.estimate_zero(pat.intensity[:3], pat.sigma[:3])
    y, e = pat.intensity[0][fitter.model.columns], pat.sigma[0][fitter.model.columns]
    fitter.state.present[0] = True                     # (not the state the estimate started from)
    assert fitter._first_frame(y, e) is None
    fitter.estimate_zero(pat.intensity[:3], pat.sigma[:3])
    fitter.state = fitter._fresh_state()
    assert fitter._first_frame(y + 1.0, e) is None      # (not the frame the estimate started with)
    fitter.estimate_zero(pat.intensity[:3], pat.sigma[:3])
    fitter.state = fitter._fresh_state()
    assert fitter._first_frame(y, e).success


def test_a_frames_record_made_beside_the_next_frames_least_squares_is_the_same(monkeypatch):
    """A frame's record (centres, d-spacings, volumes and their esds, and the window-scaled
    esds it asks for, made then: ``WindowEsds``) is made in a second thread while the next
    frame's least squares run (``PhaseModel.idle``): the same table, bit for bit, as each frame
    recorded before the next is fitted; it was made beside in most frames; and a record that
    fails stops the fit as it would have, not the next frame's fit as a failed frame."""
    import threading

    from xrdpipe.phasefit.fitter import PhaseFitter
    from xrdpipe.phasefit.model import PhaseModel

    series, phases, windows = _series()
    pat = series.as_patterns()

    def fit():
        fitter = PhaseFitter(phases, windows, FitSpec(backward=False, workers=2), radial=pat.radial,
                             unit=pat.unit, wavelength_A=pat.wavelength_A)
        return fitter.fit_block(pat.intensity[:10], pat.sigma[:10], frame=np.arange(10))

    record = PhaseFitter._record
    threads = []

    def noting(self, *args):
        threads.append(threading.current_thread().name.split("_")[0])
        return record(self, *args)

    monkeypatch.setattr(PhaseFitter, "_record", noting)
    beside = fit()
    assert threads.count("xrdpipe-rows") >= 5 and len(threads) == 10, threads
    with monkeypatch.context() as inline:            # (no work is ever left for a least squares)
        inline.setattr(PhaseModel, "idle", property(lambda self: None, lambda self, value: None), raising=False)
        threads.clear()
        one_by_one = fit()
        assert threads == ["MainThread"] * 10
    same_tables(beside, one_by_one, rows=True)

    def failing(self, i, *args):
        if i == 6:
            raise RuntimeError("the record of frame 6")
        return record(self, i, *args)

    monkeypatch.setattr(PhaseFitter, "_record", failing)
    with pytest.raises(RuntimeError, match="the record of frame 6"):
        fit()


def test_window_scaled_esds_made_when_asked_for_and_the_alias_checks_bounds():
    """``WindowEsds``: the esds made when first asked for are those made at once (the window
    scaling with the odd part of the misfit and the noise bins share, then the zero's share), and where its bounds on the
    area esds settle which lines stand above a multiple of their esds, they say what the esds
    say (frames 4-7 of the coexistence series, each fitted from the state before it)."""
    from xrdpipe.phasefit.solve import (
        _fit_rows,
        _result,
        _with_lever,
        noise_correlation,
        position_redchi,
        window_scaled,
    )

    settled = unsettled = 0
    for m, fr, _typed, _table, _r in _frames_to_solve(None):
        present = [int(p) for p in np.flatnonzero(fr.state.present)]
        sol = _fit_rows(m, fr, [tuple(present)], FitSpec())
        theta, raw = sol.p[0], sol.cov[0]
        res = _result(m, fr, theta, raw, fr.state.present.copy(), [""] * m.P, True, "")
        esds = res.esds
        assert esds is not None and res._err is None
        # made at once, as before they were put off
        free = np.isfinite(np.diagonal(raw))
        f, jac = m.value_jac(theta[None], fr.state.cell, np.flatnonzero((theta[m.area_col] != 0) | free[m.area_col]))
        resid = (fr.y0 - f[0]) * fr.w
        pos = position_redchi(m, fr.state.cell, fr.w, theta, resid)
        cov = window_scaled(m, fr.w, jac[0], raw, esds.redchi_w, pos, noise_correlation(m, fr.w, resid))
        err = np.sqrt(np.diagonal(cov))
        if esds.lever is not None:
            cov, err = _with_lever(cov, free, esds.lever, esds.zero_err)
        area, e = theta[m.area_col], err[m.area_col]
        for z in (0.5, 3.0, 30.0, 300.0):
            shown = esds.area_shown(area, z)
            if shown is None:
                unsettled += 1
                continue
            settled += 1
            np.testing.assert_array_equal(shown, area > z * np.where(np.isfinite(e), e, 0.0))
        np.testing.assert_array_equal(res.err, err)
        np.testing.assert_array_equal(res.cov, cov)
        assert res.esds is None
    assert settled >= 4, (settled, unsettled)


def test_compiled_free_shifts_and_far_tails_as_numpy_placed_them():
    """How far each reflection moves per unit of each free cell parameter (``kernels.free_shifts``,
    the tracking bounds' and the searches' unit) is the central difference NumPy took through
    the cells and positions of the model (a hexagonal, a cubic and a monoclinic phase); the far
    tails summed in every window in one call (``kernels.add_lines_reach``) are those summed
    window by window (``kernels.add_lines``): the same numbers, bit for bit."""
    from xrdpipe import kernels
    from xrdpipe.config import PhaseSpec, WindowSpec
    from xrdpipe.phasefit.model import _CELL_INDEX, PhaseModel

    phases = [PhaseSpec(name="O3", space_group="R-3m", a=2.96, c=16.1),
              PhaseSpec(name="Al", space_group="Fm-3m", a=4.0495, fraction=False),
              PhaseSpec(name="M", space_group="C2/m", a=5.2, b=2.9, c=5.6, beta=105.0)]
    windows = [WindowSpec(name="w1", range=(6.0, 9.0), peaks=["O3 003"]),
               WindowSpec(name="w2", range=(14.0, 17.5), peaks=["O3 104"])]
    radial = np.linspace(4.0, 20.0, 1601)
    m = PhaseModel(phases, windows, FitSpec(), radial=radial, unit="2th_deg", wavelength_A=0.6209)
    rng = np.random.default_rng(4)
    for p in range(m.P):
        hkl = m.r_hkl[m.r_phase == p]
        if not hkl.size:
            continue
        for scale in (0.97, 1.0, 1.02):
            cell = m.cell0[p] * np.array([scale, scale, scale, 1, 1, 1])
            idx = [_CELL_INDEX[n] for n in m.free[p]]
            h = np.array([1e-4 * max(abs(cell[i]), 1.0) for i in idx])
            cells = m.shifted_cells(p, cell[idx], h, cell)[1:]
            pos = m.positions(hkl, cells[:, None, :], 0.0)
            want = np.abs(pos[0::2] - pos[1::2]) / (2 * h[:, None])
            np.testing.assert_array_equal(m.free_shifts(p, cell, hkl), want, err_msg=f"{phases[p].name} {scale}")
    x = np.linspace(5.0, 9.0, 400)
    lo, hi = np.array([0, 120, 250], np.int64), np.array([120, 250, 400], np.int64)
    for n in (1, 5, 9, 40):
        cen, fw = rng.uniform(4, 10, n), rng.uniform(0.02, 0.2, n)
        area, eta = rng.uniform(0, 1e4, n), rng.uniform(0, 1, n)
        reach = rng.random((n, 3)) < 0.6
        want = rng.normal(size=x.size)
        got = want.copy()
        for w in range(3):
            sel = np.flatnonzero(reach[:, w])
            if sel.size:
                kernels.add_lines(x[lo[w]:hi[w]], cen[sel], fw[sel], area[sel], eta[sel], want[lo[w]:hi[w]])
        kernels.add_lines_reach(x, lo, hi, np.ascontiguousarray(reach), cen, fw, area, eta, got)
        np.testing.assert_array_equal(got, want, err_msg=str(n))


def test_one_rows_covariance_is_that_of_a_batch():
    """A single row's covariance, inverted as one matrix (the phase model's frames), is what the
    same row gives in a batch of rows (its free block, scaled to unit diagonal and back), and a
    singular row's is its estimable part in both."""
    from xrdpipe.batchfit import _covariance

    rng = np.random.default_rng(7)
    k = 12
    jac = rng.normal(size=(3, 40, k)) * np.logspace(-3, 3, k)
    hess = np.einsum("rmi,rmj->rij", jac, jac)
    hess[2, :, 6] = hess[2, :, 7]
    hess[2, 6, :] = hess[2, 7, :]                  # (columns 6 and 7 the same: singular)
    held = np.zeros((3, k), bool)
    held[:, 3] = True
    stacked = _covariance(hess[:2], held[:2])       # (inverted as one stack)
    one_by_one = _covariance(hess, held)           # (the singular row: each row apart)
    for r in range(3):
        one = _covariance(hess[r:r + 1], held[r:r + 1])[0]
        np.testing.assert_array_equal(one, one_by_one[r], err_msg=str(r))
        if r < 2:
            np.testing.assert_array_equal(one, stacked[r], err_msg=str(r))
    assert np.isnan(stacked[0, 3]).all() and np.isfinite(stacked[0, 0, 0]) and np.isfinite(one_by_one[2, 6, 6])
