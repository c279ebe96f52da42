"""2D frame readers.

``list_frames(files, dataset=...)`` turns the configured files into a list of
:class:`FrameRef` (an HDF5/NeXus stack is split into its frames) without reading pixel data;
``read_frame(ref)`` reads one frame. When each frame was taken: :mod:`xrdpipe.timing`.

Readers: EIGER/NeXus HDF5 stacks (bitshuffle-LZ4 and the other filters of ``hdf5plugin``)
through h5py, CBF, EDF and TIFF through fabio. Bitshuffle-LZ4 frames chunked frame by frame
(EIGER) are decompressed by bitshuffle's own function outside HDF5's global lock, so several
frames decompress at once on the cores.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ChunkDecodeError, FrameReadError

__all__ = ["FrameRef", "list_frames", "read_frame", "is_hdf5", "open_hdf5", "HDF5_SUFFIXES", "DEFAULT_DATASETS"]

HDF5_SUFFIXES = {".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nexus"}
#: formats that hold one frame per file (multi-frame EDF and others are opened to count frames)
SINGLE_FRAME_SUFFIXES = {".cbf", ".tif", ".tiff", ".mccd", ".img", ".sfrm"}
#: where an HDF5 stack is looked for when ``frames.dataset`` is not given
DEFAULT_DATASETS = ("/entry/data/data", "/entry/instrument/detector/data", "/entry/data/data_000001")


@dataclass(frozen=True)
class FrameRef:
    """One frame: a file and, for a stack, the index inside it.

    ``error`` is set when the file could not even be listed (its frames are unknown); such a
    reference is recorded as a failed frame.
    """

    file: Path
    index: int = 0
    dataset: str | None = None
    error: str | None = None
    #: the index (in the file's series) of the first frame of ``dataset``: an EIGER master links
    #: one data file per ``/entry/data/data_NNNNNN``, and ``index`` counts across all of them
    first: int = 0

    @property
    def key(self) -> str:
        """A stable identity (file name and index) used to resume a run."""
        return f"{self.file.name}:{self.index}"


def is_hdf5(path: Path) -> bool:
    return path.suffix.lower() in HDF5_SUFFIXES


def open_hdf5(path: Path):
    """Open an HDF5 file to read, also while a detector is still writing it (SWMR or not: such a
    file is opened without HDF5's file lock, and what it holds so far is read)."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the compression filters)

    try:
        return h5py.File(path, "r")
    except OSError:
        if not path.exists():
            raise
        return h5py.File(path, "r", swmr=True, locking=False)


_BSHUF_FILTER = 32008          # bitshuffle, with LZ4 when its 5th parameter is 2
_bshuf_lock = threading.Lock()
_bshuf_fn: list = []           # [the C function, or None when it cannot be used]


def _bshuf_decompress():
    """bitshuffle's own ``bshuf_decompress_lz4`` from the filter library of hdf5plugin (the one
    HDF5 would call), or None where that library or symbol is missing."""
    with _bshuf_lock:
        if not _bshuf_fn:
            fn = None
            try:
                import ctypes

                import hdf5plugin

                libs = sorted(Path(hdf5plugin.PLUGIN_PATH).glob("*h5bshuf*"))
                if libs:
                    fn = ctypes.CDLL(str(libs[0])).bshuf_decompress_lz4
                    fn.restype = ctypes.c_int64
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                   ctypes.c_size_t]
            except (ImportError, OSError, AttributeError):
                fn = None
            _bshuf_fn.append(fn)
        return _bshuf_fn[0]


def _read_bitshuffle_lz4(ds, index: int, reuse: dict | None = None) -> np.ndarray | None:
    """One frame of a bitshuffle-LZ4 dataset chunked frame by frame (EIGER), decompressed here
    rather than inside HDF5: h5py holds one lock over every HDF5 call, so frames decompressed
    through it are decompressed one at a time, while this call releases the GIL and lets each
    core decompress its own frame. None when the dataset is not such a dataset, the chunk is
    corrupt or anything is unexpected (h5py then reads it, and reports what is wrong)."""
    try:
        return _decode_bitshuffle_lz4(ds, index, reuse)
    except ChunkDecodeError:
        return None


