"""The compiled-loop cache: a rerun loads the executable without tracing, and nothing stale is loaded."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compilation_cache_settings import restore_compilation_cache, saved_compilation_cache_settings

from tmesolve import executable_cache
from tmesolve.grid import Grid
from tmesolve.integrate import BatchIntegrator, Integrator, initial_state, make_solver_params, stack_pytrees
from tmesolve.model.verification import DiffusionDecay, FisherKPP, diffusion_decay_params, fisher_kpp_params

GRID = Grid((8, 8, 8), 20.0)


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh persistent cache for one test; JAX's settings restored afterwards."""
    saved = saved_compilation_cache_settings()
    from tmesolve.simulation import configure_compilation_cache

    configure_compilation_cache(tmp_path / "jax")
    yield tmp_path / "jax" / executable_cache.SUBDIRECTORY
    restore_compilation_cache(saved)


def fisher_state(model):
    x, _, _ = model.grid.coordinates
    front = np.broadcast_to(x < 60.0, model.grid.shape).astype(float)
    return initial_state(model, front[None, None])


def run_fisher(integrator, rate=0.5, t_end=2.0):
    state = fisher_state(integrator.model)
    state, readouts, _ = integrator.advance(state, fisher_kpp_params(100.0, rate), make_solver_params(0.1), t_end)
    return np.asarray(state.fields)


def test_a_second_integrator_loads_the_loop_without_tracing_and_gets_the_same_numbers(cache_dir):
    first = Integrator(FisherKPP(GRID, path="explicit"))
    expected = run_fisher(first)
    assert first.trace_count == 1 and len(list(cache_dir.glob("*.exe"))) == 1

    second = Integrator(FisherKPP(GRID, path="explicit"))
    loop, source = second.compile(fisher_state(second.model), fisher_kpp_params(100.0, 0.5),
                                  make_solver_params(0.1))
    assert source == "disk" and second.trace_count == 0
    np.testing.assert_array_equal(run_fisher(second), expected)  # the same executable: bit for bit
    # New numbers and a new stop time reuse it: no trace, no new entry.
    other = run_fisher(second, rate=0.9, t_end=3.0)
    assert second.trace_count == 0 and len(list(cache_dir.glob("*.exe"))) == 1
    assert other.sum() > expected.sum()  # a faster growth rate did take effect


def test_a_change_of_configuration_shape_or_dtype_compiles_a_new_loop(cache_dir, x64):
    run_fisher(Integrator(FisherKPP(GRID, path="explicit")))
    variants = [
        Integrator(FisherKPP(GRID, path="spectral")),                  # a model setting
        Integrator(FisherKPP(Grid((8, 8, 6), 20.0), path="explicit")),  # a shape
        Integrator(FisherKPP(Grid((8, 8, 8), 25.0), path="explicit")),  # a spacing (a constant of the trace)
        Integrator(FisherKPP(GRID, path="explicit"), splitting_order=1),  # the integrator
    ]
    for integrator in variants:
        _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5), make_solver_params(0.1))
        assert source == "compiled" and integrator.trace_count == 1
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = integrator.compile(initial_state(integrator.model, np.ones((1, 1, 8, 8, 8)), dtype=np.float64),
                                   fisher_kpp_params(100.0, 0.5, dtype=np.float64),
                                   make_solver_params(0.1, dtype=np.float64))
    assert source == "compiled"
    assert len(list(cache_dir.glob("*.exe"))) == 6


def test_batched_loops_are_cached_too(cache_dir):
    model = DiffusionDecay(GRID, path="explicit")
    states = stack_pytrees([initial_state(model, np.full((1, 1, 8, 8, 8), value)) for value in (1.0, 2.0)])
    params = stack_pytrees([diffusion_decay_params(100.0, decay) for decay in (0.1, 0.2)])
    first = BatchIntegrator(model)
    expected, _, _ = first.advance(jax.tree_util.tree_map(np.array, states), params, make_solver_params(0.1), 1.0)
    second = BatchIntegrator(model)
    result, _, _ = second.advance(states, params, make_solver_params(0.1), 1.0)
    assert first.trace_count == 1 and second.trace_count == 0
    np.testing.assert_array_equal(np.asarray(result.fields), np.asarray(expected.fields))


