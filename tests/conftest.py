import gc
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def _integrator_cache_in_tmp(tmp_path_factory):
    """The tests never touch the user's integrator cache: the default one is a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(autouse=True)
def _long_lived_objects_out_of_the_collectors_sight():
    """Whatever is alive when a test starts (imported modules, session and module fixtures) is
    frozen out of the garbage collector's sight (``gc.freeze``), after a collection of what the
    tests before left behind. pyFAI runs a full ``gc.collect()`` at every geometry reset (about
    30 per calibration), and each would otherwise walk the whole session's heap again:
    test_geometry_fit alone spent 21 s of its 87 s in the collector, 0.8 s with this. Nothing a
    test checks depends on it."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory):
    """A small synthetic O3/P3 experiment of EIGER-like HDF5 frames (not integrated)."""
    from xrdpipe.testing import make_experiment

    folder = tmp_path_factory.mktemp("syn_h5")
    return make_experiment(folder, n_frames=12, frames_per_file=5, seed=11, counts=1.0)


@pytest.fixture(scope="session")
def quick_experiment():
    """``quick_experiment(folder, **make_experiment_options)``: a synthetic experiment with light
    outputs (one contour map of the 003 window as PNG, .xye exports) and faint, beamline-like
    counts, for tests that run the whole chain many times."""
    from xrdpipe.testing import make_experiment

    light = ('[plots]\nkinds = ["contour"]\nformats = ["png"]\ndpi = 60\n[plots.contour]\nwindows = ["003"]\n\n'
             '[export]\nformats = ["xye"]\n')

    def make(folder: Path, **options):
        syn = make_experiment(folder, **{"counts": 0.02, "background": 20.0, **options})
        text = syn.experiment_file.read_text()
        syn.experiment_file.write_text(text[:text.index("# Figures of")] + light)
        return syn

    return make


@pytest.fixture
def coincell8(tmp_path):
    """The datalab coin cell (five Mythen patterns, scan log, Neware record) copied into a fresh
    folder with an experiment file; ``coincell8(extra)`` appends ``extra`` to it and loads it."""
    import shutil

    import xrdpipe

    for f in (DATA / "datalab-coincell8").iterdir():
        shutil.copy(f, tmp_path)

    def make(extra: str = ""):
        (tmp_path / "exp.toml").write_text(
            'schema_version = 1\n[run]\nname = "cc8"\n'
            # the wavelength only sets the Q axis here (the Mythen's is not given with the data)
            '[patterns]\nfiles = "*_summed_mythen3.xye"\nradial_unit = "2th_deg"\nwavelength_A = 0.825\n'
            'times = { log = "log_operando_coincell8_LDE2_reduced.csv", timezone = "Europe/London" }\n' + extra)
        return xrdpipe.load_experiment(tmp_path / "exp.toml")

    return make


@pytest.fixture
def config_folder(tmp_path):
    """A folder with the inputs the experiment-file tests name (frames, PONI, mask, scan log)."""
    (tmp_path / "raw").mkdir()
    for name in ("f10.h5", "f9.h5", "f1.h5"):
        (tmp_path / "raw" / name).write_bytes(b"")
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "ceo2.poni").write_text("Distance: 0.1\n")
    (tmp_path / "cal" / "mask.edf").write_bytes(b"")
    (tmp_path / "scans.csv").write_text("file,start,end\n")
    return tmp_path
