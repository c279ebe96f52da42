"""Figures from a run file alone: contour maps beside the voltage curve, a, c and V against x,
phase fractions, fit checks and waterfalls.

Every function takes the run file (and the few specs it needs) and returns a matplotlib
:class:`~matplotlib.figure.Figure` of the requested size in millimetres; :func:`save_figure`
writes it as PNG plus PDF or SVG, atomically. No pyplot, so no global state: figures can be made
from threads, scripts and notebooks alike (a notebook shows a returned figure).

Example
-------
>>> fig = plot_contour("results/nfm.nxs", windows=[("003", 6.2, 7.2)])   # doctest: +SKIP
>>> save_figure(fig, "figures/contour", formats=["png", "pdf"], dpi=300)  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import (
    ContourSpec,
    FitCheckSpec,
    FractionsPlotSpec,
    LatticePlotSpec,
    PhaseSpec,
    WaterfallSpec,
    WindowSpec,
)
from .crystallography import convert_radial, d_from_q, q_from_tth
from .errors import PlotError
from .lineshapes import PROFILES
from .run.peakstore import read_peaks
from .run.store import DONE, open_run_info, read_pattern_block, read_table
from .windows import WindowModel

__all__ = ["PlotError", "plot_contour", "plot_lattice", "plot_fractions", "plot_fit_check", "plot_waterfall", "plot_refinement",
           "save_figure", "PHASE_COLOURS", "style"]

PHASE_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_AXIS_LABEL = {"tth": "2θ (°)", "q": "Q (Å$^{-1}$)", "d": "d (Å)"}
_VERTICAL_LABEL = {"time": "Time (h)", "x": "x in Na$_x$TMO$_2$", "frame": "Frame"}
_AGAINST_LABEL = {"x": "x in Na$_x$TMO$_2$", "capacity": "Capacity (mAh g$^{-1}$)", "time": "Time (h)"}


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


def _figure(width_mm: float, height_mm: float, dpi: int = 300):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_mm / 25.4, height_mm / 25.4), dpi=dpi, layout="constrained")


def save_figure(fig, stem: Path | str, *, formats: Sequence[str] = ("png", "pdf"), dpi: int = 300) -> list[Path]:
    """Write ``fig`` as ``stem.png``, ``stem.pdf``... (each written beside, then renamed: a reader
    never sees half a file). The size is the figure's own; a PNG is ``size x dpi`` pixels."""
    from . import __version__
    from .safeio import atomic_output

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


# ----------------------------------------------------------------------------------------------
# what the figures read from the run file

@dataclass
class _States:
    """Per-frame state of charge (NaN where unknown) and the cycler record, if any."""

    time_h: np.ndarray
    x: np.ndarray
    voltage_V: np.ndarray
    capacity: np.ndarray
    direction: np.ndarray          # "charge", "discharge" or "rest" per frame (its half-cycle's)
    record: dict | None


def _states(run_file: Path, n: int, time_s: np.ndarray) -> _States:
    ec = read_table(run_file, "electrochemistry", names=("half_cycle", "segment", "x", "voltage_V", "capacity_mAh_g"))
    nan = np.full(n, np.nan)
    if ec is None:
        return _States(time_s / 3600, nan, nan, nan, np.full(n, "rest", dtype=object), None)
    direction = np.full(n, "rest", dtype=object)
    hc, seg = ec["half_cycle"], ec["segment"]
    for h in np.unique(hc[hc >= 0]):
        sel = hc == h
        moving = [s for s in seg[sel] if s in ("charge", "discharge")]
        if moving:
            direction[sel] = max(set(moving), key=moving.count)
    record = read_table(run_file, "electrochemistry/record", names=("time_s", "voltage_V", "x"))
    return _States(time_s / 3600, ec["x"], ec["voltage_V"], ec["capacity_mAh_g"], direction, record)


def _to_axis(values, axis: str, unit: str, wavelength_A: float | None) -> np.ndarray:
    """Radial values of the run (2θ or Q) on the plot's axis (2θ, Q or d)."""
    values = np.asarray(values, float)
    src = "tth" if unit == "2th_deg" else "q"
    if axis == src:
        return values
    if src == "tth" or axis == "tth":
        if not wavelength_A:
            raise PlotError(f"the run has no wavelength, so {_AXIS_LABEL[src]} cannot become {_AXIS_LABEL[axis]}")
    q = values if src == "q" else q_from_tth(values, wavelength_A)
    if axis == "d":
        with np.errstate(divide="ignore"):
            return d_from_q(q)
    return convert_radial(values, unit, "2th_deg" if axis == "tth" else "q_A^-1", wavelength_A)