def _decode_bitshuffle_lz4(ds, index: int, reuse: dict | None) -> np.ndarray | None:
    """:func:`_read_bitshuffle_lz4`, but a corrupt chunk raises :class:`ChunkDecodeError` (named as
    :func:`check_chunks` names it). The chunk is read once, checked (:func:`_bitshuffle_lz4_problem`)
    and then decoded by bitshuffle's own decoder."""
    try:
        if ds.ndim == 3:
            if ds.chunks != (1, *ds.shape[1:]) or not 0 <= index < ds.shape[0]:
                return None
            offset, shape = (index, 0, 0), ds.shape[1:]
        elif ds.ndim == 2 and ds.chunks == ds.shape:
            offset, shape = (0, 0), ds.shape
        else:
            return None
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() != 1:
            return None
        code, _flags, values, _name = plist.get_filter(0)
        itemsize = ds.dtype.itemsize
        if code != _BSHUF_FILTER or len(values) < 5 or values[4] != 2 or values[2] != itemsize:
            return None
        fn = _bshuf_decompress()
        if fn is None:
            return None
        try:
            filter_mask, chunk = ds.id.read_direct_chunk(offset)
        except (KeyError, ValueError, OSError, RuntimeError):
            return None                          # not written (fill value): h5py's business
        if filter_mask != 0:
            return None
        n = int(np.prod(shape))
        problem = _bitshuffle_lz4_problem(chunk, n * itemsize, itemsize)
        if problem:
            raise ChunkDecodeError(f"cannot decompress chunk {list(offset)} of {ds.name} (bitshuffle-LZ4): {problem}")
        block = int.from_bytes(chunk[8:12], "big") // itemsize
        out = None if reuse is None else reuse.get((shape, ds.dtype.str))
        if out is None:
            out = np.empty(shape, ds.dtype)
            if reuse is not None:
                reuse[(shape, ds.dtype.str)] = out
        import ctypes

        start = ctypes.cast(ctypes.c_char_p(chunk), ctypes.c_void_p).value + 12
        used = fn(start, out.ctypes.data, n, itemsize, block)
        if used != len(chunk) - 12:
            raise ChunkDecodeError(f"cannot decompress chunk {list(offset)} of {ds.name} (bitshuffle-LZ4): "
                                f"bitshuffle's decoder refused it (it returned {used})")
        return out
    except ChunkDecodeError:
        raise
    except Exception:
        return None


def _find_dataset(h5, dataset: str | None, path: Path):
    if dataset is not None:
        if dataset not in h5:
            raise FrameReadError(str(path), None, f"no dataset {dataset!r} in the file (frames.dataset)")
        return h5[dataset]
    for name in DEFAULT_DATASETS:
        if name in h5:
            return h5[name]
    found = []
    h5.visititems(lambda n, o: found.append(n) if getattr(o, "ndim", 0) in (2, 3) else None)
    if len(found) == 1:
        return h5[found[0]]
    raise FrameReadError(
        str(path), None,
        "cannot tell which dataset holds the frames; set frames.dataset "
        f"(2D/3D datasets found: {', '.join('/' + f for f in found) or 'none'})",
    )


_EIGER_DATA = re.compile(r"data_\d{6}")


def _eiger_links(h5) -> list[str]:
    """The ``/entry/data/data_NNNNNN`` entries of an EIGER master file, in order (none elsewhere)."""
    group = h5["/entry/data"] if "/entry/data" in h5 else None
    if not hasattr(group, "keys"):
        return []
    return sorted(f"/entry/data/{k}" for k in group.keys() if _EIGER_DATA.fullmatch(k))


