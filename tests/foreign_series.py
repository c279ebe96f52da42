"""Operando series simulated without :mod:`xrdpipe.testing`, on purpose: a check of the phase
model against data its own simulator does not make.

What differs from ``xrdpipe.testing`` (whose series share the fitting model's conventions):

* lines are **Voigt** profiles (``scipy.special.voigt_profile``: Gaussian width from Caglioti
  U, V, W, Lorentzian X / cos θ + Y tan θ), not pseudo-Voigts, each phase with its own size
  broadening, 1.5x more in the two-phase region;
* reflections from the space groups' conditions written out here (R-3m / R3m obverse,
  P6₃/mmc, Fm-3m), each phase's intensities drawn at random once (basal line strongest), with
  Lorentz-polarisation and a Debye-Waller fall-off;
* a **zero shift** of the 2θ axis (0.006°, a sixth of a FWHM);
* a **curved background**: a decay toward low angle and a broad amorphous hump (electrolyte,
  separator), changing a little from frame to frame;
* the cells move linearly with x in the one-phase regions and **stay put in the two-phase
  region** (the fractions follow the lever rule), the newcomer's cell 0.4-1.1 % from the
  library cell a user types;
* aluminium current-collector lines, one under a window;
* optionally (``lines``) Voigt lines of no phase at fixed 2θ (an impurity's), each with its own
  width;
* as 2D frames (:func:`foreign_experiment`), another detector, another way of averaging a
  pattern over a pixel, and an experiment file written here.

The experiment's ``[[phases]]`` are the library's typical cells (what a user types first) and
its ``[[windows]]`` are chosen as a user would: around the lines of both phases, ±0.35°.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import voigt_profile

AL_A = 4.0495
ZERO_DEG = 0.006

_CAGLIOTI = (0.008, -0.0006, 0.00035)   # U, V, W (deg²), Gaussian FWHM
_LORENTZ = (0.010, 0.004)               # X, Y (deg): Lorentzian FWHM X / cos θ + Y tan θ
_AL_LINES = {(1, 1, 1): 100.0, (2, 0, 0): 47.0, (2, 2, 0): 22.0, (3, 1, 1): 24.0, (2, 2, 2): 7.0}


def _allowed(sg: str, h: int, k: int, l: int) -> bool:
    if sg in ("R-3m", "R3m"):          # hexagonal axes, obverse setting
        return (-h + k + l) % 3 == 0
    if sg == "P63/mmc":                # hh(-2h)l and 000l: l even
        if h == k or k == -2 * h or h == -2 * k:
            return l % 2 == 0
        return True
    raise ValueError(f"no reflection conditions written here for space group {sg!r}")


def _inv_d2(a: float, c: float, hkl) -> float:
    h, k, l = hkl
    return 4 / 3 * (h * h + h * k + k * k) / a ** 2 + l * l / c ** 2


@dataclass
class _Phase:
    name: str
    sg: str
    broad: float
    lines: list          # [(hkl, intensity)]


def _phase(name: str, sg: str, a: float, c: float, basal: int, broad: float, lam: float, tmax: float,
           rng) -> _Phase:
    families: dict[float, list] = {}
    for h in range(-12, 13):
        for k in range(-12, 13):
            for l in range(0, 40):
                if (h, k, l) == (0, 0, 0) or not _allowed(sg, h, k, l):
                    continue
                inv = _inv_d2(a, c, (h, k, l))
                s = lam * np.sqrt(inv) / 2
                if s < 1 and 2 * np.degrees(np.arcsin(s)) <= tmax:
                    families.setdefault(round(inv, 9), []).append((h, k, l))
    lines = []
    for _, hkls in sorted(families.items()):
        rep = max(hkls, key=lambda t: (t[0] >= 0 and t[1] >= 0, -abs(t[0]) - abs(t[1]), t[0]))
        if rep[0] == rep[1] == 0:
            inten = 100.0 if rep[2] == basal else 25.0 * np.exp(0.6 * rng.standard_normal())
        else:
            inten = 12.0 * np.sqrt(len(hkls)) * np.exp(0.6 * rng.standard_normal())
        lines.append((rep, float(inten)))
    return _Phase(name, sg, broad, lines)


def _voigt(x, t0, tth_deg, area, broad):
    th = np.radians(tth_deg / 2)
    u, v, w = _CAGLIOTI
    hg = np.sqrt(u * np.tan(th) ** 2 + v * np.tan(th) + w) * broad
    hl = (_LORENTZ[0] / np.cos(th) + _LORENTZ[1] * np.tan(th)) * broad
    return area * voigt_profile(x - t0, hg / 2.35482, hl / 2)


def _lp(tth_deg):
    th = np.radians(tth_deg / 2)
    return (1 + np.cos(2 * th) ** 2) / (np.sin(th) ** 2 * np.cos(th))


@dataclass
class ForeignSeries:
    """A simulated series: patterns ``intensity`` (n, N) with Poisson ``sigma`` on ``tth_deg``,
    the truth ``states`` per frame ({phase: (a, c, fraction)}), the experiment's ``typed``
    cells, its ``windows`` [(name, (lo, hi), peaks)], the wavelength and the zero shift."""

    tth_deg: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    states: list
    typed: dict
    windows: list
    wavelength_A: float
    zero_deg: float
    #: the lines of no phase: [(observed 2θ, with the zero shift), area, FWHM)]
    free_lines: tuple = ()

    def config(self):
        """``[[phases]]`` (typed cells, and Al) and ``[[windows]]`` as specs."""
        from xrdpipe.config import PhaseSpec, WindowSpec

        phases = [PhaseSpec(name=n, a=a, c=c) for n, (a, c) in self.typed.items()] + [PhaseSpec(name="Al")]
        return phases, [WindowSpec(name=n, range=list(r), peaks=list(p)) for n, r, p in self.windows]

    def patterns(self):
        from xrdpipe.run.store import Patterns

        n = self.intensity.shape[0]
        frames = {"status": np.ones(n, int), "message": np.array([""] * n, dtype=object),
                  "time_s": np.arange(n) * 20.0 + 10.0}
        return Patterns(self.tth_deg, "2th_deg", self.wavelength_A, self.intensity, self.sigma, frames)


#: The two studies: wavelength, basal l, the high and low phase (name, space group, cell the
#: reflections are listed at, size broadening), x from start to end, the two-phase region, each
#: phase's cell (a, da/dx, c, dc/dx going down in x from the start, resp. from where the low
#: phase appears), the typed (library) cells and the listed reflections.
_SCENARIOS = {
    "nfm": {"lam": 0.6209, "basal": 3, "hi": ("O3", "R-3m", 2.97, 16.1, 1.0), "lo": ("P3", "R3m", 2.92, 16.6, 1.4),
            "x": (0.95, 0.42), "coexistence": (0.62, 0.70), "hi_cell": (2.978, -0.10, 16.03, 0.55),
            "lo_cell": (2.918, -0.06, 16.55, 0.30), "typed": {"O3": (2.985, 16.00), "P3": (2.93, 16.70)},
            "listed": [(0, 0, 3), (1, 0, 4), (0, 1, 5), (1, 0, 7), (0, 1, 8)]},
    "mcm": {"lam": 0.6884, "basal": 2, "hi": ("P2", "P63/mmc", 2.87, 11.2, 1.0),
            "lo": ("P''2", "P63/mmc", 2.83, 11.4, 1.3), "x": (0.80, 0.30), "coexistence": (0.40, 0.46),
            "hi_cell": (2.874, -0.08, 11.14, 0.40), "lo_cell": (2.828, -0.02, 11.42, 0.15),
            "typed": {"P2": (2.85, 11.20), "P''2": (2.83, 11.35)},
            "listed": [(0, 0, 2), (0, 0, 4), (1, 0, 0), (1, 0, 2), (1, 0, 3)]},
}


def foreign_series(scenario: str, n: int = 40, seed: int = 1, counts: float = 0.2,
                   lines: tuple = (), typed_error: int | None = None) -> ForeignSeries:
    """O3 → P3 (``"nfm"``, λ = 0.6209 Å) or P2 → P''2 (``"mcm"``, λ = 0.6884 Å) on charge, ``n``
    frames; peaks of the strongest line ~5e5 counts over a background of ~2000 at ``counts=0.2``.
    ``lines``: ((2θ, strength, broadening), ...) lines of no phase in every frame (strength on
    the phases' intensity scale, the basal line's being 100; broadening of the Caglioti width).
    ``typed_error``: the seed of a draw of the typed cells (:func:`typed_cells`) instead of the
    study's library cells; the windows are then drawn around the lines the data show."""
    study = _Study(scenario, n, seed, counts, lines, typed_error)
    return _sampled(study, list(range(n)))


