"""Shared helpers of the app tests: tiny runs in-process and as subprocesses.

Helpers reach the tests through the ``app`` fixture (``tests/`` is on the
import path, so a module of this folder cannot be imported by a plain name).

All runs of this folder share one persistent JAX compilation cache (a
session temporary folder, also inherited by subprocesses through
``TMESOLVE_CACHE_DIR``), so each tiny configuration compiles once per session.
The JAX settings a run changes (cache, x64) are restored after each module.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from compilation_cache_settings import restore_compilation_cache, saved_compilation_cache_settings

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Overrides that make a verification run tiny (8³ cells, no figures).
TINY = ["grid.shape=[8,8,8]", "output.plots=false", "output.progress=log"]

@pytest.fixture(scope="session")
def app_cache_dir(tmp_path_factory):
    """The one compilation cache of the app tests' runs."""
    return tmp_path_factory.mktemp("jax_cache")


# Module scope: a "package" fixture of a folder without __init__.py lives as long
# as the session, and the cache the runs switch on would stay on for every later test.
@pytest.fixture(scope="module", autouse=True)
def app_environment(app_cache_dir):
    """One compilation cache for the folder's runs; JAX settings restored after each module."""
    saved_settings = {**saved_compilation_cache_settings(), "jax_enable_x64": jax.config.jax_enable_x64}
    saved_cache = os.environ.get("TMESOLVE_CACHE_DIR")
    os.environ["TMESOLVE_CACHE_DIR"] = str(app_cache_dir)
    yield
    if saved_cache is None:
        os.environ.pop("TMESOLVE_CACHE_DIR", None)
    else:
        os.environ["TMESOLVE_CACHE_DIR"] = saved_cache
    restore_compilation_cache(saved_settings)  # JAX's cache back in the session's folder


@pytest.fixture
def restore_x64():
    """For tests that run in float64 (a run switches jax_enable_x64 on for the process)."""
    previous = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", previous)


class AppHelpers:
    """What the ``app`` fixture gives a test."""

    repo_root = REPO_ROOT
    tiny = TINY

    @staticmethod
    def run_in_process(args: list[str]) -> tuple[int, str, str]:
        return run_in_process(args)

    @staticmethod
    def run_subprocess(
        args: list[str], cwd: Path, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return run_subprocess(args, cwd, timeout, env)

    @staticmethod
    def datasets(path: Path, groups=("fields", "maps", "timeseries", "systemic", "time")) -> dict:
        return datasets(path, groups)


@pytest.fixture
def app() -> AppHelpers:
    return AppHelpers()


def run_in_process(args: list[str]) -> tuple[int, str, str]:
    """``tmesolve <args>`` in this process: (exit code, stdout, stderr)."""
    from tmesolve.cli import main_with_overrides

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main_with_overrides(args)
    return code, out.getvalue(), err.getvalue()


def run_subprocess(
    args: list[str], cwd: Path, timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m tmesolve.cli <args>`` in a fresh interpreter."""
    environment = dict(os.environ)
    environment.pop("TMESOLVE_DEBUG", None)
    environment.pop("HYDRA_FULL_ERROR", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tmesolve.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def datasets(
    path: Path, groups=("fields", "maps", "timeseries", "systemic", "time")
) -> dict[str, np.ndarray]:
    """Every dataset of these groups of a run file, by path."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as file:
        for group in groups:
            item = file[group]
            if isinstance(item, h5py.Dataset):
                found[group] = item[()]
                continue
            for name, dataset in item.items():
                if isinstance(dataset, h5py.Dataset):
                    found[f"{group}/{name}"] = dataset[()]
    return found
