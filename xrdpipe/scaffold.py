"""``xrdpipe init``: an experiment file written from what a user has at the end of a beamtime.

:func:`scaffold` looks at the frames (or 1D patterns), the PONI (and mask), the cycler file and
the named phases and returns a :class:`Scaffold` of what it found; :func:`experiment_text` turns
that into a complete, commented experiment.toml (a pure function); :func:`init_experiment` does
both and writes the file.

What is found:

* **frames**: the format (HDF5/NeXus stacks and their dataset, CBF, EDF, TIFF; or 1D patterns),
  the number of frames, and where their times come from (the headers, when the first and the
  last frame's header give a time);
* **detector**: the 2θ (and Q) range the detector covers, from the PONI geometry and the
  detector's shape, masked pixels left out (0.5 and 99.5 percentiles of the pixels' 2θ);
* **windows**: around the strongest reflections of the named phases (library cells, intensities
  from the built-in structures of O3, P3, P2 and P''2, |F|² times multiplicity and Lorentz-
  polarisation; multiplicity and Lorentz-polarisation alone for the other library phases) that
  fall inside that range: the basal (00l) reflections first, then the strongest others; the
  same reflection of every phase in one window (coexisting phases are fitted together), wide
  enough for the cell to move by the phase model's search range;
* **electrochemistry**: the cycler format and columns (read with :func:`~xrdpipe.cyclers.read_cycler`),
  whether its times are absolute, relative (then ``start`` is asked for) or local (then
  ``timezone``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as _utc
from pathlib import Path
from typing import Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from natsort import natsorted

from .calibration import load_calibration
from .config import RADIAL_UNITS, PhaseSpec
from .config.base import did_you_mean
from .crystallography import d_spacing, q_from_tth, tth_from_d, tth_from_q
from .cyclers import detect_format, read_cycler
from .errors import (
    CalibrationError,
    ConfigError,
    CyclerReadError,
    FrameReadError,
    InitError,
    PatternReadError,
)
from .frames import frame_times, list_frames, read_frame
from .patterns import read_pattern
from .phasefit import DEFAULT_SEARCH
from .phases import LIBRARY
from .refine.structures import (
    Atom,
    Structure,
    reflections,
    space_group_ops,
    structure_factors_sq,
    template,
)

__all__ = ["InitError", "Scaffold", "scaffold", "experiment_text", "init_experiment"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nexus")
FRAME_SUFFIXES = HDF5_SUFFIXES + (".cbf", ".edf", ".tif", ".tiff")
PATTERN_SUFFIXES = (".xye", ".xy", ".chi", ".dat", ".fxye", ".gsa", ".gsas")
#: most windows written, most peaks listed in one window (WindowSpec allows 8)
MAX_WINDOWS = 6
MAX_PEAKS = 8


@dataclass(frozen=True)
class FoundFrames:
    kind: str                     # "frames" or "patterns"
    pattern: str                  # the glob written to the file (relative to the experiment file)
    files: int
    frames: int
    suffix: str
    dataset: str | None = None
    shape: tuple[int, int] | None = None
    times: str | None = None      # "header" or None
    first: datetime | None = None
    last: datetime | None = None
    note: str = ""
    radial: tuple[float, float] | None = None   # 1D patterns: their x range
    unit: str | None = None       # 1D patterns: the radial unit their header names (None: not named)
    times_reason: str = ""        # frames: why the headers give no times


@dataclass(frozen=True)
class FoundDetector:
    poni: str
    mask: str | None
    wavelength_A: float
    shape: tuple[int, int] | None
    tth: tuple[float, float]
    distance_mm: float
    npt: int


@dataclass(frozen=True)
class FoundCycler:
    file: str
    format: str
    columns: dict[str, str]
    rows: int
    first: datetime | None
    last: datetime | None
    needs: str | None             # None (readable as is), "start" or "timezone"
    timezone: str | None
    start: datetime | None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Window:
    name: str
    range: tuple[float, float]    # in the run's radial unit
    peaks: tuple[str, ...]


@dataclass(frozen=True)
class Scaffold:
    name: str
    frames: FoundFrames
    detector: FoundDetector
    phases: tuple[str, ...]
    windows: tuple[Window, ...]
    cycler: FoundCycler | None
    timezone: str | None = None
    notes: tuple[str, ...] = field(default=())
    #: the 2θ range the windows were chosen in (the detector's, or the 1D patterns')
    tth: tuple[float, float] = (0.0, 180.0)
    #: the radial unit of the windows (and of the integration or the 1D patterns)
    radial_unit: str = "2th_deg"
    #: where the unit comes from: "--radial-unit", "the header of <file>", or None (assumed)
    unit_source: str | None = None


# ---------------------------------------------------------------------------------------------
# discovery


def _rel(path: Path | str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return Path(os.path.relpath(p, base.resolve())).as_posix()
    except ValueError:          # another drive
        return p.as_posix()


def _rel_glob(spec: str, base: Path) -> str:
    """A glob relative to ``base``: its folder part made relative, its magic part kept."""
    head, tail = os.path.split(spec)
    return (_rel(head or ".", base) + "/" + tail) if not glob.has_magic(head) else Path(spec).as_posix()


def _matches(pattern: str, base: Path) -> set[Path]:
    """The files ``pattern`` matches from ``base`` (which need not exist yet)."""
    return {Path(p).resolve() for p in glob.glob(os.path.normpath(base.resolve() / pattern)) if Path(p).is_file()}


def _written_glob(spec: str, is_dir: bool, chosen: list[Path], stem: str, base: Path) -> str:
    """The glob written to the file (relative to ``base``): the first of the user's glob, the
    user's glob narrowed to ``stem`` + the chosen suffix (``*``, ``*_master``, ``*_data_*``), and
    the chosen files' folder with that, that matches exactly the chosen files."""
    want = {p.resolve() for p in chosen}
    ext = chosen[0].suffix
    tail = stem + ext
    cands = []
    if not is_dir:
        cands.append(_rel_glob(spec, base))
        head = spec[:-len(ext)] if spec.lower().endswith(ext.lower()) else spec
        if head.endswith("*"):
            cands.append(_rel_glob(head + tail[1:], base))
    folders = {p.parent for p in chosen}
    if len(folders) == 1:
        cands.append(_rel(folders.pop(), base) + "/" + tail)
    for cand in dict.fromkeys(cands):
        if _matches(cand, base) == want:
            return cand
    raise InitError(f"no glob found that matches only the {len(chosen)} {ext} file(s) of {spec!r} "
                    f"(tried {', '.join(map(repr, dict.fromkeys(cands)))}); give a glob of the frames alone, "
                    f"e.g. raw/{tail}")


