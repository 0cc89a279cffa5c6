"""Seeded, reproducible tissue maps for a lesion, and safe loading of user maps.

Everything here runs once, on the host, before anything compiles: numpy in
float64, arrays of shape ``grid.shape`` (the caller casts them to the run's
dtype). A 2-D problem (``nz = 1``) is handled by every builder: axes with one
cell are ignored for distances, smoothing and directions.

Maps built here (MODEL.md, "Fields per lesion"):

* C, viable tumour cells (cells·mm⁻³): ``initial_tumour`` = packing·K_max·mask,
  the mask a sphere (disc in 2-D) with a smoothly rough rim;
* V ∈ [0, 1], vessel density: ``vessel_map``, patchy vessels whose mean
  matches a requested density in the core, the rim and the host tissue;
* S ∈ [0, 1], stroma/ECM density: ``stromal_ring``, a band just outside the
  margin (the excluded phenotype);
* a ∈ [0, 1], antigenicity: ``antigenicity_map``, 1 − exp(−TMB/TMB₀) times a
  clonal map with lower-antigen patches.

``build_lesion_maps`` assembles all four from an immunophenotype preset;
``core_and_margin`` gives the readout regions; ``load_map`` reads a user map
from ``.npy`` or HDF5 and validates it.

Randomness goes only through ``np.random.default_rng(seed)``: the same seed
gives the same maps, bit for bit. ``build_lesion_maps`` derives one
independent stream per map from its seed with ``np.random.SeedSequence``,
and ``lesion_seeds`` derives one seed per lesion from a patient seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from tmesolve.errors import (
    ConfigError,
    check_finite,
    check_non_negative,
    check_positive,
    check_range,
)
from tmesolve.grid import Grid

__all__ = [
    "DEFAULT_TMB",
    "FRACTION_MAPS",
    "LESION_DEFAULTS",
    "MAP_NAMES",
    "PHENOTYPE_PRESETS",
    "PHENOTYPES",
    "antigenicity_map",
    "build_lesion_maps",
    "core_and_margin",
    "edge_distance_cap_um",
    "initial_tumour",
    "lesion_mask",
    "lesion_seeds",
    "load_map",
    "signed_distance_to_edge",
    "smooth_noise",
    "stromal_ring",
    "vessel_map",
]

Seed = int | np.random.SeedSequence

#: Keys of the dictionary returned by ``build_lesion_maps``.
MAP_NAMES = ("tumour_cells", "vessels", "stroma", "antigenicity")

#: Maps that are fractions in [0, 1]; every other map is a density (>= 0).
FRACTION_MAPS = ("vessels", "stroma", "antigenicity")

#: Immunophenotypes known to ``build_lesion_maps`` (MODEL.md preset table).
PHENOTYPES = ("inflamed", "excluded", "desert")

#: Tumour mutational burden (mut/Mb) a caller may use per phenotype when the
#: patient gives none: PARAMETERS.md, well-mixed presets (hot 15, intermediate
#: 6, cold 2), in line with KEYNOTE-158's TMB-high cut-off of 10 mut/Mb.
DEFAULT_TMB = MappingProxyType({"inflamed": 15.0, "excluded": 6.0, "desert": 2.0})

#: Map settings that differ between phenotypes. Sources: PARAMETERS.md,
#: "Spatial values from a 2-D prototype": vessels core / rim / host inflamed
#: 1 / 1 / 0.6, excluded 0.1–0.3 / 1 / 1 (0.2 chosen, mid-range), desert 0.35
#: everywhere; a stromal ring S = 1 over ~100 µm outside the margin for the
#: excluded phenotype only (200 µm turned excluded into desert). The other
#: phenotypes have no ring (width 0); overriding ``stroma_width_um`` adds one.
PHENOTYPE_PRESETS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "inflamed": MappingProxyType(
            {"vessel_core": 1.0, "vessel_rim": 1.0, "vessel_host": 0.6,
             "stroma_width_um": 0.0, "stroma_density": 1.0}
        ),
        "excluded": MappingProxyType(
            {"vessel_core": 0.2, "vessel_rim": 1.0, "vessel_host": 1.0,
             "stroma_width_um": 100.0, "stroma_density": 1.0}
        ),
        "desert": MappingProxyType(
            {"vessel_core": 0.35, "vessel_rim": 0.35, "vessel_host": 0.35,
             "stroma_width_um": 0.0, "stroma_density": 1.0}
        ),
    }
)

#: Settings shared by all phenotypes; any of these, or of a preset, may be
#: overridden by name in ``build_lesion_maps``.
LESION_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "centre_um": None,  # None: the box centre
        "roughness": 0.1,  # chosen: rms rim radius modulation, 10 %
        "shape_correlation_um": 100.0,  # chosen: a few bumps around a mm lesion
        "packing": 0.85,  # MODEL.md: start near packing, C ≈ 0.8–0.9 K_max
        "K_max": 4.0e5,  # MODEL.md: packing capacity (cells·mm⁻³)
        "rim_width_um": 100.0,  # chosen: the vascular rim of the tumour
        "vessel_correlation_um": 60.0,  # chosen: patches of a few voxels at 20 µm
        "stroma_offset_um": 0.0,  # ring starts at the margin
        "tmb_0": 6.5,  # PARAMETERS.md: TMB₀ = 6.5 mut/Mb, a(15) ≈ 0.9 (chosen)
        "clonal_patches": True,
        "patch_fraction": 0.2,  # chosen: a fifth of the lesion is subclonal
        "patch_level": 0.5,  # chosen: subclones carry half the antigen
        "antigen_correlation_um": 150.0,  # chosen: subclone patches ~ 0.3 mm
    }
)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _check_seed(key: str, seed: Any) -> Seed:
    """Accept a non-negative integer or a ``SeedSequence`` (from ``spawn``)."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(key, seed, "a non-negative integer seed")
    if seed < 0:
        raise ConfigError(key, seed, "a non-negative integer seed")
    return int(seed)


