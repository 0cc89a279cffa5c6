"""Bad settings stop the command before anything runs: one line on stderr, non-zero exit, no run.h5.

Each row is an override (or a few) and the key the message must name. Rows
run in-process through ``main_with_overrides`` (validation fails before any
compilation, so a row takes ~0.1 s); three rows also run as real
subprocesses, to check what a user sees in a terminal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

HAS_PARAMETER_TABLE = importlib.util.find_spec("tmesolve.model.parameters") is not None

#: (id, overrides, key named in the message). "{tmp}" is the test's folder.
ROWS = [
    (
        "negative_diffusion_verification",
        ["experiment=verify_gaussian", "experiment.diffusivity=-1"],
        "experiment.diffusivity",
    ),
    (
        "zero_decay_source_problem",
        ["experiment=verify_source", "experiment.decay=0"],
        "experiment.decay",
    ),
    ("unknown_preset_group", ["tme=lukewarm"], "tme"),
    ("unknown_preset_value", ["tme.preset=lukewarm"], "tme.preset"),
    ("zero_grid", ["grid.shape=[0,32,32]"], "grid.shape[0]"),
    ("huge_grid", ["grid.shape=[4096,4096,4096]"], "grid.shape[0]"),
    ("grid_of_four_axes", ["grid.shape=[8,8,8,8]"], "grid.shape"),
    ("zero_dt", ["solver.dt_max_h=0"], "solver.dt_max_h"),
    ("negative_dt", ["solver.dt_max_h=-1"], "solver.dt_max_h"),
    ("nan_dt", ["solver.dt_max_h=nan"], "solver.dt_max_h"),
    ("safety_above_one", ["solver.safety=2"], "solver.safety"),
    ("spacing_not_a_number", ["grid.spacing_um=abc"], "grid.spacing_um"),
    (
        "missing_map_file",
        ["experiment=tme", "patient.lesions.0.maps.vessels={tmp}/absent.npy"],
        "patient.lesions[0].maps.vessels",
    ),
    (
        "map_of_wrong_shape",
        ["experiment=tme", "patient.lesions.0.maps.vessels={tmp}/wrong_shape.npy"],
        "patient.lesions[0].maps.vessels",
    ),
    ("unknown_therapy_group", ["therapy=aspirin"], "therapy"),
    ("unknown_regimen", ["therapy.regimens=[aspirin]"], "therapy.regimens[0]"),
    ("dose_in_the_past", ["therapy.start_day=-3"], "therapy.start_day"),
    ("zero_output_interval", ["output.interval_h=0"], "output.interval_h"),
    (
        "interval_longer_than_duration",
        ["output.interval_h=10", "output.duration_h=5"],
        "output.interval_h",
    ),
    ("negative_duration", ["output.duration_h=-1"], "output.duration_h"),
    ("unknown_field", ["output.fields=[bogus]"], "output.fields"),
    ("zero_snapshot_every", ["output.snapshot_every=0"], "output.snapshot_every"),
    ("half_precision", ["solver.dtype=float16"], "solver.dtype"),
    ("third_order_splitting", ["solver.splitting_order=3"], "solver.splitting_order"),
    (
        "merged_reactions_under_lie",
        ["solver.splitting_order=1", "solver.merge_reactions=true"],
        "solver.merge_reactions",
    ),
    ("negative_seed", ["seed=-1"], "seed"),
    ("seven_lesions", ["patient.lesions=[{},{},{},{},{},{},{}]"], "patient.lesions"),
    ("unknown_phenotype", ["patient.lesions.0.phenotype=hot"], "patient.lesions[0].phenotype"),
    (
        "radius_larger_than_box",
        ["experiment=tme", "patient.lesions.0.radius_um=5000"],
        "patient.lesions[0].radius_um",
    ),
    ("misspelt_key", ["grid.spacing=10"], "grid.spacing"),
    (
        "unresolvable_interpolation",
        ["output.compilation_cache_dir=${oc.env:TMESOLVE_TEST_UNSET}"],
        "output.compilation_cache_dir",
    ),
    ("resume_without_a_run", ["resume={tmp}/no_such_run"], "resume"),
]
CASES = [pytest.param(overrides, key, id=name) for name, overrides, key in ROWS] + [
    pytest.param(
        ["experiment=tme", "tme.params.D_T=-1"],
        "tme.params.D_T",
        id="negative_tme_diffusion",
        marks=pytest.mark.skipif(
            not HAS_PARAMETER_TABLE, reason="needs tmesolve.model.parameters (the parameter table)"
        ),
    ),
]


def _expand(overrides: list[str], tmp: Path) -> list[str]:
    return [item.replace("{tmp}", str(tmp)) for item in overrides]


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    np.save(tmp_path / "wrong_shape.npy", np.zeros((4, 4, 4)))
    return tmp_path


def _check(code: int, stderr: str, key: str, run_dir: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, stderr
    assert lines[0].startswith(key) or f"{key}:" in lines[0], lines[0]
    assert not (run_dir / "run.h5").exists()


@pytest.mark.parametrize("overrides,key", CASES)
def test_bad_override_is_one_line_naming_the_key(app, bad_inputs, overrides, key):
    run_dir = bad_inputs / "run"
    code, _, stderr = app.run_in_process(
        [*_expand(overrides, bad_inputs), f"hydra.run.dir={run_dir}"]
    )
    _check(code, stderr, key, run_dir)
    # Composition errors exit before Hydra makes the directory; validation errors after
    # (with .hydra/ and the log), but never with results in it.
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {".hydra", "tmesolve.log"}


def test_bad_values_report_what_was_expected(app, bad_inputs):
    """The line says what was given and what is valid, so it can be fixed without the docs."""
    code, _, stderr = app.run_in_process(
        ["grid.shape=[0,32,32]", f"hydra.run.dir={bad_inputs}/run"]
    )
    assert code == 2
    assert "got 0" in stderr and "[1, 512]" in stderr
    code, _, stderr = app.run_in_process(["therapy=aspirin", f"hydra.run.dir={bad_inputs}/run"])
    assert "got 'aspirin'" in stderr and "pembrolizumab" in stderr


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["tme=lukewarm"], "tme"),  # Hydra composition: no such group option
        (["grid.spacing_um=abc"], "grid.spacing_um"),  # Hydra type check of the schema
        (["solver.dt_max_h=0"], "solver.dt_max_h"),  # tmesolve's own validation
    ],
    ids=["composition", "type", "validation"],
)
def test_bad_override_in_a_real_process(app, tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    result = app.run_subprocess([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=60)
    assert "Traceback" not in result.stderr
    _check(result.returncode, result.stderr, key, run_dir)


def test_debug_shows_the_traceback(app, tmp_path):
    """TMESOLVE_DEBUG=1 trades the one line for the full traceback."""
    result = app.run_subprocess(
        ["solver.dt_max_h=0", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        timeout=60,
        env={"TMESOLVE_DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_config_error_crosses_process_boundaries():
    """A launcher (submitit, joblib) pickles a failed job's error to report it."""
    import pickle

    from tmesolve.errors import ConfigError

    error = ConfigError("resume", "auto", "a run that is not marked failed", hint="see run.h5")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ConfigError and str(copy) == str(error)
    assert (copy.key, copy.value, copy.expected, copy.hint) == ("resume", "auto", "a run that is not marked failed",
                                                                "see run.h5")
