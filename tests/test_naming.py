"""The whole-series naming check of the phase model (``[fit] naming = "series"``).

P2 -> P''2 is a 2 % change in c; start cells typed up to 2 % off can put the first frame's P2
lines nearer P''2's typed cell than P2's own. The two phases share their reflections, so the first
frame cannot tell which phase it holds; the series can (the other phase appears later, within
its own search range). Series drawn at random (typed errors of each sign, 1.0-2.5 FWHM apart,
whole line tails) on which the first frame's name was wrong: without the check presence fell to
12-60 % for the rest of the run.
"""

import h5py
import numpy as np
import pytest
from table_checks import same_tables

from xrdpipe.config import FitSpec, LatticeSpec
from xrdpipe.lattice import refine_lattice
from xrdpipe.phasefit import PhaseModel, fit_phases
from xrdpipe.phasefit.fitter import first_tie, naming_verdict
from xrdpipe.testing import Difficulty, fit_config, pattern_series, score_phases


def _series(errors, separation: float, seed: int, naming: str):
    dif = Difficulty(start_error=(errors[:2], errors[2:]), separation_fwhm=separation, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=seed)
    series = pattern_series(40, scenario="mcm", counts=0.05, background=2000.0, seed=seed + 10, difficulty=dif)
    phases, windows = fit_config("mcm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec(naming=naming))
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    return [p.name for p in phases], table, score_phases(lat, table, series.states(), series.peaks)


def test_the_series_names_the_lines_the_first_frame_named_wrong():
    """P''2 typed (+0.7 % a, -1.3 % c) of its own cell is nearer the first frame's P2 lines (0.19
    of the search range) than P2 typed (+0.3 %, -1.25 %) is (0.33): named P''2 there and kept
    so, presence 0.55, fraction MAE 0.52. Fitted again with P2 there, the series fits better
    by ΔBIC ~18,000, and every threshold holds."""
    errors, separation, seed = (0.0032, -0.0125, 0.0070, -0.0133), 1.5, 57
    names, table, s = _series(errors, separation, seed, "series")
    assert s["presence"] >= 0.98, s
    assert s["fraction_mae"] <= 0.02 and s["basal_rms_deg"] <= 0.002, s
    assert 0.5 <= s["within_1esd"] <= 0.85, s
    said = table.phase["phase_decision"][0][names.index("P2")]
    assert "named P2, not P''2, by the whole-series naming check" in said, said
    assert "the whole series named P''2 here fits worse (summed n·ln χ²" in said, said
    # the first frame alone names them P''2 (the check is what puts it right)
    _, first, s_first = _series(errors, separation, seed, "frame")
    assert s_first["presence"] < 0.7 and s_first["fraction_mae"] > 0.3, s_first
    assert first_tie(first.phase["phase_named"]) == (0, names.index("P''2"), names.index("P2"))


def test_a_run_named_wrong_that_puts_itself_right_by_a_jump_is_not_kept():
    """O3 <-> P3, P3 typed (+1 %, -1.7 %) of where it appears: its typed c (16.26 Å) is nearer O3's
    last lines (16.21 Å) than its own (16.55 Å). Named P3 in the first frame, the series puts
    itself right where P3 appears: the name P3 jumps to the new lines and O3 takes the old ones.
    That run fits as well as O3 from the start (its BIC was even 160 lower: one reflection fewer
    in the windows, 7.6 a frame for 23 frames, which took it until the misfit alone was compared)
    and its names are nearer their typed cells at their nearest approach, but it jumped: the
    first frame's O3 stays (presence 100 %, 0.425 with the other)."""
    dif = Difficulty(start_error=((-0.0065, 0.0147), (0.0098, -0.0173)), separation_fwhm=1.9, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=345)
    series = pattern_series(40, scenario="nfm", counts=0.05, background=2000.0, seed=355, difficulty=dif)
    phases, windows = fit_config("nfm", dif)
    table = fit_phases(series.as_patterns(), phases, windows, FitSpec())
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=series.scenario.wavelength_A)
    s = score_phases(lat, table, series.states(), series.peaks)
    assert s["presence"] >= 0.98 and s["fraction_mae"] <= 0.02, s
    said = table.phase["phase_decision"][0][0]
    assert "the whole series named P3 here fits it as well" in said and "its names jump" in said, said


