"""The TME model's idle pass: a step of length zero is the identity on the fields and measures the speed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve._pytree import replace
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, fresh_copy, make_solver_params
from tmesolve.model.tme_setup import LesionSpec, setup_tme


def test_zero_step_keeps_every_field_bit_for_bit_and_records_the_transport_speed():
    """With merged reactions each compiled interval closes with this pass (it pays
    the owed reaction half, and every other sub-solver runs a zero step): it must
    not move anything but what it pays, and transport still records the face speed
    of the state it is given (here one edited on the host, with a stale speed)."""
    grid = Grid((10, 10, 10), 20.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=60.0), LesionSpec("excluded", radius_um=60.0)],
                      therapy="pembrolizumab", duration_h=24.0)
    model, params = setup.model, setup.params
    integrator = Integrator(model)
    state, _, _ = integrator.advance(setup.state, params, make_solver_params(0.1), 2.0)
    # A host edit (e.g. an injected T-cell bolus) that makes the carried speed stale.
    index = model.index("effector_t_cells")
    edited_fields = state.fields.at[index, 0, 3:6, 3:6, 3:6].add(5e4)
    edited = replace(state, fields=edited_fields, aux=replace(state.aux, transport_speed=jnp.zeros((), jnp.float32)))
    idle_pass = jax.jit(lambda s, p: integrator.stepper.advance_pass(s, p, jnp.zeros((), jnp.float32),
                                                                    jnp.asarray(True))[0])
    after = idle_pass(edited, params)
    np.testing.assert_array_equal(np.asarray(after.fields), np.asarray(edited_fields))
    assert float(after.time) == float(edited.time) and int(after.step) == int(edited.step)
    expected_speed = model._transport_rates(edited_fields, params, edited.aux.systemic, edited.time)[1]
    np.testing.assert_allclose(float(after.aux.transport_speed), float(expected_speed), rtol=1e-6)
    assert float(after.aux.transport_speed) > 0.0
    # The systemic compartment is not moved either.
    for before_leaf, after_leaf in zip(jax.tree_util.tree_leaves(edited.aux.systemic),
                                       jax.tree_util.tree_leaves(after.aux.systemic)):
        np.testing.assert_array_equal(np.asarray(after_leaf), np.asarray(before_leaf))


def test_merged_reactions_run_the_tme_model_close_to_plain_strang():
    """The TME model takes the loop-over-switch path with merged durations: over six
    hours (steps ≤ 0.1 h) it stays finite, takes the same steps and stays within
    the scheme difference of plain Strang."""
    grid = Grid((8, 8, 8), 20.0)
    results, steps = {}, {}
    for merge in (False, True):
        setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=50.0)], therapy="pembrolizumab",
                          duration_h=24.0)
        state, _, diagnostics = Integrator(setup.model, 2, merge).advance(
            setup.state, setup.params, make_solver_params(0.1), 6.0)
        assert bool(diagnostics["finite"])
        results[merge], steps[merge] = np.asarray(state.fields), int(diagnostics["steps"])
    assert steps[True] == steps[False] > 0
    plain, merged = results[False], results[True]
    assert not np.array_equal(plain, merged)
    scale = np.max(np.abs(plain), axis=(1, 2, 3, 4), keepdims=True) + 1e-30
    difference = np.max(np.abs(merged - plain) / scale, axis=(1, 2, 3, 4))
    assert np.max(difference) < 1e-2, dict(zip(setup.model.names, difference))


def test_each_interval_measures_the_speed_of_its_start_state_single_and_batched():
    """setup_tme leaves transport_speed at 0; a single run opens each interval with a
    zero-length transport pass and a batch calls begin_interval: both must take the
    steps the measured speed allows, the same as from a state whose speed was measured."""
    from tmesolve.integrate import BatchIntegrator, stack_pytrees

    grid = Grid((8, 8, 8), 20.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=50.0)], therapy="pembrolizumab", duration_h=24.0)
    assert float(setup.state.aux.transport_speed) == 0.0
    solver = make_solver_params(0.5)   # above the transport limit: the speed sets dt
    measured = setup.model.begin_interval(setup.state, setup.params)
    results = {}
    for name, start in (("stale", setup.state), ("measured", measured)):
        state = fresh_copy(start)
        state, _, diagnostics = Integrator(setup.model).advance(state, setup.params, solver, 2.0)
        results[name] = (np.asarray(state.fields), int(diagnostics["steps"]))
    batch = BatchIntegrator(setup.model)
    state, _, diagnostics = batch.advance(stack_pytrees([setup.state]), stack_pytrees([setup.params]), solver, 2.0)
    results["batched"] = (np.asarray(state.fields[0]), int(diagnostics["steps"][0]))
    reference_fields, reference_steps = results["measured"]
    # Without the measurement the first step would take the diffusion limit alone.
    unmeasured_limit = float(setup.model.stable_dt(setup.state, setup.params))
    assert reference_steps > 2.0 / (0.9 * unmeasured_limit)
    for name in ("stale", "batched"):
        fields, steps = results[name]
        assert steps == reference_steps, name
        scale = np.max(np.abs(reference_fields), axis=(1, 2, 3, 4), keepdims=True) + 1e-30
        assert np.max(np.abs(fields - reference_fields) / scale) < 1e-5, name
