"""Synthetic operando experiments with known truth, for tests, benchmarks and the demo.

A forward model of a sodium layered-oxide cathode in an operando cell:

* phases (O3, P3, P2, P''2) whose lattice parameters follow the sodium content x, with
  solid-solution ranges and a two-phase coexistence region (lever rule);
* reflections from the space group (allowed hkl, multiplicities) and the cell; intensities from
  a simple structure-factor model (atoms with Z-scaled form factors, Na occupancy = x), a Lorentz
  factor and a Debye-Waller term: rough but plausible;
* Caglioti peak widths (pseudo-Voigt), a background with an amorphous hump, aluminium
  current-collector rings;
* 2D frames rendered through a real pyFAI geometry (tilted detector, polarization, solid angle,
  module gaps flagged like an EIGER, Poisson noise), written as EIGER-like HDF5 stacks with
  bitshuffle-LZ4, or as CBF / TIFF / EDF, or 1D .xye patterns;
* a galvanostatic cycler record (time, voltage, current) of the same cell and the frame times.

Modules: ``scenarios`` (phases and cells against x, the NFM and MCM scenarios), ``series``
(in-memory 1D series, :class:`Difficulty`, :func:`score_phases`), ``experiment`` (a whole
experiment folder of 2D frames), ``configs`` (the windows and phases of a scenario),
``compare`` (two runs to the bit), ``calibrant`` (a calibrant image).

``make_experiment(folder)`` writes a whole experiment folder (frames, PONI, mask, cycler file,
experiment.toml, truth.csv, truth_peaks.csv) and returns a :class:`SyntheticExperiment`.

Example
-------
>>> exp = make_experiment("demo", n_frames=50, seed=1)          # doctest: +SKIP
>>> exp.experiment_file                                          # doctest: +SKIP
PosixPath('demo/experiment.toml')
"""

from __future__ import annotations

from .calibrant import calibrant_image
from .compare import assert_same_results, straight_run
from .configs import fit_config
from .experiment import SyntheticExperiment, demo_geometry, demo_mask, make_experiment
from .scenarios import (
    FARADAY,
    Scenario,
    SyntheticPhase,
    SyntheticSites,
    mcm_scenario,
    nfm_scenario,
    phase_state,
)
from .series import (
    Difficulty,
    PatternSeries,
    ProfileModel,
    cycle_series,
    pattern_1d,
    pattern_series,
    peak_list,
    score_phases,
)

__all__ = [
    "assert_same_results",
    "straight_run",
    "calibrant_image",
    "SyntheticSites",
    "SyntheticPhase",
    "Scenario",
    "Difficulty",
    "score_phases",
    "fit_config",
    "nfm_scenario",
    "mcm_scenario",
    "phase_state",
    "pattern_1d",
    "peak_list",
    "SyntheticExperiment",
    "PatternSeries",
    "pattern_series",
    "cycle_series",
    "make_experiment",
    "demo_geometry",
    "demo_mask",
    "ProfileModel",
    "FARADAY",
]
