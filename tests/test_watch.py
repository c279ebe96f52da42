"""`xrdpipe watch`: frames written into a folder, or appended to an HDF5 stack, while it runs are
each processed through every stage within a bound; readers never see a half-written run file;
the live result equals a straight batch run of the same frames."""

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xrdpipe.config import load_experiment
from xrdpipe.run.peakstore import read_peaks
from xrdpipe.run.store import read_frames
from xrdpipe.run.watch import ready_frames, watch_experiment
from xrdpipe.run.workflow import run_experiment
from xrdpipe.testing import assert_same_results

BOUND_S = 10.0          # frame complete -> integrated, fitted, lattice and figure updated


@pytest.fixture
def live_experiment(quick_experiment):
    """A 160 x 160 experiment whose frames wait in ``staging/`` for a "detector" to write them
    into the (empty) ``raw/`` folder the experiment file reads."""
    def make(folder: Path, frame_format: str, n_frames: int, **options):
        syn = quick_experiment(folder, n_frames=n_frames, shape=(160, 160), frame_format=frame_format, seed=5,
                               npt=700, run_name="live", **options)
        staging = folder / "staging"
        (folder / "raw").rename(staging)
        (folder / "raw").mkdir()
        return syn, staging

    return make


def _reader(run_file: Path, seconds: float) -> subprocess.Popen:
    """Another process reading the run file over and over, as a notebook would."""
    code = textwrap.dedent(f"""
        import time, h5py, numpy as np
        reads = errors = 0; first = None
        end = time.time() + {seconds}
        while time.time() < end:
            try:
                with h5py.File({str(run_file)!r}, "r") as h5:
                    st = h5["/entry/frames/status"][()]
                    y = h5["/entry/patterns/intensity"][()]
                    assert y.shape[0] == st.size
                    assert np.isfinite(y[st == 1]).any(axis=1).all()   # a done row has its data
                reads += 1
            except FileNotFoundError:
                pass
            except Exception as exc:
                errors += 1; first = first or repr(exc)
            time.sleep(0.01)
        print(reads, errors, first)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _watch(syn, *, idle_stop_s: float):
    """Watch until idle; returns the summary and, per frame key, when it was seen fully processed."""
    exp = load_experiment(syn.experiment_file, live=True)
    processed: dict[str, float] = {}
    figure = exp.run.output / exp.plots.folder / f"{exp.run.name}_contour.png"

    def on_poll(result):
        if result is None or not result.did_work:
            return
        fr = read_frames(exp.run.run_file)
        peaks = read_peaks(exp.run.run_file)
        now = time.time()
        assert figure.exists() or (fr.status == 1).sum() < 2, str(result.results.get("plots"))
        for key, st, fitted in zip(fr.key, fr.status, peaks.done):
            if st == 1 and fitted and key not in processed:
                processed[key] = now

    summary = watch_experiment(syn.experiment_file, interval_s=0.2, settle_s=0.4, retry_s=20.0,
                               idle_stop_s=idle_stop_s, on_poll=on_poll)
    return exp, summary, processed, figure


def test_frames_written_into_a_folder_are_processed_live(tmp_path, live_experiment):
    n = 10
    syn, staging = live_experiment(tmp_path / "exp", "cbf", n)
    files = sorted(staging.glob("*.cbf"))
    written: dict[str, float] = {}

    def detector():
        time.sleep(0.5)
        for i, src in enumerate(files):
            dst = syn.folder / "raw" / src.name
            data = src.read_bytes()
            if i % 3 == 1:            # written slowly: half, a pause longer than settle, the rest
                with open(dst, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    time.sleep(0.7)
                    fh.write(data[len(data) // 2:])
            else:
                dst.write_bytes(data)
            written[f"{src.name}:0"] = time.time()
            time.sleep(0.5)

    exp0 = load_experiment(syn.experiment_file, live=True)
    reader = _reader(exp0.run.run_file, seconds=8)
    thread = threading.Thread(target=detector)
    thread.start()
    exp, summary, processed, figure = _watch(syn, idle_stop_s=4.0)
    thread.join()
    reads, errors, first = reader.communicate(timeout=60)[0].split(maxsplit=2)
    assert int(errors) == 0, first
    assert int(reads) > 20
    assert set(processed) == set(written), "every frame processed"
    lags = [processed[k] - written[k] for k in written]
    assert max(lags) < BOUND_S, lags
    fr = read_frames(exp.run.run_file)
    assert (fr.status == 1).all(), fr.message          # the slow frames were retried, not failed
    assert figure.stat().st_mtime >= max(written.values())
    assert summary.busy >= 3
    # the live result is the batch result
    batch_text = syn.experiment_file.read_text().replace('output = "results"', 'output = "batch"')
    batch = syn.experiment_file.with_name("batch.toml")
    batch.write_text(batch_text)
    run_experiment(load_experiment(batch), progress=False)
    assert_same_results(load_experiment(batch).run.run_file, exp.run.run_file)


def test_a_frame_whose_header_was_unreadable_when_the_times_were_read_gets_its_time(tmp_path, live_experiment,
                                                                                   monkeypatch):
    """The race of a live run: the times are read while a frame's file is half written (its
    header gives no time), and the writer finishes before the frame itself is read. The frame is
    integrated, and its time is read again then, in the same poll: no frame is done but untimed."""
    import xrdpipe.run.integrate as integrate
    from xrdpipe.run.integrate import integrate_experiment

    syn, staging = live_experiment(tmp_path / "exp", "cbf", 3)
    files = sorted(staging.glob("*.cbf"))
    for f in files:
        shutil.copy(f, syn.folder / "raw" / f.name)
    slow = syn.folder / "raw" / files[1].name
    slow.write_bytes(files[1].read_bytes()[:4000])
    real = integrate.frame_times

    def times_then_the_writer_finishes(refs, *args, **kw):
        out = real(refs, *args, **kw)
        shutil.copy(files[1], slow)
        return out

    monkeypatch.setattr(integrate, "frame_times", times_then_the_writer_finishes)
    exp = load_experiment(syn.experiment_file, live=True)
    summary = integrate_experiment(exp, progress=False, ready=lambda refs: refs, retry_s=20.0)
    fr = read_frames(exp.run.run_file)
    assert (fr.status == 1).all(), fr.message
    assert summary.untimed == 0
    assert np.all(np.isfinite(fr.time_s)), fr.time_s
    assert np.allclose(np.diff(fr.time_s), fr.time_s[1] - fr.time_s[0]) and fr.time_s[1] > 0


WRITER = """
import json, sys, time, h5py, hdf5plugin
src, dst, log, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with h5py.File(src, "r") as s, h5py.File(dst, "w", libver="latest") as d:
    for name in s["/entry"]:
        if name != "data":
            s.copy(s["/entry"][name], d.require_group("/entry"), name=name)
    frames = s["/entry/data/data"]
    ds = d.create_dataset("/entry/data/data", shape=(0, *frames.shape[1:]), maxshape=(None, *frames.shape[1:]),
                          chunks=(1, *frames.shape[1:]), dtype=frames.dtype, **hdf5plugin.Bitshuffle(cname="lz4"))
    d.swmr_mode = True
    for i in range(frames.shape[0]):
        time.sleep(pause)
        ds.resize((i + 1, *frames.shape[1:]))
        ds[i] = frames[i]
        ds.flush()
        with open(log, "a") as fh:
            fh.write(json.dumps([i, time.time()]) + "\\n")
