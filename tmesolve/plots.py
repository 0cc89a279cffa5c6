"""Figures of a run and of a sweep (matplotlib, Agg canvas; no pyplot state is touched).

* :func:`plot_run` writes ``<run>/figures/``: mid-plane slices (z = nz/2) of the
  main fields at the first, middle and last snapshot (``field_<name>.png``),
  every time series (``timeseries.png``) and patient-level series
  (``systemic.png``), and the RECIST spider plot (``recist_spider.png``) when
  the run has ``/response``.
* :func:`plot_sweep` writes ``<sweep>/figures/waterfall.png``: the best change of
  the sum of diameters per job (or, for sweeps without RECIST, a bar chart of
  each job's verification error or final readout).

Names and units come from the file (``units`` and ``long_name`` attributes),
never from literals here; axes are in mm and days (hours for runs shorter
than two days).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tmesolve.io.hdf5 import RUN_FILE_NAME, resolve_run_path
from tmesolve.io.reader import RunData, open_run

FIGURES_DIR = "figures"
#: The fields drawn for a run with many: one per category, the first name
#: matching one of the category's substrings (in order): tumour cells, T cells,
#: IFN-γ, CXCL chemokines, PD-L1, drug (antibody; the one with the highest level).
FIELD_CATEGORIES = (
    ("tumour",),
    ("effector_t", "t_cell"),
    ("ifn",),
    ("cxcl",),
    ("pd_l1", "pdl1"),
    ("anti_", "drug", "antibod"),
)
#: Most field figures drawn for one run.
MAX_FIELD_FIGURES = 6
#: RECIST thresholds drawn on spider and waterfall plots (% change of the sum of diameters).
PROGRESSION_PERCENT = 20.0
RESPONSE_PERCENT = -30.0
CATEGORY_COLOURS = {
    "CR": "#1a9850",
    "PR": "#4575b4",
    "SD": "#999999",
    "PD": "#d73027",
    "NE": "#dddddd",
}
_DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=_DPI)
    return path


def _label(name: str, units: str, long_name: str = "") -> str:
    text = long_name or name.replace("_", " ")
    words = text.split()
    # "longest diameter mm (mm)" -> "longest diameter (mm)"
    if len(words) > 1 and units and words[-1] == units.replace("^", ""):
        text = " ".join(words[:-1])
    if units == "1":
        return f"{text} (dimensionless)"
    return f"{text} ({units})" if units else text


def _units(dataset: Any) -> str:
    value = dataset.attrs.get("units", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _long_name(dataset: Any, fallback: str) -> str:
    value = dataset.attrs.get("long_name", "")
    value = value.decode() if isinstance(value, bytes) else str(value)
    return value or fallback.replace("_", " ")


def _time_axis(times_h: np.ndarray) -> tuple[np.ndarray, str, str]:
    """(times, unit label, unit name): days when the run is two days or longer, else hours."""
    times_h = np.asarray(times_h, dtype=float)
    if times_h.size and np.nanmax(times_h) >= 48.0:
        return times_h / 24.0, "time (d)", "d"
    return times_h, "time (h)", "h"


def _chosen_fields(run: RunData) -> list[str]:
    """The fields to draw: one per :data:`FIELD_CATEGORIES`, else (other models) the first few."""
    names = list(run.field_names)
    chosen: list[str] = []
    for index, patterns in enumerate(FIELD_CATEGORIES):
        is_drug = index == len(FIELD_CATEGORIES) - 1
        candidates = [
            name
            for pattern in patterns
            for name in names
            if pattern in name and name not in chosen and (is_drug or not name.startswith("anti"))
        ]
        if not candidates:
            continue
        if is_drug:
            # The drug the patient got: the antibody field with the highest level.
            levels = {name: float(np.nanmax(run.field(name, snapshot=-1))) for name in candidates}
            best = max(candidates, key=lambda name: levels[name])
            if levels[best] > 0:
                chosen.append(best)
        else:
            chosen.append(candidates[0])
    if not chosen:  # e.g. verification runs: u, cells
        chosen = names[:MAX_FIELD_FIGURES]
    return chosen


def _snapshot_indices(count: int) -> list[int]:
    return sorted({0, (count - 1) // 2, count - 1}) if count else []


def _field_figure(run: RunData, name: str, snapshots: Sequence[int]) -> Figure:
    """Mid-plane slices of one field: rows = lesions, columns = snapshots, one colour scale."""
    dataset = run.file["fields"][name]
    units, long_name = _units(dataset), _long_name(dataset, name)
    grid = run.grid
    nx, ny, nz = grid.shape
    mid = nz // 2
    lesions = run.lesions
    times, _, unit = _time_axis(run.times)
    # (lesions, snapshots, nx, ny) mid-plane slices
    slices = np.stack(
        [
            np.stack([np.asarray(dataset[s, lesion, :, :, mid], dtype=float) for s in snapshots])
            for lesion in range(lesions)
        ]
    )
    finite = slices[np.isfinite(slices)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + (abs(low) if low else 1.0)
    x0, y0 = grid.origin_um[0] / 1000.0, grid.origin_um[1] / 1000.0
    x1, y1 = x0 + grid.lengths_um[0] / 1000.0, y0 + grid.lengths_um[1] / 1000.0
    colourbar_label = _label(name, units, long_name)
    if ny == 1 and nz == 1:  # a line: plot the profiles
        figure = Figure(figsize=(7.0, 3.2 * lesions), layout="constrained")
        x = grid.axis_coordinates(0) / 1000.0
        for lesion in range(lesions):
            axes = figure.add_subplot(lesions, 1, lesion + 1)
            for column, s in enumerate(snapshots):
                axes.plot(x, slices[lesion, column, :, 0], label=f"t = {times[s]:.3g} {unit}")
            axes.set_xlabel("x (mm)")
            axes.set_ylabel(colourbar_label)
            axes.set_title(f"{long_name}, lesion {lesion}" if lesions > 1 else long_name)
            axes.legend(fontsize="small")
        return figure
    columns = len(snapshots)
    aspect = min(max((y1 - y0) / max(x1 - x0, 1e-12), 0.4), 2.5)
    # A fixed layout (no constrained layout): drawing is 2-3x faster, which
    # matters for the jobs of a sweep that each draw their figures.
    panel_width, panel_height = 3.0, 3.0 * aspect
    width = 0.9 + columns * (panel_width + 0.7) + 1.3
    height = 0.8 + lesions * (panel_height + 0.85)
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=0.9 / width,
        right=1.0 - 1.5 / width,
        bottom=0.7 / height,
        top=1.0 - 0.75 / height,
        wspace=0.7 / panel_width,
        hspace=0.85 / panel_height,
    )
    grid_axes = figure.subplots(lesions, columns, squeeze=False, sharex=True, sharey=True)
    image = None
    for lesion in range(lesions):
        for column, s in enumerate(snapshots):
            axes = grid_axes[lesion, column]
            image = axes.imshow(
                slices[lesion, column].T,
                origin="lower",
                extent=(x0, x1, y0, y1),
                vmin=low,
                vmax=high,
                cmap="viridis",
                interpolation="nearest",
                aspect="equal",
            )
            title = f"t = {times[s]:.3g} {unit}"
            if lesions > 1:
                title = f"lesion {lesion}, {title}"
            axes.set_title(title, fontsize="medium")
            axes.set_xlabel("x (mm)")
            axes.set_ylabel("y (mm)")
            axes.tick_params(labelbottom=True, labelleft=True)
    colourbar_axes = figure.add_axes(
        (1.0 - 1.15 / width, 0.7 / height, 0.18 / width, 1.0 - 1.45 / height)
    )
    colourbar = figure.colorbar(image, cax=colourbar_axes)
    colourbar.set_label(colourbar_label)
    plane = f"z = {grid.axis_coordinates(2)[mid] / 1000.0:.3g} mm" if nz > 1 else "2-D"
    figure.suptitle(f"{long_name} [{name}], mid-plane ({plane})")
    return figure


def _series_figure(run: RunData, group: str, names: Sequence[str], title: str) -> Figure:
    """One panel per dataset of /timeseries or /systemic against time, units on the axes."""
    count = len(names)
    columns = min(3, count)
    rows = math.ceil(count / columns)
    width, height = 4.6 * columns, 3.1 * rows + 0.6
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(
        left=0.95 / width,
        right=1.0 - 0.25 / width,
        bottom=0.6 / height,
        top=1.0 - 0.75 / height,
        wspace=1.2 / 3.4,
        hspace=0.95 / 2.2,
    )
    times, time_label, _ = _time_axis(run.timeseries_time)
    for index, name in enumerate(names):
        dataset = run.file[group][name]
        values = np.asarray(dataset[: run.n_records], dtype=float)
        axes = figure.add_subplot(rows, columns, index + 1)
        if values.ndim == 2:
            for lesion in range(values.shape[1]):
                axes.plot(times, values[:, lesion], marker=".", label=f"lesion {lesion}")
            if values.shape[1] > 1:
                axes.legend(fontsize="small")
        else:
            axes.plot(times, values, marker=".")
        positive = values[np.isfinite(values)]
        if positive.size and np.all(positive > 0) and positive.max() / positive.min() > 1e3:
            axes.set_yscale("log")
        axes.set_xlabel(time_label)
        axes.set_ylabel(_label(name, _units(dataset), _long_name(dataset, name)), fontsize="small")
        axes.set_title(name.replace("_", " "), fontsize="medium")
        axes.grid(alpha=0.3)
    figure.suptitle(title, y=1.0 - 0.3 / height)
    return figure


def _baseline_in_series(response: dict[str, Any]) -> bool:
    """Whether the first assessment of a /response is the baseline scan itself (at t = 0)."""
    if "percent_change" in response or response.get("baseline_mm") is not None:
        return False
    times = np.asarray(response["time_h"], dtype=float)
    return bool(times.size) and times[0] <= 0.0


def percent_change(response: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(assessment times h, % change of the sum of diameters from baseline) of a /response.

    Uses the stored ``percent_change`` when the run wrote one, else the
    ``baseline_mm`` attribute, else the first assessment as the baseline.
    """
    times = np.asarray(response["time_h"], dtype=float)
    sums = np.asarray(response["sum_diameters_mm"], dtype=float)
    stored = response.get("percent_change")
    if stored is not None and np.shape(stored) == times.shape:
        return times, np.asarray(stored, dtype=float)
    baseline = response.get("baseline_mm")
    if baseline is None or not np.isfinite(float(baseline)):
        baseline = sums[0] if sums.size else math.nan
    baseline = float(baseline)
    if not baseline > 0:
        return times, np.full_like(sums, math.nan)
    return times, 100.0 * (sums - baseline) / baseline


