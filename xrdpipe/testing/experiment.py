"""A whole synthetic experiment folder: 2D frames through a real pyFAI geometry, PONI, mask,
cycler file, experiment.toml and the truth (:func:`make_experiment`)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from .configs import fit_toml
from .scenarios import FARADAY, Scenario, phase_state, scenario_of
from .series import Difficulty, pattern_1d, peak_list


def demo_geometry(shape=(512, 512), wavelength_A: float = 0.6209):
    """The synthetic demo detector: 512 x 512 pixels of 75 µm, 130 mm away, tilted, beam off the corner."""
    import pyFAI
    from pyFAI.detectors import Detector

    det = Detector(pixel1=75e-6, pixel2=75e-6, max_shape=shape)
    return pyFAI.load({"detector": det, "dist": 0.130, "poni1": -0.004, "poni2": -0.003,
                       "rot1": 0.020, "rot2": -0.015, "rot3": 0.0, "wavelength": wavelength_A * 1e-10})


def demo_mask(shape=(512, 512), seed: int = 7) -> np.ndarray:
    """Module gaps (a horizontal and a vertical band) and a few dead pixels; True = masked."""
    mask = np.zeros(shape, bool)
    r0 = shape[0] // 2 - 4
    c0 = shape[1] // 2 - 2
    mask[r0:r0 + 8, :] = True
    mask[:, c0:c0 + 4] = True
    rng = np.random.default_rng(seed)
    mask[rng.integers(0, shape[0], 25), rng.integers(0, shape[1], 25)] = True
    return mask


@dataclass
class SyntheticExperiment:
    """Paths and truth of a synthetic experiment written by :func:`make_experiment`."""

    folder: Path
    experiment_file: Path
    frame_files: list[Path]
    poni_file: Path | None
    mask_file: Path | None
    cycler_file: Path
    truth_file: Path
    truth_peaks_file: Path
    scenario: Scenario
    times: list[tuple[datetime, datetime]]
    x: np.ndarray
    truth: list[dict] = field(default_factory=list)
    peaks: list[list[dict]] = field(default_factory=list)

    def states(self) -> list[dict[str, tuple[float, float, float]]]:
        """Per frame: ``{phase: (a, c, fraction)}`` of the phases present."""
        out: list[dict] = [{} for _ in range(len(self.x))]
        for r in self.truth:
            out[r["frame"]][r["phase"]] = (r["a"], r["c"], r["fraction"])
        return out


def _schedule(n_frames: int, n_rest: int, frac_charge: float) -> tuple[int, int]:
    """Frames spent charging and discharging after ``n_rest`` frames at open circuit."""
    n_active = n_frames - n_rest
    n_ch = max(1, int(round(frac_charge * n_active)))
    n_dis = n_active - n_ch
    return n_ch, n_dis


def _write_frames(writer, camera, sc: Scenario, xs: np.ndarray, times: list, *, period_s: float, exposure_s: float,
                  counts: float, background: float | None, difficulty: Difficulty | None,
                  rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Write every frame (the phases' state at its x, Poisson counts) and return the truth rows
    (frame, time, x, phase, a, c, fraction) and the peak rows (frame, phase, hkl, d, 2θ, area)."""
    truth_rows, peak_rows = [], []
    for i in range(len(xs)):
        states = phase_state(sc, float(xs[i]))
        peaks = peak_list(states, sc.wavelength_A, camera.tth_range, scale=counts * 3000.0, difficulty=difficulty)
        for p in peaks:
            peak_rows.append({"frame": i, **{k: p[k] for k in ("phase", "hkl", "d_A", "tth_deg", "area")}})
        for ph, a, c, frac in states:
            truth_rows.append({"frame": i, "time": (times[i][0] + (times[i][1] - times[i][0]) / 2).isoformat(),
                               "time_s": i * period_s + exposure_s / 2, "x": float(xs[i]), "phase": ph.name,
                               "a": a, "c": c, "fraction": frac})
        y1 = pattern_1d(camera.grid, peaks, background=40.0 * counts if background is None else background)
        writer.write(i, camera.grid, camera.counts(y1, rng), times[i][0])
    return truth_rows, peak_rows