def test_a_corrupt_entry_is_ignored_with_a_warning_and_rewritten(cache_dir, caplog):
    expected = run_fisher(Integrator(FisherKPP(GRID, path="explicit")))
    (entry,) = cache_dir.glob("*.exe")
    entry.write_bytes(entry.read_bytes()[:100])  # a job killed while another read it, a full disk
    again = Integrator(FisherKPP(GRID, path="explicit"))
    with caplog.at_level(logging.WARNING, logger="tmesolve.executable_cache"):
        result = run_fisher(again)
    assert "ignoring compiled-loop cache entry" in caplog.text
    # Traced twice: JAX's cache had the program under the entry's name, and a
    # copy read back from there cannot be stored, so it is compiled afresh.
    assert again.trace_count == 2
    np.testing.assert_array_equal(result, expected)
    third = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = third.compile(fisher_state(third.model), fisher_kpp_params(100.0, 0.5), make_solver_params(0.1))
    assert source == "disk"
    np.testing.assert_array_equal(run_fisher(third), expected)


def test_an_entry_lost_while_jax_kept_its_executable_is_stored_from_a_fresh_compile(cache_dir):
    """JAX's copy read back from its cache fails when serialised again ("Function ... not found" at run time)."""
    expected = run_fisher(Integrator(FisherKPP(GRID, path="explicit")))
    for entry in cache_dir.glob("*.exe"):
        entry.unlink()  # JAX's persistent cache still holds the program
    second = Integrator(FisherKPP(GRID, path="explicit"))
    np.testing.assert_array_equal(run_fisher(second), expected)
    third = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = third.compile(fisher_state(third.model), fisher_kpp_params(100.0, 0.5), make_solver_params(0.1))
    assert source == "disk"
    np.testing.assert_array_equal(run_fisher(third), expected)  # runs: the stored copy is whole


class _ModelOfAnotherPackage(FisherKPP):
    """Defined outside tmesolve: its code is not in the source digest, so it is never cached."""


def test_a_model_whose_code_is_not_tmesolves_is_compiled_as_usual(cache_dir):
    integrator = Integrator(_ModelOfAnotherPackage(GRID, path="explicit"))
    _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                   make_solver_params(0.1))
    assert source == "jit" and not cache_dir.exists()


def test_without_a_persistent_cache_nothing_is_written(suite_compilation_cache):
    # Tests that configure a cache of their own restore the session's (tests/conftest.py).
    if jax.config.jax_compilation_cache_dir != str(suite_compilation_cache):
        pytest.fail("a persistent cache was left configured by an earlier test")
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert executable_cache.cache_directory() is None
        integrator = Integrator(FisherKPP(GRID, path="explicit"))
        _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                       make_solver_params(0.1))
    finally:
        restore_compilation_cache({"jax_compilation_cache_dir": str(suite_compilation_cache)})
    assert source == "jit"


def test_switching_jaxs_cache_off_switches_this_one_off(cache_dir):
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        integrator = Integrator(FisherKPP(GRID, path="explicit"))
        _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                       make_solver_params(0.1))
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    assert source == "jit" and not cache_dir.exists()


def test_the_digest_sees_closures_arrays_and_class_settings():
    def make(value):
        def scaled(u):
            return value * u
        scaled.__module__ = "tmesolve.example"
        return scaled

    assert executable_cache.object_digest(make(1.0)) != executable_cache.object_digest(make(2.0))
    assert executable_cache.object_digest(np.zeros(3)) != executable_cache.object_digest(np.ones(3))
    assert executable_cache.object_digest(np.zeros(3)) != executable_cache.object_digest(np.zeros(3, np.float32))
    model = FisherKPP(GRID, path="explicit")
    before = executable_cache.object_digest(model)
    model.trace_substeps_once = True  # a class-level setting, overridden on the instance
    assert executable_cache.object_digest(model) != before
    with pytest.raises(executable_cache.Unkeyable, match="not tmesolve's"):
        executable_cache.object_digest(lambda u: u)


def test_the_digest_tells_apart_what_names_alone_would_not():
    def pick(square: bool):
        function = (lambda u: u * u) if square else (lambda u: u)  # one qualname, two programs
        function.__module__ = "tmesolve.example"
        return function

    assert executable_cache.object_digest(pick(True)) != executable_cache.object_digest(pick(False))
    holder_class = type("Holder", (), {"__module__": "tmesolve.example"})
    first, second = FisherKPP(GRID), FisherKPP(GRID, path="explicit")
    shared, crossed = holder_class(), holder_class()
    shared.a, shared.b, shared.c = first, second, first
    crossed.a, crossed.b, crossed.c = first, second, second
    assert executable_cache.object_digest(shared) != executable_cache.object_digest(crossed)
    with pytest.raises(executable_cache.Unkeyable):
        executable_cache.object_digest(type("Plugin", (), {"__module__": "tmesolve_plugins.model"})())


