"""DD3: diffusion–decay of a Gaussian in a no-flux box — throughput, accuracy, time to 1e-3.

Problem (the DD3 issue):

    ∂u/∂t = D Δu − λ u  on an N³ box of h = 20 µm voxels, no-flux walls,
    D = 1000 µm²/min = 60 000 µm²/h,  λ = 0.01 min⁻¹ = 0.6 h⁻¹,
    u(0) = Gaussian of σ₀ = 5 voxels = 100 µm at the box centre, float32,
    T = 10 min = 1/6 h.

The reference answer is the free-space Gaussian (``gaussian_solution``), whose
variance at T is σ² = σ₀² + 2DT = (173 µm)². How far that is from the true
no-flux box solution is measured too (:func:`wall_image_error`, by the method
of images), so the reported errors can be read as discretisation errors.

Three solvers, measured in the same process:

* ``explicit``: ``DiffusionDecay(grid, path="explicit")`` through
  ``Integrator.advance`` with the default Strang splitting, at the explicit
  stability limit (safety 1). The model has one operator, so the stepper runs
  one full SSP-RK2 step per step (2 stencil stages) under Strang and Lie alike
  (splitting is exact); ``explicit_lie`` is the same with Lie splitting and
  shows it. The stage count is read from the stepper's sequence
  (``SplitStepper.step_kinds``), not assumed.
* ``spectral``: ``DiffusionDecay(grid, path="spectral")`` (exact DCT
  propagator): one step of any length is exact in time.
* ``numpy_reference``: a plain numpy 7-point finite-volume stencil, float32,
  slices (no ``np.roll``), no-flux walls, forward Euler at dt = h²/(6D).

Bandwidth fraction of a stencil path: minimum bytes a stencil stage must move
are 8 per voxel (read u once, write u once, float32); the rest (neighbours,
the Runge–Kutta combination's second read of u) is assumed to come from cache.
So a step moves ≥ 8 B × stages per voxel; bytes ÷ time ÷ measured bandwidth.
Each stencil path's time per stage is also given over one plain jitted
stencil pass on the same grid (``benchmarks.plain_stencil_pass_s``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s, plain_stencil_pass_s, ratio
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, initial_state, make_solver_params
from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params, gaussian_solution

SPACING_UM = 20.0
DIFFUSIVITY_UM2_PER_H = 60_000.0  # 1000 µm²/min
DECAY_PER_H = 0.6  # 0.01 min⁻¹
SIGMA0_UM = 100.0  # 5 voxels
T_END_H = 1.0 / 6.0  # 10 min
TARGET_RELATIVE_L2 = 1e-3
MIN_BYTES_PER_VOXEL_PER_STAGE = 8  # float32: read u + write u
SSP_RK2_STAGES = 2
CELL_TRANSPORT_KIND = 1  # SplitStepper's sub-solver index of the model's transport
SPECTRAL_STEPS_FOR_THROUGHPUT = 16


def relative_l2(approximation: np.ndarray, exact: np.ndarray) -> float:
    """‖a − e‖₂ / ‖e‖₂ in float64."""
    approximation = np.asarray(approximation, np.float64).ravel()
    exact = np.asarray(exact, np.float64).ravel()
    return float(np.linalg.norm(approximation - exact) / np.linalg.norm(exact))


def wall_image_error(grid: Grid, t: float = T_END_H) -> float:
    """‖box − free‖₂/‖free‖₂ at time t: the no-flux box solution against the free-space Gaussian.

    The no-flux box solution of a Gaussian is the sum of its mirror images in
    every wall (Neumann method of images, per axis: sources at ±x₀ + 2kL); the
    sum over |k| ≤ 3 is exact to far below float32 round-off here.
    """
    variance = SIGMA0_UM**2 + 2.0 * DIFFUSIVITY_UM2_PER_H * t
    free, boxed = 1.0, 1.0
    for axis, length in enumerate(grid.lengths_um):
        # Distances from the low wall: the images of a source at ξ₀ sit at ±ξ₀ + 2kL.
        x = np.asarray(grid.axis_coordinates(axis), np.float64) - grid.origin_um[axis]
        centre = grid.centre_um[axis] - grid.origin_um[axis]
        direct = np.exp(-((x - centre) ** 2) / (2 * variance))
        images = sum(
            np.exp(-((x - sign * centre - 2 * k * length) ** 2) / (2 * variance))
            for k in range(-3, 4)
            for sign in (1.0, -1.0)
        )
        shape = [1, 1, 1]
        shape[axis] = x.size
        free = free * direct.reshape(shape)
        boxed = boxed * images.reshape(shape)
    return relative_l2(boxed, free)  # same denominator as the reported errors: the free Gaussian


# ---------------------------------------------------------------------------
# The plain numpy reference
# ---------------------------------------------------------------------------


def _along(axis: int, start: int | None, stop: int | None) -> tuple:
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    return tuple(index)


class NumpyForwardEuler:
    """u ← u + dt (D Δ_h u − λ u): 7-point finite volumes, no-flux walls, float32, no allocation.

    Δ_h u = Σ_faces (u_neighbour − u)/h² over interior faces only: a wall face
    carries no flux, which is the no-flux condition (and conserves Σu exactly
    when λ = 0).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing_um: float,
        diffusivity: float,
        decay: float,
        dt: float,
    ) -> None:
        self.flux_sum = np.empty(shape, np.float32)  # h² Δ_h u
        self.face_differences = [
            np.empty(tuple(n - (axis == a) for a, n in enumerate(shape)), np.float32)
            for axis in range(3)
        ]
        self.diffusion_number = np.float32(diffusivity * dt / spacing_um**2)  # D dt/h²
        self.decay_factor = np.float32(1.0 - decay * dt)

    def step(self, u: np.ndarray) -> None:
        """One forward-Euler step of u, in place."""
        self.flux_sum.fill(0.0)
        for axis, difference in enumerate(self.face_differences):
            np.subtract(u[_along(axis, 1, None)], u[_along(axis, None, -1)], out=difference)
            self.flux_sum[_along(axis, None, -1)] += difference
            self.flux_sum[_along(axis, 1, None)] -= difference
        self.flux_sum *= self.diffusion_number
        u *= self.decay_factor
        u += self.flux_sum


