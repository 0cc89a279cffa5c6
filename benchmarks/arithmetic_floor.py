"""The TME step's arithmetic floor against the time the bandwidth target allows it.

    python -m benchmarks.arithmetic_floor [--case 128x1] [--steps 2] [--quick] [--out FILE]

The CPU target for the full model is a step at ≥ 50 % of the memory-bandwidth
roofline measured in the same run, counting 8 B per field value per step
(read and write each value once). That allows a step

    budget = 8 B · fields · lesions · N³ / (0.5 · roofline)    (s).

This asks whether the arithmetic the scheme does per step fits in that time on
the machine at hand. It measures, in one process:

* the roofline (:func:`benchmarks.bandwidth.measure_bandwidth`) and the budget;
* the rate (values per second, every core) at which this backend evaluates
  exp, log, a division and a multiply–add on float32 values held in cache:
  a jitted sum of k independent terms f(a_k·x + b_k) over 2²⁰ values, the
  slope between k = 4 and k = 36 (the sum's adds and the affine arguments are
  in both, so the slope is the term: its operation plus an add and a
  multiply–add);
* numpy's exp on the same values, one array part per core on as many threads
  (numpy's SIMD exp, faster than XLA's on some CPUs): with XLA's, the best exp
  rate at hand for a CPU backend (on a GPU only the device's rate counts);
* XLA's cost analysis of the case's three sub-solvers, each compiled alone
  (reactions and cell transport twice per Strang step, the spectral step
  once): transcendentals (exp, log, expm1, log1p, power, …) and flops per
  voxel per step. XLA counts a loop body once and one branch of a switch, so
  the conjugate-gradient iterations of the oxygen solve (about 2.5 per solve
  at 128³) count as one: these are lower bounds on the operations a step runs;
* the step's own time, as the slope between calls of ``--steps`` and twice as
  many steps (:func:`benchmarks.tme_step.per_step_slope`; not in a quick run).

``floor_transcendentals_s``: the step's transcendentals alone at the fastest
exp rate measured (exp is the cheapest of them here). No implementation that
evaluates them one by one at that rate runs the step faster, whatever it does
with memory, and ``floor_over_budget`` > 1 says the bandwidth target is out of
reach on this machine for this scheme: the step is bound by its arithmetic,
not by its memory traffic. The flops beside it (XLA's count, in which a dense
transform costs 2N per value per axis where an FFT would cost O(log N)) are
reported, not folded into the floor. ``--quick`` (a smoke run: figures
meaningless) measures the bandwidth on 16 MiB arrays and the rates on 2¹⁶
values, three repeats each.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s, ratio, rounded, write_json
from benchmarks.bandwidth import measure_bandwidth
from benchmarks.machine import machine_info
from benchmarks.tme_step import (
    BYTES_PER_VALUE_TOUCHED_ONCE,
    DT_H,
    case_setup,
    compiled_cost,
    per_step_slope,
    sub_solvers,
)
from tmesolve.integrate import Integrator, make_solver_params

#: Fraction of the roofline the CPU target asks of the full step.
TARGET_FRACTION = 0.5
#: Values per rate kernel: 4 MiB of float32, held in the caches of a server core pair.
RATE_VALUES = 1 << 20
#: Term counts of the two rate kernels; the rate is the slope between them.
TERMS_SHORT, TERMS_LONG = 4, 36

#: One term f(y) of each rate kernel, y = a_k·x + b_k with x in [0.1, 1], y in (−1, 2).
OPERATIONS = {
    "exp": jnp.exp,
    "log": lambda y: jnp.log(y + 2.0),
    "divide": lambda y: 1.0 / (y + 2.0),
    "multiply_add": lambda y: y * 0.999 + 1e-4,
}


def _sum_of_terms(operation, terms: int):
    """Jitted x ↦ Σ_{k<terms} f(a_k·x + b_k): ``terms`` independent evaluations of f per value."""

    def kernel(x):
        total = jnp.zeros_like(x)
        for k in range(terms):
            total = total + operation(x * (1.0 + 0.01 * k) - 0.5)
        return total

    return jax.jit(kernel)


def backend_rate_per_s(operation, repeats: int = 20, values: int = RATE_VALUES) -> dict:
    """Values per second at which the backend evaluates ``operation`` (one term of a sum).

    The slope between kernels of TERMS_SHORT and TERMS_LONG terms over ``values``
    float32 values: what a kernel's fixed cost and its read and write add is in
    both, and cancels.
    """
    x = jnp.linspace(0.1, 1.0, values, dtype=jnp.float32)
    times = {}
    for terms in (TERMS_SHORT, TERMS_LONG):
        kernel = _sum_of_terms(operation, terms)
        kernel(x).block_until_ready()  # compile outside the timing
        times[terms] = best_time_s(lambda kernel=kernel: kernel(x), repeats)
    per_value_s = (times[TERMS_LONG] - times[TERMS_SHORT]) / ((TERMS_LONG - TERMS_SHORT) * values)
    return {
        "per_s": 1.0 / per_value_s if per_value_s > 0 else None,
        f"kernel_{TERMS_SHORT}_terms_s": times[TERMS_SHORT],
        f"kernel_{TERMS_LONG}_terms_s": times[TERMS_LONG],
    }


def numpy_exp_rate_per_s(repeats: int = 20, values: int = RATE_VALUES, threads: int | None = None) -> dict:
    """Values per second of numpy's exp, ``threads`` threads (default: the cores) on one part each.

    numpy's ufuncs release the GIL, so the threads run side by side. Written
    into preallocated outputs: no allocation in the timing.
    """
    threads = threads or os.cpu_count() or 1
    x = np.linspace(0.1, 1.0, values, dtype=np.float32)
    out = np.empty_like(x)
    parts = [(x[i::threads], out[i::threads]) for i in range(threads)] if threads > 1 else [(x, out)]
    # Contiguous parts: a strided view would slow numpy's SIMD loop.
    parts = [(np.ascontiguousarray(part), np.empty_like(part)) for part, _ in parts]
    with ThreadPoolExecutor(threads) as pool:
        def run():
            list(pool.map(lambda pair: np.exp(pair[0], out=pair[1]), parts))

        run()
        best = best_time_s(run, repeats)
    return {"per_s": values / best, "threads": threads, "best_s": best}


def step_operation_counts(setup) -> dict:
    """XLA's cost analysis of each sub-solver compiled alone, per voxel (all lesions), and per step."""
    voxels = len(setup.lesions) * setup.model.grid.num_voxels
    per_sub_solver, per_step = {}, {"transcendentals": 0.0, "flops": 0.0}
    for name, (solver, dt, uses) in sub_solvers(setup).items():
        compiled = jax.jit(solver).lower(setup.state, setup.params, dt).compile()
        cost = compiled_cost(compiled) or {}
        counts = {key: cost.get(key, float("nan")) / voxels for key in per_step}
        per_sub_solver[name] = {"uses_per_step": uses, **{f"{key}_per_voxel": value for key, value in counts.items()}}
        for key, value in counts.items():
            per_step[key] += uses * value
    return {
        "voxels": voxels,
        "sub_solvers": per_sub_solver,
        "per_voxel_per_step": per_step,
        "note": "XLA counts each loop body once and one switch branch: lower bounds",
    }


