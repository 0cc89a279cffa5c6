"""RECIST 1.1 scoring on hand-built diameter series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tmesolve.recist import score_recist

WEEK = 168.0
SCANS = np.arange(1, 9) * 6 * WEEK  # every 6 weeks, up to week 48


def _series(sums_at_scans, lesions=None):
    """Record at t = 0 (baseline) and at each scan; two lesions splitting the sum."""
    times = np.concatenate([[0.0], SCANS[: len(sums_at_scans) - 1]])
    sums = np.asarray(sums_at_scans, dtype=float)
    diameters = np.stack([0.6 * sums, 0.4 * sums], axis=1) if lesions is None else lesions
    return times, diameters


def test_each_category():
    times, diameters = _series([100, 90, 69, 70, 0, 0])
    result = score_recist(times, diameters, SCANS[:5])
    # −10 % SD; −31 % PR; 70 is +1.4 % over the nadir 69: still PR (≤ 70 % of baseline).
    assert result.category.tolist() == ["SD", "PR", "PR", "CR", "CR"]
    assert result.best_response == "CR"
    assert result.baseline_mm == 100.0
    assert result.best_percent_change == -100.0
    assert math.isnan(result.time_to_progression_h)
    assert result.duration_of_response_h == pytest.approx(SCANS[4] - SCANS[1])
    assert result.response_censored


def test_pd_needs_five_millimetres():
    # Small lesions: +25 % from a 16 mm nadir is only 4 mm, so not PD; +6 mm is.
    times, diameters = _series([20, 16, 20, 22])
    result = score_recist(times, diameters, SCANS[:3])
    assert result.category.tolist() == ["SD", "SD", "PD"]
    assert result.time_to_progression_h == SCANS[2]
    assert result.nadir_mm.tolist() == [20.0, 16.0, 16.0]


def test_pd_is_measured_from_the_nadir_not_the_baseline():
    # 50 → 30 (PR), then 37: still 26 % below baseline but +23 % and +7 mm over the nadir.
    times, diameters = _series([50, 30, 37])
    result = score_recist(times, diameters, SCANS[:2])
    assert result.category.tolist() == ["PR", "PD"]
    assert result.best_response == "PR"  # PD after PR does not erase the best response
    assert result.duration_of_response_h == pytest.approx(SCANS[1] - SCANS[0])
    assert not result.response_censored


def test_cr_needs_every_lesion_gone():
    lesions = np.array([[30.0, 20.0], [0.0, 10.0], [0.0, 0.0]])
    result = score_recist([0.0, SCANS[0], SCANS[1]], lesions, SCANS[:2])
    assert result.category.tolist() == ["PR", "CR"]


def test_cr_then_relapse():
    lesions = np.array([[40.0, 20.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [8.0, 0.0]])
    times = np.array([0.0, SCANS[0], SCANS[1], SCANS[2], SCANS[3]])
    result = score_recist(times, lesions, SCANS[:4], durable_cr_h=4 * WEEK)
    # A 3 mm reappearance is below the 5 mm rule (nadir 0): PR by sum; 8 mm is PD.
    assert result.category.tolist() == ["CR", "CR", "PR", "PD"]
    assert result.best_response == "CR"
    assert result.time_to_progression_h == SCANS[3]
    assert result.cr_duration_h == pytest.approx(SCANS[1] - SCANS[0])
    assert result.durable_cr  # 6 weeks of CR ≥ the 4 weeks asked here
    assert not score_recist(times, lesions, SCANS[:4]).durable_cr  # default: 5 years


def test_new_lesion_is_progression():
    times, diameters = _series([100, 60, 55])
    new = np.array([False, False, True])
    result = score_recist(times, diameters, SCANS[:2], new_lesion=new)
    assert result.category.tolist() == ["PR", "PD"]


def test_assessments_read_the_last_record_before_them():
    times = np.array([0.0, 100.0, 200.0, 300.0])
    sums = np.array([[50.0], [10.0], [60.0], [60.0]])
    # At 199 h the last record is the one at 100 h (10 mm); at 200 h it is 60 mm.
    result = score_recist(times, sums, [0.0, 199.0, 200.0, 1000.0])
    assert result.record_times_h.tolist() == [100.0, 200.0]
    assert result.assessment_times_h.tolist() == [199.0, 200.0]  # baseline and stale scans dropped
    assert result.category.tolist() == ["PR", "PD"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        score_recist([0.0, 1.0], [[1.0, 2.0]], [1.0])
    with pytest.raises(ValueError):
        score_recist([0.0, 1.0], [[1.0], [-1.0]], [1.0])
    with pytest.raises(ValueError):
        score_recist([5.0, 6.0], [[1.0], [1.0]], [6.0])  # no record at the baseline time


def test_no_assessment_is_not_evaluable():
    result = score_recist([0.0], [[10.0]], [])
    assert result.best_response == "NE" and result.category.size == 0
    assert math.isnan(result.best_percent_change)
