"""Compiled kernels (Numba, cached on disk, run without the GIL).

:func:`csc_sums` is the per-frame kernel of the integrator; :func:`pv_profiles` and
:func:`profile_columns` are the refinement's (the pseudo-Voigt profiles of every reflection on the
points of its near window with their derivatives, and the Jacobian columns summed from them, in
one pass each instead of a dozen NumPy temporaries over the same entries); the ``tail_*``
kernels add the far Lorentzian tails (points ``lo_far ... lo_near`` and ``hi_near ... hi_far`` of
each reflection) to a pattern, a transposed product or Jacobian columns, computed where they are
used and never stored (:func:`profile_matvec` and :func:`profile_rmatvec`: the products of the
whole profiles, near entries and far tails, with intensities and with a pattern, for the Le Bail
extraction, one cycle of which is :func:`lebail_cycle`); :func:`reflection_geometry` gives positions and TCH widths from a cell;
:func:`lz4_blocks_problem` walks the LZ4 blocks of a bitshuffle-LZ4 chunk and tells a corrupt
chunk before it is decompressed (see :func:`xrdpipe.frames.check_chunks`); :func:`split_count`
and :func:`split_fill` build the integrator's full-pixel-splitting matrix (see below).

The integrator's kernel: one pass over the pixel-to-bin matrix for the
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
    """``njit(nogil=True)`` with the best-effort disk cache."""
    compiled = njit(nogil=True)(fn)
    try:
        compiled._cache = _BestEffortCache(compiled.py_func)   # what cache=True sets, guarded
    except RuntimeError:       # no writable cache location at all: compiled at every start
        pass
    return compiled

__all__ = ["csc_sums", "pv_profiles", "profile_columns", "tail_matvec", "tail_rmatvec", "tail_columns",
           "reflection_geometry", "tch_widths", "profile_matvec", "profile_rmatvec", "lebail_cycle",
           "lz4_blocks_problem", "LZ4_REASONS", "split_count", "split_fill", "phase_value_jac",
           "phase_normal", "window_trials"]

_LN2 = 0.6931471805599453
_CG = 0.9394372786996513       # 2 sqrt(ln 2 / π)
_CL = 0.6366197723675814       # 2 / π


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


@_kernel
def pv_profiles(x, pos, fwhm, eta, inv_tan, lo, ptr, p1, p2, asym_on, deriv, r, idx, P, dx0, dH, deta, dP1,
                dP2):  # pragma: no cover - compiled
    """Every reflection's pseudo-Voigt (area 1, Gaussian and Lorentzian of one FWHM, mixing η)
    times the asymmetry 1 + (P1 fa(z) + P2 fb(z)) / tan θ (fa = 2z e^-z², fb = 2(2z² - 3) fa,
    z = (x - x0)/H) on the points ``lo[j] ...`` of its window, flat: entries ``ptr[j] ...
    ptr[j + 1]`` of ``r`` (its reflection), ``idx`` (its point) and ``P``; with ``deriv`` also
    the derivatives in position ``dx0``, FWHM ``dH``, mixing ``deta`` and P1 and P2. The
    exponentials only where they exceed 1e-43 (the Gaussian core)."""
    four_ln2 = 4.0 * _LN2
    for j in range(pos.size):
        H = fwhm[j]
        e = eta[j]
        x0 = pos[j]
        it = inv_tan[j]
        cg = _CG / H
        cl = _CL / H
        inv_h = 1.0 / H
        k0 = ptr[j]
        for k in range(k0, ptr[j + 1]):
            i = lo[j] + k - k0
            r[k] = j
            idx[k] = i
            u = x[i] - x0
            z = u * inv_h
            z2 = z * z
            g = cg * np.exp(-four_ln2 * z2) if z2 < 36.0 else 0.0
            q = 1.0 + 4.0 * z2
            lor = cl / q
            prof = e * lor + (1.0 - e) * g
            if asym_on:
                ez = np.exp(-z2) if z2 < 100.0 else 0.0
                fa = 2.0 * z * ez
                fb = 2.0 * (2.0 * z2 - 3.0) * fa
                asym = 1.0 + (p1 * fa + p2 * fb) * it
                P[k] = prof * asym
            else:
                P[k] = prof
            if deriv:
                # d/dx0 of each part; d/dH from the scaling f(u; H) = φ(u/H)/H: (u df/dx0 - f)/H
                dp_dx0 = (e * lor / q + (1.0 - e) * _LN2 * g) * (8.0 * u * inv_h * inv_h)
                dp_dh = (u * dp_dx0 - prof) * inv_h
                if asym_on:
                    dfa = 2.0 * ez * (1.0 - 2.0 * z2)
                    dfb = 8.0 * z * fa + 2.0 * (2.0 * z2 - 3.0) * dfa
                    pa = prof * (p1 * dfa + p2 * dfb) * it * inv_h
                    dx0[k] = asym * dp_dx0 - pa
                    dH[k] = asym * dp_dh - pa * z
                    deta[k] = (lor - g) * asym
                    dP1[k] = prof * fa * it
                    dP2[k] = prof * fb * it
                else:
                    dx0[k] = dp_dx0
                    dH[k] = dp_dh
                    deta[k] = lor - g
                    dP1[k] = 0.0
                    dP2[k] = 0.0


@_kernel
def profile_columns(a, b, r, idx, r0, I, P, dx0, dH, deta, cx0, cH, ceta, cI, cols,
                    J):  # pragma: no cover - compiled
    """Add to the columns ``cols`` of ``J`` (points x columns) the derivative of the pattern
    over the flat profile entries ``a ... b`` (reflections ``r0 ...``): for column c, each
    entry's I (dx0 cx0[k, c] + dH cH[k, c] + deta ceta[k, c]) + P cI[k, c], k = r - r0, where
    the c* are the derivatives of each reflection's position, FWHM, mixing and intensity."""
    nc = cols.size
    for e in range(a, b):
        k = r[e] - r0
        i = idx[e]
        w = I[r[e]]
        gx = w * dx0[e]
        gh = w * dH[e]
        ge = w * deta[e]
        p = P[e]
        for c in range(nc):
            J[i, cols[c]] += gx * cx0[k, c] + gh * cH[k, c] + ge * ceta[k, c] + p * cI[k, c]


