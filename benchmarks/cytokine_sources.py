"""Where the fast species' production goes: the model's scheme against the others.

    python -m benchmarks.cytokine_sources [--hours 12] [--out benchmarks/results/cytokine-sources.json]

TMEModel hands the production P of IFN-γ, CXCL9/10, TGF-β and the two
antibodies to the spectral step together with their diffusion and decay λ
(``TMEModel.linear_sources``, ``TMEModel.linear_source_species``), which
integrates IFN-γ and CXCL9/10, whose production depends on fast species, by
ETD2RK (the source at the start of the step and at an ETD1 prediction of its
end, :func:`tmesolve.spectral.propagate`) and the others by ETD1. IL-2
(stiff uptake by T cells) stays local. The schemes compared, all subclasses
that only choose other species (so the compiled-loop cache does not apply
to them):

* ``model``: TMEModel as it is.
* ``split`` (the model up to commit a94f15e): every production and decay in
  the local (reaction) sub-step, split from the diffusion. With D·Δt/h² ≈ 19
  (TGF-β at 0.5 h and 50 µm) the splitting error of a sharply placed source
  is large.
* ``etd1``: the model's species, every production held at its start-of-step
  value over the spectral step. Exact for a constant source; where P depends
  on a fast species (CXCL9/10 on IFN-γ, IFN-γ on the antibodies) the sub-step
  is first order, and so is the whole scheme.
* ``il2_too``: IL-2's production in the spectral step as well, split from its
  uptake by T cells, which reaches ~6 h⁻¹ in a hot core.
* ``antibodies_local``: the antibodies' production and decay in the local
  step (IFN-γ, CXCL9/10 and TGF-β in the spectral one).

Two cases, each run with ``solver.dt_max_h`` = 0.5 and 0.1 h (and the hot
core also at 1 h, the cohort app's cap) and compared field by field
(relative L2) with a fine run of the model's scheme and of its own:

* the default lesion (24³ × 50 µm, inflamed, r = 300 µm, pembrolizumab) for
  ``--hours``; fine run 0.005 h;
* a hot core: uniform tissue (2 × 2 × 1 voxels of 400 µm, no tissue
  velocity) at the inflamed preset's centre values with 3e4 effector T cells
  per mm³, for 6 h, without a drug; fine run 0.01 h. Here a scheme's first
  or second order shows in the error ratio between 1 and 0.5 h.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import dt_convergence, write_json
from benchmarks.machine import machine_info
from tmesolve.model import tme

SHOWN = ("tgf_beta", "ifn_gamma", "il2", "cxcl9_10", "anti_pd1", "exhausted_t_cells", "effector_t_cells",
         "tumour_cells")
HOT_CORE_H = 6.0
HOT_CORE_T_CELLS = 3.0e4   # effector T cells per mm³: IL-2 uptake u_L(T + E)/K_L ≈ 6 h⁻¹


def _names(*symbols: str) -> tuple[str, ...]:
    return tuple(s.name for s in tme.SPECIES if s.symbol in symbols)


class ProductionInReactions(tme.TMEModel):
    """Every fast species' production and decay in the local sub-step (the model up to a94f15e)."""

    linear_source_species = ()
    linear_sources_vary = False


class FrozenProduction(tme.TMEModel):
    """The model's species, every production held at its start-of-step value (ETD1)."""

    linear_sources_vary = False


class IL2InPropagator(tme.TMEModel):
    """IL-2's production and decay in the spectral step too, its uptake local."""

    linear_source_species = _names("G", "X", "L", "B", "A1", "A2")
    linear_sources_vary = _names("G", "X", "L")


class AntibodiesLocal(tme.TMEModel):
    """The antibodies' production and decay in the local sub-step, beside their vessel exchange."""

    linear_source_species = _names("G", "X", "B")


MODEL_CLASSES = {"model": tme.TMEModel, "split": ProductionInReactions, "etd1": FrozenProduction,
                 "il2_too": IL2InPropagator, "antibodies_local": AntibodiesLocal}


def run(dt_max_h: float, scheme: str, hours: float) -> dict:
    """The default lesion of :func:`benchmarks.dt_convergence.run` for ``hours`` at ``dt_max_h``."""
    model_class = None if scheme == "model" else MODEL_CLASSES[scheme]
    result = dt_convergence.run(dt_max_h, duration_h=hours, model_class=model_class)
    result["scheme"] = scheme
    return result


