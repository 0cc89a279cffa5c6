"""The tumour-microenvironment model of MODEL.md as an engine model.

Fields per lesion (units in brackets), in engine order (fast linear first):

=============  =====================  ===================  ==============
name           symbol                 units                transport
=============  =====================  ===================  ==============
oxygen         O                      mmHg                 fast linear
ifn_gamma      G                      ng/mL                fast linear
cxcl9_10       X                      ng/mL                fast linear
il2            L                      ng/mL                fast linear
tgf_beta       B                      ng/mL                fast linear
anti_pd1       A1                     µg/mL                fast linear
anti_pdl1      A2                     µg/mL                fast linear
tumour_cells   C                      cells/mm³            cell
necrotic_debris N                     cells/mm³            cell (v only)
effector_t_cells T                    cells/mm³            cell
exhausted_t_cells E                   cells/mm³            cell
host_phase     H                      cells/mm³            cell (v only)
vessels        V                      1                    carried by v
stroma         S                      1                    carried by v
antigenicity   a                      1                    carried by v
pd_l1          P                      1                    none
=============  =====================  ===================  ==============

The step splits into (see :mod:`tmesolve.stepping`): local reactions of every
field but the production and decay of IFN-γ, CXCL9/10, TGF-β and the drugs, plus the
systemic compartment (positive exponential Heun; the systemic ODEs by ETD2),
with oxygen and its diffusion solved together in the same stages (ROS2,
:mod:`tmesolve.implicit`: its uptake is too stiff to split from diffusion);
explicit cell transport (tissue velocity from the volume balance, Itô
motility, chemotaxis up ∇X; SSP-RK2, conservative); and the spectral
propagator of the six other fast species, which takes their diffusion, and
for all but IL-2 (whose uptake by T cells is stiff) their decay and
production, in one exponential step (ETD2RK for IFN-γ and CXCL9/10, ETD1
for the others).

Units: µm, h, cells·mm⁻³ (1 mm³ = 1 µL, so T_b in cells·µL⁻¹ is directly a
tissue density), ng·mL⁻¹, µg·mL⁻¹, mmHg.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve._pytree import pytree_dataclass, replace
from tmesolve.grid import Grid
from tmesolve.implicit import ROS2_GAMMA, SOLVE_TOLERANCE, solve_screened_poisson, stage_residual_enough
from tmesolve.model.base import Model, State
from tmesolve.model.parameters import ModelParams
from tmesolve.model.species import Species, Transport
from tmesolve.model.systemic import (
    SystemicInputs,
    SystemicState,
    apply_events,
    lymphodepletion_factor,
    plasma_concentration,
    plasma_occupancy,
    steroid_effector_factor,
    systemic_step,
)
from tmesolve.operators import (
    FaceBoundary,
    _slice,
    _spatial_axis,
    diffusion_rate,
    divergence,
    explicit_stable_dt,
    forward_difference,
    gradient_face_velocities,
    ito_motility_rate,
    max_face_speed,
    upwind_flux,
)
from tmesolve.spectral import Eigenbasis, solve_poisson
from tmesolve.stepping import _frozen_exponential, exponential_trapezoid
from tmesolve.therapy.regimens import Schedule

F, C_, N = Transport.FAST_LINEAR, Transport.CELL, Transport.NONE

#: The one list of TME fields: name, symbol, units, transport, long name.
SPECIES: tuple[Species, ...] = (
    Species("oxygen", "O", "mmHg", F, "oxygen partial pressure"),
    Species("ifn_gamma", "G", "ng/mL", F, "interferon gamma"),
    Species("cxcl9_10", "X", "ng/mL", F, "CXCL9/10 chemokine"),
    Species("il2", "L", "ng/mL", F, "interleukin 2"),
    Species("tgf_beta", "B", "ng/mL", F, "transforming growth factor beta"),
    Species("anti_pd1", "A1", "ug/mL", F, "anti-PD-1 antibody in tissue"),
    Species("anti_pdl1", "A2", "ug/mL", F, "anti-PD-L1 antibody in tissue"),
    Species("tumour_cells", "C", "cells/mm^3", C_, "viable tumour cells"),
    Species("necrotic_debris", "N", "cells/mm^3", C_, "necrotic tumour debris"),
    Species("effector_t_cells", "T", "cells/mm^3", C_, "effector CD8 T cells"),
    Species("exhausted_t_cells", "E", "cells/mm^3", C_, "exhausted CD8 T cells"),
    Species("host_phase", "H", "cells/mm^3", C_, "host tissue (normal cells and matrix)"),
    Species("vessels", "V", "1", C_, "vessel density"),
    Species("stroma", "S", "1", C_, "stroma/ECM density"),
    Species("antigenicity", "a", "1", C_, "tumour antigenicity"),
    Species("pd_l1", "P", "1", N, "PD-L1 expression per tumour cell"),
)
SYMBOLS = {s.symbol: i for i, s in enumerate(SPECIES)}
#: Each species' symbol by its name.
SYMBOL_BY_NAME = {s.name: s.symbol for s in SPECIES}
FAST = ("O", "G", "X", "L", "B", "A1", "A2")
PHASES = ("C", "N", "T", "E", "H")          # the saturated mixture, Σ = K_max
CARRIED_MAPS = ("V", "S", "a")
#: The fields cell transport moves.
CELL_TRANSPORTED = PHASES + CARRIED_MAPS
#: Linear decay rate (parameter symbol) of each fast species but oxygen, whose
#: λ_O is part of its loss (:meth:`TMEModel.local_terms`, :meth:`TMEModel.oxygen_local_terms`).
LINEAR_DECAYS = {"G": "lambda_G", "X": "lambda_X", "L": "lambda_L", "B": "lambda_B",
                 "A1": "lambda_A", "A2": "lambda_A"}
#: Fast species whose local terms are solved with their diffusion (TMEModel.stiff_fast).
STIFF_FAST = ("O",)
#: Fast species (symbols) whose production and decay the spectral step takes
#: with their diffusion (TMEModel.linear_source_species, which the methods
#: read, so a subclass may choose others): IFN-γ, CXCL9/10 and TGF-β, made where
#: the cells are, and the antibodies, which enter at the vessels; their local
#: losses are none or slow (antibody exchange with vessels, k_A·V ≤ 0.02 h⁻¹
#: at the table's k_A: a k_A near 1/Δt would make it stiff, as IL-2's uptake is).
#: IL-2 keeps production, decay and uptake together in the local step: its
#: uptake by T cells, u_L(T + E)/(L + K_L), reaches ~6 h⁻¹ in a hot core
#: (T + E ≈ 3e4 cells/mm³), and a production split from a loss that stiff
#: settles at a fraction of P/Λ. Measured by ``python -m
#: benchmarks.cytokine_sources`` (docs/model.md).
PRODUCED_IN_PROPAGATOR = ("G", "X", "B", "A1", "A2")
#: Of those, the ones whose production depends on fast species, which change
#: within the spectral step (IFN-γ through the antibodies' occupancy, CXCL9/10
#: through IFN-γ): they take ETD2RK; TGF-β (from tumour cells and stroma) and
#: the antibodies (from plasma, through the vessels) ETD1, exact for them.
PRODUCTION_VARIES_IN_PROPAGATOR = ("G", "X")
PHENOTYPE_CODES = {"inflamed": 0, "excluded": 1, "desert": 2}


@pytree_dataclass
class TMEParams:
    """Everything numeric the TME step needs (all array leaves).

    Attributes:
        model: the parameter table's values (:class:`ModelParams`).
        schedule: therapy events and PK constants.
        volume_scale: (lesions,) represented / simulated tumour volume; scales
            the lesion's systemic fluxes and its extinction count.
        baseline_burden: (lesions,) simulated viable cells at t = 0 (cells).
        baseline_diameter_mm: (lesions,) represented baseline diameter d₀ (mm).
        host_vessels: (lesions,) vessel density carried in with host tissue at the walls.
        lesion_weight: (lesions,) 1 for the patient's lesions; 0 for a copy that only
            pads a batch to a common lesion count (:func:`~tmesolve.model.tme_setup.pad_lesions`):
            it sheds no antigen to the lymph node and takes no effectors from blood,
            so the patient's systemic compartment sees its own lesions alone.
    """

    model: ModelParams
    schedule: Schedule
    volume_scale: jax.Array
    baseline_burden: jax.Array
    baseline_diameter_mm: jax.Array
    host_vessels: jax.Array
    lesion_weight: jax.Array


@pytree_dataclass
class TMEAux:
    """Non-field state: the patient's systemic compartment and event bookkeeping."""

    systemic: SystemicState
    events_applied_until: jax.Array
    #: Σ over axes of the largest face speed of the cells (chemotaxis plus tissue
    #: velocity, µm/h) at the last transport stage; read by ``stable_dt``.
    transport_speed: jax.Array


