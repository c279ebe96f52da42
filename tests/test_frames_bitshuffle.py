"""Bitshuffle-LZ4 frames decompressed outside HDF5's lock: the same pixels as h5py, and h5py's
own path (and error) for anything else."""

import h5py
import hdf5plugin
import numpy as np
import pytest

from xrdpipe.errors import FrameReadError
from xrdpipe.frames import FrameRef, _read_bitshuffle_lz4, read_frame


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    rng = np.random.default_rng(5)
    frames = rng.poisson(30, (3, 96, 80)).astype(np.uint32)
    frames[:, 10, :] = np.iinfo(np.uint32).max
    path = tmp_path_factory.mktemp("bshuf") / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry/data/data", data=frames, chunks=(1, 96, 80), **hdf5plugin.Bitshuffle(cname="lz4"))
        h5.create_dataset("/entry/data/gzip", data=frames, chunks=(1, 96, 80), compression="gzip")
        h5.create_dataset("/entry/data/u16", data=frames.astype(np.uint16), chunks=(1, 96, 80),
                          **hdf5plugin.Bitshuffle(cname="lz4"))
        # many LZ4 blocks, a short last block and 7 elements stored as they are (67 x 301 = 8k + 7)
        odd = rng.poisson(30, (2, 67, 301)).astype(np.uint32)
        h5.create_dataset("/entry/data/odd", data=odd, chunks=(1, 67, 301), **hdf5plugin.Bitshuffle(nelems=512, cname="lz4"))
    return path, frames


def test_same_pixels_as_h5py(stack):
    path, frames = stack
    with h5py.File(path, "r") as h5:
        for name, dtype in (("data", np.uint32), ("u16", np.uint16)):
            ds = h5["/entry/data/" + name]
            for i in range(3):
                fast = _read_bitshuffle_lz4(ds, i)
                assert fast is not None and fast.dtype == dtype
                np.testing.assert_array_equal(fast, frames[i].astype(dtype))
        odd = h5["/entry/data/odd"]
        for i in range(2):
            np.testing.assert_array_equal(_read_bitshuffle_lz4(odd, i, {}), odd[i])   # h5py's own filter
        assert _read_bitshuffle_lz4(h5["/entry/data/gzip"], 0) is None      # not bitshuffle: h5py's path
        assert _read_bitshuffle_lz4(h5["/entry/data/data"], 3) is None       # no such frame
    for i in range(3):
        np.testing.assert_array_equal(read_frame(FrameRef(path, i, "/entry/data/gzip")), frames[i])
        np.testing.assert_array_equal(read_frame(FrameRef(path, i, "/entry/data/data")), frames[i])


def test_damaged_chunk_is_refused_before_decoding(stack, tmp_path):
    """The fast decoder returns nothing for a damaged chunk, and the chunk check (run before any
    decoder) records the frame as failed, naming the chunk; the next frame reads as before."""
    path, frames = stack
    bad = tmp_path / "bad.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "r+") as h5:
        ds = h5["/entry/data/data"]
        mask, chunk = ds.id.read_direct_chunk((1, 0, 0))
        ds.id.write_direct_chunk((1, 0, 0), chunk[:12] + b"\xff" * (len(chunk) - 12), mask)
    with h5py.File(bad, "r") as h5:
        assert _read_bitshuffle_lz4(h5["/entry/data/data"], 1) is None
    with pytest.raises(FrameReadError, match=r"bad\.h5 frame 1: cannot decompress chunk \[1, 0, 0\]"):
        read_frame(FrameRef(bad, 1, "/entry/data/data"))
    np.testing.assert_array_equal(read_frame(FrameRef(bad, 2, "/entry/data/data")), frames[2])


def _lz4_reference(raw: bytes, expected: int, itemsize: int) -> bool:
    """The chunk check as it was first written: every LZ4 block decoded by the ``lz4`` package's
    bounds-checked decoder (``LZ4_decompress_safe``) and its size compared. True if sound."""
    import lz4.block

    if len(raw) < 12 or int.from_bytes(raw[:8], "big") != expected:
        return False
    block = int.from_bytes(raw[8:12], "big")
    if block <= 0 or block % itemsize or (block // itemsize) % 8:
        return False
    n_elem, per = expected // itemsize, block // itemsize
    sizes = [per] * (n_elem // per) + ([n_elem % per - n_elem % 8] if n_elem % per - n_elem % 8 else [])
    pos = 12
    for elems in sizes:
        size = int.from_bytes(raw[pos:pos + 4], "big") if pos + 4 <= len(raw) else -1
        pos += 4
        if size <= 0 or pos + size > len(raw):
            return False
        try:
            if len(lz4.block.decompress(raw[pos:pos + size], uncompressed_size=elems * itemsize)) != elems * itemsize:
                return False
        except lz4.block.LZ4BlockError:
            return False
        pos += size
    return pos + (n_elem % 8) * itemsize == len(raw)


def test_the_compiled_chunk_check_refuses_whatever_lz4s_checked_decoder_refuses(stack):
    """3000 damaged chunks (bytes overwritten, bits flipped, cut short): the compiled walk over
    the LZ4 sequences passes none that LZ4's bounds-checked decoder refuses, and refuses only
    those plus matches with offset 0 (invalid LZ4, which that decoder lets through)."""
    pytest.importorskip("lz4.block")
    from xrdpipe.frames import _bitshuffle_lz4_problem

    path, _ = stack
    with h5py.File(path, "r") as h5:
        chunks = [(h5["/entry/data/" + name].id.read_direct_chunk(offset)[1], h5["/entry/data/" + name])
                  for name, offset in (("data", (0, 0, 0)), ("u16", (1, 0, 0)), ("odd", (1, 0, 0)))]
        chunks = [(raw, int(np.prod(ds.chunks)) * ds.dtype.itemsize, ds.dtype.itemsize) for raw, ds in chunks]
    rng = np.random.default_rng(1)
    refused = {True: 0, False: 0}
    for trial in range(3000):
        raw, expected, itemsize = chunks[trial % len(chunks)]
        b = bytearray(raw)
        kind = trial % 3
        if kind == 0:
            at = int(rng.integers(12, len(b) - 8))
            n = int(rng.integers(1, 8))
            b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 1:
            b[int(rng.integers(12, len(b)))] ^= 1 << int(rng.integers(0, 8))
        else:
            b = b[:int(rng.integers(0, len(b)))]
        problem = _bitshuffle_lz4_problem(bytes(b), expected, itemsize)
        sound = _lz4_reference(bytes(b), expected, itemsize)
        if not sound:
            assert problem is not None, f"trial {trial}: passed a chunk LZ4's decoder refuses"
        elif problem is not None:
            assert problem.endswith("(a match with offset 0, which LZ4 never writes)"), problem
        refused[sound] += problem is not None
    assert refused[False] > 1000 and refused[True] < 30, refused
    for raw, expected, itemsize in chunks:
        assert _bitshuffle_lz4_problem(raw, expected, itemsize) is None
    raw, expected, _ = chunks[0]
    end_of_block_0 = 16 + int.from_bytes(raw[12:16], "big")
    assert _bitshuffle_lz4_problem(raw[:end_of_block_0], expected, 4) == "it ends before block 1 of 4"
    assert _bitshuffle_lz4_problem(raw[:end_of_block_0 - 1], expected, 4) == (
        f"block 0 of 4 claims {end_of_block_0 - 16} bytes, past the end of the chunk")
