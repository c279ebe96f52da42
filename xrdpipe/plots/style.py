"""What every figure shares: the house style, a figure of a size in millimetres, saving it
atomically, phase colours, axis labels and the per-frame state of charge the figures draw
against (from the coordinates of :func:`xrdpipe.open_dataset`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..crystallography import convert_radial, d_from_q, q_from_tth
from ..errors import PlotError

__all__ = ["style", "save_figure", "PHASE_COLOURS"]

PHASE_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
AXIS_LABEL = {"tth": "2θ (°)", "q": "Q (Å$^{-1}$)", "d": "d (Å)"}
VERTICAL_LABEL = {"time": "Time (h)", "x": "x in Na$_x$TMO$_2$", "frame": "Frame"}
AGAINST_LABEL = {"x": "x in Na$_x$TMO$_2$", "capacity": "Capacity (mAh g$^{-1}$)", "time": "Time (h)"}


@contextmanager
def style(font_size: float = 7.0):
    """The house style: sizes for a printed column, thin lines, inward ticks, no clipped text."""
    import matplotlib as mpl

    with mpl.rc_context({
        "font.size": font_size, "axes.labelsize": font_size, "axes.titlesize": font_size,
        "xtick.labelsize": font_size - 1, "ytick.labelsize": font_size - 1, "legend.fontsize": font_size - 1,
        "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4,
        "ytick.minor.width": 0.4, "xtick.direction": "in", "ytick.direction": "in", "xtick.top": True,
        "ytick.right": True, "lines.linewidth": 0.9, "lines.markersize": 2.5, "errorbar.capsize": 0,
        "legend.frameon": False, "mathtext.default": "regular", "pdf.fonttype": 42, "svg.fonttype": "none",
        "figure.constrained_layout.h_pad": 0.02, "figure.constrained_layout.w_pad": 0.02,
    }):
        yield


#: A frame's status once integrated (``status`` of :func:`xrdpipe.open_dataset`).
DONE = 1


def figure(width_mm: float, height_mm: float, dpi: int = 300):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_mm / 25.4, height_mm / 25.4), dpi=dpi, layout="constrained")


def save_figure(fig, stem: Path | str, *, formats: Sequence[str] = ("png", "pdf"), dpi: int = 300) -> list[Path]:
    """Write ``fig`` as ``stem.png``, ``stem.pdf``... (each written beside, then renamed: a reader
    never sees half a file). The size is the figure's own; a PNG is ``size x dpi`` pixels."""
    from .. import __version__
    from ..safeio import atomic_output

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        meta = {"Creator": f"xrdpipe {__version__}"} if fmt == "pdf" else (
            {"Software": f"xrdpipe {__version__}"} if fmt == "png" else {})
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
        out.append(path)
    return out


def source(ds) -> str:
    """What a dataset came from, for messages: its run file, if known."""
    return str(ds.attrs.get("run_file", "the dataset"))


@dataclass
class States:
    """Per-frame state of charge (NaN where unknown) and the cycler record, if any."""

    time_h: np.ndarray
    x: np.ndarray
    voltage_V: np.ndarray
    capacity: np.ndarray
    direction: np.ndarray          # "charge", "discharge" or "rest" per frame (its half-cycle's)
    record: dict | None            # time_s, voltage_V, x of the whole cycler record


def states(ds, record=None) -> States:
    """The :class:`States` of the frames of ``ds`` (a Dataset with the per-frame coordinates of
    :func:`xrdpipe.open_dataset`); ``record``: the cycler record's Dataset, if any."""
    rec = None if record is None else {k: np.asarray(record[k].values) for k in ("time_s", "voltage_V", "x")}
    return States(np.asarray(ds["time_s"].values, float) / 3600, np.asarray(ds["x"].values, float),
                  np.asarray(ds["voltage"].values, float), np.asarray(ds["capacity"].values, float),
                  np.asarray(ds["direction"].values, dtype=object), rec)


def radial_of(ds) -> tuple[np.ndarray, str, float | None]:
    """The radial axis of a patterns Dataset, its unit ("2th_deg" or "q_A^-1") and the wavelength."""
    unit = ds.attrs.get("radial_unit", "2th_deg")
    axis = "tth" if unit == "2th_deg" else "q"
    wl = ds.attrs.get("wavelength_A")
    return np.asarray(ds[axis].values, float), unit, float(wl) if wl else None


def to_axis(values, axis: str, unit: str, wavelength_A: float | None) -> np.ndarray:
    """Radial values of the run (2θ or Q) on the plot's axis (2θ, Q or d)."""
    values = np.asarray(values, float)
    src = "tth" if unit == "2th_deg" else "q"
    if axis == src:
        return values
    if src == "tth" or axis == "tth":
        if not wavelength_A:
            raise PlotError(f"the run has no wavelength, so {AXIS_LABEL[src]} cannot become {AXIS_LABEL[axis]}")
    q = values if src == "q" else q_from_tth(values, wavelength_A)
    if axis == "d":
        with np.errstate(divide="ignore"):
            return d_from_q(q)
    return convert_radial(values, unit, "2th_deg" if axis == "tth" else "q_A^-1", wavelength_A)


def axis_label(axis: str, wavelength_A: float | None) -> str:
    if axis == "tth" and wavelength_A:
        return f"2θ (°), λ = {wavelength_A:.4f} Å"
    return AXIS_LABEL[axis]


def window_title(name: str) -> str:
    return f"({name})" if name.replace(" ", "").isdigit() else name


def edges(v: np.ndarray) -> np.ndarray:
    """Cell edges around increasing centres (midpoints; the ends extend by half a step)."""
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def phase_colour(phases: Sequence[str], phase: str) -> str:
    return PHASE_COLOURS[list(phases).index(phase) % len(PHASE_COLOURS)] if phase in phases else "k"
