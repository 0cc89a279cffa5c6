"""The run file ``run.h5``: a writer that grows it as the run goes, and its checkpoint.

Layout (schema_version 1; the project's output contract, OUTPUT.md, governs)::

    /                   attrs: schema_version, tmesolve_version, created, config, overrides,
                        seed, backend, jax_version, dtype, git_commit (when known), status
    /time               (n_snapshots,) h, dimension scale "time"
    /grid               attrs: shape, spacing_um, origin_um, lesions
    /grid/x, y, z       cell-centre coordinates (um), dimension scales "x", "y", "z"
    /grid/lesion        lesion index 0..L-1, dimension scale "lesion"
    /fields/<name>      (n_snapshots, L, nx, ny, nz), dims (time, lesion, x, y, z)
    /maps/<name>        (L, nx, ny, nz), dims (lesion, x, y, z)
    /timeseries/time    (n_records,) h, dimension scale "time" of this group
    /timeseries/<name>  (n_records,) or (n_records, L), dims (time[, lesion])
    /systemic/<name>    (n_records,), dims (time,): same records as /timeseries
    /response/time      (n_assessments,) h, dimension scale; with sum_diameters_mm (mm)
                        and category (strings) along it, scalars best_response and
                        time_to_progression_h (NaN if none); replaced on each write
    /checkpoint/        the last full state, written atomically: arrays/<key>,
                        meta (attrs), attrs step, time_h, complete

Layout decisions worth knowing:

* **Dimension scales for h5netcdf/xarray.** h5netcdf names an axis by the base
  name of the attached scale but only treats a dataset as a dimension (with its
  size and coordinate values) when the scale lives in the group being opened
  or one of its parents. ``/grid/x`` is in a sibling group of ``/fields``, so
  each data group also holds *hard links* to the scales it uses
  (``/fields/time`` is the same HDF5 object as ``/time``, ``/fields/x`` the
  same as ``/grid/x``, ...). No data is duplicated, the scales keep one
  identity (a resize of ``/time`` is seen through every link), and
  ``xarray.open_dataset(path, engine="h5netcdf", group="fields")`` gives
  variables with dims ``(time, lesion, x, y, z)`` and coordinate values. The
  link names are therefore reserved: no field, map or readout may be called
  ``time``, ``lesion``, ``x``, ``y`` or ``z``.
* **Records.** ``/systemic`` shares the record times of ``/timeseries``:
  ``/systemic/time`` is a hard link to ``/timeseries/time``, and
  :meth:`RunWriter.append_record` writes one row of both at once.
* **Crash safety.** Every append writes the data first and extends the time
  axis last, then flushes, so ``len(/time)`` counts complete snapshots; the
  reader trusts it and :meth:`RunWriter.truncate_after` trims any longer
  dataset a crash left behind. Files use ``libver=("earliest", "v110")``:
  the old superblock has no "open for writing" flag, so a file whose writer
  was killed opens without ``h5clear``, and Debian's ``h5dump`` 1.10 reads it.
  Flushing hands the data to the operating system (survives SIGKILL); it does
  not ``fsync`` (a node crash may lose the last snapshots).
* **Checkpoint.** Written to ``/checkpoint_tmp``, marked complete by an
  attribute written last, flushed, then moved over ``/checkpoint``. Arrays sit
  in ``/checkpoint/arrays`` under their key with ``%``, ``/`` and a leading
  ``.`` percent-escaped (the original key is also kept in attribute ``key``);
  ``meta`` is stored as attributes of ``/checkpoint/meta``. HDF5 reuses the
  space of the deleted checkpoint while the file stays open, so repeated
  checkpoints do not grow the file without bound (a resume leaves at most
  one checkpoint's worth of unreclaimed space).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tmesolve.errors import ConfigError
from tmesolve.grid import Grid

#: Version of the layout above; bump on any incompatible change.
SCHEMA_VERSION = 1

#: File name of the run file inside a run directory.
RUN_FILE_NAME = "run.h5"

#: HDF5 format bounds: the oldest object formats (readable by HDF5 1.10 tools,
#: no superblock status flags that block reopening a killed run's file).
LIBVER = ("earliest", "v110")

# Group and dataset names of the layout, used by the writer, reader and XDMF.
TIME = "time"
GRID = "grid"
FIELDS = "fields"
MAPS = "maps"
TIMESERIES = "timeseries"
SYSTEMIC = "systemic"
RESPONSE = "response"
CHECKPOINT = "checkpoint"
CHECKPOINT_TMP = "checkpoint_tmp"
CHECKPOINT_ARRAYS = "arrays"
CHECKPOINT_META = "meta"
LESION = "lesion"
SPATIAL_AXES = ("x", "y", "z")
#: Names that data groups use for their hard-linked dimension scales.
RESERVED_NAMES = frozenset((TIME, LESION, *SPATIAL_AXES))

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED_PREFIX = "failed: "
#: Exceptions (by class name) that stop a run from outside without it being wrong,
#: besides KeyboardInterrupt and SystemExit: submitit raises UncompletedJobError in
#: a job out of requeues at its time limit; resubmitted, it continues (resume=auto).
STOPPED_FROM_OUTSIDE = frozenset({"UncompletedJobError"})

#: Provenance attributes the caller must give to :meth:`RunWriter.create`.
REQUIRED_PROVENANCE = ("config", "overrides", "seed", "backend")

#: gzip level for field snapshots: level 1 is several times faster than the
#: default 4 and, after the byte shuffle, compresses float fields nearly as well.
COMPRESSION_LEVEL = 1

#: HDF5 refuses chunks of 4 GiB or more; above this size a snapshot chunk is
#: split along x (only for grids far beyond the usual 128^3-256^3).
MAX_CHUNK_BYTES = 1 << 30

#: The writer rewrites run.xmf after each snapshot only while it lists at most
#: this many attributes (snapshots x lesions x (fields + maps); ~4 MB of XML,
#: ~0.1 s); beyond, at checkpoints, status changes and close (see xdmf.py).
XDMF_LIVE_MAX_ATTRIBUTES = 10_000

#: Growing 1-D record datasets are chunked this many rows at a time.
RECORD_CHUNK_ROWS = 256

#: Checkpoint arrays at least this large are compressed (small ones are not
#: worth a filter pipeline).
CHECKPOINT_COMPRESS_MIN_SIZE = 4096

_DTYPES = ("float32", "float64")


class RunFileError(ValueError):
    """The run file is missing, of the wrong kind or incomplete (one-line message)."""


class SchemaVersionError(RunFileError):
    """The run file was written with a newer layout than this tmesolve reads."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field stored per snapshot under ``/fields/<name>``.

    Attributes:
        name: snake_case long name (``tumour_cells``), from the species list.
        units: units of the stored values (``cells/mm^3``), taken as given.
        long_name: human-readable description (``viable tumour cells``).
    """

    name: str
    units: str
    long_name: str


# --------------------------------------------------------------------------- helpers


def resolve_run_path(path: str | os.PathLike[str]) -> Path:
    """The run file named by ``path``: a file itself, or ``run.h5`` inside a run directory.

    A path that does not exist yet is a directory unless it has a suffix
    (``out/run.h5`` is a file, ``outputs/job7`` a directory).
    """
    path = Path(path)
    if path.is_dir() or (not path.exists() and not path.suffix):
        return path / RUN_FILE_NAME
    return path


def check_schema_version(file: h5py.File, path: Path) -> int:
    """Return the file's schema version; refuse files that are not runs or are newer."""
    if "schema_version" not in file.attrs:
        raise RunFileError(f"{path}: not a tmesolve run file (no schema_version attribute)")
    version = int(file.attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: schema_version {version} is newer than {SCHEMA_VERSION}, the newest "
            "this tmesolve reads; upgrade tmesolve to read it"
        )
    return version


