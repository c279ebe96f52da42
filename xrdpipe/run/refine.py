"""The refinement stage: ``[refinement]`` of an experiment, refined frame after frame.

:func:`build_model` turns ``[refinement]`` (and ``[[phases]]`` for space groups and starting
cells) into a :class:`~xrdpipe.refine.RefinementModel`; :func:`refine_experiment` refines
every integrated frame in order, each from the last successful one, into ``/entry/refinement``
of the run file and ``<output>/refine.csv`` (one row per frame and phase). A frame that fails
is recorded (status and message) and the next one starts from the last success; an interrupted
run resumes where it stopped. :func:`compare_models` refines ``[[refinement.models]]`` side by
side on one frame.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import ConfigError, Experiment, OccupancySpec, RefineAtomSpec, RefineModelSpec
from ..crystallography import crystal_system, tth_from_q
from ..errors import StoreError
from ..refine import (
    OccupancyConstraint,
    PhaseModel,
    RefinementError,
    RefinementModel,
    RefinementResult,
    Refiner,
)
from ..refine.structures import Atom, Structure, StructureError, read_cif, template
from ..safeio import atomic_output
from .groups import FrameElectrochemistry, has_group, read_electrochemistry, read_table
from .lattice import lattice_experiment
from .paths import LATTICE, REFINEMENT, RunPaths
from .refinestore import FLAGGED, OK, STATUS, RefineStore
from .stage import stage, takes_experiment
from .store import DONE, RunInfo, read_pattern_block, read_run_info

__all__ = ["build_model", "refine_experiment", "compare_models", "RefineSummary", "REFINE_COLUMNS",
           "write_refine_csv"]

#: Columns of ``refine.csv`` (then one value and one esd column per structural parameter).
REFINE_COLUMNS = ("frame", "time_s", "voltage_V", "x", "phase", "status", "message", "rwp", "rexp", "gof",
                  "n_iter", "a_A", "a_err_A", "b_A", "b_err_A", "c_A", "c_err_A", "beta_deg", "beta_err_deg",
                  "volume_A3", "volume_err_A3", "weight_fraction", "weight_fraction_err", "scale", "scale_err",
                  "U", "V", "W", "X", "Y", "zero_deg", "zero_err_deg", "displacement_deg", "displacement_err_deg")
_FORMULA_UNITS = {"P2": 2, "O3": 3, "P3": 3}
_DEFAULT_REFINE = {"P2": ["z:O"], "O3": ["z:O"], "P3": ["z:O1,-O2"]}


# ----------------------------------------------------------------------------------------------
# the model from the experiment file

def build_model(exp: Experiment, *, model: str | None = None, info: RunInfo | None = None) -> RefinementModel:
    """The refinement of ``exp`` (``model``: the name of a ``[[refinement.models]]`` entry to
    apply to its phase; ``info``: the run file's :func:`~xrdpipe.run.store.read_run_info`, read
    here when not given, for the wavelength)."""
    ref = exp.refinement
    where = str(exp.source or "experiment")
    if ref is None:
        raise ConfigError(where, [("refinement", "no [refinement] section; add one (see the README)")])
    alt: RefineModelSpec | None = None
    if model is not None:
        hits = [m for m in ref.models if m.name == model]
        if not hits:
            raise ConfigError(where, [("refinement.models", f"no model named {model!r} "
                                       f"(models: {', '.join(m.name for m in ref.models) or 'none'})")])
        alt = hits[0]
    phases = {p.name: p for p in exp.phases}
    out = []
    for i, rp in enumerate(ref.phases):
        ph = phases[rp.name]
        kind = ph.structure_kind
        sites = list(rp.sites) + (list(alt.sites) if alt is not None and alt.phase == rp.name else [])
        occupancy = list(rp.occupancy) + (list(alt.occupancy) if alt is not None and alt.phase == rp.name else [])
        refine = rp.refine
        if alt is not None and alt.phase == rp.name and alt.refine is not None:
            refine = alt.refine
        try:
            st = _structure(exp, rp, ph, sites)
        except StructureError as exc:
            raise ConfigError(where, [(f"refinement.phases.{i}.structure", str(exc))]) from None
        if refine is None:
            refine = _DEFAULT_REFINE.get(kind, []) if rp.structure == "template" else []
        z = rp.formula_units or _FORMULA_UNITS.get(kind)
        cons = [_constraint(c, z, where, i) for c in occupancy]
        profile = {"U": 0.0, "V": 0.0, "W": 2e-4, "X": 0.0, "Y": 0.01, **rp.profile}
        computed = ref.method == "rietveld" and not rp.lebail
        out.append(PhaseModel(rp.name, st, refine=tuple(refine) if computed else (),
                              constraints=tuple(cons) if computed else (), profile=profile, lebail=rp.lebail,
                              refine_profile=tuple(rp.refine_profile), search=dict(getattr(ph, "search", {}) or {})))
    info = info or _run_info(exp)
    return RefinementModel(out, wavelength_A=float(info.wavelength_A), method=ref.method,
                           background_terms=ref.background_terms, correction=ref.correction,
                           asymmetry=ref.asymmetry, polarization=ref.polarization, max_iter=ref.max_iter,
                           strategy=ref.strategy, gof_max=ref.gof_max, search=ref.search)


def _constraint(c: OccupancySpec, z: int | None, where: str, i: int) -> OccupancyConstraint:
    if c.total is not None and z is None:
        raise ConfigError(where, [(f"refinement.phases.{i}.formula_units",
                                   "an occupancy total per formula unit needs formula_units (Z) for this phase")])
    return OccupancyConstraint(tuple(c.atoms), None if c.total is None else c.total * z)


def _structure(exp: Experiment, rp, ph, sites: list[RefineAtomSpec]) -> Structure:
    extra = [Atom(s.label, s.element, tuple(s.xyz), s.occupancy, s.b_iso) for s in sites]
    path = exp.structure_file(rp.structure)
    if path is not None:
        st = read_cif(path)
        return st.with_atoms(list(st.atoms) + extra)
    kind = ph.structure_kind
    if kind in _FORMULA_UNITS:
        return template(kind, a=ph.a, c=ph.c, z_o=ph.z_o, composition=rp.composition, na=rp.na,
                        b_iso=rp.b_iso, extra=extra)
    return Structure(ph.space_group, tuple(float(v) for v in ph.cell), tuple(extra), name=ph.name)


def _run_info(exp: Experiment) -> RunInfo:
    """The run file's axis, wavelength and frame status; a clear error before integration."""

    where = str(exp.source or "experiment")
    if not Path(exp.run.run_file).exists():
        raise ConfigError(where, [("refinement", f"no run file {exp.run.run_file} yet; run 'xrdpipe integrate' first")])
    try:
        info = read_run_info(exp.run.run_file)
    except StoreError as exc:
        raise ConfigError(where, [("refinement", str(exc))]) from None
    if not info.wavelength_A:
        raise ConfigError(where, [(
            "refinement", f"the run file {exp.run.run_file} has no wavelength; refinement needs one "
                          "(give [patterns] wavelength_A, or a PONI with the wavelength)")])
    return info