def _check_shape(key: str, array: np.ndarray, grid: Grid) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != grid.shape:
        raise ConfigError(key, f"an array of shape {array.shape}", f"shape {grid.shape}")
    return array


def _active_axes(grid: Grid) -> tuple[int, ...]:
    """Axes with more than one cell (the dimensions of the problem)."""
    return tuple(axis for axis, n in enumerate(grid.shape) if n > 1)


def _centre(grid: Grid, centre_um: Sequence[float] | None, key: str) -> tuple[float, ...]:
    """The lesion centre (µm); a 2-number centre takes z from the box centre."""
    if centre_um is None:
        return grid.centre_um
    centre = tuple(centre_um)
    if len(centre) == 2:
        centre = (centre[0], centre[1], grid.centre_um[2])
    if len(centre) != 3:
        raise ConfigError(key, centre_um, "2 or 3 numbers (µm)")
    return tuple(check_finite(f"{key}[{i}]", c) for i, c in enumerate(centre))


def _ramp(u: np.ndarray) -> np.ndarray:
    """Linear step from 0 to 1 over u ∈ [−½, ½]: a smooth edge one unit wide.

    A linear ramp centred on the edge keeps the summed volume of a mask equal
    to the volume inside the edge up to O(h²), so volumes are not quantised.
    """
    return np.clip(0.5 + u, 0.0, 1.0)


def _threshold_for_fraction(values: np.ndarray, fraction: float, width: float) -> float:
    """Threshold t with mean(ramp((values − t)/width)) = fraction, by bisection.

    The mean is continuous and non-increasing in t, equal to 1 for
    t ≤ min − width/2 and 0 for t ≥ max + width/2, so bisection converges to
    the requested fraction exactly (to round-off) for any sample of values.
    """
    low = float(values.min()) - width
    high = float(values.max()) + width
    for _ in range(200):
        middle = 0.5 * (low + high)
        if np.mean(_ramp((values - middle) / width)) > fraction:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def _soft_threshold(
    noise: np.ndarray, reference: np.ndarray, fraction: float, width: float
) -> np.ndarray:
    """ramp((noise − t)/width) with t fitted so its mean over ``reference`` is
    ``fraction``; exactly 0 for fraction 0 and exactly 1 for fraction 1."""
    if fraction <= 0.0:
        return np.zeros(noise.shape)
    if fraction >= 1.0:
        return np.ones(noise.shape)
    threshold = _threshold_for_fraction(reference, fraction, width)
    return _ramp((noise - threshold) / width)


def _ramp_width_in_noise_units(grid: Grid, correlation_um: float) -> float:
    """Noise increment that spans about one voxel, for soft thresholds.

    ``smooth_noise`` has unit variance and autocorrelation exp(−r²/(4ℓ²)), so
    each gradient component has variance −ρ''(0) = 1/(2ℓ²) and the gradient
    magnitude is about √(d/2)/ℓ in d dimensions; one voxel h spans a noise
    change of about h·√(d/2)/ℓ. Capped at 2 for white-ish noise.
    """
    dims = max(1, grid.ndim)
    if correlation_um <= 0.0:
        return 2.0
    return min(2.0, grid.spacing_um / correlation_um * math.sqrt(dims / 2.0))


def lesion_seeds(seed: int, count: int) -> list[int]:
    """Independent, reproducible seeds for ``count`` lesions of one patient.

    Spawns children of ``np.random.SeedSequence(seed)`` and draws one 32-bit
    integer from each: the same patient seed always gives the same list, and
    lesion i's seed does not depend on how many lesions follow it.
    """
    seed = _check_seed("seed", seed)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ConfigError("count", count, "a non-negative integer")
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    return [int(child.generate_state(1)[0]) for child in root.spawn(int(count))]


# --------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------


def smooth_noise(grid: Grid, correlation_um: float, seed: Seed = 0) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation.

    n = (w ∗ g_ℓ − mean)/std, with w standard-normal white noise per voxel and
    g_ℓ a Gaussian kernel of standard deviation ℓ = ``correlation_um`` (µm)
    along each axis with more than one cell; the resulting field has the
    autocorrelation exp(−r²/(4ℓ²)). The convolution is a product in Fourier
    space (numpy FFT). To keep the field from wrapping around the box (the
    FFT is periodic), the noise is drawn on a box padded by 3ℓ on each side
    and cropped.

    Args:
        grid: the lesion grid.
        correlation_um: ℓ (µm), >= 0; 0 gives (normalised) white noise.
        seed: non-negative integer or ``np.random.SeedSequence``.

    Returns:
        float64 array of ``grid.shape``; mean 0, std 1 over the box (all zeros
        for a one-voxel box).
    """
    correlation_um = check_non_negative("correlation_um", correlation_um)
    rng = np.random.default_rng(_check_seed("seed", seed))
    sigma_voxels = correlation_um / grid.spacing_um
    pad = [int(math.ceil(3.0 * sigma_voxels)) if n > 1 else 0 for n in grid.shape]
    padded_shape = tuple(n + 2 * p for n, p in zip(grid.shape, pad, strict=True))
    white = rng.standard_normal(padded_shape)
    if sigma_voxels > 0.0:
        spectrum = np.fft.rfftn(white, axes=(0, 1, 2))
        # Transfer function of a Gaussian of std σ voxels: exp(−(2πfσ)²/2).
        for axis, n in enumerate(padded_shape):
            freq = np.fft.rfftfreq(n) if axis == 2 else np.fft.fftfreq(n)
            shape = [1, 1, 1]
            shape[axis] = freq.size
            spectrum *= np.exp(-0.5 * (2.0 * np.pi * freq * sigma_voxels) ** 2).reshape(shape)
        white = np.fft.irfftn(spectrum, s=padded_shape, axes=(0, 1, 2))
    field = white[tuple(slice(p, p + n) for p, n in zip(pad, grid.shape, strict=True))]
    field = field - field.mean()
    spread = field.std()
    if spread > 0.0:
        field = field / spread
    return np.ascontiguousarray(field, dtype=np.float64)


def _interpolate(field: np.ndarray, grid: Grid, points_um: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a cell-centred field at points (3, M) in µm.

    Points outside the box take the value at the nearest cell (clamped);
    axes with one cell use that cell.
    """
    index_low = []
    weight_high = []
    for axis, n in enumerate(grid.shape):
        if n == 1:
            index_low.append(np.zeros(points_um.shape[1], dtype=np.intp))
            weight_high.append(np.zeros(points_um.shape[1]))
            continue
        position = (points_um[axis] - grid.origin_um[axis]) / grid.spacing_um - 0.5
        position = np.clip(position, 0.0, n - 1.0)
        low = np.minimum(np.floor(position).astype(np.intp), n - 2)
        index_low.append(low)
        weight_high.append(position - low)
    result = np.zeros(points_um.shape[1])
    for corner in range(8):
        offsets = [(corner >> axis) & 1 for axis in range(3)]
        weight = np.ones(points_um.shape[1])
        indices = []
        for axis in range(3):
            if grid.shape[axis] == 1:
                if offsets[axis]:
                    weight = weight * 0.0
                indices.append(index_low[axis])
                continue
            w = weight_high[axis] if offsets[axis] else 1.0 - weight_high[axis]
            weight = weight * w
            indices.append(index_low[axis] + offsets[axis])
        result += weight * field[tuple(indices)]
    return result


