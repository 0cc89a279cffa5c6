"""The stiff fast path (tmesolve.implicit): a diffusing substance consumed at rates far above 1/Δt.

StiffUptake is oxygen's equation, ∂u/∂t = DΔ_h u + s(x)(u_b − u) − q(x)u/(u + K),
with oxygen's numbers (D = 6e6 µm²/h, s = 435 h⁻¹ in vessel voxels, q = 3e4
mmHg/h in a packed tumour core, K = 1 mmHg). References are the same discrete
equations solved by scipy: a sparse Newton iteration for the steady state and
Radau for the transient.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
from helpers import log_log_slope, relative_l2, run_to
from scipy.integrate import solve_ivp

from tmesolve.grid import Grid
from tmesolve.implicit import solve_screened_poisson
from tmesolve.integrate import Integrator, initial_state, make_solver_params
from tmesolve.model.species import Species, Transport
from tmesolve.model.verification import DiffusionDecay, StiffUptake, StiffUptakeParams
from tmesolve.operators import FaceBoundary
from tmesolve.spectral import Eigenbasis
from tmesolve.stepping import SplitStepper

GRID = Grid((8, 6, 5), 50.0)
DIFFUSIVITY = 6e6       # µm²/h, oxygen
SUPPLY_LEVEL = 38.0     # mmHg
HALF_SATURATION = 1.0   # mmHg


def _laplacian_matrix(grid: Grid) -> sparse.csr_matrix:
    """The 7-point finite-volume Laplacian with no-flux walls (µm⁻²), C-ordered like the fields."""
    def one_axis(n):
        off = np.ones(n - 1)
        diagonal = -2.0 * np.ones(n)
        diagonal[[0, -1]] = -1.0
        return sparse.diags([off, diagonal, off], [-1, 0, 1]) / grid.spacing_um**2
    nx, ny, nz = grid.shape
    eye = [sparse.identity(n) for n in (nx, ny, nz)]
    axes = [one_axis(n) for n in (nx, ny, nz)]
    return (sparse.kron(sparse.kron(axes[0], eye[1]), eye[2]) + sparse.kron(sparse.kron(eye[0], axes[1]), eye[2])
            + sparse.kron(sparse.kron(eye[0], eye[1]), axes[2])).tocsr()


def _maps(capacity_core: float = 3e4, capacity_rim: float = 30.0):
    """A plane of vessel voxels at x = 0 (s = 435 h⁻¹) and a consuming ball (q) near x = max."""
    supply = np.zeros(GRID.shape)
    supply[0] = 435.0
    x, y, z = np.meshgrid(*[np.arange(n) for n in GRID.shape], indexing="ij")
    core = (x - 5.5) ** 2 + (y - 3.5) ** 2 + (z - 3.0) ** 2 <= 6.5
    capacity = np.where(core, capacity_core, capacity_rim)
    return supply, capacity


def _params(supply, capacity, dtype) -> StiffUptakeParams:
    return StiffUptakeParams(diffusivity=jnp.asarray(DIFFUSIVITY, dtype),
                             supply_rate=jnp.asarray(supply[None], dtype),
                             supply_level=jnp.asarray(SUPPLY_LEVEL, dtype),
                             capacity=jnp.asarray(capacity[None], dtype),
                             half_saturation=jnp.asarray(HALF_SATURATION, dtype))


def _right_hand_side(supply, capacity):
    laplacian = DIFFUSIVITY * _laplacian_matrix(GRID)
    s, q = supply.ravel(), capacity.ravel()

    def rate(u):
        return laplacian @ u + s * (SUPPLY_LEVEL - u) - q * u / (u + HALF_SATURATION)

    def jacobian(u):
        return laplacian - sparse.diags(s + q * HALF_SATURATION / (u + HALF_SATURATION) ** 2)

    return rate, jacobian


def _steady_state(supply, capacity) -> np.ndarray:
    """Newton's method on the discrete steady equations (sparse direct solves) to round-off."""
    rate, jacobian = _right_hand_side(supply, capacity)
    u = np.full(GRID.num_voxels, SUPPLY_LEVEL)
    for _ in range(60):
        update = sparse_linalg.spsolve(jacobian(u).tocsc(), -rate(u))
        u = np.maximum(u + update, 0.0)
        if np.max(np.abs(update)) < 1e-13 * SUPPLY_LEVEL:
            break
    assert np.max(np.abs(rate(u))) < 1e-6 * np.max(capacity), "the Newton reference did not converge"
    return u.reshape(GRID.shape)


def test_screened_poisson_solve_matches_a_direct_solve(x64):
    """PCG on (a(x) − gΔ_h)x = b agrees with a sparse direct solve; with uniform a the
    spectral preconditioner is the exact inverse, so one iteration suffices."""
    rng = np.random.default_rng(7)
    basis = Eigenbasis(GRID, FaceBoundary(), "second_order")
    coefficient = 0.85 * DIFFUSIVITY   # γΔt·D at Δt = 0.5 h
    shift = 1.0 + 0.85 * np.where(rng.random(GRID.shape) < 0.3, 3e4, 6.0)   # a packed, anoxic patchwork
    rhs = rng.normal(size=GRID.shape)
    matrix = sparse.diags(shift.ravel()) - coefficient * _laplacian_matrix(GRID)
    expected = sparse_linalg.spsolve(matrix.tocsc(), rhs.ravel()).reshape(GRID.shape)
    solution, iterations = solve_screened_poisson(basis, jnp.asarray(shift[None]), jnp.asarray(coefficient),
                                                  jnp.asarray(rhs[None]), tolerance=1e-12)
    assert relative_l2(np.asarray(solution)[0], expected) < 1e-10
    assert 1 < int(iterations) < 100, int(iterations)

    uniform = np.full(GRID.shape, 40.0)
    solution, iterations = solve_screened_poisson(basis, jnp.asarray(uniform[None]), jnp.asarray(coefficient),
                                                  jnp.asarray(rhs[None]), tolerance=1e-12)
    matrix = sparse.diags(uniform.ravel()) - coefficient * _laplacian_matrix(GRID)
    expected = sparse_linalg.spsolve(matrix.tocsc(), rhs.ravel()).reshape(GRID.shape)
    assert int(iterations) == 1
    assert relative_l2(np.asarray(solution)[0], expected) < 1e-12


