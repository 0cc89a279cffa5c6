"""The 3-D calibration check of docs/model.md: three presets × {none, pembrolizumab}.

    python -m benchmarks.calibration [--shape 16] [--spacing-um 50]

One lesion per patient (0.3 × box radius, a 2 cm represented lesion), a
2-week untreated lead-in, then 12 weeks; all six patients batched in one
compile. Prints, per patient: the day-14 immunophenotype with core/margin
CD8 (cells/mm², section equivalent), the burden at week 12 of therapy
relative to the start of therapy with its burden-diameter change (RECIST
reads −30 % as a PR) and the imaged longest diameter at both times; then
treated/untreated per preset.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=16)
    parser.add_argument("--spacing-um", type=float, default=50.0)
    args = parser.parse_args(argv)

    from tmesolve.grid import Grid
    from tmesolve.integrate import BatchIntegrator, make_solver_params
    from tmesolve.model.tme_setup import LesionSpec, setup_tme, stack_setups
    from tmesolve.readouts import PHENOTYPES

    grid = Grid((args.shape,) * 3, args.spacing_um)
    cases = [(ph, th) for ph in PHENOTYPES for th in ("none", "pembrolizumab")]
    setups = [setup_tme(grid, [LesionSpec(ph, radius_um=0.3 * grid.lengths_um[0])], therapy=th,
                        therapy_start_h=336.0, duration_h=84 * 24.0) for ph, th in cases]
    model, params, state = stack_setups(setups)
    integrator = BatchIntegrator(model)
    start = time.perf_counter()
    state, day14, _ = integrator.advance(state, params, make_solver_params(1.0), 14 * 24.0)
    state, day98, _ = integrator.advance(state, params, make_solver_params(1.0), 98 * 24.0)
    day14 = {k: np.asarray(v) for k, v in day14.items()}
    day98 = {k: np.asarray(v) for k, v in day98.items()}
    ratio = day98["viable_burden"][:, 0] / day14["viable_burden"][:, 0]
    print(f"grid {grid.shape} x {grid.spacing_um} um, {time.perf_counter() - start:.0f} s")
    for i, (ph, th) in enumerate(cases):
        print(f"{ph:9s} {th:14s} day-14 class {PHENOTYPES[int(day14['immunophenotype'][i][0])]:9s} "
              f"core/margin CD8 {day14['cd8_core_section'][i][0]:5.0f}/{day14['cd8_margin_section'][i][0]:5.0f}"
              f" cells/mm^2; burden week 12 / start of therapy {ratio[i]:.3f}"
              f" (burden diameter {100 * (np.cbrt(ratio[i]) - 1):+.0f} %; imaged longest diameter"
              f" {day14['longest_diameter_mm'][i][0]:.1f} -> {day98['longest_diameter_mm'][i][0]:.1f} mm)")
    for j, ph in enumerate(PHENOTYPES):
        print(f"{ph}: treated/untreated {ratio[2 * j + 1] / ratio[2 * j]:.3f}")


if __name__ == "__main__":
    main()