def _axis_label(axis: str, wavelength_A: float | None) -> str:
    if axis == "tth" and wavelength_A:
        return f"2θ (°), λ = {wavelength_A:.4f} Å"
    return _AXIS_LABEL[axis]


def _window_title(name: str) -> str:
    return f"({name})" if name.replace(" ", "").isdigit() else name


def _edges(v: np.ndarray) -> np.ndarray:
    """Cell edges around increasing centres (midpoints; the ends extend by half a step)."""
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _with_gaps(v: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _pixel_rows(frame_rows: np.ndarray, v_edges: np.ndarray, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
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


def _binned_image(run_file: Path, frame_rows: np.ndarray, group: np.ndarray, n_groups: int, columns: slice,
                  chunk: int = 256) -> np.ndarray:
    """The map image of one window: per image row, the mean intensity of its frames (NaN for
    gaps), read ``chunk`` frames at a time (memory: the image plus one chunk)."""
    real = np.flatnonzero(frame_rows >= 0)
    real = real[np.argsort(frame_rows[real], kind="stable")]        # file order, for reading
    total = count = None
    for a in range(0, real.size, chunk):
        sel = real[a:a + chunk]
        inten, _ = read_pattern_block(run_file, rows=frame_rows[sel], columns=columns)
        if total is None:
            total = np.zeros((n_groups, inten.shape[1]))
            count = np.zeros((n_groups, inten.shape[1]))
        ok = np.isfinite(inten)
        np.add.at(total, group[sel], np.where(ok, inten, 0.0))
        np.add.at(count, group[sel], ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------------------------
# 1. contour maps beside the voltage curve

def plot_contour(run_file: Path | str, *, windows: Sequence[tuple[str, float, float]],
                 spec: ContourSpec = ContourSpec(), dpi: int = 300, font_size: float = 7.0):
    """Maps of ``windows`` ((title, low, high) in the run's radial unit) side by side, intensity
    in colour, frames down (time, x or frame); the voltage curve in a panel sharing the vertical
    axis; fitted centres on top (``spec.centres``)."""
    from matplotlib.colors import LogNorm, Normalize, PowerNorm

    run_file = Path(run_file)
    info = open_run_info(run_file)
    radial, unit, wl = info["radial"], info["unit"], info["wavelength_A"]
    status = info["status"]
    n = status.size
    st = _states(run_file, n, info["time_s"])
    done = np.flatnonzero(status == DONE)
    if spec.frame_range is not None:
        done = done[(done >= spec.frame_range[0]) & (done <= spec.frame_range[1])]
    if done.size < 2:
        raise PlotError(f"{run_file} has {done.size} integrated frame(s)"
                        + (f" in frames {list(spec.frame_range)}" if spec.frame_range else "") + "; a map needs at least 2")
    if spec.vertical == "time":
        vert = st.time_h
    elif spec.vertical == "x":
        vert = st.x
        if not np.isfinite(vert[done]).any():
            raise PlotError(f"{run_file} has no x per frame; run 'xrdpipe echem' (needs [electrochemistry]) "
                            "or use vertical = \"time\"")
    else:
        vert = np.arange(n, dtype=float)
    use = done[np.isfinite(vert[done])]
    if use.size < 2:
        raise PlotError(f"fewer than 2 frames of {run_file} have a {spec.vertical}; use vertical = \"frame\"")
    order = np.argsort(vert[use], kind="stable")
    steps = np.diff(vert[use])
    if spec.vertical == "x" and not (np.all(steps <= 1e-6) or np.all(steps >= -1e-6)):
        raise PlotError("x goes down and up again in these frames (charge, then discharge), so a map against x "
                        "would fold onto itself; use vertical = \"time\" (the voltage panel shows the cycling) or "
                        "frame_range = [first, last] within one half-cycle")
    rows_sorted = use[order]
    v_sorted = vert[rows_sorted]
    v_rows, frame_rows = _with_gaps(v_sorted, rows_sorted)
    v_edges = _edges(v_rows)
    # one image row per pixel row of the figure at most: memory does not grow with the frames
    group, g_edges = _pixel_rows(frame_rows, v_edges, max_rows=int(np.ceil(spec.height_mm / 25.4 * dpi)))
    n_groups = g_edges.size - 1

    have_voltage = spec.voltage and (st.record is not None or np.isfinite(st.voltage_V).any())
    peaks = _peaks_or_none(run_file) if spec.centres else None
    with style(font_size):
        fig = _figure(spec.width_mm, spec.height_mm, dpi)
        ratios = [1.0] * len(windows) + ([0.55] if have_voltage else [])
        axes = fig.subplots(1, len(ratios), sharey=True, gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
        cmap = spec.cmap
        norm = {"linear": Normalize(0, 1), "sqrt": PowerNorm(0.5, 0, 1), "log": LogNorm(1e-3, 1)}[spec.scale]
        mesh = None
        for ax, (title, lo, hi) in zip(axes, windows):
            cols = np.flatnonzero((radial >= lo) & (radial <= hi))
            if cols.size < 2:
                raise PlotError(f"window {title!r} [{lo:g}, {hi:g}] holds fewer than 2 points of the run's radial "
                                f"axis ({radial[0]:g} to {radial[-1]:g} {unit})")
            sl = slice(int(cols[0]), int(cols[-1]) + 1)
            z = _normalise(_binned_image(run_file, frame_rows, group, n_groups, sl), spec.scale)
            xa = _to_axis(radial[sl], spec.axis, unit, wl)
            x_edges = _edges(xa) if xa[0] < xa[-1] else _edges(xa[::-1])[::-1]
            mesh = ax.pcolormesh(x_edges, g_edges, np.ma.masked_invalid(z), cmap=cmap, norm=norm,
                                 shading="flat", rasterized=True)
            ax.set_xlim(min(x_edges[0], x_edges[-1]), max(x_edges[0], x_edges[-1]))
            ax.set_title(_window_title(title), pad=2)
            ax.set_xlabel(_AXIS_LABEL[spec.axis])
            ax.tick_params(axis="x", labelrotation=0)
            ax.locator_params(axis="x", nbins=4)
            if peaks is not None:
                _overlay_centres(ax, peaks, lo, hi, vert, use, spec.axis, unit, wl)
        axes[0].set_ylabel(_VERTICAL_LABEL[spec.vertical])
        if spec.axis == "tth" and wl:
            axes[0].set_xlabel(f"2θ (°), λ = {wl:.4f} Å")
        axes[0].set_ylim(v_edges[0], v_edges[-1])
        if spec.vertical == "time":
            axes[0].invert_yaxis()     # time runs down, as in operando papers
        elif spec.vertical == "x" and np.all(steps >= -1e-6):
            axes[0].invert_yaxis()     # x rising (a discharge): the first frame at the top
        if have_voltage:
            _voltage_panel(axes[-1], st, spec.vertical, vert, use)
        if mesh is not None:
            cbar = fig.colorbar(mesh, ax=list(axes), location="top", shrink=0.35, aspect=30, pad=0.01)
            cbar.set_label(f"Intensity ({spec.scale} scale, per window)", labelpad=2)
            cbar.ax.tick_params(labelsize=font_size - 1.5, length=2)
            if spec.scale != "log":
                cbar.set_ticks([0, 0.5, 1])
        if peaks is not None and peaks["phases"]:
            _phase_legend(axes[0], peaks["phases"])
        together = _coexisting(run_file)
        if together is not None and together.any():
            _shade_rows(axes[-1] if have_voltage else axes[0], together, frame_rows, v_edges, label=have_voltage)
    return fig


def _coexisting(run_file: Path) -> np.ndarray | None:
    """Per frame, whether fitted peaks of two or more phases are present (None without peaks)."""
    d = _peaks_or_none(run_file)
    if d is None:
        return None
    present = d["present"].astype(bool) & d["done"].astype(bool)[:, None]
    phases = np.array(d["peak_phase"], dtype=object)
    count = np.zeros(present.shape[0], int)
    for ph in d["phases"]:
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


def _peaks_or_none(run_file: Path) -> dict | None:
    """The fitted centres the maps draw (not the whole peak table), or None before a fit."""
    from .errors import StoreError

    try:
        d = read_peaks(run_file, arrays=("center", "present", "done"))
    except StoreError:
        return None
    phases = list(dict.fromkeys(d["peak_phase"]))
    return {**d, "phases": phases}


def _phase_colour(phases: Sequence[str], phase: str) -> str:
    return PHASE_COLOURS[list(phases).index(phase) % len(PHASE_COLOURS)] if phase in phases else "k"


def _overlay_centres(ax, peaks: dict, lo: float, hi: float, vert, use, axis: str, unit: str, wl) -> None:
    shown = np.zeros(vert.size, bool)
    shown[use] = True
    present = peaks["present"].astype(bool) & peaks["done"].astype(bool)[:, None] & shown[:, None]
    for i, phase in enumerate(peaks["peak_phase"]):
        c = peaks["center"][:, i]
        sel = present[:, i] & np.isfinite(c) & (c >= lo) & (c <= hi) & np.isfinite(vert)
        if sel.any():
            ax.plot(_to_axis(c[sel], axis, unit, wl), vert[sel], ls="none", marker="o", ms=1.6, mew=0.25,
                    mec="white", color=_phase_colour(peaks["phases"], phase))


def _phase_legend(ax, phases: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", ms=3, mew=0.3, mec="white", color=_phase_colour(phases, p),
                      label=p) for p in phases]
    leg = ax.legend(handles=handles, loc="lower left", fontsize="small", handletextpad=0.1, borderaxespad=0.3,
                    frameon=True, framealpha=0.7, edgecolor="none", title="fitted centres",
                    title_fontsize="x-small")
    leg.get_frame().set_linewidth(0)


def _voltage_panel(ax, st: _States, vertical: str, vert, use) -> None:
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


# ----------------------------------------------------------------------------------------------
# 2-3. lattice parameters and phase fractions against x

def _against(st: _States, against: str, frames: np.ndarray) -> tuple[np.ndarray, str]:
    """The abscissa of the lattice figures per frame (x, capacity or time), falling back to time
    when the state of charge is unknown, and to the frame number when the frames have no time."""
    if against == "x" and np.isfinite(st.x[frames]).any():
        return st.x[frames], _AGAINST_LABEL["x"]
    if against == "capacity" and np.isfinite(st.capacity[frames]).any():
        return st.capacity[frames], _AGAINST_LABEL["capacity"]
    if not np.isfinite(st.time_h[frames]).any():
        return np.asarray(frames, float), "Frame" + ("  (the frames have no times)" if against != "frame" else "")
    return st.time_h[frames], _AGAINST_LABEL["time"] + (
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


def _lattice_view(run_file: Path, against: str) -> _LatticeView:
    lat = read_table(run_file, "lattice")
    if lat is None:
        raise PlotError(f"{run_file} holds no lattice parameters yet; run 'xrdpipe lattice' (after 'xrdpipe fit')")
    info = open_run_info(run_file)
    st = _states(run_file, info["status"].size, info["time_s"])
    frames = lat["frame"]
    xv, xlabel = _against(st, against, frames)
    together = (np.nan_to_num(lat["fraction"]) > 0).sum(axis=1) >= 2
    return _LatticeView(lat, list(lat["phase"]), xv, xlabel, st.direction[frames], together)


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
    """A grey band over the range of the abscissa where two phases were seen at once."""
    sel = together & np.isfinite(xv)
    if sel.any():
        lo, hi = np.min(xv[sel]), np.max(xv[sel])
        pad = 0.5 * np.nanmedian(np.abs(np.diff(xv[np.isfinite(xv)]))) if np.isfinite(xv).sum() > 1 else 0.0
        ax.axvspan(lo - pad, hi + pad, color="0.88", lw=0, zorder=0)


def _direction_legend(ax, loc: str = "lower right") -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], ls="none", marker="o", ms=2.2, mec="0.3", mfc="0.3", label="charge"),
               Line2D([], [], ls="none", marker="o", ms=3.6, mec="0.3", mfc="white", label="discharge"),
               Patch(color="0.88", label="two phases")]
    from matplotlib.legend import Legend

    # a second legend beside the phases' one (ax.legend would replace it)
    ax.add_artist(Legend(ax, handles, [h.get_label() for h in handles], loc=loc, fontsize="small",
                         handletextpad=0.3))


def plot_lattice(run_file: Path | str, *, spec: LatticePlotSpec = LatticePlotSpec(), dpi: int = 300,
                 font_size: float = 7.0):
    """a, c and V of every phase against x (or capacity, or time) with esd bars; filled markers
    on charge, open on discharge."""
    run_file = Path(run_file)
    view = _lattice_view(run_file, spec.against)
    lat, phases, xv, xlabel, direction, together = (view.lat, view.phases, view.xv, view.xlabel, view.direction,
                                                    view.together)
    with style(font_size):
        fig = _figure(spec.width_mm, spec.height_mm, dpi)
        axes = fig.subplots(3, 1, sharex=True)
        for ax in axes:
            _shade_x(ax, xv, together)
        panels = (("a_A", "a_err_A", "a (Å)"), ("c_A", "c_err_A", "c (Å)"), ("volume_A3", "volume_err_A3", "V (Å$^3$)"))
        drawn = False
        for ax, (name, err, label) in zip(axes, panels):
            for i, ph in enumerate(phases):
                y = lat[name][:, i]
                if np.isfinite(y).any():
                    _series(ax, xv, y, lat[err][:, i], _phase_colour(phases, ph), direction,
                            ph if ax is axes[0] or not np.isfinite(lat["a_A"][:, i]).any() else None)
                    drawn = True
            ax.set_ylabel(label)
            ax.locator_params(axis="y", nbins=4)
        if not drawn:
            raise PlotError(f"{run_file}: no phase has a refined cell in any frame")
        axes[-1].set_xlabel(xlabel)
        if xlabel == _AGAINST_LABEL["x"] and _first_moves_down(xv, direction):
            axes[-1].invert_xaxis()
        labelled = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), axes[0])
        labelled.legend(loc="best", fontsize="small", handletextpad=0.1, ncol=min(4, len(phases)))
        if (direction == "discharge").any() or together.any():
            _direction_legend(axes[-1])
    return fig