class _ReactionCarry(NamedTuple):
    """What the two stages of :meth:`TMEModel.react` pass on: the stage state, the
    predictor's terms for the corrector, and oxygen's ROS2 pieces (k₁, the shift
    a = 1 + γΔt·max(−∂f/∂O, 0), γΔt·F_t and the right-hand side of the stage solve)."""

    fields: dict[str, jax.Array]
    systemic: SystemicState
    production0: dict[str, jax.Array]
    loss0: dict[str, jax.Array]
    inputs0: SystemicInputs
    oxygen_step1: jax.Array
    oxygen_shift: jax.Array
    oxygen_time_term: jax.Array
    oxygen_right_hand_side: jax.Array


def _oxygen_supply(u: dict[str, jax.Array], p) -> jax.Array:
    """k_V·V (h⁻¹): oxygen's exchange rate with blood at O_b."""
    return p["k_V"] * u["V"]


def _oxygen_uptake_capacity(u: dict[str, jax.Array], p) -> jax.Array:
    """u_C·C + u_T·(T + E) (mmHg/h): oxygen's uptake at saturation (Michaelis–Menten in O)."""
    return p["u_C"] * u["C"] + p["u_T"] * (u["T"] + u["E"])


def _hill(x: jax.Array, half_saturation: jax.Array, n: jax.Array) -> jax.Array:
    """The Hill fraction xⁿ/(xⁿ + Kⁿ) for x, K ≥ 0 and n > 0 (dimensionless), as

        1/(1 + exp(n (ln K − ln x)))

    A power with an array exponent (n is a parameter leaf) is slow on XLA's
    CPU backend: ``python -m benchmarks.cpu_patterns`` (16 × 128³ values) timed
    it at 12.6–14.5× a pass that scales the values, and exp(n ln x) at 3.8–4.6×.

    The limits hold: x = 0 gives ln x = −∞ and the fraction 0, K = 0 the
    fraction 1, and a large exponent overflows to ∞ and gives 0. A value below
    zero by round-off counts as 0 (a power would give NaN there for a
    non-integer n, and the log for any n). Not for differentiation: the
    gradient is NaN at x = 0 or K = 0.
    """
    log_ratio = jnp.log(jnp.maximum(half_saturation, 0.0)) - jnp.log(jnp.maximum(x, 0.0))
    return 1.0 / (1.0 + jnp.exp(n * log_ratio))


def _per_lesion(value: jax.Array) -> jax.Array:
    """Broadcast a (lesions,) parameter against fields (lesions, nx, ny, nz)."""
    value = jnp.asarray(value)
    return value[:, None, None, None] if value.ndim == 1 else value