def is_dimension_scale(dataset: h5py.Dataset) -> bool:
    """True for a dataset marked as an HDF5 dimension scale (our hard-linked axes)."""
    return dataset.attrs.get("CLASS", b"") == b"DIMENSION_SCALE"


def data_names(group: h5py.Group) -> tuple[str, ...]:
    """Names of the data datasets of a group (scales and subgroups left out), sorted."""
    return tuple(
        sorted(
            name
            for name, item in group.items()
            if isinstance(item, h5py.Dataset) and not is_dimension_scale(item)
        )
    )


def decode_attribute(value: Any) -> Any:
    """An attribute as plain Python: str, list of str, int/float/bool, or ndarray."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return [decode_attribute(item) for item in value.tolist()]
        if value.dtype.kind == "S":
            return [item.decode("utf-8") for item in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def set_attribute(obj: h5py.Group | h5py.Dataset, key: str, value: Any) -> None:
    """Store ``value`` as an attribute; strings as variable-length UTF-8.

    ``None`` is skipped (an attribute "when known"); a mapping is stored as a
    JSON string; a list or tuple of strings as a string array.
    """
    if value is None:
        return
    if isinstance(value, str):
        obj.attrs.create(key, value, dtype=h5py.string_dtype("utf-8"))
    elif isinstance(value, Mapping):
        obj.attrs.create(key, json.dumps(value, sort_keys=True, default=str),
                         dtype=h5py.string_dtype("utf-8"))
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        obj.attrs.create(key, np.array(value, dtype=h5py.string_dtype("utf-8")))
    else:
        obj.attrs[key] = np.asarray(value)


def _escape_key(key: str) -> str:
    """An HDF5 link name for a checkpoint key: ``%``, ``/`` and a leading ``.`` escaped."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"checkpoint key {key!r}: expected a non-empty string")
    escaped = key.replace("%", "%25").replace("/", "%2F")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    return escaped


