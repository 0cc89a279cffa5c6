"""tmesolve's XLA option for the CPU backend (tmesolve.xla_defaults)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tmesolve import xla_defaults
from tmesolve.xla_defaults import (
    ADDED_FLAG,
    SMALL_WHILE_LOOP_OPTION,
    apply_cpu_defaults,
    with_cpu_defaults,
    without_cpu_defaults,
)


def test_the_option_is_one_more_flag_and_the_users_flags_stay_as_written():
    assert ADDED_FLAG == f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=1024"
    assert with_cpu_defaults("") == ADDED_FLAG
    users = '--xla_backend_extra_options=a=1  --xla_dump_to="/tmp/my dumps"'
    assert with_cpu_defaults(users) == f"{users} {ADDED_FLAG}"
    # The trial fingerprint records the user's flags alone.
    assert without_cpu_defaults(with_cpu_defaults("--xla_dump_to=/d")) == "--xla_dump_to=/d"
    assert without_cpu_defaults(ADDED_FLAG) == ""


@pytest.fixture
def fresh_process(monkeypatch):
    """As in a process whose JAX backends have not started."""
    monkeypatch.setattr(xla_defaults, "_backends_started", lambda: False)


def test_added_unless_the_user_chose_a_value_or_jax_has_started(fresh_process, monkeypatch):
    environ = {"XLA_FLAGS": "--xla_dump_to=/d"}
    assert apply_cpu_defaults(environ) and environ["XLA_FLAGS"] == f"--xla_dump_to=/d {ADDED_FLAG}"
    assert not apply_cpu_defaults(environ)  # named now: a second import adds nothing
    assert apply_cpu_defaults(environ := {}) and environ["XLA_FLAGS"] == ADDED_FLAG

    chosen = {"XLA_FLAGS": f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=0"}
    assert not apply_cpu_defaults(chosen)
    assert chosen["XLA_FLAGS"] == f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=0"

    monkeypatch.setattr(xla_defaults, "_backends_started", lambda: True)
    assert not apply_cpu_defaults(environ := {}) and "XLA_FLAGS" not in environ


# Run in a fresh interpreter (XLA reads its flags once per process), with XLA_FLAGS as given:
# compile a lax.scan over a 32³ field, print whether XLA hoisted the loop into one
# single-threaded call (the HLO's "call(...), to_apply=%while"), and save the values of
# an explicit diffusion run at 48³ (a loop the option changes) to argv[1].
PROBE = """
import re, sys
import tmesolve
import jax, jax.numpy as jnp, numpy as np
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, initial_state, make_solver_params
from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params
loop = jax.jit(lambda u: jax.lax.scan(lambda x, _: (x[::-1] * 0.5 + x, None), u, None, length=5)[0])
print(bool(re.search(r"to_apply=%while", loop.lower(jnp.zeros((32, 32, 32))).compile().as_text())))
model = DiffusionDecay(Grid((48, 48, 48), 20.0), path="explicit", with_source=False)
u0 = np.random.default_rng(0).random((1, 1, 48, 48, 48)).astype(np.float32)
state, _, _ = Integrator(model).advance(
    initial_state(model, u0, dtype=jnp.float32), diffusion_decay_params(60000.0, 0.6, dtype=jnp.float32),
    make_solver_params(0.1, safety=1.0, dtype=jnp.float32), 0.05)
np.save(sys.argv[1], np.asarray(state.fields))
"""


def test_import_keeps_a_32_cubed_loop_of_steps_multithreaded_and_the_values_unchanged(tmp_path):
    def run(xla_flags: str | None, name: str) -> tuple[bool, np.ndarray]:
        environ = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
        environ["JAX_PLATFORMS"] = "cpu"  # the CPU compiler's option: on a GPU host, look at the CPU
        if xla_flags is not None:
            environ["XLA_FLAGS"] = xla_flags
        completed = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / name)], env=environ,
                                   capture_output=True, text=True, timeout=300, check=True)
        return completed.stdout.strip() == "True", np.load(tmp_path / f"{name}.npy")

    # A threshold the user set above the loop's size hoists it: the probe sees hoisting.
    hoisted, hoisted_values = run(f"--xla_backend_extra_options={SMALL_WHILE_LOOP_OPTION}=1073741824", "big")
    assert hoisted
    # With the option tmesolve adds, it stays a loop of multithreaded kernels...
    hoisted, values = run(None, "default")
    assert not hoisted
    # ...which computes the same values bit for bit (the trial fingerprint leaves the option out).
    np.testing.assert_array_equal(values, hoisted_values)
