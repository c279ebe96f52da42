"""Beamline scale: every scheduler gives the same numbers, kill -9 at any moment and a rerun give
the same result as a straight run, a full disk or an unwritable folder is a clear error that
leaves the run file as it was."""

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xrdpipe.config import load_experiment
from xrdpipe.errors import StoreError
from xrdpipe.run.fit import fit_experiment
from xrdpipe.run.integrate import integrate_experiment
from xrdpipe.run.peakstore import read_peaks
from xrdpipe.run.store import open_run
from xrdpipe.run.workflow import run_experiment
from xrdpipe.safeio import transaction
from xrdpipe.testing import assert_same_results


@pytest.fixture(scope="module")
def experiment(quick_experiment):
    """A 192 x 192 experiment in 8-frame stacks; ``checkpoint_s`` joins [run] when given."""
    def make(folder: Path, *, n_frames: int = 30, checkpoint_s: float | None = None, seed: int = 3):
        syn = quick_experiment(folder, n_frames=n_frames, shape=(192, 192), frames_per_file=8, seed=seed, npt=800,
                               run_name="scale")
        if checkpoint_s is not None:
            text = syn.experiment_file.read_text()
            syn.experiment_file.write_text(text.replace('output = "results"\n',
                                                        f'output = "results"\ncheckpoint_s = {checkpoint_s}\n'))
        return syn

    return make


def _with_output(syn, name: str, **run_keys) -> Path:
    """A copy of the experiment file writing to ``results-<name>`` (same frames)."""
    keys = "".join(f'\n{k} = "{v}"' for k, v in run_keys.items())
    text = syn.experiment_file.read_text().replace('output = "results"', f'output = "results-{name}"{keys}')
    path = syn.experiment_file.with_name(f"{name}.toml")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory, experiment):
    syn = experiment(tmp_path_factory.mktemp("scale") / "exp")
    reference = load_experiment(_with_output(syn, "serial", scheduler="serial"))
    run_experiment(reference, progress=False)
    return syn, reference


@pytest.mark.parametrize("scheduler", ["processes", "threads"])
def test_schedulers_give_identical_results(series, scheduler):
    syn, reference = series
    exp = load_experiment(_with_output(syn, scheduler, scheduler=scheduler))
    run_experiment(exp, progress=False, workers=2)
    assert_same_results(reference.run.run_file, exp.run.run_file)


def test_dask_local_cluster_gives_identical_results(series):
    distributed = pytest.importorskip("distributed")
    syn, reference = series
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster:
        exp = load_experiment(_with_output(syn, "dask", scheduler=cluster.scheduler_address))
        summary = run_experiment(exp, progress=False)
    assert summary.integrated == summary.frames == 30
    assert_same_results(reference.run.run_file, exp.run.run_file)


