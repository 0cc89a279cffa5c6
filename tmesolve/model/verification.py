"""Verification problems with known answers, written as ordinary models.

* :class:`DiffusionDecay` — ∂u/∂t = DΔu − λu + S, by the spectral propagator
  (``path="spectral"``) or the explicit finite-volume stencil (``"explicit"``).
* :class:`Chemotaxis` — ∂u/∂t = ∇·(D_u∇u − χu∇c) in a frozen attractant c;
  its no-flux equilibrium is u ∝ exp(χc/D_u) (Boltzmann).
* :class:`FisherKPP` — ∂u/∂t = DΔu + r u(1 − u); fronts travel at 2√(rD),
  and the Ablowitz–Zeppetella wave is an exact solution at speed 5/√6·√(rD).
* :class:`StiffUptake` — ∂u/∂t = DΔu + s(x)(u_b − u) − q(x) u/(u + K): a
  diffusing substance fed from sources and consumed with Michaelis–Menten
  kinetics at rates far above 1/Δt (oxygen's form), by the engine's stiff path
  (:mod:`tmesolve.implicit`); checked against a sparse direct solve of the same
  discrete equations.

They exercise every engine path the TME model uses (spectral propagation,
explicit conservative transport, positive reactions, splitting) against
analytic answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve._pytree import pytree_dataclass, replace
from tmesolve.errors import ConfigError, check_finite, check_non_negative, check_positive
from tmesolve.grid import Grid
from tmesolve.implicit import rosenbrock2_step
from tmesolve.model.base import Model
from tmesolve.model.species import Species, Transport
from tmesolve.operators import (
    FaceBoundary,
    advection_rate,
    diffusion_rate,
    explicit_stable_dt,
    gradient_face_velocities,
    max_face_speed,
    ssp_rk2,
)
from tmesolve.spectral import SPECTRA, Eigenbasis
from tmesolve.stepping import positive_exponential_heun

DIFFUSION_PATHS = ("spectral", "explicit")


@pytree_dataclass
class DiffusionDecayParams:
    """D (µm²/h), λ (h⁻¹) and a uniform source S (units·h⁻¹)."""

    diffusivity: jax.Array
    decay: jax.Array
    source: jax.Array


def diffusion_decay_params(diffusivity: float, decay: float = 0.0, source: float = 0.0,
                           dtype=jnp.float32) -> DiffusionDecayParams:
    """Validated parameters (errors name the argument, value and range)."""
    return DiffusionDecayParams(
        diffusivity=jnp.asarray(check_non_negative("diffusivity", diffusivity), dtype),
        decay=jnp.asarray(check_non_negative("decay", decay), dtype),
        source=jnp.asarray(check_finite("source", source), dtype),
    )


class DiffusionDecay(Model):
    """∂u/∂t = DΔu − λu + S on a box; one species ``u``."""

    #: S is a constant: ETD1 is exact for it.
    linear_sources_vary = False

    def __init__(self, grid: Grid, path: str = "spectral", boundary: FaceBoundary = FaceBoundary(),
                 spectrum: str = "exact", lesions: int = 1, with_source: bool = True) -> None:
        """``with_source=False`` declares S = 0 statically: the spectral path then uses the
        separable propagator (three per-axis products instead of nine)."""
        if path not in DIFFUSION_PATHS:
            raise ConfigError("path", path, f"one of {DIFFUSION_PATHS}")
        if spectrum not in SPECTRA:
            raise ConfigError("spectrum", spectrum, f"one of {SPECTRA}")
        self.grid, self.path, self.lesions, self.with_source = grid, path, lesions, with_source
        self.fast_boundary, self.spectrum = boundary, spectrum
        transport = Transport.FAST_LINEAR if path == "spectral" else Transport.CELL
        self._declare((Species("u", "u", "1", transport, "diffusing substance"),))

    def linear_coefficients(self, params):
        return params.diffusivity[None], params.decay[None]

    def linear_fixed_values(self, params):
        walls = [v for pair in self.fast_boundary.faces for v in pair if not isinstance(v, str)]
        return jnp.asarray([walls[0] if walls else 0.0], params.decay.dtype)

    def linear_sources(self, state, params):
        if self.path != "spectral" or not self.with_source:
            return None
        return jnp.broadcast_to(params.source, state.fields.shape)

    def _explicit_rate(self, u, params):
        return diffusion_rate(u, params.diffusivity, self.grid.spacing_um, self.fast_boundary) \
            - params.decay * u + params.source

    def transport(self, state, params, dt):
        if self.path != "explicit":
            return state
        return replace(state, fields=ssp_rk2(lambda u: self._explicit_rate(u, params), state.fields, dt))

    def stable_dt(self, state, params):
        if self.path != "explicit":
            return jnp.asarray(jnp.inf, state.fields.dtype)
        # λ adds a loss of λ per unit time; include it so decay-dominated runs stay positive.
        dt = explicit_stable_dt(self.grid.spacing_um, self.grid.ndim, params.diffusivity)
        return jnp.minimum(dt, 1.0 / jnp.maximum(params.decay, 1e-30)).astype(state.fields.dtype)


@pytree_dataclass
class ChemotaxisParams:
    """Cell diffusivity D_u (µm²/h), sensitivity χ (µm²·h⁻¹ per unit c), frozen attractant c."""

    diffusivity: jax.Array
    sensitivity: jax.Array
    attractant: jax.Array


class Chemotaxis(Model):
    """∂u/∂t = ∇·(D_u∇u) − ∇·(χ u ∇c), no-flux walls, c frozen."""

    def __init__(self, grid: Grid, lesions: int = 1) -> None:
        self.grid, self.lesions = grid, lesions
        self._declare((Species("cells", "u", "cells/mm^3", Transport.CELL, "motile cells"),))

    def _velocities(self, params):
        return gradient_face_velocities(params.attractant, params.sensitivity, self.grid.spacing_um)

    def transport(self, state, params, dt):
        h = self.grid.spacing_um
        velocities = self._velocities(params)

        def rate(u):
            return diffusion_rate(u, params.diffusivity, h) + advection_rate(u, velocities, h)

        return replace(state, fields=ssp_rk2(rate, state.fields, dt))

    def stable_dt(self, state, params):
        speed = max_face_speed(self._velocities(params))
        return explicit_stable_dt(self.grid.spacing_um, self.grid.ndim, params.diffusivity,
                                  speed).astype(state.fields.dtype)


def chemotaxis_params(diffusivity: float, sensitivity: float, attractant: np.ndarray,
                      dtype=jnp.float32) -> ChemotaxisParams:
    attractant = np.asarray(attractant, dtype=float)
    if not np.all(np.isfinite(attractant)):
        raise ConfigError("attractant", "array with NaN/inf", "finite values")
    return ChemotaxisParams(diffusivity=jnp.asarray(check_positive("diffusivity", diffusivity), dtype),
                            sensitivity=jnp.asarray(check_finite("sensitivity", sensitivity), dtype),
                            attractant=jnp.asarray(attractant, dtype))


@pytree_dataclass
class FisherKPPParams:
    """D (µm²/h) and growth rate r (h⁻¹)."""

    diffusivity: jax.Array
    rate: jax.Array


def fisher_kpp_params(diffusivity: float, rate: float, dtype=jnp.float32) -> FisherKPPParams:
    return FisherKPPParams(diffusivity=jnp.asarray(check_positive("diffusivity", diffusivity), dtype),
                           rate=jnp.asarray(check_positive("rate", rate), dtype))


class FisherKPP(Model):
    """∂u/∂t = DΔu + r u(1 − u): logistic growth (positive exponential Heun), diffusion spectral or explicit.

    u = 0 is unstable: round-off of the dense spectral transforms (1e-16 of the
    maximum, everywhere) grows like e^{rt} ahead of the front and fills the box
    by rt ≈ 37. The explicit stencil keeps u = 0 exactly zero ahead of the front,
    so long front-speed runs use ``path="explicit"``.
    """

    def __init__(self, grid: Grid, spectrum: str = "exact", path: str = "spectral") -> None:
        if path not in DIFFUSION_PATHS:
            raise ConfigError("path", path, f"one of {DIFFUSION_PATHS}")
        self.grid, self.spectrum, self.lesions, self.path = grid, spectrum, 1, path
        transport = Transport.FAST_LINEAR if path == "spectral" else Transport.CELL
        self._declare((Species("u", "u", "1", transport, "population fraction"),))

    def linear_coefficients(self, params):
        return params.diffusivity[None], jnp.zeros((1,), params.rate.dtype)

    def transport(self, state, params, dt):
        if self.path != "explicit":
            return state
        rate = lambda u: diffusion_rate(u, params.diffusivity, self.grid.spacing_um)  # noqa: E731
        return replace(state, fields=ssp_rk2(rate, state.fields, dt))

    def stable_dt(self, state, params):
        if self.path != "explicit":
            return jnp.asarray(jnp.inf, state.fields.dtype)
        return explicit_stable_dt(self.grid.spacing_um, self.grid.ndim, params.diffusivity).astype(state.fields.dtype)

    def react(self, state, params, dt):
        def production_and_loss(u):
            return params.rate * u, params.rate * u  # u' = r u − (r u)·u

        return replace(state, fields=positive_exponential_heun(production_and_loss, state.fields, dt))


@pytree_dataclass
class StiffUptakeParams:
    """D (µm²/h), supply rate s(x) (h⁻¹), supply level u_b, uptake capacity q(x)
    (units/h) and half-saturation K (units); s and q of the field's shape (lesions, nx, ny, nz)."""

    diffusivity: jax.Array
    supply_rate: jax.Array
    supply_level: jax.Array
    capacity: jax.Array
    half_saturation: jax.Array


