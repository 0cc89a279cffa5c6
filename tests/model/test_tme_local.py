"""The TME model's local terms against the plain reference, and the well-mixed limit."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from well_mixed import well_mixed_errors

from tmesolve._pytree import replace
from tmesolve.grid import Grid
from tmesolve.model import tme_reference
from tmesolve.model.systemic import plasma_concentration, steroid_effector_factor
from tmesolve.model.tme import SPECIES
from tmesolve.model.tme_setup import LesionSpec, setup_tme

SYMBOLS = [s.symbol for s in SPECIES]


def random_state(rng, shape, K_max=4e5):
    cells = rng.dirichlet(np.ones(5), size=shape) * K_max * rng.uniform(0.8, 1.0, size=shape + (1,))
    u = {s: cells[..., i] for i, s in enumerate(("C", "N", "T", "E", "H"))}
    u["O"] = rng.uniform(0.0, 40.0, shape)
    for s in ("G", "X", "L", "B"):
        u[s] = rng.exponential(0.5, shape)
    for s in ("A1", "A2"):
        u[s] = rng.exponential(5.0, shape)
    for s in ("P", "V", "S", "a"):
        u[s] = rng.uniform(0.0, 1.0, shape)
    return u


@pytest.mark.parametrize("therapy", ["none", "pembrolizumab"])
def test_fused_local_terms_equal_the_plain_reference(x64, therapy):
    """P − Λu of the compiled model equals the term-by-term reference to round-off (float64)."""
    grid = Grid((6, 5, 4), 20.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=30.0), LesionSpec("desert", radius_um=30.0)],
                      therapy=therapy, dtype=jnp.float64, parameters={"k_S": 0.01})
    model, params = setup.model, setup.params
    systemic = setup.state.aux.systemic
    rng = np.random.default_rng(3)
    u = random_state(rng, (2, *grid.shape))
    production, loss, extras = model.local_terms({k: jnp.asarray(v) for k, v in u.items()}, params, systemic,
                                                 jnp.asarray(0.0))
    p = {k: np.asarray(v) for k, v in params.model.values.items()}
    for symbol in ("r_C", "TMB", "f_spec", "p_X0", "p_B", "p_BS", "P_0", "P_max", "k_S"):
        p[symbol] = p[symbol][:, None, None, None]
    p["k_S"] = float(p["k_S"].max())
    plasma = np.asarray(plasma_concentration(systemic, params.schedule.pk))
    reference = tme_reference.local_rates(u, p, float(systemic.T_b), plasma,
                                          steroid_factor=float(steroid_effector_factor(systemic, params.model)))
    for symbol in SYMBOLS:   # a field without a term is absent from the dicts
        made, lost = production.get(symbol, 0.0), loss.get(symbol, 0.0)
        fused = np.asarray(made - lost * u[symbol])
        scale = np.max(np.abs(reference[symbol])) + 1e-300
        np.testing.assert_allclose(fused, reference[symbol], rtol=1e-10, atol=1e-12 * scale, err_msg=symbol)
        assert np.all(np.asarray(made) >= 0) and np.all(np.asarray(lost) >= 0), symbol
    np.testing.assert_allclose(np.asarray(extras["killing"]), reference["_killing"], rtol=1e-12)

    # Oxygen's local terms as react uses them (with its diffusion, not through
    # reaction_terms, which leaves oxygen out), against the same reference, and their
    # derivative against a central difference.
    fields = jnp.stack([jnp.asarray(u[s.symbol]) for s in model.species])
    oxygen_local, derivative = model.oxygen_local_terms(fields, params)
    scale = np.max(np.abs(reference["O"]))
    np.testing.assert_allclose(np.asarray(oxygen_local), reference["O"], rtol=1e-10, atol=1e-12 * scale)
    oxygen = model.index("oxygen")
    production_in_reactions, loss_in_reactions, _ = model.reaction_terms(fields, params, systemic, jnp.asarray(0.0))
    assert not np.any(np.asarray(production_in_reactions[oxygen])) and not np.any(np.asarray(loss_in_reactions[oxygen]))
    step = 1e-6 * (1.0 + np.abs(u["O"]))
    shifted = [model.oxygen_local_terms(fields.at[oxygen].add(sign * step), params)[0] for sign in (1.0, -1.0)]
    difference = (np.asarray(shifted[0]) - np.asarray(shifted[1])) / (2.0 * step)
    np.testing.assert_allclose(np.asarray(derivative), difference, rtol=1e-6)


def test_the_reaction_step_skips_exactly_the_fields_without_local_terms(x64):
    """react() updates the fields with a local term (after the propagator and oxygen's
    solve have taken theirs) and returns the others bit for bit; a model that gives a
    field a term makes it react, with no other change."""
    grid = Grid((6, 5, 4), 20.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=30.0), LesionSpec("excluded", radius_um=30.0)],
                      therapy="pembrolizumab", dtype=jnp.float64, parameters={"k_S": 0.01})
    model, params = setup.model, setup.params
    systemic = setup.state.aux.systemic
    rng = np.random.default_rng(11)
    u = {k: jnp.asarray(v) for k, v in random_state(rng, (2, *grid.shape)).items()}
    time = jnp.asarray(0.0)
    full_production, full_loss, _ = model.local_terms(u, params, systemic, time)
    # Host tissue, vessels and antigenicity change only by transport; the cytokines
    # made in the propagator have no local loss.
    assert set(SYMBOLS) - set(full_production) == {"H", "V", "a"}
    assert set(SYMBOLS) - set(full_loss) == {"H", "G", "X", "B", "V", "a"}

    production, loss, _ = model._reacting_terms(u, params, systemic, time)
    reacting = model.reacting_symbols(production, loss)
    assert reacting == ("L", "A1", "A2", "C", "N", "T", "E", "S", "P")
    for symbol in reacting:   # every one has a term that is not zero here (k_S > 0 for the stroma)
        assert np.any(np.asarray(production.get(symbol, 0.0))) or np.any(np.asarray(loss.get(symbol, 0.0))), symbol
    # The propagator's species have no production here; IL-2 takes its decay here.
    assert not set(production) & set(model._produced_in_propagator())
    np.testing.assert_array_equal(np.asarray(production["L"]), np.asarray(full_production["L"]))
    np.testing.assert_allclose(np.asarray(loss["L"]), np.asarray(full_loss["L"] + params.model["lambda_L"]),
                               rtol=1e-15)
    for symbol in ("C", "N", "T", "E", "S", "P", "A1", "A2"):
        np.testing.assert_array_equal(np.asarray(loss[symbol]), np.asarray(full_loss[symbol]), err_msg=symbol)
        if symbol in production:
            np.testing.assert_array_equal(np.asarray(production[symbol]), np.asarray(full_production[symbol]),
                                          err_msg=symbol)

    fields = jnp.stack([u[s.symbol] for s in model.species])
    state = replace(setup.state, fields=fields)

    def changed(model_to_step):
        stepped = model_to_step.react(state, params, jnp.asarray(0.5)).fields
        return {symbol for index, symbol in enumerate(model.species_symbols())
                if not np.array_equal(np.asarray(stepped[index]), np.asarray(fields[index]))}

    assert changed(model) == set(reacting) | {"O"}

    class GrowingVessels(type(model)):
        """Vessels made in proportion to tumour cells: a local term the base model lacks."""

        def local_terms(self, u, params, systemic, time):
            production, loss, extras = super().local_terms(u, params, systemic, time)
            return {**production, "V": 1e-3 * u["C"] / params.model["K_max"]}, loss, extras

    growing = copy.copy(model)
    growing.__class__ = GrowingVessels
    assert changed(growing) == set(reacting) | {"O", "V"}


@pytest.mark.parametrize("therapy", ["none", "nivolumab_ipilimumab", "atezolizumab"])
def test_each_local_term_is_taken_once_across_the_sub_steps(x64, therapy):
    """The local sub-step's P − Λu plus the propagator's source and decay (and, for
    oxygen, react's own rate) add up to MODEL.md's full local rate of every field:
    no term is dropped or counted twice when terms move between sub-steps."""
    from tmesolve.model.tme import FAST, LINEAR_DECAYS

    grid = Grid((6, 5, 4), 20.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=30.0), LesionSpec("desert", radius_um=30.0)],
                      therapy=therapy, dtype=jnp.float64, parameters={"k_S": 0.01})
    model, params = setup.model, setup.params
    rng = np.random.default_rng(5)
    u = {k: jnp.asarray(v) for k, v in random_state(rng, (2, *grid.shape)).items()}
    fields = jnp.stack([u[s.symbol] for s in model.species])
    # A day in, with the regimen's first doses given: every drug is in plasma.
    state = model.apply_events(replace(setup.state, fields=fields), params, jnp.asarray(24.0), jnp.asarray(24.5))
    systemic = state.aux.systemic
    full_production, full_loss, _ = model.local_terms(u, params, systemic, state.time)
    production, loss, _ = model.reaction_terms(fields, params, systemic, state.time)
    sources = model.linear_sources(state, params)
    _, decays = model.linear_coefficients(params)
    oxygen_local, _ = model.oxygen_local_terms(fields, params)
    for index, symbol in enumerate(model.species_symbols()):
        expected = np.asarray(full_production.get(symbol, 0.0) - full_loss.get(symbol, 0.0) * u[symbol])
        if symbol in LINEAR_DECAYS:   # MODEL.md's constant decay of the fast species
            expected = expected - float(params.model[LINEAR_DECAYS[symbol]]) * np.asarray(u[symbol])
        taken = np.asarray(production[index] - loss[index] * u[symbol])
        if symbol in FAST:
            fast = FAST.index(symbol)
            taken = taken + np.asarray(sources[fast]) - float(decays[fast]) * np.asarray(u[symbol])
        if symbol == "O":
            taken = taken + np.asarray(oxygen_local)
        scale = np.max(np.abs(expected)) + 1e-300
        np.testing.assert_allclose(taken, expected, rtol=1e-12, atol=1e-13 * scale, err_msg=symbol)
    assert float(np.max(np.asarray(sources[FAST.index("A1")]))) > 0 or therapy != "nivolumab_ipilimumab"
    assert float(np.max(np.asarray(sources[FAST.index("A2")]))) > 0 or therapy != "atezolizumab"


def test_well_mixed_limit_matches_solve_ivp(x64):
    """Uniform fields, no-flux walls, tissue velocity off: the PDE is the ODE of its local terms.

    At dt = 0.0025 h the error after 30 days is ≤ 1e-6 relative in every field
    and T_b (solve_ivp: Radau, rtol 1e-11), and the scheme converges at second
    order: over 10 days, halving dt from 0.00125 h divides the error by more than
    2.8 (``python tests/model/well_mixed.py`` prints the series from dt = 0.04 h
    down, quoted in docs/model.md).
    """
    _, errors = well_mixed_errors((0.0025,))
    assert np.max(errors[0.0025]) <= 1e-6, np.max(errors[0.0025])
    # Oxygen is stiff (uptake ~10²–10³ h⁻¹) and solved by ROS2, L-stable and second
    # order, whose error per step is largest while oxygen's rate times dt is near one:
    # the ratio per halving rises 2.0, 2.1, 2.2, 2.4, 2.7, 3.1 from dt = 0.04 h to
    # 0.000625 h, towards 4. A first-order scheme stays at or below 2.
    _, errors = well_mixed_errors((0.00125, 0.000625), t_end_h=10 * 24.0)
    error_coarse, error_fine = errors[0.00125], errors[0.000625]
    resolved = error_coarse > 1e-8  # below that the solve_ivp reference's own error shows
    assert np.all(error_coarse[resolved] / error_fine[resolved] > 2.8), error_coarse / error_fine


def test_cytokines_in_a_hot_core_at_the_cohort_step(x64):
    """Uniform hot tissue (T = 3e4 cells/mm³: IL-2 uptake ~6 h⁻¹) at the cohort app's
    1 h step cap: after 6 h every cytokine is within 1–3 % of solve_ivp.

    Measured: IFN-γ 1.6e-2, IL-2 3.9e-3, CXCL9/10 3.3e-3, TGF-β 4e-5; the
    limits leave 2–25× of room. With IL-2's production in the spectral step,
    split from its stiff uptake in the local one, IL-2 was 61 % low
    (``python -m benchmarks.cytokine_sources``, scheme ``il2_too``).
    """
    names, errors = well_mixed_errors((1.0,), t_end_h=6.0)
    limits = {"ifn_gamma": 0.03, "cxcl9_10": 0.01, "il2": 0.01, "tgf_beta": 1e-3}
    for name, limit in limits.items():
        assert errors[1.0][names.index(name)] < limit, (name, errors[1.0][names.index(name)])


def test_compressed_stroma_stops_t_cells_and_keeps_them_non_negative():
    """Stroma carried above S = 1/s_m by converging tissue must not make the motility
    factor negative: with μ < 0 the Itô flux −∇(μu) ran uphill and exhausted T cells
    beside such a voxel went negative (then grew without bound with T). One transport
    step at the stable dt from a state with S = 1.5 next to a near-empty voxel keeps
    every T-cell density non-negative."""
    grid = Grid((6, 6, 6), 80.0)
    setup = setup_tme(grid, [LesionSpec("excluded", radius_um=150.0)], seed=3)
    model, params = setup.model, setup.params
    fields = np.array(setup.state.fields)
    S, T, E = (model.index(name) for name in ("stroma", "effector_t_cells", "exhausted_t_cells"))
    fields[S, 0, 3, 3, 3] = 1.5                 # compressed stroma, above 1/s_m = 1.11
    fields[E, 0, 3, 3, 3] = fields[T, 0, 3, 3, 3] = 1500.0
    fields[E, 0, 3, 3, 2] = fields[T, 0, 3, 3, 2] = 0.4  # a near-empty neighbour
    u = model._unstack(jnp.asarray(fields))
    motility = np.asarray(model._motility(u, params.model))
    assert motility.min() >= 0.0 and motility[0, 3, 3, 3] == 0.0
    state = model.begin_interval(replace(setup.state, fields=jnp.asarray(fields)), params)
    dt = model.stable_dt(state, params)
    moved = np.asarray(model.transport(state, params, dt).fields)
    assert moved[E].min() >= 0.0 and moved[T].min() >= 0.0


def test_hill_fraction_matches_the_power_form_and_its_limits(x64):
    """_hill(x, K, n) = xⁿ/(xⁿ + Kⁿ) to round-off, with its limits at 0 and for large n."""
    from tmesolve.model.tme import _hill

    rng = np.random.default_rng(2)
    x, half, n = rng.uniform(0.0, 5.0, 1000), rng.uniform(0.1, 5.0, 1000), rng.uniform(0.1, 20.0, 1000)
    expected = x**n / (x**n + half**n)
    np.testing.assert_allclose(np.asarray(_hill(jnp.asarray(x), jnp.asarray(half), jnp.asarray(n))), expected,
                               rtol=1e-12, atol=1e-300)
    limits = _hill(jnp.asarray([0.0, -1e-30, 2.0, 1.0, 1e3]), jnp.asarray([1.0, 1.0, 0.0, 1.0, 1e-3]),
                   jnp.asarray([2.0, 2.5, 4.0, 3.0, 20.0]))
    np.testing.assert_array_equal(np.asarray(limits), [0.0, 0.0, 1.0, 0.5, 1.0])
    # In float32 exp(20 ln 10⁶) overflows to ∞: the fraction is 0, not NaN.
    f32 = [jnp.asarray(value, jnp.float32) for value in (1e-3, 1e3, 20.0)]
    assert float(_hill(*f32)) == 0.0
