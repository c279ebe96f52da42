"""Whole-pattern refinement of one pattern: Le Bail, Pawley and Rietveld, several phases at once.

The model of a pattern (2θ in degrees) is

    y(2θ) = Σ_j b_j T_j(t) + Σ_phases Σ_k I_k Ω(2θ - 2θ_k; H_k, η_k) A(z)

* ``T_j``: Chebyshev polynomials over the refined range (``t`` in [-1, 1]);
* ``2θ_k``: from the cell (constrained by the crystal system: a, c for hexagonal...), plus a
  zero shift and a sample-displacement term ``D cos θ``;
* ``Ω``: pseudo-Voigt of area 1 with Thompson-Cox-Hastings widths, H_G² = U tan²θ + V tan θ + W
  and H_L = X tan θ + Y / cos θ (per phase, degrees);
* ``A(z) = 1 + (P1 Fa(z) + P2 Fb(z)) / tan θ``: Bérar-Baldinozzi asymmetry (low angles),
  z = (2θ - 2θ_k)/H;
* ``I_k``: extracted (Le Bail), least-squares parameters (Pawley: non-negative, one per group
  of reflections at the same position, solved with the background by NNLS at every trial of
  the nonlinear parameters: variable projection) or computed (Rietveld) as
  ``S m_k LP(θ_k) |F_k|²`` with IT92 form factors, occupancies and B_iso (see
  :mod:`xrdpipe.refine.structures`).

Least squares: Levenberg-Marquardt on ``(y_obs - y_calc)/σ`` with an analytic Jacobian: the
profile's derivatives in position, width and mixing are exact; how each parameter moves a
reflection's position, width, mixing and intensity is differentiated numerically on the
reflections alone (a few hundred numbers), so a Jacobian costs about as much as three patterns.
Statistics: Rwp, Rexp, GOF = Rwp/Rexp; each refined parameter's esd is sqrt(C_jj) GOF with
C = (JᵀJ)⁻¹. Weight fractions from the scale factors (Hill & Howard):
W_p = S_p (ZMV)_p / Σ S (ZMV).

Start values need not be close (:meth:`~xrdpipe.refine.solver.Refiner.refine`): without a previous result, or where
the refinement from it is not ``ok``, each phase's cell is searched on a grid (a matched filter,
then linear fits with one non-negative intensity per reflection and the background), and least
squares is staged (background and scales; cells and zero; W, Y; U, V, X; everything).
Parameters stay within bounds (widths and scales positive, cells inside their searched range,
shifts within ±1°); one at a bound is reported in :attr:`RefinementResult.at_bound` without an
esd. :attr:`RefinementResult.status` is ``ok``, ``flagged`` (GOF above ``gof_max``, a parameter
at a bound) or ``failed`` (no convergence, a cell at the edge of its range), the reasons in
``message``. In Le Bail, a phase the fit does not need is *absent* (:attr:`RefinementResult.absent`):
its cell is held and not reported.

Example
-------
>>> model = RefinementModel([PhaseModel("O3", template("O3", a=2.985, c=16.0))], wavelength_A=0.6209,
...                         method="rietveld")
>>> result = refine_pattern(model, tth, y, sigma)           # doctest: +SKIP
>>> result.value("O3.a"), result.esd("O3.a"), result.rwp   # doctest: +SKIP

The package, bottom to top (each module imports only those above it in this list):

* :mod:`~xrdpipe.refine.structures` crystal structures: space groups, reflections, |F|², CIF, templates
* :mod:`~xrdpipe.refine.model`      the model's dataclasses (phases, instrument, range) and the result
* :mod:`~xrdpipe.refine.layout`     every parameter of a model in one vector: names, bounds, phases
* :mod:`~xrdpipe.refine.lebail`     Le Bail extraction (profile matrix, cycles)
* :mod:`~xrdpipe.refine.calculator` the pattern and its analytic Jacobian at a parameter vector
* :mod:`~xrdpipe.refine.least_squares` Levenberg-Marquardt, Pawley by variable projection, NNLS
* :mod:`~xrdpipe.refine.search`     the cell search on a grid of trial cells; cell bounds
* :mod:`~xrdpipe.refine.absence`    which phases a Le Bail fit needs
* :mod:`~xrdpipe.refine.results`    R factors, esds, weight fractions and the verdict
* :mod:`~xrdpipe.refine.solver`     :class:`Refiner`, :func:`refine_pattern`, the staged strategy
"""

from __future__ import annotations

from ..errors import RefinementError
from .calculator import calculate_pattern
from .model import (
           OccupancyConstraint,
           PhaseModel,
           RefinementModel,
           RefinementResult,
           cell_parameters,
)
from .solver import Refiner, refine_pattern

__all__ = ["PhaseModel", "RefinementModel", "RefinementResult", "RefinementError", "refine_pattern", "Refiner",
           "calculate_pattern", "cell_parameters", "OccupancyConstraint"]
