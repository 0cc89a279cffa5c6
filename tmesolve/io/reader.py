"""Read a run: ``tmesolve.open(path)`` returns a :class:`RunData` over ``run.h5``.

Example::

    with tmesolve.open("outputs/2025-01-01/12-00-00") as run:
        print(run.status, run.times)
        tumour = run.field("tumour_cells", snapshot=-1, lesion=0)  # (nx, ny, nz)
        burden = run.timeseries("tumour_burden")                   # (n_records, L)
        ds = run.to_xarray("fields")                               # dims (time, lesion, x, y, z)

Only what the time axes count is returned: a run killed between writing a
snapshot's fields and extending ``/time`` leaves longer datasets whose tail
is not part of the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from tmesolve.grid import Grid
from tmesolve.io.hdf5 import (
    FIELDS,
    GRID,
    MAPS,
    RESPONSE,
    SYSTEMIC,
    TIME,
    TIMESERIES,
    RunFileError,
    check_schema_version,
    data_names,
    decode_attribute,
    read_checkpoint_from,
    resolve_run_path,
)

if TYPE_CHECKING:
    import xarray


class RunData:
    """Read-only view of one run file; use :func:`open_run` (``tmesolve.open``).

    Attributes:
        path: the run file.
        attrs: root attributes (provenance, status) as plain Python values.
        grid: the lesion grid.
        lesions: number of lesions L.
        schema_version: layout version of the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, locking: bool | None = None) -> None:
        self.path = resolve_run_path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no run file (expected run.h5 or its directory)")
        try:
            self._file = h5py.File(self.path, "r", locking=locking)
        except BlockingIOError:
            raise RunFileError(
                f"{self.path}: locked by the process writing it; open_run(path, locking=False) "
                "reads it anyway (up to the last completed snapshot)"
            ) from None
        try:
            self.schema_version = check_schema_version(self._file, self.path)
            self.attrs = {key: decode_attribute(value) for key, value in self._file.attrs.items()}
            grid_attrs = self._file[GRID].attrs
            self.lesions = int(grid_attrs["lesions"])
            self.grid = Grid(
                shape=tuple(int(n) for n in grid_attrs["shape"]),
                spacing_um=float(grid_attrs["spacing_um"]),
                origin_um=tuple(float(v) for v in grid_attrs["origin_um"]),
            )
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------ metadata

    @property
    def file(self) -> h5py.File:
        """The open h5py file, for anything this class does not cover."""
        return self._file

    @property
    def status(self) -> str:
        """``running`` (incomplete, resumable), ``complete`` or ``failed: <reason>``."""
        return str(self.attrs["status"])

    @property
    def times(self) -> np.ndarray:
        """Snapshot times (h), shape (n_snapshots,)."""
        return self._file[TIME][()]

    @property
    def n_snapshots(self) -> int:
        return int(self._file[TIME].shape[0])

    @property
    def field_names(self) -> tuple[str, ...]:
        return data_names(self._file[FIELDS])

    @property
    def timeseries_names(self) -> tuple[str, ...]:
        return data_names(self._file[TIMESERIES])

    @property
    def systemic_names(self) -> tuple[str, ...]:
        return data_names(self._file[SYSTEMIC])

    def units(self, name: str, group: str = FIELDS) -> str:
        """The ``units`` attribute of ``/<group>/<name>``."""
        return decode_attribute(self._dataset(group, name).attrs["units"])

    def _dataset(self, group: str, name: str) -> h5py.Dataset:
        names = data_names(self._file[group]) if group in self._file else ()
        if name not in names:
            raise KeyError(f"{self.path}: no {group} {name!r}; available: {list(names)}")
        return self._file[group][name]

    # ------------------------------------------------------------------ data

    def field(
        self, name: str, snapshot: int | slice | None = None, lesion: int | slice | None = None
    ) -> np.ndarray:
        """``/fields/<name>`` values.

        Args:
            snapshot: index into :attr:`times` (negative counts from the end), a
                slice, or None for all snapshots.
            lesion: lesion index, slice, or None for all lesions.

        Returns:
            shape (n_snapshots, L, nx, ny, nz) with both None; an integer index
            drops its axis, e.g. (nx, ny, nz) for one snapshot and one lesion.
        """
        dataset = self._dataset(FIELDS, name)
        count = self.n_snapshots
        if snapshot is None:
            snapshot = slice(None)
        if isinstance(snapshot, slice):
            snapshot = slice(*snapshot.indices(count))
        else:
            index = int(snapshot)
            if not -count <= index < count:
                raise IndexError(f"snapshot {index}: the run has {count} snapshots")
            snapshot = index % count
        if lesion is None:
            lesion = slice(None)
        elif not isinstance(lesion, slice):
            lesion = int(lesion)
            if not -self.lesions <= lesion < self.lesions:
                raise IndexError(f"lesion {lesion}: the run has {self.lesions} lesions")
        return dataset[snapshot, lesion]

    @property
    def n_records(self) -> int:
        return int(self._file[TIMESERIES][TIME].shape[0])

    @property
    def timeseries_time(self) -> np.ndarray:
        """Record times (h), shared by :meth:`timeseries` and :meth:`systemic`."""
        return self._file[TIMESERIES][TIME][()]

    def timeseries(self, name: str) -> np.ndarray:
        """A readout over records: (n_records,) or (n_records, L) for per-lesion ones."""
        return self._dataset(TIMESERIES, name)[: self.n_records]

    def systemic(self, name: str) -> np.ndarray:
        """A patient-level value over records, (n_records,)."""
        return self._dataset(SYSTEMIC, name)[: self.n_records]

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """The initial tissue-attached maps, name -> (L, nx, ny, nz)."""
        if MAPS not in self._file:
            return {}
        return {name: self._file[MAPS][name][()] for name in data_names(self._file[MAPS])}

    @property
    def response(self) -> dict[str, Any]:
        """RECIST assessments: time_h, sum_diameters_mm, category, best_response,
        time_to_progression_h, plus any extra items; {} before the first assessment."""
        if RESPONSE not in self._file:
            return {}
        group = self._file[RESPONSE]
        result: dict[str, Any] = {
            "time_h": group[TIME][()],
            "sum_diameters_mm": group["sum_diameters_mm"][()],
            "category": [decode_attribute(item) for item in group["category"][()].tolist()],
            "best_response": decode_attribute(group["best_response"][()]),
            "time_to_progression_h": float(group["time_to_progression_h"][()]),
        }
        result.update({key: decode_attribute(value) for key, value in group.attrs.items()})
        return result

    def checkpoint(self) -> tuple[dict[str, np.ndarray], int, float, dict]:
        """(arrays, step, time_h, meta) of the newest complete checkpoint."""
        return read_checkpoint_from(self._file, self.path)

    def to_xarray(self, group: str = FIELDS) -> xarray.Dataset:
        """One group as an xarray Dataset (lazy, via h5netcdf) with named dimensions.

        ``fields`` gives dims (time, lesion, x, y, z); ``timeseries`` and
        ``systemic`` (time[, lesion]) with record times; ``maps`` (lesion, x, y, z).
        Close the returned dataset when done.
        """
        try:
            import xarray
        except ImportError as error:
            raise ImportError(
                "RunData.to_xarray needs xarray and h5netcdf: pip install xarray h5netcdf"
            ) from error
        dataset = xarray.open_dataset(self.path, engine="h5netcdf", group=group)
        # A killed run may leave data rows past its time axis; h5netcdf sizes an
        # unlimited dimension by its longest variable, so cut back to what counts.
        counted = {FIELDS: self.n_snapshots, TIMESERIES: self.n_records, SYSTEMIC: self.n_records}
        if group in counted and dataset.sizes.get(TIME, 0) > counted[group]:
            dataset = dataset.isel({TIME: slice(0, counted[group])})
        return dataset

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> RunData:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self._file.id.valid:
            return f"RunData({str(self.path)!r}, closed)"
        return (
            f"RunData({str(self.path)!r}, status={self.status!r}, grid={self.grid.shape}, "
            f"lesions={self.lesions}, snapshots={self.n_snapshots}, "
            f"fields={list(self.field_names)})"
        )


def open_run(path: str | os.PathLike[str] | Path, *, locking: bool | None = None) -> RunData:
    """Open a run for reading (re-exported as ``tmesolve.open``).

    Args:
        path: ``run.h5`` or the run directory that holds it.
        locking: HDF5 file locking; None uses the HDF5 default. Pass False to
            peek at a run that is still being written (what you read may be
            one snapshot behind).

    Raises:
        SchemaVersionError: the file is newer than this tmesolve reads.
        RunFileError: the file is not a tmesolve run.
    """
    return RunData(path, locking=locking)
