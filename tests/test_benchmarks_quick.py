"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs and writes its JSON.

No timing is asserted (figures on a shared CI machine mean nothing); the tests
check that every section runs end to end at tiny sizes and that the JSON has
the figures, units and ratios the performance contract (DESIGN.md) names.
The TME section is its own test because compiling the 16-field step takes
~25 s on a 2-core CPU whatever the grid size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"timestamp_utc", "hostname", "cpu_model", "cpu_cores", "backend", "device_kind",
                "versions", "git_commit", "load_average_at_start"}


def run_quick(tmp_path: Path, sections: str) -> dict:
    """Run the suite's quick mode in a fresh process (as a user would) and read its JSON."""
    out = tmp_path / "quick.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", sections, "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "written:" in completed.stdout  # the human-readable table was printed
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bandwidth_dd3_and_pde50(tmp_path):
    report = run_quick(tmp_path, "bandwidth,dd3,pde50")
    assert report["mode"] == "quick" and report["sections"] == ["bandwidth", "dd3", "pde50"]
    assert MACHINE_KEYS <= set(report["machine"])
    assert {"jax", "numpy", "python"} <= set(report["machine"]["versions"])

    bandwidth = report["bandwidth"]
    for key in ("numpy_copy_GBps", "numpy_triad_GBps", "jax_triad_GBps", "roofline_GBps"):
        assert positive(bandwidth[key]), key

    dd3 = report["dd3"]
    size = dd3["sizes"]["16"]
    for solver in ("numpy_reference", "explicit", "explicit_lie", "spectral"):
        assert positive(size[solver]["voxel_updates_per_s"]), solver
        assert positive(size[solver]["relative_l2_error"]), solver
    # Ratios are against the numpy reference run in the same process.
    assert set(size["ratio_to_numpy_reference"]) >= {"explicit_voxel_updates_per_s",
                                                     "spectral_voxel_updates_per_s"}
    assert 0 < size["explicit"]["bandwidth_fraction_of_numpy_copy"]
    # One operator: a step is one SSP-RK2 step (2 stencil stages) under Strang and Lie alike,
    # and the bandwidth counts just those (8 B per voxel per stage).
    for solver in ("explicit", "explicit_lie"):
        figures = size[solver]
        assert figures["stencil_stages_per_step"] == 2, solver
        assert figures["effective_GBps"] == pytest.approx(
            8 * 2 * 16**3 * figures["steps"] / figures["time_to_T_s"] / 1e9, rel=2e-3), solver  # JSON keeps 4 digits
    # The compiled chunk compiles once per solver (spectral reuses it for two dt caps).
    assert size["explicit"]["traces"] == 1 and size["spectral"]["traces"] == 1
    # Forward Euler at dt = h²/(6D) = 1/900 h divides T = 1/6 h into exactly 150 steps.
    assert size["numpy_reference"]["steps"] == 150
    accuracy = dd3["time_to_accuracy"]
    for solver in ("spectral", "explicit", "numpy_reference"):
        assert isinstance(accuracy[solver]["reached"], bool)

    pde = report["pde50"]
    assert (pde["problem"]["size"], pde["problem"]["species"]) == (8, 10)
    for path in ("spectral_source", "spectral", "explicit"):
        figures = pde["paths"][path]
        assert positive(figures["time_per_step_s"]) and figures["finite"], path
        assert figures["min_over_max"] > -1e-5, path  # positive up to float32 round-off
    # The three paths solve the same semi-discrete problem: explicit and spectral changes agree
    # (7e-6 measured at 8^3; a wrong step or unit would be off by O(1)).
    assert pde["agreement_relative_l2"] < 1e-4
    assert pde["paths"]["explicit"]["substeps_per_step"] == 17  # 0.01 min·(6D/h² + λ)/0.9, rounded up


@pytest.mark.slow
def test_quick_tme_step(tmp_path):
    report = run_quick(tmp_path, "tme")
    case = report["tme"]["cases"][0]
    assert (case["N"], case["lesions"], case["fields"]) == (16, 1, 16)
    assert case["field_values"] == 16 * 16**3
    for key in ("time_per_step_s", "steps_per_s", "voxel_updates_per_s", "compile_s",
                "stencil_pass_s", "ratio_step_to_stencil_pass"):
        assert positive(case[key]), key
    assert case["finite"] and case["traces"] == 1
    assert positive(case["cost_analysis_chunk"]["bytes_accessed"])
    # The slope needs calls of two lengths; a 16³ step is too short for its sign to mean
    # anything here, so only that it was measured.
    assert case["steps_per_long_call"] > case["steps_per_timed_call"]
    assert math.isfinite(case["time_per_step_slope_s"]) and math.isfinite(case["per_call_overhead_s"])


