"""How the run file is opened: read-only and checked (:func:`reading`), or for writing inside a
copy-on-write transaction (:class:`Writer`, the base of every writer of a part of the run file,
and :func:`enter_transaction`); its strings (UTF-8, variable length) written and read back; the
pattern axis (:func:`axis_of`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .paths import FORMAT, PATTERNS, h5path

__all__ = ["Writer", "enter_transaction", "reading", "axis_of", "str_dtype", "text", "decode"]


def str_dtype():
    """The HDF5 dtype of the run file's strings (UTF-8, variable length)."""
    import h5py

    return h5py.string_dtype("utf-8")


class Writer:
    """The base of every writer of a part of the run file (:class:`RunFile`, the peak and
    refinement stores). A run file open for writing inside a :func:`~xrdpipe.safeio.transaction`: results are
    published every ``checkpoint_s`` and when it closes (also on Ctrl-C), so nothing written is
    lost; the published file is never half-written (see :mod:`xrdpipe.safeio`)."""

    def __init__(self, session, stack, path: Path):
        self._session = session
        self._stack = stack
        self._h5 = session.writable()
        self.path = path

    def maybe_flush(self) -> None:
        self._session.maybe_publish()

    def flush(self) -> None:
        self._session.publish()

    def _on_close(self) -> None:
        pass

    def close(self) -> None:
        self._on_close()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._on_close()
        self._stack.__exit__(*exc)


def enter_transaction(path: Path):
    """A transaction on ``path``, entered on an ExitStack the writer owns."""
    from contextlib import ExitStack

    from ..safeio import transaction

    stack = ExitStack()
    return stack, stack.enter_context(transaction(path))


def text(v) -> str:
    """One string of a run file (a dataset's value or an attribute) as str (h5py hands back bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def decode(arr) -> np.ndarray:
    """Strings of any shape as str objects (h5py hands back bytes)."""
    arr = np.asarray(arr)
    out = np.empty(arr.shape, dtype=object)
    out.ravel()[:] = [v.decode() if isinstance(v, bytes) else v for v in arr.ravel()]
    return out


@contextmanager
def reading(path: Path | str):
    """A run file open read-only, checked; errors name the file."""
    import h5py

    from ..safeio import active

    path = Path(path)
    session = active(path)
    if session is not None and session.readable() is not None:   # our own work in progress
        yield session.readable()
        return
    if not path.exists():
        raise StoreError(f"run file {path} does not exist; run 'xrdpipe integrate' first")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"cannot read run file {path}: {exc}") from None
    with h5:
        if h5.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not an xrdpipe run file")
        yield h5


def axis_of(h5) -> tuple[str, str, float | None]:
    """The pattern axis dataset name, its radial unit and the wavelength (Å) of a run file."""
    axis = h5[h5path(PATTERNS)].attrs["axes"][1]
    axis = text(axis)
    wl = h5[h5path("instrument/monochromator")].get("wavelength")
    return axis, "2th_deg" if axis == "tth" else "q_A^-1", float(wl[()]) if wl is not None else None
