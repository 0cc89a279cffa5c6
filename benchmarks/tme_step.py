"""The full TME model step: throughput, compile time, cost analysis, ratio to a plain stencil pass.

A case is one patient with ``lesions`` lesion boxes of N³ voxels at 20 µm
(``setup_tme`` with pembrolizumab, lesion radius 0.3·N·20 µm), advanced by
``Integrator(setup.model).advance`` at a fixed step: ``dt_max`` = 0.05 h is
far below the model's explicit stability limit, so each chunk runs a known
number of steps (read back from ``diagnostics["steps"]``). One lesion is
"inflamed"; three lesions are inflamed, excluded and desert.

Figures per case:

* ``time_per_step_s`` (best call time over its steps, the call's one record
  of readouts included), ``steps_per_s``; ``time_per_step_slope_s``: the slope
  between the best calls of ``steps_per_timed_call`` and ``steps_per_long_call``
  (twice as many) steps, the step alone, and ``per_call_overhead_s`` its
  intercept (a record and begin_interval): compare commits by the slope when
  their calls hold different step counts; ``voxel_updates_per_s`` = voxels ×
  16 fields × lesions × steps / s; ``lesion_steps_per_s`` = lesions × steps / s.
* ``compile_s``: ``integrator._advance.lower(...).compile()`` (lowering timed
  apart as ``lower_s``); ``compile_persistent_cache_s``: the same again after
  ``jax.clear_caches()`` with JAX's persistent compilation cache filled by the
  first compile (first case only, when the suite enabled the cache);
  ``compile_loop_cache_s``: a new ``Integrator`` for the same model getting its
  loop from tmesolve's compiled-loop cache (:mod:`tmesolve.executable_cache`:
  no trace, no lowering; ``compile_loop_cache_source`` is ``"disk"``), what a
  rerun of a job pays.
* ``ratio_step_to_stencil_pass``: one model step over one plain jitted,
  donated 7-point no-flux Laplacian update ``u ← u + c Δ_h u`` of an array
  with as many values (16 × lesions × N³): how far the fused step is from
  touching each value once. ``touch_once_fraction_of_roofline``: 8 bytes per
  value (read + write, float32) per step ÷ step time ÷ the measured roofline.
* ``cost_analysis_chunk``: XLA's cost analysis of the compiled chunk. XLA
  counts a loop body once (not per iteration) and one branch of a switch,
  so these are roughly one sub-solver of one step, not a chunk; the
  ``substeps`` breakdown (sub-solvers compiled and timed alone, first case,
  per call and per sub-step inside a compiled loop) gives per-step bytes and
  flops as 2·R + 2·C + L for the Strang step.
* ``memory``: the compiled chunk's argument, output and temporary buffers.
* ``merged_reactions`` (first case): per-step time of Strang with merged
  reaction halves (``solver.merge_reactions``) and of plain Strang, each as the
  slope between calls of n and 2n steps (what a call pays once, the readouts,
  begin_interval and the merged closing pass, is the intercept), and their ratio.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s, plain_stencil_pass_s, ratio
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, fresh_copy, make_solver_params
from tmesolve.model.tme_setup import LesionSpec, setup_tme
from tmesolve.stepping import SplitStepper

SPACING_UM = 20.0
DT_H = 0.05
SCHEDULE_DURATION_H = 24.0
PHENOTYPES_BY_COUNT = {1: ("inflamed",), 3: ("inflamed", "excluded", "desert")}
BYTES_PER_VALUE_TOUCHED_ONCE = 8  # float32: read + write
COST_KEYS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds")


def _first(analysis):
    """cost_analysis() returns a dict, or a list of one dict in some jax versions."""
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


def compiled_cost(compiled) -> dict | None:
    """XLA's cost analysis of a compiled executable (COST_KEYS, spaces as underscores), or None."""
    try:
        analysis = _first(compiled.cost_analysis())
    except Exception:  # noqa: BLE001 - not every backend implements it; a benchmark must not fail on it
        return None
    return {key.replace(" ", "_"): float(analysis[key]) for key in COST_KEYS if key in analysis}


