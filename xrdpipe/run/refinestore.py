"""``/entry/refinement`` of the run file: whole-pattern results, one row per frame, written as
the sequential refinement goes (resumable), and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..refine import RefinementResult
from .access import Writer, decode, enter_transaction, str_dtype, text
from .groups import read_table
from .paths import ENTRY, REFINEMENT, h5path

__all__ = ["RefineStore", "read_refinement", "read_weight_fractions", "read_refined_frame", "OK", "FAILED", "FLAGGED", "STATUS"]

#: ``status`` of a refined frame (0: not refined)
OK, FAILED, FLAGGED = 1, 2, 3
STATUS = {OK: "ok", FAILED: "failed", FLAGGED: "flagged"}


class RefineStore(Writer):
    """``/entry/refinement`` of a run file, open for writing (one row per frame)."""

    def __init__(self, session, stack, path: Path):
        super().__init__(session, stack, path)
        self._g = self._h5[h5path(REFINEMENT)]

    @classmethod
    def open(cls, path: Path, *, n: int, names: list[str], columns: slice, tick_phase: np.ndarray,
             phases: list[str], fingerprint: str, restart: bool, tth: np.ndarray) -> "RefineStore":
        n_points, n_refl = columns.stop - columns.start, int(tick_phase.size)
        stack, session = enter_transaction(Path(path))
        try:
            h5 = session.writable()
            entry = h5[ENTRY]
            if REFINEMENT in entry and (restart or entry[REFINEMENT].attrs.get("fingerprint") != fingerprint):
                del entry[REFINEMENT]
            if REFINEMENT not in entry:
                g = entry.create_group(REFINEMENT)
                g.attrs.update({"NX_class": "NXcollection", "fingerprint": fingerprint,
                                "first_column": columns.start})   # of the pattern stack
                p = len(names)
                for name in ("values", "esds"):
                    g.create_dataset(name, shape=(n, p), maxshape=(None, p), dtype="f8", fillvalue=np.nan,
                                     chunks=(min(max(n, 1), 256), p))
                for name in ("calculated", "background"):
                    g.create_dataset(name, shape=(n, n_points), maxshape=(None, n_points), dtype="f4",
                                     fillvalue=np.nan, chunks=(1, n_points))
                g.create_dataset("lebail_intensity", shape=(n, max(n_refl, 1)), maxshape=(None, max(n_refl, 1)),
                                 dtype="f8", fillvalue=np.nan, chunks=(1, max(n_refl, 1)))
                g.create_dataset("intensity_err", shape=(n, max(n_refl, 1)), maxshape=(None, max(n_refl, 1)),
                                 dtype="f8", fillvalue=np.nan, chunks=(1, max(n_refl, 1)))
                g.create_dataset("ticks", shape=(n, max(n_refl, 1)), maxshape=(None, max(n_refl, 1)), dtype="f4",
                                 fillvalue=np.nan, chunks=(1, max(n_refl, 1)))
                g.create_dataset("weight_fraction", shape=(n, len(phases)), maxshape=(None, len(phases)),
                                 dtype="f8", fillvalue=np.nan)
                g.create_dataset("weight_fraction_err", shape=(n, len(phases)), maxshape=(None, len(phases)),
                                 dtype="f8", fillvalue=np.nan)
                g.create_dataset("absent", shape=(n, len(phases)), maxshape=(None, len(phases)), dtype="i1")
                # which start won (previous, configured, searched): a resumed run carries the
                # cells' trend on from a frame refined from the one before, as an unbroken run does
                g.create_dataset("start_from", shape=(n,), maxshape=(None,), dtype=str_dtype())
                for name in ("rwp", "rexp", "gof"):
                    g.create_dataset(name, shape=(n,), maxshape=(None,), dtype="f8", fillvalue=np.nan)
                g.create_dataset("n_iter", shape=(n,), maxshape=(None,), dtype="i4")
                g.create_dataset("status", shape=(n,), maxshape=(None,), dtype="i1")
                g.create_dataset("message", shape=(n,), maxshape=(None,), dtype=str_dtype())
                g.create_dataset("refined", data=np.zeros(p, "i1"))
                g.create_dataset("parameter", data=np.array(names, dtype=object), dtype=str_dtype())
                g.create_dataset("phase", data=np.array(phases, dtype=object), dtype=str_dtype())
                g.create_dataset("tick_phase", data=tick_phase.astype("i2"))
                g.create_dataset("tth", data=np.asarray(tth, float)).attrs["units"] = "degrees"
            g = entry[REFINEMENT]
            if g["status"].shape[0] < n:
                for ds in g.values():
                    if hasattr(ds, "maxshape") and ds.maxshape and ds.maxshape[0] is None:
                        ds.resize((n, *ds.shape[1:]))
            return cls(session, stack, Path(path))
        except BaseException:
            stack.close()
            raise

    def done(self) -> np.ndarray:
        return self._g["status"][()] > 0

    def last_success(self, before: int, is_cell: np.ndarray | None = None) -> tuple[RefinementResult | None, int | None]:
        """The last successful row before ``before`` as a start (values, esds, Le Bail intensities
        and GOF) and its row; (None, None) when there is none. With ``is_cell`` (which parameters
        are cell parameters; Le Bail), the cells' trend is restored as the refinement left it: the
        change since the success before it, where this row was refined from that one with the
        same phases absent."""
        st = self._g["status"][:before]
        ok = np.flatnonzero((st == OK) | (st == FLAGGED))
        if not ok.size:
            return None, None
        r = int(ok[-1])
        g = self._g
        theta = g["values"][r]
        I = g["lebail_intensity"][r]
        names = list(decode(g["parameter"][()]))
        phases = list(decode(g["phase"][()]))
        absent = g["absent"][r] if "absent" in g else np.zeros(len(phases), bool)
        start_from = text(g["start_from"][r]) if "start_from" in g else ""
        trend = None
        if is_cell is not None and start_from == "previous" and ok.size >= 2:
            q = int(ok[-2])                   # the success row r was refined from
            if np.array_equal(g["absent"][q] if "absent" in g else absent, absent):
                trend = np.where(is_cell, theta - g["values"][q], 0.0)
        return RefinementResult(names, theta, g["esds"][r], np.zeros(theta.size, bool),
                                float(g["rwp"][r]), float(g["rexp"][r]), float(g["gof"][r]), 0, 0, 0, True, "",
                                np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), [], [],
                                None if np.isnan(I).all() else I, phases, theta=theta,
                                status="flagged" if st[r] == FLAGGED else "ok",
                                absent=[ph for ph, a in zip(phases, absent) if a], start_from=start_from,
                                cell_trend=trend), r

    def write(self, row: int, res: RefinementResult) -> None:
        g = self._g
        g["values"][row] = res.values
        g["esds"][row] = res.esds
        g["refined"][...] = res.refined.astype("i1")
        g["calculated"][row] = res.calculated
        g["background"][row] = res.background
        ticks = np.concatenate(res.ticks) if res.ticks else np.zeros(0)
        g["ticks"][row, :ticks.size] = ticks
        if res.lebail_I is not None:
            g["lebail_intensity"][row, :res.lebail_I.size] = res.lebail_I
        if res.intensity_esd is not None and "intensity_err" in g:        # Pawley
            g["intensity_err"][row, :res.intensity_esd.size] = res.intensity_esd
        for p, name in enumerate(res.phase_names):
            w = res.weight_fractions.get(name)
            if w is not None:
                g["weight_fraction"][row, p], g["weight_fraction_err"][row, p] = w
        g["rwp"][row], g["rexp"][row], g["gof"][row], g["n_iter"][row] = res.rwp, res.rexp, res.gof, res.n_iter
        g["message"][row] = res.message[:500]
        if "absent" in g:
            g["absent"][row] = [name in res.absent for name in res.phase_names]
        if "start_from" in g:
            g["start_from"][row] = res.start_from
        g["status"][row] = FLAGGED if res.status == "flagged" else OK     # last: a row counts once its results are in
        self.maybe_flush()

    def flag_outliers(self, factor: float) -> list[int]:
        """Flag the ``ok`` frames whose Rwp exceeds ``factor`` times the median Rwp of the
        run's refined frames; their rows."""
        g = self._g
        st = g["status"][()]
        rwp = g["rwp"][()]
        done = np.flatnonzero(((st == OK) | (st == FLAGGED)) & np.isfinite(rwp))
        if done.size < 3:
            return []
        med = float(np.median(rwp[done]))
        out = [int(r) for r in done if st[r] == OK and rwp[r] > factor * med]
        for r in out:
            msg = g["message"][r]
            msg = text(msg)
            g["message"][r] = ((msg + "; ") if msg else "") + (
                f"Rwp {100 * rwp[r]:.2f} % above {factor:g} x the run's median ({100 * med:.2f} %)")
            g["status"][r] = FLAGGED
        return out

    def write_failure(self, row: int, message: str) -> None:
        self._g["message"][row] = message[:500]
        self._g["status"][row] = FAILED
        self.maybe_flush()