def _sampled(study: "_Study", order: list) -> ForeignSeries:
    """The study's frames ``order`` (indices into its states), each with Poisson noise of its own."""
    tth = np.arange(3.0, _TMAX, 0.004)
    intensity = np.array([study.rng.poisson(study.mean(i, tth)).astype(float) for i in order])
    return ForeignSeries(tth, intensity, np.sqrt(np.maximum(intensity, 1.0)), [study.states[i] for i in order],
                         study.typed, study.windows(), study.lam, ZERO_DEG, study.free_truth())


_TMAX = 24.0


def foreign_cycle(scenario: str, n: int = 24, seed: int = 1, counts: float = 0.2,
                  typed_error: int | None = None) -> ForeignSeries:
    """A charge then a discharge: the ``n`` frames of :func:`foreign_series`, then the same
    states back in reverse order with noise of their own (``2n`` frames): the phase that left on
    the charge comes back where it left, with its own intensities and cells."""
    return _sampled(_Study(scenario, n, seed, counts, (), typed_error), list(range(n)) + list(range(n - 1, -1, -1)))


def typed_cells(first: dict, seed: int) -> dict:
    """Cells a user types, drawn for each phase of ``first`` ({name: (a, c)}, where each phase
    first appears): a off by 0.3-1 % and c by 0.5-2 %, each sign drawn (the phase-model issue's
    start cells), rounded as a user types them (4 decimals in a, 3 in c)."""
    rng = np.random.default_rng([seed, sum(map(ord, "".join(first)))])
    out = {}
    for name, (a, c) in first.items():
        ea, ec = rng.uniform(0.003, 0.01), rng.uniform(0.005, 0.02)
        sa, sc = rng.choice([-1.0, 1.0], size=2)
        out[name] = (round(float(a * (1 + sa * ea)), 4), round(float(c * (1 + sc * ec)), 3))
    return out