def plot_fractions(run_file: Path | str, *, spec: FractionsPlotSpec = FractionsPlotSpec(), dpi: int = 300,
                   font_size: float = 7.0):
    """The fraction of every phase against x (or capacity, or time) with esd bars."""
    run_file = Path(run_file)
    view = _lattice_view(run_file, spec.against)
    lat, phases, xv, xlabel, direction, together = (view.lat, view.phases, view.xv, view.xlabel, view.direction,
                                                    view.together)
    if not np.isfinite(lat["fraction"]).any():
        raise PlotError(f"{run_file}: no phase fractions (no frame has a fitted peak of any phase)")
    with style(font_size):
        fig = _figure(spec.width_mm, spec.height_mm, dpi)
        ax = fig.subplots()
        _shade_x(ax, xv, together)
        for i, ph in enumerate(phases):
            _series(ax, xv, lat["fraction"][:, i], lat["fraction_err"][:, i], _phase_colour(phases, ph), direction, ph)
        ax.set_ylim(-0.04, 1.04)
        source = set(lat["fraction_source"][np.isfinite(lat["fraction"])]) if "fraction_source" in lat else {"peaks"}
        ax.set_ylabel({frozenset({"refinement"}): "Weight fraction (Rietveld)",
                       frozenset({"peaks"}): "Phase fraction (peak areas)"}.get(frozenset(source), "Phase fraction"))
        ax.set_xlabel(xlabel)
        if xlabel == _AGAINST_LABEL["x"] and _first_moves_down(xv, direction):
            ax.invert_xaxis()
        ax.legend(loc="center left", fontsize="small", handletextpad=0.1)
        if (direction == "discharge").any() or together.any():
            _direction_legend(ax, "center right")
    return fig


