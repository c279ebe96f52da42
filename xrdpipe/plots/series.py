"""a, c, V and phase fractions of every phase against x (or capacity, or time), drawn from the
lattice Dataset of :func:`xrdpipe.open_results`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import FractionsPlotSpec, LatticePlotSpec
from ..errors import PlotError
from .style import AGAINST_LABEL, figure, phase_colour, source, states, style

__all__ = ["plot_lattice", "plot_fractions"]


def _against(st, against: str, frames: np.ndarray) -> tuple[np.ndarray, str]:
    """The abscissa of the lattice figures per frame (x, capacity or time), falling back to time
    when the state of charge is unknown, and to the frame number when the frames have no time."""
    if against == "x" and np.isfinite(st.x).any():
        return st.x, AGAINST_LABEL["x"]
    if against == "capacity" and np.isfinite(st.capacity).any():
        return st.capacity, AGAINST_LABEL["capacity"]
    if not np.isfinite(st.time_h).any():
        return np.asarray(frames, float), "Frame" + ("  (the frames have no times)" if against != "frame" else "")
    return st.time_h, AGAINST_LABEL["time"] + (
        "  (no state of charge: run 'xrdpipe echem')" if against != "time" else "")


@dataclass
class _LatticeView:
    """The lattice table with what both lattice figures draw it against."""

    lat: dict
    phases: list[str]
    xv: np.ndarray             # the abscissa per lattice row
    xlabel: str
    direction: np.ndarray      # charge / discharge / rest per lattice row
    together: np.ndarray       # two or more phases with a fraction above zero, per row


def _lattice_view(lattice, against: str) -> _LatticeView:
    if lattice is None:
        raise PlotError("the run file holds no lattice parameters yet; run 'xrdpipe lattice' (after 'xrdpipe fit')")
    lat = {name: np.asarray(var.values) for name, var in lattice.data_vars.items()}
    st = states(lattice)
    frames = np.asarray(lattice["frame"].values)
    xv, xlabel = _against(st, against, frames)
    together = (np.nan_to_num(lat["fraction"]) > 0).sum(axis=1) >= 2
    return _LatticeView(lat, [str(p) for p in lattice["phase"].values], xv, xlabel, st.direction, together)


def _first_moves_down(xv: np.ndarray, direction: np.ndarray) -> bool:
    """Whether x falls during the first charge or discharge (then the axis is reversed, so that
    the experiment reads from left to right)."""
    moving = np.flatnonzero(np.isin(direction, ("charge", "discharge")) & np.isfinite(xv))
    if moving.size < 2:
        return False
    first = direction[moving[0]]
    seg = moving[direction[moving] == first]
    return bool(xv[seg[-1]] < xv[seg[0]])


def _series(ax, xv, y, err, colour, direction, label: str | None) -> None:
    """One phase's points: discharge as larger open circles under charge's filled ones, so a
    point measured on both (no hysteresis) shows as a dot in a ring."""
    styles = {"discharge": dict(mfc="white", ms=3.6), "rest": dict(mfc=colour, ms=2.2, alpha=0.5),
              "charge": dict(mfc=colour, ms=2.2)}
    first = True
    for kind, kw in styles.items():
        sel = (direction == kind) & np.isfinite(xv) & np.isfinite(y)
        if not sel.any():
            continue
        ax.errorbar(xv[sel], y[sel], yerr=np.where(np.isfinite(err[sel]), err[sel], 0), ls="none", marker="o",
                    mew=0.6, mec=colour, ecolor=colour, elinewidth=0.5, label=label if first else None, **kw)
        first = False


def _shade_x(ax, xv: np.ndarray, together: np.ndarray) -> None:
    """Grey bands over the abscissa where two phases were seen at once: one per run of
    consecutive frames (in frame order) that show both, from its least to its greatest abscissa.
    (One band from the first such frame to the last covered, against time, the frames of one
    phase between a charge's two-phase region and the discharge's.)"""
    sel = together & np.isfinite(xv)
    if not sel.any():
        return
    pad = 0.5 * np.nanmedian(np.abs(np.diff(xv[np.isfinite(xv)]))) if np.isfinite(xv).sum() > 1 else 0.0
    rows = np.flatnonzero(sel)
    for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1):
        ax.axvspan(np.min(xv[run]) - pad, np.max(xv[run]) + pad, color="0.88", lw=0, zorder=0)


def _direction_legend(ax, loc: str = "lower right") -> None:
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], ls="none", marker="o", ms=2.2, mec="0.3", mfc="0.3", label="charge"),
               Line2D([], [], ls="none", marker="o", ms=3.6, mec="0.3", mfc="white", label="discharge"),
               Patch(color="0.88", label="two phases")]
    # a second legend beside the phases' one (ax.legend would replace it)
    ax.add_artist(Legend(ax, handles, [h.get_label() for h in handles], loc=loc, fontsize="small",
                         handletextpad=0.3))


def plot_lattice(lattice, *, spec: LatticePlotSpec = LatticePlotSpec(), dpi: int = 300, font_size: float = 7.0):
    """a, c and V of every phase against x (or capacity, or time) with esd bars; filled markers
    on charge, open on discharge. ``lattice``: :func:`xrdpipe.open_results`'s ``lattice``.

    Example
    -------
    >>> plot_lattice(xrdpipe.open_results(run_file).lattice)          # doctest: +SKIP
    """
    view = _lattice_view(lattice, spec.against)
    lat, phases, xv, direction, together = view.lat, view.phases, view.xv, view.direction, view.together
    with style(font_size):
        fig = figure(spec.width_mm, spec.height_mm, dpi)
        axes = fig.subplots(3, 1, sharex=True)
        for ax in axes:
            _shade_x(ax, xv, together)
        panels = (("a_A", "a_err_A", "a (Å)"), ("c_A", "c_err_A", "c (Å)"), ("volume_A3", "volume_err_A3", "V (Å$^3$)"))
        drawn = False
        for ax, (name, err, label) in zip(axes, panels):
            for i, ph in enumerate(phases):
                y = lat[name][:, i]
                if np.isfinite(y).any():
                    _series(ax, xv, y, lat[err][:, i], phase_colour(phases, ph), direction,
                            ph if ax is axes[0] or not np.isfinite(lat["a_A"][:, i]).any() else None)
                    drawn = True
            ax.set_ylabel(label)
            ax.locator_params(axis="y", nbins=4)
        if not drawn:
            raise PlotError(f"{source(lattice)}: no phase has a refined cell in any frame")
        axes[-1].set_xlabel(view.xlabel)
        if view.xlabel == AGAINST_LABEL["x"] and _first_moves_down(xv, direction):
            axes[-1].invert_xaxis()
        labelled = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), axes[0])
        labelled.legend(loc="best", fontsize="small", handletextpad=0.1, ncol=min(4, len(phases)))
        if (direction == "discharge").any() or together.any():
            _direction_legend(axes[-1])
    return fig


def plot_fractions(lattice, *, spec: FractionsPlotSpec = FractionsPlotSpec(), dpi: int = 300,
                   font_size: float = 7.0):
    """The fraction of every phase against x (or capacity, or time) with esd bars.
    ``lattice``: :func:`xrdpipe.open_results`'s ``lattice``."""
    view = _lattice_view(lattice, spec.against)
    lat, phases, xv, direction, together = view.lat, view.phases, view.xv, view.direction, view.together
    if not np.isfinite(lat["fraction"]).any():
        raise PlotError(f"{source(lattice)}: no phase fractions (no frame has a fitted peak of any phase)")
    with style(font_size):
        fig = figure(spec.width_mm, spec.height_mm, dpi)
        ax = fig.subplots()
        _shade_x(ax, xv, together)
        for i, ph in enumerate(phases):
            _series(ax, xv, lat["fraction"][:, i], lat["fraction_err"][:, i], phase_colour(phases, ph), direction, ph)
        ax.set_ylim(-0.04, 1.04)
        source_ = set(lat["fraction_source"][np.isfinite(lat["fraction"])]) if "fraction_source" in lat else {"peaks"}
        ax.set_ylabel({frozenset({"refinement"}): "Weight fraction (Rietveld)",
                       frozenset({"peaks"}): "Phase fraction (peak areas)"}.get(frozenset(source_), "Phase fraction"))
        ax.set_xlabel(view.xlabel)
        if view.xlabel == AGAINST_LABEL["x"] and _first_moves_down(xv, direction):
            ax.invert_xaxis()
        ax.legend(loc="center left", fontsize="small", handletextpad=0.1)
        if (direction == "discharge").any() or together.any():
            _direction_legend(ax, "center right")
    return fig
