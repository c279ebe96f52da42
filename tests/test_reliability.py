"""Hostile input and faults (issue 19): each is a clear one-line error (exit status 2, naming the
file, frame or key and what was expected) or a recorded failure (the run completes, the bad frame
or row is marked with its reason, and every good frame equals a clean run's), never a traceback,
a crash or a silently wrong result."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the bitshuffle filter)
import numpy as np
import pytest

from xrdpipe.config import load_experiment
from xrdpipe.errors import CalibrationError, ConfigError
from xrdpipe.run.echem import echem_experiment
from xrdpipe.run.integrate import integrate_experiment
from xrdpipe.run.store import open_run
from xrdpipe.testing import assert_same_results

SCHEDULERS = [[], ["--scheduler", "processes"], ["--scheduler", "serial"]]   # default, pool, serial
SCHEDULER_IDS = ["default", "processes", "serial"]


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrdpipe", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def _run(*args) -> subprocess.CompletedProcess:
    """The command run in this process (click's runner): as :func:`_cli`, without the start-up."""
    from click.testing import CliRunner

    from xrdpipe.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def _error_line(proc) -> str:
    """The one line of a failed command (exit status 2): nothing else on stderr (an error of the
    experiment file is its usual form: the file, then one line per key)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if len(lines) == 2 and lines[0].endswith(": 1 error"):
        assert lines[0].startswith("error: ") and lines[1].startswith("  "), proc.stderr
        return lines[0] + "\n" + lines[1]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, quick_experiment):
    """An 8-frame 128 x 128 experiment (two bitshuffle-LZ4 stacks of 4), and its clean run file
    (integrated serially): the reference every damaged copy's good frames must equal."""
    folder = tmp_path_factory.mktemp("rel") / "base"
    syn = quick_experiment(folder, n_frames=8, shape=(128, 128), frames_per_file=4, seed=5, npt=400,
                           run_name="rel")
    exp = load_experiment(syn.experiment_file)
    integrate_experiment(exp, progress=False, scheduler="serial")
    return syn, exp.run.run_file


def _copy(base, dest: Path) -> Path:
    """A fresh copy of the base experiment (no results); returns its experiment file."""
    syn, _ = base
    shutil.copytree(syn.experiment_file.parent, dest, ignore=shutil.ignore_patterns("results"))
    return dest / syn.experiment_file.name


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _good_frames_equal(run_file: Path, reference: Path, bad: set[int]) -> None:
    got, ref = open_run(run_file), open_run(reference)
    good = [i for i in range(ref.intensity.shape[0]) if i not in bad]
    assert list(got.frames["key"]) == list(ref.frames["key"])
    np.testing.assert_array_equal(got.intensity[good], ref.intensity[good])
    np.testing.assert_array_equal(got.sigma[good], ref.sigma[good])
    assert (got.frames["status"][good] == 1).all()


# -- 1. empty patterns ------------------------------------------------------------------------

def test_1_an_empty_frame_is_recorded_and_every_export_skips_an_empty_pattern(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    raw = sorted((tmp_path / "e" / "raw").glob("*.h5"))[0]
    with h5py.File(raw, "r+") as h5:                   # frame 1: every pixel at the integer maximum
        ds = h5["/entry/data/data"]
        ds[1] = np.iinfo(ds.dtype).max
    proc = _run("integrate", exp_file, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "failed rel_data_000001.h5:1: empty pattern: no valid pixel (every pixel is masked, NaN or at the " \
           "integer maximum, which marks gaps and overflows)" in proc.stdout
    exp = load_experiment(exp_file)
    fr = open_run(exp.run.run_file).frames
    assert fr["status"][1] == -1 and fr["message"][1].startswith("empty pattern: no valid pixel")
    _good_frames_equal(exp.run.run_file, base[1], {1})
    proc = _run("export", exp_file, "--format", "xye", "--format", "fxye", "--format", "topas", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "exported 7 pattern(s) as 7 xye, 7 fxye, 7 topas" in proc.stdout

    # a pattern that is empty in the run file (an import, an older run) is skipped by every export
    from xrdpipe.run.output import export_run_file

    with h5py.File(exp.run.run_file, "r+") as h5:
        h5["/entry/patterns/intensity"][3] = np.nan
    res = export_run_file(exp.run.run_file, tmp_path / "x", formats=["xye", "fxye", "topas"])
    assert res.empty == [3] and res.files == {"xye": 6, "fxye": 6, "topas": 6}
    assert "frame(s) with an empty pattern (no valid point), not exported: 3" in str(res)


def test_1_a_range_beyond_the_detector_and_a_mask_of_every_pixel_are_errors(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    _edit(exp_file, 'npt = 400\n', 'npt = 400\nrange = [80.0, 90.0]\n')
    line = _error_line(_run("integrate", exp_file, "-q"))
    assert "integration.range: [80.0, 90.0]° holds no pixel of the detector, whose 2θ span is " in line
    span = [float(v) for v in line.split("span is ")[1].rstrip("°").split(" to ")]
    assert 0 <= span[0] < span[1] < 80

    exp_file = _copy(base, tmp_path / "m")
    import fabio

    mask = tmp_path / "m" / "mask.edf"
    fabio.edfimage.EdfImage(np.ones_like(fabio.open(str(mask)).data)).write(str(mask))
    with pytest.raises(CalibrationError, match=r"the mask .*mask\.edf masks every pixel of the detector"):
        integrate_experiment(load_experiment(exp_file), progress=False)


# -- 2. a corrupt compressed frame ---------------------------------------------------------------

def _corrupt_chunk(path: Path, index: int) -> None:
    """Random bytes over the middle half of one frame's bitshuffle-LZ4 chunk."""
    with h5py.File(path, "r+") as h5:
        ds = h5["/entry/data/data"]
        mask, chunk = ds.id.read_direct_chunk((index, 0, 0))
        raw = bytearray(chunk)
        n = len(raw)
        raw[n // 4: n // 2] = np.random.default_rng(0).integers(0, 256, n // 2 - n // 4, dtype=np.uint8).tobytes()
        ds.id.write_direct_chunk((index, 0, 0), bytes(raw), mask)


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=SCHEDULER_IDS)
def test_2_a_corrupt_compressed_frame_is_recorded_and_the_run_goes_on(base, tmp_path, scheduler):
    exp_file = _copy(base, tmp_path / "e")
    _corrupt_chunk(sorted((tmp_path / "e" / "raw").glob("*.h5"))[1], 2)      # frame 6
    proc = _run("integrate", exp_file, "-q", *scheduler)
    assert proc.returncode == 0, proc.stderr
    assert ("failed rel_data_000002.h5:2: cannot decompress chunk [2, 0, 0] of /entry/data/data "
            "(bitshuffle-LZ4): block ") in proc.stdout
    assert "7 integrated now, 0 already done, 1 failed" in proc.stdout
    _good_frames_equal(load_experiment(exp_file).run.run_file, base[1], {6})


def test_2_a_worker_that_dies_is_replaced_and_only_its_job_is_recorded():
    """Whatever else kills a pool worker (another filter, a library, the memory killer): the pool
    is started again, the jobs in flight run again one at a time, and the one that kills a worker
    twice gets ``on_crash``; every other job's result is as in a serial run."""
    import operator

    from xrdpipe.parallel import map_ordered

    jobs = [abs] * 5 + [signal.raise_signal] + [abs] * 6        # job 5 kills its worker (SIGSEGV)
    out = list(map_ordered(operator.call, jobs, context=signal.SIGSEGV, scheduler="processes", workers=2,
                           on_crash=lambda job: f"crashed in {job.__name__}"))
    assert out == [signal.SIGSEGV] * 5 + ["crashed in raise_signal"] + [signal.SIGSEGV] * 6


def test_2_a_worker_that_dies_before_the_next_job_is_sent():
    """The pool broke before the next job could be sent to it (the dead worker was noticed
    first): that job waits its turn like the others, and the run goes on as above."""
    import operator
    import time

    from xrdpipe.parallel import map_ordered

    def jobs():
        yield signal.raise_signal                       # kills its worker (SIGSEGV)
        time.sleep(1.0)                                 # ... and the pool notices it meanwhile
        yield from [abs] * 3

    out = list(map_ordered(operator.call, jobs(), context=signal.SIGSEGV, scheduler="processes", workers=2,
                           on_crash=lambda job: f"crashed in {job.__name__}"))
    assert out == ["crashed in raise_signal"] + [signal.SIGSEGV] * 3




_SCRIPT = """import operator, sys
from xrdpipe.parallel import map_ordered
{guard}print("RESULT", list(map_ordered(operator.add, range(4), context=10, scheduler="processes", workers=2,
{indent}                              prefetch=4, on_crash=lambda job: "crashed")))
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["top-level", "under-main-guard"])
def test_2_a_script_whose_workers_die_as_they_start_is_told_why(tmp_path, guarded):
    """A pool's workers start by running the caller's script again: one that calls xrdpipe at its
    top level (no ``if __name__ == "__main__":``) kills every worker as it starts. That is one
    error naming the script and the guard, not every job recorded as the one that killed its
    worker (each run alone twice, and the script's work done again in every worker); under the
    guard the same script gets its results."""
    script = tmp_path / "my_analysis.py"
    script.write_text(_SCRIPT.format(guard='if __name__ == "__main__":\n    ' if guarded else "",
                                     indent="    " if guarded else ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if guarded:
        assert proc.returncode == 0, proc.stderr
        assert "RESULT [10, 11, 12, 13]" in proc.stdout
        return
    assert proc.returncode == 1 and "RESULT" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xrdpipe.errors.XrdpipeError: the worker processes of the \"processes\" scheduler died "
                           "as they started, before any frame")
    assert f"Python starts each worker by running {script} again" in last
    assert 'under `if __name__ == "__main__":`' in last and '[run] scheduler = "threads"' in last
# -- 3. a full disk ----------------------------------------------------------------------------

def _limited(limit: int):
    def small_disk():                  # writes past `limit` bytes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return small_disk


@pytest.mark.parametrize("scheduler", [SCHEDULERS[0], SCHEDULERS[2]], ids=["default", "serial"])
def test_3_a_full_disk_is_one_line_early_and_late_and_a_rerun_gives_the_clean_result(long_run, scheduler):
    syn, clean = long_run
    exp_file = _with_output(syn, f"disk{len(scheduler)}")
    run_file = load_experiment(exp_file).run.run_file
    size = clean.stat().st_size
    # early: the new run file cannot even be laid out; later: the disk fills while frames are
    # integrated (near the end; half way with the serial scheduler)
    limits = ([(20_000, "cannot create run file"), (int(0.95 * size), "cannot write run file")] if not scheduler
              else [(int(0.6 * size), "cannot write run file")])
    for limit, what in limits:
        proc = _cli("integrate", exp_file, "-q", *scheduler, preexec_fn=_limited(limit))
        line = _error_line(proc)
        assert line.startswith(f"error: {what} {run_file}: the disk is full (or a quota or file-size limit "
                               "was reached)"), line
        assert not list(run_file.parent.glob("*.work")) and not list(run_file.parent.glob("*.part"))
        assert not run_file.exists()                         # nothing was ever published (checkpoint_s 30)
    proc = _run("integrate", exp_file, "-q", *scheduler)     # with room again: the clean result
    assert proc.returncode == 0, proc.stderr
    assert_same_results(clean, run_file)
    # (a published run file is left as it was, byte for byte: test_scale.py checks it)


def test_3_a_kernel_whose_compiled_code_cannot_be_written_still_runs(monkeypatch):
    """Numba's on-disk cache of a kernel on a full disk (or a file-size limit, a read-only
    install): the kernel runs from memory, nothing raises (a run's own writes report the disk)."""
    import errno

    from numba.core.caching import FunctionCache

    from xrdpipe.kernels.base import _kernel

    def full(self, sig, data):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(FunctionCache, "_save_overload", full)

    def twice(x):
        return 2.0 * x

    assert _kernel(twice)(1.5) == 3.0


# -- 4. Ctrl-C -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_run(tmp_path_factory, quick_experiment):
    """48 frames of 192 x 192 and 1500 points: an integration that lasts long enough to be
    interrupted, and a run file larger than the room xrdpipe keeps free; its clean run."""
    folder = tmp_path_factory.mktemp("long") / "exp"
    syn = quick_experiment(folder, n_frames=48, shape=(192, 192), frames_per_file=8, seed=6, npt=1500,
                           run_name="long")
    exp = load_experiment(_with_output(syn, "clean"))
    integrate_experiment(exp, progress=False, scheduler="serial")
    return syn, exp.run.run_file


def _with_output(syn, name: str) -> Path:
    """A copy of the experiment file writing to ``results-<name>`` (the same frames)."""
    path = syn.experiment_file.with_name(f"{name}.toml")
    path.write_text(syn.experiment_file.read_text().replace('output = "results"', f'output = "results-{name}"'))
    return path


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=SCHEDULER_IDS)
def test_4_ctrl_c_during_integration_stops_at_once_and_a_rerun_resumes(long_run, tmp_path, scheduler):
    syn, clean = long_run
    exp_file = _with_output(syn, f"ctrlc-{scheduler[-1] if scheduler else 'default'}")
    proc = subprocess.Popen([sys.executable, "-m", "xrdpipe", "run", str(exp_file), "-q", *scheduler],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert "[1/" in proc.stdout.readline()            # "[1/5] integrate ...": the integration has begun
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)                # as Ctrl-C: the whole process group
    out_text, err = proc.communicate(timeout=60)
    stopped = time.monotonic() - t0
    assert proc.returncode == 130, (out_text, err)
    assert err.strip().splitlines() == ["interrupted: every stage finished so far is kept, and the interrupted "
                                        "one resumes; run the same command again to resume"], err
    assert stopped < 10, stopped
    run_file = load_experiment(exp_file).run.run_file
    if run_file.exists():
        assert (open_run(run_file).frames["status"] == 1).sum() < 48       # stopped before the end
    proc = _run("integrate", exp_file, "-q", *scheduler)
    assert proc.returncode == 0, proc.stderr
    assert_same_results(clean, run_file)


# -- 5, 6, 12. the experiment file -----------------------------------------------------------------

def test_5_a_file_listed_twice_or_two_files_of_one_name_are_errors(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    raw = tmp_path / "e" / "raw"
    _edit(exp_file, 'files = "raw/*.h5"', 'files = ["raw/rel_data_000001.h5", "raw/*.h5"]')
    with pytest.raises(ConfigError) as err:
        load_experiment(exp_file)
    assert err.value.problems == [("frames.files", f"{str(raw / 'rel_data_000001.h5')!r} is listed twice (by "
                                   "'raw/rel_data_000001.h5' and by 'raw/*.h5'); list every file once")]
    _edit(exp_file, 'files = ["raw/rel_data_000001.h5", "raw/*.h5"]', 'files = ["raw/*1.h5", "raw/rel*.h5"]')
    with pytest.raises(ConfigError, match=r"frames\.files: .*rel_data_000001\.h5' is listed twice \(by "
                                          r"'raw/\*1\.h5' and by 'raw/rel\*\.h5'\)"):
        load_experiment(exp_file)
    other = tmp_path / "e" / "scan2"
    other.mkdir()
    shutil.copy(raw / "rel_data_000001.h5", other)
    _edit(exp_file, 'files = ["raw/*1.h5", "raw/rel*.h5"]', 'files = ["raw/*.h5", "scan2/*.h5"]')
    with pytest.raises(ConfigError) as err:
        load_experiment(exp_file)
    assert err.value.problems == [("frames.files", f"two files are named 'rel_data_000001.h5': "
                                   f"{str(raw / 'rel_data_000001.h5')!r} and {str(other / 'rel_data_000001.h5')!r}; "
                                   "frames are known by file name and index in the run file, so give every file "
                                   "its own name (a link will do)")]


@pytest.mark.parametrize("name", ["../../escaped", "sub/run", "..", "a\\b"])
def test_6_a_run_name_is_a_file_name(base, tmp_path, name):
    exp_file = _copy(base, tmp_path / "e")
    _edit(exp_file, 'name = "rel"', f"name = '{name}'")        # a TOML literal string: no escapes
    line = _error_line(_run("validate", exp_file))
    assert line.startswith(f"error: {exp_file}: 1 error\n  run.name: a run name is a file name")
    with pytest.raises(ConfigError) as err:
        load_experiment(exp_file)
    assert err.value.problems == [("run.name", "a run name is a file name (the run file is <output>/<name>.nxs): "
                                   f"expected no '/', '\\' or '..', got {name!r}")]


def test_12_numbers_are_numbers(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    _edit(exp_file, "npt = 400", 'npt = "2000"')
    _edit(exp_file, "active_mass_mg = 7.2", "active_mass_mg = true")
    with pytest.raises(ConfigError) as err:
        load_experiment(exp_file)
    assert sorted(err.value.problems) == [
        ("electrochemistry.active_mass_mg", "input should be a valid number (not a boolean), got True"),
        ("integration.npt", "input should be a valid integer (not a string), got '2000'")]
    _edit(exp_file, 'npt = "2000"', "npt = 2000")
    _edit(exp_file, "active_mass_mg = true", "active_mass_mg = 7")      # an integer is a number
    _edit(exp_file, "[integration]\n", '[integration]\nrange = ["2", 30]\n')
    with pytest.raises(ConfigError) as err:
        load_experiment(exp_file)
    assert err.value.problems == [("integration.range", "expected numbers, got ['2', 30]")]


# -- 7. a dark larger than the data ---------------------------------------------------------------

def test_7_a_dark_larger_than_the_data_makes_suspicious_frames_and_a_warning(base, tmp_path):
    import fabio

    exp_file = _copy(base, tmp_path / "e")
    shape = open_run(base[1]).intensity.shape
    det = fabio.open(str(tmp_path / "e" / "mask.edf")).data.shape
    fabio.edfimage.EdfImage(np.full(det, 1e6, np.float32)).write(str(tmp_path / "e" / "dark.edf"))
    _edit(exp_file, 'mask = "mask.edf"\n', 'mask = "mask.edf"\ndark = "dark.edf"\n')
    summary = integrate_experiment(load_experiment(exp_file), progress=False)
    assert summary.integrated == shape[0] and len(summary.suspicious) == shape[0]
    assert summary.warnings == [f"{shape[0]} frame(s) are mostly negative after dark subtraction, so the dark is "
                                "probably not for these frames (recorded as suspicious: rel_data_000001.h5:0, "
                                "rel_data_000001.h5:1, rel_data_000001.h5:2, rel_data_000001.h5:3, "
                                "rel_data_000002.h5:0 ...)"]
    assert f"warning: {summary.warnings[0]}" in str(summary)
    messages = open_run(load_experiment(exp_file).run.run_file).frames["message"]
    assert all(m.startswith("suspicious: 100 % of the pattern is negative after dark subtraction") for m in messages)


# -- 8, 11. the cycler record and the scan log ------------------------------------------------------

def test_8_currents_a_million_times_too_large_are_a_warning_and_a_status(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    cycler = tmp_path / "e" / "cycler.csv"
    rows = cycler.read_text().splitlines()
    head, body = rows[0], [r.split(",") for r in rows[1:]]
    col = head.split(",").index("I/mA")
    cycler.write_text("\n".join([head] + [",".join(r[:col] + [repr(float(r[col]) * 1e6)] + r[col + 1:])
                                          for r in body]) + "\n")
    exp = load_experiment(exp_file)
    integrate_experiment(exp, progress=False)
    summary = echem_experiment(exp)
    assert len(summary.warnings) == 1
    warning = summary.warnings[0]
    assert "outside 0 to x0 + 0.2 = 1.2" in warning and "above 1.5 x the theoretical 240.4 mAh/g" in warning
    assert warning.endswith("check the current's unit (header or units = { current = \"A\" }), active_mass_mg "
                            "(7.2) and x0")
    status = [line.split(",")[9] for line in (exp.run.output / "frames.csv").read_text().splitlines()[1:]]
    assert "implausible" in status and set(status) <= {"implausible", "ok", "before_record", "after_record",
                                                        "partly_outside_record"}
    clean_file = _copy(base, tmp_path / "c")              # the cycler file as written: no warning
    shutil.copytree(base[1].parent, tmp_path / "c" / "results")
    assert echem_experiment(load_experiment(clean_file)).warnings == ()


def _clean_cycler(base) -> Path:
    return base[0].experiment_file.parent / "cycler.csv"


def test_11_a_time_stamp_twice_with_two_voltages_is_a_warning_and_the_later_row_wins(base, tmp_path):
    from xrdpipe.cyclers import read_cycler

    src = _clean_cycler(base)
    rows = src.read_text().splitlines()
    cols = rows[0].split(",")
    k = 20
    twin = rows[k].split(",")
    twin[cols.index("Ewe/V")] = "3.90000"
    path = tmp_path / "cycler.csv"
    path.write_text("\n".join(rows[:k] + [",".join(twin)] + rows[k:]) + "\n")
    spec = load_experiment(base[0].experiment_file).electrochemistry
    kw = dict(format="csv", columns=spec.columns, start=spec.start, timezone=spec.timezone)
    rec, ref = read_cycler(path, **kw), read_cycler(src, **kw)
    t = float(twin[cols.index("time/s")])
    assert [n for n in rec.notes if n.startswith("warning")] == [
        f"warning: 1 time stamp(s) appear twice with different voltages (rows {k} and {k + 1} at {t:.6g} s: 3.9 V "
        f"and {float(rows[k].split(',')[cols.index('Ewe/V')]):.5g} V); the later row of each pair is kept"]
    np.testing.assert_array_equal(rec.voltage_V, ref.voltage_V)       # the later row is the original one
    np.testing.assert_array_equal(rec.time, ref.time)


def test_11_a_scan_log_out_of_frame_order_is_a_warning_naming_the_frames(coincell8):
    import csv

    exp = coincell8()
    log = exp.patterns.times.log
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    start = [c for c in fields if c.strip().lower() in ("start_time", "start")][0]
    end = [c for c in fields if c.strip().lower() in ("end_time", "end")][0]
    rows[1][start], rows[2][start] = rows[2][start], rows[1][start]
    rows[1][end], rows[2][end] = rows[2][end], rows[1][end]
    with open(log, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(rows)
    summary = integrate_experiment(exp, progress=False)
    assert len(summary.warnings) == 1
    assert summary.warnings[0].startswith(f"the scan log {log.name}: times are not in frame order at ")
    assert summary.warnings[0].endswith("every frame keeps its own time and its place in the file order")
    assert summary.integrated == len(exp.patterns.files)


# -- 9, 10, 14. refine and plot ------------------------------------------------------------------------

def test_9_refine_frames_outside_the_run_are_refused(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    exp_file.write_text(exp_file.read_text() + '[refinement]\nmethod = "lebail"\n[[refinement.phases]]\nname = "O3"\n')
    shutil.copytree(base[1].parent, tmp_path / "e" / "results")
    line = _error_line(_run("refine", exp_file, "--frames", "500,600", "-q"))
    assert line == (f"error: {load_experiment(exp_file).run.run_file} has frames 0 to 7; there are no frames 500 "
                    "to 600 to refine")


def test_10_plot_output_keeps_the_name_given(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    shutil.copytree(base[1].parent, tmp_path / "e" / "results")
    line = _error_line(_run("plot", exp_file, "--kind", "waterfall", "-o", tmp_path / "nodir" / "sub" / "x.png"))
    assert line == f"error: -o {tmp_path / 'nodir' / 'sub' / 'x.png'}: no folder {str(tmp_path / 'nodir' / 'sub')!r}; create it first"
    assert not (tmp_path / "nodir").exists()
    target = tmp_path / "x.png"
    proc = _run("plot", exp_file, "--kind", "waterfall", "-o", target)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("x*")) == ["x.png"]
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = _error_line(_run("plot", exp_file, "--kind", "waterfall", "--format", "svg", "-o", target))
    assert line == f"error: -o {target} is a PNG file, but --format asks for svg; give one or the other"


def test_14_a_cif_without_cell_or_atoms_is_named(base, tmp_path):
    exp_file = _copy(base, tmp_path / "e")
    (tmp_path / "e" / "empty.cif").write_text("data_empty\n_symmetry_space_group_name_H-M 'R -3 m'\n")
    exp_file.write_text(exp_file.read_text() + '[refinement]\nmethod = "rietveld"\n[[refinement.phases]]\n'
                        'name = "O3"\nstructure = "empty.cif"\n')
    shutil.copytree(base[1].parent, tmp_path / "e" / "results")
    line = _error_line(_run("refine", exp_file, "-q"))
    assert line.endswith(f"{tmp_path / 'e' / 'empty.cif'}: no unit cell (_cell_length_a, _cell_length_b, "
                         "_cell_length_c, _cell_angle_alpha, _cell_angle_beta, _cell_angle_gamma) and no atom sites "
                         "(_atom_site_label, _atom_site_fract_x, _atom_site_fract_y, _atom_site_fract_z) in the CIF "
                         "file; a structure needs both"), line


# -- 13. calibrate --------------------------------------------------------------------------------------

def test_13_an_unknown_detector_is_one_line_with_the_closest_name(base):
    image = sorted((base[0].experiment_file.parent / "raw").glob("*.h5"))[0]
    proc = _run("calibrate", image, "--calibrant", "CeO2", "--wavelength-A", "0.62", "--detector", "eiger99_16m")
    assert _error_line(proc) == (
        "error: unknown detector 'eiger99_16m'; did you mean 'eiger_16m'? (list pyFAI's detectors with: "
        "python -c \"import pyFAI.detectors as d; print(*sorted(d.ALL_DETECTORS))\")")
    assert proc.stdout == ""
