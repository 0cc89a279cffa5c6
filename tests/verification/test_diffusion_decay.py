"""Diffusion–decay: analytic Gaussian, cosine modes, order of accuracy, source, mass."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import log_log_slope, relative_l2, run_to

from tmesolve.grid import Grid
from tmesolve.model.base import Model
from tmesolve.model.species import Species, Transport
from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params, gaussian_solution
from tmesolve.operators import FaceBoundary
from tmesolve.stepping import SplitStepper

D_UM2_PER_H = 60_000.0  # 1000 µm²/min, the DD3 benchmark's value
DECAY_PER_H = 0.6  # 0.01 min⁻¹


@pytest.fixture(params=["float64", "float32"])
def precision(request, x64):
    # float32 runs under x64 too: the dtype of the arrays, not the global flag, is what is tested.
    return request.param, {"float64": jnp.float64, "float32": jnp.float32}[request.param]


def test_free_space_gaussian_spectral(precision):
    """3-D Gaussian (σ 40 → 87 µm) in a box 7σ wide each side: wall images are ~1e-12 of the peak.

    float64: what is left is the aliasing of a 2-voxel Gaussian, e^{-(πσ/h)²/2} ≈ 3e-9;
    float32: round-off of the matrix transforms (~1e-6 relative). Tolerances 1e-8 / 1e-5.
    """
    name, dtype = precision
    grid = Grid((64, 64, 64), 20.0)
    t_end = 0.05  # 3 min
    u0 = gaussian_solution(grid, 0.0, 40.0, D_UM2_PER_H, DECAY_PER_H)
    params = diffusion_decay_params(D_UM2_PER_H, DECAY_PER_H, dtype=dtype)
    fields, _ = run_to(DiffusionDecay(grid), params, u0, t_end, dt_max=t_end, dtype=dtype)
    exact = gaussian_solution(grid, t_end, 40.0, D_UM2_PER_H, DECAY_PER_H)
    error = relative_l2(fields[0, 0], exact)
    assert error < (1e-8 if name == "float64" else 1e-5), error


def test_free_space_gaussian_explicit_is_second_order_accurate(x64):
    """The explicit stencil on the same problem: error at the size of its h² term (≤ 1e-2)."""
    grid = Grid((32, 32, 32), 20.0)
    t_end = 0.05
    u0 = gaussian_solution(grid, 0.0, 60.0, D_UM2_PER_H, DECAY_PER_H)
    params = diffusion_decay_params(D_UM2_PER_H, DECAY_PER_H, dtype=jnp.float64)
    fields, diagnostics = run_to(DiffusionDecay(grid, path="explicit"), params, u0, t_end, 1.0, jnp.float64)
    exact = gaussian_solution(grid, t_end, 60.0, D_UM2_PER_H, DECAY_PER_H)
    # h²/(12σ²)·(curvature terms) ≈ 20²/(12·60²)·d ≈ 3e-2 at worst; measured ~7e-3.
    assert relative_l2(fields[0, 0], exact) < 1e-2
    assert int(diagnostics["steps"]) > 10  # it really took explicit steps


def cosine_mode(grid: Grid) -> tuple[np.ndarray, float]:
    """u = cos(πx/L)cos(πy/L)cos(πz/L) on a no-flux cube and its κ² = 3(π/L)²."""
    x, y, z = grid.coordinates
    length = grid.lengths_um[0]
    mode = np.cos(np.pi * x / length) * np.cos(np.pi * y / length) * np.cos(np.pi * z / length)
    return mode, 3 * (np.pi / length) ** 2


def test_cosine_mode_spectral_is_exact_at_any_step(precision):
    """One mode evolves as exp(−(Dκ²+λ)t) to round-off, even with D·dt/h² = 1e4."""
    name, dtype = precision
    grid = Grid((16, 16, 16), 20.0)
    mode, kappa_squared = cosine_mode(grid)
    dt = 1e4 * grid.spacing_um**2 / D_UM2_PER_H
    params = diffusion_decay_params(D_UM2_PER_H, DECAY_PER_H, dtype=dtype)
    t_end = 0.02
    fields, _ = run_to(DiffusionDecay(grid), params, mode, t_end, dt, dtype)
    exact = mode * np.exp(-(D_UM2_PER_H * kappa_squared + DECAY_PER_H) * t_end)
    assert relative_l2(fields[0, 0], exact) < (1e-12 if name == "float64" else 2e-6)


@pytest.mark.parametrize("path,spectrum", [("explicit", "exact"), ("spectral", "second_order")])
def test_spatial_order_is_two(x64, path, spectrum):
    """Regression of log error over N = 8, 16, 32: the finite-volume stencil is second order.

    Time steps are tiny relative to h² (explicit) or exact (spectral), so the
    error is spatial. Slope expected 2 (accepted 1.9–2.1).
    """
    errors, sizes = [], [8, 16, 32]
    for n in sizes:
        grid = Grid((n, n, n), 640.0 / n)
        mode, kappa_squared = cosine_mode(grid)
        params = diffusion_decay_params(D_UM2_PER_H, DECAY_PER_H, dtype=jnp.float64)
        t_end = np.log(2) / (D_UM2_PER_H * kappa_squared)
        model = DiffusionDecay(grid, path=path, spectrum=spectrum)
        fields, _ = run_to(model, params, mode, t_end, dt_max=t_end / 8, dtype=jnp.float64, safety=0.5)
        exact = mode * np.exp(-(D_UM2_PER_H * kappa_squared + DECAY_PER_H) * t_end)
        errors.append(relative_l2(fields[0, 0], exact))
    order = -log_log_slope(sizes, errors)
    assert 1.9 < order < 2.1, (order, errors)


@pytest.mark.parametrize("name", ["float64", "float32"])
def test_constant_source_reaches_s_over_lambda_with_huge_steps(x64, name):
    """D·dt/h² = 1e4: the propagator stays bounded and positive and tends to S/λ."""
    dtype = {"float64": jnp.float64, "float32": jnp.float32}[name]
    grid = Grid((12, 12, 12), 20.0)
    source, decay = 3.0, 0.5
    dt = 1e4 * grid.spacing_um**2 / D_UM2_PER_H
    rng = np.random.default_rng(0)
    u0 = rng.uniform(0.0, 10.0, grid.shape)
    params = diffusion_decay_params(D_UM2_PER_H, decay, source, dtype=dtype)
    model = DiffusionDecay(grid)
    previous = u0
    for t_end in (dt, 5 * dt, 40.0):
        fields, _ = run_to(model, params, previous, t_end - (0 if previous is u0 else 0), dt, dtype)
        assert np.all(fields >= 0) and np.all(np.isfinite(fields))
        assert fields.max() <= max(u0.max(), source / decay) * (1 + 1e-6)
    fields, _ = run_to(model, params, u0, 40.0, dt, dtype)  # 40 h = 20/λ
    tolerance = 1e-8 if name == "float64" else 1e-5
    np.testing.assert_allclose(fields, source / decay, rtol=tolerance)


@pytest.mark.parametrize("path", ["spectral", "explicit"])
def test_mass_conserved_under_no_flux_walls(x64, path):
    """No decay, no source: Σu is conserved; float64 relative drift ≤ 1e-12."""
    grid = Grid((16, 12, 10), 20.0)
    rng = np.random.default_rng(1)
    u0 = rng.uniform(0.0, 1.0, grid.shape)
    params = diffusion_decay_params(D_UM2_PER_H, 0.0, dtype=jnp.float64)
    fields, diagnostics = run_to(DiffusionDecay(grid, path=path), params, u0, 0.5, 0.01, jnp.float64)
    assert int(diagnostics["steps"]) >= 50
    drift = abs(fields.sum() - u0.sum()) / u0.sum()
    assert drift <= 1e-12, drift


def test_fixed_value_walls_steady_state(x64):
    """Fixed walls u = g with decay: steady 1-D profile g·cosh(x'/ℓ)/cosh(L/2ℓ), ℓ = √(D/λ).

    Both paths are second order here (the lifted profile's odd extension has a
    kink in u'', and the stencil's wall flux uses a half-cell difference): the
    error is about (h/ℓ)²/8 ≈ 5e-3 at h = 10 µm, ℓ = 50 µm; measured 2e-3 / 4e-3.
    """
    n, h, g = 64, 10.0, 5.0
    grid = Grid((n, 1, 1), h)
    boundary = FaceBoundary(((g, g), ("no_flux", "no_flux"), ("no_flux", "no_flux")))
    diffusivity, decay = 1000.0, 0.4
    params = diffusion_decay_params(diffusivity, decay, dtype=jnp.float64)
    for path in ("spectral", "explicit"):
        model = DiffusionDecay(grid, path=path, boundary=boundary)
        fields, _ = run_to(model, params, np.zeros(grid.shape), 60.0, 5.0, jnp.float64)
        x = grid.axis_coordinates(0) - n * h / 2
        length_scale = np.sqrt(diffusivity / decay)
        exact = g * np.cosh(x / length_scale) / np.cosh(n * h / 2 / length_scale)
        assert relative_l2(fields[0, 0, :, 0, 0], exact) < 6e-3, path


def test_two_d_equals_z_uniform_three_d(x64):
    """A 2-D grid (nz = 1) gives the same answer as a 3-D grid uniform along z."""
    rng = np.random.default_rng(2)
    plane = rng.uniform(0.0, 1.0, (10, 12))
    # dt_max below both explicit limits (2-D h²/4D, 3-D h²/6D): the same steps in both runs.
    params = diffusion_decay_params(D_UM2_PER_H, DECAY_PER_H, 0.5, dtype=jnp.float64)
    for path in ("spectral", "explicit"):
        flat, _ = run_to(DiffusionDecay(Grid((10, 12, 1)), path=path), params, plane[:, :, None], 0.05, 5e-4,
                         jnp.float64)
        thick, _ = run_to(DiffusionDecay(Grid((10, 12, 5)), path=path), params,
                          np.repeat(plane[:, :, None], 5, axis=2), 0.05, 5e-4, jnp.float64)
        np.testing.assert_allclose(thick[..., 2], flat[..., 0], rtol=1e-11, atol=1e-14)


class FedByAnother(Model):
    """∂u/∂t = D_uΔu − λ_u u + k w,  ∂w/∂t = D_wΔw − λ_w w: a source that moves with the fields.

    For one no-flux cosine mode (κ²) both stay in that mode, with a = D_uκ² + λ_u
    and b = D_wκ² + λ_w:

        w(t) = w₀ e^{−bt},   u(t) = u₀ e^{−at} + k w₀ (e^{−bt} − e^{−at})/(a − b)
    """

    def __init__(self, grid: Grid, sources_vary: bool, boundary: FaceBoundary = FaceBoundary(),
                 wall_values: tuple[float, float] = (0.0, 0.0)) -> None:
        self.grid = grid
        self.linear_sources_vary = sources_vary
        self.fast_boundary, self.wall_values = boundary, wall_values
        self._declare((Species("u", "u", "1", Transport.FAST_LINEAR, "fed species"),
                       Species("w", "w", "1", Transport.FAST_LINEAR, "feeding species")))

    def linear_coefficients(self, params):
        return params["diffusivity"], params["decay"]

    def linear_sources(self, state, params):
        feeder = state.fields[1]
        return jnp.stack([params["k"] * feeder, jnp.zeros_like(feeder)])

    def linear_fixed_values(self, params):
        return jnp.asarray(self.wall_values, params["decay"].dtype)


def test_a_source_that_moves_with_the_fields_is_integrated_at_second_order(x64):
    """The linear sub-step with a field-dependent source is ETD2RK: second order in Δt,
    where holding the step's starting source (ETD1) is first order.

    Rates of order 1/h and steps of 0.4 to 0.05 h put μΔt at 0.1–1.3: measured
    slopes 2.02 and 1.13 (ETD1 nears 1 from above as Δt shrinks), errors at
    0.4 h 0.073 and 0.58.
    """
    grid = Grid((8, 8, 8), 20.0)
    mode, kappa_squared = cosine_mode(grid)
    diffusivity, decay, k = np.array([1000.0, 2000.0]), np.array([0.5, 0.2]), 3.0
    a, b = diffusivity * kappa_squared + decay
    params = {"diffusivity": jnp.asarray(diffusivity), "decay": jnp.asarray(decay), "k": jnp.asarray(k)}
    t_end, u0, w0 = 2.0, 1.0, 2.0
    exact_u = mode * (u0 * np.exp(-a * t_end) + k * w0 * (np.exp(-b * t_end) - np.exp(-a * t_end)) / (a - b))
    exact_w = mode * w0 * np.exp(-b * t_end)
    initial = np.stack([u0 * mode, w0 * mode])[:, None]
    steps = (0.4, 0.2, 0.1, 0.05)
    errors = {}
    for vary in (True, False):
        errors[vary] = []
        for dt in steps:
            fields, _ = run_to(FedByAnother(grid, vary), params, initial, t_end, dt, jnp.float64)
            np.testing.assert_allclose(fields[1, 0], exact_w, rtol=1e-12, atol=1e-14)  # no source: exact
            errors[vary].append(relative_l2(fields[0, 0], exact_u))
    assert log_log_slope(steps, errors[True]) > 1.85, errors[True]
    assert 0.85 < log_log_slope(steps, errors[False]) < 1.3, errors[False]
    assert errors[True][0] < 0.5 * errors[False][0], (errors[True], errors[False])
    # float32 at the finest step: the same error (1.1e-3), not round-off.
    fields, _ = run_to(FedByAnother(grid, True), params, initial, t_end, steps[-1], jnp.float32)
    assert abs(relative_l2(fields[0, 0], exact_u) - errors[True][-1]) < 0.02 * errors[True][-1]


def test_a_moving_source_behind_fixed_value_walls_is_second_order(x64):
    """ETD2RK through the fixed-value lift (u = g + w, source S − λg): a 1-D box with
    walls held at g_u = 2 and g_w = 1, u fed by w; against a run at Δt/8.

    The lift's constant source is in both ends of the step and drops out of the
    corrector; S¹ is taken at the lifted prediction. Measured slope 2.02 (ETD1: 1.09).
    """
    n, h = 32, 10.0
    grid = Grid((n, 1, 1), h)
    boundary = FaceBoundary(((2.0, 2.0), ("no_flux", "no_flux"), ("no_flux", "no_flux")))
    params = {"diffusivity": jnp.asarray([1000.0, 2000.0]), "decay": jnp.asarray([0.5, 0.2]),
              "k": jnp.asarray(3.0)}
    x = grid.axis_coordinates(0)[:, None, None] * np.ones(grid.shape)
    initial = np.stack([np.zeros(grid.shape), 1.0 + np.sin(np.pi * x / (n * h))])[:, None]
    model = FedByAnother(grid, True, boundary, wall_values=(2.0, 1.0))
    steps, t_end = (0.4, 0.2, 0.1, 0.05), 2.0
    reference, _ = run_to(model, params, initial, t_end, steps[-1] / 8, jnp.float64)
    errors = [relative_l2(run_to(model, params, initial, t_end, dt, jnp.float64)[0][0, 0], reference[0, 0])
              for dt in steps]
    assert np.all(np.asarray(reference) > 0)
    assert log_log_slope(steps, errors) > 1.85, errors


@pytest.mark.parametrize("setting, value, message", [
    ("linear_source_species", ("uu",), "linear_source_species: got 'uu'"),
    ("linear_source_species", "u", "expected a tuple of species names"),
    ("linear_sources_vary", ("w",), "linear_sources_vary: got 'w'; expected one of linear_source_species"),
])
def test_a_misnamed_source_species_is_refused_before_anything_compiles(setting, value, message):
    """A name that matches no propagated species would silently drop that species'
    production (its source is never read): the stepper refuses it when it is built."""
    model = FedByAnother(Grid((4, 4, 4), 20.0), True)
    model.linear_source_species = ("u",)
    setattr(model, setting, value)
    with pytest.raises(ValueError, match=message):
        SplitStepper(model)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float64, 1e-13), (jnp.float32, 2e-6)])
def test_field_by_field_transforms_equal_the_stacked_ones(x64, dtype, tolerance):
    """A CPU transforms a stack one field at a time (Eigenbasis._apply); a GPU the stack at once.

    Both are the same products on the same numbers, so they agree to the
    round-off of a product's summation order (tolerance relative to the largest
    value: a few ulp of the 6-term sums). The walls give each axis its own
    basis (x: fixed/no-flux, DST-IV; y: no-flux, DCT-II; z: fixed, DST-II);
    stacks of one and two leading axes, and a 2-D grid (nz = 1).
    """
    from tmesolve.operators import NO_FLUX
    from tmesolve.spectral import Eigenbasis

    walls = FaceBoundary(((0.0, NO_FLUX), (NO_FLUX, NO_FLUX), (1.0, 1.0)))
    rng = np.random.default_rng(5)
    for grid_shape, leading in (((6, 5, 4), (3, 2)), ((6, 5, 4), (4,)), ((6, 5, 1), (3,))):
        basis = Eigenbasis(Grid(grid_shape, 20.0), walls)
        stack = jnp.asarray(rng.uniform(-1.0, 1.0, leading + grid_shape), dtype)
        for transform in (basis.forward, basis.inverse):
            each, whole = transform(stack, True), transform(stack, False)
            assert each.shape == whole.shape == stack.shape and each.dtype == dtype
            assert float(jnp.max(jnp.abs(each - whole))) <= tolerance * float(jnp.max(jnp.abs(whole)))
        # The round trip is the identity (orthonormal bases), field by field too.
        back = basis.inverse(basis.forward(stack, True), True)
        assert float(jnp.max(jnp.abs(back - stack))) <= 10 * tolerance


def test_the_cpu_transforms_a_stack_in_a_loop_over_its_fields():
    """On the CPU backend the default transform of a stack compiles to one loop over its fields; one field needs none."""
    import jax

    from tmesolve.spectral import Eigenbasis, transforms_field_by_field

    if jax.default_backend() != "cpu":
        pytest.skip("the stacked form is the default off the CPU")
    assert transforms_field_by_field()
    basis = Eigenbasis(Grid((8, 8, 8), 20.0), FaceBoundary())
    stack_program = jax.jit(basis.forward).lower(jnp.ones((4, 1, 8, 8, 8), jnp.float32)).as_text()
    field_program = jax.jit(basis.forward).lower(jnp.ones((1, 8, 8, 8), jnp.float32)).as_text()
    assert "stablehlo.while" in stack_program and "stablehlo.while" not in field_program