def _memory(compiled, values: int) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - as above
        return None
    if stats is None:
        return None
    memory = {
        name: int(getattr(stats, name))
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "temp_size_in_bytes",
        )
    }
    resident = (
        memory["argument_size_in_bytes"]
        + memory["output_size_in_bytes"]
        - memory["alias_size_in_bytes"]
        + memory["temp_size_in_bytes"]
    )
    memory["resident_bytes_per_field_value"] = resident / values
    return memory


#: Sub-steps per call of the in-loop timing of a sub-solver (against one per call).
IN_LOOP_SUBSTEPS = 4


def _in_loop_time_s(solver, state, params, dt, repeats: int) -> float:
    """Seconds per sub-step of ``solver`` run inside one compiled loop: the slope between
    calls of 1 and IN_LOOP_SUBSTEPS sub-steps, the state donated and carried.

    A call of the sub-solver alone also allocates its output and temporaries, and
    this CPU backend returns large blocks to the system after each call: every
    page is faulted in again on the next (a 128³ transport sub-step took 260 and
    255 ms per call, 183 and 154 ms in a loop: ``benchmarks/results/tme-ab-e4d155f/``).
    The integrator's loop allocates once per output interval, so the loop
    figure is the one a step pays.
    """
    times = {}
    for count in (1, IN_LOOP_SUBSTEPS):
        def loop(state, params, dt, count=count):
            return jax.lax.fori_loop(0, count, lambda _, value: solver(value, params, dt), state)

        compiled = jax.jit(loop, donate_argnums=0).lower(state, params, dt).compile()
        # Each call donates a fresh copy of the state, made outside the timing.
        times[count] = best_time_s(lambda fresh, compiled=compiled: compiled(fresh, params, dt), repeats,
                                   setup=lambda: (fresh_copy(state),))
    return (times[IN_LOOP_SUBSTEPS] - times[1]) / (IN_LOOP_SUBSTEPS - 1)


def sub_solvers(setup) -> dict:
    """{name: (solver(state, params, dt), dt, uses per Strang step)} of the three sub-solvers:
    reactions and cell transport over DT_H/2 twice, the spectral step over DT_H once."""
    model = setup.model
    stepper = SplitStepper(model, 2)
    half = jnp.asarray(0.5 * DT_H, jnp.float32)
    full = jnp.asarray(DT_H, jnp.float32)
    return {
        "react": (lambda state, params, dt: model.react(state, params, dt), half, 2),
        "transport": (lambda state, params, dt: model.transport(state, params, dt), half, 2),
        "linear": (lambda state, params, dt: stepper.linear(state, params, dt), full, 1),
    }


def _substeps(setup, state, repeats: int) -> dict:
    """Compile and time each sub-solver alone; a Strang step = 2·react + 2·transport + linear.

    ``time_s`` is the best time of one call; ``in_loop_time_s`` the time per
    sub-step inside a compiled loop (:func:`_in_loop_time_s`), which
    ``per_step_sum`` also sums as ``in_loop_time_s``.
    """
    solvers = sub_solvers(setup)
    result = {}
    per_step = {"flops": 0.0, "bytes_accessed": 0.0, "time_s": 0.0, "in_loop_time_s": 0.0}
    for name, (solver, dt, uses) in solvers.items():
        start = time.perf_counter()
        compiled = jax.jit(solver).lower(state, setup.params, dt).compile()
        compile_s = time.perf_counter() - start
        run_s = best_time_s(
            lambda compiled=compiled, dt=dt: compiled(state, setup.params, dt), repeats
        )
        in_loop_s = _in_loop_time_s(solver, state, setup.params, dt, repeats)
        cost = compiled_cost(compiled) or {}
        result[name] = {
            "uses_per_step": uses,
            "dt_h": float(dt),
            "compile_s": compile_s,
            "time_s": run_s,
            "in_loop_time_s": in_loop_s,
            **cost,
        }
        per_step["time_s"] += uses * run_s
        per_step["in_loop_time_s"] += uses * in_loop_s
        per_step["flops"] += uses * cost.get("flops", float("nan"))
        per_step["bytes_accessed"] += uses * cost.get("bytes_accessed", float("nan"))
    result["per_step_sum"] = per_step
    return result


