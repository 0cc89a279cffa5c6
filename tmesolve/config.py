"""Configuration at the edge: Hydra schemas, conversion to typed settings, validation.

This is the only module of tmesolve that imports Hydra or OmegaConf. It

1. registers the *schema* of ``conf/config.yaml`` in Hydra's ConfigStore
   (mutable ``...Conf`` dataclasses, so Hydra type-checks composition and
   refuses unknown keys), and
2. turns a composed ``DictConfig`` into the frozen, typed :class:`RunConfig`
   tree that the core receives, checking every value on the way: a bad value
   raises :class:`~tmesolve.errors.ConfigError` naming the key, the value and
   what was expected, before any file is written or anything compiles.

The typed tree (what a builder such as ``build_tme_simulation`` receives)::

    RunConfig
      experiment: ExperimentConfig   kind ("tme", "verify_gaussian", ...) and the
                                     numbers of the verification problems
      grid:       GridConfig         shape (nx, ny, nz) <= 512 each, spacing_um > 0
      tme:        TMEConfig          preset ("inflamed" | "excluded" | "desert") and
                                     params: symbol -> number or "value unit" string
                                     (checked against the parameter table when it is
                                     importable; the TME builder converts them)
      patient:    PatientConfig      name, lesions: 1..5 x LesionConfig(phenotype,
                                     tmb (mut/Mb), radius_um, pdl1_baseline,
                                     represented_diameter_mm, maps {name: path},
                                     seed, params {per-lesion symbol: value})
      therapy:    TherapyConfig      regimens (names), start_day >= 0, act_cells,
                                     weight_kg, management_rule
      solver:     SolverConfig       dt_max_h > 0, safety in (0, 1], splitting_order
                                     1 | 2, dtype "float32" | "float64", max_steps
      output:     OutputConfig       interval_h, duration_h (hours), snapshot_every,
                                     fields ("all" or names), plots, progress,
                                     log_interval_s, compilation_cache_dir,
                                     stop_after_snapshots (testing: stop cleanly)
      seed:       int in [0, 2**32 - 1]
      resume:     "auto" | "never" | "always" (and the run directory, if given)

Defaults that depend on others are resolved here, so the tree is explicit: a
lesion without a phenotype takes the TME preset, without a TMB the preset's
TMB (``geometry.DEFAULT_TMB``), without a seed one derived from the run seed
(``geometry.lesion_seeds``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from tmesolve.errors import (
    ConfigError,
    check_finite,
    check_non_negative,
    check_positive,
    check_range,
)

# ---------------------------------------------------------------------------
# Limits and names (listed once)
# ---------------------------------------------------------------------------

#: Largest number of cells along one axis (512 voxels of 20 µm = 1 cm).
MAX_AXIS_CELLS = 512
#: Most lesions per patient (the leading batch axis).
MAX_LESIONS = 5
#: Largest seed (NumPy and JAX seeds are unsigned 32-bit).
MAX_SEED = 2**32 - 1
#: Float dtypes a run may use.
DTYPES = ("float32", "float64")
#: Splitting orders of the stepper (Lie, Strang).
SPLITTING_ORDERS = (1, 2)
#: How a run reports progress: a tqdm bar on a terminal, log lines otherwise.
PROGRESS_MODES = ("auto", "bar", "log", "off")
#: What to do when the run directory already holds run.h5: ``auto`` resumes it
#: if it was made with the same configuration (refuses otherwise), ``never``
#: refuses, ``always`` resumes it (error if there is none).
RESUME_MODES = ("auto", "never", "always")
#: Experiment kinds of the verification problems (the TME model is "tme").
VERIFICATION_KINDS = (
    "verify_gaussian",
    "verify_cosine",
    "verify_source",
    "verify_chemotaxis",
    "verify_fisher",
)
#: Ways a verification problem may diffuse (``tmesolve.model.verification``).
DIFFUSION_PATHS = ("spectral", "explicit")
#: Immunophenotype presets (``tmesolve.geometry.PHENOTYPES``), listed here too so
#: that this module validates without importing the model.
PHENOTYPES = ("inflamed", "excluded", "desert")
#: Lesion maps a user may load from a file (``tmesolve.geometry.MAP_NAMES``).
MAP_NAMES = ("tumour_cells", "vessels", "stroma", "antigenicity")
#: Settings that steer *how* a run goes, not *what* it computes: a resumed run
#: takes them from the new command line, and they are left out when comparing a
#: run directory's stored configuration with a new one.
RUN_CONTROL_KEYS = (
    "resume",
    "output.progress",
    "output.log_interval_s",
    "output.plots",
    "output.compilation_cache_dir",
    "output.stop_after_snapshots",
)
#: Open mappings whose keys are not known to the schema: an override of one of
#: their entries gets Hydra's ``++`` (add or replace) prefix automatically.
_OPEN_MAPPING_KEY = re.compile(r"^(tme\.params|patient\.lesions\.\d+\.params)\.[^=]+=")
#: The same for the cohort app (``params.<symbol>=...``).
_OPEN_COHORT_MAPPING_KEY = re.compile(r"^params\.[^=]+=")


# ---------------------------------------------------------------------------
# Hydra schema (mutable dataclasses; defaults mirror conf/*.yaml)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ExperimentConf:
    """``experiment``: which problem runs, and the numbers of the verification problems."""

    kind: str = "tme"
    description: str = ""
    #: D (µm²/h) of the verification problems (cell D_u for chemotaxis).
    diffusivity: float = 60_000.0
    #: λ (h⁻¹).
    decay: float = 0.6
    #: uniform source S (units/h), verify_source.
    source: float = 3.0
    #: σ₀ (µm) of the initial Gaussian; width of the Fisher–KPP shift region.
    initial_width_um: float = 40.0
    #: "spectral" (exact propagator) or "explicit" (finite-volume stencil).
    path: str = "spectral"
    #: χ (µm²·h⁻¹ per unit attractant), verify_chemotaxis.
    sensitivity: float = 20_000.0
    #: width (µm) of the frozen attractant bump, verify_chemotaxis.
    attractant_width_um: float = 120.0
    #: growth rate r (h⁻¹), verify_fisher.
    rate: float = 1.0
    #: initial cell density (cells/mm³), verify_chemotaxis.
    initial_density: float = 1000.0
    #: accepted relative L2 error; null: the problem's documented tolerance.
    tolerance: float | None = None


@dataclasses.dataclass
class GridConf:
    """``grid``: cells along (x, y, z) and voxel edge (µm)."""

    shape: list[int] = dataclasses.field(default_factory=lambda: [64, 64, 64])
    spacing_um: float = 20.0


@dataclasses.dataclass
class TMEConf:
    """``tme``: immunophenotype preset and parameter overrides (symbol -> value)."""

    preset: str = "inflamed"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LesionMapsConf:
    """``patient.lesions[i].maps``: optional user maps (.npy, .h5) replacing generated ones."""

    tumour_cells: str | None = None
    vessels: str | None = None
    stroma: str | None = None
    antigenicity: str | None = None


@dataclasses.dataclass
class LesionConf:
    """One lesion of the patient."""

    name: str | None = None
    phenotype: str | None = None
    tmb: float | None = None
    radius_um: float = 300.0
    pdl1_baseline: float | None = None
    represented_diameter_mm: float | None = 20.0  # sub-volume of a 2 cm lesion (calibration); None: whole lesion
    maps: LesionMapsConf = dataclasses.field(default_factory=LesionMapsConf)
    seed: int | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PatientConf:
    """``patient``: the lesions (1..5) sharing one systemic compartment."""

    name: str = "patient"
    lesions: list[LesionConf] = dataclasses.field(default_factory=lambda: [LesionConf()])


@dataclasses.dataclass
class TherapyConf:
    """``therapy``: regimen names (``tmesolve.therapy.regimens.REGIMENS``) and their settings."""

    name: str = "none"
    regimens: list[str] = dataclasses.field(default_factory=list)
    start_day: float = 0.0
    act_cells: float | None = None
    weight_kg: float = 75.0
    management_rule: bool = True


@dataclasses.dataclass
class SolverConf:
    """``solver``: the time stepper."""

    dt_max_h: float = 0.5
    safety: float = 0.9
    splitting_order: int = 2
    merge_reactions: bool = False
    dtype: str = "float32"
    max_steps: int = 10_000_000


@dataclasses.dataclass
class OutputConf:
    """``output``: what is written and how the run reports."""

    interval_h: float = 168.0
    duration_h: float = 2016.0
    snapshot_every: int = 1
    fields: Any = "all"
    plots: bool = True
    progress: str = "auto"
    log_interval_s: float = 30.0
    compilation_cache_dir: str | None = "${oc.env:TMESOLVE_CACHE_DIR,'~/.cache/tmesolve/jax'}"
    stop_after_snapshots: int | None = None


@dataclasses.dataclass
class RunConf:
    """The whole configuration (``conf/config.yaml`` composes onto this)."""

    experiment: ExperimentConf = dataclasses.field(default_factory=ExperimentConf)
    grid: GridConf = dataclasses.field(default_factory=GridConf)
    tme: TMEConf = dataclasses.field(default_factory=TMEConf)
    patient: PatientConf = dataclasses.field(default_factory=PatientConf)
    therapy: TherapyConf = dataclasses.field(default_factory=TherapyConf)
    solver: SolverConf = dataclasses.field(default_factory=SolverConf)
    output: OutputConf = dataclasses.field(default_factory=OutputConf)
    seed: int = 0
    #: "auto" | "never" | "always", or a run directory to resume (the CLI then
    #: runs in that directory).
    resume: Any = "auto"


# ---------------------------------------------------------------------------
# Hydra schema of the cohort app (conf/cohort_app.yaml, ``tmesolve-cohort``)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class CohortConf:
    """``cohort``: how to draw the virtual patients (fields of ``tmesolve.cohort.CohortSpec``).

    The presets per cancer type are the files of ``conf/cohort/``.
    """

    name: str = "custom"
    n_patients: int = 20
    lesions_min: int = 1
    lesions_max: int = 3
    phenotype_probabilities: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"inflamed": 1 / 3, "excluded": 1 / 3, "desert": 1 / 3}
    )
    tmb_median: float = 8.0
    tmb_sigma: float = 1.0
    tmb_lesion_sigma: float = 0.25
    pdl1_baseline_range: Any = dataclasses.field(default_factory=lambda: [0.05, 0.4])
    #: null: 20–30 % of the lesion box edge (grid.voxels × grid.spacing_um).
    radius_um_range: Any = None
    #: null: whole-lesion mode (RECIST on the thresholded mask).
    represented_diameter_mm_range: Any = dataclasses.field(default_factory=lambda: [10.0, 40.0])
    seed: int = 0
    source: str = ""


@dataclasses.dataclass
class TrialConf:
    """``trial``: the arms (regimen names; the same patients in each) and the schedule (weeks)."""

    arms: list[str] = dataclasses.field(default_factory=lambda: ["nivolumab"])
    weeks: float = 24.0
    lead_in_weeks: float = 2.0
    assessment_weeks: float = 6.0
    #: weeks from the baseline to the first scan; null: assessment_weeks.
    first_assessment_weeks: float | None = None
    durable_cr_weeks: float = 5 * 365.25 / 7
    weight_kg: float = 75.0


@dataclasses.dataclass
class CohortGridConf:
    """``grid`` of the cohort app: every lesion box is ``voxels``³ voxels of ``spacing_um``."""

    voxels: int = 8
    spacing_um: float = 80.0


@dataclasses.dataclass
class CohortSolverConf:
    """``solver`` of the cohort app."""

    dt_max_h: float = 1.0
    dtype: str = "float32"
    merge_reactions: bool = False
    #: patient-arms advanced together; null: chosen from the free memory.
    chunk_size: int | None = None
    #: pad every patient to the cohort's largest lesion count: one compile for the
    #: whole cohort, more lesions computed (false: one compile per lesion count).
    pad_lesions: bool = False


@dataclasses.dataclass
class CohortOutputConf:
    """``output`` of the cohort app (files go to the Hydra run directory)."""

    figures: bool = True
    #: replace the trial files of an earlier run in the same directory.
    overwrite: bool = False
    #: checkpoints of an unfinished trial in the run directory's progress/: "auto"
    #: continues them if made with the same settings, "always" (true) continues them,
    #: "never" (false) refuses them (output.overwrite=true then starts again).
    resume: Any = "auto"
    #: least wall time between two checkpoints of an unfinished chunk (minutes; 0: every stop).
    checkpoint_minutes: float = 30.0
    progress: bool = True
    compilation_cache_dir: str | None = "${oc.env:TMESOLVE_CACHE_DIR,'~/.cache/tmesolve/jax'}"


@dataclasses.dataclass
class BiomarkerConf:
    """``biomarkers``: the cuts of the trial summary's subgroup tables."""

    #: TMB-high: patient TMB >= this (mut/Mb; 10 is the KEYNOTE-158 cut).
    tmb_high: float = 10.0
    #: PD-L1-high: mean tumour PD-L1 of the largest lesion at baseline >= this (0–1).
    pdl1_high: float = 0.5
    #: irAE-positive: largest irAE grade over the run >= this (1–4).
    irae_grade: int = 2


