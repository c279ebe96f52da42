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

Through a run file (``xrdpipe fit``), :class:`StreamedRun`: the child never opens the run file
(HDF5 is not safe across a fork); the parent hands it each block of frames it reads for itself,
and writes what comes back (:class:`xrdpipe.run.fit._NamingBeside`).

Only where a process can be forked cheaply and safely: Linux, two or more workers (``[fit]
workers``). The child fits in memory what the parent holds in memory (the patterns are shared
by the fork, copy on write); it ignores Ctrl-C, which the parent handles by ending it. (The
parent's threads are idle between frames when it forks, and the child makes its own.)
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import warnings
from typing import Any, Callable

__all__ = ["AheadRun", "StreamedRun", "available"]


def available(workers: int) -> bool:
    """Whether a second run can be fitted beside the first: Linux (fork), ``workers`` >= 2, and
    not inside a daemonic process (a pool's worker), which may have no children."""
    return (workers >= 2 and sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


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
            _fork(proc)
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
            _end(proc)
            proc.close()

    def __enter__(self) -> "AheadRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fork(proc) -> None:
    # (Python 3.12+ warns at any fork of a process with threads: this one's are idle then, and
    # the child uses none of them)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
        proc.start()


def _end(proc) -> None:
    """A child ended: stopped if still running (its result no longer wanted), then reaped."""
    if proc.is_alive():
        proc.terminate()
    proc.join()


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


class StreamedRun:
    """A fitter's forward pass over blocks of frames handed over one after the other, in a child
    process forked with the fitter (:meth:`start`, with the first block): the run file's
    counterpart of :class:`AheadRun`. The child never opens the run file (HDF5 is not safe across
    a fork): the parent sends each block it read (:meth:`send`), and a thread of the parent's
    takes each block's table as it comes back (:meth:`tables`). Each block starts from the state
    stored with the last row of the block before, as :func:`xrdpipe.run.fit._forward` resumes
    it from the run file: the same numbers as the blocks fitted there one after the other."""

    def __init__(self):
        self._proc = None
        self._send = None
        self._receiver = None
        self._got: list = []
        self._lock = threading.Lock()
        self._ended = False
        #: why the child gave no more tables ("" while it gives them)
        self.missed = ""

    def start(self, fitter, block: tuple) -> bool:
        """Fork the child with ``fitter`` and its first ``block`` (frames, intensity, sigma,
        time_s, usable, reasons); False where no process could be started (:attr:`missed`)."""
        ctx = multiprocessing.get_context("fork")
        to_child, from_parent = ctx.Pipe(duplex=False)[::-1]
        from_child, to_parent = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fit_blocks, args=(fitter, block, from_parent, to_parent, (to_child, from_child)),
                           daemon=True, name="xrdpipe-naming")
        try:
            _fork(proc)
        except OSError as exc:
            for c in (to_child, from_parent, from_child, to_parent):
                c.close()
            self.missed = f"could not start a second process: {exc}"
            return False
        from_parent.close()
        to_parent.close()
        self._proc, self._send = proc, to_child
        self._receiver = threading.Thread(target=self._receive, args=(from_child, proc), daemon=True,
                                          name="xrdpipe-naming-tables")
        self._receiver.start()
        return True

    def _receive(self, conn, proc) -> None:
        try:
            while True:
                try:
                    kind, frames, table = conn.recv()
                except (EOFError, OSError) as exc:
                    proc.join(10)
                    self._missed(f"the second process ended without a result (exit code {proc.exitcode}, {exc!r})")
                    return
                if kind != "table":
                    if kind == "error":
                        self._missed(f"the second process failed: {frames}")
                    return
                with self._lock:
                    self._got.append((frames, table))
        finally:
            conn.close()

    def _missed(self, why: str) -> None:
        with self._lock:
            self.missed = self.missed or why

    def send(self, block: tuple) -> None:
        """The next block, in order (waits while the child is busy with the one before)."""
        if self._send is None or self.missed:
            return
        try:
            self._send.send(block)
        except (OSError, ValueError) as exc:      # (the child is gone: its tables say how far it got)
            self._missed(f"the second process stopped taking frames: {exc!r}")

    def end(self) -> None:
        """No more blocks: the child sends its last table and ends."""
        if self._send is not None and not self._ended:
            self._ended = True
            try:
                self._send.send(None)
            except (OSError, ValueError):
                pass

    def tables(self, wait: bool = False) -> list:
        """The (frames, table) that came back since the last call, in order; with ``wait``,
        every one still to come (after :meth:`end`), and the child ended."""
        if wait and self._receiver is not None:
            self.end()
            self._receiver.join()
            self.close()
        with self._lock:
            got, self._got = self._got, []
        return got

    def close(self) -> None:
        """End the child (if still running)."""
        send, proc, receiver = self._send, self._proc, self._receiver
        self._send = self._proc = self._receiver = None
        if send is not None:
            send.close()
        if proc is not None:
            _end(proc)
        if receiver is not None:
            receiver.join(10)
        if proc is not None:
            proc.close()

    def __enter__(self) -> "StreamedRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fit_blocks(fitter, block, conn_in, conn_out, parents) -> None:
    import numpy as np

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for c in parents:            # (the parent's ends, copied by the fork: closed, so that the
        c.close()                # parent's end is seen here as the end of the blocks)
    try:
        stored = None
        while block is not None:
            frames, intensity, sigma, time_s, usable, reasons = block
            fitter.resume(stored)
            table = fitter.fit_block(intensity, sigma, frame=frames, time_s=time_s, usable=usable, reasons=reasons)
            conn_out.send(("table", frames, table))
            stored = {**table.phase, "done": np.ones(len(frames), bool)}
            block = conn_in.recv()
        conn_out.send(("end", None, None))
    except BaseException as exc:                     # noqa: BLE001 (reported to the parent)
        try:
            conn_out.send(("error", f"{type(exc).__name__}: {exc}", None))
        except Exception:
            pass
    finally:
        conn_out.close()
        conn_in.close()