def _hdf5_refs(path: Path, h5, dataset: str | None) -> list[FrameRef]:
    """The frames of an open HDF5 file: one dataset's, or (an EIGER master file, no ``dataset``
    named) every linked data file's in turn, counted across the series. A data file that cannot
    be opened while a later one can is one failed reference holding the place of as many frames
    as the data file before it (the detector writes the same number per file), so the frames
    after it keep their numbers; missing data files at the end are frames not written yet."""
    links = _eiger_links(h5) if dataset is None else []
    if not links:
        ds = _find_dataset(h5, dataset, path)
        name = dataset if dataset is not None else next((n for n in DEFAULT_DATASETS if n in h5), ds.name)
        return _dataset_refs(path, ds, name, 0)
    opened: list[tuple[str, object]] = []
    for name in links:
        try:
            opened.append((name, h5[name]))
        except (KeyError, OSError) as exc:      # an external data file missing or unreadable
            opened.append((name, exc))
    while opened and isinstance(opened[-1][1], Exception):
        opened.pop()                            # not written yet
    refs: list[FrameRef] = []
    count, per_file = 0, 1
    for name, ds in opened:
        if isinstance(ds, Exception):
            refs.append(FrameRef(path, count, name, error=f"cannot open the data file linked at {name}: {ds}",
                                 first=count))
            count += per_file
            continue
        refs += _dataset_refs(path, ds, name, count)
        per_file = ds.shape[0] if ds.ndim == 3 else 1
        count += per_file
    return refs


def _dataset_refs(path: Path, ds, name: str, first: int) -> list[FrameRef]:
    if ds.ndim == 2:
        return [FrameRef(path, first, name, first=first)]
    if ds.ndim == 3:
        return [FrameRef(path, first + i, name, first=first) for i in range(ds.shape[0])]
    raise FrameReadError(str(path), None, f"dataset {name} has {ds.ndim} dimensions, expected 2 or 3")


def list_frames(files: Sequence[Path], *, dataset: str | None = None) -> list[FrameRef]:
    """Every frame of every file, in order. Unlistable files give one failed reference. The
    frames of an EIGER master file are those of every data file it links, in turn."""
    refs: list[FrameRef] = []
    for path in files:
        path = Path(path)
        if is_hdf5(path):
            try:
                with open_hdf5(path) as h5:
                    refs.extend(_hdf5_refs(path, h5, dataset))
            except FrameReadError as exc:
                refs.append(FrameRef(path, 0, dataset, error=exc.reason))
            except (OSError, KeyError, ValueError) as exc:
                refs.append(FrameRef(path, 0, dataset, error=f"cannot open as HDF5: {exc}"))
        elif path.suffix.lower() in SINGLE_FRAME_SUFFIXES:
            # one frame per file: not opened here (that would read every image twice); a
            # damaged file is found, and recorded, when its frame is read
            refs.append(FrameRef(path, 0))
        else:
            try:
                import fabio

                with fabio.open(str(path)) as img:
                    n = max(int(getattr(img, "nframes", 1) or 1), 1)
            except Exception as exc:  # fabio raises many kinds
                refs.append(FrameRef(path, 0, None, error=f"cannot open as an image: {exc}"))
                continue
            refs.extend(FrameRef(path, i) for i in range(n))
    return refs


