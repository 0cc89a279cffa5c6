"""The TME step's arithmetic floor against the time the bandwidth target allows it.

    python -m benchmarks.arithmetic_floor [--case 128x1] [--steps 2] [--quick] [--out FILE]

The CPU target for the full model is a step at ≥ 50 % of the memory-bandwidth
roofline measured in the same run, counting 8 B per field value per step
(read and write each value once). That allows a step

    budget = 8 B · fields · lesions · N³ / (0.5 · roofline)    (s).

This asks whether the arithmetic the scheme does per step fits in that time on
the machine at hand. It measures, in one process:

* the roofline (:func:`benchmarks.bandwidth.measure_bandwidth`) and the budget;
* the rate (values per second, all of the backend's threads) at which it
  evaluates exp, log, a division and a multiply–add on float32 values: a
  jitted sum of k independent terms f(c_k·x − 0.5), c_k = 1 + 0.01k, over 2²⁰
  values on a CPU (2²⁴ on a device), the slope between k = 4 and k = 36,
  less the same slope with f the identity (the argument and the sum's add),
  so each rate is of f alone;
* numpy's exp on the same values, one array part per core on as many threads
  (numpy's SIMD exp, faster than XLA's on some CPUs): with XLA's, the best exp
  rate at hand for a CPU backend (on a GPU only the device's rate counts);
* XLA's cost analysis of the case's three sub-solvers, each compiled alone
  (reactions and cell transport twice per Strang step, the spectral step
  once), after XLA's simplification (an exponential computed twice counts
  once): transcendentals (exp, log, expm1, log1p, power, …) and flops per
  voxel per step. The model is counted with its two reaction and two
  transport stages unrolled (:meth:`TMEModel.for_batches`, the same
  arithmetic), because XLA counts a loop body once; it still counts a
  conditional as the larger of its branches and the conjugate-gradient loop
  of the oxygen solve (about 2.5 iterations per solve at 128³) once, so these
  are lower bounds on what a step evaluates;
* the step's own time, as the slope between calls of ``--steps`` and twice as
  many steps (:func:`benchmarks.tme_step.per_step_slope`; not in a quick run).

``floor_transcendentals_s``: the step's transcendentals, as XLA counts them,
each at the fastest exp rate measured (log, also measured, is slower here).
This is a floor for this implementation with these math libraries, not for
the scheme or the chip: a hand-written SIMD exp can be faster, and some of
the count (the spectral step's weights, recomputed every step) could be
computed once per step size. ``floor_over_budget`` > 1 says that a step
which moved only the 8 B per value the target counts would still miss it
on its transcendentals alone, with every other operation free. The flops
beside it (XLA's count, in which a dense transform costs 2N per value per
axis where an FFT would cost O(log N)) are reported, not folded into the
floor. ``--quick`` (a smoke run: figures
meaningless) measures the bandwidth on 16 MiB arrays and the rates on 2¹⁶
values, three repeats each.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s, ratio, rounded, write_json
from benchmarks.bandwidth import measure_bandwidth
from benchmarks.machine import machine_info, usable_cores
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
#: Values per rate kernel on a CPU (4 MiB of float32 in, 4 MiB out: in a server's L3) and on a
#: device, where a kernel over 2²⁰ values lasts about as long as its launch.
RATE_VALUES = {"cpu": 1 << 20, "device": 1 << 24}
#: Term counts of the two rate kernels; the rate is the slope between them.
TERMS_SHORT, TERMS_LONG = 4, 36

#: One term f(y) of each rate kernel, y = c_k·x − 0.5 with x in [0.1, 1]: y in [−0.4, 0.85].
OPERATIONS = {
    "exp": jnp.exp,
    "log": lambda y: jnp.log(y + 2.0),
    "divide": lambda y: 1.0 / (y + 2.0),
    "multiply_add": lambda y: y * 0.999 + 1e-4,
}


def _sum_of_terms(operation, terms: int):
    """Jitted x ↦ Σ_{k<terms} f(c_k·x − 0.5), c_k = 1 + 0.01k: ``terms`` independent evaluations of f."""

    def kernel(x):
        total = jnp.zeros_like(x)
        for k in range(terms):
            total = total + operation(x * (1.0 + 0.01 * k) - 0.5)
        return total

    return jax.jit(kernel)


def _seconds_per_term(operation, repeats: int, values: int) -> tuple[float, dict]:
    """Slope (s per term per value) between sum kernels of TERMS_SHORT and TERMS_LONG terms,
    and the two kernels' best times."""
    x = jnp.linspace(0.1, 1.0, values, dtype=jnp.float32)
    times = {}
    for terms in (TERMS_SHORT, TERMS_LONG):
        kernel = _sum_of_terms(operation, terms)
        kernel(x).block_until_ready()  # compile outside the timing
        times[terms] = best_time_s(lambda kernel=kernel: kernel(x), repeats)
    slope = (times[TERMS_LONG] - times[TERMS_SHORT]) / ((TERMS_LONG - TERMS_SHORT) * values)
    return slope, {f"kernel_{terms}_terms_s": seconds for terms, seconds in times.items()}