def _unit_directions(active_axes: tuple[int, ...], count: int) -> np.ndarray:
    """Near-uniform unit vectors (3, M) in the subspace of the active axes.

    3-D: a Fibonacci sphere (equal-area points); 2-D: equally spaced angles on
    a circle; 1-D: the two directions along the axis.
    """
    directions: np.ndarray
    if len(active_axes) == 3:
        k = np.arange(count) + 0.5
        polar = np.arccos(1.0 - 2.0 * k / count)
        azimuth = np.pi * (1.0 + 5.0**0.5) * k
        directions = np.stack(
            [np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)]
        )
        return directions
    result = np.zeros((3, count if len(active_axes) == 2 else 2))
    if len(active_axes) == 2:
        angle = 2.0 * np.pi * (np.arange(count) + 0.5) / count
        result[active_axes[0]] = np.cos(angle)
        result[active_axes[1]] = np.sin(angle)
    elif len(active_axes) == 1:
        result[active_axes[0]] = [1.0, -1.0]
    return result


# --------------------------------------------------------------------------
# Lesion and tumour cells
# --------------------------------------------------------------------------

#: Largest accepted rim roughness: with the perturbation clipped at ±3 rms,
#: the radius stays above 10 % of its mean.
MAX_ROUGHNESS = 0.3


def lesion_mask(
    grid: Grid,
    radius_um: float,
    centre_um: Sequence[float] | None = None,
    roughness: float = 0.1,
    correlation_um: float = 100.0,
    seed: Seed = 0,
) -> np.ndarray:
    """A sphere (disc when nz = 1) with a smoothly rough rim and a one-voxel edge.

    The rim radius depends on direction only (the lesion is star-shaped, no
    islands): R(x̂) = r·(1 + ε·ñ(x̂))/c, with ñ the smooth noise of
    ``smooth_noise`` (correlation ℓ) sampled on the sphere of radius r and
    rescaled to zero mean and unit rms over that sphere, clipped at ±3; ε the
    roughness; c = ⟨(1 + ε·ñ)^d⟩^(1/d) over directions, so the volume
    (1/d)∮R^d dΩ equals that of the round lesion: roughness changes the shape,
    not the size. The mask is the linear ramp clip(½ + (R(x̂) − |x − x₀|)/h, 0, 1),
    so its sum times the voxel volume tracks the exact volume (no quantising).

    Args:
        grid: the lesion grid.
        radius_um: mean radius r (µm), > 0.
        centre_um: x₀ (µm), 3 numbers (or 2 in 2-D); default the box centre.
        roughness: ε, rms relative modulation of the radius, in [0, 0.3];
            0 gives a round lesion. 0.1 chosen (a slightly irregular lesion).
        correlation_um: ℓ (µm) of the rim noise, > 0; about the size of a bump.
        seed: non-negative integer or ``np.random.SeedSequence``.

    Returns:
        float64 array of ``grid.shape`` in [0, 1].
    """
    radius_um = check_positive("radius_um", radius_um)
    roughness = check_range("roughness", roughness, 0.0, MAX_ROUGHNESS)
    correlation_um = check_positive("correlation_um", correlation_um)
    seed = _check_seed("seed", seed)
    centre = _centre(grid, centre_um, "centre_um")
    h = grid.spacing_um
    distance = grid.distance_from(centre)
    rim_radius = np.full(grid.shape, radius_um)
    active = _active_axes(grid)
    if roughness > 0.0 and active:
        noise = smooth_noise(grid, correlation_um, seed)
        centre_column = np.asarray(centre, dtype=np.float64)[:, None]
        # Enough direction samples to resolve the noise along the rim.
        rim_over_correlation = radius_um / correlation_um
        if len(active) == 3:
            samples = int(np.clip(64 * rim_over_correlation**2, 4096, 200_000))
        else:
            samples = int(np.clip(32 * rim_over_correlation, 1024, 100_000))
        directions = _unit_directions(active, samples)
        on_rim = _interpolate(noise, grid, centre_column + radius_um * directions)
        mean, rms = on_rim.mean(), on_rim.std()
        if rms <= 1e-12:
            rms = 1.0

        def relative_radius(values: np.ndarray) -> np.ndarray:
            return 1.0 + roughness * np.clip((values - mean) / rms, -3.0, 3.0)

        volume_factor = np.mean(relative_radius(on_rim) ** len(active)) ** (1.0 / len(active))
        # Only voxels that can fall on the rim need the direction noise.
        band = np.abs(distance - radius_um) <= 3.0 * roughness * radius_um + 2.0 * h
        if np.any(band):
            coordinates = zip(grid.coordinates, centre, strict=True)
            offsets = [coordinate - c for coordinate, c in coordinates]
            band_index = np.nonzero(band)
            band_distance = distance[band_index]
            safe = np.where(band_distance > 0.0, band_distance, 1.0)
            unit = np.zeros((3, band_distance.size))
            for axis in active:
                unit[axis] = np.broadcast_to(offsets[axis], grid.shape)[band_index] / safe
            values = _interpolate(noise, grid, centre_column + radius_um * unit)
            rim_radius[band_index] = radius_um * relative_radius(values) / volume_factor
    return _ramp((rim_radius - distance) / h)


