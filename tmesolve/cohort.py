"""Virtual cohorts and trials: sample patients, treat them in every arm, score, summarise.

A cohort is sampled from a :class:`CohortSpec` (lesion count, per-lesion
immunophenotype, TMB, baseline PD-L1, simulated radius and represented
clinical diameter), reproducibly from one seed. :func:`run_trial` runs every
patient under every arm (a paired design: arm A and arm B see the same
patients, with the same lesion maps), RECIST-scores each patient-arm and
records the systemic readouts; :func:`summarize_trial` gives response rates
with Wilson intervals, Kaplan–Meier PFS and the log-rank test (lifelines),
biomarker and irAE tables; :func:`write_trial` writes ``cohort.h5``, CSV
tables, a text report and figures.

How patients are batched. Shapes must be static inside a compiled loop, and a
patient's fields have shape (species, lesions, nx, ny, nz), so patients are
grouped by lesion count and each group runs with its own
:class:`~tmesolve.integrate.BatchIntegrator`: **one compile per lesion-count
group**, whatever the number of patients and arms (arms differ only in array
values: schedules are padded to one shape). A group is cut into chunks of
``chunk_size`` patient-arms; the last chunk is padded with copies of its last
member (results discarded), so every chunk has the same shape and the group
still compiles once. With ``pad_lesions=True`` every patient is instead padded
to the cohort's largest lesion count with copies of its first lesion that the
systemic compartment does not see (:func:`~tmesolve.model.tme_setup.pad_lesions`):
**one compile for the whole cohort**, and the same results to round-off, but
each copy costs as much as a real lesion (a 1–3-lesion cohort computes 3
lesions per patient instead of 2 on average). On a CPU, where the step cost
grows with the lesions computed, grouping is faster once the integration
outweighs the extra compiles (seconds each); padding suits a GPU that small
batches leave idle, and sweeps that should compile once.

Time line of a patient: an untreated lead-in (default 2 weeks: a lesion
started near packing settles with its vasculature), therapy from
``lead_in_h`` for ``duration_h``. The RECIST baseline is the record at the
start of therapy (the baseline scan precedes treatment); assessments every
``assessment_interval_h`` (6 weeks, as in most checkpoint trials) and at the
end, the first of them after ``first_assessment_h`` when that is set
(CheckMate 067 scanned first at week 12, then every 6 weeks). Readouts are
recorded every ``record_interval_h`` (7 days), at the assessments and at
t = 0; the loop also stops at every dose time of every arm, so doses fall on
step boundaries.

Everything here is host-side numpy except the batched integration; nothing
imports Hydra.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tmesolve import interrupts, xla_defaults
from tmesolve.errors import ConfigError, check_non_negative, check_positive, check_range
from tmesolve.executable_cache import jaxlib_version, source_digest
from tmesolve.geometry import PHENOTYPES
from tmesolve.grid import Grid
from tmesolve.integrate import BatchIntegrator, SimulationError, make_solver_params
from tmesolve.model.parameters import TABLE as PARAMETER_TABLE
from tmesolve.model.tme_setup import (
    ASSESSMENT_INTERVAL_H,
    MAX_LESIONS,
    LesionSpec,
    setup_tme,
    stack_setups,
)
from tmesolve.model.tme_setup import pad_lesions as pad_lesion_copies
from tmesolve.readouts import PHENOTYPES as CLASS_NAMES
from tmesolve.readouts import SYSTEMIC, TIMESERIES
from tmesolve.recist import CATEGORIES, score_recist
from tmesolve.therapy.regimens import REGIMENS, build_schedule, event_times
from tmesolve.trial_progress import ChunkCheckpoint, TrialProgress

__all__ = [
    "CHECKMATE_067_ORR",
    "COHORT_PRESETS",
    "CohortSpec",
    "LesionSample",
    "PatientOutcome",
    "PatientSample",
    "TrialResult",
    "available_memory_bytes",
    "choose_chunk_size",
    "state_nbytes",
    "cohort_table",
    "load_cohort_spec",
    "plot_trial",
    "run_trial",
    "sample_cohort",
    "summarize_trial",
    "wilson_interval",
    "write_trial",
]

log = logging.getLogger("tmesolve.cohort")

_WEEK_H = 7 * 24.0
_YEAR_H = 365.25 * 24.0

#: Objective response rates of CheckMate 067 (advanced melanoma; Larkin et al. 2019,
#: NEJM 381:1535, 5-year update; PARAMETERS.md "Clinical anchors"). For context
#: in the report only: the model is not calibrated to them.
CHECKMATE_067_ORR: Mapping[str, float] = MappingProxyType(
    {"ipilimumab": 0.190, "nivolumab": 0.437, "nivolumab_ipilimumab": 0.576}
)

#: Biomarker cuts used by :func:`summarize_trial` (defaults; all documented there).
TMB_HIGH_MUT_PER_MB = 10.0  # KEYNOTE-158 / FDA tissue-agnostic cut
PDL1_HIGH = 0.5  # tumour PD-L1 ≥ 0.5: the analogue of TPS ≥ 50 % (KEYNOTE-024)
#: grade ≥ 2: clinically the grade from which irAEs are usually treated with steroids
#: (Brahmer 2018, ASCO guideline); the model itself starts steroids at params.hold_grade (3).
IRAE_POSITIVE_GRADE = 2

#: Least wall time between two progress lines of a running chunk (s).
PROGRESS_LOG_INTERVAL_S = 300.0
#: Memory model for the automatic chunk size: bytes per patient-arm ≈ factor ×
#: the patient's state. XLA's memory analysis of the batched TME loop reported
#: temporaries of 6.2× (16³ voxels, 2 lesions) to 8.2× (6³, 1 lesion) the field
#: bytes, plus the donated input/output state (2×); 16 leaves about 1.6× slack
#: for readouts, host-side stacking and backend differences (cuFFT workspaces).
WORKING_SET_FACTOR = 16.0
#: Fraction of the free memory a chunk may use.
MEMORY_FRACTION = 0.5
#: On a CPU a batch does the same arithmetic as its members one by one: it gains by
#: sharing each kernel's fixed cost while the lesions are small, and loses once the
#: batch outgrows the caches. Milliseconds per patient-step on the 2-core VM, two
#: runs of ``python -m benchmarks.cohort_chunks`` (float32, 16 fields): 8³ × 2
#: lesions (65 kB of state a patient) 1.40–1.78 alone, 0.76–0.96 in chunks of 64;
#: 16³ × 3 (0.8 MB) 6.0–8.7 in chunks of 1 to 64, in no consistent order; 32³ × 3
#: (6.3 MB) 52–55 alone, 53–58 in chunks of 2 to 16, 61–63 in chunks of 64. So a
#: CPU chunk holds up to :data:`CPU_CHUNK_STATE_BYTES` of state, and
#: :data:`CPU_CHUNK_MIN` patient-arms whatever their size.
CPU_CHUNK_STATE_BYTES = 4 * 1024**2
#: Patient-arms a CPU chunk may always hold (within the noise up to 16 at 32³ × 3).
CPU_CHUNK_MIN = 4
#: Assumed free memory where the platform reports none (bytes).
FALLBACK_MEMORY_BYTES = 4 * 1024**3
#: The Linux file whose ``MemAvailable`` line gives the host's available memory.
MEMINFO_PATH = "/proc/meminfo"


# ---------------------------------------------------------------------------
# Cohort specification and sampling
# ---------------------------------------------------------------------------


def _check_interval(key: str, value: Any, low: float, high: float) -> tuple[float, float]:
    try:
        first, second = value
    except (TypeError, ValueError):
        raise ConfigError(key, value, f"a pair (low, high) within [{low:g}, {high:g}]") from None
    first = check_range(f"{key}[0]", first, low, high)
    second = check_range(f"{key}[1]", second, low, high)
    if first > second:
        raise ConfigError(key, value, "low <= high")
    return first, second


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """How to draw a virtual cohort (validated on construction; errors name the field).

    Per patient: the number of target lesions ~ uniform{lesions_min..lesions_max};
    the patient's TMB ~ log-normal, ln TMB ~ N(ln tmb_median, tmb_sigma²) (mut/Mb).
    Per lesion: phenotype ~ categorical(phenotype_probabilities); lesion TMB =
    patient TMB × exp(N(0, tmb_lesion_sigma²)) (intra-patient heterogeneity);
    baseline PD-L1 P₀, simulated radius (µm) and represented diameter (mm)
    ~ uniform over their ranges. All draws are independent.

    Attributes:
        name: label written to the outputs.
        n_patients: number of patients (≥ 1).
        lesions_min, lesions_max: target lesions per patient, 1–5 (RECIST 1.1).
        phenotype_probabilities: {"inflamed", "excluded", "desert"} → probability (sum 1).
        tmb_median: median TMB (mut/Mb, > 0).
        tmb_sigma: log-normal σ of the patient TMB (≥ 0; 0 gives every patient the median).
        tmb_lesion_sigma: log-normal σ of a lesion's TMB around its patient's (≥ 0).
        pdl1_baseline_range: range of the constitutive PD-L1 level P₀ (0–1; model default 0.15).
        radius_um_range: range of the simulated lesion radius (µm); must fit the grid
            (radius < half the box), which :func:`run_trial` checks.
        represented_diameter_mm_range: range of the represented clinical lesion
            diameter (mm; sub-volume mode, RECIST on burden diameters), or None for
            whole-lesion mode (RECIST on the thresholded mask).
        seed: seed of ``np.random.default_rng``.
        source: where the numbers come from (free text, written to the outputs).
    """

    name: str = "custom"
    n_patients: int = 20
    lesions_min: int = 1
    lesions_max: int = 3
    phenotype_probabilities: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"inflamed": 1 / 3, "excluded": 1 / 3, "desert": 1 / 3}, hash=False
    )
    tmb_median: float = 8.0
    tmb_sigma: float = 1.0
    tmb_lesion_sigma: float = 0.25
    pdl1_baseline_range: tuple[float, float] = (0.05, 0.4)
    radius_um_range: tuple[float, float] = (150.0, 250.0)
    represented_diameter_mm_range: tuple[float, float] | None = (10.0, 40.0)
    seed: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        key = "cohort"
        if (
            isinstance(self.n_patients, bool)
            or not isinstance(self.n_patients, (int, np.integer))
            or self.n_patients < 1
        ):
            raise ConfigError(f"{key}.n_patients", self.n_patients, "an integer >= 1")
        for field in ("lesions_min", "lesions_max"):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or not 1 <= value <= MAX_LESIONS
            ):
                raise ConfigError(
                    f"{key}.{field}",
                    value,
                    f"an integer in [1, {MAX_LESIONS}] (RECIST target lesions)",
                )
        if self.lesions_min > self.lesions_max:
            raise ConfigError(
                f"{key}.lesions_min", self.lesions_min, f"<= lesions_max ({self.lesions_max})"
            )
        probabilities = dict(self.phenotype_probabilities)
        for name, value in probabilities.items():
            if name not in PHENOTYPES:
                raise ConfigError(
                    f"{key}.phenotype_probabilities.{name}",
                    value,
                    f"phenotypes among {', '.join(PHENOTYPES)}",
                )
            check_range(f"{key}.phenotype_probabilities.{name}", value, 0.0, 1.0)
        total = sum(float(v) for v in probabilities.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"{key}.phenotype_probabilities", probabilities, "probabilities that sum to 1"
            )
        object.__setattr__(
            self,
            "phenotype_probabilities",
            {name: float(probabilities.get(name, 0.0)) for name in PHENOTYPES},
        )
        check_range(f"{key}.tmb_median", self.tmb_median, 1e-3, 1000.0)
        check_range(f"{key}.tmb_sigma", self.tmb_sigma, 0.0, 5.0)
        check_range(f"{key}.tmb_lesion_sigma", self.tmb_lesion_sigma, 0.0, 5.0)
        object.__setattr__(
            self,
            "pdl1_baseline_range",
            _check_interval(f"{key}.pdl1_baseline_range", self.pdl1_baseline_range, 0.0, 1.0),
        )
        radius = _check_interval(f"{key}.radius_um_range", self.radius_um_range, 0.0, 1e6)
        if radius[0] <= 0.0:
            raise ConfigError(f"{key}.radius_um_range", self.radius_um_range, "radii > 0 µm")
        object.__setattr__(self, "radius_um_range", radius)
        if self.represented_diameter_mm_range is not None:
            object.__setattr__(
                self,
                "represented_diameter_mm_range",
                _check_interval(
                    f"{key}.represented_diameter_mm_range",
                    self.represented_diameter_mm_range,
                    1e-3,
                    500.0,
                ),
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, (int, np.integer))
            or self.seed < 0
        ):
            raise ConfigError(f"{key}.seed", self.seed, "an integer >= 0")


#: Folder of the ``cohort`` config group: one YAML file per preset (their only definition).
PRESET_DIR = Path(__file__).resolve().parent / "conf" / "cohort"


def load_cohort_spec(path: str | os.PathLike, **changes: Any) -> CohortSpec:
    """A :class:`CohortSpec` from a YAML file of the ``cohort`` config group (validated).

    ``radius_um_range: null`` there means "from the lesion box" (the CLI draws
    20–30 % of the box edge); here it falls back to :class:`CohortSpec`'s default.
    Read with PyYAML (YAML 1.1): write numbers with a decimal point (``1.0e-3``),
    as ``1e-3`` would be a string there (Hydra reads it as a number).
    ``changes`` replace fields after reading. Errors name the field.
    """
    import yaml  # not OmegaConf: the core never imports Hydra's stack (DESIGN.md)

    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ConfigError(str(path), type(values).__name__, "a mapping of CohortSpec fields")
    known = {field.name for field in dataclasses.fields(CohortSpec)}
    for key in values:
        if key not in known:
            raise ConfigError(f"cohort.{key}", values[key], f"fields among {', '.join(sorted(known))}")
    values.update(changes)
    if values.get("radius_um_range", ()) is None:
        del values["radius_um_range"]
    return CohortSpec(**values)


def _load_presets() -> Mapping[str, CohortSpec]:
    presets = {path.stem: load_cohort_spec(path) for path in sorted(PRESET_DIR.glob("*.yaml"))}
    return MappingProxyType(presets)


#: The presets per cancer type (melanoma, nsclc, rcc, mss_colorectal), read from
#: ``conf/cohort/*.yaml``; the sources of their numbers are in those files.
COHORT_PRESETS: Mapping[str, CohortSpec] = _load_presets()


@dataclasses.dataclass(frozen=True)
class LesionSample:
    """One sampled lesion (values in the units of :class:`~tmesolve.model.tme_setup.LesionSpec`)."""

    phenotype: str
    tmb: float  # mut/Mb
    pdl1_baseline: float  # P₀, 0–1
    radius_um: float  # µm
    represented_diameter_mm: float | None  # mm; None: whole-lesion mode


@dataclasses.dataclass(frozen=True)
class PatientSample:
    """One sampled patient.

    Attributes:
        patient_id: unique label ("P001", ...).
        seed: seed of the patient's lesion maps (``setup_tme(seed=...)``); every
            arm uses it, so the arms see identical lesions.
        tmb: the patient's TMB (mut/Mb), the biomarker value (as from one biopsy).
        lesions: the target lesions.
    """

    patient_id: str
    seed: int
    tmb: float
    lesions: tuple[LesionSample, ...]

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    @property
    def largest_lesion(self) -> int:
        """Index of the largest lesion (represented diameter, else radius): the 'biopsied' one."""
        sizes = [
            lesion.represented_diameter_mm
            if lesion.represented_diameter_mm is not None
            else lesion.radius_um
            for lesion in self.lesions
        ]
        return int(np.argmax(sizes))

    def lesion_specs(self) -> list[LesionSpec]:
        return [
            LesionSpec(
                phenotype=lesion.phenotype,
                tmb=lesion.tmb,
                radius_um=lesion.radius_um,
                represented_diameter_mm=lesion.represented_diameter_mm,
                pdl1_baseline=lesion.pdl1_baseline,
            )
            for lesion in self.lesions
        ]


def sample_cohort(spec: CohortSpec) -> list[PatientSample]:
    """Draw ``spec.n_patients`` patients from ``np.random.default_rng(spec.seed)`` (reproducible).

    The draws happen in a fixed order (patient by patient: lesion count, TMB,
    map seed, then lesion by lesion), so the same spec gives the same cohort,
    and a larger ``n_patients`` extends a cohort without changing its first patients.
    """
    rng = np.random.default_rng(spec.seed)
    probabilities = np.asarray([spec.phenotype_probabilities[name] for name in PHENOTYPES])
    width = max(3, len(str(spec.n_patients)))
    patients = []
    for index in range(spec.n_patients):
        count = int(rng.integers(spec.lesions_min, spec.lesions_max + 1))
        patient_tmb = float(
            np.clip(spec.tmb_median * math.exp(spec.tmb_sigma * rng.standard_normal()), 0.0, 1000.0)
        )
        seed = int(rng.integers(0, 2**31 - 1))
        lesions = []
        for _ in range(count):
            phenotype = PHENOTYPES[int(rng.choice(len(PHENOTYPES), p=probabilities))]
            tmb = float(
                np.clip(
                    patient_tmb * math.exp(spec.tmb_lesion_sigma * rng.standard_normal()),
                    0.0,
                    1000.0,
                )
            )
            pdl1 = float(rng.uniform(*spec.pdl1_baseline_range))
            radius = float(rng.uniform(*spec.radius_um_range))
            diameter = (
                None
                if spec.represented_diameter_mm_range is None
                else float(rng.uniform(*spec.represented_diameter_mm_range))
            )
            lesions.append(LesionSample(phenotype, tmb, pdl1, radius, diameter))
        patients.append(PatientSample(f"P{index + 1:0{width}d}", seed, patient_tmb, tuple(lesions)))
    return patients


def cohort_table(samples: Sequence[PatientSample]) -> dict[str, np.ndarray]:
    """One row per lesion: patient id and index, lesion index, phenotype, TMB, P₀, radius,
    represented diameter (NaN in whole-lesion mode), patient TMB, lesion count, map seed,
    and whether the lesion is the patient's largest."""
    rows: dict[str, list] = {
        name: []
        for name in (
            "patient_id",
            "patient_index",
            "lesion_index",
            "phenotype",
            "tmb",
            "pdl1_baseline",
            "radius_um",
            "represented_diameter_mm",
            "patient_tmb",
            "n_lesions",
            "seed",
            "largest",
        )
    }
    for p, sample in enumerate(samples):
        for j, lesion in enumerate(sample.lesions):
            rows["patient_id"].append(sample.patient_id)
            rows["patient_index"].append(p)
            rows["lesion_index"].append(j)
            rows["phenotype"].append(lesion.phenotype)
            rows["tmb"].append(lesion.tmb)
            rows["pdl1_baseline"].append(lesion.pdl1_baseline)
            rows["radius_um"].append(lesion.radius_um)
            rows["represented_diameter_mm"].append(
                math.nan
                if lesion.represented_diameter_mm is None
                else lesion.represented_diameter_mm
            )
            rows["patient_tmb"].append(sample.tmb)
            rows["n_lesions"].append(sample.n_lesions)
            rows["seed"].append(sample.seed)
            rows["largest"].append(j == sample.largest_lesion)
    table = {}
    for name, values in rows.items():
        if name in ("patient_id", "phenotype"):
            table[name] = np.asarray(values, dtype=str)
        elif name in ("patient_index", "lesion_index", "n_lesions", "seed"):
            table[name] = np.asarray(values, dtype=np.int64)
        elif name == "largest":
            table[name] = np.asarray(values, dtype=bool)
        else:
            table[name] = np.asarray(values, dtype=np.float64)
    return table