def backend_rates_per_s(repeats: int, values: int) -> dict:
    """Values per second at which the backend evaluates each of OPERATIONS (one term of a sum).

    Each operation's slope less the identity's: what a term costs besides f
    (its argument c_k·x − 0.5 and the sum's add) and what a kernel pays once
    (its launch, its read and write) cancel. None where noise leaves no
    positive difference (a cheap operation on a busy machine).
    """
    identity_s, identity_kernels = _seconds_per_term(lambda y: y, repeats, values)
    rates = {"identity_term": {"seconds_per_value": identity_s, **identity_kernels}}
    for name, operation in OPERATIONS.items():
        seconds, kernels = _seconds_per_term(operation, repeats, values)
        rates[name] = {"per_s": 1.0 / (seconds - identity_s) if seconds > identity_s else None, **kernels}
    return rates


def numpy_exp_rate_per_s(repeats: int, values: int) -> dict:
    """Values per second of numpy's exp, one contiguous part of the values per usable core,
    each on its own thread (numpy's ufuncs release the GIL), written into preallocated
    outputs. An absolute time, not a slope: the threads' dispatch is in it, so the rate
    is if anything low."""
    threads = usable_cores()
    parts = np.array_split(np.linspace(0.1, 1.0, values, dtype=np.float32), threads)
    outputs = [np.empty_like(part) for part in parts]
    with ThreadPoolExecutor(threads) as pool:
        def run():
            list(pool.map(lambda pair: np.exp(pair[0], out=pair[1]), zip(parts, outputs)))

        run()
        best = best_time_s(run, repeats)
    return {"per_s": values / best, "threads": threads, "best_s": best}


def step_operation_counts(setup) -> dict:
    """XLA's cost analysis of each sub-solver compiled alone, stages unrolled.

    Returns per sub-solver its uses per Strang step and its transcendentals and
    flops per voxel (all lesions' voxels), and their weighted sum per voxel per
    step: counts, no units.
    """
    unrolled = dataclasses.replace(setup, model=setup.model.for_batches())
    voxels = len(setup.lesions) * setup.model.grid.num_voxels
    per_sub_solver, per_step = {}, {"transcendentals": 0.0, "flops": 0.0}
    for name, (solver, dt, uses) in sub_solvers(unrolled).items():
        compiled = jax.jit(solver).lower(setup.state, setup.params, dt).compile()
        cost = compiled_cost(compiled) or {}
        counts = {key: cost.get(key, float("nan")) / voxels for key in per_step}
        per_sub_solver[name] = {"uses_per_step": uses, **{f"{key}_per_voxel": value for key, value in counts.items()}}
        for key, value in counts.items():
            per_step[key] += uses * value
    return {
        "voxels": voxels,
        "stages_unrolled": True,
        "sub_solvers": per_sub_solver,
        "per_voxel_per_step": per_step,
        "note": "XLA's counts after simplification; a conditional counts as its larger branch and the oxygen "
                "solve's conjugate-gradient loop once: lower bounds",
    }