def _pattern_unit(path: Path) -> str | None:
    """The radial unit a 1D pattern's header names (pyFAI and Dioptas write it in the header, e.g.
    the column line ``#  2th_deg  I  sigma``), the last one named; GSAS files are in 2θ."""
    if path.suffix.lower() in (".fxye", ".gsa", ".gsas"):
        return "2th_deg"
    head = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            s = line.strip()
            if i >= 500 or (s and s[0] not in "#!;%'\"" and re.match(r"[-+]?\.?\d", s)):
                break           # the first data row ends the header
            head.append(s)
    units = re.findall(r"(?<![\w^*])(2th_deg|2th_rad|q_nm\^-1|q_A\^-1|d\*2_A\^-2|d\*2_nm\^-2|r_mm)(?![\w^])",
                       "\n".join(head), flags=re.IGNORECASE)
    if not units:
        return None
    return {"2th_deg": "2th_deg", "q_a^-1": "q_A^-1"}.get(units[-1].lower(), units[-1])


def _header_times(good: list, timezone: str | None) -> tuple[str | None, datetime | None, datetime | None, str]:
    """("header", first start, last end, "") from the first and last frame's headers, or
    (None, None, None, why not). Header times without UTC offset (and no ``timezone``) come back
    naive: read on a placeholder zone, told by reading, not by the error's words."""
    try:
        ends = frame_times([good[0], good[-1]], "header", timezone=timezone)
    except ConfigError as exc:
        if timezone is not None:
            return None, None, None, "; ".join(m for _, m in exc.problems)
        try:       # naive header times? they read on a placeholder zone
            ends = frame_times([good[0], good[-1]], "header", timezone="UTC")
        except ConfigError as exc2:
            return None, None, None, "; ".join(m for _, m in exc2.problems)
        if ends[0] is None or ends[-1] is None:
            return None, None, None, "the first or the last frame's header gives no time"
        return "header", ends[0].start.replace(tzinfo=None), ends[-1].end.replace(tzinfo=None), ""
    if ends[0] is None or ends[-1] is None:
        return None, None, None, "the first or the last frame's header gives no time"
    return "header", ends[0].start, ends[-1].end, ""


