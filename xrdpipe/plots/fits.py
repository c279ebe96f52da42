"""Figures of single patterns: the fit check (data, fit, components, residual), the waterfall of
chosen frames, the whole-pattern refinement of one frame and the calibrant image with its rings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import FitCheckSpec, PhaseSpec, WaterfallSpec, WindowSpec
from ..errors import PlotError
from ..lineshapes import PROFILES
from ..windows import WindowModel
from .style import (
    AGAINST_LABEL,
    AXIS_LABEL,
    DONE,
    States,
    axis_label,
    figure,
    phase_colour,
    radial_of,
    source,
    states,
    style,
    to_axis,
    window_title,
)

__all__ = ["plot_fit_check", "default_fit_frames", "plot_waterfall", "RefinedFrame", "plot_refinement",
           "plot_calibration"]



# ----------------------------------------------------------------------------------------------
# fit check: data, fit, components, residual

def default_fit_frames(peaks) -> list[int]:
    """The first fitted frame, the one with the most components present (coexistence) and the
    last, without repeats (``peaks``: :func:`xrdpipe.open_results`'s)."""
    done = np.asarray(peaks["done"].values, bool)
    ok = np.flatnonzero(done & np.asarray(peaks["success"].values, bool).any(axis=1))
    if ok.size == 0:
        raise PlotError(f"{source(peaks)}: no frame was fitted successfully; nothing to check")
    richest = ok[np.argmax(np.asarray(peaks["present"].values)[ok].sum(axis=1))]
    return sorted({int(ok[0]), int(richest), int(ok[-1])})


def _peak_arrays(peaks) -> dict:
    d = {name: np.asarray(var.values) for name, var in peaks.data_vars.items()}
    for name in ("window", "phase", "hkl"):
        d[f"peak_{name}"] = tuple(str(v) for v in peaks[name].values)
    return d


def plot_fit_check(patterns, peaks, *, phases: Sequence[PhaseSpec], windows: Sequence[WindowSpec],
                   spec: FitCheckSpec = FitCheckSpec(), dpi: int = 300, font_size: float = 7.0):
    """For each chosen frame (rows) and window (columns): the data with its esd, the stored fit,
    each present component and the background, and the residual in units of the esd.

    ``patterns``: :func:`xrdpipe.open_dataset`'s (only the chosen frames are read); ``peaks``:
    :func:`xrdpipe.open_results`'s. The curves are rebuilt from the stored parameters; the
    background, which the run file does not keep, is the weighted least-squares polynomial under
    the stored peaks (at the optimum of the fit it is exactly the fitted one)."""
    if peaks is None:
        raise PlotError(f"{source(patterns)} holds no fitted peaks yet; run 'xrdpipe fit' first")
    radial, unit, wl = radial_of(patterns)
    d = _peak_arrays(peaks)
    unknown = [name for name in spec.windows if name not in {w.name for w in windows}]
    if unknown:
        raise PlotError(f"fit check: {unknown[0]!r} is not one of the [[windows]] {[w.name for w in windows]}")
    chosen = [w for w in windows if not spec.windows or w.name in spec.windows]
    if not chosen:
        raise PlotError("fit check: the experiment has no [[windows]]")
    frames = list(spec.frames) or default_fit_frames(peaks)
    n_frames = patterns.sizes["frame"]
    for f in frames:
        if f >= n_frames:
            raise PlotError(f"frame {f} is not in {source(patterns)} (frames 0 to {n_frames - 1})")
    st = states(patterns)
    phase_map = {p.name: p for p in phases}
    phase_order = list(dict.fromkeys(d["peak_phase"]))
    inst = _instrument(patterns, peaks, radial)
    inten = np.asarray(patterns["intensity"][frames].values)
    sigma = np.asarray(patterns["intensity_errors"][frames].values)
    with style(font_size):
        fig = figure(spec.width_mm, spec.height_mm, dpi)
        outer = fig.add_gridspec(len(frames), len(chosen))
        for c, w in enumerate(chosen):
            if w.name not in d["peak_window"]:
                raise PlotError(f"window {w.name!r} has not been fitted; run 'xrdpipe fit' (or 'xrdpipe run') first")
            try:
                model = WindowModel(w, phase_map, radial, unit, wl)
            except (ValueError, KeyError) as exc:
                raise PlotError(f"fit check of window {w.name!r}: {exc}") from None
            cols = [i for i, pw in enumerate(d["peak_window"]) if pw == w.name]
            for r, f in enumerate(frames):
                inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
                ax = fig.add_subplot(inner[0])
                axr = fig.add_subplot(inner[1], sharex=ax)
                y = inten[r, model.columns].astype(float)
                s = sigma[r, model.columns].astype(float)
                _fit_cell(ax, axr, model, y, s, d, f, cols, phase_order,
                          None if inst is None else (inst[0][model.columns], inst[1][model.columns]))
                if r == 0:
                    ax.set_title(window_title(w.name), pad=2)
                if c == 0:
                    ax.set_ylabel(_frame_label(f, st))
                    axr.set_ylabel("Δ/σ", labelpad=1)
                if r == len(frames) - 1:
                    axr.set_xlabel(AXIS_LABEL["tth" if unit == "2th_deg" else "q"])
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
    handles += [Line2D([], [], color=phase_colour(phases, p), lw=0.8, ls="--", label=f"{p} peak") for p in phases]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.8, columnspacing=1.2)