def run_numpy_reference(u0: np.ndarray, t_end: float = T_END_H) -> tuple[np.ndarray, int, float]:
    """Forward Euler at the stability limit dt = h²/(6D) (shortened to divide T evenly).

    Returns (u at t_end, steps, wall time in s).
    """
    stability_limit = SPACING_UM**2 / (6.0 * DIFFUSIVITY_UM2_PER_H)
    steps = int(np.ceil(t_end / stability_limit - 1e-9))
    stepper = NumpyForwardEuler(
        u0.shape, SPACING_UM, DIFFUSIVITY_UM2_PER_H, DECAY_PER_H, t_end / steps
    )
    u = np.array(u0, np.float32, copy=True)
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step(u)
    return u, steps, time.perf_counter() - start


# ---------------------------------------------------------------------------
# The tmesolve paths
# ---------------------------------------------------------------------------


def _measure_path(
    grid: Grid,
    u0: np.ndarray,
    exact: np.ndarray,
    path: str,
    splitting_order: int,
    dt_max: float,
    repeats: int,
    safety: float = 1.0,
) -> dict:
    """Compile once, then time ``Integrator.advance`` from 0 to T (best of ``repeats``)."""
    model = DiffusionDecay(grid, path=path, with_source=False)  # DD3 has no source
    integrator = Integrator(model, splitting_order)
    params = diffusion_decay_params(DIFFUSIVITY_UM2_PER_H, DECAY_PER_H, dtype=jnp.float32)
    solver = make_solver_params(dt_max, safety=safety, dtype=jnp.float32)
    initial = u0[None, None]

    def fresh_state():
        return (initial_state(model, initial, dtype=jnp.float32),)  # advance donates its state

    t_end = jnp.asarray(T_END_H, jnp.float32)
    start = time.perf_counter()
    integrator._advance.lower(*fresh_state(), params, solver, t_end).compile()
    compile_s = time.perf_counter() - start
    outcome = {}

    def advance(state):
        outcome["result"] = integrator.advance(state, params, solver, T_END_H)
        return outcome["result"]

    run_s = best_time_s(advance, repeats, fresh_state)
    state, _, diagnostics = outcome["result"]
    steps = int(diagnostics["steps"])
    return {
        "compile_s": compile_s,
        "time_to_T_s": run_s,
        "steps": steps,
        "dt_h": T_END_H / steps,
        "time_per_step_s": run_s / steps,
        "voxel_updates_per_s": grid.num_voxels * steps / run_s,
        "relative_l2_error": relative_l2(np.asarray(state.fields)[0, 0], exact),
        "splitting_order": splitting_order,
        "traces": integrator.trace_count,
        "_integrator": integrator,
    }


