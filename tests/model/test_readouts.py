"""The longest-diameter readout against shapes whose extent is known and a plain loop; the core and margin pools."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tmesolve.grid import Grid
from tmesolve.readouts import longest_diameter_mm

SPACING_UM = 20.0


def _loop_diameter_mm(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """The definition voxel by voxel: max over the 13 directions of (max − min projection) + h."""
    directions = {tuple(c * next(x for x in v if x) for c in v)
                  for v in itertools.product((-1, 0, 1), repeat=3) if any(v)}
    result = []
    for lesion in mask:
        points = np.argwhere(lesion > 0) * grid.spacing_um
        if len(points) == 0:
            result.append(0.0)
            continue
        extents = [np.ptp(points @ (np.array(d) / np.linalg.norm(d))) for d in directions]
        result.append((max(extents) + grid.spacing_um) * 1e-3)
    return np.array(result)


def test_lines_along_an_axis_and_a_body_diagonal_and_an_empty_lesion():
    grid = Grid((12, 12, 12), SPACING_UM)
    mask = np.zeros((3, 12, 12, 12), np.float32)
    mask[0, 1:11, 5, 5] = 1.0                       # 10 voxels along x: 10·h
    for i in range(10):
        mask[1, i, i, i] = 1.0                      # body diagonal: 9·h·√3 + h
    diameter = np.asarray(longest_diameter_mm(jnp.asarray(mask), grid))
    expected = np.array([10 * SPACING_UM, 9 * SPACING_UM * math.sqrt(3) + SPACING_UM, 0.0]) * 1e-3
    # float32 coordinates of a few hundred µm: 1e-6 relative.
    np.testing.assert_allclose(diameter, expected, rtol=1e-5, atol=1e-9)


def test_random_masks_match_the_voxel_loop():
    grid = Grid((9, 7, 8), SPACING_UM)
    rng = np.random.default_rng(3)
    mask = (rng.random((4, 9, 7, 8)) < np.array([0.02, 0.1, 0.5, 0.0])[:, None, None, None]).astype(np.float32)
    diameter = np.asarray(longest_diameter_mm(jnp.asarray(mask), grid))
    np.testing.assert_allclose(diameter, _loop_diameter_mm(mask, grid), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape, radius", [((2, 18, 17, 16), 1), ((2, 18, 17, 16), 3), ((1, 18, 16, 1), 2),
                                           ((1, 5, 1, 24), 3)])
def test_core_and_outer_pools_are_box_erosion_and_dilation(shape, radius):
    """_pool takes the min or max over the box of ±radius voxels (outside the grid: absent
    for the max, present for the min), as scipy's filters do, in 3-D and in 2-D (nz = 1)."""
    from scipy import ndimage

    from tmesolve.readouts import _pool

    # A ball about the grid's centre of radius 6.7 voxels (a box of ±3 voxels fits well
    # inside: half-diagonal 5.2), and scattered voxels outside it. The last case has a
    # window wider than its first axis and a middle axis of length one.
    rng = np.random.default_rng(radius)
    index = np.indices(shape[1:]).astype(float)
    centre = (np.array(shape[1:]) - 1) / 2
    ball = sum((index[axis] - centre[axis]) ** 2 for axis in range(3)) <= 6.7**2
    mask = (ball[None] | (rng.random(shape) < 0.03)).astype(np.float32)
    size = (1,) + tuple(2 * radius + 1 if n > 1 else 1 for n in shape[1:])
    eroded = ndimage.minimum_filter(mask, size=size, mode="constant", cval=1.0)
    dilated = ndimage.maximum_filter(mask, size=size, mode="constant", cval=0.0)
    np.testing.assert_array_equal(np.asarray(_pool(jnp.asarray(mask), radius, maximum=False)), eroded)
    np.testing.assert_array_equal(np.asarray(_pool(jnp.asarray(mask), radius, maximum=True)), dilated)
    assert 0 < eroded.sum() < mask.sum() < dilated.sum() < mask.size   # the masks were neither empty nor full