#: Units of the columns of :func:`cohort_table`.
COHORT_UNITS = {
    "tmb": "mut/Mb",
    "patient_tmb": "mut/Mb",
    "pdl1_baseline": "1",
    "radius_um": "um",
    "represented_diameter_mm": "mm",
}


# ---------------------------------------------------------------------------
# Chunk size
# ---------------------------------------------------------------------------


def available_memory_bytes(device: Any = None) -> int:
    """Free memory of the device that runs the trial (bytes).

    GPU/TPU: ``bytes_limit − bytes_in_use`` from ``device.memory_stats()`` when the
    backend reports it. CPU (or no statistics): the host's ``MemAvailable`` from
    :data:`MEMINFO_PATH` (Linux; free pages plus the page cache the kernel can
    reclaim, so a node whose cache is full of input files is not taken for a full
    one), else the free physical pages (``os.sysconf``), else
    :data:`FALLBACK_MEMORY_BYTES`.
    """
    device = jax.devices()[0] if device is None else device
    if device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without statistics raise various errors
            stats = None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open(MEMINFO_PATH, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_BYTES


def state_nbytes(state: Any) -> int:
    """Bytes of every array leaf of a patient's state pytree (read from the arrays'
    metadata: nothing is copied off the device)."""
    return int(sum(
        leaf.nbytes if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes
        for leaf in jax.tree_util.tree_leaves(state)
    ))


def choose_chunk_size(per_member_state_bytes: int, members: int, device: Any = None) -> int:
    """Patient-arms per chunk: ⌊MEMORY_FRACTION × free / (WORKING_SET_FACTOR × state bytes)⌋,
    at least 1 and at most ``members`` (the group size); on a CPU also at most
    max(CPU_CHUNK_MIN, ⌊CPU_CHUNK_STATE_BYTES / state bytes⌋) (:data:`CPU_CHUNK_STATE_BYTES`)."""
    device = jax.devices()[0] if device is None else device
    budget = MEMORY_FRACTION * available_memory_bytes(device)
    per_member = max(1.0, float(per_member_state_bytes))
    size = budget // (WORKING_SET_FACTOR * per_member)
    if device.platform == "cpu":
        size = min(size, max(CPU_CHUNK_MIN, CPU_CHUNK_STATE_BYTES // per_member))
    return int(max(1, min(members, size)))


# ---------------------------------------------------------------------------
# Running a trial
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatientOutcome:
    """What one patient did under one arm (times in hours from the start of therapy
    unless named ``*_time_h``).

    Attributes:
        patient_id, arm: who and what.
        recist_diameter: "burden_diameter_mm" (sub-volume mode) or "longest_diameter_mm".
        baseline_sum_mm: sum of target-lesion diameters at the start of therapy (mm).
        best_response: best overall response "CR", "PR", "SD", "PD" (unconfirmed) or "NE".
        best_percent_change: most negative change of the sum from baseline (%).
        percent_change: (assessments,) change from baseline at each assessment (%).
        sum_diameters_mm: (assessments,) sum of diameters at each assessment (mm).
        categories: RECIST category at each assessment.
        pfs_h: progression-free time (h): first PD, or the last assessment if censored.
        pfs_event: whether PD was observed (False: censored; no deaths in the model).
        duration_of_response_h: first CR/PR to PD, or to the last assessment (NaN if none).
        response_censored: the response had not progressed at the end.
        durable_cr: a CR held ≥ ``durable_cr_h``.
        max_irae_grade: the worst irAE grade of the run (0–4), from the state's running peak.
        therapy_held: the management rule withheld checkpoint dosing at some time.
        therapy_resumed: dosing resumed after a hold (at least once).
        therapy_discontinued: the rule stopped checkpoint dosing for good.
        baseline_pdl1: mean tumour PD-L1 of the largest lesion at the baseline scan (0–1).
        baseline_class: immunophenotype class of the largest lesion at the baseline scan.
        touched_wall: a lesion's tumour reached its box wall (growth underestimated).
    """

    patient_id: str
    arm: str
    recist_diameter: str
    baseline_sum_mm: float
    best_response: str
    best_percent_change: float
    percent_change: np.ndarray
    sum_diameters_mm: np.ndarray
    categories: tuple[str, ...]
    pfs_h: float
    pfs_event: bool
    duration_of_response_h: float
    response_censored: bool
    durable_cr: bool
    max_irae_grade: int
    therapy_held: bool
    therapy_resumed: bool
    therapy_discontinued: bool
    baseline_pdl1: float
    baseline_class: str
    touched_wall: bool


@dataclasses.dataclass
class TrialResult:
    """Everything :func:`run_trial` produced.

    Attributes:
        samples: the patients (same order in every arm).
        arms: regimen names.
        grid: the lesion grid.
        lead_in_h, duration_h: untreated lead-in and time on therapy (h).
        assessment_interval_h, durable_cr_h: RECIST settings (h).
        first_assessment_h: time from the baseline to the first scan (h).
        record_times_h: (records,) times of the readouts (h from the start of the run).
        stop_times_h: (stops,) every time the host loop stopped (records and doses of all arms).
        assessment_times_h: (assessments,) RECIST assessment times (h from the start of the run).
        outcomes: arm → one :class:`PatientOutcome` per patient.
        records: arm → per patient {readout: (records,) or (records, lesions) float64}.
        trace_counts: lesion count → compilations of that group's batched loop in this call
            (1, or 0 when a shared ``integrators`` dict already held the compiled loop or it
            was loaded from the compiled-loop cache, :mod:`tmesolve.executable_cache`).
        chunk_sizes: lesion count → patient-arms per chunk.
        settings: solver and run settings (for the file).
        wall_time_s: wall time of the run (s).
        chunks: one entry per chunk of patient-arms advanced together: lesion_count,
            patient_arms, size (with padding), steps, seconds and cpu_seconds (wall and
            process CPU time over every attempt, setup and compile included),
            attempts, and run_now (False: finished in an earlier run and read from
            ``progress_dir``).
    """

    samples: tuple[PatientSample, ...]
    arms: tuple[str, ...]
    grid: Grid
    lead_in_h: float
    duration_h: float
    assessment_interval_h: float
    durable_cr_h: float
    first_assessment_h: float
    record_times_h: np.ndarray
    stop_times_h: np.ndarray
    assessment_times_h: np.ndarray
    outcomes: dict[str, list[PatientOutcome]]
    records: dict[str, list[dict[str, np.ndarray]]]
    trace_counts: dict[int, int]
    chunk_sizes: dict[int, int]
    settings: dict[str, Any]
    wall_time_s: float
    chunks: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _check_samples(samples: Sequence[PatientSample], grid: Grid) -> None:
    if len(samples) == 0:
        raise ConfigError("cohort.patients", 0, "at least one patient")
    seen = set()
    half_box = 0.5 * min(length for length, n in zip(grid.lengths_um, grid.shape) if n > 1)
    for sample in samples:
        if sample.patient_id in seen:
            raise ConfigError("cohort.patients", sample.patient_id, "unique patient ids")
        seen.add(sample.patient_id)
        if not 1 <= sample.n_lesions <= MAX_LESIONS:
            raise ConfigError(
                f"cohort.patients[{sample.patient_id}].lesions",
                sample.n_lesions,
                f"1 to {MAX_LESIONS} lesions",
            )
        for j, lesion in enumerate(sample.lesions):
            if not lesion.radius_um < half_box:
                raise ConfigError(
                    f"cohort.patients[{sample.patient_id}].lesions[{j}].radius_um",
                    lesion.radius_um,
                    f"a radius < half the box ({half_box:g} µm); shrink radius_um_range "
                    "or enlarge the grid",
                )


def _check_arms(arms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(arms, str) or len(arms) == 0:
        raise ConfigError("trial.arms", arms, "a non-empty list of regimen names")
    for i, arm in enumerate(arms):
        if arm not in REGIMENS:
            raise ConfigError(f"trial.arms[{i}]", arm, f"a regimen among {', '.join(REGIMENS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError("trial.arms", list(arms), "distinct arms")
    return tuple(arms)


def _assessment_times(baseline_h: float, end_h: float, interval_h: float, first_h: float) -> np.ndarray:
    """The first scan ``first_h`` after the baseline, then one every ``interval_h``, and one
    at the end of the run."""
    times = np.arange(baseline_h + first_h, end_h + 1e-9, interval_h)
    if times.size == 0 or times[-1] < end_h - 1e-9:
        times = np.append(times, end_h)
    return times


def _scan_schedule(result: TrialResult) -> str:
    """The scans in words: "every 6 wk and at the end", "at week 12, then every 6 wk and
    at the end", or "only at the end (week 4)" when the first scan would not come sooner."""
    first, interval = result.first_assessment_h, result.assessment_interval_h
    if first >= result.duration_h - 1e-9:
        return f"only at the end (week {result.duration_h / _WEEK_H:g})"
    every = f"every {interval / _WEEK_H:g} wk"
    if abs(first - interval) > 1e-9:
        every = f"at week {first / _WEEK_H:g}, then {every}"
    return f"{every} and at the end"


def _largest_value(values: np.ndarray, lesion: int) -> float:
    values = np.asarray(values, dtype=float)
    return float(values[lesion]) if values.ndim else float(values)


def _score(
    sample: PatientSample,
    arm: str,
    records: dict[str, np.ndarray],
    times: np.ndarray,
    recist_diameter: str,
    lead_in_h: float,
    assessments: np.ndarray,
    durable_cr_h: float,
) -> PatientOutcome:
    result = score_recist(
        times,
        records[recist_diameter],
        assessments,
        durable_cr_h=durable_cr_h,
        baseline_time_h=lead_in_h,
    )
    if math.isnan(result.time_to_progression_h):
        last = result.assessment_times_h[-1] if result.assessment_times_h.size else lead_in_h
        pfs, event = float(last - lead_in_h), False
    else:
        pfs, event = float(result.time_to_progression_h), True
    baseline = int(np.argmin(np.abs(times - lead_in_h)))
    largest = sample.largest_lesion
    # Resumptions are counted in the state, not sampled: a hold that began and
    # ended between two records still counts as held.
    resumed = bool(np.max(records["therapy_resumptions"]) >= 0.5)
    return PatientOutcome(
        patient_id=sample.patient_id,
        arm=arm,
        recist_diameter=recist_diameter,
        baseline_sum_mm=float(result.baseline_mm),
        best_response=result.best_response,
        best_percent_change=float(result.best_percent_change),
        percent_change=np.asarray(result.percent_change, dtype=float),
        sum_diameters_mm=np.asarray(result.sum_diameters_mm, dtype=float),
        categories=tuple(str(c) for c in result.category),
        pfs_h=pfs,
        pfs_event=event,
        duration_of_response_h=float(result.duration_of_response_h),
        response_censored=bool(result.response_censored),
        durable_cr=bool(result.durable_cr),
        # The state's running peak: a grade reached between weekly records counts.
        max_irae_grade=int(round(float(np.max(records["irae_peak_grade"])))),
        therapy_held=bool(np.max(records["therapy_held"]) >= 0.5) or resumed,
        therapy_resumed=resumed,
        therapy_discontinued=bool(np.max(records["therapy_discontinued"]) >= 0.5),
        baseline_pdl1=_largest_value(records["mean_pd_l1"][baseline], largest),
        baseline_class=CLASS_NAMES[
            int(round(_largest_value(records["immunophenotype"][baseline], largest)))
        ],
        touched_wall=bool(np.max(records["touches_wall"]) >= 0.5),
    )


@interrupts.keeping_stops  # a stop that Python swallows still ends the trial, at its next stop
def run_trial(
    samples: Sequence[PatientSample],
    arms: Sequence[str],
    grid: Grid,
    duration_h: float,
    *,
    lead_in_h: float = 336.0,
    assessment_interval_h: float = ASSESSMENT_INTERVAL_H,
    first_assessment_h: float | None = None,
    record_interval_h: float = _WEEK_H,
    chunk_size: int | None = None,
    dtype: Any = jnp.float32,
    dt_max: float = 1.0,
    safety: float = 0.9,
    durable_cr_h: float = 5 * _YEAR_H,
    parameters: Mapping[str, Any] | None = None,
    weight_kg: float = 75.0,
    splitting_order: int = 2,
    integrators: dict | None = None,
    merge_reactions: bool = False,
    pad_lesions: bool = False,
    progress_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    restart: bool = False,
    checkpoint_interval_s: float = 1800.0,
    before_compile: Callable[[], Any] | None = None,
) -> TrialResult:
    """Run every patient under every arm (paired) and score each patient-arm by RECIST 1.1.

    Args:
        samples: the patients (:func:`sample_cohort`).
        arms: regimen names of :data:`~tmesolve.therapy.regimens.REGIMENS` ("none": control).
        grid: the grid of every lesion box.
        duration_h: time on therapy after the lead-in (h).
        lead_in_h: untreated time before therapy; the RECIST baseline is the record here (h).
        assessment_interval_h: time between RECIST scans (h); the last scan is at the end.
        first_assessment_h: time from the baseline to the first scan (h); None: one
            ``assessment_interval_h``. Immunotherapy trials often scan first later than
            they repeat (CheckMate 067: week 12, then every 6 weeks), so that an early
            swelling before a response is not scored as progression.
        record_interval_h: time between readout records (h).
        chunk_size: patient-arms advanced together; None chooses it per lesion-count group
            from the free memory (:func:`choose_chunk_size`: ½ of the free device memory
            over 16× a patient's state bytes; on a CPU at most 4 MiB of state or 4
            patient-arms, whichever is more), capped at the group size.
        dtype: float dtype (float64 needs ``jax_enable_x64``).
        dt_max, safety: time-step cap (h) and fraction of the stability limit.
        durable_cr_h: a CR held this long is durable (MODEL.md default 5 years; a trial
            shorter than that reports none).
        parameters: global parameter overrides (symbols of the parameter table) for every patient.
        weight_kg: body weight for mg/kg doses (kg).
        splitting_order: 1 (Lie) or 2 (Strang).
        merge_reactions: merge the reaction halves of neighbouring Strang steps (one
            reaction evaluation per step; ``solver.merge_reactions``).
        integrators: optional dict that keeps the compiled batched loops between calls
            (keyed by grid, lesion count and splitting order): pass the same dict to
            several trials (a dose or parameter sweep) and a group whose chunk shape was
            seen before runs without compiling again. None: fresh loops for this call.
        pad_lesions: pad every patient to the largest lesion count of the cohort
            (copies of its first lesion, unseen by the systemic compartment): one
            group, one compile, more lesions computed (see the module docstring).
        progress_dir: folder for checkpoints (:mod:`tmesolve.trial_progress`): every
            finished chunk, and an unfinished chunk's batched state at most every
            ``checkpoint_interval_s`` seconds (at a stop). None: no checkpoints.
        resume: what to do with checkpoints found in ``progress_dir``: True
            ("always") continues them (their settings must equal these), "auto"
            continues them when their settings are these, False ("never") refuses
            them (:class:`~tmesolve.trial_progress.TrialProgress`). Continuing reads
            finished chunks without running them again and runs an unfinished one on
            from its last checkpoint, value for value as if it had not stopped.
        restart: where ``resume`` would refuse ("never", or "auto" with other
            settings), discard the checkpoints instead (once every setting is
            checked) and run the trial from the start.
        checkpoint_interval_s: least wall time between two checkpoints of an
            unfinished chunk (s); 0 writes one at every stop.
        before_compile: called once every setting (the checkpoint folder included) is
            checked, before anything compiles (``tmesolve-cohort`` writes its run
            record there, so that a refused run leaves an earlier record as it was).

    Returns:
        A :class:`TrialResult`; ``trace_counts`` holds one compile per lesion-count group
        (a single group, keyed by the largest lesion count, with ``pad_lesions``).

    Raises:
        ConfigError: bad settings (a checkpoint folder of another trial included),
            before anything compiles.
        SimulationError: a patient's fields became non-finite (names patient, arm and time).
    """
    started = time.perf_counter()
    samples = tuple(samples)
    arms = _check_arms(arms)
    _check_samples(samples, grid)
    duration_h = check_positive("trial.duration_h", duration_h)
    lead_in_h = check_non_negative("trial.lead_in_h", lead_in_h)
    assessment_interval_h = check_positive("trial.assessment_interval_h", assessment_interval_h)
    if first_assessment_h is None:
        # A trial shorter than the interval still has its scan at the end.
        first_assessment_h = assessment_interval_h
    else:
        first_assessment_h = check_positive("trial.first_assessment_h", first_assessment_h)
        if first_assessment_h > duration_h:
            raise ConfigError(
                "trial.first_assessment_h",
                first_assessment_h,
                f"at most trial.duration_h ({duration_h:g} h); a later first scan would never happen",
            )
    record_interval_h = check_positive("trial.record_interval_h", record_interval_h)
    durable_cr_h = check_positive("trial.durable_cr_h", durable_cr_h)
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ConfigError("trial.chunk_size", chunk_size, "an integer >= 1 or None (automatic)")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ConfigError("trial.dtype", str(dtype), "float32 or float64")
    if dtype == jnp.dtype(jnp.float64) and not jax.config.jax_enable_x64:
        raise ConfigError(
            "trial.dtype", "float64", "jax_enable_x64 switched on first (JAX_ENABLE_X64=1)"
        )
    checkpoint_interval_s = check_non_negative("trial.checkpoint_interval_s", checkpoint_interval_s)
    solver = make_solver_params(dt_max, safety, dtype=dtype)
    end_h = lead_in_h + duration_h

    # Stops: records (t = 0, every record interval, the baseline and every scan) and the
    # doses of every arm. Global, so a patient's stops do not depend on how it was chunked.
    assessments = _assessment_times(lead_in_h, end_h, assessment_interval_h, first_assessment_h)
    records = np.unique(
        np.concatenate(
            [
                [0.0, lead_in_h, end_h],
                assessments,
                np.arange(record_interval_h, end_h, record_interval_h),
            ]
        )
    )
    records = records[records <= end_h]
    doses = [
        event_times(
            build_schedule(
                arm,
                start_h=lead_in_h,
                duration_h=duration_h,
                weight_kg=weight_kg,
                dtype=dtype,
                key=f"trial.arms[{i}]",
            )
        )
        for i, arm in enumerate(arms)
    ]
    stops = np.unique(np.concatenate([records, *doses]))
    stops = stops[(stops > 0.0) & (stops <= end_h)]

    largest_count = max(sample.n_lesions for sample in samples)
    groups: dict[int, list[tuple[int, int]]] = {}
    for p, sample in enumerate(samples):
        for a in range(len(arms)):
            count = largest_count if pad_lesions else sample.n_lesions
            groups.setdefault(count, []).append((a, p))
    per_lesion_records = {name for name, _, per_lesion in TIMESERIES if per_lesion}

    outcomes: dict[str, list[PatientOutcome | None]] = {arm: [None] * len(samples) for arm in arms}
    histories: dict[str, list[dict[str, np.ndarray] | None]] = {
        arm: [None] * len(samples) for arm in arms
    }
    trace_counts: dict[int, int] = {}
    chunk_sizes: dict[int, int] = {}
    record_names = [name for name, *_ in TIMESERIES] + [name for name, _ in SYSTEMIC]

    def build(member: tuple[int, int]):
        a, p = member
        sample = samples[p]
        setup = setup_tme(
            grid,
            sample.lesion_specs(),
            therapy=arms[a],
            therapy_start_h=lead_in_h,
            duration_h=duration_h,
            weight_kg=weight_kg,
            parameters=parameters,
            seed=sample.seed,
            dtype=dtype,
            key=f"cohort.patients[{sample.patient_id}].lesions",
        )
        return pad_lesion_copies(setup, largest_count) if pad_lesions else setup

    # The settings that decide the simulated values (with the times and the patients).
    run_settings = {
        "dtype": str(dtype),
        "dt_max_h": float(dt_max),
        "safety": float(safety),
        "splitting_order": int(splitting_order),
        "merge_reactions": bool(merge_reactions),
        "pad_lesions": bool(pad_lesions),
        "weight_kg": float(weight_kg),
        "parameters": dict(parameters or {}),
    }
    progress = None
    if progress_dir is not None:
        fingerprint = {
            "samples": [dataclasses.asdict(sample) for sample in samples],
            "arms": list(arms),
            "grid": {"shape": list(grid.shape), "spacing_um": grid.spacing_um,
                     "origin_um": list(grid.origin_um)},
            "stop_times_h": stops.tolist(),
            "record_times_h": records.tolist(),
            "lead_in_h": lead_in_h,
            "duration_h": duration_h,
            **run_settings,
            "tmesolve_source": source_digest(),
            # Where the values were computed: another backend, device or XLA build
            # rounds differently (CPU models of one cluster are not told apart).
            "jax": jax.__version__,
            "jaxlib": jaxlib_version(),
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "XLA_FLAGS": xla_defaults.without_cpu_defaults(os.environ.get("XLA_FLAGS", "")),
        }
        progress = TrialProgress(progress_dir, fingerprint, resume=resume, restart=restart, key="trial.resume")
    if before_compile is not None:
        before_compile()
    saved_chunks = {} if progress is None else {
        (chunk.lesion_count, tuple(chunk.members)): chunk for chunk in progress.chunks}
    chunk_log: list[dict[str, Any]] = []
    times = np.asarray(records, dtype=float)

    def score_chunk(chunk, collected, recist_uses):
        for k, (a, p) in enumerate(chunk):
            history = {
                name: np.stack([np.asarray(rec[name][k], dtype=np.float64) for rec in collected])
                for name in record_names
            }
            # Padding copies (pad_lesions) come after the patient's own lesions.
            own = samples[p].n_lesions
            for name in per_lesion_records & history.keys():
                history[name] = history[name][:, :own]
            arm = arms[a]
            diameter = "longest_diameter_mm" if recist_uses[k] == "mask" else "burden_diameter_mm"
            histories[arm][p] = history
            outcomes[arm][p] = _score(
                samples[p], arm, history, times, diameter, lead_in_h, assessments, durable_cr_h
            )

    for lesion_count in sorted(groups):
        members = groups[lesion_count]
        # Chunks of an earlier attempt: finished ones are scored from their records,
        # unfinished ones run first, each with its own composition (the same batch, so
        # the same values as if the run had not stopped).
        pending: list[tuple[list[tuple[int, int]], int, Any]] = []
        covered: set[tuple[int, int]] = set()
        for (count, chunk_members), saved in saved_chunks.items():
            if count != lesion_count:
                continue
            covered.update(chunk_members)
            if saved.finished(len(stops)):
                score_chunk(list(chunk_members), saved.collected(), saved.recist_uses)
                chunk_log.append(saved.summary(run_now=False))
            else:
                pending.append((list(chunk_members), saved.size, saved))
        remaining = [member for member in members if member not in covered]
        if not pending and not remaining:
            trace_counts[lesion_count] = 0
            chunk_sizes[lesion_count] = progress.saved_chunk_size(lesion_count)
            log.info("%d-lesion group: all %d patient-arms read from %s", lesion_count, len(members),
                     progress_dir)
            continue
        first = build((pending[0][0] if pending else remaining)[0])
        # A group resumed keeps the batch size of its saved chunks: the rest of its
        # members then fall into the chunks (and batches) of an uninterrupted run.
        size = None if progress is None else progress.saved_chunk_size(lesion_count)
        if size is None:
            size = chunk_size
        if size is None:
            size = choose_chunk_size(state_nbytes(first.state), len(members))
        size = min(size, len(members))
        chunk_sizes[lesion_count] = size
        cache_key = (
            "tme",
            grid,
            lesion_count,
            first.model.margin_cells,
            first.model.tissue_velocity,
            splitting_order,
            bool(merge_reactions),
        )
        cache = integrators if integrators is not None else {}
        integrator = cache.get(cache_key)
        if integrator is None:
            integrator = cache[cache_key] = BatchIntegrator(first.model, splitting_order, merge_reactions)
        traced_before = integrator.trace_count
        del first
        pending += [(remaining[start : start + size], size, None) for start in range(0, len(remaining), size)]
        log.info(
            "%d-lesion group: %d patient-arms in chunks of %d%s", lesion_count, len(members), size,
            f" ({len(members) - len(remaining)} from {progress_dir})" if len(remaining) < len(members) else "",
        )
        # Patient-arms of this group already finished (read from progress_dir).
        done = len(members) - len(remaining) - sum(len(chunk) for chunk, _, saved in pending if saved)
        for chunk, batch, saved in pending:
            chunk_started, cpu_started = time.perf_counter(), time.process_time()
            # A stop swallowed since the last chunk: end before building and compiling this one.
            interrupts.raise_kept_stop()
            # Pad the chunk with copies of its last member: one shape, one compile.
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            setups = [build(member) for member in padded]
            recist_uses = [setup.recist_uses for setup in setups]
            _, params, state = stack_setups(setups)
            del setups
            if saved is None:
                collected: list[dict[str, np.ndarray]] = []
                state, readouts, _ = integrator.advance(state, params, solver, 0.0)
                collected.append({name: np.asarray(readouts[name]) for name in record_names})
                log.info(
                    "%d-lesion group: first advance (%s) took %.1f s",
                    lesion_count,
                    {"disk": "loop loaded from the compiled-loop cache",
                     "memory": "loop compiled before"}.get(integrator.last_source, "loop compiled on a new shape"),
                    time.perf_counter() - chunk_started,
                )
                next_stop, steps, seconds_before, cpu_before, attempts = 0, 0, 0.0, 0.0, 1
            else:
                state = saved.restore_state(state)
                collected = saved.collected()
                next_stop, steps, seconds_before, cpu_before, attempts = (
                    saved.next_stop, saved.steps, saved.seconds, saved.cpu_seconds, saved.attempts + 1)
                log.info("%d-lesion group: chunk of %d patient-arms resumed at t = %g h (stop %d of %d)",
                         lesion_count, len(chunk), float(stops[next_stop - 1]) if next_stop else 0.0,
                         next_stop, len(stops))

            def checkpoint(next_stop, steps, collected, state=None, *, chunk=chunk, batch=batch,
                           recist_uses=recist_uses, attempts=attempts, seconds_before=seconds_before,
                           chunk_started=chunk_started, cpu_before=cpu_before, cpu_started=cpu_started,
                           lesion_count=lesion_count):
                return ChunkCheckpoint(
                    lesion_count=lesion_count, members=chunk, size=batch, next_stop=next_stop, steps=steps,
                    seconds=seconds_before + time.perf_counter() - chunk_started,
                    cpu_seconds=cpu_before + time.process_time() - cpu_started,
                    records={name: np.stack([rec[name] for rec in collected]) for name in record_names},
                    recist_uses=recist_uses, attempts=attempts,
                    state_leaves=None if state is None else [np.asarray(leaf)
                                                             for leaf in jax.tree_util.tree_leaves(state)])

            # (wall time, simulated time) after this attempt's first stop: the pace leaves the compile out.
            clock: tuple[float, float] | None = None
            last_report = 0.0
            for index in range(next_stop, len(stops)):
                interrupts.raise_kept_stop()
                stop = stops[index]
                state, readouts, diagnostics = integrator.advance(state, params, solver, float(stop))
                finite = np.asarray(diagnostics["finite"])
                steps += int(np.max(diagnostics["steps"]))
                if not np.all(finite):
                    # Padding copies the chunk's last member, so a failure there is also a real one.
                    a, p = chunk[min(int(np.argmin(finite)), len(chunk) - 1)]
                    raise SimulationError(
                        f"patient {samples[p].patient_id}, arm {arms[a]}: a field became "
                        f"non-finite before t = {stop:g} h; reduce dt_max"
                    )
                if np.any(np.isclose(records, stop, rtol=0.0, atol=1e-6)):
                    collected.append({name: np.asarray(readouts[name]) for name in record_names})
                if (progress is not None and index + 1 < len(stops)
                        and progress.due(lesion_count, chunk, checkpoint_interval_s)):
                    progress.save(checkpoint(index + 1, steps, collected, state))
                    log.info("%d-lesion group: checkpoint at t = %.0f h in %s", lesion_count, stop, progress_dir)
                now = time.perf_counter()
                if clock is None:
                    clock, last_report = (now, float(stop)), now
                elif now - last_report >= PROGRESS_LOG_INTERVAL_S and index + 1 < len(stops):
                    last_report = now
                    # The pace of this attempt since its first stop, in simulated hours per second.
                    pace = (stop - clock[1]) / max(now - clock[0], 1e-9)
                    log.info("%d-lesion group: chunk of %d patient-arms at week %.1f of %.1f (%d steps, "
                             "%.0f min); about %.0f min to go for this chunk at this pace", lesion_count, len(chunk),
                             stop / _WEEK_H, end_h / _WEEK_H, steps,
                             (seconds_before + now - chunk_started) / 60.0, (end_h - stop) / pace / 60.0)
            finished = checkpoint(len(stops), steps, collected)
            if progress is not None:
                progress.save(finished)
            # A stop swallowed during the chunk's last advance: end here, the chunk kept.
            interrupts.raise_kept_stop()
            score_chunk(chunk, collected, recist_uses)
            chunk_log.append(finished.summary(run_now=True))
            done += len(chunk)
            log.info(
                "%d-lesion group: %d/%d patient-arms done (%d steps, %.1f s)",
                lesion_count,
                done,
                len(members),
                steps,
                finished.seconds,
            )
        trace_counts[lesion_count] = integrator.trace_count - traced_before

    return TrialResult(
        samples=samples,
        arms=arms,
        grid=grid,
        lead_in_h=lead_in_h,
        duration_h=duration_h,
        assessment_interval_h=assessment_interval_h,
        durable_cr_h=durable_cr_h,
        first_assessment_h=first_assessment_h,
        record_times_h=np.asarray(records, dtype=float),
        stop_times_h=np.asarray(stops, dtype=float),
        assessment_times_h=assessments,
        outcomes={arm: list(values) for arm, values in outcomes.items()},  # type: ignore[misc]
        records={arm: list(values) for arm, values in histories.items()},  # type: ignore[misc]
        trace_counts=trace_counts,
        chunk_sizes=chunk_sizes,
        settings={
            **run_settings,
            "record_interval_h": float(record_interval_h),
            "backend": jax.default_backend(),
        },
        wall_time_s=time.perf_counter() - started,
        chunks=chunk_log,
    )


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def wilson_interval(count: int, n: int, z: float = 1.959963984540054) -> dict[str, float]:
    """Proportion with the Wilson score interval (95 % by default).

    p̂ = k/n;  centre = (p̂ + z²/2n)/(1 + z²/n);  half-width = z/(1 + z²/n)·√(p̂(1−p̂)/n + z²/4n²)
    (Wilson 1927, JASA 22:209). n = 0 gives NaN. Returns {count, n, rate, lower_95, upper_95}.
    """
    if n <= 0:
        return {
            "count": int(count),
            "n": 0,
            "rate": math.nan,
            "lower_95": math.nan,
            "upper_95": math.nan,
        }
    p = count / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return {
        "count": int(count),
        "n": int(n),
        "rate": p,
        "lower_95": max(0.0, centre - half),
        "upper_95": min(1.0, centre + half),
    }


def _lifelines():
    try:
        from lifelines import KaplanMeierFitter
        from lifelines.statistics import logrank_test, multivariate_logrank_test
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "summarize_trial needs lifelines for Kaplan–Meier and log-rank: "
            "pip install 'lifelines>=0.28' (or tmesolve[analysis])"
        ) from error
    return KaplanMeierFitter, logrank_test, multivariate_logrank_test


def _responded(outcome: PatientOutcome) -> bool:
    return outcome.best_response in ("CR", "PR")


def _rate_by(
    outcomes: Sequence[PatientOutcome], keys: Sequence[Any], groups: Sequence[Any]
) -> dict:
    return {
        str(group): wilson_interval(
            sum(_responded(o) for o, k in zip(outcomes, keys) if k == group),
            sum(1 for k in keys if k == group),
        )
        for group in groups
    }


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _irae_rates(outcomes: Sequence[PatientOutcome], irae: Sequence[bool]) -> dict[str, Any]:
    """irAE rate, ORR among irAE-positive and -negative patients, and whether the
    clinical association holds (ORR among irAE+ ≥ ORR among irAE−): "reproduced", "not
    reproduced", or "untestable" when either group is empty or nobody responded (0/n
    against 0/m says nothing about the association)."""
    positive = _rate_by(outcomes, irae, [True])["True"]
    negative = _rate_by(outcomes, irae, [False])["False"]
    if positive["n"] == 0 or negative["n"] == 0 or positive["count"] + negative["count"] == 0:
        association = "untestable"
    else:
        association = "reproduced" if positive["rate"] >= negative["rate"] else "not reproduced"
    return {"rate": wilson_interval(sum(irae), len(outcomes)), "orr_positive": positive,
            "orr_negative": negative, "association": association}


def _duration_of_response(outcomes: Sequence[PatientOutcome], fitter_class) -> dict[str, Any]:
    """Duration of response over the responders (CR/PR): Kaplan–Meier median, with a
    response still holding at the last scan censored there."""
    responders = [o for o in outcomes if _responded(o)]
    entry: dict[str, Any] = {"responders": len(responders), "events": 0, "median_h": None}
    if responders:
        durations = np.asarray([o.duration_of_response_h for o in responders], dtype=float)
        events = np.asarray([not o.response_censored for o in responders], dtype=bool)
        fitter = fitter_class().fit(durations, events, alpha=0.05)
        entry["events"] = int(events.sum())
        entry["median_h"] = _finite_or_none(float(fitter.median_survival_time_))
    return entry


def _spread(result: TrialResult, arms: Sequence[str]) -> dict[str, float]:
    """Min, median and max of the baseline PD-L1 over the cohort (first arm; the
    baseline is the end of the untreated lead-in, the same in every arm)."""
    values = np.asarray([o.baseline_pdl1 for o in result.outcomes[arms[0]]], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {
        "min": float(np.min(values)),
        "median": float(np.median(values)),
        "max": float(np.max(values)),
    }


def summarize_trial(
    result: TrialResult,
    *,
    tmb_cut: float = TMB_HIGH_MUT_PER_MB,
    pdl1_cut: float = PDL1_HIGH,
    irae_grade: int = IRAE_POSITIVE_GRADE,
) -> dict[str, Any]:
    """Response rates, PFS, log-rank test and biomarker/irAE tables (a JSON-ready dict).

    Definitions (also returned under ``"definitions"``):

    - ORR = (CR + PR)/n, CR rate, DCR = (CR + PR + SD)/n, each with a Wilson 95 % interval;
      best overall response without confirmation scans, SD without a minimum duration.
    - PFS: time from the start of therapy to the first RECIST PD; patients without PD are
      censored at their last assessment (the model has no deaths). Kaplan–Meier per arm
      with 95 % bands (lifelines, Greenwood/exponential), log-rank test between arms
      (two arms: ``logrank_test``; more: ``multivariate_logrank_test`` and each arm against
      the first). Patients are the same in every arm: the test treats the arms as
      independent samples, which ignores the pairing (conservative when the paired
      outcomes are positively correlated, as they are here).
    - TMB-high: the patient's TMB ≥ ``tmb_cut`` (10 mut/Mb, the KEYNOTE-158 cut).
    - PD-L1-high: mean tumour PD-L1 of the largest lesion at the baseline scan ≥ ``pdl1_cut``
      (0.5, the analogue of a tumour proportion score ≥ 50 %; measured, so it includes
      IFN-γ induction on top of P₀, as a pre-treatment biopsy would).
    - Phenotype: the sampled phenotype of the largest lesion; also its classifier reading
      at the baseline scan (CD8 core/margin density against τ).
    - irAE-positive: the largest irAE grade over the run ≥ ``irae_grade`` (2: the grade
      at which irAEs are treated with steroids); ORR among irAE-positive and -negative.
    """
    KaplanMeierFitter, logrank_test, multivariate_logrank_test = _lifelines()
    arms = result.arms
    per_arm: dict[str, Any] = {}
    for arm in arms:
        outcomes = result.outcomes[arm]
        n = len(outcomes)
        counts = {c: sum(o.best_response == c for o in outcomes) for c in (*CATEGORIES, "NE")}
        durations = np.asarray([o.pfs_h for o in outcomes], dtype=float)
        events = np.asarray([o.pfs_event for o in outcomes], dtype=bool)
        fitter = KaplanMeierFitter().fit(durations, events, label=arm, alpha=0.05)
        band = fitter.confidence_interval_
        irae = [o.max_irae_grade >= irae_grade for o in outcomes]
        per_arm[arm] = {
            "n": n,
            "counts": counts,
            "orr": wilson_interval(counts["CR"] + counts["PR"], n),
            "cr_rate": wilson_interval(counts["CR"], n),
            "dcr": wilson_interval(counts["CR"] + counts["PR"] + counts["SD"], n),
            "pfs": {
                "events": int(events.sum()),
                "median_h": _finite_or_none(float(fitter.median_survival_time_)),
                "km": {
                    "time_h": [float(t) for t in fitter.survival_function_.index],
                    "survival": [float(s) for s in fitter.survival_function_.iloc[:, 0]],
                    "lower_95": [float(s) for s in band.iloc[:, 0]],
                    "upper_95": [float(s) for s in band.iloc[:, 1]],
                },
            },
            "irae": _irae_rates(outcomes, irae),
            "duration_of_response": _duration_of_response(outcomes, KaplanMeierFitter),
            "therapy_held": int(sum(o.therapy_held for o in outcomes)),
            "therapy_resumed": int(sum(o.therapy_resumed for o in outcomes)),
            "therapy_discontinued": int(sum(o.therapy_discontinued for o in outcomes)),
            "durable_cr": int(sum(o.durable_cr for o in outcomes)),
            "touched_wall": int(sum(o.touched_wall for o in outcomes)),
        }

    logrank: dict[str, Any] = {
        "p_value": math.nan,
        "statistic": math.nan,
        "test": "none",
        "pairwise": [],
    }
    if len(arms) >= 2:
        durations = [np.asarray([o.pfs_h for o in result.outcomes[arm]]) for arm in arms]
        events = [np.asarray([o.pfs_event for o in result.outcomes[arm]]) for arm in arms]
        if len(arms) == 2:
            test = logrank_test(durations[0], durations[1], events[0], events[1])
            logrank["test"] = "logrank"
        else:
            labels = np.concatenate([[i] * len(d) for i, d in enumerate(durations)])
            test = multivariate_logrank_test(
                np.concatenate(durations), labels, np.concatenate(events)
            )
            logrank["test"] = "multivariate_logrank"
        logrank["statistic"] = float(test.test_statistic)
        logrank["degrees_of_freedom"] = len(arms) - 1
        # No event in any arm gives 0/0; there is no evidence of a difference.
        logrank["p_value"] = float(test.p_value) if math.isfinite(float(test.p_value)) else 1.0
        logrank["events"] = int(sum(int(e.sum()) for e in events))
        for i in range(1, len(arms)):
            pair = logrank_test(durations[0], durations[i], events[0], events[i])
            p = float(pair.p_value)
            logrank["pairwise"].append(
                {"arms": [arms[0], arms[i]], "p_value": p if math.isfinite(p) else 1.0}
            )

    samples = result.samples
    tmb_high = [s.tmb >= tmb_cut for s in samples]
    phenotype = [s.lesions[s.largest_lesion].phenotype for s in samples]
    biomarkers: dict[str, Any] = {
        "tmb": {"cut": tmb_cut, "units": "mut/Mb", "arms": {}},
        "pdl1": {"cut": pdl1_cut, "units": "1", "arms": {}, "cohort": _spread(result, arms)},
        "phenotype": {"arms": {}},
        "baseline_class": {"arms": {}},
    }
    for arm in arms:
        outcomes = result.outcomes[arm]
        pdl1_high = [o.baseline_pdl1 >= pdl1_cut for o in outcomes]
        classes = [o.baseline_class for o in outcomes]
        high_low = {True: "high", False: "low"}
        tmb_rates = _rate_by(outcomes, tmb_high, [True, False])
        pdl1_rates = _rate_by(outcomes, pdl1_high, [True, False])
        biomarkers["tmb"]["arms"][arm] = {high_low[g]: tmb_rates[str(g)] for g in (True, False)}
        biomarkers["pdl1"]["arms"][arm] = {high_low[g]: pdl1_rates[str(g)] for g in (True, False)}
        biomarkers["phenotype"]["arms"][arm] = _rate_by(outcomes, phenotype, PHENOTYPES)
        biomarkers["baseline_class"]["arms"][arm] = _rate_by(outcomes, classes, CLASS_NAMES)

    return {
        "n_patients": len(samples),
        "arms": list(arms),
        "per_arm": per_arm,
        "logrank": logrank,
        "biomarkers": biomarkers,
        "definitions": {
            "orr": "(CR + PR)/n, best overall response, unconfirmed; Wilson 95 % CI",
            "dcr": "(CR + PR + SD)/n; SD without a minimum duration",
            "pfs": "start of therapy to first RECIST PD; censored at the last scan; no deaths",
            "tmb_high": f"patient TMB >= {tmb_cut:g} mut/Mb",
            "pdl1_high": f"mean tumour PD-L1 of the largest lesion at baseline >= {pdl1_cut:g}",
            "phenotype": "sampled phenotype of the largest lesion "
            "(baseline_class: its classifier reading at baseline)",
            "irae_positive": f"max irAE grade >= {irae_grade}",
            "irae_association": "reproduced: ORR among irAE-positive >= ORR among irAE-negative "
            "(as seen clinically); untestable when either group is empty or nobody responded",
            "duration_of_response": "first CR/PR to PD among responders; Kaplan-Meier median "
            "(lifelines: the first time S <= 0.5), a response holding at the last scan "
            "censored there",
            "durable_cr": f"a CR held >= durable_cr_h ({result.durable_cr_h:g} h)",
            "logrank": "arms treated as independent samples (the design is paired)",
        },
    }


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

#: (field, units) of the per-patient outcome columns written per arm.
OUTCOME_COLUMNS = (
    ("best_response", "category"),
    ("best_percent_change", "%"),
    ("baseline_sum_mm", "mm"),
    ("pfs_h", "h"),
    ("pfs_event", "1"),
    ("duration_of_response_h", "h"),
    ("response_censored", "1"),
    ("durable_cr", "1"),
    ("max_irae_grade", "1"),
    ("therapy_held", "1"),
    ("therapy_resumed", "1"),
    ("therapy_discontinued", "1"),
    ("baseline_pdl1", "1"),
    ("baseline_class", "category"),
    ("touched_wall", "1"),
    ("recist_diameter", "name"),
)


def _column(outcomes: Sequence[PatientOutcome], name: str) -> np.ndarray:
    values = [getattr(o, name) for o in outcomes]
    if isinstance(values[0], str):
        return np.asarray(values, dtype=str)
    if isinstance(values[0], (bool, np.bool_)):
        return np.asarray(values, dtype=bool)
    if isinstance(values[0], (int, np.integer)):
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float64)


def _dataset(group, name: str, values, units: str, description: str = ""):
    import h5py

    array = np.asarray(values)
    if array.dtype.kind in ("U", "S", "O"):
        array = np.asarray([str(v) for v in np.ravel(array)], dtype=object).reshape(array.shape)
        dataset = group.create_dataset(name, data=array, dtype=h5py.string_dtype())
    else:
        dataset = group.create_dataset(name, data=array)
    dataset.attrs["units"] = units
    if description:
        dataset.attrs["long_name"] = description
    return dataset


def _format_rate(rate: Mapping[str, float]) -> str:
    if rate["n"] == 0:
        return "n/a (n = 0)"
    return (
        f"{100 * rate['rate']:5.1f} % ({100 * rate['lower_95']:.1f}–{100 * rate['upper_95']:.1f}) "
        f"[{rate['count']}/{rate['n']}]"
    )


#: Parameters whose table entry says they were calibrated in 3-D (docs/model.md).
CALIBRATED_PARAMETERS = tuple(
    symbol for symbol, parameter in PARAMETER_TABLE.items() if "calibrated in 3-D" in parameter.source
)


def _override_text(symbol: str, value: Any) -> str:
    """``symbol=value units`` of a parameter set in the run (core units, as stored)."""
    parameter = PARAMETER_TABLE.get(symbol)
    if parameter is None or not isinstance(value, (int, float)):
        return f"{symbol}={value}"
    units = "" if parameter.units == "1" else f" {parameter.units}"
    return f"{symbol}={value:g}{units}"


def _report(result: TrialResult, summary: Mapping[str, Any], cohort: CohortSpec | None) -> str:
    lines = []
    name = cohort.name if cohort is not None else "cohort"
    lines.append(
        f"tmesolve virtual trial: {name}, {summary['n_patients']} patients, "
        f"arms {', '.join(result.arms)} (paired: every patient in every arm)"
    )
    lines.append(
        "THESE ARE MODEL OUTPUTS OF AN UNCALIBRATED VIRTUAL COHORT, not predictions of clinical "
        "efficacy; the model has not been fitted to any trial."
    )
    overrides = result.settings.get("parameters") or {}
    lines.append(
        f"Tuned: {', '.join(CALIBRATED_PARAMETERS[:-1])} and {CALIBRATED_PARAMETERS[-1]}, "
        "on single lesions for the presets' immune "
        "classes and a hot lesion's partial response (docs/model.md, 'Calibration in 3-D'); "
        "every other default is the parameter table's"
        + (
            "; set in this run: " + ", ".join(_override_text(k, v) for k, v in sorted(overrides.items()))
            if overrides
            else ""
        )
        + "."
    )
    grid = result.grid
    lines.append(
        f"Grid {'x'.join(map(str, grid.shape))} voxels of {grid.spacing_um:g} um per lesion; "
        f"lead-in {result.lead_in_h / _WEEK_H:g} wk untreated, "
        f"then {result.duration_h / _WEEK_H:g} wk of therapy; RECIST 1.1 scans "
        f"{_scan_schedule(result)} "
        f"({result.settings['dtype']}, dt_max {result.settings['dt_max_h']:g} h)."
    )
    if cohort is not None and cohort.source:
        lines.append(f"Cohort: {cohort.source}.")
    lines.append("")
    lines.append("Best overall response (unconfirmed), Wilson 95 % CI [count/n]")
    for arm in result.arms:
        entry = summary["per_arm"][arm]
        anchor = ""
        if arm in CHECKMATE_067_ORR:
            anchor = f"   CheckMate 067 ORR {100 * CHECKMATE_067_ORR[arm]:.1f} %"
        lines.append(
            f"  {arm}: ORR {_format_rate(entry['orr'])}; CR {_format_rate(entry['cr_rate'])}; "
            f"DCR {_format_rate(entry['dcr'])}{anchor}"
        )
    if any(arm in CHECKMATE_067_ORR for arm in result.arms):
        melanoma = cohort is not None and cohort.name == "melanoma"
        lines.append(
            "  CheckMate 067 (advanced melanoma, Larkin 2019): ORR 19.0 % ipilimumab, "
            "43.7 % nivolumab, "
            "57.6 % nivolumab+ipilimumab; shown for context, not as a fit"
            + ("" if melanoma else " (this cohort is not the melanoma preset)")
            + "."
        )
    lines.append("")
    lines.append(
        "Progression-free survival (RECIST PD; censored at the last scan; no deaths in the model)"
    )
    for arm in result.arms:
        pfs = summary["per_arm"][arm]["pfs"]
        median = "not reached" if pfs["median_h"] is None else f"{pfs['median_h'] / _WEEK_H:.1f} wk"
        lines.append(f"  {arm}: median {median}, {pfs['events']} events")
    logrank = summary["logrank"]
    if logrank["test"] != "none":
        lines.append(
            f"  log-rank ({logrank['test']}): statistic {logrank['statistic']:.3g}, "
            f"p = {logrank['p_value']:.3g} ({logrank['events']} events; "
            "arms treated as independent "
            "although the patients are paired)"
        )
        if len(result.arms) > 2:  # the overall test above; each arm against the first here
            for pair in logrank["pairwise"]:
                lines.append(
                    f"    {pair['arms'][0]} vs {pair['arms'][1]}: p = {pair['p_value']:.3g}"
                )
    lines.append("")
    durable_wk = result.durable_cr_h / _WEEK_H
    lines.append(
        "Duration of response (responders; first CR/PR to PD, censored at the last scan) "
        f"and durable CR (a CR held >= {durable_wk:.4g} wk)"
    )
    for arm in result.arms:
        entry = summary["per_arm"][arm]
        response = entry["duration_of_response"]
        if response["responders"] == 0:
            duration = "no responders"
        else:
            median = response["median_h"]
            median = "not reached" if median is None else f"{median / _WEEK_H:.1f} wk"
            duration = (
                f"{response['responders']} responders, median {median}, "
                f"{response['events']} progressed"
            )
        lines.append(f"  {arm}: {duration}; durable CR in {entry['durable_cr']}")
    # A CR is timed from its first CR scan to its last, so the longest one a trial can
    # show spans its first to its last scan.
    scans = result.assessment_times_h
    longest_cr_h = float(scans[-1] - scans[0]) if len(scans) else 0.0
    if result.durable_cr_h > longest_cr_h * (1.0 + 1e-12):
        lines.append(
            f"  (no CR can be durable here: the scans span {longest_cr_h / _WEEK_H:.4g} wk, "
            f"less than the {durable_wk:.4g} wk a durable CR must hold; "
            "set trial.durable_cr_weeks or trial.weeks)"
        )
    lines.append("")
    biomarkers = summary["biomarkers"]
    lines.append(
        f"ORR by biomarker (TMB-high: patient TMB >= {biomarkers['tmb']['cut']:g} mut/Mb; "
        "PD-L1-high: "
        f"largest lesion's tumour PD-L1 at baseline >= {biomarkers['pdl1']['cut']:g})"
    )
    spread = biomarkers["pdl1"].get("cohort")
    if spread and math.isfinite(spread["median"]):
        lines.append(
            f"  baseline PD-L1 in this cohort: {spread['min']:.3g} to {spread['max']:.3g} "
            f"(median {spread['median']:.3g}); a cut outside that range leaves one group empty"
        )
    for arm in result.arms:
        tmb = biomarkers["tmb"]["arms"][arm]
        pdl1 = biomarkers["pdl1"]["arms"][arm]
        lines.append(
            f"  {arm}: TMB-high {_format_rate(tmb['high'])}; TMB-low {_format_rate(tmb['low'])}"
        )
        lines.append(
            f"  {' ' * len(arm)}  PD-L1-high {_format_rate(pdl1['high'])}; "
            f"PD-L1-low {_format_rate(pdl1['low'])}"
        )
        by_phenotype = biomarkers["phenotype"]["arms"][arm]
        lines.append(
            f"  {' ' * len(arm)}  largest lesion "
            + "; ".join(f"{ph} {_format_rate(by_phenotype[ph])}" for ph in PHENOTYPES)
        )
    lines.append("")
    lines.append(
        f"Immune-related adverse events (irAE-positive: {summary['definitions']['irae_positive']} "
        "of the irAE index proxy)"
    )
    for arm in result.arms:
        irae = summary["per_arm"][arm]["irae"]
        entry = summary["per_arm"][arm]
        lines.append(
            f"  {arm}: irAE {_format_rate(irae['rate'])}; "
            f"ORR irAE+ {_format_rate(irae['orr_positive'])}; "
            f"ORR irAE- {_format_rate(irae['orr_negative'])}; "
            f"therapy held in {entry['therapy_held']} "
            f"(resumed in {entry['therapy_resumed']}, "
            f"discontinued in {entry['therapy_discontinued']})"
        )
    association = {
        "reproduced": "irAE-positive patients respond at least as often as irAE-negative ones, "
        "as seen clinically",
        "not reproduced": "irAE-positive patients respond LESS often than irAE-negative ones: "
        "the clinical association is not reproduced",
        "untestable": "no irAE-positive or no irAE-negative patients, or no responders: the "
        "association cannot be tested",
    }
    for arm in result.arms:
        verdict = summary["per_arm"][arm]["irae"]["association"]
        lines.append(f"  {arm}: {association[verdict]}")
    walls = sum(summary["per_arm"][arm]["touched_wall"] for arm in result.arms)
    if walls:
        lines.append("")
        lines.append(
            f"WARNING: in {walls} patient-arms a tumour reached its box wall: "
            "growth is underestimated "
            "there (enlarge the grid or shrink radius_um_range)."
        )
    lines.append("")
    lines.append(
        f"Compiles per lesion-count group: {result.trace_counts} (0: loaded, not compiled); "
        f"chunk sizes: {result.chunk_sizes}; "
        f"wall time {result.wall_time_s:.1f} s on {result.settings['backend']}."
    )
    return "\n".join(lines) + "\n"


def _summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(section, arm, group, metric, rate=None, value=None):
        row = {
            "section": section,
            "arm": arm,
            "group": group,
            "metric": metric,
            "count": "",
            "n": "",
            "value": "",
            "lower_95": "",
            "upper_95": "",
        }
        if rate is not None:
            row.update(
                count=rate["count"],
                n=rate["n"],
                value=rate["rate"],
                lower_95=rate["lower_95"],
                upper_95=rate["upper_95"],
            )
        else:
            row["value"] = value
        rows.append(row)

    for arm, entry in summary["per_arm"].items():
        add("response", arm, "all", "orr", entry["orr"])
        add("response", arm, "all", "cr_rate", entry["cr_rate"])
        add("response", arm, "all", "dcr", entry["dcr"])
        median = entry["pfs"]["median_h"]
        add("pfs", arm, "all", "median_pfs_h", value="inf" if median is None else median)
        add("pfs", arm, "all", "pfs_events", value=entry["pfs"]["events"])
        add("irae", arm, "all", "irae_rate", entry["irae"]["rate"])
        add("irae", arm, "irae_positive", "orr", entry["irae"]["orr_positive"])
        add("irae", arm, "irae_negative", "orr", entry["irae"]["orr_negative"])
        add("irae", arm, "all", "therapy_held", value=entry["therapy_held"])
        add("irae", arm, "all", "therapy_resumed", value=entry["therapy_resumed"])
        add("irae", arm, "all", "therapy_discontinued", value=entry["therapy_discontinued"])
        add("irae", arm, "all", "irae_association", value=entry["irae"]["association"])
        response = entry["duration_of_response"]
        median = response["median_h"]  # "inf": not reached; "": no responders
        add("response", arm, "responders", "median_duration_of_response_h",
            value="" if not response["responders"] else "inf" if median is None else median)
        add("response", arm, "responders", "responses_progressed", value=response["events"])
        add("response", arm, "all", "durable_cr", value=entry["durable_cr"])
    logrank = summary["logrank"]
    if logrank["test"] != "none":
        add("pfs", "all", logrank["test"], "logrank_p", value=logrank["p_value"])
        for pair in logrank["pairwise"]:
            add(
                "pfs",
                f"{pair['arms'][0]} vs {pair['arms'][1]}",
                "logrank",
                "logrank_p",
                value=pair["p_value"],
            )
    for marker in ("tmb", "pdl1", "phenotype", "baseline_class"):
        for arm, groups in summary["biomarkers"][marker]["arms"].items():
            for group, rate in groups.items():
                add(f"biomarker_{marker}", arm, group, "orr", rate)
    return rows


def _spec_dict(cohort: CohortSpec | None) -> dict[str, Any]:
    if cohort is None:
        return {}
    values = {field.name: getattr(cohort, field.name) for field in dataclasses.fields(cohort)}
    values["phenotype_probabilities"] = dict(values["phenotype_probabilities"])
    return values


def write_trial(
    result: TrialResult,
    summary: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    cohort: CohortSpec | None = None,
    figures: bool = True,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``cohort.h5``, ``patients.csv``, ``summary.csv``, ``report.txt`` and ``figures/``.

    ``cohort.h5`` (h5py, ``libver=("earliest", "v110")``; every dataset has ``units``):
    ``/cohort/lesions/<column>`` (one row per lesion, :func:`cohort_table`),
    ``/arms/<arm>/outcomes/<field>`` (one row per patient, same order as
    ``/arms/<arm>/patient_id``), ``/arms/<arm>/percent_change`` and
    ``/arms/<arm>/sum_diameters_mm`` (patients, assessments) with ``/assessment_time_h``,
    ``/arms/<arm>/km/{time_h, survival, lower_95, upper_95}``, and
    ``/arms/<arm>/records/<patient_id>/<readout>`` (records[, lesions]) with
    ``/record_time_h``. The summary is the root attribute ``summary`` (JSON);
    ``attrs`` (e.g. the composed configuration and the command-line overrides of
    ``tmesolve-cohort``) become further root attributes (lists and mappings as JSON).

    Returns the written paths by name.
    """
    import h5py

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "h5": out / "cohort.h5",
        "patients": out / "patients.csv",
        "summary": out / "summary.csv",
        "report": out / "report.txt",
    }
    units = {name: unit for name, unit, _ in TIMESERIES}
    units.update(dict(SYSTEMIC))

    with h5py.File(paths["h5"], "w", libver=("earliest", "v110")) as handle:
        handle.attrs["title"] = "tmesolve virtual trial"
        handle.attrs["note"] = "model outputs of an uncalibrated virtual cohort"
        handle.attrs["arms"] = json.dumps(list(result.arms))
        handle.attrs["cohort"] = json.dumps(_spec_dict(cohort), default=str)
        handle.attrs["grid_shape"] = np.asarray(result.grid.shape)
        handle.attrs["grid_spacing_um"] = float(result.grid.spacing_um)
        for name in (
            "lead_in_h",
            "duration_h",
            "assessment_interval_h",
            "first_assessment_h",
            "durable_cr_h",
            "wall_time_s",
        ):
            handle.attrs[name] = float(getattr(result, name))
        handle.attrs["settings"] = json.dumps(result.settings, default=str)
        handle.attrs["trace_counts"] = json.dumps(result.trace_counts)
        handle.attrs["chunks"] = json.dumps(result.chunks)
        handle.attrs["summary"] = json.dumps(summary, default=str)
        for key, value in (attrs or {}).items():
            plain = isinstance(value, (str, int, float, np.integer, np.floating))
            handle.attrs[key] = value if plain else json.dumps(value, default=str)
        _dataset(handle, "record_time_h", result.record_times_h, "h", "time of each readout record")
        _dataset(
            handle, "assessment_time_h", result.assessment_times_h, "h", "RECIST assessment times"
        )
        lesions = handle.create_group("cohort/lesions")
        for name, values in cohort_table(result.samples).items():
            _dataset(lesions, name, values, COHORT_UNITS.get(name, "1"))
        for arm in result.arms:
            group = handle.create_group(f"arms/{arm}")
            outcomes = result.outcomes[arm]
            _dataset(group, "patient_id", [o.patient_id for o in outcomes], "name")
            for name, unit in OUTCOME_COLUMNS:
                _dataset(group.require_group("outcomes"), name, _column(outcomes, name), unit)
            _dataset(
                group,
                "percent_change",
                np.stack([o.percent_change for o in outcomes]),
                "%",
                "change of the sum of diameters from baseline at each assessment",
            )
            _dataset(
                group, "sum_diameters_mm", np.stack([o.sum_diameters_mm for o in outcomes]), "mm"
            )
            _dataset(
                group,
                "category",
                np.asarray([list(o.categories) for o in outcomes], dtype=str),
                "category",
                "RECIST 1.1 category at each assessment",
            )
            km = summary["per_arm"][arm]["pfs"]["km"]
            for name in ("time_h", "survival", "lower_95", "upper_95"):
                _dataset(
                    group.require_group("km"),
                    name,
                    np.asarray(km[name], dtype=float),
                    "h" if name == "time_h" else "1",
                )
            for outcome, history in zip(outcomes, result.records[arm]):
                records = group.require_group(f"records/{outcome.patient_id}")
                for name, values in history.items():
                    _dataset(records, name, values, units.get(name, "1"))

    with open(paths["patients"], "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            [
                "arm",
                "patient_id",
                "n_lesions",
                "patient_tmb_mut_per_mb",
                "largest_lesion_phenotype",
                "baseline_pdl1",
                "baseline_class",
                "best_response",
                "best_percent_change",
                "pfs_weeks",
                "pfs_event",
                "duration_of_response_weeks",
                "durable_cr",
                "max_irae_grade",
                "therapy_held",
                "therapy_resumed",
                "therapy_discontinued",
                "touched_wall",
            ]
        )
        for arm in result.arms:
            for sample, o in zip(result.samples, result.outcomes[arm]):
                writer.writerow(
                    [
                        arm,
                        o.patient_id,
                        sample.n_lesions,
                        f"{sample.tmb:.4g}",
                        sample.lesions[sample.largest_lesion].phenotype,
                        f"{o.baseline_pdl1:.4g}",
                        o.baseline_class,
                        o.best_response,
                        f"{o.best_percent_change:.4g}",
                        f"{o.pfs_h / _WEEK_H:.4g}",
                        int(o.pfs_event),
                        f"{o.duration_of_response_h / _WEEK_H:.4g}",
                        int(o.durable_cr),
                        o.max_irae_grade,
                        int(o.therapy_held),
                        int(o.therapy_resumed),
                        int(o.therapy_discontinued),
                        int(o.touched_wall),
                    ]
                )
    with open(paths["summary"], "w", newline="", encoding="utf-8") as stream:
        rows = _summary_rows(summary)
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["report"].write_text(_report(result, summary, cohort), encoding="utf-8")
    if figures:
        paths.update(plot_trial(result, summary, out / "figures"))
    return paths


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

RESPONSE_COLOURS = {
    "CR": "#1b7837",
    "PR": "#7fbf7b",
    "SD": "#bdbdbd",
    "PD": "#d6604d",
    "NE": "#f0f0f0",
}
#: Arm colours avoid the greens of CR/PR (the swimmer plot draws responses on the arm bars).
ARM_COLOURS = ("#2166ac", "#b2182b", "#e08214", "#762a83", "#4d4d4d", "#8c510a")


def _save(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def plot_trial(
    result: TrialResult, summary: Mapping[str, Any], out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Waterfall of best % change per arm, Kaplan–Meier PFS with 95 % bands, swimmer plot (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = result.arms
    written = {}

    figure = Figure(figsize=(max(5.0, 3.2 * len(arms)), 3.8), layout="constrained")
    axes = figure.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for ax, arm in zip(axes, arms):
        outcomes = sorted(
            result.outcomes[arm], key=lambda o: -np.nan_to_num(o.best_percent_change, nan=-1e9)
        )
        values = [o.best_percent_change for o in outcomes]
        ax.bar(
            range(len(values)),
            np.nan_to_num(values),
            color=[RESPONSE_COLOURS[o.best_response] for o in outcomes],
            edgecolor="#404040",
            linewidth=0.4,
        )
        ax.axhline(20.0, color="#d6604d", linestyle="--", linewidth=0.8)
        ax.axhline(-30.0, color="#1b7837", linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(f"{arm}\nORR {100 * summary['per_arm'][arm]['orr']['rate']:.0f} %", fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel("patients")
    axes[0].set_ylabel("best change of sum of diameters (%)")
    axes[0].set_ylim(
        -105.0,
        max(
            40.0,
            1.1
            * max(
                [
                    np.nanmax([o.best_percent_change for o in result.outcomes[a]] + [0.0])
                    for a in arms
                ]
            ),
        ),
    )
    figure.legend(
        handles=[Patch(color=RESPONSE_COLOURS[c], label=c) for c in CATEGORIES], loc="outside right"
    )
    written["waterfall"] = _save(figure, out / "waterfall.png")

    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    for index, arm in enumerate(arms):
        colour = ARM_COLOURS[index % len(ARM_COLOURS)]
        km = summary["per_arm"][arm]["pfs"]["km"]
        weeks = np.asarray(km["time_h"]) / _WEEK_H
        ax.step(weeks, km["survival"], where="post", color=colour, label=arm)
        ax.fill_between(
            weeks, km["lower_95"], km["upper_95"], step="post", color=colour, alpha=0.15
        )
        censored = [o.pfs_h / _WEEK_H for o in result.outcomes[arm] if not o.pfs_event]
        if censored:
            level = (
                np.interp(censored, weeks, km["survival"])
                if len(weeks) > 1
                else [km["survival"][0]] * len(censored)
            )
            ax.plot(censored, level, "|", color=colour, markersize=8)
    logrank = summary["logrank"]
    title = "Progression-free survival (Kaplan–Meier, 95 % band)"
    if logrank["test"] != "none":
        title += f"\nlog-rank p = {logrank['p_value']:.3g}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("weeks from start of therapy")
    ax.set_ylabel("progression-free")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlim(0.0, result.duration_h / _WEEK_H * 1.05)
    ax.legend(fontsize=8, loc="upper right")
    written["km"] = _save(figure, out / "km_pfs.png")

    from matplotlib.lines import Line2D

    rows = [(arm, o) for arm in arms for o in result.outcomes[arm]]
    figure = Figure(figsize=(7.0, max(3.0, 0.22 * len(rows) + 1.4)), layout="constrained")
    ax = figure.subplots()
    assessments = (result.assessment_times_h - result.lead_in_h) / _WEEK_H
    span = result.duration_h / _WEEK_H
    for y, (arm, o) in enumerate(rows):
        colour = ARM_COLOURS[arms.index(arm) % len(ARM_COLOURS)]
        follow_up = o.pfs_h / _WEEK_H
        ax.barh(y, follow_up, color=colour, alpha=0.35, height=0.7)
        responded = [i for i, c in enumerate(o.categories) if c in ("CR", "PR")]
        if responded:
            first = assessments[responded[0]]
            length = (
                o.duration_of_response_h / _WEEK_H
                if math.isfinite(o.duration_of_response_h)
                else 0.0
            )
            ax.barh(y, length, left=first, color=RESPONSE_COLOURS[o.best_response], height=0.35)
            ax.plot(
                first,
                y,
                marker="o",
                color=RESPONSE_COLOURS[o.best_response],
                markeredgecolor="black",
                markersize=5,
            )
        if o.pfs_event:
            ax.plot(follow_up, y, marker="X", color="#b2182b", markersize=7)
        else:
            ax.plot(follow_up + 0.012 * span, y, marker=">", color="black", markersize=5)
    ax.set_yticks(range(len(rows)), [f"{o.patient_id} ({arm})" for arm, o in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("weeks from start of therapy")
    ax.set_title("Swimmer plot: progression-free follow-up per patient and arm", fontsize=9)
    ax.set_xlim(0.0, span * 1.06)
    handles = [
        Patch(color=ARM_COLOURS[i % len(ARM_COLOURS)], alpha=0.35, label=arm)
        for i, arm in enumerate(arms)
    ]
    handles += [
        Patch(color=RESPONSE_COLOURS["CR"], label="CR (duration)"),
        Patch(color=RESPONSE_COLOURS["PR"], label="PR (duration)"),
        Line2D(
            [],
            [],
            marker="o",
            color="white",
            markerfacecolor="#7fbf7b",
            markeredgecolor="black",
            label="first response",
        ),
        Line2D(
            [], [], marker="X", color="white", markerfacecolor="#b2182b", markersize=8, label="PD"
        ),
        Line2D([], [], marker=">", color="white", markerfacecolor="black", label="censored"),
    ]
    figure.legend(handles=handles, loc="outside right", fontsize=7)
    written["swimmer"] = _save(figure, out / "swimmer.png")
    return written