def per_step_slope(integrator, setup, solver, steps: int, repeats: int) -> dict:
    """Per-step time as the slope between calls of ``steps`` and 2·``steps`` steps.

    A call also pays once per interval: begin_interval, the readouts and, with
    merged reactions, the closing pass. The slope leaves those out and the
    intercept reports them.
    """
    state = fresh_copy(setup.state)
    solver_dt = float(solver.dt_max)

    def call(count: int) -> tuple[float, int]:
        """(seconds, steps taken): float32 stop times can cost one step more than asked."""
        nonlocal state
        t_end = float(state.time) + count * solver_dt
        start = time.perf_counter()
        state, _, diagnostics = integrator.advance(state, setup.params, solver, t_end)
        jax.block_until_ready(state)
        return time.perf_counter() - start, int(diagnostics["steps"])

    call(1)  # compile
    short_s, short_steps = min(call(steps) for _ in range(repeats))
    long_s, long_steps = min(call(2 * steps) for _ in range(repeats))
    per_step = (long_s - short_s) / max(long_steps - short_steps, 1)
    return {"time_per_step_s": per_step, "per_call_overhead_s": short_s - short_steps * per_step,
            "steps_per_call": [short_steps, long_steps]}


def case_setup(n: int, lesions: int):
    """The TMESetup of a case: ``lesions`` lesions (phenotypes by PHENOTYPES_BY_COUNT) of N³
    voxels at SPACING_UM, radius 0.3·N·SPACING_UM, under pembrolizumab."""
    phenotypes = PHENOTYPES_BY_COUNT.get(lesions, ("inflamed",) * lesions)
    grid = Grid((n, n, n), SPACING_UM)
    return setup_tme(grid, [LesionSpec(phenotype, radius_um=0.3 * n * SPACING_UM) for phenotype in phenotypes],
                     therapy="pembrolizumab", duration_h=SCHEDULE_DURATION_H)


def _merged_against_plain(n: int, lesions: int, steps: int, repeats: int) -> dict:
    """Strang with merged reaction halves (``solver.merge_reactions``) against plain Strang."""
    solver = make_solver_params(dt_max=DT_H)
    figures = {}
    for name, merge in (("plain", False), ("merged", True)):
        setup = case_setup(n, lesions)
        figures[name] = per_step_slope(Integrator(setup.model, 2, merge), setup, solver, steps, repeats)
    figures["ratio_plain_to_merged"] = ratio(figures["plain"]["time_per_step_s"],
                                             figures["merged"]["time_per_step_s"])
    return figures


