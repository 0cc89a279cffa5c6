"""open_run (tmesolve.open): round trip of a small synthetic run, xarray view, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tmesolve.grid import Grid
from tmesolve.io import SCHEMA_VERSION, RunFileError, SchemaVersionError, open_run
from tmesolve.io.hdf5 import FieldSpec, RunWriter

GRID = Grid(shape=(6, 5, 4), spacing_um=20.0, origin_um=(-60.0, -50.0, 0.0))
LESIONS = 2
FIELDS = (
    FieldSpec("tumour_cells", "cells/mm^3", "viable tumour cells"),
    FieldSpec("effector_t_cells", "cells/mm^3", "effector CD8+ T cells"),
    FieldSpec("ifn_gamma", "ng/mL", "interferon gamma"),
)
TIMES = np.array([0.0, 24.0, 48.0])
RECORD_TIMES = np.array([0.0, 12.0, 24.0, 36.0, 48.0])
CONFIG = "grid:\n  shape: [6, 5, 4]\ntme:\n  note: \"µm and ‰ survive\"\n"


def write_run(run_dir: Path, dtype: str = "float32") -> dict:
    """A complete small run; returns what was written, for comparison."""
    rng = np.random.default_rng(11)
    snapshots = [
        {spec.name: rng.random((LESIONS, *GRID.shape)) * 1e5 for spec in FIELDS} for _ in TIMES
    ]
    burden = rng.random((len(RECORD_TIMES), LESIONS))
    drug = rng.random(len(RECORD_TIMES))
    vessels = rng.random((LESIONS, *GRID.shape))
    checkpoint = {
        "fields": rng.random((LESIONS, *GRID.shape)).astype(np.float32),
        "rng_key": np.array([17, 4294967295], dtype=np.uint32),
        "counts": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    with RunWriter.create(
        run_dir, grid=GRID, lesions=LESIONS, fields=FIELDS,
        maps={"vessels": (vessels, "1", "vessel density")}, dtype=dtype,
        attrs={"config": CONFIG, "overrides": ["seed=3"], "seed": 3, "backend": "cpu",
               "git_commit": None},
        timeseries=[("tumour_burden", "cells", True), ("total_burden", "cells", False)],
        systemic=[("plasma_anti_pd1", "ug/mL")],
    ) as writer:
        for k, time_h in enumerate(TIMES):
            writer.append_snapshot(time_h, snapshots[k])
        for k, time_h in enumerate(RECORD_TIMES):
            writer.append_record(
                time_h,
                {"tumour_burden": burden[k], "total_burden": burden[k].sum()},
                {"plasma_anti_pd1": drug[k]},
            )
        writer.write_response(
            assessment_time_h=[0.0, 48.0], sum_diameters_mm=[12.0, 8.0], category=["SD", "PR"],
            best_response="PR", time_to_progression_h=float("nan"), extra={"baseline_mm": 12.0},
        )
        writer.write_checkpoint(checkpoint, step=4800, time_h=48.0, meta={"dt_h": 0.01})
        writer.set_status("complete")
    return {"snapshots": snapshots, "burden": burden, "drug": drug, "vessels": vessels,
            "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    written = write_run(run_dir)
    return run_dir, written


def test_round_trip(run):
    run_dir, written = run
    with open_run(run_dir) as data:  # the directory names its run.h5
        assert data.status == "complete"
        assert data.attrs["schema_version"] == SCHEMA_VERSION
        assert data.attrs["config"] == CONFIG
        assert data.attrs["overrides"] == ["seed=3"]
        assert data.attrs["seed"] == 3 and data.attrs["dtype"] == "float32"
        assert "git_commit" not in data.attrs  # written only when known
        assert data.grid == GRID and data.lesions == LESIONS
        np.testing.assert_array_equal(data.times, TIMES)
        assert data.field_names == tuple(sorted(spec.name for spec in FIELDS))
        assert data.units("ifn_gamma") == "ng/mL"

        stored = data.field("tumour_cells")
        assert stored.shape == (len(TIMES), LESIONS, *GRID.shape) and stored.dtype == np.float32
        expected = np.stack([s["tumour_cells"] for s in written["snapshots"]]).astype(np.float32)
        np.testing.assert_array_equal(stored, expected)  # float32 stored exactly as cast
        np.testing.assert_array_equal(data.field("ifn_gamma", snapshot=-1, lesion=1),
                                      written["snapshots"][2]["ifn_gamma"][1].astype(np.float32))
        assert data.field("ifn_gamma", snapshot=slice(1, None)).shape[0] == 2
        with pytest.raises(IndexError, match="3 snapshots"):
            data.field("ifn_gamma", snapshot=3)
        with pytest.raises(KeyError, match="available"):
            data.field("oxygen")

        np.testing.assert_array_equal(data.timeseries_time, RECORD_TIMES)
        np.testing.assert_array_equal(data.timeseries("tumour_burden"), written["burden"])
        np.testing.assert_array_equal(data.timeseries("total_burden"), written["burden"].sum(1))
        np.testing.assert_array_equal(data.systemic("plasma_anti_pd1"), written["drug"])
        assert data.units("plasma_anti_pd1", group="systemic") == "ug/mL"
        np.testing.assert_array_equal(data.maps["vessels"], written["vessels"])

        response = data.response
        np.testing.assert_array_equal(response["time_h"], [0.0, 48.0])
        np.testing.assert_array_equal(response["sum_diameters_mm"], [12.0, 8.0])
        assert response["category"] == ["SD", "PR"] and response["best_response"] == "PR"
        assert np.isnan(response["time_to_progression_h"]) and response["baseline_mm"] == 12.0

        arrays, step, time_h, meta = data.checkpoint()
        assert (step, time_h, meta) == (4800, 48.0, {"dt_h": 0.01})
        for key, array in written["checkpoint"].items():
            assert arrays[key].dtype == array.dtype
            np.testing.assert_array_equal(arrays[key], array)
        assert "status='complete'" in repr(data)
    assert "closed" in repr(data)


def test_xarray_gives_named_dimensions(run):
    run_dir, written = run
    with open_run(run_dir / "run.h5") as data:
        with data.to_xarray("fields") as fields:
            assert fields["tumour_cells"].dims == ("time", "lesion", "x", "y", "z")
            assert fields["tumour_cells"].attrs["units"] == "cells/mm^3"
            # Coordinates come with the dims (h stays a float: units "h" is no CF time unit).
            np.testing.assert_array_equal(fields["time"].values, TIMES)
            np.testing.assert_array_equal(fields["x"].values, GRID.axis_coordinates(0))
            np.testing.assert_array_equal(fields["lesion"].values, np.arange(LESIONS))
            np.testing.assert_array_equal(
                fields["effector_t_cells"].sel(time=24.0, lesion=1).values,
                written["snapshots"][1]["effector_t_cells"][1].astype(np.float32),
            )
        with data.to_xarray("timeseries") as series:
            assert series["tumour_burden"].dims == ("time", "lesion")
            assert series["total_burden"].dims == ("time",)
            np.testing.assert_array_equal(series["time"].values, RECORD_TIMES)
        with data.to_xarray("systemic") as systemic:
            assert systemic["plasma_anti_pd1"].dims == ("time",)
            assert systemic.sizes["time"] == len(RECORD_TIMES)
        with data.to_xarray("maps") as maps:
            assert maps["vessels"].dims == ("lesion", "x", "y", "z")
        with data.to_xarray("response") as response:
            assert response["category"].dims == ("time",)
            assert list(response["category"].values) == ["SD", "PR"]


def test_xarray_ignores_rows_a_crash_left_past_the_time_axis(tmp_path):
    write_run(tmp_path)
    with h5py.File(tmp_path / "run.h5", "r+") as file:  # killed before /time grew
        file["fields/ifn_gamma"].resize(len(TIMES) + 1, axis=0)
    with open_run(tmp_path) as data:
        assert data.field("ifn_gamma").shape[0] == len(TIMES)
        with data.to_xarray() as fields:
            assert fields.sizes["time"] == len(TIMES)
            np.testing.assert_array_equal(fields["time"].values, TIMES)


def test_to_xarray_without_xarray_says_what_to_install(run, monkeypatch):
    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "xarray", None)  # makes `import xarray` fail
    with open_run(run_dir) as data:
        with pytest.raises(ImportError, match="pip install xarray h5netcdf"):
            data.to_xarray()


def test_refuses_a_newer_schema(tmp_path):
    write_run(tmp_path)
    with h5py.File(tmp_path / "run.h5", "r+") as file:
        file.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as error:
        open_run(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"schema_version {SCHEMA_VERSION + 1}" in message and f"than {SCHEMA_VERSION}" in message
    assert "upgrade tmesolve" in message


def test_refuses_what_is_not_a_run(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["x"] = 1
    with pytest.raises(RunFileError, match="not a tmesolve run file"):
        open_run(tmp_path / "other.h5")
    with pytest.raises(FileNotFoundError, match="run.h5"):
        open_run(tmp_path / "missing")


PEEK = """
import sys
from tmesolve.io import RunFileError, open_run
try:
    with open_run(sys.argv[1], locking=sys.argv[2] == "locking") as data:
        print(data.status, data.n_snapshots, data.response, data.maps)
        data.checkpoint()
except RunFileError as error:
    print(error)
"""


def test_peeking_at_a_run_being_written(tmp_path):
    writer = RunWriter.create(
        tmp_path, grid=GRID, lesions=1, fields=FIELDS[:1], maps={}, dtype="float64",
        attrs={"config": "", "overrides": "", "seed": 0, "backend": "cpu"}, xdmf=False,
    )
    writer.append_snapshot(1.0, {"tumour_cells": np.ones((1, *GRID.shape))})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    try:
        outputs = [
            subprocess.run([sys.executable, "-c", PEEK, str(tmp_path), mode], env=env,
                           capture_output=True, text=True, check=True).stdout.splitlines()
            for mode in ("locking", "no-locking")
        ]
    finally:
        writer.close()
    # HDF5's lock refuses a second process; the message says how to read anyway.
    assert len(outputs[0]) == 1 and "locking=False" in outputs[0][0]
    assert outputs[1][0] == "running 1 {} {}"
    assert "no complete checkpoint" in outputs[1][1]
