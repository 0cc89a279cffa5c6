"""Where the compiled TME step spends its time: kernel times from a profile, by sub-solver.

    python -m benchmarks.profile_step [--case 128x1] [--steps 2] [--top 12] [--out FILE]

Builds one case of :mod:`benchmarks.tme_step` (N³ voxels × lesions at 20 µm,
pembrolizumab, dt 0.05 h), compiles its interval loop, runs one call to warm
it, and runs a call of ``--steps`` steps under ``jax.profiler.trace``. Every
kernel of the trace is attributed, through the compiled HLO, to the sub-solver
whose branch of the step's switch holds it (the TME model runs its Strang
sequence as a loop over a switch: reactions, cell transport, spectral step,
identity); kernels elsewhere (the step size, the readouts of the call's
record, the interval's opening transport pass) count as ``outside``. Loop and
branch thunks are not kernels and are left out; events that name no
instruction of the compiled program (the runtime's own work per call) are
summed apart as ``unattributed``.

Reports per sub-solver the kernel time (ms per step) and the kernels per
step, the same split by the model's named scopes (``jax.named_scope``: the
reaction step's local terms, predictor, corrector and oxygen solve; the cell
transport's chemotaxis, motility, pressure and advection; the spectral
step's sources and propagation; "-" for kernels outside any scope), and the
largest kernels. The cores run kernels side by side, so the sums
can exceed the wall time, which is reported beside them. One call is one
sample: a profile says where the time goes, ``python -m benchmarks`` how much
there is. With the machine; JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import rounded, write_json
from benchmarks.machine import machine_info
from benchmarks.tme_step import DT_H, case_setup
from tmesolve.integrate import Integrator, make_solver_params

#: The step's switch branches in order (tmesolve.stepping: 0 reactions, 1 cell transport, 2 spectral, identity).
BRANCHES = ("reactions", "transport", "spectral", "identity")
#: Trace events that are not kernels: the runtime's loops, branches and executors.
_NOT_KERNELS = re.compile(r"^(\$|while\.|cond\.|ThunkExecutor|Slinky)|Thunk|Pjit")
#: An instruction's line in HLO text, its name captured.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def _computations(hlo: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """From HLO text: the computation holding each instruction, each computation's
    first caller, and the sub-solver of each branch computation of the step's switch."""
    owner, parent, branch = {}, {}, {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(1)
            continue
        instruction = _INSTRUCTION.match(line)
        if not (instruction and current):
            continue
        owner[instruction.group(1)] = current
        for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
            parent.setdefault(called, current)
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches:
            names = [name.strip().lstrip("%") for name in branches.group(1).split(",")]
            for name in names:
                parent.setdefault(name, current)
            if len(names) == len(BRANCHES):
                branch.update(zip(names, BRANCHES))
    return owner, parent, branch


#: Segments of an HLO op_name that JAX writes itself (loops, branches, inlined calls:
#: eval_jaxpr in JAX 0.12, closed_call in 0.10; jitted helpers, einsum specs), not a
#: named scope of the model.
_NOT_SCOPES = re.compile(r"^(while|body|cond|eval_jaxpr|closed_call|core_call|custom_[jv]vp_call|pjit"
                         r"|branch_\d+_fun|checkpoint|remat|jit\(.*\)|.*->.*)$")


def _scopes(hlo: str) -> dict[str, str]:
    """From HLO text: the named scopes ("local_terms", "pressure/...") of each instruction
    with an op_name, outermost first, joined by "/"; "-" where there is none."""
    scopes = {}
    for line in hlo.splitlines():
        instruction = _INSTRUCTION.match(line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        if not (instruction and op_name):
            continue
        # A fused instruction may carry several names joined by ";": the last is a full path.
        path = op_name.group(1).split(";")[-1].split("/")[:-1]
        named = [segment for segment in path if not _NOT_SCOPES.match(segment)]
        scopes[instruction.group(1)] = "/".join(named) or "-"
    return scopes


def _sub_solver(computation: str, parent: dict[str, str], branch: dict[str, str]) -> str:
    while computation is not None:
        if computation in branch:
            return branch[computation]
        computation = parent.get(computation)
    return "outside"


def profile(n: int, lesions: int, steps: int, top: int) -> dict:
    """Kernel time and count per step by sub-solver, and the ``top`` largest kernels, of one call."""
    setup = case_setup(n, lesions)
    integrator, solver = Integrator(setup.model), make_solver_params(dt_max=DT_H)
    state = setup.state
    call_end = jnp.asarray(steps * DT_H, jnp.float32)
    compiled = integrator._advance.lower(state, setup.params, solver, call_end).compile()
    state = jax.block_until_ready(compiled(state, setup.params, solver, call_end)[0])
    call_end = jnp.asarray(float(state.time) + steps * DT_H, jnp.float32)
    with tempfile.TemporaryDirectory(prefix="tmesolve-profile-") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, setup.params, solver, call_end))
            wall_s = time.perf_counter() - start
        traces = sorted(Path(folder).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace under {folder}")
        events = json.load(gzip.open(traces[-1]))["traceEvents"]
    hlo = compiled.as_text()
    owner, parent, branch = _computations(hlo)
    scopes = _scopes(hlo)
    if not branch:
        raise RuntimeError("no switch of four branches in the compiled step: is this the TME model's loop?")
    milliseconds, counts = collections.Counter(), collections.Counter()
    by_kernel, unattributed = collections.Counter(), 0.0
    scope_ms, scope_counts = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or _NOT_KERNELS.search(event["name"]):
            continue
        computation = owner.get(event["name"])
        if computation is None:
            unattributed += event.get("dur", 0) / 1e3
            continue
        solver_name = _sub_solver(computation, parent, branch)
        milliseconds[solver_name] += event.get("dur", 0) / 1e3
        counts[solver_name] += 1
        by_kernel[(solver_name, re.sub(r"\.\d+$", "", event["name"]))] += event.get("dur", 0) / 1e3
        part = (solver_name, scopes.get(event["name"], "-"))
        scope_ms[part] += event.get("dur", 0) / 1e3
        scope_counts[part] += 1
    return {
        "case": f"{n}x{lesions}",
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / steps,
        "kernel_ms_per_step": {name: milliseconds[name] / steps for name in BRANCHES + ("outside",)},
        "kernels_per_step": {name: counts[name] / steps for name in BRANCHES + ("outside",)},
        "unattributed_ms_per_step": unattributed / steps,
        "by_scope": [{"sub_solver": solver_name, "scope": scope, "ms_per_step": ms / steps,
                      "kernels_per_step": scope_counts[(solver_name, scope)] / steps}
                     for (solver_name, scope), ms in sorted(scope_ms.items(), key=lambda item: -item[1])],
        "largest_kernels": [{"sub_solver": solver_name, "kernel": kernel, "ms_per_step": ms / steps}
                            for (solver_name, kernel), ms in by_kernel.most_common(top)],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="128x1", help="N x lesions, e.g. 32x3")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    case = re.fullmatch(r"(\d+)x(\d+)", args.case)
    if case is None or min(int(case.group(1)), int(case.group(2))) < 1:
        parser.error(f"--case: got {args.case!r}; expected N x lesions with both >= 1, e.g. 128x1")
    for name in ("steps", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; expected an integer >= 1")
    result = profile(int(case.group(1)), int(case.group(2)), args.steps, args.top)
    print(f"TME step {result['case']}: {result['wall_ms_per_step']:.1f} ms/step wall over {args.steps} steps")
    for name in BRANCHES + ("outside",):
        print(f"  {name:10s} {result['kernel_ms_per_step'][name]:9.2f} kernel ms/step "
              f"{result['kernels_per_step'][name]:8.0f} kernels/step")
        for part in result["by_scope"]:
            if part["sub_solver"] == name:
                print(f"      {part['ms_per_step']:9.2f} ms/step {part['kernels_per_step']:6.0f} kernels  "
                      f"{part['scope']}")
    for kernel in result["largest_kernels"]:
        print(f"    {kernel['ms_per_step']:8.2f} ms/step  {kernel['sub_solver']:10s} {kernel['kernel']}")
    result = {"machine": machine_info(), **rounded(result)}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
