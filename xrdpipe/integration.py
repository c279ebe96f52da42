"""Azimuthal integration: 2D frames -> 1D patterns with pyFAI.

:class:`Integrator` is built once per run (pyFAI's sparse matrix is the costly part) and reused
for every frame. :func:`integrate_frames` streams frames through it: frames are read ahead on
worker threads (h5py decompression and fabio release the GIL) while pyFAI's OpenMP engine
integrates on the cores, and each result goes straight to a sink (the run file), so memory
stays bounded however many frames there are. A frame that cannot be read becomes a failure
record, never an exception.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .calibration import Calibration
from .crystallography import q_from_tth, tth_from_q
from .errors import FrameReadError
from .frames import FrameRef, read_frame

__all__ = ["Integrator", "IntegratedFrame", "integrate_frames"]

_PYFAI_UNIT = {"2th_deg": "2th_deg", "q_A^-1": "q_A^-1"}


@dataclass(frozen=True)
class IntegratedFrame:
    """The outcome for one frame: a pattern, or ``error`` set and arrays None."""

    position: int
    ref: FrameRef
    intensity: np.ndarray | None
    sigma: np.ndarray | None
    error: str | None = None


class Integrator:
    """One pyFAI integrator bound to a detector shape and the integration settings.

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
                 error_model: str = "poisson", splitting: str = "full"):
        import pyFAI  # noqa: F401

        calibration.check_shape(shape, origin="the frames")
        self.calibration = calibration
        self.shape = tuple(int(s) for s in shape)
        self.unit = unit
        self.npt = int(npt)
        self.wavelength_A = calibration.wavelength_A
        ai = copy.deepcopy(calibration.geometry)  # the calibration stays untouched
        if ai.detector.max_shape is None:
            ai.detector.max_shape = self.shape
        if calibration.mask is not None:
            # set once on the detector: pyFAI folds it into the sparse matrix instead of
            # checksumming a mask passed with every frame
            ai.detector.mask = calibration.mask.astype(np.int8)
        self._ai = ai
        # pyFAI's fastest CPU engine for the requested pixel splitting: CSR sparse matrix, Cython/OpenMP
        self.method = (splitting, "csr", "cython")
        self._kwargs = dict(
            unit=_PYFAI_UNIT[unit],
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
        # build the sparse matrix now, once, on an empty frame: this also fixes the radial axis
        probe = ai.integrate1d(np.zeros(self.shape, np.float32), self.npt, **self._kwargs)
        self.radial = np.asarray(probe.radial, dtype=np.float64)

    @property
    def tth_deg(self) -> np.ndarray:
        """The radial axis as 2θ (degrees)."""
        return self.radial if self.unit == "2th_deg" else tth_from_q(self.radial, self.wavelength_A)

    @property
    def q_invA(self) -> np.ndarray:
        """The radial axis as Q (Å⁻¹)."""
        return self.radial if self.unit == "q_A^-1" else q_from_tth(self.radial, self.wavelength_A)

    def integrate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Integrate one frame; returns (intensity, sigma) on :attr:`radial`.

        Pixels at the largest value of an integer dtype (EIGER gaps, saturated or defective
        pixels) are treated as masked. Bins that no valid pixel reaches are NaN.
        """
        kwargs = self._kwargs
        if np.issubdtype(frame.dtype, np.integer) and frame.dtype.itemsize >= 2:
            flag = np.iinfo(frame.dtype).max
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


def _read(ref: FrameRef, shape):
    try:
        return read_frame(ref, shape=shape), None
    except FrameReadError as exc:
        return None, exc.reason


def integrate_frames(jobs: Iterable[tuple[int, FrameRef]], integrator: Integrator, *,
                     readers: int | None = None, prefetch: int = 4,
                     on_result: Callable[[IntegratedFrame], None] | None = None) -> Iterator[IntegratedFrame]:
    """Stream ``(position, ref)`` jobs through the integrator, in order.

    Frames are read ahead by ``readers`` threads (default: the number of cores) at most
    ``prefetch`` frames ahead, so memory is bounded. Each result is yielded as soon as it is
    ready; a frame that cannot be read yields an :class:`IntegratedFrame` with ``error`` set.
    """
    readers = readers or max(1, min(4, os.cpu_count() or 1))
    pending: deque[tuple[int, FrameRef, Future]] = deque()
    it = iter(jobs)
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="xrdpipe-read") as pool:
        def fill():
            while len(pending) < max(prefetch, readers):
                try:
                    pos, ref = next(it)
                except StopIteration:
                    return
                pending.append((pos, ref, pool.submit(_read, ref, integrator.shape)))

        fill()
        try:
            while pending:
                pos, ref, fut = pending.popleft()
                fill()
                data, err = fut.result()
                if err is not None:
                    out = IntegratedFrame(pos, ref, None, None, err)
                else:
                    try:
                        intensity, sigma = integrator.integrate(data)
                        out = IntegratedFrame(pos, ref, intensity, sigma)
                    except Exception as exc:  # one bad frame never stops the run
                        out = IntegratedFrame(pos, ref, None, None, f"integration failed: {type(exc).__name__}: {exc}")
                del data
                if on_result is not None:
                    on_result(out)
                yield out
        finally:
            for _, _, fut in pending:
                fut.cancel()
