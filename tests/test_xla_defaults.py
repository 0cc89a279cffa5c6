"""tmesolve's XLA options for the CPU backend (tmesolve.xla_defaults)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tmesolve import xla_defaults
from tmesolve.xla_defaults import SMALL_WHILE_LOOP_OPTION, apply_cpu_defaults, with_cpu_defaults

ENTRY = f"{SMALL_WHILE_LOOP_OPTION}=131072"


def test_the_option_joins_the_users_flags():
    assert with_cpu_defaults("") == f"--xla_backend_extra_options={ENTRY}"
    assert with_cpu_defaults("--xla_dump_to=/tmp/d") == f"--xla_dump_to=/tmp/d --xla_backend_extra_options={ENTRY}"
    # Existing backend extra options keep their entries.
    assert (with_cpu_defaults("--xla_backend_extra_options=a=1 --xla_dump_to=/d")
            == f"--xla_backend_extra_options=a=1,{ENTRY} --xla_dump_to=/d")


@pytest.fixture
def fresh_cpu_process(monkeypatch):
    """As in a process whose backends have not started, with no accelerator plugin."""
    monkeypatch.setattr(xla_defaults, "_backends_started", lambda: False)
    monkeypatch.setattr(xla_defaults, "_accelerator_plugin_installed", lambda: False)


def test_added_only_where_it_can_take_effect_and_the_user_has_not_chosen(fresh_cpu_process, monkeypatch):
    environ = {"XLA_FLAGS": "--xla_dump_to=/d"}
    assert apply_cpu_defaults(environ)
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/d --xla_backend_extra_options={ENTRY}"
    assert not apply_cpu_defaults(environ)  # named now: a second import adds nothing

    chosen = {"XLA_FLAGS": f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=0"}
    assert not apply_cpu_defaults(chosen)
    assert chosen["XLA_FLAGS"] == f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=0"

    assert apply_cpu_defaults(cpu := {"JAX_PLATFORMS": "cpu"}) and ENTRY in cpu["XLA_FLAGS"]
    for platforms in ("cuda", "cuda,cpu", "tpu"):
        environ = {"JAX_PLATFORMS": platforms}
        assert not apply_cpu_defaults(environ) and "XLA_FLAGS" not in environ, platforms

    monkeypatch.setattr(xla_defaults, "_accelerator_plugin_installed", lambda: True)
    assert not apply_cpu_defaults(environ := {})
    assert apply_cpu_defaults(environ := {"JAX_PLATFORMS": "cpu"})  # CPU chosen over the plugin

    monkeypatch.setattr(xla_defaults, "_backends_started", lambda: True)
    assert not apply_cpu_defaults(environ := {"JAX_PLATFORMS": "cpu"}) and "XLA_FLAGS" not in environ


# Compiles a lax.scan over a 32³ field and prints whether XLA hoisted the loop into one
# single-threaded call (the HLO's "call(...), to_apply=%while").
HOISTED_LOOP_PROBE = """
import re, sys
if sys.argv[1] == "tmesolve":
    import tmesolve  # noqa: F401
import jax, jax.numpy as jnp
loop = jax.jit(lambda u: jax.lax.scan(lambda x, _: (x[::-1] * 0.5 + x, None), u, None, length=5)[0])
print(bool(re.search(r"to_apply=%while", loop.lower(jnp.zeros((32, 32, 32))).compile().as_text())))
"""


def test_importing_tmesolve_keeps_a_32_cubed_loop_of_steps_as_a_multithreaded_loop():
    environ = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    environ["JAX_PLATFORMS"] = "cpu"

    def hoisted(first_import: str) -> bool:
        completed = subprocess.run([sys.executable, "-c", HOISTED_LOOP_PROBE, first_import], env=environ,
                                   capture_output=True, text=True, timeout=120, check=True)
        return completed.stdout.strip() == "True"

    # XLA's default hoists it (so the probe sees the effect); after `import tmesolve` it does not.
    assert hoisted("jax")
    assert not hoisted("tmesolve")
