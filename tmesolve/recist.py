"""RECIST 1.1 scoring of simulated target-lesion diameters (host side, numpy).

Eisenhauer et al. 2009, Eur J Cancer 45:228 (RECIST 1.1), target lesions only:

- CR: every target lesion has disappeared (diameter ≤ ``gone_mm``, default 0);
- PR: sum of diameters ≥ 30 % below the baseline sum;
- PD: sum ≥ 20 % above the nadir AND ≥ 5 mm above it in absolute terms, or a
  new lesion; the nadir is the smallest sum on study, baseline included, up to
  (not including) the assessment being scored;
- SD: otherwise.

PD wins over CR/PR at one assessment (a new lesion makes PD whatever the
sum). Choices where the model differs from a trial:

- Confirmation of CR/PR by a second scan is not required (as in most
  model-based analyses); best overall response is the best category over all
  assessments (CR > PR > SD > PD), so a PD after a CR or PR does not erase it.
  No minimum duration is required for SD.
- A target lesion that reappears after a CR counts through the sum: with the
  nadir at 0 mm, PD needs the sum to reach 5 mm (lesions under 5 mm are
  below what RECIST can measure; RECIST itself calls a reappearance after CR
  progression).
- Assessments read the record at the nearest recorded time ≤ the assessment
  time (no interpolation); assessments at or before the baseline time are
  not scored, and assessments later than the last record by more than
  ``stale_after_h`` are dropped (the run ended before them).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["CATEGORIES", "RecistResult", "score_recist"]

#: Categories from best to worst; "NE" (not evaluable) when nothing was assessed.
CATEGORIES = ("CR", "PR", "SD", "PD")
_RANK = {name: rank for rank, name in enumerate(CATEGORIES)}


@dataclasses.dataclass(frozen=True)
class RecistResult:
    """RECIST 1.1 readouts of one patient.

    Attributes:
        assessment_times_h: (k,) times of the scored assessments (h).
        record_times_h: (k,) recorded time each assessment read (h).
        sum_diameters_mm: (k,) sum of target-lesion diameters at each assessment.
        percent_change: (k,) change from baseline (%), for spider plots.
        nadir_mm: (k,) the nadir each assessment was compared with (mm).
        category: (k,) "CR", "PR", "SD" or "PD".
        baseline_mm: baseline sum of diameters (mm).
        best_response: best category ("NE" if no assessment).
        best_percent_change: most negative change from baseline (%), for
            waterfall plots (NaN if no assessment or a zero baseline).
        time_to_progression_h: first PD time − baseline time (NaN if none).
        duration_of_response_h: first CR/PR to first PD after it, or to the
            last assessment if censored (NaN if never CR/PR).
        response_censored: the response had not progressed at the last assessment.
        cr_duration_h: longest run of consecutive CR assessments, first to last
            CR of the run (h; 0 for a single CR, NaN if never CR).
        durable_cr: a CR run lasted ≥ ``durable_cr_h``.
    """

    assessment_times_h: np.ndarray
    record_times_h: np.ndarray
    sum_diameters_mm: np.ndarray
    percent_change: np.ndarray
    nadir_mm: np.ndarray
    category: np.ndarray
    baseline_mm: float
    best_response: str
    best_percent_change: float
    time_to_progression_h: float
    duration_of_response_h: float
    response_censored: bool
    cr_duration_h: float
    durable_cr: bool


def _pick(times_h: np.ndarray, at_h: float) -> int:
    """Index of the last record at or before ``at_h`` (tolerating float32 time round-off)."""
    tolerance = 1e-6 * max(1.0, abs(at_h))
    index = int(np.searchsorted(times_h, at_h + tolerance, side="right")) - 1
    if index < 0:
        raise ValueError(f"assessment at {at_h} h precedes the first record ({times_h[0]} h)")
    return index


def score_recist(
    times_h: np.ndarray,
    lesion_diameters_mm: np.ndarray,
    assessment_times_h: np.ndarray,
    durable_cr_h: float = 5 * 8760.0,
    new_lesion: np.ndarray | None = None,
    baseline_time_h: float = 0.0,
    gone_mm: float = 0.0,
    stale_after_h: float = 24.0,
) -> RecistResult:
    """Score RECIST 1.1 at each assessment time.

    Args:
        times_h: (n_times,) increasing record times (h).
        lesion_diameters_mm: (n_times, lesions) longest diameter of each target
            lesion (mm); a 1-D array is read as the sum of diameters (then "gone"
            means the sum is ≤ ``gone_mm``).
        assessment_times_h: scan times (h), after the baseline.
        durable_cr_h: CR held at least this long is durable (default 5 years).
        new_lesion: optional (n_times,) booleans: a new lesion is present at
            that record (PD at any assessment reading such a record).
        baseline_time_h: time of the baseline scan (default 0).
        gone_mm: a lesion with diameter ≤ this has disappeared.
        stale_after_h: drop assessments later than the last record by more than this.

    Raises:
        ValueError: shapes that do not match, unsorted or non-finite times,
            negative diameters, or an assessment before the first record.
    """
    times = np.asarray(times_h, dtype=np.float64)
    diameters = np.asarray(lesion_diameters_mm, dtype=np.float64)
    if diameters.ndim == 1:
        diameters = diameters[:, None]
    if times.ndim != 1 or diameters.ndim != 2 or diameters.shape[0] != times.shape[0]:
        raise ValueError("times_h must be (n_times,) and lesion_diameters_mm (n_times, lesions); "
                         f"got {times.shape} and {np.shape(lesion_diameters_mm)}")
    if times.size == 0 or not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0):
        raise ValueError("times_h must be non-empty, finite and non-decreasing")
    if np.any(~np.isfinite(diameters)) or np.any(diameters < 0):
        raise ValueError("lesion diameters must be finite and >= 0 mm")
    new = None
    if new_lesion is not None:
        new = np.asarray(new_lesion, dtype=bool)
        if new.shape != times.shape:
            raise ValueError(f"new_lesion must have shape {times.shape}; got {new.shape}")

    sums = diameters.sum(axis=1)
    gone = np.all(diameters <= gone_mm, axis=1)
    baseline = float(sums[_pick(times, baseline_time_h)])

    requested = np.sort(np.asarray(assessment_times_h, dtype=np.float64).ravel())
    # The baseline scan is not a response assessment; scans after the run are stale.
    requested = requested[(requested > baseline_time_h) & (requested <= times[-1] + stale_after_h)]

    categories: list[str] = []
    picked: list[int] = []
    nadirs: list[float] = []
    nadir = baseline
    for at_h in requested:
        index = _pick(times, float(at_h))
        value = float(sums[index])
        nadirs.append(nadir)
        increase = value - nadir
        progressed = (value >= 1.2 * nadir and increase >= 5.0) or bool(new is not None and
                                                                        new[index])
        if progressed:
            category = "PD"
        elif gone[index]:
            category = "CR"
        elif value <= 0.7 * baseline:
            category = "PR"
        else:
            category = "SD"
        categories.append(category)
        picked.append(index)
        nadir = min(nadir, value)

    sums_at = sums[picked] if picked else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        percent = (sums_at - baseline) / baseline * 100.0 if baseline > 0 else np.full(
            len(picked), np.nan)
    category_array = np.asarray(categories, dtype="<U2")
    best = min(categories, key=_RANK.__getitem__) if categories else "NE"
    best_percent = float(np.min(percent)) if len(picked) and baseline > 0 else math.nan

    progression = [i for i, c in enumerate(categories) if c == "PD"]
    time_to_progression = (float(requested[progression[0]] - baseline_time_h)
                           if progression else math.nan)

    responded = [i for i, c in enumerate(categories) if c in ("CR", "PR")]
    duration = math.nan
    censored = False
    if responded:
        first = responded[0]
        later_pd = [i for i in progression if i > first]
        if later_pd:
            duration = float(requested[later_pd[0]] - requested[first])
        else:
            duration = float(requested[-1] - requested[first])
            censored = True

    cr_duration = math.nan
    run_start: int | None = None
    for i, category in enumerate(categories + ["end"]):
        if category == "CR" and run_start is None:
            run_start = i
        elif category != "CR" and run_start is not None:
            length = float(requested[i - 1] - requested[run_start])
            cr_duration = length if math.isnan(cr_duration) else max(cr_duration, length)
            run_start = None
    durable = bool(not math.isnan(cr_duration) and cr_duration >= durable_cr_h)

    return RecistResult(
        assessment_times_h=requested,
        record_times_h=times[picked] if picked else np.zeros(0),
        sum_diameters_mm=sums_at,
        percent_change=np.asarray(percent, dtype=np.float64),
        nadir_mm=np.asarray(nadirs, dtype=np.float64),
        category=category_array,
        baseline_mm=baseline,
        best_response=best,
        best_percent_change=best_percent,
        time_to_progression_h=time_to_progression,
        duration_of_response_h=duration,
        response_censored=censored,
        cr_duration_h=cr_duration,
        durable_cr=durable,
    )
