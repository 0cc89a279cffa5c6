"""Virtual cohorts and trials (tmesolve.cohort, tmesolve.cohort_cli).

Compiling the TME loop costs 10–20 s on 2 CPU cores, far more than the tiny
integrations here, so the tests are arranged around compiles:
``test_batched_trial_equals_one_patient_at_a_time`` compiles the batched loop
once per lesion-count group (1 and 2 lesions, chunks of 2) and the
single-patient Integrator once (for the 2-lesion patient); the end-to-end
trial (one lesion per patient) then reuses the 1-lesion batched loop through
the ``integrators`` dict (same grid, lesion count and chunk size), so it only
integrates. Run alone it compiles its own. Total ≈ 65–85 s on 2 busy cores.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tmesolve.cohort import (
    COHORT_PRESETS,
    CohortSpec,
    cohort_table,
    run_trial,
    sample_cohort,
    summarize_trial,
    wilson_interval,
    write_trial,
)
from tmesolve.cohort_cli import main
from tmesolve.errors import ConfigError
from tmesolve.geometry import PHENOTYPES
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, make_solver_params
from tmesolve.model.tme_setup import setup_tme

GRID = Grid((6, 6, 6), 100.0)
WEEK_H = 168.0
#: dt cap for the tests: at 100 µm the T-cell motility limit is ≈ 2.5 h (0.9 h at 60 µm,
#: scaled by h²), so 2 h keeps the cap in charge and halves the steps of the default 1 h.
DT_MAX = 2.0
CHUNK = 2


@pytest.fixture(scope="module")
def shared_integrators():
    """Compiled batched loops handed from the equivalence test to the end-to-end test."""
    return {}


def small_spec(n_patients: int, seed: int, name: str = "test", lesions_max: int = 2) -> CohortSpec:
    return CohortSpec(
        name=name,
        n_patients=n_patients,
        lesions_min=1,
        lesions_max=lesions_max,
        radius_um_range=(150.0, 200.0),
        seed=seed,
    )


# ---------------------------------------------------------------------------
# (1) sampling
# ---------------------------------------------------------------------------


def test_sampling_is_reproducible_and_within_ranges():
    spec = CohortSpec(
        name="wide",
        n_patients=400,
        lesions_min=1,
        lesions_max=5,
        phenotype_probabilities={"inflamed": 0.5, "excluded": 0.3, "desert": 0.2},
        tmb_median=8.0,
        tmb_sigma=1.0,
        pdl1_baseline_range=(0.1, 0.3),
        radius_um_range=(120.0, 180.0),
        represented_diameter_mm_range=(10.0, 40.0),
        seed=11,
    )
    first, again = sample_cohort(spec), sample_cohort(spec)
    assert first == again
    assert sample_cohort(dataclasses.replace(spec, seed=12)) != first
    # Patients are drawn one after another: a smaller cohort is a prefix of a larger one.
    assert sample_cohort(dataclasses.replace(spec, n_patients=10)) == first[:10]

    counts = np.asarray([p.n_lesions for p in first])
    assert counts.min() == 1 and counts.max() == 5
    assert len({p.patient_id for p in first}) == 400
    lesions = [lesion for p in first for lesion in p.lesions]
    assert all(lesion.phenotype in PHENOTYPES for lesion in lesions)
    assert all(0.1 <= lesion.pdl1_baseline <= 0.3 for lesion in lesions)
    assert all(120.0 <= lesion.radius_um <= 180.0 for lesion in lesions)
    assert all(10.0 <= lesion.represented_diameter_mm <= 40.0 for lesion in lesions)
    assert all(0.0 < lesion.tmb <= 1000.0 for lesion in lesions)
    # Median of 400 log-normal draws: relative standard error ≈ 1.25σ/√n ≈ 6 %; 20 % is > 3 SE.
    assert abs(np.median([p.tmb for p in first]) / 8.0 - 1.0) < 0.2
    # ~1,200 lesions: the SE of a proportion is ≤ 0.015, so 0.06 is 4 SE.
    for name, probability in spec.phenotype_probabilities.items():
        share = np.mean([lesion.phenotype == name for lesion in lesions])
        assert abs(share - probability) < 0.06, (name, share)

    table = cohort_table(first)
    assert len(table["tmb"]) == len(lesions) == counts.sum()
    assert table["largest"].sum() == 400


def test_presets_carry_the_documented_tmb_medians():
    ranges = {"melanoma": (10, 14), "nsclc": (7, 9), "rcc": (1, 2), "mss_colorectal": (3, 4)}
    assert set(COHORT_PRESETS) == set(ranges)
    for name, (low, high) in ranges.items():
        assert low <= COHORT_PRESETS[name].tmb_median <= high, name
        assert "Chalmers 2017" in COHORT_PRESETS[name].source


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"n_patients": 0}, "cohort.n_patients"),
        ({"lesions_max": 6}, "cohort.lesions_max"),
        ({"lesions_min": 3, "lesions_max": 2}, "cohort.lesions_min"),
        (
            {"phenotype_probabilities": {"inflamed": 0.5, "desert": 0.2}},
            "cohort.phenotype_probabilities",
        ),
        ({"phenotype_probabilities": {"hot": 1.0}}, "cohort.phenotype_probabilities.hot"),
        ({"pdl1_baseline_range": (0.5, 0.2)}, "cohort.pdl1_baseline_range"),
        ({"tmb_median": -1.0}, "cohort.tmb_median"),
    ],
)
def test_bad_cohort_settings_name_the_field(changes, key):
    with pytest.raises(ConfigError) as error:
        CohortSpec(**changes)
    assert error.value.key == key
    assert "\n" not in str(error.value)


def test_wilson_interval_matches_a_worked_value():
    """Wilson (1927): 1/4 → 0.046–0.699 (z = 1.96); 0/n has lower bound 0."""
    rate = wilson_interval(1, 4)
    assert rate["rate"] == 0.25
    assert rate["lower_95"] == pytest.approx(0.0456, abs=1e-3)
    assert rate["upper_95"] == pytest.approx(0.6994, abs=1e-3)
    assert wilson_interval(0, 5)["lower_95"] == 0.0
    assert np.isnan(wilson_interval(0, 0)["rate"])


# ---------------------------------------------------------------------------
# (2) batched trial = one patient at a time
# ---------------------------------------------------------------------------

COMPARED = (
    "viable_burden",
    "burden_diameter_mm",
    "cd8_core_density",
    "mean_pd_l1",
    "blood_effectors",
    "memory_t_cells",
    "plasma_anti_pd1",
    "plasma_anti_ctla4",
    "irae_index",
)


def test_batched_trial_equals_one_patient_at_a_time(shared_integrators):
    """The 2-lesion patient, run in the batched trial (its 3 arms in chunks of 2, the
    last one padded), equals its runs one at a time with Integrator.

    The 1-lesion patients share the batched code path and are not re-run one at a
    time: that would cost one more compile (≈ 13 s) for no new code path; the
    multi-lesion patient (shared systemic compartment over lesions) is the stricter case.
    """
    samples = sample_cohort(small_spec(3, seed=0))
    assert [p.n_lesions for p in samples] == [2, 1, 1]  # two lesion-count groups
    arms = ["none", "nivolumab", "ipilimumab"]
    lead_in, duration = WEEK_H, WEEK_H  # 2 weeks in all
    integrators: dict = {}
    # Chunks of 2: the 1-lesion group (6 patient-arms) runs 3 chunks, the 2-lesion
    # group (3 patient-arms) 2 chunks, the last padded; each group compiles once.
    result = run_trial(
        samples,
        arms,
        GRID,
        duration,
        lead_in_h=lead_in,
        chunk_size=CHUNK,
        dt_max=DT_MAX,
        integrators=integrators,
    )
    assert result.trace_counts == {1: 1, 2: 1}
    assert result.chunk_sizes == {1: CHUNK, 2: CHUNK}
    np.testing.assert_array_equal(result.record_times_h, [0.0, WEEK_H, 2 * WEEK_H])

    solver = make_solver_params(DT_MAX)
    patient = 0
    sample = samples[patient]
    integrator = None
    for arm in arms:
        setup = setup_tme(
            GRID,
            sample.lesion_specs(),
            therapy=arm,
            therapy_start_h=lead_in,
            duration_h=duration,
            seed=sample.seed,
        )
        integrator = integrator or Integrator(setup.model)
        collected: list[dict] = []

        def keep(state, readouts, diagnostics, collected=collected):
            collected.append({k: np.asarray(v) for k, v in readouts.items()})

        integrator.run(
            setup.state,
            setup.params,
            solver,
            result.record_times_h,
            result.stop_times_h,
            on_output=keep,
        )
        batched = result.records[arm][patient]
        for name in COMPARED:
            reference = np.stack([r[name] for r in collected]).astype(float)
            # Same float32 operations in a different (vmapped) order: round-off only.
            # rtol 1e-5 ≈ 100 ulp after ~170 steps; atol covers exact zeros (no drug).
            np.testing.assert_allclose(
                batched[name][1:],
                reference,
                rtol=1e-5,
                atol=1e-5 * float(np.max(np.abs(reference)) or 1.0),
                err_msg=f"{arm} {name}",
            )
    assert integrator is not None and integrator.trace_count == 1
    # Paired design: before therapy every arm holds the same patient.
    for p in range(len(samples)):
        for arm in arms[1:]:
            np.testing.assert_array_equal(
                result.records[arm][p]["viable_burden"][:2],
                result.records[arms[0]][p]["viable_burden"][:2],
            )
    # Therapy acts: nivolumab occupies PD-1 in every patient, the control arm has no drug.
    assert all(result.records["nivolumab"][p]["occupancy_pd1"][-1] > 0.5 for p in range(3))
    assert all(result.records["none"][p]["occupancy_pd1"][-1] == 0.0 for p in range(3))
    shared_integrators.update(integrators)


# ---------------------------------------------------------------------------
# (3) a tiny trial, end to end
# ---------------------------------------------------------------------------


def _all_datasets(handle):
    found = []
    handle.visititems(
        lambda name, item: found.append((name, item)) if isinstance(item, h5py.Dataset) else None
    )
    return found


def test_tiny_trial_runs_end_to_end_and_writes_its_files(tmp_path, shared_integrators):
    # One lesion each: the trial reuses the 1-lesion loop compiled above (chunks of 2).
    spec = small_spec(4, seed=7, name="tiny", lesions_max=1)
    samples = sample_cohort(spec)
    arms = ["ipilimumab", "nivolumab"]
    result = run_trial(
        samples,
        arms,
        GRID,
        8 * WEEK_H,
        chunk_size=CHUNK,
        dt_max=DT_MAX,
        integrators=shared_integrators,
    )
    # Scans at 6 weeks and at the end (8 weeks), after the 2-week lead-in.
    np.testing.assert_allclose(result.assessment_times_h, [8 * WEEK_H, 10 * WEEK_H])
    summary = summarize_trial(result)
    for arm in arms:
        outcomes = result.outcomes[arm]
        assert len(outcomes) == 4
        orr = summary["per_arm"][arm]["orr"]
        assert orr["n"] == 4 and orr["count"] == sum(
            o.best_response in ("CR", "PR") for o in outcomes
        )
        assert 0.0 <= orr["lower_95"] <= orr["rate"] <= orr["upper_95"] <= 1.0
        for o in outcomes:
            assert o.best_response in ("CR", "PR", "SD", "PD")
            assert 0.0 < o.pfs_h <= 8 * WEEK_H
            assert o.pfs_event == ("PD" in o.categories)
        km = summary["per_arm"][arm]["pfs"]["km"]
        assert km["survival"][0] == 1.0 and np.all(np.diff(km["survival"]) <= 0.0)
    assert 0.0 <= summary["logrank"]["p_value"] <= 1.0

    out = tmp_path / "trial"
    paths = write_trial(result, summary, out, cohort=spec)
    for name in ("cohort.h5", "patients.csv", "summary.csv", "report.txt"):
        assert (out / name).stat().st_size > 0, name
    for name in ("waterfall.png", "km_pfs.png", "swimmer.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert paths["h5"] == out / "cohort.h5"

    with h5py.File(out / "cohort.h5", "r") as handle:
        datasets = _all_datasets(handle)
        assert datasets and all("units" in item.attrs for _, item in datasets)
        assert len(handle["cohort/lesions/tmb"]) == sum(p.n_lesions for p in samples)
        categories = [v.decode() for v in handle["arms/nivolumab/outcomes/best_response"][()]]
        assert categories == [o.best_response for o in result.outcomes["nivolumab"]]
        assert handle["arms/nivolumab/percent_change"].shape == (4, 2)
        assert handle["arms/ipilimumab/records/P001/viable_burden"].shape[0] == len(
            result.record_times_h
        )
    assert len((out / "patients.csv").read_text().splitlines()) == 1 + 4 * len(arms)
    report = (out / "report.txt").read_text()
    assert "UNCALIBRATED" in report and "CheckMate 067" in report and "log-rank" in report


# ---------------------------------------------------------------------------
# (4) command line
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--preset", "glioma"], "--preset"),
        (["--arms", "nivolumab,aspirin"], "--arms"),
        (["--patients", "0"], "--patients"),
        (["--patients", "many"], "--patients"),
        (["--grid", "2"], "--grid"),
        (["--lesions", "1,7"], "--lesions"),
    ],
)
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, capsys, argv, key):
    code = main([*argv, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmesolve-cohort:") and key in lines[0], (
        captured.err
    )
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_output_directory(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert main(["--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "--overwrite" in lines[0]
    assert (out / "old.txt").read_text() == "keep me"


def test_cli_module_exits_non_zero_with_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmesolve.cohort_cli",
            "--preset",
            "glioma",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_run_trial_refuses_bad_settings_before_compiling():
    samples = sample_cohort(small_spec(2, seed=0))
    with pytest.raises(ConfigError, match="trial.arms"):
        run_trial(samples, ["nivolumab", "aspirin"], GRID, WEEK_H)
    with pytest.raises(ConfigError, match="radius_um"):
        run_trial(samples, ["nivolumab"], Grid((3, 3, 3), 100.0), WEEK_H)  # half box 150 µm
    with pytest.raises(ConfigError, match="trial.duration_h"):
        run_trial(samples, ["nivolumab"], GRID, 0.0)
