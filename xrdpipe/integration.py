"""Azimuthal integration: 2D frames -> 1D patterns with pyFAI.

:class:`Integrator` is built once per run (pyFAI's sparse matrix is the costly part) and reused
for every frame. :func:`integrate_frames` streams frames through it: frames are read ahead on
worker threads (h5py decompression and fabio release the GIL) while pyFAI's OpenMP engine
integrates on the cores, and each result goes straight to a sink (the run file), so memory
stays bounded however many frames there are. Frames can also be integrated on a local process
pool or a Dask cluster (:mod:`xrdpipe.parallel`): the integrator pickles as its matrices only. A frame that cannot be read becomes a failure
record, never an exception.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .calibration import Calibration
from .crystallography import convert_radial
from .errors import FrameReadError
from .frames import FrameRef, read_frame

__all__ = ["Integrator", "IntegratedFrame", "integrate_frames"]



def _flag_value(frame: np.ndarray) -> int | None:
    """The value that marks invalid pixels in an integer frame (EIGER: the dtype's maximum)."""
    if np.issubdtype(frame.dtype, np.integer) and frame.dtype.itemsize >= 2:
        return int(np.iinfo(frame.dtype).max)
    return None


@dataclass(frozen=True)
class IntegratedFrame:
    """The outcome for one frame: a pattern, or ``error`` set and arrays None."""

    position: int
    ref: FrameRef
    intensity: np.ndarray | None
    sigma: np.ndarray | None
    error: str | None = None


class Integrator:
    """One integrator bound to a detector shape and the integration settings.

    pyFAI builds the sparse (CSR) pixel-to-bin matrix once, from the geometry, mask, ranges and
    pixel splitting. With ``engine="xrdpipe"`` (the default) every frame is then integrated
    by applying that matrix with SciPy, which releases the GIL, so several frames are integrated
    at once on the cores (frame parallelism) and the per-pixel normalisation (solid angle,
    polarization, flat) is summed once instead of per frame. The formulas are pyFAI's own
    (``integrate1d`` with the CSR engine and ``error_model="poisson"``)::

        I = Σ c (x - dark) / Σ c n        σ = sqrt(Σ c² max(x, 1)) / Σ c n

    with ``c`` the splitting coefficients and ``n`` = solid angle × polarization × flat; the
    test-suite checks the two agree. ``engine="pyfai"`` calls pyFAI's ``integrate1d`` per frame.

    Parameters
    ----------
    calibration : Calibration
    shape : (rows, cols) of the frames
    npt, unit, radial_range, azimuth_range, polarization_factor, solid_angle, error_model,
    splitting : see ``[integration]`` in the experiment file.

    Example
    -------
    >>> integ = Integrator(cal, (512, 512), npt=2000)            # doctest: +SKIP
    >>> intensity, sigma = integ.integrate(frame)                 # doctest: +SKIP
    """

    def __init__(self, calibration: Calibration, shape: tuple[int, int], *, npt: int = 3000,
                 unit: str = "2th_deg", radial_range: tuple[float, float] | None = None,
                 azimuth_range: tuple[float, float] | None = None,
                 polarization_factor: float | None = 0.99, solid_angle: bool = True,
                 error_model: str = "poisson", splitting: str = "full", engine: str = "xrdpipe"):
        import pyFAI  # noqa: F401

        if engine not in ("xrdpipe", "pyfai"):
            raise ValueError(f"engine must be 'xrdpipe' or 'pyfai', not {engine!r}")
        calibration.check_shape(shape, origin="the frames")
        self.calibration = calibration
        self.shape = tuple(int(s) for s in shape)
        self.unit = unit
        self.npt = int(npt)
        self.wavelength_A = calibration.wavelength_A
        self.error_model = error_model
        ai = copy.deepcopy(calibration.geometry)  # the calibration stays untouched
        if ai.detector.max_shape is None:
            ai.detector.max_shape = self.shape
        if calibration.mask is not None:
            # set once on the detector: pyFAI folds it into the sparse matrix
            ai.detector.mask = calibration.mask.astype(np.int8)
        self._ai = ai
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
        self._args = (calibration, shape, dict(npt=npt, unit=unit, radial_range=radial_range,
                                               azimuth_range=azimuth_range, polarization_factor=polarization_factor,
                                               solid_angle=solid_angle, error_model=error_model,
                                               splitting=splitting, engine=engine))
        # pyFAI builds its sparse matrix now, once; this also fixes the radial axis. The
        # matrix does not depend on the intensity corrections, which the fast engine computes
        # itself, once.
        probe_kwargs = self._kwargs if engine == "pyfai" else dict(
            self._kwargs, polarization_factor=None, correctSolidAngle=False, dark=None, flat=None,
            error_model=None)
        probe = ai.integrate1d(np.zeros(self.shape, np.float32), self.npt, **probe_kwargs)
        self.radial = np.asarray(probe.radial, dtype=np.float64)
        self.engine = engine
        if engine == "xrdpipe":
            self._setup_sparse(polarization_factor, solid_angle)

    def _setup_sparse(self, polarization_factor, solid_angle) -> None:
        import scipy.sparse as sp

        lut = None
        for key, value in self._ai.engines.items():
            eng = getattr(value, "engine", None)
            if getattr(key, "dim", 1) == 1 and hasattr(eng, "lut"):
                lut = eng.lut
        if lut is None:  # an unexpected pyFAI: fall back to its own per-frame path
            self.engine = "pyfai"
            return
        data, indices, indptr = (np.asarray(a) for a in lut)
        n_pix = self.shape[0] * self.shape[1]
        shape = (len(indptr) - 1, n_pix)
        coef = data.astype(np.float32)
        self._A = sp.csr_matrix((coef, indices, indptr), shape=shape)
        self._A2 = sp.csr_matrix((coef * coef, indices, indptr), shape=shape) if self.error_model == "poisson" else None
        self._A_csc = None  # built on demand, for frames with flagged pixels
        self._static_mask = None if self.calibration.mask is None else self.calibration.mask.ravel()
        norm = np.ones(n_pix, np.float32)
        if solid_angle:
            norm *= self._ai.solidAngleArray(self.shape).ravel()
        if polarization_factor is not None:
            norm *= self._ai.polarization(self.shape, polarization_factor).ravel()
        if self.calibration.flat is not None:
            norm *= self.calibration.flat.ravel()
        self._norm = norm.astype(np.float32)
        self._den = (self._A @ self._norm).astype(np.float64)
        self._dark = None if self.calibration.dark is None else self.calibration.dark.ravel()

    def __getstate__(self) -> dict:
        """What a worker process needs. The fast engine needs only the matrices (pyFAI's
        integrator stays here); the pyFAI engine is rebuilt in the worker from the calibration."""
        if self.engine == "pyfai":
            return {"_rebuild": self._args}
        state = dict(self.__dict__)
        for name in ("_lock", "_ai", "calibration", "_A_csc", "_args", "_kwargs", "_A2"):
            state.pop(name, None)      # _A2 is rebuilt from _A: half the bytes to send
        state["_has_A2"] = self._A2 is not None
        return state

    def __setstate__(self, state: dict) -> None:
        if "_rebuild" in state:
            calibration, shape, kwargs = state["_rebuild"]
            self.__init__(calibration, shape, **kwargs)
            return
        has_a2 = state.pop("_has_A2", False)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._A_csc = None
        self._A2 = None
        if has_a2:
            self._A2 = self._A.copy()
            self._A2.data = self._A2.data * self._A2.data

    def detector_tth_span_deg(self) -> tuple[float, float]:
        """The smallest and largest 2θ (degrees) of the detector's pixel centres."""
        tth = self._ai.center_array(self.shape, unit="2th_deg")
        return float(np.nanmin(tth)), float(np.nanmax(tth))

    @property
    def tth_deg(self) -> np.ndarray:
        """The radial axis as 2θ (degrees)."""
        return convert_radial(self.radial, self.unit, "2th_deg", self.wavelength_A)

    @property
    def q_invA(self) -> np.ndarray:
        """The radial axis as Q (Å⁻¹)."""
        return convert_radial(self.radial, self.unit, "q_A^-1", self.wavelength_A)

    def integrate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Integrate one frame; returns (intensity, sigma) on :attr:`radial`.

        Pixels at the largest value of an integer dtype (EIGER gaps, saturated or defective
        pixels) are treated as masked. Bins that no valid pixel reaches are NaN. Thread-safe.
        """
        if frame.shape != self.shape:
            raise ValueError(f"frame shape {frame.shape} is not {self.shape}")
        if self.engine == "pyfai":
            return self._integrate_pyfai(frame)
        flat_frame = frame.ravel()
        flagged = None
        flag = _flag_value(frame)
        if flag is not None:
            hit = flat_frame == flag
            if hit.any():
                flagged = np.flatnonzero(hit)
                if self._static_mask is not None:  # already outside the matrix
                    flagged = flagged[~self._static_mask[flagged]]
                if flagged.size == 0:
                    flagged = None
        x = flat_frame.astype(np.float32)
        if self._dark is not None:
            signal = x - self._dark
        else:
            signal = x
        den = self._den
        if flagged is not None:
            if signal is x:
                signal = x.copy()
            signal[flagged] = 0.0
            x[flagged] = 0.0
            den = den - self._csc()[:, flagged] @ self._norm[flagged]
        with np.errstate(invalid="ignore", divide="ignore"):
            empty = den <= 0
            intensity = np.where(empty, np.nan, (self._A @ signal) / np.where(empty, 1, den))
            sigma = None
            if self._A2 is not None:
                var = np.maximum(x, 1.0)
                if flagged is not None:
                    var[flagged] = 0.0
                sigma = np.where(empty, np.nan, np.sqrt(self._A2 @ var) / np.where(empty, 1, den))
        return intensity.astype(np.float32), None if sigma is None else sigma.astype(np.float32)

    def _csc(self):
        with self._lock:
            if self._A_csc is None:
                self._A_csc = self._A.tocsc()
        return self._A_csc

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


def _process(job: tuple[int, FrameRef], integrator: Integrator) -> IntegratedFrame:
    pos, ref = job
    try:
        data = read_frame(ref, shape=integrator.shape)
    except FrameReadError as exc:
        return IntegratedFrame(pos, ref, None, None, exc.reason)
    try:
        intensity, sigma = integrator.integrate(data)
    except Exception as exc:  # one bad frame never stops the run
        return IntegratedFrame(pos, ref, None, None, f"integration failed: {type(exc).__name__}: {exc}")
    return IntegratedFrame(pos, ref, intensity, sigma)


def integrate_frames(jobs: Iterable[tuple[int, FrameRef]], integrator: Integrator, *,
                     workers: int | None = None, prefetch: int | None = None,
                     scheduler: str | object = "threads") -> Iterator[IntegratedFrame]:
    """Stream ``(position, ref)`` jobs through the integrator, yielding results in order.

    ``workers`` (default: the number of cores) read and integrate whole frames at once on the
    ``scheduler`` (see :mod:`xrdpipe.parallel`: ``"processes"``, ``"threads"``, ``"serial"`` or a
    Dask scheduler address); the integrator is sent once to each worker. At most ``prefetch``
    frames (default 2 x workers) are in flight, so memory is bounded. A frame that cannot be
    read yields an :class:`IntegratedFrame` with ``error`` set.
    """
    from .parallel import map_ordered

    yield from map_ordered(_process, jobs, context=integrator, scheduler=scheduler, workers=workers,
                           prefetch=prefetch, on_crash=_crashed)


def _crashed(job: tuple[int, FrameRef]) -> IntegratedFrame:
    """The record of a frame whose reading or integration killed a worker process, twice."""
    pos, ref = job
    return IntegratedFrame(pos, ref, None, None, "the worker process reading and integrating this frame died "
                                                 "(twice: a crash in a decompression filter or a library)")
