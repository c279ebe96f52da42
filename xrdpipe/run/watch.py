"""Live processing: ``xrdpipe watch`` follows an experiment while its frames arrive.

It polls (file-system events are not used: network file systems drop them). Every
``interval_s`` seconds it

1. rereads the experiment file, so frame globs see new files (an edit of the file takes effect
   at the next poll; an invalid edit is reported once and the last good version is kept);
2. picks the frames that are complete: every frame of a file unchanged for ``settle_s``
   seconds and, in an HDF5 stack still being written, every frame but the last;
3. runs every configured stage (:func:`~xrdpipe.run.workflow.run_experiment`) on what is new:
   the new frames are integrated and fitted, the lattice, electrochemistry, figures and exports
   are brought up to date. The integrator is built once and kept.
4. rewrites ``<output>/report.html`` after every poll with new work, as a page that reloads
   itself (every ``interval_s`` seconds, at least 5), so it can be left open in a browser.
   When the watch stops (idle or ``max_polls``) the page is written once more without the
   self-refresh; after Ctrl-C it keeps reloading until ``xrdpipe run`` or ``xrdpipe report``.

The run file is published whole at the end of every stage (a reader, such as a notebook or
``xrdpipe plot``, never sees a half-written file) and figures are replaced atomically. A frame
that cannot be read while its file is still changing is retried at the next poll; it is
recorded as failed only once its file has not changed for ``retry_s`` seconds. Ctrl-C stops at
once, keeping everything published, and ``xrdpipe run`` or ``xrdpipe watch`` goes on from there.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from ..config import load_experiment
from ..errors import ConfigError, XrdpipeError
from ..frames import FrameRef, list_frames
from .report import report_experiment
from .workflow import RunSummary, run_experiment, stage_keys

__all__ = ["watch_experiment", "WatchSummary", "ready_frames"]


def ready_frames(refs: Sequence[FrameRef], *, settle_s: float, now: float | None = None) -> list[FrameRef]:
    """The frames of ``refs`` that are complete: all frames of a file unchanged for ``settle_s``
    seconds, and all but the last frame of a stack still growing."""
    now = time.time() if now is None else now
    out: list[FrameRef] = []
    groups: dict[Path, list[FrameRef]] = {}
    for r in refs:
        groups.setdefault(r.file, []).append(r)
    for path, group in groups.items():
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        if age >= settle_s:
            out.extend(group)
        elif len(group) > 1 and not group[0].error:
            out.extend(group[:-1])
    return out


@dataclass
class WatchSummary:
    """What a watch did: polls, the polls that found work, frames at the end, why it stopped."""

    polls: int = 0
    busy: int = 0
    frames: int = 0
    stopped: str = ""
    last: RunSummary | None = None
    latencies_s: list[float] = field(default_factory=list)   # per busy poll: frame seen -> all stages done

    def __str__(self) -> str:
        lines = [f"watched {self.polls} poll(s), {self.busy} with new work; {self.frames} frame(s) in the run; "
                 f"stopped: {self.stopped}"]
        if self.last is not None:
            lines.append(str(self.last))
        return "\n".join(lines)


def watch_experiment(path: Path | str, *, interval_s: float = 2.0, settle_s: float = 1.0, retry_s: float = 30.0,
                     idle_stop_s: float | None = None, max_polls: int | None = None, scheduler: str | None = None,
                     workers: int | None = None, echo: Callable[[str], None] | None = None,
                     on_poll: Callable[[RunSummary | None], None] | None = None) -> WatchSummary:
    """Follow the experiment file ``path`` until Ctrl-C, ``idle_stop_s`` seconds without a new
    frame, or ``max_polls`` polls (see the module docstring).

    Example
    -------
    >>> watch_experiment("nfm-cell2.toml", interval_s=5, idle_stop_s=3600)   # doctest: +SKIP
    """
    say = echo or (lambda _line: None)
    summary = WatchSummary()
    poll = _Poller(Path(path), say, dict(scheduler=scheduler, workers=workers, retry_s=retry_s,
                                         report_refresh_s=max(5.0, interval_s)), settle_s)
    idle_since = time.monotonic()
    while True:
        summary.polls += 1
        t_poll = time.monotonic()
        result = poll.once(summary.polls)
        if result is not None:
            summary.frames = result.frames
            summary.last = result
            if result.did_work:
                summary.busy += 1
                summary.latencies_s.append(time.monotonic() - t_poll)
                idle_since = time.monotonic()
                say(_line(result, result.results.get("integrate")))
        if on_poll is not None:
            on_poll(result)
        if idle_stop_s is not None and time.monotonic() - idle_since >= idle_stop_s:
            summary.stopped = f"no new frame for {idle_stop_s:g} s"
            poll.final_report()
            return summary
        if max_polls is not None and summary.polls >= max_polls:
            summary.stopped = f"{max_polls} poll(s) done"
            poll.final_report()
            return summary
        time.sleep(max(0.0, interval_s - (time.monotonic() - t_poll)))


class _Poller:
    """One poll of :func:`watch_experiment` at a time, with what polls carry over: the last valid
    experiment, the integrator, and what was last said (so that it is said once)."""

    def __init__(self, path: Path, say: Callable[[str], None], options: dict, settle_s: float):
        self.path, self.say, self.options, self.settle_s = path, say, options, settle_s
        self.cache: dict = {}
        self.exp = None
        self.reported = ""
        self.waiting_for_files = False
        self.retry_poll = False
        self.last: tuple | None = None         # the experiment and live key of the last run

    def once(self, n: int) -> RunSummary | None:
        """Reread the experiment file and run every stage on the complete frames; the run's
        summary, or None when there was nothing to run (or it failed, said once)."""
        self._load()
        if self.exp is None:
            return None
        exp = self.exp
        spec = exp.frames if exp.frames is not None else exp.patterns
        if not spec.files:
            if not self.waiting_for_files:
                self.say(f"{_now()} waiting for the first frame file")
                self.waiting_for_files = True
            return None
        self.waiting_for_files = False
        refs = list_frames(spec.files, dataset=exp.frames.dataset) if exp.frames is not None else \
            [FrameRef(Path(f)) for f in spec.files]
        ready = ready_frames(refs, settle_s=self.settle_s)
        chosen = {r.key for r in ready}
        if not chosen:
            return None
        # only files with complete frames take part: a file still being written changes
        # no stage key, so it causes no work until it is ready
        files = {r.file for r in ready}
        part = "frames" if exp.frames is not None else "patterns"
        current = exp.model_copy(update={part: spec.model_copy(
            update={"files": [f for f in spec.files if Path(f) in files]})})
        live_key = hashlib.sha1("\n".join(sorted(chosen)).encode()).hexdigest()[:16]
        if self.retry_poll:                    # frames still being written: look again
            live_key += f"+retry{n}"
        try:
            result = run_experiment(current, progress=False, ready=lambda rs: [r for r in rs if r.key in chosen],
                                    cache=self.cache, live_key=live_key, **self.options)
        except XrdpipeError as exc:   # e.g. a full disk: said once, tried again next poll
            self._report(f"{_now()} error (retried at every poll): {exc}", str(exc))
            return None
        self.reported = ""
        self.last = (current, live_key)
        self.retry_poll = bool(getattr(result.results.get("integrate"), "waiting", 0))
        return result

    def final_report(self) -> None:
        """The report once more, without the self-refresh (the watch has stopped)."""
        if self.last is None:
            return
        exp, live_key = self.last
        try:
            report_experiment(exp, keys=stage_keys(exp, live_key=live_key))
        except XrdpipeError as exc:
            self.say(f"{_now()} the report could not be rewritten: {exc}")

    def _load(self) -> None:
        try:
            self.exp = load_experiment(self.path, live=True)
            self.reported = ""
        except ConfigError as exc:
            self._report(f"{_now()} the experiment file is not valid; "
                         + ("waiting for it to be fixed" if self.exp is None else "keeping its last valid version")
                         + f":\n{exc}", str(exc))

    def _report(self, text: str, key: str) -> None:
        if key != self.reported:
            self.say(text)
            self.reported = key


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _line(result: RunSummary, integ) -> str:
    """One line per poll with new work: what is new, the phases now, what was redone."""
    new = getattr(integ, "integrated", 0) if integ is not None else 0
    failed = len(getattr(integ, "failed", []) or []) if integ is not None else 0
    phases = ", ".join(f"{k} {v[0]}" for k, v in result.phases.items())
    ran = [k for k, v in result.stages.items() if v == "ran"]
    return (f"{_now()} +{new} frame(s)" + (f", {failed} failed" if failed else "")
            + f"; {result.frames} in the run" + (f"; phases (frames): {phases}" if phases else "")
            + f"; updated {', '.join(ran)} ({result.seconds:.1f} s)")