def _stencil_stages_per_step(result: dict) -> int:
    """Stencil stages one step of a measured explicit path runs: two (SSP-RK2) per
    cell-transport sub-step of the step's split sequence, as the stepper runs it."""
    kinds = result["_integrator"].stepper.step_kinds
    return SSP_RK2_STAGES * kinds.count(CELL_TRANSPORT_KIND)


def _stencil_bandwidth(
    result: dict, voxels: int, stages_per_step: int, bandwidth: dict | None, plain_pass_s: float
) -> None:
    """Add the minimum-traffic bandwidth figures of a stencil path to ``result``.

    ``time_per_stage_over_plain_pass``: the path's time per stencil stage over
    one plain jitted stencil pass of the same grid (1 = as fast as a lone stencil).
    """
    moved = MIN_BYTES_PER_VOXEL_PER_STAGE * stages_per_step * voxels * result["steps"]
    result["stencil_stages_per_step"] = stages_per_step
    result["time_per_stage_over_plain_pass"] = ratio(
        result["time_per_step_s"] / stages_per_step, plain_pass_s
    )
    result["min_bytes_per_voxel_per_step"] = MIN_BYTES_PER_VOXEL_PER_STAGE * stages_per_step
    result["effective_GBps"] = moved / result["time_to_T_s"] / 1e9
    if bandwidth is not None:
        result["bandwidth_fraction_of_numpy_copy"] = ratio(
            result["effective_GBps"], bandwidth["numpy_copy_GBps"]
        )
        result["bandwidth_fraction_of_roofline"] = ratio(
            result["effective_GBps"], bandwidth["roofline_GBps"]
        )


