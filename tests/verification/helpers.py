"""Small helpers shared by the verification tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tmesolve.integrate import Integrator, initial_state, make_solver_params


def run_to(model, params, initial: np.ndarray, t_end: float, dt_max: float, dtype, splitting_order: int = 2,
           safety: float = 0.9, merge_reactions: bool = False):
    """Advance ``initial`` (lesions, nx, ny, nz) or (nx, ny, nz) to ``t_end``; returns (fields, diagnostics)."""
    initial = np.asarray(initial)
    if initial.ndim == 3:
        initial = initial[None, None]
    elif initial.ndim == 4:
        initial = initial[None]
    integrator = Integrator(model, splitting_order, merge_reactions)
    state = initial_state(model, initial, dtype=dtype)
    solver = make_solver_params(dt_max, safety=safety, dtype=dtype)
    state, _, diagnostics = integrator.advance(state, params, solver, t_end)
    return np.asarray(state.fields), diagnostics


def relative_l2(approximation: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(np.ravel(approximation) - np.ravel(exact)) / np.linalg.norm(np.ravel(exact)))


def log_log_slope(sizes, errors) -> float:
    """Least-squares slope of log(error) against log(size): the measured order."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(errors, float)), 1)[0])


DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
