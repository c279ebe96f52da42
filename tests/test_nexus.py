"""The run file as NeXus that tools trust: every result a user would plot (patterns, fitted
centres, lattice, fractions, voltage) is an NXdata that silx accepts, with its axes and units,
and the @default chain leads silx view and h5web from the root to the pattern stack."""

import numpy as np
import pytest

import xrdpipe
from xrdpipe.config import load_experiment

h5py = pytest.importorskip("h5py")
nxdata = pytest.importorskip("silx.io.nxdata")

VIEWS = {  # group: (signal units, axis, axis units)
    "patterns": ("counts", "tth", "degree"),
    "results/centres": ("degree", "frame", None),
    "results/lattice_a": ("angstrom", "frame", None),
    "results/lattice_c": ("angstrom", "frame", None),
    "results/volume": ("angstrom^3", "frame", None),
    "results/fractions": ("", "frame", None),
    "results/voltage": ("V", "time_s", "s"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, quick_experiment):
    # light figures (one contour PNG at 60 dpi): the views are what is tested, not the figures
    syn = quick_experiment(tmp_path_factory.mktemp("nx") / "exp", n_frames=10, counts=0.002, background=100.0,
                           seed=5, run_name="nx")
    exp = load_experiment(syn.experiment_file)
    xrdpipe.run_experiment(exp, progress=False)
    return exp


def _attr(obj, name):
    v = obj.attrs.get(name)
    return v.decode() if isinstance(v, bytes) else v


def test_every_result_is_valid_nxdata_with_axes_and_units(run):
    with h5py.File(run.run.run_file, "r") as h5:
        for path, (units, axis, axis_units) in VIEWS.items():
            g = h5[f"/entry/{path}"]
            assert nxdata.is_valid_nxdata(g), path
            nx = nxdata.NXdata(g)
            assert nx.is_valid and nx.signal is not None, path
            assert _attr(nx.signal, "units") == units or (units == "" and _attr(nx.signal, "units") in ("", None)), path
            assert nx.axes_dataset_names[-1] == axis, path
            if axis_units:
                assert _attr(nx.axes[-1], "units") == axis_units, path
            assert nx.axes[-1].shape[0] == nx.signal.shape[-1], path


def test_the_default_chain_leads_to_the_pattern_stack(run):
    with h5py.File(run.run.run_file, "r") as h5:
        assert _attr(h5, "default") == "entry" and _attr(h5["entry"], "default") == "patterns"
        assert nxdata.is_NXroot_with_default_NXdata(h5)
        assert nxdata.get_default(h5).signal.name == "/entry/patterns/intensity"


def test_the_views_hold_the_results(run):
    res = xrdpipe.open_results(run.run.run_file)
    with h5py.File(run.run.run_file, "r") as h5:
        centres = nxdata.NXdata(h5["/entry/results/centres"])
        curves = [centres.signal, *centres.auxiliary_signals]
        assert [c.name.rsplit("/", 1)[1] for c in curves] == list(res.peaks.component.values)
        shown = (res.peaks.present & res.peaks.done).values
        for j, c in enumerate(curves):
            np.testing.assert_array_equal(c[()], np.where(shown[:, j], res.peaks.center.values[:, j], np.nan))
        np.testing.assert_array_equal(h5["/entry/results/centres"][centres.signal.name.rsplit("/", 1)[1] + "_errors"],
                                      np.where(shown[:, 0], res.peaks.center_err.values[:, 0], np.nan))
        lat = nxdata.NXdata(h5["/entry/results/lattice_c"])
        phases = [lat.signal, *lat.auxiliary_signals]
        assert [p.name.rsplit("/", 1)[1] for p in phases] == list(res.lattice.phase.values)
        for i, p in enumerate(phases):
            np.testing.assert_array_equal(p[()], res.lattice.c_A.values[:, i])
        np.testing.assert_array_equal(lat.axes[0][()], res.lattice.frame.values)
        frac = nxdata.NXdata(h5["/entry/results/fractions"])
        np.testing.assert_array_equal(frac.signal[()], res.lattice.fraction.values[:, 0])
        volt = nxdata.NXdata(h5["/entry/results/voltage"])
        np.testing.assert_array_equal(volt.signal[()], res.record.voltage_V.values)    # a link, not a copy
        assert h5["/entry/results/voltage"].get("voltage", getlink=True).path == "/entry/electrochemistry/record/voltage_V"
