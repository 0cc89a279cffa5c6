"""Oxygen in 3-D: solved with its diffusion, it sits on its quasi-steady profile at any step.

Oxygen's uptake in a packed tumour is 10²–10⁴ h⁻¹, its diffusion length
√(D_O/Λ) one to three 50 µm voxels. Split from its diffusion (as until this
check was written) each reaction sub-step drove O to its local equilibrium
P/Λ: at the default 0.5 h cap the default lesion had 237 hypoxic voxels
after 12 h where a 0.005 h run had none (python -m benchmarks.dt_convergence).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, fresh_copy, make_solver_params
from tmesolve.model.tme_setup import LesionSpec, setup_tme

RUN_H = 6.0


def test_oxygen_is_quasi_steady_and_independent_of_the_step():
    """12³ voxels of 50 µm, an inflamed lesion of radius 200 µm, 6 h at dt_max 0.5 h and
    0.02 h (one compile: dt is a number). Oxygen agrees between the two to 0.5 % in
    the tumour, hypoxia and necrosis agree, and at the coarse step oxygen
    satisfies its own steady equation D_OΔ_hO + f(O) = 0 to within 2 % of the
    uptake it balances (its rate of change is set by the cells, days)."""
    grid = Grid((12, 12, 12), 50.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=200.0)], therapy="pembrolizumab", duration_h=24.0)
    model, params = setup.model, setup.params
    integrator = Integrator(model)
    finals = {}
    for dt_max in (0.5, 0.02):
        start = fresh_copy(setup.state)  # advance donates
        state, _, diagnostics = integrator.advance(start, params, make_solver_params(dt_max), RUN_H)
        assert bool(diagnostics["finite"])
        finals[dt_max] = state
    assert integrator.trace_count == 1

    coarse, fine = (np.asarray(finals[dt].fields, np.float64) for dt in (0.5, 0.02))
    oxygen, necrotic = model.index("oxygen"), model.index("necrotic_debris")
    tumour = coarse[model.index("tumour_cells")] > 0.1 * float(params.model["K_max"])
    assert tumour.sum() > 50
    mean_coarse, mean_fine = coarse[oxygen][tumour].mean(), fine[oxygen][tumour].mean()
    assert abs(mean_coarse / mean_fine - 1.0) < 5e-3, (mean_coarse, mean_fine)
    assert np.max(np.abs(coarse[oxygen] - fine[oxygen])) < 0.5   # mmHg, of ~10-38
    assert (coarse[oxygen] < 2.5).sum() == (fine[oxygen] < 2.5).sum()
    assert abs(coarse[necrotic].sum() / fine[necrotic].sum() - 1.0) < 0.05

    rate, _, _ = model.oxygen_rate(finals[0.5].fields, params)
    u = {name: coarse[model.index(name)] for name in ("tumour_cells", "effector_t_cells", "exhausted_t_cells")}
    p = params.model
    uptake = (float(p["u_C"]) * u["tumour_cells"]
              + float(p["u_T"]) * (u["effector_t_cells"] + u["exhausted_t_cells"])) \
        * coarse[oxygen] / (coarse[oxygen] + float(p["K_Ou"]))
    assert np.max(np.abs(np.asarray(rate, np.float64))) < 0.02 * np.max(uptake), \
        (np.max(np.abs(np.asarray(rate))), np.max(uptake))


def test_oxygen_reaction_stage_of_length_zero_is_the_identity():
    grid = Grid((6, 6, 6), 50.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=100.0)], duration_h=24.0)
    after = setup.model.react(setup.state, setup.params, jnp.asarray(0.0, jnp.float32))
    index = setup.model.index("oxygen")
    np.testing.assert_array_equal(np.asarray(after.fields[index]), np.asarray(setup.state.fields[index]))
