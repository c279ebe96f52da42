"""``xrdpipe init``: an experiment file written from what a user has at the end of a beamtime.

:func:`scaffold` looks at the frames (or 1D patterns), the PONI (and mask), the cycler file and
the named phases and returns a :class:`Scaffold` of what it found; :func:`experiment_text` turns
that into a complete, commented experiment.toml (a pure function); :func:`init_experiment` does
both and writes the file.

What is found:

* **frames**: the format (HDF5/NeXus stacks and their dataset, CBF, EDF, TIFF; or 1D patterns),
  the number of frames, and where their times come from (the headers, when the first and the
  last frame's header give a time);
* **detector**: the 2θ (and Q) range the detector covers, from the PONI geometry and the
  detector's shape, masked pixels left out (0.5 and 99.5 percentiles of the pixels' 2θ);
* **windows**: around the strongest reflections of the named phases (library cells, intensities
  from the built-in structures of O3, P3, P2 and P''2, |F|² times multiplicity and Lorentz-
  polarisation; multiplicity and Lorentz-polarisation alone for the other library phases) that
  fall inside that range: the basal (00l) reflections first, then the strongest others; the
  same reflection of every phase in one window (coexisting phases are fitted together), wide
  enough for the cell to move by the phase model's search range;
* **electrochemistry**: the cycler format and columns (read with :func:`~xrdpipe.cyclers.read_cycler`),
  whether its times are absolute, relative (then ``start`` is asked for) or local (then
  ``timezone``).

Modules: ``found`` (the files), ``choose`` (the windows), ``text`` (the experiment file).
"""

from __future__ import annotations

from ..errors import InitError
from .choose import choose_windows
from .found import Scaffold
from .text import experiment_text, init_experiment, scaffold

__all__ = ["InitError", "Scaffold", "scaffold", "experiment_text", "init_experiment", "choose_windows"]
