"""Label regimens and adoptive cell transfer as fixed-shape event schedules.

A regimen is a list of dosing phases (drug, dose, interval, number of doses,
offset from the start of therapy) and ACT infusions. :func:`build_schedule`
turns names such as ``"pembrolizumab"``, ``"nivolumab_ipilimumab"`` or
``"pembrolizumab+act"`` (or explicit events) into a :class:`Schedule`: a
pytree of arrays padded to a fixed length with +inf times, so every label
regimen has the same shapes and a cohort mixing regimens compiles once.
:func:`event_times` lists the finite event times on the host so the
integrator can land steps on them exactly.

Label schedules (75 kg patient by default for mg/kg doses):

- ``pembrolizumab``: 200 mg q3w; ``pembrolizumab_q6w``: 400 mg q6w; both up
  to 24 months (Keytruda label).
- ``nivolumab``: 240 mg q2w; ``nivolumab_q4w``: 480 mg q4w (Opdivo label).
- ``atezolizumab``: 1200 mg q3w (Tecentriq label).
- ``ipilimumab``: 3 mg/kg q3w × 4 (Yervoy label, melanoma).
- ``nivolumab_ipilimumab``: nivolumab 1 mg/kg + ipilimumab 3 mg/kg q3w × 4,
  then nivolumab 480 mg q4w from 3 weeks after the 4th combination dose
  (CheckMate 067; Opdivo label, melanoma).
- ``nivolumab3_ipilimumab1``: nivolumab 3 mg/kg + ipilimumab 1 mg/kg q3w × 4,
  then nivolumab 480 mg q4w (CheckMate 214; Opdivo label, renal cell carcinoma).
- ``act``: one infusion of ``act_cells`` cells at the start of therapy;
  ``act_with_lymphodepletion``: the same inside a lymphodepletion window
  [t − ld_before, t + ld_after) (cyclophosphamide/fludarabine from day −7).
- ``none``: no therapy.

Therapy "until progression or unacceptable toxicity" cannot stop on
progression inside a run; doses continue to the end of the simulated time
(pembrolizumab stops at its label maximum of 24 months). Toxicity holds are
applied in the systemic model (management rule), not here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve._pytree import pytree_dataclass
from tmesolve.errors import ConfigError
from tmesolve.model.parameters import TABLE
from tmesolve.therapy.pk import DRUG_NAMES, DRUGS, SLOTS, PKParams, pk_params
from tmesolve.units import convert

__all__ = [
    "DosingPhase",
    "ActInfusion",
    "REGIMENS",
    "Schedule",
    "build_schedule",
    "combine_regimens",
    "merge_schedules",
    "stack_schedules",
    "event_times",
    "schedule_drugs",
]

_WEEK_H = 7 * 24.0
_MONTH_H = 365.25 * 24.0 / 12.0
#: Default padded lengths: 64 doses covers any label regimen for two years
#: (nivolumab q2w: 53 doses), so all label regimens share one shape.
DEFAULT_DOSE_SLOTS = 64
DEFAULT_ACT_SLOTS = 4


@dataclasses.dataclass(frozen=True)
class DosingPhase:
    """Repeated doses of one drug.

    Attributes:
        drug: a name in :data:`tmesolve.therapy.pk.DRUGS`.
        dose: ``"200 mg"`` or ``"3 mg/kg"`` (a number means mg).
        interval_h: time between doses (h).
        count: number of doses, ``None`` for "until the end" (bounded by
            ``max_treatment_h`` and the simulated duration).
        offset_h: time of the first dose after the start of therapy (h).
        max_treatment_h: no dose later than this after the start of therapy.
    """

    drug: str
    dose: str | float
    interval_h: float
    count: int | None = None
    offset_h: float = 0.0
    max_treatment_h: float = math.inf


@dataclasses.dataclass(frozen=True)
class ActInfusion:
    """An adoptive cell transfer.

    Attributes:
        cells: infused cells; ``None`` uses the ``act_cells`` argument (default
            from the parameter table).
        offset_h: infusion time after the start of therapy (h).
        lymphodepletion: whether a lymphodepletion window surrounds it.
    """

    cells: float | str | None = None
    offset_h: float = 0.0
    lymphodepletion: bool = False


def _q(weeks: float) -> float:
    return weeks * _WEEK_H


#: The label regimens (see the module docstring for sources).
REGIMENS: dict[str, tuple[DosingPhase | ActInfusion, ...]] = {
    "none": (),
    "pembrolizumab": (
        DosingPhase("pembrolizumab", "200 mg", _q(3), max_treatment_h=24 * _MONTH_H),
    ),
    "pembrolizumab_q6w": (
        DosingPhase("pembrolizumab", "400 mg", _q(6), max_treatment_h=24 * _MONTH_H),
    ),
    "nivolumab": (DosingPhase("nivolumab", "240 mg", _q(2)),),
    "nivolumab_q4w": (DosingPhase("nivolumab", "480 mg", _q(4)),),
    "atezolizumab": (DosingPhase("atezolizumab", "1200 mg", _q(3)),),
    "ipilimumab": (DosingPhase("ipilimumab", "3 mg/kg", _q(3), count=4),),
    "nivolumab_ipilimumab": (
        DosingPhase("nivolumab", "1 mg/kg", _q(3), count=4),
        DosingPhase("ipilimumab", "3 mg/kg", _q(3), count=4),
        # Maintenance starts 3 weeks after the 4th combination dose (week 9 + 3).
        DosingPhase("nivolumab", "480 mg", _q(4), offset_h=_q(12)),
    ),
    "nivolumab3_ipilimumab1": (
        DosingPhase("nivolumab", "3 mg/kg", _q(3), count=4),
        DosingPhase("ipilimumab", "1 mg/kg", _q(3), count=4),
        DosingPhase("nivolumab", "480 mg", _q(4), offset_h=_q(12)),
    ),
    "act": (ActInfusion(),),
    "act_with_lymphodepletion": (ActInfusion(lymphodepletion=True),),
}


@pytree_dataclass
class Schedule:
    """Therapy events as fixed-shape arrays (padded with +inf times, zero amounts).

    Attributes:
        dose_times_h: (n,) dose times (h), sorted, +inf padding.
        dose_mg: (n,) dose amounts (mg), 0 in padding.
        dose_slot: (n,) int32 slot index (0 PD1, 1 PDL1, 2 CTLA4).
        act_times_h: (m,) ACT infusion times (h), +inf padding.
        act_cells: (m,) infused cells, 0 in padding.
        ld_start_h, ld_end_h: (m,) lymphodepletion window [start, end) per
            infusion; +inf for infusions without one and for padding.
        weight_kg: () body weight used for mg/kg doses.
        slot_drug: (3,) int32 index of each slot's drug in
            :data:`tmesolve.therapy.pk.DRUG_NAMES`, −1 when the slot is empty.
        pk: per-slot PK constants of those drugs.
    """

    dose_times_h: jax.Array
    dose_mg: jax.Array
    dose_slot: jax.Array
    act_times_h: jax.Array
    act_cells: jax.Array
    ld_start_h: jax.Array
    ld_end_h: jax.Array
    weight_kg: jax.Array
    slot_drug: jax.Array
    pk: PKParams


def combine_regimens(*specs: str | Sequence[Any]) -> list[Any]:
    """Combine regimen names or event lists into one spec (``"pembrolizumab", "act"``).

    ``build_schedule(combine_regimens("pembrolizumab", "act"))`` equals
    ``build_schedule("pembrolizumab+act")``.
    """
    combined: list[Any] = []
    for spec in specs:
        if isinstance(spec, str):
            combined.extend(part.strip() for part in spec.split("+"))
        else:
            combined.extend(spec)
    return combined


def _known_regimens() -> str:
    return ", ".join(REGIMENS)


def _dose_mg(value: Any, weight_kg: float, key: str) -> float:
    """A dose in mg from ``"200 mg"``, ``"3 mg/kg"`` or a number (mg)."""
    if isinstance(value, str):
        try:
            mg = convert(value, "mg", key)
        except ConfigError:
            try:
                mg = convert(value, "mg/kg", key) * weight_kg
            except ConfigError:
                raise ConfigError(key, value, "a dose in mg or mg/kg (e.g. '200 mg', '3 mg/kg')") \
                    from None
    else:
        mg = convert(value, "mg", key)
    if mg < 0.0:
        raise ConfigError(key, value, "a dose >= 0")
    return mg


def _hours(value: Any, key: str) -> float:
    return convert(value, "h", key)


def _expand(
    spec: str | Sequence[Any],
    start_h: float,
    end_h: float,
    weight_kg: float,
    act_cells: float,
    key: str,
) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, bool]]]:
    """Doses (time, mg, drug) and infusions (time, cells, lymphodepletion)."""
    items = combine_regimens(spec) if isinstance(spec, str) else list(spec)
    doses: list[tuple[float, float, str]] = []
    infusions: list[tuple[float, float, bool]] = []
    for index, item in enumerate(items):
        item_key = f"{key}[{index}]" if not isinstance(spec, str) else key
        if isinstance(item, str):
            if item not in REGIMENS:
                raise ConfigError(item_key, item, f"a known regimen ({_known_regimens()})")
            phases: Sequence[Any] = REGIMENS[item]
            for phase in phases:
                if isinstance(phase, DosingPhase):
                    doses += _phase_doses(phase, start_h, end_h, weight_kg, item_key)
                else:
                    cells = act_cells if phase.cells is None else convert(phase.cells, "cells",
                                                                          item_key)
                    infusions.append((start_h + phase.offset_h, cells, phase.lymphodepletion))
        elif isinstance(item, DosingPhase):
            doses += _phase_doses(item, start_h, end_h, weight_kg, item_key)
        elif isinstance(item, ActInfusion):
            cells = act_cells if item.cells is None else convert(item.cells, "cells", item_key)
            infusions.append((start_h + item.offset_h, cells, item.lymphodepletion))
        elif isinstance(item, Mapping):
            dose, infusion = _explicit_event(item, start_h, weight_kg, act_cells, item_key)
            doses += dose
            infusions += infusion
        else:
            raise ConfigError(item_key, item, f"a regimen name ({_known_regimens()}) or an event "
                                              "mapping with 'drug' or 'act'")
    for time_h, cells, _ in infusions:
        if cells < 0.0:
            raise ConfigError(key, cells, "a number of infused cells >= 0")
        if time_h < start_h:
            raise ConfigError(key, time_h, f"an infusion time >= the schedule start {start_h:g} h")
    return doses, infusions


def _phase_doses(
    phase: DosingPhase, start_h: float, end_h: float, weight_kg: float, key: str
) -> list[tuple[float, float, str]]:
    if phase.drug not in DRUGS:
        raise ConfigError(key, phase.drug, f"a known drug ({', '.join(DRUG_NAMES)})")
    mg = _dose_mg(phase.dose, weight_kg, key)
    if phase.interval_h <= 0.0:
        raise ConfigError(key, phase.interval_h, "a dosing interval > 0 h")
    if phase.offset_h < 0.0:
        raise ConfigError(key, phase.offset_h, "a first-dose offset >= 0 h (not in the past)")
    last = min(end_h, start_h + phase.max_treatment_h)
    doses = []
    number = 0
    while phase.count is None or number < phase.count:
        time_h = start_h + phase.offset_h + number * phase.interval_h
        if time_h >= last:
            break
        doses.append((time_h, mg, phase.drug))
        number += 1
    return doses


def _explicit_event(
    item: Mapping[str, Any], start_h: float, weight_kg: float, act_cells: float, key: str
) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, bool]]]:
    """``{"drug": "nivolumab", "dose": "240 mg", "time": "2 wk"}`` or
    ``{"act": "1e9 cells", "time": 0, "lymphodepletion": true}``; times are absolute."""
    allowed = {"drug", "dose", "time", "act", "lymphodepletion"}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", item[unknown[0]],
                          f"one of the event keys {sorted(allowed)}")
    time_h = _hours(item.get("time", start_h), f"{key}.time")
    if time_h < start_h:
        raise ConfigError(f"{key}.time", item.get("time"),
                          f"a time >= the schedule start {start_h:g} h (not in the past)")
    if "drug" in item:
        drug = item["drug"]
        if drug not in DRUGS:
            raise ConfigError(f"{key}.drug", drug, f"a known drug ({', '.join(DRUG_NAMES)})")
        if "dose" not in item:
            raise ConfigError(f"{key}.dose", None, "a dose in mg or mg/kg")
        return [(time_h, _dose_mg(item["dose"], weight_kg, f"{key}.dose"), drug)], []
    if "act" in item:
        cells = act_cells if item["act"] is None else convert(item["act"], "cells", f"{key}.act")
        if cells < 0.0:
            raise ConfigError(f"{key}.act", item["act"], "a number of infused cells >= 0")
        return [], [(time_h, cells, bool(item.get("lymphodepletion", False)))]
    raise ConfigError(key, dict(item), "an event mapping with 'drug' (and 'dose') or 'act'")


def _padded_length(count: int, block: int) -> int:
    return max(block, block * math.ceil(count / block))


def build_schedule(
    spec: str | Sequence[Any],
    start_h: float | str = 0.0,
    duration_h: float | str = 365.25 * 24.0,
    weight_kg: float | str = 75.0,
    act_cells: float | str | None = None,
    ld_before_h: float | str | None = None,
    ld_after_h: float | str | None = None,
    dose_slots: int = DEFAULT_DOSE_SLOTS,
    act_slots: int = DEFAULT_ACT_SLOTS,
    dtype: Any = jnp.float32,
    key: str = "therapy.regimen",
) -> Schedule:
    """Build the event schedule of a regimen.

    Args:
        spec: a regimen name (``"nivolumab"``), names joined by ``+``
            (``"pembrolizumab+act"``), or a list of names, :class:`DosingPhase`,
            :class:`ActInfusion` and explicit event mappings
            (``{"drug": ..., "dose": "240 mg", "time": "2 wk"}``,
            ``{"act": "1e9 cells", "time": 0, "lymphodepletion": True}``;
            explicit times are absolute, hours or a string with units).
        start_h: start of therapy (h from the start of the simulation, ≥ 0);
            label regimens dose from here.
        duration_h: label regimens dose at times < start_h + duration_h.
        weight_kg: body weight for mg/kg doses (kg).
        act_cells: cells per ACT infusion (default: parameter ``act_cells``).
        ld_before_h, ld_after_h: lymphodepletion window around an infusion
            (defaults: parameters ``ld_before``, ``ld_after``).
        dose_slots, act_slots: padding block sizes; arrays are padded to a
            multiple of these, so shapes stay fixed across regimens.
        dtype: float dtype of time and amount arrays. Times are absolute hours,
            so float32 resolves them to ~1e-7 relative (≈ 3 s after a year).

    Raises:
        ConfigError: unknown regimen or drug (the known ones listed), a dose
            or infusion before ``start_h`` (in the past), a negative dose or
            cell number, two drugs for one target slot, or a bad number.
    """
    start = _hours(start_h, f"{key}.start_h")
    if start < 0.0:
        raise ConfigError(f"{key}.start_h", start_h, "a start time >= 0 h (not in the past)")
    duration = _hours(duration_h, f"{key}.duration_h")
    if duration <= 0.0:
        raise ConfigError(f"{key}.duration_h", duration_h, "a duration > 0 h")
    weight = convert(weight_kg, "kg", f"{key}.weight_kg")
    if not (1.0 <= weight <= 500.0):
        raise ConfigError(f"{key}.weight_kg", weight_kg, "a body weight in [1, 500] kg")
    cells = TABLE["act_cells"].value if act_cells is None else convert(act_cells, "cells",
                                                                      f"{key}.act_cells")
    before = TABLE["ld_before"].value if ld_before_h is None else _hours(ld_before_h,
                                                                         f"{key}.ld_before_h")
    after = TABLE["ld_after"].value if ld_after_h is None else _hours(ld_after_h,
                                                                      f"{key}.ld_after_h")
    if before < 0.0 or after < 0.0:
        raise ConfigError(f"{key}.ld_before_h", (before, after), "window lengths >= 0 h")

    doses, infusions = _expand(spec, start, start + duration, weight, cells, key)
    drugs_by_slot: dict[int, str] = {}
    for _, _, drug in doses:
        slot = DRUGS[drug].slot
        if drugs_by_slot.setdefault(slot, drug) != drug:
            raise ConfigError(key, spec, f"at most one drug per target; {SLOTS[slot]} has both "
                                         f"{drugs_by_slot[slot]} and {drug}")
    doses.sort(key=lambda d: d[0])
    infusions.sort(key=lambda i: i[0])

    n = _padded_length(len(doses), dose_slots)
    m = _padded_length(len(infusions), act_slots)
    dose_times = np.full(n, np.inf)
    dose_mg = np.zeros(n)
    dose_slot = np.zeros(n, dtype=np.int32)
    for index, (time_h, mg, drug) in enumerate(doses):
        dose_times[index], dose_mg[index], dose_slot[index] = time_h, mg, DRUGS[drug].slot
    act_times = np.full(m, np.inf)
    act_amount = np.zeros(m)
    ld_start = np.full(m, np.inf)
    ld_end = np.full(m, np.inf)
    for index, (time_h, number, lymphodepletion) in enumerate(infusions):
        act_times[index], act_amount[index] = time_h, number
        if lymphodepletion:
            ld_start[index], ld_end[index] = time_h - before, time_h + after
    slot_drug = np.full(len(SLOTS), -1, dtype=np.int32)
    for slot, drug in drugs_by_slot.items():
        slot_drug[slot] = DRUG_NAMES.index(drug)

    return Schedule(
        dose_times_h=jnp.asarray(dose_times, dtype=dtype),
        dose_mg=jnp.asarray(dose_mg, dtype=dtype),
        dose_slot=jnp.asarray(dose_slot),
        act_times_h=jnp.asarray(act_times, dtype=dtype),
        act_cells=jnp.asarray(act_amount, dtype=dtype),
        ld_start_h=jnp.asarray(ld_start, dtype=dtype),
        ld_end_h=jnp.asarray(ld_end, dtype=dtype),
        weight_kg=jnp.asarray(weight, dtype=dtype),
        slot_drug=jnp.asarray(slot_drug),
        pk=pk_params(list(drugs_by_slot.values()), dtype=dtype),
    )


def schedule_drugs(schedule: Schedule) -> tuple[str | None, ...]:
    """Drug name per slot (host side), ``None`` for an empty slot."""
    indices = np.asarray(schedule.slot_drug)
    if indices.ndim != 1:
        raise ValueError("schedule_drugs takes one schedule, not a stacked batch")
    return tuple(DRUG_NAMES[i] if i >= 0 else None for i in indices)


def _pad_to(array: np.ndarray, length: int, fill: float) -> np.ndarray:
    padding = np.full(length - array.shape[0], fill, dtype=array.dtype)
    return np.concatenate([array, padding])


def merge_schedules(*schedules: Schedule, key: str = "therapy.regimen") -> Schedule:
    """Merge built schedules of one patient (events of all, sorted; same body weight).

    Raises:
        ConfigError: two different drugs in one slot, or different body weights.
    """
    if not schedules:
        raise ConfigError(key, (), "at least one schedule")
    weights = {float(s.weight_kg) for s in schedules}
    if len(weights) > 1:
        raise ConfigError(f"{key}.weight_kg", sorted(weights), "one body weight per patient")
    slot_drug = np.full(len(SLOTS), -1, dtype=np.int32)
    for s in schedules:
        for slot, drug in enumerate(np.asarray(s.slot_drug)):
            if drug < 0:
                continue
            if slot_drug[slot] not in (-1, drug):
                raise ConfigError(key, (DRUG_NAMES[slot_drug[slot]], DRUG_NAMES[drug]),
                                  f"at most one drug per target ({SLOTS[slot]})")
            slot_drug[slot] = drug
    dtype = schedules[0].dose_mg.dtype

    def joined(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(s, name)) for s in schedules])

    dose_order = np.argsort(joined("dose_times_h"), kind="stable")
    act_order = np.argsort(joined("act_times_h"), kind="stable")
    n = _padded_length(int(np.isfinite(joined("dose_times_h")).sum()), DEFAULT_DOSE_SLOTS)
    m = _padded_length(int(np.isfinite(joined("act_times_h")).sum()), DEFAULT_ACT_SLOTS)

    def take(name: str, order: np.ndarray, length: int, fill: float) -> np.ndarray:
        # +inf padding sorts last, so truncating to length drops padding only.
        values = joined(name)[order][:length]
        return _pad_to(values, length, fill)

    drugs = [DRUG_NAMES[i] for i in slot_drug if i >= 0]
    return Schedule(
        dose_times_h=jnp.asarray(take("dose_times_h", dose_order, n, np.inf), dtype=dtype),
        dose_mg=jnp.asarray(take("dose_mg", dose_order, n, 0.0), dtype=dtype),
        dose_slot=jnp.asarray(take("dose_slot", dose_order, n, 0).astype(np.int32)),
        act_times_h=jnp.asarray(take("act_times_h", act_order, m, np.inf), dtype=dtype),
        act_cells=jnp.asarray(take("act_cells", act_order, m, 0.0), dtype=dtype),
        ld_start_h=jnp.asarray(take("ld_start_h", act_order, m, np.inf), dtype=dtype),
        ld_end_h=jnp.asarray(take("ld_end_h", act_order, m, np.inf), dtype=dtype),
        weight_kg=schedules[0].weight_kg,
        slot_drug=jnp.asarray(slot_drug),
        pk=pk_params(drugs, dtype=dtype),
    )


def stack_schedules(schedules: Sequence[Schedule]) -> Schedule:
    """Stack schedules of several patients along a new leading axis (for ``vmap``).

    Event arrays are padded to the longest with +inf times and zero amounts.
    """
    if not schedules:
        raise ConfigError("therapy.regimen", (), "at least one schedule")
    n = max(int(s.dose_times_h.shape[0]) for s in schedules)
    m = max(int(s.act_times_h.shape[0]) for s in schedules)
    fills = {"dose_times_h": (n, np.inf), "dose_mg": (n, 0.0), "dose_slot": (n, 0),
             "act_times_h": (m, np.inf), "act_cells": (m, 0.0), "ld_start_h": (m, np.inf),
             "ld_end_h": (m, np.inf)}
    padded = []
    for s in schedules:
        changes = {name: jnp.asarray(_pad_to(np.asarray(getattr(s, name)), length, fill),
                                     dtype=getattr(s, name).dtype)
                   for name, (length, fill) in fills.items()}
        padded.append(dataclasses.replace(s, **changes))
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *padded)


def event_times(schedule: Schedule) -> np.ndarray:
    """Sorted unique finite event times (h) on the host: doses, infusions and
    lymphodepletion window edges, so the integrator can step onto each exactly.

    Works on a single or a stacked schedule (the union of all patients' times).
    """
    times = np.concatenate([
        np.ravel(np.asarray(schedule.dose_times_h, dtype=np.float64)),
        np.ravel(np.asarray(schedule.act_times_h, dtype=np.float64)),
        np.ravel(np.asarray(schedule.ld_start_h, dtype=np.float64)),
        np.ravel(np.asarray(schedule.ld_end_h, dtype=np.float64)),
    ])
    return np.unique(times[np.isfinite(times)])
