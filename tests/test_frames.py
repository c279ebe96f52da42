"""Frame files: what is listed and read, here EIGER master files that link their data files."""

import h5py
import numpy as np

from xrdpipe.frames import list_frames, read_frame


def _eiger_series(folder, counts=(3, 2), missing=()):
    """A DECTRIS-style series: ``s_master.h5`` whose ``/entry/data/data_00000k`` are external links
    to ``/entry/data/data`` of ``s_data_00000k.h5`` (relative names, as the detector writes them)."""
    rng = np.random.default_rng(0)
    stacks = []
    with h5py.File(folder / "s_master.h5", "w") as master:
        master.create_group("entry/data")
        for k, n in enumerate(counts, start=1):
            name = f"s_data_{k:06d}.h5"
            stack = rng.integers(0, 1000, (n, 8, 6), dtype=np.uint32)
            stacks.append(stack)
            if k not in missing:
                with h5py.File(folder / name, "w") as data:
                    data.create_dataset("entry/data/data", data=stack, chunks=(1, 8, 6))
            master[f"entry/data/data_{k:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    return folder / "s_master.h5", stacks


def test_an_eiger_master_lists_and_reads_the_frames_of_every_data_file(tmp_path):
    master, stacks = _eiger_series(tmp_path)
    refs = list_frames([master])
    assert [r.key for r in refs] == [f"s_master.h5:{i}" for i in range(5)]
    assert [r.error for r in refs] == [None] * 5
    truth = np.concatenate(stacks)
    for r in refs:
        np.testing.assert_array_equal(read_frame(r), truth[r.index])


def test_a_missing_data_file_of_a_master_is_one_failed_frame_and_the_frames_after_keep_their_numbers(tmp_path):
    master, stacks = _eiger_series(tmp_path, counts=(2, 2, 2), missing=(2,))
    refs = list_frames([master])
    assert [r.index for r in refs] == [0, 1, 2, 4, 5] and [r.error is None for r in refs] == [True, True, False, True, True]
    assert "cannot open the data file linked at /entry/data/data_000002" in refs[2].error
    np.testing.assert_array_equal(read_frame(refs[3]), stacks[2][0])


def test_data_files_not_written_yet_are_not_frames_yet(tmp_path):
    """Live: the master links data files the detector has not written yet."""
    master, stacks = _eiger_series(tmp_path, counts=(2, 2, 2), missing=(2, 3))
    assert [r.key for r in list_frames([master])] == ["s_master.h5:0", "s_master.h5:1"]


def test_a_cbf_or_edf_cut_short_or_corrupt_is_a_read_error_not_a_zero_padded_frame(tmp_path):
    """fabio reads these as images (zero-padded, or with half the pixels wrong) and only logs;
    a frame from them would be integrated as if whole."""
    import pytest
    from fabio.cbfimage import CbfImage
    from fabio.edfimage import EdfImage

    from xrdpipe.errors import FrameReadError
    from xrdpipe.frames import FrameRef

    data = np.random.default_rng(0).poisson(50, (64, 80)).astype(np.int32)
    CbfImage(data=data, header={}).write(str(tmp_path / "whole.cbf"))
    EdfImage(data=data).write(str(tmp_path / "whole.edf"))
    cbf = (tmp_path / "whole.cbf").read_bytes()
    edf = (tmp_path / "whole.edf").read_bytes()
    (tmp_path / "half.cbf").write_bytes(cbf[: len(cbf) // 2])
    flipped = bytearray(cbf)
    flipped[-len(cbf) // 4] ^= 0x55                           # one byte inside the binary section
    (tmp_path / "flipped.cbf").write_bytes(bytes(flipped))
    (tmp_path / "short.edf").write_bytes(edf[:-100])

    for name in ("whole.cbf", "whole.edf"):
        assert np.array_equal(read_frame(FrameRef(tmp_path / name, 0)), data)
    for name, reason in [("half.cbf", r"truncated: \d+ of the \d+ bytes of binary data its header gives"),
                         ("flipped.cbf", "corrupt: the binary data do not match the header's Content-MD5"),
                         ("short.edf", "truncated: the file ends inside this frame's data")]:
        with pytest.raises(FrameReadError, match=f"{name} frame 0: {reason}"):
            read_frame(FrameRef(tmp_path / name, 0))
