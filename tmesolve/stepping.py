"""Operator splitting: one step of a model, and the reaction integrator.

A step composes three sub-solvers, each second-order accurate on its own:
R (local reactions, :func:`positive_exponential_heun`), C (explicit cell transport,
SSP-RK2) and L (spectral propagator of the fast linear species: exact for
their diffusion and decay, ETD2RK for sources that change with the state). A fast
species whose local terms are too stiff to split from its diffusion (a model's
``stiff_fast``, oxygen in the TME) is left out of L: the model's R advances it
with its diffusion (:mod:`tmesolve.implicit`).

* order 1 (Lie):    L(Δt) ∘ C(Δt) ∘ R(Δt)
* order 2 (Strang): R(Δt/2) ∘ C(Δt/2) ∘ L(Δt) ∘ C(Δt/2) ∘ R(Δt/2)

The Strang composition is symmetric, so the splitting error is O(Δt²)
globally; the test suite measures both orders by regression over Δt.

On request (``solver.merge_reactions``) the closing R(Δtₙ/2) of one Strang
step and the opening R(Δtₙ₊₁/2) of the next are merged into one
R((Δtₙ + Δtₙ₊₁)/2) inside a compiled interval (:meth:`SplitStepper.advance_pass`):
the exact flows compose exactly, and the second-order R differs from the pair
of halves by O(Δt³) per step, so the scheme stays second order while
evaluating the reactions once per step instead of twice. Its reaction error
per step is about four times that of the two halves (the Fisher–KPP check's
error at Δt = 0.05 h goes from 6.5e-5 to 1.1e-4), which is why it is not the
default. The last step of an interval closes with R(Δt/2), so every output is
a complete Strang state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import replace
from tmesolve.model.base import Model, State
from tmesolve.spectral import Eigenbasis, etd2_weights, propagate

SPLITTING_ORDERS = (1, 2)
#: Switch branch of an empty sub-step (after reactions 0, transport 1, linear 2).
IDENTITY = 3


def _frozen_exponential(u: jax.Array, production: jax.Array, loss: jax.Array, dt: jax.Array) -> jax.Array:
    """Exact solution over dt of u' = P − Λu with P, Λ frozen: u e^{−Λdt} + P(1 − e^{−Λdt})/Λ."""
    x = loss * dt
    small = x < 1e-6
    gain = jnp.where(small, dt * (1.0 - 0.5 * x), -jnp.expm1(-x) / jnp.where(small, 1.0, loss))
    return u * jnp.exp(-x) + production * gain


def exponential_trapezoid(u: jax.Array, production0: jax.Array, loss0: jax.Array,
                          production1: jax.Array, loss1: jax.Array, dt: jax.Array) -> jax.Array:
    """Corrector of :func:`positive_exponential_heun`: u' = P(τ) − Λ(τ)u with P, Λ known at both ends.

        u⁺ = u e^{−½(Λ₀ + Λ₁)Δt} + Δt (w₀(z₁) P₀ + w₁(z₁) P₁),   z₁ = Λ₁Δt

    The homogeneous part integrates Λ by the trapezoid rule; the source is taken
    linear in time and propagated with the end-point rate Λ₁ (:func:`etd2_weights`).
    Both are second order when Λ is small. As Λ₁Δt → ∞ the update tends to
    P₁/Λ₁ − (P₁ − P₀)/(Λ₁²Δt): for a stiff species with a slowly varying rate and a
    production that does not depend on the species itself (IL-2, the
    antibodies, PD-L1 here) that is its slow manifold P/Λ − Ṗ/Λ², where the frozen
    mean ½(P₀+P₁)/½(Λ₀+Λ₁) lags it by half a step. (For a stiff autocatalytic term,
    P ∝ u, neither form is accurate at Λ·Δt ≫ 1; the old frozen mean happens to be
    closer there: keep Λ·Δt ≲ 1 for such terms, as the explicit limits do.) Every
    term is non-negative, so u⁺ ≥ 0; a steady state (P = Λu at both ends) is kept
    to round-off.
    """
    w0, w1 = etd2_weights(loss1 * dt)
    return u * jnp.exp(-0.5 * (loss0 + loss1) * dt) + dt * (w0 * production0 + w1 * production1)


