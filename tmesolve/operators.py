"""Finite-volume operators on the cell-centred grid.

Every operator acts on the last three axes of an array ``(..., nx, ny, nz)``
and returns the rate ``∂u/∂t`` (units of u per hour) contributed by a flux
``F`` (units of u·µm·h⁻¹):  ``∂u/∂t = −∇·F ≈ −(F_{i+½} − F_{i−½})/h``.
Face fluxes are built per axis; an axis of length one (a 2-D grid's z) has no
faces and so carries no flux, which is why a 2-D run equals a z-uniform 3-D
run.

Boundary conditions are per face: ``NO_FLUX`` (zero flux through the wall) or
a fixed value (Dirichlet) given as a number. Conservation: with no-flux walls
the face fluxes telescope, so ``Σ u`` changes only by round-off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tmesolve.errors import ConfigError

#: Marker for a no-flux wall.
NO_FLUX = "no_flux"

SPATIAL_AXES = (-3, -2, -1)


@dataclasses.dataclass(frozen=True)
class FaceBoundary:
    """Boundary conditions of the six box faces, ((x_lo, x_hi), (y_lo, y_hi), (z_lo, z_hi)).

    Each entry is ``NO_FLUX`` or a float (fixed value, Dirichlet). Static and
    hashable: the kind of condition changes the compiled code, so it is part
    of the configuration, not a traced number.
    """

    faces: tuple[tuple[object, object], ...] = ((NO_FLUX, NO_FLUX),) * 3

    def __post_init__(self) -> None:
        faces = tuple(tuple(pair) for pair in self.faces)
        if len(faces) != 3 or any(len(pair) != 2 for pair in faces):
            raise ConfigError("boundary.faces", self.faces, "3 pairs (low, high) of 'no_flux' or a number")
        for axis, pair in enumerate(faces):
            for side, kind in zip(("low", "high"), pair):
                if kind != NO_FLUX and not isinstance(kind, (int, float)):
                    raise ConfigError(f"boundary.faces[{axis}].{side}", kind, "'no_flux' or a number (fixed value)")
        object.__setattr__(self, "faces", faces)

    @classmethod
    def all_no_flux(cls) -> FaceBoundary:
        return cls()

    @classmethod
    def all_fixed(cls, value: float) -> FaceBoundary:
        return cls(((float(value), float(value)),) * 3)

    def is_dirichlet(self, axis: int, side: int) -> bool:
        return self.faces[axis][side] != NO_FLUX

    @property
    def any_dirichlet(self) -> bool:
        return any(kind != NO_FLUX for pair in self.faces for kind in pair)


def _spatial_axis(array: jnp.ndarray, axis: int) -> int:
    """Index of spatial axis 0/1/2 in an array (..., nx, ny, nz)."""
    return array.ndim - 3 + axis


def _slice(array: jnp.ndarray, axis: int, start: int | None, stop: int | None) -> jnp.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def forward_difference(u: jnp.ndarray, axis: int) -> jnp.ndarray:
    """u_{i+1} − u_i at the interior faces of spatial ``axis`` (length n−1)."""
    ax = _spatial_axis(u, axis)
    return _slice(u, ax, 1, None) - _slice(u, ax, None, -1)


def face_average(field: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Arithmetic mean of the two cells beside each interior face."""
    ax = _spatial_axis(field, axis)
    return 0.5 * (_slice(field, ax, 1, None) + _slice(field, ax, None, -1))


def _walled_faces(interior: jnp.ndarray, axis: int, low: jnp.ndarray | None,
                  high: jnp.ndarray | None) -> jnp.ndarray:
    """G at all n+1 faces of ``axis``: the low wall, the n−1 interior faces, the high wall
    (a wall given as None is 0: no flux)."""
    ax = _spatial_axis(interior, axis)
    edge_shape = list(interior.shape)
    edge_shape[ax] = 1
    zeros = jnp.zeros(edge_shape, interior.dtype)
    low = zeros if low is None else low
    high = zeros if high is None else high
    return jnp.concatenate([low, interior, high], axis=ax)


