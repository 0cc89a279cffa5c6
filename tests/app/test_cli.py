"""The ``tmesolve`` command, the Python API and the verification experiments, end to end."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tmesolve.errors import ConfigError

CORE_CHECK = """
import importlib, pkgutil, sys
import tmesolve
# The edge: configuration, the Hydra entry points (tmesolve; tmesolve-cohort) and the API.
skip = {"tmesolve.config", "tmesolve.cli", "tmesolve.cohort_cli", "tmesolve.api"}
names = sorted(m.name for m in pkgutil.walk_packages(tmesolve.__path__, "tmesolve.") if m.name not in skip)
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf"))
print(len(names), "modules;", "leaked:", leaked)
assert not leaked, leaked
assert "tmesolve.simulation" in sys.modules and "tmesolve.plots" in sys.modules
"""


def test_core_never_imports_hydra_or_omegaconf(app):
    """Only config.py, cli.py (and cohort_cli.py, the other Hydra entry point) and api.py
    may import Hydra/OmegaConf (DESIGN.md)."""
    result = subprocess.run(
        [sys.executable, "-c", CORE_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=app.repo_root,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "leaked: []" in result.stdout


def test_command_writes_the_documented_run_directory(app, tmp_path):
    """A real ``python -m tmesolve.cli`` run: files, provenance, log, figures, one compile cached."""
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    result = app.run_subprocess(
        [
            "experiment=verify_gaussian",
            "grid.shape=[10,10,10]",
            "grid.spacing_um=16",
            "experiment.initial_width_um=24",
            "seed=7",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=120,
        env={"TMESOLVE_CACHE_DIR": str(cache)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    for name in (
        "run.h5",
        "run.xmf",
        "tmesolve.log",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "figures/field_u.png",
        "figures/timeseries.png",
    ):
        assert (run_dir / name).is_file(), name
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"

    with h5py.File(run_dir / "run.h5", "r") as file:
        attrs = dict(file.attrs)
        for key in (
            "schema_version",
            "tmesolve_version",
            "created",
            "config",
            "overrides",
            "seed",
            "backend",
            "jax_version",
            "dtype",
            "status",
            "compile_time_s",
            "summary",
        ):
            assert key in attrs, key
        assert attrs["status"] == "complete"
        assert attrs["seed"] == 7 and attrs["dtype"] == "float32"
        assert attrs["backend"].startswith("cpu")
        assert "seed=7" in list(attrs["overrides"])
        assert "kind: verify_gaussian" in attrs["config"] and "hydra" not in attrs["config"]
        head = subprocess.run(
            ["git", "-C", str(app.repo_root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        if head.returncode == 0:  # a git checkout: the commit is recorded
            assert attrs["git_commit"] == head.stdout.strip()
        # Six outputs (0.02 h every 0.004 h), each a record and a snapshot.
        assert file["fields/u"].shape == (6, 1, 10, 10, 10)
        np.testing.assert_allclose(file["time"][()], np.linspace(0.0, 0.02, 6), rtol=1e-12)
        assert set(file["timeseries"]) >= {
            "relative_l2_error",
            "max_abs_error",
            "total_amount",
            "maximum",
        }
        summary = json.loads(attrs["summary"])
        assert summary["status"] == "complete" and summary["experiment"] == "verify_gaussian"
    log_text = (run_dir / "tmesolve.log").read_text()
    assert "compiled the verify_gaussian chunk" in log_text
    assert "output 6/6" in log_text  # a progress line per output (not a terminal: log mode)
    assert "relative L2 error against the analytic solution" in result.stdout

    # The same job again, in a new process: its loop comes from the compiled-loop
    # cache (no trace) and gives the same numbers.
    rerun_dir = tmp_path / "rerun"
    rerun = app.run_subprocess(
        ["experiment=verify_gaussian", "grid.shape=[10,10,10]", "grid.spacing_um=16",
         "experiment.initial_width_um=24", "seed=7", "output.plots=false", f"hydra.run.dir={rerun_dir}"],
        cwd=tmp_path, timeout=120, env={"TMESOLVE_CACHE_DIR": str(cache)},
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "loaded the verify_gaussian chunk from the compiled-loop cache" in (rerun_dir / "tmesolve.log").read_text()
    with h5py.File(run_dir / "run.h5", "r") as first, h5py.File(rerun_dir / "run.h5", "r") as second:
        np.testing.assert_array_equal(second["fields/u"][()], first["fields/u"][()])


def test_run_file_opens_with_xarray(app, tmp_path):
    from tmesolve.api import run

    result = run(["experiment=verify_cosine", *app.tiny], output_dir=tmp_path / "run")
    xarray = pytest.importorskip("xarray")
    with xarray.open_dataset(result.path / "run.h5", engine="h5netcdf", group="fields") as fields:
        assert fields["u"].dims == ("time", "lesion", "x", "y", "z")
        assert fields["u"].attrs["units"] == "1"


@pytest.mark.parametrize(
    "experiment",
    ["verify_gaussian", "verify_cosine", "verify_source", "verify_chemotaxis", "verify_fisher"],
)
def test_verification_experiments_meet_their_tolerance(tmp_path, experiment):
    """Each verification experiment at its default settings agrees with its analytic answer.

    The tolerances (DEFAULT_TOLERANCES) sit 10-100x above the errors measured on CPU.
    """
    from tmesolve.api import run

    overrides = [f"experiment={experiment}", "output.plots=false"]
    if experiment == "verify_chemotaxis":
        # 16² instead of 32²: ~5 s less; the equilibrium error grows as h² to ~1e-2 at most.
        overrides += ["grid.shape=[16,16,1]", "grid.spacing_um=40", "experiment.tolerance=0.02"]
    result = run(overrides, output_dir=tmp_path / experiment)
    assert result.summary["status"] == "complete"
    assert result.summary["within_tolerance"], result.summary
    assert result.summary["checked_error"] <= result.summary["tolerance"]
    assert result.readouts["relative_l2_error"].shape == result.readouts["time_h"].shape
    with result.open() as data:
        assert data.status == "complete"


@pytest.mark.parametrize("experiment", ["verify_gaussian", "verify_source"])
def test_verification_in_float64(tmp_path, restore_x64, experiment):
    """float64 on request: the same problems to ~1e-9 (Gaussian: the walls) and round-off (source)."""
    from tmesolve.api import run

    result = run(
        [f"experiment={experiment}", "solver.dtype=float64", "output.plots=false"],
        output_dir=tmp_path / "run",
    )
    assert result.summary["within_tolerance"], result.summary
    assert result.summary["tolerance"] <= 1e-8
    with h5py.File(result.path / "run.h5", "r") as file:
        assert file["fields/u"].dtype == np.float64 and file.attrs["dtype"] == "float64"


def test_api_result_and_summary(app, tmp_path):
    from tmesolve.api import run

    result = run(
        ["experiment=verify_source", *app.tiny, "output.fields=[u]"], output_dir=tmp_path / "run"
    )
    assert result.path == (tmp_path / "run").resolve()
    assert set(result.readouts) >= {"time_h", "relative_l2_error", "total_amount"}
    np.testing.assert_allclose(result.readouts["time_h"], np.arange(0.0, 41.0, 4.0))
    assert (result.path / ".hydra" / "overrides.yaml").is_file()
    assert "verify_source" in (result.path / "tmesolve.log").read_text()
    with result.open() as data:
        assert data.field_names == ("u",)
        assert json.loads(data.attrs["summary"])["checked_error"] == result.summary["checked_error"]


def test_existing_run_is_never_overwritten(app, tmp_path):
    """Same configuration: nothing to do; another configuration or resume=never: refused."""
    from tmesolve.api import run

    run_dir = tmp_path / "run"
    first = run(["experiment=verify_cosine", *app.tiny], output_dir=run_dir)
    modified = (run_dir / "run.h5").stat().st_mtime_ns
    again = run(["experiment=verify_cosine", *app.tiny], output_dir=run_dir)
    assert again.summary["checked_error"] == first.summary["checked_error"]
    assert (run_dir / "run.h5").stat().st_mtime_ns == modified
    with pytest.raises(ConfigError, match="resume"):
        run(["experiment=verify_cosine", *app.tiny, "experiment.decay=0.1"], output_dir=run_dir)
    with pytest.raises(ConfigError, match="resume"):
        run(["experiment=verify_cosine", *app.tiny, "resume=never"], output_dir=run_dir)
    code, _, stderr = app.run_in_process(
        ["experiment=verify_cosine", *app.tiny, "experiment.decay=0.1", f"hydra.run.dir={run_dir}"]
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("resume:")


def test_failed_run_is_marked_failed(app, tmp_path):
    """A run that blows up (explicit diffusion with a forced huge step) says so in run.h5 and exits 1."""
    run_dir = tmp_path / "run"
    code, _, stderr = app.run_in_process(
        [
            "experiment=verify_cosine",
            *app.tiny,
            "experiment.path=explicit",
            "solver.safety=1",
            "solver.max_steps=1",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert code == 1, stderr
    assert len(stderr.strip().splitlines()) == 1 and "max_steps" in stderr
    with h5py.File(run_dir / "run.h5", "r") as file:
        assert file.attrs["status"].startswith("failed: ")


def test_output_schedule_includes_the_end():
    from tmesolve.simulation import output_schedule

    np.testing.assert_array_equal(output_schedule(2016.0, 168.0), 168.0 * np.arange(13))
    np.testing.assert_allclose(output_schedule(10.0, 4.0), [0.0, 4.0, 8.0, 10.0])
    # Round-off must not add a sliver of an interval at the end.
    times = output_schedule(0.05, 0.01)
    assert len(times) == 6 and times[-1] == 0.05


def test_progress_lines_in_batch_mode():
    """Not a terminal: a line per output, and a heartbeat while a long chunk runs."""
    from tmesolve.simulation import Progress

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("tmesolve.test_progress")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    log.propagate = False
    progress = Progress("log", 0.0, 2016.0, log, interval_s=0.05, outputs=13)
    progress.chunk_done(0.0, 0, 0.0)
    progress.output(0, 0.0)
    progress.begin_chunk(0.0, 168.0)
    time.sleep(1.3)  # the heartbeat thread checks every min(interval, 1 s)
    progress.chunk_done(168.0, 500, 2.0)
    progress.output(1, 168.0)
    progress.close()
    assert any(line.startswith("computing t = 0 -> 7 d") for line in records), records
    assert any("output 2/13" in line and "250 steps/s" in line for line in records), records


def test_progress_bar_on_a_terminal(capsys):
    """On a terminal: a tqdm bar of simulated time with steps/s (written to stderr)."""
    from tmesolve.simulation import Progress

    progress = Progress("bar", 0.0, 2016.0, logging.getLogger("tmesolve.test_bar"), outputs=13)
    for week in range(1, 13):
        progress.chunk_done(168.0 * week, 100, 0.1)
    progress.close()
    err = capsys.readouterr().err
    assert "simulated: 100%" in err and "84/84 d" in err and "1000 steps/s" in err
