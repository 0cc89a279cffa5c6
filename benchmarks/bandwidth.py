"""STREAM-like memory bandwidth in numpy and JAX: the roofline reference.

Kernels on float32 arrays of ``array_MiB`` each (≥ 256 MiB by default, far
beyond any cache), best of ``repeats``:

* numpy copy  ``b[:] = a``                  counted 2 arrays moved (read a, write b)
* numpy triad ``c = a + s·b``               counted 3 arrays (STREAM convention); numpy
  runs it as two passes (``c = s·b``, then ``c += a``), so its real traffic is 5 arrays
* JAX scale   ``a ← s·a`` (jitted, ``a`` donated: written in place)   counted 2 arrays
* JAX triad   ``a ← a + s·b`` (jitted, ``a`` donated)                  counted 3 arrays
* JAX scale into a fresh output ``b = s·a`` (no donation)             counted 2 arrays:
  shows what a new buffer per call costs (the allocator hands back fresh
  pages, and their first-touch faults are paid inside the call)

GB/s = counted bytes / best time / 1e9. Write-allocate traffic (a cache line
read before it is written) is not counted, as in STREAM. numpy runs on one
thread; XLA's CPU backend may split a large elementwise loop across cores,
which is why both are reported: the stencil benchmarks quote their fraction of
each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s

FLOAT32_BYTES = 4


def _gbps(counted_arrays: int, array_bytes: int, seconds: float) -> float:
    return counted_arrays * array_bytes / seconds / 1e9


def _numpy_seconds(count: int, repeats: int) -> tuple[float, float]:
    """Best times (s) of numpy copy and triad on float32 arrays of ``count`` values."""
    scalar = np.float32(1.5)
    # np.full touches every page now, so no page fault lands inside a timed call.
    a = np.full(count, 1.0, np.float32)
    b = np.full(count, 2.0, np.float32)
    c = np.full(count, 0.0, np.float32)

    def triad() -> None:
        np.multiply(b, scalar, out=c)
        np.add(c, a, out=c)

    return best_time_s(lambda: np.copyto(b, a), repeats), best_time_s(triad, repeats)


def _jax_seconds(count: int, repeats: int) -> tuple[float, float, float]:
    """Best times (s) of JAX in-place scale, in-place triad and scale into a fresh output."""
    scale_fresh = jax.jit(lambda x, s: s * x)
    scale_in_place = jax.jit(lambda x, s: s * x, donate_argnums=(0,))
    triad_in_place = jax.jit(lambda x, y, s: x + s * y, donate_argnums=(0,))
    x = jnp.full((count,), 1.0, jnp.float32)
    y = jnp.full((count,), 2.0, jnp.float32)
    one = jnp.float32(1.0)  # a traced 1: x keeps its values over every repeat
    tiny = jnp.float32(1e-7)  # x stays finite over every repeat of the in-place triad
    jax.block_until_ready(scale_fresh(x, one))  # compile outside the timing
    fresh_s = best_time_s(lambda: scale_fresh(x, one), repeats)
    # Donated loops: each call's output is the next call's input, in the same buffer.
    held = {"x": scale_in_place(jnp.array(x, copy=True), one)}

    def scale():
        held["x"] = scale_in_place(held["x"], one)
        return held["x"]

    scale_s = best_time_s(scale, repeats)
    held["x"] = triad_in_place(held["x"], y, tiny)

    def triad():
        held["x"] = triad_in_place(held["x"], y, tiny)
        return held["x"]

    return scale_s, best_time_s(triad, repeats), fresh_s


def measure_bandwidth(array_MiB: int = 256, repeats: int = 7) -> dict:
    """Copy/triad bandwidth (GB/s) in numpy and JAX on arrays of ``array_MiB`` MiB each."""
    count = array_MiB * 2**20 // FLOAT32_BYTES
    array_bytes = count * FLOAT32_BYTES
    numpy_copy_s, numpy_triad_s = _numpy_seconds(count, repeats)
    jax_scale_s, jax_triad_s, jax_scale_fresh_s = _jax_seconds(count, repeats)
    result = {
        "array_MiB": array_MiB,
        "dtype": "float32",
        "repeats": repeats,
        "numpy_copy_GBps": _gbps(2, array_bytes, numpy_copy_s),
        "numpy_triad_GBps": _gbps(3, array_bytes, numpy_triad_s),
        "jax_scale_GBps": _gbps(2, array_bytes, jax_scale_s),
        "jax_triad_GBps": _gbps(3, array_bytes, jax_triad_s),
        "jax_scale_fresh_output_GBps": _gbps(2, array_bytes, jax_scale_fresh_s),
        "numpy_copy_best_s": numpy_copy_s,
        "numpy_triad_best_s": numpy_triad_s,
        "jax_scale_best_s": jax_scale_s,
        "jax_triad_best_s": jax_triad_s,
        "jax_scale_fresh_output_best_s": jax_scale_fresh_s,
        "bytes_counted": "copy/scale: 2 arrays; triad: 3 arrays (STREAM, no write-allocate)",
        "note": "numpy triad runs as 2 passes (real traffic 5 arrays); numpy is single-threaded",
    }
    result["roofline_GBps"] = max(
        result["numpy_copy_GBps"], result["jax_scale_GBps"], result["jax_triad_GBps"]
    )
    return result


def table(result: dict) -> list[str]:
    """Human-readable lines of the bandwidth section."""
    r = result
    return [
        f"memory bandwidth (float32, {r['array_MiB']} MiB arrays, best of {r['repeats']}):",
        f"  numpy copy  {r['numpy_copy_GBps']:8.2f} GB/s    "
        f"numpy triad {r['numpy_triad_GBps']:8.2f} GB/s",
        f"  jax scale   {r['jax_scale_GBps']:8.2f} GB/s    "
        f"jax triad   {r['jax_triad_GBps']:8.2f} GB/s",
        f"  jax scale into a fresh (undonated) output: {r['jax_scale_fresh_output_GBps']:.2f} GB/s",
        f"  roofline reference (best of these): {r['roofline_GBps']:.2f} GB/s",
    ]