@_kernel
def tail_matvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, j0, j1, w,
                out):  # pragma: no cover - compiled
    """Add Σ_j w[j] η_j L_j(x) over the far points of reflections ``j0 ... j1`` to ``out``
    (L: the Lorentzian of area 1 and FWHM H, 2/(πH) / (1 + 4u²/H²))."""
    for j in range(j0, j1):
        wj = w[j]
        if wj == 0.0:
            continue
        H = fwhm[j]
        inv_h = 1.0 / H
        c = wj * eta[j] * _CL * inv_h
        x0 = pos[j]
        for i in range(lo_far[j], lo_near[j]):
            z = (x[i] - x0) * inv_h
            out[i] += c / (1.0 + 4.0 * z * z)
        for i in range(hi_near[j], hi_far[j]):
            z = (x[i] - x0) * inv_h
            out[i] += c / (1.0 + 4.0 * z * z)


@_kernel
def tail_rmatvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v, out):  # pragma: no cover - compiled
    """``out[j] += Σ_i η_j L_j(x_i) v[i]`` over every reflection's far points."""
    for j in range(pos.size):
        H = fwhm[j]
        inv_h = 1.0 / H
        x0 = pos[j]
        acc = 0.0
        for i in range(lo_far[j], lo_near[j]):
            z = (x[i] - x0) * inv_h
            acc += v[i] / (1.0 + 4.0 * z * z)
        for i in range(hi_near[j], hi_far[j]):
            z = (x[i] - x0) * inv_h
            acc += v[i] / (1.0 + 4.0 * z * z)
        out[j] += acc * eta[j] * _CL * inv_h