# ----------------------------------------------------------------------------------------------
# the sequential stage

@dataclass
class RefineSummary:
    """What ``xrdpipe refine`` did."""

    run_file: Path
    csv_file: Path | None
    method: str
    frames: int = 0
    refined: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    flagged: dict[int, str] = field(default_factory=dict)
    outliers: list[int] = field(default_factory=list)
    seconds: float = 0.0
    last: str = ""
    lattice_file: Path | None = None

    def __str__(self) -> str:
        per = f", {self.seconds / self.refined:.3f} s per frame" if self.refined else ""
        lines = [f"refined {self.refined} frame(s) ({self.method}) in {self.seconds:.1f} s{per}; "
                 f"{self.skipped} already done; {len(self.failed)} failed"
                 + (f"; {len(self.flagged)} flagged" if self.flagged else "")]
        for frame, msg in list(self.failed.items())[:5]:
            lines.append(f"  frame {frame}: {msg}")
        for frame, msg in list(self.flagged.items())[:3]:
            lines.append(f"  frame {frame} (flagged): {msg}")
        if self.outliers:
            lines.append(f"  Rwp outliers (flagged): frames {', '.join(map(str, self.outliers[:10]))}")
        if self.last:
            lines.append("last frame: " + self.last.replace("\n", "\n  "))
        if self.csv_file:
            lines.append(f"results: {self.csv_file}")
        if self.lattice_file:
            lines.append(f"lattice: {self.lattice_file}" + ("  (phase fractions: the weight fractions where refined)"
                                                             if self.method == "rietveld" else "  (updated)"))
        return "\n".join(lines)


