"""LZ4 blocks of a bitshuffle chunk, walked without decoding them: :func:`lz4_blocks_problem`
tells a corrupt chunk before it is decompressed (see :func:`xrdpipe.frames.check_chunks`)."""

from __future__ import annotations

import numpy as np

from .base import _kernel

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


@_kernel
def _lz4_length(buf, ip, end, length):  # pragma: no cover - compiled
    """A sequence's literal or match length: ``length`` from the token, and at 15 the bytes that
    follow (each added, until one below 255). Returns the length and the position after it, or
    -1 if the block ends first."""
    if length == 15:
        while True:
            if ip >= end:
                return np.int64(-1), ip
            b = np.int64(buf[ip])
            ip += 1
            length += b
            if b != 255:
                break
    return np.int64(length), ip


@_kernel
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
        length, ip = _lz4_length(buf, ip, end, token >> 4)
        if length < 0:
            return np.int64(1)
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
        length, ip = _lz4_length(buf, ip, end, token & 15)
        if length < 0:
            return np.int64(1)
        op += length + 4
        if op > want - 5:
            return np.int64(6) if op <= want else np.int64(3)


@_kernel
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
