"""Where the fast species' production goes: the model's scheme against the two it replaced.

    python -m benchmarks.cytokine_sources [--hours 12] [--out benchmarks/results/cytokine-sources.json]

TMEModel hands the production P of IFN-γ, CXCL9/10 and TGF-β to the spectral
step together with their diffusion and decay λ (``TMEModel.linear_sources``,
``tmesolve.model.tme.PRODUCED_IN_PROPAGATOR``), which integrates IFN-γ and
CXCL9/10, whose production depends on fast species, by ETD2RK (the source
at the start of the step and at an ETD1 prediction of its end,
:func:`tmesolve.spectral.propagate`) and TGF-β by ETD1. IL-2 (stiff uptake
by T cells) and the antibodies stay local. Two schemes defined here, as
subclasses (so the compiled-loop cache does not apply to them), are what it
replaced or could have been:

* ``split`` (:class:`ProductionInReactions`, the model's scheme up to commit
  a94f15e): P and λ of every fast species act in the local (reaction)
  sub-step and the diffusion in the spectral one. With D·Δt/h² ≈ 19 (TGF-β
  at 0.5 h and 50 µm) the splitting error of a sharply placed source is large.
* ``etd1`` (:class:`FrozenProduction`): as the model, but every production
  held at its value at the start of the spectral step. Exact for a constant
  source; where P depends on a fast species (CXCL9/10 on IFN-γ, IFN-γ on the
  antibodies) the sub-step is first order, and so is the whole scheme (the
  well-mixed check of ``tests/model/test_tme_local.py`` fails with it).

The default lesion (24³ × 50 µm, inflamed, r = 300 µm, pembrolizumab) runs
``--hours`` with ``solver.dt_max_h`` = 0.5 and 0.1 h under each scheme, and
each run is compared field by field with the 0.005 h run of the model's
scheme and of its own.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks import dt_convergence, write_json
from benchmarks.machine import machine_info
from tmesolve.model import tme

SHOWN = ("tgf_beta", "ifn_gamma", "il2", "cxcl9_10", "anti_pd1", "exhausted_t_cells", "effector_t_cells",
         "tumour_cells")
SCHEMES = ("model", "split", "etd1")


class ProductionInReactions(tme.TMEModel):
    """TMEModel as it was: the fast species' production and decay in the local sub-step."""

    def linear_coefficients(self, params):
        diffusivity, _ = super().linear_coefficients(params)
        return diffusivity, jnp.zeros_like(diffusivity)

    def linear_sources(self, state, params):
        return None

    def reaction_terms(self, fields, params, systemic, time):
        """The local terms with every fast species' production and decay, oxygen left out."""
        u = self._unstack(fields)
        production, loss, extras = self.local_terms(u, params, systemic, time)
        production, loss = dict(production), dict(loss)
        for symbol, decay in tme.LINEAR_DECAYS.items():
            loss[symbol] = loss[symbol] + params.model[decay]
        for symbol in tme.STIFF_FAST:
            production[symbol] = loss[symbol] = jnp.zeros_like(u[symbol])
        return self._stack(production), self._stack(loss), self._systemic_inputs(u, extras, params)


class FrozenProduction(tme.TMEModel):
    """TMEModel with every production held at its start-of-step value over the spectral step (ETD1)."""

    linear_sources_vary = False


MODEL_CLASSES = {"model": None, "split": ProductionInReactions, "etd1": FrozenProduction}


def run(dt_max_h: float, scheme: str, hours: float) -> dict:
    """The default lesion of :func:`benchmarks.dt_convergence.run` for ``hours`` at ``dt_max_h``."""
    result = dt_convergence.run(dt_max_h, duration_h=hours, model_class=MODEL_CLASSES[scheme])
    result["scheme"] = scheme
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--out", default="benchmarks/results/cytokine-sources.json")
    args = parser.parse_args(argv)
    finest = {scheme: run(0.005, scheme, args.hours) for scheme in SCHEMES}
    runs = [run(dt, scheme, args.hours) for dt in (0.5, 0.1) for scheme in SCHEMES]
    reference = finest["model"]["_fields"]
    for entry in runs + list(finest.values()):
        fields = entry["_fields"]
        own = finest[entry["scheme"]]["_fields"]
        entry["relative_l2_to_finest_model"] = {
            name: dt_convergence.relative_l2(fields[name], reference[name]) for name in fields}
        entry["relative_l2_to_finest_same_scheme"] = {
            name: dt_convergence.relative_l2(fields[name], own[name]) for name in fields}
    for entry in runs + list(finest.values()):
        del entry["_fields"]
    result = {"machine": machine_info(), "case": f"default lesion: 24^3 x 50 um, inflamed, r = 300 um, "
              f"pembrolizumab, {args.hours:g} h, plain Strang, float32", "finest": list(finest.values()),
              "runs": runs}
    print(f"relative L2 after {args.hours:g} h against the 0.005 h run of the model's scheme")
    print(f"{'dt_max h':>9} {'scheme':>7} {'wall s':>7} " + " ".join(f"{name:>17}" for name in SHOWN))
    for entry in runs + list(finest.values()):
        errors = entry["relative_l2_to_finest_model"]
        print(f"{entry['dt_max_h']:9g} {entry['scheme']:>7} {entry['wall_s']:7.1f} "
              + " ".join(f"{errors[name]:17.2e}" for name in SHOWN))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