def find_frames(spec: str, base: Path, *, timezone: str | None = None) -> FoundFrames:
    """The frames (or 1D patterns) of ``spec`` (a folder or a glob): their format, count and times.
    Only files of the known frame and pattern suffixes count; of the most common suffix, the EIGER
    ``*_master`` files alone when there are any (their data files are read through them)."""
    path = Path(spec)
    if path.is_dir():
        listed = [p for p in path.iterdir() if p.is_file()]
        where = f"folder {spec}"
    else:
        listed = [Path(p) for p in glob.glob(spec) if Path(p).is_file()]
        where = f"{spec!r}"
    files = [p for p in listed if p.suffix.lower() in FRAME_SUFFIXES + PATTERN_SUFFIXES]
    others = sorted({p.suffix or p.name for p in listed if p not in files})
    if not files:
        raise InitError(f"no frames matched {where}: expected HDF5/NeXus ({', '.join(HDF5_SUFFIXES)}), "
                        f"CBF, EDF or TIFF frames, or 1D patterns ({', '.join(PATTERN_SUFFIXES)})"
                        + (f"; found only {', '.join(others)} file(s)" if others else ""))
    by_suffix: dict[str, list[Path]] = {}
    for p in files:
        by_suffix.setdefault(p.suffix.lower(), []).append(p)
    suffix = max(by_suffix, key=lambda s: (len(by_suffix[s]), s in FRAME_SUFFIXES))
    group = by_suffix[suffix]
    notes = []
    stem = "*"
    chosen = natsorted(group, key=str)
    masters = [p for p in chosen if p.stem.endswith("_master")] if suffix in HDF5_SUFFIXES else []
    if masters and len(masters) < len(group):
        refs = list_frames(masters[:1])
        try:
            read_frame(refs[0])
            chosen, stem = masters, "*_master"
            notes.append(f"{len(group) - len(masters)} other {suffix} file(s) (EIGER data files) read through "
                         f"the {len(masters)} *_master{suffix} file(s)")
        except FrameReadError as exc:      # a master xrdpipe cannot read through: its data files
            chosen, stem = [p for p in chosen if re.search(r"_data_\d+$", p.stem)], "*_data_*"
            notes.append(f"the EIGER master files are not read ({exc.reason}): their {len(chosen)} data "
                         "file(s) are (CHECK the frame times)")
    pattern = _written_glob(spec, path.is_dir(), chosen, stem, base)
    skipped = len(listed) - len(group)
    if skipped:
        notes.append(f"{skipped} other file(s) left out ({', '.join(sorted(set(by_suffix) - {suffix}) + others)})")
    if suffix in PATTERN_SUFFIXES:
        try:
            x, _, _ = read_pattern(chosen[0])
        except PatternReadError as exc:
            raise InitError(str(exc)) from None
        return FoundFrames("patterns", pattern, len(chosen), len(chosen), suffix, note="; ".join(notes),
                           radial=(float(np.min(x)), float(np.max(x))), unit=_pattern_unit(chosen[0]))
    refs = list_frames(chosen)
    good = [r for r in refs if r.error is None]
    if not good:
        raise InitError(f"none of the {len(chosen)} {suffix} file(s) in {where} can be read: {refs[0].error}")
    shape = None
    try:
        shape = tuple(int(s) for s in np.shape(read_frame(good[0])))
    except FrameReadError as exc:        # a damaged first frame: the shape stays unknown, the run records it
        notes.append(f"the first frame cannot be read ({exc.reason})")
    times, first, last, why = _header_times(good, timezone)
    bad = len(refs) - len(good)
    if bad:
        notes.append(f"{bad} file(s) cannot be listed (recorded as failed frames)")
    dataset = good[0].dataset if suffix in HDF5_SUFFIXES else None
    return FoundFrames("frames", pattern, len(chosen), len(refs), suffix, dataset, shape, times, first, last,
                       "; ".join(notes), times_reason=why)


def find_wavelength(poni: Path, base: Path, radial_tth: tuple[float, float]) -> FoundDetector:
    """For 1D patterns: the wavelength of the PONI (the detector's shape is not needed)."""
    try:
        cal = load_calibration(poni)
    except CalibrationError as exc:
        raise InitError(str(exc)) from None
    return FoundDetector(_rel(poni, base), None, cal.wavelength_A, None, radial_tth, float(cal.geometry.dist) * 1e3, 0)


def find_detector(poni: Path, mask: Path | None, base: Path, frame_shape: tuple[int, int] | None,
                  frame_file: str = "the frames") -> FoundDetector:
    """The detector's covered 2θ range from the PONI geometry, its shape and the mask."""
    try:
        cal = load_calibration(poni, mask=mask)
    except CalibrationError as exc:
        raise InitError(str(exc)) from None
    if frame_shape is not None:
        if cal.mask is not None and cal.mask.shape != tuple(frame_shape):
            raise InitError(f"the mask {mask} is {cal.mask.shape[0]} x {cal.mask.shape[1]} pixels but the frames "
                            f"({frame_file}) are {frame_shape[0]} x {frame_shape[1]}")
        try:
            cal.check_shape(frame_shape, origin=f"the first frame of {frame_file}")
        except CalibrationError as exc:
            raise InitError(str(exc)) from None
    shape = cal.shape or frame_shape
    if shape is None:
        raise InitError(f"the PONI file {poni} does not give the detector's shape and no frame could be read "
                        "to tell it; give a mask (--mask) or a PONI with the detector's max_shape")
    tth = np.degrees(cal.geometry.center_array(shape, unit="2th_rad", scale=False))
    keep = np.isfinite(tth)
    if cal.mask is not None:
        if cal.mask.shape != tth.shape:
            raise InitError(f"the mask {mask} is {cal.mask.shape[0]} x {cal.mask.shape[1]} pixels but the detector "
                            f"is {tth.shape[0]} x {tth.shape[1]}")
        keep &= ~cal.mask
    if not keep.any():
        raise InitError(f"the mask {mask} masks every pixel of the detector")
    lo, hi = np.percentile(tth[keep], [0.5, 99.5])
    pixel = max(float(cal.geometry.detector.pixel1), float(cal.geometry.detector.pixel2))
    step = math.degrees(pixel / float(cal.geometry.dist))           # one pixel at the beam centre
    npt = int(min(20000, max(500, round(3 * (hi - lo) / step / 100) * 100)))
    return FoundDetector(_rel(poni, base), _rel(mask, base) if mask else None, cal.wavelength_A, shape,
                         (float(lo), float(hi)), float(cal.geometry.dist) * 1e3, npt)


