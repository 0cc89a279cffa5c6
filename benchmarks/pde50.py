"""The PDE part of a 50³ lesion with ten diffusing species: time per step.

    python -m benchmarks.pde50 [--size 50] [--species 10] [--out FILE]

(also a section of the suite: ``python -m benchmarks --only pde50``)

Issue target (on a GPU): ≤ 0.1 ms per step. A published CUDA simulator of
this kind reports 5.58 ms per step on an A100 for the same problem size.

The problem: ten species in a no-flux box of 50³ voxels at 20 µm, each

    ∂u_i/∂t = D_i Δu_i − λ_i u_i + S_i(x)

with D_i log-spaced from 10³ to 10⁵ µm²/min (a large protein to oxygen),
λ_i log-spaced from 10⁻³ to 10⁻¹ min⁻¹, and S_i = 1 per minute inside a
sphere of 15 voxels' radius at the centre (cells secreting), 0 outside;
every species starts at 1 inside that sphere and 0 outside. The
step is 0.01 min, the diffusion step of BioFVM-class solvers; the spectral
paths cost the same at any step.

Paths, each a jitted loop of ``steps`` steps over one donated float32 array
(species, n, n, n); the time per step is the best call ÷ steps:

* ``spectral_source``: :func:`tmesolve.spectral.propagate` with the constant
  source, exact in time (ETD1): a forward transform of the fields and of
  the sources and an inverse, per-axis matrix products (how the TME model
  advances TGF-β and the antibodies);
* ``spectral``: the same without sources, the separable propagator (three
  per-axis products);
* ``explicit``: the 7-point finite-volume diffusion with decay and source,
  SSP-RK2, in as many sub-steps as the fastest species needs to keep each
  forward-Euler stage positive with a margin, Δt·(6D/h² + λ) ≤ 0.9
  (17 per 0.01 min here, two stencil passes each).

The spectral paths use the 7-point operator's own spectrum
(``spectrum="second_order"``), so all three solve the same semi-discrete
problem; ``agreement_relative_l2`` is the largest over species of the
relative L2 difference of the explicit and ``spectral_source`` changes
u(10 steps) − u(0) (a check that the timed code solves the problem, not a
timing). ``matrix_gflop_per_s`` counts the per-axis matrix products of the
spectral paths (2·N flops per value per product: 9 products per step with a
source, 3 without).

Figures per path: ``time_per_step_s`` (one 0.01 min step, sub-steps
included), ``voxel_updates_per_s`` (species × voxels per second),
``ratio_to_target`` (time ÷ 0.1 ms; ≤ 1 meets it) and
``speedup_over_published`` (5.58 ms ÷ time).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s
from tmesolve.grid import Grid
from tmesolve.operators import FaceBoundary, diffusion_rate, ssp_rk2
from tmesolve.spectral import Eigenbasis, propagate

SPACING_UM = 20.0
DT_MIN = 0.01
TARGET_STEP_S = 1e-4
PUBLISHED_A100_STEP_S = 5.58e-3
SOURCE_RADIUS_VOXELS = 15
MINUTES_PER_HOUR = 60.0


def problem(size: int, species: int, dtype=jnp.float32):
    """(grid, D (µm²/h), λ (h⁻¹), source field (1/h), initial fields) of the benchmark."""
    grid = Grid((size,) * 3, SPACING_UM)
    diffusivity = np.logspace(3, 5, species) * MINUTES_PER_HOUR
    decay = np.logspace(-3, -1, species) * MINUTES_PER_HOUR
    index = np.arange(size) - (size - 1) / 2.0
    radius_squared = index[:, None, None] ** 2 + index[None, :, None] ** 2 + index[None, None, :] ** 2
    inside = (radius_squared <= min(SOURCE_RADIUS_VOXELS, size // 2) ** 2).astype(np.float32)
    source = np.broadcast_to(inside * MINUTES_PER_HOUR, (species, size, size, size))
    # Start from the secreted pattern itself (1 inside the sphere), so that the path
    # without sources has something to diffuse.
    fields = np.broadcast_to(inside, (species, size, size, size)).astype(np.float32)
    return (grid, jnp.asarray(diffusivity, dtype), jnp.asarray(decay, dtype), jnp.asarray(source, dtype),
            jnp.asarray(fields, dtype))


#: Largest outflow fraction of a cell per forward-Euler stage (1 is the positivity limit).
EXPLICIT_SAFETY = 0.9
#: Per-axis matrix products of a spectral step: forward(u), forward(S), inverse; or the separable three.
MATRIX_PRODUCTS = {"spectral_source": 9, "spectral": 3}


def explicit_substeps(diffusivity, decay, dt, spacing: float = SPACING_UM) -> int:
    """Sub-steps per ``dt`` that keep every SSP-RK2 stage positive: Δt·(6D/h² + λ) ≤ 0.9."""
    rate = 6.0 * float(np.max(diffusivity)) / spacing**2 + float(np.max(decay))
    return int(np.ceil(float(dt) * rate / EXPLICIT_SAFETY))


def _stepper(path: str, grid: Grid, diffusivity, decay, source, dt):
    """One step of ``dt`` (h) of ``path``: fields (species, n, n, n) -> fields."""
    if path in ("spectral", "spectral_source"):
        basis = Eigenbasis(grid, FaceBoundary(), spectrum="second_order")
        with_source = path == "spectral_source"
        return lambda u: propagate(basis, u, diffusivity, decay, dt, source if with_source else None)
    column = diffusivity[:, None, None, None]
    rate_decay = decay[:, None, None, None]
    substeps = explicit_substeps(diffusivity, decay, dt, grid.spacing_um)
    substep = dt / substeps

    def rate(u):
        # D is uniform per species: one Laplacian pass scaled by D, no face averages.
        return column * diffusion_rate(u, 1.0, grid.spacing_um) - rate_decay * u + source

    return lambda u: jax.lax.fori_loop(0, substeps, lambda _, value: ssp_rk2(rate, value, substep), u)


def measure_path(path: str, size: int, species: int, repeats: int, target_call_s: float = 0.2) -> dict:
    """Time per step of one path (module docstring)."""
    grid, diffusivity, decay, source, fields = problem(size, species)
    dt = jnp.asarray(DT_MIN / MINUTES_PER_HOUR, fields.dtype)
    step = _stepper(path, grid, diffusivity, decay, source, dt)

    def loop(u, steps):
        return jax.lax.fori_loop(0, steps, lambda _, value: step(value), u)

    run = jax.jit(loop, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = run.lower(fields, 1).compile()
    compile_s = time.perf_counter() - start
    one = best_time_s(compiled, repeats, setup=lambda: (jnp.array(fields, copy=True), 1))
    steps = int(np.clip(target_call_s / max(one, 1e-6), 2, 10_000))
    call_s = best_time_s(compiled, repeats, setup=lambda: (jnp.array(fields, copy=True), steps))
    result = compiled(jnp.array(fields, copy=True), steps)
    per_step = call_s / steps
    values = species * size**3
    return {
        "path": path,
        "steps_per_call": steps,
        "substeps_per_step": explicit_substeps(diffusivity, decay, dt) if path == "explicit" else 1,
        "time_per_step_s": per_step,
        "voxel_updates_per_s": values / per_step,
        "matrix_gflop_per_s": (MATRIX_PRODUCTS[path] * 2 * size * values / per_step / 1e9
                               if path in MATRIX_PRODUCTS else None),
        "ratio_to_target": per_step / TARGET_STEP_S,
        "speedup_over_published": PUBLISHED_A100_STEP_S / per_step,
        "compile_s": compile_s,
        "finite": bool(jnp.all(jnp.isfinite(result))),
        # Exact propagation is positive; transforms in float32 leave round-off (~1e-6 of the max) below 0.
        "min_over_max": float(jnp.min(result) / jnp.max(result)),
    }


def agreement(size: int, species: int, steps: int = 10) -> float:
    """Largest over species of the relative L2 difference of the explicit and spectral-with-source
    changes u(``steps`` steps) − u(0): the change, not the fields, so that what stays put cannot
    hide a wrong step."""
    grid, diffusivity, decay, source, fields = problem(size, species)
    dt = jnp.asarray(DT_MIN / MINUTES_PER_HOUR, fields.dtype)
    changes = []
    for path in ("explicit", "spectral_source"):
        step = jax.jit(_stepper(path, grid, diffusivity, decay, source, dt))
        u = fields
        for _ in range(steps):
            u = step(u)
        changes.append(np.asarray(u, np.float64) - np.asarray(fields, np.float64))
    difference = np.linalg.norm((changes[0] - changes[1]).reshape(species, -1), axis=1)
    return float(np.max(difference / np.linalg.norm(changes[1].reshape(species, -1), axis=1)))


def measure_pde50(size: int = 50, species: int = 10, repeats: int = 3,
                  paths: tuple[str, ...] = ("spectral_source", "spectral", "explicit")) -> dict:
    """Every path at ``size``³ with ``species`` species (module docstring)."""
    return {
        "agreement_relative_l2": agreement(size, species),
        "problem": {"size": size, "species": species, "spacing_um": SPACING_UM, "dt_min": DT_MIN,
                    "diffusivity_um2_per_min": [1e3, 1e5], "decay_per_min": [1e-3, 1e-1],
                    "source_radius_voxels": SOURCE_RADIUS_VOXELS, "dtype": "float32"},
        "target_step_s": TARGET_STEP_S,
        "published_a100_step_s": PUBLISHED_A100_STEP_S,
        "backend": jax.default_backend(),
        "paths": {path: measure_path(path, size, species, repeats) for path in paths},
    }


def table(result: dict) -> list[str]:
    problem_ = result["problem"]
    lines = [f"PDE part, {problem_['species']} species on {problem_['size']}^3 voxels, "
             f"steps of {problem_['dt_min']:g} min "
             f"(target {result['target_step_s'] * 1e3:g} ms/step on a GPU; published A100 "
             f"{result['published_a100_step_s'] * 1e3:g} ms):",
             f"  {'path':<16} {'ms/step':>9} {'Mvox-upd/s':>11} {'x target':>9} {'x faster than published':>24}"]
    for name, figures in result["paths"].items():
        lines.append(f"  {name:<16} {figures['time_per_step_s'] * 1e3:9.3f} "
                     f"{figures['voxel_updates_per_s'] / 1e6:11.1f} {figures['ratio_to_target']:9.1f} "
                     f"{figures['speedup_over_published']:24.2f}")
    substeps = result["paths"].get("explicit", {}).get("substeps_per_step")
    lines.append(f"  explicit vs spectral_source, change over 10 steps: relative L2 "
                 f"{result['agreement_relative_l2']:.1e}; explicit sub-steps per step: {substeps}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--species", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    from benchmarks import write_json
    from benchmarks.machine import machine_info

    result = {"machine": machine_info(), **measure_pde50(args.size, args.species, args.repeats)}
    print("\n".join(table(result)))
    if args.out:
        write_json(args.out, result)
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
