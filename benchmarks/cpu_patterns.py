"""What a few array patterns cost on XLA's CPU backend, per pass over a stack of fields.

    python -m benchmarks.cpu_patterns [--shape 128] [--fields 16] [--out FILE]

Each pattern maps a stack of ``fields`` float32 fields of N³ values, shaped as
the TME model's state (fields, 1 lesion, N, N, N), to an array of the same
shape, inside a ``lax.fori_loop`` of ``--steps`` passes with the buffer donated
(buffers are reused as in the solver: no page faults of fresh outputs). The
patterns are the ones that decided how :meth:`tmesolve.model.tme.TMEModel.react`
and :func:`tmesolve.model.tme._hill` are written:

* ``scale_stack``: x·c over the whole stack (the reference: one pass);
* ``stack_of_scaled_rows``: the same values as a ``jnp.stack`` of the scaled
  rows, as a model writes its per-field rates (one buffer per row, then a
  copy into the stack);
* ``power``: x^1.7 with the exponent an array leaf, as a Hill term whose
  exponent is a parameter;
* ``exp_log``: the same power as exp(1.7·ln x), and ``exp`` alone.

Reports ms per pass, each as a ratio to ``scale_stack`` in the same process.
Apart (``pools``), one lesion's tumour mask of N³ voxels eroded over a box of
±``POOL_RADIUS`` voxels, the readouts' core (:func:`tmesolve.readouts._pool`),
as one 3-D ``reduce_window`` (the reference) and as the three 1-D windows the
readouts use: ms per call, best of ``--repeats``, and whether they agree.
Apart too (``transforms``), a forward and inverse transform of a stack of
``TRANSFORMED_FIELDS`` fields of N³ (no-flux walls), the largest stack the TME
model's spectral step transforms per lesion, by
:class:`tmesolve.spectral.Eigenbasis`: the stack at once (the reference) and one field
at a time, as it runs on a CPU.
With the machine; JSON with ``--out``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import tmesolve  # noqa: F401  - sets tmesolve's XLA options, as a run has them
from benchmarks import best_time_s, ratio, rounded, write_json
from benchmarks.machine import machine_info
from tmesolve.grid import Grid
from tmesolve.operators import FaceBoundary
from tmesolve.readouts import _pool
from tmesolve.spectral import Eigenbasis

#: Passes per loop at most: the power pattern takes x ∈ [0.5, 1] to x^(1.7^k), which
#: leaves float32's normal range (about 1e-38) past k ≈ 8.
MAX_STEPS = 8
#: The readouts' margin half-width in voxels for the TME benchmark's lesions
#: (100 µm band at 20 µm voxels: TMEModel.margin_cells).
POOL_RADIUS = 2
#: The fields the TME model's spectral step transforms together per lesion: TGF-β and
#: the two antibodies (ETD1; IFN-γ and CXCL9/10 are a stack of two, ETD2RK). Oxygen is
#: solved in the reaction step (one field per lesion), IL-2 by the separable propagator.
TRANSFORMED_FIELDS = 3


def _patterns(fields: int) -> tuple[dict, jax.Array]:
    exponent_leaf = jnp.float32(1.7)

    def stack_of_scaled_rows(x, exponent):
        return jnp.stack([x[row] * 0.999 for row in range(fields)])

    return {
        "scale_stack": lambda x, exponent: x * 0.999,
        "stack_of_scaled_rows": stack_of_scaled_rows,
        "power": lambda x, exponent: x ** exponent,
        "exp_log": lambda x, exponent: jnp.exp(exponent * jnp.log(x)),
        "exp": lambda x, exponent: jnp.exp(-x),
    }, exponent_leaf


def measure(shape: int, fields: int, steps: int, repeats: int) -> dict:
    """ms per pass of every pattern and its ratio to ``scale_stack``."""
    patterns, exponent = _patterns(fields)
    x0 = jax.random.uniform(jax.random.key(0), (fields, 1, shape, shape, shape), jnp.float32, 0.5, 1.0)
    result = {}
    for name, pattern in patterns.items():
        loop = jax.jit(lambda x, e, pattern=pattern: jax.lax.fori_loop(0, steps, lambda _, y: pattern(y, e), x),
                       donate_argnums=0)
        compiled = loop.lower(x0, exponent).compile()
        # Values stay in (0, 1] and normal over at most MAX_STEPS passes of any pattern.
        seconds = best_time_s(compiled, repeats, setup=lambda: (x0.copy(), exponent)) / steps
        result[name] = {"ms_per_pass": seconds * 1e3}
    reference = result["scale_stack"]["ms_per_pass"]
    for figures in result.values():
        figures["ratio_to_scale_stack"] = ratio(figures["ms_per_pass"], reference)
    # The twins compute the same values: one pass of each, compared.
    for name, twin in (("stack_of_scaled_rows", "scale_stack"), ("exp_log", "power")):
        ours, theirs = (jax.jit(patterns[key])(x0, exponent) for key in (name, twin))
        result[name]["max_relative_difference_to_" + twin] = float(jnp.max(jnp.abs(ours - theirs) / jnp.abs(theirs)))
    return result


def _time_forms(forms: dict, argument: jax.Array, repeats: int, figure: str) -> tuple[dict, dict]:
    """Each form compiled for ``argument`` and timed (ms, best of ``repeats``, under ``figure``),
    with its ratio to the first form (``ratio_to_<first>``); also each form's output."""
    result, outputs = {}, {}
    for name, form in forms.items():
        compiled = jax.jit(form).lower(argument).compile()
        outputs[name] = compiled(argument)
        result[name] = {figure: best_time_s(lambda compiled=compiled: compiled(argument), repeats) * 1e3}
    reference_name = next(iter(forms))
    for figures in result.values():
        figures[f"ratio_to_{reference_name}"] = ratio(figures[figure], result[reference_name][figure])
    return result, outputs