#: the clock a cycler file is read on to tell its columns and rows when it needs a start
_PLACEHOLDER_START = datetime(2000, 1, 1, tzinfo=_utc.utc)


def find_cycler(path: Path, base: Path, *, timezone: str | None, start: datetime | None) -> FoundCycler:
    """The cycler file's format and columns, and what it needs to be on the absolute clock: told
    by reading it (as given; then with a placeholder zone, then with a placeholder start), not
    from the words of the reader's error."""
    if not path.is_file():
        raise InitError(f"no such cycler file: {path}")
    try:
        fmt = detect_format(path)
        rec = read_cycler(path, format=fmt, timezone=timezone, start=start)
        needs = None
    except CyclerReadError as exc:
        rec, needs = None, None
        tries = ([("timezone", "UTC", start)] if timezone is None else []) + \
                ([("start", timezone or "UTC", _PLACEHOLDER_START)] if start is None else [])
        for what, tz, st in tries:
            try:
                rec, needs = read_cycler(path, format=fmt, timezone=tz, start=st), what
                break
            except CyclerReadError:
                continue
        if rec is None:
            raise InitError(str(exc)) from None
    columns: dict[str, str] = {}
    if fmt == "csv":        # the columns the table reader chose (it tells them only in its note)
        table = next((n for n in rec.notes if n.startswith("table ")), "")
        columns = dict(re.findall(r"(time|datetime|voltage|current) = '([^']*)'", table))
    return FoundCycler(_rel(path, base), fmt, columns, len(rec), None if needs else rec.start,
                       None if needs else rec.end, needs, timezone, start, tuple(rec.notes))


# ---------------------------------------------------------------------------------------------
# windows from the phase library


def _phase_specs(names: Sequence[str]):
    specs = []
    for name in names:
        if name not in LIBRARY:
            hint = did_you_mean(name, LIBRARY, 0.5)
            raise InitError(f"unknown phase {name!r}{hint}; the library has {', '.join(LIBRARY)} "
                            "(write other phases into [[phases]] by hand: name, space_group, a, c)")
        specs.append(PhaseSpec(name=name))
    return specs


def _intensities(ph, wavelength_A: float, d_min: float):
    """(hkl (K,3), d (K,), relative intensity (K,)) of a library phase's reflections."""
    refl = reflections(ph.space_group, ph.cell, d_min)
    kind = {"P''2": "P2"}.get(ph.name, ph.name)
    if kind in ("O3", "P3", "P2"):
        st = template(kind, a=ph.a, c=ph.c, z_o=ph.z_o)
        fsq = structure_factors_sq(st, refl.hkl)
    elif ph.name == "Al":
        fsq = structure_factors_sq(Structure(ph.space_group, ph.cell, (Atom("Al", "Al", (0.0, 0.0, 0.0)),)), refl.hkl)
    else:
        fsq = np.ones(len(refl))
    theta = np.arcsin(np.clip(wavelength_A / (2 * refl.d), 0, 1))
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    inten = fsq * refl.multiplicity * lp
    return refl.hkl, refl.d, inten / inten.max() if inten.size else inten


def _nice_hkl(ph, hkl) -> tuple[int, int, int]:
    """The equivalent of (hkl) written most simply: no negative index where one exists, l >= 0."""
    rot = space_group_ops(ph.space_group).hkl_rot
    eq = np.rint(np.einsum("i,gij->gj", np.asarray(hkl, float), rot)).astype(int)
    eq = np.concatenate([eq, -eq])
    best = min(eq.tolist(), key=lambda v: (sum(x < 0 for x in v), v[2] < 0, [-x for x in v]))
    return tuple(int(x) for x in best)


def _label(ph_name: str, hkl) -> str:
    if all(0 <= x <= 9 for x in hkl):
        return f"{ph_name} {''.join(str(x) for x in hkl)}"
    return f"{ph_name} {' '.join(str(x) for x in hkl)}"


