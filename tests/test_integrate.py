"""The integration stage end to end on synthetic experiments with known truth."""

import shutil
from datetime import datetime, timedelta

import h5py
import numpy as np
import pytest
from scipy.optimize import curve_fit

import xrdpipe
from xrdpipe.errors import CalibrationError, StoreError
from xrdpipe.frames import list_frames, read_frame
from xrdpipe.run.store import DONE, FAILED, RunFile
from xrdpipe.testing import make_experiment

#: a small detector (2θ 3.6-12.4°, the 003 and 006 lines) for the tests of frame formats and
#: their failures, where the size of the image does not matter
SMALL = dict(shape=(192, 192), npt=800)


def _copy(syn, tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(syn.folder, dst, ignore=shutil.ignore_patterns("results"))
    return dst


def _pv(x, c, area, w, eta, b0, b1):
    g = np.sqrt(4 * np.log(2) / np.pi) / w * np.exp(-4 * np.log(2) * ((x - c) / w) ** 2)
    lz = 2 / (np.pi * w) / (1 + 4 * ((x - c) / w) ** 2)
    return area * (eta * lz + (1 - eta) * g) + b0 + b1 * (x - c)


def test_round_trip_puts_truth_peaks_at_true_angles(synthetic_h5, tmp_path):
    exp = xrdpipe.load_experiment(_copy(synthetic_h5, tmp_path) / "experiment.toml")
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.integrated == 12 and not summary.failed
    p = xrdpipe.open_run(exp.run.run_file)
    errors = []
    for f, peaks in enumerate(synthetic_h5.peaks):
        tths = np.array([q["tth_deg"] for q in peaks])
        for q in peaks:
            t = q["tth_deg"]
            others = np.abs(tths - t)
            others = others[others > 0]
            # isolated, strong, well inside the detector's range
            if (others.size and others.min() < 0.5) or q["area"] < 200 or not (p.radial[0] + 1 < t < p.radial[-1] - 1):
                continue
            sel = (p.radial > t - 0.35) & (p.radial < t + 0.35) & np.isfinite(p.intensity[f])
            y = p.intensity[f][sel]
            popt, _ = curve_fit(_pv, p.radial[sel], y, sigma=p.sigma[f][sel],
                                p0=[t, q["area"], 0.08, 0.4, y.min(), 0],
                                bounds=([t - 0.1, 0, 0.02, 0, -np.inf, -np.inf],
                                        [t + 0.1, np.inf, 0.3, 1, np.inf, np.inf]))
            errors.append(popt[0] - t)
    errors = np.array(errors)
    assert errors.size >= 40
    assert np.abs(errors).max() < 0.002, np.abs(errors).max()


def test_header_times_are_mid_exposure(synthetic_h5, tmp_path):
    exp = xrdpipe.load_experiment(_copy(synthetic_h5, tmp_path) / "experiment.toml")
    xrdpipe.integrate_experiment(exp, progress=False)
    frames = xrdpipe.open_run(exp.run.run_file).frames
    for i, (s, e) in enumerate(synthetic_h5.times):
        mid = s + (e - s) / 2
        assert frames["timestamp"][i] == pytest.approx(mid.timestamp(), abs=1e-3)
        assert datetime.fromisoformat(frames["start"][i]) == s
    assert frames["time_s"][1] - frames["time_s"][0] == pytest.approx(20.0)


def test_run_file_is_nexus_with_default_chain_and_provenance(synthetic_h5, tmp_path):
    exp = xrdpipe.load_experiment(_copy(synthetic_h5, tmp_path) / "experiment.toml")
    xrdpipe.integrate_experiment(exp, progress=False)
    with h5py.File(exp.run.run_file, "r") as h5:
        assert h5.attrs["default"] == "entry"
        assert h5["entry"].attrs["default"] == "patterns"
        nxdata = h5["entry/patterns"]
        assert nxdata.attrs["NX_class"] == "NXdata"
        assert nxdata.attrs["signal"] == "intensity"
        assert list(nxdata.attrs["axes"]) == ["frame", "tth"]
        assert nxdata["intensity"].shape == (12, 2000)
        assert nxdata["intensity_errors"].shape == (12, 2000)
        assert nxdata["tth"].attrs["units"] == "degree"
        # Q axis consistent with 2θ at the wavelength
        q = nxdata["q"][()]
        tth = nxdata["tth"][()]
        assert np.allclose(q, 4 * np.pi * np.sin(np.radians(tth / 2)) / 0.6209)
        proc = h5["entry/process"]
        assert "[integration]" in proc["experiment"][()].decode()
        assert "Wavelength" in proc["poni"][()].decode()
        assert "pyFAI" in proc["packages"][()].decode()


def test_interrupted_run_resumes_and_matches_a_clean_run(synthetic_h5, tmp_path, monkeypatch):
    exp = xrdpipe.load_experiment(_copy(synthetic_h5, tmp_path) / "experiment.toml")
    real_write = RunFile.write_pattern
    calls = {"n": 0}

    def interrupting(self, *args, **kwargs):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(RunFile, "write_pattern", interrupting)
    with pytest.raises(KeyboardInterrupt):
        xrdpipe.integrate_experiment(exp, progress=False)
    monkeypatch.setattr(RunFile, "write_pattern", real_write)
    partial = xrdpipe.open_run(exp.run.run_file)
    assert (partial.frames["status"] == DONE).sum() == 5
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.skipped == 5 and summary.integrated == 7
    resumed = xrdpipe.open_run(exp.run.run_file)
    again = xrdpipe.integrate_experiment(exp, progress=False)
    assert again.integrated == 0 and again.skipped == 12
    clean = xrdpipe.integrate_experiment(exp, progress=False, restart=True)
    assert clean.integrated == 12
    fresh = xrdpipe.open_run(exp.run.run_file)
    np.testing.assert_allclose(resumed.intensity, fresh.intensity, rtol=1e-6)


def test_changed_settings_refuse_to_mix(synthetic_h5, tmp_path):
    folder = _copy(synthetic_h5, tmp_path)
    exp = xrdpipe.load_experiment(folder / "experiment.toml")
    xrdpipe.integrate_experiment(exp, progress=False)
    toml = folder / "experiment.toml"
    toml.write_text(toml.read_text().replace("npt = 2000", "npt = 1500"))
    exp2 = xrdpipe.load_experiment(toml)
    with pytest.raises(StoreError, match=r"changed: integration.*--restart"):
        xrdpipe.integrate_experiment(exp2, progress=False)
    assert xrdpipe.integrate_experiment(exp2, progress=False, restart=True).integrated == 12
    assert xrdpipe.open_run(exp2.run.run_file).intensity.shape == (12, 1500)


def test_a_poni_saved_again_with_its_geometry_resumes_and_another_geometry_refuses(synthetic_h5, tmp_path):
    """pyFAI writes the date of each save in a comment ("# Calibration done on ..."): a PONI saved
    again with the same geometry, or with comments and blank lines changed, resumes the run (it
    was "changed: poni", every frame to integrate again); a run file of an earlier version, which
    stored the digest of the whole text, resumes too; a changed distance still refuses to mix."""
    import json

    from xrdpipe.run.integrate import _digest
    from xrdpipe.run.paths import FINGERPRINT, h5path

    folder = _copy(synthetic_h5, tmp_path)
    exp = xrdpipe.load_experiment(folder / "experiment.toml")
    assert xrdpipe.integrate_experiment(exp, progress=False).integrated == 12
    poni = folder / "demo.poni"
    text = poni.read_text()
    assert "# Calibration done" in text
    poni.write_text("# Calibration done on Thu Dec  3 21:00:00 2026\n\n"
                    + "\n".join(f"  {line}" for line in text.splitlines() if not line.startswith("#")) + "\n")
    again = xrdpipe.integrate_experiment(xrdpipe.load_experiment(folder / "experiment.toml"), progress=False)
    assert again.integrated == 0 and again.skipped == 12
    # a run file that stored the digest of the whole PONI text (before 2026-12-03)
    with h5py.File(exp.run.run_file, "r+") as h5:
        stored = json.loads(h5[h5path(FINGERPRINT)][()])
        stored["poni"] = _digest(poni.read_text())
        del h5[h5path(FINGERPRINT)]
        h5[h5path(FINGERPRINT)] = json.dumps(stored)
    again = xrdpipe.integrate_experiment(xrdpipe.load_experiment(folder / "experiment.toml"), progress=False)
    assert again.integrated == 0 and again.skipped == 12
    lines = poni.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if line.strip().startswith("Distance:"))
    lines[k] = f"Distance: {float(lines[k].split(':')[1]) * 1.001!r}"
    poni.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=r"changed: poni\); to discard them and integrate again: xrdpipe "
                                         r"integrate EXPERIMENT.toml --restart \(from Python: "
                                         r"integrate_experiment\(exp, restart=True\)\)"):
        xrdpipe.integrate_experiment(xrdpipe.load_experiment(folder / "experiment.toml"), progress=False)


