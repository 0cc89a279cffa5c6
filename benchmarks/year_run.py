"""A 1-year run of a 3-lesion patient at 32³ (issue check too long for CI): finite and non-negative?

    python -m benchmarks.year_run [--shape 32] [--spacing-um 100] [--out benchmarks/results/year-run.json]

Lesions inflamed, excluded and desert share one systemic compartment under
nivolumab + ipilimumab; every 4 weeks the state is checked for non-finite or
negative values (beyond float32 round-off). Writes JSON with the checks, the
steps, the wall time and the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--spacing-um", type=float, default=100.0)
    parser.add_argument("--days", type=float, default=365.0)
    parser.add_argument("--out", default="benchmarks/results/year-run.json")
    args = parser.parse_args(argv)

    import jax

    from benchmarks import write_json
    from benchmarks.machine import machine_info
    from tmesolve.grid import Grid
    from tmesolve.integrate import Integrator, make_solver_params
    from tmesolve.model.tme_setup import LesionSpec, setup_tme

    grid = Grid((args.shape,) * 3, args.spacing_um)
    radius = 0.25 * args.shape * args.spacing_um
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=radius), LesionSpec("excluded", radius_um=radius),
                             LesionSpec("desert", radius_um=radius)], therapy="nivolumab_ipilimumab",
                      duration_h=args.days * 24.0)
    integrator = Integrator(setup.model)
    solver = make_solver_params(dt_max=4.0)
    state, checks, steps = setup.state, [], 0
    start = time.perf_counter()
    for day in np.arange(28.0, args.days + 1e-9, 28.0).tolist() + ([args.days] if args.days % 28 else []):
        state, readouts, diagnostics = integrator.advance(state, setup.params, solver, day * 24.0)
        fields = np.asarray(state.fields)
        leaves = [np.asarray(leaf, dtype=float) for leaf in jax.tree_util.tree_leaves(state.aux)]
        steps += int(diagnostics["steps"])
        finite = bool(np.all(np.isfinite(fields)) and all(np.all(np.isfinite(x)) for x in leaves))
        check = {"day": day, "finite": finite,
                 "min_over_max": float(fields.min() / fields.max()),
                 "viable_burden": [float(b) for b in np.asarray(readouts["viable_burden"])],
                 "irae_grade": float(readouts["irae_grade"])}
        checks.append(check)
        print(check, flush=True)
    result = {"machine": machine_info(), "grid": {"shape": grid.shape, "spacing_um": grid.spacing_um},
              "lesions": 3, "days": args.days, "steps": steps, "wall_s": time.perf_counter() - start,
              "all_finite": all(c["finite"] for c in checks),
              "non_negative": all(c["min_over_max"] >= -1e-6 for c in checks), "checks": checks}
    write_json(args.out, result)
    print(f"finite {result['all_finite']}, non-negative {result['non_negative']}, {steps} steps in "
          f"{result['wall_s']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