def _grid(exp: Experiment, info: RunInfo) -> tuple[np.ndarray, slice]:
    """The run's radial axis in 2θ and the columns of the refined range."""
    radial, unit = np.asarray(info.radial, float), info.unit
    tth = radial if unit == "2th_deg" else tth_from_q(radial, info.wavelength_A)
    rng = exp.refinement.range
    ranges = list(exp.refinement.ranges) or [rng if rng is not None else (radial[0], radial[-1])]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    cols = np.flatnonzero((radial >= lo) & (radial <= hi))
    if cols.size < 20:
        raise ConfigError(str(exp.source or "experiment"), [(
            "refinement.range", f"{[lo, hi]} holds {cols.size} points of the run's axis "
                                f"({radial[0]:g} to {radial[-1]:g} {unit}); 20 at least are needed")])
    return tth, slice(int(cols[0]), int(cols[-1]) + 1)


def _kept(exp: Experiment, info: RunInfo, cols: slice) -> np.ndarray:
    """Which points of the refined columns lie inside one of ``ranges`` and outside ``excluded``."""
    radial = np.asarray(info.radial, float)[cols]
    ref = exp.refinement
    keep = np.ones(radial.size, bool)
    if ref.ranges:
        keep = np.zeros(radial.size, bool)
        for lo, hi in ref.ranges:
            keep |= (radial >= lo) & (radial <= hi)
    for lo, hi in ref.excluded:
        keep &= ~((radial >= lo) & (radial <= hi))
    return keep


def _fingerprint(exp: Experiment, info: RunInfo) -> str:
    return json.dumps({"xrdpipe": __version__, "refinement": exp.refinement.model_dump(mode="json"),
                       "phases": [p.model_dump(mode="json") for p in exp.phases],
                       "patterns": info.fingerprint}, sort_keys=True)


@takes_experiment
def refine_experiment(exp: Experiment, *, progress: bool = True, restart: bool = False,
                      frames: tuple[int, int] | None = None, update_lattice: bool = True) -> RefineSummary:
    """Refine every integrated frame of the run (``[refinement] frames`` or ``frames``: first
    and last), in order, each from the last successful one; results in ``/entry/refinement``
    and ``<output>/refine.csv``. Frames already refined with the same settings are kept. With
    ``update_lattice`` (and a lattice table in the run file) the lattice is recomputed, so that
    its phase fractions take the new weight fractions (``[lattice] fractions``)."""
    t0 = time.perf_counter()
    info = _run_info(exp)
    model = build_model(exp, info=info)
    tth, cols = _grid(exp, info)
    try:
        refiner = Refiner(model, tth[cols])
    except (RefinementError, StructureError) as exc:
        raise ConfigError(str(exp.source or "experiment"), [("refinement", str(exc))]) from None
    n = info.frame_count
    todo_all = _rows(exp, info, frames)
    summary = RefineSummary(exp.run.run_file, None, model.method, frames=int(todo_all.size))
    offsets = refiner.calc.offsets
    with stage(exp, "refine", progress=progress, started=t0, summary=summary) as st:
        with RefineStore.open(exp.run.run_file, n=n, names=refiner.names, columns=cols,
                              tick_phase=np.repeat(np.arange(offsets.size - 1), np.diff(offsets)),
                              phases=[p.name for p in model.phases], fingerprint=_fingerprint(exp, info),
                              restart=restart, tth=tth[cols]) as store:
            todo = todo_all[~store.done()[todo_all]]
            summary.skipped = int(todo_all.size - todo.size)
            _refine_rows(exp, refiner, store, todo, cols, _kept(exp, info, cols), summary, st.bar(int(todo.size)))
            summary.outliers = store.flag_outliers(exp.refinement.rwp_outlier)
        summary.csv_file = write_refine_csv(exp)
    if update_lattice and exp.phases and exp.lattice.fractions != "peaks" and has_group(exp.run.run_file, LATTICE):
        lattice_experiment(exp)
        summary.lattice_file = RunPaths.of(exp).lattice_csv
    return summary


