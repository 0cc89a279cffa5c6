"""Stopped (or killed) and resumed runs equal uninterrupted ones, bit for bit (CPU, float32)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmesolve.io.hdf5 import RunFileError
from tmesolve.simulation import available_kinds, flatten_state, unflatten_state

#: Chemotaxis with explicit transport: many steps per output, so a resumed run
#: must restore the state exactly to reproduce each step size and value.
CHEMOTAXIS = [
    "experiment=verify_chemotaxis",
    "grid.shape=[12,12,1]",
    "grid.spacing_um=40",
    "output.duration_h=6",
    "output.interval_h=1",
    "output.snapshot_every=2",
    "output.plots=false",
    "output.progress=log",
]

#: A small TME run (used once the TME builder is part of the build).
TME = [
    "experiment=tme",
    "grid.shape=[16,16,16]",
    "grid.spacing_um=25",
    "patient.lesions.0.radius_um=120",
    "therapy.start_day=0",
    "output.duration_h=96",
    "output.interval_h=24",
    "output.plots=false",
    "output.progress=log",
]


def assert_same_results(app, expected: Path, actual: Path) -> None:
    reference = app.datasets(expected / "run.h5")
    resumed = app.datasets(actual / "run.h5")
    assert sorted(reference) == sorted(resumed)
    for name, values in reference.items():
        assert resumed[name].dtype == values.dtype, name
        assert np.array_equal(resumed[name], values, equal_nan=True), name
    with h5py.File(expected / "run.h5", "r") as a, h5py.File(actual / "run.h5", "r") as b:
        assert b.attrs["status"] == "complete"
        for key, dataset in a["checkpoint/arrays"].items():
            assert np.array_equal(dataset[()], b["checkpoint/arrays"][key][()]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tmesolve.cli import main_with_overrides

    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main_with_overrides([*CHEMOTAXIS, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def test_stopped_and_resumed_equals_uninterrupted(app, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    code, _, _ = app.run_in_process(
        [*CHEMOTAXIS, "output.stop_after_snapshots=2", f"hydra.run.dir={run_dir}"]
    )
    assert code == 0
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"] == "running"
        # snapshot_every=2: snapshots at outputs 0 and 2 (t = 0, 2 h), records at 0, 1, 2 h.
        np.testing.assert_array_equal(file["time"][()], [0.0, 2.0])
        np.testing.assert_array_equal(file["timeseries/time"][()], [0.0, 1.0, 2.0])
    overrides_before = (run_dir / ".hydra" / "overrides.yaml").read_text()

    # Run-control settings (plots, progress) come from the resuming command.
    code, stdout, stderr = app.run_in_process([f"resume={run_dir}", "output.plots=false"])
    assert code == 0, stderr
    assert_same_results(app, uninterrupted, run_dir)
    # Resuming keeps Hydra's record of the original job (tmesolve-summary reads it).
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides_before
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert len(file.attrs["resumed"]) == 1


STOP_AT_CHECKPOINT = """
import os, signal, sys, weakref
from tmesolve.io.hdf5 import RunWriter
original = RunWriter.write_checkpoint
count = 0
how = sys.argv[1]  # read now: the app replaces sys.argv while it runs
# submitit's SIGUSR2 handler: requeue the job (left out here), then exit.
signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))
class Released:
    pass
def in_a_weakref_callback(signum):
    # Python discards what the handler raises there (tests/conftest.py).
    released = Released()
    reference = weakref.ref(released, lambda _: signal.raise_signal(signum))
    del released