def read_frame(ref: FrameRef, *, shape: tuple[int, int] | None = None,
               reuse: dict | None = None) -> np.ndarray:
    """Read one frame as a 2D array (the file's dtype).

    ``reuse``, a dict the caller keeps (one per thread), lets a frame be decompressed into an
    array kept there from the previous frame instead of a new one: the frame returned is then
    overwritten by the next read with the same dict.

    Raises
    ------
    FrameReadError
        The file is truncated or corrupt, the frame is missing, or its shape is not ``shape``.
    """
    if ref.error:
        raise FrameReadError(str(ref.file), ref.index, ref.error)
    try:
        if is_hdf5(ref.file):
            with open_hdf5(ref.file) as h5:
                ds = _find_dataset(h5, ref.dataset, ref.file)
                local = ref.index - ref.first       # the frame's place in its dataset
                try:    # one chunk per frame: read once, checked, decoded outside HDF5's lock
                    data = _decode_bitshuffle_lz4(ds, local, reuse)
                except ChunkDecodeError as exc:
                    raise FrameReadError(str(ref.file), ref.index, str(exc)) from None
                if data is None:
                    problem = check_chunks(ds, local if ds.ndim == 3 else None)
                    if problem:
                        raise FrameReadError(str(ref.file), ref.index, problem)
                    data = ds[local] if ds.ndim == 3 else ds[()]
        else:
            import fabio

            problem = _cbf_problem(ref.file) if ref.file.suffix.lower() == ".cbf" else None
            if problem:
                raise FrameReadError(str(ref.file), ref.index, problem)
            with fabio.open(str(ref.file)) as img:
                data = img.data if ref.index == 0 else img.getframe(ref.index).data
                if _edf_incomplete(img, ref.index):
                    raise FrameReadError(str(ref.file), ref.index, "truncated: the file ends inside this frame's data")
    except FrameReadError as exc:
        raise FrameReadError(str(ref.file), ref.index, exc.reason) from None
    except Exception as exc:
        raise FrameReadError(str(ref.file), ref.index, f"cannot read the frame: {type(exc).__name__}: {exc}") from None
    if data is None or np.ndim(data) != 2:
        raise FrameReadError(str(ref.file), ref.index, f"expected a 2D image, got shape {np.shape(data)}")
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise FrameReadError(
            str(ref.file), ref.index,
            f"shape {data.shape[0]} x {data.shape[1]} is not the detector's {shape[0]} x {shape[1]}",
        )
    return data


_CBF_BINARY = b"\x0c\x1a\x04\xd5"          # the start of a CBF's binary section


def _cbf_problem(path: Path) -> str | None:
    """Why the CBF ``path`` is not whole (its binary section is shorter than its header's
    ``X-Binary-Size``, or does not match its ``Content-MD5``), or None.

    fabio reads such a file (a frame cut short by a transfer, a bad disk block, a detector still
    writing it) as an image, zero-padded or partly wrong, and only logs the mismatch; xrdpipe
    records the frame as failed instead (or, live, tries it again once it is written)."""
    import base64
    import hashlib

    raw = path.read_bytes()
    start = raw.find(_CBF_BINARY)
    if start < 0:
        return None if b"X-Binary-Size" not in raw else "truncated: no binary data after the header"
    head = raw[:start]
    sizes = re.findall(rb"X-Binary-Size:\s*(\d+)", head)
    sums = re.findall(rb"Content-MD5:\s*(\S+)", head)
    begin = start + len(_CBF_BINARY)
    if not sizes:
        return None                                   # fabio says what is wrong
    size = int(sizes[-1])
    if len(raw) - begin < size:
        return f"truncated: {len(raw) - begin} of the {size} bytes of binary data its header gives"
    if sums and base64.b64encode(hashlib.md5(raw[begin:begin + size]).digest()) != sums[-1]:
        return "corrupt: the binary data do not match the header's Content-MD5"
    return None


def _edf_incomplete(img, index: int) -> bool:
    """Whether fabio read frame ``index`` of an EDF file from a file that ends inside its data
    (fabio pads it with zeros and logs it)."""
    if not getattr(img, "incomplete_file", False):
        return False
    frames = getattr(img, "_frames", None)
    if not frames or index >= len(frames):
        return True
    return bool(getattr(frames[index], "incomplete_data", True))


# --------------------------------------------------------------------------------------------
# compressed chunks checked before HDF5 decompresses them

_BITSHUFFLE = 32008
_BSHUF_LZ4 = 2


