"""Synthetic operando experiments with known truth, for tests, benchmarks and the demo.

A forward model of a sodium layered-oxide cathode in an operando cell:

* phases (O3, P3, P2, P''2) whose lattice parameters follow the sodium content x, with
  solid-solution ranges and a two-phase coexistence region (lever rule);
* reflections from the space group (allowed hkl, multiplicities) and the cell; intensities from
  a simple structure-factor model (atoms with Z-scaled form factors, Na occupancy = x), a Lorentz
  factor and a Debye-Waller term: rough but plausible;
* Caglioti peak widths (pseudo-Voigt), a background with an amorphous hump, aluminium
  current-collector rings;
* 2D frames rendered through a real pyFAI geometry (tilted detector, polarization, solid angle,
  module gaps flagged like an EIGER, Poisson noise), written as EIGER-like HDF5 stacks with
  bitshuffle-LZ4, or as CBF / TIFF / EDF, or 1D .xye patterns;
* a galvanostatic cycler record (time, voltage, current) of the same cell and the frame times.

``make_experiment(folder)`` writes a whole experiment folder (frames, PONI, mask, cycler file,
experiment.toml, truth.csv, truth_peaks.csv) and returns a :class:`SyntheticExperiment`.

Example
-------
>>> exp = make_experiment("demo", n_frames=50, seed=1)          # doctest: +SKIP
>>> exp.experiment_file                                          # doctest: +SKIP
PosixPath('demo/experiment.toml')
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .crystallography import reflections, tth_from_d

__all__ = [
    "assert_same_results",
    "calibrant_image",
    "SyntheticSites",
    "SyntheticPhase",
    "Scenario",
    "Difficulty",
    "score_phases",
    "fit_config",
    "nfm_scenario",
    "mcm_scenario",
    "phase_state",
    "pattern_1d",
    "peak_list",
    "SyntheticExperiment",
    "PatternSeries",
    "pattern_series",
    "make_experiment",
    "demo_geometry",
    "FARADAY",
]

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


@dataclass(frozen=True)
class ProfileModel:
    """Caglioti widths (deg²) and pseudo-Voigt mixing of the synthetic instrument."""

    u: float = 0.004
    v: float = -0.002
    w: float = 0.005
    eta: float = 0.4

    def fwhm(self, tth_deg):
        t = np.tan(np.radians(np.asarray(tth_deg)) / 2)
        return np.sqrt(np.maximum(self.u * t * t + self.v * t + self.w, 1e-6))


def _pseudo_voigt(x, center, fwhm, eta):
    """Area-normalised pseudo-Voigt."""
    g = np.sqrt(4 * np.log(2) / np.pi) / fwhm * np.exp(-4 * np.log(2) * ((x - center) / fwhm) ** 2)
    lz = (2 / (np.pi * fwhm)) / (1 + 4 * ((x - center) / fwhm) ** 2)
    return eta * lz + (1 - eta) * g


@dataclass(frozen=True)
class Difficulty:
    """Knobs that make a synthetic operando series harder than the demo's (whose defaults these
    are): what a real experiment and a new user bring.

    start_error : relative errors (a, c) of the start cells written to the experiment file, for
        the high phase (at the start) and the low phase (where it first appears); both signs
    separation_fwhm : the coexisting phases' basal reflections this many FWHM apart at the
        two-phase boundary (the low phase's c shifted to make it so; None: the scenario's own)
    broadening : FWHM factor of every peak in the two-phase region
    intensity_jitter : log-normal spread of a per-(phase, reflection) intensity factor, fixed for
        the run: relative intensities the fitting model cannot assume
    al_scale : strength of the aluminium current-collector lines (0: none)
    hard_windows : write windows that hold a weak reflection of the other phase and an Al line
        (with Al as a phase, ``fraction = false``) instead of the demo's basal-only set
    seed : seed of the intensity factors
    """

    start_error: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    separation_fwhm: float | None = None
    broadening: float = 1.0
    intensity_jitter: float = 0.0
    al_scale: float = 0.15
    hard_windows: bool = False
    seed: int = 0

    def intensity_factor(self, phase: str, hkl: tuple[int, int, int]) -> float:
        if self.intensity_jitter <= 0:
            return 1.0
        import zlib

        key = zlib.crc32(f"{phase} {' '.join(str(int(v)) for v in hkl)}".encode())
        return float(np.exp(self.intensity_jitter * np.random.default_rng((self.seed, key)).standard_normal()))

    def scenario(self, sc: "Scenario") -> "Scenario":
        """The scenario with the coexisting basal reflections ``separation_fwhm`` apart."""
        if self.separation_fwhm is None:
            return sc
        from dataclasses import replace

        lo, hi = sc.coexistence
        hkl = _BASAL[sc.name]
        a_h, c_h = sc.high.cell(hi)
        a_l, c_l = sc.low.cell(lo)
        tth_h = tth_from_d(c_h / hkl, sc.wavelength_A)
        fw = float(ProfileModel().fwhm(tth_h))
        sign = 1.0 if c_l > c_h else -1.0
        target = tth_h - sign * self.separation_fwhm * fw
        c_new = hkl * sc.wavelength_A / (2 * np.sin(np.radians(target) / 2))
        shift = c_new - c_l
        low = replace(sc.low, nodes=tuple((x, a, c + shift) for x, a, c in sc.low.nodes))
        return replace(sc, low=low)


#: The basal reflection's l of each scenario (003 of O3/P3, 002 of P2/P''2).
_BASAL = {"nfm": 3, "mcm": 2}
_AL_A = 4.0495  # Å, aluminium at room temperature
_AL_LINES = ((1, 1, 1, 100.0), (2, 0, 0, 47.0), (2, 2, 0, 22.0), (3, 1, 1, 24.0), (2, 2, 2, 7.0))


def peak_list(states, wavelength_A: float, tth_range: tuple[float, float], *, scale: float = 1.0,
              include_al: bool = True, al_scale: float = 0.15, difficulty: "Difficulty | None" = None):
    """Reflections of the phases present: list of dicts (phase, hkl, d_A, tth_deg, area, and
    ``fwhm_scale``: the broadening of the two-phase region when ``difficulty`` asks for it)."""
    dif = difficulty or Difficulty()
    broad = dif.broadening if len(states) > 1 else 1.0
    al_scale = dif.al_scale if difficulty is not None else al_scale
    d_min = wavelength_A / (2 * np.sin(np.radians(tth_range[1] + 1) / 2))
    peaks = []
    for phase, a, c, frac in states:
        for h, k, l, d, mult in reflections(phase.space_group, a, c, d_min):
            tth = tth_from_d(d, wavelength_A)
            if not np.isfinite(tth) or tth < tth_range[0] - 1:
                continue
            th = np.radians(tth / 2)
            lorentz = 1.0 / (np.sin(th) ** 2 * np.cos(th))
            f2 = phase.sites.structure_factor_sq(h, k, l, d, x_na=1.0)
            area = scale * frac * mult * f2 * lorentz * 1e-4 * dif.intensity_factor(phase.name, (h, k, l))
            peaks.append({"phase": phase.name, "hkl": f"{h}{k}{l}" if min(h, k, l) >= 0 else f"{h},{k},{l}",
                          "h": h, "k": k, "l": l, "d_A": float(d), "tth_deg": float(tth), "area": float(area),
                          "fwhm_scale": broad})
    if include_al:
        for h, k, l, rel in _AL_LINES:
            d = _AL_A / np.sqrt(h * h + k * k + l * l)
            tth = tth_from_d(d, wavelength_A)
            if np.isfinite(tth):
                peaks.append({"phase": "Al", "hkl": f"{h}{k}{l}", "h": h, "k": k, "l": l, "d_A": float(d),
                              "tth_deg": float(tth), "area": float(scale * al_scale * rel * 0.05)})
    return peaks


def pattern_1d(tth_deg: np.ndarray, peaks, *, profile: ProfileModel = ProfileModel(),
               background: float = 40.0) -> np.ndarray:
    """Noise-free intensity at ``tth_deg`` from a peak list plus background."""
    tth = np.asarray(tth_deg, dtype=float)
    y = background * (1.0 + 0.8 * np.exp(-tth / 6.0)) + 0.6 * background * np.exp(-0.5 * ((tth - 5.5) / 1.8) ** 2)
    for p in peaks:
        fw = float(profile.fwhm(p["tth_deg"])) * p.get("fwhm_scale", 1.0)
        sel = np.abs(tth - p["tth_deg"]) < 25 * fw
        if sel.any():
            y[sel] += p["area"] * _pseudo_voigt(tth[sel], p["tth_deg"], fw, profile.eta)
    return y


def demo_geometry(shape=(512, 512), wavelength_A: float = 0.6209):
    """The synthetic demo detector: 512 x 512 pixels of 75 µm, 130 mm away, tilted, beam off the corner."""
    import pyFAI
    from pyFAI.detectors import Detector

    det = Detector(pixel1=75e-6, pixel2=75e-6, max_shape=shape)
    return pyFAI.load({"detector": det, "dist": 0.130, "poni1": -0.004, "poni2": -0.003,
                       "rot1": 0.020, "rot2": -0.015, "rot3": 0.0, "wavelength": wavelength_A * 1e-10})


def demo_mask(shape=(512, 512), seed: int = 7) -> np.ndarray:
    """Module gaps (a horizontal and a vertical band) and a few dead pixels; True = masked."""
    mask = np.zeros(shape, bool)
    r0 = shape[0] // 2 - 4
    c0 = shape[1] // 2 - 2
    mask[r0:r0 + 8, :] = True
    mask[:, c0:c0 + 4] = True
    rng = np.random.default_rng(seed)
    mask[rng.integers(0, shape[0], 25), rng.integers(0, shape[1], 25)] = True
    return mask


@dataclass
class PatternSeries:
    """In-memory 1D operando series with Poisson noise: ``intensity`` and ``sigma`` (frames x
    points) on ``tth_deg``, the sodium content ``x`` per frame and the true ``peaks`` per frame."""

    tth_deg: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    x: np.ndarray
    peaks: list[list[dict]]
    scenario: Scenario

    def truth(self, phase: str, hkl: str, key: str = "tth_deg") -> np.ndarray:
        """One reflection's true ``tth_deg`` or ``area`` per frame (NaN / 0 where absent)."""
        fill = 0.0 if key == "area" else np.nan
        out = np.full(len(self.peaks), fill)
        for i, frame in enumerate(self.peaks):
            for p in frame:
                if p["phase"] == phase and p["hkl"] == hkl:
                    out[i] = p[key]
        return out

    def states(self) -> list[dict[str, tuple[float, float, float]]]:
        """Per frame: ``{phase: (a, c, fraction)}`` of the phases present."""
        return [{ph.name: (a, c, f) for ph, a, c, f in phase_state(self.scenario, float(x))} for x in self.x]

    def as_patterns(self, *, with_errors: bool = True):
        """The series as a :class:`~xrdpipe.run.store.Patterns` stack (what ``open_run`` returns)."""
        from .run.store import Patterns

        n = len(self.x)
        frames = {"status": np.ones(n, int), "message": np.array([""] * n, dtype=object),
                  "time_s": np.arange(n) * 20.0 + 10.0}
        sigma = self.sigma if with_errors else np.full_like(self.sigma, np.nan)
        return Patterns(self.tth_deg, "2th_deg", self.scenario.wavelength_A, self.intensity, sigma, frames)


