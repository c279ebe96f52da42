"""What the per-frame fits need: ``[[phases]]``, ``[[windows]]``, ``[fit]`` and ``[lattice]``.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .base import Spec, did_you_mean

#: How far (±) the phase model's search looks for a phase's cell around the typed one where its
#: ``search`` does not say: lengths relative, angles in degrees.
DEFAULT_SEARCH = {"a": 0.015, "b": 0.015, "c": 0.03, "alpha": 2.0, "beta": 2.0, "gamma": 2.0}


class PhaseSpec(Spec):
    """``[[phases]]``: a phase to follow, with its cell (Å, degrees) as the starting point.

    A name from the library (P2, P''2, O3, P3, O2, OP4, P'2, O'3, Al) fills every key not
    given: ``name = "O3"`` alone is a whole phase. Any space group gemmi knows is accepted; give
    the cell parameters its crystal system has: ``a`` (cubic), ``a`` and ``c`` (tetragonal,
    hexagonal and trigonal in hexagonal axes), ``a``, ``b``, ``c`` (orthorhombic), also ``beta``
    (monoclinic, unique axis b), all six (triclinic). ``z_o`` (oxygen z) enables the layer
    geometry of O3/P3/P2. ``kind`` names the structure type of a phase with another name
    (``kind = "P2"``). ``search`` is how far (±) the phase-model fit looks for the
    phase's cell around the configured one before calling it absent: ``{ a = 0.015, c = 0.03 }``
    by default (b as a, angles ±2°; the library's Al: ``{ a = 0.003 }``); lengths relative (at
    most 0.2), angles in degrees (at most 10). ``fraction = false``
    keeps a phase out of the phase fractions (the library's Al current collector, an internal
    standard).
    """

    name: str = Field(min_length=1)
    space_group: str
    a: float = Field(gt=0, lt=100)
    c: float | None = Field(default=None, gt=0, lt=200)
    b: float | None = Field(default=None, gt=0, lt=100)
    beta: float | None = Field(default=None, gt=60, lt=150)
    alpha: float | None = Field(default=None, gt=30, lt=150)
    gamma: float | None = Field(default=None, gt=30, lt=150)
    z_o: float | None = Field(default=None, gt=-1, lt=1)
    kind: str | None = None
    fraction: bool = True
    search: dict[Literal["a", "b", "c", "alpha", "beta", "gamma"], Annotated[float, Field(ge=0)]] = {}

    @model_validator(mode="before")
    @classmethod
    def _library(cls, data: Any) -> Any:
        from ..phases import LIBRARY

        if isinstance(data, dict):
            lib = LIBRARY.get(str(data.get("kind") or data.get("name", "")))
            if lib is not None:
                defaults = {"space_group": lib.space_group, "a": lib.a, "c": lib.c, "b": lib.b, "beta": lib.beta,
                            "z_o": lib.z_o, "fraction": lib.fraction, "search": dict(lib.search) or None}
                data = {**{k: v for k, v in defaults.items() if v is not None}, **data}
        return data

    @field_validator("space_group")
    @classmethod
    def _sg(cls, v: str) -> str:
        from ..crystallography import SPACE_GROUPS, crystal_system

        try:
            crystal_system(v)
        except ValueError:
            hint = did_you_mean(v, list(SPACE_GROUPS) + ["Fm-3m", "Fd-3m", "Pnma", "Pm-3m", "P-3m1"], 0.5)
            raise ValueError(f"unknown space group {v!r}{hint} (a Hermann-Mauguin symbol gemmi knows, such as "
                             f"'R-3m', 'P63/mmc', 'Fm-3m', 'Pnma' or 'C2/m')") from None
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: dict) -> dict:
        # lengths relative (at most ±20 %), angles in degrees (at most ±10°)
        for key, value in v.items():
            top, unit = (10.0, "degrees") if key in ("alpha", "beta", "gamma") else (0.2, "relative")
            if value > top:
                raise ValueError(f"search.{key} = {value:g}: at most {top:g} ({unit}: "
                                 f"{'±' + format(top, 'g') + '°' if unit == 'degrees' else '±20 %'} around the typed cell)")
        return v

    @model_validator(mode="after")
    def _cell(self) -> "PhaseSpec":
        from ..crystallography import CELL_PARAMETERS, crystal_system

        system = crystal_system(self.space_group)
        units = {"a": "Å", "b": "Å", "c": "Å", "alpha": "degrees", "beta": "degrees", "gamma": "degrees"}
        missing = [f"{k} ({units[k]})" for k in CELL_PARAMETERS[system] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"{self.space_group} is {system}: give {', '.join(missing)}")
        if system == "triclinic":
            cos = [math.cos(math.radians(v)) for v in (self.alpha, self.beta, self.gamma)]
            omega2 = 1 - sum(c * c for c in cos) + 2 * cos[0] * cos[1] * cos[2]     # (V / abc)²
            if omega2 <= 1e-6:
                raise ValueError(
                    f"phase {self.name!r}: alpha = {self.alpha:g}°, beta = {self.beta:g}°, gamma = {self.gamma:g}° "
                    f"make no cell (each angle must be less than the sum of the other two and the three "
                    f"must add up to less than 360°; 1 - cos²α - cos²β - cos²γ + 2 cosα cosβ cosγ = {omega2:.3g})")
            # ... nor may the phase-model search around them reach such angles
            angles = (self.alpha, self.beta, self.gamma)

            def flat_corner(spans) -> list | None:
                for signs in product((-1, 1), repeat=3):
                    corner = [v + sg * d for v, sg, d in zip(angles, signs, spans)]
                    c = [math.cos(math.radians(v)) for v in corner]
                    if 1 - sum(x * x for x in c) + 2 * c[0] * c[1] * c[2] <= 1e-6:
                        return corner
                return None

            spans = [self.search.get(k, DEFAULT_SEARCH[k]) for k in ("alpha", "beta", "gamma")]
            corner = flat_corner(spans)
            if corner is not None:
                lo, hi = 0.0, max(spans)          # the widest equal search that keeps a cell
                for _ in range(30):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if flat_corner([mid] * 3) is None else (lo, mid)
                ok = math.floor(lo * 0.9 * 100) / 100
                raise ValueError(
                    f"phase {self.name!r}: the search of its angles (±{spans[0]:g}°, ±{spans[1]:g}°, ±{spans[2]:g}° "
                    f"around alpha = {self.alpha:g}°, beta = {self.beta:g}°, gamma = {self.gamma:g}°) reaches "
                    f"{corner[0]:g}°, {corner[1]:g}°, {corner[2]:g}°, which make no cell: give a narrower one, "
                    + (f"e.g. search = {{ alpha = {ok:g}, beta = {ok:g}, gamma = {ok:g} }}" if ok > 0 else
                       "or angles farther from a flat cell"))
        return self

    @property
    def structure_kind(self) -> str:
        """The structure type for the layer geometry (``kind``, else the name)."""
        return self.kind or self.name

    @property
    def crystal_system(self) -> str:
        from ..crystallography import crystal_system

        return crystal_system(self.space_group)

    @property
    def cell_parameters(self) -> tuple[str, ...]:
        """The cell parameters this phase's crystal system leaves free, e.g. ``("a", "c")``."""
        from ..crystallography import CELL_PARAMETERS

        return CELL_PARAMETERS[self.crystal_system]

    @property
    def cell(self) -> tuple[float, float, float, float, float, float]:
        """All six cell parameters (a, b, c, α, β, γ) implied by the given ones."""
        from ..crystallography import full_cell

        return full_cell(self.space_group, self.a, self.c, self.b, self.beta, self.alpha, self.gamma)

    def d_spacing(self, h, k, l):
        from ..crystallography import d_spacing

        return d_spacing(self.space_group, h, k, l, self.a, self.c, self.b, self.beta, self.alpha, self.gamma)