def _net_of_all_faces(all_faces: Sequence[jnp.ndarray | None], shape_like: jnp.ndarray | None) -> jnp.ndarray:
    """Σ over axes of G_{i+½} − G_{i−½} per cell, from G at all n+1 faces of each axis
    (None for an axis without faces)."""
    total = None
    for axis, faces in enumerate(all_faces):
        if faces is None:
            continue
        ax = _spatial_axis(faces, axis)
        difference = _slice(faces, ax, 1, None) - _slice(faces, ax, None, -1)
        total = difference if total is None else total + difference
    if total is None:
        if shape_like is None:
            raise ValueError("divergence needs shape_like when the grid has no faces")
        return jnp.zeros_like(shape_like)
    return total


def _net_face_values(face_values: Sequence[jnp.ndarray | None],
                     wall_values: Sequence[tuple[jnp.ndarray | None, jnp.ndarray | None]] | None,
                     shape_like: jnp.ndarray | None) -> jnp.ndarray:
    """Σ over axes of G_{i+½} − G_{i−½} per cell, from a face quantity G.

    ``face_values`` holds G at the n−1 interior faces of each axis (None for an
    axis without faces); ``wall_values`` per axis (G at the low wall, G at the
    high wall), each of the shape of one slice, None meaning 0 (no flux).
    """
    all_faces = [None if interior is None
                 else _walled_faces(interior, axis, *((None, None) if wall_values is None else wall_values[axis]))
                 for axis, interior in enumerate(face_values)]
    return _net_of_all_faces(all_faces, shape_like)


def divergence(face_fluxes: Sequence[jnp.ndarray | None], spacing: float, *,
               shape_like: jnp.ndarray | None = None) -> jnp.ndarray:
    """−∇·F from the fluxes at all faces of each axis (None for an axis without faces).

    Args:
        face_fluxes: per spatial axis, F at the n+1 faces (the low wall first, the
            high wall last), as :func:`upwind_flux` returns them, or None.
        spacing: h (µm).
        shape_like: an array of the cell shape (needed when all fluxes are None).

    Returns:
        −Σ_axes (F_{i+½} − F_{i−½})/h, of the cell shape.
    """
    if shape_like is not None:
        for axis, faces in enumerate(face_fluxes):
            ax = _spatial_axis(shape_like, axis)
            if faces is not None and faces.shape[_spatial_axis(faces, axis)] != shape_like.shape[ax] + 1:
                raise ValueError(f"divergence: axis {axis} has {faces.shape[_spatial_axis(faces, axis)]} faces; "
                                 f"expected all {shape_like.shape[ax] + 1} (the walls included) for "
                                 f"{shape_like.shape[ax]} cells")
    # One scale per cell after the sum over axes, not one division per axis.
    return (-1.0 / spacing) * _net_of_all_faces(face_fluxes, shape_like)


def _active_axes(u: jnp.ndarray) -> list[int]:
    return [axis for axis in range(3) if u.shape[_spatial_axis(u, axis)] > 1]


def _dirichlet_wall_differences(u: jnp.ndarray, boundary: FaceBoundary, axis: int):
    """h·∂u/∂x at the fixed-value walls of ``axis``, from the wall value and the cell half a
    spacing away: 2(u_0 − value) at the low wall, 2(value − u_{n−1}) at the high wall
    (None for a no-flux wall)."""
    ax = _spatial_axis(u, axis)
    low = high = None
    if boundary.is_dirichlet(axis, 0):
        low = 2.0 * (_slice(u, ax, 0, 1) - boundary.faces[axis][0])
    if boundary.is_dirichlet(axis, 1):
        high = 2.0 * (boundary.faces[axis][1] - _slice(u, ax, -1, None))
    return low, high


def diffusion_rate(u: jnp.ndarray, diffusivity: jnp.ndarray | float, spacing: float,
                   boundary: FaceBoundary = FaceBoundary()) -> jnp.ndarray:
    """Fickian diffusion ∇·(D∇u) with a spatially varying D (µm²/h).

    Face coefficient: arithmetic mean of the two cells, D_{i+½} = (D_i + D_{i+1})/2.
    Flux F_{i+½} = −D_{i+½}(u_{i+1} − u_i)/h. Second order for smooth D.

    Written as ∇·(D∇u) = 1/h² · Σ_axes (G_{i+½} − G_{i−½}) with G_{i+½} =
    D_{i+½}(u_{i+1} − u_i): one scale per cell. A scalar D factors out of the sum
    (G = u_{i+1} − u_i, scale D/h²): no face average and no product per face, a
    stencil stage in about half the time on the CPU backend
    (``python -m benchmarks.stencil_forms``).
    """
    diffusivity = jnp.asarray(diffusivity, u.dtype)
    scalar = diffusivity.ndim == 0
    coefficient = None if scalar else jnp.broadcast_to(diffusivity, u.shape)
    face_values, walls = [None, None, None], [(None, None)] * 3
    for axis in _active_axes(u):
        difference = forward_difference(u, axis)
        low, high = _dirichlet_wall_differences(u, boundary, axis)
        if not scalar:
            # D at the faces; a wall's coefficient is the wall cell's own D.
            ax = _spatial_axis(u, axis)
            difference = face_average(coefficient, axis) * difference
            low = None if low is None else _slice(coefficient, ax, 0, 1) * low
            high = None if high is None else _slice(coefficient, ax, -1, None) * high
        face_values[axis], walls[axis] = difference, (low, high)
    scale = (diffusivity if scalar else 1.0) / spacing**2
    return scale * _net_face_values(face_values, walls, u)