def _reflections_in_range(ph, wavelength_A: float, d_min: float, lo: float, hi: float) -> list[tuple]:
    """A phase's reflections as (hkl, 2θ, relative intensity, (2θ low, 2θ high)) whose whole
    travel lies inside ``lo``-``hi``: where the reflection goes while the cell moves through half
    the phase model's search range (a phase's own cell moves less than that over a cycle)."""
    hkl, d, inten = _intensities(ph, wavelength_A, d_min)
    search = {**DEFAULT_SEARCH, **dict(ph.search)}
    rows = []
    for h, dd, ii in zip(hkl, d, inten):
        h = _nice_hkl(ph, h)
        corners = []
        for fa in (1 - search["a"] / 2, 1 + search["a"] / 2):
            for fc in (1 - search["c"] / 2, 1 + search["c"] / 2):
                c = ph.c * fc if ph.c else None
                b = ph.b * fa if ph.b else None
                corners.append(float(tth_from_d(d_spacing(ph.space_group, *h, ph.a * fa, c, b, ph.beta), wavelength_A)))
        rows.append((h, float(tth_from_d(dd, wavelength_A)), float(ii), (min(corners), max(corners))))
    return [r for r in rows if lo <= r[3][0] and r[3][1] <= hi]


def _picks(refl: dict[str, list[tuple]], cathode) -> list[tuple[int, int, int]]:
    """The reflections windows are made for. A reflection's score is its weakest relative
    intensity over the cathode phases that have it in range (coexisting phases are told apart
    where every one of them shows): the two strongest basal (00l) reflections first, then the
    three strongest others."""
    score: dict[tuple[int, int, int], float] = {}
    for ph in cathode:
        for r in refl[ph.name]:
            score[r[0]] = min(score.get(r[0], np.inf), r[2])
    ranked = sorted(score, key=lambda h: -score[h])
    basal = [h for h in ranked if h[0] == h[1] == 0 and score[h] >= 0.02][:2]
    other = [h for h in ranked if not h[0] == h[1] == 0 and score[h] >= 0.02][:3]
    return basal + other


def _spans(refl: dict[str, list[tuple]], cathode, picks) -> list[list]:
    """One span per picked reflection, covering it in every cathode phase (0.1° more on each
    side); overlapping spans merged: [low, high, [hkl, ...]], by low."""
    names = {ph.name for ph in cathode}
    spans = []
    for h in picks:
        rows = [r for name in refl if name in names for r in refl[name] if r[0] == h]
        if rows:
            spans.append([min(r[3][0] for r in rows) - 0.1, max(r[3][1] for r in rows) + 0.1, h])
    spans.sort(key=lambda s: s[0])
    merged: list[list] = []
    for s in spans:
        if merged and s[0] <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s[1])
            merged[-1][2].append(s[2])
        else:
            merged.append([s[0], s[1], [s[2]]])
    return merged


def _window(refl: dict[str, list[tuple]], w_lo: float, w_hi: float, hkls: list, notes: list[str],
            unit: str = "2th_deg", wavelength_A: float = 1.0) -> Window:
    """The window of a merged span (2θ ``w_lo``-``w_hi``): named after its first pick, listing
    the strongest reflections of every phase inside it (its picks first); its range in ``unit``."""
    inside = [(name, r) for name in refl for r in refl[name] if w_lo <= r[1] <= w_hi and r[2] >= 0.02]
    inside.sort(key=lambda nr: (nr[1][0] not in hkls, -nr[1][2]))
    labels = [_label(name, r[0]) for name, r in inside][:MAX_PEAKS]
    if len(inside) > MAX_PEAKS:
        notes.append(f"window at 2θ {w_lo:.2f}-{w_hi:.2f}° lists the {MAX_PEAKS} strongest of its {len(inside)} reflections")
    name = "".join(str(x) for x in hkls[0]) if all(0 <= x <= 9 for x in hkls[0]) else "_".join(map(str, hkls[0]))
    return Window(name, _from_tth(w_lo, w_hi, unit, wavelength_A), tuple(labels))


def _to_tth(values: tuple[float, float], unit: str, wavelength_A: float) -> tuple[float, float]:
    """A radial range in ``unit`` as 2θ degrees (Q beyond 4π/λ: 180°)."""
    if unit == "2th_deg":
        return float(values[0]), float(values[1])
    lo, hi = (float(np.nan_to_num(tth_from_q(v, wavelength_A), nan=180.0)) for v in values)
    return lo, hi


def _from_tth(lo: float, hi: float, unit: str, wavelength_A: float) -> tuple[float, float]:
    """A 2θ window in ``unit``: 2θ rounded to 0.01°, Q to 0.0001 1/Å (far below the 0.1° margin)."""
    if unit == "2th_deg":
        return round(lo, 2), round(hi, 2)
    return round(float(q_from_tth(lo, wavelength_A)), 4), round(float(q_from_tth(hi, wavelength_A)), 4)


def _range_text(lo: float, hi: float, unit: str) -> str:
    return f"{lo:.2f}-{hi:.2f}°" if unit == "2th_deg" else f"{lo:.3f}-{hi:.3f} 1/Å"