"""


def test_frames_appended_to_an_hdf5_stack_are_processed_live(tmp_path, live_experiment):
    n = 10
    syn, staging = live_experiment(tmp_path / "exp", "h5", n, frames_per_file=n)
    src = next(staging.glob("*.h5"))
    dst = syn.folder / "raw" / src.name
    log = tmp_path / "written.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(dst), str(log), "0.6"])
    exp, summary, processed, figure = _watch(syn, idle_stop_s=4.0)
    assert writer.wait(timeout=60) == 0
    written = {f"{src.name}:{i}": t for i, t in (json.loads(line) for line in log.read_text().splitlines())}
    assert set(processed) == set(written)
    # the last frame of a growing stack waits for the next one, or for the file to settle
    lags = [processed[k] - written[k] for k in written]
    assert max(lags) < BOUND_S, lags
    assert summary.busy >= 3                               # frames were taken as they came
    batch = tmp_path / "batch"
    shutil.copytree(syn.folder, batch, ignore=shutil.ignore_patterns("results", "staging"))
    b = load_experiment(batch / syn.experiment_file.name)
    run_experiment(b, progress=False)
    assert_same_results(b.run.run_file, exp.run.run_file)


def test_ready_frames_holds_back_what_may_be_incomplete(tmp_path):
    from xrdpipe.frames import FrameRef

    old, new, stack = tmp_path / "a.cbf", tmp_path / "b.cbf", tmp_path / "s.h5"
    for p in (old, new, stack):
        p.write_bytes(b"x")
    now = time.time()
    import os

    os.utime(old, (now - 10, now - 10))
    refs = [FrameRef(old), FrameRef(new)] + [FrameRef(stack, i) for i in range(3)]
    keys = [r.key for r in ready_frames(refs, settle_s=1.0, now=now)]
    assert keys == ["a.cbf:0", "s.h5:0", "s.h5:1"]
    assert len(ready_frames(refs, settle_s=1.0, now=now + 5)) == 5


def test_watch_waits_for_the_first_file_and_stops_when_idle(tmp_path, live_experiment):
    syn, _ = live_experiment(tmp_path / "exp", "cbf", 4)
    lines = []
    t0 = time.monotonic()
    summary = watch_experiment(syn.experiment_file, interval_s=0.1, idle_stop_s=0.5, echo=lines.append)
    assert time.monotonic() - t0 < 5
    assert summary.frames == 0 and summary.busy == 0 and "no new frame" in summary.stopped
    assert any("waiting for the first frame file" in line for line in lines)


@pytest.mark.parametrize("bad", ['[run]\nname = ""'])
def test_watch_reports_an_invalid_experiment_once(tmp_path, bad):
    path = tmp_path / "exp.toml"
    path.write_text("schema_version = 1\n" + bad + "\n")
    lines = []
    watch_experiment(path, interval_s=0.05, max_polls=5, echo=lines.append)
    assert sum("not valid" in line for line in lines) == 1
