"""What every stage runner shares, said once: :func:`stage` opens the run file's transaction,
clears the stage's record while its outputs are in flux, times the stage, closes its progress
bars, and puts the time into its summary, also when it fails half way."""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..safeio import transaction
from .stagelog import mark_stage

__all__ = ["stage", "Stage", "progress_bar", "DEPENDS", "takes_experiment"]

#: The stages of a run in their order, each with the stages whose results it reads (a stage runs
#: again when one of those ran; see :mod:`xrdpipe.run.workflow`).
DEPENDS = {"integrate": (), "echem": ("integrate",), "fit": ("integrate",), "refine": ("integrate", "echem"),
           "lattice": ("fit", "echem", "refine"), "plots": ("integrate", "echem", "fit", "lattice", "refine"),
           "export": ("integrate", "echem")}


def takes_experiment(fn):
    """A stage runner ``fn(exp, ...)`` that also takes the path of an experiment file (``str`` or
    ``os.PathLike``, read by :func:`~xrdpipe.config.load_experiment`); anything else that is not
    an :class:`~xrdpipe.config.Experiment` is a TypeError saying what is expected (it was an
    AttributeError from deep inside the stage)."""

    @functools.wraps(fn)
    def runner(exp, *args, **kwargs):
        from ..config import Experiment, load_experiment

        if not isinstance(exp, Experiment):
            if not isinstance(exp, (str, os.PathLike)):
                raise TypeError(f"{fn.__name__} takes an Experiment (xrdpipe.load_experiment(\"experiment.toml\")) "
                                f"or the path of an experiment file, not {type(exp).__name__}")
            exp = load_experiment(exp)
        return fn(exp, *args, **kwargs)

    return runner


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` frames (silent when not ``enabled`` or when there is nothing to do)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled or total == 0,
                dynamic_ncols=True, leave=False)


@dataclass
class Stage:
    """A stage under way (what :func:`stage` yields)."""

    name: str
    started: float
    progress: bool = True
    #: the stage's summary: its ``seconds`` are set when the stage ends
    summary: Any = None
    _bars: list = field(default_factory=list)

    def bar(self, total: int, desc: str | None = None):
        """A progress bar, closed when the stage ends (or earlier, by whoever holds it)."""
        b = progress_bar(total, desc or self.name, self.progress)
        self._bars.append(b)
        return b

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextmanager
def stage(exp, name: str, *, progress: bool = True, started: float | None = None,
          summary: Any = None) -> Iterator[Stage]:
    """Run the body as stage ``name`` of ``exp``'s run file: in one transaction (published at
    every ``[run] checkpoint_s`` and at the end, also on an error or Ctrl-C), with the stage's
    record cleared first (an interrupted stage runs again), and ``summary.seconds`` set at the
    end (``started``: when the stage began, if before this, e.g. with the integrator's set-up).

    Example
    -------
    >>> with stage(exp, "fit", summary=summary) as st:             # doctest: +SKIP
    ...     bar = st.bar(n)
    """
    st = Stage(name, time.perf_counter() if started is None else started, progress, summary)
    run_file = exp.run.run_file
    try:
        with transaction(run_file, checkpoint_s=exp.run.checkpoint_s):
            mark_stage(run_file, name, None)
            try:
                yield st
            finally:
                for b in st._bars:
                    b.close()
    finally:
        if st.summary is not None and hasattr(st.summary, "seconds"):
            st.summary.seconds = st.seconds