@_kernel
def tail_columns(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, j0, j1, I, cx0, cH, ceta, cols,
                 J):  # pragma: no cover - compiled
    """The far tails' part of :func:`profile_columns` for reflections ``j0 ... j1`` (the rows
    of the coefficients ``c*`` counted from ``j0``): T = η L, dT/dx0 = η L/q 8u/H²,
    dT/dH = (u dT/dx0 - T)/H, dT/dη = L (q = 1 + 4u²/H²)."""
    nc = cols.size
    for j in range(j0, j1):
        w = I[j]
        if w == 0.0:
            continue
        k = j - j0
        H = fwhm[j]
        inv_h = 1.0 / H
        e = eta[j]
        cl = _CL * inv_h
        x0 = pos[j]
        for part in range(2):
            a = lo_far[j] if part == 0 else hi_near[j]
            b = lo_near[j] if part == 0 else hi_far[j]
            for i in range(a, b):
                u = x[i] - x0
                z = u * inv_h
                q = 1.0 + 4.0 * z * z
                lor = cl / q
                t = e * lor
                dx = t / q * 8.0 * u * inv_h * inv_h
                dh = (u * dx - t) * inv_h
                gx = w * dx
                gh = w * dh
                ge = w * lor
                for c in range(nc):
                    J[i, cols[c]] += gx * cx0[k, c] + gh * cH[k, c] + ge * ceta[k, c]


@_kernel
def reflection_geometry(hkl, cell, lam, U, V, W, X, Y, pos, fwhm, eta, tan, cos):  # pragma: no cover - compiled
    """For reflections ``hkl`` (n, 3) of a cell (a, b, c in Å, α, β, γ in degrees) at the
    wavelength ``lam``: 2θ (degrees), tan θ, cos θ, and the Thompson-Cox-Hastings pseudo-Voigt
    FWHM and mixing of the Caglioti Gaussian (U tan²θ + V tan θ + W) and the Lorentzian
    (X tan θ + Y / cos θ) widths."""
    a, b, c = cell[0], cell[1], cell[2]
    ca = np.cos(np.radians(cell[3]))
    cb = np.cos(np.radians(cell[4]))
    cg = np.cos(np.radians(cell[5]))
    g11, g22, g33 = a * a, b * b, c * c
    g12, g13, g23 = a * b * cg, a * c * cb, b * c * ca
    # the reciprocal metric: the inverse of the (symmetric) metric by cofactors
    c11 = g22 * g33 - g23 * g23
    c12 = g13 * g23 - g12 * g33
    c13 = g12 * g23 - g13 * g22
    c22 = g11 * g33 - g13 * g13
    c23 = g12 * g13 - g11 * g23
    c33 = g11 * g22 - g12 * g12
    det = g11 * c11 + g12 * c12 + g13 * c13
    for n in range(hkl.shape[0]):
        h, k, l = hkl[n, 0], hkl[n, 1], hkl[n, 2]
        q = (h * h * c11 + k * k * c22 + l * l * c33 + 2.0 * (h * k * c12 + h * l * c13 + k * l * c23)) / det
        s = lam * 0.5 * np.sqrt(q)                   # sin θ = λ / 2d
        s = min(max(s, -1.0), 1.0)
        th = np.arcsin(s)
        tn = np.tan(th)
        cs = np.cos(th)
        pos[n] = np.degrees(2.0 * th)
        tan[n] = tn
        cos[n] = cs
    tch_widths(tan, cos, U, V, W, X, Y, fwhm, eta)


@_kernel
def profile_matvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I,
                   out):  # pragma: no cover - compiled
    """``out = Σ_j I[j] profile_j``: the near entries (``P`` at points ``idx``, reflection j's
    at ``ptr[j] ... ptr[j + 1]``) and the far tails (:func:`tail_matvec`)."""
    out[:] = 0.0
    for j in range(I.size):
        w = I[j]
        if w == 0.0:
            continue
        for k in range(ptr[j], ptr[j + 1]):
            out[idx[k]] += P[k] * w
    tail_matvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, 0, I.size, I, out)


@_kernel
def profile_rmatvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v,
                    out):  # pragma: no cover - compiled
    """``out[j] = Σ_i profile_j(x_i) v[i]`` (near entries and far tails)."""
    for j in range(out.size):
        acc = 0.0
        for k in range(ptr[j], ptr[j + 1]):
            acc += P[k] * v[idx[k]]
        out[j] = acc
    tail_rmatvec(x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, v, out)


