"""Contour maps of the pattern stack beside the voltage curve, with the fitted centres on top.

The stack stays in the run file: the map reads only its windows' columns, a chunk of frames at
a time, and bins runs of frames into one image row when there are more frames than pixel rows,
so memory does not grow with the number of frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import ContourSpec
from ..errors import PlotError
from .style import (
    AXIS_LABEL,
    DONE,
    VERTICAL_LABEL,
    States,
    edges,
    figure,
    phase_colour,
    radial_of,
    source,
    states,
    style,
    to_axis,
    window_title,
)

__all__ = ["plot_contour"]



def with_gaps(v: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertical centres and the frame of each map row, with an empty row inserted wherever the
    step is more than twice the usual one (a pause in data collection is shown as a gap, not
    stretched over)."""
    if v.size < 3:
        return v, rows
    step = np.diff(v)
    usual = np.median(step)
    out_v, out_r = [v[0]], [rows[0]]
    for i in range(1, v.size):
        if step[i - 1] > 2.0 * usual:
            out_v.append((v[i - 1] + v[i]) / 2)
            out_r.append(-1)
        out_v.append(v[i])
        out_r.append(rows[i])
    return np.array(out_v), np.array(out_r)


def pixel_rows(frame_rows: np.ndarray, v_edges: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Image rows for map rows ``frame_rows`` (a frame, or -1 for a gap) with edges ``v_edges``:
    when there are more map rows than ``max_rows`` (the figure's pixel rows), runs of k
    consecutive frames share one image row (their mean), so the image stays the size of the
    figure however many frames there are; a gap stays a row of its own, so a pause in data
    collection is still blank. Returns the image row of each map row and the image rows' edges."""
    n = frame_rows.size
    k = max(1, int(np.ceil(n / max(max_rows, 1))))
    if k == 1:
        return np.arange(n), v_edges
    group = np.empty(n, int)
    g, fill = -1, k
    for i, r in enumerate(frame_rows):
        if r < 0 or fill >= k or (i and frame_rows[i - 1] < 0):
            g, fill = g + 1, 0
        group[i] = g
        fill += 1
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    return group, np.concatenate([v_edges[starts], v_edges[-1:]])


def binned_image(intensity, frame_rows: np.ndarray, group: np.ndarray, n_groups: int, columns: slice,
                 chunk: int = 256) -> np.ndarray:
    """The map image of one window of ``intensity`` (a lazy frame x radial DataArray): per image
    row, the mean intensity of its frames (NaN for gaps), read ``chunk`` frames at a time
    (memory: the image plus one chunk)."""
    real = np.flatnonzero(frame_rows >= 0)
    real = real[np.argsort(frame_rows[real], kind="stable")]        # file order, for reading
    total = count = None
    for a in range(0, real.size, chunk):
        sel = real[a:a + chunk]
        inten = np.asarray(intensity[frame_rows[sel], columns].values)
        if total is None:
            total = np.zeros((n_groups, inten.shape[1]))
            count = np.zeros((n_groups, inten.shape[1]))
        ok = np.isfinite(inten)
        np.add.at(total, group[sel], np.where(ok, inten, 0.0))
        np.add.at(count, group[sel], ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass
class _Rows:
    """The frames a map shows, in map order, and its vertical axis."""

    vert: np.ndarray           # the vertical value of every frame of the run (NaN: none)
    use: np.ndarray            # the frames shown
    steps: np.ndarray          # successive steps of the vertical value over them
    frame_rows: np.ndarray     # the frame of each map row (-1: a gap)
    v_edges: np.ndarray        # the map rows' edges
    group: np.ndarray          # the image row of each map row
    g_edges: np.ndarray        # the image rows' edges


def _map_rows(patterns, st: States, spec: ContourSpec, dpi: int) -> _Rows:
    name = source(patterns)
    status = np.asarray(patterns["status"].values)
    n = status.size
    done = np.flatnonzero(status == DONE)
    if spec.frame_range is not None:
        done = done[(done >= spec.frame_range[0]) & (done <= spec.frame_range[1])]
    if done.size < 2:
        raise PlotError(f"{name} has {done.size} integrated frame(s)"
                        + (f" in frames {list(spec.frame_range)}" if spec.frame_range else "") + "; a map needs at least 2")
    if spec.vertical == "time":
        vert = st.time_h
    elif spec.vertical == "x":
        vert = st.x
        if not np.isfinite(vert[done]).any():
            raise PlotError(f"{name} has no x per frame; run 'xrdpipe echem' (needs [electrochemistry]) "
                            "or use vertical = \"time\"")
    else:
        vert = np.arange(n, dtype=float)
    use = done[np.isfinite(vert[done])]
    if use.size < 2:
        raise PlotError(f"fewer than 2 frames of {name} have a {spec.vertical}; use vertical = \"frame\"")
    order = np.argsort(vert[use], kind="stable")
    steps = np.diff(vert[use])
    if spec.vertical == "x" and not (np.all(steps <= 1e-6) or np.all(steps >= -1e-6)):
        raise PlotError("x goes down and up again in these frames (charge, then discharge), so a map against x "
                        "would fold onto itself; use vertical = \"time\" (the voltage panel shows the cycling) or "
                        "frame_range = [first, last] within one half-cycle")
    rows_sorted = use[order]
    v_rows, frame_rows = with_gaps(vert[rows_sorted], rows_sorted)
    v_edges = edges(v_rows)
    # one image row per pixel row of the figure at most: memory does not grow with the frames
    group, g_edges = pixel_rows(frame_rows, v_edges, max_rows=int(np.ceil(spec.height_mm / 25.4 * dpi)))
    return _Rows(vert, use, steps, frame_rows, v_edges, group, g_edges)


def plot_contour(patterns, *, windows: Sequence[tuple[str, float, float]], spec: ContourSpec = ContourSpec(),
                 peaks=None, record=None, dpi: int = 300, font_size: float = 7.0):
    """Maps of ``windows`` ((title, low, high) in the run's radial unit) side by side, intensity
    in colour, frames down (time, x or frame); the voltage curve in a panel sharing the vertical
    axis; fitted centres on top (``spec.centres``, from ``peaks``).

    ``patterns``: :func:`xrdpipe.open_dataset` of a run file (read lazily: only the windows'
    columns); ``peaks`` and ``record``: :func:`xrdpipe.open_results`'s, if any.

    Example
    -------
    >>> res = xrdpipe.open_results(run_file)                                     # doctest: +SKIP
    >>> plot_contour(xrdpipe.open_dataset(run_file), windows=[("003", 6.2, 7.2)],
    ...              peaks=res.peaks, record=res.record)                          # doctest: +SKIP
    """
    from matplotlib.colors import LogNorm, Normalize, PowerNorm

    radial, unit, wl = radial_of(patterns)
    st = states(patterns, record)
    rows = _map_rows(patterns, st, spec, dpi)
    have_voltage = spec.voltage and (st.record is not None or np.isfinite(st.voltage_V).any())
    centres = _centres(peaks) if spec.centres else None
    with style(font_size):
        fig = figure(spec.width_mm, spec.height_mm, dpi)
        ratios = [1.0] * len(windows) + ([0.55] if have_voltage else [])
        axes = fig.subplots(1, len(ratios), sharey=True, gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
        norm = {"linear": Normalize(0, 1), "sqrt": PowerNorm(0.5, 0, 1), "log": LogNorm(1e-3, 1)}[spec.scale]
        mesh = None
        for ax, (title, lo, hi) in zip(axes, windows):
            mesh = _window_map(ax, patterns, rows, (title, lo, hi), spec, norm, (radial, unit, wl))
            if centres is not None:
                _overlay_centres(ax, centres, lo, hi, rows.vert, rows.use, spec.axis, unit, wl)
        axes[0].set_ylabel(VERTICAL_LABEL[spec.vertical])
        if spec.axis == "tth" and wl:
            axes[0].set_xlabel(f"2θ (°), λ = {wl:.4f} Å")
        axes[0].set_ylim(rows.v_edges[0], rows.v_edges[-1])
        if spec.vertical == "time":
            axes[0].invert_yaxis()     # time runs down, as in operando papers
        elif spec.vertical == "x" and np.all(rows.steps >= -1e-6):
            axes[0].invert_yaxis()     # x rising (a discharge): the first frame at the top
        if have_voltage:
            _voltage_panel(axes[-1], st, spec.vertical, rows.vert, rows.use)
        if mesh is not None:
            cbar = fig.colorbar(mesh, ax=list(axes), location="top", shrink=0.35, aspect=30, pad=0.01)
            cbar.set_label(f"Intensity ({spec.scale} scale, per window)", labelpad=2)
            cbar.ax.tick_params(labelsize=font_size - 1.5, length=2)
            if spec.scale != "log":
                cbar.set_ticks([0, 0.5, 1])
        if centres is not None and centres["phases"]:
            _phase_legend(axes[0], centres["phases"])
        together = _coexisting(peaks)
        if together is not None and together.any():
            _shade_rows(axes[-1] if have_voltage else axes[0], together, rows.frame_rows, rows.v_edges,
                        label=have_voltage)
    return fig


def _window_map(ax, patterns, rows: _Rows, window, spec: ContourSpec, norm, radial_info):
    """One window's map on ``ax``; returns its mesh."""
    radial, unit, wl = radial_info
    title, lo, hi = window
    cols = np.flatnonzero((radial >= lo) & (radial <= hi))
    if cols.size < 2:
        raise PlotError(f"window {title!r} [{lo:g}, {hi:g}] holds fewer than 2 points of the run's radial "
                        f"axis ({radial[0]:g} to {radial[-1]:g} {unit})")
    sl = slice(int(cols[0]), int(cols[-1]) + 1)
    z = _normalise(binned_image(patterns["intensity"], rows.frame_rows, rows.group, rows.g_edges.size - 1, sl),
                   spec.scale)
    xa = to_axis(radial[sl], spec.axis, unit, wl)
    x_edges = edges(xa) if xa[0] < xa[-1] else edges(xa[::-1])[::-1]
    mesh = ax.pcolormesh(x_edges, rows.g_edges, np.ma.masked_invalid(z), cmap=spec.cmap, norm=norm,
                         shading="flat", rasterized=True)
    ax.set_xlim(min(x_edges[0], x_edges[-1]), max(x_edges[0], x_edges[-1]))
    ax.set_title(window_title(title), pad=2)
    ax.set_xlabel(AXIS_LABEL[spec.axis])
    ax.tick_params(axis="x", labelrotation=0)
    ax.locator_params(axis="x", nbins=4)
    return mesh


def _coexisting(peaks) -> np.ndarray | None:
    """Per frame, whether fitted peaks of two or more phases are present (None without peaks)."""
    if peaks is None:
        return None
    present = np.asarray(peaks["present"].values, bool) & np.asarray(peaks["done"].values, bool)[:, None]
    phases = np.asarray(peaks["phase"].values, dtype=object)
    count = np.zeros(present.shape[0], int)
    for ph in dict.fromkeys(phases):
        count += present[:, phases == ph].any(axis=1)
    return count >= 2


def _shade_rows(ax, together: np.ndarray, frame_rows: np.ndarray, v_edges: np.ndarray, *, label: bool) -> None:
    """Grey bands across ``ax`` over the map rows whose frames show two phases at once."""
    on = np.array([r >= 0 and together[r] for r in frame_rows])
    starts = np.flatnonzero(on & ~np.concatenate([[False], on[:-1]]))
    ends = np.flatnonzero(on & ~np.concatenate([on[1:], [False]]))
    for k, (a, b) in enumerate(zip(starts, ends)):
        ax.axhspan(v_edges[a], v_edges[b + 1], color="0.82", lw=0, zorder=0,
                   label="two phases" if k == 0 and label else None)
    if label and starts.size:
        ax.legend(loc="lower right", fontsize="x-small", handlelength=1.0, borderaxespad=0.2)


def _normalise(z: np.ndarray, scale: str) -> np.ndarray:
    """Intensity to 0..1 in one window: background (1st percentile) at 0, near-maximum (99.9th
    percentile) at 1, so one hot pixel or one empty frame does not set the colour scale."""
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return z
    lo, hi = np.percentile(finite, [1.0, 99.9])
    if hi <= lo:
        hi = lo + 1.0
    out = (z - lo) / (hi - lo)
    return np.clip(out, 1e-3 if scale == "log" else 0.0, 1.0)


def _centres(peaks) -> dict | None:
    """The fitted centres the maps draw (not the whole peak table), or None before a fit."""
    if peaks is None:
        return None
    phase = tuple(peaks["phase"].values)
    return {"center": np.asarray(peaks["center"].values), "present": np.asarray(peaks["present"].values),
            "done": np.asarray(peaks["done"].values), "peak_phase": phase, "phases": list(dict.fromkeys(phase))}


def _overlay_centres(ax, peaks: dict, lo: float, hi: float, vert, use, axis: str, unit: str, wl) -> None:
    shown = np.zeros(vert.size, bool)
    shown[use] = True
    present = peaks["present"].astype(bool) & peaks["done"].astype(bool)[:, None] & shown[:, None]
    for i, phase in enumerate(peaks["peak_phase"]):
        c = peaks["center"][:, i]
        sel = present[:, i] & np.isfinite(c) & (c >= lo) & (c <= hi) & np.isfinite(vert)
        if sel.any():
            ax.plot(to_axis(c[sel], axis, unit, wl), vert[sel], ls="none", marker="o", ms=1.6, mew=0.25,
                    mec="white", color=phase_colour(peaks["phases"], phase))


def _phase_legend(ax, phases: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", ms=3, mew=0.3, mec="white", color=phase_colour(phases, p),
                      label=p) for p in phases]
    leg = ax.legend(handles=handles, loc="lower left", fontsize="small", handletextpad=0.1, borderaxespad=0.3,
                    frameon=True, framealpha=0.7, edgecolor="none", title="fitted centres",
                    title_fontsize="x-small")
    leg.get_frame().set_linewidth(0)


def _voltage_panel(ax, st: States, vertical: str, vert, use) -> None:
    rec = st.record
    if rec is not None and vertical in ("time", "x"):
        # the record over the time the shown frames span (half a frame step either side)
        t = rec["time_s"] / 3600
        first, last = np.nanmin(st.time_h[use]), np.nanmax(st.time_h[use])
        pad = 0.5 * np.nanmedian(np.diff(np.sort(st.time_h[use]))) if use.size > 1 else 0.0
        sel = (t >= first - pad) & (t <= last + pad)
        ax.plot(rec["voltage_V"][sel], (t if vertical == "time" else rec["x"])[sel], color="k", lw=0.8)
    else:
        ax.plot(st.voltage_V[use], vert[use], color="k", lw=0.8, marker="o", ms=1.5)
    ax.set_xlabel("Voltage (V)")
    ax.locator_params(axis="x", nbins=3)
    ax.tick_params(axis="y", labelleft=False)
