"""1D input: real Mythen patterns with their scan log, synthetic .xye, GSAS .fxye."""


import numpy as np
import pytest

import xrdpipe
from xrdpipe.errors import PatternReadError
from xrdpipe.patterns import read_pattern
from xrdpipe.testing import make_experiment


def test_real_mythen_patterns_with_scan_log(data_dir, coincell8):
    src = data_dir / "datalab-coincell8"
    exp = coincell8()
    summary = xrdpipe.integrate_experiment(exp, progress=False)
    assert summary.integrated == 5 and not summary.failed and summary.untimed == 0
    p = xrdpipe.open_run(exp.run.run_file)
    x, y, e = read_pattern(src / "1355639_summed_mythen3.xye")
    np.testing.assert_allclose(p.radial, x)
    np.testing.assert_allclose(p.intensity[0], y, rtol=1e-6)
    np.testing.assert_allclose(p.sigma[0], e, rtol=1e-6)
    # log: 19:05:59.614-19:06:56.167 and 19:15:03.582-19:15:59.280 (BST = UTC+1)
    # time_s: the middle of the exposure, in seconds since the first frame's start
    assert p.frames["time_s"][0] == pytest.approx((56.167 - 59.614 + 60) / 2, abs=1e-3)
    expected = (15 * 60 + 3.582 + 15 * 60 + 59.280) / 2 - (5 * 60 + 59.614)
    assert p.frames["time_s"][1] == pytest.approx(expected, abs=1e-3)
    assert p.frames["start"][0] == "2025-07-02T19:05:59.614000+01:00"


def test_synthetic_xye_round_trip(tmp_path):
    syn = make_experiment(tmp_path / "xye", n_frames=4, frame_format="xye", seed=5)
    exp = xrdpipe.load_experiment(syn.experiment_file)
    assert xrdpipe.integrate_experiment(exp, progress=False).integrated == 4
    p = xrdpipe.open_run(exp.run.run_file)
    t003 = [q for q in syn.peaks[0] if q["hkl"] == "003"][0]["tth_deg"]
    sel = np.abs(p.radial - t003) < 0.3
    assert abs(p.radial[sel][np.argmax(p.intensity[0][sel])] - t003) < 0.015


def test_gsas_fxye_and_bad_files(tmp_path):
    x = np.linspace(5, 10, 11)
    y = np.arange(11.0) + 100
    lines = ["synthetic", "BANK 1 11 11 CONS 500.0 50.0 0 0 FXYE"]
    lines += [f"{xi * 100:.3f} {yi:.3f} {np.sqrt(yi):.4f}" for xi, yi in zip(x, y)]
    (tmp_path / "p.fxye").write_text("\n".join(lines) + "\n")
    rx, ry, re = read_pattern(tmp_path / "p.fxye")
    np.testing.assert_allclose(rx, x)
    np.testing.assert_allclose(ry, y)
    np.testing.assert_allclose(re, np.sqrt(y), rtol=1e-4)
    (tmp_path / "bad.xy").write_text("# only a header\n")
    with pytest.raises(PatternReadError, match=r"bad.xy: no numeric data"):
        read_pattern(tmp_path / "bad.xy")
    (tmp_path / "down.xy").write_text("2 1\n1 1\n")
    with pytest.raises(PatternReadError, match="must increase"):
        read_pattern(tmp_path / "down.xy")