def best_percent_change(response: dict[str, Any]) -> float:
    """The most negative % change from baseline over the assessments (NaN without any)."""
    if "best_percent_change" in response and np.isfinite(float(response["best_percent_change"])):
        return float(response["best_percent_change"])
    _, change = percent_change(response)
    if _baseline_in_series(response):
        change = change[1:]
    change = change[np.isfinite(change)]
    return float(change.min()) if change.size else math.nan


def _spider_figure(run: RunData) -> Figure:
    response = run.response
    times, change = percent_change(response)
    weeks = times / (7 * 24.0)
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    best = str(response.get("best_response", ""))
    # Spider lines start at the baseline scan (week 0, 0 %) when it is not an assessment.
    line_weeks, line_change = weeks, change
    if weeks.size and weeks[0] > 0:
        line_weeks, line_change = np.concatenate([[0.0], weeks]), np.concatenate([[0.0], change])
    axes.plot(
        line_weeks,
        line_change,
        marker="o",
        color=CATEGORY_COLOURS.get(best, "black"),
        label=f"best response: {best}",
    )
    for week, value, category in zip(weeks, change, response.get("category", [])):
        axes.annotate(
            str(category),
            (week, value),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize="small",
        )
    axes.axhline(
        PROGRESSION_PERCENT,
        color=CATEGORY_COLOURS["PD"],
        linestyle="--",
        linewidth=1,
        label=f"+{PROGRESSION_PERCENT:g} % (progression)",
    )
    axes.axhline(
        RESPONSE_PERCENT,
        color=CATEGORY_COLOURS["PR"],
        linestyle="--",
        linewidth=1,
        label=f"{RESPONSE_PERCENT:g} % (partial response)",
    )
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xlabel("time since baseline (weeks)")
    axes.set_ylabel("change in sum of diameters from baseline (%)")
    axes.set_title("RECIST 1.1 (target lesions)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def plot_run(run_dir: str | os.PathLike[str], snapshots: Sequence[int] | None = None) -> list[Path]:
    """Draw a run's figures into ``<run_dir>/figures``; returns the PNG paths.

    Args:
        run_dir: the run directory (or its run.h5).
        snapshots: snapshot indices to slice (default: first, middle, last).
    """
    path = resolve_run_path(run_dir)
    out = path.parent / FIGURES_DIR
    written: list[Path] = []
    with open_run(path) as run:
        if run.n_snapshots:
            chosen = (
                list(snapshots) if snapshots is not None else _snapshot_indices(run.n_snapshots)
            )
            chosen = [s % run.n_snapshots for s in chosen]
            for name in _chosen_fields(run):
                written.append(_save(_field_figure(run, name, chosen), out / f"field_{name}.png"))
        if run.n_records:
            if run.timeseries_names:
                written.append(
                    _save(
                        _series_figure(run, "timeseries", run.timeseries_names, "Readouts"),
                        out / "timeseries.png",
                    )
                )
            if run.systemic_names:
                written.append(
                    _save(
                        _series_figure(
                            run, "systemic", run.systemic_names, "Patient (systemic) readouts"
                        ),
                        out / "systemic.png",
                    )
                )
        if run.response and len(run.response.get("time_h", ())):
            written.append(_save(_spider_figure(run), out / "recist_spider.png"))
    return written


# ---------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Run directories (holding run.h5) under a sweep directory, in job order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    runs = [path.parent for path in root.rglob(RUN_FILE_NAME) if ".submitit" not in path.parts]
    if not runs:
        raise FileNotFoundError(f"{root}: no run directories (no {RUN_FILE_NAME} below it)")
    return sorted(runs, key=_natural_key)


def job_overrides(run_dir: str | os.PathLike[str]) -> list[str]:
    """The job's command-line overrides from Hydra's ``.hydra/overrides.yaml`` ([] if absent)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [str(item) for item in loaded] if isinstance(loaded, list) else []


def _sweep_label(run_dir: Path, common: set[str]) -> str:
    parts = [item for item in job_overrides(run_dir) if item not in common]
    return "\n".join(parts) if parts else run_dir.name


def _fallback_metric(run: RunData) -> tuple[str, float, str] | None:
    """(name, value, units) for a job without RECIST: its verification error, or a final readout."""
    text = run.attrs.get("summary")
    if isinstance(text, str):
        summary = json.loads(text)
        if "checked_error" in summary:
            return "relative L2 error vs analytic", float(summary["checked_error"]), "1"
    for name in run.timeseries_names:
        values = run.timeseries(name)
        if values.ndim == 1 and values.size:
            return name.replace("_", " "), float(values[-1]), run.units(name, "timeseries")
    return None


def plot_sweep(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Waterfall of the best % change of the sum of diameters per job; returns the PNG paths."""
    root = Path(sweep_dir)
    runs = find_runs(root)
    all_overrides = [set(job_overrides(run)) for run in runs]
    common = set.intersection(*all_overrides) if all_overrides else set()
    labels, best, categories, fallback = [], [], [], []
    for run_dir in runs:
        with open_run(run_dir) as run:
            response = run.response
            labels.append(_sweep_label(run_dir, common))
            if response and len(response.get("time_h", ())):
                best.append(best_percent_change(response))
                categories.append(str(response.get("best_response", "NE")))
            else:
                best.append(math.nan)
                categories.append("NE")
            fallback.append(_fallback_metric(run))
    out = root / FIGURES_DIR
    width = max(6.0, 0.55 * len(runs) + 2.5)
    figure = Figure(figsize=(width, 4.8), layout="constrained")
    axes = figure.add_subplot()
    if np.any(np.isfinite(best)):
        order = np.argsort(-np.nan_to_num(np.asarray(best), nan=-np.inf))
        values = np.asarray(best)[order]
        colours = [CATEGORY_COLOURS.get(categories[i], "black") for i in order]
        axes.bar(range(len(order)), np.nan_to_num(values), color=colours)
        axes.axhline(PROGRESSION_PERCENT, color=CATEGORY_COLOURS["PD"], linestyle="--", linewidth=1)
        axes.axhline(RESPONSE_PERCENT, color=CATEGORY_COLOURS["PR"], linestyle="--", linewidth=1)
        axes.axhline(0.0, color="black", linewidth=0.5)
        axes.set_ylabel("best change in sum of diameters (%)")
        axes.set_title("Best overall response per job (RECIST 1.1)")
        handles = [
            Patch(color=colour, label=name)
            for name, colour in CATEGORY_COLOURS.items()
            if name in categories
        ]
        axes.legend(handles=handles, fontsize="small")
        name = "waterfall.png"
    else:
        available = [item for item in fallback if item is not None]
        if not available:
            raise ValueError(
                f"{root}: the runs have neither RECIST responses nor readouts to compare"
            )
        metric, _, units = available[0]
        values = np.asarray(
            [item[1] if item is not None and item[0] == metric else math.nan for item in fallback]
        )
        order = np.argsort(-np.nan_to_num(values, nan=-np.inf))
        axes.bar(range(len(order)), np.nan_to_num(values[order]), color="#4575b4")
        if (
            np.all(values[np.isfinite(values)] > 0)
            and np.nanmax(values) / max(np.nanmin(values), 1e-300) > 100
        ):
            axes.set_yscale("log")
        axes.set_ylabel(_label(metric, units))
        axes.set_title(f"{metric} per job")
        name = "sweep_" + re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_") + ".png"
    axes.set_xticks(
        range(len(order)), [labels[i] for i in order], rotation=60, ha="right", fontsize="x-small"
    )
    axes.set_xlabel("job (overrides)")
    axes.grid(axis="y", alpha=0.3)
    return [_save(figure, out / name)]


__all__ = [
    "FIGURES_DIR",
    "best_percent_change",
    "find_runs",
    "job_overrides",
    "percent_change",
    "plot_run",
    "plot_sweep",
]
