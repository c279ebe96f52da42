"""Frames streamed through an :class:`~xrdpipe.integration.Integrator`: read, integrated and
yielded in order, a bounded number in flight.

:func:`integrate_frames` streams frames through the integrator: each worker thread reads
(decompresses) a frame and integrates it; the bitshuffle decoder and the integration kernel
release the GIL, so the cores decompress one frame while integrating another; each result goes
straight to a sink (the run file), so memory stays bounded however many frames there are. While
the integrator is first built, :class:`FramePrefetch` reads the first frames on the side. Frames
can also be integrated on a local process pool or a Dask cluster (:mod:`xrdpipe.parallel`): the
integrator pickles as its matrices only. A frame that cannot be read becomes a failure record
(:class:`IntegratedFrame` with ``error``), never an exception.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import FrameReadError
from .frames import FrameRef, read_frame
from .integration import Integrator

__all__ = ["IntegratedFrame", "integrate_frames", "FramePrefetch"]


@dataclass(frozen=True)
class IntegratedFrame:
    """The outcome for one frame: a pattern, or ``error`` set and arrays None."""

    position: int
    ref: FrameRef
    intensity: np.ndarray | None
    sigma: np.ndarray | None
    error: str | None = None



class FramePrefetch:
    """Frames read and decompressed ahead, in file order, on one low-priority thread, while the
    integrator is being built: the set-up leaves a core idle now and then (pyFAI's geometry
    arrays, the normalisation, joining the bands), and that time goes to the first frames.

    Reading stops at :meth:`stop` (call it when the integrator is ready) or once ``budget_bytes``
    of frames are held; :func:`integrate_frames` takes the frames read so far (``prefetch=``) and
    reads the others itself. A frame that cannot be read is kept as its error and reported as
    usual. Only for integration in this process (threads or serial scheduler): frames are not
    sent to other processes.
    """

    def __init__(self, refs: Iterable[FrameRef], shape: tuple[int, int], *, budget_bytes: int = 1 << 30):
        self._refs = list(refs)
        self._shape = tuple(shape)
        self._budget = int(budget_bytes)
        self._ready: dict[str, np.ndarray | FrameReadError] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self.read = 0          # frames read ahead so far
        self._thread = threading.Thread(target=self._run, name="xrdpipe-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _lower_thread_priority()
        held = 0
        for ref in self._refs:
            if self._stop.is_set() or held >= self._budget:
                return
            if ref.error:
                continue
            try:
                data: np.ndarray | FrameReadError = read_frame(ref, shape=self._shape)
                held += data.nbytes
            except FrameReadError as exc:
                data = exc
            except Exception:      # never the prefetch's to report: the frame is read again later
                return
            with self._guard:
                if self._closed:
                    return
                self._ready[ref.key] = data
                self.read += 1

    def stop(self) -> None:
        """Read no further frame (the one being read is still kept)."""
        self._stop.set()

    def take(self, ref: FrameRef) -> np.ndarray | FrameReadError | None:
        """The frame of ``ref`` if it was read ahead (once), else None."""
        with self._guard:
            return self._ready.pop(ref.key, None)

    def close(self) -> None:
        """Stop, drop the frames not taken, and wait for the frame being read (a thread left
        inside a decoder or a kernel's compilation while the interpreter exits can crash it)."""
        with self._guard:
            self._closed = True
            self._stop.set()
            self._ready.clear()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)


def _lower_thread_priority() -> None:
    """This thread only at nice 19 on Linux (elsewhere a thread's priority is not set this way)."""
    import os
    import sys

    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


def _process(job: tuple, integrator: Integrator) -> IntegratedFrame:
    pos, ref = job[0], job[1]
    data = job[2] if len(job) > 2 else None       # read ahead (FramePrefetch)
    try:
        if isinstance(data, FrameReadError):
            raise data
        if data is None:
            data = read_frame(ref, shape=integrator.shape, reuse=integrator._read_buffers())
    except FrameReadError as exc:
        return IntegratedFrame(pos, ref, None, None, exc.reason)
    try:
        intensity, sigma = integrator.integrate(data)
    except Exception as exc:  # one bad frame never stops the run
        return IntegratedFrame(pos, ref, None, None, f"integration failed: {type(exc).__name__}: {exc}")
    return IntegratedFrame(pos, ref, intensity, sigma)


def integrate_frames(jobs: Iterable[tuple[int, FrameRef]], integrator: Integrator, *,
                     workers: int | None = None, prefetch: int | None = None,
                     scheduler: str | object = "threads",
                     read_ahead: FramePrefetch | None = None) -> Iterator[IntegratedFrame]:
    """Stream ``(position, ref)`` jobs through the integrator, yielding results in order.

    ``workers`` (default: the number of cores) read and integrate whole frames at once on the
    ``scheduler`` (see :mod:`xrdpipe.parallel`: ``"processes"``, ``"threads"``, ``"serial"`` or a
    Dask scheduler address); the integrator is sent once to each worker. At most ``prefetch``
    frames (default 2 x workers) are in flight, so memory is bounded. Frames already read by
    ``read_ahead`` (threads and serial only) are integrated without being read again. A frame
    that cannot be read yields an :class:`IntegratedFrame` with ``error`` set.
    """
    from .parallel import map_ordered

    if read_ahead is not None:
        if scheduler not in ("threads", "serial"):
            raise ValueError(f"frames read ahead stay in this process: scheduler {scheduler!r} cannot take them")
        jobs = ((pos, ref, read_ahead.take(ref)) for pos, ref in jobs)
    yield from map_ordered(_process, jobs, context=integrator, scheduler=scheduler, workers=workers,
                           prefetch=prefetch, on_crash=_crashed)


def _crashed(job: tuple) -> IntegratedFrame:
    """The record of a frame whose reading or integration killed a worker process, twice."""
    pos, ref = job[0], job[1]
    return IntegratedFrame(pos, ref, None, None, "the worker process reading and integrating this frame died "
                                                 "(twice: a crash in a decompression filter or a library)")
