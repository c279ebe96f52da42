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
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InitError

__all__ = ["InitError", "Scaffold", "scaffold", "experiment_text", "init_experiment"]

FRAME_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nexus", ".cbf", ".edf", ".tif", ".tiff")
PATTERN_SUFFIXES = (".xye", ".xy", ".chi", ".dat", ".fxye")
#: the default search half-ranges of the phase model (config.fitting.PhaseSpec.search)
_SEARCH = {"a": 0.015, "c": 0.03}
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
    range: tuple[float, float]
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


# ---------------------------------------------------------------------------------------------
# discovery


def _rel(path: Path | str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return Path(os.path.relpath(p, base.resolve())).as_posix()
    except ValueError:          # another drive
        return p.as_posix()


def find_frames(spec: str, base: Path) -> FoundFrames:
    """The frames (or 1D patterns) of ``spec`` (a folder or a glob): their format, count and times."""
    from natsort import natsorted

    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES + PATTERN_SUFFIXES]
        where = f"folder {spec}"
    else:
        files = [Path(p) for p in glob.glob(spec) if Path(p).is_file()]
        where = f"{spec!r}"
    if not files:
        raise InitError(f"no frames matched {where}: expected HDF5/NeXus ({', '.join(FRAME_SUFFIXES[:6])}), "
                        f"CBF, EDF or TIFF frames, or 1D patterns ({', '.join(PATTERN_SUFFIXES)})")
    by_suffix: dict[str, list[Path]] = {}
    for p in files:
        by_suffix.setdefault(p.suffix.lower(), []).append(p)
    suffix = max(by_suffix, key=lambda s: (len(by_suffix[s]), s in FRAME_SUFFIXES))
    chosen = natsorted(by_suffix[suffix], key=str)
    folder = chosen[0].parent
    pattern = _rel(folder, base) + "/*" + chosen[0].suffix if path.is_dir() else _rel_glob(spec, base)
    skipped = len(files) - len(chosen)
    note = f"{skipped} other file(s) in the folder left out" if skipped else ""
    if suffix in PATTERN_SUFFIXES:
        from .patterns import read_pattern

        x, _, _ = read_pattern(chosen[0])
        return FoundFrames("patterns", pattern, len(chosen), len(chosen), suffix, note=note,
                           radial=(float(np.min(x)), float(np.max(x))))
    from .frames import frame_times, list_frames, read_frame

    refs = list_frames(chosen)
    good = [r for r in refs if r.error is None]
    if not good:
        raise InitError(f"none of the {len(chosen)} {suffix} file(s) in {where} can be read: {refs[0].error}")
    shape = None
    try:
        shape = tuple(int(s) for s in np.shape(read_frame(good[0])))
    except Exception:        # a damaged first frame: the shape stays unknown, the run records it
        pass
    times, first, last = None, None, None
    try:
        ends = frame_times([good[0], good[-1]], "header")
        if ends[0] is not None and ends[-1] is not None:
            times, first, last = "header", ends[0].start, ends[-1].end
    except Exception:
        pass
    bad = len(refs) - len(good)
    if bad:
        note = "; ".join(filter(None, [note, f"{bad} file(s) cannot be listed (recorded as failed frames)"]))
    dataset = good[0].dataset if suffix in FRAME_SUFFIXES[:6] else None
    return FoundFrames("frames", pattern, len(chosen), len(refs), suffix, dataset, shape, times, first, last, note)


def _rel_glob(spec: str, base: Path) -> str:
    """A glob relative to ``base``: its folder part made relative, its magic part kept."""
    head, tail = os.path.split(spec)
    return (_rel(head or ".", base) + "/" + tail) if not glob.has_magic(head) else spec


