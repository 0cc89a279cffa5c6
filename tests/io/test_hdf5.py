"""RunWriter: layout of run.h5, crash safety, checkpoint round trip, resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tmesolve.errors import ConfigError
from tmesolve.grid import Grid
from tmesolve.io.hdf5 import (
    CHECKPOINT,
    CHECKPOINT_TMP,
    SCHEMA_VERSION,
    FieldSpec,
    RunWriter,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
GRID = Grid(shape=(6, 5, 4), spacing_um=20.0, origin_um=(-60.0, -50.0, 0.0))
LESIONS = 2
FIELDS = (
    FieldSpec("tumour_cells", "cells/mm^3", "viable tumour cells"),
    FieldSpec("effector_t_cells", "cells/mm^3", "effector CD8+ T cells"),
    FieldSpec("ifn_gamma", "ng/mL", "interferon gamma"),
)
TIMESERIES = (("tumour_burden", "cells", True), ("total_burden", "cells", False))
SYSTEMIC = (("plasma_anti_pd1", "ug/mL"), ("irae_grade", "1"))
PROVENANCE = {
    "config": "grid:\n  shape: [6, 5, 4]\n",
    "overrides": ["grid.shape=[6,5,4]", "seed=7"],
    "seed": 7,
    "backend": "cpu (test)",
    "git_commit": "0123abc",
}


def field_values(name_index: int, snapshot: int) -> np.ndarray:
    """Deterministic, distinct values per field and snapshot (so mix-ups show)."""
    base = np.arange(LESIONS * GRID.num_voxels, dtype=np.float64).reshape(LESIONS, *GRID.shape)
    return base * 0.25 + 100.0 * name_index + 1000.0 * snapshot


def snapshot(k: int) -> dict[str, np.ndarray]:
    return {spec.name: field_values(i, k) for i, spec in enumerate(FIELDS)}


def new_writer(path: Path, **kwargs) -> RunWriter:
    maps = {"vessels": (np.ones((LESIONS, *GRID.shape)), "1", "vessel density")}
    options = dict(
        grid=GRID, lesions=LESIONS, fields=FIELDS, maps=maps, dtype="float32",
        attrs=PROVENANCE, timeseries=TIMESERIES, systemic=SYSTEMIC, xdmf=False,
    )
    options.update(kwargs)
    return RunWriter.create(path, **options)


def append(writer: RunWriter, k: int, time_h: float) -> None:
    writer.append_snapshot(time_h, snapshot(k))
    writer.append_record(
        time_h,
        {"tumour_burden": np.array([k, k + 0.5]), "total_burden": 2.0 * k + 0.5},
        {"plasma_anti_pd1": 10.0 * k, "irae_grade": 0.0},
    )


def test_layout_follows_the_contract(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        for k in range(3):
            append(writer, k, 12.0 * k)
        writer.set_status("complete")

    with h5py.File(path, "r") as file:
        for key in ("schema_version", "tmesolve_version", "created", "config", "overrides",
                    "seed", "backend", "jax_version", "dtype", "git_commit", "status"):
            assert key in file.attrs, key
        assert file.attrs["schema_version"] == SCHEMA_VERSION
        assert file.attrs["status"] == "complete"
        assert file.attrs["dtype"] == "float32"
        # Strings are variable-length UTF-8 (readable by any HDF5 tool, no size limit).
        string_info = h5py.check_string_dtype(file.attrs.get_id("config").dtype)
        assert string_info is not None and string_info.length is None
        assert string_info.encoding == "utf-8"
        assert list(file.attrs["overrides"]) == PROVENANCE["overrides"]

        assert tuple(file["grid"].attrs["shape"]) == GRID.shape
        assert file["grid"].attrs["lesions"] == LESIONS
        np.testing.assert_array_equal(file["grid/x"][()], GRID.axis_coordinates(0))
        np.testing.assert_array_equal(file["time"][()], [0.0, 12.0, 24.0])

        dataset = file["fields/tumour_cells"]
        assert dataset.shape == (3, LESIONS, *GRID.shape)
        assert dataset.maxshape == (None, LESIONS, *GRID.shape)
        assert dataset.chunks == (1, 1, *GRID.shape)
        assert dataset.compression == "gzip" and dataset.shuffle
        assert dataset.dtype == np.float32
        assert [dim.label for dim in dataset.dims] == ["time", "lesion", "x", "y", "z"]
        assert dataset.dims[0][0] == file["time"]
        assert dataset.dims[2][0] == file["grid/x"]
        np.testing.assert_array_equal(dataset[2], field_values(0, 2).astype(np.float32))

        assert file["timeseries/tumour_burden"].shape == (3, LESIONS)
        assert file["timeseries/total_burden"].shape == (3,)
        # /systemic shares the record times of /timeseries (one object, two links).
        assert file["systemic/time"] == file["timeseries/time"]
        np.testing.assert_array_equal(file["systemic/plasma_anti_pd1"][()], [0.0, 10.0, 20.0])

        missing_units = []
        file.visititems(
            lambda name, item: missing_units.append(name)
            if isinstance(item, h5py.Dataset) and "units" not in item.attrs else None
        )
        assert missing_units == []


def test_checkpoint_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {
        "fields": rng.standard_normal((LESIONS, *GRID.shape)).astype(np.float32),
        "systemic/plasma": rng.standard_normal(5),  # float64, key with a slash
        "rng_key": np.array([123456789, 4294967295], dtype=np.uint32),
        "step_counter": np.array(7, dtype=np.int32),  # 0-d
        "alive": np.array([True, False, True]),
        "odd%2Fkey/.x": np.arange(3, dtype=np.int64),  # looks escaped already
        ".hidden": np.zeros(2, dtype=np.float16),
        "µ/unicode": np.ones(1),
    }
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        writer.write_checkpoint({"fields": np.zeros(1)}, step=1, time_h=0.5)
        writer.write_checkpoint(arrays, step=42, time_h=10.25,
                                meta={"dt_h": 0.01, "scheme": "strang", "n": 3})
        restored, step, time_h, meta = writer.read_checkpoint()

    assert (step, time_h) == (42, 10.25)
    assert meta == {"dt_h": 0.01, "scheme": "strang", "n": 3}
    assert set(restored) == set(arrays)
    for key, array in arrays.items():
        assert restored[key].dtype == array.dtype, key
        assert restored[key].shape == array.shape, key
        np.testing.assert_array_equal(restored[key], array)  # bit-for-bit, no tolerance
    with h5py.File(path, "r") as file:
        assert CHECKPOINT in file and CHECKPOINT_TMP not in file


def test_checkpoint_reader_takes_the_complete_copy(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        writer.write_checkpoint({"a": np.array([1.0])}, step=1, time_h=1.0)

    # A crash while writing the tmp copy: the old, complete checkpoint wins.
    with h5py.File(path, "r+") as file:
        partial = file.create_group(CHECKPOINT_TMP)
        partial.create_group("arrays").create_dataset("a", data=[2.0])
        partial.attrs["step"] = 2
    writer = RunWriter.open_for_resume(path, xdmf=False)
    arrays, step, _, _ = writer.read_checkpoint()
    assert step == 1 and arrays["a"][0] == 1.0
    writer.close()

    # A crash after the tmp copy was complete, before the move: the tmp copy wins.
    with h5py.File(path, "r+") as file:
        file[CHECKPOINT_TMP].create_group("meta")
        file[CHECKPOINT_TMP].attrs["time_h"] = 2.0
        file[CHECKPOINT_TMP].attrs["complete"] = 1
    writer = RunWriter.open_for_resume(path, xdmf=False)
    arrays, step, time_h, _ = writer.read_checkpoint()
    assert (step, time_h, arrays["a"][0]) == (2, 2.0, 2.0)
    # The next checkpoint clears the leftover and leaves one clean copy.
    writer.write_checkpoint({"a": np.array([3.0])}, step=3, time_h=3.0)
    assert writer.read_checkpoint()[1] == 3
    assert CHECKPOINT_TMP not in writer.file
    writer.close()


def test_repeated_checkpoints_reuse_file_space(tmp_path):
    path = tmp_path / "run.h5"
    state = np.random.default_rng(0).standard_normal(2**18)  # 2 MiB, incompressible
    with new_writer(path) as writer:
        for step in range(12):
            writer.write_checkpoint({"state": state + step}, step=step, time_h=float(step))
    # Freed checkpoints are reused while the file is open: about two copies
    # live at once (old + tmp); 12 copies would be 24 MiB.
    assert path.stat().st_size < 4 * state.nbytes


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    new_writer(path).close()
    with pytest.raises(FileExistsError) as error:
        new_writer(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "resume" in message
    with h5py.File(path, "r") as file:  # untouched
        assert file["time"].shape == (0,)
    with new_writer(tmp_path, overwrite=True) as writer:  # a directory means its run.h5
        assert writer.path == path


def test_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        new_writer(tmp_path / "a.h5", dtype="float16")
    with pytest.raises(ConfigError, match="time"):
        new_writer(tmp_path / "b.h5", fields=(FieldSpec("time", "h", "clash"),))
    with pytest.raises(ValueError, match="seed"):
        new_writer(tmp_path / "c.h5", attrs={"config": "", "overrides": "", "backend": "cpu"})
    with pytest.raises(ValueError, match="map 'v'"):
        new_writer(tmp_path / "d.h5", maps={"v": (np.ones(GRID.shape), "1", "wrong shape")})
    assert not any(tmp_path.iterdir())  # nothing half-written left behind

    with new_writer(tmp_path / "run.h5") as writer:
        with pytest.raises(ValueError, match="got fields"):
            writer.append_snapshot(0.0, {"tumour_cells": field_values(0, 0)})
        bad = snapshot(0)
        bad["ifn_gamma"] = bad["ifn_gamma"][0]
        with pytest.raises(ValueError, match="ifn_gamma"):
            writer.append_snapshot(0.0, bad)
        assert writer.n_snapshots == 0
        writer.append_snapshot(1.0, snapshot(0))
        with pytest.raises(ValueError, match="not after"):
            writer.append_snapshot(1.0, snapshot(1))
        with pytest.raises(ValueError, match="status"):
            writer.set_status("done")


def test_exception_marks_the_run_failed(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError):
        with new_writer(path) as writer:
            append(writer, 0, 0.0)
            raise RuntimeError("NaN in tumour_cells\nat step 12")
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "failed: RuntimeError: NaN in tumour_cells at step 12"
        assert file["time"].shape == (1,)


class UncompletedJobError(Exception):
    """Named as submitit's error for a job out of requeues (matched by name)."""


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(-1), UncompletedJobError("timed-out too many times")],
                         ids=["ctrl-c", "launcher-exit", "out-of-requeues"])
