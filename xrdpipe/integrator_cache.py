"""A content-addressed cache of integrators: the sparse pixel-to-bin matrix of a geometry, built
once and reused by every run, rerun and ``watch`` poll that integrates with the same settings.

An entry is one file, ``<digest>.xpi``, named by the SHA-256 of its key (everything the matrix
and the normalisation depend on: the geometry, detector, mask, dark, flat, polarization, solid
angle, npt, unit, ranges, splitting, error model, the versions of pyFAI and xrdpipe). The file
holds a JSON header (the key itself and the place, type and checksum of every array) followed by
the raw arrays, 64-byte aligned, so they are memory-mapped on load, never copied: several
processes integrating with the same geometry share one copy in the page cache.

An entry is trusted only when its header's key equals the key asked for, its size is the one the
header promises and every array's checksum matches. Anything else (a truncated or corrupt file, a
file of another format or version) is ignored with a warning and rebuilt. Entries are written
to a temporary file in the same folder and renamed into place, so a reader never sees half a
file, and two runs building the same entry at once both end with a whole one.

The folder is ``[run] cache_dir``, else ``$XDG_CACHE_HOME/xrdpipe/integrators`` (by default
``~/.cache/xrdpipe/integrators``; ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows).
``[run] cache = false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["default_cache_dir", "key_digest", "load_entry", "save_entry", "CacheWarning"]

MAGIC = b"XRDPIPE-INTEGRATOR-CACHE\n"
FORMAT = 2
_ALIGN = 64
_SUFFIX = ".xpi"


class CacheWarning(UserWarning):
    """A cache entry was unusable (it is ignored and rebuilt) or could not be written."""


def default_cache_dir() -> Path:
    """The user's cache folder for integrators (honours ``XDG_CACHE_HOME`` everywhere)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        base = Path(xdg)
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path.home() / ".cache"
    return base / "xrdpipe" / "integrators"


def digest_array(arr: np.ndarray | None) -> str | None:
    """SHA-256 of an array's dtype, shape and bytes (None stays None)."""
    if arr is None:
        return None
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: dict[str, Any]) -> str:
    """The name of the entry of ``key`` (hex SHA-256 of its canonical JSON)."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _checksums(arrays: list[np.ndarray]) -> list[str]:
    """A checksum of each array's bytes: CRC-32 of every piece of at most 16 MB (they catch any
    damage short of a forgery; foreign files are caught by their key), on two threads (zlib
    releases the GIL)."""
    def one(a: np.ndarray) -> str:
        return f"{zlib.crc32(memoryview(np.ascontiguousarray(a)).cast('B')):08x}"

    # split the big arrays so both cores hash
    pieces: list[tuple[int, np.ndarray]] = []
    for i, a in enumerate(arrays):
        flat = np.ascontiguousarray(a).reshape(-1)
        n = max(1, min(8, flat.nbytes // (16 << 20)))
        for part in np.array_split(flat, n):
            pieces.append((i, part))
    with ThreadPoolExecutor(max_workers=2) as pool:
        sums = list(pool.map(lambda p: one(p[1]), pieces))
    out: list[list[str]] = [[] for _ in arrays]
    for (i, _), s in zip(pieces, sums):
        out[i].append(s)
    return ["crc32:" + "".join(s) if len(s) == 1 else "crc32:" + hashlib.sha256("".join(s).encode()).hexdigest()[:32]
            for s in out]


def entry_path(folder: Path | str, key: dict[str, Any]) -> Path:
    """Where the entry of ``key`` lives in ``folder``."""
    return Path(folder) / (key_digest(key) + _SUFFIX)


def save_entry(folder: Path | str, key: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path | None:
    """Write ``arrays`` as the entry of ``key`` (atomically); None, with a warning, if it cannot."""
    path = entry_path(folder, key)
    names = list(arrays)
    data = [np.ascontiguousarray(arrays[n]) for n in names]
    sums = _checksums(data)
    specs = []
    offset = 0
    for name, arr, s in zip(names, data, sums):
        specs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                      "nbytes": int(arr.nbytes), "checksum": s})
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"format": FORMAT, "key": json.loads(_canonical(key)), "arrays": specs,
                         "data_bytes": offset}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem[:16] + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)   # a shared beamtime cache: readable like the run files
            f.write(MAGIC)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for spec, arr in zip(specs, data):
                f.seek(start + spec["offset"])
                f.write(memoryview(arr).cast("B"))
            f.truncate(start + offset)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return path
    except OSError as exc:
        warnings.warn(f"cannot write the integrator cache entry {path}: {exc}; continuing without it",
                      CacheWarning, stacklevel=2)
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_entry(folder: Path | str, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of the entry of ``key``, memory-mapped read-only; None if there is none.

    An entry that is not whole and exactly of this key (truncated, corrupt, foreign, of another
    format) is ignored with a :class:`CacheWarning` and None is returned, so it gets rebuilt.
    """
    path = entry_path(folder, key)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    try:
        return _read(path, size, key)
    except Exception as exc:  # anything wrong with the file: never trusted
        warnings.warn(f"ignoring the integrator cache entry {path} ({exc}); building it again",
                      CacheWarning, stacklevel=2)
        return None


def _read(path: Path, size: int, key: dict[str, Any]) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise ValueError("not an xrdpipe integrator cache file")
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 24 or len(MAGIC) + 8 + n > size:
            raise ValueError("truncated or corrupt header")
        header = json.loads(f.read(n))
    if header.get("format") != FORMAT:
        raise ValueError(f"cache format {header.get('format')!r}, expected {FORMAT}")
    if header.get("key") != json.loads(_canonical(key)):
        raise ValueError("its key is not the one asked for")
    start = -(-(len(MAGIC) + 8 + n) // _ALIGN) * _ALIGN
    if size != start + int(header["data_bytes"]):
        raise ValueError(f"{size} bytes, expected {start + int(header['data_bytes'])} (truncated?)")
    out: dict[str, np.ndarray] = {}
    for spec in header["arrays"]:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(s) for s in spec["shape"])
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != spec["nbytes"]:
            raise ValueError(f"array {spec['name']} has an inconsistent size")
        if spec["nbytes"] == 0:
            out[spec["name"]] = np.zeros(shape, dtype)
            continue
        out[spec["name"]] = np.memmap(path, dtype=dtype, mode="r", offset=start + int(spec["offset"]),
                                      shape=shape)
    sums = _checksums([out[s["name"]] for s in header["arrays"]])
    for spec, s in zip(header["arrays"], sums):
        if s != spec["checksum"]:
            raise ValueError(f"checksum of {spec['name']} does not match (corrupt)")
    return out