def test_a_series_named_right_keeps_its_names_when_the_other_fits_it_no_better():
    """The first lines are P2's and named so by a hair (typed cells 0.46 against 0.49 of the search
    range); with P''2 there instead the series fits as well in summed n ln χ² (-9; +0 before
    P2's (102) tail above the "100" window was fitted whatever its width, -30 before a search's
    range end could hold its best basin: noise either way, below the margin of 10 sqrt(40
    frames)). Then continuity decides: named P''2 from the first frame, the names jump once from
    one phase's lines to the other's where P''2 appears (P2's name never does), so P2's stays and
    the decision says why. (Before, both runs kept their names and the cells decided, P2's name
    putting both phases nearer their typed cells: 0.36 against 0.60 of the search range.)"""
    names, table, s = _series((0.0086, 0.0093, 0.0038, -0.0087), 2.2, 3, "series")
    assert s["presence"] >= 0.98 and s["fraction_mae"] <= 0.02, s
    said = table.phase["phase_decision"][0][names.index("P2")]
    assert "named P2, not P''2: its typed cell is nearer" in said, said
    assert ("the whole series named P''2 here fits it as well (summed n·ln χ² -9, within 63) but its names jump "
            "from one phase's lines to the other's (1 against 0 times)") in said, said


def test_the_naming_verdict():
    """The fit decides beyond its margin, the cells within it; a run that lost a frame is never
    kept; the note reads the same whichever run came first."""
    from types import SimpleNamespace

    fit = FitSpec()
    # two hexagonal phases, typed at c = 10 and 11 (search half-range 0.3 in c, 0.03 in a)
    # (and an Al current collector, cubic)
    m = SimpleNamespace(P=3, free=[("a", "c"), ("a", "c"), ("a",)],
                        cell0=np.array([[3, 3, 10, 90, 90, 120], [3, 3, 11, 90, 90, 120], [4.05, 4.05, 4.05, 90, 90, 90]]),
                        box=np.array([[0.03, 0.03, 0.3, 1, 1, 1]] * 2 + [[0.012, 0.012, 0.012, 1, 1, 1]]))
    m.range_distance = lambda p, a, b: PhaseModel.range_distance(m, p, a, b)
    n = 100
    cell = np.repeat(m.cell0[None], n, axis=0)
    present = np.zeros((n, 3), bool)
    present[:60, 0] = present[40:, 1] = present[:, 2] = True

    def run(misfit, shift=0.0):
        c = cell.copy()
        c[:, :2, 2] += shift
        return {"phase_misfit": np.array(misfit, float), "phase_cell": c, "phase_present": present.copy()}

    base = np.full(n, 1000.0)
    first = run(base)
    assert naming_verdict(m, first, run(base - 1.01), (0, 1), fit).taken           # 101 lower than a margin of 100
    v = naming_verdict(m, first, run(base - 0.99), (0, 1), fit)
    assert not v.taken and not v.by_fit and v.margin == 100                         # within: the cells, the same
    near = naming_verdict(m, run(base, shift=0.15), run(base - 0.5), (0, 1), fit)
    assert near.taken and not near.by_fit and near.distance == pytest.approx((np.sqrt(0.25 / 2), 0.0))
    # ... where both runs show both phases: a series of one phase knows no more than its first frame
    one = run(base - 0.5)
    one["phase_present"][:, 1] = False
    v = naming_verdict(m, run(base, shift=0.15), one, (0, 1), fit)
    assert not v.taken and not v.both_seen and "the series shows one of them" in v.note(("P2", "P''2"), 0)
    # within the margin a run whose names jump to the other phase's lines loses, however near
    # its typed cells: phase 0 on phase 1's typed cell until frame 40, then on its own
    jumping = run(base - 0.5)
    jumping["phase_cell"][:40, 0, 2] = 11.0
    v = naming_verdict(m, run(base, shift=0.15), jumping, (0, 1), fit)
    assert v.jumps == (0, 1) and not v.taken
    assert "its names jump from one phase's lines to the other's (1 against 0 times)" in v.note(("P2", "P''2"), 0)
    # frames where the runs differ in Al (lost in one of them) are left out of the sums
    al_lost = run(base)
    al_lost["phase_present"][50:53, 2] = False
    al_lost["phase_misfit"][50:53] += 600.0
    v = naming_verdict(m, al_lost, run(base), (0, 1), fit)
    assert not v.by_fit and v.delta == 0 and v.margin == 10 * np.sqrt(97)
    # ... unless the pair differs there too (a run that lost phase 0 and Al is worse)
    al_lost["phase_present"][50:53, 0] = False
    v = naming_verdict(m, al_lost, run(base), (0, 1), fit)
    assert v.by_fit and v.taken and v.delta == -1800
    lost = base - 5.0
    lost[7] = np.nan                                                              # lost a frame the first fitted
    assert not naming_verdict(m, first, run(lost), (0, 1), fit).taken
    # the note names the name not kept, with the same numbers whichever run came first
    names = ("P2", "P''2")
    a = naming_verdict(m, run(base, shift=0.15), run(base - 0.5), (0, 1), fit).note(names, 0)
    b = naming_verdict(m, run(base - 0.5), run(base, shift=0.15), (0, 1), fit).note(names, 0)
    assert a == b and "farther from their typed cells (0.35 against 0.00" in a, a
    assert first_tie(np.full((5, 3), np.nan)) is None


