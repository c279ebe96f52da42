"""Compiled kernels (Numba, cached on disk, run without the GIL), by the stage that uses them:

* :mod:`.integration`: the integrator's pixel-to-bin sums and its full-pixel-splitting matrix;
* :mod:`.refine`: the whole-pattern refinement's profiles, tails, products and Le Bail cycle;
* :mod:`.phase`: the phase model's lines, normal equations, window solves, positions and
  centres with their derivatives;
* :mod:`.batch`: the batched least squares' damped systems and steps;
* :mod:`.lz4`: the check of bitshuffle-LZ4 chunks before they are decompressed;
* :mod:`.base`: the compile decorator with its best-effort disk cache.
"""

from .batch import damped_systems, take_steps
from .integration import csc_sums, split_count, split_fill
from .lz4 import LZ4_REASONS, lz4_blocks_problem
from .phase import (
    add_lines,
    add_lines_reach,
    centre_derivs,
    free_shifts,
    odd_about_lines,
    phase_lm,
    phase_normal,
    phase_normal_rows,
    phase_value_jac,
    radial_positions,
    window_trials,
    windows_linear,
)
from .refine import (
    lebail_cycle,
    profile_columns,
    profile_matvec,
    profile_rmatvec,
    pv_profiles,
    reflection_geometry,
    tail_columns,
    tail_matvec,
    tail_rmatvec,
    tch_widths,
)

__all__ = ["csc_sums", "pv_profiles", "profile_columns", "tail_matvec", "tail_rmatvec", "tail_columns",
           "reflection_geometry", "tch_widths", "profile_matvec", "profile_rmatvec", "lebail_cycle",
           "lz4_blocks_problem", "LZ4_REASONS", "split_count", "split_fill", "phase_value_jac", "phase_normal", "phase_normal_rows", "phase_lm", "add_lines", "add_lines_reach", "window_trials",
           "radial_positions", "centre_derivs", "free_shifts", "damped_systems", "take_steps", "odd_about_lines", "windows_linear"]