class _Study:
    """One simulated charge: its two phases (intensities drawn once), its frames' truth
    (``states``) and each frame's noise-free pattern (:meth:`mean`, counts per 0.004°)."""

    def __init__(self, scenario: str, n: int, seed: int, counts: float, lines: tuple = (),
                 typed_error: int | None = None):
        if scenario not in _SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(map(repr, _SCENARIOS))}")
        sc = self.sc = _SCENARIOS[scenario]
        self.rng = np.random.default_rng(seed)
        self.lam, self.basal, self.typed, self.listed = sc["lam"], sc["basal"], sc["typed"], sc["listed"]
        self.hi, self.lo = (_phase(*sc[k][:4], self.basal, sc[k][4], self.lam, _TMAX + 1, self.rng)
                            for k in ("hi", "lo"))
        xs, (x1, x2) = np.linspace(*sc["x"], n), sc["coexistence"]
        self.scale = 2.0e3 * counts
        self.counts = counts
        self.lines = tuple(lines)
        self.states = []
        for x in xs:
            f_hi = 1.0 if x >= x2 else 0.0 if x <= x1 else (x - x1) / (x2 - x1)
            st = {}
            if f_hi > 0:
                a0, da, c0, dc = sc["hi_cell"]
                st[self.hi.name] = (a0 + da * (sc["x"][0] - max(x, x2)), c0 + dc * (sc["x"][0] - max(x, x2)), f_hi)
            if f_hi < 1:
                a0, da, c0, dc = sc["lo_cell"]
                st[self.lo.name] = (a0 + da * (x1 - min(x, x1)), c0 + dc * (x1 - min(x, x1)), 1 - f_hi)
            self.states.append(st)
        # where the windows are drawn: around the typed lines (library cells near the truth), or,
        # with typed cells drawn far off, around the lines the data show, over the whole run
        # (each phase's cells where it appears and where the run ends)
        self.drawn_at = {name: [cell] for name, cell in self.typed.items()}
        if typed_error is not None:
            seen = {ph.name: [st[ph.name][:2] for st in self.states if ph.name in st] for ph in (self.hi, self.lo)}
            self.drawn_at = {name: [cells[0], cells[-1]] for name, cells in seen.items()}
            self.typed = typed_cells({name: cells[0] for name, cells in seen.items()}, typed_error)

    def mean(self, i: int, tth: np.ndarray) -> np.ndarray:
        """Frame ``i``'s pattern without noise at ``tth`` (degrees), counts per 0.004°."""
        lam, st = self.lam, self.states[i]
        both = len(st) == 2
        y = np.zeros_like(tth)
        for ph in (self.hi, self.lo):
            if ph.name not in st:
                continue
            a, c, f = st[ph.name]
            for hkl, inten in ph.lines:
                s = lam * np.sqrt(_inv_d2(a, c, hkl)) / 2
                if s >= 1:
                    continue
                t0 = 2 * np.degrees(np.arcsin(s)) + ZERO_DEG
                area = self.scale * f * inten * _lp(t0) * np.exp(-1.6 * (s / lam) ** 2) * 1e-3
                y += _voigt(tth, t0, t0, area, ph.broad * (1.5 if both else 1.0))
        for hkl, inten in _AL_LINES.items():
            t0 = 2 * np.degrees(np.arcsin(lam * np.sqrt(sum(v * v for v in hkl)) / (2 * AL_A))) + ZERO_DEG
            y += _voigt(tth, t0, t0, self.scale * 0.25 * inten * _lp(t0) * 1e-3, 0.8)
        for t0, area, broad in self._free():
            y += _voigt(tth, t0, t0, area, broad)
        return y + self.background(i, tth)

    def _free(self):
        """The lines of no phase: (observed 2θ, area, broadening)."""
        return [(t + ZERO_DEG, self.scale * strength * _lp(t + ZERO_DEG) * 1e-3, broad)
                for t, strength, broad in self.lines]

    def free_truth(self) -> tuple:
        """((observed 2θ, area, FWHM), ...) of the lines of no phase (the Voigt's FWHM, Olivero's
        approximation)."""
        out = []
        for t0, area, broad in self._free():
            th = np.radians(t0 / 2)
            u, v, w = _CAGLIOTI
            fg = np.sqrt(u * np.tan(th) ** 2 + v * np.tan(th) + w) * broad
            fl = (_LORENTZ[0] / np.cos(th) + _LORENTZ[1] * np.tan(th)) * broad
            out.append((t0, area, 0.5346 * fl + np.sqrt(0.2166 * fl ** 2 + fg ** 2)))
        return tuple(out)

    def background(self, i: int, tth):
        """Frame ``i``'s background: a decay toward low angle and an amorphous hump at 9°."""
        counts = self.counts
        return 1500 * counts * (1 + 0.8 * np.exp(-(tth - 3) / 3.0)) \
            + 900 * counts * np.exp(-0.5 * ((tth - 9.0) / 2.2) ** 2) * (1 + 0.05 * np.sin(i / 7))

    def windows(self) -> list:
        """The ``[[windows]]`` a user draws: ±0.35° around both phases' typed lines, widened to
        an Al line within 0.1° of them."""
        lam, typed = self.lam, self.drawn_at
        windows = []
        for hkl in self.listed:
            label = "".join(str(v) for v in hkl)
            at = [2 * np.degrees(np.arcsin(lam * np.sqrt(_inv_d2(*cell, hkl)) / 2))
                  for p in (self.hi, self.lo) for cell in typed[p.name]]
            lo_edge, hi_edge = min(at) - 0.35, max(at) + 0.35
            peaks = [f"{self.hi.name} {label}", f"{self.lo.name} {label}"]
            for al in ((1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)):
                t_al = 2 * np.degrees(np.arcsin(lam * np.sqrt(sum(v * v for v in al)) / (2 * AL_A)))
                if lo_edge - 0.1 < t_al < hi_edge + 0.1:
                    peaks.append("Al " + "".join(map(str, al)))
                    lo_edge, hi_edge = min(lo_edge, t_al - 0.3), max(hi_edge, t_al + 0.3)
            windows.append((label, (round(lo_edge, 2), round(hi_edge, 2)), peaks))
        return windows


