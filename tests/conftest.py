"""Shared test settings: float64 is switched on per test via the ``x64`` fixture."""

from __future__ import annotations

import os
import signal
import sys
import weakref

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test in float64 (verification), restoring float32 afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _signal_in_a_weakref_callback(signum: int) -> list[BaseException]:
    """Deliver ``signum`` while a weakref callback runs, where Python discards what
    the handler raises ("Exception ignored in ..."), as it did with submitit's
    SIGUSR2 stop during the release of an h5py or JAX object. Returns what was
    discarded (Python's ``sys.unraisablehook`` sees it)."""

    class Released:
        pass

    discarded: list[BaseException] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: discarded.append(unraisable.exc_value)
    try:
        released = Released()
        reference = weakref.ref(released, lambda _: signal.raise_signal(signum))  # noqa: F841 (kept alive)
        del released
    finally:
        sys.unraisablehook = hook
    return discarded


@pytest.fixture
def signal_in_a_weakref_callback():
    """:func:`_signal_in_a_weakref_callback`, for a test to swallow a signal handler's stop."""
    return _signal_in_a_weakref_callback