def test_a_fitter_for_the_other_naming_fits_the_first_frame_itself():
    """The zero estimate fits the run's first frame, and the forward pass takes that result
    where it starts from the same state (``PhaseFitter._first_frame``). A fitter for the other
    naming starts from that same fresh state, but its first frame must be named the other way:
    made before the first fitter's forward pass, it took the first naming's result (P''2 on P2's
    lines, the name it exists to try)."""
    from xrdpipe.phasefit import PhaseFitter
    from xrdpipe.phasefit.fitter import ZERO_FRAMES

    dif = Difficulty(start_error=((0.0032, -0.0125), (0.0070, -0.0133)), separation_fwhm=1.5, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=57)
    series = pattern_series(40, scenario="mcm", counts=0.05, background=2000.0, seed=67, difficulty=dif)
    phases, windows = fit_config("mcm", dif)
    names = [p.name for p in phases]
    pat = series.as_patterns()
    fitter = PhaseFitter(phases, windows, FitSpec(backward=False), radial=pat.radial, unit=pat.unit,
                         wavelength_A=pat.wavelength_A)
    fitter.estimate_zero(pat.intensity[:ZERO_FRAMES], pat.sigma[:ZERO_FRAMES])
    other = fitter.other_naming(names.index("P''2"), names.index("P2"))
    got = other.fit_block(pat.intensity[:2], pat.sigma[:2], frame=np.arange(2))
    first = fitter.fit_block(pat.intensity[:2], pat.sigma[:2], frame=np.arange(2))
    p2, pp2 = names.index("P2"), names.index("P''2")
    assert first.phase["phase_present"][0, pp2] and not first.phase["phase_present"][0, p2]
    assert got.phase["phase_present"][0, p2] and not got.phase["phase_present"][0, pp2]


def _tie_experiment(folder, n_frames: int):
    """A P2 -> P''2 charge of ``n_frames`` 2D frames, integrated, whose first lines P''2's search
    fits a little better than P2's (the experiment and its synthetic truth)."""
    from xrdpipe.config import load_experiment
    from xrdpipe.run.integrate import integrate_experiment
    from xrdpipe.testing import make_experiment

    dif = Difficulty(start_error=((-0.01, -0.02), (-0.005, -0.01)), separation_fwhm=1.0, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=202)
    syn = make_experiment(folder / "exp", scenario="mcm", n_frames=n_frames, n_rest=0, frac_charge=1.0, counts=0.05,
                          background=300.0, seed=212, difficulty=dif)
    exp = load_experiment(syn.experiment_file)
    integrate_experiment(exp, progress=False)
    return syn, exp


