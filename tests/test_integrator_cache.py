"""The integrator cache: content-addressed, never stale, never trusted when damaged."""

import pickle
import warnings

import numpy as np
import pytest

from xrdpipe.calibration import Calibration
from xrdpipe.integration import Integrator
from xrdpipe.integrator_cache import CacheWarning, default_cache_dir
from xrdpipe.testing import demo_geometry, demo_mask

SHAPE = (160, 160)


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(3)
    ai = demo_geometry(SHAPE)
    mask = demo_mask(SHAPE)
    frame = rng.poisson(40 + 25 * np.cos(np.arange(SHAPE[1]) / 5.0)[None, :], SHAPE).astype(np.uint32)
    frame[mask] = np.iinfo(np.uint32).max
    return ai, mask, frame


def _cal(ai, mask):
    return Calibration(None, ai, 0.6209, SHAPE, mask)


def _entries(folder):
    return sorted(folder.glob("*.xpi"))


def test_hit_is_memory_mapped_and_bit_identical(parts, tmp_path):
    ai, mask, frame = parts
    cal = _cal(ai, mask)
    first = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert not first.cache_hit and first.cache_file == _entries(tmp_path)[0]
    again = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert again.cache_hit and again.cache_file == first.cache_file
    assert isinstance(again._arrays["data"], np.memmap)
    plain = Integrator(cal, SHAPE, npt=400)
    in_worker = pickle.loads(pickle.dumps(again))          # a worker process memory-maps it too
    passed_on = pickle.loads(pickle.dumps(in_worker))      # and hands it on (Dask replicates data)
    for integ in (first, again, in_worker, passed_on):
        np.testing.assert_array_equal(integ.radial, plain.radial)
        for a, b in zip(integ.integrate(frame), plain.integrate(frame)):
            np.testing.assert_array_equal(a, b)
    assert len(_entries(tmp_path)) == 1


def test_changed_mask_poni_or_npt_never_hits_a_stale_entry(parts, tmp_path):
    import copy

    ai, mask, frame = parts
    assert Integrator(_cal(ai, mask), SHAPE, npt=400, cache=tmp_path).cache_file is not None
    mask2 = mask.copy()
    mask2[80:90, 100:110] = True
    ai2 = copy.deepcopy(ai)
    ai2.poni1 = ai.poni1 + 75e-6                     # the beam centre one pixel away
    variants = [(_cal(ai, mask2), 400), (_cal(ai2, mask), 400), (_cal(ai, mask), 401)]
    for cal, npt in variants:
        cached = Integrator(cal, SHAPE, npt=npt, cache=tmp_path)
        assert not cached.cache_hit and cached.cache_file is not None   # (waits for the file)
        fresh = Integrator(cal, SHAPE, npt=npt)
        np.testing.assert_array_equal(cached.radial, fresh.radial)
        np.testing.assert_array_equal(cached.integrate(frame)[0], fresh.integrate(frame)[0])
    assert len(_entries(tmp_path)) == 4
    # each variant now hits its own entry
    assert all(Integrator(cal, SHAPE, npt=npt, cache=tmp_path).cache_hit for cal, npt in variants)


def test_truncated_corrupt_or_foreign_entries_are_rebuilt(parts, tmp_path):
    ai, mask, frame = parts
    cal = _cal(ai, mask)
    good = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    path = good.cache_file
    whole = path.read_bytes()
    expected = good.integrate(frame)[0]

    path.write_bytes(whole[: len(whole) // 2])                 # truncated
    with pytest.warns(CacheWarning, match=r"ignoring the integrator cache entry .*\.xpi \(\d+ bytes, expected "
                                          r"\d+ \(truncated\?\)\); building it again"):
        rebuilt = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert not rebuilt.cache_hit
    np.testing.assert_array_equal(rebuilt.integrate(frame)[0], expected)
    assert rebuilt.cache_file == path and path.read_bytes() == whole   # written whole again

    damaged = bytearray(whole)
    damaged[-1000] ^= 0xFF                                      # a flipped byte in the arrays
    path.write_bytes(bytes(damaged))
    with pytest.warns(CacheWarning, match=r"checksum of \w+ does not match \(corrupt\)"):
        integ = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert not integ.cache_hit and integ.cache_file == path

    other = Integrator(cal, SHAPE, npt=300, cache=tmp_path)     # another key's entry under this name
    path.write_bytes(other.cache_file.read_bytes())
    with pytest.warns(CacheWarning, match="its key is not the one asked for"):
        integ = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert not integ.cache_hit and integ.cache_file == path

    path.write_bytes(b"PK\x03\x04 not ours")
    with pytest.warns(CacheWarning, match="not an xrdpipe integrator cache file"):
        integ = Integrator(cal, SHAPE, npt=400, cache=tmp_path)
    assert not integ.cache_hit and integ.cache_file == path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Integrator(cal, SHAPE, npt=400, cache=tmp_path).cache_hit


def test_experiment_file_default_folder_and_switch_off(synthetic_h5, tmp_path, monkeypatch):
    import xrdpipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "xrdpipe" / "integrators"
    text = synthetic_h5.experiment_file.read_text()
    exp_file = synthetic_h5.experiment_file.parent / "cache_exp.toml"
    exp_file.write_text(text.replace('output = "results"', 'output = "cache_results"', 1))
    exp = xrdpipe.load_experiment(exp_file)
    first = xrdpipe.integrate_experiment(exp, progress=False, restart=True, scheduler="serial")
    entries = _entries(tmp_path / "xdg" / "xrdpipe" / "integrators")
    assert len(entries) == 1 and first.cache_file == entries[0] and not first.cache_hit
    assert "integrator built and cached" in str(first) and "setup " in str(first)
    second = xrdpipe.integrate_experiment(exp, progress=False, restart=True, scheduler="serial")
    assert second.cache_hit and "(integrator reused)" in str(second)
    p1 = xrdpipe.open_run(exp.run.run_file).intensity
    assert np.isfinite(p1).any()

    exp_file.write_text(exp_file.read_text().replace("[run]\n", '[run]\ncache_dir = "my_cache"\n', 1))
    exp = xrdpipe.load_experiment(exp_file)
    assert exp.run.cache_dir == exp_file.parent / "my_cache"
    third = xrdpipe.integrate_experiment(exp, progress=False, restart=True, scheduler="serial")
    assert third.cache_file.parent == exp_file.parent / "my_cache" and not third.cache_hit
    np.testing.assert_array_equal(xrdpipe.open_run(exp.run.run_file).intensity, p1)

    exp_file.write_text(exp_file.read_text().replace("[run]\n", "[run]\ncache = false\n", 1))
    exp = xrdpipe.load_experiment(exp_file)
    off = xrdpipe.integrate_experiment(exp, progress=False, restart=True, scheduler="serial")
    assert off.cache_file is None and not off.cache_hit and "(integrator built)" in str(off)
    assert len(_entries(exp_file.parent / "my_cache")) == 1