def pattern_series(n_frames: int, *, scenario: Scenario | str = "nfm", x_range: tuple[float, float] | None = None,
                   tth_range: tuple[float, float] = (3.0, 24.0), npt: int = 5000, counts: float = 1.0,
                   background: float | None = None, seed: int = 0,
                   difficulty: Difficulty | None = None) -> PatternSeries:
    """Patterns of a charge from ``x_range[0]`` to ``x_range[1]`` (default: the whole scenario),
    evenly spaced in x, with Poisson noise. ``counts`` scales the peaks, ``background`` sets the
    background level (default ``40 * counts``, a far higher peak-to-background ratio than a
    coin cell gives; a few thousand at ``counts=0.05`` is closer to beamline data).
    ``difficulty`` (:class:`Difficulty`) makes it harder."""
    sc = {"nfm": nfm_scenario, "mcm": mcm_scenario}[scenario]() if isinstance(scenario, str) else scenario
    if difficulty is not None:
        sc = difficulty.scenario(sc)
    lo, hi = x_range if x_range is not None else (sc.x0, sc.x_min)
    xs = np.linspace(lo, hi, n_frames)
    grid = np.linspace(*tth_range, npt)
    rng = np.random.default_rng(seed)
    out = np.empty((n_frames, npt))
    peaks = []
    for i, x in enumerate(xs):
        pk = peak_list(phase_state(sc, float(x)), sc.wavelength_A, tth_range, scale=counts * 3000.0,
                       difficulty=difficulty)
        peaks.append(pk)
        bg = 40.0 * counts if background is None else background
        out[i] = rng.poisson(np.clip(pattern_1d(grid, pk, background=bg), 0, None))
    return PatternSeries(grid, out, np.sqrt(np.maximum(out, 1.0)), xs, peaks, sc)