def measure_pools(shape: int, repeats: int, radius: int = POOL_RADIUS) -> dict:
    """ms per erosion of one N³ mask: a 3-D window against one 1-D window per axis."""
    mask = (jax.random.uniform(jax.random.key(1), (1, shape, shape, shape)) > 0.3).astype(jnp.float32)
    window = (1,) + (2 * radius + 1,) * 3
    forms = {
        "window_3d": lambda m: jax.lax.reduce_window(m, jnp.inf, jax.lax.min, window, (1, 1, 1, 1), "SAME"),
        "windows_per_axis": lambda m: _pool(m, radius, maximum=False),
    }
    result, eroded = _time_forms(forms, mask, repeats, "ms_per_call")
    result["radius"] = radius
    result["identical"] = bool(jnp.array_equal(eroded["window_3d"], eroded["windows_per_axis"]))
    return result


def measure_transforms(shape: int, repeats: int, fields: int = TRANSFORMED_FIELDS) -> dict:
    """ms per round trip (forward, then inverse) of a stack of N³ fields: at once and field by field."""
    basis = Eigenbasis(Grid((shape,) * 3, 20.0), FaceBoundary())
    stack = jax.random.uniform(jax.random.key(2), (fields, 1, shape, shape, shape), jnp.float32)
    forms = {name: lambda u, f=field_by_field: basis.inverse(basis.forward(u, f), f)
             for name, field_by_field in (("whole_stack", False), ("field_by_field", True))}
    result, round_trips = _time_forms(forms, stack, repeats, "ms_per_round_trip")
    result["fields"] = fields
    result["identical"] = bool(jnp.array_equal(round_trips["whole_stack"], round_trips["field_by_field"]))
    result["max_difference_between_forms"] = float(jnp.max(jnp.abs(round_trips["whole_stack"]
                                                                   - round_trips["field_by_field"])))
    result["max_round_trip_error"] = float(jnp.max(jnp.abs(round_trips["field_by_field"] - stack)))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=128)
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("shape", "fields", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; expected an integer >= 1")
    if args.steps > MAX_STEPS:
        parser.error(f"--steps: got {args.steps}; expected at most {MAX_STEPS} (the power pattern's values "
                     "would fall below float32's normal range and time differently)")
    patterns = measure(args.shape, args.fields, args.steps, args.repeats)
    for name, figures in patterns.items():
        print(f"{name:22s} {figures['ms_per_pass']:8.2f} ms  {figures['ratio_to_scale_stack']:5.2f}× scale_stack")
    pools = measure_pools(args.shape, args.repeats)
    for name in ("window_3d", "windows_per_axis"):
        print(f"erosion, {name:16s} {pools[name]['ms_per_call']:8.2f} ms  "
              f"{pools[name]['ratio_to_window_3d']:6.4f}× window_3d (r = {pools['radius']})")
    print(f"erosions identical: {pools['identical']}")
    transforms = measure_transforms(args.shape, args.repeats)
    for name in ("whole_stack", "field_by_field"):
        figures = transforms[name]
        print(f"transform round trip of {transforms['fields']} fields, {name:14s} "
              f"{figures['ms_per_round_trip']:8.2f} ms  {figures['ratio_to_whole_stack']:5.2f}× whole_stack")
    print(f"round trips identical: {transforms['identical']} (largest error of a round trip "
          f"{transforms['max_round_trip_error']:.1e})")
    result = {"machine": machine_info(), "shape": args.shape, "fields": args.fields, "steps": args.steps,
              "patterns": rounded(patterns), "pools": rounded(pools), "transforms": rounded(transforms)}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