class StiffUptake(Model):
    """∂u/∂t = DΔ_h u + s(x)(u_b − u) − q(x)·u/(u + K), no-flux walls; one fast, stiff species.

    The local terms are f(u) = s(u_b − u) − q u/(u + K), ∂f/∂u = −s − qK/(u + K)².
    :meth:`react` advances u with its diffusion by ROS2 (:func:`rosenbrock2_step`),
    as the TME model's reaction step advances oxygen.
    """

    stiff_fast = ("u",)

    def __init__(self, grid: Grid, lesions: int = 1) -> None:
        self.grid, self.lesions, self.spectrum = grid, lesions, "second_order"
        self._declare((Species("u", "u", "1", Transport.FAST_LINEAR, "consumed substance"),))
        self.basis = Eigenbasis(grid, FaceBoundary(), "second_order")

    def linear_coefficients(self, params):
        return params.diffusivity[None], jnp.zeros((1,), params.diffusivity.dtype)

    def local_terms(self, values: jax.Array, params: StiffUptakeParams) -> tuple[jax.Array, jax.Array]:
        """f(u) and ∂f/∂u (a negative u counts as 0)."""
        u = jnp.maximum(values, 0.0)
        saturation = u + params.half_saturation
        rate = params.supply_rate * (params.supply_level - u) - params.capacity * u / saturation
        derivative = -(params.supply_rate + params.capacity * params.half_saturation / saturation**2)
        return rate, jnp.broadcast_to(derivative, values.shape)

    def react(self, state, params, dt):
        fields, _ = rosenbrock2_step(self.basis, state.fields, params.diffusivity[None], dt,
                                     lambda u: self.local_terms(u, params))
        return replace(state, fields=fields)

    def explicit_rate(self, u: jax.Array, params: StiffUptakeParams) -> jax.Array:
        """∂u/∂t at u (the readable right-hand side, for references)."""
        return params.diffusivity * diffusion_rate(u, 1.0, self.grid.spacing_um) + self.local_terms(u, params)[0]