@dataclass
class SyntheticExperiment:
    """Paths and truth of a synthetic experiment written by :func:`make_experiment`."""

    folder: Path
    experiment_file: Path
    frame_files: list[Path]
    poni_file: Path | None
    mask_file: Path | None
    cycler_file: Path
    truth_file: Path
    truth_peaks_file: Path
    scenario: Scenario
    times: list[tuple[datetime, datetime]]
    x: np.ndarray
    truth: list[dict] = field(default_factory=list)
    peaks: list[list[dict]] = field(default_factory=list)

    def states(self) -> list[dict[str, tuple[float, float, float]]]:
        """Per frame: ``{phase: (a, c, fraction)}`` of the phases present."""
        out: list[dict] = [{} for _ in range(len(self.x))]
        for r in self.truth:
            out[r["frame"]][r["phase"]] = (r["a"], r["c"], r["fraction"])
        return out


def score_phases(lattice, table, states, peaks, *, threshold: float = 0.05, major: float = 0.3) -> dict[str, float]:
    """How well a fit recovered a synthetic series: ``lattice`` (a LatticeTable) and ``table``
    (the PeakTable) against the true ``states`` (:meth:`PatternSeries.states`) and ``peaks``.

    Returns ``presence`` (share of phase-frames whose presence is right, a phase counting as
    present from ``threshold`` of fraction, frames below it but above 0 left out),
    ``basal_rms_deg`` (rms error of each phase's first listed reflection where it holds at
    least ``major``), ``median_da``, ``median_dc``, ``max_dc`` (Å, same frames),
    ``fraction_mae`` over the frames where two phases coexist, ``within_1esd`` (share of cell
    errors within one esd) and the counts ``n_phase_frames``, ``n_coexistence``.
    """
    names = [p for p in lattice.phases if any(p in st for st in states)]
    right = total = 0
    da, dc, z, fe, basal = [], [], [], [], []
    labels = {}
    for _, ph, hkl, _ in table.peaks:
        labels.setdefault(ph, hkl)
    for r, frame in enumerate(np.asarray(lattice.frame)):
        st = states[frame]
        for name in names:
            i = lattice.phases.index(name)
            a, c, f = st.get(name, (np.nan, np.nan, 0.0))
            found = bool(np.isfinite(lattice.values["c_A"][r, i]) or np.isfinite(lattice.values["a_A"][r, i]))
            if 0 < f < threshold:
                continue
            total += 1
            right += found == (f >= threshold)
            if found and f >= major:
                da.append(lattice.values["a_A"][r, i] - a)
                dc.append(lattice.values["c_A"][r, i] - c)
                z += [abs(da[-1]) / lattice.values["a_err_A"][r, i], abs(dc[-1]) / lattice.values["c_err_A"][r, i]]
                if name in labels:
                    want = next((p["tth_deg"] for p in peaks[frame] if p["phase"] == name and p["hkl"] == labels[name]),
                                np.nan)
                    basal.append(table.column("center", f"{name} {labels[name]}")[r] - want)
        if sum(1 for v in st.values() if v[2] > 0) >= 2:
            for name in names:
                fe.append(abs(lattice.values["fraction"][r, lattice.phases.index(name)] - st.get(name, (0, 0, 0.0))[2]))
    z = np.array(z, float)
    with np.errstate(all="ignore"):
        return {"presence": right / max(total, 1), "n_phase_frames": total,
                "basal_rms_deg": float(np.sqrt(np.nanmean(np.square(basal)))) if basal else np.nan,
                "median_da": float(np.nanmedian(np.abs(da))) if da else np.nan,
                "median_dc": float(np.nanmedian(np.abs(dc))) if dc else np.nan,
                "max_dc": float(np.nanmax(np.abs(dc))) if dc else np.nan,
                "fraction_mae": float(np.nanmean(fe)) if fe else np.nan, "n_coexistence": len(fe) // max(len(names), 1),
                "within_1esd": float(np.mean(z[np.isfinite(z)] < 1)) if np.isfinite(z).any() else np.nan}


