"""Issue check too long for CI: a 1-year run of a 3-lesion patient at 32³ stays finite and non-negative.

About 10 minutes on a 2-core CPU; deselected by default, run with ``pytest -m long``.
It runs ``python -m benchmarks.year_run`` (which also records the timing) and
checks its result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.long
def test_one_year_three_lesions_at_32_cubed_stays_finite_and_non_negative(tmp_path):
    out = tmp_path / "year.json"
    subprocess.run([sys.executable, "-m", "benchmarks.year_run", "--shape", "32", "--spacing-um", "100",
                    "--days", "365", "--out", str(out)], cwd=ROOT, check=True)
    result = json.loads(out.read_text())
    assert result["all_finite"], result["checks"]
    assert result["non_negative"], result["checks"]
    assert result["checks"][-1]["day"] == 365.0
    assert result["steps"] > 1000  # a real year of steps, not an early stop
