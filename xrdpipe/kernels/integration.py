"""The integrator's kernels: :func:`csc_sums`, one pass over the pixel-to-bin matrix for the
intensity and the Poisson variance at once, straight from the raw frame; :func:`split_count` and
:func:`split_fill`, the full-pixel-splitting matrix.

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
from numba import uintp

from .base import _kernel


@_kernel
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
            m = end - j
            # a pixel spans two or three bins (full splitting, pixels about as wide as a bin):
            # written out, those columns go ~15 % faster than the loop (same sums, same order)
            if m == 2:
                k0, k1 = uintp(indices[j]), uintp(indices[j + 1])
                c0, c1 = data[j], data[j + 1]
                signal[k0] += c0 * s
                signal[k1] += c1 * s
                variance[k0] += c0 * c0 * v
                variance[k1] += c1 * c1 * v
                j = end
            elif m == 3:
                k0, k1, k2 = uintp(indices[j]), uintp(indices[j + 1]), uintp(indices[j + 2])
                c0, c1, c2 = data[j], data[j + 1], data[j + 2]
                signal[k0] += c0 * s
                signal[k1] += c1 * s
                signal[k2] += c2 * s
                variance[k0] += c0 * c0 * v
                variance[k1] += c1 * c1 * v
                variance[k2] += c2 * c2 * v
                j = end
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


# -- the full-pixel-splitting matrix ------------------------------------------------------------
#
# Each pixel is the quadrilateral of its four corners in (radial, azimuth) space; its coefficient
# in a radial bin is the share of its area that falls between the bin's boundaries (pyFAI's "full"
# splitting: the same corners, boundaries, azimuth unwrapping of pixels across the discontinuity
# and per-pixel normalisation over the bins inside the range). The area in each bin is the sum,
# over the contour's edges, of the integral of the azimuth along the radial bin coordinate, bin by
# bin, summed in float32 as pyFAI sums it (its rounding, ~1e-4 of a coefficient, is kept: the
# tests find pyFAI's own matrix to the bit, and the patterns agree with pyFAI's in bins of a few
# pixels as in bins of thousands). The matrix is built in two
# passes (entries per pixel, then the entries), each over any range of pixels, so bands of the
# detector are built on every core.


@_kernel
def _split_corners(pos, i, lo0, delta, bins, check_azim, azim_lo, azim_hi, disc_at_pi, sign, x, y):  # pragma: no cover - compiled
    """Corners of pixel ``i`` in bin coordinates (``x``) and azimuths (``y``, unwrapped across the
    discontinuity); returns the bins ``first, stop`` it covers, ``0, 0`` if none."""
    a0 = np.float64(pos[i, 0, 0])
    b0 = np.float64(pos[i, 1, 0])
    c0 = np.float64(pos[i, 2, 0])
    d0 = np.float64(pos[i, 3, 0])
    for k in range(4):
        y[k] = np.float64(pos[i, k, 1])
    # a pixel across the azimuthal discontinuity has corners on both sides: the sign of its
    # (approximate) algebraic area is then the one a normal pixel never has
    if sign * (0.5 * ((c0 - a0) * (y[3] - y[1])) - ((y[2] - y[0]) * (d0 - b0))) > 0:
        mean = 0.0
        for k in range(4):
            if y[k] < (0.0 if disc_at_pi else np.pi):
                y[k] += 2 * np.pi
            mean += 0.25 * y[k]
        if mean > (np.pi if disc_at_pi else 2 * np.pi):
            for k in range(4):
                y[k] -= 2 * np.pi
    x[0] = (a0 - lo0) / delta
    x[1] = (b0 - lo0) / delta
    x[2] = (c0 - lo0) / delta
    x[3] = (d0 - lo0) / delta
    lo = min(min(x[0], x[1]), min(x[2], x[3]))
    hi = max(max(x[0], x[1]), max(x[2], x[3]))
    for k in range(4):
        if not (np.isfinite(x[k]) and np.isfinite(y[k])):     # a corner without a position
            return 0, 0
    if hi < 0 or lo >= bins:
        return 0, 0
    if check_azim and (max(max(y[0], y[1]), max(y[2], y[3])) < azim_lo
                       or min(min(y[0], y[1]), min(y[2], y[3])) > azim_hi):
        return 0, 0
    k0 = int(np.floor(lo))
    k1 = int(np.floor(hi))
    if k0 == k1:
        return k0, k0 + 1
    return max(0, k0), min(bins, k1 + 1)


@_kernel
def split_count(pos, mask, has_mask, lo0, delta, bins, check_azim, azim_lo, azim_hi, disc_at_pi, sign,
                counts):  # pragma: no cover - compiled
    """Entries of each pixel (``pos`` (n, 4, 2): radial, azimuth of its corners; ``mask`` (n,) int8,
    1 = masked) in the matrix of ``bins`` bins of width ``delta`` from ``lo0`` into ``counts``."""
    x = np.empty(4)
    y = np.empty(4)
    for i in range(pos.shape[0]):
        if has_mask and mask[i]:
            counts[i] = 0
            continue
        first, stop = _split_corners(pos, i, lo0, delta, bins, check_azim, azim_lo, azim_hi, disc_at_pi, sign, x, y)
        counts[i] = stop - first


@_kernel
def _edge_areas(share, first, stop, xs, ys, xe, ye):  # pragma: no cover - compiled
    """Add, bin by bin (bins ``first ... stop - 1``, ``share[k - first]``), the integral of the
    azimuth along the edge from (xs, ys) to (xe, ye) in bin coordinates (signed: negative going
    down the bins)."""
    if xe == xs:
        return
    slope = (ye - ys) / (xe - xs)
    icept = ys - slope * xs
    ks = int(np.floor(xs))
    ke = int(np.floor(xe))
    if ks == ke:
        if first <= ks < stop:
            share[ks - first] += (xe - xs) * (0.5 * slope * (xe + xs) + icept)
        return
    step = 1 if xe > xs else -1
    # the part in the start bin, the whole bins crossed, the part in the end bin
    u = xs
    k = ks
    while True:
        v = float(k + 1) if step > 0 else float(k)
        if k == ke:
            v = xe
        if first <= k < stop:
            share[k - first] += (v - u) * (0.5 * slope * (v + u) + icept)
        if k == ke:
            return
        u = v
        k += step


@_kernel
def split_fill(pos, lo0, delta, bins, check_azim, azim_lo, azim_hi, disc_at_pi, sign, indptr, data,
               indices):  # pragma: no cover - compiled
    """The entries (coefficients ``data``, bins ``indices``) of the pixels ``pos`` at the offsets
    ``indptr`` (relative to this range's first entry) that :func:`split_count` gave."""
    x = np.empty(4)
    y = np.empty(4)
    share = np.zeros(16, np.float32)
    for i in range(pos.shape[0]):
        j = indptr[i] - indptr[0]
        if indptr[i + 1] - indptr[0] == j:
            continue
        first, stop = _split_corners(pos, i, lo0, delta, bins, check_azim, azim_lo, azim_hi, disc_at_pi, sign, x, y)
        if stop - first == 1:
            data[j] = 1.0
            indices[j] = first
            continue
        if stop - first > share.size:
            share = np.zeros(2 * (stop - first), np.float32)
        for e in range(4):
            _edge_areas(share, first, stop, x[e], y[e], x[(e + 1) % 4], y[(e + 1) % 4])
        total = 0.0
        for k in range(stop - first):
            total += share[k]
        inv = 1.0 / total if total != 0 else 0.0
        for k in range(stop - first):
            data[j + k] = share[k] * inv
            indices[j + k] = first + k
            share[k] = 0.0
