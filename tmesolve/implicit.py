"""Fast species with stiff local terms: diffusion and reaction advanced together, implicitly.

A species whose local loss rate is far above 1/Δt (oxygen: uptake of 10²–10⁴ h⁻¹
in packed tumour, against Δt ≈ 0.5 h) cannot be split from its diffusion: a
split reaction drives it to its local equilibrium P/Λ, near zero away from
vessels, before diffusion can refill it, an O(1) error where diffusion feeds
the tissue (the diffusion length √(D/Λ) is 1–3 voxels). Such a species (a
model's :attr:`~tmesolve.model.base.Model.stiff_fast`) is advanced by the
model's reaction step, diffusion included, with the two-stage Rosenbrock
method ROS2 (Verwer, Spee, Blom & Hundsdorfer 1999, SIAM J. Sci. Comput.
20:1456), and the spectral sub-step leaves it alone:

    u' = F(u) = D Δ_h u + f(u),   J = D Δ_h + diag(∂f/∂u)
    (I − γΔt J) k₁ = F(uⁿ)
    (I − γΔt J) k₂ = F(uⁿ + Δt k₁) − 2 k₁
    uⁿ⁺¹ = uⁿ + Δt (3/2 k₁ + 1/2 k₂),   γ = 1 + 1/√2

ROS2 is second order for any matrix J (a W-method), so the Jacobian is taken
once per step and may leave out couplings (to the cells, for oxygen); with
the exact one it is L-stable, so a stiff species lands on its quasi-steady
profile (the solution of D Δu + f(u) = 0 for the frozen cells) at any Δt
instead of on its local equilibrium. Of the two L-stable γ, 1 + 1/√2 damps
more: with 1 − 1/√2 the well-mixed TME check's error at Δt = 0.04 h was 110×
larger. No second-order linear method is positive for every Δt (Bolley &
Crouzeix 1978); the update is clipped at zero, which only acts inside a
steep transient. When other fields move during the step (the TME model's
cells), F depends on time through them, and ROS2's F_t terms
(:meth:`tmesolve.model.tme.TMEModel.react`) keep the species on its moving
quasi-steady profile instead of lagging it by 0.7Δt.

Each stage solves the screened Poisson problem (a(x) − g Δ_h) k = b with
a = 1 − γΔt ∂f/∂u ≥ 1 and g = γΔt D by conjugate gradients, preconditioned with
the exact spectral inverse of the same operator at the geometric mean of a
(the box eigenbasis diagonalises Δ_h). To a relative residual of 1e-6 the
default lesion takes about 10 iterations and a packed, anoxic tumour core
(a up to 2.6·10⁴ at Δt = 0.5 h) about 36; with the float32 stopping rule
(:data:`SOLVE_TOLERANCE`, :func:`stage_residual_enough`) a running lesion mostly takes
0–4 per stage. Nothing reports a solve that stops at
:data:`MAX_SOLVE_ITERATIONS`; none was seen with the parameter table's values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from tmesolve.operators import diffusion_rate
from tmesolve.spectral import Eigenbasis

#: γ of ROS2: L-stable, the stability function R(z) → 0 as z → −∞.
ROS2_GAMMA = 1.0 + 1.0 / math.sqrt(2.0)
#: Relative residual at which a stage solve stops, per dtype, and the bound on each
#: stage's relative error in u (:func:`stage_residual_enough`; a worst case: A ≥ I,
#: and where uptake is stiff A ≥ 1 + γΔtΛ ≫ 1). float32: 1e-3, a tenth of the
#: 7-point stencil's own error at 50 µm voxels; against 1e-5 the default lesion's
#: tumour oxygen after 12 h moved by 1.3e-6 relative and its necrosis by 1e-5, and
#: the solves took 2 iterations per reaction step at 20 µm (4.5 at 100 µm) instead
#: of 4 (8). float64: well below the 1e-6 of the well-mixed check.
SOLVE_TOLERANCE = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.float64): 1e-11}
#: Cap on conjugate-gradient iterations per stage: the hardest case measured
#: needs about 36; the cap only stops a solve that would not converge anyway.
MAX_SOLVE_ITERATIONS = 200


def _system_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    """Inner product over the three spatial axes: one value per independent system."""
    return jnp.sum(x * y, axis=(-3, -2, -1), keepdims=True)


def solve_screened_poisson(basis: Eigenbasis, shift: jax.Array, coefficient: jax.Array,
                           right_hand_side: jax.Array, tolerance: float,
                           max_iterations: int = MAX_SOLVE_ITERATIONS,
                           enough: jax.Array | None = None,
                           guess: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Solve (a(x) − g Δ_h) x = b by preconditioned conjugate gradients.

    Args:
        basis: eigenbasis of the grid with all-no-flux walls; its κ² must be those
            of the 7-point Laplacian (spectrum "second_order") for the
            preconditioner to be exact where a is uniform.
        shift: a(x) ≥ 1 (dimensionless), shape (..., nx, ny, nz).
        coefficient: g = γΔt·D (µm²), broadcastable to the leading axes.
        right_hand_side: b, shape of ``shift``.
        tolerance: stop when ‖b − A x‖₂ ≤ tolerance·‖b‖₂ in every system (every
            index of the leading axes is its own system).
        enough: or when ‖b − A x‖₂ is at most this (per system, broadcastable
            to the leading axes); None: never.
        guess: the starting x (default 0); a guess already good enough costs one
            operator application and no transform.

    Returns:
        (x, iterations) with iterations the largest count over the systems.

    The operator is symmetric positive definite (A ≥ I, since −Δ_h ≥ 0 with no-flux
    walls). The preconditioner M⁻¹ = (ā − g Δ_h)⁻¹ with ā = exp(mean log a) per
    system is diagonal in the eigenbasis: x̂ = b̂/(ā + g κ²). Each iteration
    applies it once (a forward and an inverse transform), at its start, so a
    solve that is converged on entry applies it never.
    """
    spacing = basis.grid.spacing_um
    dtype = right_hand_side.dtype
    kappa_squared = basis.kappa_squared(dtype)
    mean_shift = jnp.exp(jnp.mean(jnp.log(shift), axis=(-3, -2, -1), keepdims=True))
    spectral_denominator = mean_shift + coefficient * kappa_squared

    def apply_operator(x):
        return shift * x - coefficient * diffusion_rate(x, 1.0, spacing)

    def precondition(residual):
        return basis.inverse(basis.forward(residual) / spectral_denominator)

    def safe_ratio(numerator, denominator):
        return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)

    target = tolerance * jnp.sqrt(_system_dot(right_hand_side, right_hand_side))
    if enough is not None:
        target = jnp.maximum(target, enough)

    def unconverged(residual):
        return jnp.any(jnp.sqrt(_system_dot(residual, residual)) > target)

    solution = jnp.zeros_like(right_hand_side) if guess is None else guess
    residual = right_hand_side if guess is None else right_hand_side - apply_operator(guess)
    no_direction = jnp.zeros_like(right_hand_side)
    start = (jnp.zeros((), jnp.int32), solution, residual, no_direction, jnp.ones_like(target))

    def keep_going(carry):
        iteration, _, residual, _, _ = carry
        return (iteration < max_iterations) & unconverged(residual)

    def iterate(carry):
        iteration, solution, residual, direction, residual_dot = carry
        preconditioned = precondition(residual)
        new_residual_dot = _system_dot(residual, preconditioned)
        # β = 0 on the first iteration: the first direction is M⁻¹r₀.
        conjugation = jnp.where(iteration > 0, safe_ratio(new_residual_dot, residual_dot), 0.0)
        direction = preconditioned + conjugation * direction
        image = apply_operator(direction)
        step = safe_ratio(new_residual_dot, _system_dot(direction, image))
        return (iteration + 1, solution + step * direction, residual - step * image, direction,
                new_residual_dot)

    iterations, solution, *_ = jax.lax.while_loop(keep_going, iterate, start)
    return solution, iterations