def choose_windows(names: Sequence[str], wavelength_A: float, radial: tuple[float, float], *,
                   unit: str = "2th_deg") -> tuple[list[Window], list[str]]:
    """Windows around the strongest reflections of the phases ``names`` inside ``radial`` (in
    ``unit``: ``"2th_deg"`` or ``"q_A^-1"``; the windows are in that unit): basal windows first,
    then by the strength of their first pick; at most MAX_WINDOWS, in radial order, with unique
    names. Returns the windows and notes on what was left out."""
    specs = _phase_specs(names)
    lo, hi = _to_tth(radial, unit, wavelength_A)
    d_min = wavelength_A / (2 * math.sin(math.radians(hi / 2)))
    notes: list[str] = []
    refl = {ph.name: _reflections_in_range(ph, wavelength_A, d_min, lo, hi) for ph in specs}
    notes += [f"no reflection of {name} falls inside the detector's range {_range_text(*radial, unit)}"
              for name, rows in refl.items() if not rows]
    cathode = [ph for ph in specs if ph.fraction]
    if not cathode:
        notes.append(f"no window written: none of {', '.join(names)} is a cathode phase (one in the phase "
                     "fractions); add one such as O3 or P2 to --phases, or write [[windows]] by hand")
        return [], notes
    picks = _picks(refl, cathode)
    windows = [(hkls[0], _window(refl, max(w_lo, lo), min(w_hi, hi), hkls, notes, unit, wavelength_A))
               for w_lo, w_hi, hkls in _spans(refl, cathode, picks)]
    order = {h: i for i, h in enumerate(picks)}
    windows.sort(key=lambda hw: order[hw[0]])
    if len(windows) > MAX_WINDOWS:
        notes.append(f"{len(windows) - MAX_WINDOWS} weaker window(s) left out")
    chosen = sorted((w for _, w in windows[:MAX_WINDOWS]), key=lambda w: w.range[0])
    seen: dict[str, int] = {}
    out = []
    for w in chosen:          # unique names
        n = seen.get(w.name, 0)
        seen[w.name] = n + 1
        out.append(w if n == 0 else Window(f"{w.name}_{n + 1}", w.range, w.peaks))
    return out, notes


# ---------------------------------------------------------------------------------------------
# the whole scaffold and its text


def _run_name(found: FoundFrames, spec: str) -> str:
    stem = Path(glob.glob(spec)[0] if not Path(spec).is_dir() and glob.glob(spec) else spec).stem
    if Path(spec).is_dir():
        files = sorted(Path(spec).glob("*" + found.suffix))
        stem = files[0].stem if files else Path(spec).resolve().name
    stem = re.sub(r"_master$", "", stem)
    name = re.sub(r"[_\-.]*(data)?[_\-.]*\d*$", "", stem) or stem
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._") or "run"


def _pattern_range(found: FoundFrames, given: str | None, first: str) -> tuple[str, str | None, list[str]]:
    """The radial unit of 1D patterns (``--radial-unit`` wins over the header, the header over the
    2θ assumed), where it comes from, and notes."""
    notes = []
    if found.unit is not None and found.unit not in RADIAL_UNITS and given is None:
        raise InitError(f"the header of {first} gives the radial unit {found.unit}; xrdpipe reads 1D patterns "
                        f"in {' or '.join(RADIAL_UNITS)}: integrate in one of them, or give --radial-unit")
    if given is not None:
        if found.unit is not None and found.unit != given:
            notes.append(f"--radial-unit {given} given, but the header of {first} says {found.unit}")
        unit, source = given, "--radial-unit"
    elif found.unit is not None:
        unit, source = found.unit, f"the header of {first}"
    else:
        unit, source = "2th_deg", None
    top = 180.0 if unit == "2th_deg" else 40.0
    if found.radial[1] > top:
        raise InitError(f"the 1D patterns' x reaches {found.radial[1]:g}, not a range of {unit} (at most {top:g}); "
                        f"give --radial-unit ({' or '.join(RADIAL_UNITS)}) or convert the patterns")
    return unit, source, notes


