"""Shared by the refinement tests: patterns calculated by an independent program (pymatgen's
XRDCalculator: its own form factors, multiplicities and Lorentz-polarization), with exact
pseudo-Voigt profiles and Poisson noise written here; synthetic series and experiment files."""

import warnings

import numpy as np
import pytest

pytest.importorskip("pymatgen")

from pymatgen.analysis.diffraction.xrd import XRDCalculator  # noqa: E402
from pymatgen.core import Lattice  # noqa: E402
from pymatgen.core import Structure as PmgStructure  # noqa: E402
from refine_run import integrate_and_refine, write_experiment  # noqa: E402

from xrdpipe.refine import PhaseModel, RefinementModel  # noqa: E402
from xrdpipe.refine.structures import template  # noqa: E402

WL = 0.6209
TM = {"Ni": 1 / 3, "Fe": 1 / 3, "Mn": 1 / 3}
B = {"Na": 1.0, "Ni": 0.3, "Fe": 0.3, "Mn": 0.3, "O": 0.6}
X = np.linspace(5.0, 30.0, 3000)


WL = 0.6209


TM = {"Ni": 1 / 3, "Fe": 1 / 3, "Mn": 1 / 3}


B = {"Na": 1.0, "Ni": 0.3, "Fe": 0.3, "Mn": 0.3, "O": 0.6}


X = np.linspace(5.0, 30.0, 3000)


def o3(a=2.9852, c=15.9967, z=0.23257, fe_tet=0.0):
    species = [{"Na": 1.0}, {"Ni": 1 / 3, "Fe": 1 / 3 - 2 * fe_tet, "Mn": 1 / 3}, {"O": 1.0}]
    coords = [[0, 0, 0], [0, 0, 0.5], [0, 0, z]]
    if fe_tet:
        species.append({"Fe": fe_tet})
        coords.append([0, 0, 0.5 - z / 2])
    return PmgStructure.from_spacegroup("R-3m", Lattice.hexagonal(a, c), species, coords)


def p3(a=2.93, c=16.72, dz=0.057, na=0.6):
    return PmgStructure.from_spacegroup("R3m", Lattice.hexagonal(a, c), [TM, {"O": 1.0}, {"O": 1.0}, {"Na": na}],
                                        [[0, 0, 0], [0, 0, 1 / 3 + dz], [0, 0, 2 / 3 - dz], [0, 0, 1 / 6]])


def p2(a=2.866, c=11.19, z=0.0903):
    return PmgStructure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(a, c),
                                        [{"Mn": 0.6, "Co": 0.2, "Mg": 0.07}, {"Na": 0.8 / 3}, {"Na": 1.6 / 3},
                                         {"O": 1.0}],
                                        [[0, 0, 0], [0, 0, 0.25], [1 / 3, 2 / 3, 0.75], [1 / 3, 2 / 3, z]])


def sticks(structure):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pat = XRDCalculator(wavelength=WL, debye_waller_factors=B).get_pattern(structure, scaled=False,
                                                                               two_theta_range=(2, 40))
    return np.array(pat.x), np.array(pat.y)


def profile(structure, scale, fwhm=0.03, eta=0.4, x=X):
    """Every pymatgen reflection as an exact (untruncated) pseudo-Voigt of area scale * I."""
    t, inten = sticks(structure)
    u = x[:, None] - t[None, :]
    g = 2 / fwhm * np.sqrt(np.log(2) / np.pi) * np.exp(-4 * np.log(2) * u**2 / fwhm**2)
    lor = 2 / (np.pi * fwhm) / (1 + 4 * u**2 / fwhm**2)
    return ((eta * lor + (1 - eta) * g) * (scale * inten)).sum(axis=1)


def noisy(y, seed=0):
    obs = np.random.default_rng(seed).poisson(y).astype(float)
    return obs, np.sqrt(np.maximum(obs, 1.0))


def o3_model(**kw):
    st = template("O3", a=2.98, c=16.03, z_o=0.236, composition=TM, b_iso={"Na": 1.0, "TM": 0.3, "O": 0.6})
    return RefinementModel([PhaseModel("O3", st, refine=["z:O"])], wavelength_A=WL, polarization="unpolarised", **kw)


def experiment_in(tmp_path, name, sections):
    """exp.toml for the .xye patterns p_*.xye in tmp_path, results in out/, then ``sections``."""
    write_experiment(tmp_path, name, sections, WL)