def test_a_synthetic_experiment_made_again_in_its_folder_resumes(tmp_path):
    """make_experiment into the folder it made before (a script run twice): the PONI is written
    anew, not added to (pyFAI appends to a file that exists), and the run resumes."""
    kw = dict(scenario="nfm", n_frames=4, n_rest=0, seed=3)
    first = make_experiment(tmp_path / "exp", **kw)
    text = first.poni_file.read_text()
    xrdpipe.integrate_experiment(xrdpipe.load_experiment(first.experiment_file), progress=False)
    again = make_experiment(tmp_path / "exp", **kw)
    assert again.poni_file.read_text().count("Distance:") == 1 == text.count("Distance:")
    summary = xrdpipe.integrate_experiment(xrdpipe.load_experiment(again.experiment_file), progress=False)
    assert summary.integrated == 0 and summary.skipped == 4


def test_a_synthetic_experiment_names_what_it_takes(tmp_path):
    """A scenario is named in any case; another name, or no frame, is a ValueError saying what it
    takes (a bare KeyError: 'NFM', and an experiment of no frame, before), and nothing is written."""
    assert make_experiment(tmp_path / "a", scenario="NFM", n_frames=2, n_rest=0, frame_format="xye").scenario.name == "nfm"
    with pytest.raises(ValueError, match=r"^scenario 'O3': expected one of 'nfm', 'mcm' or a Scenario$"):
        make_experiment(tmp_path / "b", scenario="O3", n_frames=2)
    with pytest.raises(ValueError, match=r"^n_frames = 0: an experiment needs at least one frame$"):
        make_experiment(tmp_path / "c", n_frames=0)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_dataset_in_no_file_is_named_not_the_times_read_from_it(synthetic_h5, tmp_path):
    """A [frames] dataset that no file holds, with times read from the frames' headers: the error
    names the dataset (it named frames.times: 'no file could be read; use times = { log = ...')."""
    from xrdpipe.errors import ConfigError

    folder = _copy(synthetic_h5, tmp_path)
    toml = folder / "experiment.toml"
    toml.write_text(toml.read_text().replace('dataset = "/entry/data/data"', 'dataset = "/entry/data/dat"'))
    with pytest.raises(ConfigError) as err:
        xrdpipe.integrate_experiment(xrdpipe.load_experiment(toml), progress=False)
    assert err.value.problems == [("frames", f"no frame can be read: {sorted((folder / 'raw').glob('*.h5'))[0]}: "
                                             "no dataset '/entry/data/dat' in the file (frames.dataset)")]


