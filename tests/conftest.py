from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory):
    """A small synthetic O3/P3 experiment of EIGER-like HDF5 frames (not integrated)."""
    from xrdpipe.testing import make_experiment

    folder = tmp_path_factory.mktemp("syn_h5")
    return make_experiment(folder, n_frames=12, frames_per_file=5, seed=11, counts=1.0)
