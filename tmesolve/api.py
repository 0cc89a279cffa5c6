"""Python API: run tmesolve from a script or notebook with the same configuration as the CLI.

Example::

    from tmesolve.api import run

    result = run(["experiment=verify_gaussian", "grid.shape=[24,24,24]"], output_dir="runs/gauss")
    print(result.summary["within_tolerance"], result.readouts["relative_l2_error"])
    with result.open() as data:                    # tmesolve.io.RunData
        u = data.field("u", snapshot=-1, lesion=0)

``run`` composes ``conf/config.yaml`` with Hydra's compose API (the same
overrides as on the command line, e.g. ``tme=desert``,
``tme.params.D_T=300``), validates, runs in ``output_dir`` (default
``outputs/<date>/<time>`` like the CLI) and writes the same files, including
``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` so that
:func:`summarize_sweep` sees API runs like CLI jobs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tmesolve import config as configuration
from tmesolve import interrupts
from tmesolve.io.reader import RunData, open_run

log = logging.getLogger("tmesolve")


@dataclasses.dataclass
class RunResult:
    """The outcome of :func:`run`.

    Attributes:
        path: the run directory (holding run.h5, run.xmf, tmesolve.log, figures/).
        summary: the run's summary (verification error and verdict, or the
            TME model's readouts: best response, final burden, ...).
        readouts: every /timeseries and /systemic dataset by name, plus
            ``time_h`` (the record times).
    """

    path: Path
    summary: dict[str, Any]
    readouts: dict[str, np.ndarray]

    def open(self) -> RunData:
        """The run file for reading (use as a context manager)."""
        return open_run(self.path)


def compose_config(overrides: Sequence[str] = (), *, with_hydra: bool = False):
    """The composed configuration (DictConfig) of these overrides, as the CLI composes it."""
    overrides = configuration.normalise_overrides(list(overrides))
    with initialize_config_dir(
        config_dir=str(configuration.config_dir()), version_base="1.3", job_name="tmesolve"
    ):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def _read_readouts(run_dir: Path) -> dict[str, np.ndarray]:
    with open_run(run_dir) as data:
        readouts = {"time_h": data.timeseries_time}
        readouts.update({name: data.timeseries(name) for name in data.timeseries_names})
        readouts.update({name: data.systemic(name) for name in data.systemic_names})
    return readouts


class _LogFile:
    """Copy the ``tmesolve`` loggers' records into ``<run>/tmesolve.log`` while a run lasts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler: logging.Handler | None = None
        self.level = log.level

    def __enter__(self) -> _LogFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        )
        log.addHandler(self.handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()
        log.setLevel(self.level)


@interrupts.keeping_stops  # a stop that Python swallows while setting up still ends the run
def run(
    overrides: Sequence[str] = (), output_dir: str | os.PathLike[str] | None = None
) -> RunResult:
    """Compose, validate and run one configuration; returns its :class:`RunResult`.

    Args:
        overrides: Hydra overrides, as on the command line (no ``-m`` sweeps:
            loop over :func:`run` instead, or use the CLI).
        output_dir: the run directory; default ``hydra.run.dir`` of the
            configuration (``outputs/<date>/<time>``).

    Raises:
        ConfigError: a bad setting (before anything is written or compiled).
        SimulationError: the run failed (run.h5 says ``failed: <reason>``).
    """
    from tmesolve.cli import execute

    cfg = compose_config(overrides, with_hydra=True)
    run_dir = (
        Path(output_dir)
        if output_dir is not None
        else Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    )
    run_dir = run_dir.expanduser().resolve()
    mode, resume_dir = configuration.resume_setting(OmegaConf.select(cfg, "resume"))
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    task_overrides = [str(item) for item in overrides]
    if not (run_dir / "run.h5").exists() and resume_dir is None:
        configuration.write_hydra_record(run_dir, cfg, task_overrides)
    with _LogFile(run_dir / "tmesolve.log"):
        summary = execute(cfg, run_dir, task_overrides)
    return RunResult(path=run_dir, summary=dict(summary), readouts=_read_readouts(run_dir))


def resume(run_dir: str | os.PathLike[str]) -> RunResult:
    """Continue a stopped run from its checkpoint (its stored configuration is used)."""
    return run([f"resume={Path(run_dir).expanduser().resolve()}"])


# ---------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return json.dumps(value, default=str)


def _job_row(root: Path, job: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The first columns of a job's row: ``job``, ``overrides`` and one per override key."""
    row: dict[str, Any] = {
        "job": str(job.relative_to(root)) if job != root else ".",
        "overrides": " ".join(overrides),
    }
    for item in overrides:
        key, _, value = item.partition("=")
        row[key.lstrip("+~")] = value
    return row


def summarize_sweep(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per job of a sweep: its overrides, status, final readouts, response and summary.

    Columns: ``job`` (directory relative to the sweep), ``overrides`` (joined),
    each override key (``tme``, ``therapy``, ``experiment.diffusivity``, ...),
    ``status``, ``final.<timeseries>`` (``final.<name>[i]`` per lesion),
    ``final.systemic.<name>``, ``response.best_response``,
    ``response.best_percent_change``, ``response.time_to_progression_h`` and
    ``summary.<key>`` for the run's scalar summary values.
    """
    from tmesolve.plots import best_percent_change, find_runs, job_overrides

    root = Path(sweep_dir)
    rows = []
    for run_dir in find_runs(root):
        row = _job_row(root, run_dir, job_overrides(run_dir))
        with open_run(run_dir) as data:
            row["status"] = data.status
            for name in data.timeseries_names:
                values = data.timeseries(name)
                if not len(values):
                    continue
                last = np.asarray(values[-1])
                if last.ndim == 0:
                    row[f"final.{name}"] = float(last)
                else:
                    for lesion, value in enumerate(last):
                        row[f"final.{name}[{lesion}]"] = float(value)
            for name in data.systemic_names:
                values = data.systemic(name)
                if len(values):
                    row[f"final.systemic.{name}"] = float(values[-1])
            response = data.response
            if response:
                row["response.best_response"] = response.get("best_response")
                row["response.best_percent_change"] = best_percent_change(response)
                row["response.time_to_progression_h"] = response.get("time_to_progression_h")
            text = data.attrs.get("summary")
            if isinstance(text, str):
                for key, value in json.loads(text).items():
                    if key != "run_file" and not isinstance(value, (dict, list)):
                        row[f"summary.{key}"] = value
        rows.append({key: _scalar(value) for key, value in row.items()})
    return rows


#: Per-arm rates of a trial's summary that a cohort sweep's table lists (count, n, rate, CI).
_COHORT_RATES = ("orr", "cr_rate", "dcr")
#: Per-arm counts of a trial's summary that a cohort sweep's table lists.
_COHORT_COUNTS = ("therapy_held", "therapy_resumed", "therapy_discontinued", "durable_cr",
                  "touched_wall")


def summarize_cohort_sweep(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per job and arm of a sweep of ``tmesolve-cohort`` trials.

    Columns: ``job``, ``overrides`` and each override key (as in
    :func:`summarize_sweep`), ``cohort`` (the preset name), ``arm``,
    ``n_patients``, ``<rate>`` / ``<rate>.count`` / ``<rate>.lower_95`` /
    ``<rate>.upper_95`` for orr, cr_rate and dcr, ``pfs.median_h`` (NaN where
    not reached), ``pfs.events``, ``irae.rate``, the counts therapy_held,
    therapy_resumed, therapy_discontinued, durable_cr and touched_wall, and ``logrank.p_value`` (the trial's test
    across its arms).
    """
    from tmesolve.plots import _natural_key, job_overrides

    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    jobs = sorted(
        (path.parent for path in root.rglob("cohort.h5") if ".submitit" not in path.parts),
        key=_natural_key,
    )
    if not jobs:
        raise FileNotFoundError(f"{root}: no trial directories (no cohort.h5 below it)")
    import h5py

    rows = []
    for job in jobs:
        overrides = job_overrides(job)
        with h5py.File(job / "cohort.h5", "r") as handle:
            summary = json.loads(handle.attrs["summary"])
            cohort = json.loads(handle.attrs.get("cohort", "{}") or "{}")
        p_value = summary.get("logrank", {}).get("p_value")
        for arm in summary["arms"]:
            results = summary["per_arm"][arm]
            row = _job_row(root, job, overrides)
            row["cohort"] = cohort.get("name", "")
            row["arm"] = arm
            row["n_patients"] = results["n"]
            for name in _COHORT_RATES:
                rate = results[name]
                row[name] = rate["rate"]
                row[f"{name}.count"] = rate["count"]
                row[f"{name}.lower_95"] = rate["lower_95"]
                row[f"{name}.upper_95"] = rate["upper_95"]
            median = results["pfs"].get("median_h")
            row["pfs.median_h"] = math.nan if median is None else median
            row["pfs.events"] = results["pfs"].get("events")
            irae = results["irae"].get("rate")
            row["irae.rate"] = irae.get("rate") if isinstance(irae, dict) else irae
            for name in _COHORT_COUNTS:
                row[name] = results.get(name)
            row["logrank.p_value"] = p_value
            rows.append({key: _scalar(value) for key, value in row.items()})
    return rows


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def write_summary(
    rows: Sequence[dict[str, Any]], folder: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.h5`` (one dataset per column, one row per job).

    Numeric columns are float64 (NaN where a job lacks the value), the others
    UTF-8 strings ("" where missing). Column names holding "/" are stored with
    it percent-escaped; the attribute ``columns`` lists the original names in order.
    """
    import h5py

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    csv_path = folder / "summary.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    h5_path = folder / "summary.h5"
    with h5py.File(h5_path, "w") as file:
        file.attrs.create("columns", np.array(columns, dtype=h5py.string_dtype("utf-8")))
        file.attrs["jobs"] = np.int64(len(rows))
        for column in columns:
            values = [row.get(column) for row in rows]
            numeric = all(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, str))
                for value in values
            ) and any(value is not None for value in values)
            name = column.replace("%", "%25").replace("/", "%2F")
            if numeric:
                data = np.array([math.nan if value is None else float(value) for value in values])
                dataset = file.create_dataset(name, data=data)
            else:
                data = np.array(
                    ["" if value is None else str(value) for value in values],
                    dtype=h5py.string_dtype("utf-8"),
                )
                dataset = file.create_dataset(name, data=data)
            dataset.attrs["column"] = column
    return csv_path, h5_path


__all__ = [
    "RunResult",
    "compose_config",
    "resume",
    "run",
    "summarize_cohort_sweep",
    "summarize_sweep",
    "write_summary",
]