PROFILE_NAMES = ("pseudo_voigt", "pearson7", "split_pseudo_voigt")


#: How far a line of no phase (``[[windows]] free_peaks``) is searched for (phase model) or may
#: move (independent peaks) from its configured centre, as a share of its window's width (the
#: phase model's least squares then keep it within its cell's own bounds, which are wider).
FREE_PEAK_REACH = 0.1


class PolynomialBackground(Spec):
    """``background = { polynomial = 2 }``."""

    polynomial: int = Field(ge=0, le=4)


class WindowSpec(Spec):
    """``[[windows]]``: a radial range fitted with one peak per listed ``"phase hkl"``.

    ``range`` and every width or shift are in the run's radial unit (2θ degrees or 1/Å).
    """

    name: str = Field(min_length=1)
    range: tuple[float, float]
    peaks: list[str] = Field(min_length=1, max_length=8)
    profile: Literal["pseudo_voigt", "pearson7", "split_pseudo_voigt"] = "pseudo_voigt"
    background: Annotated[
        Union[Annotated[Literal["constant", "linear", "quadratic"], Tag("str")],
              Annotated[PolynomialBackground, Tag("poly")]],
        Discriminator(
            lambda v: "str" if isinstance(v, str) else ("poly" if isinstance(v, (dict, PolynomialBackground)) else None),
            custom_error_type="background_kind",
            custom_error_message='expected "constant", "linear", "quadratic" or { polynomial = 0 to 4 }',
        ),
    ] = "linear"
    seed: Literal["previous", "config"] = "previous"
    share: list[Literal["fwhm", "shape"]] = []
    fwhm: float | None = Field(default=None, gt=0)
    fwhm_range: tuple[float, float] | None = None
    max_shift: float | None = Field(default=None, gt=0)
    center_bounds: dict[str, tuple[float, float]] = {}
    presence: Literal["bic", "ftest", "always"] | None = None
    #: lines of no phase (an impurity's, a cell component's, an unknown one): their centres, in
    #: the run's radial unit; fitted as independent lines beside the phases' (each within
    #: :data:`FREE_PEAK_REACH` of the window's width of its centre)
    free_peaks: list[float] = Field(default=[], max_length=4)

    @field_validator("range", "fwhm_range")
    @classmethod
    def _increasing(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
        return v

    @field_validator("peaks")
    @classmethod
    def _peaks(cls, v: list[str]) -> list[str]:
        from ..crystallography import parse_hkl

        out = []
        for item in v:
            phase, _, hkl = item.strip().partition(" ")
            if not hkl.strip():
                raise ValueError(f'expected "phase hkl" such as "O3 003", got {item!r}')
            try:
                h, k, l = parse_hkl(hkl)
            except ValueError as exc:
                raise ValueError(f"{item!r}: {exc}") from None
            out.append(f"{phase} {hkl.strip()}")
        if len(set(out)) != len(out):
            raise ValueError(f"a peak is listed twice in {v}")
        return out

    @field_validator("free_peaks")
    @classmethod
    def _free_inside(cls, v: list[float], info) -> list[float]:
        lo, hi = info.data.get("range", (-math.inf, math.inf))
        for c in v:
            if not lo < c < hi:
                raise ValueError(f"a free peak's centre must lie inside the window's range {[lo, hi]}, got {c:g}")
        if len(set(v)) != len(v):
            raise ValueError(f"a free peak is listed twice in {v}")
        # each is named by its centre to 6 figures (peaks.csv's hkl, the run file's phase)
        names = [f"{c:g}" for c in v]
        if len(set(names)) != len(names):
            raise ValueError(f"free peaks closer than 6 significant figures in {v}: each is named by its centre "
                             f"({', '.join(names)}); give them as one, or further apart")
        return [float(c) for c in v]

    @property
    def background_degree(self) -> int:
        if isinstance(self.background, PolynomialBackground):
            return self.background.polynomial
        return {"constant": 0, "linear": 1, "quadratic": 2}[self.background]

    def key(self) -> dict:
        """The window as the run's fingerprints hold it: ``free_peaks`` only where given, so that
        runs made before the key existed keep their fingerprints."""
        return self.model_dump(mode="json", exclude=set() if self.free_peaks else {"free_peaks"})

    def split_peak(self, label: str) -> tuple[str, tuple[int, int, int]]:
        """``"O3 003"`` -> ``("O3", (0, 0, 3))``."""
        from ..crystallography import parse_hkl

        phase, _, hkl = label.partition(" ")
        return phase, parse_hkl(hkl)


#: [fit] keys added after runs existed, with their defaults (:meth:`FitSpec.key`)
_ADDED_LATER = {"instrument": "auto", "instrument_sd": None, "naming": "series"}


class FitSpec(Spec):
    """``[fit]``: how every window is fitted in every frame.

    ``model = "phases"`` (default) fits every window of a frame at once with each peak's centre
    computed from its phase's cell (:mod:`xrdpipe.phasefit`: every allowed reflection of every
    phase in the windows, phases found by a search over their cell, cells with esds straight
    from the fit); ``"peaks"`` fits each listed peak as an independent profile, window by window
    (:mod:`xrdpipe.peaks`), and the lattice stage refines the cells from the fitted centres.
    For the independent peaks, ``engine = "batched"`` fits a block of frames at once (vectorised
    Levenberg-Marquardt with analytic derivatives); ``"lmfit"`` fits frame by frame with lmfit,
    the reference.
    ``presence`` decides whether each component is there: ``"bic"`` keeps it when removing it
    raises the Bayesian information criterion by more than ``bic_threshold``; ``"ftest"`` when
    the F-test rejects its absence at ``ftest_alpha``; ``"always"`` never removes one. Beside
    other components, one with less than ``min_fraction`` of the window's peak area is absent
    (in the phase model: of the area of the windows its lines reach, except for a phase with
    ``fraction = false``, the current collector, whose presence the BIC alone decides),
    and so is any whose centre ends on the edge of its allowed range. ``esd_scale = "auto"``
    scales the esds by the reduced chi-square only when the data carry no errors (the phase
    model: each window's share of the information by its own reduced chi-square where that
    exceeds 1, a misfit the model cannot remove; without data errors, the covariance from the
    residuals point by point, HC1); ``"redchi"`` always scales by the reduced chi-square of the
    whole fit (as lmfit does by default), for data whose errors understate the misfit. The phase model
    uses ``presence`` "bic" (the F-test and "always" apply to independent peaks only).
    ``backward = true`` (default; the phase model) goes back over the frames before each frame
    where a phase that appeared holds ``backward_share`` of the area, following the phases from
    there, and keeps in every frame the solution with the lower BIC.
    ``instrument = "auto"`` (default; the phase model) averages each line over the radial spread
    that an integrated bin averages over (its pixels' area, their splitting and the bin, recorded
    by the integration as ``instrument_sd``), so that strong lines of 2D frames are not misfit
    by their own blur; patterns without that record (imported 1D patterns) are point samples.
    ``instrument_sd`` (radial unit) gives a constant one instead of the record (e.g. for imported
    patterns of a known detector). ``"none"`` point samples always (the line's FWHM then includes
    the instrument's blur).
    ``naming = "series"`` (default; the phase model): where the first lines of two similar phases
    (P2 and P''2, O3 and P3) are named by the nearer typed cell, the series is fitted again with
    the other name, and the run kept that fits the whole series better (summed n ln χ², by a
    margin), else whose names do not jump between the phases' lines, else that puts both phases
    nearer their typed cells (:func:`xrdpipe.phasefit.fitter.naming_verdict`); ``"frame"`` keeps
    the first frame's choice.
    ``workers`` (default: every core): threads. The batched independent
    peaks fit blocks of frames on them; the phase model's searches solve their windows on them
    side by side (the same numbers as on one thread; the frames themselves are fitted in order).
    With two or more (on Linux), the naming check's second run is fitted in a second process
    beside the first, from the frame the first names (the same numbers as fitted afterwards).
    """

    model: Literal["phases", "peaks"] = "phases"
    engine: Literal["batched", "lmfit"] = "batched"
    presence: Literal["bic", "ftest", "always"] = "bic"
    bic_threshold: float = Field(default=10.0, ge=0)
    ftest_alpha: float = Field(default=1e-3, gt=0, lt=1)
    min_fraction: float = Field(default=0.01, ge=0, lt=1)
    esd_scale: Literal["auto", "redchi"] = "auto"
    block_frames: int = Field(default=256, ge=1, le=100_000)
    workers: int | None = Field(default=None, ge=1, le=64)
    max_iter: int = Field(default=200, ge=5, le=10_000)
    backward: bool = True
    backward_share: float = Field(default=0.3, gt=0, le=1)
    instrument: Literal["auto", "none"] = "auto"
    instrument_sd: float | None = Field(default=None, ge=0)
    naming: Literal["series", "frame"] = "series"

    def key(self, exclude: set[str] = frozenset()) -> dict:
        """The settings as the keys of stages and run files see them: keys added after runs
        existed are left out while at their defaults, so a run made before them stays up to
        date (its fits are not redone for a key it could not have set)."""
        out = self.model_dump(mode="json", exclude=set(exclude))
        for name, default in _ADDED_LATER.items():
            if name in out and out[name] == default:
                del out[name]
        return out


class LatticeSpec(Spec):
    """``[lattice]``: how cells and phase fractions come from the fitted peaks.

    ``correction`` adds a 2θ zero shift (``"zero"``) or a sample-displacement term
    (``"displacement"``, ∝ cos θ) shared by the phases of a frame; ``"auto"`` (default): the
    phase model estimates one zero shift for the run (a cell in the PONI's calibration is never
    exactly the sample's position), independent peaks refine none (a free zero per frame trades
    off against c where two phases coexist); ``"none"``: no correction. Peak-area fractions come from
    the areas of corresponding peaks of coexisting phases, or, with ``fraction_window``, from that
    window's area of each phase against the whole window in ``reference_frame``. ``fractions``
    says which fraction the ``fraction`` column holds: ``"auto"`` (default) the Rietveld weight
    fractions of ``xrdpipe refine`` in the frames it refined, peak areas elsewhere;
    ``"refinement"`` weight fractions only; ``"peaks"`` peak areas only.
    """

    correction: Literal["auto", "none", "zero", "displacement"] = "auto"
    fractions: Literal["auto", "refinement", "peaks"] = "auto"
    fraction_window: str | None = None
    reference_frame: int = Field(default=0, ge=0)

    @property
    def phase_correction(self) -> str:
        """The correction of the phase model: ``"auto"`` is one zero shift for the run."""
        return "zero" if self.correction == "auto" else self.correction

    @property
    def peaks_correction(self) -> str:
        """The correction of the cells refined from independent peaks: ``"auto"`` is none."""
        return "none" if self.correction == "auto" else self.correction