def _schedule(n_frames: int, n_rest: int, frac_charge: float) -> tuple[int, int]:
    """Frames spent charging and discharging after ``n_rest`` frames at open circuit."""
    n_active = n_frames - n_rest
    n_ch = max(1, int(round(frac_charge * n_active)))
    n_dis = n_active - n_ch
    return n_ch, n_dis


def make_experiment(folder: Path | str, *, scenario: Scenario | str = "nfm", n_frames: int = 50,
                    shape: tuple[int, int] = (512, 512), frame_format: str = "h5",
                    frames_per_file: int = 25, period_s: float = 20.0, exposure_s: float | None = None,
                    n_rest: int = 3, frac_charge: float = 0.6, active_mass_mg: float = 7.2,
                    counts: float = 1.0, background: float | None = None, seed: int = 0, npt: int = 2000,
                    start: datetime = datetime(2025, 7, 2, 19, 5, 59, tzinfo=timezone(timedelta(hours=8))),
                    run_name: str | None = None, difficulty: Difficulty | None = None) -> SyntheticExperiment:
    """Write a synthetic operando experiment folder and return its truth.

    Parameters
    ----------
    folder : where to write (created)
    scenario : ``"nfm"`` (O3 <-> P3), ``"mcm"`` (P2 -> P''2) or a :class:`Scenario`
    n_frames : number of frames (the first ``n_rest`` at open circuit)
    shape : detector shape for 2D frames
    frame_format : ``"h5"`` (EIGER-like, bitshuffle-LZ4), ``"cbf"``, ``"tiff"``, ``"edf"``, or
        ``"xye"`` for 1D patterns (no detector)
    frames_per_file : frames per HDF5 stack
    period_s, exposure_s : frame period and exposure (default exposure: the whole period)
    frac_charge : share of the active frames spent charging (then discharging)
    counts : scale of the peak intensities (photon counts)
    background : background level per pixel (default ``40 * counts``: very strong peaks over a
        low background; ``counts=0.002, background=100`` looks more like a coin cell on an EIGER)
    seed : random seed (Poisson noise, dead pixels)
    difficulty : :class:`Difficulty` knobs (start-cell errors in the experiment file, overlap,
        broadening, intensities, Al lines, windows); None: the demo's settings
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sc = {"nfm": nfm_scenario, "mcm": mcm_scenario}[scenario]() if isinstance(scenario, str) else scenario
    if difficulty is not None:
        sc = difficulty.scenario(sc)
    rng = np.random.default_rng(seed)
    exposure_s = period_s if exposure_s is None else exposure_s
    run_name = run_name or f"synthetic-{sc.name}"
    cell = _Cycling(sc, n_frames, n_rest, frac_charge, period_s, active_mass_mg)
    # cycler record: starts 60 s before the first frame, ends 60 s after the last
    cyc_start = start - timedelta(seconds=60)
    cycler_file = cell.write_record(folder / "cycler.csv", cyc_start)
    begins = [start + timedelta(seconds=i * period_s) for i in range(n_frames)]
    times = [(s, s + timedelta(seconds=exposure_s)) for s in begins]
    xs = np.array([cell.x_at(i * period_s + exposure_s / 2) for i in range(n_frames)])
    camera = _Camera(sc, frame_format, shape, npt)
    writer = _FrameWriter(folder / ("raw" if camera.is_2d else "patterns"), run_name, frame_format, frames_per_file,
                          n_frames, period_s, exposure_s, shape, sc.wavelength_A)
    truth_rows, peak_rows = [], []
    try:
        for i in range(n_frames):
            states = phase_state(sc, float(xs[i]))
            peaks = peak_list(states, sc.wavelength_A, camera.tth_range, scale=counts * 3000.0, difficulty=difficulty)
            for p in peaks:
                peak_rows.append({"frame": i, **{k: p[k] for k in ("phase", "hkl", "d_A", "tth_deg", "area")}})
            for ph, a, c, frac in states:
                truth_rows.append({"frame": i, "time": (times[i][0] + (times[i][1] - times[i][0]) / 2).isoformat(),
                                   "time_s": i * period_s + exposure_s / 2, "x": float(xs[i]), "phase": ph.name,
                                   "a": a, "c": c, "fraction": frac})
            y1 = pattern_1d(camera.grid, peaks, background=40.0 * counts if background is None else background)
            writer.write(i, camera.grid, camera.counts(y1, rng), times[i][0])
    finally:
        writer.close()
    poni_file, mask_file = camera.write_calibration(folder)
    truth_file, truth_peaks_file = _write_truth(folder, truth_rows, peak_rows)
    exp_file = folder / "experiment.toml"
    exp_file.write_text(_experiment_toml(run_name, sc, frame_format, start, period_s, exposure_s,
                                         npt, active_mass_mg, cyc_start) + _fit_toml(sc, difficulty))
    peaks_by_frame: list[list[dict]] = [[] for _ in range(n_frames)]
    for r in peak_rows:
        peaks_by_frame[r["frame"]].append(r)
    return SyntheticExperiment(folder, exp_file, writer.files, poni_file, mask_file, cycler_file, truth_file,
                               truth_peaks_file, sc, times, xs, truth_rows, peaks_by_frame)


class _Cycling:
    """Constant current: rest at x0 for ``n_rest`` frames, charge to x_min, then discharge."""

    def __init__(self, sc: Scenario, n_frames: int, n_rest: int, frac_charge: float, period_s: float,
                 active_mass_mg: float):
        n_ch, n_dis = _schedule(n_frames, n_rest, frac_charge)
        self.sc, self.n_frames, self.period_s = sc, n_frames, period_s
        self.t_rest, self.t_ch, self.t_dis = n_rest * period_s, n_ch * period_s, n_dis * period_s
        self.dxdt = (sc.x0 - sc.x_min) / self.t_ch  # per second
        moles = active_mass_mg * 1e-3 / sc.molar_mass
        self.current_mA = self.dxdt * moles * FARADAY * 1e3

    def x_at(self, t: float) -> float:
        sc = self.sc
        if t <= self.t_rest:
            return sc.x0
        if t <= self.t_rest + self.t_ch:
            return sc.x0 - self.dxdt * (t - self.t_rest)
        return sc.x_min + self.dxdt * min(t - self.t_rest - self.t_ch, self.t_dis)

    def current_at(self, t: float) -> float:
        if t < self.t_rest:
            return 0.0
        if t < self.t_rest + self.t_ch:
            return self.current_mA
        if t < self.t_rest + self.t_ch + self.t_dis:
            return -self.current_mA
        return 0.0

    def write_record(self, path: Path, cyc_start: datetime) -> Path:
        """The cycler's CSV (date-time, time, voltage, current every 2 s) from ``cyc_start``, 60 s
        before the first frame, to 60 s after the last."""
        t_end = self.n_frames * self.period_s + 60
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["datetime", "time/s", "Ewe/V", "I/mA"])
            for tc in np.arange(0.0, t_end + 60 + 1e-9, 2.0):
                t = tc - 60.0
                i = self.current_at(t)
                x = self.x_at(max(t, 0.0))
                v = self.sc.voltage(x, charging=i > 0) if i != 0 else self.sc.voltage(x, True) - 0.03
                w.writerow([(cyc_start + timedelta(seconds=float(tc))).isoformat(), f"{tc:.1f}", f"{v:.5f}",
                            f"{i:.6f}"])
        return path


class _Camera:
    """What turns a 1D pattern into counts: the demo detector (geometry, polarization and solid
    angle, EIGER-like gaps) for 2D frames, or the 2θ grid alone for 1D patterns."""

    def __init__(self, sc: Scenario, frame_format: str, shape: tuple[int, int], npt: int):
        self.is_2d = frame_format != "xye"
        if self.is_2d:
            self.ai = demo_geometry(shape, sc.wavelength_A)
            self.tth_px = self.ai.center_array(shape, unit="2th_deg")
            self.weight = (self.ai.polarization(shape, 0.99) * self.ai.solidAngleArray(shape)).astype(np.float64)
            self.tth_range = (float(np.floor(self.tth_px.min())), float(np.ceil(self.tth_px.max())))
            self.grid = np.arange(self.tth_range[0] - 0.5, self.tth_range[1] + 0.5, 0.0005)
            self.mask = demo_mask(shape, seed=7)
        else:
            self.tth_range = sc.tth_range
            self.grid = np.linspace(self.tth_range[0], self.tth_range[1], npt)

    def counts(self, y1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson counts of the pattern ``y1`` (on :attr:`grid`): 1D, or a 2D image whose
        gaps hold the EIGER's flag value (and are masked)."""
        if not self.is_2d:
            return rng.poisson(np.clip(y1, 0, None)).astype(float)
        img = rng.poisson(np.interp(self.tth_px, self.grid, y1) * self.weight).astype(np.uint32)
        img[self.mask] = np.iinfo(np.uint32).max  # like an EIGER: flagged, and masked
        return img

    def write_calibration(self, folder: Path) -> tuple[Path | None, Path | None]:
        """demo.poni and mask.edf for 2D frames; (None, None) for 1D patterns."""
        import fabio

        if not self.is_2d:
            return None, None
        poni_file = folder / "demo.poni"
        self.ai.write(str(poni_file))
        mask_file = folder / "mask.edf"
        fabio.edfimage.EdfImage(data=self.mask.astype(np.int8),
                                header={"title": "xrdpipe demo mask: 1 = masked"}).write(str(mask_file))
        return poni_file, mask_file


