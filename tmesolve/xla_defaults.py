"""XLA options tmesolve sets for the CPU backend, before JAX starts it.

**Small while loops.** XLA's CPU compiler compiles a ``while`` loop whose
buffers are below ``xla_cpu_small_while_loop_byte_threshold`` into one
function that runs on one thread, which saves the runtime's dispatch of each
kernel in tiny loops. XLA long set that threshold to 1024 bytes
(``xla/service/cpu/cpu_options.cc``); the XLA in JAX 0.12 hoists loops of
tens of MiB, so a solver's loop of steps ran on one thread for every lesion
up to about 220³ voxels, and the kernels XLA splits in two for two cores
(a stencil stage, ``outer_dimension_partitions`` in the compiled HLO) ran on
one. tmesolve sets the threshold back to 1024 bytes. Measured on the 2-core
development VM (AMD EPYC, JAX 0.12.0.1) with ``python -m
benchmarks.stencil_forms --steps 20`` (its ``ssp_rk2_stage`` row, against the
loop hoisted by a large threshold in ``XLA_FLAGS``), one SSP-RK2 diffusion
stage: 0.088 → 0.048 ms at 64³, 0.56–0.64 → 0.29 ms at 128³; the full TME step
unchanged (it already ran on both cores). Where
XLA's default is 1024 bytes the option changes nothing. The values computed
are the same bit for bit either way (a test checks): only the threads differ.

Applied by ``import tmesolve`` before anything runs on a backend (XLA reads
``XLA_FLAGS`` once per process): a ``--xla_backend_extra_options=`` entry is
appended to ``XLA_FLAGS`` (XLA merges repeated entries; the user's own stay
as they are), so child processes and the compiled-loop cache key see it.
Left alone when ``XLA_FLAGS`` already names the option (set your own value
there) and when JAX's backends have already started. Other backends ignore
it: XLA passes options whose names start with ``xla_`` to no LLVM.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SMALL_WHILE_LOOP_OPTION = "xla_cpu_small_while_loop_byte_threshold"
SMALL_WHILE_LOOP_BYTES = 1024
ADDED_FLAG = f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}={SMALL_WHILE_LOOP_BYTES}"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without the module: assume not started
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def with_cpu_defaults(xla_flags: str) -> str:
    """``xla_flags`` with tmesolve's option appended as one more flag (the user's text unchanged)."""
    return f"{xla_flags} {ADDED_FLAG}" if xla_flags.strip() else ADDED_FLAG


def without_cpu_defaults(xla_flags: str) -> str:
    """``xla_flags`` as the user set them: tmesolve's own appended flag removed.

    A trial's fingerprint records these: whether the option took effect depends on
    whether JAX started before ``import tmesolve``, and it changes no value.
    """
    return " ".join(token for token in xla_flags.split() if token != ADDED_FLAG)


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Add tmesolve's CPU option to ``XLA_FLAGS`` where it can take effect; True if added."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if SMALL_WHILE_LOOP_OPTION in flags or _backends_started():
        return False
    environ["XLA_FLAGS"] = with_cpu_defaults(flags)
    return True
