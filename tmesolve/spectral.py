"""Exact propagation of linear diffusion–decay in the box's eigenbasis.

For a species with constant diffusivity D (µm²/h), decay λ (h⁻¹) and a source
S (units·h⁻¹),

    ∂u/∂t = D Δu − λ u + S,

the box Laplacian with per-face no-flux or fixed-value walls has a separable
orthonormal eigenbasis on the cell-centred grid (per axis: DCT-II for
no-flux/no-flux, DST-II for fixed/fixed, DCT-IV and DST-IV for mixed walls).
In that basis every mode evolves independently and exactly (exponential time
differencing, ETD1, exact for a constant source):

    û(t+Δt) = e^{−μΔt} û(t) + (1 − e^{−μΔt})/μ · Ŝ,   μ = D κ² + λ.

A source that depends on the fields or on time gets a second-order step,
ETD2RK (Cox & Matthews 2002, J. Comput. Phys. 176: 430–455):
the ETD1 step above with S⁰ = S(uⁿ, t) is the predictor a, and the
corrector takes S as linear in time between S⁰ and S¹ = S(a, t + Δt),

    ûⁿ⁺¹ = â + φ₂ (Ŝ¹ − Ŝ⁰),   φ₂ = Δt·w₁(μΔt) = (e^{−μΔt} − 1 + μΔt)/(μ²Δt)  (:func:`etd2_weights`),

exact for a source linear in time. In terms of the two sources it is
e^{−μΔt} û + (φ₁ − φ₂) Ŝ⁰ + φ₂ Ŝ¹ with both weights ≥ 0, so non-negative
sources keep every weight of the step non-negative.

The step is unconditionally stable and positive-definite in every mode, so
D·Δt/h² of 10²–10⁴ is fine. Fixed-value walls (value g, the same on every
fixed face of that species) are handled by lifting: u = g + w, where w has
zero walls and the source S − λg (exact because Δg = 0).

Two spectra are offered: ``"exact"`` uses the continuous eigenvalues
κ² = Σ(π m/L)² (spectrally accurate for smooth data) and ``"second_order"``
those of the 7-point finite-volume Laplacian, (2/h)² sin²(κh/2), identical to
the explicit operator (second order in h, useful to verify against it).

The transform along each axis is a dense N×N matrix product: on CPUs and GPUs
a matmul of this size runs near peak and beats an FFT-based DCT for N ≤ 256
(``jax.scipy.fft.dctn`` measured 3.6× slower at 128³ on a 2-core CPU). On a
CPU a stack of fields is transformed one field at a time, which keeps each
field's products in the caches (:meth:`Eigenbasis._apply`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve.grid import Grid
from tmesolve.operators import FaceBoundary

SPECTRA = ("exact", "second_order")
_PRECISION = jax.lax.Precision.HIGHEST  # no TF32/bf16 shortcuts on GPUs


@functools.lru_cache(maxsize=64)
def axis_basis(n: int, spacing: float, low_fixed: bool, high_fixed: bool,
               spectrum: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal eigenbasis of −d²/dx² on n cells (float64) and its eigenvalues κ² (µm⁻²).

    Returns ``(modes, kappa_squared)`` with ``modes[m, j]`` the m-th mode at cell j;
    forward transform û = modes @ u, inverse u = modesᵀ @ û.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum: got {spectrum!r}; expected one of {SPECTRA}")
    j = np.arange(n) + 0.5
    m = np.arange(n)
    if not low_fixed and not high_fixed:
        wavenumber_index = m.astype(float)            # DCT-II
        modes = np.cos(np.pi * wavenumber_index[:, None] * j[None, :] / n)
    elif low_fixed and high_fixed:
        wavenumber_index = m + 1.0                     # DST-II
        modes = np.sin(np.pi * wavenumber_index[:, None] * j[None, :] / n)
    elif not low_fixed and high_fixed:
        wavenumber_index = m + 0.5                     # DCT-IV
        modes = np.cos(np.pi * wavenumber_index[:, None] * j[None, :] / n)
    else:
        wavenumber_index = m + 0.5                     # DST-IV
        modes = np.sin(np.pi * wavenumber_index[:, None] * j[None, :] / n)
    modes = modes / np.linalg.norm(modes, axis=1, keepdims=True)
    theta = np.pi * wavenumber_index / n  # κh
    if spectrum == "exact":
        kappa_squared = (theta / spacing) ** 2
    else:
        kappa_squared = (2.0 / spacing * np.sin(0.5 * theta)) ** 2
    return modes, kappa_squared


class Eigenbasis:
    """The separable eigenbasis of a grid with given walls (static, hashable by identity of its key)."""

    def __init__(self, grid: Grid, boundary: FaceBoundary, spectrum: str = "exact") -> None:
        self.grid = grid
        self.boundary = boundary
        self.spectrum = spectrum
        self._axes = []
        for axis, n in enumerate(grid.shape):
            low = boundary.is_dirichlet(axis, 0) and n > 1
            high = boundary.is_dirichlet(axis, 1) and n > 1
            self._axes.append(axis_basis(n, grid.spacing_um, low, high, spectrum))

    def kappa_squared(self, dtype) -> jnp.ndarray:
        """κ² on the (nx, ny, nz) mode grid, built by broadcasting (fused by XLA)."""
        kx, ky, kz = (jnp.asarray(k2, dtype) for _, k2 in self._axes)
        return kx[:, None, None] + ky[None, :, None] + kz[None, None, :]

    def _apply(self, u: jnp.ndarray, inverse: bool, field_by_field: bool | None = None) -> jnp.ndarray:
        """The transform of every field of u (..., nx, ny, nz).

        On a CPU (``field_by_field`` None: :func:`transforms_field_by_field`) a
        stack of fields is transformed one field at a time (``lax.map``, one
        loop body compiled), most likely so that each field's transposes and
        products stay in the caches, where on the whole stack XLA lays out the
        operands of the first and middle axes through memory. A round trip of
        three 128³ fields (the largest stack the TME spectral step transforms per
        lesion) took 0.52–0.67 of the stacked time on the 2-core development VM,
        of seven 0.56–0.57 (``python -m benchmarks.cpu_patterns``, its
        ``transforms``; ``benchmarks/results/cpu-patterns-runs/``), the same
        values bit for bit there; the full TME step at 1 × 128³ ran 1.16–1.3×
        faster (docs/performance.md).
        """
        if field_by_field is None:
            field_by_field = transforms_field_by_field()
        fields = u.reshape((-1,) + u.shape[-3:])
        if field_by_field and fields.shape[0] > 1:
            return jax.lax.map(lambda field: self._apply_to_stack(field, inverse), fields).reshape(u.shape)
        return self._apply_to_stack(u, inverse)

    def _apply_to_stack(self, u: jnp.ndarray, inverse: bool) -> jnp.ndarray:
        for axis, (modes, _) in enumerate(self._axes):
            if modes.shape[0] == 1:
                continue  # a single cell: the only mode is the constant, weight 1
            matrix = jnp.asarray(modes.T if inverse else modes, u.dtype)
            u = _apply_along_axis(matrix, u, u.ndim - 3 + axis)
        return u

    def propagate_separable(self, u: jnp.ndarray, diffusivity: jnp.ndarray, decay: jnp.ndarray,
                            dt: jnp.ndarray) -> jnp.ndarray:
        """e^{(DΔ − λ)dt} u without a source, one axis at a time.

        The propagator factorises, e^{−(Dκ² + λ)dt} = e^{−λdt}·Π_axes e^{−Dκ_a²dt}, so
        it is applied as one N×N matrix per axis, P_a = Mᵀ·diag(e^{−Dκ_a²dt})·M
        (built on the device per species, N³ flops): three matrix products
        instead of the six of a forward and an inverse transform.
        """
        species = u.shape[0]
        d = jnp.broadcast_to(jnp.asarray(diffusivity, u.dtype).reshape(species, -1)[:, 0], (species,))
        if jnp.ndim(diffusivity) > 1 and jnp.shape(diffusivity)[1] > 1:
            raise ValueError("propagate_separable: per-lesion diffusivities need the transform path")
        lam = jnp.asarray(decay, u.dtype)
        lam = lam.reshape(lam.shape + (1,) * (u.ndim - lam.ndim))
        for axis, (modes, kappa_squared) in enumerate(self._axes):
            if modes.shape[0] == 1:
                continue
            matrix = jnp.asarray(modes, u.dtype)
            factors = jnp.exp(-d[:, None] * jnp.asarray(kappa_squared, u.dtype)[None, :] * dt)   # (species, N)
            propagator = jnp.einsum("mi,sm,mj->sij", matrix, factors, matrix, precision=_PRECISION)
            ax = u.ndim - 3 + axis
            u = jnp.stack([_apply_along_axis(propagator[i], u[i], ax - 1) for i in range(species)])
        return u * jnp.exp(-lam * dt)

    def forward(self, u: jnp.ndarray, field_by_field: bool | None = None) -> jnp.ndarray:
        """Coefficients û of fields (..., nx, ny, nz); ``field_by_field``: see :meth:`_apply`."""
        return self._apply(u, False, field_by_field)

    def inverse(self, coefficients: jnp.ndarray, field_by_field: bool | None = None) -> jnp.ndarray:
        return self._apply(coefficients, True, field_by_field)


def transforms_field_by_field() -> bool:
    """Whether :class:`Eigenbasis` transforms a stack one field at a time: on the CPU backend.

    A GPU keeps the stacked products, which fill it better: a loop there would
    run each field's products one after another (neither form has been timed
    on a GPU).
    """
    return jax.default_backend() == "cpu"


def _apply_along_axis(matrix: jnp.ndarray, u: jnp.ndarray, axis: int) -> jnp.ndarray:
    """(matrix ⊗ 1) u along ``axis``: u'[..., i, ...] = Σ_j matrix[i, j] u[..., j, ...].

    Written as one matrix product over a reshaped view (no transposes) for the
    first and last axes, and as a dot_general in between: on CPUs this runs
    about twice as fast as moving the axis to the end and back.
    """
    n = u.shape[axis]
    before, after = int(np.prod(u.shape[:axis])), int(np.prod(u.shape[axis + 1:]))
    if after == 1:
        return jnp.matmul(u.reshape(before, n), matrix.T, precision=_PRECISION).reshape(u.shape)
    if before == 1:
        return jnp.matmul(matrix, u.reshape(n, after), precision=_PRECISION).reshape(u.shape)
    viewed = u.reshape(before, n, after)
    return jnp.einsum("ij,bjk->bik", matrix, viewed, precision=_PRECISION).reshape(u.shape)


def _phi1(rate: jnp.ndarray, dt: jnp.ndarray) -> jnp.ndarray:
    """(1 − e^{−μΔt})/μ, continuous at μ → 0 (= Δt)."""
    x = rate * dt
    small = x < 1e-4
    safe_rate = jnp.where(small, 1.0, rate)
    return jnp.where(small, dt * (1.0 - 0.5 * x), -jnp.expm1(-x) / safe_rate)


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


def propagate(basis: Eigenbasis, u: jnp.ndarray, diffusivity: jnp.ndarray, decay: jnp.ndarray,
              dt: jnp.ndarray, source: jnp.ndarray | None = None,
              fixed_value: jnp.ndarray | None = None,
              source_at_end: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
    """Advance ∂u/∂t = DΔu − λu + S over ``dt`` for a stack of species.

    Exact for a constant S (ETD1); with ``source_at_end`` second order for an S
    that varies with u and t (ETD2RK, module docstring).

    Args:
        basis: eigenbasis of the grid and walls.
        u: fields (species, ..., nx, ny, nz).
        diffusivity: D per species (µm²/h), shape (species,) or broadcastable
            to u's leading axes, e.g. (species, lesions).
        decay: λ per species (h⁻¹), same shape rules.
        dt: step (h).
        source: S⁰ (units·h⁻¹) of u's shape at the start of the step, or None.
        fixed_value: value g on fixed-value walls per species (ignored where all
            walls are no-flux, where the lift is an exact shift anyway).
        source_at_end: maps the predicted fields a (u's shape) to S¹ at t + Δt;
            None holds S⁰ over the step. Needs ``source``.
    """
    def expand(x):
        x = jnp.asarray(x, u.dtype)
        return x.reshape(x.shape + (1,) * (u.ndim - x.ndim))
    if source_at_end is not None and source is None:
        raise ValueError("propagate: source_at_end needs the source at the start of the step")
    if source is None and (fixed_value is None or not basis.boundary.any_dirichlet):
        return basis.propagate_separable(u, diffusivity, decay, dt)
    kappa_squared = basis.kappa_squared(u.dtype)
    rate = expand(diffusivity) * kappa_squared + expand(decay)
    start_source = None if source is None else jnp.broadcast_to(source, u.shape)
    lift = None
    if fixed_value is not None and basis.boundary.any_dirichlet:
        lift = expand(fixed_value)
        u = u - lift
        shifted = -expand(decay) * lift
        source = shifted if source is None else source + shifted
        source = jnp.broadcast_to(source, u.shape)
    coefficients = basis.forward(u) * jnp.exp(-rate * dt)
    if source is not None:
        coefficients = coefficients + _phi1(rate, dt) * basis.forward(jnp.broadcast_to(source, u.shape))
    result = basis.inverse(coefficients)
    if source_at_end is not None:
        predicted = result if lift is None else result + lift
        # The lift's constant source −λg is in both S⁰ and S¹, so it drops out of the difference.
        change = jnp.broadcast_to(source_at_end(predicted), u.shape) - start_source
        _, end_weight = etd2_weights(rate * dt)
        result = basis.inverse(coefficients + dt * end_weight * basis.forward(change))
    return result if lift is None else result + lift


def solve_poisson(basis: Eigenbasis, right_hand_side: jnp.ndarray) -> jnp.ndarray:
    """Solve Δp = f with the basis' walls (fixed walls at p = 0 need every axis fixed or a zero mean f).

    p̂ = −f̂/κ²; a zero eigenvalue (all-no-flux box) gets p̂ = 0 (the mean is free).
    """
    # The barrier materialises f first. The transform reads f through a strided
    # copy into its first matrix product, and XLA's CPU backend fused f's producer
    # into that copy: the TME pressure solve evaluated its whole right-hand side
    # (local terms, motility fluxes) in transposed order there, and the transport
    # sub-solver ran slower (both barriers: see operators.upwind_flux).
    right_hand_side = jax.lax.optimization_barrier(right_hand_side)
    kappa_squared = basis.kappa_squared(right_hand_side.dtype)
    safe = jnp.where(kappa_squared > 0, kappa_squared, 1.0)
    coefficients = jnp.where(kappa_squared > 0, -basis.forward(right_hand_side) / safe, 0.0)
    return basis.inverse(coefficients)