def measure_size(n: int, bandwidth: dict | None, repeats: int) -> dict:
    """All DD3 figures at N³ voxels."""
    grid = Grid((n, n, n), SPACING_UM)
    voxels = n**3
    u0 = np.asarray(
        gaussian_solution(grid, 0.0, SIGMA0_UM, DIFFUSIVITY_UM2_PER_H, DECAY_PER_H), np.float32
    )
    exact = gaussian_solution(grid, T_END_H, SIGMA0_UM, DIFFUSIVITY_UM2_PER_H, DECAY_PER_H)

    plain_pass_s = plain_stencil_pass_s((1, n, n, n), max(5, repeats))
    reference_runs = [run_numpy_reference(u0) for _ in range(max(1, repeats))]
    u_ref, ref_steps, _ = reference_runs[0]
    ref_s = min(run[2] for run in reference_runs)
    numpy_reference = {
        "time_to_T_s": ref_s,
        "steps": ref_steps,
        "dt_h": T_END_H / ref_steps,
        "time_per_step_s": ref_s / ref_steps,
        "voxel_updates_per_s": voxels * ref_steps / ref_s,
        "relative_l2_error": relative_l2(u_ref, exact),
    }
    _stencil_bandwidth(numpy_reference, voxels, 1, bandwidth, plain_pass_s)

    # Best of at least 3, as the bandwidth is a best of 7: a run to T takes about 0.1 s at
    # 128³ and 1.3 s at 256³ on a 2-core CPU, and this VM's speed varies from second to second.
    explicit_repeats = max(3, repeats)
    explicit = _measure_path(
        grid, u0, exact, "explicit", 2, dt_max=T_END_H, repeats=explicit_repeats
    )
    _stencil_bandwidth(explicit, voxels, _stencil_stages_per_step(explicit), bandwidth, plain_pass_s)
    explicit_lie = _measure_path(
        grid, u0, exact, "explicit", 1, dt_max=T_END_H, repeats=explicit_repeats
    )
    _stencil_bandwidth(
        explicit_lie, voxels, _stencil_stages_per_step(explicit_lie), bandwidth, plain_pass_s
    )

    # Spectral: one step of length T (the time-to-accuracy solve), then a run of
    # many shorter steps (throughput). dt_max is a traced leaf: no recompilation.
    spectral = _measure_path(
        grid, u0, exact, "spectral", 2, dt_max=T_END_H, repeats=max(3, repeats)
    )
    integrator = spectral.pop("_integrator")
    params = diffusion_decay_params(DIFFUSIVITY_UM2_PER_H, DECAY_PER_H, dtype=jnp.float32)
    solver = make_solver_params(
        T_END_H / SPECTRAL_STEPS_FOR_THROUGHPUT, safety=1.0, dtype=jnp.float32
    )
    many = {}

    def advance_many(state):
        many["result"] = integrator.advance(state, params, solver, T_END_H)
        return many["result"]

    many_s = best_time_s(
        advance_many,
        repeats,
        lambda: (initial_state(integrator.model, u0[None, None], dtype=jnp.float32),),
    )
    many_steps = int(many["result"][2]["steps"])
    spectral.update(
        {
            "one_step_solve_s": spectral.pop("time_to_T_s"),
            "throughput_steps": many_steps,
            "time_per_step_s": many_s / many_steps,
            "voxel_updates_per_s": voxels * many_steps / many_s,
            "relative_l2_error_after_throughput_steps": relative_l2(
                np.asarray(many["result"][0].fields)[0, 0], exact
            ),
            "traces": integrator.trace_count,
        }
    )
    del spectral["steps"], spectral["dt_h"]
    for result in (explicit, explicit_lie):
        result.pop("_integrator")

    ratios = {
        "explicit_voxel_updates_per_s": ratio(
            explicit["voxel_updates_per_s"], numpy_reference["voxel_updates_per_s"]
        ),
        "explicit_lie_voxel_updates_per_s": ratio(
            explicit_lie["voxel_updates_per_s"], numpy_reference["voxel_updates_per_s"]
        ),
        "spectral_voxel_updates_per_s": ratio(
            spectral["voxel_updates_per_s"], numpy_reference["voxel_updates_per_s"]
        ),
        "explicit_time_to_T": ratio(explicit["time_to_T_s"], numpy_reference["time_to_T_s"]),
        "explicit_lie_time_to_T": ratio(
            explicit_lie["time_to_T_s"], numpy_reference["time_to_T_s"]
        ),
        "spectral_one_step_solve_time": ratio(
            spectral["one_step_solve_s"], numpy_reference["time_to_T_s"]
        ),
    }
    return {
        "N": n,
        "voxels": voxels,
        "wall_image_relative_l2": wall_image_error(grid),
        "plain_jitted_stencil_pass_s": plain_pass_s,
        "numpy_reference": numpy_reference,
        "explicit": explicit,
        "explicit_lie": explicit_lie,
        "spectral": spectral,
        "ratio_to_numpy_reference": ratios,
    }


def time_to_accuracy(size_result: dict, target: float = TARGET_RELATIVE_L2) -> dict:
    """Time for each solver to reach relative L2 ≤ ``target`` at T, from a size's figures."""
    reference = size_result["numpy_reference"]
    answer = {"N": size_result["N"], "target_relative_l2": target}
    for name, figures, seconds in (
        ("spectral", size_result["spectral"], size_result["spectral"]["one_step_solve_s"]),
        ("explicit", size_result["explicit"], size_result["explicit"]["time_to_T_s"]),
        ("explicit_lie", size_result["explicit_lie"], size_result["explicit_lie"]["time_to_T_s"]),
        ("numpy_reference", reference, reference["time_to_T_s"]),
    ):
        error = figures["relative_l2_error"]
        reached = error <= target
        answer[name] = {
            "reached": reached,
            "relative_l2_error": error,
            "solve_s": seconds,
            "time_to_accuracy_s": seconds if reached else None,
            "ratio_to_numpy_reference_time": ratio(seconds, reference["time_to_T_s"]),
        }
    answer["spectral"]["compile_s"] = size_result["spectral"]["compile_s"]
    answer["spectral"]["steps"] = 1
    return answer


