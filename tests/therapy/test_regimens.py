"""Label regimens as fixed-shape schedules; validation; exact event landing."""

from __future__ import annotations

import numpy as np
import pytest

from tmesolve.errors import ConfigError
from tmesolve.model.parameters import make_params
from tmesolve.model.systemic import apply_events, initial_systemic
from tmesolve.therapy.regimens import (
    DEFAULT_DOSE_SLOTS,
    REGIMENS,
    build_schedule,
    combine_regimens,
    event_times,
    merge_schedules,
    schedule_drugs,
    stack_schedules,
)

WEEK = 168.0


def _doses(schedule):
    times = np.asarray(schedule.dose_times_h, dtype=np.float64)
    finite = np.isfinite(times)
    return times[finite], np.asarray(schedule.dose_mg)[finite], np.asarray(schedule.dose_slot)[finite]


def test_pembrolizumab_q3w_until_24_months():
    times, mg, slots = _doses(build_schedule("pembrolizumab", duration_h=3 * 8766.0))
    assert times[:3].tolist() == [0.0, 3 * WEEK, 6 * WEEK]
    assert np.all(mg == 200.0) and np.all(slots == 0)
    assert times[-1] < 24 * 730.5  # label maximum of 24 months
    assert len(times) == 35  # KEYNOTE: 35 cycles over two years


def test_weight_based_doses_and_combination_maintenance():
    schedule = build_schedule("nivolumab_ipilimumab", duration_h=30 * WEEK, weight_kg=80.0)
    times, mg, slots = _doses(schedule)
    ipilimumab = times[slots == 2]
    assert ipilimumab.tolist() == [0.0, 3 * WEEK, 6 * WEEK, 9 * WEEK]
    assert np.allclose(mg[slots == 2], 240.0)  # 3 mg/kg × 80 kg
    nivolumab = times[slots == 0]
    assert np.allclose(mg[slots == 0][:4], 80.0)  # 1 mg/kg × 80 kg
    # Maintenance 480 mg q4w from 3 weeks after the 4th combination dose (CheckMate 067).
    assert nivolumab[4:].tolist() == [12 * WEEK, 16 * WEEK, 20 * WEEK, 24 * WEEK, 28 * WEEK]
    assert np.all(mg[slots == 0][4:] == 480.0)
    assert schedule_drugs(schedule) == ("nivolumab", None, "ipilimumab")


def test_every_label_regimen_has_the_same_shapes():
    shapes = {(build_schedule(name).dose_times_h.shape, build_schedule(name).act_times_h.shape)
              for name in REGIMENS}
    assert shapes == {((DEFAULT_DOSE_SLOTS,), (4,))}
    none = build_schedule("none")
    assert np.all(np.isinf(np.asarray(none.dose_times_h))) and event_times(none).size == 0


def test_start_offset_and_units():
    times, _, _ = _doses(build_schedule("atezolizumab", start_h="2 wk", duration_h="6 wk"))
    assert times.tolist() == [2 * WEEK, 5 * WEEK]


def test_combinations_and_act_with_lymphodepletion():
    schedule = build_schedule("pembrolizumab+act_with_lymphodepletion", start_h=WEEK,
                              duration_h=10 * WEEK, act_cells="5e9 cells")
    same = build_schedule(combine_regimens("pembrolizumab", ["act_with_lymphodepletion"]),
                          start_h=WEEK, duration_h=10 * WEEK, act_cells=5e9)
    assert np.array_equal(np.asarray(schedule.dose_times_h), np.asarray(same.dose_times_h))
    assert float(schedule.act_cells[0]) == 5e9 and float(schedule.act_times_h[0]) == WEEK
    assert float(schedule.ld_start_h[0]) == 0.0 and float(schedule.ld_end_h[0]) == WEEK + 336.0
    expected = sorted({0.0, WEEK, WEEK + 336.0, *[WEEK + 3 * WEEK * k for k in range(4)]})
    assert event_times(schedule).tolist() == expected


def test_explicit_events():
    schedule = build_schedule([{"drug": "nivolumab", "dose": "3 mg/kg", "time": "1 d"},
                               {"act": "1e9 cells", "time": 48.0}], weight_kg=70.0)
    times, mg, slots = _doses(schedule)
    assert times.tolist() == [24.0] and mg.tolist() == [210.0] and slots.tolist() == [0]
    assert float(schedule.act_cells[0]) == 1e9 and float(schedule.act_times_h[0]) == 48.0


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected"),
    [
        ("pembrolizumab_q2w", {}, "known regimen"),
        ([{"drug": "tremelimumab", "dose": "75 mg", "time": 0}], {}, "known drug"),
        ([{"drug": "nivolumab", "dose": "240 mg", "time": "-1 d"}], {}, "not in the past"),
        ([{"drug": "nivolumab", "dose": "240 mg", "time": 10.0}], {"start_h": 20.0}, "in the past"),
        ("nivolumab", {"start_h": -5.0}, "not in the past"),
        ([{"drug": "nivolumab", "dose": "-240 mg", "time": 0}], {}, "dose >= 0"),
        ([{"drug": "nivolumab", "dose": "240 mL", "time": 0}], {}, "mg or mg/kg"),
        ("pembrolizumab+nivolumab", {}, "one drug per target"),
        ([{"act": -1.0, "time": 0}], {}, ">= 0"),
    ],
)
def test_invalid_schedules_are_refused(spec, kwargs, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        build_schedule(spec, **kwargs)
    assert str(error.value).startswith("therapy.regimen")


def test_unknown_regimen_lists_the_known_ones():
    with pytest.raises(ConfigError) as error:
        build_schedule("pembro")
    assert "pembrolizumab_q6w" in str(error.value) and "nivolumab_ipilimumab" in str(error.value)


def test_merge_and_stack():
    merged = merge_schedules(build_schedule("nivolumab", duration_h=4 * WEEK),
                             build_schedule("ipilimumab"))
    times, _, slots = _doses(merged)
    assert np.all(np.diff(times) >= 0) and set(slots.tolist()) == {0, 2}
    with pytest.raises(ConfigError, match="one drug per target"):
        merge_schedules(build_schedule("nivolumab"), build_schedule("pembrolizumab"))
    long = build_schedule("nivolumab", duration_h=5 * 8766.0)  # > 64 doses: a longer block
    stacked = stack_schedules([build_schedule("pembrolizumab"), long])
    assert stacked.dose_times_h.shape == (2, long.dose_times_h.shape[0])
    assert stacked.pk.clearance.shape == (2, 3)


def test_doses_land_at_exact_times():
    """apply_events adds a dose when t0 < time ≤ t1, once."""
    params = make_params()
    schedule = build_schedule("pembrolizumab", duration_h=10 * WEEK)
    state = initial_systemic(params, schedule=schedule)  # applies the dose at t = 0
    assert float(state.pk_central[0]) == 200.0
    before = apply_events(state, schedule, 3 * WEEK - 1.0, 3 * WEEK - 1e-3, params)
    assert float(before.pk_central[0]) == 200.0
    landed = apply_events(state, schedule, 3 * WEEK - 0.1, 3 * WEEK, params)
    assert float(landed.pk_central[0]) == 400.0
    after = apply_events(landed, schedule, 3 * WEEK, 3 * WEEK + 0.1, params)
    assert float(after.pk_central[0]) == 400.0 and float(after.doses_given) == 2.0