def make_experiment(folder: Path | str, *, scenario: Scenario | str = "nfm", n_frames: int = 50,
                    shape: tuple[int, int] = (512, 512), frame_format: str = "h5",
                    frames_per_file: int = 25, period_s: float = 20.0, exposure_s: float | None = None,
                    n_rest: int = 3, frac_charge: float = 0.6, active_mass_mg: float = 7.2,
                    counts: float = 1.0, background: float | None = None, seed: int = 0, npt: int = 2000,
                    start: datetime = datetime(2025, 7, 2, 19, 5, 59, tzinfo=timezone(timedelta(hours=8))),
                    run_name: str | None = None, difficulty: Difficulty | None = None) -> SyntheticExperiment:
    """Write a synthetic operando experiment folder and return its truth.

    Parameters
    ----------
    folder : where to write (created)
    scenario : ``"nfm"`` (O3 <-> P3), ``"mcm"`` (P2 -> P''2) or a :class:`Scenario`
    n_frames : number of frames (the first ``n_rest`` at open circuit)
    shape : detector shape for 2D frames
    frame_format : ``"h5"`` (EIGER-like, bitshuffle-LZ4), ``"cbf"``, ``"tiff"``, ``"edf"``, or
        ``"xye"`` for 1D patterns (no detector)
    frames_per_file : frames per HDF5 stack
    period_s, exposure_s : frame period and exposure (default exposure: the whole period)
    frac_charge : share of the active frames spent charging (then discharging)
    counts : scale of the peak intensities (photon counts)
    background : background level per pixel (default ``40 * counts``: very strong peaks over a
        low background; ``counts=0.002, background=100`` looks more like a coin cell on an EIGER)
    seed : random seed (Poisson noise, dead pixels)
    difficulty : :class:`Difficulty` knobs (start-cell errors in the experiment file, overlap,
        broadening, intensities, Al lines, windows); None: the demo's settings
    """
    if int(n_frames) < 1:
        raise ValueError(f"n_frames = {n_frames}: an experiment needs at least one frame")
    sc = scenario_of(scenario)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if difficulty is not None:
        sc = difficulty.scenario(sc)
    rng = np.random.default_rng(seed)
    exposure_s = period_s if exposure_s is None else exposure_s
    run_name = run_name or f"synthetic-{sc.name}"
    cell = _Cycling(sc, n_frames, n_rest, frac_charge, period_s, active_mass_mg)
    # cycler record: starts 60 s before the first frame, ends 60 s after the last
    cyc_start = start - timedelta(seconds=60)
    cycler_file = cell.write_record(folder / "cycler.csv", cyc_start)
    begins = [start + timedelta(seconds=i * period_s) for i in range(n_frames)]
    times = [(s, s + timedelta(seconds=exposure_s)) for s in begins]
    xs = np.array([cell.x_at(i * period_s + exposure_s / 2) for i in range(n_frames)])
    camera = _Camera(sc, frame_format, shape, npt)
    writer = _FrameWriter(folder / ("raw" if camera.is_2d else "patterns"), run_name, frame_format, frames_per_file,
                          n_frames, period_s, exposure_s, shape, sc.wavelength_A)
    try:
        truth_rows, peak_rows = _write_frames(writer, camera, sc, xs, times, period_s=period_s, exposure_s=exposure_s,
                                              counts=counts, background=background, difficulty=difficulty, rng=rng)
    finally:
        writer.close()
    poni_file, mask_file = camera.write_calibration(folder)
    truth_file, truth_peaks_file = _write_truth(folder, truth_rows, peak_rows)
    exp_file = folder / "experiment.toml"
    exp_file.write_text(_experiment_toml(run_name, sc, frame_format, start, period_s, exposure_s,
                                         npt, active_mass_mg, cyc_start) + fit_toml(sc, difficulty))
    peaks_by_frame: list[list[dict]] = [[] for _ in range(n_frames)]
    for r in peak_rows:
        peaks_by_frame[r["frame"]].append(r)
    return SyntheticExperiment(folder, exp_file, writer.files, poni_file, mask_file, cycler_file, truth_file,
                               truth_peaks_file, sc, times, xs, truth_rows, peaks_by_frame)


