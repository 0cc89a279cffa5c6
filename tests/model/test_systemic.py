"""Systemic compartment: priming, memory, irAE and its management, positivity, vmap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmesolve.errors import ConfigError
from tmesolve.model.parameters import make_params
from tmesolve.model.systemic import (
    SystemicInputs,
    apply_events,
    initial_systemic,
    irae_grade,
    lymphodepletion_factor,
    run_systemic,
    steroid_effector_factor,
    systemic_step,
    tmb_priming_factor,
)
from tmesolve.therapy.regimens import build_schedule

WEEK = 168.0
FLUX = 1e4  # cells/h: the antigen flux that half-saturates naive priming at steady state


@functools.partial(jax.jit, static_argnums=(6,))
def _run(state, schedule, params, inputs, t_start, dt, n_steps):
    return run_systemic(state, schedule, params, inputs, t_start, dt, n_steps)


def _simulate(regimen, params=None, flux=FLUX, extravasation=0.0, weeks=16, dt=1.0, **kwargs):
    params = make_params(**kwargs) if params is None else params
    schedule = build_schedule(regimen)
    state = initial_systemic(params, antigen_flux=flux, schedule=schedule)
    dtype = state.T_b.dtype
    inputs = SystemicInputs(jnp.asarray(flux, dtype), jnp.asarray(extravasation, dtype))
    return _run(state, schedule, params, inputs, 0.0, dt, int(weeks * WEEK / dt))


def test_untreated_steady_state_is_kept():
    final, record = _simulate("none")
    start = initial_systemic(make_params(), antigen_flux=FLUX)
    assert float(start.T_b) > 0.0 and float(start.M) > 0.0
    # Each exponential update has the steady state as its exact fixed point;
    # only float32 round-off (~1e-7 per step) may move it.
    np.testing.assert_allclose(np.asarray(record["T_b"]), float(start.T_b), rtol=1e-4)
    assert float(final.R) == 0.0


def test_anti_ctla4_raises_priming():
    _, without = _simulate("none")
    _, ipilimumab = _simulate("ipilimumab")
    # e_C = 2.86 at near-full occupancy lifts naive priming up to ~3.9×; T_b follows.
    assert float(ipilimumab["T_b"].max()) > 1.5 * float(without["T_b"].max())
    _, nivolumab = _simulate("nivolumab")
    np.testing.assert_allclose(np.asarray(nivolumab["T_b"]), np.asarray(without["T_b"]))


def test_priming_delay_and_tmb():
    params = make_params()
    state = initial_systemic(params, antigen_flux=0.0)
    assert float(state.T_b) == 0.0
    schedule = build_schedule("none")
    inputs = SystemicInputs(jnp.float32(1e5), jnp.float32(0.0))
    _, record = _run(state, schedule, params, inputs, 0.0, 1.0, 16 * 168)
    blood = np.asarray(record["T_b"])
    # Six transit compartments of mean 6 days: almost nothing reaches blood in the first 2 days.
    assert blood[48] < 0.02 * blood[-1]
    assert blood[-1] > 0.0
    low = make_params(lesion_overrides=[{"TMB": 1.0}], lesions=1)
    assert float(tmb_priming_factor(low)) < float(tmb_priming_factor(params))
    _, record_low = _run(state, schedule, low, inputs, 0.0, 1.0, 16 * 168)
    assert float(record_low["T_b"][-1]) < 0.5 * float(blood[-1])


def test_memory_is_capped():
    params = make_params({"k_pr": 100.0, "f_M": 0.5})
    _, record = _simulate("ipilimumab", params=params, flux=1e7)
    memory = np.asarray(record["M"])
    m_max = float(params["M_max"])
    assert memory.max() <= m_max * (1 + 1e-6)  # float32 round-off only
    assert memory.max() > 0.9 * m_max  # the cap is reached, not just unapproached


def test_irae_higher_under_the_combination():
    params = make_params({"manage_irae": 0.0})
    _, nivolumab = _simulate("nivolumab", params=params)
    final, combination = _simulate("nivolumab_ipilimumab", params=params)
    assert float(combination["R"].max()) > 2.0 * float(nivolumab["R"].max())
    # The state keeps the worst index so far (records may fall between peaks).
    assert float(final.R_peak) == float(combination["R"].max()) > float(final.R)
    assert float(nivolumab["R"].max()) > 0.0


def test_management_holds_the_drug_and_gives_steroids():
    params = make_params({"k_R": 0.05})  # fast irAE build-up: grade 3 within the first cycle
    final, record = _simulate("nivolumab", params=params)
    held = np.asarray(record["held"])
    assert held[-1] == 1.0 and float(final.doses_skipped) > 0.0
    first_held = int(np.argmax(held > 0))
    grade = np.asarray(record["grade"])
    assert grade[first_held] >= 3.0
    # No dose lands after the hold: the plasma level only falls from then on
    # (k_R = 0.05 reaches grade 4, which stops dosing for good).
    concentration = np.asarray(record["concentration"])[first_held:, 0]
    assert np.all(np.diff(concentration) <= 0.0)
    assert float(steroid_effector_factor(final, params)) < 1.0
    unmanaged = make_params({"k_R": 0.05, "manage_irae": 0.0})
    final_unmanaged, _ = _simulate("nivolumab", params=unmanaged)
    assert float(final_unmanaged.doses_skipped) == 0.0 and float(final_unmanaged.doses_given) == 9  # weeks 0, 2, ..., 16
    assert float(steroid_effector_factor(final_unmanaged, unmanaged)) == 1.0


def _hold_edges(held):
    """Steps where a hold begins and where dosing resumes."""
    return np.flatnonzero(np.diff(held) > 0) + 1, np.flatnonzero(np.diff(held) < 0) + 1


def test_management_resumes_after_recovery():
    """The labels' rule: withhold at grade 3, resume at grade ≤ 1 once the steroid
    taper is down to resume_steroid (≤ 10 mg/day prednisone), within 12 weeks."""
    params = make_params({"k_R": 0.003})  # combination: grade 3 in week 3, recovers
    final, record = _simulate("nivolumab_ipilimumab", params=params, weeks=52)
    held = np.asarray(record["held"])
    grade = np.asarray(record["grade"])
    steroid = np.asarray(record["steroid"])
    starts, ends = _hold_edges(held)
    assert held[0] == 0.0 and len(starts) == 1 and len(ends) == 1
    first_hold, resumed = int(starts[0]), int(ends[0])
    assert grade[first_hold] >= 3.0 and float(final.resumes) == 1.0
    assert float(final.discontinued) == 0.0 and float(final.held) == 0.0
    # Resumption waits for both recovery and the taper, and not a step longer,
    # and comes within the 12-week window.
    assert grade[resumed] <= 1.0 and steroid[resumed] <= 0.1
    assert grade[resumed - 1] > 1.0 or steroid[resumed - 1] > 0.1
    assert resumed - first_hold <= 12 * WEEK
    # While held no dose lands; after resuming the next doses do.
    concentration = np.asarray(record["concentration"])
    assert np.all(np.diff(concentration[first_hold:resumed], axis=0) <= 0.0)
    assert np.any(np.diff(concentration[resumed:, 0]) > 0.0)

    # resume_limit = 0: the first hold is for good (fewer doses, no resumption).
    stop_at_once = make_params({"k_R": 0.003, "resume_limit": 0.0})
    final_once, record_once = _simulate("nivolumab_ipilimumab", params=stop_at_once, weeks=52)
    held_once = np.asarray(record_once["held"])
    assert float(final_once.resumes) == 0.0
    assert np.all(held_once[first_hold:] == 1.0) and np.all(held_once[:first_hold] == 0.0)
    assert np.all(np.asarray(record_once["discontinued"])[first_hold:] == 1.0)
    assert float(final_once.doses_given) < float(final.doses_given)


def test_management_stops_for_good_when_not_ready_within_the_window():
    """Nivolumab's long half-life keeps grade 3 for weeks: not ready to resume
    12 weeks after the hold began, so dosing stops for good at that step."""
    params = make_params({"k_R": 0.01})
    final, record = _simulate("nivolumab", params=params, weeks=52)
    held = np.asarray(record["held"])
    discontinued = np.asarray(record["discontinued"])
    first_hold = int(np.argmax(held > 0))
    stopped = int(np.argmax(discontinued > 0))
    assert discontinued[first_hold] == 0.0
    # dt = 1 h: the first step that ends more than 2016 h after the hold began.
    assert stopped - first_hold == 2017
    assert np.all(held[first_hold:] == 1.0) and np.all(discontinued[stopped:] == 1.0)
    assert float(final.resumes) == 0.0
    # The clock is the hold's start time; steroids restart while grade 3 persists.
    hold_start = np.asarray(record["hold_start_h"])
    assert np.all(hold_start[first_hold:] == np.asarray(record["time_h"])[first_hold])
    grade = np.asarray(record["grade"])
    steroid = np.asarray(record["steroid"])
    assert np.all(steroid[first_hold:][grade[first_hold:] >= 3.0] == 1.0)
    # Grade 3 returns while held (the drug's long half-life): the course restarts
    # at s = 1 but the 12-week clock does not.
    back = first_hold + 1 + int(np.argmax(grade[first_hold + 1:] >= 3.0))
    assert first_hold + 1 < back < stopped and grade[back - 1] < 3.0 and steroid[back] == 1.0
    assert steroid[back - 1] < 1.0 and hold_start[back] == hold_start[first_hold]


def test_management_stops_for_good_when_grade_3_recurs():
    """Without the window the same patient resumes (week 26) and the next
    grade 3 stops dosing for good (resume_limit = 1)."""
    params = make_params({"k_R": 0.01, "resume_window_h": 1e6})
    final, record = _simulate("nivolumab", params=params, weeks=52)
    held = np.asarray(record["held"])
    grade = np.asarray(record["grade"])
    discontinued = np.asarray(record["discontinued"])
    starts, ends = _hold_edges(held)
    assert len(starts) == 2 and len(ends) == 1 and float(final.resumes) == 1.0
    first_hold, recurrence = int(starts[0]), int(starts[1])
    assert first_hold < int(ends[0]) < recurrence and grade[recurrence] >= 3.0
    assert np.all(discontinued[:recurrence] == 0.0)
    assert np.all(held[recurrence:] == 1.0) and np.all(discontinued[recurrence:] == 1.0)
    # With two resumptions allowed the recurrence is held, not yet final.
    lenient = make_params({"k_R": 0.01, "resume_window_h": 1e6, "resume_limit": 2.0})
    _, record_lenient = _simulate("nivolumab", params=lenient, weeks=52)
    assert np.asarray(record_lenient["discontinued"])[recurrence] == 0.0


def test_grade_4_discontinues_without_resumption():
    params = make_params({"k_R": 0.05})
    final, record = _simulate("nivolumab", params=params, weeks=52)
    grade = np.asarray(record["grade"])
    discontinued = np.asarray(record["discontinued"])
    first_grade_4 = int(np.argmax(grade >= 4.0))
    assert grade[first_grade_4] == 4.0
    assert discontinued[first_grade_4] == 1.0 and np.all(discontinued[first_grade_4:] == 1.0)
    assert np.all(discontinued[:first_grade_4] == 0.0)
    assert float(final.resumes) == 0.0 and float(final.held) == 1.0
    # discontinue_grade = 5 (never by grade) and no window: the patient resumes.
    lenient = make_params({"k_R": 0.05, "discontinue_grade": 5.0, "resume_window_h": 1e6})
    final_lenient, _ = _simulate("nivolumab", params=lenient, weeks=52)
    assert float(final_lenient.resumes) >= 1.0


def _first_hold_for_good(state, grade, params, t_end, dt):
    """The rule before resumption was modelled, written out: at grade ≥
    hold_grade hold for good (held = max(held, trigger)) and reset steroids."""
    steroid = state.steroid * jnp.exp(-dt / params["tau_steroid"])
    trigger = (params["manage_irae"] >= 0.5) & (grade >= params["hold_grade"])
    held = jnp.maximum(state.held, trigger.astype(state.held.dtype))
    steroid = jnp.where(trigger, jnp.ones_like(steroid), steroid)
    return held, held, state.resumes, state.hold_start_h, steroid


@pytest.mark.parametrize(("regimen", "k_R"), [("nivolumab_ipilimumab", 0.003), ("nivolumab", 0.05)])
def test_resume_limit_0_is_the_first_hold_for_good_rule(monkeypatch, regimen, k_R):
    """params.resume_limit=0 reproduces the earlier rule bit for bit (float32)."""
    import tmesolve.model.systemic as systemic

    def simulate(params):
        schedule = build_schedule(regimen)
        state = initial_systemic(params, antigen_flux=FLUX, schedule=schedule)
        inputs = SystemicInputs(jnp.float32(FLUX), jnp.float32(0.0))
        # A new function object: a fresh trace that sees the patched rule.
        run = jax.jit(lambda *args: run_systemic(*args, int(40 * WEEK)))
        return run(state, schedule, params, inputs, 0.0, 1.0)

    final, record = simulate(make_params({"k_R": k_R, "resume_limit": 0.0}))
    monkeypatch.setattr(systemic, "_manage_irae", _first_hold_for_good)
    final_old, record_old = simulate(make_params({"k_R": k_R}))
    for name in ("T_b", "M", "R", "grade", "held", "steroid", "concentration"):
        np.testing.assert_array_equal(np.asarray(record[name]), np.asarray(record_old[name]), name)
    assert float(final.doses_given) == float(final_old.doses_given)
    assert float(final.doses_skipped) == float(final_old.doses_skipped) > 0.0


def test_management_grades_must_nest():
    with pytest.raises(ConfigError, match=r"resume_grade: got 3.0; expected a grade < hold_grade"):
        make_params({"resume_grade": 3})
    with pytest.raises(ConfigError, match=r"discontinue_grade: got 2.0; expected a grade ≥ hold_grade"):
        make_params({"discontinue_grade": 2})
    with pytest.raises(ConfigError, match=r"resume_limit: got 1.5; expected a whole number"):
        make_params({"resume_limit": 1.5})
    make_params({"hold_grade": 2, "resume_grade": 0, "discontinue_grade": 2})
    # In a lesion's mapping the setting itself is the error, not the nesting.
    with pytest.raises(ConfigError, match=r"lesions.0.resume_grade: got 3; expected a per-lesion parameter"):
        make_params({}, [{"resume_grade": 3}])


def test_states_stay_non_negative_under_heavy_extravasation():
    params = make_params()
    schedule = build_schedule("act")
    state = initial_systemic(params, antigen_flux=FLUX, schedule=schedule)
    # 1e9 cells/h leaving a blood pool of ~5e8 cells: explicit Euler would go negative.
    inputs = SystemicInputs(jnp.float32(0.0), jnp.float32(1e9))
    final, record = _run(state, schedule, params, inputs, 0.0, 1.0, 16 * 168)
    for name in ("T_b", "M", "R", "antigen_ln"):
        assert np.all(np.asarray(record[name]) >= 0.0), name
    assert np.all(np.asarray(final.transit) >= 0.0)
    assert np.all(np.isfinite(np.asarray(record["T_b"])))


def test_act_adds_cells_per_blood_volume():
    params = make_params()
    schedule = build_schedule("act", act_cells=5e9)
    state = initial_systemic(params, schedule=schedule)
    assert float(state.T_b) == pytest.approx(5e9 / 5e6)  # cells/µL in 5 L


def test_lymphodepletion_window():
    params = make_params()
    schedule = build_schedule("act_with_lymphodepletion", start_h=WEEK)
    inside = lymphodepletion_factor(WEEK + 10.0, schedule, params)
    outside = lymphodepletion_factor(WEEK + 400.0, schedule, params)
    assert [float(x) for x in inside] == [2.0, 0.5]
    assert [float(x) for x in outside] == [1.0, 1.0]
    state = initial_systemic(params, schedule=schedule, t_start=0.0)
    assert float(state.lymphodepleted) == 1.0  # window opened 7 days before the infusion
    state = apply_events(state, schedule, WEEK + 335.0, WEEK + 336.0, params)
    assert float(state.lymphodepleted) == 0.0
    assert [float(x) for x in lymphodepletion_factor(state, schedule, params)] == [1.0, 1.0]


def test_grades_follow_thresholds():
    params = make_params()
    grades = irae_grade(jnp.asarray([0.0, 0.99, 1.0, 2.5, 3.0, 7.0]), params)
    assert grades.tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_step_size_convergence():
    _, coarse = _simulate("nivolumab_ipilimumab", weeks=8, dt=1.0, overrides={"manage_irae": 0.0})
    _, fine = _simulate("nivolumab_ipilimumab", weeks=8, dt=0.25, overrides={"manage_irae": 0.0})
    # The module docstring promises < 0.1 % between dt = 1 h and 0.25 h (ETD2 updates;
    # the measured gap, ~5e-5, is float32 round-off). Compare the same times.
    np.testing.assert_allclose(np.asarray(coarse["T_b"]), np.asarray(fine["T_b"])[3::4], rtol=1e-3)
    np.testing.assert_allclose(np.asarray(coarse["R"]), np.asarray(fine["R"])[3::4], rtol=1e-3,
                               atol=1e-5)


def test_jit_vmap_over_patients_equals_single_runs():
    params = [make_params({"k_pr": 0.98}), make_params({"k_pr": 2.0, "e_C": 1.0})]
    schedule = build_schedule("nivolumab_ipilimumab")
    inputs = [SystemicInputs(jnp.float32(1e4), jnp.float32(1e5)),
              SystemicInputs(jnp.float32(3e4), jnp.float32(0.0))]
    states = [initial_systemic(p, antigen_flux=1e4, schedule=schedule) for p in params]

    def stack(trees):
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)

    step = jax.jit(jax.vmap(systemic_step, in_axes=(0, 0, 0, None, None, None)))
    single_step = jax.jit(systemic_step)
    batched = stack(states)
    singles = list(states)
    for k in range(50):
        batched = step(batched, stack(inputs), stack(params), schedule.pk, k * 1.0, 1.0)
        singles = [single_step(s, i, p, schedule.pk, k * 1.0, 1.0)
                   for s, i, p in zip(singles, inputs, params, strict=True)]
    for index, single in enumerate(singles):
        for got, want in zip(jax.tree_util.tree_leaves(batched),
                             jax.tree_util.tree_leaves(single), strict=True):
            # Same arithmetic, possibly fused differently by XLA: float32 round-off only.
            np.testing.assert_allclose(np.asarray(got)[index], np.asarray(want), rtol=1e-5,
                                       atol=1e-6)


def test_float64_matches_float32(x64):
    params64 = make_params({"manage_irae": 0.0}, dtype=jnp.float64)
    _, record64 = _simulate("nivolumab_ipilimumab", params=params64)
    assert record64["T_b"].dtype == jnp.float64
    _, record32 = _simulate("nivolumab_ipilimumab", params=make_params({"manage_irae": 0.0}))
    assert record32["T_b"].dtype == jnp.float32
    # 2688 float32 steps accumulate ~1e-5 relative round-off.
    np.testing.assert_allclose(np.asarray(record32["T_b"]), np.asarray(record64["T_b"]), rtol=1e-4)
