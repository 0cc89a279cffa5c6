"""Chemotaxis equilibrium, positivity, Fisher–KPP fronts, splitting order, compile count, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import log_log_slope, relative_l2, run_to

from tmesolve.errors import ConfigError
from tmesolve.grid import Grid
from tmesolve.integrate import BatchIntegrator, Integrator, initial_state, make_solver_params, stack_pytrees
from tmesolve.model.verification import (
    Chemotaxis,
    DiffusionDecay,
    FisherKPP,
    ablowitz_zeppetella,
    chemotaxis_params,
    diffusion_decay_params,
    fisher_kpp_params,
)
from tmesolve.stepping import SplitStepper


def bump(grid: Grid, width_um: float) -> np.ndarray:
    x, y, _ = grid.coordinates
    cx, cy, _ = grid.centre_um
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width_um**2)) * np.ones(grid.shape)


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_chemotaxis_reaches_boltzmann_equilibrium(x64, dtype_name):
    """Frozen c, constant χ: the no-flux steady state is u ∝ exp(χc/D_u).

    χc/D_u peaks at 2 (a 7× density contrast). The limited upwind flux is second
    order where the profile is smooth; at 32² cells of 20 µm the measured error is
    ~3e-3, so 1e-2 leaves room for float32 and still fails on any first-order slip.
    """
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[dtype_name]
    grid = Grid((32, 32, 1), 20.0)
    diffusivity, sensitivity = 1.0e4, 2.0e4
    attractant = bump(grid, 120.0)
    params = chemotaxis_params(diffusivity, sensitivity, attractant, dtype=dtype)
    u0 = np.full(grid.shape, 1000.0)
    fields, _ = run_to(Chemotaxis(grid), params, u0, 20.0, 10.0, dtype)  # ~5 relaxation times
    boltzmann = np.exp(sensitivity * attractant / diffusivity)
    boltzmann *= u0.sum() / boltzmann.sum()
    assert relative_l2(fields[0, 0], boltzmann) < 1e-2
    assert abs(fields.sum() - u0.sum()) / u0.sum() < (1e-12 if dtype_name == "float64" else 1e-5)


def test_positivity_under_steep_gradients_and_strong_chemotaxis(x64):
    """Cells as a one-voxel spike and a step, attractant jumping by 50 units across a voxel.

    χΔc/D_u = 100 per voxel: a central scheme would go negative at once; the limited
    upwind scheme under its CFL must keep every value ≥ 0 (round-off allowed: −1e-12·max).
    """
    grid = Grid((24, 24, 1), 20.0)
    x, y, _ = grid.coordinates
    attractant = 50.0 * (x > grid.centre_um[0]) * np.ones(grid.shape) + 0.0 * y
    u0 = np.zeros(grid.shape)
    u0[3, 3, 0] = 1e6
    u0[:, 12:, :] += 500.0
    params = chemotaxis_params(100.0, 200.0, attractant, dtype=jnp.float64)
    model = Chemotaxis(grid)
    integrator = Integrator(model)
    state = initial_state(model, u0[None, None], dtype=jnp.float64)
    solver = make_solver_params(1.0, dtype=jnp.float64)
    minima = []
    for t_end in (0.5, 2.0, 10.0, 40.0):
        state, _, diagnostics = integrator.advance(state, params, solver, t_end)
        minima.append(float(diagnostics["minimum"]))
    assert min(minima) >= -1e-12 * u0.max(), minima
    assert abs(float(state.fields.sum()) - u0.sum()) / u0.sum() < 1e-12


def front_position(u: np.ndarray, x: np.ndarray, level: float = 0.5) -> float:
    """Where u crosses ``level`` (linear interpolation), for a decreasing front."""
    i = int(np.argmax(u < level))
    return float(x[i - 1] + (u[i - 1] - level) / (u[i - 1] - u[i]) * (x[i] - x[i - 1]))


def test_fisher_kpp_front_speed(x64):
    """From a step, the front speed tends to 2√(rD) (minus the Bramson lag 3/(2√(r/D) t)).

    Measured between t = 50/r and 100/r the lag term lowers the mean speed by ~1 %;
    the issue's 2 % bound is asserted. Explicit diffusion keeps u = 0 exactly zero
    ahead of the front (see FisherKPP's docstring).
    """
    grid = Grid((700, 1, 1), 0.5)
    x = grid.axis_coordinates(0)
    u0 = (x < 10.0).astype(float)[:, None, None]
    model = FisherKPP(grid, path="explicit")
    params = fisher_kpp_params(1.0, 1.0, dtype=jnp.float64)
    integrator = Integrator(model)
    state = initial_state(model, u0[None, None], dtype=jnp.float64)
    solver = make_solver_params(0.1, dtype=jnp.float64)
    positions = {}
    for t_end in (50.0, 100.0):
        state, _, _ = integrator.advance(state, params, solver, t_end)
        positions[t_end] = front_position(np.asarray(state.fields[0, 0, :, 0, 0]), x)
    speed = (positions[100.0] - positions[50.0]) / 50.0
    assert abs(speed - 2.0) / 2.0 < 0.02, speed


def ablowitz_run(dt: float, order: int, t_end: float = 4.0, merge_reactions: bool = False):
    grid = Grid((400, 1, 1), 0.25)
    x = grid.axis_coordinates(0)
    u0 = ablowitz_zeppetella(x, 0.0, 1.0, 1.0, shift=50.0)[:, None, None]
    params = fisher_kpp_params(1.0, 1.0, dtype=jnp.float64)
    fields, _ = run_to(FisherKPP(grid), params, u0, t_end, dt, jnp.float64, splitting_order=order,
                       merge_reactions=merge_reactions)
    return fields[0, 0, :, 0, 0], ablowitz_zeppetella(x, t_end, 1.0, 1.0, shift=50.0)


def test_ablowitz_zeppetella_travelling_wave(x64):
    """The exact wave moves at 5/√6 and keeps its shape: error ≤ 1e-4 at dt = 0.05.

    With merged reaction halves the reaction integrator takes one step of dt
    where Strang takes two of dt/2, four times its local error: measured
    1.1e-4 against 6.5e-5 (float32 CLI run), so that variant gets 2e-4.
    """
    numeric, exact = ablowitz_run(0.05, 2)
    assert relative_l2(numeric, exact) < 1e-4
    merged, _ = ablowitz_run(0.05, 2, merge_reactions=True)
    assert relative_l2(merged, exact) < 2e-4
    # The two schemes differ (this is not the same code path twice) by less than their errors.
    assert 0.0 < relative_l2(merged, numeric) < 2e-4


@pytest.mark.parametrize("order,merge_reactions", [(1, False), (2, False), (2, True)])
def test_temporal_order_of_the_splitting(x64, order, merge_reactions):
    """Regression of log error over four halvings of dt gives the declared order (±0.15).

    Diffusion is exact in time and spectral in space, so the error is the
    splitting's (and the reaction integrator's, second order). Lie's error has a
    sizeable second-order part at large dt, so its steps start smaller. Merging
    the reaction halves of neighbouring Strang steps keeps second order.
    """
    steps = [0.05, 0.025, 0.0125, 0.00625] if order == 1 else [0.2, 0.1, 0.05, 0.025]
    errors = [relative_l2(*ablowitz_run(dt, order, merge_reactions=merge_reactions)) for dt in steps]
    measured = log_log_slope(steps, errors)
    assert abs(measured - order) < 0.15, (measured, errors)


def test_merged_reactions_batched_equal_single_runs_and_compile_once(x64):
    """Patients of a batch take different steps, so they close their intervals (the
    owed reaction half) at different iterations of the vmapped loop: each must still
    equal its own run, over several intervals, from one compile."""
    grid = Grid((64, 1, 1), 0.25)
    x = grid.axis_coordinates(0)
    u0 = ablowitz_zeppetella(x, 0.0, 1.0, 1.0, shift=8.0)[None, None, :, None, None]
    # Explicit diffusion: the stable dt is h²/(2D)·safety, so D = 2 takes twice the steps.
    params = [fisher_kpp_params(diffusivity, rate, dtype=jnp.float64) for diffusivity, rate in ((1.0, 1.0), (2.0, 3.0))]
    solver = make_solver_params(0.07, dtype=jnp.float64)
    model = FisherKPP(grid, path="explicit")
    singles = []
    for patient in params:
        integrator = Integrator(model, 2, merge_reactions=True)
        state = initial_state(model, u0, dtype=jnp.float64)
        for stop in (0.5, 1.25):
            state, _, _ = integrator.advance(state, patient, solver, stop)
        singles.append(np.asarray(state.fields))
    batch = BatchIntegrator(model, 2, merge_reactions=True)
    state = stack_pytrees([initial_state(model, u0, dtype=jnp.float64)] * 2)
    for stop in (0.5, 1.25):
        state, _, _ = batch.advance(state, stack_pytrees(params), solver, stop)
    for index, single in enumerate(singles):
        np.testing.assert_allclose(np.asarray(state.fields[index]), single, rtol=1e-13, atol=1e-15)
    assert batch.trace_count == 1
    assert not np.allclose(singles[0], singles[1])


def test_merging_needs_strang():
    with pytest.raises(ConfigError, match="solver.merge_reactions"):
        Integrator(FisherKPP(Grid((8, 1, 1), 1.0)), 1, merge_reactions=True)


def test_a_step_runs_the_sub_solvers_its_splitting_and_operators_call_for():
    grid = Grid((8, 4, 4), 20.0)
    # One operator: splitting is exact, so Strang runs it once per step, as Lie does
    # (the DD3 benchmark counts its stencil stages from this sequence).
    explicit = DiffusionDecay(grid, path="explicit")
    assert SplitStepper(explicit, 2).step_kinds == SplitStepper(explicit, 1).step_kinds == (1,)
    # Reactions (0) and transport (1): Lie R C; Strang halves of each around the middle.
    fisher = FisherKPP(grid, path="explicit")
    assert SplitStepper(fisher, 1).step_kinds == (0, 1)
    assert SplitStepper(fisher, 2).step_kinds == (0, 1, 1, 0)


def test_one_compile_per_configuration():
    """A second chunk and new numbers (D, λ, dt cap, stop time) reuse the compiled loop."""
    grid = Grid((8, 8, 8), 20.0)
    model = DiffusionDecay(grid, path="explicit")
    integrator = Integrator(model)
    state = initial_state(model, np.ones((1, 1, 8, 8, 8)))
    state, _, _ = integrator.advance(state, diffusion_decay_params(100.0, 0.1), make_solver_params(0.1), 0.5)
    state, _, _ = integrator.advance(state, diffusion_decay_params(100.0, 0.1), make_solver_params(0.1), 1.0)
    state, _, _ = integrator.advance(state, diffusion_decay_params(250.0, 0.3, 2.0), make_solver_params(0.05), 1.7)
    assert integrator.trace_count == 1
    assert float(state.time) == pytest.approx(1.7, rel=1e-7)


def test_output_times_hit_exactly():
    """The stop time is reached exactly, also when it is not a multiple of dt."""
    grid = Grid((4, 4, 4), 20.0)
    model = DiffusionDecay(grid)
    integrator = Integrator(model)
    state = initial_state(model, np.ones((1, 1, 4, 4, 4)))
    for t_end in (0.37, 1.0, 2.3333333):
        state, _, _ = integrator.advance(state, diffusion_decay_params(10.0, 0.0), make_solver_params(0.1), t_end)
        assert float(state.time) == np.float32(t_end)


@pytest.mark.parametrize(
    "make, key, fragment",
    [
        (lambda: Grid((0, 4, 4)), "grid.shape[0]", "positive integer"),
        (lambda: Grid((8, -2, 4)), "grid.shape[1]", "positive integer"),
        (lambda: Grid((8, 8, 8), spacing_um=0.0), "grid.spacing_um", "> 0"),
        (lambda: Grid((8, 8, 8), spacing_um=float("nan")), "grid.spacing_um", "finite"),
        (lambda: diffusion_decay_params(-1.0, 0.1), "diffusivity", ">= 0"),
        (lambda: diffusion_decay_params(1.0, -0.1), "decay", ">= 0"),
        (lambda: diffusion_decay_params(float("nan"), 0.1), "diffusivity", "finite"),
        (lambda: make_solver_params(0.0), "solver.dt_max", "> 0"),
        (lambda: make_solver_params(-0.1), "solver.dt_max", "> 0"),
        (lambda: make_solver_params(0.1, safety=2.0), "solver.safety", "[1e-06, 1]"),
    ],
)
def test_bad_input_names_the_argument_value_and_expectation(make, key, fragment):
    with pytest.raises(ConfigError) as caught:
        make()
    message = str(caught.value)
    assert message.startswith(key) and fragment in message and "\n" not in message
    assert "got" in message


class _StepFromFields(FisherKPP):
    """Fisher–KPP whose stable step depends on the fields (as the TME's transport speed does):
    a NaN field makes dt, and so the time, NaN."""

    def stable_dt(self, state, params):
        return 0.1 / (1.0 + jnp.max(state.fields))


@pytest.mark.parametrize("merge_reactions", [False, True])
def test_a_nan_state_ends_the_interval_after_one_step(merge_reactions):
    """A NaN time must stop the loop (the host then raises), not step on to max_steps."""
    model = _StepFromFields(Grid((8, 1, 1), 1.0), path="explicit")
    state = initial_state(model, np.full((1, 1, 8, 1, 1), np.nan))
    integrator = Integrator(model, 2, merge_reactions)
    solver = make_solver_params(0.05, max_steps=1000)
    _, _, diagnostics = integrator.advance(state, fisher_kpp_params(1.0, 1.0), solver, 1.0)
    assert int(diagnostics["steps"]) == 1
    assert not bool(diagnostics["finite"])


def test_merged_reactions_at_the_step_budget_and_over_a_zero_length_interval(x64):
    """When max_steps cuts an interval short the closing pass still pays the owed half
    (the state is a complete step, close to plain Strang's), and an interval of length
    zero changes nothing."""
    grid = Grid((64, 1, 1), 0.25)
    x = grid.axis_coordinates(0)
    u0 = ablowitz_zeppetella(x, 0.0, 1.0, 1.0, shift=8.0)[None, None, :, None, None]
    model = FisherKPP(grid, path="spectral")
    params = fisher_kpp_params(1.0, 1.0, dtype=jnp.float64)
    solver = make_solver_params(0.05, max_steps=3, dtype=jnp.float64)
    results = {}
    for merge in (False, True):
        state = initial_state(model, u0, dtype=jnp.float64)
        state, _, diagnostics = Integrator(model, 2, merge).advance(state, params, solver, 10.0)
        assert int(diagnostics["steps"]) == 3
        assert float(state.time) == pytest.approx(0.15, rel=1e-12)
        results[merge] = np.asarray(state.fields)
    # Without the owed half the merged state would be R(dt/2) short: ~dt/2·r·u(1−u) ≈ 6e-3 off.
    assert relative_l2(results[True], results[False]) < 1e-5
    integrator = Integrator(model, 2, merge_reactions=True)
    state = initial_state(model, u0, dtype=jnp.float64)
    before = np.asarray(state.fields)
    state, _, diagnostics = integrator.advance(state, params, solver, 0.0)
    assert int(diagnostics["steps"]) == 0
    np.testing.assert_array_equal(np.asarray(state.fields), before)


def test_divergence_takes_all_faces_and_conserves_with_closed_walls():
    """The divergence reads the fluxes at all n + 1 faces of each axis (walls included):
    interior faces alone are refused with the counts named, and with zero wall fluxes
    the net change sums to zero (what leaves one cell enters its neighbour)."""
    from tmesolve.operators import divergence, upwind_flux

    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.uniform(0.0, 1.0, (2, 6, 5, 4)))
    velocities = [jnp.asarray(rng.normal(size=(2, 5, 5, 4))), jnp.asarray(rng.normal(size=(2, 6, 4, 4))),
                  jnp.asarray(rng.normal(size=(2, 6, 5, 3)))]
    faces = [upwind_flux(u, velocities[axis], axis) for axis in range(3)]
    assert [f.shape for f in faces] == [(2, 7, 5, 4), (2, 6, 6, 4), (2, 6, 5, 5)]
    change = divergence(faces, 20.0, shape_like=u)
    assert abs(float(jnp.sum(change))) < 1e-5 * float(jnp.sum(jnp.abs(change)))
    with pytest.raises(ValueError, match="axis 0 has 5 faces; expected all 7"):
        divergence([faces[0][:, 1:-1]] + faces[1:], 20.0, shape_like=u)
