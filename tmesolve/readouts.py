"""Readouts of the TME model, computed on the device at record times (MODEL.md, 'Readouts').

Per lesion: viable burden (represented cells), tumour volume and longest
diameter of the thresholded mask, burden-based diameter d₀·(B/B₀)^{1/3}, mean
CD8 density (T + E) in the tumour core, the invasive margin and host tissue
(cells·mm⁻³, and the section equivalent cells·mm⁻² = density × section
thickness), the immunophenotype class, mean IFN-γ, CXCL9/10, PD-L1 and
anti-PD-1 in the tumour, and a flag when the tumour touches the box wall.
Per patient: plasma drug levels, occupancies, blood effectors T_b, memory M,
irAE index and grade, whether therapy is held.

Core and margin: the tumour mask (C above ``detect_frac``·K_max) is eroded and
dilated by k = round(w/2h) voxels with a (2k+1)³ cube (max/min pooling; the
box walls are not an edge). Core = eroded mask, margin = dilated − eroded
(a band of width ≈ w centred on the border, w = 100 µm by default).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve.model.systemic import irae_grade, plasma_concentration, plasma_occupancy

#: Phenotype codes written to the file (attribute ``codes`` names them).
PHENOTYPES = ("inflamed", "excluded", "desert")

#: (name, units, per_lesion) of every timeseries the TME model records.
TIMESERIES = (
    ("viable_burden", "cells", True),
    ("simulated_burden", "cells", True),
    ("tumour_volume_mm3", "mm^3", True),
    ("longest_diameter_mm", "mm", True),
    ("burden_diameter_mm", "mm", True),
    ("cd8_core_density", "cells/mm^3", True),
    ("cd8_margin_density", "cells/mm^3", True),
    ("cd8_host_density", "cells/mm^3", True),
    ("cd8_core_section", "cells/mm^2", True),
    ("cd8_margin_section", "cells/mm^2", True),
    ("immunophenotype", "code (0 inflamed, 1 excluded, 2 desert)", True),
    ("mean_ifn_gamma", "ng/mL", True),
    ("mean_cxcl9_10", "ng/mL", True),
    ("mean_pd_l1", "1", True),
    ("mean_anti_pd1", "ug/mL", True),
    ("touches_wall", "1", True),
)
SYSTEMIC = (
    ("plasma_anti_pd1", "ug/mL"),
    ("plasma_anti_pdl1", "ug/mL"),
    ("plasma_anti_ctla4", "ug/mL"),
    ("occupancy_pd1", "1"),
    ("occupancy_ctla4", "1"),
    ("blood_effectors", "cells/uL"),
    ("memory_t_cells", "cells/uL"),
    ("antigen_lymph_node", "cells"),
    ("irae_index", "1"),
    ("irae_grade", "1"),
    ("irae_peak_grade", "1"),
    ("therapy_held", "1"),
    ("therapy_discontinued", "1"),
    ("therapy_resumptions", "1"),
    ("steroid_level", "1"),
)


def _directions() -> np.ndarray:
    """13 unit directions (axes, face and body diagonals) for a Feret-type diameter."""
    vectors = set()
    for v in itertools.product((-1, 0, 1), repeat=3):
        if v == (0, 0, 0):
            continue
        first = next(c for c in v if c != 0)
        vectors.add(tuple(c * first for c in v))   # v and −v give the same extent
    array = np.array(sorted(vectors), dtype=float)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def longest_diameter_mm(mask: jax.Array, grid) -> jax.Array:
    """Largest extent of ``mask`` (lesions, nx, ny, nz) over 13 directions, + one voxel (mm).

    Exact along axes and diagonals; for an ellipsoid the true longest chord is
    underestimated by at most ~8 % (the angle to the nearest direction is ≤ 27°).
    The 13 projections are one broadcast (lesions, 13, nx, ny, nz) that XLA fuses
    into two reductions, rather than 26 separate ones (which tripled the
    readouts' compile time).
    """
    x, y, z = (jnp.asarray(c, mask.dtype) for c in grid.coordinates)
    directions = jnp.asarray(_directions(), mask.dtype)
    along = lambda axis: directions[:, axis, None, None, None]  # noqa: E731
    projection = along(0) * x + along(1) * y + along(2) * z          # (13, nx, ny, nz)
    present = (mask > 0)[:, None]                                     # (lesions, 1, nx, ny, nz)
    high = jnp.max(jnp.where(present, projection, -jnp.inf), axis=(2, 3, 4))
    low = jnp.min(jnp.where(present, projection, jnp.inf), axis=(2, 3, 4))
    extent = jnp.max(high - low, axis=1) + grid.spacing_um
    return jnp.where(jnp.any(mask > 0, axis=(1, 2, 3)), extent, 0.0) * 1e-3


def _pool(mask: jax.Array, radius: int, maximum: bool) -> jax.Array:
    """Max (dilation) or min (erosion) of ``mask`` (lesions, nx, ny, nz) over the box of
    ±``radius`` voxels along every axis longer than one; outside the grid counts as absent
    for the max and present for the min.

    One 1-D window per axis in turn: the max or min over a box is that over its rows,
    exactly, and costs 3·2r comparisons per voxel instead of (2r + 1)³ − 1 (XLA's
    CPU backend runs a 3-D window as a plain loop over it: one erosion of a 128³
    mask at r = 2 took 150 ms so, 1.7–2.0 ms in rows; ``python -m
    benchmarks.cpu_patterns``).
    """
    init, operation = (-jnp.inf, jax.lax.max) if maximum else (jnp.inf, jax.lax.min)
    pooled = mask
    for axis in range(1, mask.ndim):
        if mask.shape[axis] == 1:
            continue
        window = tuple(2 * radius + 1 if dim == axis else 1 for dim in range(mask.ndim))
        pooled = jax.lax.reduce_window(pooled, init, operation, window, (1,) * mask.ndim, "SAME")
    return pooled


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    count = jnp.sum(mask, axis=(1, 2, 3))
    return jnp.where(count > 0, jnp.sum(values * mask, axis=(1, 2, 3)) / jnp.maximum(count, 1.0), 0.0)


def tme_readouts(model, state, params) -> dict[str, jax.Array]:
    """All readouts of one record time (small arrays; no fields leave the device)."""
    p = params.model
    grid = model.grid
    fields = state.fields
    get = lambda name: fields[model.index(name)]  # noqa: E731
    C = get("tumour_cells")
    cd8 = get("effector_t_cells") + get("exhausted_t_cells")
    dtype = C.dtype
    voxel_mm3 = grid.voxel_volume_mm3

    tumour = (C > p["detect_frac"] * p["K_max"]).astype(dtype)
    core = _pool(tumour, model.margin_cells, maximum=False)
    outer = _pool(tumour, model.margin_cells, maximum=True)
    margin = outer - core
    host = 1.0 - outer
    section_mm = p["section_um"] * 1e-3

    simulated_burden = jnp.sum(C, axis=(1, 2, 3)) * voxel_mm3
    burden = simulated_burden * params.volume_scale
    ratio = jnp.maximum(simulated_burden / jnp.maximum(params.baseline_burden, 1e-30), 0.0)
    core_density = _masked_mean(cd8, core)
    margin_density = _masked_mean(cd8, margin)
    threshold = p["tau_phen"] / section_mm      # τ in 3-D density units
    phenotype = jnp.where(core_density >= threshold, 0, jnp.where(margin_density >= threshold, 1, 2))
    wall = jnp.zeros(C.shape[0], dtype)
    for axis in range(3):
        if C.shape[axis + 1] > 1:
            low = jnp.take(tumour, 0, axis=axis + 1)
            high = jnp.take(tumour, -1, axis=axis + 1)
            wall = jnp.maximum(wall, jnp.maximum(jnp.max(low, axis=(1, 2)), jnp.max(high, axis=(1, 2))))

    systemic = state.aux.systemic
    plasma = plasma_concentration(systemic, params.schedule.pk)
    occupancy = plasma_occupancy(systemic, p, params.schedule.pk)
    return {
        "viable_burden": burden,
        "simulated_burden": simulated_burden,
        "tumour_volume_mm3": jnp.sum(tumour, axis=(1, 2, 3)) * voxel_mm3,
        "longest_diameter_mm": longest_diameter_mm(tumour, grid),
        "burden_diameter_mm": params.baseline_diameter_mm * jnp.cbrt(ratio),
        "cd8_core_density": core_density,
        "cd8_margin_density": margin_density,
        "cd8_host_density": _masked_mean(cd8, host),
        "cd8_core_section": core_density * section_mm,
        "cd8_margin_section": margin_density * section_mm,
        "immunophenotype": phenotype.astype(dtype),
        "mean_ifn_gamma": _masked_mean(get("ifn_gamma"), tumour),
        "mean_cxcl9_10": _masked_mean(get("cxcl9_10"), tumour),
        "mean_pd_l1": _masked_mean(get("pd_l1"), tumour),
        "mean_anti_pd1": _masked_mean(get("anti_pd1"), tumour),
        "touches_wall": wall,
        "plasma_anti_pd1": plasma[0],
        "plasma_anti_pdl1": plasma[1],
        "plasma_anti_ctla4": plasma[2],
        "occupancy_pd1": occupancy[0],
        "occupancy_ctla4": occupancy[2],
        "blood_effectors": systemic.T_b,
        "memory_t_cells": systemic.M,
        "antigen_lymph_node": systemic.antigen_ln,
        "irae_index": systemic.R,
        "irae_grade": irae_grade(systemic.R, p).astype(dtype),
        "irae_peak_grade": irae_grade(systemic.R_peak, p).astype(dtype),
        "therapy_held": systemic.held,
        "therapy_discontinued": systemic.discontinued,
        "therapy_resumptions": systemic.resumes,
        "steroid_level": systemic.steroid,
    }