@dataclasses.dataclass
class CohortAppConf:
    """The cohort app's configuration (``conf/cohort_app.yaml`` composes onto this)."""

    cohort: CohortConf = dataclasses.field(default_factory=CohortConf)
    trial: TrialConf = dataclasses.field(default_factory=TrialConf)
    grid: CohortGridConf = dataclasses.field(default_factory=CohortGridConf)
    #: global parameter overrides for every patient (symbol -> number or "value unit").
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    biomarkers: BiomarkerConf = dataclasses.field(default_factory=BiomarkerConf)
    solver: CohortSolverConf = dataclasses.field(default_factory=CohortSolverConf)
    output: CohortOutputConf = dataclasses.field(default_factory=CohortOutputConf)


COHORT_SCHEMA_NAME = "cohort_app_schema"

SCHEMA_NAME = "tmesolve_schema"


def register_configs() -> None:
    """Register the schemas of ``conf/config.yaml`` and ``conf/cohort_app.yaml`` in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConf, provider="tmesolve")
    store.store(name=COHORT_SCHEMA_NAME, node=CohortAppConf, provider="tmesolve")


#: conf/hydra/launcher/submitit_slurm.yaml shadows the plugin's config of that
#: name; Hydra then merges it onto the plugin's schema and warns that this
#: "automatic schema matching" is deprecated. The merge is what we want (typed
#: options) and the file works without it, so the warning is noise.
warnings.filterwarnings(
    "ignore",
    message=r"(?s).*is validated against ConfigStore schema with the same name",
    category=UserWarning,
)

register_configs()


def config_dir() -> Path:
    """The ``conf/`` folder: top level of the source tree, or shipped inside the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"tmesolve configuration folder not found (looked for conf/config.yaml beside "
        f"{package}); reinstall tmesolve"
    )