def measure(n: int, lesions: int, steps: int, quick: bool = False) -> dict:
    """All figures of one case (see the module docstring); ``quick``: small arrays, few repeats."""
    repeats, values = (3, 1 << 16) if quick else (20, RATE_VALUES)
    bandwidth = measure_bandwidth(16, 3) if quick else measure_bandwidth()
    rates = {name: backend_rate_per_s(operation, repeats, values) for name, operation in OPERATIONS.items()}
    numpy_exp = numpy_exp_rate_per_s(repeats, values)
    setup = case_setup(n, lesions)
    counts = step_operation_counts(setup)
    fields = len(setup.model.species)
    voxels = counts["voxels"]
    field_values = fields * voxels
    budget_s = BYTES_PER_VALUE_TOUCHED_ONCE * field_values / (TARGET_FRACTION * bandwidth["roofline_GBps"] * 1e9)
    transcendentals = counts["per_voxel_per_step"]["transcendentals"] * voxels
    # numpy's exp runs on the host: a rate for a CPU backend's step, not for a device's.
    candidates = (rates["exp"]["per_s"], numpy_exp["per_s"] if jax.default_backend() == "cpu" else None)
    fastest_exp = max(rate for rate in candidates if rate)
    floor_s = transcendentals / fastest_exp
    # The step's own time (its compile dominates at small N): left out of a quick run.
    step = (None if quick else
            per_step_slope(Integrator(setup.model), setup, make_solver_params(dt_max=DT_H), steps, repeats=2))
    step_s = step["time_per_step_s"] if step else None
    return {
        "case": f"{n}x{lesions}",
        "quick": quick,
        "N": n,
        "lesions": lesions,
        "fields": fields,
        "dt_h": DT_H,
        "roofline_GBps": bandwidth["roofline_GBps"],
        "bandwidth": bandwidth,
        "target_fraction_of_roofline": TARGET_FRACTION,
        "budget_s": budget_s,
        "rates_per_s": {**{name: rate["per_s"] for name, rate in rates.items()}, "numpy_exp": numpy_exp["per_s"]},
        "rate_kernels": {**rates, "numpy_exp": numpy_exp},
        "operation_counts": counts,
        "transcendentals_per_step": transcendentals,
        "floor_transcendentals_s": floor_s,
        "floor_transcendentals_at_xla_exp_s": ratio(transcendentals, rates["exp"]["per_s"]),
        "floor_over_budget": ratio(floor_s, budget_s),
        "step_time_s": step_s,
        "step_over_budget": ratio(step_s, budget_s),
        "floor_share_of_step": ratio(floor_s, step_s),
        "step_slope": step,
    }