def scaffold(frames: str, *, poni: Path | str, phases: Sequence[str], mask: Path | str | None = None,
             cycler: Path | str | None = None, out: Path | str = "experiment.toml", name: str | None = None,
             timezone: str | None = None, cycler_start: datetime | None = None,
             radial_unit: str | None = None) -> Scaffold:
    """What :func:`experiment_text` needs, found from the files (paths relative to ``out``'s folder).
    ``radial_unit`` (``"2th_deg"`` or ``"q_A^-1"``): of the integration, or of the 1D patterns
    (default: what their header names, else 2θ); the windows are written in it."""
    base = Path(out).resolve().parent
    if not phases:
        raise InitError("--phases names no phase; give the library names of the phases, e.g. --phases O3,P3")
    _phase_specs(phases)                     # unknown names fail before anything is read
    if radial_unit is not None and radial_unit not in RADIAL_UNITS:
        raise InitError(f"unknown radial unit {radial_unit!r}; expected {' or '.join(RADIAL_UNITS)}")
    if timezone is not None:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InitError(f"unknown time zone {timezone!r}; expected an IANA name such as 'Europe/London'") from None
    if not Path(poni).is_file():
        raise InitError(f"PONI file {poni} does not exist")
    found = find_frames(str(frames), base, timezone=timezone)
    notes = []
    if found.kind == "patterns":
        unit, source, notes = _pattern_range(found, radial_unit, f"the first of {found.pattern}")
        det = find_wavelength(Path(poni), base, (0.0, 180.0))
        tth = _to_tth(found.radial, unit, det.wavelength_A)
        det = FoundDetector(det.poni, None, det.wavelength_A, None, tth, det.distance_mm, 0)
        radial = found.radial
        if mask:
            notes.append(f"the mask {mask} is not used: 1D patterns are integrated already")
    else:
        unit, source = radial_unit or "2th_deg", "--radial-unit" if radial_unit else None
        det = find_detector(Path(poni), Path(mask) if mask else None, base, found.shape, str(frames))
        tth = det.tth
        radial = tth if unit == "2th_deg" else (_q(tth[0], det.wavelength_A), _q(tth[1], det.wavelength_A))
    windows, wnotes = choose_windows(phases, det.wavelength_A, radial, unit=unit)
    notes += wnotes
    cyc = find_cycler(Path(cycler), base, timezone=timezone, start=cycler_start) if cycler else None
    return Scaffold(name or _run_name(found, str(frames)), found, det, tuple(phases), tuple(windows), cyc,
                    timezone, tuple(notes), (round(tth[0], 4), round(tth[1], 4)), unit, source)


def _q(tth: float, wavelength_A: float) -> float:
    return float(q_from_tth(tth, wavelength_A))


def _toml(value: str) -> str:
    """``value`` as a TOML basic string, quotes and backslashes escaped: JSON's escapes are
    TOML's (DEL, which TOML wants escaped and JSON does not, escaped too)."""
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def experiment_text(s: Scaffold) -> str:
    """The experiment.toml of a :class:`Scaffold`: every key valid, every finding in a comment."""
    lines = [
        "# Experiment file written by `xrdpipe init`: check the lines marked CHECK, then",
        "#   xrdpipe validate <this file>   and   xrdpipe run <this file>",
        "schema_version = 1",
        "",
        "[run]",
        f"name = {_toml(s.name)}",
        'output = "results"',
        "",
    ]
    lines += _frames_lines(s) if s.frames.kind == "frames" else _patterns_lines(s)
    lines += _cycler_lines(s.cycler)
    lines += _phase_lines(s.phases)
    lines += _window_lines(s)
    return "\n".join(lines)


def _frames_lines(s: Scaffold) -> list[str]:
    """[frames], [calibration] and [integration] of 2D frames."""
    f, d = s.frames, s.detector
    fmt = {".cbf": "CBF", ".edf": "EDF", ".tif": "TIFF", ".tiff": "TIFF"}.get(f.suffix, "HDF5/NeXus")
    lines = [f"# {f.frames} frame(s) in {f.files} {fmt} file(s)" + (f", {f.shape[0]} x {f.shape[1]} pixels" if f.shape else "")
             + (f"; {f.note}" if f.note else "")]
    if f.dataset:
        lines += [f"# the frames are the dataset {f.dataset} of each file"]
    lines += ["[frames]", f"files = {_toml(f.pattern)}"]
    if f.dataset:
        lines += [f"dataset = {_toml(f.dataset)}"]
    if f.times == "header":
        lines += [f"# times from the file headers: first frame {f.first.isoformat()}, last ends {f.last.isoformat()}",
                  'times = "header"']
        if f.first.tzinfo is None:
            if s.timezone:
                lines += [f"timezone = {_toml(s.timezone)}   # the header times have no UTC offset"]
            else:
                lines += ["# CHECK: the header times have no UTC offset: set the zone of the beamline's clock",
                          '# timezone = "Europe/Paris"']
    else:
        lines += [f"# CHECK: the headers give no frame times ({f.times_reason}); set one of",
                  '# times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0, exposure_s = 19.5 }',
                  '# times = { log = "scans.csv" }    # one row per frame: file, start, end']
    lines += ["", "[calibration]", f"poni = {_toml(d.poni)}"]
    if d.mask:
        lines += [f"mask = {_toml(d.mask)}"]
    lo, hi = d.tth
    return lines + ["",
                    f"# the detector covers 2θ {lo:.2f}-{hi:.2f}° (Q {_q(lo, d.wavelength_A):.3f}-{_q(hi, d.wavelength_A):.3f} 1/Å) "
                    f"at {d.wavelength_A:.5g} Å, {d.distance_mm:.1f} mm",
                    "[integration]", f"npt = {d.npt}            # about 3 points per pixel at the beam centre",
                    f"unit = {_toml(s.radial_unit)}", 'error_model = "poisson"', ""]


