"""A short TME run whose fields a committed file holds, as an earlier commit computed them.

    python tests/model/tme_reference_run.py OUT.npz

writes the run's fields, time and step count, with the commit and versions
that produced them. ``tests/model/data/tme_reference_dcd8c8f.npz`` was written
so at commit dcd8c8f, before the performance work that rewrote the reaction
step (e26cb88), the readouts' pools (8e9acdb) and the spectral transforms
(11da605); ``test_tme_regression.py`` checks that the code of today computes
the same fields to float32 round-off. The run uses only what dcd8c8f already
had: two lesions (inflamed, excluded) of 12³ voxels at 40 µm, nivolumab +
ipilimumab and atezolizumab from t = 0 (so both antibody fields move; a
numerical check, not a regimen), 36 h at the solver's own step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tmesolve
from tmesolve.grid import Grid
from tmesolve.integrate import Integrator, make_solver_params
from tmesolve.model.tme_setup import LesionSpec, setup_tme

SHAPE = (12, 12, 12)
SPACING_UM = 40.0
END_H = 36.0
DT_MAX_H = 0.25
THERAPY = "nivolumab_ipilimumab+atezolizumab"


def run() -> dict[str, np.ndarray]:
    """Fields (16, 2, 12, 12, 12) float32 after END_H hours, with the time and step count."""
    grid = Grid(SHAPE, SPACING_UM)
    lesions = [LesionSpec(phenotype, radius_um=0.3 * SHAPE[0] * SPACING_UM) for phenotype in ("inflamed", "excluded")]
    setup = setup_tme(grid, lesions, therapy=THERAPY, duration_h=END_H)
    state, _, diagnostics = Integrator(setup.model).advance(setup.state, setup.params,
                                                             make_solver_params(DT_MAX_H), END_H)
    if not bool(np.all(np.asarray(diagnostics["finite"]))):
        raise RuntimeError("the reference run produced non-finite values")
    return {"fields": np.asarray(state.fields), "time_h": np.asarray(state.time),
            "steps": np.asarray(state.step), "names": np.asarray(setup.model.names)}


def main(out: str) -> None:
    # The commit of the tmesolve that ran (PYTHONPATH may point at another checkout).
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(tmesolve.__file__).parent).stdout.strip()
    result = run()
    np.savez_compressed(out, **result, commit=np.asarray(commit), jax_version=np.asarray(jax.__version__),
                        dtype=np.asarray(str(jnp.result_type(result["fields"]))))
    print(f"wrote {out}: {int(result['steps'])} steps to {float(result['time_h'])} h at commit {commit[:12]}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/model/tme_reference_run.py OUT.npz")
    main(sys.argv[1])
