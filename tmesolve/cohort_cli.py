"""``tmesolve-cohort``: sample a virtual cohort, run a paired trial, write files and figures.

A Hydra app (``conf/cohort_app.yaml``; config group ``cohort`` holds the
presets per cancer type)::

    tmesolve-cohort cohort=melanoma cohort.n_patients=8 \\
        trial.arms=[ipilimumab,nivolumab,nivolumab_ipilimumab] \\
        grid.voxels=8 grid.spacing_um=80 trial.weeks=24 hydra.run.dir=cohort_out
    tmesolve-cohort -m cohort=melanoma,nsclc params.k_kill=0.2,0.3   # a sweep of trials
    tmesolve-cohort --cfg job                                          # the resolved config

writes ``cohort.h5``, ``patients.csv``, ``summary.csv``, ``report.txt`` and
``figures/`` (see :func:`tmesolve.cohort.write_trial`) into the run directory,
beside Hydra's ``.hydra/`` record and ``tmesolve-cohort.log``. ``cohort.h5``
also holds the composed configuration and the overrides (root attributes
``config`` and ``overrides``).

Each lesion box has ``grid.voxels``³ voxels of ``grid.spacing_um``; the
simulated lesion radius is drawn from 20–30 % of the box edge unless
``cohort.radius_um_range`` is set, so the lesion fits with room to grow
whatever the grid; the clinical size is the preset's represented diameter
(10–40 mm, sub-volume mode).

Errors: bad input prints ONE line on stderr, ``tmesolve-cohort: <key>: got
<value>; expected <what>``, and exits 2 before anything compiles or any trial
file (``.hydra/`` included) is written; a failed run prints one line and exits 1;
``TMESOLVE_DEBUG=1`` shows the traceback instead. Trial files of an earlier
run in the same directory are never replaced unless ``output.overwrite=true``.

Checkpoints: while it runs, the trial keeps ``progress/`` in the run directory
(:mod:`tmesolve.trial_progress`): every finished chunk of patient-arms, and an
unfinished chunk's state at most every ``output.checkpoint_minutes``. A run
stopped by a batch queue's time limit or a crash continues when the same
command runs again in the same run directory (``hydra.run.dir``;
``output.resume=auto``, the default: the settings that
change the simulated values must be the same, else it is refused, naming
them; ``always`` insists on continuing, ``never`` refuses checkpoints), so a
requeued Slurm job picks up where it stopped; the resumed trial's values are
those of an uninterrupted run. ``output.overwrite=true`` starts again where
``auto`` or ``never`` would refuse the checkpoints. ``progress/`` is removed once the trial
files are written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from tmesolve import cli
from tmesolve import config as configuration
from tmesolve.errors import ConfigError, check_non_negative, check_positive, check_range

PROG = "tmesolve-cohort"
EXIT_CONFIG_ERROR = cli.EXIT_CONFIG_ERROR
EXIT_RUN_FAILED = cli.EXIT_RUN_FAILED
EXIT_INTERRUPTED = cli.EXIT_INTERRUPTED

#: Simulated radius as a fraction of the box edge (the scenario tests use 0.3; the
#: tumour then needs weeks to reach the wall).
RADIUS_FRACTION = (0.2, 0.3)
#: Voxels per side of a lesion box.
VOXELS_RANGE = (4, 256)
#: What a run writes into its directory (an earlier run's are kept unless output.overwrite).
TRIAL_FILES = ("cohort.h5", "patients.csv", "summary.csv", "report.txt", "figures")
#: Checkpoints of an unfinished trial, in the run directory (removed once the trial files are written).
PROGRESS_DIR = "progress"
#: Hydra's own command-line flags; any other ``-x``/``--x`` is refused in one line.
_HYDRA_FLAGS = frozenset(
    {
        "-h",
        "--help",
        "--hydra-help",
        "--version",
        "-c",
        "--cfg",
        "--resolve",
        "-p",
        "--package",
        "-i",
        "--info",
        "-m",
        "--multirun",
        "-cp",
        "--config-path",
        "-cn",
        "--config-name",
        "-cd",
        "--config-dir",
        "-sc",
        "--shell-completion",
        "--experimental-rerun",
        "-v",
        "--verbose",
    }
)

log = logging.getLogger("tmesolve.cohort")
#: The trial's results (rates, files): reported also when output.progress is false.
results_log = logging.getLogger("tmesolve.cohort.results")


@dataclasses.dataclass
class TrialPlan:
    """Everything a trial run needs, validated (what :func:`plan_trial` returns)."""

    spec: Any  # tmesolve.cohort.CohortSpec
    arms: list[str]
    grid: Any  # tmesolve.grid.Grid
    options: dict[str, Any]  # keyword arguments of tmesolve.cohort.run_trial
    cuts: dict[str, Any]  # keyword arguments of tmesolve.cohort.summarize_trial
    duration_h: float
    float64: bool
    figures: bool
    overwrite: bool
    resume: str  # tmesolve.trial_progress.RESUME_MODES
    checkpoint_interval_s: float
    progress: bool
    compilation_cache_dir: str | None


def plan_trial(cfg: DictConfig) -> TrialPlan:
    """Validate every setting of the cohort app (one-line ConfigError naming the key).

    Nothing is compiled or written here.
    """
    from tmesolve.cohort import CohortSpec
    from tmesolve.grid import Grid
    from tmesolve.model.parameters import validate_overrides
    from tmesolve.therapy.regimens import REGIMENS

    if importlib.util.find_spec("lifelines") is None:
        # Checked first: the summary needs it, and it comes after the simulation.
        raise ConfigError(
            "lifelines",
            "not installed",
            "pip install 'tmesolve[analysis]' (Kaplan–Meier and log-rank of the trial summary)",
        )
    trial = cfg.trial
    arms = [str(arm).strip() for arm in trial.arms]
    if not arms:
        raise ConfigError("trial.arms", list(trial.arms), "at least one regimen")
    for arm in arms:
        if arm not in REGIMENS:
            raise ConfigError("trial.arms", arm, f"regimens among {', '.join(REGIMENS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError("trial.arms", arms, "distinct regimens")
    voxels = cfg.grid.voxels
    if not VOXELS_RANGE[0] <= voxels <= VOXELS_RANGE[1]:
        raise ConfigError(
            "grid.voxels", voxels, f"an integer in [{VOXELS_RANGE[0]}, {VOXELS_RANGE[1]}]"
        )
    spacing_um = check_positive("grid.spacing_um", cfg.grid.spacing_um)
    weeks = {
        name: check_positive(f"trial.{name}", trial[name])
        for name in ("weeks", "assessment_weeks", "durable_cr_weeks")
    }
    first_weeks = trial.first_assessment_weeks
    if first_weeks is not None:
        first_weeks = check_positive("trial.first_assessment_weeks", first_weeks)
        if first_weeks > weeks["weeks"]:
            raise ConfigError(
                "trial.first_assessment_weeks",
                first_weeks,
                f"at most trial.weeks ({weeks['weeks']:g}); a later first scan would never happen",
            )
    lead_in_weeks = check_range("trial.lead_in_weeks", trial.lead_in_weeks, 0.0, 520.0)
    weight_kg = check_range("trial.weight_kg", trial.weight_kg, 1.0, 500.0)
    solver = cfg.solver
    dt_max_h = check_positive("solver.dt_max_h", solver.dt_max_h)
    if solver.dtype not in configuration.DTYPES:
        raise ConfigError("solver.dtype", solver.dtype, f"one of {', '.join(configuration.DTYPES)}")
    if solver.chunk_size is not None and solver.chunk_size < 1:
        raise ConfigError("solver.chunk_size", solver.chunk_size, "an integer >= 1, or null")
    parameters = validate_overrides(OmegaConf.to_container(cfg.params, resolve=True), "params")

    values = OmegaConf.to_container(cfg.cohort, resolve=True)
    box_um = voxels * spacing_um
    if values.get("radius_um_range") is None:
        values["radius_um_range"] = (RADIUS_FRACTION[0] * box_um, RADIUS_FRACTION[1] * box_um)
    spec = CohortSpec(**values)  # checks the ranges and makes them tuples
    low, high = spec.radius_um_range
    if not high < 0.5 * box_um:
        raise ConfigError(
            "cohort.radius_um_range",
            list(spec.radius_um_range),
            f"radii below half the lesion box ({0.5 * box_um:g} µm = grid.voxels × "
            "grid.spacing_um / 2)",
        )
    week_h = 7 * 24.0
    options = {
        "lead_in_h": lead_in_weeks * week_h,
        "assessment_interval_h": weeks["assessment_weeks"] * week_h,
        "first_assessment_h": None if first_weeks is None else first_weeks * week_h,
        "durable_cr_h": weeks["durable_cr_weeks"] * week_h,
        "chunk_size": solver.chunk_size,
        "dt_max": dt_max_h,
        "merge_reactions": bool(solver.merge_reactions),
        "pad_lesions": bool(solver.pad_lesions),
        "parameters": parameters,
        "weight_kg": weight_kg,
    }
    markers = cfg.biomarkers
    cuts = {
        "tmb_cut": check_range("biomarkers.tmb_high", markers.tmb_high, 0.0, 1000.0),
        "pdl1_cut": check_range("biomarkers.pdl1_high", markers.pdl1_high, 0.0, 1.0),
        "irae_grade": int(check_range("biomarkers.irae_grade", markers.irae_grade, 1, 4)),
    }
    output = cfg.output
    return TrialPlan(
        spec=spec,
        arms=arms,
        grid=Grid((voxels,) * 3, spacing_um),
        options=options,
        cuts=cuts,
        duration_h=weeks["weeks"] * week_h,
        float64=solver.dtype == "float64",
        figures=bool(output.figures),
        overwrite=bool(output.overwrite),
        resume=_resume_mode(output.resume),
        checkpoint_interval_s=60.0 * check_non_negative("output.checkpoint_minutes", output.checkpoint_minutes),
        progress=bool(output.progress),
        compilation_cache_dir=output.compilation_cache_dir,
    )


def _resume_mode(value: Any) -> str:
    """``output.resume`` as one of auto, never, always (true and false mean always and never)."""
    from tmesolve.trial_progress import RESUME_MODES

    if isinstance(value, bool):
        return "always" if value else "never"
    if value not in RESUME_MODES:
        raise ConfigError("output.resume", value, "auto, never, always, true or false")
    return value


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier run's trial files unless ``output.overwrite``
    (what to do with an unfinished trial's checkpoints, run_trial decides)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("hydra.run.dir", str(run_dir), "a directory (this is a file)")
    found = [name for name in TRIAL_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            "output.overwrite",
            False,
            f"true to replace the trial files in {run_dir} ({', '.join(found)}), "
            "or another hydra.run.dir",
        )
    progress = run_dir / PROGRESS_DIR
    if progress.exists() and not progress.is_dir():
        raise ConfigError("hydra.run.dir", str(run_dir), f"a run directory whose {PROGRESS_DIR} is a folder")


def execute(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Validate ``cfg``, run the trial and write its files into ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    plan = plan_trial(cfg)
    _check_run_dir(run_dir, plan.overwrite)
    # Progress lines go with output.progress; the results are always reported.
    logging.getLogger("tmesolve").setLevel(logging.INFO if plan.progress else logging.WARNING)
    results_log.setLevel(logging.INFO)

    import jax.numpy as jnp

    from tmesolve import cohort, simulation

    attrs = simulation.provenance(configuration.to_yaml(cfg), overrides, plan.spec.seed)
    simulation.configure_precision("float64" if plan.float64 else "float32")
    dtype = jnp.float64 if plan.float64 else jnp.float32
    cache = simulation.configure_compilation_cache(plan.compilation_cache_dir, log)
    if cache:
        log.info("persistent compilation cache: %s", cache)
    samples = cohort.sample_cohort(plan.spec)
    progress = run_dir / PROGRESS_DIR
    try:
        result = cohort.run_trial(
            samples, plan.arms, plan.grid, plan.duration_h, dtype=dtype, **plan.options,
            progress_dir=progress, resume=plan.resume, checkpoint_interval_s=plan.checkpoint_interval_s,
            # output.overwrite starts again where resume would refuse the checkpoints
            # (they go once every setting is checked).
            restart=plan.overwrite,
            # Once every setting and the checkpoints are checked: a refused run leaves
            # an earlier trial's record as it was.
            before_compile=lambda: configuration.write_hydra_record(run_dir, cfg, overrides),
        )
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, SIGTERM, a launcher's requeue
        if any(progress.glob("chunk-*.h5")):
            log.warning("stopped (%s): the same command continues from the checkpoints in %s",
                        type(stop).__name__, progress)
        raise
    except ConfigError as error:
        if error.key == "trial.resume":  # checkpoints refused, of other settings, or damaged
            if "these differ" in error.expected:  # checkpoints of other settings: only starting again helps
                hint = ("output.resume=never output.overwrite=true starts the trial again"
                        if error.value == "always" else
                        "output.overwrite=true starts the trial again, or choose another hydra.run.dir")
            elif error.expected.startswith("no checkpoints"):  # never, with checkpoints of these settings
                hint = "output.resume=auto continues it, output.overwrite=true starts it again"
            else:  # a damaged file, or always with nothing to continue: the error's own advice
                hint = error.hint
            raise ConfigError("output.resume", error.value, error.expected, hint) from None
        raise
    summary = cohort.summarize_trial(result, **plan.cuts)
    paths = cohort.write_trial(
        result, summary, run_dir, cohort=plan.spec, figures=plan.figures, attrs=attrs
    )
    resumed = sum(chunk["patient_arms"] for chunk in result.chunks if not chunk["run_now"])
    if resumed or any(chunk["attempts"] > 1 for chunk in result.chunks):
        results_log.info("resumed from %s: %d patient-arms read, %.0f s of compute over every attempt",
                         progress, resumed, sum(chunk["seconds"] for chunk in result.chunks))
    # The trial files hold everything the checkpoints did; on disk first, then the checkpoints go.
    if hasattr(os, "sync"):
        os.sync()
    shutil.rmtree(progress, ignore_errors=True)
    for arm in result.arms:
        orr = summary["per_arm"][arm]["orr"]
        results_log.info(
            "%s: ORR %.1f %% (%.1f-%.1f), %d/%d",
            arm,
            100 * orr["rate"],
            100 * orr["lower_95"],
            100 * orr["upper_95"],
            orr["count"],
            orr["n"],
        )
    if summary["logrank"]["test"] != "none":
        results_log.info("log-rank p = %.3g", summary["logrank"]["p_value"])
    results_log.info("model outputs of an uncalibrated virtual cohort; files in %s:", run_dir)
    for path in paths.values():
        results_log.info("  %s", path)
    return summary


@hydra.main(
    config_path=str(configuration.config_dir()), config_name="cohort_app", version_base="1.3"
)
def _hydra_task(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task: one trial (a single run or one job of a sweep)."""
    return cli.run_job(execute, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tmesolve-cohort`` console script; returns the exit status.

    Without ``argv`` (the command line of this process, as the console script
    runs it) SIGTERM stops the trial as Ctrl-C does (``cli.run_hydra_app``).
    """
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    for item in argv:
        flag = item.split("=", 1)[0]
        if flag.startswith("-") and flag not in _HYDRA_FLAGS:
            print(
                f"{PROG}: {flag}: got an option; expected Hydra overrides such as "
                "cohort=melanoma cohort.n_patients=8 trial.arms=[nivolumab] "
                "hydra.run.dir=cohort_out (see tmesolve-cohort --help)",
                file=sys.stderr,
            )
            return EXIT_CONFIG_ERROR
    argv = configuration.normalise_overrides(argv, cohort=True)
    return cli.run_hydra_app(_hydra_task, argv, prog=PROG, prefix=f"{PROG}: ", stop_on_sigterm=own_process)


if __name__ == "__main__":
    # Dispatch to the imported module, so that launchers pickle the task by its importable name.
    from tmesolve import cohort_cli as _cohort_cli

    sys.exit(_cohort_cli.main())