def measure_dd3(
    sizes=(64, 128),
    bandwidth: dict | None = None,
    repeats: int = 2,
    accuracy_size: int | None = 128,
) -> dict:
    """DD3 at every N in ``sizes``; time to 1e-3 at ``accuracy_size`` (or the largest size run)."""
    by_size = {str(n): measure_size(n, bandwidth, repeats) for n in sizes}
    chosen = accuracy_size if accuracy_size in sizes else max(sizes)
    return {
        "problem": {
            "equation": "du/dt = D Laplacian(u) - lambda u, no-flux box",
            "spacing_um": SPACING_UM,
            "diffusivity_um2_per_h": DIFFUSIVITY_UM2_PER_H,
            "decay_per_h": DECAY_PER_H,
            "sigma0_um": SIGMA0_UM,
            "t_end_h": T_END_H,
            "dtype": "float32",
            "explicit_safety": 1.0,
            "min_bytes_counted": "8 B/voxel per stencil stage (read u, write u); "
            "an explicit step = one SSP-RK2 step = 2 stages under Strang and Lie alike "
            "(one operator: the stepper runs it once per step), numpy forward Euler = 1",
        },
        "sizes": by_size,
        "time_to_accuracy": time_to_accuracy(by_size[str(chosen)]),
        "backend": jax.default_backend(),
    }


def table(result: dict) -> list[str]:
    """Human-readable lines of the DD3 section."""
    lines = [f"DD3 diffusion-decay, h = {SPACING_UM:g} um, T = 10 min, float32:"]
    header = (
        f"  {'N':>4} {'solver':<16} {'Mvox-upd/s':>11} {'x numpy':>8} {'s/step':>10} "
        f"{'steps':>6} {'time to T s':>11} {'rel L2':>9} {'BW frac':>8} {'stage/pass':>10} "
        f"{'compile s':>9}"
    )
    lines.append(header)
    for key, size in result["sizes"].items():
        ratios = size["ratio_to_numpy_reference"]
        for name in ("numpy_reference", "explicit", "explicit_lie", "spectral"):
            figures = size[name]
            steps = figures.get("steps", figures.get("throughput_steps"))
            to_t = figures.get("time_to_T_s", figures.get("one_step_solve_s"))
            fraction = figures.get("bandwidth_fraction_of_numpy_copy")
            per_stage = figures.get("time_per_stage_over_plain_pass")
            speedup = 1.0 if name == "numpy_reference" else ratios[f"{name}_voxel_updates_per_s"]
            lines.append(
                f"  {key:>4} {name:<16} {figures['voxel_updates_per_s'] / 1e6:11.1f} "
                f"{speedup:8.2f} {figures['time_per_step_s']:10.3e} {steps:6d} {to_t:11.4f} "
                f"{figures['relative_l2_error']:9.2e} "
                f"{'' if fraction is None else f'{fraction:.3f}':>8} "
                f"{'' if per_stage is None else f'{per_stage:.1f}':>10} "
                f"{'' if 'compile_s' not in figures else format(figures['compile_s'], '.2f'):>9}"
            )
        lines.append(
            f"  {key:>4} free-space vs no-flux box solution (wall images): rel L2 "
            f"{size['wall_image_relative_l2']:.1e}; plain jitted stencil pass "
            f"{size['plain_jitted_stencil_pass_s']:.2e} s"
        )
    accuracy = result["time_to_accuracy"]
    lines.append(
        f"  time to rel L2 <= {accuracy['target_relative_l2']:g} at T, N = {accuracy['N']}:"
    )
    for name in ("spectral", "explicit", "explicit_lie", "numpy_reference"):
        entry = accuracy[name]
        verdict = (
            f"{entry['time_to_accuracy_s']:.4f} s"
            if entry["reached"]
            else f"not reached (error {entry['relative_l2_error']:.2e} "
            f"after {entry['solve_s']:.3f} s)"
        )
        lines.append(
            f"    {name:<16} {verdict}   x numpy time: {entry['ratio_to_numpy_reference_time']:.3g}"
        )
    lines.append(
        "  (spectral 'time to T' = one step of dt = T; its s/step is from "
        f"{SPECTRAL_STEPS_FOR_THROUGHPUT} steps of T/{SPECTRAL_STEPS_FOR_THROUGHPUT}; BW frac: "
        "8 B/voxel/stage over numpy copy; stage/pass: time per stencil stage over one plain "
        "jitted stencil pass)"
    )
    return lines
