"""Two runs' results compared to the bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_same_results(a: Path | str, b: Path | str) -> None:
    """Assert that two run files hold the same frames (none twice), patterns, fitted peaks,
    lattice and electrochemistry, bit for bit (NaN equal to NaN). For checking that a resumed,
    live or distributed run gives what a straight serial run gives."""
    from ..run.groups import has_group, read_table
    from ..run.peakstore import read_peaks
    from ..run.store import open_run

    pa, pb = open_run(a), open_run(b)
    assert list(pa.frames["key"]) == list(pb.frames["key"]), "not the same frames, in the same order"
    assert len(set(pa.frames["key"])) == len(pa.frames["key"]), "a frame appears twice"
    np.testing.assert_array_equal(pa.frames["status"], pb.frames["status"])
    np.testing.assert_array_equal(pa.intensity, pb.intensity)
    np.testing.assert_array_equal(pa.sigma, pb.sigma)
    assert has_group(a, "peaks") == has_group(b, "peaks")
    if has_group(a, "peaks"):
        qa, qb = read_peaks(a), read_peaks(b)
        for name in ("center", "center_err", "fwhm", "area", "area_err"):
            np.testing.assert_array_equal(qa.values[name], qb.values[name], err_msg=f"peaks/{name}")
        for name in ("present", "success", "redchi", "done"):
            np.testing.assert_array_equal(getattr(qa, name), getattr(qb, name), err_msg=f"peaks/{name}")
    for group in ("lattice", "electrochemistry"):
        ta, tb = read_table(a, group), read_table(b, group)
        assert (ta is None) == (tb is None), group
        for name, value in (ta or {}).items():
            if name != "attrs" and not isinstance(value, dict):
                np.testing.assert_array_equal(value, tb[name], err_msg=f"{group}/{name}")


def straight_run(experiment_file: Path | str, output: str = "batch") -> Path:
    """The run file of the same experiment run straight (integrated and fitted in one go) into
    another output folder beside it (``[run] output = "results"`` becomes ``output``): what a
    resumed or live run must end as (:func:`assert_same_results`)."""
    from ..config import load_experiment
    from ..run.fit import fit_experiment
    from ..run.integrate import integrate_experiment

    experiment_file = Path(experiment_file)
    text = experiment_file.read_text()
    if 'output = "results"' not in text:
        raise ValueError(f'{experiment_file}: straight_run needs [run] output = "results" to redirect')
    copy = experiment_file.with_name(f"{output}.toml")
    copy.write_text(text.replace('output = "results"', f'output = "{output}"'))
    exp = load_experiment(copy)
    integrate_experiment(exp, progress=False)
    fit_experiment(exp, progress=False)
    return exp.run.run_file