def ito_motility_rate(u: jnp.ndarray, motility: jnp.ndarray, spacing: float) -> jnp.ndarray:
    """Random motility in the Itô (Fokker–Planck) form ∇²(μ u), μ in µm²/h.

    Flux F_{i+½} = −((μu)_{i+1} − (μu)_i)/h: cells leave fast regions and pile
    up where they move slowly (e.g. T cells in dense stroma). No-flux walls.
    """
    product = motility * u
    differences = [None, None, None]
    for axis in _active_axes(u):
        differences[axis] = forward_difference(product, axis)
    # −∇·F = Σ_axes (G_{i+½} − G_{i−½})/h² with G = (μu)_{i+1} − (μu)_i: one scale per cell.
    return (1.0 / spacing**2) * _net_face_values(differences, None, u)


def _limited_slope(u: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Van Leer limited slope per cell (zero in the wall cells).

    s_i = 2 a b/(a + b) if a b > 0 else 0, with a = u_i − u_{i−1}, b = u_{i+1} − u_i.
    |s_i| ≤ 2 min(|a|, |b|), so the face values u_i ± s_i/2 stay within the
    neighbours' range: this keeps the upwind scheme positive under its CFL.
    """
    ax = _spatial_axis(u, axis)
    delta = forward_difference(u, axis)
    back, ahead = _slice(delta, ax, None, -1), _slice(delta, ax, 1, None)
    product = back * ahead
    safe_sum = jnp.where(product > 0, back + ahead, 1.0)
    interior = jnp.where(product > 0, 2.0 * product / safe_sum, 0.0)
    edge_shape = list(u.shape)
    edge_shape[ax] = 1
    zeros = jnp.zeros(edge_shape, u.dtype)
    return jnp.concatenate([zeros, interior, zeros], axis=ax)


def upwind_flux(u: jnp.ndarray, face_velocity: jnp.ndarray, axis: int, limited: bool = True,
                wall_fluxes: tuple[jnp.ndarray | None, jnp.ndarray | None] = (None, None)) -> jnp.ndarray:
    """Advective flux w·u at every face of ``axis``: upwinded at the interior faces,
    with a van Leer limiter, and the given fluxes at the two walls.

    Args:
        u: density (..., nx, ny, nz).
        face_velocity: w at the n−1 interior faces of ``axis`` (µm/h).
        limited: second-order MUSCL reconstruction (True) or first-order upwind.
        wall_fluxes: F at the low and the high wall, each of the shape of one
            slice of u across ``axis``; None is no flux.

    Returns:
        F at the n+1 faces of ``axis`` (the low wall first), for :func:`divergence`.
    """
    ax = _spatial_axis(u, axis)
    left, right = _slice(u, ax, None, -1), _slice(u, ax, 1, None)
    if limited:
        slope = _limited_slope(u, axis)
        left = left + 0.5 * _slice(slope, ax, None, -1)
        right = right - 0.5 * _slice(slope, ax, 1, None)
    flux = jnp.maximum(face_velocity, 0.0) * left + jnp.minimum(face_velocity, 0.0) * right
    # The barrier materialises the fluxes. The divergence reads every face twice
    # (the cells on either side), and XLA's CPU backend would otherwise fuse the
    # reconstruction into it and compute each face, slopes and all, twice: the
    # TME transport sub-solver ran slower so: with this barrier and the transform's
    # (now in solve_poisson) it took 7.5 against 17.1 ms at 1 × 32³
    # (`python -m benchmarks --only tme`, `substeps`, d43ebec against d453466).
    # The walls join the faces before the barrier. Joined after it, in the
    # divergence, XLA's CPU backend wrote the faces twice more per axis (each
    # cell's low faces and its high faces, shifted by one, as two buffers); now
    # it writes all faces once (one kernel with the fluxes along x and y, a
    # copy along z, the last axis).
    return jax.lax.optimization_barrier(_walled_faces(flux, axis, *wall_fluxes))


def advection_rate(u: jnp.ndarray, face_velocities: Sequence[jnp.ndarray | None], spacing: float,
                   limited: bool = True) -> jnp.ndarray:
    """−∇·(u w) for face velocities w (µm/h) given per axis at interior faces; no-flux walls."""
    fluxes = [None, None, None]
    for axis in _active_axes(u):
        if face_velocities[axis] is not None:
            fluxes[axis] = upwind_flux(u, face_velocities[axis], axis, limited)
    return divergence(fluxes, spacing, shape_like=u)


def gradient_face_velocities(potential: jnp.ndarray, coefficient: jnp.ndarray | float,
                             spacing: float) -> list[jnp.ndarray | None]:
    """Face velocities w = κ_{i+½}·(c_{i+1} − c_i)/h per axis (chemotaxis drift up ∇c).

    ``coefficient`` κ is a cell field (e.g. χ(c)·m) averaged to the faces.
    """
    coefficient = jnp.broadcast_to(jnp.asarray(coefficient, potential.dtype), potential.shape)
    velocities: list[jnp.ndarray | None] = [None, None, None]
    for axis in _active_axes(potential):
        velocities[axis] = face_average(coefficient, axis) * forward_difference(potential, axis) / spacing
    return velocities


def chemotaxis_rate(u: jnp.ndarray, attractant: jnp.ndarray, sensitivity: jnp.ndarray | float,
                    spacing: float) -> jnp.ndarray:
    """Chemotaxis −∇·(χ u ∇c): drift up the attractant gradient, upwinded and limited.

    Args:
        u: cell density.
        attractant: c, same spatial shape (broadcast over leading axes).
        sensitivity: χ(c)·m(x) as a cell field (µm²·h⁻¹ per unit of c).
    """
    velocities = gradient_face_velocities(attractant, sensitivity, spacing)
    return advection_rate(u, velocities, spacing)


def max_face_speed(face_velocities: Sequence[jnp.ndarray | None]) -> jnp.ndarray:
    """Σ over axes of max |w| (µm/h): the advective CFL uses this sum."""
    total = jnp.asarray(0.0)
    for velocity in face_velocities:
        if velocity is not None:
            total = total + jnp.max(jnp.abs(velocity))
    return total


def explicit_stable_dt(spacing: float, ndim: int, max_diffusivity: jnp.ndarray | float,
                       advective_speed_sum: jnp.ndarray | float = 0.0) -> jnp.ndarray:
    """Largest forward-Euler step that keeps the upwind/diffusion update positive (h).

    Each explicit stage is positive when the outflow fraction of a cell is ≤ 1:
    dt·(2·d·D_max/h² + 2·Σ_a max|w_a|/h) ≤ 1 (the factor 2 on advection covers the
    limited reconstruction, MUSCL's CFL ½). SSP-RK2 keeps this bound.
    """
    rate = 2.0 * ndim * jnp.asarray(max_diffusivity) / spacing**2 + 2.0 * jnp.asarray(advective_speed_sum) / spacing
    return jnp.where(rate > 0, 1.0 / jnp.maximum(rate, 1e-30), jnp.inf)


def ssp_rk2(rate: Callable[[jnp.ndarray], jnp.ndarray], u: jnp.ndarray, dt: jnp.ndarray) -> jnp.ndarray:
    """Strong-stability-preserving RK2 (Heun): u¹ = u + dt L(u); u⁺ = ½u + ½(u¹ + dt L(u¹)).

    A convex combination of forward-Euler steps: positive whenever Euler is.
    """
    # The barrier materialises the first stage: without it XLA fuses both stages
    # into one kernel and recomputes stage 1 for every neighbour stage 2 reads
    # (measured 20× slower at 64³ on CPU).
    stage = jax.lax.optimization_barrier(u + dt * rate(u))
    return 0.5 * u + 0.5 * (stage + dt * rate(stage))
