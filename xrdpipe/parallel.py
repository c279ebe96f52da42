"""Where per-frame work runs: a local process pool (the default), threads, serially, or a Dask
distributed cluster.

:func:`map_ordered` streams jobs through ``fn(job, context)`` and yields the results in job order,
with at most ``prefetch`` jobs in flight, so memory stays bounded however many jobs there are.
``context`` (the integrator, with its sparse matrix) is sent once to each worker, not once per
job. The caller stays the only writer of the run file: workers compute, the caller stores.

Schedulers (``[run] scheduler`` or ``--scheduler``):

``"processes"``
    a pool of ``workers`` processes on this machine, started by a fork server (a clean process,
    so OpenMP and threads of the caller are never forked); with one worker the jobs run here.
``"threads"``
    ``workers`` threads (the integrator's sparse products release the GIL).
``"serial"``
    one after the other, in this process (for debugging and as the reference).
``"tcp://host:port"`` (or ``tls://``...)
    a running Dask distributed scheduler; its workers must see the frame files under the same
    paths. Needs the ``dask`` extra: ``pip install "xrdpipe[dask]"``.

Every scheduler runs the same function on the same inputs, so the results are identical; the
test-suite checks it bit for bit.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

__all__ = ["LOCAL_SCHEDULERS", "check_scheduler", "map_ordered", "default_workers", "catch_interrupts",
           "interrupted", "stop_if_interrupted", "forget_interrupt", "lasting_pool"]

LOCAL_SCHEDULERS = ("processes", "threads", "serial")
_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc|ws|wss)://\S+$")

_CONTEXT: Any = None          # the context of this worker process
_INTERRUPTED = threading.Event()


def catch_interrupts() -> None:
    """Make Ctrl-C (SIGINT) stop this process wherever it lands (the command line calls it).

    Python raises KeyboardInterrupt wherever the main thread happens to be, and where that is
    a weakref callback or a ``__del__`` (a process pool starting, for example) it is printed
    and dropped. So the signal is also remembered: :func:`stop_if_interrupted`, called after
    every frame and between stages, raises it again, and the command line counts any error
    that follows an interrupt as the interrupt.
    """
    import signal

    def on_sigint(signum, frame):
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed (see :func:`catch_interrupts`)."""
    return _INTERRUPTED.is_set()


def forget_interrupt() -> None:
    """Clear the Ctrl-C remembered by :func:`catch_interrupts` (once it has been handled)."""
    _INTERRUPTED.clear()


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if the first one was swallowed."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def check_scheduler(value: str) -> str:
    """``value`` if it names a scheduler, else a ValueError saying what is accepted."""
    if value in LOCAL_SCHEDULERS or _ADDRESS.match(value):
        return value
    raise ValueError(f"expected \"processes\", \"threads\", \"serial\" or a Dask scheduler address such as "
                     f"\"tcp://host:8786\", got {value!r}")


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: thread pools that last the process, by (process, threads, name): made once, so that a call
#: in a loop over frames does not start threads (a child forked from a process that had one has
#: none of its threads: it makes its own)
_LASTING: dict[tuple[int, int, str], ThreadPoolExecutor] = {}


def lasting_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads named ``name``, made the first time it is asked for in this
    process and kept (for compiled work that runs without the GIL, handed over call by call)."""
    key = (os.getpid(), threads, name)
    pool = _LASTING.get(key)
    if pool is None:
        pool = _LASTING[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    return pool


def _init_worker(blob: bytes) -> None:
    import signal

    global _CONTEXT
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the caller's to handle: it stops the pool
    _CONTEXT = pickle.loads(blob)


def _call(fn: Callable, job) -> Any:
    return fn(job, _CONTEXT)


def _ready() -> bool:
    """A started worker's answer (:meth:`_CrashTolerantPool._check_start`)."""
    return True


def _cannot_start(exc: BaseException) -> str:
    """Why the pool's workers died before their first job, as far as can be told from here.

    Python starts each worker of a "processes" pool (a fork server, or spawn) by running the
    caller's main script again, as ``__mp_main__``: a script that calls xrdpipe at its top level,
    not under ``if __name__ == "__main__":``, runs its work again in every worker, which fails
    there as the worker starts (a worker may not start processes of its own while it starts)."""
    import sys

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    text = (f"the worker processes of the \"processes\" scheduler died as they started, before any frame "
            f"({type(exc).__name__}: {exc}).")
    # (the main module is run again in a worker where it is a script, or a module run by name
    # that is not a package's __main__)
    rerun = (spec_name and spec_name != "__main__" and not spec_name.endswith(".__main__")) or (not spec_name and script)
    if rerun and not (spec_name or os.path.basename(str(script))).startswith("xrdpipe"):
        text += (f" Python starts each worker by running {script or spec_name} again: if it calls xrdpipe at its "
                 f"top level, put those calls under `if __name__ == \"__main__\":` (else every worker runs "
                 f"them again, and dies there).")
    return text + (" Or integrate without worker processes: [run] scheduler = \"threads\" (or --scheduler "
                   "threads, or --workers 1).")


