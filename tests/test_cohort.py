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
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from tmesolve import cohort as cohort_module
from tmesolve import xla_defaults
from tmesolve.cohort import (
    COHORT_PRESETS,
    CohortSpec,
    LesionSample,
    PatientOutcome,
    PatientSample,
    TrialResult,
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
from tmesolve.integrate import BatchIntegrator, Integrator, make_solver_params
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


def _hand_made_trial() -> TrialResult:
    """Six patients of one lesion each in four arms, with outcomes set by hand (no
    simulation), so that every summary figure can be counted on paper.

    Therapy starts after a 2-week lead-in; scans at weeks 6, 12, 18 and 24 of therapy.
    Patients (TMB mut/Mb, phenotype of the largest lesion, baseline PD-L1):
    P1 20 inflamed 0.6, P2 15 inflamed 0.2, P3 12 excluded 0.7, P4 5 excluded 0.1,
    P5 3 desert 0.1, P6 2 desert 0.3. Per arm and patient: irAE grade, best response,
    PFS (weeks, PD seen?), duration of response (weeks, still holding at the last scan?),
    durable CR (a CR held >= 12 weeks):

    nivolumab:  P1 g3 CR from wk 6, held to 24 (PFS 24 censored; DoR 18 censored; durable)
                P2 g2 PR at 6, PD at 18 (PFS 18; DoR 12)   P3 g0 SD, PD at 18 (PFS 18)
                P4 g1 PR at 6, held (PFS 24 censored; DoR 18 censored)
                P5 g0 PD at 6   P6 g2 PD at 6
    ipilimumab: no irAE; P1 PR at 6, PD at 18 (DoR 12); P2 PR at 12, PD at 18 (DoR 6);
                the rest PD at 6
    nivolumab_ipilimumab: P1 g3 and P2 g2 PD at 6; P3 g0 PR at 6, held (DoR 18
                censored); P4 g0 SD to 24; P5, P6 g0 PD at 6
    none:       everyone PD at 6; P1 g2, the rest g0
    """
    week = WEEK_H
    patients = [
        ("P001", 20.0, "inflamed", 0.6),
        ("P002", 15.0, "inflamed", 0.2),
        ("P003", 12.0, "excluded", 0.7),
        ("P004", 5.0, "excluded", 0.1),
        ("P005", 3.0, "desert", 0.1),
        ("P006", 2.0, "desert", 0.3),
    ]
    progressed = (0, "PD", 6, True, math.nan, False, False)
    # (grade, best response, PFS weeks, PD seen, DoR weeks, DoR censored, durable CR)
    arms = {
        "nivolumab": [
            (3, "CR", 24, False, 18, True, True),
            (2, "PR", 18, True, 12, False, False),
            (0, "SD", 18, True, math.nan, False, False),
            (1, "PR", 24, False, 18, True, False),
            progressed,
            (2, "PD", 6, True, math.nan, False, False),
        ],
        "ipilimumab": [
            (0, "PR", 18, True, 12, False, False),
            (0, "PR", 18, True, 6, False, False),
            *[progressed] * 4,
        ],
        "nivolumab_ipilimumab": [
            (3, "PD", 6, True, math.nan, False, False),
            (2, "PD", 6, True, math.nan, False, False),
            (0, "PR", 24, False, 18, True, False),
            (0, "SD", 24, False, math.nan, False, False),
            progressed,
            progressed,
        ],
        "none": [(2, "PD", 6, True, math.nan, False, False), *[progressed] * 5],
    }
    samples = tuple(
        PatientSample(pid, seed=i, tmb=tmb,
                      lesions=(LesionSample(phenotype, tmb, 0.1, 300.0, None),))
        for i, (pid, tmb, phenotype, _pdl1) in enumerate(patients)
    )

    def outcome(patient, arm, grade, best, pfs_wk, event, dor_wk, censored, durable):
        pid, _tmb, phenotype, pdl1 = patient
        return PatientOutcome(
            patient_id=pid, arm=arm, recist_diameter="burden_diameter_mm",
            baseline_sum_mm=20.0, best_response=best, best_percent_change=0.0,
            percent_change=np.zeros(1), sum_diameters_mm=np.zeros(1), categories=(best,),
            pfs_h=pfs_wk * week, pfs_event=event, duration_of_response_h=dor_wk * week,
            response_censored=censored, durable_cr=durable, max_irae_grade=grade,
            therapy_held=grade >= 3, therapy_resumed=False, therapy_discontinued=False,
            baseline_pdl1=pdl1, baseline_class=phenotype, touched_wall=False,
        )

    outcomes = {
        arm: [outcome(patient, arm, *row) for patient, row in zip(patients, rows)]
        for arm, rows in arms.items()
    }
    return TrialResult(
        samples=samples, arms=tuple(arms), grid=GRID, lead_in_h=2 * week,
        duration_h=24 * week, assessment_interval_h=6 * week, durable_cr_h=12 * week,
        first_assessment_h=6 * week, record_times_h=np.zeros(1), stop_times_h=np.zeros(1),
        assessment_times_h=(2 + np.array([6.0, 12.0, 18.0, 24.0])) * week,
        outcomes=outcomes, records={arm: [] for arm in arms}, trace_counts={1: 1},
        chunk_sizes={1: 6}, settings={"dtype": "float32", "dt_max_h": 1.0, "backend": "cpu"},
        wall_time_s=0.0,
    )


def test_summary_counts_and_report_match_a_hand_made_trial():
    """Every figure of the summary, counted on paper for :func:`_hand_made_trial`."""
    result = _hand_made_trial()
    summary = summarize_trial(result)
    arm = summary["per_arm"]["nivolumab"]

    def count(rate):
        return rate["count"], rate["n"]

    assert arm["counts"] == {"CR": 1, "PR": 2, "SD": 1, "PD": 2, "NE": 0}
    assert count(arm["orr"]) == (3, 6) and count(arm["cr_rate"]) == (1, 6)
    assert count(arm["dcr"]) == (4, 6)
    # PFS, Kaplan–Meier: S(6 wk) = 4/6; at 18 weeks 2 of the 4 at risk progress,
    # S = 4/6 × 2/4 = 1/3 → median 18 weeks.
    assert arm["pfs"]["events"] == 4
    assert arm["pfs"]["median_h"] == pytest.approx(18 * WEEK_H)
    survival = dict(zip(arm["pfs"]["km"]["time_h"], arm["pfs"]["km"]["survival"]))
    assert survival[6 * WEEK_H] == pytest.approx(4 / 6)
    assert survival[18 * WEEK_H] == pytest.approx(1 / 3)
    # Duration of response: P2 ends at 12 weeks (3 at risk), P1 and P4 are censored at
    # 18, so S stays at 2/3 and the median is not reached. Counting an ongoing response
    # as an event would give 3 events and a median of 18 weeks.
    assert arm["duration_of_response"] == {"responders": 3, "events": 1, "median_h": None}
    assert arm["durable_cr"] == 1 and arm["therapy_held"] == 1
    # irAE-positive (grade >= 2): P1, P2, P6 → 2/3 respond; irAE-negative P3, P4, P5 → 1/3.
    assert count(arm["irae"]["rate"]) == (3, 6)
    assert count(arm["irae"]["orr_positive"]) == (2, 3)
    assert count(arm["irae"]["orr_negative"]) == (1, 3)
    biomarkers = summary["biomarkers"]
    tmb = biomarkers["tmb"]["arms"]["nivolumab"]  # TMB >= 10: P1, P2, P3
    assert count(tmb["high"]) == (2, 3) and count(tmb["low"]) == (1, 3)
    pdl1 = biomarkers["pdl1"]["arms"]["nivolumab"]  # PD-L1 >= 0.5: P1, P3
    assert count(pdl1["high"]) == (1, 2) and count(pdl1["low"]) == (2, 4)
    phenotype = biomarkers["phenotype"]["arms"]["nivolumab"]
    assert [count(phenotype[p]) for p in PHENOTYPES] == [(2, 2), (1, 2), (0, 2)]
    assert biomarkers["baseline_class"]["arms"]["nivolumab"] == phenotype

    per_arm = summary["per_arm"]
    assert count(per_arm["ipilimumab"]["orr"]) == (2, 6)
    # Both ipilimumab responses end, at 6 and 12 weeks: S(6) = 1/2 → median 6 weeks.
    assert per_arm["ipilimumab"]["duration_of_response"] == {
        "responders": 2, "events": 2, "median_h": pytest.approx(6 * WEEK_H)}
    assert per_arm["none"]["duration_of_response"] == {
        "responders": 0, "events": 0, "median_h": None}
    # irAE verdicts: irAE+ 2/3 ≥ irAE− 1/3; nobody irAE-positive; irAE+ 0/2 < irAE− 1/4;
    # nobody responded (0/1 against 0/5 says nothing).
    verdicts = {name: entry["irae"]["association"] for name, entry in per_arm.items()}
    assert verdicts == {"nivolumab": "reproduced", "ipilimumab": "untestable",
                        "nivolumab_ipilimumab": "not reproduced", "none": "untestable"}
    assert summary["logrank"]["test"] == "multivariate_logrank"
    assert len(summary["logrank"]["pairwise"]) == 3

    rows = {(r["section"], r["arm"], r["group"], r["metric"]): r
            for r in cohort_module._summary_rows(summary)}
    assert rows[("response", "nivolumab", "all", "dcr")]["count"] == 4
    median_dor = {name: rows[("response", name, "responders", "median_duration_of_response_h")][
        "value"] for name in per_arm}
    assert median_dor == {"nivolumab": "inf", "ipilimumab": pytest.approx(6 * WEEK_H),
                          "nivolumab_ipilimumab": "inf", "none": ""}
    assert rows[("irae", "nivolumab_ipilimumab", "all", "irae_association")]["value"] == (
        "not reproduced")

    lines = [line.strip() for line in cohort_module._report(result, summary, None).splitlines()]
    for expected in (
        "nivolumab: 3 responders, median not reached, 1 progressed; durable CR in 1",
        "ipilimumab: 2 responders, median 6.0 wk, 2 progressed; durable CR in 0",
        "none: no responders; durable CR in 0",
        "nivolumab: irAE-positive patients respond at least as often as irAE-negative",
        "nivolumab_ipilimumab: irAE-positive patients respond LESS often",
        "ipilimumab: no irAE-positive or no irAE-negative patients, or no responders",
        "none: no irAE-positive or no irAE-negative patients, or no responders",
        "Tuned: r_C, k_kill, k_in and rho_PDL1",
    ):
        assert any(line.startswith(expected) for line in lines), expected
    report = "\n".join(lines)
    assert "no CR can be durable" not in report and "set in this run" not in report
    # The scans span weeks 6 to 24: a CR held at every one of them lasts 18 weeks, so a
    # 20-week window (shorter than the 24 weeks of therapy) cannot be met.
    longer = dataclasses.replace(result, durable_cr_h=20 * WEEK_H)
    assert "no CR can be durable here: the scans span 18 wk, less than the 20 wk" in (
        cohort_module._report(longer, summarize_trial(longer), None))
    overridden = dataclasses.replace(
        result, settings={**result.settings, "parameters": {"k_kill": 0.2, "D_T": 600.0}})
    assert "set in this run: D_T=600 um^2/h, k_kill=0.2 1/h." in cohort_module._report(
        overridden, summary, None)


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


def _assert_round_off(actual, reference, what: str) -> None:
    # Same float32 operations in a different (vmapped) order: round-off only.
    # rtol 1e-5 ≈ 100 ulp after ~170 steps; atol covers exact zeros (no drug).
    np.testing.assert_allclose(
        actual,
        reference,
        rtol=1e-5,
        atol=1e-5 * float(np.max(np.abs(reference)) or 1.0),
        err_msg=what,
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
    trial = functools.partial(
        run_trial,
        samples,
        arms,
        GRID,
        duration,
        lead_in_h=lead_in,
        chunk_size=CHUNK,
        dt_max=DT_MAX,
        integrators=integrators,
    )
    # Chunks of 2: the 1-lesion group (6 patient-arms) runs 3 chunks, the 2-lesion
    # group (3 patient-arms) 2 chunks, the last padded; each group compiles once.
    result = trial()
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
            _assert_round_off(batched[name][1:], reference, f"{arm} {name}")
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

    # One compile for the whole cohort: the 1-lesion patients padded to 2 lesions with
    # copies the systemic compartment does not see run in the 2-lesion group's loop
    # (compiled above for chunks of 2, so nothing compiles here) and give the results
    # of their own 1-lesion loop to round-off.
    padded = trial(pad_lesions=True)
    assert padded.trace_counts == {2: 0} and padded.chunk_sizes == {2: CHUNK}
    for arm in arms:
        for p, sample in enumerate(samples):
            for name in COMPARED:
                grouped = result.records[arm][p][name]
                assert padded.records[arm][p][name].shape == grouped.shape, name
                _assert_round_off(
                    padded.records[arm][p][name], grouped, f"padded {arm} {sample.patient_id} {name}"
                )
            assert padded.outcomes[arm][p].best_response == result.outcomes[arm][p].best_response
    shared_integrators.update(integrators)


def test_padding_copies_weigh_nothing_and_bad_counts_name_the_setting():
    from tmesolve.model.systemic import tmb_priming_factor
    from tmesolve.model.tme_setup import pad_lesions

    sample = sample_cohort(small_spec(3, seed=0))[0]  # two lesions
    tmbs = [lesion.tmb for lesion in sample.lesions]
    assert len(tmbs) == 2 and abs(tmbs[0] - tmbs[1]) > 0.1 * max(tmbs)
    setup = setup_tme(GRID, sample.lesion_specs(), seed=sample.seed)
    padded = pad_lesions(setup, 3)
    assert padded.model.lesions == 3 and padded.model.field_shape[1] == 3
    np.testing.assert_array_equal(np.asarray(padded.params.lesion_weight), [1.0, 1.0, 0.0])
    fields = np.asarray(padded.state.fields)
    np.testing.assert_array_equal(fields[:, 2], fields[:, 0])
    np.testing.assert_array_equal(fields[:, :2], np.asarray(setup.state.fields))
    # The copy's per-lesion parameters are lesion 0's, except TMB: the patient's
    # mean, so that the priming factor τ(mean TMB) stays the patient's.
    np.testing.assert_allclose(
        float(tmb_priming_factor(padded.params.model)),
        float(tmb_priming_factor(setup.params.model)),
        rtol=1e-6,
    )
    # The systemic compartment sees the patient's own lesions only.
    u = padded.model._unstack(padded.state.fields)
    u_own = setup.model._unstack(setup.state.fields)
    extras = {"killing": np.ones_like(u["C"]), "extravasation": np.ones_like(u["C"])}
    extras_own = {name: value[:2] for name, value in extras.items()}
    seen = padded.model._systemic_inputs(u, extras, padded.params)
    own = setup.model._systemic_inputs(u_own, extras_own, setup.params)
    np.testing.assert_allclose(float(seen.antigen_flux), float(own.antigen_flux), rtol=1e-6)
    np.testing.assert_allclose(float(seen.extravasation), float(own.extravasation), rtol=1e-6)
    assert pad_lesions(setup, 2) is setup
    for bad in (1, 6):
        with pytest.raises(ConfigError) as error:
            pad_lesions(setup, bad)
        assert error.value.key == "lesions"


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
    assert "RECIST 1.1 scans every 6 wk and at the end" in report
    with h5py.File(out / "cohort.h5", "r") as handle:
        assert handle.attrs["first_assessment_h"] == handle.attrs["assessment_interval_h"] == 6 * WEEK_H
    spread = summary["biomarkers"]["pdl1"]["cohort"]
    baseline = [o.baseline_pdl1 for o in result.outcomes["ipilimumab"]]
    assert spread["min"] == min(baseline) and spread["max"] == max(baseline)
    assert "baseline PD-L1 in this cohort" in report


class _Accelerator:
    """A stand-in for a GPU device: ``memory_stats()`` returns ``stats`` (or raises it)."""

    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_chunk_size_comes_from_the_free_memory(monkeypatch, tmp_path, shared_integrators):
    """⌊½ × free / (16 × state bytes)⌋ patient-arms per chunk, between 1 and the group
    size, and on a CPU at most 4 MiB of state or 4 patient-arms, whichever is more;
    free memory from the device's
    statistics, else the host's MemAvailable, else its free pages, else 4 GiB."""
    gpu = _Accelerator({"bytes_limit": 80 * 10**9, "bytes_in_use": 16 * 10**9})
    assert cohort_module.available_memory_bytes(gpu) == 64 * 10**9
    assert cohort_module.choose_chunk_size(10**6, 10**6, gpu) == 2000  # 32 GB / 16 MB
    assert cohort_module.choose_chunk_size(10**6, 12, gpu) == 12
    assert cohort_module.choose_chunk_size(10**6, 12, _Accelerator({"bytes_limit": 10**6})) == 1

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       4096 kB\nMemFree:         512 kB\n"
                       "MemAvailable:   2048 kB\n")
    monkeypatch.setattr(cohort_module, "MEMINFO_PATH", str(meminfo))
    pages = {"SC_AVPHYS_PAGES": 100, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(cohort_module.os, "sysconf", lambda name: pages[name])
    cpu = jax.devices("cpu")[0]
    for device in (cpu, _Accelerator(RuntimeError("no statistics")), _Accelerator(None)):
        assert cohort_module.available_memory_bytes(device) == 2048 * 1024
    meminfo.write_text("MemTotal:       4096 kB\nMemFree:         512 kB\n")  # an old kernel
    assert cohort_module.available_memory_bytes(cpu) == 100 * 4096
    monkeypatch.setattr(cohort_module, "MEMINFO_PATH", str(tmp_path / "absent"))
    assert cohort_module.available_memory_bytes(cpu) == 100 * 4096

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(cohort_module.os, "sysconf", no_sysconf)
    assert cohort_module.available_memory_bytes(cpu) == cohort_module.FALLBACK_MEMORY_BYTES
    monkeypatch.undo()

    # On a CPU a chunk also holds at most 4 MiB of state or 4 patient-arms, whichever
    # is more, whatever the memory: 64 KiB patients (about 8³ × 2 lesions) 64 at a
    # time, 6 MiB ones (about 32³ × 3) 4 at a time; the memory bound still applies below that; an
    # accelerator is bound by its memory only.
    monkeypatch.setattr(cohort_module, "available_memory_bytes", lambda device=None: 10**12)
    assert (cohort_module.CPU_CHUNK_STATE_BYTES, cohort_module.CPU_CHUNK_MIN) == (4 * 2**20, 4)
    assert cohort_module.choose_chunk_size(64 * 2**10, 1000, cpu) == 64
    assert cohort_module.choose_chunk_size(6 * 2**20, 64, cpu) == 4
    assert cohort_module.choose_chunk_size(6 * 2**20, 3, cpu) == 3
    assert cohort_module.choose_chunk_size(6 * 2**20, 64, gpu) == 64
    monkeypatch.setattr(cohort_module, "available_memory_bytes", lambda device=None: 2**30)
    assert cohort_module.choose_chunk_size(16 * 2**20, 64, cpu) == 2  # ½ GiB / 256 MiB
    monkeypatch.undo()

    # run_trial without a chunk size takes it from there: room for 2.5 patient-arms
    # gives chunks of 2 (in file order, the 1-lesion loop is already compiled for 2).
    samples = sample_cohort(small_spec(3, seed=7, name="chunked", lesions_max=1))
    first = setup_tme(GRID, samples[0].lesion_specs(), therapy="nivolumab",
                      seed=samples[0].seed)
    state_bytes = cohort_module.state_nbytes(first.state)
    assert state_bytes == sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(first.state))
    room = 2.5 * cohort_module.WORKING_SET_FACTOR * state_bytes / cohort_module.MEMORY_FRACTION
    monkeypatch.setattr(cohort_module, "available_memory_bytes", lambda device=None: int(room))
    result = run_trial(samples, ["nivolumab"], GRID, WEEK_H, lead_in_h=WEEK_H, chunk_size=None,
                       dt_max=DT_MAX, integrators=shared_integrators)
    assert result.chunk_sizes == {1: 2}
    assert [chunk["patient_arms"] for chunk in result.chunks] == [2, 1]


def _advance_stopping_at(call: int):
    """A ``BatchIntegrator.advance`` that raises KeyboardInterrupt (a job killed) at its ``call``-th call."""
    advance, calls = BatchIntegrator.advance, [0]

    def stopping(integrator, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return advance(integrator, *args, **kwargs)

    return stopping


def test_a_stop_that_python_swallowed_still_ends_the_trial(shared_integrators, monkeypatch,
                                                          signal_in_a_weakref_callback):
    """A launcher's stop (submitit's SIGUSR2 handler exits) raised while Python ran a
    weakref callback, which discards it (tmesolve.interrupts): the trial stops before
    its next advance instead of running on until the scheduler kills it."""
    samples = sample_cohort(small_spec(2, seed=7, name="swallowed", lesions_max=1))
    advance, calls = BatchIntegrator.advance, [0]

    def advance_then_signal(integrator, *args, **kwargs):
        calls[0] += 1
        result = advance(integrator, *args, **kwargs)
        if calls[0] == 3:
            assert signal_in_a_weakref_callback(signal.SIGUSR2)  # discarded there
        return result

    monkeypatch.setattr(BatchIntegrator, "advance", advance_then_signal)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))
    try:
        with pytest.raises(SystemExit):
            run_trial(samples, ["nivolumab"], GRID, 6 * WEEK_H, chunk_size=CHUNK, dt_max=DT_MAX,
                      integrators=shared_integrators)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls[0] == 3


