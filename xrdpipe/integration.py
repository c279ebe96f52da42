"""Azimuthal integration: 2D frames -> 1D patterns with pyFAI.

:class:`Integrator` is built once per run (pyFAI's sparse matrix is the costly part, cached on
disk by :mod:`xrdpipe.integrator_cache`) and reused for every frame: one pass of a compiled kernel
over the matrix gives the intensity and its Poisson variance straight from the raw frame. It
pickles as its matrices only, so it can be sent to worker processes. Frames are streamed through
it by :mod:`xrdpipe.streaming`.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np

from .calibration import Calibration
from .crystallography import RadialAxis
from .integrator_cache import default_cache_dir, digest_array, entry_path, load_entry, save_entry

__all__ = ["Integrator"]



def _xrdpipe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xrdpipe")
    except PackageNotFoundError:
        return "unknown"


def _flag_value(frame: np.ndarray) -> int | None:
    """The value that marks invalid pixels in an integer frame (EIGER: the dtype's maximum)."""
    if np.issubdtype(frame.dtype, np.integer) and frame.dtype.itemsize >= 2:
        return int(np.iinfo(frame.dtype).max)
    return None



def _geometry(calibration: Calibration, shape: tuple[int, ...]):
    """A copy of the calibration's pyFAI geometry (the calibration stays untouched) with the
    detector's shape and the calibration's mask set once on the detector (pyFAI folds it into
    the sparse matrix)."""
    ai = copy.deepcopy(calibration.geometry)
    if ai.detector.max_shape is None:
        ai.detector.max_shape = shape
    if calibration.mask is not None:
        ai.detector.mask = calibration.mask.astype(np.int8)
    return ai


def _band_extent(pos: np.ndarray, cmask: np.ndarray | None, a: int, b: int) -> tuple[float, float] | None:
    """pyFAI's radial boundaries over the rows ``a:b`` (calc_boundaries: corners of unmasked
    pixels); None where every pixel of the band is masked."""
    cols = pos.shape[1]
    corners = [pos[a:b, :, k, 0] for k in range(4)]
    low = np.minimum(np.minimum(corners[0], corners[1]), np.minimum(corners[2], corners[3]))
    high = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3]))
    if cmask is None:
        return float(low.min()), float(high.max())
    valid = (cmask[a * cols:b * cols] == 0).reshape(b - a, cols)
    if not valid.any():
        return None
    return (float(np.min(low, where=valid, initial=np.inf)),
            float(np.max(high, where=valid, initial=-np.inf)))