@_kernel
def lebail_cycle(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I, net, valid, area, use,
                 extracted, phase_of, n_ph, step, floor_rel, yc, ratio, out):  # pragma: no cover - compiled
    """One Le Bail extraction from the intensities ``I`` into ``out``: each reflection ``use``
    takes its share of the net observed pattern ``net`` (the model's share where a point is not
    ``valid``), I Σ P (net / Σ I P) step / area, kept above ``floor_rel`` x the largest
    intensity where its phase has any intensity (0 where none); other extracted reflections (too
    little of their profile in the range to be extracted) get 0, computed ones keep I. ``yc`` and ``ratio`` are work arrays of the points."""
    profile_matvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, I, yc)
    top = 1e-300
    for i in range(yc.size):
        if yc[i] > top:
            top = yc[i]
    thr = 1e-12 * top
    for i in range(yc.size):
        if not valid[i]:
            ratio[i] = 1.0                 # no data: the model keeps its share
        elif yc[i] > thr:
            ratio[i] = net[i] / max(yc[i], 1e-300)
        else:
            ratio[i] = 0.0
    profile_rmatvec(P, idx, ptr, x, pos, fwhm, eta, lo_far, lo_near, hi_near, hi_far, ratio, out)
    present = np.zeros(n_ph, np.bool_)
    imax = 0.0
    for j in range(I.size):
        if I[j] > 0.0:
            present[phase_of[j]] = True
        if I[j] > imax:
            imax = I[j]
    floor = floor_rel * imax
    for j in range(I.size):
        if use[j]:
            if present[phase_of[j]]:
                v = I[j] * out[j] * step / max(area[j], 1e-12)
                out[j] = v if (v != v or v > floor) else floor
            else:
                out[j] = 0.0
        elif extracted[j]:
            out[j] = 0.0
        else:
            out[j] = I[j]


@_kernel
def tch_widths(tan, cos, U, V, W, X, Y, fwhm, eta):  # pragma: no cover - compiled
    """The Thompson-Cox-Hastings pseudo-Voigt FWHM and mixing of the Caglioti Gaussian width
    (U tan²θ + V tan θ + W, kept above 1e-12) and the Lorentzian (X tan θ + Y / cos θ, kept
    above 0) of every reflection."""
    for n in range(tan.size):
        tn = tan[n]
        hg = np.sqrt(max(U * tn * tn + V * tn + W, 1e-12))
        hl = max(X * tn + Y / cos[n], 0.0)
        h5 = (hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3
              + 0.07842 * hg * hl**4 + hl**5)
        H = h5 ** 0.2
        qq = hl / H
        fwhm[n] = H
        eta[n] = min(max(1.36603 * qq - 0.47719 * qq**2 + 0.11116 * qq**3, 0.0), 1.0)


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


@_kernel
def phase_value_jac(x, lo, hi, cen, theta, fw_col, eta_col, a_col, dcol, dval, f, jac):  # pragma: no cover - compiled
    """Add the phase model's lines to ``f`` (r, M) and their derivatives to ``jac`` (r, k, M).

    Line ``i`` (area-normalised pseudo-Voigt times its area) lies on points ``lo[i]:hi[i]`` of
    the abscissa ``x``, at centre ``cen[r, i]``, with its width, eta and area in columns
    ``fw_col[i]``, ``eta_col[i]``, ``a_col[i]`` of ``theta`` (r, k); its centre moves by
    ``dval[r, i, q]`` per unit of column ``dcol[i, q]`` (-1: none), the cell and zero columns."""
    for r in range(theta.shape[0]):
        for i in range(cen.shape[1]):
            c = cen[r, i]
            inv_f = 1.0 / theta[r, fw_col[i]]
            area = theta[r, a_col[i]]
            eta = theta[r, eta_col[i]]
            g_unit = (1.0 - eta) * _CG * inv_f
            l_unit = eta * _CL * inv_f
            for j in range(lo[i], hi[i]):
                u = (x[j] - c) * inv_f
                u2 = u * u
                gauss = np.exp(u2 * (-4.0 * _LN2))
                lor = 1.0 / (1.0 + 4.0 * u2)
                t1 = area * g_unit * gauss
                t2 = area * l_unit * lor
                val = t1 + t2
                d_c = 8.0 * inv_f * u * (_LN2 * t1 + t2 * lor)
                f[r, j] += val
                jac[r, a_col[i], j] += g_unit * gauss + l_unit * lor
                jac[r, fw_col[i], j] += inv_f * (8.0 * u2 * (_LN2 * t1 + t2 * lor) - val)
                jac[r, eta_col[i], j] += area * inv_f * (_CL * lor - _CG * gauss)
                for q in range(dcol.shape[1]):
                    if dcol[i, q] >= 0:
                        jac[r, dcol[i, q], j] += d_c * dval[r, i, q]


