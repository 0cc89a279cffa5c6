"""The TME fields of today against those an earlier commit computed (performance work must not change them).

``data/tme_reference_dcd8c8f.npz`` holds the fields of :func:`tme_reference_run.run`
as commit dcd8c8f computed them (``python tests/model/tme_reference_run.py``
at that commit), before the reaction step was rewritten field by field
(e26cb88), the readouts' pools were split per axis (8e9acdb) and the
transforms ran field by field (11da605). Those changes were meant to move
results by float32 round-off only; this test holds every later change to that.

A change that is meant to move the results (a new term, a new parameter
value, another scheme) regenerates the file at its own commit and says so:
``python tests/model/tme_reference_run.py tests/model/data/tme_reference_<commit>.npz``,
with ``REFERENCE`` and the commit checked below renamed to match.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from tme_reference_run import END_H, run

REFERENCE_COMMIT = "dcd8c8f"
REFERENCE = Path(__file__).parent / "data" / f"tme_reference_{REFERENCE_COMMIT}.npz"
#: Tolerance on each field, relative to its largest value. The two codes differ
#: in the order of float32 operations only: over the run's 144 steps they agreed to
#: 2.2e-6 here (JAX 0.12), 2.3e-6 since the transport's rates barrier (2ed3f06;
#: 2.6e-6 under JAX 0.10.2); 1e-4 leaves room for another XLA's fusion and
#: summation order, and is far below what a change of the scheme moves: a
#: step cap of 0.2 instead of 0.25 h moved the exhausted T cells by 0.33 and
#: IL-2 by 0.055 of their largest values (test_the_comparison_sees_a_change_of_the_step).
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def today():
    return run()


def largest_relative_difference(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Per field: max |ours − theirs| over the lesions and voxels, over max |theirs| (0 for a zero field)."""
    axes = tuple(range(1, theirs.ndim))
    scale = np.max(np.abs(theirs), axis=axes)
    difference = np.max(np.abs(ours.astype(np.float64) - theirs), axis=axes)
    return np.where(scale > 0, difference / np.where(scale > 0, scale, 1.0), difference)


def test_the_reference_is_what_it_says(reference):
    assert str(reference["commit"]).startswith(REFERENCE_COMMIT)
    assert reference["fields"].shape == (16, 2, 12, 12, 12) and reference["fields"].dtype == np.float32
    assert float(reference["time_h"]) == pytest.approx(END_H)
    # Both antibodies and every cell field are non-trivial, so every path is compared.
    assert np.all(np.max(np.abs(reference["fields"]), axis=(1, 2, 3, 4)) > 0)


def test_todays_fields_equal_the_reference_to_round_off(reference, today):
    assert list(today["names"]) == list(reference["names"])
    assert int(today["steps"]) == int(reference["steps"])
    assert float(today["time_h"]) == pytest.approx(float(reference["time_h"]), abs=1e-6)
    relative = largest_relative_difference(today["fields"], reference["fields"])
    worst = int(np.argmax(relative))
    assert relative[worst] <= RELATIVE_TOLERANCE, (
        f"{today['names'][worst]} differs from {REFERENCE_COMMIT} (JAX {reference['jax_version']}) by "
        f"{relative[worst]:.2e} of its largest value with JAX {jax.__version__}")


def test_the_comparison_sees_a_change_of_the_step(reference, monkeypatch):
    """The tolerance is not so loose that a different time step passes: 0.2 h instead of 0.25 h fails it."""
    import tme_reference_run

    monkeypatch.setattr(tme_reference_run, "DT_MAX_H", 0.2)
    finer = tme_reference_run.run()
    assert np.max(largest_relative_difference(finer["fields"], reference["fields"])) > 10 * RELATIVE_TOLERANCE
