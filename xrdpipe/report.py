"""The run report: one self-contained HTML page from plain data (no file is opened here).

:func:`build_report` turns a :class:`ReportData` (numbers, strings, figure bytes) into the text
of ``report.html``: the summary (frames, failures and their reasons, phases with their frame, x
and time ranges), every figure embedded as a ``data:`` URI, the phase transitions (where each
phase appears or disappears, where phases coexist), and the provenance (versions, the
experiment file, the PONI, the key of every stage and when it ran). Nothing in the page points
outside it: no link, script, font or image is fetched, and every string is escaped.
The run layer (:mod:`xrdpipe.run.report`) gathers the data from the run file.

>>> ranges = phase_ranges(["O3", "P3"], [[True, False], [True, True], [False, True]])
>>> [(r.phase, r.segments) for r in ranges]
[('O3', [(0, 1)]), ('P3', [(1, 2)])]
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["ReportData", "Figure", "StageRow", "PhaseRange", "Transition", "Coexistence", "phase_ranges",
           "phase_transitions", "coexistence", "build_report"]


@dataclass(frozen=True)
class Figure:
    """A figure to embed: its kind (``contour``...), file name, bytes and MIME type
    (``image/png`` or ``image/svg+xml``)."""

    kind: str
    name: str
    data: bytes
    mime: str


@dataclass(frozen=True)
class StageRow:
    """A stage of the run: its state (``up to date``, ``out of date (settings or inputs
    changed)``, ``not run yet``, ``not configured``, ``not configured now`` (run before, no longer
    configured) or, without the current keys, ``finished``), its key, when it last finished and
    its summary."""

    stage: str
    state: str
    key: str = ""
    finished: str = ""
    summary: str = ""


@dataclass
class ReportData:
    """Everything the report shows, as plain data.

    ``frame_key``, ``status`` (``"done"``, ``"failed"`` or ``"pending"``), ``message`` and
    ``time_s`` have one entry per frame; ``x`` too when the electrochemistry is known.
    ``phases`` and ``present`` (frame x phase, booleans) describe the frames of
    ``lattice_frame``; None when the lattice stage has not run. ``missing`` lists what the
    run does not (yet) hold, in words.
    """

    title: str
    generated: str
    version: str
    frame_key: Sequence[str]
    status: Sequence[str]
    message: Sequence[str]
    time_s: Sequence[float]
    x: Sequence[float] | None = None
    phases: Sequence[str] | None = None
    lattice_frame: Sequence[int] | None = None
    present: Sequence[Sequence[bool]] | None = None
    figures: list[Figure] = field(default_factory=list)
    figure_notes: list[str] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)
    experiment_text: str = ""
    experiment_file: str = ""
    poni_text: str = ""
    poni_file: str = ""
    method: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    refresh_s: float | None = None


# ----------------------------------------------------------------------------------------------
# phases over the series

@dataclass(frozen=True)
class PhaseRange:
    """Where a phase is present: its frame count, runs of consecutive frames, x and time ranges
    (NaN when unknown)."""

    phase: str
    frames: int
    segments: list[tuple[int, int]]
    x_range: tuple[float, float]
    time_range_s: tuple[float, float]


@dataclass(frozen=True)
class Transition:
    """A phase appears or disappears at ``frame`` (the first frame with it, or the first
    without it), with that frame's x and time."""

    frame: int
    phase: str
    event: str
    x: float
    time_s: float


@dataclass(frozen=True)
class Coexistence:
    """Consecutive frames ``first`` to ``last`` in which the same two or more phases are present
    (a frame missing from the rows, e.g. one that failed, ends a run)."""

    first: int
    last: int
    phases: tuple[str, ...]
    x_range: tuple[float, float]
    time_range_s: tuple[float, float]


def _span(values, rows) -> tuple[float, float]:
    if values is None:
        return (np.nan, np.nan)
    v = np.asarray(values, float)[np.asarray(rows, int)]
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else (np.nan, np.nan)


