"""Operator splitting: one step of a model, and the reaction integrator.

A step composes three sub-solvers, each second-order accurate on its own:
R (local reactions, :func:`positive_exponential_heun`), C (explicit cell transport,
SSP-RK2) and L (exact spectral propagator of the fast linear species).

* order 1 (Lie):    L(Δt) ∘ C(Δt) ∘ R(Δt)
* order 2 (Strang): R(Δt/2) ∘ C(Δt/2) ∘ L(Δt) ∘ C(Δt/2) ∘ R(Δt/2)

The Strang composition is symmetric, so the splitting error is O(Δt²)
globally; the test suite measures both orders by regression over Δt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import replace
from tmesolve.model.base import Model, State
from tmesolve.spectral import Eigenbasis, propagate

SPLITTING_ORDERS = (1, 2)


def _frozen_exponential(u: jax.Array, production: jax.Array, loss: jax.Array, dt: jax.Array) -> jax.Array:
    """Exact solution over dt of u' = P − Λu with P, Λ frozen: u e^{−Λdt} + P(1 − e^{−Λdt})/Λ."""
    x = loss * dt
    small = x < 1e-6
    gain = jnp.where(small, dt * (1.0 - 0.5 * x), -jnp.expm1(-x) / jnp.where(small, 1.0, loss))
    return u * jnp.exp(-x) + production * gain


#: Below this z the ETD2 weights come from their Taylor series: above it the
#: closed forms lose at most 2ε/z relatively (1e-14 in float64, 5e-6 in float32),
#: below it eight terms leave a truncation of z⁸/10! < 1e-16.
_SERIES_BELOW = 0.05