class _OnGrid:
    """Points ``x`` on a uniform grid (``start``, ``step``): the cubic Hermite interpolation of a
    function from its values and derivatives there, and the linear one of a function's values,
    the weights worked out once for every frame."""

    def __init__(self, x: np.ndarray, start: float, step: float):
        u = (np.asarray(x, float) - start) / step
        self.i = np.floor(u).astype(np.int64)
        t = u - self.i
        self.t, self.step = t, step
        self.h = (2 * t**3 - 3 * t**2 + 1, (t**3 - 2 * t**2 + t) * step, -2 * t**3 + 3 * t**2, (t**3 - t**2) * step)

    def hermite(self, values: np.ndarray, slopes: np.ndarray) -> np.ndarray:
        i, (h00, h10, h01, h11) = self.i, self.h
        return h00 * values[i] + h10 * slopes[i] + h01 * values[i + 1] + h11 * slopes[i + 1]

    def linear(self, values: np.ndarray) -> np.ndarray:
        return (1 - self.t) * values[self.i] + self.t * values[self.i + 1]


@dataclass
class ForeignExperiment:
    """A simulated series written as 2D frames with its experiment file (:func:`foreign_experiment`):
    the truth ``states`` per frame, the ``typed`` cells, the wavelength and the zero shift."""

    experiment_file: Path
    states: list
    typed: dict
    wavelength_A: float
    zero_deg: float


