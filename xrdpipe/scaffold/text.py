"""The experiment file of a :class:`~xrdpipe.scaffold.found.Scaffold` (:func:`experiment_text`, a pure
function), and :func:`scaffold` / :func:`init_experiment`, which find and write it."""

from __future__ import annotations

import glob
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..config import RADIAL_UNITS, PhaseSpec
from ..crystallography import q_from_tth
from ..errors import InitError
from .choose import choose_windows, phase_specs, range_text, to_tth
from .found import (
    FoundCycler,
    FoundDetector,
    FoundFrames,
    Scaffold,
    find_cycler,
    find_detector,
    find_frames,
    find_wavelength,
)


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
    phase_specs(phases)                     # unknown names fail before anything is read
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
        tth = to_tth(found.radial, unit, det.wavelength_A)
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
    lines = [f"# Windows ({unit}) around the strongest reflections inside {range_text(*radial, s.radial_unit)}: "
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