def initial_tumour(
    grid: Grid,
    radius_um: float,
    packing: float = 0.85,
    K_max: float = 4.0e5,
    centre_um: Sequence[float] | None = None,
    roughness: float = 0.1,
    correlation_um: float = 100.0,
    seed: Seed = 0,
) -> np.ndarray:
    """Initial viable tumour cells C = packing·K_max·mask (cells·mm⁻³).

    Args:
        packing: fraction of the packing capacity, in (0, 1]; MODEL.md starts
            lesions near packing (0.8–0.9), a half-packed start spreads
            before it grows.
        K_max: packing capacity (cells·mm⁻³), ≈ 4×10⁵ (one cell ≈ 2,500 µm³).
        The other arguments are those of ``lesion_mask``.
    """
    packing = check_range("packing", packing, 0.0, 1.0)
    if packing == 0.0:
        raise ConfigError("packing", packing, "a number in (0, 1]")
    K_max = check_positive("K_max", K_max)
    mask = lesion_mask(grid, radius_um, centre_um, roughness, correlation_um, seed)
    return packing * K_max * mask


# --------------------------------------------------------------------------
# Distances to the lesion edge and readout regions
# --------------------------------------------------------------------------


def _squared_distance_um2(grid: Grid, targets: np.ndarray,
                          max_distance_um: float = math.inf) -> np.ndarray:
    """Exact squared Euclidean distance (µm²) from each voxel centre to the
    nearest ``targets`` voxel centre, where that distance is below
    ``max_distance_um``; +inf where there is no target, and possibly where the
    distance is at or above the cap.

    Separable: the squared distance is a sum over axes, so the 3-D transform
    is three 1-D min-plus transforms, g(i) = min_j f(j) + ((i − j)·h)², each
    computed by sweeping shifts s = 1, 2, … over whole arrays. Without a cap a
    sweep stops once s²h² exceeds every finite value and no reachable voxel is
    still +inf (tested every 4th shift): up to as many shifts as there are
    cells along the axis, O(n⁴) for an n³ box. With a cap it stops at
    s·h > ``max_distance_um``, O(n³) for a cap of a few voxels (the set-up
    times: docs/performance.md).

    The cap keeps the distances below it exact: the nearest target of such a
    voxel is within the cap along every axis, so the capped sweeps still
    reach it; every value they give is a real target's squared distance, and
    those above the cap's square are set to +inf at the end. (At the cap
    itself, rounding in s·h or in the square may drop a voxel: callers leave a
    voxel or more of slack.)
    """
    distance = np.where(targets, 0.0, np.inf)
    h = grid.spacing_um
    capped = math.isfinite(max_distance_um)
    for axis, n in enumerate(grid.shape):
        if n == 1:
            continue
        source = distance
        result = source.copy()
        if capped:
            last_shift = min(n - 1, math.floor(max_distance_um / h))
        else:
            last_shift = n - 1
            reachable = np.broadcast_to(np.isfinite(source).any(axis=axis, keepdims=True), grid.shape)
        for shift in range(1, last_shift + 1):
            cost = (shift * h) ** 2
            lead = [slice(None)] * 3
            lag = [slice(None)] * 3
            lead[axis] = slice(shift, None)
            lag[axis] = slice(None, n - shift)
            lead_t, lag_t = tuple(lead), tuple(lag)
            np.minimum(result[lead_t], source[lag_t] + cost, out=result[lead_t])
            np.minimum(result[lag_t], source[lead_t] + cost, out=result[lag_t])
            if capped or shift % 4:
                # The stopping test costs as much as a shift: every 4th, and never
                # under a cap, whose few shifts it would not shorten.
                continue
            finite = np.isfinite(result)
            if not np.any(reachable & ~finite) and (
                not np.any(finite) or cost > result[finite].max()
            ):
                break
        distance = result
    if capped:
        distance[distance > max_distance_um**2] = np.inf
    return distance


def signed_distance_to_edge(grid: Grid, inside: np.ndarray,
                            max_distance_um: float | None = None) -> np.ndarray:
    """Signed distance (µm) from each voxel centre to the edge of ``inside``.

    sd = d(x, outside voxels) − h/2 inside, −(d(x, inside voxels) − h/2)
    outside: positive inside, negative outside, ±h/2 on the two voxel layers
    that touch the edge (the edge is taken half-way between voxel centres, so
    sd is accurate to about h/2). Distances are exact Euclidean transforms of
    the voxel sets (``_squared_distance_um2``). The box walls are not an edge:
    with no outside voxel sd = +inf inside, with no inside voxel −inf.

    Args:
        inside: boolean array of ``grid.shape``.
        max_distance_um: if given (> 0), the voxel-centre distances d at or
            above it are not computed exactly: sd is +inf there inside and −inf
            outside, and exact where d is below it. A caller whose answer
            only depends on whether |sd| is below some threshold T, or on sd
            where |sd| < T, gets the same answer with a cap of T + h/2 plus
            some slack (``edge_distance_cap_um``), in O(n³) time instead of
            O(n⁴) for an n³ box.
    """
    inside = _check_shape("inside", inside, grid).astype(bool)
    cap = math.inf if max_distance_um is None else check_positive("max_distance_um", max_distance_um)
    half = 0.5 * grid.spacing_um
    to_outside = np.sqrt(_squared_distance_um2(grid, ~inside, cap))
    to_inside = np.sqrt(_squared_distance_um2(grid, inside, cap))
    return np.where(inside, to_outside - half, -(to_inside - half))