def measure_case(
    n: int,
    lesions: int,
    bandwidth: dict | None,
    repeats: int,
    target_call_s: float,
    max_steps_per_call: int,
    persistent_cache: bool,
    substeps: bool,
    merged: bool = False,
) -> dict:
    """All figures of one (N, lesions) case."""
    setup = case_setup(n, lesions)
    grid = setup.model.grid
    fields = len(setup.model.species)
    voxels = grid.num_voxels
    values = fields * lesions * voxels
    integrator = Integrator(setup.model)
    solver = make_solver_params(dt_max=DT_H)
    state = setup.state

    def lower():
        return integrator._advance.lower(
            state, setup.params, solver, jnp.asarray(DT_H, jnp.float32)
        )

    start = time.perf_counter()
    lowered = lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    result = {
        "N": n,
        "lesions": lesions,
        "phenotypes": [lesion.phenotype for lesion in setup.lesions],
        "fields": fields,
        "voxels": voxels,
        "field_values": values,
        "dt_h": DT_H,
        "lower_s": lower_s,
        "compile_s": compile_s,
    }
    if persistent_cache:
        jax.clear_caches()  # drop the in-memory executable: the next compile must come from disk
        start = time.perf_counter()
        lower().compile()
        result["compile_persistent_cache_s"] = time.perf_counter() - start
        # tmesolve's compiled-loop cache: one integrator stores the loop (a cold
        # run), a new one for the same model loads it without tracing (a rerun).
        Integrator(setup.model).compile(state, setup.params, solver)
        rerun = Integrator(setup.model)
        start = time.perf_counter()
        _, source = rerun.compile(state, setup.params, solver)
        result["compile_loop_cache_s"] = time.perf_counter() - start
        result["compile_loop_cache_source"] = source
        result["compile_loop_cache_traces"] = rerun.trace_count
    result["cost_analysis_chunk"] = compiled_cost(compiled)
    result["memory"] = _memory(compiled, values)

    def advance(steps: int):
        nonlocal state
        t_end = float(state.time) + steps * DT_H
        start = time.perf_counter()
        state, _, diagnostics = integrator.advance(state, setup.params, solver, t_end)
        jax.block_until_ready(state)
        return time.perf_counter() - start, int(diagnostics["steps"]), bool(diagnostics["finite"])

    first_s, first_steps, _ = advance(1)
    per_step_guess = first_s / first_steps
    steps_per_call = int(np.clip(np.ceil(target_call_s / per_step_guess), 2, max_steps_per_call))
    calls = [advance(steps_per_call) for _ in range(max(1, repeats))]
    best_s, best_steps, _ = min(calls, key=lambda call: call[0] / call[1])
    time_per_step = best_s / best_steps
    # Calls of twice the steps: the slope is the step alone, without what a call pays
    # once (begin_interval, the readouts of its one record), which the intercept gives.
    long_calls = [advance(2 * steps_per_call) for _ in range(max(1, repeats))]
    long_s, long_steps, _ = min(long_calls, key=lambda call: call[0] / call[1])
    slope = (long_s - best_s) / (long_steps - best_steps) if long_steps > best_steps else None
    calls += long_calls
    result.update(
        {
            "first_call_s": first_s,
            "first_call_steps": first_steps,
            "steps_per_timed_call": best_steps,
            "timed_calls": len(calls),
            "time_per_step_s": time_per_step,
            "steps_per_long_call": long_steps,
            "time_per_step_slope_s": slope,
            "per_call_overhead_s": None if slope is None else best_s - best_steps * slope,
            "steps_per_s": 1.0 / time_per_step,
            "voxel_updates_per_s": values / time_per_step,
            "lesion_steps_per_s": lesions / time_per_step,
            "finite": all(call[2] for call in calls),
            "traces": integrator.trace_count,
        }
    )

    stencil_s = plain_stencil_pass_s((fields * lesions, n, n, n), max(3, repeats))
    touched_GBps = BYTES_PER_VALUE_TOUCHED_ONCE * values / time_per_step / 1e9
    result.update(
        {
            "stencil_pass_s": stencil_s,
            "stencil_pass_GBps": BYTES_PER_VALUE_TOUCHED_ONCE * values / stencil_s / 1e9,
            "ratio_step_to_stencil_pass": ratio(time_per_step, stencil_s),
            "touch_once_GBps": touched_GBps,
            "touch_once_fraction_of_roofline": None
            if bandwidth is None
            else ratio(touched_GBps, bandwidth["roofline_GBps"]),
        }
    )
    if merged:
        result["merged_reactions"] = _merged_against_plain(n, lesions, best_steps, max(2, repeats))
    if substeps:
        result["substeps"] = _substeps(setup, state, max(2, repeats))  # setup.state was donated
        chunk_bytes = result["substeps"]["per_step_sum"]["bytes_accessed"]
        result["substeps"]["per_step_bytes_per_field_value"] = chunk_bytes / values
    return result


