"""The ``[electrochemistry]`` section: the cycler file, its format, units and clock, and the cell
(formula, active mass, x0) that turn charge into x in Na_xTMO2.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import ResolvedPath, Spec, Timezone, resolve_path

_UNIT_NAMES = {"time": ("s", "ms", "min", "h", "d"), "voltage": ("V", "mV"), "current": ("A", "mA", "uA", "µA", "nA")}


class ElectrochemistrySpec(Spec):
    """``[electrochemistry]``: the cycler file of the cell and what is needed for x.

    ``format`` is ``auto`` (from the file's content) or one of ``csv`` (any CSV/TSV/Excel
    table; name its ``columns``), ``biologic``, ``neware``, ``arbin``, ``land``, ``maccor``,
    ``basytec``, ``novonix``. ``start`` is
    when the file's time 0 was, for files with relative times only (it also overrides a file's
    own clock); ``timezone`` places local times stored without UTC offset (default: the
    timezone of the frame times). ``x`` is ``x0 - Q M / (F m)`` with ``Q`` the net charge
    passed since the record began; ``inventory_loss_mAh_g`` (or ``inventory_loss_from``:
    earlier cycler files of the same cell) shifts it by the loss of alkali inventory of earlier
    cycles. ``capacity_source = "cycler"`` takes the charge from the cycler's own counter instead
    of integrating the recorded current (for records too sparse for a pulsed current).
    """

    file: ResolvedPath
    format: Literal["auto", "csv", "biologic", "neware", "arbin", "land", "maccor", "basytec", "novonix"] = "auto"
    columns: dict[Literal["time", "voltage", "current", "datetime"], str] = {}
    units: dict[Literal["time", "voltage", "current"], str] = {}
    sheet: str | None = None
    start: datetime | None = None
    timezone: Timezone | None = None
    active_mass_mg: float | None = Field(default=None, gt=0)
    formula: str | None = None
    x0: float | None = Field(default=None, ge=0)
    ion: Literal["Na", "Li", "K", "Mg", "Zn"] | None = None
    charge_current: Literal["positive", "negative"] = "positive"
    rest_current_mA: float | None = Field(default=None, ge=0)
    capacity_source: Literal["current", "cycler"] = "current"
    inventory_loss_mAh_g: float | None = None
    inventory_loss_from: list[Path] = []

    @field_validator("file")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError(f"no such cycler file: {v}")
        return v

    @field_validator("inventory_loss_from", mode="before")
    @classmethod
    def _history(cls, v: Any, info: ValidationInfo) -> Any:
        v = [v] if isinstance(v, str) else v
        out = [resolve_path(p, info) for p in v]
        missing = [str(p) for p in out if not Path(p).exists()]
        if missing:
            raise ValueError(f"no such cycler file(s): {', '.join(missing)}")
        return out

    @field_validator("units")
    @classmethod
    def _units(cls, v: dict[str, str]) -> dict[str, str]:
        for kind, unit in v.items():
            if unit.replace("μ", "µ") not in _UNIT_NAMES[kind] and unit.lower() not in {
                    u.lower() for u in _UNIT_NAMES[kind]}:
                raise ValueError(f"unknown {kind} unit {unit!r}; expected one of {', '.join(_UNIT_NAMES[kind])}")
        return v

    @field_validator("formula")
    @classmethod
    def _formula(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from ..composition import parse_formula

        parse_formula(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ElectrochemistrySpec":
        if self.start is not None and self.start.tzinfo is None and self.timezone is None:
            raise ValueError("start has no UTC offset: write it as 2025-07-02T19:00:00+08:00 or set timezone")
        if self.inventory_loss_mAh_g is not None and self.inventory_loss_from:
            raise ValueError("give inventory_loss_mAh_g or inventory_loss_from, not both")
        if self.inventory_loss_from and self.active_mass_mg is None:
            raise ValueError("inventory_loss_from needs active_mass_mg")
        if self.formula is not None and self.ion is None:
            from ..composition import carrier_ion

            carrier_ion(self.formula)
        return self