def positive_exponential_heun(production_and_loss: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                              u: jax.Array, dt: jax.Array) -> jax.Array:
    """Second-order, unconditionally positive step of u' = P(u) − Λ(u)·u.

    P ≥ 0 is production, Λ ≥ 0 a per-capita loss rate (h⁻¹). The predictor
    solves the frozen linear ODE exactly (an exponential integrator); the
    corrector (:func:`exponential_trapezoid`) uses both end points:

        u¹ = 𝓔(u; P(u), Λ(u), Δt),   𝓔(u; P, Λ, Δt) = u e^{−ΛΔt} + P (1 − e^{−ΛΔt})/Λ
        u⁺ = u e^{−Λ̄Δt} + Δt (w₀ P(u) + w₁ P(u¹)),   Λ̄ = ½(Λ(u) + Λ(u¹))

    Both stages are sums of non-negative terms, so u⁺ ≥ 0 for any Δt; steady
    states (P = Λu) are kept exactly, and a stiff species (a loss of
    10² h⁻¹) relaxes onto its slow manifold without the 2× overshoot that
    Patankar-type schemes (MPRK22) show when a species starts far below it.
    """
    production0, loss0 = production_and_loss(u)
    stage = _frozen_exponential(u, production0, loss0, dt)
    production1, loss1 = production_and_loss(stage)
    return exponential_trapezoid(u, production0, loss0, production1, loss1, dt)


def _stiff_split(model: Model) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Positions among the fast species of those the model's react advances with their
    diffusion (:attr:`Model.stiff_fast`) and of those the linear sub-step propagates."""
    fast_names = [s.name for s in model.species[:model.num_fast]]
    stiff_names = tuple(getattr(model, "stiff_fast", ()))
    for name in stiff_names:
        if name not in fast_names:
            raise ValueError(f"stiff_fast: got {name!r}; expected one of the fast linear species {fast_names}")
    if stiff_names and model.fast_boundary.any_dirichlet:
        raise ValueError(f"stiff_fast: got {stiff_names!r} with fixed-value walls; "
                         "expected no-flux walls (tmesolve.implicit has no Dirichlet lift)")
    stiff = tuple(i for i, name in enumerate(fast_names) if name in stiff_names)
    return stiff, tuple(i for i in range(len(fast_names)) if i not in stiff)


def _source_groups(model: Model, plain: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Indices among ``plain`` of the species without a source, with one constant over the
    step and with one that varies (Model.linear_source_species, Model.linear_sources_vary).

    Names that are not species the linear sub-step propagates are refused: a
    misspelt one would silently drop that species' production (its source is
    never read).
    """
    names = [model.names[i] for i in plain]
    chosen, vary = model.linear_source_species, model.linear_sources_vary
    for setting, given in (("linear_source_species", chosen),
                           ("linear_sources_vary", None if isinstance(vary, bool) else vary)):
        if given is None:
            continue
        if not isinstance(given, tuple):
            raise ValueError(f"{setting}: got {given!r}; expected a tuple of species names")
        for name in given:
            if name not in names:
                raise ValueError(f"{setting}: got {name!r}; expected one of the propagated fast species {names}")
            if setting == "linear_sources_vary" and chosen is not None and name not in chosen:
                raise ValueError(f"{setting}: got {name!r}; expected one of linear_source_species {chosen}")
    sourced = tuple(i for i in plain if chosen is None or model.names[i] in chosen)
    varying = tuple(i for i in sourced if vary is True or (vary is not False and model.names[i] in vary))
    constant = tuple(i for i in sourced if i not in varying)
    free = tuple(i for i in plain if i not in sourced)
    return free, constant, varying