# ----------------------------------------------------------------------------------------------
# 4. fit check: data, fit, components, residual

def default_fit_frames(run_file: Path | str) -> list[int]:
    """The first fitted frame, the one with the most components present (coexistence) and the
    last, without repeats."""
    d = read_peaks(run_file)
    ok = np.flatnonzero(d["done"].astype(bool) & d["success"].astype(bool).any(axis=1))
    if ok.size == 0:
        raise PlotError(f"{run_file}: no frame was fitted successfully; nothing to check")
    richest = ok[np.argmax(d["present"][ok].sum(axis=1))]
    return sorted({int(ok[0]), int(richest), int(ok[-1])})


def plot_fit_check(run_file: Path | str, *, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec],
                   spec: FitCheckSpec = FitCheckSpec(), dpi: int = 300, font_size: float = 7.0):
    """For each chosen frame (rows) and window (columns): the data with its esd, the stored fit,
    each present component and the background, and the residual in units of the esd.

    The curves are rebuilt from the stored parameters; the background, which the run file does
    not keep, is the weighted least-squares polynomial under the stored peaks (at the optimum of
    the fit it is exactly the fitted one)."""
    run_file = Path(run_file)
    info = open_run_info(run_file)
    d = read_peaks(run_file)
    unknown = [name for name in spec.windows if name not in {w.name for w in windows}]
    if unknown:
        raise PlotError(f"fit check: {unknown[0]!r} is not one of the [[windows]] {[w.name for w in windows]}")
    chosen = [w for w in windows if not spec.windows or w.name in spec.windows]
    if not chosen:
        raise PlotError("fit check: the experiment has no [[windows]]")
    frames = list(spec.frames) or default_fit_frames(run_file)
    n_frames = info["status"].size
    for f in frames:
        if f >= n_frames:
            raise PlotError(f"frame {f} is not in {run_file} (frames 0 to {n_frames - 1})")
    st = _states(run_file, n_frames, info["time_s"])
    phase_map = {p.name: p for p in phases}
    phase_order = list(dict.fromkeys(d["peak_phase"]))
    inten, sigma = read_pattern_block(run_file, frames)
    with style(font_size):
        fig = _figure(spec.width_mm, spec.height_mm, dpi)
        outer = fig.add_gridspec(len(frames), len(chosen))
        for c, w in enumerate(chosen):
            if w.name not in d["window"]:
                raise PlotError(f"window {w.name!r} has not been fitted; run 'xrdpipe fit' (or 'xrdpipe run') first")
            try:
                model = WindowModel(w, phase_map, info["radial"], info["unit"], info["wavelength_A"])
            except (ValueError, KeyError) as exc:
                raise PlotError(f"fit check of window {w.name!r}: {exc}") from None
            cols = [i for i, pw in enumerate(d["peak_window"]) if pw == w.name]
            wi = list(d["window"]).index(w.name)
            for r, f in enumerate(frames):
                inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
                ax = fig.add_subplot(inner[0])
                axr = fig.add_subplot(inner[1], sharex=ax)
                y = inten[r, model.columns].astype(float)
                s = sigma[r, model.columns].astype(float)
                _fit_cell(ax, axr, model, y, s, d, f, cols, wi, phase_order)
                if r == 0:
                    ax.set_title(_window_title(w.name), pad=2)
                if c == 0:
                    ax.set_ylabel(_frame_label(f, st))
                    axr.set_ylabel("Δ/σ", labelpad=1)
                if r == len(frames) - 1:
                    axr.set_xlabel(_AXIS_LABEL["tth" if info["unit"] == "2th_deg" else "q"])
                else:
                    axr.tick_params(labelbottom=False)
                ax.tick_params(labelbottom=False)
        _fit_legend(fig, phase_order)
    return fig