class TMEModel(Model):
    """MODEL.md on a grid of ``lesions`` lesion boxes sharing one systemic compartment."""

    trace_substeps_once = True
    #: Unroll the two stages of the reaction and transport loops (two copies of
    #: their code for XLA). A single run keeps them rolled: half the compile time,
    #: no step-time change measured. Under vmap the rolled loops stepped slower in
    #: an A/B (3 lesions × 32³ × 4 patients, near this VM's noise), so batches use
    #: :meth:`for_batches`.
    unroll_stages = False
    # Transport records its stages' face speed, also over a step of length zero.
    refreshed_by_zero_transport = True
    # Oxygen's uptake (10²–10⁴ h⁻¹) is solved with its diffusion in react (tmesolve.implicit).
    stiff_fast = tuple(s.name for s in SPECIES if s.symbol in STIFF_FAST)
    linear_source_species = tuple(s.name for s in SPECIES if s.symbol in PRODUCED_IN_PROPAGATOR)
    linear_sources_vary = tuple(s.name for s in SPECIES if s.symbol in PRODUCTION_VARIES_IN_PROPAGATOR)

    def __init__(self, grid: Grid, lesions: int = 1, margin_width_um: float = 100.0,
                 tissue_velocity: bool = True) -> None:
        """Args:
            grid: one lesion's box; lesions: number of lesion boxes (leading axis).
            margin_width_um: width of the invasive-margin band of the readouts (µm).
            tissue_velocity: advect every phase and map with the volume-balance
                velocity (MODEL.md); False switches it off (well-mixed checks).
        """
        self.grid, self.lesions, self.tissue_velocity = grid, lesions, tissue_velocity
        self.fast_boundary = FaceBoundary()   # no-flux boxes for cytokines and drugs
        # The second-order spectrum keeps the propagator positive (an M-matrix
        # exponential); the exact one rings (Gibbs) at sharp sources.
        self.spectrum = "second_order"
        self._declare(SPECIES)
        self.pressure_basis = Eigenbasis(grid, FaceBoundary.all_fixed(0.0), "second_order")
        # Oxygen's stage solves: no-flux walls and the 7-point Laplacian's spectrum.
        self.oxygen_basis = Eigenbasis(grid, FaceBoundary(), "second_order")
        self.margin_cells = max(1, int(round(0.5 * margin_width_um / grid.spacing_um)))
        self.moving_block = self._moving_block()

    def with_lesions(self, lesions: int) -> TMEModel:
        """The same model for ``lesions`` lesion boxes (nothing else depends on the count)."""
        model = copy.copy(self)
        model.lesions = lesions
        return model

    # --- helpers -----------------------------------------------------------
    def _unstack(self, fields: jax.Array) -> dict[str, jax.Array]:
        return {s.symbol: fields[self.index(s.name)] for s in SPECIES}

    def _stack(self, values: dict[str, jax.Array]) -> jax.Array:
        return jnp.stack([values[symbol] for symbol in self.species_symbols()])

    def species_symbols(self):
        return [SYMBOL_BY_NAME[s.name] for s in self.species]

    # --- fast linear species -------------------------------------------------
    def _produced_in_propagator(self) -> tuple[str, ...]:
        """Symbols of :attr:`linear_source_species` (static)."""
        return tuple(SYMBOL_BY_NAME[name] for name in self.linear_source_species)

    def linear_coefficients(self, params: TMEParams):
        """D and λ of O, G, X, L, B, A1, A2 for the spectral propagator (λ = 0 for O and L).

        Oxygen is listed for the fast block's layout only: it is in
        :attr:`stiff_fast`, so :meth:`react` diffuses it (D_O) with its local
        terms and the propagator leaves it alone. The species of
        :attr:`linear_source_species` meet their decay λ and their production
        (:meth:`linear_sources`) in the propagator, in one step with their
        diffusion; IL-2's decay stays with its production and uptake in the
        local step (:meth:`reaction_terms`).
        """
        p = params.model
        diffusivity = jnp.stack([p["D_O"], p["D_G"], p["D_X"], p["D_L"], p["D_B"], p["D_A"], p["D_A"]])
        no_decay = jnp.zeros_like(p["D_O"])
        produced = self._produced_in_propagator()
        decay = jnp.stack([p[LINEAR_DECAYS[symbol]] if symbol in produced else no_decay for symbol in FAST])
        return diffusivity, decay

    def linear_sources(self, state: State, params: TMEParams) -> jax.Array:
        """Production P (units/h) at ``state`` of the fast species of :attr:`linear_source_species`
        (G, X, B, A1, A2), 0 for O and L (MODEL.md, 'Key terms').

        Why here and not in :meth:`react`: a cytokine is made where the cells
        are (IFN-γ by engaged T cells, TGF-β by tumour and stroma) and spreads
        over many voxels in one step (D·Δt/h² ≈ 19 for TGF-β at 0.5 h and
        50 µm). Made in the local sub-step and spread in a separate one, that
        source carried a Strang splitting error of 20 % (relative L2) in TGF-β
        after 12 h at Δt = 0.5 h; made, decayed and spread in one exponential
        step (ETD1 for TGF-β, exact for its source, which the spectral step
        does not change; ETD2RK for IFN-γ and CXCL9/10: :func:`tmesolve.spectral.propagate`)
        it is below 1e-4 (``python -m benchmarks.cytokine_sources``,
        docs/model.md). IL-2 stays local (:data:`PRODUCED_IN_PROPAGATOR`).
        """
        u = self._unstack(state.fields)
        production, _, _ = self.local_terms(u, params, state.aux.systemic, state.time)
        zero = jnp.zeros_like(u["C"])
        produced = self._produced_in_propagator()
        return jnp.stack([production.get(symbol, zero) if symbol in produced else zero for symbol in FAST])

    # --- local terms ----------------------------------------------------------
    def local_terms(self, u: dict[str, jax.Array], params: TMEParams, systemic: SystemicState,
                    time: jax.Array):
        """Production P ≥ 0 and per-capita loss Λ ≥ 0 of every field (MODEL.md, 'Key terms').

        Returns (production, loss, extras) by field symbol, where extras holds
        the rates the systemic compartment needs (killing, extravasation) per
        voxel. A field without a term is absent from ``production`` or ``loss``
        (zero by construction): the reaction step leaves a field alone that is
        absent from both once the propagator has taken its terms
        (:meth:`_reacting_terms`), so a model that gives a field a term needs only
        add it here.
        """
        p = params.model
        K_max = p["K_max"]
        C, N_, T, E, O = u["C"], u["N"], u["T"], u["E"], u["O"]
        G, X, L, B, P_ = u["G"], u["X"], u["L"], u["B"], u["P"]
        V, S, a = u["V"], u["S"], u["a"]
        f_spec = _per_lesion(p["f_spec"])
        T_star = f_spec * T

        occupancy = plasma_occupancy(systemic, p, params.schedule.pk)   # (3,) PD1, PDL1, CTLA4
        plasma = plasma_concentration(systemic, params.schedule.pk)
        theta_1 = u["A1"] / (u["A1"] + p["K_D_PD1"])
        theta_2 = u["A2"] / (u["A2"] + p["K_D_PDL1"])
        theta = 1.0 - (1.0 - theta_1) * (1.0 - theta_2)
        engagement_density = p["rho_PDL1"] * P_ * (1.0 - theta_1) * (1.0 - theta_2)
        H_PD = _hill(engagement_density, p["Q_50"], p["n_PD"])
        phi_PD = 1.0 - H_PD
        phi_B = 1.0 / (1.0 + B / p["K_B"])
        phi_O = O / (O + p["K_O"])
        hypoxic = _hill(p["O_n"], O, p["n_hyp"])   # O_nⁿ/(O_nⁿ + Oⁿ)
        engagement = a * C / (C + p["K_C"])
        crowding = (C + N_ + T + E) / K_max
        room = jnp.maximum(1.0 - crowding, 0.0)
        entry_crowding = 1.0 - p["c_crowd"] * jnp.minimum(crowding, 1.0)
        steroid = steroid_effector_factor(systemic, p)
        lymphodepletion, _ = lymphodepletion_factor(systemic, params.schedule, p)

        kill_per_tumour_cell = (p["k_kill"] * a / (C + p["K_C"]) * phi_PD * phi_B * phi_O * T_star * steroid)
        killing = kill_per_tumour_cell * C
        extravasation = (p["k_in"] * V * systemic.T_b * (p["alpha_0"] + p["alpha_X"] * X / (X + p["K_X"]))
                         / (1.0 + B / p["K_Bm"]) * entry_crowding)
        expansion = (p["r_T"] * lymphodepletion * L / (L + p["K_L"]) * engagement * phi_B * T_star * room * steroid)
        activity = engagement * phi_PD * T_star * steroid   # cytokine-releasing engaged cells

        production = {
            "C": _per_lesion(p["r_C"]) * phi_O * C * room,
            "N": p["k_nec"] * hypoxic * C,
            "T": extravasation + expansion + p["k_re"] * theta * E,
            "E": p["k_ex"] * H_PD * engagement * T_star,
            "O": _oxygen_supply(u, p) * p["O_b"],
            "G": p["p_G"] * activity,
            "X": ((_per_lesion(p["p_X0"]) + p["p_X"] * G / (G + p["K_GX"])) * (C / K_max + p["s_X"] * S)
                  + p["p_X"] * p["x_h"] * G / (G + p["K_GX"])),
            "L": p["p_L"] * activity,
            "B": _per_lesion(p["p_B"]) * C / K_max + _per_lesion(p["p_BS"]) * S,
            "P": (_per_lesion(p["P_0"]) + (_per_lesion(p["P_max"]) - _per_lesion(p["P_0"])) * G / (G + p["K_GP"]))
            / p["tau_P"],
            "A1": p["k_A"] * V * plasma[0],
            "A2": p["k_A"] * V * plasma[1],
            # Stromal upkeep by TGF-β-activated fibroblasts (off unless k_S > 0).
            "S": _per_lesion(p["k_S"]) * B / (B + p["K_BS"]) * jnp.maximum(1.0 - S, 0.0),
        }
        loss = {
            "C": kill_per_tumour_cell + p["k_nec"] * hypoxic,
            "N": jnp.broadcast_to(p["lambda_N"], C.shape),
            "T": p["k_ex"] * H_PD * engagement * f_spec + p["delta_T"],
            "E": p["k_re"] * theta + p["delta_E"],
            "O": _oxygen_supply(u, p) + p["lambda_O"] + _oxygen_uptake_capacity(u, p) / (O + p["K_Ou"]),
            "L": p["u_L"] * (T + E) / (L + p["K_L"]),
            "P": jnp.broadcast_to(1.0 / p["tau_P"], C.shape),
            "A1": p["k_A"] * V,
            "A2": p["k_A"] * V,
            "S": jnp.where(_per_lesion(p["k_S"]) > 0, p["lambda_S"], 0.0) * jnp.ones_like(S),
        }
        extras = {"killing": killing, "extravasation": extravasation, "occupancy": occupancy}
        return production, loss, extras

    def reaction_terms(self, fields: jax.Array, params: TMEParams, systemic: SystemicState,
                       time: jax.Array) -> tuple[jax.Array, jax.Array, SystemicInputs]:
        """Stacked production P and loss Λ of every field for the local sub-step, and
        the lesions' fluxes into the systemic compartment, from one evaluation of
        :meth:`local_terms`.

        The production and constant decay of :attr:`linear_source_species`
        are left out (the propagator has them: :meth:`linear_sources`,
        :meth:`linear_coefficients`), and so is oxygen, which :meth:`react`
        advances with its diffusion. IL-2's decay joins its production and
        uptake here.
        """
        u = self._unstack(fields)
        production, loss, inputs = self._reacting_terms(u, params, systemic, time)
        zero = jnp.zeros_like(u["C"])
        symbols = self.species_symbols()
        return (jnp.stack([production.get(symbol, zero) for symbol in symbols]),
                jnp.stack([loss.get(symbol, zero) for symbol in symbols]), inputs)

    def reacting_symbols(self, production: dict, loss: dict) -> tuple[str, ...]:
        """Symbols, in species order, of the fields with a term in :meth:`_reacting_terms`'s
        ``production`` or ``loss`` (static: the dicts' keys): the fields the local step changes."""
        return tuple(symbol for symbol in self.species_symbols() if symbol in production or symbol in loss)

    def _reacting_terms(self, u: dict[str, jax.Array], params: TMEParams, systemic: SystemicState,
                        time: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array], SystemicInputs]:
        """:meth:`reaction_terms` by field symbol, a field without a term absent.

        Why not stacked: XLA's CPU backend writes a stack of sixteen fields as
        sixteen buffers and one more copy (a concatenation it does not fuse): a
        stack of sixteen scaled rows took 4.3–5.1× the same scaling of the stacked
        array (``python -m benchmarks.cpu_patterns``, 16 × 128³). :meth:`react`
        updates the fields that have terms one by one and stacks all of them
        once per sub-step.
        """
        production, loss, extras = self.local_terms(u, params, systemic, time)
        produced = self._produced_in_propagator()
        stiff = {SYMBOL_BY_NAME[name] for name in self.stiff_fast}
        # The propagator makes its species (the antibodies keep their uptake by
        # vessels here); IL-2's decay, and any fast species' the propagator does
        # not produce, joins its local loss; the stiff species react with their
        # diffusion (oxygen: react's own solve).
        production = {symbol: rate for symbol, rate in production.items()
                      if symbol not in produced and symbol not in stiff}
        loss = {symbol: rate for symbol, rate in loss.items() if symbol not in stiff}
        for symbol, decay in LINEAR_DECAYS.items():
            if symbol not in produced and symbol not in stiff:
                loss[symbol] = loss.get(symbol, jnp.zeros_like(u[symbol])) + params.model[decay]
        return production, loss, self._systemic_inputs(u, extras, params)

    def oxygen_local_terms(self, fields: jax.Array, params: TMEParams) -> tuple[jax.Array, jax.Array]:
        """Oxygen's local rate f(O) (mmHg/h) and its derivative (1/h) at ``fields`` (MODEL.md, oxygen):

            f(O) = k_V V (O_b − O) − λ_O O − (u_C C + u_T (T + E)) O/(O + K_Ou)
            ∂f/∂O = −k_V V − λ_O − (u_C C + u_T (T + E)) K_Ou/(O + K_Ou)²

        the same terms as :meth:`local_terms` (production k_V V O_b, per-capita loss
        k_V V + λ_O + uptake/(O + K_Ou)), which :meth:`reaction_terms` leaves out
        for oxygen; a negative O counts as 0.
        """
        return self._oxygen_local_terms(self._unstack(fields), params)

    def _oxygen_local_terms(self, u: dict[str, jax.Array], params: TMEParams) -> tuple[jax.Array, jax.Array]:
        """:meth:`oxygen_local_terms` of the fields by symbol."""
        p = params.model
        oxygen = jnp.maximum(u["O"], 0.0)
        supply, capacity = _oxygen_supply(u, p), _oxygen_uptake_capacity(u, p)
        saturation = oxygen + p["K_Ou"]
        local = supply * (p["O_b"] - oxygen) - p["lambda_O"] * oxygen - capacity * oxygen / saturation
        derivative = -(supply + p["lambda_O"] + capacity * p["K_Ou"] / saturation**2)
        return local, derivative

    def oxygen_rate(self, fields: jax.Array, params: TMEParams) -> tuple[jax.Array, jax.Array, jax.Array]:
        """∂O/∂t = D_O Δ_h O + f(O) (mmHg/h), f(O) and ∂f/∂O (1/h) at ``fields`` (:meth:`oxygen_local_terms`)."""
        return self._oxygen_rate(self._unstack(fields), params)

    def _oxygen_rate(self, u: dict[str, jax.Array], params: TMEParams) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:meth:`oxygen_rate` of the fields by symbol."""
        local, derivative = self._oxygen_local_terms(u, params)
        diffusion = _per_lesion(params.model["D_O"]) * diffusion_rate(u["O"], 1.0, self.grid.spacing_um)
        return diffusion + local, local, derivative

    def _systemic_inputs(self, u, extras, params) -> SystemicInputs:
        """Antigen flux to the lymph node and extravasation from blood, summed over lesions (cells/h)."""
        p = params.model
        voxel_mm3 = self.grid.voxel_volume_mm3
        scale = params.volume_scale
        per_lesion_antigen = jnp.sum(extras["killing"] + p["s_sh"] * u["a"] * u["C"], axis=(1, 2, 3)) * voxel_mm3
        # Only the lesion part of the box stands for the represented lesion: host
        # tissue around it is counted once, the tumour (C + N above the detection
        # level, with a linear ramp below it) is scaled by the represented volume.
        lesion_part = jnp.clip((u["C"] + u["N"]) / (p["detect_frac"] * p["K_max"]), 0.0, 1.0)
        entry = extras["extravasation"]
        lesion_entry = jnp.sum(entry * lesion_part, axis=(1, 2, 3)) * voxel_mm3
        host_entry = jnp.sum(entry * (1.0 - lesion_part), axis=(1, 2, 3)) * voxel_mm3
        # Padding copies weigh 0; the patient's lesions weigh exactly 1 (x·1 = x in
        # floating point), so a padded patient's fluxes equal its unpadded ones.
        weight = params.lesion_weight
        return SystemicInputs(antigen_flux=jnp.sum(per_lesion_antigen * scale * weight),
                              extravasation=jnp.sum((lesion_entry * scale + host_entry) * weight))

    def react(self, state: State, params: TMEParams, dt: jax.Array) -> State:
        """Local terms, oxygen with its diffusion, and the systemic compartment over dt,
        coupled at second order.

        The positive exponential Heun scheme (:func:`positive_exponential_heun`)
        with the systemic state moved along: the predictor uses the systemic
        state at t, the corrector the predicted one at t + dt, and the systemic
        step takes the mean of the lesions' fluxes at both ends. Oxygen, whose
        uptake is too stiff to split from its diffusion, takes the two stages of
        ROS2 (:mod:`tmesolve.implicit`) on the same stage states, with the cells'
        change over the step as its time dependence (F_t ≈ (F(Oⁿ; cells¹) −
        F(Oⁿ; cellsⁿ))/Δt, cells¹ the predicted cells) and J frozen at the start:

            (I − γΔt J) k₁ = F(Oⁿ; cellsⁿ) + γΔt F_t,            O¹ = max(Oⁿ + Δt k₁, 0)
            (I − γΔt J) k₂ = F(O¹; cells¹) − 2k₁ − γΔt F_t,      Oⁿ⁺¹ = max(Oⁿ + Δt(3/2 k₁ + 1/2 k₂), 0)

        ROS2 is second order for any J and F_t (a W-method), so the pair is a
        second-order coupled scheme; it is L-stable, so oxygen lands on its
        quasi-steady diffusion profile at any Δt, and with F_t it follows that
        profile as the cells move instead of lagging it by 0.7Δt. The two stages
        are one loop body (the local terms at the stage's state, the predictor or
        the corrector, then one oxygen solve), so XLA compiles them once; the
        loop carry materialises the predictor, which XLA would otherwise
        recompute inside every use.
        """
        systemic0 = state.aux.systemic
        pk = params.schedule.pk
        # The stage states are fields by symbol, stacked once at the end: a
        # field the local terms do not change is carried, not copied
        # (:meth:`_reacting_terms` says why).
        fields0 = self._unstack(state.fields)
        # Which fields have terms is static (the dicts' keys): read it off a trace of the terms.
        production_shapes, loss_shapes, _ = jax.eval_shape(self._reacting_terms, fields0, params, systemic0,
                                                           state.time)
        reacting = self.reacting_symbols(production_shapes, loss_shapes)
        oxygen0 = fields0["O"]
        gamma_dt = ROS2_GAMMA * dt
        diffusion_coefficient = gamma_dt * _per_lesion(params.model["D_O"])
        tolerance = SOLVE_TOLERANCE[jnp.dtype(state.fields.dtype)]
        enough = stage_residual_enough(oxygen0, dt, tolerance)

        @jax.named_scope("predictor")
        def predictor(stage_terms, carry: _ReactionCarry) -> _ReactionCarry:
            production, loss, inputs, oxygen_rate0, local0, derivative0 = stage_terms
            # Oxygen has no local terms here (_reacting_terms), so it stays at Oⁿ, and
            # only the local part of F changes with the cells: γΔt·F_t from it alone.
            fields = dict(fields0)
            for symbol in reacting:
                fields[symbol] = _frozen_exponential(fields0[symbol], production.get(symbol, 0.0),
                                                     loss.get(symbol, 0.0), dt)
            local_moved_cells, _ = self._oxygen_local_terms(fields, params)
            time_term = ROS2_GAMMA * (local_moved_cells - local0)
            return _ReactionCarry(
                fields=fields, systemic=systemic_step(systemic0, inputs, params.model, pk, state.time, dt),
                production0=production, loss0=loss, inputs0=inputs, oxygen_step1=carry.oxygen_step1,
                oxygen_shift=1.0 + gamma_dt * jnp.maximum(-derivative0, 0.0), oxygen_time_term=time_term,
                oxygen_right_hand_side=oxygen_rate0 + time_term)

        @jax.named_scope("corrector")
        def corrector(stage_terms, carry: _ReactionCarry) -> _ReactionCarry:
            production1, loss1, inputs1, oxygen_rate1, _, _ = stage_terms
            fields = dict(fields0)
            for symbol in reacting:
                fields[symbol] = exponential_trapezoid(
                    fields0[symbol], carry.production0.get(symbol, 0.0), carry.loss0.get(symbol, 0.0),
                    production1.get(symbol, 0.0), loss1.get(symbol, 0.0), dt)
            # Extravasation is proportional to T_b; the systemic step applies it as a
            # loss rate J/(V_blood·T_b(t)), so average the clearance J/T_b (µL/h), not J,
            # or the coupling drops to first order.
            clearance0 = carry.inputs0.extravasation / jnp.maximum(systemic0.T_b, 1e-30)
            clearance1 = inputs1.extravasation / jnp.maximum(carry.systemic.T_b, 1e-30)
            mean_inputs = SystemicInputs(antigen_flux=0.5 * (carry.inputs0.antigen_flux + inputs1.antigen_flux),
                                         extravasation=0.5 * (clearance0 + clearance1) * systemic0.T_b)
            systemic = systemic_step(systemic0, mean_inputs, params.model, pk, state.time, dt)
            right_hand_side = oxygen_rate1 - 2.0 * carry.oxygen_step1 - carry.oxygen_time_term
            return carry._replace(fields=fields, systemic=systemic, oxygen_right_hand_side=right_hand_side)

        def stage(index, carry: _ReactionCarry) -> _ReactionCarry:
            stage_time = state.time + index.astype(dt.dtype) * dt
            # The named scopes label the kernels for `python -m benchmarks.profile_step`.
            with jax.named_scope("local_terms"):
                terms = self._reacting_terms(carry.fields, params, carry.systemic, stage_time)
                terms = terms + self._oxygen_rate(carry.fields, params)
            first = index == 0
            carry = jax.lax.cond(first, predictor, corrector, terms, carry)
            # k₂ ≈ −k₁ both where oxygen is slow (k₂ ≈ F − 2k₁) and where it is stiff
            # (k₂ → −Ȯ): a start that saves about one iteration in two. (Starting k₁
            # from the last step's k₁, carried in the state, saved under one in ten.)
            guess = jnp.where(first, 0.0, -carry.oxygen_step1)
            with jax.named_scope("oxygen_solve"):
                oxygen_step, _ = solve_screened_poisson(self.oxygen_basis, carry.oxygen_shift, diffusion_coefficient,
                                                        carry.oxygen_right_hand_side, tolerance, enough=enough,
                                                        guess=guess)
            oxygen_step1 = jnp.where(first, oxygen_step, carry.oxygen_step1)
            increment = jnp.where(first, oxygen_step, 1.5 * oxygen_step1 + 0.5 * oxygen_step)
            oxygen = jnp.where(dt > 0, jnp.maximum(oxygen0 + dt * increment, 0.0), oxygen0)
            return carry._replace(fields={**carry.fields, "O": oxygen}, oxygen_step1=oxygen_step1)

        dtype = state.fields.dtype
        no_inputs = SystemicInputs(antigen_flux=jnp.zeros((), dtype), extravasation=jnp.zeros((), dtype))
        zero_field = jnp.zeros_like(oxygen0)
        start = _ReactionCarry(fields=fields0, systemic=systemic0,
                               production0={symbol: zero_field for symbol in production_shapes},
                               loss0={symbol: zero_field for symbol in loss_shapes},
                               inputs0=no_inputs, oxygen_step1=zero_field,
                               oxygen_shift=jnp.ones_like(oxygen0), oxygen_time_term=zero_field,
                               oxygen_right_hand_side=zero_field)
        end = jax.lax.fori_loop(0, 2, stage, start, unroll=self.unroll_stages)
        fields, systemic = self._stack(end.fields), end.systemic
        fields = self._extinction(fields, params)
        return replace(state, fields=fields, aux=replace(state.aux, systemic=systemic))

    def _extinction(self, fields, params):
        """A lesion with fewer than n_ext represented viable cells is eradicated (C = 0)."""
        index = self.index("tumour_cells")
        burden = jnp.sum(fields[index], axis=(1, 2, 3)) * self.grid.voxel_volume_mm3 * params.volume_scale
        alive = (burden >= params.model["n_ext"])[:, None, None, None]
        return fields.at[index].set(jnp.where(alive, fields[index], 0.0))

    def apply_events(self, state, params, t0, t1):
        """Doses and infusions due at or before the step's start (applied once each)."""
        aux = state.aux
        systemic = apply_events(aux.systemic, params.schedule, aux.events_applied_until, t0, params.model)
        return replace(state, aux=replace(aux, systemic=systemic, events_applied_until=jnp.asarray(t0, t0.dtype)))

    # --- transport ------------------------------------------------------------
    def _motility(self, u, p):
        """m(S, B) = (1 − s_m·S)₊/(1 + B/K_Bm): stroma and TGF-β slow T cells.

        The positive part is not in MODEL.md, whose S is a fraction in [0, 1]. The
        stroma map moves with the tissue, and where the tissue converges (a lesion
        shrinking under killing) it rises above 1; past 1/s_m the factor turned
        negative, and the Itô flux −∇(μu) with μ < 0 ran uphill: the exhausted
        T cells next to such a voxel went negative and, with T, grew without
        bound (a melanoma trial with k_kill = 0.6 stalled at a 0.007 h step).
        A voxel that full of stroma stops T cells; it cannot pull them.
        """
        return jnp.maximum(1.0 - p["s_m"] * u["S"], 0.0) / (1.0 + u["B"] / p["K_Bm"])

    def _chemotactic_velocities(self, u, p):
        chi = p["chi_0"] / (1.0 + u["X"] / p["K_chi"]) ** 2 * self._motility(u, p)
        return gradient_face_velocities(u["X"], chi, self.grid.spacing_um)

    def _non_advective_rates(self, u, p, chemotaxis):
        h = self.grid.spacing_um
        motility = p["D_T"] * self._motility(u, p)
        rates = {
            "C": diffusion_rate(u["C"], p["D_C"], h),
            "T": ito_motility_rate(u["T"], motility, h) + _advect_no_flux(u["T"], chemotaxis, h),
            "E": ito_motility_rate(u["E"], motility, h),
        }
        return rates

    def _pressure_velocities(self, u, params, non_advective, production_net):
        """Tissue velocity v = −∇p from K_max∇·v = Γ − ∇·ΣJ + (Σphases − K_max)/τ_r, p = 0 on the walls.

        The relaxation term has the sign that makes the mixture error decay:
        with it, ∂Σ/∂t = −(Σ − K_max)/τ_r where Σ ≈ K_max. (MODEL.md writes
        −(Σ − K_max)/τ_r, which makes the error grow as e^{t/τ_r}: a run blew up
        within a week; recorded in docs/model.md.)
        """
        p = params.model
        total = sum(u[s] for s in PHASES)
        divergence_v = (production_net + sum(non_advective.values()) + (total - p["K_max"]) / p["tau_r"]) / p["K_max"]
        # ∇·v = −Δp  ⇒  Δp = −∇·v.
        pressure = solve_poisson(self.pressure_basis, -divergence_v)
        h = self.grid.spacing_um
        interior, walls = [None, None, None], [(None, None)] * 3
        for axis in range(3):
            ax = _spatial_axis(pressure, axis)
            if pressure.shape[ax] == 1:
                continue
            interior[axis] = -forward_difference(pressure, axis) / h
            low = _slice(pressure, ax, 0, 1)
            high = _slice(pressure, ax, -1, None)
            walls[axis] = (-(low - 0.0) / (0.5 * h), -(0.0 - high) / (0.5 * h))
        return interior, walls

    def _net_phase_production(self, u, params, systemic, time):
        production, loss, _ = self.local_terms(u, params, systemic, time)
        return sum(production[s] - loss[s] * u[s] for s in ("C", "N", "T", "E"))

    def _moving_block(self) -> tuple[int, int]:
        """(first, stop) species indices of the cell-transported fields, a contiguous block."""
        indices = sorted(self.index(name) for name in (s.name for s in SPECIES if s.symbol in CELL_TRANSPORTED))
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise AssertionError("the cell-transported species must be contiguous in the species order")
        return indices[0], indices[-1] + 1

    def _transport_rates(self, fields: jax.Array, params: TMEParams, systemic: SystemicState,
                         time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """∂/∂t of every field by cell transport (zero for the fields it does not move)
        and the largest face speed Σ_axes max|w| (µm/h) of the cells.

        The tissue velocity advects the eight moving fields as one stacked block
        (one stencil program over (8, lesions, nx, ny, nz) instead of eight: an
        eighth of the code XLA compiles for it); motility and chemotaxis add to
        their rows. All sixteen rates are returned, zeros included: on CPUs XLA
        runs the RK stages over the whole stacked array faster than over the
        block alone (a slice and an in-place update measured 1.6× slower).
        """
        p = params.model
        h = self.grid.spacing_um
        u = self._unstack(fields)
        first, stop = self.moving_block
        moving = fields[first:stop]
        symbols = self.species_symbols()[first:stop]
        # The named scopes label the kernels for `python -m benchmarks.profile_step`.
        with jax.named_scope("chemotaxis"):
            chemotaxis = self._chemotactic_velocities(u, p)
        # The barrier materialises the motility and chemotaxis rates, one field each: they
        # are read twice (their rows and the pressure's right-hand side), and XLA's CPU
        # backend otherwise wrote their shifted face differences as separate buffers
        # (`subtract_pad` kernels): 410 → 360 transport kernels and 459 → 394 kernel-ms
        # per step at 1 × 128³ (`python -m benchmarks.profile_step`, docs/performance.md).
        with jax.named_scope("motility"):
            non_advective = jax.lax.optimization_barrier(self._non_advective_rates(u, p, chemotaxis))
        speed = max_face_speed(chemotaxis).astype(fields.dtype)
        if self.tissue_velocity:
            with jax.named_scope("pressure"):
                production_net = self._net_phase_production(u, params, systemic, time)
                interior, walls = self._pressure_velocities(u, params, non_advective, production_net)
            wall_speed = jnp.max(jnp.stack([jnp.max(jnp.abs(w)) for pair in walls for w in pair if w is not None]
                                           + [jnp.zeros((), fields.dtype)]))
            speed = speed + max_face_speed(interior).astype(fields.dtype) + wall_speed
            # Tissue entering through a wall is host tissue (H = K_max) with the
            # host vessel density; every other field enters at its wall cell's value.
            host_inflow = {"H": p["K_max"], "V": _per_lesion(params.host_vessels)}
            inflow = jnp.stack([jnp.broadcast_to(jnp.asarray(host_inflow.get(symbol, 0.0), fields.dtype),
                                                 (self.lesions, 1, 1, 1)) for symbol in symbols])
            enters_as_host = np.array([symbol in host_inflow for symbol in symbols])[:, None, None, None, None]
            with jax.named_scope("advection"):
                advective = _advect_open(moving, interior, walls, h, inflow, enters_as_host)
        else:
            advective = jnp.zeros_like(moving)
        rows = [advective[row] + non_advective[symbol] if symbol in non_advective else advective[row]
                for row, symbol in enumerate(symbols)]
        moving_rates = jnp.stack(rows)
        pad = [(first, fields.shape[0] - stop)] + [(0, 0)] * (fields.ndim - 1)
        return jnp.pad(moving_rates, pad), speed

    def transport(self, state: State, params: TMEParams, dt: jax.Array) -> State:
        """Explicit cell transport over dt by SSP-RK2 (Heun), a convex combination of
        Euler steps, positive whenever Euler is:

            u¹ = u + dt L(u);   u⁺ = ½u + ½(u¹ + dt L(u¹))

        Records the larger face speed of the two stages for the next step's dt.
        """
        fields = state.fields
        systemic, time = state.aux.systemic, state.time
        # Both stages are u ← k·u⁰ + (1 − k)(u + dt L(u)), k = 0 then ½: one loop body
        # traced and compiled once (half the program), and the loop carry materialises
        # the first stage, which XLA would otherwise fuse into the second and
        # recompute for every neighbour the stencil reads.
        kept_fraction = jnp.asarray([0.0, 0.5], fields.dtype)

        def stage(index, carry):
            current, speed = carry
            rate, stage_speed = self._transport_rates(current, params, systemic, time)
            kept = kept_fraction[index]
            return kept * fields + (1.0 - kept) * (current + dt * rate), jnp.maximum(speed, stage_speed)

        start = (fields, jnp.zeros((), fields.dtype))
        fields, speed = jax.lax.fori_loop(0, 2, stage, start, unroll=self.unroll_stages)
        aux = replace(state.aux, transport_speed=speed)
        return replace(state, fields=fields, aux=aux)

    def for_batches(self) -> TMEModel:
        """This model with unrolled stages (:attr:`unroll_stages`) for a vmapped integrator."""
        batched = copy.copy(self)
        batched.unroll_stages = True
        return batched

    def begin_interval(self, state: State, params: TMEParams) -> State:
        """Measure the transport speed of the state the interval starts from."""
        _, speed = self._transport_rates(state.fields, params, state.aux.systemic, state.time)
        return replace(state, aux=replace(state.aux, transport_speed=speed))

    def stable_dt(self, state: State, params: TMEParams) -> jax.Array:
        """Diffusion limit of the T cells and tumour cells, and the advective CFL.

        The face speed is the one the last transport stage measured (or the
        interval's start state): recomputing it here would cost a Poisson solve
        and the local terms once more per step. Speeds change little over one
        step. Under Strang splitting each transport sub-step runs dt/2 against a
        limit set for dt, a margin of two; under Lie splitting only the solver's
        safety factor (default 0.9) covers the lag.
        """
        p = params.model
        max_diffusivity = jnp.maximum(p["D_T"], p["D_C"])
        return explicit_stable_dt(self.grid.spacing_um, self.grid.ndim, max_diffusivity,
                                  state.aux.transport_speed).astype(state.fields.dtype)

    # --- readouts -------------------------------------------------------------
    def readouts(self, state: State, params: TMEParams) -> dict[str, jax.Array]:
        from tmesolve.readouts import tme_readouts

        return tme_readouts(self, state, params)


def _advect_no_flux(u, velocities, h):
    fluxes = [None, None, None]
    for axis in range(3):
        if velocities[axis] is not None:
            fluxes[axis] = upwind_flux(u, velocities[axis], axis)
    return divergence(fluxes, h, shape_like=u)


def _advect_open(u, interior, walls, h, inflow, enters_as_host):
    """−∇·(u v) with open walls for a stack of fields u (fields, lesions, nx, ny, nz):
    outflow carries the wall cell out; inflow brings ``inflow`` (fields, lesions, 1, 1, 1)
    where ``enters_as_host`` (fields, 1, 1, 1, 1) is set, else the wall cell's own
    value (zero gradient)."""
    fluxes = [None, None, None]
    for axis in range(3):
        if interior[axis] is None:
            continue
        ax = _spatial_axis(u, axis)
        low_v, high_v = walls[axis]
        low_cell, high_cell = _slice(u, ax, 0, 1), _slice(u, ax, -1, None)
        # Positive velocity points +axis: at the low wall that is inflow, at the high wall outflow.
        low_flux = jnp.where(low_v > 0, low_v * jnp.where(enters_as_host, inflow, low_cell), low_v * low_cell)
        high_flux = jnp.where(high_v > 0, high_v * high_cell, high_v * jnp.where(enters_as_host, inflow, high_cell))
        fluxes[axis] = upwind_flux(u, interior[axis], axis, wall_fluxes=(low_flux, high_flux))
    return divergence(fluxes, h, shape_like=u)