def measure_tme(
    cases=((32, 1), (64, 1), (32, 3)),
    bandwidth: dict | None = None,
    repeats: int = 3,
    target_call_s: float = 1.0,
    max_steps_per_call: int = 40,
    persistent_cache: bool = False,
    substeps_for_first_case: bool = True,
) -> dict:
    """Every (N, lesions) case; persistent-cache compile and sub-solver breakdown for the first."""
    results = []
    for index, (n, lesions) in enumerate(cases):
        results.append(
            measure_case(
                n,
                lesions,
                bandwidth,
                repeats,
                target_call_s,
                max_steps_per_call,
                persistent_cache=persistent_cache and index == 0,
                substeps=substeps_for_first_case and index == 0,
                merged=substeps_for_first_case and index == 0,
            )
        )
    return {
        "therapy": "pembrolizumab",
        "spacing_um": SPACING_UM,
        "dt_h": DT_H,
        "splitting_order": 2,
        "dtype": "float32",
        "cost_analysis_note": "XLA counts each loop body once and one switch branch; "
        "'substeps' gives per-step figures",
        "cases": results,
        "backend": jax.default_backend(),
    }


def table(result: dict) -> list[str]:
    """Human-readable lines of the TME section."""
    lines = [
        f"TME full step (16 fields, dt = {result['dt_h']} h, Strang, float32):",
        f"  {'case':<10} {'s/step':>9} {'slope':>9} {'steps/s':>8} {'Mvox-upd/s':>10} {'lesion-st/s':>11} "
        f"{'compile s':>9} {'cache s':>8} {'loop c. s':>9} {'x stencil':>9} {'roofline':>8} {'MiB resident':>12}",
    ]
    for case in result["cases"]:
        cached = case.get("compile_persistent_cache_s")
        loop_cached = case.get("compile_loop_cache_s")
        fraction = case.get("touch_once_fraction_of_roofline")
        slope = case.get("time_per_step_slope_s")
        memory = case.get("memory") or {}
        resident = (
            memory.get("argument_size_in_bytes", 0)
            + memory.get("output_size_in_bytes", 0)
            - memory.get("alias_size_in_bytes", 0)
            + memory.get("temp_size_in_bytes", 0)
        ) / 2**20
        lines.append(
            f"  {case['lesions']}x{case['N']}^3{'':<{max(0, 5 - len(str(case['N'])))}}"
            f"{case['time_per_step_s']:9.4f} {'' if slope is None else f'{slope:.4f}':>9} {case['steps_per_s']:8.2f} "
            f"{case['voxel_updates_per_s'] / 1e6:10.1f} "
            f"{case['lesion_steps_per_s']:11.2f} {case['compile_s']:9.1f} "
            f"{'' if cached is None else f'{cached:.1f}':>8} "
            f"{'' if loop_cached is None else f'{loop_cached:.2f}':>9} "
            f"{case['ratio_step_to_stencil_pass']:9.0f} "
            f"{'' if fraction is None else f'{fraction:.4f}':>8} {resident:12.1f}"
        )
    for case in result["cases"]:
        if "substeps" in case:
            sub = case["substeps"]
            parts = ", ".join(
                f"{name} {sub[name]['time_s']:.4f} s ({sub[name]['in_loop_time_s']:.4f} in a loop) "
                f"x{sub[name]['uses_per_step']}"
                for name in ("react", "transport", "linear")
            )
            lines.append(
                f"  sub-solvers alone, {case['lesions']}x{case['N']}^3: {parts}; sum "
                f"{sub['per_step_sum']['time_s']:.4f} s/step ({sub['per_step_sum']['in_loop_time_s']:.4f} "
                f"in loops); XLA bytes per field value per step "
                f"{sub['per_step_bytes_per_field_value']:.0f} (touch once: 8)"
            )
    for case in result["cases"]:
        if "merged_reactions" in case:
            merged = case["merged_reactions"]
            lines.append(
                f"  merged reaction halves, {case['lesions']}x{case['N']}^3 (slope over "
                f"{merged['plain']['steps_per_call'][0]} and {merged['plain']['steps_per_call'][1]} steps): "
                f"{merged['merged']['time_per_step_s']:.4f} s/step against plain Strang "
                f"{merged['plain']['time_per_step_s']:.4f} ({merged['ratio_plain_to_merged']:.2f}x)"
            )
    lines.append(
        "  (x stencil: step time / one plain 7-point pass over as many values; roofline: "
        "8 B/value/step over the measured roofline)"
    )
    return lines