def _rows(exp: Experiment, info: RunInfo, frames: tuple[int, int] | None) -> np.ndarray:
    """The integrated frames to refine: ``frames`` (first, last), else ``[refinement] frames``, else all."""
    n = info.frame_count
    if frames is not None and not 0 <= frames[0] <= frames[1] < n:
        raise StoreError(f"{exp.run.run_file} has frames 0 to {n - 1}; there are no frames {frames[0]} to "
                         f"{frames[1]} to refine")
    first, last = frames or exp.refinement.frames or (0, n - 1)
    return np.flatnonzero((info.status == DONE) & (np.arange(n) >= first) & (np.arange(n) <= last))


def _refine_rows(exp: Experiment, refiner: Refiner, store: RefineStore, todo: np.ndarray, cols: slice,
                 keep: np.ndarray, summary: RefineSummary, bar) -> None:
    """Refine ``todo`` in order, each frame from the last successful one (a failure is recorded
    and the next frame starts from the last success), 128 patterns read at a time."""
    calc = refiner.calc
    trend = calc.is_cell if calc.any_extracted and not calc.pawley else None     # as Refiner.refine keeps it
    prev, prev_row = store.last_success(before=int(todo[0]) if todo.size else store.done().size, is_cell=trend)
    for a in range(0, todo.size, 128):
        block = todo[a:a + 128]
        inten, sigma = read_pattern_block(exp.run.run_file, rows=block, columns=cols)
        inten = np.where(keep, inten, np.nan)
        for row, y, s in zip(block, inten, sigma):
            s = None if not np.isfinite(s).any() else s
            try:
                res = _refine_frame(refiner, y, s, prev, prev_row, exp.refinement.gof_jump)
            except (RefinementError, np.linalg.LinAlgError, FloatingPointError, ValueError) as exc:
                store.write_failure(int(row), str(exc))
                summary.failed[int(row)] = str(exc)
            else:
                store.write(int(row), res)
                prev, prev_row = res, int(row)
                summary.last = res.table()
                if res.status == "flagged":
                    summary.flagged[int(row)] = res.message
            summary.refined += 1
            bar.update(1)


def _refine_frame(refiner: Refiner, y, sigma, prev: RefinementResult | None, prev_row: int | None,
                  gof_jump: float) -> RefinementResult:
    """One frame from the last good one. Where that result is not ``ok`` or its GOF jumps above
    ``gof_jump`` times the last good one's (a fit that lost its way), the frame is refined again
    from the configured start and a cell search (:meth:`Refiner.refine`), the better kept. A
    result that is still ``failed`` or above ``gof_jump`` raises (the frame is recorded failed,
    with the reason); ``flagged`` results are kept with their reason."""
    limit = None if prev is None or not np.isfinite(prev.gof) else gof_jump * prev.gof
    res = refiner.refine(y, sigma, start=prev, gof_limit=limit)
    if limit is not None and not (np.isfinite(res.gof) and res.gof <= limit):
        raise RefinementError(
            f"diverged: GOF {res.gof:.3g} against {prev.gof:.3g} in frame {prev_row}, the last good one, "
            f"also when refined from the start values and a cell search ([refinement] gof_jump = {gof_jump:g}); "
            f"a change too large for one frame, or a phase the model lacks")
    if res.status == "failed":
        raise RefinementError(res.message or f"GOF {res.gof}")
    return res


