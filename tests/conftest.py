"""Shared test settings: float64 is switched on per test via the ``x64`` fixture, and one
persistent JAX compilation cache serves the whole session (``suite_compilation_cache``)."""

from __future__ import annotations

import os
import signal
import sys
import weakref
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402
import pytest  # noqa: E402
from compilation_cache_settings import restore_compilation_cache, saved_compilation_cache_settings  # noqa: E402

from tmesolve import executable_cache  # noqa: E402
from tmesolve.simulation import configure_compilation_cache  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def suite_compilation_cache(request, tmp_path_factory):
    """JAX's persistent compilation cache in one folder for the session, shared by the
    pytest-xdist workers, so a program that several tests compile (the same model,
    shapes and settings) is compiled once: on a 2-core VM most of the suite's time is
    XLA compiles. The executables are XLA's own, so the values are the same bit for bit.

    tmesolve's compiled-loop cache (:mod:`tmesolve.executable_cache`), which JAX's
    cache switches on, stays off in this folder: a loop loaded from it is not traced,
    and tests count traces, so a count would depend on which test ran first. Tests of
    that cache, and runs that configure ``output.compilation_cache_dir``, use folders
    of their own (``configure_compilation_cache`` moves JAX's cache there too), where
    both caches work as in a run; the fixtures that switch folders put the session's
    back with :func:`restore_compilation_cache`.
    """
    worker_root = tmp_path_factory.getbasetemp()
    run_root = worker_root.parent if hasattr(request.config, "workerinput") else worker_root
    folder = run_root / "jax-compilation-cache"
    saved = saved_compilation_cache_settings()
    configure_compilation_cache(folder)  # as a run does: every program cached
    loop_cache_directory = executable_cache.cache_directory

    def loop_cache_outside_the_suite_folder() -> Path | None:
        directory = loop_cache_directory()
        return None if directory is not None and directory.parent == folder else directory

    executable_cache.cache_directory = loop_cache_outside_the_suite_folder
    yield folder
    executable_cache.cache_directory = loop_cache_directory
    restore_compilation_cache(saved)


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


#: Test files that take longest, longest first (seconds of test time on a 2-core VM:
#: scenarios 238, Slurm 150 where CI starts one, benchmark smoke tests 168, cohort 127,
#: local terms 68, idle pass 67, resume 59; the rest under 25 each). pytest-xdist hands
#: files to its workers in collection order (``--no-loadscope-reorder`` in pyproject's
#: addopts), so these start first and the short files fill in around them, instead of a
#: long file starting last while the other worker has nothing left to do.
LONGEST_FILES_FIRST = (
    "tests/model/test_tme_scenarios.py",
    "tests/test_benchmarks_quick.py",
    "tests/app/test_slurm.py",
    "tests/test_cohort.py",
    "tests/model/test_tme_local.py",
    "tests/model/test_idle_pass.py",
    "tests/app/test_resume.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the files of LONGEST_FILES_FIRST first, in that order; the tests of a file keep theirs."""
    rank = {path: position for position, path in enumerate(LONGEST_FILES_FIRST)}
    repository = Path(__file__).resolve().parent.parent

    def file_rank(item) -> int:
        path = Path(item.path).resolve()
        if not path.is_relative_to(repository):
            return len(rank)
        return rank.get(path.relative_to(repository).as_posix(), len(rank))

    items.sort(key=file_rank)  # stable: everything else keeps its collection order
