"""tmesolve: the tumour microenvironment under immunotherapy, JIT-compiled with JAX.

Public API: :func:`run` (a run from config overrides, as the ``tmesolve``
command does), :func:`open` (read a run file), :class:`Grid`.
"""

from __future__ import annotations

from typing import Any

from tmesolve import xla_defaults

# Before anything runs on a backend: XLA reads its flags once per process.
xla_defaults.apply_cpu_defaults()

from tmesolve.grid import Grid  # noqa: E402 - after the XLA options
from tmesolve.io.reader import RunData  # noqa: E402
from tmesolve.io.reader import open_run as open  # noqa: A001, E402 - the documented reader name

__version__ = "0.1.0"

__all__ = ["Grid", "RunData", "open", "run", "__version__"]


def __getattr__(name: str) -> Any:
    # ``run`` needs Hydra; importing it lazily keeps the core free of Hydra.
    if name == "run":
        from tmesolve.api import run

        return run
    raise AttributeError(f"module 'tmesolve' has no attribute {name!r}")