@pytest.mark.slow
def test_cohort_batch_benchmark_smoke(tmp_path):
    """The batched-cohort benchmark runs at a tiny size: batch and single runs agree, one compile."""
    out = tmp_path / "cohort.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.cohort_batch", "--patients", "2", "--lesions", "1",
         "--shape", "8", "--spacing-um", "100", "--days", "15", "--singles", "1", "--out", str(out),
         "--progress", str(tmp_path / "progress")],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["batched"]["trace_counts"] == {"1": 1}
    # Checkpointed (resumable) batched run: one attempt, its chunk finished on disk.
    assert report["batched"]["attempts"] == 1 and report["batched"]["steps"] > 0
    assert positive(report["batched"]["cpu_s"]) and positive(report["speedup_cpu_time"])
    assert (tmp_path / "progress" / "chunk-1-00-0000.h5").exists()
    assert len(report["singles"]) == 1 and report["singles"][0]["trace_counts"] == {"1": 1}
    # The single-patient run reproduced the batched patient (the benchmark checks it too).
    assert report["singles"][0]["best_percent_change"][0] == pytest.approx(
        report["batched"]["best_percent_change"][0], rel=1e-3, abs=1e-3)
    assert positive(report["speedup"]) and positive(report["one_at_a_time_estimate_s"])


@pytest.mark.slow
def test_cohort_chunks_benchmark_times_compiled_chunks(tmp_path):
    """The chunk-size scan times each chunk size with its loop already compiled and
    reports ratios to the first size and the size run_trial would pick."""
    out = tmp_path / "chunks.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.cohort_chunks", "--shape", "6", "--lesions", "1",
         "--chunks", "1", "2", "--hours", "2", "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["chunks"]
    assert [row["chunk"] for row in rows] == [1, 2]
    assert all(row["compiles"] == 0 and row["steps"] > 0 for row in rows)  # compiled before timing
    assert rows[0]["wall_ratio_to_first"] == 1.0 and positive(rows[1]["cpu_ratio_to_first"])
    assert rows[1]["wall_ms_per_patient_step"] == pytest.approx(
        1e3 * rows[1]["wall_s"] / (rows[1]["steps"] * 2))
    # A 6³ patient is ~14 kB: memory and the CPU cap allow far more than the 2 asked for.
    assert report["automatic_chunk"] == 2 and report["case"]["state_bytes_per_patient"] > 0


@pytest.mark.slow
def test_largest_lesion_probe_runs_a_small_lesion(tmp_path):
    """The probe tries sizes largest first in fresh processes and stops at the first that runs."""
    out = tmp_path / "largest.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.largest_lesion", "--sizes", "8", "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["largest_N"] == 8 and report["tries"][0]["finite"]
    assert positive(report["tries"][0]["time_per_step_s"]) and positive(report["tries"][0]["peak_bytes"])