def find_detector(poni: Path, mask: Path | None, base: Path, frame_shape: tuple[int, int] | None) -> FoundDetector:
    """The detector's covered 2θ range from the PONI geometry, its shape and the mask."""
    from .calibration import load_calibration
    from .errors import CalibrationError

    try:
        cal = load_calibration(poni, mask=mask)
    except CalibrationError as exc:
        raise InitError(str(exc)) from None
    shape = cal.shape or frame_shape
    if shape is None:
        raise InitError(f"the PONI file {poni} does not give the detector's shape and no frame could be read "
                        "to tell it; give a mask (--mask) or a PONI with the detector's max_shape")
    tth = np.degrees(cal.geometry.center_array(shape, unit="2th_rad", scale=False))
    keep = np.isfinite(tth)
    if cal.mask is not None and cal.mask.shape == tth.shape:
        keep &= ~cal.mask
    if not keep.any():
        raise InitError(f"the mask {mask} masks every pixel of the detector")
    lo, hi = np.percentile(tth[keep], [0.5, 99.5])
    pixel = max(float(cal.geometry.detector.pixel1), float(cal.geometry.detector.pixel2))
    step = math.degrees(pixel / float(cal.geometry.dist))           # one pixel at the beam centre
    npt = int(min(20000, max(500, round(3 * (hi - lo) / step / 100) * 100)))
    return FoundDetector(_rel(poni, base), _rel(mask, base) if mask else None, cal.wavelength_A, shape,
                         (float(lo), float(hi)), float(cal.geometry.dist) * 1e3, npt)


def find_cycler(path: Path, base: Path, *, timezone: str | None, start: datetime | None) -> FoundCycler:
    """The cycler file's format and columns, and what it needs to be on the absolute clock."""
    from .cyclers import detect_format, read_cycler
    from .errors import CyclerReadError

    if not path.is_file():
        raise InitError(f"no such cycler file: {path}")
    try:
        fmt = detect_format(path)
    except CyclerReadError as exc:
        raise InitError(str(exc)) from None
    needs = None
    rec = None
    try:
        rec = read_cycler(path, format=fmt, timezone=timezone, start=start)
    except CyclerReadError as exc:
        if "relative times only" in exc.reason:
            needs = "start"
        elif "local times without a UTC offset" in exc.reason:
            needs = "timezone"
        else:
            raise InitError(str(exc)) from None
    if rec is None:     # read once more on a placeholder clock, to tell the columns and rows
        from datetime import timezone as utc

        rec = read_cycler(path, format=fmt, timezone=timezone or "UTC",
                          start=start or (datetime(2000, 1, 1, tzinfo=utc.utc) if needs == "start" else None))
    columns: dict[str, str] = {}
    if fmt == "csv":
        table = next((n for n in rec.notes if n.startswith("table ")), "")
        columns = dict(re.findall(r"(time|datetime|voltage|current) = '([^']*)'", table))
    return FoundCycler(_rel(path, base), fmt, columns, len(rec), None if needs else rec.start,
                       None if needs else rec.end, needs, timezone, start, tuple(rec.notes))


# ---------------------------------------------------------------------------------------------
# windows from the phase library


def _phase_specs(names: Sequence[str]):
    from .config import PhaseSpec
    from .config.base import did_you_mean
    from .phases import LIBRARY

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
    from .refine.structures import Atom, Structure, reflections, structure_factors_sq, template

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
    from .refine.structures import space_group_ops

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
    from .crystallography import d_spacing, tth_from_d

    hkl, d, inten = _intensities(ph, wavelength_A, d_min)
    search = {**_SEARCH, **dict(ph.search)}
    rows = []
    for h, dd, ii in zip(hkl, d, inten):
        h = _nice_hkl(ph, h)
        corners = []
        for fa in (1 - search.get("a", 0.015) / 2, 1 + search.get("a", 0.015) / 2):
            for fc in (1 - search.get("c", 0.03) / 2, 1 + search.get("c", 0.03) / 2):
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


def _window(refl: dict[str, list[tuple]], w_lo: float, w_hi: float, hkls: list, notes: list[str]) -> Window:
    """The window of a merged span: named after its first pick, listing the strongest
    reflections of every phase inside it (its picks first)."""
    inside = [(name, r) for name in refl for r in refl[name] if w_lo <= r[1] <= w_hi and r[2] >= 0.02]
    inside.sort(key=lambda nr: (nr[1][0] not in hkls, -nr[1][2]))
    labels = [_label(name, r[0]) for name, r in inside][:MAX_PEAKS]
    if len(inside) > MAX_PEAKS:
        notes.append(f"window at {w_lo:.2f}-{w_hi:.2f}° lists the {MAX_PEAKS} strongest of its {len(inside)} reflections")
    name = "".join(str(x) for x in hkls[0]) if all(0 <= x <= 9 for x in hkls[0]) else "_".join(map(str, hkls[0]))
    return Window(name, (round(w_lo, 2), round(w_hi, 2)), tuple(labels))


