"""The positive exponential integrators of the local reactions and the systemic ODEs."""

from __future__ import annotations

from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmesolve.spectral import etd2_weights
from tmesolve.stepping import exponential_trapezoid, positive_exponential_heun


def _exact_weights(z: float) -> tuple[float, float]:
    """w₀, w₁ in 50-digit decimal arithmetic (no cancellation at this precision)."""
    getcontext().prec = 50
    big = Decimal(z)
    decay = (-big).exp()
    return float((1 - decay - big * decay) / big**2), float((big - 1 + decay) / big**2)


@pytest.mark.parametrize("dtype_name, tolerance", [("float64", 1e-13), ("float32", 2e-5)])
def test_etd2_weights_match_high_precision(x64, dtype_name, tolerance):
    # float64: the closed forms lose ≤ 2ε/z above the series cut (z = 0.05), 1e-14;
    # float32: the same bound is 5e-6, and rounding z itself to float32 adds ~1e-7.
    dtype = jnp.dtype(dtype_name)
    zs = np.concatenate([np.logspace(-9, 3, 241), [0.049999, 0.050001]]).astype(dtype)
    w0, w1 = (np.asarray(w) for w in etd2_weights(jnp.asarray(zs)))
    exact = np.array([_exact_weights(float(z)) for z in zs])
    np.testing.assert_allclose(w0, exact[:, 0], rtol=tolerance)
    np.testing.assert_allclose(w1, exact[:, 1], rtol=tolerance)


def test_etd2_weights_limits():
    w0, w1 = etd2_weights(jnp.asarray([0.0, jnp.inf], jnp.float32))
    assert np.allclose(np.asarray(w0), [0.5, 0.0]) and np.allclose(np.asarray(w1), [0.5, 0.0])


def test_exponential_trapezoid_is_exact_for_constant_coefficients(x64):
    u, production, loss, dt = (jnp.asarray(v, jnp.float64) for v in (3.0, 2.0, 0.7, 5.0))
    exact = 3.0 * np.exp(-0.7 * 5.0) + 2.0 / 0.7 * (1 - np.exp(-0.7 * 5.0))
    assert float(exponential_trapezoid(u, production, loss, production, loss, dt)) == pytest.approx(exact, rel=1e-14)


def test_exponential_trapezoid_tracks_the_slow_manifold_of_a_stiff_species(x64):
    """u' = P(t) − Λu with Λ = 10⁴ h⁻¹ and P linear in t: u ≈ P/Λ − P'/Λ², at any Δt."""
    rate, slope = 1e4, 3.0e4
    production = lambda t: 1e4 + slope * t  # noqa: E731

    def exact(t, u0):
        steady = production(t) / rate - slope / rate**2
        return steady + (u0 - production(0.0) / rate + slope / rate**2) * np.exp(-rate * t)

    for dt in (0.5, 0.05, 0.005):
        new = exponential_trapezoid(jnp.asarray(7.0), jnp.asarray(production(0.0)), jnp.asarray(rate),
                                    jnp.asarray(production(dt)), jnp.asarray(rate), jnp.asarray(dt))
        assert float(new) == pytest.approx(exact(dt, 7.0), rel=1e-10)
        # The frozen mean of both ends lands half a step behind the manifold.
        behind = 0.5 * (production(0.0) + production(dt)) / rate
        assert abs(behind - exact(dt, 7.0)) > 1e3 * abs(float(new) - exact(dt, 7.0))


def test_positive_exponential_heun_is_second_order_and_positive(x64):
    """Logistic growth with harvesting, u' = r u (1 − u) − h u: order 2 and u ≥ 0 at any Δt."""
    r, h = 2.0, 0.5

    def production_and_loss(u):
        return r * u, r * u + h   # P = r u, Λ = r u + h: P − Λu = r u (1 − u) − h u

    def run(u, dt, steps):
        def body(_, value):
            return positive_exponential_heun(production_and_loss, value, dt)
        return jax.lax.fori_loop(0, steps, body, u)

    u0, t_end = 0.05, 4.0
    k = r - h
    exact = k * u0 / (r * u0 + (k - r * u0) * np.exp(-k * t_end))
    errors = [abs(float(run(jnp.asarray(u0), jnp.asarray(t_end / n), n)) - exact) for n in (40, 80, 160)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 1.9), orders
    # A step of 100 h against a loss rate that makes explicit Euler go negative at once.
    big = positive_exponential_heun(lambda u: (0.0 * u, 50.0 + 0.0 * u), jnp.asarray([1.0, 0.0]), jnp.asarray(100.0))
    assert np.all(np.asarray(big) >= 0.0)