def normalise_overrides(overrides: Sequence[str], *, cohort: bool = False) -> list[str]:
    """Command-line overrides with ``++`` added to entries of the open parameter mappings.

    ``tme.params.D_T=300`` sets a parameter that the preset does not list;
    plain Hydra would demand ``+tme.params.D_T=300``. Parameter symbols are
    checked later against the parameter table, so nothing is lost. With
    ``cohort=True`` the open mapping is the cohort app's ``params``.
    """
    pattern = _OPEN_COHORT_MAPPING_KEY if cohort else _OPEN_MAPPING_KEY
    return [f"++{item}" if pattern.match(item) else item for item in overrides]


# ---------------------------------------------------------------------------
# The typed tree (frozen; what the core receives)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Which problem runs; the numbers below are used by the verification problems only.

    Attributes:
        kind: "tme" or one of :data:`VERIFICATION_KINDS`.
        description: free text.
        diffusivity: D (µm²/h), ≥ 0 (> 0 for chemotaxis and Fisher–KPP).
        decay: λ (h⁻¹), ≥ 0.
        source: S (units/h), finite.
        initial_width_um: σ₀ (µm), > 0.
        path: "spectral" or "explicit".
        sensitivity: χ (µm²·h⁻¹ per unit attractant), finite.
        attractant_width_um: width of the attractant bump (µm), > 0.
        rate: growth rate r (h⁻¹), > 0.
        initial_density: initial cell density (cells/mm³), > 0.
        tolerance: accepted relative L2 error, or None for the problem's default.
    """

    kind: str
    description: str = ""
    diffusivity: float = 60_000.0
    decay: float = 0.6
    source: float = 3.0
    initial_width_um: float = 40.0
    path: str = "spectral"
    sensitivity: float = 20_000.0
    attractant_width_um: float = 120.0
    rate: float = 1.0
    initial_density: float = 1000.0
    tolerance: float | None = None


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Attributes: shape (nx, ny, nz) cells; spacing_um voxel edge (µm)."""

    shape: tuple[int, int, int]
    spacing_um: float

    def to_grid(self):
        """The core :class:`tmesolve.grid.Grid`."""
        from tmesolve.grid import Grid

        return Grid(shape=self.shape, spacing_um=self.spacing_um)