#: The O3 phase as a user types it (its cell rounded).
O3_TYPED = """[[phases]]
name = "O3"
a = 2.985
c = 16.0
"""


#: The NFM O3 phase of a Rietveld [refinement] (composition and B_iso of the pymatgen truth).
NFM_O3 = """[[refinement.phases]]
name = "O3"
composition = { Ni = 0.3333333, Fe = 0.3333333, Mn = 0.3333333 }
b_iso = { Na = 1.0, TM = 0.3, O = 0.6 }
"""


def o3_series_in(tmp_path, n=8):
    """O3 shrinking in a and growing in c over n frames (truth.csv), one frame with no counts."""
    a = np.linspace(2.9852, 2.9700, n)
    c = np.linspace(15.9967, 16.0800, n)
    for i in range(n):
        y, s = noisy(profile(o3(a[i], c[i]), 1e-3) + 200.0, seed=10 + i)
        if i == 3:
            y, s = np.zeros_like(y), np.zeros_like(y)        # a dead frame
        np.savetxt(tmp_path / f"p_{i:03d}.xye", np.column_stack([X, y, s]))
    experiment_in(tmp_path, "seq", """[[phases]]
name = "O3"
[refinement]
method = "lebail"
range = [6.0, 29.0]
[[refinement.phases]]
name = "O3"
""")
    return a, c


def o3_p3_al_series(n: int, sign: int):
    """An O3 -> P3 series with Al lines (xrdpipe.testing) and a Refiner of O3 + P3 + Al (Le Bail)
    typed 1 % (a) and 2 % (c) away from the truth (O3: the first frame's, P3: its first
    appearance's) with ``sign``, widths 5x too narrow."""
    from xrdpipe.refine import Refiner
    from xrdpipe.refine.structures import Structure
    from xrdpipe.testing import pattern_series

    ps = pattern_series(n, seed=2, counts=0.05, background=2000.0)
    sc = ps.scenario
    o, p = sc.high.cell(1.0), sc.low.cell(sc.coexistence[0])
    prof = {"W": 0.0002, "Y": 0.01}
    al = Structure("Fm-3m", (4.0495,) * 3 + (90.0,) * 3, ())
    model = RefinementModel([
        PhaseModel("O3", template("O3", a=o[0] * (1 + sign * 0.01), c=o[1] * (1 + sign * 0.02)), profile=prof),
        PhaseModel("P3", template("P3", a=p[0] * (1 + sign * 0.01), c=p[1] * (1 + sign * 0.02)), profile=prof),
        PhaseModel("Al", al, profile=prof, refine_profile=("W",))],      # weak lines: one width
        wavelength_A=0.6209, method="lebail", background_terms=12)
    return ps, Refiner(model, ps.tth_deg)


def untruncated(model: RefinementModel, x: np.ndarray, background: float, values: dict[str, float]) -> np.ndarray:
    """``model``'s pattern with every reflection's TCH pseudo-Voigt (and asymmetry) computed over
    the whole range, whatever window the engine uses: its reflections' positions, widths, mixing
    and intensities from the engine, the profiles here."""
    from xrdpipe.refine.calculator import Calculator

    calc = Calculator(model, x)
    theta = calc.layout.start()
    for k, v in values.items():
        theta[calc.layout.index[k]] = v
    st = calc.reflection_state(theta)
    u = x[None, :] - st["pos"][:, None]
    h, eta = st["fwhm"][:, None], st["eta"][:, None]
    z = u / h
    g = 2 * np.sqrt(np.log(2) / np.pi) / h * np.exp(-4 * np.log(2) * z * z)
    lor = 2 / np.pi / h / (1 + 4 * z * z)
    fa = 2 * z * np.exp(-z * z)
    fb = 2 * (2 * z * z - 3) * fa
    asym = 1 + (values.get("asym_P1", 0.0) * fa + values.get("asym_P2", 0.0) * fb) / st["tan"][:, None]
    return background + np.sum(st["I"][:, None] * (eta * lor + (1 - eta) * g) * asym, axis=0)


def refine_rows(tmp_path):
    """``xrdpipe integrate`` then ``xrdpipe refine`` on ``tmp_path/exp.toml``: refine.csv rows by frame."""
    return integrate_and_refine(tmp_path)[0]
