"""The synthetic cathode: phases, their cells against the sodium content x, the two scenarios."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FARADAY = 96485.33212  # C/mol
_R_CENTRING = [(0.0, 0.0, 0.0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)]
_Z = {"Na": 11, "O": 8, "TM": 26, "Al": 13}
_B_FORM = {"Na": 6.0, "O": 8.0, "TM": 4.0, "Al": 5.0}  # Å², crude Gaussian fall-off of f(s)


@dataclass(frozen=True)
class SyntheticSites:
    """The crude atom sites of a synthetic layered oxide, for the forward model's intensities:
    (element, (x, y, z), occupancy) in the hexagonal setting, Z-scaled Gaussian form factors.
    Na occupancies are relative (scaled by the sodium content x of the frame). Not a crystal
    structure for refinement (that is :class:`xrdpipe.refine.structures.Structure`).
    """

    name: str
    space_group: str
    atoms: tuple[tuple[str, tuple[float, float, float], float], ...]

    def structure_factor_sq(self, h: int, k: int, l: int, d_A: float, x_na: float, b_iso: float = 1.0) -> float:
        s2 = 1.0 / (4.0 * d_A * d_A)  # (sin θ / λ)²
        f = 0.0j
        for el, (u, v, w), occ in self.atoms:
            if el == "Na":
                occ = occ * x_na
            fj = _Z[el] * np.exp(-_B_FORM[el] * s2) * np.exp(-b_iso * s2)
            f += occ * fj * np.exp(2j * np.pi * (h * u + k * v + l * w))
        return float(abs(f) ** 2)


def _centred(atoms):
    out = []
    for el, (u, v, w), occ in atoms:
        for cu, cv, cw in _R_CENTRING:
            out.append((el, ((u + cu) % 1, (v + cv) % 1, (w + cw) % 1), occ))
    return tuple(out)


def o3_sites(z_o: float = 0.2326) -> SyntheticSites:
    """O3 (R-3m): Na 3a, TM 3b, O 6c (z from the NFM study's Rietveld, Table S7)."""
    return SyntheticSites("O3", "R-3m", _centred([
        ("Na", (0, 0, 0), 1.0), ("TM", (0, 0, 0.5), 1.0), ("O", (0, 0, z_o), 1.0), ("O", (0, 0, -z_o), 1.0)]))


def p3_sites(dz_o: float = 0.057) -> SyntheticSites:
    """P3 (R3m): TM at z=0, O at ±dz around it, Na prismatic at z=1/6."""
    return SyntheticSites("P3", "R3m", _centred([
        ("TM", (0, 0, 0), 1.0), ("O", (0, 0, 1 / 3 + dz_o), 1.0),
        ("O", (0, 0, 2 / 3 - dz_o), 1.0), ("Na", (0, 0, 1 / 6), 1.0)]))


def p2_sites(z_o: float = 0.09) -> SyntheticSites:
    """P2 (P6_3/mmc): TM 2a, O 4f, Na on 2b (1/3) and 2d (2/3)."""
    atoms = [("TM", (0, 0, 0), 1.0), ("TM", (0, 0, 0.5), 1.0),
             ("O", (1 / 3, 2 / 3, z_o), 1.0), ("O", (2 / 3, 1 / 3, z_o + 0.5), 1.0),
             ("O", (2 / 3, 1 / 3, -z_o), 1.0), ("O", (1 / 3, 2 / 3, 0.5 - z_o), 1.0),
             ("Na", (0, 0, 0.25), 1 / 3), ("Na", (0, 0, 0.75), 1 / 3),
             ("Na", (1 / 3, 2 / 3, 0.75), 2 / 3), ("Na", (2 / 3, 1 / 3, 0.25), 2 / 3)]
    return SyntheticSites("P2", "P63/mmc", tuple(atoms))


@dataclass(frozen=True)
class SyntheticPhase:
    """A phase whose a and c follow x piecewise-linearly through ``(x, a, c)`` nodes."""

    name: str
    sites: SyntheticSites
    nodes: tuple[tuple[float, float, float], ...]

    @property
    def space_group(self) -> str:
        return self.sites.space_group

    def cell(self, x: float) -> tuple[float, float]:
        xs = np.array([n[0] for n in self.nodes])
        order = np.argsort(xs)
        a = float(np.interp(x, xs[order], np.array([n[1] for n in self.nodes])[order]))
        c = float(np.interp(x, xs[order], np.array([n[2] for n in self.nodes])[order]))
        return a, c


@dataclass(frozen=True)
class Scenario:
    """A two-phase operando story: ``high`` phase above ``coexistence``, ``low`` below it.

    Inside the coexistence interval (x_low, x_high) both phases are present with fractions
    from the lever rule and cells frozen at the boundaries.
    """

    name: str
    wavelength_A: float
    formula: str
    molar_mass: float
    x0: float
    x_min: float
    high: SyntheticPhase
    low: SyntheticPhase
    coexistence: tuple[float, float]
    voltage_nodes: tuple[tuple[float, float], ...]
    tth_range: tuple[float, float] = (3.0, 24.0)

    def voltage(self, x: float, charging: bool) -> float:
        xs, vs = zip(*sorted(self.voltage_nodes))
        v = float(np.interp(x, xs, vs))
        return v + (0.03 if charging else -0.03)

    @property
    def capacity_per_x_mAh_g(self) -> float:
        """Charge per unit of x per gram: F / (3.6 M)."""
        return FARADAY / (3.6 * self.molar_mass)


def nfm_scenario() -> Scenario:
    """NaNi1/3Fe1/3Mn1/3O2: O3 <-> P3 with coexistence near Na0.66 (the NFM study), λ = 0.6209 Å."""
    o3 = SyntheticPhase("O3", o3_sites(), ((1.0, 2.9852, 15.997), (0.68, 2.9540, 16.215)))
    p3 = SyntheticPhase("P3", p3_sites(), ((0.64, 2.9300, 16.690), (0.40, 2.8700, 16.930)))
    m = 22.98977 + (58.6934 + 55.845 + 54.938044) / 3 + 2 * 15.999
    return Scenario("nfm", 0.6209, "NaNi1/3Fe1/3Mn1/3O2", m, 1.0, 0.45, o3, p3, (0.64, 0.68),
                    ((1.0, 2.40), (0.9, 2.75), (0.68, 3.05), (0.64, 3.08), (0.5, 3.55), (0.4, 4.0)))


def mcm_scenario() -> Scenario:
    """P2-Na0.8Mg0.13[Mn0.6Co0.2Mg0.07]O2: P2 -> P''2 then solid solution (the MCM study), λ = 0.6884 Å."""
    p2 = SyntheticPhase("P2", p2_sites(), ((0.80, 2.8520, 11.190), (0.62, 2.8380, 11.260)))
    pp2 = SyntheticPhase("P''2", SyntheticSites("P''2", "P63/mmc", p2_sites(0.092).atoms),
                         ((0.56, 2.8300, 11.340), (0.30, 2.8150, 11.420)))
    m = 22.98977 * 0.8 + 24.305 * 0.2 + 54.938044 * 0.6 + 58.933194 * 0.2 + 2 * 15.999
    return Scenario("mcm", 0.6884, "Na0.8Mg0.2Mn0.6Co0.2O2", m, 0.8, 0.35, p2, pp2, (0.56, 0.62),
                    ((0.8, 2.9), (0.62, 3.6), (0.56, 3.75), (0.35, 4.3)))


def scenario_of(scenario: Scenario | str) -> Scenario:
    """A :class:`Scenario`, or the one named (``"nfm"`` or ``"mcm"``, in any case); another name
    is a ValueError listing those."""
    if not isinstance(scenario, str):
        return scenario
    known = {"nfm": nfm_scenario, "mcm": mcm_scenario}
    make = known.get(scenario.lower())
    if make is None:
        raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(map(repr, known))} or a Scenario")
    return make()


def phase_state(scenario: Scenario, x: float) -> list[tuple[SyntheticPhase, float, float, float]]:
    """``(phase, a, c, fraction)`` of every phase present at sodium content ``x``."""
    lo, hi = scenario.coexistence
    if x >= hi:
        return [(scenario.high, *scenario.high.cell(x), 1.0)]
    if x <= lo:
        return [(scenario.low, *scenario.low.cell(x), 1.0)]
    f_high = (x - lo) / (hi - lo)
    return [(scenario.high, *scenario.high.cell(hi), f_high),
            (scenario.low, *scenario.low.cell(lo), 1.0 - f_high)]