#: The strip detector of :func:`foreign_experiment`: rows, columns, pixel (m), distance (m),
#: beam position from the detector's corner (m: 12 mm below and 12 mm to the left of it), tilts
#: (rad). The rings cross the strip obliquely, so the pixels that share a bin sit at every
#: phase of the pixel grid. With the beam level with the strip (poni1 = 6 mm) the rings run
#: along its columns and every bin sees the same few pixel phases: the lines' centres then move
#: with the grid as the cells change (the run's zero estimated frame by frame drifted by 2e-4°
#: over 16 frames, 20 of a frame's esds), what no bin model built from two moments can follow.
_STRIP = {"shape": (160, 1300), "pixel": 75e-6, "dist": 0.250, "poni1": -0.012, "poni2": -0.012,
          "rot1": 0.012, "rot2": -0.006}


def foreign_experiment(folder, scenario: str, n: int = 40, seed: int = 1, counts: float = 0.2,
                       background_per_pixel: float = 60.0) -> ForeignExperiment:
    """The series of :func:`foreign_series` (the same phases, cells and fractions per frame) as
    2D frames on a strip detector written here, with its experiment file, in ``folder``.

    Unlike ``xrdpipe.testing``'s frames (512 x 512 pixels of 0.033°, 4 x 4 sub-pixels each):
    a 160 x 1300 strip of 75 µm pixels 250 mm away (0.017° a pixel), tilted, the beam off its
    corner (:data:`_STRIP`), 2θ 4-24°, binned at 0.014° (1400 bins). Each pixel records the pattern averaged over its area exactly for a 2θ that
    varies linearly across it: over the sum of two boxes, the pixel's 2θ extents along its rows
    and columns (from the second antiderivative of the pattern on a 0.001° grid), times the
    polarization (0.99) and solid angle of pyFAI, scaled to ``background_per_pixel`` counts of
    background where 2θ is 10°; Poisson counts; module gaps (a 10-row band and a 10-column band
    away from the windows) and 0.1 % dead pixels masked. TIFF frames, 20 s apart."""
    import fabio
    import pyFAI
    from pyFAI.detectors import Detector

    folder = Path(folder)
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    study = _Study(scenario, n, seed, counts)
    g = _STRIP
    shape = g["shape"]
    det = Detector(pixel1=g["pixel"], pixel2=g["pixel"], max_shape=shape)
    ai = pyFAI.load({"detector": det, "dist": g["dist"], "poni1": g["poni1"], "poni2": g["poni2"], "rot1": g["rot1"],
                     "rot2": g["rot2"], "rot3": 0.0, "wavelength": study.lam * 1e-10})
    ai.write(str(folder / "strip.poni"))
    mask = np.zeros(shape, bool)
    mask[75:85, :] = True
    mask[:, 330:340] = True
    mask |= np.random.default_rng(seed + 1000).random(shape) < 1e-3
    fabio.edfimage.EdfImage(data=mask.astype(np.int8)).write(str(folder / "mask.edf"))
    tth = ai.center_array(shape, unit="2th_deg")
    along_rows, along_cols = np.gradient(tth)
    wide, narrow = np.maximum(np.abs(along_rows), np.abs(along_cols)), np.minimum(np.abs(along_rows), np.abs(along_cols))
    box = narrow > 0.02 * wide           # (else one box: the other's share is below 1e-4)
    weight = ai.polarization(shape, 0.99) * ai.solidAngleArray(shape)
    grid = np.arange(np.floor(tth.min()) - 0.5, np.ceil(tth.max()) + 0.5, 0.001)
    scale = background_per_pixel / float(study.background(0, 10.0)) / float(np.median(weight))
    s, d = (wide + narrow) / 2, (wide - narrow) / 2
    at = {name: _OnGrid(x, grid[0], 0.001) for name, x in
          (("+s", tth + s), ("+d", tth + d), ("-d", tth - d), ("-s", tth - s), ("+w", tth + wide / 2), ("-w", tth - wide / 2))}
    for i in range(n):
        f = study.mean(i, grid)
        f1 = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2) * 0.001])
        f2 = np.concatenate([[0.0], np.cumsum((f1[1:] + f1[:-1]) / 2) * 0.001])
        two = (at["+s"].hermite(f2, f1) - at["+d"].hermite(f2, f1) - at["-d"].hermite(f2, f1)
               + at["-s"].hermite(f2, f1)) / np.where(box, wide * narrow, 1.0)
        one = (at["+w"].linear(f1) - at["-w"].linear(f1)) / wide
        mean = np.where(box, two, one) * weight * scale
        image = study.rng.poisson(np.maximum(mean, 0.0)).astype(np.int32)
        image[mask] = 0
        fabio.tifimage.TifImage(data=image).write(str(folder / "raw" / f"frame_{i:04d}.tif"))
    lines = ["schema_version = 1", "", "[run]", f'name = "foreign-{scenario}"', 'output = "results"', "",
             "[frames]", 'files = "raw/*.tif"',
             'times = { start = "2026-01-01T00:00:00+00:00", period_s = 20.0, exposure_s = 20.0 }', "",
             "[calibration]", 'poni = "strip.poni"', 'mask = "mask.edf"', "",
             "[integration]", "npt = 1400", 'unit = "2th_deg"', "polarization_factor = 0.99",
             'error_model = "poisson"', 'splitting = "full"', ""]
    for name, (a, c) in study.typed.items():
        lines += ["[[phases]]", f'name = "{name}"', f"a = {a}", f"c = {c}", ""]
    lines += ["[[phases]]", 'name = "Al"', ""]
    for name, (lo, hi), peaks in study.windows():
        lines += ["[[windows]]", f'name = "{name}"', f"range = [{lo}, {hi}]",
                  "peaks = [" + ", ".join('"' + p.replace('"', '\\"') + '"' for p in peaks) + "]", ""]
    exp_file = folder / "experiment.toml"
    exp_file.write_text("\n".join(lines))
    return ForeignExperiment(exp_file, study.states, study.typed, study.lam, ZERO_DEG)