def write_then_stop(self, *args, **kwargs):
    global count
    if how == "before-first-checkpoint":
        sys.exit(-1)  # as if stopped during the first compile
    original(self, *args, **kwargs)
    count += 1
    if count == 4:
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no status: as a node failure
        elif how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # a queue's time limit, scancel
        elif how == "swallowed-sigterm":
            in_a_weakref_callback(signal.SIGTERM)
        elif how == "swallowed-launcher-exit":
            in_a_weakref_callback(signal.SIGUSR2)
        elif how == "swallowed-then-error":
            in_a_weakref_callback(signal.SIGUSR2)
            raise OSError("disk full")  # before the kept stop's check: the stop still wins
        elif how == "launcher-exit":
            sys.exit(-1)  # what submitit does on SIGUSR2 (preemption, time limit), then requeues
RunWriter.write_checkpoint = write_then_stop
import tmesolve.simulation as simulation_module
build = simulation_module.build_simulation
def build_then_stop(*args, **kwargs):
    built = build(*args, **kwargs)
    if how == "swallowed-during-setup":
        in_a_weakref_callback(signal.SIGUSR2)  # before the run file exists
    return built
simulation_module.build_simulation = build_then_stop
sys.argv = ["tmesolve", *sys.argv[2:]]
from tmesolve.cli import main
main()  # the console command: it owns the process's SIGTERM
"""


def stopped_run(how: str, run_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CHEMOTAXIS run in a fresh interpreter, stopped ``how`` after its 4th
    checkpoint (t = 3 h) or, for ``before-first-checkpoint``, before its first."""
    return subprocess.run(
        [sys.executable, "-c", STOP_AT_CHECKPOINT, how, *CHEMOTAXIS, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ},
    )


