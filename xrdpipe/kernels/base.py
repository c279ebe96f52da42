"""Numba's ``njit(nogil=True)`` with NumPy's division rules and a best-effort on-disk cache (:func:`_kernel`), and the
pseudo-Voigt constants the kernels share."""

from __future__ import annotations

from numba import njit
from numba.core.caching import FunctionCache


class _BestEffortCache(FunctionCache):
    """Numba's on-disk cache of a kernel, best effort: compiled code that cannot be written (a
    full disk, a file-size limit, a read-only install) is kept in memory for the run only, and
    the run goes on (its own writes report a full disk, naming its files)."""

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except OSError:
            pass


def _kernel(fn):
    """``njit(nogil=True)`` with the best-effort disk cache, and NumPy's rules for a division by
    zero (inf or NaN, which the callers treat as a failed row or step; Numba's default raises
    ZeroDivisionError out of the kernel, and one trial row's zero width stopped a whole series'
    fit)."""
    compiled = njit(nogil=True, error_model="numpy")(fn)
    try:
        compiled._cache = _BestEffortCache(compiled.py_func)   # what cache=True sets, guarded
    except RuntimeError:       # no writable cache location at all: compiled at every start
        pass
    return compiled


_LN2 = 0.6931471805599453
_CG = 0.9394372786996513       # 2 sqrt(ln 2 / π)
_CL = 0.6366197723675814       # 2 / π