def report_lines(result: dict) -> list[str]:
    counts = result["operation_counts"]
    rates = result["rates_per_s"]
    lines = [
        f"TME step {result['case']} ({result['fields']} fields, float32, dt {result['dt_h']} h): "
        f"roofline {result['roofline_GBps']:.1f} GB/s; {result['target_fraction_of_roofline']:.0%} of it "
        f"allows {result['budget_s'] * 1e3:.2f} ms per step (8 B per field value)",
        "  rates on this backend, every core, in cache (G values/s): "
        + ", ".join(f"{name} {rate / 1e9:.2f}" for name, rate in rates.items() if rate),
        "  XLA's counts per voxel (loop bodies once): "
        + "; ".join(f"{name} x{part['uses_per_step']}: {part['transcendentals_per_voxel']:.1f} transcendentals, "
                    f"{part['flops_per_voxel']:.0f} flops" for name, part in counts["sub_solvers"].items()),
        f"  per step: {counts['per_voxel_per_step']['transcendentals']:.1f} transcendentals and "
        f"{counts['per_voxel_per_step']['flops']:.0f} flops per voxel",
        f"  transcendentals alone at the fastest exp rate: {result['floor_transcendentals_s'] * 1e3:.2f} ms per step "
        f"= {result['floor_over_budget']:.2f}x the budget "
        f"(at XLA's exp rate {result['floor_transcendentals_at_xla_exp_s'] * 1e3:.2f} ms)",
    ]
    if result["step_time_s"] is not None:
        lines.append(f"  the step measured: {result['step_time_s'] * 1e3:.1f} ms = {result['step_over_budget']:.1f}x "
                     f"the budget; the floor is {result['floor_share_of_step']:.0%} of it")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.arithmetic_floor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="128x1", help="N x lesions, e.g. 64x3")
    parser.add_argument("--steps", type=int, default=2, help="steps of the shorter timed call (the longer: twice)")
    parser.add_argument("--quick", action="store_true", help="small arrays, few repeats (smoke test)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    case = re.fullmatch(r"(\d+)x(\d+)", args.case.strip().lower())
    if case is None or int(case.group(1)) < 4 or int(case.group(2)) < 1:
        parser.error(f"--case: got {args.case!r}; expected N x lesions with N >= 4 and lesions >= 1, e.g. 128x1")
    if args.steps < 1:
        parser.error(f"--steps: got {args.steps}; expected an integer >= 1")
    start = time.perf_counter()
    result = measure(int(case.group(1)), int(case.group(2)), args.steps, args.quick)
    result["wall_s"] = time.perf_counter() - start
    print("\n".join(report_lines(result)))
    result = {"machine": machine_info(), **rounded(result)}
    if args.out:
        print(f"written: {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