def _frame_label(f: int, st: States) -> str:
    label = f"frame {f}"
    if np.isfinite(st.x[f]):
        label += f", x = {st.x[f]:.3f}"
    elif np.isfinite(st.time_h[f]):
        label += f", {st.time_h[f]:.2f} h"
    return label + "\nIntensity"


def _instrument(patterns, peaks, radial: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Where each point is and the instrument's half-width there, for a phase-model fit that
    averaged its lines over what each bin averages over (``[fit] instrument``); None for point
    samples."""
    if peaks.attrs.get("instrument", "none") != "auto":
        return None
    from ..config import FitSpec
    from ..phasefit.instrument import instrument_profile

    sd = peaks.attrs.get("instrument_sd", float("nan"))
    spec = FitSpec(instrument_sd=float(sd) if np.isfinite(sd) else None)
    sd_rec, off_rec = (np.asarray(patterns[name].values, float) if name in patterns else None
                       for name in ("instrument_sd", "instrument_offset"))
    where, hw = instrument_profile(spec, radial, sd_rec, off_rec)
    return (where, hw) if hw.any() or np.any(where != radial) else None


def _fit_cell(ax, axr, model: WindowModel, y, s, d, f, cols, phase_order, inst=None) -> None:
    """One window of one frame: data, fit, background, each present component, residual.
    ``inst``: (where each point is, the instrument's half-width) for lines averaged as the phase
    model averaged them, or None."""
    x = model.x
    ok = np.isfinite(y)
    has_sigma = np.isfinite(s).any() and np.nanmax(s) > 0
    w = np.where(ok & np.isfinite(s) & (s > 0), 1 / np.where(s > 0, s, 1), 0.0) if has_sigma else ok.astype(float)
    ax.plot(x[ok], y[ok], ls="none", marker="o", ms=1.4, mfc="none", mec="0.35", mew=0.4, label="data")
    if not d["done"][f] or not d["success"][f, cols[0]]:
        msg = d["message"][f, cols[0]] or "not fitted"
        ax.text(0.5, 0.5, f"no fit: {msg[:60]}", transform=ax.transAxes, ha="center", va="center", fontsize="small")
        return
    fn, _, names = PROFILES[model.profile]
    src = {"eta": "shape", "m": "shape"}
    peaks_sum = np.zeros_like(x)
    parts = []
    for col in cols:
        if not d["present"][f, col]:
            continue
        if inst is not None and model.profile == "pseudo_voigt":
            from ..phasefit.instrument import binned_lines

            comp = binned_lines(inst[0], inst[1], d["center"][f, col], d["fwhm"][f, col], d["area"][f, col],
                                d["shape"][f, col])[0]
        else:
            comp = fn(x, *[d[src.get(name, name)][f, col] for name in names])
        peaks_sum += comp
        parts.append((d["peak_phase"][col], d["peak_hkl"][col], comp))
    basis = np.vstack([model.t ** k for k in range(model.degree + 1)]).T
    coef = np.linalg.lstsq(basis[ok] * w[ok, None], (y[ok] - peaks_sum[ok]) * w[ok], rcond=None)[0]
    bg = basis @ coef
    fit = bg + peaks_sum
    ax.plot(x, fit, color="k", lw=0.8, label="fit")
    ax.plot(x, bg, color="0.5", lw=0.6, ls=":", label="background")
    for phase, hkl, comp in parts:
        ax.plot(x, bg + comp, lw=0.7, ls="--", color=phase_colour(phase_order, phase), label=f"{phase} {hkl}")
    resid = (y - fit) / np.where(w > 0, 1 / np.where(w > 0, w, 1), np.nan) if has_sigma else y - fit
    axr.plot(x[ok], resid[ok], color="0.3", lw=0.5)
    axr.axhline(0, color="k", lw=0.4)
    ax.locator_params(axis="y", nbins=3)
    axr.locator_params(axis="y", nbins=2)


# ----------------------------------------------------------------------------------------------
# waterfall

def _waterfall_frames(patterns, spec: WaterfallSpec) -> np.ndarray:
    status = np.asarray(patterns["status"].values)
    done = np.flatnonzero(status == DONE)
    if spec.frames:
        frames = np.array(spec.frames, int)
        bad = frames[(frames >= status.size) | (status[np.clip(frames, 0, status.size - 1)] != DONE)]
        if bad.size:
            raise PlotError(f"frame {int(bad[0])} of {source(patterns)} is not an integrated frame")
        return frames
    if done.size == 0:
        raise PlotError(f"{source(patterns)} has no integrated frame")
    return done[np.unique(np.linspace(0, done.size - 1, min(spec.count, done.size)).round().astype(int))]


def plot_waterfall(patterns, *, spec: WaterfallSpec = WaterfallSpec(), dpi: int = 300, font_size: float = 7.0):
    """Chosen frames (default: ``spec.count`` spread evenly over the integrated ones) stacked
    with an offset, coloured by time, the first at the bottom. ``patterns``:
    :func:`xrdpipe.open_dataset`'s (only those frames are read)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    radial, unit, wl = radial_of(patterns)
    frames = _waterfall_frames(patterns, spec)
    lo, hi = spec.range if spec.range is not None else (radial[0], radial[-1])
    cols = np.flatnonzero((radial >= lo) & (radial <= hi))
    if cols.size < 2:
        raise PlotError(f"range [{lo:g}, {hi:g}] holds fewer than 2 points of the run's radial axis "
                        f"({radial[0]:g} to {radial[-1]:g} {unit})")
    sl = slice(int(cols[0]), int(cols[-1]) + 1)
    inten = np.asarray(patterns["intensity"][frames, sl].values)
    colour_by = np.asarray(patterns["time_s"].values, float)[frames] / 3600
    clabel = AGAINST_LABEL["time"]
    if not np.isfinite(colour_by).all():
        colour_by, clabel = frames.astype(float), "Frame"
    span = np.nanpercentile(inten, 99.5) - np.nanpercentile(inten, 1)
    offset = spec.offset if spec.offset is not None else 1.2 * span / max(len(frames) - 1, 1) * 2
    xa = to_axis(radial[sl], spec.axis, unit, wl)
    cmap = colormaps["viridis"]
    norm = Normalize(np.nanmin(colour_by), np.nanmax(colour_by) if np.nanmax(colour_by) > np.nanmin(colour_by)
                     else np.nanmin(colour_by) + 1)
    with style(font_size):
        fig = figure(spec.width_mm, spec.height_mm, dpi)
        ax = fig.subplots()
        base = np.nanpercentile(inten, 1)
        for k in range(len(frames)):
            ax.plot(xa, inten[k] - base + k * offset, lw=0.6, color=cmap(norm(colour_by[k])))
        ax.set_xlabel(axis_label(spec.axis, wl))
        ax.set_ylabel("Intensity + offset (counts)")
        ax.set_xlim(min(xa[0], xa[-1]), max(xa[0], xa[-1]))
        ax.set_yticks([])
        cbar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, pad=0.01, aspect=30)
        cbar.set_label(clabel)
    return fig


# ----------------------------------------------------------------------------------------------
# refinement: observed, calculated, difference, tick marks per phase

@dataclass(frozen=True)
class RefinedFrame:
    """What the refinement figure of one frame draws (read by
    :func:`xrdpipe.run.refinestore.read_refined_frame`)."""

    frame: int
    tth: np.ndarray              # the refined range (degrees)
    observed: np.ndarray
    calculated: np.ndarray
    background: np.ndarray
    ticks: np.ndarray            # reflection positions (degrees; NaN: none)
    tick_phase: np.ndarray       # the phase (index into ``phases``) of each tick
    phases: tuple[str, ...]
    rwp: float
    gof: float


def plot_refinement(refined: RefinedFrame, *, width_mm: float = 180.0, height_mm: float = 100.0,
                    dpi: int = 300, font_size: float = 7.0):
    """The whole-pattern refinement of one frame: observed (points), calculated and background
    (lines), the difference below, and a row of tick marks per phase, with Rwp and GOF.

    Example
    -------
    >>> from xrdpipe.run.refinestore import read_refined_frame
    >>> plot_refinement(read_refined_frame(run_file, 5))            # doctest: +SKIP
    """
    r = refined
    tth, obs, calc = r.tth, r.observed, r.calculated
    phases = list(r.phases)
    with style(font_size):
        fig = figure(width_mm, height_mm, dpi)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot(tth, obs, ls="none", marker="o", ms=1.2, mew=0, color="k", label="observed")
        top.plot(tth, calc, color="#d62728", lw=0.7, label="calculated")
        top.plot(tth, r.background, color="0.5", lw=0.5, label="background")
        span = np.nanmax(obs) - np.nanmin(obs) if np.isfinite(obs).any() else 1.0
        for p, ph in enumerate(phases):
            t = r.ticks[(r.tick_phase[:r.ticks.size] == p) & np.isfinite(r.ticks)]
            t = t[(t >= tth[0]) & (t <= tth[-1])]
            ylev = np.nanmin(obs) - (0.06 + 0.06 * p) * span
            top.plot(t, np.full(t.size, ylev), ls="none", marker="|", ms=4, mew=0.6,
                     color=phase_colour(phases, ph), label=f"{ph} reflections")
        top.set_ylabel("Intensity (counts)")
        top.legend(loc="upper right", fontsize="x-small")
        top.set_title(f"frame {r.frame}: Rwp {100 * r.rwp:.2f} %, GOF {r.gof:.3f}", pad=2)
        bottom.plot(tth, obs - calc, color="#1f77b4", lw=0.5)
        bottom.axhline(0, color="0.6", lw=0.4)
        bottom.set_ylabel("obs − calc")
        bottom.set_xlabel(AXIS_LABEL["tth"])
        bottom.set_xlim(tth[0], tth[-1])
    return fig


# ----------------------------------------------------------------------------------------------
# calibration: the calibrant image with the fitted rings

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

        fig = figure(width_mm, height + 10, dpi)
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
