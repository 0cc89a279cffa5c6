"""Figures: names and units from the file, axes in mm and days, RECIST spider and waterfall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tmesolve.grid import Grid
from tmesolve.io.hdf5 import FieldSpec, RunWriter
from tmesolve.io.reader import open_run

GRID = Grid(shape=(16, 12, 6), spacing_um=25.0)
LESIONS = 2
WEEK_H = 168.0
FIELDS = [
    FieldSpec("tumour_cells", "cells/mm^3", "viable tumour cells"),
    FieldSpec("effector_t_cells", "cells/mm^3", "effector CD8+ T cells"),
    FieldSpec("ifn_gamma", "ng/mL", "interferon gamma"),
    FieldSpec("cxcl9", "ng/mL", "CXCL9/10 chemokines"),
    FieldSpec("pd_l1", "1", "PD-L1 expression"),
    FieldSpec("anti_pd1", "ug/mL", "anti-PD-1 antibody"),
    FieldSpec("oxygen", "mmHg", "oxygen"),
]


def tme_like_run(run_dir: Path, shrink: float = 0.6, categories=("SD", "PR")) -> Path:
    """A run file shaped like a TME run (two lesions, 12 weeks), with a shrinking tumour."""
    x, y, z = GRID.coordinates
    centre = GRID.centre_um
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    times = WEEK_H * np.arange(0, 13, 3)
    maps = {"vessels": (np.full((LESIONS, *GRID.shape), 0.5), "1", "vessel density")}
    with RunWriter.create(
        run_dir,
        grid=GRID,
        lesions=LESIONS,
        fields=FIELDS,
        maps=maps,
        dtype="float32",
        attrs={
            "config": "experiment:\n  kind: tme\n",
            "overrides": [],
            "seed": 0,
            "backend": "cpu (test)",
        },
        timeseries=[("tumour_burden", "cells", True), ("longest_diameter_mm", "mm", True)],
        systemic=[("plasma_pembrolizumab", "ug/mL"), ("irae_grade", "1")],
        xdmf=False,
    ) as writer:
        for k, t in enumerate(times):
            radius = 150.0 * (1.0 - (1.0 - shrink) * t / times[-1])
            tumour = 4e5 * (distance < radius)
            snapshot = {
                spec.name: np.stack(
                    [tumour * (1 + lesion) * (i + 1) / 7 for lesion in range(LESIONS)]
                )
                for i, spec in enumerate(FIELDS)
            }
            writer.append_snapshot(t, snapshot)
            burden = np.array([1e6, 5e5]) * (radius / 150.0) ** 3
            writer.append_record(
                t,
                {"tumour_burden": burden, "longest_diameter_mm": 2 * radius / 1000 * np.ones(2)},
                {"plasma_pembrolizumab": 40.0 * (k > 0), "irae_grade": 0.0},
            )
        baseline = 0.6
        writer.write_response(
            assessment_time_h=[6 * WEEK_H, 12 * WEEK_H],
            sum_diameters_mm=[baseline * (1 - 0.4 * (1 - shrink)), baseline * shrink],
            category=list(categories),
            best_response=categories[-1],
            time_to_progression_h=float("nan"),
            extra={"baseline_mm": baseline},
        )
        writer.set_status("complete")
    return run_dir


def test_run_figures_exist_for_every_kind_of_data(tmp_path):
    from tmesolve.plots import plot_run

    run_dir = tme_like_run(tmp_path / "run")
    written = plot_run(run_dir)
    names = sorted(path.name for path in written)
    # Six fields at most, the preferred ones first (tumour, T cells, IFN-γ, CXCL, PD-L1, drug): no oxygen.
    assert names == sorted(
        [
            "field_tumour_cells.png",
            "field_effector_t_cells.png",
            "field_ifn_gamma.png",
            "field_cxcl9.png",
            "field_pd_l1.png",
            "field_anti_pd1.png",
            "timeseries.png",
            "systemic.png",
            "recist_spider.png",
        ]
    )
    for path in written:
        assert path.parent == run_dir / "figures" and path.stat().st_size > 10_000


def test_field_figure_labels_units_mm_and_days(tmp_path):
    from tmesolve.plots import _field_figure

    with open_run(tme_like_run(tmp_path / "run")) as run:
        figure = _field_figure(run, "ifn_gamma", [0, 2, 4])
    image_axes = [axes for axes in figure.axes if axes.get_images()]
    assert len(image_axes) == LESIONS * 3  # rows: lesions; columns: snapshots
    assert all(
        axes.get_xlabel() == "x (mm)" and axes.get_ylabel() == "y (mm)" for axes in image_axes
    )
    assert image_axes[-1].get_title() == "lesion 1, t = 84 d"
    # The box is 0.4 mm x 0.3 mm: extents in mm.
    assert image_axes[0].get_images()[0].get_extent() == pytest.approx([0.0, 0.4, 0.0, 0.3])
    colourbar = [axes for axes in figure.axes if not axes.get_images()][0]
    assert colourbar.get_ylabel() == "interferon gamma (ng/mL)"


def test_series_and_spider_figures(tmp_path):
    from tmesolve.plots import _series_figure, _spider_figure

    with open_run(tme_like_run(tmp_path / "run")) as run:
        series = _series_figure(run, "timeseries", run.timeseries_names, "Readouts")
        systemic = _series_figure(run, "systemic", run.systemic_names, "Systemic")
        spider = _spider_figure(run)
    labels = {axes.get_ylabel() for axes in series.axes}
    assert labels == {"longest diameter (mm)", "tumour burden (cells)"}  # no "mm (mm)"
    assert all(axes.get_xlabel() == "time (d)" for axes in series.axes)
    assert len(series.axes[0].get_lines()) == LESIONS
    assert {axes.get_ylabel() for axes in systemic.axes} == {
        "plasma pembrolizumab (ug/mL)",
        "irae grade (dimensionless)",
    }
    (axes,) = spider.axes
    levels = sorted(
        line.get_ydata()[0] for line in axes.get_lines()[1:] if len(set(line.get_ydata())) == 1
    )
    assert levels == [-30.0, 0.0, 20.0]  # PR and PD thresholds and baseline
    np.testing.assert_allclose(
        axes.get_lines()[0].get_ydata(), [0.0, -16.0, -40.0]
    )  # from baseline
    assert axes.get_xlabel() == "time since baseline (weeks)"


def test_sweep_waterfall_sorted_by_best_change(tmp_path):
    from tmesolve.plots import best_percent_change, plot_sweep

    for index, (shrink, categories) in enumerate(
        [(0.9, ("SD", "SD")), (0.3, ("PR", "PR")), (1.3, ("SD", "PD"))]
    ):
        tme_like_run(tmp_path / "sweep" / str(index), shrink=shrink, categories=categories)
    (figure,) = plot_sweep(tmp_path / "sweep")
    assert figure.name == "waterfall.png" and figure.stat().st_size > 10_000
    with open_run(tmp_path / "sweep" / "1") as run:
        assert best_percent_change(run.response) == pytest.approx(-70.0)


def test_line_grids_plot_profiles(tmp_path):
    """A 1-D run (ny = nz = 1) gets profiles against x instead of images."""
    from tmesolve.plots import _field_figure

    grid = Grid(shape=(40, 1, 1), spacing_um=0.5)
    with RunWriter.create(
        tmp_path / "run",
        grid=grid,
        lesions=1,
        fields=[FieldSpec("u", "1", "population")],
        maps={},
        dtype="float32",
        attrs={"config": "", "overrides": [], "seed": 0, "backend": "cpu"},
        xdmf=False,
    ) as writer:
        for t in (0.0, 1.0, 2.0):
            writer.append_snapshot(t, {"u": np.full((1, 40, 1, 1), t)})
    with open_run(tmp_path / "run") as run:
        figure = _field_figure(run, "u", [0, 1, 2])
    (axes,) = figure.axes
    assert len(axes.get_lines()) == 3 and axes.get_xlabel() == "x (mm)"
    assert axes.get_ylabel() == "population (dimensionless)"
