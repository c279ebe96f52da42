"""In-memory 1D operando series with known truth: peak lists, patterns, the harder settings
(:class:`Difficulty`) and the score of a fit against the truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..crystallography import d_from_tth, reflections, tth_from_d
from ..lineshapes import pseudo_voigt
from .scenarios import Scenario, phase_state, scenario_of


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
    free_lines : lines of no phase (an impurity's, a cell part's), in every frame: (2θ in
        degrees, strength on the Al lines' scale (an Al (111) line of ``al_scale`` 0.15 is
        0.15), FWHM as a multiple of the phases' at that angle, eta); in the truth's peak lists
        as phase ``free``, hkl the centre
    """

    start_error: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    separation_fwhm: float | None = None
    broadening: float = 1.0
    intensity_jitter: float = 0.0
    al_scale: float = 0.15
    hard_windows: bool = False
    seed: int = 0
    free_lines: tuple[tuple[float, float, float, float], ...] = ()

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
    for tth, strength, width, eta in dif.free_lines:
        peaks.append({"phase": "free", "hkl": f"{tth:g}", "h": 0, "k": 0, "l": 0,
                      "d_A": float(d_from_tth(tth, wavelength_A)), "tth_deg": float(tth),
                      "area": float(scale * strength * 100.0 * 0.05), "fwhm_scale": float(width), "eta": float(eta)})
    return peaks


def pattern_1d(tth_deg: np.ndarray, peaks, *, profile: ProfileModel = ProfileModel(),
               background: float = 40.0) -> np.ndarray:
    """Noise-free intensity at ``tth_deg`` from a peak list plus background."""
    tth = np.asarray(tth_deg, dtype=float)
    y = background * (1.0 + 0.8 * np.exp(-tth / 6.0)) + 0.6 * background * np.exp(-0.5 * ((tth - 5.5) / 1.8) ** 2)
    for p in peaks:
        fw = float(profile.fwhm(p["tth_deg"])) * p.get("fwhm_scale", 1.0)
        y += p["area"] * pseudo_voigt(tth, p["tth_deg"], fw, 1.0, p.get("eta", profile.eta))
    return y


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
        from ..run.store import Patterns

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
    sc = scenario_of(scenario)
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


def cycle_series(n_frames: int, *, scenario: Scenario | str = "nfm", seed: int = 0, **options) -> PatternSeries:
    """A charge then a discharge: ``n_frames`` of :func:`pattern_series` from the scenario's start
    to its end, then ``n_frames`` back (their own noise, ``seed + 1``), as one series. The phase
    that leaves on the charge comes back on the discharge where it left. ``options`` go to both
    halves (``counts``, ``background``, ``difficulty``...)."""
    charge = pattern_series(n_frames, scenario=scenario, seed=seed, **options)
    sc = charge.scenario
    back = pattern_series(n_frames, scenario=scenario, x_range=(sc.x_min, sc.x0), seed=seed + 1, **options)
    return PatternSeries(charge.tth_deg, np.vstack([charge.intensity, back.intensity]),
                         np.vstack([charge.sigma, back.sigma]), np.concatenate([charge.x, back.x]),
                         charge.peaks + back.peaks, sc)


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