@pytest.mark.parametrize("dtype_name, tolerance", [("float64", 1e-9), ("float32", 2e-4)])
def test_large_steps_land_on_the_quasi_steady_profile(x64, dtype_name, tolerance):
    """At Δt = 0.5 h (uptake·Δt ≈ 10⁴) the stiff path reaches the steady solution of
    DΔ_h u + f(u) = 0 and stays non-negative. Splitting the uptake from the diffusion
    (as a reaction step would) lands each step on the local equilibrium
    s·u_b/(s + q/K) instead, zero in the core. float32: a few hundred round-offs of
    the stage solves (a stage error bound of 1e-3 of u) in a profile that spans 38 to
    below 0.1 mmHg."""
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[dtype_name]
    supply, capacity = _maps()
    expected = _steady_state(supply, capacity)
    initial = np.full(GRID.shape, 20.0)
    fields, diagnostics = run_to(StiffUptake(GRID), _params(supply, capacity, dtype), initial, 10.0, 0.5, dtype)
    assert int(diagnostics["steps"]) == 20
    result = fields[0, 0]
    assert result.min() >= 0.0
    assert np.max(np.abs(result - expected)) <= tolerance * SUPPLY_LEVEL
    # A diffusion profile from 17 mmHg next to the vessels to ~0 in the core, where the
    # local equilibrium (what a split reaction step lands on) is 0 away from the vessels.
    assert expected[supply == 0].max() > 10.0 and expected.min() < 0.01


def test_stiff_path_is_second_order_in_time(x64):
    """ROS2 errors against Radau (rtol 1e-11) on the same discrete equations regress
    on Δt with slope 2 (moderate stiffness, so the steps are in the asymptotic range)."""
    supply, capacity = _maps(capacity_core=3000.0, capacity_rim=100.0)
    rate, jacobian = _right_hand_side(supply, capacity)
    initial = np.full(GRID.shape, 30.0)
    t_end = 0.02
    reference = solve_ivp(lambda _, u: rate(u), (0.0, t_end), initial.ravel(), method="Radau",
                          jac=lambda _, u: jacobian(u), rtol=1e-11, atol=1e-12).y[:, -1].reshape(GRID.shape)
    steps = (16, 32, 64, 128)
    errors = []
    for count in steps:
        fields, _ = run_to(StiffUptake(GRID), _params(supply, capacity, jnp.float64), initial, t_end,
                           t_end / count, jnp.float64, safety=1.0)
        errors.append(relative_l2(fields[0, 0], reference))
    slope = log_log_slope([t_end / n for n in steps], errors)
    assert 1.8 <= slope <= 2.3, (slope, errors)
    assert errors[-1] < 1e-4


def test_a_zero_step_leaves_stiff_species_unchanged(x64):
    supply, capacity = _maps()
    model = StiffUptake(GRID)
    initial = np.linspace(0.0, 40.0, GRID.num_voxels).reshape((1, 1, *GRID.shape))
    state = initial_state(model, initial, dtype=jnp.float64)
    after = model.react(state, _params(supply, capacity, jnp.float64), jnp.asarray(0.0))
    np.testing.assert_array_equal(np.asarray(after.fields), np.asarray(state.fields))
    # The spectral sub-step leaves a stiff species to react: it has nothing else to propagate.
    assert SplitStepper(model).active_substeps == (0,)


def test_stiff_species_must_be_fast_with_no_flux_walls():
    class NotFast(StiffUptake):
        stiff_fast = ("v",)

        def __init__(self, grid):
            super().__init__(grid)
            self._declare((Species("u", "u", "1", Transport.FAST_LINEAR),
                           Species("v", "v", "1", Transport.CELL)))

    with pytest.raises(ValueError, match=r"stiff_fast: got 'v'; expected one of the fast linear species"):
        SplitStepper(NotFast(GRID))

    fixed = DiffusionDecay(GRID, boundary=FaceBoundary.all_fixed(1.0))
    fixed.stiff_fast = ("u",)
    with pytest.raises(ValueError, match="fixed-value walls; expected no-flux walls"):
        SplitStepper(fixed)


def test_stiff_path_compiles_once_and_keeps_float32():
    supply, capacity = _maps()
    model = StiffUptake(GRID)
    integrator = Integrator(model)
    state = initial_state(model, np.full((1, 1, *GRID.shape), 20.0), dtype=jnp.float32)
    solver = make_solver_params(0.5)
    for scale in (1.0, 2.0):
        params = _params(supply, scale * capacity, jnp.float32)
        state, _, _ = integrator.advance(state, params, solver, float(scale))
        assert state.fields.dtype == jnp.float32
    assert integrator.trace_count == 1