def edge_distance_cap_um(grid: Grid, threshold_um: float) -> float:
    """The ``max_distance_um`` (µm) for a caller of ``signed_distance_to_edge``
    that compares |sd| with a threshold T = ``threshold_um``, or has a ramp one
    voxel wide centred on T: T + 2h.

    sd = ±(d − h/2) with d the distance between voxel centres, so a comparison
    with T needs d exact below T + h/2 and a ramp clip(½ + (T − |sd|)/h, 0, 1)
    (the stromal ring's outer edge) below T + h; the second voxel is slack for
    rounding at the cap.
    """
    return threshold_um + 2.0 * grid.spacing_um


def _edge_distance(grid: Grid, inside: np.ndarray, given: np.ndarray | None,
                   threshold_um: float) -> np.ndarray:
    """``signed_distance_to_edge(grid, inside)``, or a precomputed one (checked).

    The caller's answer depends on |sd| only below ``threshold_um``, so the
    transform stops at ``edge_distance_cap_um``: the same answer. A given map
    may be capped the same way, or not at all.
    """
    if given is None:
        return signed_distance_to_edge(grid, inside, max_distance_um=edge_distance_cap_um(grid, threshold_um))
    given = _check_shape("edge_distance_um", given, grid)
    if np.any((given > 0) != inside):
        raise ConfigError(
            "edge_distance_um", "a distance map", "the signed distance of this lesion mask"
        )
    return given


