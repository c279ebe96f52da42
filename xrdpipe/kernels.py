"""Compiled per-frame kernels: the integrator's one pass over the pixel-to-bin matrix for the
intensity and the Poisson variance at once, straight from the raw frame (:func:`csc_sums`), and
the walk over the LZ4 blocks of a bitshuffle-LZ4 chunk that tells a corrupt chunk before it is
decompressed (:func:`lz4_blocks_problem`, see :func:`xrdpipe.frames.check_chunks`).

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

__all__ = ["csc_sums", "lz4_blocks_problem", "LZ4_REASONS"]


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


# --------------------------------------------------------------------------------------------
# LZ4 blocks of a bitshuffle chunk, walked without decoding them

#: why an LZ4 block is corrupt, by the code :func:`lz4_blocks_problem` gives
LZ4_REASONS = {
    1: "it ends inside a sequence",
    2: "a literal run goes past the end of the block",
    3: "it decodes to more bytes than the block holds",
    4: "a match refers to bytes before the start of the block",
    5: "a sequence ends too close to the end of the block (LZ4's last 12 bytes)",
    6: "a match runs into the last 5 bytes of the block (they must be literals)",
    7: "a match with offset 0, which LZ4 never writes",
}


@njit(nogil=True, cache=True)
def _lz4_block_problem(buf, ip, end, want):  # pragma: no cover - compiled
    """0 if ``buf[ip:end]`` is an LZ4 block that decodes to exactly ``want`` bytes, else
    ``-1 - produced`` when it decodes to fewer, else a code of :data:`LZ4_REASONS`.

    The sequences are parsed (token, literal length, offset, match length) and their bounds
    checked as LZ4's bounds-checked decoder (``LZ4_decompress_safe``) checks them, with its
    end-of-block rules, and a match offset of 0 (invalid in the LZ4 format, which that decoder
    lets through) refused too; no byte is decoded, so the cost is per sequence, not per byte."""
    op = np.int64(0)
    while True:
        if ip >= end:
            return np.int64(1)
        token = np.int64(buf[ip])
        ip += 1
        length = token >> 4
        if length == 15:
            while True:
                if ip >= end:
                    return np.int64(1)
                b = np.int64(buf[ip])
                ip += 1
                length += b
                if b != 255:
                    break
        if length > end - ip:
            return np.int64(2)
        ip += length
        op += length
        if op > want:
            return np.int64(3)
        if ip == end:                      # the last sequence: literals only, to the very end
            return np.int64(0) if op == want else np.int64(-1) - op
        if op > want - 12 or ip > end - 8:
            return np.int64(5)
        offset = np.int64(buf[ip]) | (np.int64(buf[ip + 1]) << 8)
        ip += 2
        if offset == 0:
            return np.int64(7)
        if offset > op:
            return np.int64(4)
        length = token & 15
        if length == 15:
            while True:
                if ip >= end:
                    return np.int64(1)
                b = np.int64(buf[ip])
                ip += 1
                length += b
                if b != 255:
                    break
        op += length + 4
        if op > want - 5:
            return np.int64(6) if op <= want else np.int64(3)


@njit(nogil=True, cache=True)
def lz4_blocks_problem(buf, pos, n_full, full_bytes, last_bytes, tail):  # pragma: no cover - compiled
    """Walk the LZ4 blocks of a bitshuffle-LZ4 chunk (``buf``, uint8) from byte ``pos``: each is a
    4-byte big-endian size and that many bytes of LZ4, ``n_full`` blocks that decode to
    ``full_bytes``, then one of ``last_bytes`` if not 0, then ``tail`` bytes stored as they are,
    to the end of the chunk. Returns ``(code, block, detail)``: (0, 0, 0) when every block is
    sound; else 1: the chunk ends before block ``block``; 2: its size ``detail`` runs past the
    end; 3: it is corrupt (``detail`` a code of :data:`LZ4_REASONS`); 4: it decodes to
    ``detail`` bytes, too few; 5: ``detail`` bytes more than the tail after the last block."""
    n = len(buf)
    n_blocks = n_full + (1 if last_bytes > 0 else 0)
    for k in range(n_blocks):
        want = full_bytes if k < n_full else last_bytes
        if pos + 4 > n:
            return 1, k, 0
        size = ((np.int64(buf[pos]) << 24) | (np.int64(buf[pos + 1]) << 16) | (np.int64(buf[pos + 2]) << 8)
                | np.int64(buf[pos + 3]))
        pos += 4
        if size <= 0 or size > n - pos:
            return 2, k, size
        r = _lz4_block_problem(buf, pos, pos + size, want)
        if r > 0:
            return 3, k, r
        if r < 0:
            return 4, k, -1 - r
        pos += size
    if pos + tail != n:
        return 5, n_blocks, n - pos - tail
    return 0, 0, 0
