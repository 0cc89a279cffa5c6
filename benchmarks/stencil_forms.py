"""Seven ways to write one no-flux 7-point update u + c·Δ_h u in JAX, timed on the CPU backend.

    python -m benchmarks.stencil_forms [--shape 128] [--steps 20]

Forms: tmesolve's ``diffusion_rate`` with a scalar D (face differences summed,
one scale per cell), concatenated zero-flux faces (the plain stencil pass of
the suite), an edge-padded ``lax.conv_general_dilated``,
shifted slices with the wall cell repeated, ``jnp.roll`` with the wrapped
cell replaced, 3-point ``lax.reduce_window`` sums of an edge-padded copy, and
seven plain slices of one materialised edge-padded copy. Prints best time
and effective bandwidth (8 B per voxel: read and write once) of each, CPU
time over wall time (about 1: one thread), and checks that all agree. With
``--steps`` > 1 it also times a stage of the solver's SSP-RK2 step of the
operator. XLA_FLAGS naming ``xla_cpu_small_while_loop_byte_threshold``
overrides tmesolve's value (:mod:`tmesolve.xla_defaults`); a large one, e.g.
``--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=1073741824``,
gives XLA's single-threaded hoisting of the loop back for comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import best_time_s
from tmesolve.operators import diffusion_rate, ssp_rk2  # importing tmesolve sets its XLA options, as a run has them


def concatenated_faces(u, c):
    laplacian = jnp.zeros_like(u)
    for axis in range(3):
        wall = jnp.zeros_like(jax.lax.slice_in_dim(u, 0, 1, axis=axis))
        faces = jnp.concatenate([wall, jnp.diff(u, axis=axis), wall], axis=axis)
        laplacian = laplacian + (jax.lax.slice_in_dim(faces, 1, None, axis=axis)
                                 - jax.lax.slice_in_dim(faces, 0, -1, axis=axis))
    return u + c * laplacian


def _kernel() -> np.ndarray:
    kernel = np.zeros((3, 3, 3), np.float32)
    kernel[1, 1, 1] = -6.0
    for axis in range(3):
        for end in (0, 2):
            index = [1, 1, 1]
            index[axis] = end
            kernel[tuple(index)] = 1.0
    return kernel


def edge_padded_convolution(u, c):
    padded = jnp.pad(u, 1, mode="edge")[None, None]
    laplacian = jax.lax.conv_general_dilated(padded, jnp.asarray(_kernel())[None, None], (1, 1, 1), "VALID")
    return u + c * laplacian[0, 0]


def shifted_slices(u, c):
    laplacian = -6.0 * u
    for axis in range(3):
        n = u.shape[axis]
        below = jnp.concatenate([jax.lax.slice_in_dim(u, 0, 1, axis=axis),
                                 jax.lax.slice_in_dim(u, 0, n - 1, axis=axis)], axis=axis)
        above = jnp.concatenate([jax.lax.slice_in_dim(u, 1, n, axis=axis),
                                 jax.lax.slice_in_dim(u, n - 1, n, axis=axis)], axis=axis)
        laplacian = laplacian + below + above
    return u + c * laplacian


def rolled(u, c):
    laplacian = -6.0 * u
    for axis in range(3):
        n = u.shape[axis]
        shape = [1, 1, 1]
        shape[axis] = n
        index = jnp.arange(n).reshape(shape)
        below = jnp.where(index == 0, u, jnp.roll(u, 1, axis))
        above = jnp.where(index == n - 1, u, jnp.roll(u, -1, axis))
        laplacian = laplacian + below + above
    return u + c * laplacian


def reduce_window_sums(u, c):
    """Δu = Σ_axes (3-point window sum of the edge-padded u) − 9u."""
    laplacian = -9.0 * u
    for axis in range(3):
        pads = [(0, 0)] * 3
        pads[axis] = (1, 1)
        window = [1, 1, 1]
        window[axis] = 3
        padded = jnp.pad(u, pads, mode="edge")
        laplacian = laplacian + jax.lax.reduce_window(padded, 0.0, jax.lax.add, window, (1, 1, 1), "VALID")
    return u + c * laplacian


def materialised_edge_pad(u, c):
    """One edge-padded copy of u, kept whole (optimization_barrier), then seven plain slices."""
    padded = jax.lax.optimization_barrier(jnp.pad(u, 1, mode="edge"))

    def shifted(dx, dy, dz):
        return padded[1 + dx:padded.shape[0] - 1 + dx, 1 + dy:padded.shape[1] - 1 + dy,
                      1 + dz:padded.shape[2] - 1 + dz]

    laplacian = (shifted(1, 0, 0) + shifted(-1, 0, 0) + shifted(0, 1, 0) + shifted(0, -1, 0)
                 + shifted(0, 0, 1) + shifted(0, 0, -1) - 6.0 * u)
    return u + c * laplacian


def tmesolve_operator(u, c):
    """The solver's own operator: ``diffusion_rate`` with a scalar D (D = 1, h = 1 gives Δ_h u)."""
    return u + c * diffusion_rate(u, 1.0, 1.0)


