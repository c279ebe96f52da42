"""Cross-checks: problems that span sections (windows naming unknown phases or forbidden
reflections, refinement phases and CIF files, plot windows), each with its key path.
"""

from __future__ import annotations

from .base import did_you_mean
from .fitting import PhaseSpec


def cross_check(exp) -> list[tuple[str, str]]:
    """Problems that span sections of the :class:`~xrdpipe.config.experiment.Experiment` ``exp``:
    windows must name known phases and allowed reflections."""
    from ..crystallography import is_allowed

    problems: list[tuple[str, str]] = []
    phases: dict[str, PhaseSpec] = {}
    for i, ph in enumerate(exp.phases):
        if ph.name in phases:
            problems.append((f"phases.{i}.name", f"phase {ph.name!r} is defined twice"))
        if ph.name.strip().lower() == "free":
            problems.append((f"phases.{i}.name", f"{ph.name!r} is reserved: the peak tables' phase of the lines of no "
                                                 "phase ([[windows]] free_peaks); give the phase another name"))
        phases[ph.name] = ph
    seen: set[str] = set()
    top = 180.0 if exp.radial_unit == "2th_deg" else 40.0
    for i, w in enumerate(exp.windows):
        if w.name in seen:
            problems.append((f"windows.{i}.name", f"window {w.name!r} is defined twice"))
        seen.add(w.name)
        if w.range[0] < 0 or w.range[1] > top:
            problems.append((f"windows.{i}.range", f"{list(w.range)} is not a range of {exp.radial_unit}"))
        for label in w.peaks:
            name, (h, k, l) = w.split_peak(label)
            if name not in phases:
                hint = did_you_mean(name, phases, 0.5)
                known = ", ".join(phases) or "none: add a [[phases]] table"
                problems.append((f"windows.{i}.peaks",
                                 f"window {w.name!r} names phase {name!r}, which is not in [[phases]]{hint} "
                                 f"(phases: {known})"))
            elif not is_allowed(phases[name].space_group, h, k, l):
                problems.append((f"windows.{i}.peaks",
                                 f"window {w.name!r}: ({h} {k} {l}) is not allowed in {phases[name].space_group} "
                                 f"(phase {name})"))
        for label, (lo, hi) in w.center_bounds.items():
            if label not in w.peaks:
                problems.append((f"windows.{i}.center_bounds",
                                 f"{label!r} is not one of the window's peaks {w.peaks}"))
            elif not lo < hi:
                problems.append((f"windows.{i}.center_bounds", f"{label!r}: expected [low, high], got {[lo, hi]}"))
    if exp.refinement is not None:
        problems += _refinement_problems(exp, phases)
    fw = exp.lattice.fraction_window
    if fw is not None and fw not in seen:
        problems.append(("lattice.fraction_window", f"{fw!r} is not one of the windows {sorted(seen)}"))
    for key, names in (("plots.contour.windows", exp.plots.contour.windows), ("plots.fit.windows", exp.plots.fit.windows)):
        for i, w in enumerate(names):
            if isinstance(w, str) and w not in seen:
                hint = did_you_mean(w, sorted(seen), 0.5)
                also = " (or give a range [low, high] in the run's unit)" if "contour" in key else ""
                problems.append((f"{key}.{i}", f"{w!r} is not one of the windows {sorted(seen)}{hint}{also}"))
            elif not isinstance(w, str) and not w[0] < w[1]:
                problems.append((f"{key}.{i}", f"expected [low, high], got {list(w)}"))
    return problems


def _refinement_problems(exp, phases: dict[str, PhaseSpec]) -> list[tuple[str, str]]:
    from ..refine.structures import TEMPLATES

    ref = exp.refinement
    problems: list[tuple[str, str]] = []
    names = [p.name for p in ref.phases]
    for i, rp in enumerate(ref.phases):
        if rp.name not in phases:
            hint = did_you_mean(rp.name, phases, 0.5)
            problems.append((f"refinement.phases.{i}.name", f"{rp.name!r} is not in [[phases]]{hint} "
                             f"(phases: {', '.join(phases) or 'none'})"))
            continue
        kind = phases[rp.name].structure_kind
        if ref.method == "rietveld" and rp.structure == "template" and kind not in TEMPLATES and not rp.lebail:
            problems.append((f"refinement.phases.{i}.structure",
                             f"no built-in structure for {kind!r} (templates: {', '.join(TEMPLATES)}); "
                             "give a CIF file: structure = \"file.cif\""))
        path = exp.structure_file(rp.structure)
        if path is not None:
            if not path.exists():
                problems.append((f"refinement.phases.{i}.structure", f"no such CIF file: {path}"))
    for i, m in enumerate(ref.models):
        if m.phase not in names:
            problems.append((f"refinement.models.{i}.phase",
                             f"{m.phase!r} is not one of the [[refinement.phases]] ({', '.join(names)})"))
    if exp.radial_unit != "2th_deg" and ref.range is not None and ref.range[1] > 40:
        problems.append(("refinement.range", f"{list(ref.range)} is not a range of {exp.radial_unit}"))
    return problems
