"""Saving JAX's persistent-cache settings, and putting them back after a test switched them."""

from __future__ import annotations

import jax
from jax.experimental.compilation_cache import compilation_cache

#: The settings tmesolve.simulation.configure_compilation_cache and the tests change.
CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


def saved_compilation_cache_settings() -> dict:
    """JAX's CACHE_SETTINGS now (name: value), for :func:`restore_compilation_cache`."""
    return {name: getattr(jax.config, name) for name in CACHE_SETTINGS}


def restore_compilation_cache(saved: dict) -> None:
    """Put back JAX's settings ``saved`` (name: value), and reopen JAX's cache in the folder
    they name: JAX opens its cache once per process and would go on writing to the last one."""
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