def test_an_interrupted_trial_resumes_value_for_value(tmp_path, shared_integrators, monkeypatch, caplog):
    """Checkpoints (tmesolve.trial_progress): a trial stopped in its second chunk and
    resumed gives, value for value, the records and outcomes of an uninterrupted run;
    the finished chunk is read back, not run again; other settings are refused."""
    samples = sample_cohort(small_spec(3, seed=7, name="resume", lesions_max=1))
    # One lesion, chunks of 2: the loop compiled by the equivalence test above.
    run = functools.partial(run_trial, samples, ["nivolumab"], GRID, 6 * WEEK_H, chunk_size=CHUNK,
                            dt_max=DT_MAX, integrators=shared_integrators)
    reference = run()
    progress = tmp_path / "progress"
    # Chunk 1: the first advance and every stop; chunk 2 stops at its fourth stop,
    # before its first checkpoint (due after an hour).
    stops = len(reference.stop_times_h)
    monkeypatch.setattr(BatchIntegrator, "advance", _advance_stopping_at((1 + stops) + 1 + 4))
    with pytest.raises(KeyboardInterrupt):
        run(progress_dir=progress, checkpoint_interval_s=3600.0)
    assert sorted(path.name for path in progress.iterdir()) == ["chunk-1-00-0000.h5", "trial.json"]
    # Resumed: chunk 2 runs again from its start, batched as before (padded to 2), and
    # stops at its fourth stop again, now with a checkpoint at every stop.
    monkeypatch.setattr(BatchIntegrator, "advance", _advance_stopping_at(1 + 4))
    with pytest.raises(KeyboardInterrupt):
        run(progress_dir=progress, resume=True, checkpoint_interval_s=0.0)
    monkeypatch.undo()
    files = sorted(path.name for path in progress.iterdir())
    assert files == ["chunk-1-00-0000.h5", "chunk-1-00-0002.h5", "trial.json"]
    with h5py.File(progress / "chunk-1-00-0002.h5", "r") as handle:
        assert handle.attrs["next_stop"] == 3 and "state" in handle  # stops 1–3 done, the 4th was not
    with h5py.File(progress / "chunk-1-00-0000.h5", "r") as handle:
        assert handle.attrs["next_stop"] == stops and "state" not in handle

    record = (progress / "trial.json").read_bytes()
    with pytest.raises(ConfigError, match=r"^trial\.resume: got 'never'; expected no checkpoints .* made with "
                                          r"the same settings\)"):
        run(progress_dir=progress)
    other = functools.partial(run_trial, samples, ["nivolumab"], GRID, 6 * WEEK_H, chunk_size=CHUNK, dt_max=1.5,
                              progress_dir=progress)
    for mode in (True, "auto", False):
        with pytest.raises(ConfigError, match=r"\(these differ: dt_max_h\)"):
            other(resume=mode)
    with pytest.raises(ConfigError, match=r"\(these differ: dt_max_h\)"):
        other(resume=True, restart=True)  # "always" never discards checkpoints
    (progress / "trial.json").rename(progress / "trial.json.aside")
    with pytest.raises(ConfigError, match=r"\(these differ: trial\.json \(missing\)\)"):
        run(progress_dir=progress, resume="auto")
    (progress / "trial.json.aside").rename(progress / "trial.json")
    # Refused runs touch nothing.
    assert len(list(progress.glob("chunk-*.h5"))) == 2 and (progress / "trial.json").read_bytes() == record

    monkeypatch.setattr(cohort_module, "PROGRESS_LOG_INTERVAL_S", 0.0)
    # Resumed where tmesolve's own XLA option is missing (JAX had started before
    # `import tmesolve`), or present where it was not: it changes no value, so the
    # fingerprint leaves it out.
    flags = os.environ.get("XLA_FLAGS", "")
    toggled = (xla_defaults.without_cpu_defaults(flags) if xla_defaults.ADDED_FLAG in flags.split()
               else xla_defaults.with_cpu_defaults(flags))
    monkeypatch.setenv("XLA_FLAGS", toggled)
    with caplog.at_level(logging.INFO, logger="tmesolve.cohort"):
        resumed = run(progress_dir=progress, resume=True)
    monkeypatch.undo()
    # A progress line at every stop here (every 5 minutes by default).
    assert "resumed at t = " in caplog.text and "min to go for this chunk at this pace" in caplog.text
    assert [(c["run_now"], c["attempts"]) for c in resumed.chunks] == [(False, 1), (True, 2)]
    assert all(c["cpu_seconds"] > 0 and c["seconds"] > 0 for c in resumed.chunks)
    for p in range(len(samples)):
        expected, got = reference.records["nivolumab"][p], resumed.records["nivolumab"][p]
        assert expected.keys() == got.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        assert resumed.outcomes["nivolumab"][p] == reference.outcomes["nivolumab"][p]
    # A finished folder: every chunk is read, nothing runs or compiles.
    again = run(progress_dir=progress, resume=True)
    assert again.trace_counts == {1: 0} and not any(c["run_now"] for c in again.chunks)
    assert again.outcomes == reference.outcomes
    # A damaged checkpoint is named, not read; restart discards the checkpoints.
    (progress / "chunk-1-00-0002.h5").write_bytes(b"not HDF5")
    with pytest.raises(ConfigError, match=r"chunk-1-00-0002\.h5 is not \(OSError\)"):
        run(progress_dir=progress, resume=True)
    fresh = run(progress_dir=progress, restart=True)
    assert all(c["run_now"] and c["attempts"] == 1 for c in fresh.chunks)
    assert fresh.outcomes == reference.outcomes


