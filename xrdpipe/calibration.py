"""Calibration: PONI geometry + mask, dark and flat -> one :class:`Calibration`.

The calibration is checked as a whole before any frame is integrated: a missing PONI, a PONI
without wavelength, or a mask/dark/flat whose shape is not the detector's stops the run with a
message naming the file. pyFAI is touched here (to read the PONI) and in ``integration``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CalibrationError

__all__ = ["Calibration", "load_calibration"]


@dataclass(frozen=True, eq=False)
class Calibration:
    """Geometry and detector corrections of one set-up.

    Attributes
    ----------
    poni_path : Path
    geometry : pyFAI geometry (an ``AzimuthalIntegrator``), not yet bound to a frame shape
    wavelength_A : float
    shape : (rows, cols) of the detector, when known from the PONI or the mask
    mask : bool array, True where a pixel is excluded, or None
    dark, flat : float32 arrays or None
    """

    poni_path: Path
    geometry: Any
    wavelength_A: float
    shape: tuple[int, int] | None
    mask: np.ndarray | None = None
    dark: np.ndarray | None = None
    flat: np.ndarray | None = None
    poni_text: str = field(default="", repr=False)

    def check_shape(self, shape: tuple[int, int], *, origin: str) -> None:
        """Raise CalibrationError if ``shape`` (seen in ``origin``) is not the detector's."""
        shape = tuple(int(s) for s in shape)
        if self.shape is not None and shape != tuple(self.shape):
            raise CalibrationError(
                f"{origin} is {shape[0]} x {shape[1]} pixels but the detector in {self.poni_path} "
                f"is {self.shape[0]} x {self.shape[1]}"
            )
        for name in ("mask", "dark", "flat"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != shape:
                raise CalibrationError(
                    f"{name} image is {arr.shape[0]} x {arr.shape[1]} pixels, but {origin} are "
                    f"{shape[0]} x {shape[1]}"
                )


def read_image(path: Path, what: str) -> np.ndarray:
    import fabio

    try:
        with fabio.open(str(path)) as img:
            return np.asarray(img.data)
    except FileNotFoundError:
        raise CalibrationError(f"{what} file {path} does not exist") from None
    except Exception as exc:
        raise CalibrationError(f"cannot read the {what} file {path}: {exc}") from None


def load_calibration(poni: Path | str, *, mask: Path | str | None = None, dark: Path | str | None = None,
                     flat: Path | str | None = None) -> Calibration:
    """Load a PONI file and the optional mask (non-zero = excluded), dark and flat images.

    Raises
    ------
    CalibrationError
        Missing or unreadable PONI, a PONI without wavelength, unreadable images, or images whose
        shapes disagree with each other or with the detector of the PONI.
    """
    import pyFAI

    poni = Path(poni)
    if not poni.exists():
        raise CalibrationError(f"PONI file {poni} does not exist")
    try:
        text = poni.read_text(encoding="utf-8", errors="replace")
        geometry = pyFAI.load(str(poni))
    except Exception as exc:
        raise CalibrationError(f"cannot read the PONI file {poni}: {exc}") from None
    if not geometry.wavelength:
        raise CalibrationError(
            f"PONI file {poni} has no wavelength; add a line such as 'Wavelength: 6.209e-11' (metres)"
        )
    if not geometry.dist or geometry.dist <= 0:
        raise CalibrationError(f"PONI file {poni} has no positive Distance")
    det_shape = geometry.detector.max_shape
    shape = tuple(int(s) for s in det_shape) if det_shape is not None else None

    arrays: dict[str, np.ndarray | None] = {}
    for name, path in (("mask", mask), ("dark", dark), ("flat", flat)):
        arrays[name] = None if path is None else read_image(Path(path), name)
    if arrays["mask"] is not None:
        arrays["mask"] = arrays["mask"] != 0
    for name in ("dark", "flat"):
        if arrays[name] is not None:
            arrays[name] = arrays[name].astype(np.float32)
    if arrays["flat"] is not None:
        bad = ~np.isfinite(arrays["flat"]) | (arrays["flat"] <= 0)
        if bad.all():
            raise CalibrationError(f"flat image {flat} has no positive pixel")
    # the detector's shape: PONI, else the first image given
    if shape is None:
        for name in ("mask", "dark", "flat"):
            if arrays[name] is not None:
                shape = tuple(arrays[name].shape)
                break
    paths = {"mask": mask, "dark": dark, "flat": flat}
    for name, arr in arrays.items():
        if arr is not None and shape is not None and tuple(arr.shape) != tuple(shape):
            source = f"the detector in {poni}" if det_shape is not None else "the other calibration images"
            raise CalibrationError(
                f"{name} image {paths[name]} is {arr.shape[0]} x {arr.shape[1]} pixels, not the detector's "
                f"{shape[0]} x {shape[1]} (from {source})"
            )
    return Calibration(poni, geometry, float(geometry.wavelength) * 1e10, shape,
                       arrays["mask"], arrays["dark"], arrays["flat"], text)
