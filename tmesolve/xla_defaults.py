"""XLA options tmesolve sets for the CPU backend, before JAX starts it.

**Small while loops.** XLA's CPU compiler compiles a ``while`` loop whose
buffers are below ``xla_cpu_small_while_loop_byte_threshold`` (tens of MiB by
default) into one function that runs on one thread: it saves the runtime's
dispatch of each kernel, which matters for tiny loops. A solver's loop of steps
is such a loop for every lesion up to about 220³ voxels, so the kernels XLA
splits in two for two cores (a stencil stage, ``outer_dimension_partitions``)
ran on one. tmesolve lowers the threshold to 128 KiB, which keeps the smallest
loops (16³ test grids) whole. Measured on the 2-core development VM (AMD EPYC,
JAX 0.12), one SSP-RK2 diffusion stage inside the loop: 0.093 → 0.054 ms at
64³, 0.73 → 0.37 ms at 128³, 3.4 → 2.0 ms at 192³; 16³ unchanged; 256³ was
already above the default. The full TME step did not change.

Applied by ``import tmesolve``, before anything runs on a backend (XLA reads
``XLA_FLAGS`` once per process), by adding the option to ``XLA_FLAGS`` (so
child processes, the compiled-loop cache key and the trial fingerprint see it).
Left alone when ``XLA_FLAGS`` already names the option (set your own value
there), when JAX's backends have already started, and when an accelerator
plugin is installed or ``JAX_PLATFORMS`` names no CPU (the option is the CPU
compiler's).
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
from collections.abc import MutableMapping

SMALL_WHILE_LOOP_OPTION = "xla_cpu_small_while_loop_byte_threshold"
SMALL_WHILE_LOOP_BYTES = 128 * 1024
_EXTRA_OPTIONS_FLAG = "--xla_backend_extra_options="
_ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu", "metal")


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX accelerator plugin (CUDA, ROCm, ...) is importable here."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins

    return any(module.name.startswith(("xla_cuda", "xla_rocm", "xla_tpu", "cuda", "rocm"))
               for module in pkgutil.iter_modules(jax_plugins.__path__))


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without the module: assume not started
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def with_cpu_defaults(xla_flags: str) -> str:
    """``xla_flags`` with the small-while-loop threshold added to its backend extra options.

    An existing ``--xla_backend_extra_options=`` keeps its entries and gains this one.
    """
    entry = f"{SMALL_WHILE_LOOP_OPTION}={SMALL_WHILE_LOOP_BYTES}"
    tokens = xla_flags.split()
    for index, token in enumerate(tokens):
        if token.startswith(_EXTRA_OPTIONS_FLAG):
            existing = token[len(_EXTRA_OPTIONS_FLAG):]
            tokens[index] = _EXTRA_OPTIONS_FLAG + (f"{existing},{entry}" if existing else entry)
            return " ".join(tokens)
    return " ".join([*tokens, _EXTRA_OPTIONS_FLAG + entry])


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Add tmesolve's CPU options to ``XLA_FLAGS`` where they can take effect; True if added."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if SMALL_WHILE_LOOP_OPTION in flags:
        return False
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        if "cpu" not in platforms or any(name in platforms for name in _ACCELERATOR_PLATFORMS):
            return False
    elif _accelerator_plugin_installed():
        return False
    if _backends_started():
        return False
    environ["XLA_FLAGS"] = with_cpu_defaults(flags)
    return True
