"""XDMF sidecar ``run.xmf`` so ParaView and VisIt open ``run.h5`` as a time series.

The sidecar holds no data: every attribute is a HyperSlab of ``/fields/<name>``
(shape (T, L, nx, ny, nz)) selecting snapshot t and lesion l, read from the
HDF5 file by a path relative to the ``.xmf`` (``run.h5:/fields/...``), so a
run directory can be moved or copied as a whole.

Layout: a Domain holds one temporal collection per lesion (``lesion_0``,
``lesion_1``, ...; ParaView shows them as blocks that can be toggled, all
placed at the grid origin), each with one uniform grid per snapshot. Every
grid is a 3DCoRectMesh of (nx+1)(ny+1)(nz+1) nodes, so values are cell
centred (``Center="Cell"``); the initial maps are added to every grid as
``map_<name>`` attributes.

Axis order: XDMF lists dimensions slowest-varying first and calls them
(Z, Y, X). Our arrays are C-ordered (nx, ny, nz), so we declare
``Dimensions="nx+1 ny+1 nz+1"`` and give origin and spacing in the same
(x, y, z) order. The data therefore need no transposition, but ParaView's X
axis is tmesolve's z and its Z axis is tmesolve's x (a 2-D run, nz = 1, lies
in ParaView's Y-Z plane). Distances are in um.

When it is written: :class:`~tmesolve.io.hdf5.RunWriter` rewrites it
(atomically: a temp file replaced in one rename) after every checkpoint,
truncation, status change and on close, and also after every snapshot while
the sidecar is small (at most ``XDMF_LIVE_MAX_ATTRIBUTES`` snapshot x lesion x
array entries, a few MB): the whole file is rewritten each time, so per
snapshot rewriting would cost O(T^2) for long runs. ``write_xdmf("run.h5")``
regenerates it from any run file, e.g. one whose run was killed.
"""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import h5py
import numpy as np

from tmesolve.io.hdf5 import (
    FIELDS,
    GRID,
    MAPS,
    TIME,
    data_names,
    resolve_run_path,
)


def _number_type(dtype: np.dtype) -> tuple[str, str]:
    """XDMF NumberType and Precision of a NumPy dtype."""
    kinds = {"f": "Float", "i": "Int", "u": "UInt", "b": "UChar"}
    if dtype.kind not in kinds:
        raise ValueError(f"XDMF: dtype {dtype} has no XDMF number type")
    kind = kinds[dtype.kind]
    if dtype.itemsize == 1 and dtype.kind == "i":
        kind = "Char"
    return kind, str(dtype.itemsize)


def _dims(shape: tuple[int, ...]) -> str:
    return " ".join(str(int(n)) for n in shape)


class _Source:
    """One dataset read by the sidecar, with its XML pre-rendered around the slab start.

    The sidecar repeats the same Attribute for every snapshot and lesion and
    only the hyperslab start differs, so it is rendered once here: building
    60 000 attributes (1000 snapshots x 4 lesions x 15 fields) takes well
    under a second this way.
    """

    def __init__(self, dataset: h5py.Dataset, h5_name: str, attribute_name: str) -> None:
        shape = tuple(int(n) for n in dataset.shape)
        self.shape = shape
        spatial = shape[-3:]
        leading = len(shape) - 3
        number_type, precision = _number_type(dataset.dtype)
        tail = " ".join(["1"] * len(shape) + ["1"] * leading + [str(n) for n in spatial])
        self.head = (
            f"   <Attribute Name={quoteattr(attribute_name)} AttributeType=\"Scalar\" "
            "Center=\"Cell\">\n"
            f"    <DataItem ItemType=\"HyperSlab\" Dimensions=\"{_dims(spatial)}\" "
            "Type=\"HyperSlab\">\n"
            f"     <DataItem Dimensions=\"3 {len(shape)}\" Format=\"XML\">"
        )
        self.tail = (
            f" {' '.join(['0'] * 3)} {tail}</DataItem>\n"
            f"     <DataItem Dimensions=\"{_dims(shape)}\" NumberType=\"{number_type}\" "
            f"Precision=\"{precision}\" Format=\"HDF\">"
            f"{escape(h5_name)}:{escape(dataset.name)}</DataItem>\n"
            "    </DataItem>\n"
            "   </Attribute>\n"
        )

    def render(self, start: tuple[int, ...]) -> str:
        """The Attribute selecting the (nx, ny, nz) block at ``start`` of the leading axes."""
        return self.head + " ".join(str(i) for i in start) + self.tail