def etd2_weights(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weights (w₀, w₁) of the two end values of a linear source in the exact ETD2 update.

    For x' = s(τ) − k·x on a step of length h, with s linear from s₀ (τ = 0)
    to s₁ (τ = h) and z = k·h:

        x(h) = x e^{−z} + h (w₀ s₀ + w₁ s₁)
        w₀ = (1 − e^{−z} − z e^{−z})/z²,   w₁ = (z − 1 + e^{−z})/z²

    w₀ + w₁ = (1 − e^{−z})/z = φ₁(z). Both are ≥ 0 for z ≥ 0 (each is the
    integral of e^{−k(h−τ)} against a non-negative hat), w₀ → 1/z² and w₁ → 1/z
    as z → ∞ (an infinitely fast relaxation lands on s₁/k), and w₀, w₁ → ½ as z → 0
    (the trapezoid rule). Relative error ≤ 1e-14 in float64 and ≤ 4e-6 in float32
    (the closed forms just above the series cut).
    """
    small = z < _SERIES_BELOW
    safe = jnp.where(small, 1.0, z)
    decay = jnp.exp(-safe)
    phi1 = -jnp.expm1(-safe) / safe
    # z e^{−z} with z capped: e^{−z} underflows to 0 long before the cap, and an
    # infinite rate (an empty pool drained at a finite flux) must give 0, not inf·0.
    w0 = (-jnp.expm1(-safe) - jnp.minimum(safe, 1e4) * decay) / (safe * safe)
    # Series: w₀ = Σ (−z)ᵏ (k+1)/(k+2)!,  w₁ = Σ (−z)ᵏ/(k+2)!  (Horner, k = 0..7).
    x = jnp.where(small, z, 0.0)
    w0_series, w1_series = jnp.zeros_like(x), jnp.zeros_like(x)
    for k in reversed(range(8)):
        sign = -1.0 if k % 2 else 1.0
        w0_series = w0_series * x + sign * (k + 1) / math.factorial(k + 2)
        w1_series = w1_series * x + sign / math.factorial(k + 2)
    return jnp.where(small, w0_series, w0), jnp.where(small, w1_series, phi1 - w0)


def exponential_trapezoid(u: jax.Array, production0: jax.Array, loss0: jax.Array,
                          production1: jax.Array, loss1: jax.Array, dt: jax.Array) -> jax.Array:
    """Corrector of :func:`positive_exponential_heun`: u' = P(τ) − Λ(τ)u with P, Λ known at both ends.

        u⁺ = u e^{−½(Λ₀ + Λ₁)Δt} + Δt (w₀(z₁) P₀ + w₁(z₁) P₁),   z₁ = Λ₁Δt

    The homogeneous part integrates Λ by the trapezoid rule; the source is taken
    linear in time and propagated with the end-point rate Λ₁ (:func:`etd2_weights`).
    Both are second order when Λ is small. As Λ₁Δt → ∞ the update tends to
    P₁/Λ₁ − (P₁ − P₀)/(Λ₁²Δt): for a stiff species with a slowly varying rate and a
    production that does not depend on the species itself (oxygen, IL-2, the
    antibodies, PD-L1 here) that is its slow manifold P/Λ − Ṗ/Λ², where the frozen
    mean ½(P₀+P₁)/½(Λ₀+Λ₁) lags it by half a step. (For a stiff autocatalytic term,
    P ∝ u, neither form is accurate at Λ·Δt ≫ 1; the old frozen mean happens to be
    closer there: keep Λ·Δt ≲ 1 for such terms, as the explicit limits do.) Every
    term is non-negative, so u⁺ ≥ 0; a steady state (P = Λu at both ends) is kept
    to round-off.
    """
    w0, w1 = etd2_weights(loss1 * dt)
    return u * jnp.exp(-0.5 * (loss0 + loss1) * dt) + dt * (w0 * production0 + w1 * production1)


def positive_exponential_heun(production_and_loss: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                              u: jax.Array, dt: jax.Array) -> jax.Array:
    """Second-order, unconditionally positive step of u' = P(u) − Λ(u)·u.

    P ≥ 0 is production, Λ ≥ 0 a per-capita loss rate (h⁻¹). The predictor
    solves the frozen linear ODE exactly (an exponential integrator); the
    corrector (:func:`exponential_trapezoid`) uses both end points:

        u¹ = 𝓔(u; P(u), Λ(u), Δt),   𝓔(u; P, Λ, Δt) = u e^{−ΛΔt} + P (1 − e^{−ΛΔt})/Λ
        u⁺ = u e^{−Λ̄Δt} + Δt (w₀ P(u) + w₁ P(u¹)),   Λ̄ = ½(Λ(u) + Λ(u¹))

    Both stages are sums of non-negative terms, so u⁺ ≥ 0 for any Δt; steady
    states (P = Λu) are kept exactly, and a stiff species (oxygen uptake,
    10² h⁻¹) relaxes onto its slow manifold without the 2× overshoot that
    Patankar-type schemes (MPRK22) show when a species starts far below it.
    """
    production0, loss0 = production_and_loss(u)
    stage = _frozen_exponential(u, production0, loss0, dt)
    production1, loss1 = production_and_loss(stage)
    return exponential_trapezoid(u, production0, loss0, production1, loss1, dt)


class SplitStepper:
    """One time step of a model by Lie or Strang splitting."""

    def __init__(self, model: Model, order: int = 2) -> None:
        if order not in SPLITTING_ORDERS:
            raise ValueError(f"solver.splitting_order: got {order!r}; expected one of {SPLITTING_ORDERS}")
        self.model = model
        self.order = order
        self.basis = Eigenbasis(model.grid, model.fast_boundary, model.spectrum) if model.num_fast else None

    @property
    def active_substeps(self) -> tuple[int, ...]:
        """Sub-solvers the model has (0 reactions, 1 cell transport, 2 fast linear), static."""
        model = type(self.model)
        active = []
        if model.react is not Model.react:
            active.append(0)
        if model.transport is not Model.transport:
            active.append(1)
        if self.model.num_fast:
            active.append(2)
        return tuple(active) or (0,)

    def linear(self, state: State, params: Any, dt: jax.Array) -> State:
        model = self.model
        count = model.num_fast
        if count == 0:
            return state
        diffusivity, decay = model.linear_coefficients(params)
        fast = propagate(self.basis, state.fields[:count], diffusivity, decay, dt,
                         source=model.linear_sources(state, params),
                         fixed_value=model.linear_fixed_values(params))
        return replace(state, fields=state.fields.at[:count].set(fast))

    def step(self, state: State, params: Any, dt: jax.Array) -> State:
        """Advance by dt (h); events due at the step's start are applied first."""
        model = self.model
        state = model.apply_events(state, params, state.time, state.time + dt)
        if self.order == 1:
            kinds, fractions = (0, 1, 2), (1.0, 1.0, 1.0)
        else:
            kinds, fractions = (0, 1, 2, 1, 0), (0.5, 0.5, 1.0, 0.5, 0.5)
        active = self.active_substeps
        if len(active) == 1:
            # One operator: splitting is exact and halving its step only doubles the work.
            kinds, fractions = active, (1.0,)
        else:
            kept = [(k, f) for k, f in zip(kinds, fractions) if k in active]
            kinds, fractions = tuple(k for k, _ in kept), tuple(f for _, f in kept)
        substeps = (
            lambda current, h: model.react(current, params, h),
            lambda current, h: model.transport(current, params, h),
            lambda current, h: self.linear(current, params, h),
        )
        if getattr(model, "trace_substeps_once", False):
            # A large model traced once per sub-solver instead of once per use:
            # the Strang sequence R C L C R runs as a loop over a switch, which
            # roughly halves the program XLA compiles (and its compile time).
            kind_array = jnp.asarray(kinds, jnp.int32)
            fraction_array = jnp.asarray(fractions, dt.dtype)

            def substep(index, current):
                return jax.lax.switch(kind_array[index], substeps, current, dt * fraction_array[index])

            state = jax.lax.fori_loop(0, len(kinds), substep, state)
        else:
            for kind, fraction in zip(kinds, fractions):
                state = substeps[kind](state, dt * fraction)
        return replace(state, time=state.time + dt, step=state.step + 1)