def _closure_factory():
    def scaled(u):
        return 2.0 * u

    return scaled


def test_the_digest_of_code_does_not_depend_on_what_else_holds_it():
    """Marshal's newer formats flag objects with several holders: a live closure changed the key.

    In a full test run the second of two identical integrators then looked
    for another entry than the first had written (a cache miss, found as a
    missing "ignoring ... entry" warning).
    """
    before = executable_cache._code_bytes(_closure_factory)
    kept = _closure_factory()  # its code object, a constant of the factory's, now has a second holder
    assert executable_cache._code_bytes(_closure_factory) == before
    del kept


def test_the_digest_of_code_sees_constants_and_bytecode():
    def named_f(body: str):
        namespace = {}
        exec(f"def f(u):\n    return {body}\n", namespace)  # one name and qualname for all four
        return namespace["f"]

    bodies = ("u[1:-1] * 0.5", "u[1:-2] * 0.5", "u[1:-1] * 0.25", "u[1:-1] / 0.5")
    digests = {executable_cache._code_bytes(named_f(body)) for body in bodies}
    assert len(digests) == len(bodies)
    assert executable_cache._code_bytes(named_f(bodies[0])) == executable_cache._code_bytes(named_f(bodies[0]))


def test_the_module_digest_does_not_depend_on_which_modules_are_loaded_or_registered(monkeypatch):
    """A module first imported during a trace (the TME readouts import tmesolve.readouts),
    a builder registered by config validation, or a host-only flag changes no key."""
    import sys

    import tmesolve
    from tmesolve import cli, simulation

    before = executable_cache.module_settings_digest()
    monkeypatch.setattr(tmesolve, "readouts", tmesolve.readouts)  # restored with sys.modules below
    monkeypatch.delitem(sys.modules, "tmesolve.readouts")  # as if nothing had imported it yet
    assert executable_cache.module_settings_digest() == before
    simulation.available_kinds()  # fills the builder registry
    monkeypatch.setattr(cli, "_debug", not cli._debug)
    assert executable_cache.module_settings_digest() == before


def test_a_key_that_cannot_be_made_leaves_the_run_to_jax_jit(cache_dir, monkeypatch, caplog):
    def broken(*_):
        raise ImportError("a module being written")

    monkeypatch.setattr(executable_cache, "entry_key", broken)
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    with caplog.at_level(logging.WARNING, logger="tmesolve.integrate"):
        _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                       make_solver_params(0.1))
    assert source == "jit" and "no key (ImportError: a module being written)" in caplog.text


def test_a_changed_module_constant_or_edited_source_is_never_served_from_the_cache(cache_dir, monkeypatch):
    from tmesolve import implicit

    signature = executable_cache.arguments_signature((np.ones(3),))
    before = executable_cache.entry_key("owner", signature)
    monkeypatch.setattr(implicit, "_CHANGED_FOR_THIS_TEST", 1e-3, raising=False)
    assert executable_cache.entry_key("owner", signature) != before
    monkeypatch.setattr(executable_cache, "_SOURCE_READ_AT", 0.0)  # every file "edited since import"
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                   make_solver_params(0.1))
    assert source == "jit" and not cache_dir.exists()


def test_a_signature_is_decided_once_also_when_the_cache_is_not_used(cache_dir, monkeypatch):
    """Every later interval reuses the decision: no source scan or digest per interval."""
    checks = []
    monkeypatch.setattr(executable_cache, "source_changed_since_import", lambda: checks.append(1) or True)
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    state = fisher_state(integrator.model)
    for t_end in (0.5, 1.0, 1.5):
        state, _, _ = integrator.advance(state, fisher_kpp_params(100.0, 0.5), make_solver_params(0.1), t_end)
        assert integrator.last_source == "jit"
    assert len(checks) == 1 and integrator.trace_count == 1 and not cache_dir.exists()


class _IntegratorOfAnotherPackage(Integrator):
    """Its own loop code would not be in the source digest."""