#: Time (h) over which the stopping rule lets the stage errors add up to
#: tolerance·‖u‖: a stage may stop at ‖r‖ ≤ tolerance·‖u‖/max(Δt, this).
ERROR_TIME_SCALE_H = 1.0


def stage_residual_enough(values: jax.Array, dt: jax.Array, tolerance: float) -> jax.Array:
    """Residual norm at which a stage solve may stop: tolerance·‖uⁿ‖₂/max(Δt, 1 h) per system.

    A ≥ I, so a residual r leaves an error of at most ‖r‖ in the stage rate k and
    Δt·‖r‖ in u. Steps of 1 h and more: each stage's own error in u is at most
    tolerance·‖uⁿ‖ (L2 over the system; k₁'s error reaches the result through both
    stages, at most 2.6 times over). Shorter steps: at most tolerance·‖uⁿ‖ per hour
    of simulated time, so many small steps cannot add up what one large step may
    (a bound per stage of tolerance·‖uⁿ‖ let the 0.005 h run of
    benchmarks.dt_convergence drift 0.16 % in tumour oxygen over 2,400 steps).
    Near the quasi-steady profile b is small and its relative criterion alone
    would spend iterations on digits that cannot move u.
    """
    norm = jnp.sqrt(_system_dot(values, values))
    # A step of length zero moves nothing: any residual will do.
    return jnp.where(dt > 0, tolerance * norm / jnp.maximum(dt, ERROR_TIME_SCALE_H), jnp.inf)