def voigt_frame(tth: np.ndarray, lines, rng: np.random.Generator) -> np.ndarray:
    """One frame of counts at ``tth`` (degrees) of the ``lines`` ((2θ in degrees, area) pairs)
    as Voigt profiles, mostly Gaussian as a synchrotron's instrument makes them (Gaussian FWHM
    0.075-0.09° from Caglioti terms, Lorentzian 0.012-0.02°: a pseudo-Voigt fit wants η ≈ 0.1),
    over a decaying background with a broad amorphous hump at 9°, Poisson noise."""
    y = 500.0 * (1 + 0.8 * np.exp(-tth / 6)) + 300.0 * np.exp(-0.5 * ((tth - 9.0) / 2.5) ** 2)
    for t0, area in lines:
        th = np.radians(t0 / 2)
        hg = np.sqrt(0.004 - 0.0006 * np.tan(th) + 0.0012 * np.tan(th) ** 2 + 0.0015)
        hl = 0.012 / np.cos(th) + 0.01 * np.tan(th)
        y = y + area * voigt_profile(tth - t0, hg / 2.35482, hl / 2)
    return rng.poisson(y).astype(float)


def score(series: ForeignSeries, lat, threshold: float = 0.05, major: float = 0.3) -> dict:
    """Presence right (a phase counts as present from ``threshold`` of fraction), median |Δa|,
    |Δc| where a phase holds ``major``, the coexistence fraction MAE and the share of cell errors
    within one esd, computed here from the truth (not with ``xrdpipe.testing.score_phases``)."""
    names = list(series.typed)
    right = total = 0
    da, dc, z, fe = [], [], [], []
    for r, frame in enumerate(np.asarray(lat.frame)):
        st = series.states[frame]
        for name in names:
            i = lat.phases.index(name)
            a, c, f = st.get(name, (np.nan, np.nan, 0.0))
            # (a phase with a cell parameter held, not refined, is still reported present)
            found = bool(np.isfinite(lat.values["c_A"][r, i]) or np.isfinite(lat.values["a_A"][r, i]))
            if 0 < f < threshold:
                continue
            total += 1
            right += found == (f >= threshold)
            if found and f >= major:
                da.append(lat.values["a_A"][r, i] - a)
                dc.append(lat.values["c_A"][r, i] - c)
                z += [abs(da[-1]) / lat.values["a_err_A"][r, i], abs(dc[-1]) / lat.values["c_err_A"][r, i]]
        if len(st) == 2:
            fe += [abs(lat.values["fraction"][r, lat.phases.index(nm)] - st[nm][2]) for nm in names]
    z = np.asarray(z, float)
    # (a cell parameter held is no error measured: left out of the medians, counted)
    return {"presence": right / max(total, 1), "median_da": float(np.nanmedian(np.abs(da))),
            "median_dc": float(np.nanmedian(np.abs(dc))),
            "n_held": int(np.sum(~np.isfinite(np.asarray(da, float))) + np.sum(~np.isfinite(np.asarray(dc, float)))),
            "fraction_mae": float(np.mean(fe)),
            "n_coexistence": len(fe) // 2, "within_1esd": float(np.mean(z[np.isfinite(z)] < 1))}