@pytest.mark.slow
def test_device_script_runs_a_part_and_reports_failures(tmp_path):
    """benchmarks/device_run.sh (the prepared GPU script) on this machine: one part runs and
    writes its JSON; an unknown part makes the exit status non-zero."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "device")}
    completed = subprocess.run(["bash", "benchmarks/device_run.sh"], cwd=REPOSITORY, capture_output=True,
                               text=True, timeout=300, env={**env, "PARTS": "pde50 nonsense"})
    assert completed.returncode == 1
    log = (tmp_path / "device" / "log.txt").read_text()
    assert "=== pde50: exit 0" in log and "unknown part: nonsense" in log
    report = json.loads((tmp_path / "device" / "pde50.json").read_text())
    assert positive(report["pde50"]["paths"]["spectral_source"]["time_per_step_s"])


def test_stencil_forms_agree_and_time_the_solver_stage():
    from benchmarks import stencil_forms

    results = stencil_forms.main(["--shape", "8", "--steps", "2", "--repeats", "1"])
    assert set(results) == set(stencil_forms.FORMS) | {"ssp_rk2_stage"}
    for name, figures in results.items():
        assert positive(figures["seconds"]) and positive(figures["cpu_over_wall"]), name
    # Every form writes the same update (float32 round-off of an 8³ field of values in [0, 1)).
    assert max(results[name]["max_difference"] for name in stencil_forms.FORMS) < 1e-5


def test_cpu_patterns_agree_with_their_twins(tmp_path):
    from benchmarks import cpu_patterns

    out = tmp_path / "patterns.json"
    result = cpu_patterns.main(["--shape", "8", "--fields", "4", "--steps", "2", "--repeats", "1", "--out", str(out)])
    patterns = json.loads(out.read_text())["patterns"]
    assert set(patterns) == {"scale_stack", "stack_of_scaled_rows", "power", "exp_log", "exp"}
    for name, figures in patterns.items():
        assert positive(figures["ms_per_pass"]) and positive(figures["ratio_to_scale_stack"]), name
    assert result["patterns"]["stack_of_scaled_rows"]["max_relative_difference_to_scale_stack"] == 0.0
    # exp(1.7 ln x) against x^1.7 in float32 on [0.5, 1]: a few ulp.
    assert result["patterns"]["exp_log"]["max_relative_difference_to_power"] < 1e-6
    pools = json.loads(out.read_text())["pools"]
    assert pools["identical"] is True and pools["radius"] == cpu_patterns.POOL_RADIUS
    assert positive(pools["window_3d"]["ms_per_call"]) and positive(pools["windows_per_axis"]["ms_per_call"])
    transforms = json.loads(out.read_text())["transforms"]
    assert transforms["fields"] == cpu_patterns.TRANSFORMED_FIELDS
    for name in ("whole_stack", "field_by_field"):
        assert positive(transforms[name]["ms_per_round_trip"]) and positive(transforms[name]["ratio_to_whole_stack"])
    # Values in [0, 1): both forms and the round trip agree to float32 round-off.
    assert transforms["max_difference_between_forms"] < 1e-5 and transforms["max_round_trip_error"] < 1e-5


def test_profile_step_attributes_kernels_to_every_sub_solver(tmp_path):
    from benchmarks import profile_step

    out = tmp_path / "profile.json"
    profile_step.main(["--case", "8x1", "--steps", "2", "--top", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["case"] == "8x1" and positive(result["wall_ms_per_step"])
    # Every sub-solver the TME step runs has kernels found in its branch of the step's switch.
    for name in ("reactions", "transport", "spectral"):
        assert result["kernels_per_step"][name] > 0 and positive(result["kernel_ms_per_step"][name]), name
    assert len(result["largest_kernels"]) == 3
    assert {kernel["sub_solver"] for kernel in result["largest_kernels"]} <= set(profile_step.BRANCHES) | {"outside"}
    # The named scopes split each sub-solver's kernels: every scope the model names
    # has kernels, and the parts add up to the sub-solver's counts.
    scopes = {(part["sub_solver"], part["scope"]) for part in result["by_scope"]}
    expected = {("reactions", name) for name in ("local_terms", "predictor", "corrector", "oxygen_solve")}
    expected |= {("transport", name) for name in ("chemotaxis", "motility", "pressure", "advection")}
    expected |= {("spectral", name) for name in ("sources", "propagate")}
    assert expected <= scopes, expected - scopes
    for name in profile_step.BRANCHES + ("outside",):
        parts = [part for part in result["by_scope"] if part["sub_solver"] == name]
        assert sum(part["kernels_per_step"] for part in parts) == pytest.approx(result["kernels_per_step"][name])


def test_scopes_are_read_from_op_names():
    from benchmarks.profile_step import _scopes

    hlo = "\n".join([
        '  %fusion.1 = f32[8] fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(_advance_impl)/while/body/'
        'cond/branch_0_fun/while/body/eval_jaxpr/local_terms/jit(_where)/div"}',
        '  %dot.2 = f32[8] dot(%a, %b), metadata={op_name="reshape;jit(f)/while/body/pressure/ij,bjk->bik/dot_general"}',
        '  %copy.3 = f32[8] copy(%a)',
        '  %exp.5 = f32[8] exponential(%a), metadata={op_name="jit(f)/while/body/closed_call/cond/branch_1_fun/'
        'closed_call/predictor/exp"}',
        '  ROOT %add.4 = f32[8] add(%a, %b), metadata={op_name="jit(f)/while/body/add"}',
    ])
    # JAX 0.10 writes closed_call where JAX 0.12 writes eval_jaxpr.
    assert _scopes(hlo) == {"fusion.1": "local_terms", "dot.2": "pressure", "add.4": "-", "exp.5": "predictor"}


def test_in_loop_time_of_a_sub_solver_copies_the_state_it_donates():
    """The in-loop timing of a sub-solver (``substeps``) donates copies: the caller's state
    stays readable and unchanged, and a time per sub-step comes back."""
    import jax.numpy as jnp

    from benchmarks.tme_step import DT_H, _in_loop_time_s, case_setup

    setup = case_setup(8, 1)
    before = np.asarray(setup.state.fields).copy()
    seconds = _in_loop_time_s(setup.model.transport, setup.state, setup.params,
                              jnp.asarray(0.5 * DT_H, jnp.float32), repeats=1)
    assert math.isfinite(seconds)
    np.testing.assert_array_equal(np.asarray(setup.state.fields), before)


def test_xla_counts_each_transcendental_once_per_value():
    """The arithmetic floor rests on XLA's transcendental count: one per exp, log, expm1 and
    log1p per value, a repeated exp counted once (CSE), a division not a transcendental."""
    from benchmarks.tme_step import compiled_cost

    values = jnp.linspace(0.1, 1.0, 1000, dtype=jnp.float32)

    def count(function):
        return compiled_cost(jax.jit(function).lower(values).compile()).get("transcendentals", 0.0)

    assert count(lambda x: jnp.exp(x) + jnp.log(x) + jnp.expm1(x) + jnp.log1p(x)) == 4000
    assert count(lambda x: jnp.exp(2.0 * x) + jnp.exp(x * 2.0)) == 1000  # the same exponential twice
    assert count(lambda x: 1.0 / x) == 0


def test_arithmetic_floor_counts_the_step_and_compares_it_with_the_budget(tmp_path):
    """python -m benchmarks.arithmetic_floor --quick on an 8³ lesion: rates, counts, floor and budget."""
    from benchmarks import arithmetic_floor

    out = tmp_path / "floor.json"
    arithmetic_floor.main(["--case", "8x1", "--steps", "1", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["backend"] == jax.default_backend() and result["quick"] is True
    rates = result["rates_per_s"]
    for name in ("exp", "log", "numpy_exp"):  # slow enough to be measured even on a busy machine
        assert positive(rates[name]), name
    for name in ("divide", "multiply_add"):  # cheap: noise may leave no difference to the identity term
        assert rates[name] is None or positive(rates[name]), name
    parts = result["operation_counts"]["sub_solvers"]
    assert {name: part["uses_per_step"] for name, part in parts.items()} == {"react": 2, "transport": 2, "linear": 1}
    per_step = result["operation_counts"]["per_voxel_per_step"]
    # Per voxel and step: the weighted sum of the sub-solvers' counts; the reactions' exponentials are in it.
    assert per_step["transcendentals"] == pytest.approx(
        sum(part["uses_per_step"] * part["transcendentals_per_voxel"] for part in parts.values()), rel=1e-3)
    # Stages unrolled: both reaction stages' frozen exponentials of the nine reacting fields are counted.
    assert result["operation_counts"]["stages_unrolled"] is True
    assert parts["react"]["transcendentals_per_voxel"] >= 2 * 9
    budget = 8 * result["fields"] * 8**3 / (0.5 * result["roofline_GBps"] * 1e9)
    assert result["budget_s"] == pytest.approx(budget, rel=1e-3)
    fastest = max([rates["exp"]] + ([rates["numpy_exp"]] if jax.default_backend() == "cpu" else []))
    assert result["fastest_exp_per_s"] == pytest.approx(fastest, rel=1e-3)
    floor = per_step["transcendentals"] * 8**3 / fastest
    assert result["floor_transcendentals_s"] == pytest.approx(floor, rel=1e-2)
    assert result["floor_over_budget"] == pytest.approx(result["floor_transcendentals_s"] / result["budget_s"],
                                                        rel=1e-2)
    assert result["step_time_s"] is None and result["floor_share_of_step"] is None  # not timed in a quick run
    with pytest.raises(SystemExit):
        arithmetic_floor.main(["--case", "3x1"])