@dataclasses.dataclass(frozen=True)
class TMEConfig:
    """Attributes: preset (immunophenotype preset name); params symbol -> number or "value unit"."""

    preset: str
    params: Mapping[str, float | str]


@dataclasses.dataclass(frozen=True)
class LesionConfig:
    """One lesion (defaults already resolved).

    Attributes:
        name: label used in plots and tables ("lesion_0" if not given).
        phenotype: immunophenotype preset of the lesion's maps.
        tmb: tumour mutational burden (mut/Mb), ≥ 0.
        radius_um: initial radius (µm), > 0.
        pdl1_baseline: baseline PD-L1 expression, or None for the model default.
        represented_diameter_mm: diameter of the larger lesion this box samples
            (sub-volume mode), or None (whole lesion in the box).
        maps: map name -> path of a user map (validated: exists, right shape).
        seed: seed of the lesion's maps.
        params: per-lesion parameter overrides (symbol -> value).
    """

    name: str
    phenotype: str
    tmb: float
    radius_um: float
    pdl1_baseline: float | None
    represented_diameter_mm: float | None
    maps: Mapping[str, str]
    seed: int
    params: Mapping[str, float | str]


@dataclasses.dataclass(frozen=True)
class PatientConfig:
    """Attributes: name; lesions (1..MAX_LESIONS)."""

    name: str
    lesions: tuple[LesionConfig, ...]