def measure(n: int, lesions: int, steps: int, quick: bool = False) -> dict:
    """All figures of one case (see the module docstring); ``quick``: small arrays, few repeats."""
    on_cpu = jax.default_backend() == "cpu"
    repeats, values = (3, 1 << 16) if quick else (20, RATE_VALUES["cpu" if on_cpu else "device"])
    bandwidth = measure_bandwidth(16, 3) if quick else measure_bandwidth()
    rates = backend_rates_per_s(repeats, values)
    numpy_exp = numpy_exp_rate_per_s(repeats, values)
    setup = case_setup(n, lesions)
    counts = step_operation_counts(setup)
    fields = len(setup.model.species)
    voxels = counts["voxels"]
    budget_s = BYTES_PER_VALUE_TOUCHED_ONCE * fields * voxels / (TARGET_FRACTION * bandwidth["roofline_GBps"] * 1e9)
    transcendentals = counts["per_voxel_per_step"]["transcendentals"] * voxels
    # numpy's exp runs on the host: a rate for a CPU backend's step, not for a device's.
    candidates = [rate for rate in (rates["exp"]["per_s"], numpy_exp["per_s"] if on_cpu else None) if rate]
    fastest_exp = max(candidates) if candidates else None
    floor_s = ratio(transcendentals, fastest_exp)
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
        "rate_values": values,
        "rates_per_s": {**{name: rates[name]["per_s"] for name in OPERATIONS}, "numpy_exp": numpy_exp["per_s"]},
        "rate_kernels": {**rates, "numpy_exp": numpy_exp},
        "fastest_exp_per_s": fastest_exp,
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


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms"


def report_lines(result: dict) -> list[str]:
    """The printed summary of :func:`measure`'s result: budget, rates, counts, floor, step."""
    counts = result["operation_counts"]
    rates = result["rates_per_s"]
    ratio_text = "n/a" if result["floor_over_budget"] is None else f"{result['floor_over_budget']:.2f}x"
    lines = [
        f"TME step {result['case']} ({result['fields']} fields, float32, dt {result['dt_h']} h): "
        f"roofline {result['roofline_GBps']:.1f} GB/s; {result['target_fraction_of_roofline']:.0%} of it "
        f"allows {_ms(result['budget_s'])} per step (8 B per field value)",
        "  rates (G values/s): "
        + ", ".join(f"{name} {'n/a' if rate is None else f'{rate / 1e9:.2f}'}" for name, rate in rates.items()),
        "  XLA's counts per voxel (stages unrolled; lower bounds): "
        + "; ".join(f"{name} x{part['uses_per_step']}: {part['transcendentals_per_voxel']:.1f} transcendentals, "
                    f"{part['flops_per_voxel']:.0f} flops" for name, part in counts["sub_solvers"].items()),
        f"  per step: {counts['per_voxel_per_step']['transcendentals']:.1f} transcendentals and "
        f"{counts['per_voxel_per_step']['flops']:.0f} flops per voxel",
        f"  transcendentals alone at the fastest exp rate: {_ms(result['floor_transcendentals_s'])} per step "
        f"= {ratio_text} the budget (at XLA's exp rate {_ms(result['floor_transcendentals_at_xla_exp_s'])})",
    ]
    if result["step_time_s"] is not None:
        lines.append(f"  the step measured: {_ms(result['step_time_s'])} = {result['step_over_budget']:.1f}x "
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
    machine = machine_info()  # its time and load average: at the start of the run
    start = time.perf_counter()
    result = measure(int(case.group(1)), int(case.group(2)), args.steps, args.quick)
    result["wall_s"] = time.perf_counter() - start
    print("\n".join(report_lines(result)))
    result = {"machine": machine, **rounded(result)}
    if args.out:
        print(f"written: {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