def test_trial_reports_the_management_rule_and_the_worst_grade(shared_integrators):
    """irAE-prone cohorts on the combination. k_R = 0.003: grade 3 between two
    weekly records (which show at most grade 2) is still the patient's worst
    grade, from the state's running peak, and the drugs are held (the taper
    outlasts the 6 weeks). k_R = 0.01: grade 4 stops the drugs for good."""
    samples = sample_cohort(small_spec(2, seed=7, name="prone", lesions_max=1))
    arm = "nivolumab_ipilimumab"

    def trial(k_R):
        result = run_trial(samples, [arm], GRID, 6 * WEEK_H, chunk_size=CHUNK, dt_max=DT_MAX,
                           parameters={"k_R": k_R},  # a new number, not a new compile
                           integrators=shared_integrators)
        return result, summarize_trial(result)["per_arm"][arm]

    result, summary = trial(0.003)
    for outcome, records in zip(result.outcomes[arm], result.records[arm], strict=True):
        assert outcome.max_irae_grade == 3 > np.max(records["irae_grade"])
        assert outcome.therapy_held and not outcome.therapy_resumed and not outcome.therapy_discontinued
        assert records["steroid_level"][-1] > 0.1  # still tapering: not ready to resume
    assert summary["therapy_held"] == 2 and summary["therapy_discontinued"] == 0

    result, summary = trial(0.01)
    for outcome, records in zip(result.outcomes[arm], result.records[arm], strict=True):
        assert outcome.max_irae_grade == 4
        assert outcome.therapy_held and outcome.therapy_discontinued and not outcome.therapy_resumed
        assert records["therapy_discontinued"][-1] == 1.0
    assert summary["therapy_held"] == summary["therapy_discontinued"] == 2
    assert summary["therapy_resumed"] == 0


