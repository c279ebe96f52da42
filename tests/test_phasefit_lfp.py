"""Two orthorhombic phases of one structure type, LiFePO4 → FePO4 (Pnma, λ 0.6209 Å), beside the
Al current collector: a two-phase reaction of another chemistry than the layered oxides, both
cells typed 0.6-1 % off (signs drawn), every reflection's area drawn per phase, Poisson noise.

Six windows as a user draws them around the strong lines, one of them crowded (13.5-14.7°:
LiFePO4 (220) (400) (311) (121) beside FePO4 (220) (400) (311)), two with the Al lines."""

import numpy as np
import pytest

from xrdpipe.config import FitSpec, LatticeSpec, PhaseSpec, WindowSpec
from xrdpipe.crystallography import reflections, tth_from_d
from xrdpipe.lattice import refine_lattice
from xrdpipe.phasefit import fit_phases
from xrdpipe.run.store import Patterns
from xrdpipe.testing import pattern_1d

LAM = 0.6209
LFP, FP, AL = np.array([10.33, 6.01, 4.69]), np.array([9.82, 5.79, 4.79]), 4.0495
WINDOWS = [WindowSpec(name=f"w{i}", range=r, peaks=lab) for i, (r, lab) in enumerate([
    ((6.4, 9.4), ["LFP 200"]), ((9.4, 12.4), ["LFP 211"]), ((12.5, 13.5), ["LFP 301"]), ((13.5, 14.7), ["LFP 121"]),
    ((14.8, 15.5), ["LFP 002", "Al 111"]), ((17.3, 18.0), ["LFP 212", "Al 200"])])]


def _reaction(seed: int, fp_fraction: np.ndarray):
    """Frames of LiFePO4 → FePO4 at the FePO4 fractions ``fp_fraction`` (of the two phases'
    intensity), the Al lines beside them, over 500 counts of background: the patterns and the
    phases typed as a user would (each cell 0.6-1 % off in a, b and c, signs drawn)."""
    rng = np.random.default_rng(seed)
    tth = np.linspace(5, 20, 5000)

    def lines(cell):
        return [(float(tth_from_d(d, LAM)), mult * float(rng.uniform(20, 200)))
                for *_, d, mult in reflections("Pnma", cell[0], cell[2], 1.7, b_A=cell[1])]

    own = [lines(LFP), lines(FP)]
    al = [(float(tth_from_d(d, LAM)), 300.0) for *_, d, _ in reflections("Fm-3m", AL, None, 1.7)]
    counts = []
    for f in fp_fraction:
        peaks = [{"tth_deg": t, "area": a * share} for share, ls in zip((1 - f, f), own) if share > 0 for t, a in ls]
        counts.append(rng.poisson(pattern_1d(tth, peaks + [{"tth_deg": t, "area": a} for t, a in al], background=500.0)))
    counts = np.array(counts, float)
    n = len(counts)
    pat = Patterns(tth, "2th_deg", LAM, counts, np.sqrt(np.maximum(counts, 1)),
                   {"status": np.ones(n, int), "message": np.array([""] * n, dtype=object), "time_s": np.arange(n) * 20.0})
    err = rng.uniform(0.006, 0.01, (2, 3)) * rng.choice([-1, 1], (2, 3))
    phases = [PhaseSpec(name="LFP", space_group="Pnma", **dict(zip("abc", LFP * (1 + err[0])))),
              PhaseSpec(name="FP", space_group="Pnma", **dict(zip("abc", FP * (1 + err[1])))), PhaseSpec(name="Al")]
    return pat, phases


@pytest.mark.parametrize("seed", [2, 4, 9, 12])
def test_a_phase_not_there_does_not_take_the_collectors_lines(seed):
    """A run's first frames, LiFePO4 alone beside Al, FePO4 declared: FePO4 absent, Al present at
    its cell, LiFePO4's cell within 3e-4 Å. Before, FePO4's search (beside LiFePO4 as the search
    left it) found a cell 1-2 % from its typed one that put its lines on Al's and took up
    LiFePO4's misfit, outscored Al's search and joined; Al was then called absent and FePO4
    held Al's lines at a wrong cell until the reaction was well under way (8 of seeds 1-13 so,
    these four among them; over a 30-frame reaction FePO4 then stayed wrongly present for 3-7
    frames and the coexistence fraction MAE was 0.014-0.08). Now a phase of another kind found nearer its cell is fitted first, and FePO4,
    searched again beside it, explains nothing."""
    pat, phases = _reaction(seed, np.zeros(2))
    table = fit_phases(pat, phases, WINDOWS, FitSpec(backward=False))
    present = table.phase["phase_present"].astype(bool)
    assert (present == [True, False, True]).all(), table.phase["phase_decision"]
    cell = table.phase["phase_cell"]
    assert np.all(np.abs(cell[:, 0, :3] - LFP) < 3e-4), cell[:, 0, :3] - LFP
    assert np.all(np.abs(cell[:, 2, 0] - AL) < 2e-4), cell[:, 2, 0]


def test_lifepo4_to_fepo4_reaction():
    """The whole reaction in 18 frames (FePO4 from 0 to 1 of the intensity, both phases alone at
    its ends): presence right in every phase-frame from 5 % on, the cells of a phase holding 30 %
    or more within 4 esd and 5e-4 Å (median 1e-4 Å), 50-85 % of those errors within one esd, the two-phase
    fractions (per-phase scale, its relative intensities learned where each is alone) within
    0.01 of the truth (MAE 0.005). Measured on seeds 1-9 of 30 frames: presence 1.000, MAE
    0.0009-0.0018, medians |Δ| 1.5e-5-1.1e-4 Å, 61-75 % within one esd."""
    truth = np.clip(np.linspace(-0.15, 1.15, 18), 0, 1)
    pat, phases = _reaction(5, truth)
    table = fit_phases(pat, phases, WINDOWS)
    lat = refine_lattice(table, phases, LatticeSpec(), unit="2th_deg", wavelength_A=LAM)
    share = np.stack([1 - truth, truth], 1)
    present = table.phase["phase_present"][:, :2].astype(bool)
    judged = ~((share > 0) & (share < 0.05))
    assert (present == (share >= 0.05))[judged].all(), table.phase["phase_decision"]
    assert table.phase["phase_present"][:, 2].all()
    both = (share > 0).all(axis=1)
    frac = lat.values["fraction"][:, :2]
    seen = (share >= 0.05).all(axis=1)
    assert set(lat.fraction_method[seen, :2].ravel()) == {"scale"}, lat.fraction_method[seen]
    assert np.abs(frac[both] - share[both]).max() < 0.01, frac[both] - share[both]
    assert np.abs(frac[both] - share[both]).mean() < 0.005
    errors, z = [], []
    for i, true in enumerate((LFP, FP)):
        major = share[:, i] >= 0.3
        d = table.phase["phase_cell"][major, i, :3] - true
        errors.append(np.abs(d))
        z.append(np.abs(d) / table.phase["phase_cell_err"][major, i, :3])
    errors, z = np.concatenate(errors).ravel(), np.concatenate(z).ravel()
    assert np.median(errors) < 1e-4 and errors.max() < 5e-4, errors
    assert z.max() < 4, z
    assert 0.5 <= np.mean(z < 1) <= 0.85, np.mean(z < 1)
