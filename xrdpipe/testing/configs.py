"""The experiment-file windows and phases that go with a synthetic scenario."""

from __future__ import annotations

from .scenarios import Scenario, scenario_of
from .series import Difficulty

_WINDOWS = {
    "nfm": (("003", (6.0, 7.1), "003"), ("006", (12.4, 13.8), "006"), ("107", (20.35, 21.1), "107"),
            ("018", (21.95, 22.9), "018")),
    "mcm": (("002", (6.6, 7.4), "002"), ("004", (13.5, 14.5), "004"), ("100", (15.6, 16.6), "100")),
}


#: Harder windows: a weak reflection of the other phase under one phase's window, an Al line
#: under another: (name, range, listed peaks).
_HARD_WINDOWS = {
    "nfm": (("003", (6.0, 7.1), ("O3 003", "P3 003")), ("104", (16.0, 16.9), ("O3 104", "P3 104")),
            ("015", (17.2, 18.2), ("O3 015", "P3 015", "Al 200")), ("107", (20.35, 21.1), ("O3 107", "P3 107")),
            ("018", (21.95, 22.9), ("O3 018", "P3 018"))),
    "mcm": (("002", (6.6, 7.4), ("P2 002", "P''2 002")), ("004", (13.5, 14.5), ("P2 004", "P''2 004")),
            ("100", (15.6, 17.3), ("P2 100", "P''2 100", "Al 111"))),
}


def fit_toml(sc: Scenario, difficulty: Difficulty | None = None) -> str:
    """[[phases]] (start cells: the high phase at x0, the low one where it appears, each off by
    the difficulty's start errors) and [[windows]] with one component per phase."""
    lo, _ = sc.coexistence
    dif = difficulty or Difficulty()
    out = ["", "# Peak fitting: start cells and windows (2θ, degrees). One component per phase."]
    for ph, (a, c), (ea, ec) in ((sc.high, sc.high.cell(sc.x0), dif.start_error[0]),
                                 (sc.low, sc.low.cell(lo), dif.start_error[1])):
        out += ["[[phases]]", f'name = "{ph.name}"', f'space_group = "{ph.space_group}"', f"a = {a * (1 + ea):.4f}",
                f"c = {c * (1 + ec):.3f}", ""]
    if dif.hard_windows:
        out += ["[[phases]]", 'name = "Al"   # the current collector: space group, cell and fraction = false from the library', ""]
        windows = _HARD_WINDOWS[sc.name]
    else:
        windows = tuple((name, rng, tuple(f"{ph.name} {hkl}" for ph in (sc.high, sc.low)))
                        for name, rng, hkl in _WINDOWS.get(sc.name, ()))
    for name, (w0, w1), labels in windows:
        peaks = ", ".join(f'"{label}"' for label in labels)
        out += ["[[windows]]", f'name = "{name}"', f"range = [{w0}, {w1}]", f"peaks = [{peaks}]", ""]
    names = ", ".join(f'"{name}"' for name, _, _ in windows)
    out += ["# Figures of `xrdpipe run` (in results/figures) and exports (in results/export).",
            "[plots]", 'formats = ["png", "pdf"]', "[plots.contour]", f"windows = [{names}]",
            'vertical = "time"', 'scale = "sqrt"', "", "[export]", 'formats = ["xye", "fxye", "topas"]', ""]
    return "\n".join(out)


def fit_config(scenario: Scenario | str, difficulty: Difficulty | None = None):
    """The ``[[phases]]`` and ``[[windows]]`` that :func:`make_experiment` writes for a scenario
    (start cells off by the difficulty's errors), as specs: ``(phases, windows)``."""
    import tomllib

    from ..config import PhaseSpec, WindowSpec

    sc = scenario_of(scenario)
    if difficulty is not None:
        sc = difficulty.scenario(sc)
    text = fit_toml(sc, difficulty)
    data = tomllib.loads(text[:text.index("# Figures of")])
    return [PhaseSpec(**p) for p in data["phases"]], [WindowSpec(**w) for w in data["windows"]]


