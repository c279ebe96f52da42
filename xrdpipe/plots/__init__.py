"""Figures drawn from arrays: contour maps beside the voltage curve, a, c and V against x, phase
fractions, fit checks, waterfalls and refinements.

Every function takes the labelled results the run layer hands it (the Datasets of
:func:`xrdpipe.open_dataset` and :func:`xrdpipe.open_results`; the stack is read lazily, only
what a figure draws) and the few specs it needs, and returns a matplotlib
:class:`~matplotlib.figure.Figure` of the requested size in millimetres; :func:`save_figure`
writes it as PNG plus PDF or SVG, atomically. No pyplot, so no global state: figures can be made
from threads, scripts and notebooks alike (a notebook shows a returned figure). Nothing here
opens the run file.

Modules: :mod:`.style` (house style, sizes, saving, labels), :mod:`.contour` (maps),
:mod:`.series` (lattice and fractions), :mod:`.fits` (fit check, waterfall, refinement,
calibration).

Example
-------
>>> ds, res = xrdpipe.open_dataset("results/nfm.nxs"), xrdpipe.open_results("results/nfm.nxs")  # doctest: +SKIP
>>> fig = plot_contour(ds, windows=[("003", 6.2, 7.2)], peaks=res.peaks, record=res.record)      # doctest: +SKIP
>>> save_figure(fig, "figures/contour", formats=["png", "pdf"], dpi=300)                         # doctest: +SKIP
"""

from __future__ import annotations

from ..errors import PlotError
from .contour import plot_contour
from .fits import (
           RefinedFrame,
           default_fit_frames,
           plot_calibration,
           plot_fit_check,
           plot_refinement,
           plot_waterfall,
)
from .series import plot_fractions, plot_lattice
from .style import PHASE_COLOURS, save_figure, style

__all__ = ["PlotError", "plot_contour", "plot_lattice", "plot_fractions", "plot_fit_check", "plot_waterfall",
           "plot_refinement", "RefinedFrame", "default_fit_frames", "plot_calibration", "save_figure",
           "PHASE_COLOURS", "style"]