FORMS = {"tmesolve_operator": tmesolve_operator,
         "concatenated_faces": concatenated_faces, "shifted_slices": shifted_slices, "rolled": rolled,
         "edge_padded_convolution": edge_padded_convolution, "reduce_window_sums": reduce_window_sums,
         "materialised_edge_pad": materialised_edge_pad}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1,
                        help="updates per call: 1 times one call (a fresh output each time); "
                             "more run a lax.scan, whose buffers are reused as in the solver, "
                             "and report the time per update")
    args = parser.parse_args(argv)
    n, steps = args.shape, args.steps
    u = jnp.asarray(np.random.default_rng(0).random((n, n, n), np.float32))
    c = jnp.float32(0.1)
    reference = None
    results = {}
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}", flush=True)
    for name, form in FORMS.items():
        if steps == 1:
            compiled = jax.jit(form)
        else:
            compiled = jax.jit(lambda u, c, form=form: jax.lax.scan(
                lambda x, _: (form(x, c), None), u, None, length=steps)[0])
        out = np.asarray(compiled(u, c))
        reference = out if reference is None else reference
        results[name] = _timed(compiled, u, c, args.repeats, steps, n)
        results[name]["max_difference"] = float(np.max(np.abs(out - reference)))
        _print(name, results[name], f"(max difference {results[name]['max_difference']:.1e})")
    if steps > 1:
        # The solver's own step: SSP-RK2 of the operator, 2 stages per step (ssp_rk2's barrier
        # keeps them apart), in a scan of ``steps`` steps; reported per stage.
        solver_steps = jax.jit(lambda u, c: jax.lax.scan(
            lambda x, _: (ssp_rk2(lambda v: diffusion_rate(v, 1.0, 1.0), x, c), None), u, None,
            length=steps)[0])
        solver_steps(u, c).block_until_ready()
        results["ssp_rk2_stage"] = _timed(solver_steps, u, c, args.repeats, 2 * steps, n)
        _print("ssp_rk2_stage", results["ssp_rk2_stage"], "(the solver's step, per stage)")
    return results


def _timed(compiled, u, c, repeats: int, updates: int, n: int) -> dict:
    """Best time per update, its bandwidth at 8 B per voxel, and CPU time over wall time
    of the timed calls (about 1 when XLA runs the loop on one thread, up to the core count)."""
    wall, cpu = time.perf_counter(), time.process_time()
    seconds = best_time_s(lambda: compiled(u, c), repeats) / updates
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"seconds": seconds, "GBps": 8 * n**3 / seconds / 1e9, "cpu_over_wall": cpu / wall}


def _print(name: str, figures: dict, note: str) -> None:
    print(f"{name:24s} {figures['seconds'] * 1e3:8.3f} ms {figures['GBps']:7.2f} GB/s "
          f"CPU/wall {figures['cpu_over_wall']:.2f} {note}", flush=True)


if __name__ == "__main__":
    main()
