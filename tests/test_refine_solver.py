"""Refining one pattern (refine_pattern, Refiner) against independent truth from typical start
values: Rietveld cells, oxygen z, weight fractions and occupancies, sequential Le Bail, profile
parameters, verdicts, threads."""

import numpy as np
import pytest

pytest.importorskip("pymatgen")

from pymatgen.core import Lattice  # noqa: E402
from pymatgen.core import Structure as PmgStructure  # noqa: E402
from refine_cases import (  # noqa: E402
    TM,
    WL,
    X,
    noisy,
    o3,
    o3_model,
    o3_p3_al_series,
    p2,
    p3,
    profile,
    untruncated,
)

from xrdpipe.refine import (  # noqa: E402
    OccupancyConstraint,
    PhaseModel,
    RefinementError,
    RefinementModel,
    refine_pattern,
)
from xrdpipe.refine.structures import Atom, template  # noqa: E402


@pytest.mark.parametrize("kind", ["O3", "P2"])
def test_rietveld_recovers_cell_and_oxygen_z(kind):
    if kind == "O3":
        truth, a, c, z = o3(), 2.9852, 15.9967, 0.23257
        model = o3_model()
    else:
        truth, a, c, z = p2(), 2.866, 11.19, 0.0903
        st = template("P2", a=2.86, c=11.22, z_o=0.094, composition={"Mn": 0.6, "Co": 0.2, "Mg": 0.07}, na=0.8,
                      b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
        model = RefinementModel([PhaseModel("P2", st, refine=["z:O"])], wavelength_A=WL, polarization="unpolarised")
    y, s = noisy(profile(truth, 1e-3) + 200.0)
    r = refine_pattern(model, X, y, s)
    assert r.converged and r.gof < 1.2
    assert abs(r.value(f"{kind}.a") / a - 1) < 1e-4
    assert abs(r.value(f"{kind}.c") / c - 1) < 1e-4
    assert abs(r.value(f"{kind}.z:O") - z) < 0.002
    assert 0 < r.esd(f"{kind}.z:O") < 0.002 and 0 < r.esd(f"{kind}.a") < 1e-3


def test_rietveld_weight_fractions_of_a_two_phase_mixture():
    s_o3, s_p3 = o3(), p3()
    w_true = {"O3": 0.3, "P3": 0.7}
    # intensity scale of each phase: volume fraction / V²; volume fraction = weight fraction / density
    dens = {k: float(st.density) for k, st in (("O3", s_o3), ("P3", s_p3))}
    vol = {k: float(st.volume) for k, st in (("O3", s_o3), ("P3", s_p3))}
    scale = {k: 4e3 * (w_true[k] / dens[k]) / vol[k] ** 2 for k in w_true}
    y, s = noisy(profile(s_o3, scale["O3"]) + profile(s_p3, scale["P3"], fwhm=0.04, eta=0.3) + 200.0, seed=3)
    models = [PhaseModel("O3", template("O3", a=2.98, c=16.0, z_o=0.2326, composition=TM,
                                        b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})),
              PhaseModel("P3", template("P3", a=2.935, c=16.70, z_o=0.057, composition=TM, na=0.6,
                                        b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6}))]
    r = refine_pattern(RefinementModel(models, wavelength_A=WL, polarization="unpolarised"), X, y, s)
    for k in w_true:
        w, e = r.weight_fractions[k]
        assert abs(w - w_true[k]) < 0.02 and 0 < e < 0.02
    assert abs(r.value("P3.c") / 16.72 - 1) < 1e-4 and abs(r.value("O3.a") / 2.9852 - 1) < 1e-4