def _split_matrix(pool, flat: np.ndarray, cmask: np.ndarray | None, geometry: tuple,
                  starts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full-splitting matrix (CSC data, indices, indptr) of the pixel corners ``flat``
    (n_pix, 4, 2), counted then filled band by band (pixels ``starts[i]:starts[i + 1]``)."""
    from . import kernels

    n_pix, n_bands = len(flat), len(starts) - 1
    counts = np.empty(n_pix, np.int64)
    no_mask = np.zeros(1, np.int8)

    def count(i: int):
        a, b = starts[i], starts[i + 1]
        kernels.split_count(flat[a:b], no_mask if cmask is None else cmask[a:b], cmask is not None, *geometry,
                            counts[a:b])

    list(pool.map(count, range(n_bands)))
    indptr = np.zeros(n_pix + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    if indptr[-1] <= np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    data = np.empty(int(indptr[-1]), np.float32)
    indices = np.empty(int(indptr[-1]), np.int32)

    def fill(i: int):
        a, b = starts[i], starts[i + 1]
        lo, hi = int(indptr[a]), int(indptr[b])
        kernels.split_fill(flat[a:b], *geometry, indptr[a:b + 1], data[lo:hi], indices[lo:hi])

    list(pool.map(fill, range(n_bands)))
    return data, indices, indptr


class Integrator(RadialAxis):
    """One integrator bound to a detector shape and the integration settings.

    The pixel-to-bin matrix of pyFAI's full (or bbox, or no) pixel splitting is built once, from
    the geometry, mask, ranges and splitting, and kept pixel by pixel (CSC: one column per pixel).
    With ``engine="xrdpipe"`` (the default) every frame is then integrated in one pass over that
    matrix, straight from the raw frame, by a compiled kernel (:mod:`xrdpipe.kernels`) that
    releases the GIL, so several frames are integrated at once on the cores; the per-pixel
    normalisation (solid angle, polarization, flat) is summed once instead of per frame. The
    formulas are pyFAI's own (``integrate1d`` with the CSR engine and ``error_model="poisson"``)::

        I = Σ c (x - dark) / Σ c n        σ = sqrt(Σ c² max(x, 1)) / Σ c n

    with ``c`` the splitting coefficients and ``n`` = solid angle × polarization × flat; the
    products are float32 and the sums float64, and the test-suite checks the result agrees with
    pyFAI to 1e-5. ``engine="pyfai"`` calls pyFAI's ``integrate1d`` per frame.

    With full splitting the matrix is built by xrdpipe's compiled full-splitting kernel
    (:func:`xrdpipe.kernels.split_fill`: pyFAI's corners, bin boundaries and arithmetic, the same
    matrix ~4x faster than pyFAI's own kernel) on bands of the detector, one per core,
    while the normalisation is computed on the side. With ``cache``
    (a folder, or True for :func:`~xrdpipe.integrator_cache.default_cache_dir`) the matrix is
    looked up in, or else saved to, the content-addressed integrator cache
    (:mod:`xrdpipe.integrator_cache`) and memory-mapped from it. :attr:`setup_seconds` says how
    long the set-up took and :attr:`cache_hit` whether it came from the cache.

    :attr:`instrument_sd` (float64, one value per bin, in the radial unit: degrees for
    ``2th_deg``, 1/Å for ``q_A^-1``) is, for each bin, the standard deviation of the radial
    positions its value averages over: an integrated bin is not a point sample of the pattern.
    Each pixel integrates the intensity over its area (mean position ``m`` over its area;
    own radial variance ``(D1² + D2²)/12`` with ``D1``, ``D2`` the radial differences along its
    two edges: pyFAI's corners 1-0 and 3-0) and the splitting shares it among bins; with weights ``w = c n`` (those of
    the denominator above) a bin's kernel is the mixture of its pixels' footprints::

        mean = Σ w m / Σ w        var = Σ w (var_pixel + (m - mean)²) / Σ w

    and ``instrument_sd = sqrt(var)``, :attr:`instrument_offset` ``= mean -`` the bin's radial
    value (NaN for a bin no pixel reaches): the pixels of a bin are not spread evenly about its
    centre (±3e-5° on the demo detector, which the cells of strong lines feel). On a flat detector with
    full splitting and bins much narrower than a pixel this is ``sqrt(2) × p / sqrt(12)`` (``p``:
    the pixel's radial extent: its own area, then its spread by the splitting); with ``"no"``
    splitting ``sqrt((p² + bin²) / 12)``. It is built with the matrix (~0.3 s at 2048 x 2048 on
two cores) and cached with it. With
    ``engine="pyfai"`` it is the same number from pyFAI's own CSR matrix (all NaN if pyFAI
    shows none).

    Parameters
    ----------
    calibration : Calibration
    shape : (rows, cols) of the frames
    npt, unit, radial_range, azimuth_range, polarization_factor, solid_angle, error_model,
    splitting : see ``[integration]`` in the experiment file.
    cache : folder of the integrator cache, True for the default one, None/False for none.

    Example
    -------
    >>> integ = Integrator(cal, (512, 512), npt=2000)            # doctest: +SKIP
    >>> intensity, sigma = integ.integrate(frame)                 # doctest: +SKIP
    """

    def __init__(self, calibration: Calibration, shape: tuple[int, int], *, npt: int = 3000,
                 unit: str = "2th_deg", radial_range: tuple[float, float] | None = None,
                 azimuth_range: tuple[float, float] | None = None,
                 polarization_factor: float | None = 0.99, solid_angle: bool = True,
                 error_model: str = "poisson", splitting: str = "full", engine: str = "xrdpipe",
                 cache: Path | str | bool | None = None):
        import pyFAI  # noqa: F401

        t_start = time.perf_counter()
        if engine not in ("xrdpipe", "pyfai"):
            raise ValueError(f"engine must be 'xrdpipe' or 'pyfai', not {engine!r}")
        calibration.check_shape(shape, origin="the frames")
        self.calibration = calibration
        self.shape = tuple(int(s) for s in shape)
        self.unit = unit
        self.npt = int(npt)
        self.wavelength_A = calibration.wavelength_A
        self.error_model = error_model
        self.splitting = splitting
        self.cache_hit = False
        self._cache_file: Path | None = None
        ai = self._ai = _geometry(calibration, self.shape)
        self.method = (splitting, "csr", "cython")
        self._kwargs = dict(
            unit=unit,
            method=self.method,
            radial_range=tuple(radial_range) if radial_range else None,
            azimuth_range=tuple(azimuth_range) if azimuth_range else None,
            polarization_factor=polarization_factor,
            correctSolidAngle=bool(solid_angle),
            dark=calibration.dark,
            flat=calibration.flat,
            error_model="poisson" if error_model == "poisson" else None,
        )
        self._lock = threading.Lock()
        self._local = threading.local()
        self._args = (calibration, shape, dict(npt=npt, unit=unit, radial_range=radial_range,
                                               azimuth_range=azimuth_range, polarization_factor=polarization_factor,
                                               solid_angle=solid_angle, error_model=error_model,
                                               splitting=splitting, engine=engine))
        self.engine = engine
        self._dark = None if calibration.dark is None else np.ascontiguousarray(calibration.dark, np.float32).ravel()
        mask = ai.detector.mask            # the calibration's, else the detector's own (gaps)
        if engine == "pyfai":
            self._probe_radial()
        else:
            self._set_up_matrix(_cache_folder(cache), mask, polarization_factor, solid_angle)
        self.setup_seconds = time.perf_counter() - t_start

    def _probe_radial(self) -> None:
        """The radial axis from pyFAI's own integration of an empty frame (its per-frame path),
        and :attr:`instrument_sd` from pyFAI's own matrix (all NaN if pyFAI shows none)."""
        probe = self._ai.integrate1d(np.zeros(self.shape, np.float32), self.npt, **self._kwargs)
        self.radial = np.asarray(probe.radial, dtype=np.float64)
        self.instrument_sd = np.full(len(self.radial), np.nan)
        self.instrument_offset = np.full(len(self.radial), np.nan)
        matrix = self._probe_matrix()
        if matrix is not None and len(matrix[3]) == len(self.radial):
            norm = _normalisation(copy.deepcopy(self._ai), self.shape, bool(self._kwargs["correctSolidAngle"]),
                                  self._kwargs["polarization_factor"], self.calibration.flat)
            self.instrument_sd, self.instrument_offset = _instrument_profile(self._ai, self.shape, self.unit, matrix[:3],
                                                                             norm, self.radial)

    def _set_up_matrix(self, folder: Path | None, mask, polarization_factor, solid_angle) -> None:
        """The engine's sparse matrix and corrections: from the cache ``folder`` (None: no
        cache), else built (and written to the cache in the background); an unexpected pyFAI
        falls back to its own per-frame path."""
        key = self._key = self._cache_key(mask, polarization_factor, solid_angle) if folder is not None else None
        arrays = load_entry(folder, key) if folder is not None else None
        if arrays is not None:
            self.cache_hit = True
            self._cache_file = entry_path(folder, key)
        else:
            arrays = self._build(mask, polarization_factor, solid_angle)
            if arrays is not None and folder is not None:
                # written in the background while the first frames are integrated
                self._saving = threading.Thread(target=self._save, args=(folder, key, arrays),
                                                name="xrdpipe-cache-write")
                self._saving.start()
        if arrays is None:  # an unexpected pyFAI: its own per-frame path
            self.engine = "pyfai"
            self._probe_radial()
        else:
            self._adopt(arrays)

    def _save(self, folder: Path, key: dict, arrays: dict) -> None:
        self._cache_file = save_entry(folder, key, arrays)

    @property
    def cache_file(self) -> Path | None:
        """The integrator's entry in the cache, or None (waits for a new entry to be written)."""
        saving = getattr(self, "_saving", None)
        if saving is not None:
            saving.join()
            self._saving = None
        return self._cache_file

    # ---------------------------------------------------------------- building the matrix

    def _cache_key(self, mask, polarization_factor, solid_angle) -> dict:
        """Everything the matrix and the normalisation depend on."""
        import pyFAI

        cal = self.calibration
        geometry = self._ai.get_config()
        return {
            "kind": "xrdpipe integrator", "layout": "csc float32 v5",
            "xrdpipe": _xrdpipe_version(), "pyFAI": str(pyFAI.version),
            "geometry": geometry, "shape": list(self.shape),
            "mask": digest_array(None if mask is None else np.asarray(mask) != 0),
            "dark": digest_array(cal.dark), "flat": digest_array(cal.flat),
            "npt": self.npt, "unit": self.unit, "radial_range": self._kwargs["radial_range"],
            "azimuth_range": self._kwargs["azimuth_range"], "splitting": self.splitting,
            "polarization_factor": polarization_factor, "solid_angle": bool(solid_angle),
            "error_model": self.error_model,
        }

    def _build(self, mask, polarization_factor, solid_angle) -> dict | None:
        """The matrix (CSC), radial axis and normalisation, built on every core."""
        from concurrent.futures import ThreadPoolExecutor

        from .parallel import default_workers

        workers = default_workers()
        ai_norm = copy.deepcopy(self._ai)  # pyFAI's array caches are not for two threads
        with ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="xrdpipe-setup") as pool:
            norm_future = pool.submit(_normalisation, ai_norm, self.shape, solid_angle, polarization_factor,
                                      self.calibration.flat)
            matrix = None
            if self.splitting == "full":
                try:
                    matrix = self._full_split(mask, pool, workers)
                except Exception:  # an unexpected pyFAI: build it the slow, documented way
                    matrix = None
            if matrix is None:
                matrix = self._probe_matrix()
            norm = norm_future.result()
            if matrix is None:
                return None
            data, indices, indptr, radial = matrix
            instrument_sd, instrument_offset = _instrument_profile(self._ai, self.shape, self.unit,
                                                                   (data, indices, indptr), norm, radial, pool=pool)
        arrays = {"data": data, "indices": indices, "indptr": indptr, "radial": radial, "norm": norm}
        arrays["den"] = _product(_blocks(data, indices, indptr, len(radial)), norm)
        arrays["instrument_sd"] = instrument_sd
        arrays["instrument_offset"] = instrument_offset
        return arrays

    def _full_split(self, mask, pool, workers: int):
        """The full-splitting matrix (CSC) and radial axis, built on bands of rows in parallel:
        the matrix ``integrate1d`` builds (pyFAI's pixel corners, its bin boundaries computed
        first on the whole detector, its azimuth range and its float32 sums of the areas) by
        :func:`xrdpipe.kernels.split_count` and :func:`~xrdpipe.kernels.split_fill`."""
        from pyFAI import units

        ai = self._ai
        unit = units.to_unit(self.unit)
        pos0_range = ai._normalize_range(self._kwargs["radial_range"], unit)
        pos1_range = ai._normalize_azimuth_range(self._kwargs["azimuth_range"])
        pos = ai.array_from_unit(self.shape, "corner", unit, scale=False)   # float32 (rows, cols, 4, 2)
        cmask = None if mask is None else np.ascontiguousarray(np.asarray(mask).ravel(), dtype=np.int8)
        rows, cols = self.shape
        n_bands = max(workers, -(-rows * cols // _BAND_PIX))      # bands of ~2 Mpixel: memory stays small
        cuts = [rows * i // n_bands for i in range(n_bands + 1)]
        if pos0_range is None:
            found = [e for e in pool.map(lambda i: _band_extent(pos, cmask, cuts[i], cuts[i + 1]), range(n_bands))
                     if e is not None]
            if not found:
                return None
            low, high = min(e[0] for e in found), max(e[1] for e in found)
            if unit.positive:                    # pyFAI clips at 0 unless the unit may be negative
                low, high = max(0.0, low), max(0.0, high)
            full_range = (low, high)
        else:
            full_range = (min(pos0_range), max(pos0_range))

        # pyFAI's bins: the upper boundary is the smallest float32 step above the largest corner
        lo0, top = float(full_range[0]), float(full_range[1])
        eps = 1.0 + float(np.finfo(np.float32).eps)
        hi0 = top * eps if top > 0 else top / eps
        delta = (hi0 - lo0) / self.npt
        radial = np.linspace(lo0 + 0.5 * delta, hi0 - 0.5 * delta, self.npt) * unit.scale
        azim = (pos1_range is not None, float(min(pos1_range)) if pos1_range is not None else 0.0,
                float(max(pos1_range)) if pos1_range is not None else 0.0)
        geometry = (lo0, delta, self.npt, *azim, bool(ai.chiDiscAtPi),
                    -1.0 if int(ai.detector.orientation) in (2, 4) else 1.0)
        data, indices, indptr = _split_matrix(pool, pos.reshape(-1, 4, 2), cmask, geometry,
                                              [c * cols for c in cuts])
        return data, indices, indptr, radial

    def _probe_matrix(self):
        """pyFAI's integrate1d builds its CSR matrix; transposed to one column per pixel."""
        import scipy.sparse as sp

        kwargs = dict(self._kwargs, polarization_factor=None, correctSolidAngle=False, dark=None, flat=None,
                      error_model=None)
        probe = self._ai.integrate1d(np.zeros(self.shape, np.float32), self.npt, **kwargs)
        lut = None
        for key, value in self._ai.engines.items():
            eng = getattr(value, "engine", None)
            if getattr(key, "dim", 1) == 1 and hasattr(eng, "lut"):
                lut = eng.lut
        if lut is None:
            return None
        data, indices, indptr = (np.asarray(a) for a in lut)
        n_pix = self.shape[0] * self.shape[1]
        csc = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(indptr) - 1, n_pix)).tocsc()
        return (csc.data.astype(np.float32, copy=False), csc.indices.astype(np.int32, copy=False), csc.indptr,
                np.asarray(probe.radial, dtype=np.float64))

    def _adopt(self, arrays: dict) -> None:
        """Take the matrix, radial axis and normalisation (arrays maybe memory-mapped)."""
        data, indices, indptr = (np.asarray(arrays[k]) for k in ("data", "indices", "indptr"))
        self.radial = np.array(arrays["radial"], dtype=np.float64)
        n_pix = self.shape[0] * self.shape[1]
        if len(indptr) != n_pix + 1:
            raise ValueError(f"the integrator matrix has {len(indptr) - 1} pixels, expected {n_pix}")
        self._matrix = (data, indices, indptr)
        self._norm = np.asarray(arrays["norm"])
        self._den = np.array(arrays["den"], dtype=np.float64)
        self.instrument_sd = np.array(arrays["instrument_sd"], dtype=np.float64)
        self.instrument_offset = np.array(arrays["instrument_offset"], dtype=np.float64)
        self._arrays = {k: arrays[k] for k in ("data", "indices", "indptr", "radial", "norm", "den",
                                               "instrument_sd", "instrument_offset")}

    # ---------------------------------------------------------------- pickling (worker processes)

    def __getstate__(self) -> dict:
        """What a worker process needs. The fast engine needs only the matrices (pyFAI's
        integrator stays here) or, when they are in the cache, where they are (the worker
        memory-maps the same file); the pyFAI engine is rebuilt in the worker."""
        if self.engine == "pyfai":
            return {"_rebuild": self._args}
        cache_file = self.cache_file
        keep = ("shape", "unit", "npt", "wavelength_A", "error_model", "splitting", "method", "engine",
                "_dark", "cache_hit", "_cache_file", "_key", "setup_seconds")   # instrument_sd: with the arrays
        state = {k: self.__dict__[k] for k in keep}
        if cache_file is not None:
            state["_cache_ref"] = (cache_file, self._key)
        else:
            state["_arrays"] = {k: np.asarray(v) for k, v in self._arrays.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        if "_rebuild" in state:
            calibration, shape, kwargs = state["_rebuild"]
            self.__init__(calibration, shape, **kwargs)
            return
        ref = state.pop("_cache_ref", None)
        arrays = state.pop("_arrays", None)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._local = threading.local()
        if ref is not None:
            path, key = ref
            arrays = load_entry(path.parent, key)
            if arrays is None:
                raise RuntimeError(f"the integrator cache entry {path} vanished or changed while in use")
        self._adopt(arrays)

    # ---------------------------------------------------------------- integrating

    def detector_tth_span_deg(self) -> tuple[float, float]:
        """The smallest and largest 2θ (degrees) of the detector's pixel centres."""
        tth = self._ai.center_array(self.shape, unit="2th_deg")
        return float(np.nanmin(tth)), float(np.nanmax(tth))

    def _read_buffers(self) -> dict:
        """This thread's arrays that frames are read into (see :func:`~xrdpipe.frames.read_frame`)."""
        local = getattr(self, "_local", None)
        if local is None:
            local = self._local = threading.local()
        buf = getattr(local, "read", None)
        if buf is None:
            buf = local.read = {}
        return buf

    def integrate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Integrate one frame; returns (intensity, sigma) on :attr:`radial`.

        Pixels at the largest value of an integer dtype (EIGER gaps, saturated or defective
        pixels) are treated as masked. Bins that no valid pixel reaches are NaN. Thread-safe.
        """
        if frame.shape != self.shape:
            raise ValueError(f"frame shape {frame.shape} is not {self.shape}")
        if self.engine == "pyfai":
            return self._integrate_pyfai(frame)
        from .kernels import csc_sums

        flat_frame = frame.reshape(-1)
        if flat_frame.dtype not in _KERNEL_DTYPES:       # float16, big-endian... : as float32
            flat_frame = flat_frame.astype(np.float32)
        flag = _flag_value(frame)
        n_bins = len(self.radial)
        numerator = np.zeros(n_bins, np.float64)
        variance = np.zeros(n_bins, np.float64)
        lost = np.zeros(n_bins, np.float64)
        with_variance = self.error_model == "poisson"
        data, indices, indptr = self._matrix
        csc_sums(flat_frame, _NO_DARK if self._dark is None else self._dark, self._dark is not None,
                 0 if flag is None else flag, flag is not None, data, indices, indptr, self._norm,
                 numerator, variance, lost, with_variance)
        den = self._den - lost
        with np.errstate(invalid="ignore", divide="ignore"):
            # a bin whose every pixel is flagged keeps only the rounding of the subtraction
            empty = (den <= 1e-6 * self._den) | (self._den <= 0)
            safe_den = np.where(empty, 1, den)
            intensity = np.where(empty, np.nan, numerator / safe_den)
            sigma = np.where(empty, np.nan, np.sqrt(variance) / safe_den) if with_variance else None
        return intensity.astype(np.float32), None if sigma is None else sigma.astype(np.float32)

    def _integrate_pyfai(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        kwargs = self._kwargs
        flag = _flag_value(frame)
        if flag is not None:
            kwargs = dict(kwargs, dummy=float(flag), delta_dummy=0.5)
        with self._lock:  # pyFAI engines are not re-entrant; OpenMP already uses every core
            res = self._ai.integrate1d(frame, self.npt, **kwargs)
        intensity = np.asarray(res.intensity, dtype=np.float32)
        sigma = None if res.sigma is None else np.asarray(res.sigma, dtype=np.float32)
        count = getattr(res, "count", None)
        if count is not None:
            empty = np.asarray(count) <= 0
            if empty.any():
                intensity = intensity.copy()
                intensity[empty] = np.nan
                if sigma is not None:
                    sigma = sigma.copy()
                    sigma[empty] = np.nan
        return intensity, sigma


_NO_DARK = np.zeros(0, np.float32)
_KERNEL_DTYPES = {np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32,
                                        np.int64, np.float32, np.float64)}
_BAND_PIX = 1 << 21    # pixels per band of the full-splitting build
_BLOCK_PIX = 1 << 20   # pixels per block of the product: float32 sums over a block, float64 across


def _csc(arrays, shape):
    """A CSC matrix on these very arrays (views of a memory-mapped file stay views: SciPy's
    constructor would copy a view of a larger array). ``indices`` and ``indptr`` share a dtype."""
    import scipy.sparse as sp

    data, indices, indptr = arrays
    if indptr.dtype != indices.dtype:
        indptr = indptr.astype(indices.dtype) if int(indptr[-1]) <= np.iinfo(indices.dtype).max else indptr
        indices = indices.astype(indptr.dtype, copy=False)
    m = sp.csc_matrix(shape, dtype=data.dtype)
    m.data, m.indices, m.indptr = data, indices, indptr
    return m


def _blocks(data, indices, indptr, n_bins: int) -> list:
    """The matrix cut into blocks of columns (pixels), each a CSC matrix sharing the arrays."""
    n_pix = len(indptr) - 1
    out = []
    for a in range(0, n_pix, _BLOCK_PIX):
        b = min(n_pix, a + _BLOCK_PIX)
        lo, hi = int(indptr[a]), int(indptr[b])
        ptr = np.subtract(indptr[a:b + 1], indptr[a])
        if ptr.dtype != indices.dtype and hi - lo <= np.iinfo(indices.dtype).max:
            ptr = ptr.astype(indices.dtype)
        out.append((a, b, _csc((data[lo:hi], indices[lo:hi], ptr), (n_bins, b - a))))
    return out


def _product(blocks: list, vector: np.ndarray) -> np.ndarray:
    """Σ over pixels of matrix × vector: float32 within a block, float64 across blocks."""
    out = np.zeros(blocks[0][2].shape[0] if blocks else 0, np.float64)
    for a, b, m in blocks:
        out += m @ vector[a:b]
    return out


def _instrument_profile(ai, shape: tuple[int, int], unit: str, matrix: tuple, norm: np.ndarray,
                        radial: np.ndarray, *, pool=None) -> tuple[np.ndarray, np.ndarray]:
    """Per bin, the standard deviation of the radial positions (in ``unit``) its value averages
    over, and their mean less the bin's ``radial`` value: the mixture of its pixels' footprints
    (see :attr:`Integrator.instrument_sd`), from the CSC ``matrix`` (one column per pixel) and
    the per-pixel normalisation ``norm``; NaN where no pixel reaches a bin. Blocks of pixels go
    to the threads of ``pool`` if given."""
    from pyFAI import units

    scale = float(units.to_unit(unit).scale)
    # pyFAI's corners (those of the splitting, cached by pyFAI; internal unit, e.g. radians)
    corners = ai.array_from_unit(shape, "corner", unit, scale=False).reshape(-1, 4, 2)
    centres = ai.array_from_unit(shape, "center", unit, scale=False).reshape(-1)
    # Σ w, Σ w m and Σ w (var_pixel + m²) per bin: one float64 product per block of pixels (the
    # variance is taken about the mean at the end: in float64 the cancellation costs ~1e-8)

    def block_sums(block) -> np.ndarray:
        a, b, m = block
        c0, c1, c2, c3 = (corners[a:b, k, 0].astype(np.float64) for k in range(4))
        d1, d2 = (c1 - c0) * scale, (c3 - c0) * scale
        v = np.empty((b - a, 3))
        v[:, 0] = norm[a:b]
        # the mean over the pixel's area (what it integrates): for a position quadratic across
        # the pixel, 2/3 of its centre's plus 1/3 of its corners' mean (the curvature of the
        # rings across a pixel moves it by ~1e-5° from the centre, more near the beam)
        mid = (centres[a:b].astype(np.float64) * (2.0 / 3.0) + (c0 + c1 + c2 + c3) * (1.0 / 12.0)) * scale
        v[:, 1] = v[:, 0] * mid
        # a pixel's own area projected on the radial axis: (D1² + D2²)/12
        v[:, 2] = v[:, 0] * ((d1 * d1 + d2 * d2) * (1.0 / 12.0) + mid * mid)
        return m.astype(np.float64) @ v

    blocks = _blocks(*matrix, len(radial))
    sums = np.zeros((len(radial), 3))
    for part in (pool.map(block_sums, blocks) if pool is not None else map(block_sums, blocks)):
        sums += part
    s0, s1, s2 = sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / s0
        var = s2 / s0 - mean * mean
    return (np.where(s0 > 0, np.sqrt(np.clip(var, 0, None)), np.nan),
            np.where(s0 > 0, mean - np.asarray(radial, np.float64), np.nan))


def _normalisation(ai, shape, solid_angle: bool, polarization_factor, flat) -> np.ndarray:
    """n = solid angle × polarization × flat, per pixel (float32)."""
    norm = np.ones(shape[0] * shape[1], np.float32)
    if solid_angle:
        norm *= ai.solidAngleArray(shape).ravel()
    if polarization_factor is not None:
        norm *= ai.polarization(shape, polarization_factor).ravel()
    if flat is not None:
        norm *= flat.ravel()
    return norm


def _cache_folder(cache) -> Path | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return default_cache_dir()
    return Path(cache)
