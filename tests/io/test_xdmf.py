"""run.xmf: every reference resolves to a dataset of run.h5, hyperslabs in range."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest

from tmesolve.grid import Grid
from tmesolve.io import hdf5
from tmesolve.io.hdf5 import FieldSpec, RunWriter
from tmesolve.io.xdmf import write_xdmf

GRID = Grid(shape=(6, 5, 4), spacing_um=20.0, origin_um=(-60.0, -50.0, 0.0))
LESIONS = 2
FIELDS = (
    FieldSpec("tumour_cells", "cells/mm^3", "viable tumour cells"),
    FieldSpec("effector_t_cells", "cells/mm^3", "effector CD8+ T cells"),
    FieldSpec("ifn_gamma", "ng/mL", "interferon gamma"),
)
TIMES = (0.0, 6.0, 12.5)


def make_run(path: Path, n_snapshots: int = len(TIMES), **kwargs) -> RunWriter:
    maps = {"antigenicity": (np.full((LESIONS, *GRID.shape), 0.5), "1", "antigenicity")}
    writer = RunWriter.create(
        path, grid=GRID, lesions=LESIONS, fields=FIELDS, maps=maps, dtype="float64",
        attrs={"config": "", "overrides": [], "seed": 1, "backend": "cpu"}, **kwargs,
    )
    rng = np.random.default_rng(5)
    for k in range(n_snapshots):
        writer.append_snapshot(TIMES[k], {
            spec.name: rng.random((LESIONS, *GRID.shape)) for spec in FIELDS
        })
    return writer


def integers(text: str) -> list[int]:
    return [int(item) for item in text.split()]


def check_sidecar(xmf: Path, h5_path: Path) -> int:
    """Assert the sidecar matches the run file; return the number of attributes checked."""
    root = ET.parse(xmf).getroot()
    assert root.tag == "Xdmf"
    collections = root.findall("Domain/Grid")
    checked = 0
    with h5py.File(h5_path, "r") as file:
        times = file["time"][()]
        lesions = int(file["grid"].attrs["lesions"])
        shape = tuple(int(n) for n in file["grid"].attrs["shape"])
        assert len(collections) == lesions
        for lesion, collection in enumerate(collections):
            assert collection.get("GridType") == "Collection"
            assert collection.get("CollectionType") == "Temporal"
            grids = collection.findall("Grid")
            assert [float(grid.find("Time").get("Value")) for grid in grids] == list(times)
            for snapshot, grid in enumerate(grids):
                topology = grid.find("Topology")
                assert topology.get("TopologyType") == "3DCoRectMesh"
                # Cell data: the mesh has one node more than cells along each axis.
                assert integers(topology.get("Dimensions")) == [n + 1 for n in shape]
                origin, spacing = (item.text.split() for item in grid.findall("Geometry/DataItem"))
                assert [float(v) for v in origin] == list(file["grid"].attrs["origin_um"])
                assert [float(v) for v in spacing] == [file["grid"].attrs["spacing_um"]] * 3
                names = {attribute.get("Name") for attribute in grid.findall("Attribute")}
                assert names == {spec.name for spec in FIELDS} | {"map_antigenicity"}
                for attribute in grid.findall("Attribute"):
                    assert attribute.get("Center") == "Cell"
                    slab = attribute.find("DataItem")
                    assert slab.get("ItemType") == "HyperSlab"
                    assert integers(slab.get("Dimensions")) == list(shape)
                    selection, source = slab.findall("DataItem")
                    file_name, dataset_path = source.text.strip().split(":")
                    # Relative to the .xmf folder, so the run directory can move.
                    assert (xmf.parent / file_name).resolve() == h5_path.resolve()
                    dataset = file[dataset_path]
                    assert integers(source.get("Dimensions")) == list(dataset.shape)
                    assert int(source.get("Precision")) == dataset.dtype.itemsize
                    rank = dataset.ndim
                    assert integers(selection.get("Dimensions")) == [3, rank]
                    matrix = np.array(integers(selection.text)).reshape(3, rank)
                    start, stride, count = matrix
                    assert np.all(start >= 0) and np.all(stride == 1)
                    assert np.all(start + count <= np.array(dataset.shape))
                    assert np.prod(count) == np.prod(shape)
                    expected_start = (snapshot, lesion) if rank == 5 else (lesion,)
                    assert tuple(start[:-3]) == expected_start
                    checked += 1
    return checked


def test_sidecar_references_resolve(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path).close()
    xmf = tmp_path / "run.xmf"
    assert xmf.is_file()
    assert check_sidecar(xmf, path) == len(TIMES) * LESIONS * (len(FIELDS) + 1)


def test_write_xdmf_from_a_path_and_elsewhere(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir / "run.h5", xdmf=False).close()
    assert not (run_dir / "run.xmf").exists()
    assert write_xdmf(run_dir) == run_dir / "run.xmf"  # a run directory names its run.h5
    check_sidecar(run_dir / "run.xmf", run_dir / "run.h5")
    other = tmp_path / "views" / "mine.xmf"
    other.parent.mkdir()
    write_xdmf(run_dir / "run.h5", other)
    assert "../run/run.h5:/fields/" in other.read_text()
    check_sidecar(other, run_dir / "run.h5")


def test_writer_keeps_the_sidecar_current(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    xmf = tmp_path / "run.xmf"
    writer = make_run(path, n_snapshots=1)
    assert len(ET.parse(xmf).findall("Domain/Grid/Grid")) == LESIONS
    zeros = {spec.name: np.zeros((LESIONS, *GRID.shape)) for spec in FIELDS}
    writer.append_snapshot(TIMES[1], zeros)
    assert len(ET.parse(xmf).findall("Domain/Grid/Grid")) == 2 * LESIONS

    # Past the live limit only checkpoints, status changes and close rewrite it.
    monkeypatch.setattr(hdf5, "XDMF_LIVE_MAX_ATTRIBUTES", 1)
    writer.append_snapshot(TIMES[2], zeros)
    assert len(ET.parse(xmf).findall("Domain/Grid/Grid")) == 2 * LESIONS
    writer.write_checkpoint({"a": np.zeros(2)}, step=1, time_h=TIMES[2])
    assert len(ET.parse(xmf).findall("Domain/Grid/Grid")) == 3 * LESIONS
    writer.close()
    check_sidecar(xmf, path)


def test_vtk_reads_the_sidecar(tmp_path):
    """Optional: VTK's XDMF reader (ParaView's 'XDMF Reader') gives back the stored values."""
    xdmf_reader = pytest.importorskip("vtkmodules.vtkIOXdmf2", reason="vtk not installed")
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonExecutionModel import vtkStreamingDemandDrivenPipeline

    path = tmp_path / "run.h5"
    make_run(path).close()
    reader = xdmf_reader.vtkXdmfReader()
    reader.SetFileName(str(tmp_path / "run.xmf"))
    reader.UpdateInformation()
    times = reader.GetOutputInformation(0).Get(vtkStreamingDemandDrivenPipeline.TIME_STEPS())
    assert list(times) == list(TIMES)
    with h5py.File(path, "r") as file:
        reader.UpdateTimeStep(TIMES[2])
        blocks = reader.GetOutputDataObject(0)
        assert blocks.GetNumberOfBlocks() == LESIONS
        image = blocks.GetBlock(1)
        # VTK lists axes fastest first: its X is our z (see xdmf.py).
        assert image.GetDimensions() == tuple(n + 1 for n in reversed(GRID.shape))
        values = vtk_to_numpy(image.GetCellData().GetArray("ifn_gamma"))
        np.testing.assert_array_equal(values, file["fields/ifn_gamma"][2, 1].ravel())