def check_chunks(ds, index: int | None) -> str | None:
    """Why a frame of the HDF5 dataset ``ds`` (``index`` along its first axis, or None for a 2D
    dataset) cannot be decompressed safely, or None.

    The bitshuffle filter trusts the block sizes of a chunk (and older builds of it decode LZ4
    with a decoder that trusts its input): a corrupt chunk (a bad disk block, a transfer cut
    short) can crash the process instead of raising. So every bitshuffle-LZ4 chunk of the frame
    is first read raw (``read_direct_chunk``) and walked block by block, sequence by sequence
    (:func:`_bitshuffle_lz4_problem`, compiled, a few ms per EIGER2 16M frame): the header's
    sizes must match the chunk's shape, every block must decode to exactly its size under LZ4's
    bounds (as LZ4's bounds-checked decoder checks them) and the blocks fill the chunk. Other
    filters (gzip, LZF, Blosc, bitshuffle-zstd...) check their input themselves and are left to
    HDF5.
    """
    if ds.chunks is None or ds.compression in ("gzip", "lzf", "szip"):      # contiguous, or HDF5's own
        return None
    dcpl = ds.id.get_create_plist()
    filters = [dcpl.get_filter(i) for i in range(dcpl.get_nfilters())]
    position = next((k for k, f in enumerate(filters) if f[0] == _BITSHUFFLE), None)
    if position is None:
        return None
    cd = tuple(filters[position][2])
    if len(cd) < 5 or cd[4] != _BSHUF_LZ4:
        return None
    chunks = ds.chunks
    lead = () if index is None else (index // chunks[0] * chunks[0],)
    plane = ds.shape[-2:]
    for r in range(0, plane[0], chunks[-2]):
        for c in range(0, plane[1], chunks[-1]):
            offset = (*lead, r, c)
            try:
                mask, raw = ds.id.read_direct_chunk(offset)
            except (KeyError, ValueError, OSError, RuntimeError):
                continue                         # not written (fill value), or not there: HDF5's business
            if mask & (1 << position):
                continue                         # stored without this filter
            expected = int(np.prod(chunks)) * ds.dtype.itemsize
            problem = _bitshuffle_lz4_problem(raw, expected, ds.dtype.itemsize)
            if problem:
                return f"cannot decompress chunk {list(offset)} of {ds.name} (bitshuffle-LZ4): {problem}"
    return None


def _bitshuffle_lz4_problem(raw: bytes, expected: int, itemsize: int) -> str | None:
    """What is wrong with one bitshuffle-LZ4 chunk as the HDF5 filter writes it (a 12-byte
    header: total bytes, block bytes; then per block a 4-byte size and an LZ4 block; the last
    elements that do not fill 8 are stored as they are), or None.

    The LZ4 blocks are parsed sequence by sequence by a compiled walk
    (:func:`xrdpipe.kernels.lz4_blocks_problem`) that checks every length and offset as LZ4's
    bounds-checked decoder does, without decoding: a chunk it passes is one that decoder
    decodes to exactly the chunk's bytes, and no decoder reads or writes out of bounds on it."""
    if len(raw) < 12:
        return f"the chunk has {len(raw)} bytes, fewer than its 12-byte header"
    total = int.from_bytes(raw[:8], "big")
    block = int.from_bytes(raw[8:12], "big")
    if total != expected:
        return f"its header says {total} bytes, the chunk holds {expected}"
    if block <= 0 or block % itemsize or (block // itemsize) % 8:
        return f"its header gives an impossible block size ({block} bytes)"
    from .kernels import LZ4_REASONS, lz4_blocks_problem

    n_elem, per = total // itemsize, block // itemsize
    rest = n_elem % per
    last = (rest - rest % 8) * itemsize
    n_blocks = n_elem // per + (1 if last else 0)
    code, k, detail = lz4_blocks_problem(np.frombuffer(raw, np.uint8), 12, n_elem // per, per * itemsize, last,
                                         (rest % 8) * itemsize)
    if code == 0:
        return None
    if code == 1:
        return f"it ends before block {k} of {n_blocks}"
    if code == 2:
        return f"block {k} of {n_blocks} claims {detail} bytes, past the end of the chunk"
    if code == 3:
        return f"block {k} of {n_blocks} is corrupt ({LZ4_REASONS[int(detail)]})"
    if code == 4:
        want = per * itemsize if k < n_elem // per else last
        return f"block {k} of {n_blocks} gives {detail} bytes, not {want}"
    return f"{detail} unexpected byte(s) after the last block"
