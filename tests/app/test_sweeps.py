"""Multiruns with the basic, joblib and submitit_local launchers, and tmesolve-summary."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

SWEEP = [
    "experiment=verify_cosine",
    "grid.shape=[8,8,8]",
    "output.plots=false",
    "output.progress=log",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def summarise(sweep_dir: Path) -> tuple[list[dict[str, str]], h5py.File]:
    from tmesolve.cli import summary_main

    assert summary_main([str(sweep_dir)]) == 0
    return read_csv(sweep_dir / "summary.csv"), h5py.File(sweep_dir / "summary.h5", "r")


def test_basic_launcher_sweep_and_summary(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, _, stderr = app.run_in_process(
        ["-m", *SWEEP, "experiment.diffusivity=1000,4000", f"hydra.sweep.dir={sweep_dir}"]
    )
    assert code == 0, stderr
    rows, table = summarise(sweep_dir)
    with table:
        assert len(rows) == 2 and table.attrs["jobs"] == 2
        assert [row["experiment.diffusivity"] for row in rows] == ["1000", "4000"]
        assert all(row["status"] == "complete" for row in rows)
        errors = table["final.relative_l2_error"][()]
        assert errors.dtype == np.float64 and np.all(errors < 2e-6)
        # The faster diffusion leaves a smaller maximum of the decaying mode.
        maxima = [float(row["final.maximum"]) for row in rows]
        assert maxima[1] < maxima[0]


def test_failed_job_fails_the_sweep(app, tmp_path):
    """A job with a bad value stops the sweep with a non-zero exit and names the key."""
    code, _, stderr = app.run_in_process(
        ["-m", *SWEEP, "experiment.diffusivity=1000,-5", f"hydra.sweep.dir={tmp_path}/sweep"]
    )
    assert code == 2
    assert "experiment.diffusivity: got -5.0" in stderr


def test_joblib_two_by_two_sweep(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = app.run_subprocess(
        [
            "-m",
            *SWEEP,
            "experiment.diffusivity=1000,4000",
            "experiment.decay=0.1,0.6",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr
    rows, table = summarise(sweep_dir)
    with table:
        assert len(rows) == 4
        pairs = {(row["experiment.diffusivity"], row["experiment.decay"]) for row in rows}
        assert pairs == {("1000", "0.1"), ("1000", "0.6"), ("4000", "0.1"), ("4000", "0.6")}
        assert list(table["status"].asstr()[()]) == ["complete"] * 4
    from tmesolve.plots import plot_sweep

    (figure,) = plot_sweep(sweep_dir)
    assert figure.is_file() and figure.stat().st_size > 10_000


def test_submitit_local_sweep(app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = app.run_subprocess(
        [
            "-m",
            *SWEEP,
            "experiment.diffusivity=1000,4000",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    rows, table = summarise(sweep_dir)
    with table:
        assert len(rows) == 2
        assert {row["experiment.diffusivity"] for row in rows} == {"1000", "4000"}
        assert all(row["summary.within_tolerance"] in ("True", "1.0") for row in rows)


def test_summary_command_needs_runs(tmp_path, capsys):
    from tmesolve.cli import summary_main

    assert summary_main([str(tmp_path)]) == 1
    assert "no run directories" in capsys.readouterr().err
