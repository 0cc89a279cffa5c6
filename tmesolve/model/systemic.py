"""The systemic compartment, one per patient: PK, lymph-node antigen, priming
with a delay, blood effectors, memory, irAE index and its management.

All functions are pure ``jnp`` (jit- and vmap-safe, float32 or float64); a
cohort is ``jax.vmap`` over patients. Units: time h, blood levels cells/µL
(= cells/mm³), antigen cells (depot) and cells/h (fluxes), drug amounts mg,
concentrations µg/mL. Equations (MODEL.md "Systemic compartment"; symbols as
in the parameter table)::

    PK (per slot, exact):     see tmesolve.therapy.pk
    θ_i = c_i/(c_i + K_D,i)   plasma occupancy per slot (PD1, PDL1, CTLA4)
    dAg_LN/dt = Ag(t) − δ_Ag·Ag_LN                                  [cells]
    π = k_pr·Ag_LN/(Ag_LN + K_Ag)·τ(TMB)·(1 + e_C·θ_CTLA4)           [cells/µL/h]
    τ(TMB) = 1 − exp(−TMB/TMB_0)   (TMB: mean over the patient's lesions)
    dz_1/dt = π − k·z_1,  dz_j/dt = k·(z_{j−1} − z_j),  k = n_transit/τ_pr
    P_out = k·z_n             (delayed priming; Erlang delay of mean τ_pr)
    dT_b/dt = (1 − f_M)·P_out + g_rc·k_rc·M·Ag_LN/(Ag_LN + K_rc)
              − δ_b·ld_δb·T_b − J_ext/V_blood        (+ ACT boluses/V_blood)
    dM/dt = f_M·P_out·(1 − M/M_max) − δ_M·M
    dR/dt = k_R·(θ_PD + w_C·θ_CTLA4)·T_b/T_ref − δ_R·(1 + (steroid_R − 1)·s)·R
    θ_PD = 1 − (1 − θ_PD1)(1 − θ_PDL1)
    grade = #{k : R ≥ R_gradek}  (0–4)
    management (manage_irae = 1), the labels' withhold/resume/discontinue rule:
      grade ≥ hold_grade ⇒ held = 1 (checkpoint doses are skipped) and
        steroids s = 1, tapering as ds/dt = −s/τ_steroid;
      held, grade ≤ resume_grade and s ≤ resume_steroid ⇒ held = 0 (dosing
        resumes; counted in ``resumes``);
      grade ≥ discontinue_grade, a new hold after resume_limit resumptions,
        or a hold not ready to resume within resume_window_h
        ⇒ discontinued = 1 (held for good);
    effector activity is scaled by 1 − (1 − steroid_effector)·s.

Choices recorded here (and to be carried into docs/model.md):

- Both saturations (naive K_Ag and recall K_rc) read the depot Ag_LN (cells).
  The prototype's K_Ag = 1e4 cells/h and K_rc = 100 cells/h were saturations
  of a flux; the depot holds Ag/δ_Ag at steady state, so the table's
  K_Ag = 1e6 and K_rc = 1e4 cells keep the prototype's behaviour.
- The irAE drive reads the PD-1-axis blockade θ_PD (anti-PD-1 or anti-PD-L1),
  so atezolizumab also causes irAEs (Tecentriq label); MODEL.md names θ_PD1.
- The extravasation loss J_ext (cells/h, summed over lesions) is applied as a
  first-order rate J_ext/(V_blood·T_b): it can never empty more than the pool.
- The management rule holds every checkpoint drug together (a combination
  is withheld and resumed as one); ACT is not held. Labels (Opdivo, Yervoy,
  Keytruda): withhold for most grade 3 irAEs, resume on recovery to grade
  0–1 once corticosteroids are tapered to ≤ 10 mg/day prednisone (s ≤ 0.1
  against a full 1–2 mg/kg/day), permanently discontinue for grade 4, a
  recurrent grade 3 event (resume_limit = 1), or when grade 0–1 and the taper
  are not reached within 12 weeks (resume_window_h; the labels count from the
  last dose, the model from the start of the hold). resume_limit = 0 stops
  for good at the first hold (the rule before resumption was modelled).

Integration: each step first advances PK exactly, then every other variable
down the cascade (Ag_LN → transit chain → M → T_b → R) by a second-order
exponential update (ETD2): the decay is exact and the source is taken
linear between its values at t and t + dt, the upstream variables being
already advanced (memory uses the mean source, see below). The weights of
both source values are ≥ 0 and decays exact, so T_b, M, Ag_LN, R and the
transit chain can never become negative, and M never exceeds M_max.
Measured: dt = 1 h agrees with dt = 0.25 h to < 0.1 % over the first 8 weeks of
nivolumab + ipilimumab (the gap, ~5e-5, is float32 round-off).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import pytree_dataclass
from tmesolve.model.parameters import ModelParams
from tmesolve.spectral import etd2_weights
from tmesolve.therapy.pk import PKParams, pk_step
from tmesolve.therapy.pk import occupancy as _occupancy
from tmesolve.therapy.pk import plasma_concentration as _plasma_concentration
from tmesolve.therapy.regimens import Schedule

__all__ = [
    "SystemicState",
    "SystemicInputs",
    "initial_systemic",
    "transit_compartments",
    "tmb_priming_factor",
    "slot_K_D",
    "plasma_concentration",
    "occupancy",
    "plasma_occupancy",
    "irae_grade",
    "steroid_effector_factor",
    "lymphodepletion_factor",
    "apply_events",
    "systemic_step",
    "run_systemic",
]


@pytree_dataclass
class SystemicState:
    """The patient's systemic state (all leaves arrays).

    Attributes:
        pk_central, pk_peripheral: (3,) drug amounts per slot (mg).
        antigen_ln: () lymph-node antigen depot Ag_LN (cells).
        transit: (n_transit,) priming transit chain (cells/µL).
        T_b: () blood effector CD8 T cells (cells/µL).
        M: () memory T cells (cells/µL).
        R: () irAE index (dimensionless; graded by thresholds).
        R_peak: () the highest R so far (its grade is the patient's worst
            irAE, which sparse records would miss).
        held: () 1 while the management rule withholds checkpoint dosing.
        discontinued: () 1 once it has stopped checkpoint dosing for good.
        resumes: () how many times dosing resumed after a hold.
        hold_start_h: () time the current (or last) hold began (h; −1 before any).
        steroid: () corticosteroid level in [0, 1].
        lymphodepleted: () 1 inside a lymphodepletion window (set by events).
        doses_given, doses_skipped: () counts of checkpoint doses.
    """

    pk_central: jax.Array
    pk_peripheral: jax.Array
    antigen_ln: jax.Array
    transit: jax.Array
    T_b: jax.Array
    M: jax.Array
    R: jax.Array
    R_peak: jax.Array
    held: jax.Array
    discontinued: jax.Array
    resumes: jax.Array
    hold_start_h: jax.Array
    steroid: jax.Array
    lymphodepleted: jax.Array
    doses_given: jax.Array
    doses_skipped: jax.Array


@pytree_dataclass
class SystemicInputs:
    """What the lesions send to the systemic compartment over a step.

    Attributes:
        antigen_flux: () Ag(t), antigen released by all lesions (killing plus
            shedding), already scaled by represented volume (cells/h).
        extravasation: () effector cells leaving the blood into all lesions
            and their margins (cells/h).
    """

    antigen_flux: jax.Array
    extravasation: jax.Array


def transit_compartments(params: ModelParams) -> int:
    """Number of transit compartments (host side; it sets the state's shape)."""
    return max(1, int(round(float(params["n_transit"]))))


def tmb_priming_factor(params: ModelParams) -> jax.Array:
    """τ(TMB) = 1 − exp(−TMB/TMB_0), the fraction of priming a patient's
    neoantigen load supports; TMB is the mean over the patient's lesions
    (mut/Mb). Same form as the antigenicity a of MODEL.md."""
    return -jnp.expm1(-jnp.mean(params["TMB"]) / params["TMB_0"])


def slot_K_D(params: ModelParams) -> jax.Array:
    """(3,) dissociation constants per slot (µg/mL): PD1, PDL1, CTLA4."""
    return jnp.stack([params["K_D_PD1"], params["K_D_PDL1"], params["K_D_CTLA4"]])


def plasma_concentration(state: SystemicState, pk: PKParams) -> jax.Array:
    """(3,) plasma concentrations c = A_c/V_c per slot (µg/mL)."""
    return _plasma_concentration(state.pk_central, pk)


def occupancy(concentration: jax.Array, K_D: jax.Array) -> jax.Array:
    """Target occupancy θ = c/(c + K_D) per slot (c, K_D in µg/mL)."""
    return _occupancy(concentration, K_D)


def plasma_occupancy(state: SystemicState, params: ModelParams, pk: PKParams) -> jax.Array:
    """(3,) plasma occupancies θ per slot (PD1, PDL1, CTLA4)."""
    return occupancy(plasma_concentration(state, pk), slot_K_D(params))


def irae_grade(R: jax.Array, params: ModelParams) -> jax.Array:
    """irAE grade 0–4: the number of thresholds R_grade1..4 that R has reached.

    With the default thresholds 1, 2, 3, 4 this is clip(floor(R), 0, 4).
    Returned in R's float dtype so it stacks with other readouts.
    """
    thresholds = jnp.stack([params[f"R_grade{k}"] for k in range(1, 5)])
    return jnp.sum(R[..., None] >= thresholds, axis=-1).astype(R.dtype)


def steroid_effector_factor(state: SystemicState, params: ModelParams) -> jax.Array:
    """Factor on effector activity (killing) from corticosteroids:
    1 − (1 − steroid_effector)·s, with s ∈ [0, 1] the steroid level
    (0.5 at full steroids by default: steroids blunt effectors partly)."""
    return 1.0 - (1.0 - params["steroid_effector"]) * state.steroid


def _window_active(t: jax.Array, schedule: Schedule) -> jax.Array:
    inside = (schedule.ld_start_h <= t) & (t < schedule.ld_end_h)
    return jnp.any(inside, axis=-1)


def lymphodepletion_factor(
    state_or_time: SystemicState | jax.Array | float, schedule: Schedule, params: ModelParams
) -> tuple[jax.Array, jax.Array]:
    """Factors on (r_T, δ_b) from lymphodepletion: (ld_r_T, ld_delta_b) inside
    a window [start, end) of the schedule, (1, 1) outside.

    Args:
        state_or_time: a :class:`SystemicState` (its ``lymphodepleted`` flag,
            kept by :func:`apply_events`) or a time (h).
    """
    if isinstance(state_or_time, SystemicState):
        active = state_or_time.lymphodepleted
    else:
        t = jnp.asarray(state_or_time, dtype=schedule.ld_start_h.dtype)
        active = _window_active(t, schedule).astype(schedule.ld_start_h.dtype)
    r_T_factor = 1.0 + active * (params["ld_r_T"] - 1.0)
    delta_b_factor = 1.0 + active * (params["ld_delta_b"] - 1.0)
    return r_T_factor, delta_b_factor


def _relax(value: jax.Array, source: jax.Array, rate: jax.Array, dt: jax.Array) -> jax.Array:
    """Exact solution over dt of x' = source − rate·x (source, rate constant):
    x·e^{−rate·dt} + source·(1 − e^{−rate·dt})/rate, → x + source·dt as rate → 0.
    Non-negative whenever x, source, rate ≥ 0."""
    return _relax_linear(value, source, source, rate, dt)


def _relax_linear(
    value: jax.Array, source_start: jax.Array, source_end: jax.Array, rate: jax.Array,
    dt: jax.Array,
) -> jax.Array:
    """Exact solution over dt of x' = s(τ) − rate·x with s linear from
    ``source_start`` to ``source_end`` (second-order exponential integrator, ETD2)::

        x(dt) = x·e^{−z} + dt·(w₀ s₀ + w₁ s₁),   z = rate·dt

    with the weights of :func:`tmesolve.spectral.etd2_weights` (both ≥ 0, so the
    update is non-negative for x, s₀, s₁ ≥ 0; finite, → 0, for an infinite rate).
    """
    z = rate * dt
    weight_start, weight_end = etd2_weights(z)
    return value * jnp.exp(-z) + dt * (source_start * weight_start + source_end * weight_end)


def initial_systemic(
    params: ModelParams,
    dtype: Any = None,
    antigen_flux: float = 0.0,
    extravasation_clearance: float = 0.0,
    schedule: Schedule | None = None,
    t_start: float = 0.0,
) -> SystemicState:
    """The untreated steady state for a constant antigen flux, with no drug.

    Ag_LN = Ag/δ_Ag; π = k_pr·Ag_LN/(Ag_LN + K_Ag)·τ(TMB); every transit
    compartment holds π/k; M = f_M·π/(f_M·π/M_max + δ_M);
    T_b = ((1 − f_M)·π + recall)/(δ_b + CL_ext/V_blood). With no antigen
    (the default) all immune levels start at zero.

    Args:
        params: model parameters (host values: call outside jit).
        dtype: float dtype (default: that of ``params``).
        antigen_flux: Ag (cells/h) the lesions release before therapy.
        extravasation_clearance: effective blood volume cleared per hour by
            extravasation into the lesions (µL/h): J_ext = CL_ext·T_b.
        schedule: if given, every event at or before ``t_start`` is applied
            (doses at the start of therapy land here; later ones in
            :func:`apply_events` with t0 < time ≤ t1), and the
            lymphodepletion flag is set for ``t_start``.
        t_start: simulation start (h).
    """
    dtype = params["k_pr"].dtype if dtype is None else dtype
    n = transit_compartments(params)

    def value(symbol: str) -> jax.Array:
        return jnp.asarray(params[symbol], dtype=dtype)

    flux = jnp.asarray(max(float(antigen_flux), 0.0), dtype=dtype)
    antigen = flux / value("delta_Ag")
    priming = (value("k_pr") * antigen / (antigen + value("K_Ag"))
               * jnp.asarray(tmb_priming_factor(params), dtype=dtype))
    rate = n / value("tau_pr")
    memory_inflow = value("f_M") * priming
    memory = memory_inflow / (memory_inflow / value("M_max") + value("delta_M"))
    recall = value("g_rc") * value("k_rc") * memory * antigen / (antigen + value("K_rc"))
    loss = value("delta_b") + jnp.asarray(extravasation_clearance, dtype=dtype) / value("V_blood")
    blood = ((1.0 - value("f_M")) * priming + recall) / loss
    zero = jnp.zeros((), dtype=dtype)
    state = SystemicState(
        pk_central=jnp.zeros(3, dtype=dtype),
        pk_peripheral=jnp.zeros(3, dtype=dtype),
        antigen_ln=antigen,
        transit=jnp.full((n,), priming / rate, dtype=dtype),
        T_b=blood,
        M=memory,
        R=zero,
        R_peak=zero,
        held=zero,
        discontinued=zero,
        resumes=zero,
        hold_start_h=jnp.full((), -1.0, dtype=dtype),
        steroid=zero,
        lymphodepleted=zero,
        doses_given=zero,
        doses_skipped=zero,
    )
    if schedule is not None:
        state = apply_events(state, schedule, -jnp.inf, t_start, params)
    return state


def apply_events(
    state: SystemicState,
    schedule: Schedule,
    t0: jax.Array | float,
    t1: jax.Array | float,
    params: ModelParams,
) -> SystemicState:
    """Apply the schedule's events with t0 < time ≤ t1 (call after the step
    that ends at t1; t0 = −inf applies everything up to t1).

    - a checkpoint dose adds its mg to its slot's central compartment, unless
      the management rule holds dosing (held = 1): then it is skipped and counted;
    - an ACT infusion adds cells/V_blood to T_b (cells/µL);
    - the lymphodepletion flag is set for the step that starts at t1
      (window [start, end)).
    """
    dtype = state.T_b.dtype
    t0 = jnp.asarray(t0, dtype=dtype)
    t1 = jnp.asarray(t1, dtype=dtype)
    due = (t0 < schedule.dose_times_h) & (schedule.dose_times_h <= t1)
    holding = state.held >= 0.5
    given = due & ~holding
    skipped = due & holding
    added = jnp.zeros(3, dtype=dtype).at[schedule.dose_slot].add(
        jnp.where(given, schedule.dose_mg, 0.0).astype(dtype))
    infused = (t0 < schedule.act_times_h) & (schedule.act_times_h <= t1)
    cells = jnp.sum(jnp.where(infused, schedule.act_cells, 0.0)).astype(dtype)
    return SystemicState(
        pk_central=state.pk_central + added,
        pk_peripheral=state.pk_peripheral,
        antigen_ln=state.antigen_ln,
        transit=state.transit,
        T_b=state.T_b + cells / params["V_blood"],
        M=state.M,
        R=state.R,
        R_peak=state.R_peak,
        held=state.held,
        discontinued=state.discontinued,
        resumes=state.resumes,
        hold_start_h=state.hold_start_h,
        steroid=state.steroid,
        lymphodepleted=_window_active(t1, schedule).astype(dtype),
        doses_given=state.doses_given + jnp.sum(given).astype(dtype),
        doses_skipped=state.doses_skipped + jnp.sum(skipped).astype(dtype),
    )


def _input(inputs: SystemicInputs | dict[str, Any], name: str, dtype: Any) -> jax.Array:
    value = inputs[name] if isinstance(inputs, dict) else getattr(inputs, name)
    # Fluxes are physically ≥ 0; a round-off negative must not break positivity.
    return jnp.maximum(jnp.asarray(value, dtype=dtype), 0.0)


def systemic_step(
    state: SystemicState,
    inputs: SystemicInputs | dict[str, Any],
    params: ModelParams,
    pk: PKParams,
    t: jax.Array | float,
    dt: jax.Array | float,
) -> SystemicState:
    """Advance the systemic compartment from t to t + dt (h); see the module
    docstring for the equations. Events are not applied here (:func:`apply_events`).

    Args:
        state: the state at t.
        inputs: ``antigen_flux`` and ``extravasation`` (cells/h) over the step.
        params: model parameters.
        pk: per-slot PK constants (``schedule.pk``).
        t: time at the start of the step (h); the equations are autonomous,
            only the management rule's clock reads it.
        dt: step (h).
    """
    dtype = state.T_b.dtype
    dt = jnp.asarray(dt, dtype=dtype)
    t_end = jnp.asarray(t, dtype=dtype) + dt
    antigen_flux = _input(inputs, "antigen_flux", dtype)
    extravasation = _input(inputs, "extravasation", dtype)

    def p(symbol: str) -> jax.Array:
        return params[symbol].astype(dtype)

    # PK exactly; occupancies at both ends of the step.
    K_D = slot_K_D(params).astype(dtype)
    theta_start = occupancy(_plasma_concentration(state.pk_central, pk), K_D)
    central, peripheral = pk_step(state.pk_central, state.pk_peripheral, pk, dt)
    theta_end = occupancy(_plasma_concentration(central, pk), K_D)

    # Each variable below is advanced by the ETD2 update: exact decay, its
    # source taken linear over the step between the values at t and t + dt
    # (the variables it reads are updated first, in the order of the cascade).
    theta_ctla4_start, theta_ctla4_end = theta_start[2], theta_end[2]
    tmb_factor = tmb_priming_factor(params).astype(dtype)

    def naive_priming(antigen: jax.Array, theta_ctla4: jax.Array) -> jax.Array:
        return (p("k_pr") * antigen / (antigen + p("K_Ag")) * tmb_factor
                * (1.0 + p("e_C") * theta_ctla4))

    def recall(memory: jax.Array, antigen: jax.Array) -> jax.Array:
        return p("g_rc") * p("k_rc") * memory * antigen / (antigen + p("K_rc"))

    # Lymph-node antigen depot (constant flux over the step: exact).
    antigen_new = _relax(state.antigen_ln, antigen_flux, p("delta_Ag"), dt)

    # Transit chain (static length n): compartment j relaxes at k = n/τ_pr fed
    # by compartment j − 1 (the first by π); updated in order so each sees its
    # feeder at both ends of the step.
    n = state.transit.shape[0]
    rate = n / p("tau_pr")
    feed_start = naive_priming(state.antigen_ln, theta_ctla4_start)
    feed_end = naive_priming(antigen_new, theta_ctla4_end)
    compartments = []
    for j in range(n):
        new = _relax_linear(state.transit[j], feed_start, feed_end, rate, dt)
        compartments.append(new)
        feed_start, feed_end = rate * state.transit[j], rate * new
    transit_new = jnp.stack(compartments)
    delayed_start, delayed_end = feed_start, feed_end

    # Memory: logistic inflow as a linear relaxation. Source and rate both use
    # the step's mean inflow f (trapezoid, still second order), so M relaxes
    # toward f/(f/M_max + δ_M) < M_max and can never pass the cap; a source
    # varying inside the step against a frozen rate overshot it by 0.5 %.
    inflow = 0.5 * p("f_M") * (delayed_start + delayed_end)
    memory_new = _relax(state.M, inflow, inflow / p("M_max") + p("delta_M"), dt)

    # Blood effectors: naive output, memory recall, loss and extravasation.
    delta_b_factor = 1.0 + state.lymphodepleted * (p("ld_delta_b") - 1.0)
    blood = state.T_b
    has_blood = blood > 0.0
    extravasation_rate = jnp.where(
        has_blood, extravasation / (p("V_blood") * jnp.where(has_blood, blood, 1.0)), 0.0)
    blood_new = _relax_linear(
        blood,
        (1.0 - p("f_M")) * delayed_start + recall(state.M, state.antigen_ln),
        (1.0 - p("f_M")) * delayed_end + recall(memory_new, antigen_new),
        p("delta_b") * delta_b_factor + extravasation_rate, dt)

    # irAE index with steroid-accelerated resolution.
    def irae_drive(theta: jax.Array, blood_level: jax.Array) -> jax.Array:
        theta_pd = 1.0 - (1.0 - theta[0]) * (1.0 - theta[1])
        return p("k_R") * (theta_pd + p("w_C") * theta[2]) * blood_level / p("T_ref")

    resolution = p("delta_R") * (1.0 + (p("steroid_R") - 1.0) * state.steroid)
    irae_new = _relax_linear(state.R, irae_drive(theta_start, blood),
                             irae_drive(theta_end, blood_new), resolution, dt)

    held_new, discontinued_new, resumes_new, hold_start_new, steroid_new = _manage_irae(
        state, irae_grade(irae_new, params), params, t_end, dt)

    return SystemicState(
        pk_central=central,
        pk_peripheral=peripheral,
        antigen_ln=antigen_new,
        transit=transit_new,
        T_b=blood_new,
        M=memory_new,
        R=irae_new,
        R_peak=jnp.maximum(state.R_peak, irae_new),
        held=held_new,
        discontinued=discontinued_new,
        resumes=resumes_new,
        hold_start_h=hold_start_new,
        steroid=steroid_new,
        lymphodepleted=state.lymphodepleted,
        doses_given=state.doses_given,
        doses_skipped=state.doses_skipped,
    )


def _manage_irae(
    state: SystemicState, grade: jax.Array, params: ModelParams, t_end: jax.Array, dt: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The irAE management rule at the end of a step, from the new grade.

    At grade ≥ hold_grade checkpoint dosing is withheld and a steroid course
    starts (or restarts) at s = 1, then tapers as s·exp(−dt/τ_steroid). A
    held patient is ready to resume once the grade is ≤ resume_grade and the
    taper has reached s ≤ resume_steroid, and resumes then unless the hold
    has become permanent: grade ≥ discontinue_grade, a hold that starts
    after resume_limit resumptions, or a hold not ready within
    resume_window_h of its start. Flags are 0/1 in the state's dtype
    (``resumes`` a count, ``hold_start_h`` a time), so the rule is a few
    ``jnp.where`` and the same under ``vmap``.

    Returns:
        (held, discontinued, resumes, hold_start_h, steroid) at t_end, the step's end.
    """
    dtype = state.held.dtype

    def p(symbol: str) -> jax.Array:
        return jnp.asarray(params[symbol], dtype=dtype)

    managed = p("manage_irae") >= 0.5
    was_held = state.held >= 0.5
    trigger = managed & (grade >= p("hold_grade"))
    new_hold = trigger & ~was_held
    steroid = state.steroid * jnp.exp(-dt / p("tau_steroid"))
    steroid = jnp.where(trigger, jnp.ones_like(steroid), steroid)
    ready = ~trigger & (grade <= p("resume_grade")) & (steroid <= p("resume_steroid"))
    # Hours held from the step that began the hold, as a difference of times:
    # a running sum of dt would drift in float32 over weeks of small steps.
    hours_held = t_end - state.hold_start_h
    discontinued = ((state.discontinued >= 0.5)
                    | (managed & (grade >= p("discontinue_grade")))
                    | (new_hold & (state.resumes >= p("resume_limit")))
                    | (was_held & ~ready & (hours_held > p("resume_window_h"))))
    resume = was_held & ready & ~discontinued
    held = trigger | discontinued | (was_held & ~resume)
    hold_start = jnp.where(new_hold, t_end, state.hold_start_h)
    return (held.astype(dtype), discontinued.astype(dtype),
            state.resumes + resume.astype(dtype), hold_start, steroid)


def run_systemic(
    state: SystemicState,
    schedule: Schedule,
    params: ModelParams,
    inputs: SystemicInputs | dict[str, Any],
    t_start: jax.Array | float,
    dt: jax.Array | float,
    n_steps: int,
) -> tuple[SystemicState, dict[str, jax.Array]]:
    """Run the systemic model alone with constant inputs (``lax.scan``; jit-able
    with ``n_steps`` static). Each step advances t → t + dt, then applies the
    events in (t, t + dt]. Events at or before ``t_start`` must already be in
    ``state`` (``initial_systemic(..., schedule=...)``).

    Returns:
        the final state and a record per step end: ``time_h``, ``T_b``, ``M``,
        ``R``, ``grade``, ``antigen_ln``, ``held``, ``discontinued``,
        ``hold_start_h``, ``steroid``, ``concentration`` (n_steps, 3).
    """
    dtype = state.T_b.dtype
    t_start = jnp.asarray(t_start, dtype=dtype)
    dt = jnp.asarray(dt, dtype=dtype)

    def body(carry: SystemicState, index: jax.Array) -> tuple[SystemicState, dict[str, jax.Array]]:
        # Times from the index, not by accumulation, so events land exactly.
        t0 = t_start + index.astype(dtype) * dt
        t1 = t_start + (index + 1).astype(dtype) * dt
        carry = systemic_step(carry, inputs, params, schedule.pk, t0, dt)
        carry = apply_events(carry, schedule, t0, t1, params)
        record = {
            "time_h": t1,
            "T_b": carry.T_b,
            "M": carry.M,
            "R": carry.R,
            "grade": irae_grade(carry.R, params),
            "antigen_ln": carry.antigen_ln,
            "held": carry.held,
            "discontinued": carry.discontinued,
            "hold_start_h": carry.hold_start_h,
            "steroid": carry.steroid,
            "concentration": plasma_concentration(carry, schedule.pk),
        }
        return carry, record

    return jax.lax.scan(body, state, jnp.arange(n_steps))
