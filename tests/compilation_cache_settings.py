"""Putting JAX's persistent-cache settings back after a test switched them."""

from __future__ import annotations

import jax
from jax.experimental.compilation_cache import compilation_cache


def restore_compilation_cache(saved: dict) -> None:
    """Put back JAX's settings ``saved`` (name: value), and reopen JAX's cache in the folder
    they name: JAX opens its cache once per process and would go on writing to the last one."""
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