def test_a_stopped_run_stays_running(tmp_path, stop):
    """Ctrl-C, SIGTERM, a batch launcher's SystemExit (submitit, on preemption or
    before a time limit) or its last time limit stop a run that is not wrong: it
    stays resumable."""
    path = tmp_path / "run.h5"
    with pytest.raises(type(stop)):
        with new_writer(path) as writer:
            append(writer, 0, 0.0)
            raise stop
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "running"
        assert file["time"].shape == (1,)


def test_truncate_after_then_resume_appends_without_duplicates(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        for k in range(4):
            append(writer, k, 10.0 * k)
        writer.write_checkpoint({"state": np.arange(4.0)}, step=100, time_h=10.0)
        append(writer, 4, 40.0)
        # killed here: status stays "running"

    writer = RunWriter.open_for_resume(path, xdmf=False)
    assert writer.status == "running"
    assert [spec.name for spec in writer.fields] == sorted(spec.name for spec in FIELDS)
    arrays, step, time_h, _ = writer.read_checkpoint()
    writer.truncate_after(time_h)
    assert writer.n_snapshots == 2 and writer.n_records == 2
    for k in range(2, 4):  # the resumed run recomputes 20 h and 30 h
        append(writer, k, 10.0 * k)
    writer.set_status("complete")
    writer.close()

    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(file["time"][()], [0.0, 10.0, 20.0, 30.0])
        np.testing.assert_array_equal(file["timeseries/time"][()], [0.0, 10.0, 20.0, 30.0])
        assert file["fields/ifn_gamma"].shape[0] == 4
        assert file["systemic/irae_grade"].shape == (4,)
        np.testing.assert_array_equal(file["fields/ifn_gamma"][3],
                                      field_values(2, 3).astype(np.float32))
        assert file.attrs["status"] == "complete" and len(file.attrs["resumed"]) == 1


def test_truncate_trims_a_field_left_longer_by_a_crash(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        append(writer, 0, 0.0)
        # As if killed after writing a field row but before extending /time.
        writer.file["fields/tumour_cells"].resize(2, axis=0)
    writer = RunWriter.open_for_resume(path, xdmf=False)
    writer.truncate_after(0.0)
    assert writer.file["fields/tumour_cells"].shape[0] == 1
    append(writer, 1, 5.0)
    writer.close()


def test_resume_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "run.h5"
    new_writer(path).close()
    with h5py.File(path, "r+") as file:
        file.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="upgrade tmesolve"):
        RunWriter.open_for_resume(path)


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from tmesolve.grid import Grid
    from tmesolve.io.hdf5 import FieldSpec, RunWriter

    grid = Grid(shape=(16, 16, 16))
    fields = [FieldSpec(name, "1", name) for name in ("a", "b", "c")]
    writer = RunWriter.create(
        sys.argv[1], grid=grid, lesions=2, fields=fields, maps={}, dtype="float32",
        attrs={"config": "", "overrides": [], "seed": 0, "backend": "cpu"},
        timeseries=[("burden", "cells", True)], systemic=[("drug", "ug/mL")], xdmf=True,
    )
    noise = np.random.default_rng(0).random((2, 16, 16, 16))
    for k in range(1_000_000):
        writer.append_snapshot(float(k), {n: noise + 10 * k + i for i, n in enumerate("abc")})
        writer.append_record(float(k), {"burden": np.array([k, -k])}, {"drug": float(k)})
        print(k, flush=True)
    """
)


def test_sigkill_leaves_a_readable_running_file(tmp_path):
    path = tmp_path / "run.h5"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        announced = -1
        while announced < 5:
            line = child.stdout.readline()
            assert line, f"child exited early with code {child.poll()}"
            announced = int(line)
        child.send_signal(signal.SIGKILL)  # mid-write of the next snapshot, most likely
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    noise = np.random.default_rng(0).random((2, 16, 16, 16))
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "running"
        count = file["time"].shape[0]
        assert count >= announced + 1
        np.testing.assert_array_equal(file["time"][: announced + 1], np.arange(announced + 1))
        for i, name in enumerate("abc"):
            for k in range(announced + 1):
                np.testing.assert_array_equal(
                    file["fields"][name][k], (noise + 10 * k + i).astype(np.float32)
                )
        assert file["timeseries/time"].shape[0] >= announced + 1
    # The sidecar, rewritten by rename after each snapshot, is whole XML.
    import xml.etree.ElementTree as ET

    assert ET.parse(tmp_path / "run.xmf").getroot().tag == "Xdmf"

    # The killed run resumes: reopen, trim to a time and append again.
    writer = RunWriter.open_for_resume(path, xdmf=False)
    writer.truncate_after(2.0)
    writer.append_snapshot(3.0, {n: noise for n in "abc"})
    assert writer.n_snapshots == 4
    writer.close()


@pytest.mark.skipif(shutil.which("h5dump") is None,
                    reason="h5dump not installed (apt-get install hdf5-tools)")
def test_h5dump_reads_the_file(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as writer:
        for k in range(3):
            append(writer, k, float(k))
        writer.write_checkpoint({"state/x": np.arange(5000.0)}, step=3, time_h=2.0)
        writer.write_response(assessment_time_h=[0.0, 2.0], sum_diameters_mm=[10.0, 7.0],
                              category=["SD", "PR"], best_response="PR",
                              time_to_progression_h=float("nan"))
    header = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True)
    assert header.returncode == 0, header.stderr
    assert 'DATASET "tumour_cells"' in header.stdout
    for index, name in ((0, "tumour_cells"), (2, "ifn_gamma")):
        data = subprocess.run(["h5dump", "-d", f"/fields/{name}", str(path)],
                              capture_output=True, text=True)
        assert data.returncode == 0, data.stderr
        # h5dump decompressed every chunk: the last row ends with the last value.
        last_row = next(line for line in data.stdout.splitlines() if "(2,1,5,4,0):" in line)
        assert last_row.rstrip().endswith(f"{field_values(index, 2)[-1, -1, -1, -1]:g}")
    checkpoint = subprocess.run(["h5dump", "-d", "/checkpoint/arrays/state%2Fx", str(path)],
                                capture_output=True, text=True)
    assert checkpoint.returncode == 0, checkpoint.stderr