class _Cycling:
    """Constant current: rest at x0 for ``n_rest`` frames, charge to x_min, then discharge."""

    def __init__(self, sc: Scenario, n_frames: int, n_rest: int, frac_charge: float, period_s: float,
                 active_mass_mg: float):
        n_ch, n_dis = _schedule(n_frames, n_rest, frac_charge)
        self.sc, self.n_frames, self.period_s = sc, n_frames, period_s
        self.t_rest, self.t_ch, self.t_dis = n_rest * period_s, n_ch * period_s, n_dis * period_s
        self.dxdt = (sc.x0 - sc.x_min) / self.t_ch  # per second
        moles = active_mass_mg * 1e-3 / sc.molar_mass
        self.current_mA = self.dxdt * moles * FARADAY * 1e3

    def x_at(self, t: float) -> float:
        sc = self.sc
        if t <= self.t_rest:
            return sc.x0
        if t <= self.t_rest + self.t_ch:
            return sc.x0 - self.dxdt * (t - self.t_rest)
        return sc.x_min + self.dxdt * min(t - self.t_rest - self.t_ch, self.t_dis)

    def current_at(self, t: float) -> float:
        if t < self.t_rest:
            return 0.0
        if t < self.t_rest + self.t_ch:
            return self.current_mA
        if t < self.t_rest + self.t_ch + self.t_dis:
            return -self.current_mA
        return 0.0

    def write_record(self, path: Path, cyc_start: datetime) -> Path:
        """The cycler's CSV (date-time, time, voltage, current every 2 s) from ``cyc_start``, 60 s
        before the first frame, to 60 s after the last."""
        t_end = self.n_frames * self.period_s + 60
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["datetime", "time/s", "Ewe/V", "I/mA"])
            for tc in np.arange(0.0, t_end + 60 + 1e-9, 2.0):
                t = tc - 60.0
                i = self.current_at(t)
                x = self.x_at(max(t, 0.0))
                v = self.sc.voltage(x, charging=i > 0) if i != 0 else self.sc.voltage(x, True) - 0.03
                w.writerow([(cyc_start + timedelta(seconds=float(tc))).isoformat(), f"{tc:.1f}", f"{v:.5f}",
                            f"{i:.6f}"])
        return path


