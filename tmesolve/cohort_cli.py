"""``tmesolve-cohort``: sample a virtual cohort, run a paired trial, write files and figures.

    tmesolve-cohort --preset melanoma --patients 8 \\
        --arms ipilimumab,nivolumab,nivolumab_ipilimumab \\
        --grid 8 --spacing-um 80 --weeks 24 --out cohort_out --seed 0

writes ``cohort_out/{cohort.h5, patients.csv, summary.csv, report.txt, figures/}``
(see :func:`tmesolve.cohort.write_trial`). Plain argparse, no Hydra: a cohort
is one command, not a configuration tree.

Each lesion box has ``--grid``³ voxels of ``--spacing-um``; the simulated
lesion radius is drawn from 20–30 % of the box edge (``--radius-um`` overrides),
so the lesion fits with room to grow whatever the grid; the clinical size is the
preset's represented diameter (10–40 mm, sub-volume mode).

Errors: bad input prints ONE line on stderr and exits 2 (before anything
compiles); a failed run prints one line and exits 1; ``TMESOLVE_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tmesolve.errors import ConfigError

PROG = "tmesolve-cohort"
EXIT_CONFIG_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130

#: Simulated radius as a fraction of the box edge (the scenario tests use 0.3; the
#: tumour then needs weeks to reach the wall).
RADIUS_FRACTION = (0.2, 0.3)


class _UsageError(Exception):
    """argparse's complaint, reported as one line instead of usage + message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Sample a virtual cohort and run it under several therapy arms "
        "(the same patients in every arm).",
    )
    parser.add_argument(
        "--preset", default="melanoma", help="cohort preset (melanoma, nsclc, rcc, mss_colorectal)"
    )
    parser.add_argument(
        "--patients", type=int, default=None, help="number of patients (default: the preset's)"
    )
    parser.add_argument(
        "--arms", default="nivolumab", help="comma-separated regimens, e.g. ipilimumab,nivolumab"
    )
    parser.add_argument("--grid", type=int, default=8, help="voxels per side of each lesion box")
    parser.add_argument("--spacing-um", type=float, default=80.0, help="voxel edge (µm)")
    parser.add_argument("--weeks", type=float, default=24.0, help="weeks on therapy")
    parser.add_argument(
        "--lead-in-weeks", type=float, default=2.0, help="untreated weeks before therapy"
    )
    parser.add_argument(
        "--assessment-weeks", type=float, default=6.0, help="weeks between RECIST scans"
    )
    parser.add_argument("--lesions", default=None, help="MIN,MAX target lesions per patient (1-5)")
    parser.add_argument("--radius-um", default=None, help="LOW,HIGH simulated lesion radius (µm)")
    parser.add_argument(
        "--durable-cr-weeks",
        type=float,
        default=5 * 365.25 / 7,
        help="a CR held this long is durable (default 5 years)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="sampling seed (default: the preset's)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="patient-arms advanced together (default: from free memory)",
    )
    parser.add_argument("--dt-max", type=float, default=1.0, help="largest time step (h)")
    parser.add_argument("--float64", action="store_true", help="run in float64")
    parser.add_argument(
        "--merge-reactions",
        action="store_true",
        help="merge the reaction halves of neighbouring Strang steps (one reaction "
        "evaluation per step: faster, a different second-order scheme)",
    )
    parser.add_argument("--out", default="cohort_out", help="output directory (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an existing non-empty directory"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _pair(key: str, text: str, cast=float) -> tuple[Any, Any]:
    parts = [part.strip() for part in str(text).split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        return cast(parts[0]), cast(parts[1])
    except ValueError:
        raise ConfigError(key, text, "two comma-separated numbers LOW,HIGH") from None


@dataclasses.dataclass
class _Plan:
    spec: Any
    arms: list[str]
    grid: Any
    out: Path
    options: dict[str, Any]
    figures: bool


def _plan(args: argparse.Namespace) -> _Plan:
    """Validate every option (one-line ConfigError naming the option) before anything runs."""
    from tmesolve.cohort import COHORT_PRESETS
    from tmesolve.grid import Grid
    from tmesolve.therapy.regimens import REGIMENS

    if args.preset not in COHORT_PRESETS:
        raise ConfigError("--preset", args.preset, f"one of {', '.join(COHORT_PRESETS)}")
    preset = COHORT_PRESETS[args.preset]
    patients = preset.n_patients if args.patients is None else args.patients
    if patients < 1:
        raise ConfigError("--patients", patients, "an integer >= 1")
    arms = [arm.strip() for arm in str(args.arms).split(",") if arm.strip()]
    if not arms:
        raise ConfigError("--arms", args.arms, "at least one regimen")
    for arm in arms:
        if arm not in REGIMENS:
            raise ConfigError("--arms", arm, f"regimens among {', '.join(REGIMENS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError("--arms", args.arms, "distinct regimens")
    if not 4 <= args.grid <= 256:
        raise ConfigError("--grid", args.grid, "an integer in [4, 256] (voxels per side)")
    if not args.spacing_um > 0:
        raise ConfigError("--spacing-um", args.spacing_um, "a voxel edge > 0 µm")
    for name in ("weeks", "assessment_weeks", "durable_cr_weeks", "dt_max"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "a number > 0")
    if not args.lead_in_weeks >= 0:
        raise ConfigError("--lead-in-weeks", args.lead_in_weeks, "a number >= 0")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError("--chunk-size", args.chunk_size, "an integer >= 1")
    box_um = args.grid * args.spacing_um
    radius = (
        (RADIUS_FRACTION[0] * box_um, RADIUS_FRACTION[1] * box_um)
        if args.radius_um is None
        else _pair("--radius-um", args.radius_um)
    )
    if not 0 < radius[0] <= radius[1] < 0.5 * box_um:
        raise ConfigError(
            "--radius-um", args.radius_um, f"0 < LOW <= HIGH < half the box ({0.5 * box_um:g} µm)"
        )
    lesions = (
        (preset.lesions_min, preset.lesions_max)
        if args.lesions is None
        else _pair("--lesions", args.lesions, int)
    )
    if not 1 <= lesions[0] <= lesions[1] <= 5:
        raise ConfigError("--lesions", args.lesions, "MIN,MAX with 1 <= MIN <= MAX <= 5")
    seed = preset.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError("--seed", seed, "an integer >= 0")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "a directory (this is a file)")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError("--out", str(out), "a new or empty directory (or pass --overwrite)")

    spec = dataclasses.replace(
        preset,
        n_patients=patients,
        lesions_min=lesions[0],
        lesions_max=lesions[1],
        radius_um_range=radius,
        seed=seed,
    )
    week = 7 * 24.0
    options = {
        "duration_h": args.weeks * week,
        "lead_in_h": args.lead_in_weeks * week,
        "assessment_interval_h": args.assessment_weeks * week,
        "durable_cr_h": args.durable_cr_weeks * week,
        "chunk_size": args.chunk_size,
        "dt_max": args.dt_max,
        "float64": args.float64,
        "merge_reactions": args.merge_reactions,
    }
    return _Plan(
        spec=spec,
        arms=arms,
        grid=Grid((args.grid,) * 3, args.spacing_um),
        out=out,
        options=options,
        figures=not args.no_figures,
    )


def _run(plan: _Plan) -> int:
    import jax
    import jax.numpy as jnp

    from tmesolve import cohort

    options = dict(plan.options)
    if options.pop("float64"):
        jax.config.update("jax_enable_x64", True)
        dtype = jnp.float64
    else:
        dtype = jnp.float32
    samples = cohort.sample_cohort(plan.spec)
    duration_h = options.pop("duration_h")
    result = cohort.run_trial(samples, plan.arms, plan.grid, duration_h, dtype=dtype, **options)
    summary = cohort.summarize_trial(result)
    paths = cohort.write_trial(result, summary, plan.out, cohort=plan.spec, figures=plan.figures)
    for arm in result.arms:
        orr = summary["per_arm"][arm]["orr"]
        print(
            f"{arm}: ORR {100 * orr['rate']:.1f} % "
            f"({100 * orr['lower_95']:.1f}-{100 * orr['upper_95']:.1f}), "
            f"{orr['count']}/{orr['n']}"
        )
    if summary["logrank"]["test"] != "none":
        print(f"log-rank p = {summary['logrank']['p_value']:.3g}")
    print("model outputs of an uncalibrated virtual cohort; written to " + str(plan.out))
    for path in paths.values():
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tmesolve-cohort`` console script; returns the exit status."""
    debug = os.environ.get("TMESOLVE_DEBUG", "") not in ("", "0")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        plan = _plan(args)
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except (_UsageError, ConfigError) as error:
        if debug:
            raise
        print(f"{PROG}: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not args.quiet:
        logger = logging.getLogger("tmesolve")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return _run(plan)
    except ConfigError as error:
        if debug:
            raise
        print(f"{PROG}: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - one line for any failure; TMESOLVE_DEBUG shows it all
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else ""
        print(f"{PROG}: run failed: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