def test_fit_does_not_depend_on_how_it_was_cut(series):
    """Fitting with other thread counts, or resumed after any block, gives the same numbers."""
    syn, reference = series
    exp = load_experiment(_with_output(syn, "cut"))
    integrate_experiment(exp, progress=False)
    one = exp.model_copy(update={"fit": exp.fit.model_copy(update={"workers": 1, "block_frames": 16})})
    fit_experiment(one, progress=False)
    # forget the second block's results, as if killed after the first, and resume on 2 threads
    with transaction(exp.run.run_file) as session:
        session.writable()["/entry/peaks/done"][16:] = 0
    two = exp.model_copy(update={"fit": exp.fit.model_copy(update={"workers": 2, "block_frames": 16})})
    s = fit_experiment(two, progress=False)
    assert s.skipped == 16 and s.fitted == s.total - 16
    a = read_peaks(exp.run.run_file)
    straight = load_experiment(_with_output(syn, "straight"))
    integrate_experiment(straight, progress=False)
    fit_experiment(straight.model_copy(update={"fit": straight.fit.model_copy(update={"block_frames": 16})}),
                   progress=False)
    b = read_peaks(straight.run.run_file)
    for name in ("center", "fwhm", "area"):
        np.testing.assert_array_equal(a.values[name], b.values[name], err_msg=name)
    np.testing.assert_array_equal(a.present, b.present)
    np.testing.assert_array_equal(a.success, b.success)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "xrdpipe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _run(args):
    """The command run in this process (click's runner): as :func:`_cli`, without the start-up."""
    from click.testing import CliRunner

    from xrdpipe.cli import main

    res = CliRunner().invoke(main, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def test_kill_9_at_random_points_then_rerun_gives_the_straight_result(tmp_path, experiment):
    syn = experiment(tmp_path / "exp", n_frames=24, checkpoint_s=0.3)
    straight = _with_output(syn, "straight")
    t0 = time.monotonic()
    proc = _cli(["run", str(straight), "--quiet"])
    out, err = proc.communicate(timeout=300)
    span = time.monotonic() - t0
    assert proc.returncode == 0, err
    reference = load_experiment(straight).run.run_file
    killed_at = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        path = _with_output(syn, f"killed{seed}")
        for _ in range(2):                                # killed twice, at random moments
            proc = _cli(["run", str(path), "--quiet"])
            when = rng.uniform(0.2, 1.0) * span
            try:
                proc.wait(timeout=when)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at.append(round(when, 2))
        res = _run(["run", str(path), "--quiet"])          # the rerun: in this process (click's runner)
        assert res.exit_code == 0, res.output
        assert_same_results(reference, load_experiment(path).run.run_file)
        run_dir = load_experiment(path).run.output
        assert not list(run_dir.glob("*.work")) and not list(run_dir.glob("*.part"))
        for csv in ("peaks.csv", "lattice.csv", "frames.csv"):
            assert (run_dir / csv).read_text() == (reference.parent / csv).read_text(), csv
    assert len(killed_at) >= 2, f"the runs ended before they could be killed ({killed_at}, span {span:.1f} s)"


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_full_disk_is_a_clear_error_and_the_run_file_is_kept(tmp_path, experiment):
    syn = experiment(tmp_path / "exp", n_frames=16)
    exp = load_experiment(syn.experiment_file)
    run_experiment(exp, progress=False)
    run_file = exp.run.run_file
    before = _digest(run_file)
    os.utime(syn.cycler_file)         # the cycler file changed: echem, lattice, plots rerun
    limit = run_file.stat().st_size // 2

    def small_disk():                 # writes past `limit` bytes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "xrdpipe", "run", str(syn.experiment_file), "--quiet"],
                          capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 2
    assert "disk is full" in proc.stderr and str(run_file) in proc.stderr, proc.stderr
    assert _digest(run_file) == before                      # untouched, and still whole
    assert open_run(run_file).intensity.shape[0] == 16
    assert not list(run_file.parent.glob("*.work"))
    summary = run_experiment(exp, progress=False)           # with room again, it goes on
    assert summary.stages["echem"] == "ran" and summary.stages["integrate"] == "skipped"


def test_unwritable_output_folder_is_a_clear_error(tmp_path, experiment):
    syn = experiment(tmp_path / "exp", n_frames=8)
    blocker = syn.experiment_file.parent / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    path = syn.experiment_file
    path.write_text(path.read_text().replace('output = "results"', 'output = "not-a-folder/results"'))
    with pytest.raises(StoreError, match=r"cannot write in the output folder .*not-a-folder"):
        run_experiment(load_experiment(path), progress=False)


def test_a_second_writer_is_refused(series):
    _, reference = series
    with transaction(reference.run.run_file):
        code = ("import sys; from xrdpipe.safeio import transaction\n"
                "try:\n    transaction(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e)")
        out = subprocess.run([sys.executable, "-c", code, str(reference.run.run_file)], capture_output=True,
                             text=True, timeout=60).stdout
    assert f"being written by another xrdpipe process (pid {os.getpid()})" in out


def test_the_readme_scheduler_example_is_valid_and_a_bad_scheduler_is_named(tmp_path):
    from xrdpipe.errors import ConfigError

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Live processing, clusters and crashes")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "p.xy").write_text("1 2\n2 3\n")
    tail = '[patterns]\nfiles = "p.xy"\nwavelength_A = 0.6209\n'
    (tmp_path / "e.toml").write_text("schema_version = 1\n" + block + tail)
    exp = load_experiment(tmp_path / "e.toml")
    assert exp.run.scheduler == "processes" and exp.run.checkpoint_s == 30
    (tmp_path / "e.toml").write_text("schema_version = 1\n" + block.replace('"processes"', '"proceses"') + tail)
    with pytest.raises(ConfigError) as err:
        load_experiment(tmp_path / "e.toml")
    assert err.value.problems[0][0] == "run.scheduler"
    assert "\"processes\", \"threads\", \"serial\" or a Dask scheduler address" in err.value.problems[0][1]