class PixelAverage:
    """The mean of a pattern over each pixel's area: what a real pixel records.

    Every pixel is cut into ``n_sub`` x ``n_sub`` sub-pixels whose 2θ is computed once by pyFAI
    (``ai.tth`` at fractional pixel coordinates); a pattern given on a uniform 2θ ``grid``
    (degrees) is interpolated linearly at the sub-pixels and averaged over each pixel, both
    folded once into a sparse matrix (pixel x grid point), so a frame costs one product.

    Example
    -------
    >>> average = PixelAverage(demo_geometry(), (512, 512), np.arange(0.0, 30.0, 0.0005))  # doctest: +SKIP
    >>> image = average(y)               # (512, 512), the mean of y over each pixel   # doctest: +SKIP
    """

    def __init__(self, ai, shape: tuple[int, int], grid: np.ndarray, n_sub: int = 4):
        import scipy.sparse as sp

        rows, cols = (int(s) for s in shape)
        step = (float(grid[-1]) - float(grid[0])) / (len(grid) - 1)
        if not np.allclose(np.diff(grid), step, rtol=1e-6, atol=0):
            raise ValueError("PixelAverage needs a uniform 2θ grid")
        self.shape, self.n_sub, self.size = (rows, cols), int(n_sub), len(grid)
        offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5        # sub-pixel centres about the pixel's centre
        d1 = (np.arange(rows)[:, None] + offsets[None, :]).ravel()
        d2 = (np.arange(cols)[:, None] + offsets[None, :]).ravel()
        tth = np.degrees(ai.tth(*np.meshgrid(d1, d2, indexing="ij")))       # (rows n, cols n)
        u = np.clip((tth - float(grid[0])) / step, 0.0, len(grid) - 1.0).ravel()
        index = np.minimum(u.astype(np.int32), len(grid) - 2)
        frac = u - index
        pixel = np.broadcast_to(np.arange(rows * cols, dtype=np.int32).reshape(rows, 1, cols, 1),
                                (rows, n_sub, cols, n_sub)).ravel()
        share = 1.0 / n_sub**2
        self._matrix = sp.csr_matrix((np.concatenate([(1.0 - frac) * share, frac * share]),
                                      (np.concatenate([pixel, pixel]), np.concatenate([index, index + 1]))),
                                     shape=(rows * cols, len(grid)))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """The mean of ``y`` (on the grid) over each pixel, shape (rows, cols), float64."""
        y = np.asarray(y, np.float64)
        if y.shape != (self.size,):
            raise ValueError(f"the pattern has shape {y.shape}, expected ({self.size},) like the grid")
        return (self._matrix @ y).reshape(self.shape)