def _take(values: Any, indices: tuple[int, ...]) -> jax.Array:
    """values[indices] along the first axis: a slice when the indices are a run."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    if indices == tuple(range(indices[0], indices[0] + len(indices))):
        return values[indices[0]:indices[0] + len(indices)]
    return values[jnp.asarray(indices)]


def _put(values: jax.Array, indices: tuple[int, ...], update: jax.Array) -> jax.Array:
    if indices == tuple(range(indices[0], indices[0] + len(indices))):
        return values.at[indices[0]:indices[0] + len(indices)].set(update)
    return values.at[jnp.asarray(indices)].set(update)


class SplitStepper:
    """One time step of a model by Lie or Strang splitting."""

    def __init__(self, model: Model, order: int = 2) -> None:
        if order not in SPLITTING_ORDERS:
            raise ValueError(f"solver.splitting_order: got {order!r}; expected one of {SPLITTING_ORDERS}")
        self.model = model
        self.order = order
        self.basis = Eigenbasis(model.grid, model.fast_boundary, model.spectrum) if model.num_fast else None
        self.stiff_indices, self.plain_indices = _stiff_split(model)
        self.source_groups = _source_groups(model, self.plain_indices)

    @property
    def active_substeps(self) -> tuple[int, ...]:
        """Sub-solvers the model has (0 reactions, 1 cell transport, 2 fast linear), static."""
        model = type(self.model)
        active = []
        if model.react is not Model.react:
            active.append(0)
        if model.transport is not Model.transport:
            active.append(1)
        if self.plain_indices:
            active.append(2)
        return tuple(active) or (0,)

    @property
    def step_kinds(self) -> tuple[int, ...]:
        """The sub-solvers one plain step runs, in order (0 reactions, 1 cell transport,
        2 fast linear): a model with one operator runs it once whatever the splitting order."""
        return self._split_sequence(0.0)[0]

    def linear(self, state: State, params: Any, dt: jax.Array) -> State:
        """The spectral propagator over dt of the fast species, but the stiff ones (the model's react moves those).

        Three groups (:attr:`source_groups`): species without a source take the
        separable propagator, those with a source constant over the step ETD1,
        and those whose source varies ETD2RK, whose corrector evaluates the
        sources at the other groups' results and its own prediction, at t + Δt.
        """
        model = self.model
        if not self.plain_indices:
            return state
        diffusivity, decay = model.linear_coefficients(params)
        # The named scopes label the kernels for `python -m benchmarks.profile_step`.
        with jax.named_scope("sources"):
            source, fixed_value = model.linear_sources(state, params), model.linear_fixed_values(params)
        # A model without sources (None) propagates every species source-free.
        free, constant, varying = self.source_groups if source is not None else (self.plain_indices, (), ())
        fields = state.fields

        def advance(indices, with_source, source_at_end=None):
            kept = _take(fields, indices)
            with jax.named_scope("propagate"):
                propagated = propagate(
                    self.basis, kept, _take(diffusivity, indices), _take(decay, indices), dt,
                    source=_take(source, indices) if with_source else None,
                    fixed_value=None if fixed_value is None else _take(fixed_value, indices),
                    source_at_end=source_at_end)
            # A zero step is the identity exactly (a transform round trip is not): idle
            # passes that run every sub-solver (batches, unrolled models) run L with dt = 0.
            return jnp.where(dt > 0, propagated, kept)

        for indices, with_source in ((free, False), (constant, True)):
            if indices:
                fields = _put(fields, indices, advance(indices, with_source))
        if varying:
            before = fields

            def source_at_end(predicted):
                moved = replace(state, fields=_put(before, varying, predicted), time=state.time + dt)
                with jax.named_scope("sources"):
                    return _take(model.linear_sources(moved, params), varying)

            fields = _put(fields, varying, advance(varying, True, source_at_end))
        return replace(state, fields=fields)

    @property
    def can_merge_reactions(self) -> bool:
        """Whether merging reaction halves changes anything: Strang, with reactions and another operator."""
        active = self.active_substeps
        return self.order == 2 and 0 in active and len(active) > 1

    def _substeps(self, params: Any):
        model = self.model
        return (
            lambda current, h: model.react(current, params, h),
            lambda current, h: model.transport(current, params, h),
            lambda current, h: self.linear(current, params, h),
        )

    def _run_sequence(self, state: State, kinds: tuple[int, ...], durations: tuple[jax.Array, ...],
                      params: Any, only_position: jax.Array | None = None) -> State:
        """Apply the sub-solvers ``kinds`` for ``durations`` (h), in order.

        ``only_position`` (loop-over-switch models only; −1: all run): run only the
        sub-solver at that position of the sequence, the others being the identity
        (a fourth, empty branch). Unbatched it is a real branch, so an idle pass
        costs one sub-solver; under ``vmap`` a batched index would run every
        branch, so batches pass None.
        """
        substeps = self._substeps(params) + ((lambda current, h: current),)
        if getattr(self.model, "trace_substeps_once", False):
            # A large model traced once per sub-solver instead of once per use:
            # the sequence runs as a loop over a switch, which roughly halves the
            # program XLA compiles (and its compile time).
            kind_array = jnp.asarray(kinds, jnp.int32)
            duration_array = jnp.stack([jnp.asarray(d, state.time.dtype) for d in durations])

            def substep(index, current):
                kind = kind_array[index]
                if only_position is not None:
                    kind = jnp.where((only_position >= 0) & (index != only_position), IDENTITY, kind)
                return jax.lax.switch(kind, substeps, current, duration_array[index])

            return jax.lax.fori_loop(0, len(kinds), substep, state)
        for kind, duration in zip(kinds, durations):
            state = substeps[kind](state, duration)
        return state

    def _split_sequence(self, dt: jax.Array) -> tuple[tuple[int, ...], tuple[jax.Array, ...]]:
        """Sub-solvers and their durations of one Lie or Strang step of length dt."""
        if self.order == 1:
            kinds, fractions = (0, 1, 2), (1.0, 1.0, 1.0)
        else:
            kinds, fractions = (0, 1, 2, 1, 0), (0.5, 0.5, 1.0, 0.5, 0.5)
        active = self.active_substeps
        if len(active) == 1:
            # One operator: splitting is exact and halving its step only doubles the work.
            kinds, fractions = active, (1.0,)
        else:
            kept = [(k, f) for k, f in zip(kinds, fractions) if k in active]
            kinds, fractions = tuple(k for k, _ in kept), tuple(f for _, f in kept)
        return kinds, tuple(dt * fraction for fraction in fractions)

    def idle_positions(self, merge_reactions: bool) -> tuple[int, int]:
        """Positions in the step's sequence of the one sub-solver an opening idle pass
        runs (the first transport) and the one a merged closing pass runs (the reaction)."""
        kinds = self._sequence_kinds(merge_reactions)
        return (kinds.index(1) if 1 in kinds else -1), 0

    def _sequence_kinds(self, merge_reactions: bool) -> tuple[int, ...]:
        if merge_reactions and self.can_merge_reactions:
            return (0,) + tuple(k for k in (1, 2, 1) if k in self.active_substeps)
        return self.step_kinds

    def advance_pass(self, state: State, params: Any, dt: jax.Array, idle: jax.Array,
                     merge_reactions: bool = False, owed_reaction_dt: jax.Array | None = None,
                     only_position: jax.Array | None = None) -> tuple[State, jax.Array]:
        """One step of length dt, or with ``idle`` set a pass of length zero.

        Plain: one Lie or Strang step (:meth:`_split_sequence`). With ``merge_reactions``
        (Strang only) the step's opening reaction also pays the previous step's
        closing half, and its own closing half is left owed:

            C(Δt/2) ∘ L(Δt) ∘ C(Δt/2) ∘ R(owed + Δt/2),   after which R(Δt/2) is owed

        An idle pass (the integrator passes Δt = 0 with it) applies no events
        (those at an interval's end belong to the next one) and counts no step;
        every sub-solver runs a zero step, which is the identity on the fields exactly (the reaction's
        exponentials give u·1 + 0, SSP-RK2 adds 0·rate, :meth:`linear` keeps its
        fields) but lets transport record what it measures, and a merged pass
        pays what is owed. ``only_position`` (unbatched loops only) makes an
        idle pass run just one sub-solver (:meth:`_run_sequence`). Under ``vmap``
        patients go idle at different iterations, so the sequence is the same for
        all and only Δt differs.
        When merging, events must fall on interval stops: an event inside an
        interval would be applied before the previous step's owed reaction half.
        Returns the state and the reaction time now owed (h; 0 when not merging).
        """
        with_events = self.model.apply_events(state, params, state.time, state.time + dt)
        # Leaves the events leave alone (the fields, for the TME model) are not selected.
        state = jax.tree_util.tree_map(
            lambda kept, new: kept if new is kept else jnp.where(idle, kept, new), state, with_events)
        if merge_reactions and self.can_merge_reactions:
            owed = jnp.zeros_like(dt) if owed_reaction_dt is None else owed_reaction_dt
            kinds = self._sequence_kinds(True)
            by_kind = {0: owed + 0.5 * dt, 1: 0.5 * dt, 2: dt}
            durations = tuple(by_kind[k] for k in kinds)
            owed = jnp.where(idle, 0.0, 0.5 * dt).astype(dt.dtype)
        else:
            kinds, durations = self._split_sequence(dt)
            owed = jnp.zeros_like(dt)
        state = self._run_sequence(state, kinds, durations, params, only_position)
        counted = jnp.where(idle, 0, 1).astype(state.step.dtype)
        return replace(state, time=state.time + dt, step=state.step + counted), owed
