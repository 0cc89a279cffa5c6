"""Therapy: plasma PK of checkpoint antibodies and label regimens / ACT schedules."""

from tmesolve.therapy.pk import (
    DRUG_NAMES,
    DRUGS,
    SLOTS,
    Drug,
    PKParams,
    occupancy,
    pk_params,
    pk_step,
    plasma_concentration,
)
from tmesolve.therapy.regimens import (
    REGIMENS,
    ActInfusion,
    DosingPhase,
    Schedule,
    build_schedule,
    combine_regimens,
    event_times,
    merge_schedules,
    schedule_drugs,
    stack_schedules,
)

__all__ = [
    "DRUG_NAMES",
    "DRUGS",
    "SLOTS",
    "Drug",
    "PKParams",
    "occupancy",
    "pk_params",
    "pk_step",
    "plasma_concentration",
    "REGIMENS",
    "ActInfusion",
    "DosingPhase",
    "Schedule",
    "build_schedule",
    "combine_regimens",
    "event_times",
    "merge_schedules",
    "schedule_drugs",
    "stack_schedules",
]