def core_and_margin(
    grid: Grid,
    tumour_density: np.ndarray,
    threshold: float,
    margin_width_um: float = 100.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean readout regions: tumour core and invasive margin.

    The tumour is {C > threshold}. With sd its signed distance to the tumour
    edge (``signed_distance_to_edge``, positive inside, accurate to ~h/2):

        core   = sd > w/2          (inside, more than w/2 from the edge)
        margin = |sd| <= max(w/2, h/2)   (a band of width w centred on the edge)

    The band is never thinner than the voxel layer on each side of the edge.
    IHC scores the invasive margin as a 1 mm band (±500 µm) around the border
    (Galon et al., Science 2006; the Immunoscore convention); simulated
    lesions are about a millimetre across, so the default w = 100 µm (±50 µm,
    a few cell diameters) keeps a core. This host version is for set-up and
    tests; the in-loop readout uses its own jnp version of the same rule.

    Args:
        grid: the lesion grid.
        tumour_density: C (cells·mm⁻³), array of ``grid.shape``.
        threshold: C above which a voxel is tumour (cells·mm⁻³).
        margin_width_um: w (µm), >= 0.

    Returns:
        (core, margin): boolean arrays of ``grid.shape``; disjoint; both empty
        when no voxel is above the threshold.
    """
    density = _check_shape("tumour_density", tumour_density, grid)
    threshold = check_finite("threshold", threshold)
    margin_width_um = check_non_negative("margin_width_um", margin_width_um)
    inside = density > threshold
    half_width = 0.5 * margin_width_um
    # Only |sd| up to the band's half width matters (edge_distance_cap_um).
    band_um = max(half_width, 0.5 * grid.spacing_um)
    distance = signed_distance_to_edge(grid, inside, max_distance_um=edge_distance_cap_um(grid, band_um))
    core = distance > half_width
    margin = np.abs(distance) <= band_um
    return core, margin & ~core


# --------------------------------------------------------------------------
# Vessels, stroma, antigenicity
# --------------------------------------------------------------------------


def vessel_map(
    grid: Grid,
    lesion_mask: np.ndarray,
    density_core: float,
    density_rim: float,
    density_host: float,
    rim_width_um: float = 100.0,
    correlation_um: float = 60.0,
    seed: Seed = 0,
    *,
    edge_distance_um: np.ndarray | None = None,
) -> np.ndarray:
    """Patchy vessel density V ∈ [0, 1] with a requested mean in each region.

    Regions, from the lesion {mask >= 0.5} and its signed edge distance sd
    (``signed_distance_to_edge``):

    * core: inside the lesion, sd > rim_width (beyond the rim);
    * rim: inside the lesion, sd <= rim_width (the tumour periphery, where
      vessels are co-opted and sprout);
    * host: outside the lesion.

    Construction: one field n = ``smooth_noise(grid, correlation_um, seed)``;
    in each region R with requested density ρ_R the map is the soft threshold
    V = clip(½ + (n − t_R)/w, 0, 1), with w the noise change across about one
    voxel (edges of vessel patches one voxel wide) and t_R found by bisection
    so that mean_R V = ρ_R exactly. So vessels come in patches of size ~ℓ,
    ρ = 1 fills the region and ρ = 0 empties it, and the region means match the
    request to round-off on any grid. V jumps where the requested density
    changes (core/rim/host borders), as the presets intend.

    Args:
        grid: the lesion grid.
        lesion_mask: array of ``grid.shape`` in [0, 1] (e.g. ``lesion_mask``).
        density_core, density_rim, density_host: requested mean V, in [0, 1].
            PARAMETERS.md: inflamed 1 / 1 / 0.6, excluded 0.1–0.3 / 1 / 1,
            desert 0.35 everywhere.
        rim_width_um: width of the rim band inside the edge (µm), >= 0.
        correlation_um: ℓ (µm) of the vessel patches, >= 0.
        seed: non-negative integer or ``np.random.SeedSequence``.
        edge_distance_um: sd if already computed (saves the distance transform);
            exact, or capped no lower than ``edge_distance_cap_um`` of the
            largest distance compared here.
    """
    mask = _check_shape("lesion_mask", lesion_mask, grid)
    densities = {
        "core": check_range("density_core", density_core, 0.0, 1.0),
        "rim": check_range("density_rim", density_rim, 0.0, 1.0),
        "host": check_range("density_host", density_host, 0.0, 1.0),
    }
    rim_width_um = check_non_negative("rim_width_um", rim_width_um)
    correlation_um = check_non_negative("correlation_um", correlation_um)
    seed = _check_seed("seed", seed)
    inside = mask >= 0.5
    distance = _edge_distance(grid, inside, edge_distance_um, rim_width_um)
    regions = {
        "core": inside & (distance > rim_width_um),
        "rim": inside & (distance <= rim_width_um),
        "host": ~inside,
    }
    noise = smooth_noise(grid, correlation_um, seed)
    width = _ramp_width_in_noise_units(grid, correlation_um)
    vessels = np.zeros(grid.shape)
    for name, region in regions.items():
        if not np.any(region):
            continue
        values = noise[region]
        vessels[region] = _soft_threshold(values, values, densities[name], width)
    return vessels


def stromal_ring(
    grid: Grid,
    lesion_mask: np.ndarray,
    width_um: float = 100.0,
    density: float = 1.0,
    offset_um: float = 0.0,
    *,
    edge_distance_um: np.ndarray | None = None,
) -> np.ndarray:
    """Stroma S ∈ [0, 1]: a ring just outside the lesion margin (excluded phenotype).

    With d = −sd the distance outside the lesion edge (``signed_distance_to_edge``
    of {mask >= 0.5}, accurate to ~h/2):

        S = ρ·ramp((d − δ)/h)·ramp((δ + W − d)/h),   ramp(u) = clip(½ + u, 0, 1)

    a band from δ to δ + W outside the edge with linear edges one voxel wide,
    zero inside the lesion. PARAMETERS.md: W ≈ 100 µm, ρ = 1 (a 200 µm ring
    turned excluded into desert in the 2-D prototype).

    Args:
        width_um: W (µm), >= 0; 0 gives no stroma.
        density: ρ, in [0, 1].
        offset_um: δ, gap between the edge and the ring (µm), >= 0.
        edge_distance_um: sd if already computed (saves the distance transform);
            exact, or capped no lower than ``edge_distance_cap_um`` of the
            largest distance compared here.
    """
    mask = _check_shape("lesion_mask", lesion_mask, grid)
    width_um = check_non_negative("width_um", width_um)
    density = check_range("density", density, 0.0, 1.0)
    offset_um = check_non_negative("offset_um", offset_um)
    if width_um == 0.0 or density == 0.0:
        return np.zeros(grid.shape)
    h = grid.spacing_um
    outside_distance = -_edge_distance(grid, mask >= 0.5, edge_distance_um, offset_um + width_um)
    inner = _ramp((outside_distance - offset_um) / h)
    outer = _ramp((offset_um + width_um - outside_distance) / h)
    return density * inner * outer


def antigenicity_map(
    grid: Grid,
    lesion_mask: np.ndarray,
    tmb: float,
    tmb_0: float = 6.5,
    clonal_patches: bool = True,
    patch_fraction: float = 0.2,
    patch_level: float = 0.5,
    correlation_um: float = 150.0,
    seed: Seed = 0,
) -> np.ndarray:
    """Antigenicity a(x) = (1 − exp(−TMB/TMB₀))·clonal(x) ∈ [0, 1].

    clonal(x) is 1 (the clonal antigen) except in subclonal patches, where it
    falls to ``patch_level``: with n = ``smooth_noise(grid, correlation_um,
    seed)``, p = ramp((n − t)/w) (patch edges about one voxel wide) and
    clonal = 1 − (1 − patch_level)·p, t chosen by bisection so that the patch
    occupancy mean(p) over the lesion {mask >= 0.5} equals ``patch_fraction``.
    The same field and threshold extend outside the lesion, so the map has
    values everywhere: a is carried by the tissue, and tumour cells that move
    out of the initial lesion carry their clone's antigen with them.

    TMB₀ = 6.5 mut/Mb gives a(15) ≈ 0.90, a(6) ≈ 0.60, a(2) ≈ 0.26 for a clonal
    lesion (PARAMETERS.md, chosen).

    Args:
        tmb: tumour mutational burden (mut/Mb), >= 0.
        tmb_0: TMB₀ (mut/Mb), > 0.
        clonal_patches: False gives a uniform clonal map (no patches).
        patch_fraction: share of the lesion volume in subclonal patches, [0, 1].
        patch_level: relative antigenicity in the patches, [0, 1].
        correlation_um: ℓ (µm) of the patches, >= 0.
        seed: non-negative integer or ``np.random.SeedSequence``.
    """
    mask = _check_shape("lesion_mask", lesion_mask, grid)
    tmb = check_non_negative("tmb", tmb)
    tmb_0 = check_positive("tmb_0", tmb_0)
    patch_fraction = check_range("patch_fraction", patch_fraction, 0.0, 1.0)
    patch_level = check_range("patch_level", patch_level, 0.0, 1.0)
    correlation_um = check_non_negative("correlation_um", correlation_um)
    seed = _check_seed("seed", seed)
    clonal_level = 1.0 - math.exp(-tmb / tmb_0)
    clonal = np.ones(grid.shape)
    inside = mask >= 0.5
    if clonal_patches and patch_fraction > 0.0 and patch_level < 1.0 and np.any(inside):
        noise = smooth_noise(grid, correlation_um, seed)
        width = _ramp_width_in_noise_units(grid, correlation_um)
        patches = _soft_threshold(noise, noise[inside], patch_fraction, width)
        clonal = 1.0 - (1.0 - patch_level) * patches
    return clonal_level * clonal


# --------------------------------------------------------------------------
# A lesion from a preset
# --------------------------------------------------------------------------


def build_lesion_maps(
    grid: Grid,
    phenotype: str,
    tmb: float,
    radius_um: float,
    seed: int,
    *,
    key: str = "patient.lesions[i]",
    **overrides: Any,
) -> dict[str, np.ndarray]:
    """All initial maps of one lesion from an immunophenotype preset.

    Presets (MODEL.md table, values from PARAMETERS.md) in
    ``PHENOTYPE_PRESETS``; shared settings in ``LESION_DEFAULTS``; any of
    either may be overridden by keyword (e.g. ``vessel_core=0.1``,
    ``roughness=0``, ``centre_um=(...)``). The phenotype sets vessels and
    stroma; antigenicity follows the TMB the caller gives (``DEFAULT_TMB``
    has the preset values: inflamed 15, excluded 6, desert 2 mut/Mb).

    Each map draws from its own stream, spawned from
    ``np.random.SeedSequence(seed)``: the lesion shape, vessels and clonal
    patches are independent, and the same seed rebuilds them exactly.

    Args:
        grid: the lesion grid.
        phenotype: "inflamed", "excluded" or "desert".
        tmb: tumour mutational burden (mut/Mb), >= 0.
        radius_um: lesion radius (µm), > 0.
        seed: non-negative integer (one per lesion, see ``lesion_seeds``).
        key: configuration path of the lesion, used in error messages.

    Returns:
        {"tumour_cells": C (cells·mm⁻³), "vessels": V, "stroma": S,
        "antigenicity": a}, float64 arrays of ``grid.shape``.
    """
    if not isinstance(phenotype, str) or phenotype not in PHENOTYPE_PRESETS:
        raise ConfigError(f"{key}.phenotype", phenotype, "one of " + ", ".join(PHENOTYPES))
    settings: dict[str, Any] = {**LESION_DEFAULTS, **PHENOTYPE_PRESETS[phenotype]}
    for name, value in overrides.items():
        if name not in settings:
            raise ConfigError(
                f"{key}.{name}", value, "a lesion map setting: " + ", ".join(sorted(settings))
            )
        settings[name] = value

    def checked(name: str, check: Any, *bounds: float) -> float:
        return check(f"{key}.{name}", settings[name], *bounds)

    tmb = check_non_negative(f"{key}.tmb", tmb)
    radius_um = check_positive(f"{key}.radius_um", radius_um)
    seed = _check_seed(f"{key}.seed", seed)
    # Validate every setting under its own name before building anything.
    centre = _centre(grid, settings["centre_um"], f"{key}.centre_um")
    roughness = checked("roughness", check_range, 0.0, MAX_ROUGHNESS)
    shape_correlation_um = checked("shape_correlation_um", check_positive)
    packing = checked("packing", check_range, 0.0, 1.0)
    if packing == 0.0:
        raise ConfigError(f"{key}.packing", packing, "a number in (0, 1]")
    K_max = checked("K_max", check_positive)
    vessel_densities = [checked(name, check_range, 0.0, 1.0) for name in _VESSEL_SETTINGS]
    rim_width_um = checked("rim_width_um", check_non_negative)
    vessel_correlation_um = checked("vessel_correlation_um", check_non_negative)
    stroma_width_um = checked("stroma_width_um", check_non_negative)
    stroma_density = checked("stroma_density", check_range, 0.0, 1.0)
    stroma_offset_um = checked("stroma_offset_um", check_non_negative)
    tmb_0 = checked("tmb_0", check_positive)
    if not isinstance(settings["clonal_patches"], (bool, np.bool_)):
        raise ConfigError(f"{key}.clonal_patches", settings["clonal_patches"], "true or false")
    patch_fraction = checked("patch_fraction", check_range, 0.0, 1.0)
    patch_level = checked("patch_level", check_range, 0.0, 1.0)
    antigen_correlation_um = checked("antigen_correlation_um", check_non_negative)

    shape_stream, vessel_stream, antigen_stream = np.random.SeedSequence(seed).spawn(3)
    mask = lesion_mask(
        grid, radius_um, centre, roughness, shape_correlation_um, seed=shape_stream
    )
    tumour_cells = packing * K_max * mask
    # One distance transform serves the vessel regions and the stromal ring. They
    # depend on sd only below the rim width and the ring's outer edge, so the
    # transform stops beyond both (edge_distance_cap_um): the same maps, in O(n³).
    edge_distance = signed_distance_to_edge(
        grid, mask >= 0.5,
        max_distance_um=edge_distance_cap_um(grid, max(rim_width_um, stroma_offset_um + stroma_width_um)),
    )
    vessels = vessel_map(
        grid,
        mask,
        *vessel_densities,
        rim_width_um=rim_width_um,
        correlation_um=vessel_correlation_um,
        seed=vessel_stream,
        edge_distance_um=edge_distance,
    )
    stroma = stromal_ring(
        grid,
        mask,
        width_um=stroma_width_um,
        density=stroma_density,
        offset_um=stroma_offset_um,
        edge_distance_um=edge_distance,
    )
    antigenicity = antigenicity_map(
        grid,
        mask,
        tmb,
        tmb_0=tmb_0,
        clonal_patches=bool(settings["clonal_patches"]),
        patch_fraction=patch_fraction,
        patch_level=patch_level,
        correlation_um=antigen_correlation_um,
        seed=antigen_stream,
    )
    return {
        "tumour_cells": tumour_cells,
        "vessels": vessels,
        "stroma": stroma,
        "antigenicity": antigenicity,
    }


_VESSEL_SETTINGS = ("vessel_core", "vessel_rim", "vessel_host")


# --------------------------------------------------------------------------
# User maps
# --------------------------------------------------------------------------

_NPY_SUFFIXES = (".npy",)
_HDF5_SUFFIXES = (".h5", ".hdf5")
#: Values this far outside [0, 1] (round-off from a float32 export) are
#: clipped back; anything farther is refused.
_FRACTION_SLACK = 1e-6


def _refuse_dtype(key: str, path: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise ConfigError(
            key,
            f"{path} with dtype {dtype}",
            "real numbers (integer, float or bool; complex, object and text are refused)",
        )


def _refuse_shape(key: str, path: str, shape: tuple[int, ...], grid_shape: tuple) -> None:
    if tuple(shape) != tuple(grid_shape) and not (
        len(grid_shape) == 3 and grid_shape[2] == 1 and tuple(shape) == tuple(grid_shape[:2])
    ):
        raise ConfigError(
            key, f"{path} with shape {tuple(shape)}", f"shape {tuple(grid_shape)} (the lesion grid)"
        )


def _hdf5_datasets(handle: Any) -> list[str]:
    import h5py

    names: list[str] = []

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            names.append(name)

    handle.visititems(visit)
    return names


def _read_hdf5(
    path: str, dataset: str | None, key: str, grid_shape: tuple
) -> np.ndarray:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(key, path, "a readable HDF5 file", first_line) from None
    with handle:
        if dataset is None:
            names = _hdf5_datasets(handle)
            if len(names) != 1:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ConfigError(
                    key,
                    f"{path} with {len(names)} datasets ({shown or 'none'})",
                    "an HDF5 file with exactly one dataset, or a dataset path",
                )
            dataset = names[0]
        item = handle.get(dataset)
        if not isinstance(item, h5py.Dataset):
            raise ConfigError(
                f"{key}.dataset", dataset, f"the path of a dataset in {path}"
            )
        _refuse_dtype(key, f"{path}:{dataset}", item.dtype)
        # Check the shape before reading, so a wrong huge file fails at once.
        _refuse_shape(key, f"{path}:{dataset}", item.shape, grid_shape)
        return np.asarray(item[()])


def _read_npy(path: str, key: str) -> np.ndarray:
    with open(path, "rb") as handle:
        is_npy = handle.read(6) == b"\x93NUMPY"
    if not is_npy:
        # np.load would take any other file for a pickle and say so, misleadingly.
        raise ConfigError(key, path, "a valid .npy file (no .npy header found)")
    try:
        # Never unpickle: a pickle in a user file can run arbitrary code.
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error) or "pickle" in str(error).lower():
            raise ConfigError(
                key, path, "a numeric .npy array saved without pickling (object arrays refused)"
            ) from None
        raise ConfigError(key, path, "a valid .npy file", str(error).splitlines()[0]) from None
    except (OSError, EOFError) as error:
        raise ConfigError(key, path, "a valid .npy file", type(error).__name__) from None
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load of .npy gives arrays
        raise ConfigError(key, path, "a single numpy array")
    return array


def load_map(
    path: str | os.PathLike[str],
    name: str,
    grid_shape: Sequence[int],
    *,
    dataset: str | None = None,
    key: str | None = None,
) -> np.ndarray:
    """Read a user-supplied map from ``.npy`` or HDF5 and validate it.

    Refused, each with a one-line ``ConfigError`` naming ``key`` and the file:
    a missing file; an extension other than .npy, .h5, .hdf5; a pickled
    (object) array (``np.load`` runs with ``allow_pickle=False``); a dtype that
    is not real numeric (complex, object, text, structured); a shape other
    than ``grid_shape`` (an (nx, ny) array is accepted for an (nx, ny, 1)
    grid); NaN or infinities; values outside [0, 1] for the fraction maps
    ``FRACTION_MAPS`` (vessels, stroma, antigenicity; round-off within 1e-6
    is clipped) or below 0 for densities (every other name, e.g.
    ``tumour_cells`` in cells·mm⁻³). Booleans read as 0/1.

    Args:
        path: a ``.npy``, ``.h5`` or ``.hdf5`` file.
        name: which map, e.g. "vessels" (sets the valid range).
        grid_shape: (nx, ny, nz) of the lesion grid.
        dataset: HDF5 dataset path; may be left out if the file holds one.
        key: configuration key for messages; default ``maps.<name>``.

    Returns:
        float64 array of shape ``grid_shape``.
    """
    key = key if key is not None else f"maps.{name}"
    grid_shape = tuple(int(n) for n in grid_shape)
    path_text = os.fspath(path)
    if not os.path.isfile(path_text):
        raise ConfigError(key, path_text, "an existing .npy or .h5 file")
    suffix = os.path.splitext(path_text)[1].lower()
    if suffix in _NPY_SUFFIXES:
        if dataset is not None:
            raise ConfigError(f"{key}.dataset", dataset, "no dataset for a .npy file")
        array = _read_npy(path_text, key)
        _refuse_dtype(key, path_text, array.dtype)
        _refuse_shape(key, path_text, array.shape, grid_shape)
    elif suffix in _HDF5_SUFFIXES:
        array = _read_hdf5(path_text, dataset, key, grid_shape)
    else:
        raise ConfigError(key, path_text, "a .npy, .h5 or .hdf5 file")
    values = np.asarray(array, dtype=np.float64).reshape(grid_shape)
    finite = np.isfinite(values)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ConfigError(
            key,
            f"{path_text} with {int((~finite).sum())} NaN/inf values (first at {first})",
            "finite numbers only",
        )
    low, high = float(values.min()), float(values.max())
    if name in FRACTION_MAPS:
        if low < -_FRACTION_SLACK or high > 1.0 + _FRACTION_SLACK:
            raise ConfigError(
                key, f"{path_text} with values in [{low:g}, {high:g}]", f"{name} values in [0, 1]"
            )
        values = np.clip(values, 0.0, 1.0)
    elif low < 0.0:
        raise ConfigError(
            key, f"{path_text} with minimum {low:g}", f"{name} values >= 0 (a density)"
        )
    return values
