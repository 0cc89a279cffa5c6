"""Set up a TME run: a patient's lesions, parameters, therapy and initial state.

This is the bridge from plain, validated settings (no Hydra here) to the
engine's objects: :class:`~tmesolve.model.tme.TMEModel`, :class:`TMEParams`,
the initial :class:`~tmesolve.model.base.State` and the event times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from tmesolve.errors import ConfigError, check_positive, check_range
from tmesolve.geometry import DEFAULT_TMB, PHENOTYPE_PRESETS, PHENOTYPES, build_lesion_maps, lesion_seeds, load_map
from tmesolve.grid import Grid
from tmesolve.integrate import initial_state
from tmesolve.model.base import State
from tmesolve.model.parameters import PARAMETERS, ModelParams, make_params
from tmesolve.model.systemic import initial_systemic
from tmesolve.model.tme import SPECIES, TMEAux, TMEModel, TMEParams
from tmesolve.therapy.regimens import build_schedule, event_times

#: Per-lesion parameter values each immunophenotype preset sets (MODEL.md preset
#: table): baseline CXCL production p_X0 (PARAMETERS.md well-mixed presets: hot
#: 0.20, intermediate 0.08, cold 0.02 ng·mL⁻¹·h⁻¹) and TGF-β (excluded "high":
#: tumour TGF-β production ×3, chosen).
PHENOTYPE_PARAMETERS: Mapping[str, Mapping[str, float]] = {
    "inflamed": {"p_X0": 0.20},
    "excluded": {"p_X0": 0.08, "p_B": 3.0},
    "desert": {"p_X0": 0.02},
}

MAX_LESIONS = 5


@dataclasses.dataclass(frozen=True)
class LesionSpec:
    """One lesion of a patient.

    Attributes:
        phenotype: "inflamed", "excluded" or "desert" (sets vessels, stroma, CXCL, TGF-β).
        tmb: tumour mutational burden (mut/Mb); None → the phenotype's default (15/6/2).
        radius_um: simulated lesion radius (µm).
        represented_diameter_mm: diameter of the real lesion this box represents
            (sub-volume mode; systemic fluxes scale by represented/simulated volume
            and RECIST uses the burden diameter); None → whole-lesion mode.
        pdl1_baseline: baseline PD-L1 expression P₀ (None: parameter default).
        maps: optional user maps {"vessels"|"stroma"|"antigenicity"|"tumour_cells": path}.
        parameters: per-lesion parameter overrides (symbols of the table).
    """

    phenotype: str = "inflamed"
    tmb: float | None = None
    radius_um: float = 300.0
    represented_diameter_mm: float | None = 20.0
    pdl1_baseline: float | None = None
    maps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TMESetup:
    """What :func:`setup_tme` builds."""

    model: TMEModel
    params: TMEParams
    state: State
    event_times_h: np.ndarray
    maps: dict[str, np.ndarray]          # initial V, S, a per lesion (lesions, nx, ny, nz)
    lesions: tuple[LesionSpec, ...]
    recist_uses: str                     # "mask" (whole lesion) or "burden" (sub-volume)


def _validate_lesions(grid: Grid, lesions: Sequence[LesionSpec], key: str) -> None:
    if not 1 <= len(lesions) <= MAX_LESIONS:
        raise ConfigError(key, len(lesions), f"1 to {MAX_LESIONS} lesions (RECIST target lesions)")
    half_box = 0.5 * min(L for L, n in zip(grid.lengths_um, grid.shape) if n > 1)
    for i, lesion in enumerate(lesions):
        where = f"{key}[{i}]"
        if lesion.phenotype not in PHENOTYPES:
            raise ConfigError(f"{where}.phenotype", lesion.phenotype, f"one of {', '.join(PHENOTYPES)}")
        radius = check_positive(f"{where}.radius_um", lesion.radius_um)
        if radius >= half_box:
            raise ConfigError(f"{where}.radius_um", lesion.radius_um,
                              f"a radius < half the box ({half_box:g} µm) so the lesion fits with room to grow")
        if lesion.tmb is not None:
            check_range(f"{where}.tmb", lesion.tmb, 0.0, 1000.0)
        if lesion.represented_diameter_mm is not None:
            check_range(f"{where}.represented_diameter_mm", lesion.represented_diameter_mm, 1e-3, 500.0)
        if lesion.pdl1_baseline is not None:
            check_range(f"{where}.pdl1_baseline", lesion.pdl1_baseline, 0.0, 1.0)


def setup_tme(grid: Grid, lesions: Sequence[LesionSpec], *, therapy: str | Sequence[Any] = "none",
              therapy_start_h: float = 0.0, duration_h: float = 12 * 7 * 24.0, weight_kg: float = 75.0,
              act_cells: float | None = None, parameters: Mapping[str, Any] | None = None,
              seed: int = 0, dtype=jnp.float32, margin_width_um: float = 100.0,
              tissue_velocity: bool = True, key: str = "patient.lesions") -> TMESetup:
    """Build model, parameters, therapy schedule and initial state (all validated here).

    Every value is checked before anything compiles; errors name the setting.
    """
    lesions = tuple(lesions)
    _validate_lesions(grid, lesions, key)
    per_lesion_overrides = []
    for lesion in lesions:
        values: dict[str, Any] = dict(PHENOTYPE_PARAMETERS[lesion.phenotype])
        tmb = DEFAULT_TMB[lesion.phenotype] if lesion.tmb is None else float(lesion.tmb)
        values["TMB"] = tmb
        if lesion.pdl1_baseline is not None:
            values["P_0"] = float(lesion.pdl1_baseline)
        values.update(lesion.parameters)
        per_lesion_overrides.append(values)
    model_params = make_params(parameters or {}, per_lesion_overrides, lesions=len(lesions), dtype=dtype)
    schedule = build_schedule(therapy, start_h=therapy_start_h, duration_h=duration_h, weight_kg=weight_kg,
                              act_cells=act_cells, dtype=dtype, key="therapy.regimens")

    K_max = float(model_params["K_max"])
    packing = float(model_params["C_init_frac"])
    tmb_0 = float(model_params["TMB_0"])
    seeds = lesion_seeds(seed, len(lesions))
    stacks: dict[str, list[np.ndarray]] = {name: [] for name in ("tumour_cells", "vessels", "stroma", "antigenicity")}
    for i, lesion in enumerate(lesions):
        tmb = float(np.asarray(model_params["TMB"])[i])
        maps = build_lesion_maps(grid, lesion.phenotype, tmb, lesion.radius_um, seeds[i], key=f"{key}[{i}]",
                                 packing=packing, K_max=K_max, tmb_0=tmb_0)
        for name, path in dict(lesion.maps).items():
            if name not in stacks:
                raise ConfigError(f"{key}[{i}].maps.{name}", path, f"one of {', '.join(stacks)}")
            maps[name] = load_map(path, name, grid.shape, key=f"{key}[{i}].maps.{name}")
        for name in stacks:
            stacks[name].append(maps[name])
    arrays = {name: np.stack(values) for name, values in stacks.items()}

    C = arrays["tumour_cells"]
    simulated_burden = C.sum(axis=(1, 2, 3)) * grid.voxel_volume_mm3
    simulated_volume_mm3 = simulated_burden / (packing * K_max)
    represented = []
    for i, lesion in enumerate(lesions):
        if lesion.represented_diameter_mm is None:
            represented.append(simulated_volume_mm3[i])
        else:
            represented.append(np.pi / 6.0 * lesion.represented_diameter_mm**3)
    represented = np.asarray(represented)
    volume_scale = represented / np.maximum(simulated_volume_mm3, 1e-30)
    baseline_diameter = np.cbrt(6.0 * represented / np.pi)
    whole = all(lesion.represented_diameter_mm is None for lesion in lesions)
    host_vessels = np.asarray([PHENOTYPE_PRESETS[lesion.phenotype]["vessel_host"] for lesion in lesions])

    params = TMEParams(model=model_params, schedule=schedule,
                       volume_scale=jnp.asarray(volume_scale, dtype),
                       baseline_burden=jnp.asarray(simulated_burden, dtype),
                       baseline_diameter_mm=jnp.asarray(baseline_diameter, dtype),
                       host_vessels=jnp.asarray(host_vessels, dtype),
                       lesion_weight=jnp.ones(len(lesions), dtype))

    model = TMEModel(grid, lesions=len(lesions), margin_width_um=margin_width_um, tissue_velocity=tissue_velocity)
    shape = (len(lesions), *grid.shape)
    # Uniform fields are broadcast views: the stack below writes every value once.
    initial = {s.symbol: np.broadcast_to(0.0, shape) for s in SPECIES}
    initial["C"] = C
    initial["V"], initial["S"], initial["a"] = arrays["vessels"], arrays["stroma"], arrays["antigenicity"]
    initial["H"] = np.maximum(K_max - C, 0.0)
    initial["O"] = np.broadcast_to(float(model_params["O_b"]), shape)
    initial["P"] = np.broadcast_to(np.asarray(model_params["P_0"])[:, None, None, None], shape)
    # Stacked straight into the state's dtype: the float64 stack of 16 fields (2 GiB
    # at 256³) and its conversion cost seconds; each value rounds the same either way.
    stacked = np.stack([initial[symbol] for symbol in model.species_symbols()], dtype=np.dtype(dtype))

    # Untreated systemic steady state for the antigen the lesions shed at baseline.
    shedding = float(np.sum(float(model_params["s_sh"]) * arrays["antigenicity"] * C, axis=(1, 2, 3))
                     .dot(volume_scale) * grid.voxel_volume_mm3)
    systemic = initial_systemic(model_params, dtype=dtype, antigen_flux=shedding)
    aux = TMEAux(systemic=systemic, events_applied_until=jnp.asarray(-jnp.inf, dtype),
                 transport_speed=jnp.zeros((), dtype))
    # transport_speed stays 0 here: every compiled interval measures it before its
    # first dt (an opening transport pass of length zero, or begin_interval in a
    # batch). Measuring it here, outside jit, cost ~11 s of op-by-op dispatch.
    state = initial_state(model, stacked, aux=aux, dtype=dtype)
    return TMESetup(model=model, params=params, state=state, event_times_h=event_times(schedule),
                    maps={"vessels": arrays["vessels"], "stroma": arrays["stroma"],
                          "antigenicity": arrays["antigenicity"]},
                    lesions=lesions, recist_uses="mask" if whole else "burden")


# ---------------------------------------------------------------------------
# The app's builder (receives the validated, typed configuration tree)
# ---------------------------------------------------------------------------

#: RECIST assessment interval (h): every 6 weeks, as in most checkpoint trials.
ASSESSMENT_INTERVAL_H = 6 * 7 * 24.0


def setup_uniform_tissue(grid: Grid, phenotype: str = "inflamed", *, fields: Mapping[str, float] | None = None,
                         dtype=jnp.float32, model_class: type[TMEModel] = TMEModel) -> TMESetup:
    """Well-mixed tissue: every voxel of ``grid`` holds one packed tumour voxel of a
    ``phenotype`` lesion, with ``fields`` (species name → value) set over it.

    The voxel is the centre of an 8 × 8 × 1 box of 100 µm voxels around a
    150 µm lesion built by :func:`setup_tme` (no therapy); its parameters and
    systemic state come along. Tissue velocity is off and the box is the whole
    lesion (volume_scale 1), so with uniform fields and no-flux walls the PDE
    is the ODE of its local terms plus the systemic compartment: what the
    well-mixed checks compare against ``solve_ivp`` and the step-error
    benchmarks compare across schemes (``model_class``, a TMEModel subclass).
    """
    lesion = LesionSpec(phenotype, radius_um=150.0, represented_diameter_mm=None)
    preset = setup_tme(Grid((8, 8, 1), 100.0), [lesion], dtype=dtype, tissue_velocity=False)
    model = model_class(grid, lesions=1, tissue_velocity=False)
    voxel = np.array(preset.state.fields)[:, :, 4, 4, 0]
    for name, value in (fields or {}).items():
        voxel[model.index(name)] = value
    values = np.broadcast_to(voxel[:, :, None, None, None], model.field_shape).copy()
    state = initial_state(model, values, aux=preset.state.aux, dtype=dtype)
    params = dataclasses.replace(preset.params, volume_scale=jnp.ones(1, dtype))
    maps = {name: values[model.index(name)] for name in preset.maps}
    return dataclasses.replace(preset, model=model, params=params, state=state, maps=maps)


def _lesion_specs(config) -> list[LesionSpec]:
    return [LesionSpec(phenotype=lesion.phenotype, tmb=lesion.tmb, radius_um=lesion.radius_um,
                       represented_diameter_mm=lesion.represented_diameter_mm,
                       pdl1_baseline=lesion.pdl1_baseline, maps=dict(lesion.maps),
                       parameters=dict(lesion.params))
            for lesion in config.patient.lesions]


def tme_finish(recist_uses: str, lesion_names: Sequence[str], baseline_h: float = 0.0,
               assessment_interval_h: float = ASSESSMENT_INTERVAL_H):
    """The end-of-run summary: final burden, RECIST 1.1, immunophenotype (a ``finish`` callback).

    The RECIST baseline is the record at ``baseline_h`` (the start of therapy: the
    baseline scan precedes treatment, and a pre-treatment lead-in lets a lesion
    started near packing settle with its vasculature); assessments follow every
    ``assessment_interval_h`` (6 weeks) and at the end of the run.
    """
    from tmesolve.readouts import PHENOTYPES
    from tmesolve.recist import score_recist

    def finish(records) -> dict:
        times = np.asarray(records.time_h, dtype=float)
        name = "longest_diameter_mm" if recist_uses == "mask" else "burden_diameter_mm"
        diameters = np.asarray(records.timeseries[name], dtype=float)
        baseline = times[np.argmin(np.abs(times - baseline_h))]
        assessments = np.arange(baseline + assessment_interval_h, times[-1] + 1e-9, assessment_interval_h)
        if assessments.size == 0 or assessments[-1] < times[-1] - 1e-9:
            assessments = np.append(assessments, times[-1])
        result = score_recist(times, diameters, assessments, baseline_time_h=baseline)
        codes = np.asarray(records.timeseries["immunophenotype"], dtype=float)
        phenotype = codes[np.argmin(np.abs(times - baseline_h))]
        burden = np.asarray(records.timeseries["viable_burden"], dtype=float)
        summary = {
            "lesions": list(lesion_names),
            "final_viable_burden": [float(b) for b in burden[-1]],
            "burden_ratio": [float(b) for b in burden[-1] / np.maximum(burden[np.argmin(np.abs(times - baseline_h))],
                                                                     1e-30)],
        "baseline_time_h": float(baseline),
            "immunophenotype": [PHENOTYPES[int(code)] for code in phenotype],   # at the start of therapy
            "final_immunophenotype": [PHENOTYPES[int(code)] for code in codes[-1]],
            "best_response": result.best_response,
            "best_percent_change": float(result.best_percent_change),
            "time_to_progression_h": float(result.time_to_progression_h),
            "recist_diameter": name,
            "baseline_sum_diameters_mm": float(result.baseline_mm),
            "final_irae_grade": float(np.asarray(records.systemic["irae_grade"])[-1]),
            "max_irae_grade": float(np.asarray(records.systemic["irae_peak_grade"])[-1]),
            "therapy_resumptions": float(np.asarray(records.systemic["therapy_resumptions"])[-1]),
            "therapy_discontinued": bool(np.asarray(records.systemic["therapy_discontinued"])[-1] >= 0.5),
            "response": {  # written to /response
                "assessment_time_h": result.assessment_times_h,
                "sum_diameters_mm": result.sum_diameters_mm,
                "category": [str(c) for c in result.category],
                "best_response": result.best_response,
                "time_to_progression_h": float(result.time_to_progression_h),
                "extra": {"diameter": name, "percent_change": np.asarray(result.percent_change),
                          "duration_of_response_h": float(result.duration_of_response_h),
                          "durable_cr": bool(result.durable_cr), "baseline_mm": float(result.baseline_mm),
                          "baseline_time_h": float(baseline)},
            },
        }
        return summary

    return finish


def build_tme_simulation(config):
    """The app's ``tme`` experiment: a patient's lesions under a therapy (see tmesolve.config)."""
    from tmesolve.integrate import make_solver_params
    from tmesolve.readouts import SYSTEMIC, TIMESERIES
    from tmesolve.simulation import Simulation, jax_dtype, output_schedule, select_fields

    dtype = jax_dtype(config.solver.dtype)
    grid = config.grid.to_grid()
    therapy = config.therapy
    parameters = dict(config.tme.params)
    if not therapy.management_rule:
        parameters["manage_irae"] = 0.0
    regimens = "+".join(therapy.regimens) if therapy.regimens else "none"
    setup = setup_tme(grid, _lesion_specs(config), therapy=regimens, therapy_start_h=therapy.start_h,
                      duration_h=config.output.duration_h, weight_kg=therapy.weight_kg,
                      act_cells=therapy.act_cells, parameters=parameters, seed=config.seed, dtype=dtype)
    solver = make_solver_params(config.solver.dt_max_h, config.solver.safety, config.solver.max_steps, dtype=dtype)
    outputs = output_schedule(config.output.duration_h, config.output.interval_h)
    events = setup.event_times_h
    events = events[(events > 0) & (events < outputs[-1])]
    maps = {name: (array, "1", name.replace("_", " ")) for name, array in setup.maps.items()}
    names = [lesion.name for lesion in config.patient.lesions]
    return Simulation(
        name="tme", model=setup.model, integrator_order=config.solver.splitting_order,
        merge_reactions=config.solver.merge_reactions, params=setup.params,
        solver=solver, state=setup.state, output_times_h=outputs, event_times_h=events,
        fields=select_fields(setup.model, config.output.fields), maps=maps,
        timeseries=list(TIMESERIES), systemic=list(SYSTEMIC),
        finish=tme_finish(setup.recist_uses, names, baseline_h=therapy.start_h), seed=config.seed)


def pad_lesions(setup: TMESetup, lesions: int) -> TMESetup:
    """The patient of ``setup`` with copies of its first lesion appended up to ``lesions``.

    The copies carry ``lesion_weight`` 0, so the systemic compartment does not
    see them (:meth:`TMEModel._systemic_inputs`), and the patient's mean TMB as
    their TMB, so the priming factor τ(mean TMB) is unchanged; since a lesion's own
    dynamics depend only on its fields and the shared systemic state, each copy
    evolves exactly as the first lesion does, and so leaves the patient's
    stable time step unchanged. A batch of patients with different lesion
    counts then shares one lesion count: one compile for the whole cohort,
    at the cost of computing the copies. Their readouts are to be dropped
    (the first ``setup.model.lesions`` entries are the patient's).

    Raises:
        ConfigError: ``lesions`` below the patient's count or above MAX_LESIONS.
    """
    count = setup.model.lesions
    if isinstance(lesions, bool) or not isinstance(lesions, (int, np.integer)) or not count <= lesions <= MAX_LESIONS:
        raise ConfigError("lesions", lesions, f"an integer in [{count}, {MAX_LESIONS}] (the patient has {count})")
    if lesions == count:
        return setup
    rows = np.concatenate([np.arange(count), np.zeros(lesions - count, dtype=int)])

    def take(leaf, axis: int = 0):
        return jnp.take(jnp.asarray(leaf), rows, axis=axis)

    per_lesion = {p.symbol for p in PARAMETERS if p.per_lesion}
    values = {symbol: take(value) if symbol in per_lesion else value
              for symbol, value in setup.params.model.values.items()}
    # The lesions' TMB enters the systemic priming as their mean (τ(TMB),
    # systemic.tmb_priming_factor) and nothing else (the antigenicity map was
    # built from it above): copies carry the patient's mean, which leaves it as is.
    tmb = jnp.asarray(setup.params.model.values["TMB"])
    values["TMB"] = jnp.concatenate([tmb, jnp.full(lesions - count, jnp.mean(tmb), tmb.dtype)])
    weight = setup.params.lesion_weight
    params = dataclasses.replace(
        setup.params,
        model=ModelParams(values=values),
        volume_scale=take(setup.params.volume_scale),
        baseline_burden=take(setup.params.baseline_burden),
        baseline_diameter_mm=take(setup.params.baseline_diameter_mm),
        host_vessels=take(setup.params.host_vessels),
        lesion_weight=jnp.concatenate([weight, jnp.zeros(lesions - count, weight.dtype)]),
    )
    state = dataclasses.replace(setup.state, fields=take(setup.state.fields, axis=1))
    return dataclasses.replace(
        setup,
        model=setup.model.with_lesions(lesions),
        params=params,
        state=state,
        maps={name: np.take(value, rows, axis=0) for name, value in setup.maps.items()},
        lesions=tuple(setup.lesions[i] for i in rows),
    )


def stack_setups(setups: Sequence[TMESetup]):
    """Batch several patients (same grid and lesion count) for :class:`~tmesolve.integrate.BatchIntegrator`.

    Returns ``(model, params, state)`` with a leading patient axis on every leaf;
    therapy schedules are padded to a common length.
    """
    from tmesolve.integrate import stack_pytrees
    from tmesolve.therapy.regimens import stack_schedules

    if not setups:
        raise ConfigError("cohort.patients", 0, "at least one patient")
    first = setups[0]
    for i, setup in enumerate(setups):
        if setup.model.grid != first.model.grid or setup.model.lesions != first.model.lesions:
            raise ConfigError(f"cohort.patients[{i}]", "grid/lesions",
                              "the same grid and number of lesions as patient 0")
    schedules = stack_schedules([s.params.schedule for s in setups])
    rest = stack_pytrees([dataclasses.replace(s.params, schedule=first.params.schedule) for s in setups])
    params = dataclasses.replace(rest, schedule=schedules)
    state = stack_pytrees([s.state for s in setups])
    return first.model, params, state
