"""Step-size convergence of the full TME model: what the time step does to oxygen and necrosis.

The default job's lesion (one inflamed lesion of radius 300 µm in a 24³ box
of 50 µm voxels, pembrolizumab) is advanced 12 h with ``solver.dt_max_h`` =
0.5, 0.1, 0.02 and 0.005 h (plain Strang, float32), and the oxygen and
necrosis readouts are compared across steps. Oxygen's local rate (uptake,
10²–10⁴ h⁻¹) is stiff at every practical Δt. Split from its diffusion (up to
commit 62194fd), each reaction sub-step drove O towards its local equilibrium
P/Λ, near 0 away from vessels, and the spectral sub-step refilled it: an O(1)
splitting error wherever diffusion feeds the tumour (√(D_O/Λ) ≈ 100–200 µm).
Solved with its diffusion (tmesolve.implicit), the figures should agree
across the four steps.

Every field is also compared with the finest run at the end (relative L2,
``field_relative_l2_to_finest``), and the three coarser steps are run once
more with ``solver.merge_reactions`` (one reaction evaluation per Strang step
instead of two halves), to show what that scheme costs in accuracy against
plain Strang at the same step.

    python -m benchmarks.dt_convergence [--out benchmarks/results/dt-convergence.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import write_json
from benchmarks.machine import machine_info

DT_MAX_H = (0.5, 0.1, 0.02, 0.005)
DURATION_H = 12.0
RECORD_H = 3.0
HYPOXIC_MMHG = 2.5   # O_n, the half-point of the necrosis switch


def run(dt_max_h: float, shape: int = 24, spacing_um: float = 50.0, radius_um: float = 300.0,
        merge_reactions: bool = False, duration_h: float = DURATION_H, model_class: type | None = None) -> dict:
    """One run of the default lesion for ``duration_h`` at ``dt_max_h``: oxygen and necrosis figures.

    The final fields (float64, by species name) are under ``"_fields"``, for
    the comparison with the finest run; they are not written to the JSON.
    ``model_class``: a subclass of TMEModel to run instead (the same model
    with other settings, e.g. the species whose production the spectral step
    takes; benchmarks.cytokine_sources).
    """
    from tmesolve.grid import Grid
    from tmesolve.integrate import Integrator, make_solver_params
    from tmesolve.model.tme_setup import LesionSpec, setup_tme

    grid = Grid((shape,) * 3, spacing_um)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=radius_um)], therapy="pembrolizumab",
                      duration_h=duration_h + 12.0)
    if model_class is not None:
        setup.model.__class__ = model_class
    integrator = Integrator(setup.model, 2, merge_reactions)
    solver = make_solver_params(dt_max_h)
    state, steps = setup.state, 0
    start = time.perf_counter()
    for stop in np.arange(RECORD_H, duration_h + 0.5 * RECORD_H, RECORD_H):
        state, _, diagnostics = integrator.advance(state, setup.params, solver, float(stop))
        steps += int(diagnostics["steps"])
        if not bool(diagnostics["finite"]):
            raise RuntimeError(f"non-finite fields at t = {stop:g} h (dt_max_h = {dt_max_h:g})")
    wall_s = time.perf_counter() - start
    fields = np.asarray(state.fields, dtype=np.float64)
    model = setup.model
    oxygen = fields[model.index("oxygen")]
    tumour = fields[model.index("tumour_cells")] > 0.1 * float(setup.params.model["K_max"])
    voxel_mm3 = grid.voxel_volume_mm3
    return {
        "dt_max_h": dt_max_h,
        "merge_reactions": integrator.merge_reactions,  # False where the stepper cannot merge
        "steps": steps,
        "wall_s": wall_s,
        "oxygen_mean_mmHg": float(oxygen.mean()),
        "oxygen_mean_in_tumour_mmHg": float(oxygen[tumour].mean()),
        "hypoxic_voxels": int((oxygen < HYPOXIC_MMHG).sum()),
        "necrotic_cells": float(fields[model.index("necrotic_debris")].sum() * voxel_mm3),
        "viable_tumour_cells": float(fields[model.index("tumour_cells")].sum() * voxel_mm3),
        "minimum_value": float(fields.min()),
        "_fields": {species.name: fields[model.index(species.name)] for species in model.species},
    }


def relative_l2(field: np.ndarray, reference: np.ndarray) -> float:
    """‖field − reference‖₂ / ‖reference‖₂ (0 where both vanish)."""
    norm = float(np.linalg.norm(reference))
    difference = float(np.linalg.norm(field - reference))
    return difference / norm if norm > 0 else difference


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dt-convergence.json")
    args = parser.parse_args(argv)
    runs = [run(dt) for dt in DT_MAX_H]
    merged = [run(dt, merge_reactions=True) for dt in DT_MAX_H[:-1]]
    finest = runs[-1]
    for entry in runs + merged:
        entry["necrosis_ratio_to_finest"] = entry["necrotic_cells"] / max(finest["necrotic_cells"], 1e-30)
        entry["tumour_oxygen_ratio_to_finest"] = (entry["oxygen_mean_in_tumour_mmHg"]
                                                  / finest["oxygen_mean_in_tumour_mmHg"])
        entry["field_relative_l2_to_finest"] = {
            name: relative_l2(field, finest["_fields"][name]) for name, field in entry["_fields"].items()}
    for entry in runs + merged:
        del entry["_fields"]
    result = {"machine": machine_info(), "case": "default lesion: 24^3 x 50 um, inflamed, r = 300 um, "
              f"pembrolizumab, {DURATION_H:g} h, float32; runs: plain Strang; merged_runs: "
              "solver.merge_reactions; field errors against the finest plain run",
              "runs": runs, "merged_runs": merged}
    print(f"{'dt_max h':>9} {'steps':>6} {'O tumour':>9} {'hypoxic vox':>11} {'necrotic cells':>15} "
          f"{'x finest':>9} {'viable cells':>13}")
    for entry in runs:
        print(f"{entry['dt_max_h']:9g} {entry['steps']:6d} {entry['oxygen_mean_in_tumour_mmHg']:9.2f} "
              f"{entry['hypoxic_voxels']:11d} {entry['necrotic_cells']:15.4g} "
              f"{entry['necrosis_ratio_to_finest']:9.1f} {entry['viable_tumour_cells']:13.6g}")
    print(f"\nrelative L2 against the {finest['dt_max_h']:g} h run, the five largest at the coarsest step:")
    coarsest = runs[0]["field_relative_l2_to_finest"]
    shown = sorted(coarsest, key=coarsest.get, reverse=True)[:5] + ["tumour_cells"]
    print(f"{'dt_max h':>9} {'scheme':>7} " + " ".join(f"{name:>17}" for name in shown))
    for entry in [e for pair in zip(runs, merged) for e in pair]:
        errors = entry["field_relative_l2_to_finest"]
        scheme = "merged" if entry["merge_reactions"] else "Strang"
        print(f"{entry['dt_max_h']:9g} {scheme:>7} " + " ".join(f"{errors[name]:17.2e}" for name in shown))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