def read_refinement(run_file: Path | str) -> dict | None:
    """``/entry/refinement`` of a run file as arrays (None before ``xrdpipe refine``)."""
    return read_table(run_file, REFINEMENT)


def read_weight_fractions(run_file: Path | str):
    """The weight fractions of ``/entry/refinement`` as a :class:`~xrdpipe.lattice.WeightFractions`
    (NaN in frames not refined successfully); None before ``xrdpipe refine``."""
    from ..lattice import WeightFractions

    d = read_table(run_file, REFINEMENT, names=("phase", "status", "weight_fraction", "weight_fraction_err"))
    if d is None:
        return None
    ok = np.isin(d["status"], (OK, FLAGGED))[:, None]
    return WeightFractions(tuple(d["phase"]), np.where(ok, d["weight_fraction"], np.nan),
                           np.where(ok, d["weight_fraction_err"], np.nan))


def read_refined_frame(run_file: Path | str, frame: int):
    """One refined frame as a :class:`~xrdpipe.plots.RefinedFrame` (observed, calculated,
    background, reflection ticks, Rwp, GOF) for :func:`~xrdpipe.plots.plot_refinement`.

    Raises
    ------
    PlotError
        The run file holds no refinement, or ``frame`` was not refined successfully (the
        refined frames are named).
    """
    from ..errors import PlotError
    from ..plots import RefinedFrame
    from .access import reading
    from .store import read_pattern_block

    d = read_table(run_file, REFINEMENT, names=("tth", "status", "message", "rwp", "gof", "phase", "tick_phase"))
    if d is None:
        raise PlotError(f"{run_file} holds no refinement yet; run 'xrdpipe refine' first")
    n = d["status"].size
    if not 0 <= frame < n or d["status"][frame] != OK:
        ok = np.flatnonzero(d["status"] == OK)
        why = f"its refinement failed: {d['message'][frame]}" if 0 <= frame < n and d["status"][frame] == FAILED else (
            "it was not refined")
        raise PlotError(f"frame {frame} of {run_file}: {why} (refined frames: "
                        f"{', '.join(map(str, ok[:10])) or 'none'}{' ...' if ok.size > 10 else ''})")
    with reading(run_file) as h5:
        g = h5[h5path(REFINEMENT)]
        calc, bkg, ticks = g["calculated"][frame], g["background"][frame], g["ticks"][frame]
    tth = d["tth"]
    lo = int(d["attrs"]["first_column"])
    obs, _ = read_pattern_block(run_file, rows=[frame], columns=slice(lo, lo + tth.size))
    return RefinedFrame(int(frame), tth, obs[0], calc, bkg, ticks, d["tick_phase"], tuple(d["phase"]),
                        float(d["rwp"][frame]), float(d["gof"][frame]))
