"""Structures and their reflections: positions and intensities against pymatgen, a CIF file
against the built-in template."""

import numpy as np
import pytest

pytest.importorskip("pymatgen")

from refine_cases import TM, WL, o3, sticks  # noqa: E402

from xrdpipe.refine.structures import read_cif, reflections, structure_factors_sq, template  # noqa: E402


def test_positions_and_intensities_agree_with_pymatgen():
    st = template("O3", a=2.9852, c=15.9967, z_o=0.23257, composition=TM, b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    refl = reflections(st.space_group, st.cell, d_min=WL / (2 * np.sin(np.radians(20))))
    th = np.arcsin(WL / (2 * refl.d))
    ours = refl.multiplicity * structure_factors_sq(st, refl.hkl) * (1 + np.cos(2 * th) ** 2) / (
        np.sin(th) ** 2 * np.cos(th))
    t, inten = sticks(o3())
    t, inten = t[t < 40], inten[t < 40]
    # pymatgen merges reflections closer than 1e-5 deg; so do we, then compare peak by peak
    assert len(t) == len(np.unique(np.round(np.degrees(2 * th), 4)))
    for t0, i0 in zip(t, inten):
        near = np.abs(np.degrees(2 * th) - t0) < 1e-4
        assert near.any(), t0
        # two tables of form factors (IT92 here, pymatgen's own): within 3 % reflection by
        # reflection, give or take 0.5 % of the strongest (weak reflections are differences)
        assert abs(ours[near].sum() - i0) < 0.03 * i0 + 0.005 * inten.max()


def test_a_cif_file_gives_the_same_structure_factors_as_the_template(tmp_path):
    cif = tmp_path / "nfm.cif"
    cif.write_text("""data_nfm
_cell_length_a 2.9852
_cell_length_b 2.9852
_cell_length_c 15.9967
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 120
_symmetry_space_group_name_H-M 'R -3 m'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
_atom_site_B_iso_or_equiv
Na1 Na 0 0 0 1.0 1.0
Ni1 Ni 0 0 0.5 0.33333 0.3
Fe1 Fe 0 0 0.5 0.33333 0.3
Mn1 Mn 0 0 0.5 0.33333 0.3
O1 O 0 0 0.23257 1.0 0.6
""")
    from_cif = read_cif(cif)
    st = template("O3", a=2.9852, c=15.9967, z_o=0.23257, composition={k: 0.33333 for k in TM},
                  b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    refl = reflections(st.space_group, st.cell, d_min=1.0)
    np.testing.assert_allclose(structure_factors_sq(from_cif, refl.hkl), structure_factors_sq(st, refl.hkl),
                               rtol=1e-6)
    assert from_cif.cell_mass() == pytest.approx(3 * (22.990 + (58.693 + 55.845 + 54.938) * 0.33333 + 2 * 15.999),
                                                 rel=1e-3)