def hot_core(dt_max_h: float, scheme: str) -> dict:
    """The uniform hot core for HOT_CORE_H at ``dt_max_h`` (float32); final fields under ``"_fields"``."""
    from tmesolve.grid import Grid
    from tmesolve.integrate import Integrator, make_solver_params
    from tmesolve.model.tme_setup import setup_uniform_tissue

    setup = setup_uniform_tissue(Grid((2, 2, 1), 400.0), fields={"effector_t_cells": HOT_CORE_T_CELLS},
                                 model_class=MODEL_CLASSES[scheme])
    state, _, diagnostics = Integrator(setup.model).advance(setup.state, setup.params,
                                                            make_solver_params(dt_max_h), HOT_CORE_H)
    values = np.asarray(state.fields, dtype=np.float64)[:, 0, 0, 0, 0]
    return {"dt_max_h": dt_max_h, "scheme": scheme, "steps": int(diagnostics["steps"]),
            "_fields": {name: values[i] for i, name in enumerate(setup.model.names)}}


def _compare(entries: list[dict], finest: dict, reference_scheme: str = "model") -> None:
    for entry in entries:
        fields = entry["_fields"]
        reference = finest[reference_scheme]["_fields"]
        own = finest[entry["scheme"]]["_fields"]
        entry[f"relative_l2_to_finest_{reference_scheme}"] = {
            name: dt_convergence.relative_l2(fields[name], reference[name]) for name in fields}
        entry["relative_l2_to_finest_same_scheme"] = {
            name: dt_convergence.relative_l2(fields[name], own[name]) for name in fields}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--out", default="benchmarks/results/cytokine-sources.json")
    args = parser.parse_args(argv)
    schemes = tuple(MODEL_CLASSES)
    finest = {scheme: run(0.005, scheme, args.hours) for scheme in schemes}
    runs = [run(dt, scheme, args.hours) for dt in (0.5, 0.1) for scheme in schemes]
    _compare(runs + list(finest.values()), finest)
    core_finest = {scheme: hot_core(0.01, scheme) for scheme in schemes}
    core_runs = [hot_core(dt, scheme) for dt in (1.0, 0.5, 0.1) for scheme in schemes]
    _compare(core_runs + list(core_finest.values()), core_finest)
    for entry in core_runs + list(core_finest.values()):
        # None where the model's fine value is 0 (the antibodies: no drug in the hot core).
        entry["value_over_finest_model"] = {
            name: float(value / core_finest["model"]["_fields"][name]) if core_finest["model"]["_fields"][name]
            else None for name, value in entry["_fields"].items()}
    for entry in runs + list(finest.values()) + core_runs + list(core_finest.values()):
        del entry["_fields"]
    result = {"machine": machine_info(),
              "case": f"default lesion: 24^3 x 50 um, inflamed, r = 300 um, pembrolizumab, {args.hours:g} h, "
                      f"plain Strang, float32; hot core: 2x2x1 x 400 um uniform, T = {HOT_CORE_T_CELLS:g}/mm^3, "
                      f"{HOT_CORE_H:g} h, no drug, float32",
              "finest": list(finest.values()), "runs": runs,
              "hot_core_finest": list(core_finest.values()), "hot_core_runs": core_runs}
    print(f"default lesion: relative L2 after {args.hours:g} h against the 0.005 h run of the model's scheme")
    print(f"{'dt_max h':>9} {'scheme':>15} {'wall s':>7} " + " ".join(f"{name:>17}" for name in SHOWN))
    for entry in runs + list(finest.values()):
        errors = entry["relative_l2_to_finest_model"]
        print(f"{entry['dt_max_h']:9g} {entry['scheme']:>15} {entry['wall_s']:7.1f} "
              + " ".join(f"{errors[name]:17.2e}" for name in SHOWN))
    print(f"hot core: relative error after {HOT_CORE_H:g} h against the 0.01 h run of the same scheme "
          "(IL-2 / the model's 0.01 h run in the last column)")
    core_shown = ("ifn_gamma", "cxcl9_10", "il2", "tgf_beta", "exhausted_t_cells")
    print(f"{'dt_max h':>9} {'scheme':>15} " + " ".join(f"{name:>17}" for name in core_shown) + f" {'IL-2 ratio':>11}")
    for entry in core_runs:
        errors = entry["relative_l2_to_finest_same_scheme"]
        row = " ".join(f"{errors[name]:17.2e}" for name in core_shown)
        print(f"{entry['dt_max_h']:9g} {entry['scheme']:>15} {row} {entry['value_over_finest_model']['il2']:11.3f}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