def build_xdmf(file: h5py.File, h5_name: str) -> str:
    """The XDMF document for an open run file referenced as ``h5_name`` from the .xmf."""
    grid_attrs = file[GRID].attrs
    nx, ny, nz = (int(n) for n in grid_attrs["shape"])
    lesions = int(grid_attrs["lesions"])
    spacing = repr(float(grid_attrs["spacing_um"]))
    origin = " ".join(repr(float(v)) for v in grid_attrs["origin_um"])
    times = file[TIME][()]
    fields = [_Source(file[FIELDS][name], h5_name, name) for name in data_names(file[FIELDS])]
    map_names = data_names(file[MAPS]) if MAPS in file else ()
    maps = [_Source(file[MAPS][name], h5_name, f"map_{name}") for name in map_names]
    mesh = (
        f"   <Topology TopologyType=\"3DCoRectMesh\" Dimensions=\"{nx + 1} {ny + 1} {nz + 1}\"/>\n"
        "   <Geometry GeometryType=\"ORIGIN_DXDYDZ\">\n"
        f"    <DataItem Dimensions=\"3\" NumberType=\"Float\" Precision=\"8\" Format=\"XML\">"
        f"{origin}</DataItem>\n"
        f"    <DataItem Dimensions=\"3\" NumberType=\"Float\" Precision=\"8\" Format=\"XML\">"
        f"{spacing} {spacing} {spacing}</DataItem>\n"
        "   </Geometry>\n"
    )
    parts = [
        "<?xml version=\"1.0\" ?>\n",
        "<!DOCTYPE Xdmf SYSTEM \"Xdmf.dtd\" []>\n",
        "<Xdmf Version=\"3.0\">\n",
        "<Domain>\n",
    ]
    for lesion in range(lesions):
        parts.append(
            f" <Grid Name=\"lesion_{lesion}\" GridType=\"Collection\" "
            "CollectionType=\"Temporal\">\n"
        )
        # Only the snapshots the time axis counts: a crash may leave longer fields.
        for snapshot, time_h in enumerate(times):
            parts.append(
                f"  <Grid Name=\"lesion_{lesion}_t{snapshot}\" GridType=\"Uniform\">\n"
                f"   <Time Value=\"{float(time_h)!r}\"/>\n"
            )
            parts.append(mesh)
            parts.extend(source.render((snapshot, lesion)) for source in fields)
            parts.extend(source.render((lesion,)) for source in maps)
            parts.append("  </Grid>\n")
        parts.append(" </Grid>\n")
    parts.append("</Domain>\n</Xdmf>\n")
    return "".join(parts)


def write_xdmf(
    h5: str | os.PathLike[str] | h5py.File,
    xmf_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the XDMF sidecar of a run file; returns its path.

    Args:
        h5: ``run.h5``, its run directory, or an open h5py file of it.
        xmf_path: where to write; default ``run.xmf`` beside the run file.
            The HDF5 path inside is relative to this file's folder.
    """
    if isinstance(h5, h5py.File):
        h5_path = Path(h5.filename)
        file, owned = h5, False
    else:
        h5_path = resolve_run_path(h5)
        file, owned = h5py.File(h5_path, "r"), True
    try:
        xmf = Path(xmf_path) if xmf_path is not None else h5_path.with_suffix(".xmf")
        h5_name = Path(os.path.relpath(h5_path.resolve(), xmf.resolve().parent)).as_posix()
        document = build_xdmf(file, h5_name)
    finally:
        if owned:
            file.close()
    # Replace in one rename so a reader (or a kill) never sees half a file.
    temp_path = xmf.with_name(f".{xmf.name}.tmp")
    try:
        temp_path.write_text(document, encoding="utf-8")
        os.replace(temp_path, xmf)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return xmf