def write_refine_csv(exp: Experiment) -> Path | None:
    """``<output>/refine.csv``: one row per refined frame and phase (see :data:`REFINE_COLUMNS`)."""
    d = read_table(exp.run.run_file, REFINEMENT, names=(
        "values", "esds", "refined", "status", "message", "rwp", "rexp", "gof", "n_iter", "parameter", "phase",
        "weight_fraction", "weight_fraction_err", "absent"))
    if d is None:
        return None
    absent = d.get("absent")    # (None in a run file refined before absent phases were recorded)
    info = read_run_info(exp.run.run_file)
    ec = read_electrochemistry(exp.run.run_file, names=("x", "voltage_V"))
    names = list(d["parameter"])
    phases = list(d["phase"])
    specs = {p.name: p for p in exp.phases}
    systems = {ph: crystal_system(specs[ph].space_group) if ph in specs else "hexagonal" for ph in phases}
    struct_cols: list[str] = []
    for nm in names:
        ph, _, rest = nm.partition(".")
        if ph in phases and ":" in rest and rest not in struct_cols:
            struct_cols.append(rest)
    header = list(REFINE_COLUMNS) + [c for s in struct_cols for c in (s, s + "_err")]
    path = RunPaths.of(exp).refine_csv
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(_csv_rows(d, absent, info.time_s, ec, systems, struct_cols))
    return path


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.8g}"


def _csv_rows(d: dict, absent, time_s: np.ndarray, ec: FrameElectrochemistry | None, systems: dict[str, str], struct_cols: list[str]):
    """The rows of refine.csv: one per refined frame and phase (values and esds; none for a frame
    that failed, no cell for a phase absent from it)."""
    idx = {nm: i for i, nm in enumerate(d["parameter"])}
    fmt = _fmt
    for r in np.flatnonzero(d["status"] > 0):
        vals, esds = d["values"][r], d["esds"][r]
        ok = d["status"][r] in (OK, FLAGGED)

        def get(name, err=False):
            i = idx.get(name)
            if i is None or not ok:
                return None
            v = (esds if err else vals)[i]
            return float(v) if (not err or d["refined"][i]) else None

        for p, ph in enumerate(d["phase"]):
            gone = absent is not None and bool(absent[r, p])     # absent: its cell is not determined
            cell = {k: None if gone else get(f"{ph}.{k}") for k in ("a", "b", "c", "beta")}
            cerr = {k: None if gone else get(f"{ph}.{k}", True) for k in ("a", "b", "c", "beta")}
            vol, verr = _volume(systems[ph], cell, cerr)
            row = [int(r), fmt(float(time_s[r])), fmt(float(ec.voltage_V[r]) if ec is not None and ec.voltage_V is not None else None),
                   fmt(float(ec.x[r]) if ec is not None and ec.x is not None else None), ph, STATUS.get(int(d["status"][r]), "failed"), d["message"][r],
                   fmt(float(d["rwp"][r])), fmt(float(d["rexp"][r])), fmt(float(d["gof"][r])), int(d["n_iter"][r]),
                   fmt(cell["a"]), fmt(cerr["a"]), fmt(cell["b"]), fmt(cerr["b"]), fmt(cell["c"]), fmt(cerr["c"]),
                   fmt(cell["beta"]), fmt(cerr["beta"]), fmt(vol), fmt(verr),
                   fmt(float(d["weight_fraction"][r, p]) if ok else None),
                   fmt(float(d["weight_fraction_err"][r, p]) if ok else None),
                   fmt(get(f"{ph}.scale")), fmt(get(f"{ph}.scale", True)),
                   *[fmt(get(f"{ph}.{k}")) for k in "UVWXY"],
                   fmt(get("zero")), fmt(get("zero", True)), fmt(get("displacement")), fmt(get("displacement", True))]
            for s in struct_cols:
                row += [fmt(get(f"{ph}.{s}")), fmt(get(f"{ph}.{s}", True))]
            yield row