def test_a_run_whose_every_frame_failed_is_made_anew_once_the_setting_is_put_right(synthetic_h5, tmp_path):
    """Every frame failed (a dataset no file holds, the times given): the file holds no pattern,
    so the dataset put right integrates every frame (it refused, 'holds patterns made with other
    settings (changed: dataset)', with none); a file with patterns still refuses to mix."""
    folder = _copy(synthetic_h5, tmp_path)
    toml = folder / "experiment.toml"
    good = toml.read_text().replace('times = "header"', 'times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }')
    toml.write_text(good.replace('dataset = "/entry/data/data"', 'dataset = "/entry/data/dat"'))
    failed = xrdpipe.integrate_experiment(xrdpipe.load_experiment(toml), progress=False)
    assert failed.integrated == 0 and len(failed.failed) == 3          # (one failed listing per file)
    toml.write_text(good)
    assert xrdpipe.integrate_experiment(xrdpipe.load_experiment(toml), progress=False).integrated == 12
    toml.write_text(good.replace("npt = 2000", "npt = 1500"))
    with pytest.raises(StoreError, match=r"holds patterns made with other settings \(changed: integration\)"):
        xrdpipe.integrate_experiment(xrdpipe.load_experiment(toml), progress=False)


def test_bad_frames_are_recorded_and_the_run_goes_on(synthetic_h5, tmp_path):
    folder = _copy(synthetic_h5, tmp_path)
    raw = sorted((folder / "raw").glob("*.h5"))
    # a truncated stack file, and a stack whose frames have the wrong shape
    data = raw[1].read_bytes()
    raw[1].write_bytes(data[: len(data) // 3])
    with h5py.File(folder / "raw" / "zz_wrong_shape.h5", "w") as h5:
        h5["/entry/data/data"] = np.zeros((2, 100, 100), np.uint32)
    exp = xrdpipe.load_experiment(folder / "experiment.toml")
    # times from the header cannot come from a truncated file: use a period instead
    toml = folder / "experiment.toml"
    toml.write_text(toml.read_text().replace('times = "header"',
                    'times = { start = "2025-07-02T19:05:59+08:00", period_s = 20.0 }'))
    exp = xrdpipe.load_experiment(toml)
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    p = xrdpipe.open_run(exp.run.run_file)
    status = p.frames["status"]
    failed_msgs = [m for m, s in zip(p.frames["message"], status) if s == FAILED]
    assert summary.integrated == 7  # files 1 and 3 of the 12-frame, 5-per-file stack
    assert len(summary.failed) == len(failed_msgs) == 3
    assert any("HDF5" in m or "cannot" in m for m in failed_msgs)
    assert sum("not the detector's 512 x 512" in m for m in failed_msgs) == 2
    assert np.isnan(p.intensity[status == FAILED]).all()
    assert np.isfinite(p.intensity[status == DONE][:, 1000]).all()


def test_unreadable_cbf_frame(tmp_path):
    syn = make_experiment(tmp_path / "cbf", n_frames=4, frame_format="cbf", seed=2, **SMALL)
    bad = syn.frame_files[2]
    bad.write_bytes(bad.read_bytes()[:2000])
    exp = xrdpipe.load_experiment(syn.experiment_file)  # times from the CBF headers
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.integrated == 3
    assert len(summary.failed) == 1 and bad.name in summary.failed[0][0]
    assert summary.untimed == 1


def test_header_times_missing_everywhere_is_a_config_error(tmp_path):
    syn = make_experiment(tmp_path / "tif", n_frames=2, frame_format="tiff", seed=2, **SMALL)
    toml = syn.experiment_file
    toml.write_text(toml.read_text().replace("times = {", 'times = "header"\n#times = {'))
    exp = xrdpipe.load_experiment(toml)
    with pytest.raises(xrdpipe.ConfigError, match=r"frames.times: times = \"header\" but .*tif gives no frame time"):
        xrdpipe.integrate_experiment(exp, progress=False)


@pytest.mark.parametrize("fmt", ["cbf", "edf", "tiff"])
def test_fabio_formats_and_their_times(fmt, tmp_path):
    syn = make_experiment(tmp_path / fmt, n_frames=3, frame_format=fmt, seed=4, **SMALL)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.integrated == 3 and not summary.failed
    p = xrdpipe.open_run(exp.run.run_file)
    mids = [(s + (e - s) / 2).timestamp() for s, e in syn.times]
    np.testing.assert_allclose(p.frames["timestamp"], mids, atol=1e-3)
    # the strongest O3 peak, (003), is where the truth puts it
    t003 = [q for q in syn.peaks[0] if q["hkl"] == "003"][0]["tth_deg"]
    sel = np.abs(p.radial - t003) < 0.3
    assert abs(p.radial[sel][np.nanargmax(p.intensity[0][sel])] - t003) < 0.02


def test_missing_poni_wavelength_and_mask_shape(synthetic_h5, tmp_path):
    folder = _copy(synthetic_h5, tmp_path)
    poni = folder / "demo.poni"
    with pytest.raises(CalibrationError, match="does not exist"):
        xrdpipe.load_calibration(folder / "nope.poni")
    text = poni.read_text()
    (folder / "nowl.poni").write_text("\n".join(l for l in text.splitlines() if not l.startswith("Wavelength")))
    with pytest.raises(CalibrationError, match=r"nowl.poni has no wavelength"):
        xrdpipe.load_calibration(folder / "nowl.poni")
    import fabio

    fabio.edfimage.EdfImage(data=np.zeros((100, 100), np.int8)).write(str(folder / "small.edf"))
    with pytest.raises(CalibrationError, match=r"mask image .*small.edf is 100 x 100 pixels, not the detector's 512 x 512 \(from the detector in"):
        xrdpipe.load_calibration(poni, mask=folder / "small.edf")


def test_list_and_read_frames_of_a_stack(synthetic_h5):
    refs = list_frames(synthetic_h5.frame_files, dataset="/entry/data/data")
    assert len(refs) == 12 and [r.index for r in refs[:6]] == [0, 1, 2, 3, 4, 0]
    frame = read_frame(refs[7], shape=(512, 512))
    assert frame.dtype == np.uint32 and frame.shape == (512, 512)
    with pytest.raises(xrdpipe.FrameReadError, match=r"frame 2: shape 512 x 512 is not the detector's 10 x 10"):
        read_frame(refs[2], shape=(10, 10))


def test_scan_log_times(synthetic_h5, tmp_path):
    folder = _copy(synthetic_h5, tmp_path)
    lines = ["file,start_time,end_time"]
    for f in sorted((folder / "raw").glob("*.h5")):
        with h5py.File(f, "r") as h5:
            n = h5["/entry/data/data"].shape[0]
        for i in range(n):
            t0 = datetime(2025, 7, 2, 12, 0, 0) + timedelta(seconds=10 * len(lines))
            lines.append(f"{f.name}:{i},{t0:%Y-%m-%d %H:%M:%S},{t0 + timedelta(seconds=4):%Y-%m-%d %H:%M:%S}")
    (folder / "scans.csv").write_text("\n".join(lines[:7]) + "\n")  # some frames are missing
    toml = folder / "experiment.toml"
    toml.write_text(toml.read_text().replace('times = "header"', 'times = { log = "scans.csv", timezone = "UTC" }'))
    exp = xrdpipe.load_experiment(toml)
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.untimed == 6
    p = xrdpipe.open_run(exp.run.run_file)
    ts = p.frames["timestamp"]
    assert ts[0] == pytest.approx(datetime.fromisoformat("2025-07-02T12:00:12+00:00").timestamp())
    assert ts[1] - ts[0] == pytest.approx(10.0)
    assert np.isnan(ts[6:]).all()  # never matched to a neighbour's row
