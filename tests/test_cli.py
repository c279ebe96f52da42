"""The command line and the public API surface."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import xrdpipe
from xrdpipe.cli import main


def test_public_api_is_curated():
    assert sorted(xrdpipe.__all__) == sorted([
        "__version__", "Calibration", "CalibrationError", "ConfigError", "Experiment", "FrameReadError",
        "Integrator", "PatternReadError", "StoreError", "WindowModel", "XrdpipeError", "fit_experiment", "fit_peaks", "fit_phases",
        "integrate_experiment", "load_calibration", "load_experiment", "open_run", "CyclerReadError",
        "echem_experiment", "read_cycler", "run_experiment", "plot_experiment", "export_experiment",
        "PlotError", "RefinementError", "StructureError", "WindowSetupError", "lmfit_model",
        "open_dataset", "open_results", "lattice_experiment", "refine_experiment", "report_experiment"])
    for name in xrdpipe.__all__:
        assert hasattr(xrdpipe, name)


def test_every_stage_takes_an_experiment_or_its_file_and_says_so_for_anything_else(tmp_path):
    """The stage runners take what load_experiment gives or the experiment file's path (str or
    Path); anything else is a TypeError naming the runner and what it takes (it was an
    AttributeError from deep inside: 'str' object has no attribute 'patterns')."""
    from xrdpipe.testing import make_experiment

    syn = make_experiment(tmp_path / "syn", n_frames=4, n_rest=0, frame_format="xye", seed=3)
    assert xrdpipe.integrate_experiment(str(syn.experiment_file), progress=False).integrated == 4
    assert xrdpipe.integrate_experiment(syn.experiment_file, progress=False).skipped == 4
    assert xrdpipe.echem_experiment(syn.experiment_file).status == {"ok": 4}
    runners = ("integrate", "fit", "echem", "lattice", "refine", "plot", "export", "report", "run")
    for name in runners:
        runner = getattr(xrdpipe, f"{name}_experiment")
        assert runner.__name__ == f"{name}_experiment" and runner.__doc__ == runner.__wrapped__.__doc__
        with pytest.raises(TypeError, match=rf"^{name}_experiment takes an Experiment \(xrdpipe.load_experiment"
                                            r"\(\"experiment.toml\"\)\) or the path of an experiment file, "
                                            r"not dict$"):
            runner({"file": "experiment.toml"})


def test_help_does_not_import_pyfai():
    code = ("import sys; from xrdpipe.cli import main; "
            "assert 'pyFAI' not in sys.modules and 'lmfit' not in sys.modules and 'xarray' not in sys.modules; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``xrdpipe demo`` of 8 frames, run once for the module: its folder and its output."""
    out = tmp_path_factory.mktemp("cli") / "demo"
    res = CliRunner().invoke(main, ["demo", str(out), "--frames", "8", "--quiet"])
    return out, res


def test_demo_then_integrate_resumes_with_nothing_to_do(demo):
    runner = CliRunner()
    out, res = demo
    assert res.exit_code == 0, res.output
    assert "8 frame(s): 8 integrated now" in res.output
    assert "8 frame(s): 8 fitted now" in res.output and (out / "results" / "peaks.csv").exists()
    assert "figure: " in res.output and (out / "results" / "figures" / "demo-nfm_contour.png").exists()
    run_file = out / "results" / "demo-nfm.nxs"
    assert run_file.exists()
    p = xrdpipe.open_run(run_file)
    assert p.intensity.shape == (8, 2000) and np.isfinite(p.intensity[:, 500]).all()
    res = runner.invoke(main, ["integrate", str(out / "experiment.toml"), "-q"])
    assert res.exit_code == 0 and "0 integrated now, 8 already done" in res.output


def test_a_demo_asked_of_another_size_in_its_folder_says_it_is_not_simulated_again(demo, tmp_path):
    """``xrdpipe demo`` into the folder of a demo of 8 frames with --frames 12: it runs the one
    there and says that it did not simulate 12 (it only said "already simulated"); the same
    options as the folder's, or none, say nothing more."""
    src, res = demo
    assert res.exit_code == 0, res.output
    out = tmp_path / "demo"
    shutil.copytree(src, out)
    again = CliRunner().invoke(main, ["demo", str(out), "--frames", "12", "--quiet"])
    assert again.exit_code == 0, again.output
    assert (f"  not simulated again for --frames 12 (it holds 8): delete {out}/ or give another folder"
            in again.output.splitlines())
    for same in (["--frames", "8"], ["--scenario", "nfm"], []):
        quiet = CliRunner().invoke(main, ["demo", str(out), *same, "--quiet"])
        assert quiet.exit_code == 0 and "not simulated again" not in quiet.output


def test_integrate_reports_calibration_errors_in_one_line(demo, tmp_path):
    runner = CliRunner()
    src, res = demo
    assert res.exit_code == 0, res.output
    out = tmp_path / "demo"         # a copy of the demo's run, whose PONI loses its wavelength
    shutil.copytree(src, out)
    poni = out / "demo.poni"
    poni.write_text("\n".join(l for l in poni.read_text().splitlines() if not l.startswith("Wavelength")))
    res = runner.invoke(main, ["integrate", str(out / "experiment.toml"), "--restart", "-q"])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: PONI file") and "has no wavelength" in res.output
    assert "Traceback" not in res.output