class _FrameWriter:
    """Frames into files: EIGER-like HDF5 stacks of ``frames_per_file`` (bitshuffle-LZ4), one
    CBF/TIFF/EDF file a frame, or one .xye a 1D pattern. ``files`` lists what was written."""

    def __init__(self, raw: Path, run_name: str, frame_format: str, frames_per_file: int, n_frames: int,
                 period_s: float, exposure_s: float, shape: tuple[int, int], wavelength_A: float):
        raw.mkdir(exist_ok=True)
        self.raw, self.run_name, self.format = raw, run_name, frame_format
        self.frames_per_file, self.n_frames = frames_per_file, n_frames
        self.period_s, self.exposure_s, self.shape, self.wavelength_A = period_s, exposure_s, shape, wavelength_A
        self.files: list[Path] = []
        self._h5 = None
        self._ds = None

    def write(self, i: int, grid: np.ndarray, y: np.ndarray, start: datetime) -> None:
        if self.format == "xye":
            path = self.raw / f"{self.run_name}_{i:05d}.xye"
            np.savetxt(path, np.column_stack([grid, y, np.sqrt(np.maximum(y, 1))]), fmt="%.6f",
                       header=f"synthetic pattern {i}, 2theta_deg counts esd, lambda={self.wavelength_A}")
            self.files.append(path)
        elif self.format == "h5":
            j = i % self.frames_per_file
            if j == 0:
                self._open_stack(i, start)
            self._ds[j] = y
        else:
            self.files.append(_write_fabio(self.raw, i, y, start, self.exposure_s, self.format, self.run_name))

    def _open_stack(self, i: int, start: datetime) -> None:
        import h5py
        import hdf5plugin

        self.close()
        n_here = min(self.frames_per_file, self.n_frames - i)
        path = self.raw / f"{self.run_name}_data_{i // self.frames_per_file + 1:06d}.h5"
        self._h5 = h5py.File(path, "w")
        _eiger_header(self._h5, start, self.period_s, self.exposure_s, self.shape, self.wavelength_A)
        self._ds = self._h5.create_dataset("/entry/data/data", shape=(n_here, *self.shape), dtype=np.uint32,
                                           chunks=(1, *self.shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        self._ds.attrs["units"] = "counts"
        self.files.append(path)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _write_truth(folder: Path, truth_rows: list[dict], peak_rows: list[dict]) -> tuple[Path, Path]:
    """truth.csv (frame, time, x, phase, a, c, fraction) and truth_peaks.csv."""
    truth_file = folder / "truth.csv"
    with open(truth_file, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["frame", "time", "time_s", "x", "phase", "a", "c", "fraction"])
        w.writeheader()
        for r in truth_rows:
            w.writerow({**r, "x": f"{r['x']:.6f}", "a": f"{r['a']:.6f}", "c": f"{r['c']:.6f}",
                        "fraction": f"{r['fraction']:.6f}"})
    truth_peaks_file = folder / "truth_peaks.csv"
    with open(truth_peaks_file, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["frame", "phase", "hkl", "d_A", "tth_deg", "area"])
        w.writeheader()
        w.writerows(peak_rows)
    return truth_file, truth_peaks_file


def _eiger_header(h5, start: datetime, period_s: float, exposure_s: float, shape, wavelength_A: float) -> None:
    entry = h5.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    data = entry.create_group("data")
    data.attrs["NX_class"] = "NXdata"
    det = entry.create_group("instrument/detector")
    det.attrs["NX_class"] = "NXdetector"
    det["count_time"] = exposure_s
    det["frame_time"] = period_s
    det["x_pixel_size"] = 75e-6
    det["y_pixel_size"] = 75e-6
    det["description"] = "synthetic EIGER-like detector (xrdpipe.testing)"
    spec = det.create_group("detectorSpecific")
    spec["data_collection_date"] = start.isoformat(timespec="milliseconds")
    spec["x_pixels_in_detector"] = shape[1]
    spec["y_pixels_in_detector"] = shape[0]
    beam = entry.create_group("instrument/beam")
    beam["incident_wavelength"] = wavelength_A
    beam["incident_wavelength"].attrs["units"] = "angstrom"


def _write_fabio(folder: Path, i: int, img: np.ndarray, start: datetime, exposure_s: float, fmt: str,
                 run_name: str) -> Path:
    import fabio

    stamp = start.isoformat(timespec="milliseconds")
    if fmt == "cbf":
        path = folder / f"{run_name}_{i:05d}.cbf"
        header = {"_array_data.header_convention": "PILATUS_1.2",
                  "_array_data.header_contents": f"# Detector: synthetic\r\n# {stamp}\r\n# Exposure_time {exposure_s:.6f} s\r\n"}
        fabio.cbfimage.CbfImage(data=img.astype(np.int32), header=header).write(str(path))
    elif fmt == "edf":
        path = folder / f"{run_name}_{i:05d}.edf"
        fabio.edfimage.EdfImage(data=img, header={"time": stamp, "count_time": str(exposure_s)}).write(str(path))
    elif fmt == "tiff":
        path = folder / f"{run_name}_{i:05d}.tif"
        fabio.tifimage.TifImage(data=img).write(str(path))
    else:
        raise ValueError(f"unknown frame_format {fmt!r}; expected h5, cbf, edf, tiff or xye")
    return path


#: Fit windows of the synthetic scenarios: (name, range in 2θ, reflection).
_WINDOWS = {
    "nfm": (("003", (6.0, 7.1), "003"), ("006", (12.4, 13.8), "006"), ("107", (20.35, 21.1), "107"),
            ("018", (21.95, 22.9), "018")),
    "mcm": (("002", (6.6, 7.4), "002"), ("004", (13.5, 14.5), "004"), ("100", (15.6, 16.6), "100")),
}


#: Harder windows: a weak reflection of the other phase under one phase's window, an Al line
#: under another: (name, range, listed peaks).
_HARD_WINDOWS = {
    "nfm": (("003", (6.0, 7.1), ("O3 003", "P3 003")), ("104", (16.0, 16.9), ("O3 104", "P3 104")),
            ("015", (17.2, 18.2), ("O3 015", "P3 015", "Al 200")), ("107", (20.35, 21.1), ("O3 107", "P3 107")),
            ("018", (21.95, 22.9), ("O3 018", "P3 018"))),
    "mcm": (("002", (6.6, 7.4), ("P2 002", "P''2 002")), ("004", (13.5, 14.5), ("P2 004", "P''2 004")),
            ("100", (15.6, 17.3), ("P2 100", "P''2 100", "Al 111"))),
}


def _fit_toml(sc: Scenario, difficulty: Difficulty | None = None) -> str:
    """[[phases]] (start cells: the high phase at x0, the low one where it appears, each off by
    the difficulty's start errors) and [[windows]] with one component per phase."""
    lo, _ = sc.coexistence
    dif = difficulty or Difficulty()
    out = ["", "# Peak fitting: start cells and windows (2θ, degrees). One component per phase."]
    for ph, (a, c), (ea, ec) in ((sc.high, sc.high.cell(sc.x0), dif.start_error[0]),
                                 (sc.low, sc.low.cell(lo), dif.start_error[1])):
        out += ["[[phases]]", f'name = "{ph.name}"', f'space_group = "{ph.space_group}"', f"a = {a * (1 + ea):.4f}",
                f"c = {c * (1 + ec):.3f}", ""]
    if dif.hard_windows:
        out += ["[[phases]]", 'name = "Al"   # the current collector: space group, cell and fraction = false from the library', ""]
        windows = _HARD_WINDOWS[sc.name]
    else:
        windows = tuple((name, rng, tuple(f"{ph.name} {hkl}" for ph in (sc.high, sc.low)))
                        for name, rng, hkl in _WINDOWS.get(sc.name, ()))
    for name, (w0, w1), labels in windows:
        peaks = ", ".join(f'"{label}"' for label in labels)
        out += ["[[windows]]", f'name = "{name}"', f"range = [{w0}, {w1}]", f"peaks = [{peaks}]", ""]
    names = ", ".join(f'"{name}"' for name, _, _ in windows)
    out += ["# Figures of `xrdpipe run` (in results/figures) and exports (in results/export).",
            "[plots]", 'formats = ["png", "pdf"]', "[plots.contour]", f"windows = [{names}]",
            'vertical = "time"', 'scale = "sqrt"', "", "[export]", 'formats = ["xye", "fxye", "topas"]', ""]
    return "\n".join(out)


def fit_config(scenario: Scenario | str, difficulty: Difficulty | None = None):
    """The ``[[phases]]`` and ``[[windows]]`` that :func:`make_experiment` writes for a scenario
    (start cells off by the difficulty's errors), as specs: ``(phases, windows)``."""
    import tomllib

    from .config import PhaseSpec, WindowSpec

    sc = {"nfm": nfm_scenario, "mcm": mcm_scenario}[scenario]() if isinstance(scenario, str) else scenario
    if difficulty is not None:
        sc = difficulty.scenario(sc)
    text = _fit_toml(sc, difficulty)
    data = tomllib.loads(text[:text.index("# Figures of")])
    return [PhaseSpec(**p) for p in data["phases"]], [WindowSpec(**w) for w in data["windows"]]


def _experiment_toml(run_name, sc, frame_format, start, period_s, exposure_s, npt, active_mass_mg, cyc_start) -> str:
    head = f"""# Synthetic operando experiment written by xrdpipe.testing ({sc.name} scenario).
# Truth: truth.csv (frame, time, x, phase, a, c, fraction) and truth_peaks.csv.
schema_version = 1

[run]
name = "{run_name}"
output = "results"

# The cycler record: time since its start, voltage and current (constant-current cycling).
[electrochemistry]
file = "cycler.csv"
format = "csv"
columns = {{ time = "time/s", voltage = "Ewe/V", current = "I/mA" }}
start = "{cyc_start.isoformat()}"
timezone = "Asia/Shanghai"
active_mass_mg = {active_mass_mg}
formula = "{sc.formula}"
x0 = {sc.x0}
"""
    if frame_format == "xye":
        return head + f"""
[patterns]
files = "patterns/*.xye"
radial_unit = "2th_deg"
wavelength_A = {sc.wavelength_A}
times = {{ start = "{start.isoformat()}", period_s = {period_s}, exposure_s = {exposure_s} }}
"""
    suffix = {"h5": "h5", "cbf": "cbf", "edf": "edf", "tiff": "tif"}[frame_format]
    times = '"header"' if frame_format in ("h5", "cbf", "edf") else (
        f'{{ start = "{start.isoformat()}", period_s = {period_s}, exposure_s = {exposure_s} }}')
    dataset = 'dataset = "/entry/data/data"\n' if frame_format == "h5" else ""
    return head + f"""
[frames]
files = "raw/*.{suffix}"
{dataset}times = {times}

[calibration]
poni = "demo.poni"
mask = "mask.edf"

[integration]
npt = {npt}
unit = "2th_deg"
polarization_factor = 0.99
error_model = "poisson"
splitting = "full"
"""


def assert_same_results(a: Path | str, b: Path | str) -> None:
    """Assert that two run files hold the same frames (none twice), patterns, fitted peaks,
    lattice and electrochemistry, bit for bit (NaN equal to NaN). For checking that a resumed,
    live or distributed run gives what a straight serial run gives."""
    from .run.peakstore import read_peaks
    from .run.store import has_group, open_run, read_table

    pa, pb = open_run(a), open_run(b)
    assert list(pa.frames["key"]) == list(pb.frames["key"]), "not the same frames, in the same order"
    assert len(set(pa.frames["key"])) == len(pa.frames["key"]), "a frame appears twice"
    np.testing.assert_array_equal(pa.frames["status"], pb.frames["status"])
    np.testing.assert_array_equal(pa.intensity, pb.intensity)
    np.testing.assert_array_equal(pa.sigma, pb.sigma)
    assert has_group(a, "peaks") == has_group(b, "peaks")
    if has_group(a, "peaks"):
        qa, qb = read_peaks(a), read_peaks(b)
        for name in ("center", "center_err", "fwhm", "area", "area_err", "present", "success", "redchi", "done"):
            np.testing.assert_array_equal(qa[name], qb[name], err_msg=f"peaks/{name}")
    for group in ("lattice", "electrochemistry"):
        ta, tb = read_table(a, group), read_table(b, group)
        assert (ta is None) == (tb is None), group
        for name, value in (ta or {}).items():
            if name != "attrs" and not isinstance(value, dict):
                np.testing.assert_array_equal(value, tb[name], err_msg=f"{group}/{name}")


def calibrant_image(detector: str, *, calibrant: str = "CeO2", wavelength_A: float = 0.6209, dist_m: float,
                    center_px: tuple[float, float], rot1_deg: float = 0.0, rot2_deg: float = 0.0,
                    fwhm_deg: float = 0.04, peak_counts: float = 2000.0, background: float = 50.0,
                    seed: int = 0):
    """A calibrant image with known geometry, for testing calibration: the rings of a pyFAI
    calibrant rendered by pyFAI on ``detector`` (a pyFAI name), Poisson noise, the detector's
    module gaps set to -1. ``center_px`` is the PONI (row, column) in pixels. Returns the image
    and the true geometry (a pyFAI AzimuthalIntegrator)."""
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = detector_factory(detector)
    ai = AzimuthalIntegrator(dist=dist_m, poni1=center_px[0] * det.pixel1, poni2=center_px[1] * det.pixel2,
                             rot1=np.radians(rot1_deg), rot2=np.radians(rot2_deg), rot3=0.0, detector=det,
                             wavelength=wavelength_A * 1e-10)
    cal = get_calibrant(calibrant)
    cal.wavelength = wavelength_A * 1e-10
    ideal = cal.fake_calibration_image(ai, Imax=peak_counts, Imin=background, resolution=fwhm_deg)
    img = np.random.default_rng(seed).poisson(np.maximum(ideal, 0)).astype(np.float64)
    if det.mask is not None:
        img[det.mask.astype(bool)] = -1
    return img, ai
