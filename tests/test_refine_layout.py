"""The parameter layout: what a model refines, and what it cannot."""

import pytest

pytest.importorskip("pymatgen")


from xrdpipe.refine import (  # noqa: E402
    OccupancyConstraint,
    PhaseModel,
    RefinementModel,
)
from xrdpipe.refine.structures import template  # noqa: E402


def test_structural_parameters_that_cannot_be_refined_are_named():
    """Each wrong ``refine`` / constraint entry of a Rietveld phase: one error naming the phase,
    the entry and what is valid; a valid one becomes a parameter starting at the structure's value."""
    from xrdpipe.errors import RefinementError
    from xrdpipe.refine.layout import Layout

    o3 = template("O3", a=2.985, c=16.0)

    def layout(refine=(), constraints=()):
        return Layout(RefinementModel([PhaseModel("O3", o3, refine=refine, constraints=constraints)],
                                      wavelength_A=0.6209, method="rietveld"))

    cases = [
        (dict(refine=["w:O"]), "phase O3: cannot refine 'w:O'; expected z:LABEL"),
        (dict(refine=["z:Q"]), "phase O3: refine z:Q: no atom labelled 'Q' (atoms: Na, Mn, O)"),
        (dict(refine=["x:Na"]), "phase O3: x of atom Na is fixed by symmetry (site (0.0, 0.0, 0.0) in R-3m)"),
        (dict(constraints=[OccupancyConstraint(("Na", "Fe"))]),
         "phase O3: occupancy constraint names 'Fe', which is not an atom (atoms: Na, Mn, O)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RefinementError) as err:
            layout(**kwargs)
        assert str(err.value).startswith(message), str(err.value)
    L = layout(refine=["z:O", "b:*"], constraints=[OccupancyConstraint(("Na", "Mn"))])
    assert L.params[L.index["O3.z:O"]].value == pytest.approx(0.2326)
    assert "O3.b:*" in L.index and "O3.occ:Na" in L.index and "O3.occ:Mn" not in L.index
