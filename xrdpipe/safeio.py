"""Writing so that no reader ever sees a half-written file and no crash damages one.

Two tools:

* :func:`atomic_output` for outputs (CSV, figures, exports): the file is written beside its
  target as ``.<name>.part`` and renamed over it, so a reader sees the old file or the new one.
* :func:`transaction` for the run file, copy-on-write. The published run file (``run.nxs``) is
  never opened for writing. A writer works on a copy, ``run.nxs.work`` (made at its first write,
  or a new file), and *publishes* it: a flushed copy is renamed over ``run.nxs`` every
  ``checkpoint_s`` seconds and whenever a caller asks (the end of each stage); at the end the work
  copy itself is renamed over ``run.nxs``. So ``run.nxs`` is always a complete HDF5 file: a
  reader never sees a half-written one, ``kill -9`` at any moment loses at most the work since
  the last checkpoint (every result carries its own "done" flag, so a rerun redoes exactly what
  is missing), and a full disk leaves the last published file as it was. ``run.nxs.lock`` (a
  POSIX lock, which the operating system releases when the process dies, whatever the cause)
  keeps a second writer out.

Inside a transaction, readers of the same process (:func:`active`) read the work copy, so a
stage sees what the stages before it wrote.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import StoreError

__all__ = ["transaction", "Session", "active", "atomic_output", "write_text_atomic", "io_problem", "file_stat",
           "ensure_room",
           "write_failed", "hdf5_write_failed", "quiet_h5py_write_noise"]

_SESSIONS: dict[Path, "Session"] = {}
_GUARD = threading.Lock()
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def io_problem(exc: BaseException) -> str:
    """What went wrong in an ``OSError``, in words a user can act on."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code in _FULL or any(s in text for s in ("No space left", "File too large", "Disk quota")):
        return "the disk is full (or a quota or file-size limit was reached)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return "permission denied (the folder is read-only or not yours)"
    return text


#: room kept free beyond what a write asks for: HDF5 allocates chunks and writes its metadata
#: (object headers, B-trees, free-space records) when it likes, not only where asked
ROOM_SLACK = 256 * 1024


def ensure_room(path: Path | str, need: int = 0) -> None:
    """Raise ``OSError`` (ENOSPC or EFBIG) unless ``need`` more bytes (plus :data:`ROOM_SLACK`)
    fit in the file ``path``: on its file system, and under this process's file-size limit.

    HDF5 does not survive a write that fails: the error surfaces later, anywhere (a chunk
    evicted from its cache, another file's close), and the library can crash. So a full disk is
    found before HDF5 writes, and reported by the caller as one line.
    """
    import resource

    path = Path(path)
    need = int(need) + ROOM_SLACK
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size + need > limit:
        raise OSError(errno.EFBIG, f"File too large: {path} would pass the file-size limit of {limit} bytes")
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return
    if st.f_blocks and st.f_bavail * st.f_frsize < need:
        raise OSError(errno.ENOSPC, f"No space left on device: {st.f_bavail * st.f_frsize} bytes free for {path}")


def file_stat(path: Path | str) -> list:
    """``[path, size, mtime_ns]`` (``[path, "missing"]``): what says a file has changed."""
    try:
        st = Path(path).stat()
    except OSError:
        return [str(path), "missing"]
    return [str(path), st.st_size, st.st_mtime_ns]


#: what HDF5 says (as a RuntimeError or ValueError from h5py, not an OSError) when a write failed
_WRITE_FAILED = ("file write failed", "File too large", "No space left", "Disk quota", "errno = 27", "errno = 28",
                 "truncate request failed")
_HDF5_WRITE_FAILED = False
_QUIET = False


