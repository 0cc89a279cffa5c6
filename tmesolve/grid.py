"""Uniform, cell-centred, finite-volume grid (static and hashable).

A 2-D problem is a 3-D grid with one cell along z (``nz = 1``); every operator
treats an axis of length one as having no flux across it, so a 2-D run gives
the same answer as a 3-D run that is uniform along z.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from tmesolve.errors import ConfigError, check_finite, check_positive, check_positive_int

#: Largest number of voxels per lesion accepted (1024³); larger grids are
#: almost always a typo and would exhaust memory before failing clearly.
MAX_VOXELS = 1024**3


@dataclasses.dataclass(frozen=True)
class Grid:
    """A box of ``shape`` cells of edge ``spacing_um`` µm.

    Attributes:
        shape: cells along (x, y, z); ``nz = 1`` for a 2-D problem.
        spacing_um: voxel edge h (µm); cubic voxels, default 20 µm.
        origin_um: position of the box corner (µm).
    """

    shape: tuple[int, int, int]
    spacing_um: float = 20.0
    origin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) == 2:
            shape = (shape[0], shape[1], 1)
        if len(shape) != 3:
            raise ConfigError("grid.shape", self.shape, "2 or 3 positive integers")
        shape = tuple(check_positive_int(f"grid.shape[{i}]", n) for i, n in enumerate(shape))
        if int(np.prod(shape)) > MAX_VOXELS:
            raise ConfigError("grid.shape", self.shape, f"at most {MAX_VOXELS} voxels per lesion")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_um", check_positive("grid.spacing_um", self.spacing_um))
        origin = tuple(self.origin_um)
        if len(origin) != 3:
            raise ConfigError("grid.origin_um", self.origin_um, "3 numbers (µm)")
        origin = tuple(check_finite(f"grid.origin_um[{i}]", v) for i, v in enumerate(origin))
        object.__setattr__(self, "origin_um", origin)

    @property
    def ndim(self) -> int:
        """Number of axes with more than one cell (2 or 3; 1 for a line)."""
        return sum(n > 1 for n in self.shape)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_volume_um3(self) -> float:
        """Volume of one voxel (µm³); a 2-D grid counts a slab of thickness h."""
        return self.spacing_um**3

    @property
    def voxel_volume_mm3(self) -> float:
        return self.voxel_volume_um3 * 1e-9

    @property
    def lengths_um(self) -> tuple[float, float, float]:
        """Box edge lengths L = n·h (µm)."""
        return tuple(n * self.spacing_um for n in self.shape)  # type: ignore[return-value]

    def axis_coordinates(self, axis: int) -> np.ndarray:
        """Cell-centre coordinates along ``axis`` (µm), float64."""
        n = self.shape[axis]
        return self.origin_um[axis] + (np.arange(n) + 0.5) * self.spacing_um

    @cached_property
    def coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable cell-centre coordinate arrays (x, y, z) in µm."""
        x = self.axis_coordinates(0)[:, None, None]
        y = self.axis_coordinates(1)[None, :, None]
        z = self.axis_coordinates(2)[None, None, :]
        return x, y, z

    @property
    def centre_um(self) -> tuple[float, float, float]:
        return tuple(o + 0.5 * L for o, L in zip(self.origin_um, self.lengths_um))  # type: ignore[return-value]

    def distance_from(self, point_um: tuple[float, float, float]) -> np.ndarray:
        """Euclidean distance (µm) of every cell centre from ``point_um``.

        Axes with one cell (2-D) ignore the point's coordinate on that axis.
        """
        x, y, z = self.coordinates
        squared = np.zeros(self.shape)
        for axis, coordinate in enumerate((x, y, z)):
            if self.shape[axis] > 1:
                squared = squared + (coordinate - point_um[axis]) ** 2
        return np.sqrt(squared)