def _segments(frames: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive frame numbers as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for f in frames:
        if out and f == out[-1][1] + 1:
            out[-1] = (out[-1][0], int(f))
        else:
            out.append((int(f), int(f)))
    return out


def phase_ranges(phases: Sequence[str], present, *, frame: Sequence[int] | None = None, x=None,
                 time_s=None) -> list[PhaseRange]:
    """Per phase, the frames (``frame``, default 0, 1, ...) of the rows of ``present`` (row x
    phase) where it is present, as runs of consecutive frame numbers, with their x and time ranges
    (``x`` and ``time_s`` are indexed by frame)."""
    present = np.asarray(present, bool).reshape(-1, len(phases))
    frame = np.arange(present.shape[0]) if frame is None else np.asarray(frame, int)
    out = []
    for i, name in enumerate(phases):
        rows = np.flatnonzero(present[:, i])
        segs = _segments(frame[rows])
        out.append(PhaseRange(str(name), int(rows.size), segs, _span(x, frame[rows]), _span(time_s, frame[rows])))
    return out


def phase_transitions(phases: Sequence[str], present, *, frame: Sequence[int] | None = None, x=None,
                      time_s=None) -> list[Transition]:
    """Where each phase appears (absent in one row, present in the next) or disappears, in row
    order; the rows given are the frames compared (leave out frames not integrated)."""
    present = np.asarray(present, bool).reshape(-1, len(phases))
    frame = np.arange(present.shape[0]) if frame is None else np.asarray(frame, int)
    out = []
    for r in range(1, present.shape[0]):
        f = int(frame[r])
        xv = float(np.asarray(x, float)[f]) if x is not None else np.nan
        tv = float(np.asarray(time_s, float)[f]) if time_s is not None else np.nan
        for i, name in enumerate(phases):
            if present[r, i] != present[r - 1, i]:
                out.append(Transition(f, str(name), "appears" if present[r, i] else "disappears", xv, tv))
    return out


def coexistence(phases: Sequence[str], present, *, frame: Sequence[int] | None = None, x=None,
                time_s=None) -> list[Coexistence]:
    """The runs of consecutive frames in which the same two or more phases are present."""
    present = np.asarray(present, bool).reshape(-1, len(phases))
    frame = np.arange(present.shape[0]) if frame is None else np.asarray(frame, int)
    out: list[Coexistence] = []
    start, current = 0, ()
    for r in range(present.shape[0] + 1):
        here = tuple(str(p) for p, on in zip(phases, present[r]) if on) if r < present.shape[0] else ()
        gap = 0 < r < present.shape[0] and frame[r] != frame[r - 1] + 1
        if here != current or gap:
            if len(current) >= 2:
                rows = frame[start:r]
                out.append(Coexistence(int(rows[0]), int(rows[-1]), tuple(map(str, current)), _span(x, rows),
                                       _span(time_s, rows)))
            start, current = r, here
    return out


# ----------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1em 2em;color:#1b1b1b;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #2b6cb0;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#e8eef7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.missing{background:#fff4e5;border-left:4px solid #dd6b20;padding:.4em .8em}
.bad{color:#b00020}.live{background:#e6fffa;border-left:4px solid #319795;padding:.4em .8em}
figure{margin:1em 0;display:block;max-width:100%}figure img{max-width:100%;height:auto;
border:1px solid #ddd}figcaption{color:#555;font-size:.9em}pre{background:#f6f8fa;padding:.6em;overflow-x:auto;
font-size:.85em;white-space:pre-wrap}dl.nums{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dl.nums dt{font-weight:600}dl.nums dd{margin:0}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float, fmt: str = ".3f") -> str:
    return format(v, fmt) if v is not None and np.isfinite(v) else "–"


def _range(r: tuple[float, float], fmt: str = ".3f") -> str:
    lo, hi = r
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "–"
    return _num(lo, fmt) if lo == hi else f"{_num(lo, fmt)} to {_num(hi, fmt)}"


def _frames_text(segments: list[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in segments) or "none"


def _table(head: Sequence[str], rows: list[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are given escaped."""
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _summary(d: ReportData) -> str:
    status = np.asarray(d.status, dtype=object)
    n = status.size
    done, failed = int((status == "done").sum()), int((status == "failed").sum())
    pending = n - done - failed
    parts = ["<h2 id=\"summary\">Summary</h2>", '<dl class="nums">',
             f'<dt>frames</dt><dd id="frame-count">{n}</dd>',
             f'<dt>integrated</dt><dd id="done-count">{done}</dd>',
             f'<dt>failed</dt><dd id="failed-count">{failed}</dd>']
    if pending:
        parts.append(f'<dt>pending</dt><dd id="pending-count">{pending}</dd>')
    t = np.asarray(d.time_s, float)
    if np.isfinite(t).any():
        parts.append(f"<dt>time span</dt><dd>{_num(np.nanmin(t), '.0f')} s to {_num(np.nanmax(t), '.0f')} s "
                     "(middle of each exposure, from the first frame's start)</dd>")
    if d.x is not None and np.isfinite(np.asarray(d.x, float)).any():
        parts.append(f"<dt>x</dt><dd>{_range(_span(d.x, range(n)))}</dd>")
    parts.append("</dl>")
    if failed:
        rows = [[str(i), _e(d.frame_key[i]), f'<span class="bad">{_e(d.message[i] or "no reason recorded")}</span>']
                for i in np.flatnonzero(status == "failed")]
        parts += ["<h3>Failed frames</h3>", _table(["frame", "file[:index]", "reason"], rows, numeric=(0,))
                  .replace("<table>", '<table id="failures">', 1)]
    remarks = [i for i in np.flatnonzero(status == "done") if d.message[i]]
    if remarks:
        rows = [[str(i), _e(d.frame_key[i]), _e(d.message[i])] for i in remarks]
        parts += ["<h3>Remarks on frames kept</h3>", _table(["frame", "file[:index]", "remark"], rows, numeric=(0,))]
    if d.missing:
        parts.append('<div class="missing"><strong>Not in this run (yet):</strong><ul>'
                     + "".join(f"<li>{_e(m)}</li>" for m in d.missing) + "</ul></div>")
    return "\n".join(parts)


def _phases(d: ReportData) -> str:
    parts = ['<h2 id="phases">Phases</h2>']
    if d.phases is None or d.present is None or d.lattice_frame is None:
        parts.append('<p class="missing">No lattice table in the run file: the phases are not known '
                     "(the fit and lattice stages have not run, or no [[phases]] are configured).</p>")
        return "\n".join(parts)
    kw = dict(frame=d.lattice_frame, x=d.x, time_s=d.time_s)
    names = list(d.phases)
    rows = [[_e(r.phase), str(r.frames), _e(_frames_text(r.segments)), _range(r.x_range), _range(r.time_range_s, ".0f")]
            for r in phase_ranges(names, d.present, **kw)]
    parts.append(_table(["phase", "frames", "present in frames", "x", "time (s)"], rows, numeric=(1,))
                 .replace("<table>", '<table id="phase-ranges">', 1))
    trans = phase_transitions(names, d.present, **kw)
    parts.append("<h3>Phase transitions</h3>")
    if trans:
        rows = [[str(t.frame), _e(t.phase), t.event, _num(t.x), _num(t.time_s, ".0f")] for t in trans]
        parts.append(_table(["frame", "phase", "event", "x", "time (s)"], rows, numeric=(0, 3, 4))
                     .replace("<table>", '<table id="transitions">', 1))
    else:
        parts.append("<p>No phase appears or disappears over the frames.</p>")
    parts.append("<h3>Coexistence</h3>")
    co = coexistence(names, d.present, **kw)
    if co:
        rows = [[f"{c.first}–{c.last}" if c.first != c.last else str(c.first), _e(" + ".join(c.phases)),
                 _range(c.x_range), _range(c.time_range_s, ".0f")] for c in co]
        parts.append(_table(["frames", "phases", "x", "time (s)"], rows).replace("<table>", '<table id="coexistence">', 1))
    else:
        parts.append("<p>No two phases are present in the same frame.</p>")
    parts.append('<p class="meta">A phase is present in a frame when its cell was refined or its fraction is '
                 "above zero. Frames that were not integrated are left out: they break a range of frames, and a "
                 "transition compares a frame with the previous integrated one.</p>")
    return "\n".join(parts)


def _figures(d: ReportData) -> str:
    parts = ['<h2 id="figures">Figures</h2>']
    for f in d.figures:
        uri = f"data:{f.mime};base64," + base64.b64encode(f.data).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{_e(f.kind)} figure"><figcaption>{_e(f.kind)}: {_e(f.name)}'
                     "</figcaption></figure>")
    if not d.figures:
        parts.append('<p class="missing">No figure to show.</p>')
    if d.figure_notes:
        parts.append('<ul class="meta">' + "".join(f"<li>{_e(n)}</li>" for n in d.figure_notes) + "</ul>")
    return "\n".join(parts)


def _provenance(d: ReportData) -> str:
    parts = ['<h2 id="provenance">Provenance</h2>', f"<p>Report written {_e(d.generated)} by xrdpipe {_e(d.version)}.</p>"]
    if d.stages:
        rows = [[_e(s.stage), _e(s.state), f"<code>{_e(s.key)}</code>" if s.key else "–", _e(s.finished or "–")]
                for s in d.stages]
        parts += ["<h3>Stages</h3>", _table(["stage", "state", "key", "finished (UTC)"], rows)
                  .replace("<table>", '<table id="stages">', 1)]
        for s in d.stages:
            if s.summary:
                parts.append(f"<details><summary>{_e(s.stage)}: what it did</summary><pre>{_e(s.summary)}</pre></details>")
    if d.packages:
        rows = [[_e(k), _e(v)] for k, v in d.packages.items()]
        parts += ["<h3>Versions (when the patterns were made)</h3>", _table(["package", "version"], rows)]
    if d.method:
        parts.append(f"<p>Patterns: {_e(d.method)}</p>")
    parts.append(f"<h3>Experiment file{': ' + _e(d.experiment_file) if d.experiment_file else ''}</h3>")
    parts.append(f"<pre>{_e(d.experiment_text)}</pre>" if d.experiment_text else "<p>not recorded</p>")
    if d.poni_text or d.poni_file:
        parts.append(f"<h3>PONI{': ' + _e(d.poni_file) if d.poni_file else ''}</h3>")
        parts.append(f"<pre>{_e(d.poni_text)}</pre>" if d.poni_text else "<p>not recorded</p>")
    return "\n".join(parts)


def build_report(data: ReportData) -> str:
    """The text of a self-contained HTML report of ``data`` (see the module docstring). With
    ``data.refresh_s`` the page reloads itself every that many seconds (``xrdpipe watch``)."""
    refresh = ""
    live = ""
    if data.refresh_s:
        refresh = f'<meta http-equiv="refresh" content="{max(1, int(round(data.refresh_s)))}">\n'
        live = (f'<p class="live">Live: this page reloads every {max(1, int(round(data.refresh_s)))} s while '
                f"<code>xrdpipe watch</code> runs (last written {_e(data.generated)}).</p>")
    body = "\n".join([_summary(data), _phases(data), _figures(data), _provenance(data)])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"{refresh}<title>{_e(data.title)} · xrdpipe report</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(data.title)}</h1>\n<p class=\"meta\">xrdpipe run report · written {_e(data.generated)}</p>\n"
        f"{live}\n<nav><a href=\"#summary\">Summary</a> · <a href=\"#phases\">Phases</a> · "
        "<a href=\"#figures\">Figures</a> · <a href=\"#provenance\">Provenance</a></nav>\n"
        f"{body}\n</body>\n</html>\n")