def write_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write: an ``OSError``, or h5py's RuntimeError for an HDF5
    file it could not write (a full disk, a file-size limit)."""
    if isinstance(exc, OSError) or getattr(exc, "write_failed", False):
        return True
    return isinstance(exc, (RuntimeError, ValueError, KeyError)) and any(s in str(exc) for s in _WRITE_FAILED)


def hdf5_write_failed() -> bool:
    """Whether HDF5 failed to write a run file in this process. The HDF5 library cannot close
    such a file cleanly, and may crash when the interpreter exits: the command line then ends
    its process at once after its one-line message (the work copy is already removed)."""
    return _HDF5_WRITE_FAILED


def _h5py_noise(hook):
    """An unraisable-exception hook that drops h5py's 'Exception ignored in ... dealloc'
    reports of a failed write (the failure itself is reported once, as a StoreError)."""
    def quiet(unraisable):
        exc = unraisable.exc_value
        if exc is not None and write_failed(exc) and "h5py" in repr(unraisable.object):
            global _HDF5_WRITE_FAILED
            _HDF5_WRITE_FAILED = True
            return
        hook(unraisable)

    return quiet


def quiet_h5py_write_noise() -> None:
    """Install :func:`_h5py_noise` as this process's unraisable-exception hook (the command
    line does, once)."""
    import sys

    global _HDF5_WRITE_FAILED, _QUIET
    _HDF5_WRITE_FAILED = False                       # a new command: only its own failures count
    if _QUIET:
        return
    _QUIET = True
    sys.unraisablehook = _h5py_noise(sys.unraisablehook)
    sys.excepthook = _h5py_dealloc_noise(sys.excepthook)


def _h5py_dealloc_noise(hook):
    """An exception hook that drops the tracebacks h5py's object deallocation prints (through
    this hook) for a file HDF5 failed to write; every other exception is shown as before."""
    def quiet(kind, value, tb):
        last = tb
        while last is not None and last.tb_next is not None:
            last = last.tb_next
        where = last.tb_frame.f_code.co_filename if last is not None else ""
        if value is not None and write_failed(value) and "h5py" in where and "_objects" in where:
            global _HDF5_WRITE_FAILED
            _HDF5_WRITE_FAILED = True
            return
        hook(kind, value, tb)

    return quiet


def _mark_hdf5(exc: BaseException) -> None:
    """Remember a write that failed inside HDF5 (not one :func:`ensure_room` refused before it)."""
    global _HDF5_WRITE_FAILED
    if not isinstance(exc, OSError) or any(t in str(exc) for t in ("Unable to", "Can't", "file write failed")):
        _HDF5_WRITE_FAILED = True


def _kept(path: Path, exc: BaseException) -> StoreError:
    _mark_hdf5(exc)
    kept = ("it still holds the last checkpoint, and a rerun resumes from there" if path.exists() else
            "nothing was published, and a rerun starts again")
    err = StoreError(f"cannot write run file {path}: {io_problem(exc)}; {kept}")
    err.write_failed = True
    return err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds,
    remove it when it fails. An ``OSError`` becomes a :class:`StoreError` naming the file; the
    old ``path``, if any, is untouched.

    Example
    -------
    >>> with atomic_output("results/peaks.csv") as tmp:          # doctest: +SKIP
    ...     tmp.write_text("frame,center\\n")
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {io_problem(exc)}; the previous version, if any, is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class Session:
    """One process's write access to one run file (see the module docstring).

    ``writable()`` gives the open work copy (made on first use); ``create(build)`` starts a new
    file; ``publish()`` makes the work so far the published file; ``maybe_publish()`` does so
    when ``checkpoint_s`` have passed since the last time.
    """

    def __init__(self, path: Path, checkpoint_s: float = 30.0):
        self.path = path
        self.work = path.with_name(path.name + ".work")
        self.part = path.with_name(path.name + ".part")
        self.lock = path.with_name(path.name + ".lock")
        self.checkpoint_s = float(checkpoint_s)
        self.h5 = None
        self._fd: int | None = None
        self._last = time.monotonic()

    # -- lock ------------------------------------------------------------------------------
    def acquire(self) -> None:
        import fcntl

        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write in the output folder {folder}: {io_problem(exc)}; "
                             "choose another [run] output or fix its permissions") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"run file {self.path} is being written by another xrdpipe process (pid {holder}); "
                             "wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for stale in (self.work, self.part):   # left by a process that was killed: never published
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)                  # closing the descriptor releases the lock
            self._fd = None

    # -- the work copy -----------------------------------------------------------------------
    def writable(self):
        """The work copy, open for writing (copied from the published file on first use)."""
        import h5py

        if self.h5 is None:
            if not self.path.exists():
                raise StoreError(f"run file {self.path} does not exist; run 'xrdpipe integrate' first")
            try:
                ensure_room(self.work, self.path.stat().st_size)
                shutil.copyfile(self.path, self.work)
            except OSError as exc:
                self.work.unlink(missing_ok=True)
                raise StoreError(f"cannot write beside run file {self.path}: {io_problem(exc)}; "
                                 "the run file is unchanged") from None
            try:
                self.h5 = h5py.File(self.work, "r+")
            except OSError as exc:
                self.work.unlink(missing_ok=True)
                raise StoreError(f"run file {self.path} cannot be opened ({exc}); it may be damaged: "
                                 "rerun with --restart to start it again") from None
        self.check_room()
        return self.h5

    def check_room(self, need: int = 0) -> None:
        """:func:`ensure_room` for the work copy: every writer asks before it writes."""
        ensure_room(self.work, need)

    def create(self, build) -> None:
        """Start a new run file: ``build(h5)`` lays it out in a fresh work copy."""
        import h5py

        self.close_work()
        try:
            ensure_room(self.work)
            # free space is tracked in the file, so tables rewritten again and again (lattice,
            # electrochemistry) reuse it instead of growing the file
            with h5py.File(self.work, "w", fs_strategy="fsm", fs_persist=True) as h5:
                build(h5)
            self.h5 = h5py.File(self.work, "r+")
        except Exception as exc:
            if not write_failed(exc):
                raise
            _mark_hdf5(exc)
            self.abort()
            err = StoreError(f"cannot create run file {self.path}: {io_problem(exc)}")
            err.write_failed = True
            raise err from None

    def readable(self):
        """The open work copy, or None while nothing was written (read the published file)."""
        return self.h5

    def close_work(self) -> None:
        if self.h5 is not None:
            if self.h5.id.valid:
                self.h5.close()
            self.h5 = None

    # -- publishing ----------------------------------------------------------------------------
    def publish(self) -> None:
        """Make everything written so far the published run file (a flushed copy, renamed)."""
        if self.h5 is None:
            return
        try:
            self.check_room()
            self.h5.flush()
            ensure_room(self.part, self.work.stat().st_size)
            shutil.copyfile(self.work, self.part)
            _fsync(self.part)
            os.replace(self.part, self.path)
        except Exception as exc:
            if not write_failed(exc):
                raise
            self.part.unlink(missing_ok=True)
            raise _kept(self.path, exc) from None
        self._last = time.monotonic()

    def maybe_publish(self) -> None:
        self.check_room()
        if time.monotonic() - self._last >= self.checkpoint_s:
            self.publish()

    def commit(self) -> None:
        """Publish the work copy itself (the end of the transaction)."""
        if self.h5 is None:
            return
        self.h5.close()
        self.h5 = None
        _fsync(self.work)
        os.replace(self.work, self.path)

    def abort(self) -> None:
        try:
            self.close_work()
        except Exception:
            self.h5 = None
        for f in (self.work, self.part):
            f.unlink(missing_ok=True)


def active(path: Path | str) -> Session | None:
    """The session of this process writing ``path``, if any."""
    return _SESSIONS.get(Path(path).resolve())


@contextmanager
def transaction(path: Path | str, *, checkpoint_s: float | None = None) -> Iterator[Session]:
    """Write access to the run file ``path`` (see the module docstring); nested transactions on
    the same file share the outermost one, which publishes at its end.

    The work is published at the end, also on Ctrl-C or an error in the computation; only an
    ``OSError`` (a full disk, a vanished folder) throws the work copy away, since it may be
    damaged, and leaves the last published file in place.
    """
    key = Path(path).resolve()
    with _GUARD:
        session = _SESSIONS.get(key)
        owner = session is None
        if owner:
            session = Session(Path(path), 30.0 if checkpoint_s is None else checkpoint_s)
            session.acquire()
            _SESSIONS[key] = session
        elif checkpoint_s is not None:
            session.checkpoint_s = min(session.checkpoint_s, checkpoint_s)
    failure: BaseException | None = None
    try:
        yield session
    except BaseException as exc:
        failure = exc
        if owner and write_failed(exc) and not isinstance(exc, StoreError):
            raise _kept(session.path, exc) from None
        raise
    finally:
        if owner:
            try:
                _finish(session, failure)
            finally:
                session.release()
                with _GUARD:
                    _SESSIONS.pop(key, None)


def _finish(session: Session, failure: BaseException | None) -> None:
    if failure is not None and write_failed(failure):
        session.abort()
        return
    try:
        session.commit()
    except Exception as exc:
        session.abort()
        if not (write_failed(exc) or _HDF5_WRITE_FAILED):
            raise
        if failure is None:
            raise _kept(session.path, exc) from None
