"""The whole-series naming check's second run, fitted beside the first on a second core.

Where the first lines of two similar phases are named by their typed cells
(:func:`~xrdpipe.phasefit.fitter.first_tie`), :func:`~xrdpipe.phasefit.fitter.fit_phases` fits
the whole series again with the other name and keeps the run that fits it better
(:func:`~xrdpipe.phasefit.fitter.naming_verdict`). That second run depends on nothing the first
one finds after its forward pass named those lines: only on the pair, the model and the run's
zero shift, all known then. So it starts there, in a child process forked at that moment
(:class:`AheadRun`), while the first run goes on; afterwards the first run's table says which
pair the check needs, and the child's table is taken where it is that pair. It is the same
computation as the one made afterwards, on the same inputs: the same numbers, bit for bit
(tested). Anything else (another pair, no tie after the backward pass, a child that failed or was
killed) and the second run is fitted afterwards as before.

Only where a process can be forked cheaply and safely: Linux, two or more workers (``[fit]
workers``). The child fits in memory what the parent holds in memory (the patterns are shared
by the fork, copy on write); it ignores Ctrl-C, which the parent handles by ending it.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from typing import Any, Callable

__all__ = ["AheadRun", "available"]


def available(workers: int) -> bool:
    """Whether a second run can be fitted beside the first: Linux (fork), ``workers`` >= 2."""
    return workers >= 2 and sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class AheadRun:
    """``compute(p, q)`` in a child process, started by :meth:`start` (once), taken by
    :meth:`result` where it was started for the same pair.

    Example
    -------
    >>> ahead = AheadRun(lambda p, q: p + q)
    >>> ahead.start(1, 2)                  # doctest: +SKIP
    >>> ahead.result(1, 2)                 # doctest: +SKIP
    3
    """

    def __init__(self, compute: Callable[[int, int], Any]):
        self._compute = compute
        self._proc = None
        self._conn = None
        #: the pair it was started for (None: not started)
        self.pair: tuple[int, int] | None = None
        #: why its result was not taken ("" while none was asked for, or where it was)
        self.missed = ""

    def start(self, p: int, q: int) -> None:
        """Fork the child that computes ``compute(p, q)``; a second call does nothing."""
        if self.pair is not None:
            return
        self.pair = (int(p), int(q))
        ctx = multiprocessing.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(self._compute, self.pair, send), daemon=True,
                           name="xrdpipe-naming")
        try:
            proc.start()
        except OSError as exc:          # (no memory or process left: fitted afterwards instead)
            receive.close()
            self.missed = f"could not start a second process: {exc}"
            return
        finally:
            send.close()
        self._proc, self._conn = proc, receive

    def result(self, p: int, q: int) -> Any | None:
        """The child's ``compute(p, q)``; None where it was not started for this pair, or
        failed (:attr:`missed` says why). Ends the child either way."""
        try:
            if self._proc is None:
                self.missed = self.missed or "not started"
                return None
            if self.pair != (int(p), int(q)):
                self.missed = f"started for phases {self.pair}, the check is of {(int(p), int(q))}"
                return None
            try:
                status, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._proc.join(10)          # (its pipe closes as it ends: its exit code follows)
                self.missed = f"the second process ended without a result (exit code {self._proc.exitcode}, {exc!r})"
                return None
            if status != "ok":
                self.missed = f"the second process failed: {payload}"
                return None
            return payload
        finally:
            self.close()

    def close(self) -> None:
        """End the child (if still running) and free its pipe."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
            proc.join()
            proc.close()

    def __enter__(self) -> "AheadRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child(compute: Callable[[int, int], Any], pair: tuple[int, int], conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # (the parent's to handle: it ends this one)
    try:
        out = ("ok", compute(*pair))
    except BaseException as exc:                     # noqa: BLE001 (reported to the parent)
        out = ("error", f"{type(exc).__name__}: {exc}")
    try:
        conn.send(out)
    except Exception as exc:                         # (a result that cannot be pickled)
        conn.send(("error", f"its result could not be sent: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()