def _fit_legend(fig, phases: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", ms=2, mfc="none", mec="0.35", mew=0.5, label="data"),
               Line2D([], [], color="k", lw=0.8, label="fit"),
               Line2D([], [], color="0.5", lw=0.6, ls=":", label="background")]
    handles += [Line2D([], [], color=_phase_colour(phases, p), lw=0.8, ls="--", label=f"{p} peak") for p in phases]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.8, columnspacing=1.2)


def _frame_label(f: int, st: _States) -> str:
    label = f"frame {f}"
    if np.isfinite(st.x[f]):
        label += f", x = {st.x[f]:.3f}"
    elif np.isfinite(st.time_h[f]):
        label += f", {st.time_h[f]:.2f} h"
    return label + "\nIntensity"


def _fit_cell(ax, axr, model: WindowModel, y, s, d, f, cols, wi, phase_order) -> None:
    x = model.x
    ok = np.isfinite(y)
    has_sigma = np.isfinite(s).any() and np.nanmax(s) > 0
    w = np.where(ok & np.isfinite(s) & (s > 0), 1 / np.where(s > 0, s, 1), 0.0) if has_sigma else ok.astype(float)
    ax.plot(x[ok], y[ok], ls="none", marker="o", ms=1.4, mfc="none", mec="0.35", mew=0.4, label="data")
    if not d["done"][f] or not d["success"][f, wi]:
        msg = d["message"][f, wi] or "not fitted"
        ax.text(0.5, 0.5, f"no fit: {msg[:60]}", transform=ax.transAxes, ha="center", va="center", fontsize="small")
        return
    fn, _, names = PROFILES[model.profile]
    src = {"eta": "shape", "m": "shape"}
    peaks_sum = np.zeros_like(x)
    parts = []
    for j, col in enumerate(cols):
        if not d["present"][f, col]:
            continue
        args = [d[src.get(name, name)][f, col] for name in names]
        comp = fn(x, *args)
        peaks_sum += comp
        parts.append((d["peak_phase"][col], d["peak_hkl"][col], comp))
    basis = np.vstack([model.t ** k for k in range(model.degree + 1)]).T
    coef = np.linalg.lstsq(basis[ok] * w[ok, None], (y[ok] - peaks_sum[ok]) * w[ok], rcond=None)[0]
    bg = basis @ coef
    fit = bg + peaks_sum
    ax.plot(x, fit, color="k", lw=0.8, label="fit")
    ax.plot(x, bg, color="0.5", lw=0.6, ls=":", label="background")
    for phase, hkl, comp in parts:
        ax.plot(x, bg + comp, lw=0.7, ls="--", color=_phase_colour(phase_order, phase), label=f"{phase} {hkl}")
    resid = (y - fit) / np.where(w > 0, 1 / np.where(w > 0, w, 1), np.nan) if has_sigma else y - fit
    axr.plot(x[ok], resid[ok], color="0.3", lw=0.5)
    axr.axhline(0, color="k", lw=0.4)
    ax.locator_params(axis="y", nbins=3)
    axr.locator_params(axis="y", nbins=2)


