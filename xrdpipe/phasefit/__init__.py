"""The phase model: every window of a frame fitted at once, peak centres from each phase's cell.

Where :mod:`xrdpipe.peaks` fits one free peak per listed ``"phase hkl"``, the phase model
(``[fit] model = "phases"``, the default) fits, in one least-squares problem per frame:

* every allowed reflection of every ``[[phases]]`` phase that falls in a window (listed or not:
  a weak line of one phase under another's window is explained by its own phase), its centre
  computed from the phase's cell (the parameters its crystal system leaves free) and the run's
  zero shift (``[lattice] correction = "auto"``, the default: estimated once on the run's first
  16 frames and held, its esd carried into the cells'; the calibration's 0 kept where the
  estimate lies within 3 esds of it; ``"none"``: 0);
* a free area per reflection (>= 0), a FWHM per phase and window, an eta per phase;
* a polynomial background per window.

The cells with their esds come straight out of this fit. Phases are tracked frame by frame: a
phase present in the previous frame starts from its cell there; a phase that is not is looked for
over a grid of cells around the configured one (``[[phases]] search``, default c ±3 %, a ±1.5 %),
the areas and background solved linearly at every trial (variable projection), and the best
trial refined; a tracked phase moves about a line width per frame at most (a larger move is a
jump, searched for afresh). Two coexisting phases of one crystal system are also searched
jointly (both cells and a common width factor). Presence is decided by model selection over
the phases (BIC, the same threshold as the peak engine) plus a minimum area fraction; how it was
decided is recorded per frame and phase. Two phases whose reaches overlap are named by
continuity, not by the order of their typed cells: both present in the frame before, they keep
the order their cells had there (in the searches, by midpoint bounds in the least squares, in
the test of a phase that would take the other's place, and so going back); a newcomer beside a
phase present before is kept half a line width off that phase's lines in the parameter that
alone places their shared lines (c for 00l), on whichever side the data put it, and that order
holds from then on. The configured order is used where there is no continuity (both appear in
one frame, the first) and, for a newcomer, in a parameter no line places alone (a of two
layered phases, nearly equal: an alias of the newcomer's a would otherwise pass).

A phase's relative intensities are learned in the frames where it is the only phase present
(areas being free per line, a phase can otherwise be made of fragments of another's lines): a
phase whose listed lines are empty is absent, and one whose areas are unlike its own is a suspect;
the frame is then fitted again without it and the better BIC kept.

A frame's fit depends only on its own data and the state of the frame before it (cells, widths,
presence, learned intensities), which is stored with the results: a resumed or live run fits
every frame exactly as one straight run.
"""

from .decide import fit_frame
from .fitter import PhaseFitter, fit_phases
from .model import DEFAULT_SEARCH, PHASE_ARRAYS, PhaseModel, PhaseState

__all__ = ["PhaseModel", "PhaseFitter", "PhaseState", "fit_phases", "fit_frame", "DEFAULT_SEARCH", "PHASE_ARRAYS"]