class _Camera:
    """What turns a 1D pattern into counts: the demo detector (geometry, polarization and solid
    angle, EIGER-like gaps) for 2D frames, or the 2θ grid alone for 1D patterns.

    A 2D pixel records the pattern averaged over its area (:class:`PixelAverage`, 4 x 4
    sub-pixels), times its polarization and solid angle, with Poisson noise; a 1D pattern is a
    point sample of the pattern at each 2θ of its grid, with Poisson noise."""

    def __init__(self, sc: Scenario, frame_format: str, shape: tuple[int, int], npt: int, n_sub: int = 4):
        self.is_2d = frame_format != "xye"
        if self.is_2d:
            self.ai = demo_geometry(shape, sc.wavelength_A)
            self.tth_px = self.ai.center_array(shape, unit="2th_deg")
            self.weight = (self.ai.polarization(shape, 0.99) * self.ai.solidAngleArray(shape)).astype(np.float64)
            self.tth_range = (float(np.floor(self.tth_px.min())), float(np.ceil(self.tth_px.max())))
            self.grid = np.arange(self.tth_range[0] - 0.5, self.tth_range[1] + 0.5, 0.0005)
            self.mask = demo_mask(shape, seed=7)
            self.average = PixelAverage(self.ai, shape, self.grid, n_sub)
        else:
            self.tth_range = sc.tth_range
            self.grid = np.linspace(self.tth_range[0], self.tth_range[1], npt)

    def expected(self, y1: np.ndarray) -> np.ndarray:
        """The expected counts of the pattern ``y1`` (on :attr:`grid`): 1D, the pattern itself
        at each 2θ; 2D, each pixel's mean of the pattern over its area times its weight."""
        if not self.is_2d:
            return np.clip(y1, 0, None)
        return np.clip(self.average(y1), 0, None) * self.weight

    def counts(self, y1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson counts of the pattern ``y1`` (on :attr:`grid`): 1D, or a 2D image whose
        gaps hold the EIGER's flag value (and are masked)."""
        if not self.is_2d:
            return rng.poisson(self.expected(y1)).astype(float)
        img = rng.poisson(self.expected(y1)).astype(np.uint32)
        img[self.mask] = np.iinfo(np.uint32).max  # like an EIGER: flagged, and masked
        return img

    def write_calibration(self, folder: Path) -> tuple[Path | None, Path | None]:
        """demo.poni and mask.edf for 2D frames; (None, None) for 1D patterns."""
        import fabio

        if not self.is_2d:
            return None, None
        poni_file = folder / "demo.poni"
        poni_file.unlink(missing_ok=True)           # (pyFAI adds to a PONI file that exists)
        self.ai.write(str(poni_file))
        mask_file = folder / "mask.edf"
        fabio.edfimage.EdfImage(data=self.mask.astype(np.int8),
                                header={"title": "xrdpipe demo mask: 1 = masked"}).write(str(mask_file))
        return poni_file, mask_file


class _FrameWriter:
    """Frames into files: EIGER-like HDF5 stacks of ``frames_per_file`` (bitshuffle-LZ4), one
    CBF/TIFF/EDF file a frame, or one .xye a 1D pattern. ``files`` lists what was written."""

    def __init__(self, raw: Path, run_name: str, frame_format: str, frames_per_file: int, n_frames: int,
                 period_s: float, exposure_s: float, shape: tuple[int, int], wavelength_A: float):
        raw.mkdir(exist_ok=True)
        self.raw, self.run_name, self.format = raw, run_name, frame_format
        self.frames_per_file, self.n_frames = frames_per_file, n_frames
        self.period_s, self.exposure_s, self.shape, self.wavelength_A = period_s, exposure_s, shape, wavelength_A
        self.files: list[Path] = []
        self._h5 = None
        self._ds = None

    def write(self, i: int, grid: np.ndarray, y: np.ndarray, start: datetime) -> None:
        if self.format == "xye":
            path = self.raw / f"{self.run_name}_{i:05d}.xye"
            np.savetxt(path, np.column_stack([grid, y, np.sqrt(np.maximum(y, 1))]), fmt="%.6f",
                       header=f"synthetic pattern {i}, 2theta_deg counts esd, lambda={self.wavelength_A}")
            self.files.append(path)
        elif self.format == "h5":
            j = i % self.frames_per_file
            if j == 0:
                self._open_stack(i, start)
            self._ds[j] = y
        else:
            self.files.append(_write_fabio(self.raw, i, y, start, self.exposure_s, self.format, self.run_name))

    def _open_stack(self, i: int, start: datetime) -> None:
        import h5py
        import hdf5plugin

        self.close()
        n_here = min(self.frames_per_file, self.n_frames - i)
        path = self.raw / f"{self.run_name}_data_{i // self.frames_per_file + 1:06d}.h5"
        self._h5 = h5py.File(path, "w")
        _eiger_header(self._h5, start, self.period_s, self.exposure_s, self.shape, self.wavelength_A)
        self._ds = self._h5.create_dataset("/entry/data/data", shape=(n_here, *self.shape), dtype=np.uint32,
                                           chunks=(1, *self.shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        self._ds.attrs["units"] = "counts"
        self.files.append(path)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None


def _write_truth(folder: Path, truth_rows: list[dict], peak_rows: list[dict]) -> tuple[Path, Path]:
    """truth.csv (frame, time, x, phase, a, c, fraction) and truth_peaks.csv."""
    truth_file = folder / "truth.csv"
    with open(truth_file, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["frame", "time", "time_s", "x", "phase", "a", "c", "fraction"])
        w.writeheader()
        for r in truth_rows:
            w.writerow({**r, "x": f"{r['x']:.6f}", "a": f"{r['a']:.6f}", "c": f"{r['c']:.6f}",
                        "fraction": f"{r['fraction']:.6f}"})
    truth_peaks_file = folder / "truth_peaks.csv"
    with open(truth_peaks_file, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["frame", "phase", "hkl", "d_A", "tth_deg", "area"])
        w.writeheader()
        w.writerows(peak_rows)
    return truth_file, truth_peaks_file


def _eiger_header(h5, start: datetime, period_s: float, exposure_s: float, shape, wavelength_A: float) -> None:
    entry = h5.create_group("entry")
    entry.attrs["NX_class"] = "NXentry"
    data = entry.create_group("data")
    data.attrs["NX_class"] = "NXdata"
    det = entry.create_group("instrument/detector")
    det.attrs["NX_class"] = "NXdetector"
    det["count_time"] = exposure_s
    det["frame_time"] = period_s
    det["x_pixel_size"] = 75e-6
    det["y_pixel_size"] = 75e-6
    det["description"] = "synthetic EIGER-like detector (xrdpipe.testing)"
    spec = det.create_group("detectorSpecific")
    spec["data_collection_date"] = start.isoformat(timespec="milliseconds")
    spec["x_pixels_in_detector"] = shape[1]
    spec["y_pixels_in_detector"] = shape[0]
    beam = entry.create_group("instrument/beam")
    beam["incident_wavelength"] = wavelength_A
    beam["incident_wavelength"].attrs["units"] = "angstrom"


def _write_fabio(folder: Path, i: int, img: np.ndarray, start: datetime, exposure_s: float, fmt: str,
                 run_name: str) -> Path:
    import fabio

    stamp = start.isoformat(timespec="milliseconds")
    if fmt == "cbf":
        path = folder / f"{run_name}_{i:05d}.cbf"
        header = {"_array_data.header_convention": "PILATUS_1.2",
                  "_array_data.header_contents": f"# Detector: synthetic\r\n# {stamp}\r\n# Exposure_time {exposure_s:.6f} s\r\n"}
        fabio.cbfimage.CbfImage(data=img.astype(np.int32), header=header).write(str(path))
    elif fmt == "edf":
        path = folder / f"{run_name}_{i:05d}.edf"
        fabio.edfimage.EdfImage(data=img, header={"time": stamp, "count_time": str(exposure_s)}).write(str(path))
    elif fmt == "tiff":
        path = folder / f"{run_name}_{i:05d}.tif"
        fabio.tifimage.TifImage(data=img).write(str(path))
    else:
        raise ValueError(f"unknown frame_format {fmt!r}; expected h5, cbf, edf, tiff or xye")
    return path


#: Fit windows of the synthetic scenarios: (name, range in 2θ, reflection).
def _experiment_toml(run_name, sc, frame_format, start, period_s, exposure_s, npt, active_mass_mg, cyc_start) -> str:
    head = f"""# Synthetic operando experiment written by xrdpipe.testing ({sc.name} scenario).
# Truth: truth.csv (frame, time, x, phase, a, c, fraction) and truth_peaks.csv.
schema_version = 1

[run]
name = "{run_name}"
output = "results"

# The cycler record: time since its start, voltage and current (constant-current cycling).
[electrochemistry]
file = "cycler.csv"
format = "csv"
columns = {{ time = "time/s", voltage = "Ewe/V", current = "I/mA" }}
start = "{cyc_start.isoformat()}"
timezone = "Asia/Shanghai"
active_mass_mg = {active_mass_mg}
formula = "{sc.formula}"
x0 = {sc.x0}
"""
    if frame_format == "xye":
        return head + f"""
[patterns]
files = "patterns/*.xye"
radial_unit = "2th_deg"
wavelength_A = {sc.wavelength_A}
times = {{ start = "{start.isoformat()}", period_s = {period_s}, exposure_s = {exposure_s} }}
"""
    suffix = {"h5": "h5", "cbf": "cbf", "edf": "edf", "tiff": "tif"}[frame_format]
    times = '"header"' if frame_format in ("h5", "cbf", "edf") else (
        f'{{ start = "{start.isoformat()}", period_s = {period_s}, exposure_s = {exposure_s} }}')
    dataset = 'dataset = "/entry/data/data"\n' if frame_format == "h5" else ""
    return head + f"""
[frames]
files = "raw/*.{suffix}"
{dataset}times = {times}

[calibration]
poni = "demo.poni"
mask = "mask.edf"

[integration]
npt = {npt}
unit = "2th_deg"
polarization_factor = 0.99
error_model = "poisson"
splitting = "full"
"""