def test_the_naming_check_through_the_run_file(tmp_path):
    """2D frames, through the run file: P2's first lines fit P''2's search a little better than
    P2's (the Al line not yet explained inflates both chi-squares: 6,245,618 against 6,247,083),
    so P''2 took them with no tie seen, and kept them until P2's end (presence 0.55). The check
    fits the series again with P2 there in ``/entry/peaks_other_naming`` and takes that run; the
    group's settings stay the run's, so a second ``xrdpipe fit`` does nothing again."""
    from xrdpipe.run.fit import fit_experiment
    from xrdpipe.run.peakstore import read_peak_table

    syn, exp = _tie_experiment(tmp_path, 40)
    summary = fit_experiment(exp, progress=False)
    assert "are now P2's, not P''2's" in summary.naming, summary.naming
    table = read_peak_table(exp.run.run_file)
    lat = refine_lattice(table, exp.phases, exp.lattice, unit="2th_deg", wavelength_A=syn.scenario.wavelength_A)
    s = score_phases(lat, table, syn.states(), syn.peaks)
    assert s["presence"] >= 0.98 and s["fraction_mae"] <= 0.02 and s["basal_rms_deg"] <= 0.002, s
    with h5py.File(exp.run.run_file, "r") as h5:
        main, other = h5["/entry/peaks"], h5["/entry/peaks_other_naming"]
        assert main.attrs["named_through"] == 40 and main.attrs["backward_through"] == 40
        assert other.attrs["backward_through"] == 40
        # the other group holds the first frame's naming: P''2 on P2's lines
        assert other["phase_present"][0, 1] == 1 and other["phase_present"][0, 0] == 0
        assert main["phase_present"][0, 0] == 1 and main["phase_present"][0, 1] == 0
        before = main["phase_cell"][()]
    again = fit_experiment(exp, progress=False)
    assert again.fitted == 0 and not again.restarted and again.naming == "", again
    with h5py.File(exp.run.run_file, "r") as h5:
        np.testing.assert_array_equal(h5["/entry/peaks/phase_cell"][()], before)


def test_the_second_naming_fitted_beside_the_first_through_the_run_file(tmp_path, monkeypatch):
    """``xrdpipe fit``: the naming check's second run, forked where the first run's forward pass
    names the first frame and fed the blocks that pass reads (``run/fit.py``, _NamingBeside),
    leaves the run file as the second run fitted afterwards does, both groups bit for bit; and
    a second process that fails leaves the rest to be fitted afterwards, to the same end."""
    import shutil

    from xrdpipe.phasefit import ahead
    from xrdpipe.run.fit import fit_experiment

    syn, exp = _tie_experiment(tmp_path, 24)
    run = exp.run.run_file
    integrated = tmp_path / "integrated.nxs"
    shutil.copy(run, integrated)
    started, start, runs = [], ahead.StreamedRun.start, []
    monkeypatch.setattr(ahead.StreamedRun, "start",
                        lambda self, *a: runs.append(self) or started.append(start(self, *a)) or started[-1])
    from xrdpipe.run import fit as fit_stage

    written, write = [], fit_stage._NamingBeside._write
    monkeypatch.setattr(fit_stage._NamingBeside, "_write",
                        lambda self, tables: written.extend(int(f[0]) for f, _ in tables) or write(self, tables))

    def fitted(**fit) -> dict:
        shutil.copy(integrated, run)
        summary = fit_experiment(exp.model_copy(update={"fit": exp.fit.model_copy(update=fit)}), progress=False)
        assert "are now P2's, not P''2's" in summary.naming, summary.naming
        with h5py.File(run, "r") as h5:
            return {f"{g}/{k}": h5["entry"][g][k][()] for g in ("peaks", "peaks_other_naming") for k in h5["entry"][g]}

    monkeypatch.setattr(ahead, "available", lambda workers: True)
    beside = fitted(block_frames=16)
    assert started == [True] and written == [0, 16] and runs[0].missed == "", (written, runs[0].missed)
    monkeypatch.setattr(ahead, "available", lambda workers: False)
    after = fitted(block_frames=16)
    assert started == [True]
    assert beside.keys() == after.keys()
    for name in beside:
        np.testing.assert_array_equal(beside[name], after[name], err_msg=name)
    # a second process that fails in its second block: its first block's table is kept, the
    # rest fitted afterwards, to the same end
    import os

    from xrdpipe.phasefit import PhaseFitter

    monkeypatch.setattr(ahead, "available", lambda workers: True)
    fit_block, parent = PhaseFitter.fit_block, os.getpid()

    def fails_in_a_second_process_after_its_first_block(self, intensity, sigma, *, frame, **kw):
        if os.getpid() != parent and frame[0] > 0:
            raise RuntimeError("a crash")
        return fit_block(self, intensity, sigma, frame=frame, **kw)

    monkeypatch.setattr(PhaseFitter, "fit_block", fails_in_a_second_process_after_its_first_block)
    crashed = fitted(block_frames=16)
    assert started == [True, True] and written == [0, 16, 0], written
    assert runs[-1].missed == "the second process failed: RuntimeError: a crash", runs[-1].missed
    for name in beside:
        np.testing.assert_array_equal(crashed[name], after[name], err_msg=name)
    # a check that, after the backward pass, has nothing to check: the group fitted beside is
    # not left in the run file (fitted afterwards, there would be none)
    monkeypatch.setattr(PhaseFitter, "fit_block", fit_block)
    from xrdpipe.phasefit import fitter as phase_fitter

    monkeypatch.setattr(phase_fitter, "first_tie", lambda named: None)
    shutil.copy(integrated, run)
    assert fit_experiment(exp.model_copy(update={"fit": exp.fit.model_copy(update={"block_frames": 16})}),
                          progress=False).naming == ""
    assert started == [True, True, True] and written[-2:] == [0, 16], written
    with h5py.File(run, "r") as h5:
        assert "peaks_other_naming" not in h5["entry"] and h5["entry/peaks"].attrs["named_through"] == 24