@_kernel
def phase_normal(x, y, wt, tpow, win_lo, win_hi, wcol_ptr, wcols, nbg, lbg, line_ptr, lines, cen, theta,
                 fw_col, eta_col, a_col, la, lf, le, ld, dval, chi2, hess, grad):  # pragma: no cover - compiled
    """The normal equations of the phase model straight from its lines, window by window:
    ``chi2`` (r,), ``hess`` = JᵀW²J (r, k, k) and ``grad`` = JᵀW²(y - f) (r, k) for parameter
    rows ``theta`` (r, k), without the dense Jacobian (r, k, M) that :func:`phase_value_jac`
    fills (most of it zeros: a point depends only on its window's columns).

    Window ``w`` covers points ``win_lo[w]:win_hi[w]`` and the columns ``wcols[wcol_ptr[w]:
    wcol_ptr[w + 1]]``; its background has ``nbg[w]`` columns (local ``lbg[w, d]``, values
    ``tpow[j, d]``), its lines are ``lines[line_ptr[w]:line_ptr[w + 1]]``. Line ``i`` is the
    area-normalised pseudo-Voigt of :func:`phase_value_jac` (global columns ``fw_col``, ``eta_col``,
    ``a_col`` for its values, local ``lf``, ``le``, ``la`` for its derivatives; its centre moves by
    ``dval[r, i, q]`` per unit of local column ``ld[i, q]``, -1: none)."""
    n_win = win_lo.size
    kmax = 0
    for w in range(n_win):
        kmax = max(kmax, wcol_ptr[w + 1] - wcol_ptr[w])
    h = np.zeros((kmax, kmax))
    g = np.zeros(kmax)
    jrow = np.zeros(kmax)
    for r in range(theta.shape[0]):
        c2 = 0.0
        for w in range(n_win):
            c0 = wcol_ptr[w]
            kw = wcol_ptr[w + 1] - c0
            for a in range(kw):
                g[a] = 0.0
                for b in range(kw):
                    h[a, b] = 0.0
            for j in range(win_lo[w], win_hi[w]):
                for a in range(kw):
                    jrow[a] = 0.0
                f = 0.0
                for d in range(nbg[w]):
                    f += theta[r, wcols[c0 + lbg[w, d]]] * tpow[j, d]
                    jrow[lbg[w, d]] = tpow[j, d]
                for n in range(line_ptr[w], line_ptr[w + 1]):
                    i = lines[n]
                    inv_f = 1.0 / theta[r, fw_col[i]]
                    area = theta[r, a_col[i]]
                    eta = theta[r, eta_col[i]]
                    g_unit = (1.0 - eta) * _CG * inv_f
                    l_unit = eta * _CL * inv_f
                    u = (x[j] - cen[r, i]) * inv_f
                    u2 = u * u
                    gauss = np.exp(u2 * (-4.0 * _LN2))
                    lor = 1.0 / (1.0 + 4.0 * u2)
                    t1 = area * g_unit * gauss
                    t2 = area * l_unit * lor
                    val = t1 + t2
                    d_c = 8.0 * inv_f * u * (_LN2 * t1 + t2 * lor)
                    f += val
                    jrow[la[i]] += g_unit * gauss + l_unit * lor
                    jrow[lf[i]] += inv_f * (8.0 * u2 * (_LN2 * t1 + t2 * lor) - val)
                    jrow[le[i]] += area * inv_f * (_CL * lor - _CG * gauss)
                    for q in range(ld.shape[1]):
                        if ld[i, q] >= 0:
                            jrow[ld[i, q]] += d_c * dval[r, i, q]
                ww = wt[j]
                if ww == 0.0:
                    continue
                res = ww * (y[j] - f)
                c2 += res * res
                for a in range(kw):
                    ja = jrow[a] * ww
                    if ja != 0.0:
                        g[a] += ja * res
                        for b in range(a, kw):
                            h[a, b] += ja * (jrow[b] * ww)
            for a in range(kw):
                ca = wcols[c0 + a]
                grad[r, ca] += g[a]
                hess[r, ca, ca] += h[a, a]
                for b in range(a + 1, kw):
                    cb = wcols[c0 + b]
                    hess[r, ca, cb] += h[a, b]
                    hess[r, cb, ca] += h[a, b]
        chi2[r] = c2


