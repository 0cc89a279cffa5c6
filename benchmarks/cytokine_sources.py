"""A prototype: the fast species' production inside the spectral step, against today's split.

    python -m benchmarks.cytokine_sources [--hours 12] [--out benchmarks/results/cytokine-sources.json]

TMEModel advances IFN-γ, CXCL9/10, IL-2, TGF-β and the two antibodies by
splitting: their production P and decay λ act in the local (reaction)
sub-step and their diffusion in the exact spectral sub-step. With
D·Δt/h² ≈ 19 (TGF-β at the default 0.5 h and 50 µm) the splitting error of a
sharply placed source is large: ``python -m benchmarks.dt_convergence``
finds TGF-β 20 % (relative L2) from a 0.005 h run after 12 h.

The prototype here (:class:`ProductionInPropagator`, a subclass defined in
this file, so the compiled-loop cache does not apply to it) hands the
production to the engine's existing source hook instead
(``Model.linear_sources``: S frozen over the transport sub-step, exact for a
constant S, ETD1) and moves the constant decays λ into the propagator with
it, so constant-in-time sources meet their decay and diffusion in one exact
step. What stays local is the spatially varying loss (IL-2 uptake by T
cells, antibody exchange with vessels). In Strang's R(Δt/2) L(Δt) R(Δt/2)
the source is taken at the state entering L, the middle of the step.

The default lesion (24³ × 50 µm, inflamed, r = 300 µm, pembrolizumab) runs
``--hours`` with ``solver.dt_max_h`` = 0.5 and 0.1 h both ways, and each run
is compared field by field with the 0.005 h run of *today's* scheme (and of
its own). Not the model's default: adopting it changes every result by up to
the step error it removes, so the documented calibration and trial figures
would all have to be rerun with it.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks import dt_convergence, write_json
from benchmarks.machine import machine_info
from tmesolve.model import tme

#: The fast species whose production and decay move into the propagator (oxygen stays stiff-local).
MOVED = tuple(tme.LINEAR_DECAYS)
SHOWN = ("tgf_beta", "ifn_gamma", "il2", "cxcl9_10", "anti_pd1", "exhausted_t_cells", "effector_t_cells",
         "tumour_cells")


class ProductionInPropagator(tme.TMEModel):
    """TMEModel with the fast species' production and constant decay in the spectral step."""

    def _fast_symbols(self) -> list[str]:
        by_name = {species.name: species.symbol for species in tme.SPECIES}
        return [by_name[species.name] for species in self.species][: self.num_fast]

    def linear_coefficients(self, params):
        """D as before; λ of the moved species now in the propagator (0 for oxygen)."""
        diffusivity, no_decay = super().linear_coefficients(params)
        p = params.model
        decay = [p[tme.LINEAR_DECAYS[symbol]] if symbol in MOVED else no_decay[index]
                 for index, symbol in enumerate(self._fast_symbols())]
        return diffusivity, jnp.stack(decay)

    def linear_sources(self, state, params):
        """P (units/h) of the moved species at the state entering the spectral step; 0 for oxygen."""
        u = self._unstack(state.fields)
        production, _, _ = self.local_terms(u, params, state.aux.systemic, state.time)
        zero = jnp.zeros_like(u["C"])
        return jnp.stack([production[symbol] if symbol in MOVED else zero for symbol in self._fast_symbols()])

    def reaction_terms(self, fields, params, systemic, time):
        """The local terms without the moved species' production and constant decay."""
        u = self._unstack(fields)
        production, loss, extras = self.local_terms(u, params, systemic, time)
        production = dict(production)
        loss = dict(loss)
        for symbol in MOVED:
            production[symbol] = jnp.zeros_like(u[symbol])
        for symbol in tme.STIFF_FAST:
            production[symbol] = loss[symbol] = jnp.zeros_like(u[symbol])
        return self._stack(production), self._stack(loss), self._systemic_inputs(u, extras, params)


def run(dt_max_h: float, production_in_propagator: bool, hours: float) -> dict:
    """The default lesion of :func:`benchmarks.dt_convergence.run` for ``hours`` at ``dt_max_h``."""
    model_class = ProductionInPropagator if production_in_propagator else None
    result = dt_convergence.run(dt_max_h, duration_h=hours, model_class=model_class)
    result["production_in_propagator"] = production_in_propagator
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=12.0)
    parser.add_argument("--out", default="benchmarks/results/cytokine-sources.json")
    args = parser.parse_args(argv)
    finest = {moved: run(0.005, moved, args.hours) for moved in (False, True)}
    runs = [run(dt, moved, args.hours) for dt in (0.5, 0.1) for moved in (False, True)]
    for entry in runs + [finest[True]]:
        fields = entry["_fields"]
        entry["relative_l2_to_finest_split"] = {
            name: dt_convergence.relative_l2(fields[name], finest[False]["_fields"][name]) for name in fields}
        entry["relative_l2_to_finest_same_scheme"] = {
            name: dt_convergence.relative_l2(fields[name], finest[entry["production_in_propagator"]]["_fields"][name])
            for name in fields}
    for entry in runs + list(finest.values()):
        del entry["_fields"]
    result = {"machine": machine_info(), "case": f"default lesion: 24^3 x 50 um, inflamed, r = 300 um, "
              f"pembrolizumab, {args.hours:g} h, plain Strang, float32", "finest": list(finest.values()),
              "runs": runs}
    print(f"relative L2 after {args.hours:g} h against the 0.005 h run of today's split scheme")
    print(f"{'dt_max h':>9} {'production':>11} " + " ".join(f"{name:>17}" for name in SHOWN))
    for entry in runs + [finest[True]]:
        where = "propagator" if entry["production_in_propagator"] else "local"
        errors = entry["relative_l2_to_finest_split"]
        print(f"{entry['dt_max_h']:9g} {where:>11} " + " ".join(f"{errors[name]:17.2e}" for name in SHOWN))
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