def test_frames_added_later_extend_both_runs_as_a_straight_run_would(tmp_path):
    """A run whose last frames arrive later (a live run): the first 20 frames fitted and checked
    (P2 taken), then the other 20: both runs are extended, not fitted again (the other run now
    the first frame's P''2), the check keeps P2, the decision carries the last check's note only,
    and the result is a straight run's, bit for bit."""
    import shutil

    from xrdpipe.config import load_experiment
    from xrdpipe.run.fit import fit_experiment
    from xrdpipe.run.integrate import integrate_experiment
    from xrdpipe.run.peakstore import read_peaks
    from xrdpipe.testing import assert_same_results, make_experiment, straight_run

    dif = Difficulty(start_error=((-0.01, -0.02), (-0.005, -0.01)), separation_fwhm=1.0, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=202)
    syn = make_experiment(tmp_path / "exp", scenario="mcm", n_frames=40, n_rest=0, frac_charge=1.0, counts=0.05,
                          background=300.0, seed=212, difficulty=dif, frames_per_file=20)
    assert len(syn.frame_files) == 2
    later = tmp_path / "later"
    later.mkdir()
    shutil.move(syn.frame_files[1], later / syn.frame_files[1].name)
    exp = load_experiment(syn.experiment_file)
    integrate_experiment(exp, progress=False)
    first = fit_experiment(exp, progress=False)
    # (P''2 appears at frame 20: on the first 20 frames alone P2 is already the better name)
    assert first.fitted == 20 and "are now P2's, not P''2's" in first.naming, first
    shutil.move(later / syn.frame_files[1].name, syn.frame_files[1])
    exp = load_experiment(syn.experiment_file)
    integrate_experiment(exp, progress=False)
    second = fit_experiment(exp, progress=False)
    assert second.fitted == 20 and "stay P2's (as P''2's: summed n·ln χ²" in second.naming, second
    with h5py.File(exp.run.run_file, "r") as h5:
        assert h5["/entry/peaks_other_naming/done"][()].all()
    said = read_peaks(exp.run.run_file).phase_arrays["phase_decision"][0]
    assert sum(d.count("; the whole series named") for d in said) == 1, said
    # the same frames in one go
    straight = straight_run(syn.experiment_file)
    assert_same_results(straight, exp.run.run_file)
    a, b = (read_peaks(f).phase_arrays for f in (straight, exp.run.run_file))
    for name in ("phase_cell", "phase_present", "phase_bic", "phase_decision"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_second_naming_fitted_beside_the_first_gives_the_same_table(monkeypatch):
    """The naming check's second run, forked where the forward pass names the first lines and
    fitted beside the first run (``phasefit/ahead.py``), is taken, and the table is the one the
    second run fitted afterwards gives, bit for bit (here the check takes the second run: the
    first frame named P''2 on P2's lines)."""
    from xrdpipe.phasefit import ahead, fitter

    dif = Difficulty(start_error=((0.0032, -0.0125), (0.0070, -0.0133)), separation_fwhm=1.5, broadening=1.6,
                     intensity_jitter=0.3, hard_windows=True, seed=57)
    series = pattern_series(40, scenario="mcm", counts=0.05, background=2000.0, seed=67, difficulty=dif)
    phases, windows = fit_config("mcm", dif)
    names = [p.name for p in phases]
    taken = []
    result = ahead.AheadRun.result

    def spied(self, p, q, wait_s=None):
        got = result(self, p, q, wait_s)
        taken.append((self.pair, got is not None, self.missed))
        return got

    monkeypatch.setattr(ahead.AheadRun, "result", spied)
    monkeypatch.setattr(fitter, "ahead_available", lambda workers: True)
    beside = fit_phases(series.as_patterns(), phases, windows, FitSpec(workers=2))
    assert taken == [((names.index("P''2"), names.index("P2")), True, "")], taken
    monkeypatch.setattr(fitter, "ahead_available", lambda workers: False)
    after = fit_phases(series.as_patterns(), phases, windows, FitSpec(workers=2))
    assert len(taken) == 1
    assert "by the whole-series naming check" in after.phase["phase_decision"][0][names.index("P2")]
    same_tables(beside, after, rows=True)


def _pair_sum(p, q):
    return p + q


def _fails(p, q):
    raise RuntimeError(f"no fit for {p}, {q}")


def _dies(p, q):
    import os
    os._exit(3)


def _hangs(p, q):
    import time
    time.sleep(600)


def _warns(p, q):
    import warnings
    warnings.warn(f"frame {p}: a fit that failed", RuntimeWarning)
    return p * q


@pytest.mark.parametrize("compute, asked, expect, missed", [
    (_pair_sum, (1, 2), 3, ""),
    (_pair_sum, (2, 1), None, "started for phases (1, 2), the check is of (2, 1)"),
    (_fails, (1, 2), None, "the second process failed: RuntimeError: no fit for 1, 2"),
    (_dies, (1, 2), None, "the second process ended without a result (exit code 3"),
    (_hangs, (1, 2), None, "the second process gave no result within 2 s: ended"),
])
def test_a_second_run_beside_the_first_is_taken_only_for_its_pair_and_when_it_succeeded(compute, asked, expect, missed):
    import time

    from xrdpipe.phasefit.ahead import AheadRun, available

    if not available(2):
        pytest.skip("no fork here")
    t0 = time.monotonic()
    with AheadRun(compute) as run:
        run.start(1, 2)
        run.start(3, 4)                 # (once: the first pair stays)
        assert run.pair == (1, 2)
        # (a child that hangs is waited for 2 s; the others as long as they take)
        assert run.result(*asked, wait_s=2.0 if compute is _hangs else None) == expect
        assert run.missed.startswith(missed), run.missed
    assert compute is not _hangs or time.monotonic() - t0 < 20    # (waited for 2 s, then ended)
    assert AheadRun(_pair_sum).result(1, 2) is None        # never started


def test_the_warnings_of_a_second_run_are_given_by_the_first():
    """A warning of the second run (a frame that failed) reaches the caller as if the run had
    been fitted in the caller's process: its filters and captures see it."""
    from xrdpipe.phasefit.ahead import AheadRun, available

    if not available(2):
        pytest.skip("no fork here")
    with AheadRun(_warns) as run:
        run.start(3, 4)
        with pytest.warns(RuntimeWarning, match="frame 3: a fit that failed"):
            assert run.result(3, 4) == 12


def test_a_second_run_ends_with_its_parent(tmp_path):
    """The parent killed (SIGKILL: nothing of its own runs), the child forked for the second run
    ends too, rather than fitting on alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from xrdpipe.phasefit.ahead import available

    if not available(2):
        pytest.skip("no fork here")
    script = tmp_path / "parent.py"
    script.write_text("import time\n"
                      "from xrdpipe.phasefit.ahead import AheadRun\n"
                      "def slow(p, q):\n"
                      "    time.sleep(600)\n"
                      "run = AheadRun(slow)\n"
                      "run.start(1, 2)\n"
                      "print(run._proc.pid, flush=True)\n"
                      "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)                   # (running)
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    for _ in range(300):
        if not _running(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped by whoever adopted it,
    does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class _SlowFitter:
    """A stand-in fitter for :class:`~xrdpipe.phasefit.ahead.StreamedRun`: fits its first block,
    then hangs."""

    def resume(self, stored):
        pass

    def fit_block(self, intensity, sigma, *, frame, **kw):
        import time

        from xrdpipe.peaks import PeakTable

        if frame[0] > 0:
            time.sleep(600)
        n = len(frame)
        table = PeakTable(frame, np.zeros(n), ("w",), (), {}, np.zeros((n, 0), bool), np.ones((n, 1), bool),
                          np.ones((n, 1)), np.full((n, 1), "", object))
        table.phase = {"phase_cell": np.zeros((n, 1, 6))}
        return table


def test_a_second_run_through_the_run_file_that_hangs_is_ended():
    """The run file's second run (StreamedRun) whose child stops taking frames: the parent waits
    at most the time it is given, ends the child, keeps the tables that came back, and goes on."""
    import time

    from xrdpipe.phasefit.ahead import StreamedRun, available

    if not available(2):
        pytest.skip("no fork here")

    def block(start: int):
        frames = np.arange(start, start + 4)
        big = np.ones((4, 40_000))                     # (more than a pipe holds)
        return frames, big, big, np.zeros(4), np.ones(4, bool), [""] * 4

    t0 = time.monotonic()
    with StreamedRun() as run:
        assert run.start(_SlowFitter(), block(0))
        run.send(block(4), wait_s=60.0)                # (taken: the child reads it, then hangs on it)
        run.send(block(8), wait_s=2.0)                 # (not taken: ended)
        assert run.missed == "the second process took no frames within 2 s: ended", run.missed
        got = run.tables(2.0, wait=True)
    assert [int(frames[0]) for frames, _ in got] == [0]
    assert time.monotonic() - t0 < 30


def _available_here(queue):
    from xrdpipe.phasefit.ahead import available

    queue.put(available(2))


def test_no_second_run_inside_a_pool_worker():
    """A daemonic process (a pool's worker: a user may fit series in one) may have no children:
    the second run is then fitted afterwards, not forked."""
    import multiprocessing

    from xrdpipe.phasefit.ahead import available

    if not available(2):
        pytest.skip("no fork here")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_available_here, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=60) is False
    worker.join()
    assert not available(1)


class _FailingFitter(_SlowFitter):
    """A stand-in fitter for :class:`~xrdpipe.phasefit.ahead.StreamedRun`: fits its first block,
    then fails."""

    def fit_block(self, intensity, sigma, *, frame, **kw):
        if frame[0] > 0:
            raise RuntimeError("a crash")
        return super().fit_block(intensity, sigma, frame=frame, **kw)


def test_a_second_run_that_failed_says_why_though_a_write_found_it_gone(monkeypatch):
    """The run file's second run whose child failed: the reason recorded is the child's own
    (its last message), even where the parent's next block found the child gone before that
    message was read (the parent's reading thread held back here)."""
    import time

    from xrdpipe.phasefit.ahead import _REASON_S, StreamedRun, available

    if not available(2):
        pytest.skip("no fork here")
    receive = StreamedRun._receive
    held = _REASON_S - 1.0                             # (less than a failed write waits for it)
    monkeypatch.setattr(StreamedRun, "_receive", lambda self, conn: (time.sleep(held), receive(self, conn)))

    def block(start: int):
        frames = np.arange(start, start + 4)
        return frames, np.ones((4, 10)), np.ones((4, 10)), np.zeros(4), np.ones(4, bool), [""] * 4

    with StreamedRun() as run:
        assert run.start(_FailingFitter(), block(0))
        run.send(block(4), wait_s=60.0)                # (taken: the child fails on it and ends)
        t0 = time.monotonic()
        while run._proc.is_alive() and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        assert time.monotonic() - t0 < held - 0.5, "the child took too long to end: the test proves nothing"
        run.send(block(8), wait_s=60.0)                # (the child gone: the write fails)
        assert run.missed == "the second process failed: RuntimeError: a crash", run.missed
        got = run.tables(10.0, wait=True)
    assert [int(frames[0]) for frames, _ in got] == [0]