def map_ordered(fn: Callable[[Any, Any], Any], jobs: Iterable, *, context: Any = None,
                scheduler: str | Any = "processes", workers: int | None = None,
                prefetch: int | None = None, on_crash: Callable[[Any], Any] | None = None) -> Iterator:
    """Yield ``fn(job, context)`` for every job, in order.

    ``fn`` must be a module-level function (it is sent to other processes by reference);
    ``scheduler`` is a name or address (see the module docstring) or a ``distributed.Client``.
    With the process pool, a worker that dies (a crash in a C library, the system's memory
    killer) breaks the pool: it is started again and the jobs in flight are run again, one at a
    time, so that the one that kills a worker twice is found; ``on_crash(job)`` gives its result
    (without ``on_crash`` the pool's BrokenProcessPool is raised).

    Example
    -------
    >>> list(map_ordered(pow, [1, 2, 3], context=2, scheduler="serial"))
    [1, 4, 9]
    """
    workers = workers or default_workers()
    prefetch = prefetch or 2 * workers
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        if scheduler == "serial" or (scheduler == "processes" and workers == 1):
            for job in jobs:
                stop_if_interrupted()
                yield fn(job, context)
            return
        if scheduler == "threads":
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xrdpipe") as pool:
                yield from _stream(lambda job: pool.submit(fn, job, context), jobs, prefetch)
            return
        yield from _processes(fn, jobs, context, workers, prefetch, on_crash)
        return
    yield from _dask(fn, jobs, context, scheduler, prefetch)


def _stream(submit: Callable, jobs: Iterable, prefetch: int) -> Iterator:
    """Keep ``prefetch`` jobs in flight; yield their results in order."""
    pending: deque = deque()
    it = iter(jobs)
    try:
        for job in it:
            stop_if_interrupted()
            pending.append(submit(job))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            stop_if_interrupted()
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


def _processes(fn, jobs, context, workers: int, prefetch: int, on_crash: Callable | None = None) -> Iterator:
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["xrdpipe._forkserver"])
    pool = _CrashTolerantPool(fn, ctx, workers, pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL), on_crash)
    try:
        for job in jobs:
            stop_if_interrupted()
            pool.pending.append((job, pool.submit(job)))
            if len(pool.pending) >= prefetch:
                yield pool.next_result()
        while pool.pending:
            stop_if_interrupted()
            yield pool.next_result()
    finally:
        pool.close()


class _CrashTolerantPool:
    """A process pool whose jobs' results come back in job order; a worker that dies takes only
    its own job with it (``on_crash(job)`` gives its result), the others are sent again."""

    def __init__(self, fn, ctx, workers: int, blob: bytes, on_crash: Callable | None):
        self.fn, self.ctx, self.workers, self.blob, self.on_crash = fn, ctx, workers, blob, on_crash
        self.pending: deque = deque()                       # (job, future), in job order
        self.pool = self._start()
        self._check_start()

    def _check_start(self) -> None:
        """A worker that dies as it starts (before any job) would take every job with it, each
        then run alone twice and recorded as the job that killed it; so one worker is asked to
        answer first, and a pool whose workers cannot start is an error saying why they may not
        (:func:`_cannot_start`)."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            self.pool.submit(_ready).result()
        except BrokenProcessPool as exc:
            self.pool.shutdown(wait=True, cancel_futures=True)
            from .errors import XrdpipeError

            raise XrdpipeError(_cannot_start(exc)) from None

    def _start(self):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx, initializer=_init_worker,
                                   initargs=(self.blob,))

    def _restart(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._start()

    def submit(self, job):
        """The job's future; if the pool broke meanwhile (a worker died before this job was
        sent), a future holding that error, handled when its turn comes."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(_call, self.fn, job)
        except BrokenProcessPool as exc:
            from concurrent.futures import Future

            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    def next_result(self):
        from concurrent.futures.process import BrokenProcessPool

        job, fut = self.pending.popleft()
        try:
            return fut.result()
        except BrokenProcessPool:
            if self.on_crash is None:
                raise
        # a worker died: run this job alone in a new pool; if it kills that one too, it is the
        # culprit. The jobs behind it were lost with the pool: they are sent again.
        self._restart()
        try:
            result = self.pool.submit(_call, self.fn, job).result()
        except BrokenProcessPool:
            self._restart()
            result = self.on_crash(job)
        for k, (other, _) in enumerate(self.pending):
            self.pending[k] = (other, self.submit(other))
        return result

    def close(self) -> None:
        for _, fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _dask(fn, jobs, context, scheduler, prefetch: int) -> Iterator:
    from .errors import XrdpipeError

    try:
        from distributed import Client
    except ImportError:
        raise XrdpipeError(f"scheduler {scheduler!r} is a Dask cluster, which needs the dask extra: "
                           "pip install \"xrdpipe[dask]\"") from None
    own = isinstance(scheduler, str)
    try:
        client = Client(scheduler, timeout="20s", set_as_default=False) if own else scheduler
    except OSError as exc:
        raise XrdpipeError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    try:
        shared = client.scatter(context, broadcast=True, hash=False)
        yield from _stream(lambda job: client.submit(fn, job, shared, pure=False), jobs, prefetch)
    finally:
        if own:
            client.close()