def _patterns_lines(s: Scaffold) -> list[str]:
    """[patterns] of 1D patterns."""
    f, d = s.frames, s.detector
    unit = f"radial_unit = {_toml(s.radial_unit)}"
    if s.unit_source is None:
        unit += '   # CHECK: the headers do not name the unit; "q_A^-1" if the patterns are in Q'
    else:
        unit += f"   # from {s.unit_source}"
    return [f"# {f.frames} 1D pattern(s) ({f.suffix}), x from {f.radial[0]:.3f} to {f.radial[1]:.3f}"
            + (f"; {f.note}" if f.note else ""),
            "[patterns]", f"files = {_toml(f.pattern)}", unit,
            f"wavelength_A = {d.wavelength_A:.6g}   # from {d.poni}",
            "# CHECK: 1D patterns carry no times; set one of",
            '# times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }',
            '# times = { log = "scans.csv" }', ""]


def _phase_lines(phases: Sequence[str]) -> list[str]:
    """[[phases]] of the library phases, their space group and start cell in a comment."""
    lines = ["# Phases from the library (space group and start cell; any key given here wins):"]
    for name in phases:
        ph = PhaseSpec(name=name)
        cell = ", ".join(f"{k} = {getattr(ph, k)}" for k in ("a", "b", "c", "beta") if getattr(ph, k) is not None)
        extra = "; not in the phase fractions" if not ph.fraction else ""
        lines += ["[[phases]]", f"name = {_toml(name)}   # {ph.space_group}, {cell}{extra}", ""]
    return lines


def _window_lines(s: Scaffold) -> list[str]:
    """[[windows]] and the contour map's windows."""
    unit = "2θ degrees" if s.radial_unit == "2th_deg" else "Q, 1/Å"
    radial = s.tth if s.radial_unit == "2th_deg" else (_q(s.tth[0], s.detector.wavelength_A),
                                                       _q(s.tth[1], s.detector.wavelength_A))
    lines = [f"# Windows ({unit}) around the strongest reflections inside {_range_text(*radial, s.radial_unit)}: "
             "basal first;",
             "# each reflection of every phase in one window, wide enough for the cell search.",
             "# The phase model fits every allowed reflection of every phase inside a window."]
    lines += [f"# note: {note}" for note in s.notes]
    for w in s.windows:
        peaks = ", ".join(_toml(p) for p in w.peaks)
        lines += ["[[windows]]", f"name = {_toml(w.name)}", f"range = [{w.range[0]}, {w.range[1]}]",
                  f"peaks = [{peaks}]", ""]
    if s.windows:
        names = ", ".join(_toml(w.name) for w in s.windows[:3])
        lines += ["[plots.contour]", f"windows = [{names}]", ""]
    return lines


def _cycler_lines(c: FoundCycler | None) -> list[str]:
    if c is None:
        return ["# No cycler file given (xrdpipe init ... --cycler FILE): add an [electrochemistry] section",
                '# [electrochemistry]', '# file = "cycler.csv"', ""]
    body = [f"file = {_toml(c.file)}", f"format = {_toml(c.format)}"]
    if c.columns:
        cols = ", ".join(f"{k} = {_toml(v)}" for k, v in c.columns.items())
        body += [f"columns = {{ {cols} }}"]
    if c.start is not None:
        body += [f"start = {_toml(c.start.isoformat())}"]
    if c.timezone is not None:
        body += [f"timezone = {_toml(c.timezone)}"]
    body += ["# CHECK: for x and capacities per gram, give the cell:",
             "# active_mass_mg = 7.2", '# formula = "NaNi1/3Fe1/3Mn1/3O2"', "# x0 = 1.0"]
    head = [f"# The cycler file: {c.format} format, {c.rows} rows"]
    if c.needs is None:
        head[0] += f", {c.first.isoformat()} to {c.last.isoformat()}"
        head += [f"# read: {n}" for n in c.notes]
        return head + ["[electrochemistry]"] + body + [""]
    ask = {"start": "the file has relative times only: give when its time 0 was (init --cycler-start, "
                    "or start = \"2025-07-02T19:00:00+08:00\" below)",
           "timezone": "the file stores local times without a UTC offset: give the cycler computer's zone "
                       "(init --timezone, or timezone = \"Europe/London\" below)"}[c.needs]
    return head + [f"# CHECK: {ask}; then remove the '# ' of the section below",
                   "# [electrochemistry]"] + [f"# {b}" if not b.startswith("#") else b for b in body] + [""]


def init_experiment(frames: str, *, poni: Path | str, phases: Sequence[str], out: Path | str = "experiment.toml",
                    mask: Path | str | None = None, cycler: Path | str | None = None, name: str | None = None,
                    timezone: str | None = None, cycler_start: datetime | None = None,
                    radial_unit: str | None = None, force: bool = False) -> tuple[Path, Scaffold]:
    """Write the experiment file ``out`` (refused if it exists, unless ``force``) and return it
    with what was found."""
    out = Path(out)
    if out.exists() and not force:
        raise InitError(f"{out} exists; give another -o or --force to overwrite it")
    s = scaffold(frames, poni=poni, phases=phases, mask=mask, cycler=cycler, out=out, name=name,
                 timezone=timezone, cycler_start=cycler_start, radial_unit=radial_unit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(experiment_text(s), encoding="utf-8")
    return out, s