def test_killed_and_resumed_equals_uninterrupted(app, uninterrupted, tmp_path):
    """SIGKILL right after the 4th checkpoint (t = 3 h); the file opens, says running, resumes."""
    run_dir = tmp_path / "run"
    killed = stopped_run("sigkill", run_dir, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"] == "running"
        assert file["checkpoint"].attrs["time_h"] == 3.0
    # The same command again (resume=auto): it finds its run.h5 and continues.
    code, _, stderr = app.run_in_process([*CHEMOTAXIS, f"hydra.run.dir={run_dir}"])
    assert code == 0, stderr
    assert_same_results(app, uninterrupted, run_dir)


@pytest.mark.parametrize(("stop", "exit_code"), [
    ("sigterm", 143), ("launcher-exit", 255), ("swallowed-sigterm", 143), ("swallowed-launcher-exit", 255),
    ("swallowed-then-error", 255),
])
def test_terminated_run_says_running_and_resumes(app, uninterrupted, tmp_path, stop, exit_code):
    """A SIGTERM, or a launcher's SystemExit, after the 4th checkpoint (t = 3 h): the
    file closes with status running (not failed), and the same command continues it.
    ``swallowed-``: the signal's handler raised while Python ran a weakref callback,
    which discards the exception (tmesolve.interrupts); the run still stops, at
    the top of its next chunk, without writing past that checkpoint."""
    run_dir = tmp_path / "run"
    stopped = stopped_run(stop, run_dir, tmp_path)
    assert stopped.returncode == exit_code, stopped.stderr
    if stop.startswith("swallowed"):
        assert "Exception ignored" in stopped.stderr
    terminated = "tmesolve: terminated (SIGTERM); the run's checkpoints are kept and it resumes"
    if stop == "sigterm":
        assert stopped.stderr.strip() == terminated
    elif stop == "swallowed-sigterm":  # after Python's report of what it discarded
        assert stopped.stderr.strip().splitlines()[-1] == terminated
    log = (run_dir / "tmesolve.log").read_text()
    assert f"resume with: tmesolve resume={run_dir}" in log
    assert ("error after the stop: OSError: disk full" in log) == (stop == "swallowed-then-error")
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"] == "running"
        assert file["checkpoint"].attrs["time_h"] == 3.0
    code, _, stderr = app.run_in_process([*CHEMOTAXIS, f"hydra.run.dir={run_dir}"])
    assert code == 0, stderr
    assert_same_results(app, uninterrupted, run_dir)


def test_stop_swallowed_during_set_up_ends_the_job_before_it_compiles(app, uninterrupted, tmp_path):
    """The job's scope (cli.run_job) keeps a stop that Python discarded while the
    simulation was being built; the run raises it before compiling (which can take
    longer than a scheduler waits), and the same command starts it again."""
    run_dir = tmp_path / "run"
    stopped = stopped_run("swallowed-during-setup", run_dir, tmp_path)
    assert stopped.returncode == 255 and "Exception ignored" in stopped.stderr, stopped.stderr
    assert "compiled the" not in (run_dir / "tmesolve.log").read_text()
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"] == "running" and "checkpoint" not in file
    code, _, stderr = app.run_in_process([*CHEMOTAXIS, f"hydra.run.dir={run_dir}"])
    assert code == 0, stderr
    assert_same_results(app, uninterrupted, run_dir)


@pytest.mark.parametrize("again", ["same command", "resume=<dir>"])
def test_run_stopped_before_its_first_checkpoint_starts_again(app, uninterrupted, tmp_path, again):
    """A batch job stopped during its first compile leaves run.h5 without a checkpoint:
    the requeued job (the same command, resume=auto) or resume=<dir> starts it again
    instead of failing to resume, recording the first command's overrides."""
    run_dir = tmp_path / "run"
    stopped = stopped_run("before-first-checkpoint", run_dir, tmp_path)
    assert stopped.returncode == 255, stopped.stderr
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"] == "running" and "checkpoint" not in file
    command = [*CHEMOTAXIS, f"hydra.run.dir={run_dir}"] if again == "same command" else [f"resume={run_dir}"]
    code, _, stderr = app.run_in_process(command)
    assert code == 0, stderr
    assert "holds no checkpoint (stopped before its first output): starting it again" in (
        run_dir / "tmesolve.log").read_text()
    assert_same_results(app, uninterrupted, run_dir)
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert [str(item) for item in file.attrs["overrides"]] == CHEMOTAXIS


@pytest.mark.skipif(
    "tme" not in available_kinds(),
    reason="the TME builder (tmesolve.model.tme_setup) is not part of this build yet",
)
def test_tme_stopped_and_resumed_equals_uninterrupted(app, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert app.run_in_process([*TME, f"hydra.run.dir={full}"])[0] == 0
    assert (
        app.run_in_process([*TME, "output.stop_after_snapshots=2", f"hydra.run.dir={part}"])[0] == 0
    )
    code, _, stderr = app.run_in_process([f"resume={part}", "output.plots=false"])
    assert code == 0, stderr
    assert_same_results(app, full, part)


def test_state_round_trip_keeps_structure_dtypes_and_keys():
    """Flattened checkpoint arrays rebuild the same pytree: nested aux, ints, PRNG keys."""
    from tmesolve.model.base import State

    state = State(
        fields=jnp.arange(24, dtype=jnp.float32).reshape(1, 1, 2, 3, 4),
        time=jnp.float32(1.5),
        step=jnp.int32(7),
        aux={"blood": (jnp.ones(3), jnp.int32(2)), "key": jax.random.key(3)},
    )
    arrays, treedef = flatten_state(state)
    assert ".fields" in arrays and arrays[".step"].dtype == np.int32
    restored = unflatten_state(state, {key: np.copy(value) for key, value in arrays.items()})
    assert str(jax.tree_util.tree_structure(restored)) == treedef
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_checkpoint_of_another_configuration_is_refused():
    from tmesolve.model.base import State

    state = State(fields=jnp.zeros((1, 1, 2, 2, 2)), time=jnp.float32(0), step=jnp.int32(0))
    arrays, _ = flatten_state(state)
    with pytest.raises(RunFileError, match="fields"):
        unflatten_state(state, {**arrays, ".fields": np.zeros((1, 1, 3, 2, 2), np.float32)})
    with pytest.raises(RunFileError, match="missing"):
        unflatten_state(state, {key: value for key, value in arrays.items() if key != ".step"})
