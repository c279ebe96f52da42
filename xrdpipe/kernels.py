"""The per-frame kernel of the integrator: one pass over the pixel-to-bin matrix for the
intensity and the Poisson variance at once, straight from the raw frame.

The matrix is kept one column per pixel (CSC: ``indptr`` over pixels, ``indices`` the bins,
``data`` the splitting coefficients ``c``). For every pixel the kernel reads its value in the
frame's own dtype once, and for every coefficient of its column adds ``c (x - dark)`` to the
signal of the bin and ``c² max(x, 1)`` to its variance: the matrix is streamed once per frame
(SciPy's product needs two passes, since the two sums have different coefficients, c and c²,
and a float32 copy of the frame, a dark-subtracted copy and a variance array first). A pixel at
``flag`` (an integer frame's largest value: EIGER gaps, overflows) adds nothing; its share of
the normalisation ``c n`` is summed into ``lost`` so the caller takes it off the denominator.

Products are float32 (the frame and the coefficients are), sums float64. Compiled by Numba once
per frame dtype (cached on disk) and run without the GIL, so two threads integrate two frames at
once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uintp

__all__ = ["csc_sums"]


@njit(nogil=True, cache=True)
def csc_sums(x, dark, has_dark, flag, has_flag, data, indices, indptr, norm, signal, variance, lost,
             with_variance):  # pragma: no cover - compiled
    """Add Σ c (x - dark), Σ c² max(x, 1) and, over flagged pixels, Σ c n per bin into
    ``signal``, ``variance`` and ``lost`` (float64 arrays of the bins)."""
    n_pix = len(indptr) - 1
    one = np.float32(1.0)
    j = np.int64(indptr[0])
    for p in range(n_pix):
        end = np.int64(indptr[p + 1])
        if j == end:          # masked, or outside the range
            continue
        xv = x[p]
        if has_flag and xv == flag:
            w = np.float64(norm[p])
            while j < end:
                lost[uintp(indices[j])] += data[j] * w
                j += 1
            continue
        xf = np.float32(xv)
        s = xf - dark[p] if has_dark else xf
        if with_variance:
            v = max(xf, one)
            while j < end:    # unsigned bin numbers: no wrap-around test for negative indices
                k = uintp(indices[j])
                c = data[j]
                signal[k] += c * s
                variance[k] += c * c * v
                j += 1
        else:
            while j < end:
                signal[uintp(indices[j])] += data[j] * s
                j += 1
