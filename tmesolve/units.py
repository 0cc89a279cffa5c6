"""Unit conversion for values given at the edge ("1e5 um^2/min", "22 d", "3 mg/kg").

The core works in fixed units (length µm, time h, cell densities cells/mm³,
cytokines ng/mL, antibodies µg/mL, oxygen mmHg, drug amounts mg). A config
value may be a plain number, taken to be in those core units already, or a
string ``"<number> <unit expression>"`` that is converted here before anything
compiles.

Unit expressions are products and quotients of unit names with integer powers
and parentheses: ``um^2/min``, ``1/s``, ``cells/mm^3``, ``mmHg*mm^3/cells/h``,
``um^2/h/(ng/mL)``. Division is left-associative (``a/b/c`` = a·b⁻¹·c⁻¹); a
space or ``*`` (or ``·``) multiplies. ``µ``/``μ`` may replace ``u`` and the
superscripts ``² ³ ⁻¹`` may replace ``^2 ^3 ^-1``.

Dimensions are kept as exponents of independent base quantities (length, time,
mass, amount of substance, cells, molecules, pressure in mmHg, mutations,
megabases). Pressure is its own base because mmHg is the only pressure unit
the model uses; counts of cells and molecules are separate bases so that a
density of cells cannot silently become a density of molecules.

Molar concentrations (``nM``) convert to mass concentrations only when a
molar mass is given (``molar_mass_g_per_mol``); antibodies use
:data:`IGG_MOLAR_MASS_G_PER_MOL`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tmesolve.errors import ConfigError

__all__ = [
    "IGG_MOLAR_MASS_G_PER_MOL",
    "Unit",
    "parse_units",
    "parse_quantity",
    "conversion_factor",
    "convert",
    "nanomolar_to_ug_per_ml",
]

#: Molar mass of a therapeutic IgG (g/mol). Nivolumab is 146 kDa, pembrolizumab
#: 149 kDa, ipilimumab 148 kDa; 146 kDa reproduces the QSP-IO conversion
#: 4 nM → 0.584 µg/mL for anti-PD-1 (18.2 nM of ipilimumab at its own 148 kDa
#: is 2.69 µg/mL).
IGG_MOLAR_MASS_G_PER_MOL = 1.46e5

# Base quantities, in the order of the exponent vector.
_BASES = ("length", "time", "mass", "amount", "cells", "molecules", "mmHg", "mutations", "bases")


def _dims(**exponents: int) -> tuple[int, ...]:
    return tuple(exponents.get(name, 0) for name in _BASES)


@dataclass(frozen=True)
class Unit:
    """A unit: ``scale`` times the product of base units (SI m, s, kg, mol, ...).

    Attributes:
        scale: value of one of this unit in base units (m, s, kg, mol, count,
            mmHg, mutation, megabase).
        dims: integer exponents of the base quantities, in the order
            length, time, mass, amount, cells, molecules, mmHg, mutations, bases.
    """

    scale: float
    dims: tuple[int, ...]

    def __mul__(self, other: Unit) -> Unit:
        exponents = tuple(a + b for a, b in zip(self.dims, other.dims, strict=True))
        return Unit(self.scale * other.scale, exponents)

    def __truediv__(self, other: Unit) -> Unit:
        exponents = tuple(a - b for a, b in zip(self.dims, other.dims, strict=True))
        return Unit(self.scale / other.scale, exponents)

    def __pow__(self, power: int) -> Unit:
        return Unit(self.scale**power, tuple(a * power for a in self.dims))

    def describe_dims(self) -> str:
        """The dimension as text, e.g. ``length^2 time^-1`` (``dimensionless``)."""
        pairs = zip(_BASES, self.dims, strict=True)
        parts = [f"{name}^{exp}" if exp != 1 else name for name, exp in pairs if exp]
        return " ".join(parts) or "dimensionless"


_DIMENSIONLESS = Unit(1.0, _dims())
_LENGTH = _dims(length=1)
_TIME = _dims(time=1)
_MASS = _dims(mass=1)
_VOLUME = _dims(length=3)
_MOLAR = _dims(amount=1, length=-3)

_SECONDS_PER_DAY = 86400.0
_UNITS: dict[str, Unit] = {
    # length
    "m": Unit(1.0, _LENGTH),
    "cm": Unit(1e-2, _LENGTH),
    "mm": Unit(1e-3, _LENGTH),
    "um": Unit(1e-6, _LENGTH),
    "micron": Unit(1e-6, _LENGTH),
    "nm": Unit(1e-9, _LENGTH),
    # time
    "s": Unit(1.0, _TIME),
    "sec": Unit(1.0, _TIME),
    "min": Unit(60.0, _TIME),
    "h": Unit(3600.0, _TIME),
    "hr": Unit(3600.0, _TIME),
    "hour": Unit(3600.0, _TIME),
    "hours": Unit(3600.0, _TIME),
    "d": Unit(_SECONDS_PER_DAY, _TIME),
    "day": Unit(_SECONDS_PER_DAY, _TIME),
    "days": Unit(_SECONDS_PER_DAY, _TIME),
    "wk": Unit(7 * _SECONDS_PER_DAY, _TIME),
    "week": Unit(7 * _SECONDS_PER_DAY, _TIME),
    "weeks": Unit(7 * _SECONDS_PER_DAY, _TIME),
    # Julian year, the convention of astronomy and of most survival analyses.
    "y": Unit(365.25 * _SECONDS_PER_DAY, _TIME),
    "yr": Unit(365.25 * _SECONDS_PER_DAY, _TIME),
    "year": Unit(365.25 * _SECONDS_PER_DAY, _TIME),
    "years": Unit(365.25 * _SECONDS_PER_DAY, _TIME),
    # mass
    "kg": Unit(1.0, _MASS),
    "g": Unit(1e-3, _MASS),
    "mg": Unit(1e-6, _MASS),
    "ug": Unit(1e-9, _MASS),
    "ng": Unit(1e-12, _MASS),
    "pg": Unit(1e-15, _MASS),
    # volume
    "L": Unit(1e-3, _VOLUME),
    "l": Unit(1e-3, _VOLUME),
    "mL": Unit(1e-6, _VOLUME),
    "ml": Unit(1e-6, _VOLUME),
    "uL": Unit(1e-9, _VOLUME),
    "ul": Unit(1e-9, _VOLUME),
    # amount of substance and molar concentration
    "mol": Unit(1.0, _dims(amount=1)),
    "mmol": Unit(1e-3, _dims(amount=1)),
    "umol": Unit(1e-6, _dims(amount=1)),
    "nmol": Unit(1e-9, _dims(amount=1)),
    "pmol": Unit(1e-12, _dims(amount=1)),
    "M": Unit(1e3, _MOLAR),
    "mM": Unit(1.0, _MOLAR),
    "uM": Unit(1e-3, _MOLAR),
    "nM": Unit(1e-6, _MOLAR),
    "pM": Unit(1e-9, _MOLAR),
    # counts and the remaining bases
    "cells": Unit(1.0, _dims(cells=1)),
    "cell": Unit(1.0, _dims(cells=1)),
    "molecules": Unit(1.0, _dims(molecules=1)),
    "molecule": Unit(1.0, _dims(molecules=1)),
    "mmHg": Unit(1.0, _dims(mmHg=1)),
    "mut": Unit(1.0, _dims(mutations=1)),
    "Mb": Unit(1.0, _dims(bases=1)),
    "kb": Unit(1e-3, _dims(bases=1)),
    # dimensionless
    "1": _DIMENSIONLESS,
    "%": Unit(0.01, _dims()),
}

_NORMALISE = (
    ("µ", "u"),  # micro sign
    ("μ", "u"),  # Greek small mu
    ("·", "*"),
    ("⁻¹", "^-1"),
    ("⁻²", "^-2"),
    ("⁻³", "^-3"),
    ("²", "^2"),
    ("³", "^3"),
    ("**", "^"),
)

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z%]+)|(?P<int>[+-]?\d+)|(?P<op>[*/^()]))")
_NUMBER = re.compile(r"^\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?P<rest>.*)$")


class _UnitParseError(ValueError):
    pass


def _tokenise(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _UnitParseError(f"cannot read {text[position:]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over: expr := power (('*'|'/'|juxtaposition) power)*;
    power := atom ('^' int)?; atom := name | '1' | '(' expr ')'."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.index = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise _UnitParseError("unexpected end of the unit expression")
        self.index += 1
        return token

    def parse(self) -> Unit:
        unit = self._expression()
        if self._peek() is not None:
            raise _UnitParseError(f"unexpected {self._peek()[1]!r}")  # type: ignore[index]
        return unit

    def _expression(self) -> Unit:
        unit = self._power()
        while True:
            token = self._peek()
            if token is None or token == ("op", ")"):
                return unit
            if token == ("op", "*"):
                self._take()
                unit = unit * self._power()
            elif token == ("op", "/"):
                self._take()
                unit = unit / self._power()
            else:  # juxtaposition multiplies: "mmHg mm^3"
                unit = unit * self._power()

    def _power(self) -> Unit:
        unit = self._atom()
        if self._peek() == ("op", "^"):
            self._take()
            kind, text = self._take()
            if kind != "int":
                raise _UnitParseError(f"expected an integer power after '^', got {text!r}")
            unit = unit ** int(text)
        return unit

    def _atom(self) -> Unit:
        kind, text = self._take()
        if kind == "op" and text == "(":
            unit = self._expression()
            if self._take() != ("op", ")"):
                raise _UnitParseError("unbalanced parentheses")
            return unit
        if kind == "int":
            if int(text) != 1:
                raise _UnitParseError(f"only 1 may stand as a number in units, got {text!r}")
            return _DIMENSIONLESS
        if kind == "name":
            if text not in _UNITS:
                raise _UnitParseError(f"unknown unit {text!r}")
            return _UNITS[text]
        raise _UnitParseError(f"unexpected {text!r}")


def _normalise(text: str) -> str:
    for old, new in _NORMALISE:
        text = text.replace(old, new)
    return text.strip()


def parse_units(text: str) -> Unit:
    """Parse a unit expression (``"um^2/min"``); an empty string is dimensionless.

    Raises:
        ValueError: the expression cannot be read or names an unknown unit.
    """
    normalised = _normalise(text)
    if normalised in ("", "1", "-", "dimensionless"):
        return _DIMENSIONLESS
    return _Parser(_tokenise(normalised)).parse()


def parse_quantity(text: str) -> tuple[float, Unit]:
    """Split ``"<number> <units>"`` into the number and its parsed unit.

    Raises:
        ValueError: no leading number, or units that cannot be read.
    """
    match = _NUMBER.match(_normalise(text))
    if match is None:
        raise ValueError(f"{text!r} does not start with a number")
    return float(match.group("number")), parse_units(match.group("rest"))


def conversion_factor(
    from_units: str, to_units: str, molar_mass_g_per_mol: float | None = None
) -> float:
    """The factor f with ``value[to_units] = f · value[from_units]``.

    With ``molar_mass_g_per_mol`` a molar quantity may convert to a mass one
    (and back): amount¹ is traded for mass¹ at that molar mass.

    Raises:
        ValueError: unreadable units or incompatible dimensions.
    """
    return _factor(parse_units(from_units), parse_units(to_units), molar_mass_g_per_mol)


def _factor(source: Unit, target: Unit, molar_mass_g_per_mol: float | None) -> float:
    if source.dims == target.dims:
        return source.scale / target.scale
    if molar_mass_g_per_mol is not None:
        difference = [a - b for a, b in zip(source.dims, target.dims, strict=True)]
        amount, mass = _BASES.index("amount"), _BASES.index("mass")
        others_equal = all(d == 0 for i, d in enumerate(difference) if i not in (amount, mass))
        if others_equal and difference[amount] == -difference[mass] and difference[amount] != 0:
            # One mol weighs M g = M·1e-3 kg: each amount exponent becomes mass.
            kg_per_mol = molar_mass_g_per_mol * 1e-3
            return source.scale / target.scale * kg_per_mol ** difference[amount]
    raise ValueError(
        f"incompatible dimensions: {source.describe_dims()} vs {target.describe_dims()}"
    )


def convert(
    value: Any,
    target_units: str,
    key: str,
    molar_mass_g_per_mol: float | None = None,
) -> float:
    """Return ``value`` in ``target_units`` as a float.

    A number (int or float) is taken to be in ``target_units`` already and
    passes through unchanged. A string ``"<number> <units>"`` is converted.

    Args:
        value: a number or a string such as ``"1e5 um^2/min"``.
        target_units: the core units wanted (``"um^2/h"``).
        key: the config key, for the error message.
        molar_mass_g_per_mol: allows nM ↔ µg/mL (e.g. an antibody's molar mass).

    Raises:
        ConfigError: NaN/infinite values, unreadable strings, or dimensions
            that do not match ``target_units``.

    Example:
        >>> convert("1e5 um^2/min", "um^2/h", "D_O")
        6000000.0
    """
    expected = f"a quantity in {target_units}"
    if isinstance(value, bool):
        raise ConfigError(key, value, expected)
    if isinstance(value, (int, float)) or _is_numpy_number(value):
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(key, value, f"a finite quantity in {target_units}")
        return number
    if not isinstance(value, str):
        raise ConfigError(key, value, expected)
    try:
        magnitude, source = parse_quantity(value)
        factor = _factor(source, parse_units(target_units), molar_mass_g_per_mol)
    except ValueError as error:
        raise ConfigError(key, value, expected, hint=str(error)) from None
    # Round away the last-bit noise of the scale ratios (1e5·60 → 6000000.000000001)
    # so that converted defaults read cleanly in the generated tables.
    result = float(f"{magnitude * factor:.14g}")
    if not math.isfinite(result):
        raise ConfigError(key, value, f"a finite quantity in {target_units}")
    return result


def _is_numpy_number(value: Any) -> bool:
    # numpy scalars (np.float32(1.0)) are numbers but not Python floats.
    dtype = getattr(value, "dtype", None)
    return dtype is not None and getattr(value, "shape", None) == () and dtype.kind in "iuf"


def nanomolar_to_ug_per_ml(
    nanomolar: float, molar_mass_g_per_mol: float = IGG_MOLAR_MASS_G_PER_MOL
) -> float:
    """Convert a molar concentration (nM) to µg/mL: c = nM · 1e-9 mol/L · M g/mol.

    For an IgG of 146 kDa, 1 nM = 0.146 µg/mL.
    """
    return nanomolar * 1e-9 * molar_mass_g_per_mol * 1e3  # g/L → mg/L = µg/mL
