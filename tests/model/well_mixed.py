"""The well-mixed limit of the TME model against scipy's ``solve_ivp`` (used by test_tme_local).

Uniform fields, no-flux walls, tissue velocity off: the PDE is the ODE of its
local terms plus the systemic compartment, integrated by Radau (rtol 1e-11).
Run it to print the convergence series quoted in docs/model.md:

    python tests/model/well_mixed.py 0.04 0.02 0.01 0.005 0.0025 0.00125 0.000625
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, fresh_copy, make_solver_params
from tmesolve.model import tme_reference
from tmesolve.model.tme import SPECIES
from tmesolve.model.tme_setup import setup_uniform_tissue

T_END_H = 30 * 24.0


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


def well_mixed_errors(dts, t_end_h: float = T_END_H) -> tuple[list[str], dict[float, np.ndarray]]:
    """Relative error after ``t_end_h`` (default 30 days) of every field and T_b, per dt (needs jax_enable_x64).

    Returns (names, {dt: errors}); errors are |run − solve_ivp| / max(|solve_ivp|, floor),
    with floors of 1e-9 K_max for the cell phases and 1e-9 for the rest.
    """
    grid = Grid((2, 2, 1), 400.0)  # 0.8 mm × 0.8 mm × 0.4 mm of uniform tissue
    # A packed tumour voxel with an immune infiltrate from the start; the box is the whole lesion.
    setup = setup_uniform_tissue(grid, fields={"effector_t_cells": 3.0e4}, dtype=jnp.float64)
    model, params, state = setup.model, setup.params, setup.state
    centre = np.array(state.fields)[:, :, 0, 0, 0]
    box_mm3 = grid.num_voxels * grid.voxel_volume_mm3
    integrator = Integrator(model)
    runs = {}
    for dt in dts:
        start = fresh_copy(state)
        final, _, _ = integrator.advance(start, params, make_solver_params(dt, dtype=jnp.float64), t_end_h)
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
    solution = solve_ivp(rhs, (0.0, t_end_h), y0, method="Radau", rtol=1e-11, atol=1e-12)
    if not solution.success:
        raise RuntimeError(f"solve_ivp failed: {solution.message}")
    expected = np.concatenate([solution.y[:len(names), -1], [solution.y[len(names) + 1 + n_transit, -1]]])
    floor = np.array([1e-9 * p["K_max"] if symbol_of[n] in ("C", "N", "T", "E", "H") else 1e-9 for n in names]
                     + [1e-9])
    scale = np.maximum(np.abs(expected), floor)

    errors = {}
    for dt, final in runs.items():
        fields = np.asarray(final.fields)
        if not np.allclose(fields, fields[:, :, :1, :1, :1]):
            raise AssertionError(f"dt = {dt}: the fields did not stay uniform")
        values = np.concatenate([fields[:, 0, 0, 0, 0], [float(final.aux.systemic.T_b)]])
        errors[dt] = np.abs(values - expected) / scale
    return names + ["T_b"], errors


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    steps = [float(arg) for arg in sys.argv[1:]] or [0.04, 0.02, 0.01, 0.005, 0.0025]
    labels, series = well_mixed_errors(steps)
    previous = None
    for dt in steps:
        worst = float(np.max(series[dt]))
        ratio = "" if previous is None else f"  ratio {previous / worst:.1f}"
        print(f"dt = {dt:g} h: max relative error {worst:.2e} ({labels[int(np.argmax(series[dt]))]}){ratio}")
        previous = worst
