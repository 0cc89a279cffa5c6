"""Two-compartment plasma pharmacokinetics of the checkpoint antibodies.

Drugs occupy three slots, one per target class (:data:`SLOTS`): index 0
anti-PD-1, 1 anti-PD-L1, 2 anti-CTLA-4. A regimen puts at most one drug in a
slot. Per slot, with amounts in mg (central A_c, peripheral A_p)::

    dA_c/dt = −(CL/V_c)·A_c − (Q/V_c)·A_c + (Q/V_p)·A_p
    dA_p/dt =  (Q/V_c)·A_c − (Q/V_p)·A_p
    c_plasma = A_c / V_c            (mg/L = µg/mL)

CL and Q in L/h, volumes in L. The system is linear with constant
coefficients, so :func:`pk_step` advances it exactly with the closed-form
2×2 matrix exponential; doses are boluses into the central compartment
(infusions of 30–90 min are short against half-lives of weeks).

Population values are for a 75 kg patient, from the labels (Keytruda,
Opdivo, Yervoy, Tecentriq) as compiled in PARAMETERS.md: V_c/V_p = 55/45 %
of V_ss, and Q set so that the slow phase gives the label terminal
half-life (:func:`derive_intercompartmental_clearance`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import pytree_dataclass
from tmesolve.errors import ConfigError

__all__ = [
    "SLOTS",
    "SLOT_INDEX",
    "Drug",
    "DRUGS",
    "DRUG_NAMES",
    "PKParams",
    "pk_params",
    "pk_step",
    "plasma_concentration",
    "occupancy",
    "derive_intercompartmental_clearance",
    "terminal_half_life_h",
]

#: Drug slots, one per target class, in array order.
SLOTS = ("PD1", "PDL1", "CTLA4")
SLOT_INDEX = {name: index for index, name in enumerate(SLOTS)}

_HOURS_PER_DAY = 24.0


def derive_intercompartmental_clearance(
    clearance: float, central_volume: float, peripheral_volume: float, half_life: float
) -> float:
    """Q (per the time unit of ``clearance``) giving a terminal half-life ``half_life``.

    The slow eigenvalue β = ln2/t½ of the two-compartment system solves
    β² − (k10 + k12 + k21)·β + k10·k21 = 0 with k10 = CL/Vc, k12 = Q/Vc,
    k21 = Q/Vp. This is linear in Q::

        Q = β·(k10 − β) / (k10/Vp − β/Vc − β/Vp)

    Raises:
        ValueError: no positive Q gives that half-life (β ≥ k10 or the
            volumes are too small for so slow a phase).
    """
    beta = math.log(2.0) / half_life
    k10 = clearance / central_volume
    numerator = beta * (k10 - beta)
    denominator = k10 / peripheral_volume - beta / central_volume - beta / peripheral_volume
    if numerator <= 0.0 or denominator <= 0.0:
        raise ValueError("no two-compartment Q gives this half-life with these volumes")
    return numerator / denominator


def terminal_half_life_h(
    clearance: float, central_volume: float, peripheral_volume: float, intercompartmental: float
) -> float:
    """Terminal (slow-phase) half-life ln2/β of the two-compartment model (time unit of CL)."""
    k10 = clearance / central_volume
    k12 = intercompartmental / central_volume
    k21 = intercompartmental / peripheral_volume
    total = k10 + k12 + k21
    fast = 0.5 * (total + math.sqrt(total * total - 4.0 * k10 * k21))
    beta = k10 * k21 / fast  # Vieta: avoids the cancellation of total − sqrt(...)
    return math.log(2.0) / beta


@dataclasses.dataclass(frozen=True)
class Drug:
    """A checkpoint antibody: target slot, population PK (75 kg) and affinity.

    Attributes:
        name: lower-case generic name.
        target: slot name, one of :data:`SLOTS`.
        clearance_L_per_h: CL (L/h).
        central_volume_L, peripheral_volume_L: V_c, V_p (L).
        intercompartmental_L_per_h: Q (L/h).
        label_half_life_h: terminal half-life on the label (h).
        kd_nM: affinity used by the model (nM).
        K_D_ug_per_mL: the same affinity in µg/mL (the model's units).
        source: where the numbers come from.
    """

    name: str
    target: str
    clearance_L_per_h: float
    central_volume_L: float
    peripheral_volume_L: float
    intercompartmental_L_per_h: float
    label_half_life_h: float
    kd_nM: float
    K_D_ug_per_mL: float
    source: str

    @property
    def slot(self) -> int:
        """Index of the drug's slot."""
        return SLOT_INDEX[self.target]


def _atezolizumab() -> Drug:
    # Tecentriq label: CL 0.200 L/day, Vss 6.9 L, t½ 27 d; Vc/Vp split 55/45 % as
    # for the others, and Q derived from the half-life exactly as they were.
    clearance = 0.200 / _HOURS_PER_DAY
    central, peripheral = 0.55 * 6.9, 0.45 * 6.9
    half_life = 27.0 * _HOURS_PER_DAY
    q = derive_intercompartmental_clearance(clearance, central, peripheral, half_life)
    return Drug("atezolizumab", "PDL1", clearance, central, peripheral, q, half_life, 0.4, 0.058,
                "Tecentriq label (CL 0.2 L/d, Vss 6.9 L, t½ 27 d); K_D QSP-IO (Brown 2020); "
                "Q derived from t½")


#: The drug table. K_D values are the class values of QSP-IO (anti-PD-1 4 nM,
#: anti-PD-L1 0.4 nM, anti-CTLA-4 18.2 nM) and equal the parameter table's
#: K_D_PD1, K_D_PDL1, K_D_CTLA4 defaults (a test keeps them in step).
DRUGS: dict[str, Drug] = {
    drug.name: drug
    for drug in (
        Drug("pembrolizumab", "PD1", 0.195 / _HOURS_PER_DAY, 3.30, 2.70, 1.30 / _HOURS_PER_DAY,
             22.0 * _HOURS_PER_DAY, 4.0, 0.584,
             "Keytruda label (CL 195 mL/d, Vss 6.0 L, t½ 22 d); PARAMETERS.md two-compartment "
             "split; K_D QSP-IO (Wang 2014)"),
        Drug("nivolumab", "PD1", 7.9e-3, 3.63, 2.97, 1.11 / _HOURS_PER_DAY,
             25.0 * _HOURS_PER_DAY, 4.0, 0.584,
             "Opdivo label (CL 7.9 mL/h, Vss 6.6 L, t½ 25 d); PARAMETERS.md two-compartment "
             "split; K_D QSP-IO (Wang 2014)"),
        _atezolizumab(),
        Drug("ipilimumab", "CTLA4", 16.8e-3, 3.85, 3.15, 0.37 / _HOURS_PER_DAY,
             15.4 * _HOURS_PER_DAY, 18.2, 2.69,
             "Yervoy label (CL 16.8 mL/h, Vss 7 L, t½ 15.4 d); PARAMETERS.md two-compartment "
             "split; K_D QSP-IO (Brown 2020)"),
    )
}
DRUG_NAMES = tuple(DRUGS)

#: Drug whose PK fills an empty slot (its amounts stay zero, so the choice
#: only keeps the arithmetic finite).
_PLACEHOLDER = {"PD1": "pembrolizumab", "PDL1": "atezolizumab", "CTLA4": "ipilimumab"}


@pytree_dataclass
class PKParams:
    """Per-slot PK constants, shape (3,) each (slots :data:`SLOTS`).

    Attributes:
        clearance: CL (L/h).
        central_volume: V_c (L).
        peripheral_volume: V_p (L).
        intercompartmental: Q (L/h).
    """

    clearance: jax.Array
    central_volume: jax.Array
    peripheral_volume: jax.Array
    intercompartmental: jax.Array


def pk_params(
    drugs: Sequence[str | None] | None = None, dtype: Any = jnp.float32, key: str = "therapy.drugs"
) -> PKParams:
    """PK constants for the drugs filling the three slots.

    Args:
        drugs: drug names; each goes to its target's slot. ``None`` or an empty
            sequence gives placeholder PK (no drug given).
        dtype: float dtype of the arrays.

    Raises:
        ConfigError: an unknown drug, or two different drugs for one slot.
    """
    chosen: dict[str, str] = {}
    for name in drugs or ():
        if name is None:
            continue
        if name not in DRUGS:
            raise ConfigError(key, name, f"a known drug ({', '.join(DRUG_NAMES)})")
        target = DRUGS[name].target
        if chosen.get(target, name) != name:
            raise ConfigError(key, name, f"at most one drug per target; {target} already holds "
                                         f"{chosen[target]}")
        chosen[target] = name
    table = [DRUGS[chosen.get(slot, _PLACEHOLDER[slot])] for slot in SLOTS]

    def column(attribute: str) -> jax.Array:
        return jnp.asarray([getattr(d, attribute) for d in table], dtype=dtype)

    return PKParams(
        clearance=column("clearance_L_per_h"),
        central_volume=column("central_volume_L"),
        peripheral_volume=column("peripheral_volume_L"),
        intercompartmental=column("intercompartmental_L_per_h"),
    )


def pk_step(
    central: jax.Array, peripheral: jax.Array, pk: PKParams, dt: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """Advance the two-compartment model exactly over ``dt`` hours.

    With k10 = CL/Vc, k12 = Q/Vc, k21 = Q/Vp the system is x' = A·x,
    A = [[−k10−k12, k21], [k12, −k21]], and x(t+dt) = exp(A·dt)·x(t). For the
    eigenvalues λ_s > λ_f (both < 0, s = λ_s − λ_f = √((a−d)² + 4·k12·k21))::

        exp(A·dt) = e^{λ_s·dt}·[(1 − λ_s·ψ)·I + ψ·A],   ψ = (1 − e^{−s·dt})/s

    written so that nothing overflows or cancels for any dt ≥ 0 (ψ → dt as
    s → 0). λ_f comes from the quadratic formula (no cancellation, both terms
    negative) and λ_s = det/λ_f from Vieta's rule.

    Args:
        central, peripheral: amounts (mg), shape (3,) (or broadcastable with ``pk``).
        pk: per-slot constants.
        dt: step (h), ≥ 0.

    Returns:
        (central, peripheral) after dt, mg, never negative.
    """
    k10 = pk.clearance / pk.central_volume
    k12 = pk.intercompartmental / pk.central_volume
    k21 = pk.intercompartmental / pk.peripheral_volume
    a = -(k10 + k12)
    d = -k21
    split = jnp.sqrt((a - d) ** 2 + 4.0 * k12 * k21)
    fast = 0.5 * (a + d - split)
    slow = (k10 * k21) / fast
    dt = jnp.asarray(dt, dtype=central.dtype)
    positive = split > 0.0
    psi = jnp.where(positive, -jnp.expm1(-split * dt) / jnp.where(positive, split, 1.0), dt)
    scale = jnp.exp(slow * dt)
    diagonal = 1.0 - slow * psi
    new_central = scale * ((diagonal + psi * a) * central + psi * k21 * peripheral)
    new_peripheral = scale * (psi * k12 * central + (diagonal + psi * d) * peripheral)
    # exp(A·dt) of a Metzler matrix is non-negative; clip only last-bit rounding.
    return jnp.maximum(new_central, 0.0), jnp.maximum(new_peripheral, 0.0)


def plasma_concentration(central: jax.Array, pk: PKParams) -> jax.Array:
    """Plasma concentration c = A_c/V_c per slot (mg/L = µg/mL)."""
    return central / pk.central_volume


def occupancy(concentration: jax.Array, K_D: jax.Array) -> jax.Array:
    """Target occupancy θ = c/(c + K_D) (c and K_D in µg/mL); 0 when c = 0."""
    return concentration / (concentration + K_D)
