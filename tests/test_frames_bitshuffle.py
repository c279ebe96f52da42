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