def rosenbrock2_step(basis: Eigenbasis, values: jax.Array, diffusivity: jax.Array, dt: jax.Array,
                     local_terms: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
                     ) -> tuple[jax.Array, jax.Array]:
    """One ROS2 step of u' = D Δ_h u + f(u) (see the module docstring), clipped at zero.

    Args:
        basis: all-no-flux eigenbasis of the grid.
        values: u, shape (species, ..., nx, ny, nz).
        diffusivity: D per species (µm²/h), broadcastable to u's leading axes.
        dt: step (h), ≥ 0; dt = 0 returns u exactly.
        local_terms: u ↦ (f(u), ∂f/∂u) per voxel (units/h and 1/h); ∂f/∂u ≤ 0 is
            expected (a loss), a positive part is left out of J (ROS2 stays second
            order for any J).

    Returns:
        (u at t + dt, the most conjugate-gradient iterations a stage solve took).
    """
    tolerance = SOLVE_TOLERANCE[jnp.dtype(values.dtype)]
    spacing = basis.grid.spacing_um
    diffusivity = jnp.asarray(diffusivity, values.dtype)
    diffusivity = diffusivity.reshape(diffusivity.shape + (1,) * (values.ndim - diffusivity.ndim))
    gamma_dt = ROS2_GAMMA * dt

    def rate(u):
        local, jacobian = local_terms(u)
        return diffusivity * diffusion_rate(u, 1.0, spacing) + local, jacobian

    rate0, jacobian = rate(values)
    shift = 1.0 + gamma_dt * jnp.maximum(-jacobian, 0.0)
    coefficient = gamma_dt * diffusivity
    enough = stage_residual_enough(values, dt, tolerance)
    k1, iterations1 = solve_screened_poisson(basis, shift, coefficient, rate0, tolerance, enough=enough)
    rate1, _ = rate(jnp.maximum(values + dt * k1, 0.0))   # the stage value, clipped as the update is
    k2, iterations2 = solve_screened_poisson(basis, shift, coefficient, rate1 - 2.0 * k1, tolerance,
                                             enough=enough)
    updated = jnp.maximum(values + dt * (1.5 * k1 + 0.5 * k2), 0.0)
    return jnp.where(dt > 0, updated, values), jnp.maximum(iterations1, iterations2)
