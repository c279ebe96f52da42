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
workers``), not inside a daemonic process. The child fits in memory what the parent holds in
memory (the patterns are shared by the fork, copy on write); it ignores Ctrl-C, which the parent
handles by ending it, and it ends with the parent whatever ends that (``PR_SET_PDEATHSIG``). The
warnings it gives are given again by the parent, where a caller's filters and captures see them.
xrdpipe's own threads are idle between frames when it forks (the child makes its own); a host
with threads of its own (a notebook, a GUI) could, in principle, have one holding a lock the
child then waits for forever: so the parent never waits for the child without a limit (a
minute and ten times its own work), and a child that has not answered by then is ended and its
run fitted afterwards, to the same numbers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable

__all__ = ["AheadRun", "StreamedRun", "available", "patience"]


def available(workers: int) -> bool:
    """Whether a second run can be fitted beside the first: Linux (fork), ``workers`` >= 2, and
    not inside a daemonic process (a pool's worker), which may have no children."""
    return (workers >= 2 and sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def patience(own_seconds: float) -> float:
    """How long the parent waits for the child (seconds), having itself spent ``own_seconds`` on
    the like: a minute, and ten times that (the second run can take twice the first's time)."""
    return 60.0 + 10.0 * max(float(own_seconds), 0.0)


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
        self._proc = ctx.Process(target=_child, args=(self._compute, self.pair, send, os.getpid()), daemon=True,
                                 name="xrdpipe-naming")
        self._conn = receive
        try:
            self._proc.start()
        except OSError as exc:          # (no memory or process left: fitted afterwards instead)
            self.missed = f"could not start a second process: {exc}"
            self.close()
        finally:
            send.close()

    def result(self, p: int, q: int, wait_s: float | None = None) -> Any | None:
        """The child's ``compute(p, q)``, waiting at most ``wait_s`` seconds (None: as long as
        it takes); None where it was not started for this pair, failed or did not answer in
        time (:attr:`missed` says why). Ends the child either way."""
        try:
            if self._proc is None:
                self.missed = self.missed or "not started"
                return None
            if self.pair != (int(p), int(q)):
                self.missed = f"started for phases {self.pair}, the check is of {(int(p), int(q))}"
                return None
            if wait_s is not None and not self._conn.poll(wait_s):
                self.missed = f"the second process gave no result within {wait_s:.0f} s: ended"
                return None
            try:
                status, payload, said = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._proc.join(10)          # (its pipe closes as it ends: its exit code follows)
                self.missed = f"the second process ended without a result (exit code {self._proc.exitcode}, {exc!r})"
                return None
            _say_again(said)
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
        _end(proc)

    def __enter__(self) -> "AheadRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(proc) -> int | None:
    """A child stopped if still running (its result no longer wanted) and reaped: its exit
    code (None: no child, or one interrupted before it started)."""
    if proc is None:
        return None
    try:
        if proc.is_alive():
            proc.terminate()
        proc.join()
    except (AssertionError, ValueError):    # (never started)
        return None
    return proc.exitcode


def _end(proc) -> None:
    """A child stopped (:func:`_stop`) and its resources freed."""
    if _stop(proc) is not None:
        proc.close()


def _as_child(parent: int) -> None:
    """What a child does first: Ctrl-C is the parent's to handle (it ends this one), and it
    ends with the parent whatever ends that (SIGTERM from the kernel: Linux's
    ``PR_SET_PDEATHSIG``; a parent already gone, at once)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)    # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _said(caught) -> list:
    return [(str(w.message), w.category, w.filename, w.lineno) for w in caught]


def _say_again(said) -> None:
    """The child's warnings, given again here (where the caller's filters and captures see them)."""
    for message, category, filename, lineno in said or ():
        warnings.warn_explicit(message, category, filename, lineno)


def _child(compute: Callable[[int, int], Any], pair: tuple[int, int], conn, parent: int) -> None:
    _as_child(parent)
    with warnings.catch_warnings(record=True) as caught:     # (given again by the parent)
        try:
            out = ("ok", compute(*pair))
        except BaseException as exc:                 # noqa: BLE001 (reported to the parent)
            out = ("error", f"{type(exc).__name__}: {exc}")
    try:
        conn.send((*out, _said(caught)))
    except Exception as exc:                         # (a result that cannot be pickled)
        conn.send(("error", f"its result could not be sent: {type(exc).__name__}: {exc}", []))
    finally:
        conn.close()


#: How long a write that found the child gone waits for the child's last message (its reason).
_REASON_S = 5.0


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
        self._eof = ""
        #: why the child gave no more tables ("" while it gives them)
        self.missed = ""

    def start(self, fitter, block: tuple) -> bool:
        """Fork the child with ``fitter`` and its first ``block`` (frames, intensity, sigma,
        time_s, usable, reasons); False where no process could be started (:attr:`missed`)."""
        ctx = multiprocessing.get_context("fork")
        to_child, from_parent = ctx.Pipe(duplex=False)[::-1]
        from_child, to_parent = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_fit_blocks, daemon=True, name="xrdpipe-naming",
                                 args=(fitter, block, from_parent, to_parent, (to_child, from_child), os.getpid()))
        self._send = to_child
        try:
            self._proc.start()
        except OSError as exc:
            from_child.close()
            self.missed = f"could not start a second process: {exc}"
            self.close()
            return False
        finally:
            from_parent.close()
            to_parent.close()
        self._receiver = threading.Thread(target=self._receive, args=(from_child,), daemon=True,
                                          name="xrdpipe-naming-tables")
        self._receiver.start()
        return True

    def _receive(self, conn) -> None:
        try:
            while True:
                try:
                    kind, frames, table, said = conn.recv()
                except (EOFError, OSError) as exc:
                    self._eof = repr(exc)        # (its exit code is read once it is reaped: close)
                    return
                if kind == "error":
                    self._missed(f"the second process failed: {frames}")
                with self._lock:
                    self._got.append((frames, table, said))
                if kind != "table":
                    return
        finally:
            conn.close()

    def _missed(self, why: str) -> None:
        with self._lock:
            self.missed = self.missed or why

    def send(self, block: tuple, wait_s: float | None = None) -> None:
        """The next block, in order: waits while the child is busy with the one before, at most
        ``wait_s`` seconds (None: as long as it takes), after which the child is ended."""
        if self._send is None or self.missed:
            return
        conn, failed = self._send, []

        def put() -> None:
            try:
                conn.send(block)
            except (OSError, ValueError, TypeError) as exc:    # (the child is gone: its tables say how far it got)
                failed.append(exc)

        sender = threading.Thread(target=put, daemon=True, name="xrdpipe-naming-frames")
        sender.start()
        sender.join(wait_s)
        if sender.is_alive():
            self._missed(f"the second process took no frames within {wait_s:.0f} s: ended")
            _stop(self._proc)        # (its end of the pipe gone, the write fails: then closed)
            sender.join()
            self.close()
        elif failed:
            # (a child that failed said why before it went: its last message is read first,
            # else a write racing its end would be all the reason recorded)
            if self._receiver is not None:
                self._receiver.join(_REASON_S)
            self._missed(f"the second process stopped taking frames: {failed[0]!r}")

    def end(self, wait_s: float | None = None) -> None:
        """No more blocks: the child sends its last table and ends (``wait_s``: as :meth:`send`)."""
        if self._send is not None and not self._ended:
            self._ended = True
            self.send(None, wait_s)

    def tables(self, wait_s: float | None = None, *, wait: bool = False) -> list:
        """The (frames, table) that came back since the last call, in order (the child's
        warnings given again here); with ``wait``, every one still to come (after :meth:`end`),
        waiting at most ``wait_s`` seconds for them, and the child ended."""
        if wait and self._receiver is not None:
            self.end(wait_s)
            self._receiver.join(wait_s)
            if self._receiver.is_alive():
                self._missed(f"the second process gave no more tables within {wait_s:.0f} s: ended")
            self.close()
        with self._lock:
            got, self._got = self._got, []
        out = []
        for frames, table, said in got:
            _say_again(said)
            if table is not None:
                out.append((frames, table))
        return out

    def close(self) -> None:
        """End the child (if still running)."""
        code = _stop(self._proc)
        send, proc, receiver = self._send, self._proc, self._receiver
        self._send = self._proc = self._receiver = None
        if send is not None:
            send.close()
        if receiver is not None:
            receiver.join(10)
        if self._eof:
            self._missed(f"the second process ended without a result (exit code {code}, {self._eof})")
        if proc is not None and code is not None:
            proc.close()

    def __enter__(self) -> "StreamedRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fit_blocks(fitter, block, conn_in, conn_out, parents, parent: int) -> None:
    import numpy as np

    _as_child(parent)
    for c in parents:            # (the parent's ends, copied by the fork: closed, so that the
        c.close()                # parent's end is seen here as the end of the blocks)
    with warnings.catch_warnings(record=True) as caught:     # (given again by the parent)
        try:
            stored = None
            while block is not None:
                frames, intensity, sigma, time_s, usable, reasons = block
                fitter.resume(stored)
                table = fitter.fit_block(intensity, sigma, frame=frames, time_s=time_s, usable=usable,
                                         reasons=reasons)
                conn_out.send(("table", frames, table, _said(caught)))
                caught.clear()
                stored = {**table.phase, "done": np.ones(len(frames), bool)}
                block = conn_in.recv()
            conn_out.send(("end", None, None, _said(caught)))
        except BaseException as exc:                 # noqa: BLE001 (reported to the parent)
            try:
                conn_out.send(("error", f"{type(exc).__name__}: {exc}", None, _said(caught)))
            except Exception:
                pass
        finally:
            conn_out.close()
            conn_in.close()
