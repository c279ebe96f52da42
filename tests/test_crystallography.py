"""Pure crystallography: round trips and reflection lists against known tables."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from xrdpipe import crystallography as cr

wavelengths = st.floats(0.1, 1.6)
d_values = st.floats(0.9, 20.0)


@given(d=d_values, lam=wavelengths)
def test_d_tth_q_round_trip(d, lam):
    tth = cr.tth_from_d(d, lam)
    if np.isnan(tth):
        assert lam > 2 * d
        return
    assert np.isclose(cr.d_from_tth(tth, lam), d, rtol=1e-10)
    q = cr.q_from_tth(tth, lam)
    assert np.isclose(q, 2 * np.pi / d, rtol=1e-10)
    assert np.isclose(cr.tth_from_q(q, lam), tth, rtol=1e-9, atol=1e-9)


@given(h=st.integers(0, 4), k=st.integers(0, 4), l=st.integers(0, 12),
       a=st.floats(2.5, 3.2), c=st.floats(10.0, 18.0))
def test_hexagonal_d_spacing(h, k, l, a, c):
    if h == k == l == 0:
        return
    d = cr.d_hexagonal(h, k, l, a, c)
    # against the metric tensor of the hexagonal cell
    g = np.array([[a * a, -a * a / 2, 0], [-a * a / 2, a * a, 0], [0, 0, c * c]])
    hkl = np.array([h, k, l], float)
    assert np.isclose(d, 1 / np.sqrt(hkl @ np.linalg.inv(g) @ hkl), rtol=1e-12)


def test_r3m_reflections_match_known_o3_list():
    # O3/alpha-NaFeO2-type pattern (hexagonal axes, obverse): the classic LiCoO2/NaTMO2 indexing
    refl = cr.reflections("R-3m", 2.9852, 15.9967, 1.40)
    hkls = [(h, k, l) for h, k, l, _, _ in refl]
    assert hkls[:10] == [(0, 0, 3), (0, 0, 6), (1, 0, 1), (0, 1, 2), (1, 0, 4), (0, 1, 5),
                         (0, 0, 9), (1, 0, 7), (0, 1, 8), (1, 1, 0)]
    mult = {(h, k, l): m for h, k, l, _, m in refl}
    assert mult[(0, 0, 3)] == 2 and mult[(1, 0, 4)] == 6 and mult[(1, 1, 0)] == 6
    assert (1, 1, 3) in mult and mult[(1, 1, 3)] == 12
    # (003) at λ = 0.6209 Å: d = c/3
    assert np.isclose(refl[0][3], 15.9967 / 3)


def test_p63mmc_reflections_of_p2():
    refl = cr.reflections("P63/mmc", 2.88, 11.2, 1.4)
    hkls = [(h, k, l) for h, k, l, _, _ in refl]
    assert hkls[:6] == [(0, 0, 2), (0, 0, 4), (1, 0, 0), (1, 0, 1), (1, 0, 2), (1, 0, 3)]
    assert (0, 0, 1) not in hkls and (0, 0, 3) not in hkls and (1, 1, 1) not in hkls
    mult = {(h, k, l): m for h, k, l, _, m in refl}
    assert mult[(1, 0, 0)] == 6 and mult[(1, 0, 1)] == 12 and mult[(0, 0, 2)] == 2 and mult[(1, 1, 0)] == 6


def test_volume_of_nfm_cell():
    # Table S5 of the NFM study: a = 2.9852, c = 15.9967 -> V = 123.457 Å3
    assert np.isclose(cr.hexagonal_volume(2.9852, 15.9967), 123.457, atol=2e-3)


def test_any_space_group_from_gemmi():
    """Al (Fm-3m), spinel (Fd-3m), LiFePO4 (Pnma), a tetragonal and a triclinic cell: allowed
    reflections and d-spacings against hand-computed values."""
    from xrdpipe.crystallography import (
        cell_volume,
        crystal_system,
        d_spacing,
        is_allowed,
        reflections,
    )

    al = reflections("Fm-3m", 4.0495, None, 1.1)
    assert [r[:3] for r in al] == [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2)]
    assert [r[4] for r in al] == [8, 6, 12, 24, 8]
    assert abs(al[0][3] - 4.0495 / 3**0.5) < 1e-12
    assert not is_allowed("Fm-3m", 1, 0, 0) and is_allowed("Fm-3m", 2, 0, 0)
    assert not is_allowed("Fd-3m", 2, 0, 0) and is_allowed("Fd-3m", 4, 0, 0) and is_allowed("Fd-3m", 3, 1, 1)
    # Pnma: 0kl k+l = 2n, hk0 h = 2n
    assert not is_allowed("Pnma", 0, 1, 0) and is_allowed("Pnma", 0, 1, 1) and not is_allowed("Pnma", 1, 0, 0)
    assert crystal_system("I4/mmm") == "tetragonal" and crystal_system("P-3m1") == "hexagonal"
    assert abs(d_spacing("I4/mmm", 1, 0, 3, 3.9, 12.0) - 1 / (1 / 3.9**2 + 9 / 12.0**2) ** 0.5) < 1e-12
    # triclinic with right angles is orthorhombic
    assert abs(d_spacing("P-1", 1, 2, 3, 5.0, 7.0, 6.0, 90.0, 90.0, 90.0)
               - d_spacing("Pmmm", 1, 2, 3, 5.0, 7.0, 6.0)) < 1e-12
    assert abs(cell_volume("P-1", 5.0, 7.0, 6.0, 90.0, 90.0, 90.0) - 210.0) < 1e-9
    assert abs(cell_volume("Fm-3m", 4.0495) - 4.0495**3) < 1e-9


def test_phase_of_any_crystal_system_needs_only_its_parameters():
    import pytest

    from xrdpipe.config import PhaseSpec

    al = PhaseSpec(name="Al", space_group="Fm-3m", a=4.0495)
    assert al.cell == (4.0495, 4.0495, 4.0495, 90.0, 90.0, 90.0) and al.cell_parameters == ("a",)
    assert PhaseSpec(name="Al").a == 4.0495          # from the library
    with pytest.raises(ValueError, match="orthorhombic: give b"):
        PhaseSpec(name="LFP", space_group="Pnma", a=10.33, c=4.69)
    with pytest.raises(ValueError, match="tetragonal: give c"):
        PhaseSpec(name="T", space_group="I4/mmm", a=3.9)
    with pytest.raises(ValueError, match="unknown space group 'Fm-3x'"):
        PhaseSpec(name="X", space_group="Fm-3x", a=4.0)
    # angles of no cell (140 x 3 add up to 420°; 100 > 65 + 33): named, not NaN cells later on
    for angles in ((140.0, 140.0, 140.0), (100.0, 65.0, 33.0)):
        with pytest.raises(ValueError, match=r"phase 'T1': alpha = .* make no cell"):
            PhaseSpec(name="T1", space_group="P-1", a=5.0, b=6.0, c=7.0, **dict(zip(("alpha", "beta", "gamma"), angles)))
    assert PhaseSpec(name="T2", space_group="P-1", a=5.0, b=6.0, c=7.0, alpha=100.0, beta=110.0, gamma=95.0).alpha == 100.0
    # nor a search of the angles (±2° by default) that reaches such angles: a narrower one is named
    near = dict(name="T3", space_group="P-1", a=5.0, b=6.0, c=7.0, alpha=100.0, beta=65.0, gamma=36.5)
    with pytest.raises(ValueError, match=r"the search of its angles .* reaches 98°, 63°, 34.5°, which make no cell: "
                                         r"give a narrower one, e.g. search = \{ alpha = 0.44"):
        PhaseSpec(**near)
    assert PhaseSpec(**near, search={"alpha": 0.4, "beta": 0.4, "gamma": 0.4}).gamma == 36.5
    # an angle's search range is in degrees (the default, 2°, can be typed), a length's relative
    mono = dict(name="M", space_group="C2/m", a=5.63, b=2.86, c=5.77, beta=112.9)
    assert PhaseSpec(**mono, search={"beta": 2.0, "a": 0.02}).search == {"beta": 2.0, "a": 0.02}
    with pytest.raises(ValueError, match=r"search.a = 0.3: at most 0.2 \(relative"):
        PhaseSpec(**mono, search={"a": 0.3})
    with pytest.raises(ValueError, match=r"search.beta = 12: at most 10 \(degrees"):
        PhaseSpec(**mono, search={"beta": 12.0})


def test_coincident_groups_are_the_lines_no_cell_of_the_system_can_split():
    """Reflections at one d for every cell of the crystal system are one line (a spinel's (511)
    and (333), a cubic (300) and (221), a tetragonal (hk0) and (kh0), a hexagonal (hkl) and (khl)
    where the Laue class does not make them equivalent); ones that merely coincide at the typed
    cell (a tetragonal (110) and (002) where c = √2 a) are not."""
    from xrdpipe.crystallography import coincident_groups

    spinel = (8.24, 8.24, 8.24, 90.0, 90.0, 90.0)
    assert coincident_groups([(5, 1, 1), (3, 3, 3), (4, 4, 0), (3, 0, 0), (2, 2, 1)], "cubic",
                             spinel).tolist() == [0, 0, 1, 2, 2]
    tet = (4.0, 4.0, 4.0 * np.sqrt(2.0), 90.0, 90.0, 90.0)
    # (1 1 0) and (0 0 2) at one d at this cell only (d = a/√2 = c/2): two lines
    assert coincident_groups([(2, 1, 0), (1, 2, 0), (1, 1, 0), (0, 0, 2)], "tetragonal", tet).tolist() == [0, 0, 1, 2]
    hexa = (2.9, 2.9, 16.5, 90.0, 90.0, 120.0)
    assert coincident_groups([(2, 1, 3), (1, 2, 3), (3, -1, 2), (1, 0, 1)], "hexagonal", hexa).tolist() == [0, 0, 1, 2]
    mono = (5.2, 2.9, 5.6, 90.0, 104.0, 90.0)
    assert coincident_groups([(1, 0, 1), (-1, 0, 1), (1, 1, 0), (1, -1, 0)], "monoclinic", mono).tolist() == [0, 1, 2, 2]
    assert coincident_groups(np.zeros((0, 3)), "cubic", spinel).size == 0