def test_occupancy_constraint_finds_fe_in_the_tetrahedral_sites():
    """The NFM study's question: O3 with no Fe in the Na layer, Fe on its octahedral sites, or Fe
    on its tetrahedral sites. Truth: 0.02 Fe per tetrahedral site (0.04 per formula unit)."""
    y, s = noisy(profile(o3(fe_tet=0.02), 2e-3) + 200.0, seed=7)
    st = template("O3", a=2.985, c=16.0, z_o=0.2326, composition=TM, b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    tet = st.with_atoms([*st.atoms, Atom("Fe_tet", "Fe", (0.0, 0.0, 0.5 - 0.2326 / 2), 0.005, 0.3)])
    octa = st.with_atoms([*st.atoms, Atom("Fe_Na", "Fe", (0.0, 0.0, 0.0), 0.005, 0.3)])
    results = {}
    for name, structure, cons in (("none", st, ()), ("oct", octa, (OccupancyConstraint(("Fe_Na", "Fe")),)),
                                  ("tet", tet, (OccupancyConstraint(("Fe_tet", "Fe")),))):
        model = RefinementModel([PhaseModel("O3", structure, refine=["z:O"], constraints=cons)], wavelength_A=WL,
                                polarization="unpolarised")
        results[name] = refine_pattern(model, X, y, s)
    assert results["tet"].rwp < results["oct"].rwp and results["tet"].rwp < results["none"].rwp
    occ, esd = results["tet"].value("O3.occ:Fe_tet"), results["tet"].esd("O3.occ:Fe_tet")
    assert abs(occ - 0.02) < 0.004 and esd < 0.004
    assert results["tet"].gof < 1.2 < results["none"].gof


@pytest.mark.parametrize("sign", [1, -1])
def test_sequential_le_bail_of_o3_p3_and_al_from_typical_start_values(sign):
    """An O3 -> P3 series with Al lines (xrdpipe.testing), Le Bail of O3 + P3 + Al started from
    cells 1 % (a) and 2 % (c) away from the truth (O3: the first frame's, P3: its first
    appearance's), widths 5x too narrow: every frame where a phase holds >= 30 % recovers its
    cell (|da| <= 5e-4, |dc| <= 2e-3 A) with status ok."""
    from xrdpipe.testing import phase_state

    n = 24
    ps, refiner = o3_p3_al_series(n, sign)
    sc = ps.scenario
    prev, rwp, status = None, [], []
    for i in range(n):
        res = refiner.refine(ps.intensity[i], ps.sigma[i], start=prev,
                             gof_limit=None if prev is None else 3 * prev.gof)
        rwp.append(res.rwp)
        status.append(res.status)
        for ph, a, c, frac in phase_state(sc, float(ps.x[i])):
            if frac >= 0.3:
                assert res.status == "ok", (i, res.message)
                assert abs(res.value(f"{ph.name}.a") - a) <= 5e-4, (i, ph.name)
                assert abs(res.value(f"{ph.name}.c") - c) <= 2e-3, (i, ph.name)
                assert ph.name not in res.absent
        if res.status != "failed":
            prev = res
    med = np.median(rwp)
    assert not any(s == "ok" and r > 2.5 * med for s, r in zip(status, rwp))


def test_a_pattern_the_model_cannot_describe_is_never_ok():
    """A P3 pattern refined as O3 alone (wrong phase, no search): GOF far above gof_max, so
    not ok, with the reason; parameters at a bound are reported without an esd."""
    y, s = noisy(profile(p3(), 1e-3) + 200.0, seed=4)
    model = RefinementModel([PhaseModel("O3", template("O3", a=2.98, c=16.02))], wavelength_A=WL,
                            method="lebail", search=False)
    r = refine_pattern(model, X, y, s)
    assert r.status != "ok" and "above gof_max = 5" in r.message and r.gof > 5
    for name in r.at_bound:
        assert np.isnan(r.esd(name))
    assert np.all(np.isfinite(r.esds[r.refined]) | np.isin(np.array(r.names)[r.refined], list(r.at_bound)))


def test_u_v_w_x_y_refined_together_recover_the_generating_values():
    """A pattern calculated with known TCH widths (U, V, W, X, Y) and asymmetry, every profile
    over the whole range (the Lorentzian tails too, independent of the engine's window), refined
    from widths 2x off (asymmetry from 0) with all seven free: each within 10 %, Rwp within 1.05x
    of the generating model's."""
    from xrdpipe.refine import Refiner

    x = np.linspace(4.0, 40.0, 4000)
    truth = {"U": 0.02, "V": -0.004, "W": 0.001, "X": 0.02, "Y": 0.01}
    st = template("O3", a=2.9852, c=15.9967, z_o=0.2326, composition=TM, b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    gen = RefinementModel([PhaseModel("O3", st, profile=truth, scale=2e-2)], wavelength_A=WL)
    asym = {"asym_P1": 0.002, "asym_P2": 0.0005}
    y0 = untruncated(gen, x, 300.0, asym)
    y, s = noisy(y0, seed=9)
    start = {k: v * (2.0 if k != "V" else 0.5) for k, v in truth.items()}
    model = RefinementModel([PhaseModel("O3", st, profile=start, refine_profile=("U", "V", "W", "X", "Y"))],
                            wavelength_A=WL, correction="none", search=False)
    r = Refiner(model, x).refine(y, s)
    assert r.status == "ok", r.message
    for k, v in truth.items():
        assert abs(r.value(f"O3.{k}") / v - 1) < 0.10, (k, r.value(f"O3.{k}"))
    for k, v in asym.items():
        assert abs(r.value(k) / v - 1) < 0.10, k
    ref = float(np.sqrt(np.sum(((y - y0) / s) ** 2) / np.sum((y / s) ** 2)))
    assert r.rwp < 1.05 * ref, (r.rwp, ref)


def test_aluminium_as_a_le_bail_phase_beside_a_rietveld_phase():
    """O3 (Rietveld) plus the Al current collector's lines (Fm-3m, only a; Le Bail: no structure
    needed): both cells recovered, O3's oxygen z too; the weight fractions are the Rietveld phases'."""
    from pymatgen.core import Structure as Pmg

    from xrdpipe.refine.structures import Structure

    al = Pmg.from_spacegroup("Fm-3m", Lattice.cubic(4.0495), ["Al"], [[0, 0, 0]])
    y, s = noisy(profile(o3(), 1e-3) + profile(al, 3e-4, fwhm=0.025, eta=0.2) + 200.0, seed=11)
    st = template("O3", a=2.98, c=16.03, z_o=0.236, composition=TM, b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    model = RefinementModel([PhaseModel("O3", st, refine=["z:O"]),
                             PhaseModel("Al", Structure("Fm-3m", (4.045,) * 3 + (90.0,) * 3, ()), lebail=True)],
                            wavelength_A=WL, polarization="unpolarised")
    r = refine_pattern(model, X, y, s)
    assert r.status == "ok", r.message
    assert abs(r.value("O3.a") / 2.9852 - 1) < 1e-4 and abs(r.value("O3.c") / 15.9967 - 1) < 1e-4
    assert abs(r.value("O3.z:O") - 0.23257) < 0.002
    assert abs(r.value("Al.a") - 4.0495) < 2e-4
    assert list(r.weight_fractions) == ["O3"] and r.weight_fractions["O3"][0] == pytest.approx(1.0)
    assert "Al.scale" not in r.names


def test_one_refiner_refines_in_several_threads_at_once():
    """The valid-point mask is per call (per thread): two patterns, one with a masked gap,
    refined at once in two threads give the results of refining them one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    from xrdpipe.refine import Refiner

    model = RefinementModel([PhaseModel("O3", template("O3", a=2.98, c=16.02))], wavelength_A=WL, method="lebail",
                            search=False)
    refiner = Refiner(model, X)
    y1, s1 = noisy(profile(o3(), 1e-3) + 200.0, seed=50)
    y2, s2 = noisy(profile(o3(2.9800, 16.01), 1e-3) + 200.0, seed=51)
    y2[1000:1400] = np.nan
    serial = [refiner.refine(y1, s1), refiner.refine(y2, s2)]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda a: refiner.refine(*a), [(y1, s1), (y2, s2)]))
    for a, b in zip(serial, both):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-9, atol=1e-12)
        assert a.n_points == b.n_points
    assert serial[1].n_points == X.size - 400


def test_le_bail_of_a_monoclinic_cell_from_off_start_values():
    """O'3 (C2/m): a, b, c and beta, constrained by the system, from lengths 0.4 % off (the
    search covers lengths; beta starts at its value and is refined by least squares): all four
    recovered."""
    truth = (5.67, 2.86, 5.80, 113.2)
    mono = PmgStructure.from_spacegroup("C2/m", Lattice.monoclinic(*truth), ["Na", "Mn", "O"],
                                        [[0, 0, 0.5], [0, 0, 0], [0.28, 0, 0.79]])
    y, s = noisy(profile(mono, 2e-3) + 200.0, seed=60)
    from xrdpipe.refine.structures import Structure

    start = Structure("C2/m", (5.67 * 1.004, 2.86 * 0.996, 5.80 * 1.004, 90.0, 113.2, 90.0), ())
    r = refine_pattern(RefinementModel([PhaseModel("O'3", start)], wavelength_A=WL, method="lebail"), X, y, s)
    assert r.status == "ok", r.message
    for name, v in zip(("a", "b", "c"), truth):
        assert abs(r.value(f"O'3.{name}") / v - 1) < 1e-4, name
    assert abs(r.value("O'3.beta") - truth[3]) < 0.01


def test_a_pattern_of_another_length_than_the_grid_is_a_clear_error():
    ps, refiner = o3_p3_al_series(2, 1)
    with pytest.raises(RefinementError, match=r"y has shape \(4999,\); the refiner's 2θ grid has 5000 points"):
        refiner.refine(ps.intensity[0][:-1], ps.sigma[0][:-1])
    with pytest.raises(RefinementError, match=r"refine_pattern: sigma has shape \(3,\), expected that of tth"):
        refine_pattern(refiner.model, ps.tth_deg, ps.intensity[0], ps.sigma[0][:3])
