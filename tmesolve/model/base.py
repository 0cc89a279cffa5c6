"""The contract between a model and the engine.

A model declares its species (static), says how its fast linear species
diffuse and decay, and supplies local reactions and explicit cell transport as
pure functions of the :class:`State`. The engine does the splitting, the time
step, the loop and the output. The verification problems and the TME model
are all such models.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import pytree_dataclass
from tmesolve.grid import Grid
from tmesolve.model.species import Species, Transport, ordered_species
from tmesolve.operators import FaceBoundary


@pytree_dataclass
class State:
    """Everything that evolves.

    Attributes:
        fields: all species stacked, shape (species, lesions, nx, ny, nz), in
            the model's species order (fast-linear species first).
        time: simulated time (h), 0-d.
        step: steps taken, 0-d int32.
        aux: model-specific pytree (e.g. the systemic compartment); ``()`` if none.
    """

    fields: jax.Array
    time: jax.Array
    step: jax.Array
    aux: Any = ()


class Model:
    """Base class: override what the model has; defaults are 'nothing'.

    Subclasses set ``grid``, ``species`` (via :meth:`_declare`), ``lesions``,
    and optionally ``fast_boundary`` (walls seen by the spectral propagator)
    and ``spectrum``. All methods are pure and traced inside the compiled loop.
    """

    grid: Grid
    species: tuple[Species, ...]
    lesions: int = 1
    fast_boundary: FaceBoundary = FaceBoundary()
    spectrum: str = "exact"
    #: Trace each sub-solver once (a loop over a switch) rather than once per use
    #: in the splitting sequence: for large models, halves compile time.
    trace_substeps_once: bool = False
    #: A transport pass of length zero (the identity on the fields) refreshes what
    #: :meth:`begin_interval` refreshes (e.g. a recorded transport speed): an
    #: unbatched integrator then opens each interval with one instead, and XLA
    #: compiles no separate copy of the code begin_interval needs.
    refreshed_by_zero_transport: bool = False
    #: Fast species (names) whose local terms are too stiff to split from their
    #: diffusion: :meth:`react` advances them together with their diffusion
    #: (:mod:`tmesolve.implicit`) and the linear sub-step leaves them alone.
    #: Their walls are no-flux.
    stiff_fast: tuple[str, ...] = ()
    #: Fast species (names) that :meth:`linear_sources` gives a source; None:
    #: all. The others take the source-free propagator, three per-axis matrix
    #: products instead of nine (the sources of these are not read).
    linear_source_species: tuple[str, ...] | None = None
    #: Which of those sources change with the fields or the time over a step:
    #: True (all), False (none) or their names. Those are integrated by ETD2RK
    #: (second order; the sources are evaluated again at a predicted end of the
    #: step, and their species transformed twice more), the others by ETD1,
    #: exact for a source that is constant over the step.
    linear_sources_vary: bool | tuple[str, ...] = True

    def _declare(self, species: tuple[Species, ...]) -> None:
        self.species = ordered_species(species)

    # --- species bookkeeping (static) -------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.species)

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def num_fast(self) -> int:
        return sum(s.transport is Transport.FAST_LINEAR for s in self.species)

    @property
    def field_shape(self) -> tuple[int, ...]:
        return (len(self.species), self.lesions, *self.grid.shape)

    # --- hooks --------------------------------------------------------------
    def linear_coefficients(self, params: Any) -> tuple[jax.Array, jax.Array]:
        """(D in µm²/h, λ in h⁻¹) of the fast linear species, each (num_fast,) or (num_fast, lesions)."""
        raise NotImplementedError

    def linear_fixed_values(self, params: Any) -> jax.Array | None:
        """Value on fixed-value walls per fast species, or None."""
        return None

    def linear_sources(self, state: State, params: Any) -> jax.Array | None:
        """Source S (units/h) of the fast species at ``state`` (its fields and time), or None.

        The linear sub-step integrates it at second order from its values at
        the start and at a predicted end of the step (:attr:`linear_sources_vary`),
        for the species of :attr:`linear_source_species`.
        """
        return None

    def react(self, state: State, params: Any, dt: jax.Array) -> State:
        """Local reactions over dt (positivity-preserving); may advance ``aux``."""
        return state

    def transport(self, state: State, params: Any, dt: jax.Array) -> State:
        """Explicit cell transport over dt (conservative)."""
        return state

    def stable_dt(self, state: State, params: Any) -> jax.Array:
        """Largest stable explicit step (h) for the current state; inf if unlimited."""
        return jnp.asarray(jnp.inf, state.fields.dtype)

    def for_batches(self) -> Model:
        """The model a vmapped integrator compiles: the same equations, possibly another
        program that runs faster under ``vmap`` (default: this model)."""
        return self

    def begin_interval(self, state: State, params: Any) -> State:
        """Called once at the start of each compiled output interval, before the first step
        (a single run of a model with :attr:`refreshed_by_zero_transport` opens with a
        zero-length transport pass instead).

        A model that carries step-to-step bookkeeping in ``aux`` (e.g. the last
        transport speed that :meth:`stable_dt` reads) refreshes it here from the
        state itself, so a state edited on the host between intervals is safe.
        """
        return state

    def apply_events(self, state: State, params: Any, t0: jax.Array, t1: jax.Array) -> State:
        """Apply events (doses, infusions) whose time lies in [t0, t1)."""
        return state

    def readouts(self, state: State, params: Any) -> dict[str, jax.Array]:
        """Small diagnostics recorded at output times (computed on the device)."""
        return {}
