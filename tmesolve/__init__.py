"""tmesolve: the tumour microenvironment under immunotherapy, JIT-compiled with JAX."""

from tmesolve.grid import Grid

__version__ = "0.1.0"

__all__ = ["Grid", "__version__"]
