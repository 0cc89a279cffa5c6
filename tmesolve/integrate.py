"""The compiled loop: advance a state to a stop time, and the host loop over stops.

One JIT region per output interval: ``advance(state, params, solver, t_end)``
runs a ``lax.while_loop`` of split steps from ``state.time`` to ``t_end``.
Each step's Δt is chosen on the device from the explicit stability limit
(times a safety factor) and the user's cap, then shortened so that the
remaining interval is cut into equal steps: ``t_end`` is hit exactly, with no
host sync inside the interval. With ``merge_reactions`` the reaction halves
of neighbouring Strang steps are merged (:meth:`SplitStepper.advance_pass`)
and the interval closes with the last half, so each stop is a complete step;
that pass costs about one step per interval, and events must fall on stops
(:meth:`Integrator.run`, the app and the cohort stop at every event time).
``t_end`` and every number are traced, so one configuration compiles once,
whatever the stop times and parameter values.

The host loop visits the union of output times and event times (doses), so
events fall on step boundaries exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve import executable_cache
from tmesolve._pytree import pytree_dataclass, replace
from tmesolve.errors import ConfigError, check_positive, check_range
from tmesolve.model.base import Model, State
from tmesolve.stepping import SplitStepper

logger = logging.getLogger(__name__)


@pytree_dataclass
class SolverParams:
    """Numbers of the time stepper (traced leaves: changing them never recompiles).

    Attributes:
        dt_max: user cap on the step (h).
        safety: fraction of the explicit stability limit used (0 < s ≤ 1).
        max_steps: largest number of steps per output interval (guards runaway).
    """

    dt_max: jax.Array
    safety: jax.Array
    max_steps: jax.Array


def make_solver_params(dt_max: float = 0.1, safety: float = 0.9, max_steps: int = 10_000_000,
                       dtype=jnp.float32) -> SolverParams:
    """Validated solver numbers (``solver.dt_max`` h, ``solver.safety``)."""
    check_positive("solver.dt_max", dt_max)
    check_range("solver.safety", safety, 1e-6, 1.0)
    return SolverParams(dt_max=jnp.asarray(dt_max, dtype), safety=jnp.asarray(safety, dtype),
                        max_steps=jnp.asarray(int(max_steps), jnp.int32))


class _Loop(NamedTuple):
    """A compiled interval loop: how to run it, where it came from, its cache entry."""

    run: Callable
    origin: str  # "disk", "compiled" or "jit" (see Integrator.compile)
    key: str = ""


class SimulationError(RuntimeError):
    """The state became non-finite or negative: the run stops with the time and field."""


class Integrator:
    """Compiles and runs a model. ``trace_count`` counts compilations of the chunk."""

    #: One patient, no vmap: an idle pass may run a single sub-solver through a
    #: real branch (under vmap its switch index would be batched and every branch run).
    unbatched = True

    def __init__(self, model: Model, splitting_order: int = 2, merge_reactions: bool = False) -> None:
        if merge_reactions and splitting_order != 2:
            raise ConfigError("solver.merge_reactions", merge_reactions,
                              "false unless solver.splitting_order is 2 (Strang)")
        self.model = model
        self.stepper = SplitStepper(model, splitting_order)
        self.merge_reactions = bool(merge_reactions) and self.stepper.can_merge_reactions
        self.trace_count = 0
        self._loop_function: Callable = self._advance_impl
        self._advance = jax.jit(self._loop_function, donate_argnums=(0,))
        # The loop for each argument signature, once the compiled-loop cache is on.
        self._loops: dict[tuple, _Loop] = {}
        #: Where the loop of the latest call came from (see :meth:`compile`).
        self.last_source = ""

    def _advance_impl(self, state: State, params: Any, solver: SolverParams, t_end: jax.Array):
        self.trace_count += 1  # runs only while tracing
        model, stepper, merged = self.model, self.stepper, self.merge_reactions
        dtype = state.fields.dtype
        t_end = jnp.asarray(t_end, dtype)
        start_step = state.step
        # Idle passes that run one sub-solver: a loop-over-switch model, unbatched.
        selective = self.unbatched and getattr(model, "trace_substeps_once", False)
        open_position, close_position = stepper.idle_positions(merged)
        # A model refreshed by a zero-length transport pass (the TME's face speed)
        # opens the interval with one, instead of begin_interval: the same compiled
        # transport code, so XLA has one copy fewer to compile.
        opens_idle = selective and open_position >= 0 and getattr(model, "refreshed_by_zero_transport", False)
        if not opens_idle:
            state = model.begin_interval(state, params)

        def step_size(current: State) -> tuple[jax.Array, jax.Array]:
            """Δt that cuts the rest of the interval into equal stable steps, and whether it is the last."""
            remaining = t_end - current.time
            limit = jnp.minimum(solver.dt_max, solver.safety * model.stable_dt(current, params))
            count = jnp.maximum(jnp.ceil(remaining / limit), 1.0)
            return remaining / count, count <= 1.0

        def finished(current: State) -> jax.Array:
            # Written as "not before t_end" so that a NaN time (a run gone non-finite)
            # ends the interval at once instead of stepping on to max_steps.
            return ~(current.time < t_end) | (current.step - start_step >= solver.max_steps)

        # Carry (state, reaction time owed, opening, done). Passes of length zero
        # (idle: the identity on the fields, no events, no step counted) open the
        # interval when opens_idle (running only the first transport, which
        # records the face speed) and, with merged reactions, close it: once t_end
        # is reached (or the step budget is spent) the closing pass pays the owed
        # R(Δt/2). Without merging the loop ends with the last step.
        def keep_going(carry) -> jax.Array:
            return ~carry[3]

        def one_step(carry):
            current, owed, opening, _ = carry
            closing = ~opening & finished(current) if merged else jnp.asarray(False)
            idle = opening | closing
            dt, last = step_size(current)
            dt = jnp.where(idle, 0.0, dt).astype(dtype)
            only = None
            if selective:
                only = jnp.where(opening, open_position, jnp.where(closing, close_position, -1))
            advanced, owed = stepper.advance_pass(current, params, dt, idle, merged, owed, only)
            # The last step of the interval lands on t_end exactly (no drift of Σdt).
            advanced = replace(advanced, time=jnp.where(last & ~idle, t_end, advanced.time).astype(dtype))
            return advanced, owed, jnp.asarray(False), closing if merged else finished(advanced)

        done = ~(state.time < t_end) if merged else finished(state)
        start = (state, jnp.zeros((), dtype), jnp.asarray(opens_idle) & ~done, done)
        state = jax.lax.while_loop(keep_going, one_step, start)[0]
        diagnostics = {
            "finite": jnp.all(jnp.isfinite(state.fields)),
            "minimum": jnp.min(state.fields),
            "steps": state.step - start_step,
        }
        return state, model.readouts(state, params), diagnostics

    def advance(self, state: State, params: Any, solver: SolverParams, t_end: float):
        """Advance to ``t_end`` (h). Returns (state, readouts, diagnostics); ``state`` is donated."""
        args = (state, params, solver, jnp.asarray(t_end, state.fields.dtype))
        loop = self._loop_for(args)
        try:
            return loop.run(*args)
        except jax.errors.JaxRuntimeError as error:
            if loop.origin != "disk":
                raise
            # A stored loop that loads but cannot run must not fail every later
            # run too: drop it (the state was donated, so this run cannot go on).
            self._loops = {signature: kept for signature, kept in self._loops.items() if kept is not loop}
            directory = executable_cache.cache_directory()
            if directory is not None:
                executable_cache.discard(directory, loop.key)
            raise SimulationError(
                f"a loop loaded from the compiled-loop cache failed to run ({error}); the entry "
                "was removed, so a rerun compiles afresh") from error

    def compile(self, state: State, params: Any, solver: SolverParams) -> tuple[Any, str]:
        """The compiled loop for these arguments' shapes, and where it came from.

        The source is ``"disk"`` (loaded from the compiled-loop cache, no trace),
        ``"compiled"`` (traced and compiled, and stored when the cache is on),
        ``"memory"`` (this integrator had it) or ``"jit"`` (cache off or the
        model unkeyable: compiled through ``jax.jit``, whose own caches apply).
        """
        args = (state, params, solver, jnp.asarray(0.0, state.fields.dtype))
        loop = self._loop_for(args)
        if loop.origin == "jit":
            return loop.run.lower(*args).compile(), self.last_source
        return loop.run, self.last_source

    def _owner_digest(self) -> str | None:
        """Digest of what this integrator's trace depends on besides its arguments (None: unkeyable).

        Recomputed on every new argument signature: the model may have been
        changed since the last compile.
        """
        try:
            return executable_cache.object_digest(
                (type(self), self.unbatched, self.merge_reactions, self.stepper))
        except executable_cache.Unkeyable as reason:
            logger.info("compiled-loop cache not used: %s", reason)
            return None

    def _loop_for(self, args: tuple) -> _Loop:
        """The loop for ``args``; :attr:`last_source` says where it came from on this call.

        Each argument signature is decided once (loaded, compiled and stored, or,
        for an unkeyable model or edited sources, left to ``jax.jit``), so later
        intervals pay only the signature. Without a persistent cache directory
        the loop is the ``jax.jit`` function itself.
        """
        directory = executable_cache.cache_directory()
        if directory is None:
            self.last_source = "jit"
            return _Loop(self._advance, "jit")
        signature = executable_cache.arguments_signature(args)
        loop = self._loops.get(signature)
        if loop is not None:
            self.last_source = "jit" if loop.origin == "jit" else "memory"
            return loop
        loop = self._new_loop(directory, args, signature)
        self._loops[signature] = loop
        self.last_source = loop.origin
        return loop

    def _new_loop(self, directory, args: tuple, signature: tuple) -> _Loop:
        """Load the loop of a new signature from the cache, or compile and store it."""
        owner = self._owner_digest()
        if owner is None:
            return _Loop(self._advance, "jit")
        if executable_cache.source_changed_since_import():
            logger.info("compiled-loop cache not used: tmesolve's source changed after it was imported")
            return _Loop(self._advance, "jit")
        try:
            key = executable_cache.entry_key(owner, signature)
        except Exception as error:  # noqa: BLE001 - a key that cannot be made must not stop the run
            logger.warning("compiled-loop cache not used: no key (%s: %s)", type(error).__name__, error)
            return _Loop(self._advance, "jit")
        loaded = executable_cache.load(directory, key)
        if loaded is not None:
            return _Loop(loaded, "disk", key)
        compiled = executable_cache.compile_for_storage(self._loop_function, args, key)
        executable_cache.store(directory, key, compiled)
        return _Loop(compiled, "compiled", key)

    def run(self, state: State, params: Any, solver: SolverParams, output_times: Iterable[float],
            event_times: Iterable[float] = (),
            on_output: Callable[[State, dict, dict], None] | None = None,
            check_negative_below: float | None = None) -> State:
        """Host loop: advance through every output and event time, calling ``on_output`` at outputs.

        Raises :class:`SimulationError` as soon as a field is non-finite (or, if
        ``check_negative_below`` is set, below that value) at a stop.
        """
        outputs = np.asarray(sorted(set(float(t) for t in output_times)), dtype=float)
        events = np.asarray(sorted(set(float(t) for t in event_times)), dtype=float)
        start = float(state.time)
        stops = np.union1d(outputs, events)
        stops = stops[stops > start]
        for stop in stops:
            state, readouts, diagnostics = self.advance(state, params, solver, float(stop))
            if not bool(diagnostics["finite"]):
                raise SimulationError(f"a field became non-finite before t = {stop:g} h; "
                                      "reduce solver.dt_max or check the parameters")
            if check_negative_below is not None and float(diagnostics["minimum"]) < check_negative_below:
                raise SimulationError(f"a field became negative ({float(diagnostics['minimum']):.3g}) "
                                      f"before t = {stop:g} h")
            if on_output is not None and np.any(np.isclose(outputs, stop, rtol=0, atol=1e-9)):
                on_output(state, readouts, diagnostics)
        return state


def fresh_copy(tree: Any) -> Any:
    """Every array leaf of ``tree`` in a new buffer of its own.

    For a call that donates its arguments (the integrator's loop) when the
    original must stay readable, and for a state whose leaves must not share a
    buffer: one array shared by two leaves cannot be donated twice.
    """
    return jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, copy=True), tree)


def initial_state(model: Model, fields: jax.Array | np.ndarray, aux: Any = (), time: float = 0.0,
                  dtype=jnp.float32) -> State:
    """A :class:`State` from stacked fields (species, lesions, nx, ny, nz)."""
    fields = jnp.asarray(fields, dtype)
    if fields.shape != model.field_shape:
        raise ValueError(f"fields: got shape {fields.shape}; expected {model.field_shape}")
    # Every leaf gets its own buffer: the loop donates the state.
    aux = fresh_copy(aux)
    return State(fields=fields, time=jnp.asarray(time, dtype), step=jnp.asarray(0, jnp.int32), aux=aux)


class BatchIntegrator(Integrator):
    """Advance a batch of independent patients together: ``jax.vmap`` over a leading axis.

    ``state`` and ``params`` carry a leading batch axis on every leaf (stack them
    with :func:`stack_pytrees`); the solver numbers and the stop time are shared.
    Each patient keeps its own step size: the vmapped while-loop runs until the
    slowest patient reaches ``t_end``, and patients already there are held (a
    batched ``select``), so every patient's result equals its own run to
    round-off. One compile serves the whole batch.
    """

    unbatched = False

    def __init__(self, model: Model, splitting_order: int = 2, merge_reactions: bool = False) -> None:
        super().__init__(model.for_batches(), splitting_order, merge_reactions)
        self._loop_function = jax.vmap(self._advance_impl, in_axes=(0, 0, None, None))
        self._advance = jax.jit(self._loop_function, donate_argnums=(0,))


def stack_pytrees(trees: list[Any]) -> Any:
    """Stack pytrees of identical structure along a new leading axis (a batch of patients)."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack([jnp.asarray(leaf) for leaf in leaves]), *trees)


def unstack_pytree(tree: Any, index: int) -> Any:
    """The ``index``-th member of a stacked pytree."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)