def _volume(system: str, cell: dict, err: dict) -> tuple[float | None, float | None]:
    """Cell volume and its esd (esds of the cell parameters taken as independent)."""
    a, c = cell.get("a"), cell.get("c")
    if a is None or c is None:
        return None, None
    b = cell.get("b") or a
    if system == "hexagonal":
        v = math.sqrt(3) / 2 * a * a * c
        parts = [2 * v / a * (err.get("a") or 0.0), v / c * (err.get("c") or 0.0)]
    elif system == "orthorhombic":
        v = a * b * c
        parts = [v / a * (err.get("a") or 0.0), v / b * (err.get("b") or 0.0), v / c * (err.get("c") or 0.0)]
    else:
        beta = math.radians(cell.get("beta") or 90.0)
        v = a * b * c * math.sin(beta)
        parts = [v / a * (err.get("a") or 0.0), v / b * (err.get("b") or 0.0), v / c * (err.get("c") or 0.0),
                 v / math.tan(beta) * math.radians(err.get("beta") or 0.0)]
    return v, math.sqrt(sum(x * x for x in parts))




# ----------------------------------------------------------------------------------------------
# model comparison

def compare_models(exp: Experiment, frame: int | None = None) -> tuple[int, list[tuple[str, RefinementResult]], Path]:
    """Refine the base model and every ``[[refinement.models]]`` entry on one frame (default:
    the first integrated frame of the refined range); returns the frame, ``(name, result)``
    pairs and ``<output>/refine_compare.csv`` (statistics and parameters side by side)."""
    info = _run_info(exp)
    tth, cols = _grid(exp, info)
    status = info.status
    if frame is None:
        lo = (exp.refinement.frames or (0, status.size - 1))[0]
        ok = np.flatnonzero((status == DONE) & (np.arange(status.size) >= lo))
        if not ok.size:
            raise ConfigError(str(exp.source or "experiment"), [("refinement", "no integrated frame to refine")])
        frame = int(ok[0])
    if not 0 <= frame < status.size or status[frame] != DONE:
        raise ConfigError(str(exp.source or "experiment"), [(
            "refinement", f"frame {frame} is not an integrated frame of {exp.run.run_file} (0 to {status.size - 1})")])
    y, s = read_pattern_block(exp.run.run_file, rows=[frame], columns=cols)
    sig = s[0] if np.isfinite(s[0]).any() else None
    results = []
    for name in [None] + [m.name for m in exp.refinement.models]:
        model = build_model(exp, model=name, info=info)
        results.append((name or "base", Refiner(model, tth[cols]).refine(y[0], sig)))
    path = RunPaths.of(exp).refine_compare_csv
    path.parent.mkdir(parents=True, exist_ok=True)
    params = list(dict.fromkeys(n for _, r in results for n, f in zip(r.names, r.refined) if f
                                and not n.startswith("bkg_")))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["quantity"] + [n for n, _ in results])
        for label, get in (("rwp", lambda r: r.rwp), ("rexp", lambda r: r.rexp), ("gof", lambda r: r.gof),
                           ("n_params", lambda r: r.n_params)):
            w.writerow([label] + [f"{get(r):.6g}" for _, r in results])
        for p in params:
            w.writerow([p] + [(f"{r.value(p):.6g}" if p in r.names and r.refined[r.names.index(p)] else "")
                              for _, r in results])
            w.writerow([p + "_err"] + [(f"{r.esd(p):.2g}" if p in r.names and r.refined[r.names.index(p)] else "")
                                       for _, r in results])
    return frame, results, path

