"""The largest single lesion (N³ voxels, the full 16-field TME model) that runs on this device.

    python -m benchmarks.largest_lesion [--sizes 512,448,384,320,256] [--timeout-s 420]
        [--out FILE]

Issue target: a 512³ lesion on one 80 GB GPU. Each size, largest first, runs
in a fresh process (an out-of-memory failure cannot poison the next try):
``setup_tme`` of one inflamed lesion at 20 µm (radius 0.3·N·20 µm), the
compiled interval loop, then five timed steps of 0.05 h. The first size that
finishes is the answer; the ones above it are recorded with why they failed
(the last line of their error, or the timeout).

Per size: ``setup_s``, ``compile_s``, ``time_per_step_s``, ``finite``, the
compiled loop's argument/output/temporary bytes (XLA's memory analysis), and
the peak memory: the device's ``peak_bytes_in_use`` where the backend reports
it (GPU), else the process's peak resident set (CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time

SPACING_UM = 20.0
DT_H = 0.05


def run_one(n: int) -> dict:
    """Set up, compile and run two steps of one N³ lesion in this process."""
    import jax
    import jax.numpy as jnp

    from tmesolve.grid import Grid
    from tmesolve.integrate import Integrator, make_solver_params
    from tmesolve.model.tme_setup import LesionSpec, setup_tme

    start = time.perf_counter()
    setup = setup_tme(Grid((n,) * 3, SPACING_UM), [LesionSpec("inflamed", radius_um=0.3 * n * SPACING_UM)],
                      therapy="pembrolizumab", duration_h=24.0)
    setup_s = time.perf_counter() - start
    integrator = Integrator(setup.model)
    solver = make_solver_params(dt_max=DT_H)
    start = time.perf_counter()
    compiled = integrator._advance.lower(setup.state, setup.params, solver, jnp.asarray(DT_H, jnp.float32)).compile()
    compile_s = time.perf_counter() - start
    memory = {}
    try:
        analysis = compiled.memory_analysis()
        memory = {name: int(getattr(analysis, name)) for name in
                  ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")}
    except Exception:  # noqa: BLE001 - not every backend reports it; the probe must not fail on it
        pass
    state = setup.state
    state, _, _ = integrator.advance(state, setup.params, solver, DT_H)  # the first call loads the loop
    jax.block_until_ready(state)
    start = time.perf_counter()
    # Five steps in one call: what a call pays once (the readouts) is a fifth of a step each.
    state, _, diagnostics = integrator.advance(state, setup.params, solver, 6 * DT_H)
    jax.block_until_ready(state)
    run_s = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "N": n,
        "ok": True,
        "setup_s": setup_s,
        "compile_s": compile_s,
        "time_per_step_s": run_s / max(int(diagnostics["steps"]), 1),
        "finite": bool(diagnostics["finite"]),
        "field_values": len(setup.model.species) * n**3,
        "compiled_memory": memory,
        "peak_bytes": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_bytes_source": "device peak_bytes_in_use" if peak is not None else "process peak RSS",
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }


def probe(sizes: list[int], timeout_s: float) -> dict:
    """Try ``sizes`` largest first, each in a fresh process; stop at the first that runs."""
    tries = []
    for n in sorted(sizes, reverse=True):
        command = [sys.executable, "-m", "benchmarks.largest_lesion", "--one", str(n)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            tries.append({"N": n, "ok": False, "why": f"timed out after {timeout_s:g} s"})
            print(f"{n}^3: timed out after {timeout_s:g} s", flush=True)
            continue
        wall_s = time.perf_counter() - start
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            result = {**json.loads(lines[-1]), "process_wall_s": wall_s}
            tries.append(result)
            print(f"{n}^3: runs, {result['time_per_step_s']:.3g} s/step, peak {result['peak_bytes'] / 2**30:.1f} GiB "
                  f"({result['peak_bytes_source']})", flush=True)
            break
        if done.returncode < 0:  # killed by a signal: SIGKILL is most often the host's out-of-memory killer
            error = f"killed by {signal.Signals(-done.returncode).name} (host out of memory?)"
        else:
            error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        tries.append({"N": n, "ok": False, "why": error[-500:], "returncode": done.returncode})
        print(f"{n}^3: failed: {error[-200:]}", flush=True)
    largest = next((item["N"] for item in tries if item.get("ok")), None)
    return {"largest_N": largest, "tries": tries}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,448,384,320,256",
                        help="comma-separated voxels per side, tried largest first")
    parser.add_argument("--timeout-s", type=float, default=420.0, help="per size")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one)))
        return {}
    try:
        sizes = [int(item) for item in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: got {args.sizes!r}; expected comma-separated integers such as 512,384") from None
    if any(n < 4 for n in sizes):
        raise SystemExit(f"--sizes: got {args.sizes!r}; expected sizes of at least 4 voxels")
    from benchmarks import write_json
    from benchmarks.machine import machine_info

    # The probe first: machine_info starts JAX here, which must not hold device memory the
    # children need (on a GPU JAX would reserve most of it).
    probed = probe(sizes, args.timeout_s)
    result = {"machine": machine_info(), **probed}
    print(f"largest lesion that runs: {result['largest_N']}^3" if result["largest_N"] else "no size ran")
    if args.out:
        write_json(args.out, result)
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