# ----------------------------------------------------------------------------------------------
# 5. waterfall

def plot_waterfall(run_file: Path | str, *, spec: WaterfallSpec = WaterfallSpec(), dpi: int = 300,
                   font_size: float = 7.0):
    """Chosen frames (default: ``spec.count`` spread evenly over the integrated ones) stacked
    with an offset, coloured by time, the first at the bottom."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    run_file = Path(run_file)
    info = open_run_info(run_file)
    radial, unit, wl = info["radial"], info["unit"], info["wavelength_A"]
    status = info["status"]
    done = np.flatnonzero(status == DONE)
    if spec.frames:
        frames = np.array(spec.frames, int)
        bad = frames[(frames >= status.size) | (status[np.clip(frames, 0, status.size - 1)] != DONE)]
        if bad.size:
            raise PlotError(f"frame {int(bad[0])} of {run_file} is not an integrated frame")
    else:
        if done.size == 0:
            raise PlotError(f"{run_file} has no integrated frame")
        frames = done[np.unique(np.linspace(0, done.size - 1, min(spec.count, done.size)).round().astype(int))]
    lo, hi = spec.range if spec.range is not None else (radial[0], radial[-1])
    cols = np.flatnonzero((radial >= lo) & (radial <= hi))
    if cols.size < 2:
        raise PlotError(f"range [{lo:g}, {hi:g}] holds fewer than 2 points of the run's radial axis "
                        f"({radial[0]:g} to {radial[-1]:g} {unit})")
    sl = slice(int(cols[0]), int(cols[-1]) + 1)
    inten, _ = read_pattern_block(run_file, frames, sl)
    colour_by = info["time_s"][frames] / 3600
    clabel = _AGAINST_LABEL["time"]
    if not np.isfinite(colour_by).all():
        colour_by, clabel = frames.astype(float), "Frame"
    span = np.nanpercentile(inten, 99.5) - np.nanpercentile(inten, 1)
    offset = spec.offset if spec.offset is not None else 1.2 * span / max(len(frames) - 1, 1) * 2
    xa = _to_axis(radial[sl], spec.axis, unit, wl)
    cmap = colormaps["viridis"]
    norm = Normalize(np.nanmin(colour_by), np.nanmax(colour_by) if np.nanmax(colour_by) > np.nanmin(colour_by)
                     else np.nanmin(colour_by) + 1)
    with style(font_size):
        fig = _figure(spec.width_mm, spec.height_mm, dpi)
        ax = fig.subplots()
        base = np.nanpercentile(inten, 1)
        for k in range(len(frames)):
            ax.plot(xa, inten[k] - base + k * offset, lw=0.6, color=cmap(norm(colour_by[k])))
        ax.set_xlabel(_axis_label(spec.axis, wl))
        ax.set_ylabel("Intensity + offset (counts)")
        ax.set_xlim(min(xa[0], xa[-1]), max(xa[0], xa[-1]))
        ax.set_yticks([])
        cbar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, pad=0.01, aspect=30)
        cbar.set_label(clabel)
    return fig


# ----------------------------------------------------------------------------------------------
# refinement: observed, calculated, difference, tick marks per phase

def plot_refinement(run_file: Path | str, frame: int, *, width_mm: float = 180.0, height_mm: float = 100.0,
                    dpi: int = 300, font_size: float = 7.0):
    """The whole-pattern refinement of one frame: observed (points), calculated and background
    (lines), the difference below, and a row of tick marks per phase, with Rwp and GOF."""
    run_file = Path(run_file)
    d = read_table(run_file, "refinement", names=("tth", "status", "message", "rwp", "gof", "phase", "tick_phase"))
    if d is None:
        raise PlotError(f"{run_file} holds no refinement yet; run 'xrdpipe refine' first")
    n = d["status"].size
    if not 0 <= frame < n or d["status"][frame] != 1:
        ok = np.flatnonzero(d["status"] == 1)
        why = f"its refinement failed: {d['message'][frame]}" if 0 <= frame < n and d["status"][frame] == 2 else (
            "it was not refined")
        raise PlotError(f"frame {frame} of {run_file}: {why} (refined frames: "
                        f"{', '.join(map(str, ok[:10])) or 'none'}{' ...' if ok.size > 10 else ''})")
    from .run.store import reading as _reading

    with _reading(run_file) as h5:
        g = h5["/entry/refinement"]
        calc, bkg, ticks = g["calculated"][frame], g["background"][frame], g["ticks"][frame]
    tth = d["tth"]
    lo = int(d["attrs"]["first_column"])
    obs, _ = read_pattern_block(run_file, rows=[frame], columns=slice(lo, lo + tth.size))
    obs = obs[0]
    phases = list(d["phase"])
    with style(font_size):
        fig = _figure(width_mm, height_mm, dpi)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot(tth, obs, ls="none", marker="o", ms=1.2, mew=0, color="k", label="observed")
        top.plot(tth, calc, color="#d62728", lw=0.7, label="calculated")
        top.plot(tth, bkg, color="0.5", lw=0.5, label="background")
        span = np.nanmax(obs) - np.nanmin(obs) if np.isfinite(obs).any() else 1.0
        for p, ph in enumerate(phases):
            t = ticks[(d["tick_phase"][:ticks.size] == p) & np.isfinite(ticks)]
            t = t[(t >= tth[0]) & (t <= tth[-1])]
            ylev = np.nanmin(obs) - (0.06 + 0.06 * p) * span
            top.plot(t, np.full(t.size, ylev), ls="none", marker="|", ms=4, mew=0.6,
                     color=_phase_colour(phases, ph), label=f"{ph} reflections")
        top.set_ylabel("Intensity (counts)")
        top.legend(loc="upper right", fontsize="x-small")
        top.set_title(f"frame {frame}: Rwp {100 * d['rwp'][frame]:.2f} %, GOF {d['gof'][frame]:.3f}", pad=2)
        bottom.plot(tth, obs - calc, color="#1f77b4", lw=0.5)
        bottom.axhline(0, color="0.6", lw=0.4)
        bottom.set_ylabel("obs − calc")
        bottom.set_xlabel(_AXIS_LABEL["tth"])
        bottom.set_xlim(tth[0], tth[-1])
    return fig


# ----------------------------------------------------------------------------------------------
# 7. calibration: the calibrant image with the fitted rings

def plot_calibration(image: np.ndarray, mask: np.ndarray | None, tth_deg: np.ndarray, rings_deg, points: np.ndarray,
                     *, title: str = "", width_mm: float = 120.0, dpi: int = 150, font_size: float = 7.0,
                     max_pixels: int = 1200):
    """The calibrant image (log scale, masked pixels grey) with the refined rings drawn over it
    (``tth_deg``: 2θ of every pixel from the refined geometry; ``rings_deg``: the rings used) and
    the control points. Images larger than ``max_pixels`` are shown binned."""
    import matplotlib

    img = np.asarray(image, float)
    bin_ = max(1, int(np.ceil(max(img.shape) / max_pixels)))
    shape = (img.shape[0] // bin_, img.shape[1] // bin_)

    def binned(a, how):
        a = a[:shape[0] * bin_, :shape[1] * bin_].reshape(shape[0], bin_, shape[1], bin_)
        return how(a, axis=(1, 3))

    import warnings

    bad = np.zeros(img.shape, bool) if mask is None else np.asarray(mask, bool)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # bins wholly in a module gap: NaN
        shown = binned(np.where(bad, np.nan, img), np.nanmean) if bin_ > 1 else np.where(bad, np.nan, img)
    tth = binned(tth_deg, np.mean) if bin_ > 1 else tth_deg
    positive = shown[np.isfinite(shown) & (shown > 0)]
    lo, hi = (np.percentile(positive, 1), np.percentile(positive, 99.9)) if positive.size else (1, 10)
    height = width_mm * shape[0] / shape[1]
    with style(font_size):
        from matplotlib.colors import LogNorm

        fig = _figure(width_mm, height + 10, dpi)
        ax = fig.subplots()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
        ax.imshow(np.where(shown > 0, shown, np.nan), cmap=cmap, norm=LogNorm(max(lo, 1e-3), max(hi, lo * 10)),
                  origin="upper", interpolation="nearest", extent=(0, img.shape[1], img.shape[0], 0))
        ax.contour(np.linspace(0, img.shape[1], shape[1]), np.linspace(0, img.shape[0], shape[0]), tth,
                   levels=sorted(rings_deg), colors="red", linewidths=0.5)
        if len(points):
            ax.plot(points[:, 1], points[:, 0], ls="none", marker=".", ms=1.0, color="white", alpha=0.7)
        ax.set_xlabel("Column (pixels)")
        ax.set_ylabel("Row (pixels)")
        if title:
            ax.set_title(title, fontsize=font_size)
    return fig
