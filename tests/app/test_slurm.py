"""Sweeps through a real Slurm scheduler (Hydra's ``submitit_slurm`` launcher).

What the launcher config (conf/hydra/launcher/submitit_slurm.yaml) promises,
checked against a real controller and node: a sweep's jobs run and
``tmesolve-summary`` reads them, and a job that Slurm signals to stop is
requeued and continues from its checkpoint to the values of an uninterrupted
run: a ``tmesolve`` job from its run.h5, a ``tmesolve-cohort`` trial from
progress/. The signal is SIGUSR2 (``scancel --signal=USR2``): what Slurm sends
before a job's time limit (``--signal=USR2@signal_delay_s``, which submitit asks
for) and, where the site sets ``PreemptParameters=send_user_signal``, on a
preemption; submitit then exits the job and requeues it. A real time limit is
the ``long`` test.

They submit jobs, so they run only with ``TMESOLVE_SLURM_TESTS=1`` and a
scratch scheduler: ``.ci/slurm/start`` starts one (controller, node and the
accounting submitit reads with ``sacct``) on a Debian machine, and CI does.
Never against a site's own Slurm: the jobs would need this node's /tmp.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

#: Jobs of one CPU and little memory, on the cluster's default partition, without
#: the GPU the launcher config asks for by default.
LAUNCHER = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=20",
]

#: A TME job long enough to be stopped half-way: 8 weeks of the small grid, an
#: output (and checkpoint) every day.
TME_JOB = [
    "grid=small",
    "output.duration_h=1344",
    "output.interval_h=24",
    "output.plots=false",
    "output.progress=log",
]

#: A trial that checkpoints at every stop (tests/test_cohort.py's tiny trial, two years
#: long: about 20 s of stepping here, for the signal to land well inside it).
TRIAL = [
    "cohort.n_patients=2",
    "cohort.lesions_max=1",
    "grid.voxels=6",
    "grid.spacing_um=100",
    "trial.weeks=104",
    "trial.lead_in_weeks=1",
    "trial.arms=[none,nivolumab]",
    "solver.dt_max_h=2.0",
    "output.figures=false",
    "output.checkpoint_minutes=0",
]

WAIT_S = 240.0
#: Seconds between a job's requeue and its release (see :func:`_signal_to_stop`).
CREDENTIAL_MARGIN_S = 3.0


def _slurm_command(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _slurm_is_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return False
    try:
        states = _slurm_command("sinfo", "-h", "-o", "%T")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return states.returncode == 0 and any(
        state.strip().rstrip("*~#") in ("idle", "mixed", "allocated") for state in states.stdout.split()
    )


@pytest.fixture(scope="module")
def slurm():
    if os.environ.get("TMESOLVE_SLURM_TESTS", "") in ("", "0"):
        pytest.skip("needs TMESOLVE_SLURM_TESTS=1 and a scratch Slurm (.ci/slurm/start; CI starts one)")
    if not _slurm_is_up():
        pytest.fail("TMESOLVE_SLURM_TESTS is set but no Slurm controller with a node up answers (sinfo)")


@pytest.fixture
def launches():
    """The sweeps a test starts; afterwards none is left running, here or in Slurm."""
    started: list[tuple[subprocess.Popen, Path]] = []
    yield started
    for launcher, sweep_dir in started:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        submitted = sweep_dir / ".submitit"
        for folder in submitted.iterdir() if submitted.is_dir() else ():
            if folder.name.isdigit():
                _slurm_command("scancel", folder.name)


def _launch(launches, module: str, args: list[str], sweep_dir: Path) -> subprocess.Popen:
    """``python -m <module> -m <args>`` with the Slurm launcher into ``sweep_dir``, in the background.

    ``args`` come after :data:`LAUNCHER`, so a test's own launcher settings win.
    """
    environment = dict(os.environ)
    environment.pop("TMESOLVE_DEBUG", None)
    environment.pop("HYDRA_FULL_ERROR", None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", module, "-m", *LAUNCHER, *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    launches.append((launcher, sweep_dir))
    return launcher


def _wait_until(condition, what: str, launcher: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if launcher.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {launcher.stderr.read()}")
        if time.monotonic() > deadline:
            launcher.kill()
            pytest.fail(f"waited {WAIT_S:.0f} s for {what}")
        time.sleep(0.1)


def _slurm_job(sweep_dir: Path, index: int) -> str:
    """The Slurm id of job ``index`` of the sweep: ``<array>_<index>``, or a lone job's own id.

    submitit keeps each submission in ``.submitit/<id>/``; a sweep of several
    jobs is one array job (``#SBATCH --array``).
    """
    folders = [path for path in (sweep_dir / ".submitit").iterdir() if path.name.isdigit()]
    assert len(folders) == 1, folders
    job_id = folders[0].name
    script = (folders[0] / f"{job_id}_submission.sh").read_text(encoding="utf-8")
    return f"{job_id}_{index}" if "--array" in script else job_id


def _signal_to_stop(task: str, launcher: subprocess.Popen) -> None:
    """Send SIGUSR2 to Slurm job ``task``, as Slurm does before its time limit; start the requeued job soon.

    Slurm holds a requeued job for two minutes (its begin time, the lifetime
    of the revoked job credential); the test starts it after a few seconds
    instead. Not at once: slurmd refuses a credential issued in the same second
    as the revocation ("Job credential revoked") and the job fails.
    """
    stopped = _slurm_command("scancel", "--signal=USR2", task)
    assert stopped.returncode == 0, stopped.stderr
    _release_when_requeued(task, launcher)


def _release_when_requeued(task: str, launcher: subprocess.Popen) -> None:
    """Wait for job ``task`` to be requeued (PENDING), then start it after :data:`CREDENTIAL_MARGIN_S`."""

    def pending() -> bool:
        state = _slurm_command("squeue", "-h", "-j", task, "-o", "%T").stdout.strip()
        return state == "PENDING"

    _wait_until(pending, f"job {task} to be requeued", launcher)
    time.sleep(CREDENTIAL_MARGIN_S)
    released = _slurm_command("scontrol", "update", f"JobId={task}", "StartTime=now")
    assert released.returncode == 0, released.stderr


def _finish(launcher: subprocess.Popen) -> str:
    try:
        _, stderr = launcher.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    assert launcher.returncode == 0, stderr
    return stderr


def _log_text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def test_signalled_job_of_a_sweep_resumes_to_the_uninterrupted_values(slurm, launches, app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = _launch(launches, "tmesolve.cli", [*TME_JOB, "tme=inflamed,desert"], sweep_dir)
    log = sweep_dir / "0" / "tmesolve.log"
    _wait_until(lambda: "output 5/" in _log_text(log), "job 0's fifth output of 57", launcher)
    _signal_to_stop(_slurm_job(sweep_dir, 0), launcher)
    _finish(launcher)

    text = _log_text(log)
    assert "Requeued job" in text and "stopped (SystemExit)" in text
    assert "resuming" in text and "status complete" in text
    with h5py.File(sweep_dir / "0" / "run.h5", "r") as file:
        assert len(file.attrs["resumed"]) == 1
    # The same job without Slurm, uninterrupted: the same values, bit for bit.
    reference = tmp_path / "reference"
    code, _, stderr = app.run_in_process([*TME_JOB, "tme=inflamed", f"hydra.run.dir={reference}"])
    assert code == 0, stderr
    expected, resumed = app.datasets(reference / "run.h5"), app.datasets(sweep_dir / "0" / "run.h5")
    assert sorted(expected) == sorted(resumed)
    for name, values in expected.items():
        assert np.array_equal(resumed[name], values, equal_nan=True), name

    from tmesolve.cli import summary_main

    assert summary_main([str(sweep_dir)]) == 0
    with open(sweep_dir / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["tme"], row["status"]) for row in rows] == [
        ("0", "inflamed", "complete"), ("1", "desert", "complete")
    ]


@pytest.mark.long
def test_job_at_its_time_limit_is_requeued_until_done(slurm, launches, app, tmp_path):
    """A real time limit: one minute, SIGUSR2 30 s before it. Slurm checks its limits
    about every 30 s, so the signal comes 30-60 s into an attempt. The job (a year,
    about 90 s of stepping here) needs several attempts; each continues from run.h5."""
    sweep_dir = tmp_path / "sweep"
    job = [*TME_JOB, "output.duration_h=8760"]
    launcher = _launch(launches, "tmesolve.cli", [*job, "hydra.launcher.timeout_min=1",
                                                  "hydra.launcher.signal_delay_s=30",
                                                  "hydra.launcher.max_num_timeout=10"], sweep_dir)
    log = sweep_dir / "0" / "tmesolve.log"
    released = 0
    while launcher.poll() is None:
        # Each requeue: start it after the credential margin instead of Slurm's two minutes.
        if log.is_file() and _log_text(log).count("Requeued job") > released:
            _release_when_requeued(_slurm_job(sweep_dir, 0), launcher)
            released += 1
        time.sleep(0.2)
    _finish(launcher)
    text = _log_text(log)
    assert "this job is timed-out" in text and text.count("resuming") >= 1 and "status complete" in text
    reference = tmp_path / "reference"
    code, _, stderr = app.run_in_process([*job, f"hydra.run.dir={reference}"])
    assert code == 0, stderr
    expected, resumed = app.datasets(reference / "run.h5"), app.datasets(sweep_dir / "0" / "run.h5")
    for name, values in expected.items():
        assert np.array_equal(resumed[name], values, equal_nan=True), name


def test_signalled_trial_resumes_from_its_checkpoints(slurm, launches, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = _launch(launches, "tmesolve.cohort_cli", TRIAL, sweep_dir)
    progress = sweep_dir / "0" / "progress"
    _wait_until(lambda: any(progress.glob("chunk-*.h5")), "the trial's first checkpoint", launcher)
    _signal_to_stop(_slurm_job(sweep_dir, 0), launcher)
    _finish(launcher)

    log = _log_text(sweep_dir / "0" / "tmesolve-cohort.log")
    assert "stopped (SystemExit): the same command continues" in log and "resumed from" in log
    assert not progress.exists()
    with h5py.File(sweep_dir / "0" / "cohort.h5", "r") as handle:
        assert [chunk["attempts"] for chunk in json.loads(handle.attrs["chunks"])] == [2]
    # The same trial without Slurm, uninterrupted: the same patient table.
    from tmesolve.cohort_cli import main

    reference = tmp_path / "reference"
    assert main([*TRIAL, f"hydra.run.dir={reference}"]) == 0
    assert (sweep_dir / "0" / "patients.csv").read_text() == (reference / "patients.csv").read_text()