# ---------------------------------------------------------------------------
# (4) command line
# ---------------------------------------------------------------------------


#: A trial small enough for the command-line tests: 2 one-lesion patients, 6³ voxels,
#: 1 week of lead-in and 2 of therapy; no persistent cache (a test must not switch
#: on JAX's cache for the rest of the session).
TINY_TRIAL = [
    "cohort.n_patients=2",
    "cohort.lesions_max=1",
    "grid.voxels=6",
    "grid.spacing_um=100",
    "trial.weeks=2",
    "trial.lead_in_weeks=1",
    "trial.arms=[none,nivolumab]",
    f"solver.dt_max_h={DT_MAX}",
    "output.figures=false",
    "output.compilation_cache_dir=null",
]


def test_cohort_group_files_are_the_presets():
    from tmesolve.cohort import PRESET_DIR, load_cohort_spec

    files = sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
    assert files == sorted(COHORT_PRESETS)
    spec = load_cohort_spec(PRESET_DIR / "melanoma.yaml", n_patients=3)
    assert spec.n_patients == 3 and spec.tmb_median == COHORT_PRESETS["melanoma"].tmb_median


def test_cli_help_lists_every_preset_and_no_foreign_group(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in COHORT_PRESETS:
        assert name in text
    assert "tme:" not in text and "patient:" not in text  # tmesolve's groups


@pytest.mark.parametrize(
    "argv,key",
    [
        (["cohort=glioma"], "cohort"),
        (["trial.arms=[nivolumab,aspirin]"], "trial.arms"),
        (["cohort.n_patients=0"], "cohort.n_patients"),
        (["cohort.n_patients=many"], "cohort.n_patients"),
        (["grid.voxels=2"], "grid.voxels"),
        (["cohort.lesions_max=7"], "cohort.lesions_max"),
        (["cohort.radius_um_range=[100,400]"], "cohort.radius_um_range"),  # half box: 320 µm
        (["params.k_kill=-1"], "params.k_kill"),
        (["params.no_such_symbol=1"], "params.no_such_symbol"),
        (["trial.no_such_setting=1"], "trial.no_such_setting"),
        (["solver.dtype=float16"], "solver.dtype"),
        (["trial.first_assessment_weeks=0"], "trial.first_assessment_weeks"),
        (["trial.first_assessment_weeks=30"], "trial.first_assessment_weeks"),  # trial.weeks: 24
        (["--preset", "melanoma"], "--preset"),
    ],
)
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, capsys, argv, key):
    out = tmp_path / "out"
    code = main([*argv, f"hydra.run.dir={out}"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmesolve-cohort: {key}"), captured.err
    assert not (out / "cohort.h5").exists()


def test_cli_sweep_writes_trials_and_one_summary_row_per_job_and_arm(tmp_path, capsys):
    import csv

    from tmesolve.cli import summary_main

    sweep = tmp_path / "sweep"
    # The first scan after 1 of the 2 weeks of therapy (then one at the end).
    argv = ["-m", "cohort=melanoma,rcc", *TINY_TRIAL, "params.k_kill=0.25", "trial.first_assessment_weeks=1"]
    assert main([*argv, f"hydra.sweep.dir={sweep}"]) == 0
    for job, preset in (("0", "melanoma"), ("1", "rcc")):
        folder = sweep / job
        for name in ("cohort.h5", "patients.csv", "summary.csv", "report.txt"):
            assert (folder / name).stat().st_size > 0, (job, name)
        assert "scans at week 1, then every 6 wk and at the end" in (folder / "report.txt").read_text()
        with h5py.File(folder / "cohort.h5", "r") as handle:
            assert handle.attrs["first_assessment_h"] == WEEK_H
            # A week of lead-in: scans at weeks 1 and 2 of therapy.
            np.testing.assert_allclose(handle["assessment_time_h"][()], [2 * WEEK_H, 3 * WEEK_H])
            assert f"cohort={preset}" in handle.attrs["overrides"]
            assert "k_kill: 0.25" in handle.attrs["config"]
            assert len(handle["cohort/lesions/tmb"]) == 2
            expected = COHORT_PRESETS[preset].tmb_median
            assert json.loads(handle.attrs["cohort"])["tmb_median"] == expected
    # The same seed, another preset: the drawn TMBs differ by the ratio of the medians.
    with h5py.File(sweep / "0" / "cohort.h5") as a, h5py.File(sweep / "1" / "cohort.h5") as b:
        assert not np.allclose(a["cohort/lesions/tmb"][()], b["cohort/lesions/tmb"][()])

    capsys.readouterr()
    # A trial directory holds its own summary.csv: the sweep table never replaces it.
    before = (sweep / "0" / "summary.csv").read_bytes()
    assert summary_main([str(sweep / "0")]) == 1
    assert "trial directory" in capsys.readouterr().err
    assert (sweep / "0" / "summary.csv").read_bytes() == before
    assert summary_main([str(sweep)]) == 0
    with open(sweep / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["cohort"], row["arm"]) for row in rows] == [
        ("0", "melanoma", "none"),
        ("0", "melanoma", "nivolumab"),
        ("1", "rcc", "none"),
        ("1", "rcc", "nivolumab"),
    ]
    for row in rows:
        assert row["params.k_kill"] == "0.25" and row["n_patients"] == "2"
        assert 0.0 <= float(row["orr.lower_95"]) <= float(row["orr"]) <= float(row["orr.upper_95"])


def test_cli_refuses_to_replace_an_earlier_trial(tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    (out / "report.txt").write_text("keep me")
    (out / ".hydra" / "overrides.yaml").write_text("- cohort=rcc\n")
    assert main([*TINY_TRIAL, f"hydra.run.dir={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "output.overwrite" in lines[0] and "report.txt" in lines[0]
    assert (out / "report.txt").read_text() == "keep me"
    assert (out / ".hydra" / "overrides.yaml").read_text() == "- cohort=rcc\n"
    assert not (out / "cohort.h5").exists()


def test_cli_resumes_an_interrupted_trial(tmp_path, capsys, monkeypatch):
    """A killed run leaves progress/; output.resume=never refuses it, other settings
    are refused (auto) without touching the run record, and the same command again
    (auto, as a requeued batch job runs it) finishes the trial with the files of an
    uninterrupted run."""
    out = tmp_path / "out"
    argv = [*TINY_TRIAL, "output.checkpoint_minutes=0", f"hydra.run.dir={out}"]
    monkeypatch.setattr(BatchIntegrator, "advance", _advance_stopping_at(3))
    assert main(argv) == 130
    monkeypatch.undo()
    assert "the same command continues from the checkpoints" in (out / "tmesolve-cohort.log").read_text()
    assert (out / "progress" / "trial.json").exists() and not (out / "cohort.h5").exists()
    record = (out / ".hydra" / "overrides.yaml").read_text()
    capsys.readouterr()

    assert main([*argv, "output.resume=never"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "output.resume: got 'never'" in lines[0] and "output.resume=auto" in lines[0]
    assert main([*argv, "trial.weeks=3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "output.resume: got 'auto'" in lines[0] and "duration_h" in lines[0]
    assert (out / ".hydra" / "overrides.yaml").read_text() == record
    assert list((out / "progress").glob("chunk-*.h5"))

    assert main(argv) == 0
    assert not (out / "progress").exists()
    fresh = tmp_path / "fresh"
    assert main([*TINY_TRIAL, f"hydra.run.dir={fresh}"]) == 0
    assert (out / "patients.csv").read_text() == (fresh / "patients.csv").read_text()
    with h5py.File(out / "cohort.h5", "r") as handle:
        assert [chunk["attempts"] for chunk in json.loads(handle.attrs["chunks"])] == [2]
    # Nothing to continue: "always" says so in one line.
    assert main([*TINY_TRIAL, "output.resume=always", f"hydra.run.dir={tmp_path / 'none'}"]) == 2
    assert "there are none in" in capsys.readouterr().err


def test_cli_module_exits_non_zero_with_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tmesolve.cohort_cli",
            "cohort=glioma",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cohort: got 'glioma'" in done.stderr


def test_first_scan_can_come_later_than_the_interval():
    """CheckMate 067's schedule: a baseline, the first scan at week 12, then every 6 weeks."""
    from types import SimpleNamespace

    from tmesolve.cohort import _assessment_times, _scan_schedule

    lead_in = 2 * WEEK_H
    scans = _assessment_times(lead_in, lead_in + 26 * WEEK_H, 6 * WEEK_H, 12 * WEEK_H)
    np.testing.assert_allclose((scans - lead_in) / WEEK_H, [12, 18, 24, 26])  # and the end
    default = _assessment_times(lead_in, lead_in + 26 * WEEK_H, 6 * WEEK_H, 6 * WEEK_H)
    np.testing.assert_allclose((default - lead_in) / WEEK_H, [6, 12, 18, 24, 26])

    def schedule(first, interval, duration):
        return _scan_schedule(SimpleNamespace(first_assessment_h=first * WEEK_H,
                                              assessment_interval_h=interval * WEEK_H,
                                              duration_h=duration * WEEK_H))

    assert schedule(12, 6, 24) == "at week 12, then every 6 wk and at the end"
    assert schedule(6, 6, 24) == "every 6 wk and at the end"
    assert schedule(6, 6, 2) == "only at the end (week 2)"  # a trial shorter than the interval


def test_run_trial_refuses_bad_settings_before_compiling():
    samples = sample_cohort(small_spec(2, seed=0))
    with pytest.raises(ConfigError, match="trial.arms"):
        run_trial(samples, ["nivolumab", "aspirin"], GRID, WEEK_H)
    for bad in (0.0, 2 * WEEK_H):  # none, or after the one week of therapy
        with pytest.raises(ConfigError, match="trial.first_assessment_h"):
            run_trial(samples, ["nivolumab"], GRID, WEEK_H, first_assessment_h=bad)
    with pytest.raises(ConfigError, match="radius_um"):
        run_trial(samples, ["nivolumab"], Grid((3, 3, 3), 100.0), WEEK_H)  # half box 150 µm
    with pytest.raises(ConfigError, match="trial.duration_h"):
        run_trial(samples, ["nivolumab"], GRID, 0.0)


# ---------------------------------------------------------------------------
# (5) the melanoma trial, outside CI (`pytest -m long`; about 6 minutes on 2 cores)
# ---------------------------------------------------------------------------

#: The trial the README reports: 16 melanoma patients (seed 0), 8³ voxels of 80 µm,
#: 2 weeks lead-in + 24 weeks of therapy, the three CheckMate 067 arms.
MELANOMA_TRIAL = [
    "cohort=melanoma",
    "cohort.n_patients=16",
    "trial.arms=[ipilimumab,nivolumab,nivolumab_ipilimumab]",
    "output.figures=false",
    "output.compilation_cache_dir=null",
]


@pytest.mark.long
def test_melanoma_trial_orders_the_arms_and_the_biomarkers(tmp_path):
    """The orderings issue 5 asks of the melanoma preset, at the parameter table's
    values (nothing tuned to CheckMate 067): ORR ipilimumab < nivolumab <
    nivolumab+ipilimumab; on the combination, TMB-high and inflamed largest lesions
    respond at least as often as TMB-low, excluded and desert ones, and irAE-positive
    patients at least as often as irAE-negative ones."""
    out = tmp_path / "melanoma"
    assert main([*MELANOMA_TRIAL, f"hydra.run.dir={out}"]) == 0
    with h5py.File(out / "cohort.h5", "r") as handle:
        summary = json.loads(handle.attrs["summary"])
    orr = {arm: summary["per_arm"][arm]["orr"]["rate"] for arm in summary["arms"]}
    assert orr["ipilimumab"] < orr["nivolumab"] < orr["nivolumab_ipilimumab"], orr
    combination = "nivolumab_ipilimumab"
    tmb = summary["biomarkers"]["tmb"]["arms"][combination]
    assert tmb["high"]["rate"] >= tmb["low"]["rate"], tmb
    phenotype = summary["biomarkers"]["phenotype"]["arms"][combination]
    assert phenotype["inflamed"]["rate"] >= phenotype["excluded"]["rate"], phenotype
    assert phenotype["inflamed"]["rate"] >= phenotype["desert"]["rate"], phenotype
    irae = summary["per_arm"][combination]["irae"]
    assert irae["orr_positive"]["n"] > 0 and irae["orr_negative"]["n"] > 0, irae
    assert irae["orr_positive"]["rate"] >= irae["orr_negative"]["rate"], irae
    assert irae["association"] == "reproduced"
    report = (out / "report.txt").read_text()
    assert f"{combination}: irAE-positive patients respond at least as often" in report