def ablowitz_zeppetella(x: np.ndarray, t: float, diffusivity: float, rate: float,
                        shift: float = 0.0) -> np.ndarray:
    """Exact travelling wave of u_t = D u_xx + r u(1 − u) (Ablowitz & Zeppetella 1979).

    u = [1 + exp(ξ/√6)]⁻², ξ = √(r/D)·(x − shift) − (5/√6)·r·t; speed 5/√6·√(rD).
    """
    xi = np.sqrt(rate / diffusivity) * (x - shift) - 5.0 / np.sqrt(6.0) * rate * t
    return 1.0 / (1.0 + np.exp(xi / np.sqrt(6.0))) ** 2


def gaussian_solution(grid: Grid, t: float, sigma0_um: float, diffusivity: float, decay: float,
                      centre_um=None, mass: float = 1.0) -> np.ndarray:
    """Free-space Gaussian: u = M e^{−λt} (2πσ²)^{−d/2} exp(−r²/2σ²), σ² = σ₀² + 2Dt (d active axes)."""
    centre = grid.centre_um if centre_um is None else centre_um
    variance = sigma0_um**2 + 2.0 * diffusivity * t
    r = grid.distance_from(centre)
    return mass * np.exp(-decay * t) * (2 * np.pi * variance) ** (-grid.ndim / 2) * np.exp(-(r**2) / (2 * variance))
