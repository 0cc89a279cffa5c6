"""tmesolve's benchmark suite: performance figures as JSON, never timed unit tests.

Run ``python -m benchmarks [--quick] [--full] [--only dd3|tme|bandwidth] [--out FILE]``.
Every figure is written with its units in the key name (``_s``, ``_GBps``,
``_per_s``) next to the machine it was measured on (:mod:`benchmarks.machine`),
and next to a reference measured in the same process (a STREAM-like
bandwidth, a plain numpy stencil, a plain jitted stencil pass), so that the
ratios survive a noisy or shared machine even where the absolute numbers do not.

Sections:

* :mod:`benchmarks.bandwidth` — memory bandwidth (copy, scale, triad) in numpy
  and JAX: the roofline reference.
* :mod:`benchmarks.dd3` — the DD3 diffusion–decay problem (explicit stencil,
  spectral propagator, plain numpy reference): throughput, accuracy, time to
  a relative L2 error of 1e-3.
* :mod:`benchmarks.pde50` — the PDE part of a 50³ lesion with ten diffusing
  species: time per step of the spectral and explicit paths (the issue's GPU
  target of 0.1 ms per step).
* :mod:`benchmarks.tme_step` — the full 16-field TME model step: throughput,
  compile time, XLA cost analysis, ratio to one plain stencil pass.

The helpers below are shared by the sections, with the plain jitted stencil pass
that both stencil sections compare against.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


def write_json(path: str | Path, result: dict) -> Path:
    """Write a benchmark result as JSON (strict: NaN and infinity are refused), making its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return path


def block(value: Any) -> Any:
    """Wait until every JAX array in ``value`` is computed (a no-op for numpy)."""
    return jax.block_until_ready(value)


def best_time_s(
    run: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None
) -> float:
    """Smallest wall time (s) of ``repeats`` calls of ``run(*setup())``, each waited for.

    ``setup`` (untimed) builds fresh arguments before every call, e.g. a new
    state for a function that donates its input buffers. The minimum, not the
    mean, is reported: on a shared machine noise only ever adds time.
    """
    best = float("inf")
    for _ in range(max(1, repeats)):
        # Wait for the arguments too: a copy still running would be timed with the call.
        arguments = block(setup()) if setup is not None else ()
        start = time.perf_counter()
        block(run(*arguments))
        best = min(best, time.perf_counter() - start)
    return best


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats to ``digits`` significant digits, recursively; NaN and ±inf become None."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def plain_stencil_pass_s(shape: tuple[int, ...], repeats: int) -> float:
    """Best time (s) of one jitted, donated pass u ← u + c·Δ_h u (float32 ``shape``, no-flux walls).

    Δ_h u = Σ over the last three axes of (F_{i+½} − F_{i−½}), F = u_{i+1} − u_i at
    interior faces and 0 at the walls (no flux). Written with face differences
    and a zero-padded concatenate, the form XLA's CPU backend runs fastest:
    measured 14× faster at 16×64³ than the same update through
    ``jnp.pad(mode="edge")`` and six shifted slices (0.53 GB/s), which would
    make every ratio to it look flattering.
    """

    def update(u, c):
        laplacian = jnp.zeros_like(u)
        for axis in range(u.ndim - 3, u.ndim):
            wall = jnp.zeros_like(jax.lax.slice_in_dim(u, 0, 1, axis=axis))
            faces = jnp.concatenate([wall, jnp.diff(u, axis=axis), wall], axis=axis)
            laplacian = laplacian + (
                jax.lax.slice_in_dim(faces, 1, None, axis=axis)
                - jax.lax.slice_in_dim(faces, 0, -1, axis=axis)
            )
        return u + c * laplacian

    stencil = jax.jit(update, donate_argnums=(0,))
    coefficient = jnp.float32(0.1)
    held = {"u": stencil(jnp.ones(shape, jnp.float32), coefficient)}  # compile outside the timing

    def one_pass():
        held["u"] = stencil(held["u"], coefficient)
        return held["u"]

    return best_time_s(one_pass, repeats)