def _unescape_key(name: str) -> str:
    """Inverse of :func:`_escape_key` (``%25`` last so escaped percents stay literal)."""
    if name.startswith("%2E"):
        name = "." + name[3:]
    return name.replace("%2F", "/").replace("%25", "%")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"output.{kind}", name, "a non-empty name without '/' or leading '.'")
    if name in RESERVED_NAMES:
        raise ConfigError(
            f"output.{kind}", name, f"a name other than {sorted(RESERVED_NAMES)} (axis names)"
        )
    return name


def _check_unique(kind: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"output.{kind}", name, "each name once")
        seen.add(name)


def _package_version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _tmesolve_version() -> str:
    try:
        from tmesolve import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        return _package_version("tmesolve")


def _now_iso() -> str:
    """Local time with its UTC offset, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def _status_line(status: str) -> str:
    if status in (STATUS_RUNNING, STATUS_COMPLETE):
        return status
    if status.startswith(STATUS_FAILED_PREFIX) and len(status) > len(STATUS_FAILED_PREFIX):
        # One line, so a batch log or `h5dump -a /status` shows it whole.
        return " ".join(status.split())
    raise ValueError(f"status {status!r}: expected 'running', 'complete' or 'failed: <reason>'")


def _checkpoint_is_complete(group: h5py.Group) -> bool:
    return bool(group.attrs.get("complete", False))


def find_checkpoint(file: h5py.File) -> h5py.Group | None:
    """The newest complete checkpoint group, or None.

    ``/checkpoint_tmp`` is newer than ``/checkpoint`` whenever it exists (it is
    written first and moved over), so a complete tmp wins.
    """
    for name in (CHECKPOINT_TMP, CHECKPOINT):
        group = file.get(name)
        if isinstance(group, h5py.Group) and _checkpoint_is_complete(group):
            return group
    return None


def read_checkpoint_from(
    file: h5py.File, path: Path
) -> tuple[dict[str, np.ndarray], int, float, dict]:
    """(arrays, step, time_h, meta) of the newest complete checkpoint in ``file``."""
    group = find_checkpoint(file)
    if group is None:
        raise RunFileError(f"{path}: holds no complete checkpoint to resume from")
    arrays = {
        _unescape_key(name): dataset[()]
        for name, dataset in group[CHECKPOINT_ARRAYS].items()
    }
    # A 0-d dataset reads back as a NumPy scalar; keep every value an ndarray.
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    meta = {key: decode_attribute(value) for key, value in group[CHECKPOINT_META].attrs.items()}
    return arrays, int(group.attrs["step"]), float(group.attrs["time_h"]), meta


def _create_scale(
    group: h5py.Group, name: str, data: np.ndarray, units: str, long_name: str, **kwargs: Any
) -> h5py.Dataset:
    dataset = group.create_dataset(name, data=data, **kwargs)
    dataset.make_scale(name)
    set_attribute(dataset, "units", units)
    set_attribute(dataset, "long_name", long_name)
    return dataset


def _growing_dataset(
    group: h5py.Group, name: str, row_shape: tuple[int, ...], dtype: Any, *,
    chunk_rows: int, units: str, long_name: str, compress: bool,
) -> h5py.Dataset:
    """A dataset of shape (0, *row_shape) that grows along axis 0."""
    options: dict[str, Any] = {}
    if compress:
        options = {"compression": "gzip", "compression_opts": COMPRESSION_LEVEL, "shuffle": True}
    dataset = group.create_dataset(
        name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
        chunks=(chunk_rows, *row_shape), **options,
    )
    set_attribute(dataset, "units", units)
    set_attribute(dataset, "long_name", long_name)
    return dataset


def _snapshot_chunks(shape: tuple[int, int, int], itemsize: int) -> tuple[int, ...]:
    """One snapshot x one lesion per chunk, split along x only if beyond MAX_CHUNK_BYTES."""
    nx, ny, nz = shape
    rows = max(1, min(nx, MAX_CHUNK_BYTES // max(1, ny * nz * itemsize)))
    return (1, 1, rows, ny, nz)


def _attach(dataset: h5py.Dataset, scales: Sequence[h5py.Dataset]) -> None:
    """Attach the scales to the axes and label each axis with its scale's name."""
    for axis, scale in enumerate(scales):
        dataset.dims[axis].attach_scale(scale)
        dataset.dims[axis].label = scale.name.rsplit("/", 1)[-1]


