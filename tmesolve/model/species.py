"""Species declarations: name, units and transport class.

A model lists its species once, here-style, and every other module (output,
readouts, plots) reads names and units from that list instead of literals.
"""

from __future__ import annotations

import dataclasses
import enum


class Transport(str, enum.Enum):
    """How the engine moves a species.

    FAST_LINEAR: constant D and decay λ, advanced by the exact spectral
        propagator (unconditionally stable): cytokines, antibodies; or, when
        its local terms are too stiff to split from its diffusion (a model's
        ``stiff_fast``, oxygen), with them by the model's reaction step.
    CELL: explicit conservative finite-volume transport supplied by the model
        (motility, chemotaxis, tissue velocity); limits the time step.
    NONE: no transport (local ODE only), e.g. PD-L1 expression.
    """

    FAST_LINEAR = "fast_linear"
    CELL = "cell"
    NONE = "none"


@dataclasses.dataclass(frozen=True)
class Species:
    """One field of a model.

    Attributes:
        name: snake_case long name used in files (``tumour_cells``).
        symbol: the symbol in the equations (``C``).
        units: units of the stored values (``cells/mm^3``).
        transport: transport class, see :class:`Transport`.
        long_name: human-readable description for plots and file attributes.
    """

    name: str
    symbol: str
    units: str
    transport: Transport
    long_name: str = ""


def ordered_species(species: tuple[Species, ...]) -> tuple[Species, ...]:
    """Species ordered fast-linear first, then cell, then none (stable).

    The engine stores fields as one stacked array; putting the fast-linear
    species first makes them one contiguous slice for the spectral step.
    """
    rank = {Transport.FAST_LINEAR: 0, Transport.CELL: 1, Transport.NONE: 2}
    names = [s.name for s in species]
    if len(set(names)) != len(names):
        raise ValueError(f"species names must be unique; got {names}")
    return tuple(sorted(species, key=lambda s: rank[s.transport]))