def choose_windows(names: Sequence[str], wavelength_A: float, tth: tuple[float, float]) -> tuple[list[Window], list[str]]:
    """Windows around the strongest reflections of the phases ``names`` inside ``tth`` (2θ degrees):
    basal windows first, then by the strength of their first pick; at most MAX_WINDOWS, in 2θ order,
    with unique names. Returns the windows and notes on what was left out."""
    specs = _phase_specs(names)
    lo, hi = tth
    d_min = wavelength_A / (2 * math.sin(math.radians(hi / 2)))
    notes: list[str] = []
    refl = {ph.name: _reflections_in_range(ph, wavelength_A, d_min, lo, hi) for ph in specs}
    notes += [f"no reflection of {name} falls inside the detector's range {lo:.2f}-{hi:.2f}°"
              for name, rows in refl.items() if not rows]
    cathode = [ph for ph in specs if ph.fraction]
    picks = _picks(refl, cathode)
    windows = [(hkls[0], _window(refl, max(w_lo, lo), min(w_hi, hi), hkls, notes))
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
    name = re.sub(r"[_\-.]*(data)?[_\-.]*\d*$", "", stem) or stem
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._") or "run"


def scaffold(frames: str, *, poni: Path | str, phases: Sequence[str], mask: Path | str | None = None,
             cycler: Path | str | None = None, out: Path | str = "experiment.toml", name: str | None = None,
             timezone: str | None = None, cycler_start: datetime | None = None) -> Scaffold:
    """What :func:`experiment_text` needs, found from the files (paths relative to ``out``'s folder)."""
    base = Path(out).resolve().parent
    if not phases:
        raise InitError("--phases names no phase; give the library names of the phases, e.g. --phases O3,P3")
    _phase_specs(phases)                     # unknown names fail before anything is read
    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InitError(f"unknown time zone {timezone!r}; expected an IANA name such as 'Europe/London'") from None
    if not Path(poni).is_file():
        raise InitError(f"PONI file {poni} does not exist")
    found = find_frames(str(frames), base)
    det = find_detector(Path(poni), Path(mask) if mask else None, base, found.shape)
    tth = det.tth
    notes = []
    if found.kind == "patterns" and found.radial is not None and found.radial[1] < 180:
        tth = found.radial              # 1D patterns: their own range (read as 2θ)
    windows, wnotes = choose_windows(phases, det.wavelength_A, tth)
    notes += wnotes
    cyc = find_cycler(Path(cycler), base, timezone=timezone, start=cycler_start) if cycler else None
    return Scaffold(name or _run_name(found, str(frames)), found, det, tuple(phases), tuple(windows), cyc,
                    timezone, tuple(notes), (round(tth[0], 4), round(tth[1], 4)))


def _q(tth: float, wavelength_A: float) -> float:
    return 4 * math.pi * math.sin(math.radians(tth / 2)) / wavelength_A


def experiment_text(s: Scaffold) -> str:
    """The experiment.toml of a :class:`Scaffold`: every key valid, every finding in a comment."""
    lines = [
        "# Experiment file written by `xrdpipe init`: check the lines marked CHECK, then",
        "#   xrdpipe validate <this file>   and   xrdpipe run <this file>",
        "schema_version = 1",
        "",
        "[run]",
        f'name = "{s.name}"',
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
    lines += ["[frames]", f'files = "{f.pattern}"']
    if f.dataset:
        lines += [f'dataset = "{f.dataset}"']
    if f.times == "header":
        lines += [f"# times from the file headers: first frame {f.first.isoformat()}, last ends {f.last.isoformat()}",
                  'times = "header"']
        if f.first.tzinfo is None:
            if s.timezone:
                lines += [f'timezone = "{s.timezone}"   # the header times have no UTC offset']
            else:
                lines += ["# CHECK: the header times have no UTC offset: set the zone of the beamline's clock",
                          '# timezone = "Europe/Paris"']
    else:
        lines += ["# CHECK: the headers give no frame times; set one of",
                  '# times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0, exposure_s = 19.5 }',
                  '# times = { log = "scans.csv" }    # one row per frame: file, start, end']
    lines += ["", "[calibration]", f'poni = "{d.poni}"']
    if d.mask:
        lines += [f'mask = "{d.mask}"']
    lo, hi = d.tth
    return lines + ["",
                    f"# the detector covers 2θ {lo:.2f}-{hi:.2f}° (Q {_q(lo, d.wavelength_A):.3f}-{_q(hi, d.wavelength_A):.3f} 1/Å) "
                    f"at {d.wavelength_A:.5g} Å, {d.distance_mm:.1f} mm",
                    "[integration]", f"npt = {d.npt}            # about 3 points per pixel at the beam centre",
                    'unit = "2th_deg"', 'error_model = "poisson"', ""]


def _patterns_lines(s: Scaffold) -> list[str]:
    """[patterns] of 1D patterns."""
    f, d = s.frames, s.detector
    return [f"# {f.frames} 1D pattern(s) ({f.suffix}), x from {f.radial[0]:.3f} to {f.radial[1]:.3f}"
            + (f"; {f.note}" if f.note else ""),
            "[patterns]", f'files = "{f.pattern}"',
            'radial_unit = "2th_deg"   # CHECK: or "q_A^-1" if the patterns are in Q',
            f"wavelength_A = {d.wavelength_A:.6g}   # from {d.poni}",
            "# CHECK: 1D patterns carry no times; set one of",
            '# times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }',
            '# times = { log = "scans.csv" }', ""]


def _phase_lines(phases: Sequence[str]) -> list[str]:
    """[[phases]] of the library phases, their space group and start cell in a comment."""
    from .config import PhaseSpec

    lines = ["# Phases from the library (space group and start cell; any key given here wins):"]
    for name in phases:
        ph = PhaseSpec(name=name)
        cell = ", ".join(f"{k} = {getattr(ph, k)}" for k in ("a", "b", "c", "beta") if getattr(ph, k) is not None)
        extra = "; not in the phase fractions" if not ph.fraction else ""
        lines += ["[[phases]]", f'name = "{name}"   # {ph.space_group}, {cell}{extra}', ""]
    return lines


def _window_lines(s: Scaffold) -> list[str]:
    """[[windows]] and the contour map's windows."""
    lo, hi = s.tth
    lines = [f"# Windows (2θ degrees) around the strongest reflections inside {lo:.2f}-{hi:.2f}°: basal first;",
             "# each reflection of every phase in one window, wide enough for the cell search.",
             "# The phase model fits every allowed reflection of every phase inside a window."]
    lines += [f"# note: {note}" for note in s.notes]
    for w in s.windows:
        peaks = ", ".join(f'"{p}"' for p in w.peaks)
        lines += ["[[windows]]", f'name = "{w.name}"', f"range = [{w.range[0]}, {w.range[1]}]", f"peaks = [{peaks}]", ""]
    if s.windows:
        names = ", ".join(f'"{w.name}"' for w in s.windows[:3])
        lines += ["[plots.contour]", f"windows = [{names}]", ""]
    return lines


def _cycler_lines(c: FoundCycler | None) -> list[str]:
    if c is None:
        return ["# No cycler file given (xrdpipe init ... --cycler FILE): add an [electrochemistry] section",
                '# [electrochemistry]', '# file = "cycler.csv"', ""]
    body = [f'file = "{c.file}"', f'format = "{c.format}"']
    if c.columns:
        cols = ", ".join(f'{k} = "{v}"' for k, v in c.columns.items())
        body += [f"columns = {{ {cols} }}"]
    if c.start is not None:
        body += [f'start = "{c.start.isoformat()}"']
    if c.timezone is not None:
        body += [f'timezone = "{c.timezone}"']
    body += ["# CHECK: for x and capacities per gram, give the cell:",
             "# active_mass_mg = 7.2", '# formula = "NaNi1/3Fe1/3Mn1/3O2"', "# x0 = 1.0"]
    head = [f"# The cycler file: {c.format} format, {c.rows} rows"]
    if c.needs is None:
        head[0] += f", {c.first.isoformat()} to {c.last.isoformat()}"
        how = next((n for n in c.notes if "local times" in n or "time 0" in n or "placed on the clock" in n), "")
        if how:
            head += [f"# times: {how}"]
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
                    force: bool = False) -> tuple[Path, Scaffold]:
    """Write the experiment file ``out`` (refused if it exists, unless ``force``) and return it
    with what was found."""
    out = Path(out)
    if out.exists() and not force:
        raise InitError(f"{out} exists; give another -o or --force to overwrite it")
    s = scaffold(frames, poni=poni, phases=phases, mask=mask, cycler=cycler, out=out, name=name,
                 timezone=timezone, cycler_start=cycler_start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(experiment_text(s), encoding="utf-8")
    return out, s