@pytest.mark.parametrize("setting", ["jax_debug_nans", "foreign_integrator"])
def test_debug_modes_and_foreign_integrators_are_not_cached(cache_dir, setting):
    previous = jax.config.jax_debug_nans
    if setting == "jax_debug_nans":
        jax.config.update("jax_debug_nans", True)
        integrator = Integrator(FisherKPP(GRID, path="explicit"))
    else:
        integrator = _IntegratorOfAnotherPackage(FisherKPP(GRID, path="explicit"))
    try:
        _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                       make_solver_params(0.1))
    finally:
        jax.config.update("jax_debug_nans", previous)
    assert source == "jit" and not cache_dir.exists()


def test_the_source_digest_changes_with_any_file_of_the_package(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(executable_cache, "_PACKAGE_ROOT", tmp_path)
    digests = []
    for text in ("y = 2\n", "y = 3\n"):
        (tmp_path / "sub" / "b.py").write_text(text)
        executable_cache.source_digest.cache_clear()
        digests.append(executable_cache.source_digest())
    executable_cache.source_digest.cache_clear()
    monkeypatch.undo()
    assert digests[0] != digests[1]


def test_stale_temporary_files_go_and_a_size_limit_keeps_the_recently_used(cache_dir):
    """Housekeeping after a store: a killed writer's temporary file (over an hour
    old) is removed, a live one is not; over a size limit the least recently
    used entries go first, and a load counts as a use; JAX's
    jax_compilation_cache_max_size is the limit a store applies."""
    import os
    import time

    def store_new(shape):
        run_fisher(Integrator(FisherKPP(Grid(shape, 20.0), path="explicit")))

    store_new((8, 8, 8))
    first = next(iter(cache_dir.glob("*.exe")))
    run_fisher(Integrator(FisherKPP(GRID, path="spectral")))
    second = next(path for path in cache_dir.glob("*.exe") if path != first)
    long_ago = time.time() - 2 * executable_cache.STALE_TEMPORARY_S
    for path, when in ((first, long_ago), (second, long_ago + 10.0)):
        os.utime(path, (when, when))
    stale = cache_dir / ".killed.tmp"
    stale.write_bytes(b"half an entry")
    os.utime(stale, (long_ago, long_ago))
    live = cache_dir / ".writing.tmp"
    live.write_bytes(b"being written")

    # Loading the older entry marks it as used: now the other is the least recent.
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                   make_solver_params(0.1))
    assert source == "disk" and first.stat().st_mtime > second.stat().st_mtime

    store_new((8, 8, 6))  # no limit set: only the stale temporary file goes
    assert not stale.exists() and live.exists()
    third = next(path for path in cache_dir.glob("*.exe") if path not in (first, second))
    removed = executable_cache.prune(cache_dir, max_bytes=first.stat().st_size + third.stat().st_size)
    assert removed == [second] and {first, third} == set(cache_dir.glob("*.exe"))

    # A store applies JAX's limit and never removes what it just wrote.
    jax.config.update("jax_compilation_cache_max_size", 1)
    store_new((8, 6, 6))
    remaining = list(cache_dir.glob("*.exe"))
    assert len(remaining) == 1 and remaining[0] not in (first, third)

    # A limit of 0 means "cache nothing", as for JAX's own cache.
    jax.config.update("jax_compilation_cache_max_size", 0)
    assert executable_cache.cache_directory() is None


def test_the_test_sessions_own_cache_folder_leaves_the_loop_cache_off(suite_compilation_cache):
    """The session's JAX cache (tests/conftest.py) must not load loops: tests count traces."""
    assert jax.config.jax_compilation_cache_dir == str(suite_compilation_cache)
    assert executable_cache.cache_directory() is None
    integrator = Integrator(FisherKPP(GRID, path="explicit"))
    _, source = integrator.compile(fisher_state(integrator.model), fisher_kpp_params(100.0, 0.5),
                                   make_solver_params(0.1))
    assert source == "jit" and integrator.trace_count == 1


def test_a_new_cache_folder_takes_jaxs_own_cache_with_it(tmp_path):
    """JAX opens its cache once per process; configure_compilation_cache moves it to a new folder."""
    from tmesolve.simulation import configure_compilation_cache

    saved = saved_compilation_cache_settings()
    try:
        for scale in (5.0, 6.0):  # a program of its own for each folder
            folder = tmp_path / f"cache-{scale:g}"
            configure_compilation_cache(folder)
            jax.block_until_ready(jax.jit(lambda x, scale=scale: scale * x + 1.0)(jnp.ones(3)))
            assert any(folder.iterdir()), f"JAX wrote nothing to {folder}"
    finally:
        restore_compilation_cache(saved)
