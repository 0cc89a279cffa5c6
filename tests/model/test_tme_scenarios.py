"""The TME model's biology, run as small batched virtual patients (10³ voxels of 60 µm).

Every scenario starts with a 2-week untreated lead-in (a lesion started near
packing settles with its vasculature; the RECIST baseline is the start of
therapy, as a baseline scan precedes treatment) followed by 12 weeks of
therapy. All patients of a batch share one compile (BatchIntegrator).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tmesolve.grid import Grid
from tmesolve.integrate import BatchIntegrator, make_solver_params, unstack_pytree
from tmesolve.model.tme_setup import LesionSpec, setup_tme, stack_setups
from tmesolve.recist import score_recist

LEAD_IN_H = 14 * 24.0
END_H = LEAD_IN_H + 12 * 7 * 24.0
RECORD_DAYS = (14, 35, 56, 77, 98)


def run_batch(grid, scenarios, record_days=RECORD_DAYS, end_h=END_H):
    """Run scenarios (phenotype, therapy, parameters, lesion overrides) together; readouts per day."""
    setups = [setup_tme(grid, [LesionSpec(phenotype, radius_um=0.3 * grid.lengths_um[0], **lesion)],
                        therapy=therapy, therapy_start_h=LEAD_IN_H, duration_h=end_h - LEAD_IN_H,
                        parameters=parameters)
              for phenotype, therapy, parameters, lesion in scenarios]
    model, params, state = stack_setups(setups)
    integrator = BatchIntegrator(model)
    solver = make_solver_params(1.0)  # T-cell motility limits dt to ≈ 0.9 h at 60 µm
    history = {}
    for day in record_days:
        state, readouts, diagnostics = integrator.advance(state, params, solver, day * 24.0)
        assert bool(np.all(np.asarray(diagnostics["finite"]))), day
        assert float(np.min(np.asarray(diagnostics["minimum"]))) >= -1e-3, day
        history[day] = {k: np.asarray(v) for k, v in readouts.items()}
    return history, state, params, integrator


def series(history, name, patient, lesion=0):
    values = [history[d][name][patient] for d in history]
    return np.asarray([v[lesion] if np.ndim(v) else v for v in values])


PRESETS = [("inflamed", "none"), ("inflamed", "pembrolizumab"), ("excluded", "none"),
           ("excluded", "pembrolizumab"), ("desert", "none"), ("desert", "pembrolizumab")]


@pytest.fixture(scope="session")
def presets():
    grid = Grid((10, 10, 10), 60.0)
    history, *_ = run_batch(grid, [(ph, th, {}, {}) for ph, th in PRESETS])
    return history


def index(phenotype, therapy):
    return PRESETS.index((phenotype, therapy))


@pytest.mark.parametrize("phenotype,code", [("inflamed", 0), ("excluded", 1), ("desert", 2)])
def test_each_preset_is_classified_as_named_at_day_14(presets, phenotype, code):
    """Untreated, day 14: core/margin CD8 density against τ = 140 cells/mm² (section equivalent)."""
    day14 = presets[14]
    assert int(day14["immunophenotype"][index(phenotype, "none")][0]) == code, (
        day14["cd8_core_section"][index(phenotype, "none")], day14["cd8_margin_section"][index(phenotype, "none")])


def test_hot_core_cd8_density_is_in_the_ihc_range(presets):
    """Inflamed cores show hundreds of CD8 cells/mm², desert ones tens (MODEL.md readouts)."""
    assert 140 <= presets[14]["cd8_core_section"][index("inflamed", "none")][0] <= 3000
    assert presets[14]["cd8_core_section"][index("desert", "none")][0] < 100


def test_pembrolizumab_response_orders_hot_excluded_desert(presets):
    """Week 12 of therapy: treated/untreated viable burden, hot < excluded < desert."""
    ratio = {ph: presets[98]["viable_burden"][index(ph, "pembrolizumab")][0]
             / presets[98]["viable_burden"][index(ph, "none")][0] for ph in ("inflamed", "excluded", "desert")}
    assert ratio["inflamed"] < ratio["excluded"] < ratio["desert"], ratio
    assert ratio["desert"] > 0.9, ratio   # a cold lesion barely responds


def recist(history, patient, name="burden_diameter_mm"):
    days = np.asarray(list(history), float)
    diameters = series(history, name, patient)[:, None]
    return score_recist(days * 24.0, diameters, days[1:] * 24.0, baseline_time_h=LEAD_IN_H)


def test_hot_lesion_responds_by_recist_and_the_desert_lesion_does_not(presets):
    """Sub-volume mode: RECIST reads the burden diameter d₀·(B/B₀)^{1/3} of the represented lesion."""
    hot = recist(presets, index("inflamed", "pembrolizumab"))
    cold = recist(presets, index("desert", "pembrolizumab"))
    assert hot.best_response in ("PR", "CR") and hot.best_percent_change <= -30, hot
    assert cold.best_response not in ("PR", "CR") and cold.best_percent_change > -30, cold


def test_anti_pd1_plasma_occupancy_at_trough_is_above_90_percent(presets):
    """Records at days 35, 56, 77 fall just before a pembrolizumab dose (q3w from day 14): troughs."""
    treated = index("inflamed", "pembrolizumab")
    troughs = [presets[d]["occupancy_pd1"][treated] for d in (35, 56, 77)]
    assert min(troughs) > 0.9, troughs
    assert presets[14]["occupancy_pd1"][index("inflamed", "none")] == 0.0


def test_ifn_gamma_raises_pd_l1(presets):
    """Adaptive resistance: the lesion with more IFN-γ expresses more PD-L1."""
    hot, cold = index("inflamed", "none"), index("desert", "none")
    assert presets[14]["mean_ifn_gamma"][hot][0] > 3 * presets[14]["mean_ifn_gamma"][cold][0]
    assert presets[14]["mean_pd_l1"][hot][0] > presets[14]["mean_pd_l1"][cold][0] + 0.02


THERAPIES = [("excluded", "none", {}, {}),
             ("excluded", "ipilimumab", {}, {}),
             ("excluded", "act", {}, {}),
             ("excluded", "nivolumab", {}, {}),
             ("excluded", "nivolumab_ipilimumab", {}, {}),
             ("excluded", "nivolumab_ipilimumab", {"k_R": 0.02}, {})]   # irAE-prone: management rule fires


@pytest.fixture(scope="session")
def therapies():
    grid = Grid((10, 10, 10), 60.0)
    history, state, params, _ = run_batch(grid, THERAPIES, record_days=(14, 28, 56, 98))
    return history, state


def test_anti_ctla4_raises_priming(therapies):
    """Ipilimumab boosts lymph-node priming: more blood effectors than no therapy."""
    history, _ = therapies
    assert history[56]["blood_effectors"][1] > 1.05 * history[56]["blood_effectors"][0]


def test_act_raises_t_cell_density_in_the_lesion(therapies):
    history, _ = therapies
    # 1e10 cells infused at day 14 (the start of therapy) into 5 L of blood.
    assert history[28]["cd8_core_density"][2][0] > 1.2 * history[28]["cd8_core_density"][0][0]


def test_irae_grade_higher_under_nivolumab_ipilimumab_than_nivolumab(therapies):
    history, _ = therapies
    assert history[98]["irae_index"][4] > history[98]["irae_index"][3]


def test_management_rule_holds_the_drugs_at_grade_3(therapies):
    """With an irAE-prone patient the index reaches grade ≥ 3: therapy is held, later doses skipped."""
    history, state = therapies
    prone = unstack_pytree(state, 5).aux.systemic
    assert max(history[d]["irae_grade"][5] for d in history) >= 3
    assert history[98]["therapy_held"][5] == 1.0
    assert float(prone.doses_skipped) > 0
    assert history[98]["therapy_held"][3] == 0.0   # nivolumab alone stays below grade 3


TMB_VALUES = (2.0, 6.0, 15.0, 30.0)


def test_response_is_monotone_in_tmb():
    """Higher TMB (antigenicity and priming) never responds worse: burden at week 12 non-increasing."""
    grid = Grid((10, 10, 10), 60.0)
    scenarios = [("excluded", "pembrolizumab", {}, {"tmb": tmb}) for tmb in TMB_VALUES]
    history, *_ = run_batch(grid, scenarios, record_days=(14, 98))
    burden = history[98]["viable_burden"][:, 0] / history[14]["viable_burden"][:, 0]
    assert np.all(np.diff(burden) <= 1e-3 * burden[:-1]), burden


def test_memory_clears_a_reseeded_lesion_faster_than_in_a_naive_patient():
    """After a response, memory T cells recall on re-challenge; a naive patient has none.

    Both patients get the same small re-seeded tumour; the experienced patient
    keeps its systemic state (memory, antigen depot cleared), the naive one
    starts from the untreated baseline without memory.
    """
    grid = Grid((10, 10, 10), 60.0)
    history, state, params, integrator = run_batch(grid, [("inflamed", "pembrolizumab", {}, {})] * 2,
                                                   record_days=(98,))
    experienced = unstack_pytree(state, 0).aux.systemic
    assert float(experienced.M) > 0.5
    naive = dataclasses.replace(experienced, M=experienced.M * 0.0, T_b=experienced.T_b * 0.1,
                                transit=experienced.transit * 0.0)
    seed = setup_tme(grid, [LesionSpec("inflamed", radius_um=120.0)]).state.fields
    model = integrator.model
    fields = np.array(state.fields)
    for name in ("tumour_cells", "host_phase"):
        fields[:, model.index(name)] = np.asarray(seed[model.index(name)])
    systemic = [experienced, naive]
    import jax
    import jax.numpy as jnp
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *systemic)
    restart = dataclasses.replace(state, fields=jnp.asarray(fields),
                                  aux=dataclasses.replace(state.aux, systemic=stacked))
    start = float(np.asarray(restart.time)[0])
    burden0 = np.asarray(restart.fields)[:, model.index("tumour_cells")].sum(axis=(1, 2, 3, 4))
    after, readouts, _ = integrator.advance(restart, params, make_solver_params(1.0), start + 21 * 24.0)
    burden = np.asarray(readouts["simulated_burden"])[:, 0] / burden0
    assert burden[0] < 0.8 * burden[1], burden


def test_one_year_three_lesion_patient_stays_finite_and_non_negative():
    """A year of nivolumab + ipilimumab for hot, excluded and cold lesions sharing one blood pool.

    8³ voxels of 100 µm per lesion keep this within the CI budget; the 32³ run of
    the issue is `python -m benchmarks.year_run` (results in benchmarks/results/year-run.json).
    """
    from tmesolve.integrate import Integrator

    grid = Grid((8, 8, 8), 100.0)
    setup = setup_tme(grid, [LesionSpec("inflamed", radius_um=250.0), LesionSpec("excluded", radius_um=250.0),
                             LesionSpec("desert", radius_um=250.0)], therapy="nivolumab_ipilimumab",
                      duration_h=365 * 24.0)
    integrator = Integrator(setup.model)
    state = setup.state
    for day in (91, 182, 273, 365):
        state, readouts, diagnostics = integrator.advance(state, setup.params, make_solver_params(2.0), day * 24.0)
        fields = np.asarray(state.fields)
        assert np.all(np.isfinite(fields)) and fields.min() >= -1e-3 * fields.max(), day
        assert np.all(np.isfinite(np.asarray(jax_leaves(state.aux))))


def jax_leaves(tree):
    import jax

    return np.concatenate([np.ravel(np.asarray(leaf, dtype=float)) for leaf in jax.tree_util.tree_leaves(tree)])