def _link_scales(group: h5py.Group, scales: Mapping[str, h5py.Dataset]) -> None:
    """Hard links to the scales inside ``group`` so h5netcdf resolves the dimensions."""
    for name, scale in scales.items():
        group[name] = scale


# --------------------------------------------------------------------------- writer


class RunWriter:
    """Writes one run's ``run.h5`` as the run goes; use :meth:`create` or :meth:`open_for_resume`.

    Every append flushes, so a killed run leaves a readable file with status
    ``running`` that holds every completed snapshot. Use as a context manager:
    an exception escaping the ``with`` block records ``failed: <reason>``,
    except an interruption (KeyboardInterrupt, SystemExit: Ctrl-C, SIGTERM, a
    batch launcher stopping a job for preemption or its time limit), which
    leaves ``running``: the run is incomplete, not wrong, and resumes.
    When ``xdmf`` is on, ``run.xmf`` beside the file is rewritten after every
    checkpoint, truncation, status change and on close, and after every
    snapshot while it is small (``XDMF_LIVE_MAX_ATTRIBUTES``).
    """

    def __init__(self, file: h5py.File, path: Path, *, xdmf: bool) -> None:
        """Private; see :meth:`create` and :meth:`open_for_resume`."""
        self._file = file
        self.path = path
        self._xdmf = xdmf
        grid_group = file[GRID]
        self.lesions = int(grid_group.attrs["lesions"])
        self.grid = Grid(
            shape=tuple(int(n) for n in grid_group.attrs["shape"]),
            spacing_um=float(grid_group.attrs["spacing_um"]),
            origin_um=tuple(float(v) for v in grid_group.attrs["origin_um"]),
        )
        self.dtype = np.dtype(decode_attribute(file.attrs["dtype"]))
        self.fields = tuple(
            FieldSpec(
                name,
                decode_attribute(file[FIELDS][name].attrs["units"]),
                decode_attribute(file[FIELDS][name].attrs["long_name"]),
            )
            for name in data_names(file[FIELDS])
        )
        self.map_names = data_names(file[MAPS])
        self.timeseries = tuple(
            (name, decode_attribute(file[TIMESERIES][name].attrs["units"]),
             file[TIMESERIES][name].ndim == 2)
            for name in data_names(file[TIMESERIES])
        )
        self.systemic = tuple(
            (name, decode_attribute(file[SYSTEMIC][name].attrs["units"]))
            for name in data_names(file[SYSTEMIC])
        )

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        grid: Grid,
        lesions: int,
        fields: Sequence[FieldSpec],
        maps: Mapping[str, tuple[np.ndarray, str, str]],
        dtype: str,
        attrs: Mapping[str, Any],
        timeseries: Sequence[tuple[str, str, bool]] = (),
        systemic: Sequence[tuple[str, str]] = (),
        overwrite: bool = False,
        xdmf: bool = True,
    ) -> RunWriter:
        """Create ``run.h5`` (or ``path/run.h5`` for a directory) with an empty time axis.

        Args:
            grid: the lesion grid (shape (nx, ny, nz), spacing, origin).
            lesions: number of lesions L (leading batch axis of every field).
            fields: the fields stored per snapshot, in the species list's names/units.
            maps: ``name -> (array (L, nx, ny, nz), units, long_name)``, the
                initial tissue-attached maps; stored with the array's dtype.
            dtype: ``"float32"`` or ``"float64"``, the dtype of stored fields.
            attrs: provenance written as root attributes; must hold
                ``config`` (resolved YAML), ``overrides``, ``seed`` and
                ``backend``; ``git_commit``, ``jax_version`` and
                ``tmesolve_version`` are added when known. Values are str,
                numbers, lists of str or mappings (stored as JSON).
            timeseries: ``(name, units, per_lesion)`` readouts; per-lesion
                ones are stored (n_records, L), the rest (n_records,).
            systemic: ``(name, units)`` patient-level values, (n_records,).
            overwrite: replace an existing file; without it an existing file
                raises FileExistsError.
            xdmf: keep ``run.xmf`` beside the file up to date.
        """
        path = resolve_run_path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} already exists: resume that run (open_for_resume / resume=true) or "
                "choose another output directory (or pass overwrite=True to replace it)"
            )
        if dtype not in _DTYPES:
            raise ConfigError("output.dtype", dtype, "'float32' or 'float64'")
        if not isinstance(lesions, (int, np.integer)) or isinstance(lesions, bool) or lesions < 1:
            raise ConfigError("patient.lesions", lesions, "an integer >= 1")
        lesions = int(lesions)
        missing = [key for key in REQUIRED_PROVENANCE if key not in attrs]
        if missing:
            raise ValueError(f"run file attrs: missing provenance {missing}; pass them in attrs")
        field_specs = tuple(fields)
        _check_unique("fields", [_check_name("fields", spec.name) for spec in field_specs])
        _check_unique("maps", [_check_name("maps", name) for name in maps])
        _check_unique("timeseries", [_check_name("timeseries", n) for n, _, _ in timeseries])
        _check_unique("systemic", [_check_name("systemic", n) for n, _ in systemic])
        spatial_shape = tuple(grid.shape)
        for name, (array, _, _) in maps.items():
            if np.shape(array) != (lesions, *spatial_shape):
                raise ValueError(
                    f"map {name!r}: shape {np.shape(array)}, expected "
                    f"(lesions, nx, ny, nz) = {(lesions, *spatial_shape)}"
                )

        path.parent.mkdir(parents=True, exist_ok=True)
        file = h5py.File(path, "w", libver=LIBVER)
        try:
            cls._write_layout(
                file, grid=grid, lesions=lesions, fields=field_specs, maps=maps,
                dtype=dtype, attrs=attrs, timeseries=timeseries, systemic=systemic,
            )
            file.flush()
        except BaseException:
            file.close()
            path.unlink(missing_ok=True)
            raise
        writer = cls(file, path, xdmf=xdmf)
        writer._update_xdmf()
        return writer

    @staticmethod
    def _write_layout(
        file: h5py.File, *, grid: Grid, lesions: int, fields: Sequence[FieldSpec],
        maps: Mapping[str, tuple[np.ndarray, str, str]], dtype: str,
        attrs: Mapping[str, Any], timeseries: Sequence[tuple[str, str, bool]],
        systemic: Sequence[tuple[str, str]],
    ) -> None:
        root_attrs: dict[str, Any] = {
            "tmesolve_version": _tmesolve_version(),
            "jax_version": _package_version("jax"),
        }
        root_attrs.update(attrs)
        root_attrs.update(
            schema_version=np.int64(SCHEMA_VERSION),
            created=_now_iso(),
            dtype=dtype,
            status=STATUS_RUNNING,
        )
        for key, value in root_attrs.items():
            set_attribute(file, key, value)

        time = _create_scale(
            file, TIME, np.zeros(0), "h", "snapshot time",
            maxshape=(None,), chunks=(RECORD_CHUNK_ROWS,), dtype="f8",
        )
        grid_group = file.create_group(GRID)
        grid_group.attrs["shape"] = np.asarray(grid.shape, dtype=np.int64)
        grid_group.attrs["spacing_um"] = np.float64(grid.spacing_um)
        grid_group.attrs["origin_um"] = np.asarray(grid.origin_um, dtype=np.float64)
        grid_group.attrs["lesions"] = np.int64(lesions)
        axes = {
            name: _create_scale(
                grid_group, name, grid.axis_coordinates(axis), "um",
                f"cell-centre {name} coordinate",
            )
            for axis, name in enumerate(SPATIAL_AXES)
        }
        lesion = _create_scale(
            grid_group, LESION, np.arange(lesions, dtype=np.int64), "1", "lesion index"
        )
        spatial = {LESION: lesion, **axes}

        fields_group = file.create_group(FIELDS)
        _link_scales(fields_group, {TIME: time, **spatial})
        chunks = _snapshot_chunks(tuple(grid.shape), np.dtype(dtype).itemsize)
        for spec in fields:
            dataset = fields_group.create_dataset(
                spec.name, shape=(0, lesions, *grid.shape), maxshape=(None, lesions, *grid.shape),
                dtype=dtype, chunks=chunks, compression="gzip",
                compression_opts=COMPRESSION_LEVEL, shuffle=True,
            )
            set_attribute(dataset, "units", spec.units)
            set_attribute(dataset, "long_name", spec.long_name)
            _attach(dataset, (time, lesion, *axes.values()))

        maps_group = file.create_group(MAPS)
        _link_scales(maps_group, spatial)
        for name, (array, units, long_name) in maps.items():
            data = np.asarray(array)
            dataset = maps_group.create_dataset(
                name, data=data, chunks=(1, *grid.shape), compression="gzip",
                compression_opts=COMPRESSION_LEVEL, shuffle=True,
            )
            set_attribute(dataset, "units", units)
            set_attribute(dataset, "long_name", long_name)
            _attach(dataset, list(spatial.values()))

        timeseries_group = file.create_group(TIMESERIES)
        record_time = _create_scale(
            timeseries_group, TIME, np.zeros(0), "h", "record time",
            maxshape=(None,), chunks=(RECORD_CHUNK_ROWS,), dtype="f8",
        )
        timeseries_group[LESION] = lesion
        for name, units, per_lesion in timeseries:
            row_shape = (lesions,) if per_lesion else ()
            dataset = _growing_dataset(
                timeseries_group, name, row_shape, "f8", chunk_rows=RECORD_CHUNK_ROWS,
                units=units, long_name=name.replace("_", " "), compress=False,
            )
            _attach(dataset, (record_time, lesion) if per_lesion else (record_time,))

        systemic_group = file.create_group(SYSTEMIC)
        systemic_group[TIME] = record_time
        for name, units in systemic:
            dataset = _growing_dataset(
                systemic_group, name, (), "f8", chunk_rows=RECORD_CHUNK_ROWS,
                units=units, long_name=name.replace("_", " "), compress=False,
            )
            _attach(dataset, (record_time,))

    @classmethod
    def open_for_resume(cls, path: str | os.PathLike[str], *, xdmf: bool = True) -> RunWriter:
        """Reopen an existing run file for appending; its status goes back to ``running``.

        Call :meth:`truncate_after` with the checkpoint time before appending.
        """
        path = resolve_run_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no run file to resume")
        file = h5py.File(path, "r+", libver=LIBVER)
        try:
            check_schema_version(file, path)
            writer = cls(file, path, xdmf=xdmf)
        except BaseException:
            file.close()
            raise
        resumed = list(decode_attribute(file.attrs.get("resumed", np.array([], dtype=object))))
        resumed.append(_now_iso())
        set_attribute(file, "resumed", resumed)
        writer.set_status(STATUS_RUNNING)
        return writer

    # ------------------------------------------------------------------ state

    @property
    def file(self) -> h5py.File:
        """The open h5py file (for the XDMF writer and tests)."""
        return self._file

    @property
    def n_snapshots(self) -> int:
        return int(self._file[TIME].shape[0])

    @property
    def n_records(self) -> int:
        return int(self._file[TIMESERIES][TIME].shape[0])

    @property
    def status(self) -> str:
        return decode_attribute(self._file.attrs["status"])

    # ------------------------------------------------------------------ appending

    def append_snapshot(self, time_h: float, fields: Mapping[str, np.ndarray]) -> None:
        """Append one snapshot: every declared field as an array (L, nx, ny, nz); then flush.

        Arrays are cast to the run's dtype. ``time_h`` (hours) must exceed the
        previous snapshot's time.
        """
        time_h = self._next_time(self._file[TIME], time_h, "snapshot")
        expected = {spec.name for spec in self.fields}
        if set(fields) != expected:
            raise ValueError(
                f"snapshot at {time_h} h: got fields {sorted(fields)}, expected {sorted(expected)}"
            )
        shape = (self.lesions, *self.grid.shape)
        arrays = {}
        for name in sorted(expected):
            array = np.asarray(fields[name], dtype=self.dtype)
            if array.shape != shape:
                raise ValueError(
                    f"snapshot field {name!r}: shape {array.shape}, expected (L, nx, ny, nz) = "
                    f"{shape}"
                )
            arrays[name] = array
        index = self.n_snapshots
        group = self._file[FIELDS]
        for name, array in arrays.items():
            dataset = group[name]
            dataset.resize(index + 1, axis=0)
            dataset[index] = array
        # The time axis grows last: its length counts complete snapshots.
        self._append_row(self._file[TIME], index, time_h)
        self._file.flush()
        per_snapshot = self.lesions * (len(self.fields) + len(self.map_names))
        if (index + 1) * per_snapshot <= XDMF_LIVE_MAX_ATTRIBUTES:
            self._update_xdmf()

    def append_record(
        self,
        time_h: float,
        timeseries: Mapping[str, np.ndarray | float],
        systemic: Mapping[str, float],
    ) -> None:
        """Append one row of every declared readout (float64) and systemic value; then flush.

        Per-lesion readouts take an array (L,), the others a scalar.
        """
        record_time = self._file[TIMESERIES][TIME]
        time_h = self._next_time(record_time, time_h, "record")
        for kind, given, declared in (
            ("timeseries", timeseries, [name for name, _, _ in self.timeseries]),
            ("systemic", systemic, [name for name, _ in self.systemic]),
        ):
            if set(given) != set(declared):
                raise ValueError(
                    f"record at {time_h} h: got {kind} {sorted(given)}, expected {sorted(declared)}"
                )
        rows: list[tuple[h5py.Dataset, np.ndarray]] = []
        for name, _, per_lesion in self.timeseries:
            value = np.asarray(timeseries[name], dtype=np.float64)
            expected_shape = (self.lesions,) if per_lesion else ()
            if value.shape != expected_shape:
                raise ValueError(
                    f"timeseries {name!r}: shape {value.shape}, expected {expected_shape}"
                )
            rows.append((self._file[TIMESERIES][name], value))
        for name, _ in self.systemic:
            value = np.asarray(systemic[name], dtype=np.float64)
            if value.shape != ():
                raise ValueError(f"systemic {name!r}: shape {value.shape}, expected a scalar")
            rows.append((self._file[SYSTEMIC][name], value))
        index = self.n_records
        for dataset, value in rows:
            self._append_row(dataset, index, value)
        self._append_row(record_time, index, time_h)
        self._file.flush()

    @staticmethod
    def _next_time(axis: h5py.Dataset, time_h: float, kind: str) -> float:
        time_h = float(time_h)
        if not math.isfinite(time_h):
            raise ValueError(f"{kind} time {time_h}: expected a finite number of hours")
        if axis.shape[0] and time_h <= float(axis[axis.shape[0] - 1]):
            raise ValueError(
                f"{kind} time {time_h} h is not after the last one "
                f"({float(axis[axis.shape[0] - 1])} h); on resume call truncate_after first"
            )
        return time_h

    @staticmethod
    def _append_row(dataset: h5py.Dataset, index: int, value: Any) -> None:
        dataset.resize(index + 1, axis=0)
        dataset[index] = value

    # ------------------------------------------------------------------ response

    def write_response(
        self,
        *,
        assessment_time_h: Sequence[float] | np.ndarray,
        sum_diameters_mm: Sequence[float] | np.ndarray,
        category: Sequence[str],
        best_response: str,
        time_to_progression_h: float,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Replace ``/response`` with the RECIST assessments so far; then flush.

        Datasets: ``time`` (h, the assessment times, a dimension scale),
        ``sum_diameters_mm`` (mm) and ``category`` (strings) along it, and
        scalars ``best_response`` and ``time_to_progression_h`` (NaN if no
        progression). ``extra`` items are stored as attributes of the group.
        """
        times = np.asarray(assessment_time_h, dtype=np.float64).reshape(-1)
        diameters = np.asarray(sum_diameters_mm, dtype=np.float64).reshape(-1)
        categories = [str(item) for item in category]
        if not (len(times) == len(diameters) == len(categories)):
            raise ValueError(
                f"response: {len(times)} times, {len(diameters)} sums of diameters and "
                f"{len(categories)} categories; expected one of each per assessment"
            )
        if RESPONSE in self._file:
            del self._file[RESPONSE]
        group = self._file.create_group(RESPONSE)
        time = _create_scale(group, TIME, times, "h", "assessment time")
        for name, data, units, long_name in (
            ("sum_diameters_mm", diameters, "mm", "sum of target lesion diameters"),
            ("category", np.array(categories, dtype=h5py.string_dtype("utf-8")), "",
             "RECIST category"),
        ):
            dataset = group.create_dataset(name, data=data)
            set_attribute(dataset, "units", units)
            set_attribute(dataset, "long_name", long_name)
            _attach(dataset, (time,))
        best = group.create_dataset(
            "best_response", data=str(best_response), dtype=h5py.string_dtype("utf-8")
        )
        set_attribute(best, "units", "")
        set_attribute(best, "long_name", "best overall RECIST response")
        ttp = group.create_dataset("time_to_progression_h", data=np.float64(time_to_progression_h))
        set_attribute(ttp, "units", "h")
        set_attribute(ttp, "long_name", "time to progression (NaN if none)")
        for key, value in (extra or {}).items():
            set_attribute(group, key, value)
        self._file.flush()

    # ------------------------------------------------------------------ checkpoint

    def write_checkpoint(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        step: int,
        time_h: float,
        meta: Mapping[str, Any] | None = None,
        units: Mapping[str, str] | None = None,
    ) -> None:
        """Store the full state atomically (tmp group, completeness mark, move); then flush.

        Args:
            arrays: key -> array; dtype and shape kept exactly (keys may hold "/").
            step: steps taken so far; time_h: model time (h).
            meta: extra values stored as attributes: str, numbers and arrays come
                back as given (numbers as Python scalars), a mapping as JSON text.
            units: key -> units; keys naming a field default to its units, others to "".
        """
        field_units = {spec.name: spec.units for spec in self.fields}
        units = {**field_units, **(units or {})}
        file = self._file
        if CHECKPOINT_TMP in file:
            del file[CHECKPOINT_TMP]  # left by a crash before it was complete or moved
        group = file.create_group(CHECKPOINT_TMP)
        array_group = group.create_group(CHECKPOINT_ARRAYS)
        for key, value in arrays.items():
            data = np.asarray(value)
            options: dict[str, Any] = {}
            if data.size >= CHECKPOINT_COMPRESS_MIN_SIZE:
                options = {"compression": "gzip", "compression_opts": COMPRESSION_LEVEL,
                           "shuffle": True}
            dataset = array_group.create_dataset(_escape_key(key), data=data, **options)
            set_attribute(dataset, "key", key)
            set_attribute(dataset, "units", units.get(key, ""))
        meta_group = group.create_group(CHECKPOINT_META)
        for key, value in (meta or {}).items():
            set_attribute(meta_group, key, value)
        group.attrs["step"] = np.int64(step)
        group.attrs["time_h"] = np.float64(time_h)
        group.attrs["complete"] = np.int8(1)  # last: marks everything above as written
        file.flush()
        if CHECKPOINT in file:
            del file[CHECKPOINT]
        file.move(CHECKPOINT_TMP, CHECKPOINT)
        file.flush()
        self._update_xdmf()

    def read_checkpoint(self) -> tuple[dict[str, np.ndarray], int, float, dict]:
        """(arrays, step, time_h, meta) of the newest complete checkpoint."""
        return read_checkpoint_from(self._file, self.path)

    def truncate_after(self, time_h: float) -> None:
        """Drop snapshots and records later than ``time_h`` (the checkpoint time); flush.

        Also trims any dataset a crash left longer than its time axis, so the
        resumed run appends without duplicates or gaps.
        """
        time_h = float(time_h)
        self._truncate_axis(self._file[TIME], [self._file[FIELDS][s.name] for s in self.fields],
                            time_h)
        record_datasets = [self._file[TIMESERIES][name] for name, _, _ in self.timeseries]
        record_datasets += [self._file[SYSTEMIC][name] for name, _ in self.systemic]
        self._truncate_axis(self._file[TIMESERIES][TIME], record_datasets, time_h)
        self._file.flush()
        self._update_xdmf()

    @staticmethod
    def _truncate_axis(axis: h5py.Dataset, datasets: Sequence[h5py.Dataset], time_h: float) -> None:
        times = axis[()]
        keep = int(np.searchsorted(times, time_h, side="right"))
        # A dataset shorter than the axis means its last rows never landed.
        keep = min([keep, *(dataset.shape[0] for dataset in datasets)])
        for dataset in datasets:
            if dataset.shape[0] != keep:
                dataset.resize(keep, axis=0)
        if axis.shape[0] != keep:
            axis.resize(keep, axis=0)

    # ------------------------------------------------------------------ status and closing

    def set_status(self, status: str) -> None:
        """Record ``running``, ``complete`` or ``failed: <reason>`` (one line); flush."""
        set_attribute(self._file, "status", _status_line(status))
        self._file.flush()
        self._update_xdmf()

    def write_xdmf(self) -> Path:
        """Rewrite ``run.xmf`` beside the file now; returns its path."""
        from tmesolve.io.xdmf import write_xdmf

        return write_xdmf(self._file, self.path.with_suffix(".xmf"))

    def _update_xdmf(self) -> None:
        if self._xdmf and self._file.id.valid:
            self.write_xdmf()

    def close(self) -> None:
        """Flush, rewrite run.xmf and close (idempotent); the status is left as it is."""
        if self._file.id.valid:
            self._file.flush()
            self._update_xdmf()
            self._file.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            # A run stopped from outside (Ctrl-C, SIGTERM, a batch launcher's SystemExit on
            # preemption or a time limit) is not failed: it stays ``running``, resumable.
            stopped = exc_type is not None and (issubclass(exc_type, (KeyboardInterrupt, SystemExit))
                                                or exc_type.__name__ in STOPPED_FROM_OUTSIDE)
            if exc_type is not None and not stopped and self._file.id.valid:
                reason = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
                self.set_status(STATUS_FAILED_PREFIX + reason)
        finally:
            self.close()