@_kernel
def _spd_solve(a, b):  # pragma: no cover - compiled
    """``a x = b`` for a symmetric positive (semi-)definite ``a`` with unit diagonal, by
    Cholesky; where a pivot vanishes (a singular system), with a ridge of 1e-10 added, then ten
    times more until it goes through."""
    k = b.size
    low = np.zeros((k, k))
    ridge = 0.0
    while True:
        ok = True
        for i in range(k):
            for j in range(i + 1):
                s = a[i, j] + (ridge if i == j else 0.0)
                for q in range(j):
                    s -= low[i, q] * low[j, q]
                if i == j:
                    if s <= 1e-12:
                        ok = False
                        break
                    low[i, i] = np.sqrt(s)
                else:
                    low[i, j] = s / low[j, j]
            if not ok:
                break
        if ok:
            break
        ridge = 1e-10 if ridge == 0.0 else ridge * 10.0
    z = np.zeros(k)
    for i in range(k):
        s = b[i]
        for q in range(i):
            s -= low[i, q] * z[q]
        z[i] = s / low[i, i]
    for i in range(k - 1, -1, -1):
        s = z[i]
        for q in range(i + 1, k):
            s -= low[q, i] * z[q]
        z[i] = s / low[i, i]
    return z


@_kernel
def window_trials(x, bg, y, w, cen, fw, eta, keep, coef, chi2):  # pragma: no cover - compiled
    """Weighted least squares of one window at many trials, the areas not negative.

    Trial ``t`` fits ``y`` (m,) with weights ``w`` (m,) by the area-normalised pseudo-Voigt lines
    at ``cen[t]`` (n,) with widths ``fw[t]`` (n,) and ``eta`` (n,) (a line not ``keep[t, i]``
    has an empty column) and the background columns ``bg`` (m, nb). Negative areas are dropped
    and the system solved again (twice); the normal equations are scaled to unit diagonal (a
    singular system gets a ridge of 1e-10 of the diagonal: two equal lines share their area).
    Writes the coefficients ``coef[t]`` (n + nb) and ``chi2[t]``."""
    m = x.size
    n = cen.shape[1]
    nb = bg.shape[1]
    k = n + nb
    a = np.zeros((m, k))
    b = y * w
    on = np.zeros(k, np.bool_)
    h = np.zeros((k, k))
    hs = np.zeros((k, k))
    r = np.zeros(k)
    rs = np.zeros(k)
    diag = np.zeros(k)
    for d in range(nb):
        for j in range(m):
            a[j, n + d] = w[j] * bg[j, d]
    for t in range(cen.shape[0]):
        for i in range(n):
            f = fw[t, i]
            g_unit = (1.0 - eta[i]) * _CG / f
            l_unit = eta[i] * _CL / f
            for j in range(m):
                if keep[t, i]:
                    u = (x[j] - cen[t, i]) / f
                    a[j, i] = w[j] * (l_unit / (1.0 + 4.0 * u * u) + g_unit * np.exp(-4.0 * _LN2 * u * u))
                else:
                    a[j, i] = 0.0
        for i in range(k):
            on[i] = False
            for j in range(m):
                if a[j, i] != 0.0:
                    on[i] = True
                    break
        # the normal equations once (a dropped column is masked below, not recomputed)
        for i in range(k):
            s = 0.0
            if on[i]:
                for j in range(m):
                    s += a[j, i] * b[j]
            r[i] = s
            for q in range(i, k):
                s = 0.0
                if on[i] and on[q]:
                    for j in range(m):
                        s += a[j, i] * a[j, q]
                h[i, q] = s
                h[q, i] = s
        for _ in range(3):
            for i in range(k):
                diag[i] = np.sqrt(max(h[i, i], 1e-300)) if on[i] else 1.0
            for i in range(k):
                rs[i] = r[i] / diag[i] if on[i] else 0.0
                for q in range(k):
                    if on[i] and on[q]:
                        hs[i, q] = h[i, q] / (diag[i] * diag[q])
                    else:
                        hs[i, q] = 1.0 if i == q else 0.0
            z = _spd_solve(hs, rs)
            negative = False
            for i in range(k):
                coef[t, i] = z[i] / diag[i] if on[i] else 0.0
                if i < n and coef[t, i] < 0:
                    negative = True
            if not negative:
                break
            for i in range(n):
                if coef[t, i] < 0:
                    on[i] = False
        total = 0.0
        for i in range(n):
            coef[t, i] = max(coef[t, i], 0.0)
        for j in range(m):
            v = b[j]
            for i in range(k):
                v -= a[j, i] * coef[t, i]
            total += v * v
        chi2[t] = total


