"""Chemical formulas: element amounts, molar mass, the mobile ion and theoretical capacity.

Formulas are read with ``periodictable`` (IUPAC standard atomic weights); fractions such as
``1/3`` and square brackets are turned into what it reads first.

Example
-------
>>> round(theoretical_capacity("NaNi1/3Fe1/3Mn1/3O2"), 1)   # mAh/g, one Na per formula unit
240.4
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["FARADAY", "parse_formula", "molar_mass", "carrier_ion", "electrons", "capacity_per_x",
           "theoretical_capacity"]

FARADAY = 96485.33212  # C/mol (CODATA 2018)
_CARRIERS = ("Na", "Li", "K", "Mg", "Zn")

_FRACTION = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")


def parse_formula(formula: str) -> dict[str, float]:
    """Element -> amount per formula unit. Fractions (``1/3``), decimals, parentheses and
    brackets are understood: ``"Na0.8Mg0.13[Mn0.6Co0.2Mg0.07]O2"``.

    Raises ``ValueError`` naming the formula when it cannot be read.
    """
    import periodictable

    text = formula.strip()
    if not text:
        raise ValueError("empty formula")
    text = _FRACTION.sub(lambda m: repr(float(Fraction(m.group(1)) / Fraction(m.group(2)))), text)
    text = text.replace("[", "(").replace("]", ")").replace("{", "(").replace("}", ")")
    try:
        parsed = periodictable.formula(text)
    except Exception as exc:
        raise ValueError(f"cannot read the formula {formula!r}: {exc}") from None
    atoms = {str(el): float(n) for el, n in parsed.atoms.items()}
    if not atoms:
        raise ValueError(f"the formula {formula!r} names no element")
    return atoms


def molar_mass(formula: str) -> float:
    """Molar mass in g/mol (IUPAC standard atomic weights, from ``periodictable``)."""
    import periodictable

    return float(sum(periodictable.elements.symbol(el).mass * n for el, n in parse_formula(formula).items()))


def carrier_ion(formula: str) -> str:
    """The mobile ion of a cathode formula: the first of Na, Li, K, Mg, Zn it contains."""
    atoms = parse_formula(formula)
    for ion in _CARRIERS:
        if ion in atoms:
            return ion
    raise ValueError(f"the formula {formula!r} holds no Na, Li, K, Mg or Zn; set ion explicitly")


def electrons(ion: str) -> int:
    """Electrons per mobile ion: 2 for Mg and Zn, else 1."""
    return 2 if ion in ("Mg", "Zn") else 1


def capacity_per_x(formula: str, *, electrons: int = 1) -> float:
    """Capacity (mAh/g) for a change of one unit of x: n F / (3.6 M)."""
    return electrons * FARADAY / (3.6 * molar_mass(formula))


def theoretical_capacity(formula: str, *, ion: str | None = None) -> float:
    """Capacity (mAh/g) to extract all of the mobile ion in the formula, one electron each
    (two for Mg and Zn): e.g. 240.4 mAh/g for NaNi1/3Fe1/3Mn1/3O2."""
    ion = ion or carrier_ion(formula)
    return parse_formula(formula).get(ion, 0.0) * capacity_per_x(formula, electrons=electrons(ion))
