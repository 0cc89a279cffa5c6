"""The TME model's local terms against the plain reference, and the well-mixed limit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, make_solver_params
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
    for symbol in SYMBOLS:
        fused = np.asarray(production[symbol] - loss[symbol] * u[symbol])
        scale = np.max(np.abs(reference[symbol])) + 1e-300
        np.testing.assert_allclose(fused, reference[symbol], rtol=1e-10, atol=1e-12 * scale, err_msg=symbol)
        assert np.all(np.asarray(production[symbol]) >= 0) and np.all(np.asarray(loss[symbol]) >= 0), symbol
    np.testing.assert_allclose(np.asarray(extras["killing"]), reference["_killing"], rtol=1e-12)


def _systemic_rhs(y, p, n_transit, tmb_factor, antigen_flux, extravasation):
    """MODEL.md's systemic ODEs without drugs: Ag_LN, transit chain, T_b, M (reference form)."""
    antigen, chain, blood, memory = y[0], y[1:1 + n_transit], y[1 + n_transit], y[2 + n_transit]
    k = n_transit / p["tau_pr"]
    priming = p["k_pr"] * antigen / (antigen + p["K_Ag"]) * tmb_factor
    d_chain = np.empty(n_transit)
    d_chain[0] = priming - k * chain[0]
    d_chain[1:] = k * (chain[:-1] - chain[1:])
    delayed = k * chain[-1]
    recall = p["g_rc"] * p["k_rc"] * memory * antigen / (antigen + p["K_rc"])
    d_blood = (1 - p["f_M"]) * delayed + recall - p["delta_b"] * blood - extravasation / p["V_blood"]
    d_memory = p["f_M"] * delayed * (1 - memory / p["M_max"]) - p["delta_M"] * memory
    return np.concatenate([[antigen_flux - p["delta_Ag"] * antigen], d_chain, [d_blood, d_memory]])


def test_well_mixed_limit_matches_solve_ivp(x64):
    """Uniform fields, no-flux walls, tissue velocity off: the PDE is the ODE of its local terms.

    At dt = 0.0025 h the error after 30 days is ≤ 1e-6 relative in every field
    and T_b (solve_ivp: Radau, rtol 1e-11), and halving dt divides it by more
    than 3 (second order, reached once oxygen's uptake rate times dt falls
    below about one; measured: 1.9e-5, 8.3e-6, 3.2e-6, 1.0e-6, 2.9e-7 at
    dt = 0.04 … 0.0025 h, ratios 2.3, 2.6, 3.1, 3.5).
    """
    grid = Grid((2, 2, 1), 400.0)  # 0.8 mm × 0.8 mm × 0.4 mm of uniform tissue
    lesion = LesionSpec("inflamed", radius_um=150.0, represented_diameter_mm=None)
    setup = setup_tme(Grid((8, 8, 1), 100.0), [lesion], dtype=jnp.float64, tissue_velocity=False)
    params = setup.params
    centre = np.array(setup.state.fields)[:, :, 4, 4, 0]        # a packed tumour voxel
    centre[setup.model.index("effector_t_cells")] = 3.0e4     # an immune infiltrate from the start
    model = type(setup.model)(grid, lesions=1, tissue_velocity=False)
    box_mm3 = grid.num_voxels * grid.voxel_volume_mm3
    from tmesolve.integrate import initial_state
    fields = np.broadcast_to(centre[:, :, None, None, None], (len(SPECIES), 1, *grid.shape)).copy()
    state = initial_state(model, fields, aux=setup.state.aux, dtype=jnp.float64)
    # volume_scale 1: the box is the whole (uniform) lesion.
    params = type(params)(model=params.model, schedule=params.schedule, volume_scale=jnp.ones(1),
                          baseline_burden=params.baseline_burden, baseline_diameter_mm=params.baseline_diameter_mm,
                          host_vessels=params.host_vessels)
    t_end = 30 * 24.0
    integrator = Integrator(model)
    runs = {}
    for dt in (0.005, 0.0025):
        start = jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, copy=True), state)
        final, _, _ = integrator.advance(start, params, make_solver_params(dt, dtype=jnp.float64), t_end)
        runs[dt] = final

    p = {k: float(np.ravel(np.asarray(v))[0]) for k, v in params.model.values.items()}
    names = [s.name for s in model.species]
    symbol_of = {s.name: s.symbol for s in SPECIES}
    decay = {"G": p["lambda_G"], "X": p["lambda_X"], "L": p["lambda_L"], "B": p["lambda_B"],
             "A1": p["lambda_A"], "A2": p["lambda_A"]}
    systemic = setup.state.aux.systemic
    n_transit = int(np.asarray(systemic.transit).shape[0])
    tmb_factor = 1 - np.exp(-p["TMB"] / p["TMB_0"])

    def rhs(_, y):
        u = {symbol_of[name]: np.asarray(y[i]) for i, name in enumerate(names)}
        blood = y[len(names) + 1 + n_transit]
        rates = tme_reference.local_rates(u, p, blood, np.zeros(3))
        du = [rates[symbol_of[name]] - decay.get(symbol_of[name], 0.0) * u[symbol_of[name]] for name in names]
        antigen_flux = (rates["_killing"] + p["s_sh"] * u["a"] * u["C"]) * box_mm3
        # volume_scale = 1: the lesion and host parts of the box both count once.
        extravasation = rates["_extravasation"] * box_mm3
        return np.concatenate([np.ravel(du), _systemic_rhs(y[len(names):], p, n_transit, tmb_factor,
                                                             antigen_flux, extravasation)])

    y0 = np.concatenate([centre[:, 0], [float(systemic.antigen_ln)], np.asarray(systemic.transit),
                         [float(systemic.T_b), float(systemic.M)]])
    solution = solve_ivp(rhs, (0.0, t_end), y0, method="Radau", rtol=1e-11, atol=1e-12)
    assert solution.success
    expected = np.concatenate([solution.y[:len(names), -1], [solution.y[len(names) + 1 + n_transit, -1]]])

    def values(final):
        fields = np.asarray(final.fields)
        assert np.allclose(fields, fields[:, :, :1, :1, :1])  # still uniform
        return np.concatenate([fields[:, 0, 0, 0, 0], [float(final.aux.systemic.T_b)]])

    coarse, fine = values(runs[0.005]), values(runs[0.0025])
    floor = np.array([1e-9 * p["K_max"] if symbol_of[n] in ("C", "N", "T", "E", "H") else 1e-9 for n in names] + [1e-9])
    scale = np.maximum(np.abs(expected), floor)
    error_coarse, error_fine = np.abs(coarse - expected) / scale, np.abs(fine - expected) / scale
    # Converging at close to second order. Oxygen is stiff (uptake ~10² h⁻¹): while
    # its rate times dt is above one, its predictor lags its slow manifold by O(dt)
    # and everything fed by it (necrosis, killing, antigen, T_b) converges at order
    # one; below it the order is two. A first-order scheme would give a ratio of 2.
    resolved = error_coarse > 1e-8  # below that the solve_ivp reference's own error shows
    assert np.all(error_coarse[resolved] / error_fine[resolved] > 3.0), error_coarse / error_fine
    assert np.max(error_fine) <= 1e-6, np.max(error_fine)