@_kernel
def radial_positions(hkl, cell, zero, wavelength, unit, displacement, out):  # pragma: no cover - compiled
    """Positions ``out`` (T, n) of reflections ``hkl`` (n, 3) in cells ``cell`` (T, n, 6), or
    (T, 1, 6) one per trial (a, b, c in Å, α, β, γ in degrees), with zero shifts ``zero`` (T,):
    the d-spacing from the reciprocal metric tensor (as
    :func:`xrdpipe.crystallography.d_from_cell`), then 2θ (degrees) at ``wavelength`` (NaN where
    λ > 2d, and everywhere without a wavelength, ``wavelength`` 0), plus the zero shift (times
    cos θ with ``displacement``); with ``unit`` 1, Q (Å⁻¹) of that 2θ, or 2π/d without a
    wavelength."""
    rad = np.pi / 180.0
    each = cell.shape[1] > 1
    for t in range(out.shape[0]):
        for n in range(hkl.shape[0]):
            e = n if each else 0
            h, k, l = hkl[n, 0], hkl[n, 1], hkl[n, 2]
            a, b, c = cell[t, e, 0], cell[t, e, 1], cell[t, e, 2]
            ca, cb, cg = np.cos(cell[t, e, 3] * rad), np.cos(cell[t, e, 4] * rad), np.cos(cell[t, e, 5] * rad)
            sa, sb, sg = np.sin(cell[t, e, 3] * rad), np.sin(cell[t, e, 4] * rad), np.sin(cell[t, e, 5] * rad)
            vol2 = 1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg
            inv_d2 = (h * h * sa**2 / a**2 + k * k * sb**2 / b**2 + l * l * sg**2 / c**2
                      + 2 * k * l * (cb * cg - ca) / (b * c) + 2 * h * l * (cg * ca - cb) / (a * c)
                      + 2 * h * k * (ca * cb - cg) / (a * b)) / vol2
            d = 1.0 / np.sqrt(inv_d2) if inv_d2 > 0 else (np.inf if inv_d2 == 0 else np.nan)
            tth = np.nan
            if wavelength > 0:
                s = wavelength / (2.0 * d)
                if np.abs(s) <= 1:
                    tth = 2.0 * np.arcsin(s) / rad
                if displacement:
                    tth += zero[t] * np.cos(tth * rad / 2)
                else:
                    tth += zero[t]
            if unit == 1:
                out[t, n] = 4.0 * np.pi * np.sin(tth * rad / 2.0) / wavelength if wavelength > 0 else 2 * np.pi / d
            else:
                out[t, n] = tth
