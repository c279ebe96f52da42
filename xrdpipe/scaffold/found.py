"""What ``xrdpipe init`` finds in the files: the frames (or 1D patterns), the detector's reach
from the PONI (and mask), the cycler file; and the dataclasses that carry it."""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as _utc
from pathlib import Path

import numpy as np
from natsort import natsorted

from ..calibration import load_calibration
from ..cyclers import detect_format, read_cycler
from ..errors import (
    CalibrationError,
    ConfigError,
    CyclerReadError,
    FrameReadError,
    InitError,
    PatternReadError,
)
from ..frames import list_frames, read_frame
from ..patterns import read_pattern
from ..timing import frame_times

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


def _listed(spec: str, path: Path) -> tuple[list[Path], str, dict[str, list[Path]], list[str]]:
    """The files of ``spec`` (a folder or a glob), how to name it, its frame and pattern files
    by suffix and the other suffixes found; InitError when there is no frame or pattern file."""
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
    return listed, where, by_suffix, others


def _through_masters(group: list[Path], suffix: str, notes: list[str]) -> tuple[list[Path], str]:
    """The files to read of a (sorted) group and their glob stem: the EIGER ``*_master`` files
    alone where there are any and they can be read, their ``*_data_*`` files where not."""
    masters = [p for p in group if p.stem.endswith("_master")] if suffix in HDF5_SUFFIXES else []
    if masters and len(masters) < len(group):
        refs = list_frames(masters[:1])
        try:
            read_frame(refs[0])
            notes.append(f"{len(group) - len(masters)} other {suffix} file(s) (EIGER data files) read through "
                         f"the {len(masters)} *_master{suffix} file(s)")
            return masters, "*_master"
        except FrameReadError as exc:      # a master xrdpipe cannot read through: its data files
            chosen = [p for p in group if re.search(r"_data_\d+$", p.stem)]
            notes.append(f"the EIGER master files are not read ({exc.reason}): their {len(chosen)} data "
                         "file(s) are (CHECK the frame times)")
            return chosen, "*_data_*"
    return group, "*"


def find_frames(spec: str, base: Path, *, timezone: str | None = None) -> FoundFrames:
    """The frames (or 1D patterns) of ``spec`` (a folder or a glob): their format, count and times.
    Only files of the known frame and pattern suffixes count; of the most common suffix, the EIGER
    ``*_master`` files alone when there are any (their data files are read through them)."""
    path = Path(spec)
    listed, where, by_suffix, others = _listed(spec, path)
    suffix = max(by_suffix, key=lambda s: (len(by_suffix[s]), s in FRAME_SUFFIXES))
    group = by_suffix[suffix]
    notes = []
    chosen, stem = _through_masters(natsorted(group, key=str), suffix, notes)
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
    columns = dict(rec.columns) if fmt == "csv" else {}     # the columns the table reader chose
    return FoundCycler(_rel(path, base), fmt, columns, len(rec), None if needs else rec.start,
                       None if needs else rec.end, needs, timezone, start, tuple(rec.notes))