@dataclasses.dataclass(frozen=True)
class TherapyConfig:
    """Attributes: name; regimens (REGIMENS names, combined); start_day (d ≥ 0);
    act_cells (cells per infusion or None: parameter default); weight_kg;
    management_rule (the irAE rule: withhold the checkpoint drugs and give steroids at
    grade ≥ 3, resume or stop for good as the labels direct; tmesolve.model.systemic)."""

    name: str
    regimens: tuple[str, ...]
    start_day: float
    act_cells: float | None
    weight_kg: float
    management_rule: bool

    @property
    def start_h(self) -> float:
        return self.start_day * 24.0


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Attributes: dt_max_h (h); safety; splitting_order (1 Lie, 2 Strang); merge_reactions
    (merge the reaction halves of neighbouring Strang steps: one reaction evaluation per
    step, a different second-order scheme); dtype; max_steps."""

    dt_max_h: float
    safety: float
    splitting_order: int
    merge_reactions: bool
    dtype: str
    max_steps: int


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Attributes: interval_h, duration_h (h); snapshot_every (write fields every n-th
    output); fields ("all" or a tuple of names); plots; progress mode;
    log_interval_s; compilation_cache_dir (None: off); stop_after_snapshots
    (testing: stop cleanly, resumable, after that many snapshots; None: never)."""

    interval_h: float
    duration_h: float
    snapshot_every: int
    fields: str | tuple[str, ...]
    plots: bool
    progress: str
    log_interval_s: float
    compilation_cache_dir: str | None
    stop_after_snapshots: int | None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The validated configuration of one run (see the module docstring)."""

    experiment: ExperimentConfig
    grid: GridConfig
    tme: TMEConfig
    patient: PatientConfig
    therapy: TherapyConfig
    solver: SolverConfig
    output: OutputConfig
    seed: int
    resume: str
    resume_dir: str | None = None


# ---------------------------------------------------------------------------
# Conversion and validation
# ---------------------------------------------------------------------------


def _integer(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(key, value, f"an integer in [{low}, {high}]")
    if not low <= value <= high:
        raise ConfigError(key, value, f"an integer in [{low}, {high}]")
    return int(value)


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(choices))
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (resolved)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _mapping(key: str, value: Any) -> dict[str, Any]:
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "a mapping of name to value")
    for name, item in value.items():
        if not isinstance(item, (int, float, str)) or isinstance(item, bool):
            raise ConfigError(f"{key}.{name}", item, "a number or a 'value unit' string")
    return dict(value)


def _check_tme_params(key: str, params: Mapping[str, Any], per_lesion: bool = False) -> None:
    """Validate parameter overrides against the parameter table, when it is importable."""
    try:
        from tmesolve.model.parameters import validate_overrides
    except ImportError:  # the model is not part of this build: the builder checks
        return
    validate_overrides(params, key, per_lesion=per_lesion)


def _experiment(node: Any) -> ExperimentConfig:
    from tmesolve.simulation import available_kinds

    kinds = available_kinds()
    kind = node.kind
    if kind not in kinds:
        hint = ""
        if kind == "tme":
            hint = "the TME model (tmesolve.model.tme_setup) is not available in this build"
        raise ConfigError("experiment.kind", kind, "one of " + ", ".join(kinds), hint=hint)
    tolerance = node.tolerance
    if tolerance is not None:
        tolerance = check_positive("experiment.tolerance", tolerance)
    diffusivity = check_non_negative("experiment.diffusivity", node.diffusivity)
    if (
        kind in ("verify_chemotaxis", "verify_fisher", "verify_gaussian", "verify_cosine")
        and diffusivity == 0.0
    ):
        raise ConfigError("experiment.diffusivity", node.diffusivity, "a number > 0 (µm²/h)")
    return ExperimentConfig(
        kind=kind,
        description=str(node.description or ""),
        diffusivity=diffusivity,
        decay=check_non_negative("experiment.decay", node.decay),
        source=check_finite("experiment.source", node.source),
        initial_width_um=check_positive("experiment.initial_width_um", node.initial_width_um),
        path=_choice("experiment.path", node.path, DIFFUSION_PATHS),
        sensitivity=check_finite("experiment.sensitivity", node.sensitivity),
        attractant_width_um=check_positive(
            "experiment.attractant_width_um", node.attractant_width_um
        ),
        rate=check_positive("experiment.rate", node.rate),
        initial_density=check_positive("experiment.initial_density", node.initial_density),
        tolerance=tolerance,
    )


def _grid(node: Any) -> GridConfig:
    shape = _plain(node.shape)
    if not isinstance(shape, list) or len(shape) not in (2, 3):
        raise ConfigError("grid.shape", shape, "2 or 3 positive integers, e.g. [64, 64, 64]")
    cells = tuple(_integer(f"grid.shape[{i}]", n, 1, MAX_AXIS_CELLS) for i, n in enumerate(shape))
    if len(cells) == 2:
        cells = (*cells, 1)
    spacing = check_positive("grid.spacing_um", node.spacing_um)
    return GridConfig(shape=cells, spacing_um=spacing)  # type: ignore[arg-type]


def _lesion(
    node: Any, index: int, preset: str, grid: GridConfig, seed: int, check_geometry: bool
) -> LesionConfig:
    key = f"patient.lesions[{index}]"
    phenotype = node.phenotype if node.phenotype is not None else preset
    phenotype = _choice(f"{key}.phenotype", phenotype, PHENOTYPES)
    if node.tmb is None:
        from tmesolve.geometry import DEFAULT_TMB

        tmb = float(DEFAULT_TMB[phenotype])
    else:
        tmb = check_non_negative(f"{key}.tmb", node.tmb)
    radius = check_positive(f"{key}.radius_um", node.radius_um)
    represented = node.represented_diameter_mm
    if represented is not None:
        represented = check_positive(f"{key}.represented_diameter_mm", represented)
    elif check_geometry:
        # A whole lesion must fit in the box (along every axis with more than one cell).
        lengths = [n * grid.spacing_um for n in grid.shape if n > 1]
        half_box = 0.5 * min(lengths) if lengths else math.inf
        if radius >= half_box:
            raise ConfigError(
                f"{key}.radius_um",
                node.radius_um,
                f"a radius < {half_box:g} µm (half the box edge)",
                hint="enlarge the grid or set represented_diameter_mm for a sub-volume",
            )
    pdl1 = node.pdl1_baseline
    if pdl1 is not None:
        pdl1 = check_non_negative(f"{key}.pdl1_baseline", pdl1)
    maps: dict[str, str] = {}
    for name in MAP_NAMES:
        path = getattr(node.maps, name)
        if path is None or path == "":
            continue
        from tmesolve.geometry import load_map

        expanded = os.path.expanduser(str(path))
        if check_geometry:
            load_map(expanded, name, grid.shape, key=f"{key}.maps.{name}")  # exists, shape, range
        elif not os.path.isfile(expanded):
            raise ConfigError(f"{key}.maps.{name}", str(path), "an existing .npy or .h5 file")
        maps[name] = os.path.abspath(expanded)
    lesion_seed = seed if node.seed is None else _integer(f"{key}.seed", node.seed, 0, MAX_SEED)
    params = _mapping(f"{key}.params", node.params)
    name = node.name if node.name else f"lesion_{index}"
    return LesionConfig(
        name=str(name),
        phenotype=phenotype,
        tmb=tmb,
        radius_um=radius,
        pdl1_baseline=pdl1,
        represented_diameter_mm=represented,
        maps=MappingProxyType(maps),
        seed=lesion_seed,
        params=MappingProxyType(params),
    )


def _patient(
    node: Any, preset: str, grid: GridConfig, seed: int, check_geometry: bool
) -> PatientConfig:
    lesions = node.lesions
    if lesions is None or len(lesions) == 0 or len(lesions) > MAX_LESIONS:
        count = 0 if lesions is None else len(lesions)
        raise ConfigError("patient.lesions", f"{count} lesions", f"1 to {MAX_LESIONS} lesions")
    from tmesolve.geometry import lesion_seeds

    seeds = lesion_seeds(seed, len(lesions))
    return PatientConfig(
        name=str(node.name),
        lesions=tuple(
            _lesion(item, i, preset, grid, seeds[i], check_geometry)
            for i, item in enumerate(lesions)
        ),
    )


def _therapy(node: Any) -> TherapyConfig:
    from tmesolve.therapy.regimens import REGIMENS

    regimens = _plain(node.regimens) or []
    names: list[str] = []
    for index, entry in enumerate(regimens):
        # "pembrolizumab+act" is accepted as two regimens.
        for part in str(entry).split("+"):
            names.append(_choice(f"therapy.regimens[{index}]", part.strip(), tuple(REGIMENS)))
    start_day = check_finite("therapy.start_day", node.start_day)
    if start_day < 0.0:
        raise ConfigError(
            "therapy.start_day", node.start_day, "a start day >= 0 (doses cannot be in the past)"
        )
    act_cells = node.act_cells
    if act_cells is not None:
        act_cells = check_non_negative("therapy.act_cells", act_cells)
    return TherapyConfig(
        name=str(node.name),
        regimens=tuple(names),
        start_day=start_day,
        act_cells=act_cells,
        weight_kg=check_range("therapy.weight_kg", node.weight_kg, 1.0, 500.0),
        management_rule=_boolean("therapy.management_rule", node.management_rule),
    )


def _solver(node: Any) -> SolverConfig:
    return SolverConfig(
        dt_max_h=check_positive("solver.dt_max_h", node.dt_max_h),
        safety=check_range("solver.safety", node.safety, 1e-6, 1.0),
        splitting_order=_splitting_order(node.splitting_order),
        merge_reactions=_merge_reactions(node),
        dtype=_choice("solver.dtype", node.dtype, DTYPES),
        max_steps=_integer("solver.max_steps", node.max_steps, 1, 2**31 - 1),
    )


def _merge_reactions(node: Any) -> bool:
    merge = _boolean("solver.merge_reactions", getattr(node, "merge_reactions", False))
    if merge and node.splitting_order != 2:
        raise ConfigError("solver.merge_reactions", merge, "false unless solver.splitting_order is 2 (Strang)")
    return merge


def _splitting_order(value: Any) -> int:
    if isinstance(value, bool) or value not in SPLITTING_ORDERS:
        raise ConfigError("solver.splitting_order", value, "1 (Lie) or 2 (Strang)")
    return int(value)


def _output(node: Any) -> OutputConfig:
    interval = check_positive("output.interval_h", node.interval_h)
    duration = check_positive("output.duration_h", node.duration_h)
    if interval > duration:
        raise ConfigError(
            "output.interval_h",
            node.interval_h,
            f"an interval <= output.duration_h ({duration:g} h)",
        )
    if duration / interval > 1_000_000:
        raise ConfigError(
            "output.interval_h", node.interval_h, "at most 1e6 outputs over output.duration_h"
        )
    fields = _plain(node.fields)
    if isinstance(fields, str):
        if fields != "all":
            fields = (fields,)
    elif isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields):
        if len(set(fields)) != len(fields):
            raise ConfigError("output.fields", fields, "each field name once")
        fields = tuple(fields)
    else:
        raise ConfigError("output.fields", fields, "'all' or a non-empty list of field names")
    cache = node.compilation_cache_dir
    cache = os.path.expanduser(str(cache)) if cache not in (None, "", "none", "null") else None
    stop = node.stop_after_snapshots
    if stop is not None:
        stop = _integer("output.stop_after_snapshots", stop, 1, 2**31 - 1)
    return OutputConfig(
        interval_h=interval,
        duration_h=duration,
        snapshot_every=_integer("output.snapshot_every", node.snapshot_every, 1, 2**31 - 1),
        fields=fields,
        plots=_boolean("output.plots", node.plots),
        progress=_choice("output.progress", node.progress, PROGRESS_MODES),
        log_interval_s=check_positive("output.log_interval_s", node.log_interval_s),
        compilation_cache_dir=cache,
        stop_after_snapshots=stop,
    )


def resume_setting(value: Any) -> tuple[str, str | None]:
    """(mode, run directory or None) from the ``resume`` setting.

    ``true``/``false`` mean "always"/"never"; any other string not a mode is a
    run directory to resume ("always" in that directory).
    """
    if isinstance(value, bool):
        return ("always" if value else "never"), None
    if isinstance(value, str) and value in RESUME_MODES:
        return value, None
    if isinstance(value, str) and value.strip():
        return "always", value
    raise ConfigError("resume", value, "auto, never, always, true, false or a run directory")


def _raw_value(cfg: DictConfig, key: str) -> Any:
    """The unresolved value at a dotted key (``a.b[0].c``), for error messages."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in re.findall(r"[^.\[\]]+", key):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return "an interpolation"
    return node


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Convert and validate a composed configuration.

    Raises:
        ConfigError: the first bad value, naming its key, the value and the
            expected range or choices.
    """
    try:
        # A resolved copy: the caller's configuration is left as it is.
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an interpolation that cannot be resolved
        key = getattr(error, "full_key", None) or "config"
        raw = _raw_value(cfg, key) if key != "config" else "an interpolation"
        raise ConfigError(key, raw, "a resolvable value", hint=_first_line(error)) from None
    assert isinstance(resolved, dict)
    resolved.pop("hydra", None)
    cfg = OmegaConf.create(resolved)
    seed = _integer("seed", cfg.seed, 0, MAX_SEED)
    resume, resume_dir = resume_setting(cfg.resume)
    is_tme = cfg.experiment.kind == "tme"
    grid = _grid(cfg.grid)
    preset = _choice("tme.preset", cfg.tme.preset, PHENOTYPES)
    tme_params = _mapping("tme.params", cfg.tme.params)
    # The lesions must fit the grid only when the TME model uses them.
    patient = _patient(cfg.patient, preset, grid, seed, check_geometry=is_tme)
    therapy = _therapy(cfg.therapy)
    solver = _solver(cfg.solver)
    output = _output(cfg.output)
    if is_tme:
        _check_tme_params("tme.params", tme_params)
        for index, lesion in enumerate(patient.lesions):
            _check_tme_params(f"patient.lesions[{index}].params", lesion.params, per_lesion=True)
    # Last, so that every setting this module owns is checked even in a build
    # without the TME model.
    experiment = _experiment(cfg.experiment)
    if is_tme:
        duration_days = output.duration_h / 24.0
        if therapy.regimens and therapy.start_day >= duration_days:
            raise ConfigError(
                "therapy.start_day",
                therapy.start_day,
                f"a day before the end of the run ({duration_days:g} d)",
            )
    return RunConfig(
        experiment=experiment,
        grid=grid,
        tme=TMEConfig(preset=preset, params=MappingProxyType(tme_params)),
        patient=patient,
        therapy=therapy,
        solver=solver,
        output=output,
        seed=seed,
        resume=resume,
        resume_dir=resume_dir,
    )


# ---------------------------------------------------------------------------
# Stored configurations (resume) and helpers for the CLI
# ---------------------------------------------------------------------------


def to_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML, without the ``hydra`` node."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_yaml(cfg, resolve=True)


def write_hydra_record(run_dir: str | os.PathLike[str], cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Hydra's run record ``.hydra/config.yaml`` (without the ``hydra`` node) and
    ``overrides.yaml``, as the CLI leaves it; ``tmesolve-summary`` reads the overrides.

    For runs that Hydra does not record itself: :func:`tmesolve.api.run`, and
    ``tmesolve-cohort``, which writes it only after refusing to replace an
    earlier trial (``hydra.output_subdir: null``).
    """
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    record = Path(run_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    (record / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    (record / "overrides.yaml").write_text(
        OmegaConf.to_yaml(OmegaConf.create([str(item) for item in overrides])), encoding="utf-8"
    )


def from_yaml(text: str) -> DictConfig:
    """A configuration stored in a run file, merged onto the schema (type-checked)."""
    stored = OmegaConf.create(text)
    merged = OmegaConf.merge(OmegaConf.structured(RunConf), stored)
    assert isinstance(merged, DictConfig)
    return merged


def with_run_control(stored: DictConfig, current: DictConfig) -> DictConfig:
    """``stored`` with the run-control settings (:data:`RUN_CONTROL_KEYS`) of ``current``."""
    result = OmegaConf.merge(stored)  # a copy
    for key in RUN_CONTROL_KEYS:
        value = OmegaConf.select(current, key, default=None)
        OmegaConf.update(result, key, _plain(value), force_add=True)
    assert isinstance(result, DictConfig)
    return result


def without_run_control(cfg: DictConfig) -> dict[str, Any]:
    """The configuration as plain containers, run-control settings removed (for comparison)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    for key in RUN_CONTROL_KEYS:
        parts = key.split(".")
        node = plain
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return plain


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_error(error: BaseException) -> tuple[str, bool]:
    """(one-line message, is_config_error) for an error that stops the command.

    Hydra's composition errors come as several lines; the key, the value and
    the expectation are pulled out of them.
    """
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, ConfigError):
        return str(error), True
    if isinstance(error, MissingConfigException):
        text = str(error)
        match = re.search(r"Could not find '([^']+)'", text)
        options = list(getattr(error, "options", None) or [])
        if match:
            path = match.group(1)
            group, _, name = path.rpartition("/")
            group = group.replace("/", ".") or path
            expected = (
                ("one of " + ", ".join(sorted(options)))
                if options
                else f"an existing config in conf/{group}"
            )
            return str(ConfigError(group, name or path, expected)), True
        return " ".join(text.split()), True
    if isinstance(error, OverrideParseException):
        return " ".join(_first_line(error).split()) + " (check the override's syntax)", True
    if isinstance(error, (ConfigCompositionException, OmegaConfBaseException)):
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
        key = getattr(cause, "full_key", None)
        message = _first_line(cause)
        conversion = re.match(r"Value '(.*)' of type '.*' could not be converted to (\w+)", message)
        invalid_bool = re.match(r"Value '(.*)' is not a valid bool", message)
        if key and invalid_bool:
            return str(ConfigError(key, invalid_bool.group(1), "true or false")), True
        if key and conversion:
            kind = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false"}.get(
                conversion.group(2), f"a value of type {conversion.group(2)}"
            )
            return str(ConfigError(key, conversion.group(1), kind)), True
        if isinstance(error, ConfigCompositionException):
            override = re.search(r"override (\S+?)=(.*)$", _first_line(error))
            if override and not key:
                key = override.group(1)
            if "not in struct" in str(error) or "Could not override" in str(error):
                wanted = re.search(r"Could not override '([^']+)'", str(error))
                key = wanted.group(1) if wanted else key
                return (
                    f"{key}: no such setting (check the spelling; '+{key}=...' adds a new key)",
                    True,
                )
        if key:
            return f"{key}: {message}", True
        return message, True
    return f"{type(error).__name__}: {' '.join(str(error).split())}", False


__all__ = [
    "COHORT_SCHEMA_NAME",
    "DTYPES",
    "MAX_AXIS_CELLS",
    "MAX_LESIONS",
    "PHENOTYPES",
    "RESUME_MODES",
    "RUN_CONTROL_KEYS",
    "VERIFICATION_KINDS",
    "CohortAppConf",
    "ExperimentConfig",
    "GridConfig",
    "LesionConfig",
    "OutputConfig",
    "PatientConfig",
    "RunConf",
    "RunConfig",
    "SolverConfig",
    "TMEConfig",
    "TherapyConfig",
    "config_dir",
    "describe_error",
    "from_yaml",
    "normalise_overrides",
    "register_configs",
    "resume_setting",
    "to_run_config",
    "to_yaml",
    "with_run_control",
    "without_run_control",
    "write_hydra_record",
]
