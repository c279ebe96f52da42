"""Shared by the experiment-file tests: a good file, a folder with its inputs, and the errors
of a file."""

import textwrap

import pytest

from xrdpipe.config import load_experiment
from xrdpipe.errors import ConfigError

GOOD = """
schema_version = 1
[run]
name = "nfm-cell2"
output = "results"
[frames]
files = "raw/*.h5"
dataset = "/entry/data/data"
times = {times}
[calibration]
poni = "cal/ceo2.poni"
mask = "cal/mask.edf"
[integration]
npt = 3000
unit = "2th_deg"
range = [2.0, 30.0]
polarization_factor = 0.99
error_model = "poisson"
splitting = "full"
"""


def write(folder, text, name="exp.toml"):
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def errors_of(path):
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    return info.value


PHASES = """
[[phases]]
name = "O3"
space_group = "R-3m"
a = 2.985
c = 16.0
[[phases]]
name = "P3"
space_group = "R3m"
a = 2.93
c = 16.7
"""
