"""The run driver: a :class:`Simulation` in, ``run.h5`` (+ ``run.xmf``) out, resumable.

A *builder* turns a validated configuration (:class:`tmesolve.config.RunConfig`)
into a :class:`Simulation`: the model, its parameters and initial state, the
output and event times, and what to write. :func:`run_simulation` then runs
the host loop over the stops (outputs and events; one compiled chunk per
stop), and at every output time appends a record of the readouts the chunk
computed on the device, a snapshot of the requested fields (every
``snapshot_every``-th output, and the last), and a checkpoint of the full
state, flushing after each. At the end it calls the simulation's ``finish``
(RECIST, verification error, ...), writes ``/response`` and marks the file
``complete``.

Resume: the checkpoint holds every leaf of the state pytree (flattened with
:func:`jax.tree_util.tree_flatten_with_path`, exact dtypes) with its step and
time. Rebuilding the simulation from the stored configuration gives the same
tree structure; the arrays are put back into it, records and snapshots later
than the checkpoint are dropped, and the loop continues with the same stops.
Since a chunk is a deterministic function of (state, params, stop), a run
that is stopped and resumed writes the same numbers, bit for bit, as one that
was not (tested on CPU in float32).

Builders are registered in :data:`BUILDERS` by experiment kind; this module
registers the verification problems, and ``tmesolve.model.tme_setup`` (when it
is part of the build) registers ``"tme"``. Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from tmesolve import interrupts
from tmesolve._pytree import pytree_dataclass
from tmesolve.errors import ConfigError
from tmesolve.grid import Grid
from tmesolve.integrate import (
    Integrator,
    SimulationError,
    SolverParams,
    initial_state,
    make_solver_params,
)
from tmesolve.io.hdf5 import (
    RUN_FILE_NAME,
    STATUS_COMPLETE,
    FieldSpec,
    RunFileError,
    RunWriter,
    decode_attribute,
    find_checkpoint,
    set_attribute,
)
from tmesolve.model.base import Model, State

if TYPE_CHECKING:  # the typed configuration tree; importing it would import Hydra
    from tmesolve.config import RunConfig

logger = logging.getLogger("tmesolve.simulation")

#: Root attribute holding the run's final summary (JSON).
SUMMARY_ATTRIBUTE = "summary"


# ---------------------------------------------------------------------------
# What a run is
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Records:
    """What ``finish`` sees at the end of a run (read back from the run file).

    Attributes:
        time_h: (n_records,) record times (h).
        timeseries: name -> (n_records,) or (n_records, lesions) readouts.
        systemic: name -> (n_records,) patient-level values.
        snapshot_times_h: (n_snapshots,) snapshot times (h).
        final_state: the last state, leaves as NumPy arrays.
        grid: the lesion grid; lesions: number of lesions.
    """

    time_h: np.ndarray
    timeseries: dict[str, np.ndarray]
    systemic: dict[str, np.ndarray]
    snapshot_times_h: np.ndarray
    final_state: Any
    grid: Grid
    lesions: int


@dataclasses.dataclass
class Simulation:
    """Everything :func:`run_simulation` needs (built from a configuration by a builder).

    Attributes:
        name: experiment kind, e.g. "tme" or "verify_gaussian".
        model: the model (static: grid, species, lesions).
        integrator_order: splitting order (1 Lie, 2 Strang).
        params: the model's parameter pytree.
        solver: time-stepper numbers.
        state: the initial state.
        output_times_h: record/snapshot times (h), increasing, starting at the
            initial time.
        event_times_h: doses and other events (h); steps land on them.
        fields: species written per snapshot (names are model species names).
        maps: name -> (array (lesions, nx, ny, nz), units, long_name), written once.
        timeseries: (name, units, per_lesion) readouts of ``model.readouts``
            stored under /timeseries.
        systemic: (name, units) readouts of ``model.readouts`` stored under /systemic.
        finish: computes the final summary from the :class:`Records`; may return
            a "response" item (keyword arguments of ``RunWriter.write_response``).
        seed: the run's seed (provenance).
        merge_reactions: merge the reaction halves of neighbouring Strang steps
            (``solver.merge_reactions``).
    """

    name: str
    model: Model
    integrator_order: int
    params: Any
    solver: SolverParams
    state: State
    output_times_h: np.ndarray
    event_times_h: np.ndarray
    fields: list[FieldSpec]
    maps: dict[str, tuple[np.ndarray, str, str]]
    timeseries: list[tuple[str, str, bool]]
    systemic: list[tuple[str, str]]
    finish: Callable[[Records], dict] | None
    seed: int
    merge_reactions: bool = False

    @property
    def dtype(self) -> str:
        return str(np.dtype(self.state.fields.dtype))


Builder = Callable[["RunConfig"], Simulation]

#: Experiment kind -> builder. "tme" is added by tmesolve.model.tme_setup when present.
BUILDERS: dict[str, Builder] = {}


def register_builder(kind: str, builder: Builder) -> Builder:
    """Register ``builder`` for ``experiment.kind == kind`` (returns it, for use as a decorator)."""
    BUILDERS[kind] = builder
    return builder


_TME_MODULE = "tmesolve.model.tme_setup"


def _load_tme_builder() -> None:
    """Register the TME builder if its module is part of the build.

    A missing module is not an error (the app then offers the verification
    problems only); an error *inside* the module is, and propagates.
    """
    if "tme" in BUILDERS:
        return
    try:
        present = importlib.util.find_spec(_TME_MODULE) is not None
    except ModuleNotFoundError:
        present = False
    if present:
        module = importlib.import_module(_TME_MODULE)
        builder = getattr(module, "build_tme_simulation", None)
        if builder is not None:  # absent while the module is being written
            BUILDERS.setdefault("tme", builder)


def available_kinds() -> tuple[str, ...]:
    """The experiment kinds that can run in this build."""
    _load_tme_builder()
    return tuple(BUILDERS)


def build_simulation(config: RunConfig) -> Simulation:
    """The :class:`Simulation` of a validated configuration (raises ConfigError on bad input)."""
    _load_tme_builder()
    kind = config.experiment.kind
    if kind not in BUILDERS:
        raise ConfigError("experiment.kind", kind, "one of " + ", ".join(BUILDERS))
    return BUILDERS[kind](config)


# ---------------------------------------------------------------------------
# Helpers for builders
# ---------------------------------------------------------------------------


def output_schedule(duration_h: float, interval_h: float, start_h: float = 0.0) -> np.ndarray:
    """Output times start, start + Δ, ..., and the end (h), float64.

    The end is included even when the duration is not a whole number of
    intervals; a time within 1e-9 relative of the end is merged into it.
    """
    end = start_h + duration_h
    count = int(math.floor(duration_h / interval_h * (1 + 1e-12)))
    times = start_h + interval_h * np.arange(count + 1, dtype=np.float64)
    if end - times[-1] > 1e-9 * max(1.0, abs(end)):
        times = np.append(times, end)
    else:
        times[-1] = end
    return times


def select_fields(
    model: Model, fields: str | Sequence[str], key: str = "output.fields"
) -> list[FieldSpec]:
    """FieldSpecs of the model species named in ``fields`` ("all": every species)."""
    by_name = {species.name: species for species in model.species}
    if isinstance(fields, str):
        names = list(by_name) if fields == "all" else [fields]
    else:
        names = list(fields)
    for name in names:
        if name not in by_name:
            raise ConfigError(key, name, "a field of this model: " + ", ".join(by_name))
    return [
        FieldSpec(name, by_name[name].units, by_name[name].long_name or name.replace("_", " "))
        for name in names
    ]


def jax_dtype(name: str) -> Any:
    """The JAX dtype of "float32"/"float64"; float64 switches on ``jax_enable_x64``."""
    if name == "float64":
        configure_precision("float64")
        return jnp.float64
    return jnp.float32


def configure_precision(dtype: str) -> None:
    """Enable 64-bit JAX arrays for a float64 run (a process-wide setting)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def configure_compilation_cache(
    directory: str | os.PathLike[str] | None, log: logging.Logger = logger
) -> str | None:
    """Use a persistent compilation cache in ``directory`` (None: leave JAX as it is).

    Every compiled chunk is cached (no minimum compile time or size), so the
    jobs of a sweep that share the directory compile once. Programs compiled
    before the call are not cached. JAX opens its cache once per process, in
    the folder set at the first compile after one is set, and ignores a later
    change of folder; a new folder therefore resets JAX's cache, so that runs
    in one process (a sweep's jobs run in turn, a notebook) write where each
    says.
    """
    if directory is None:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("compilation cache %s unusable (%s); compiling without it", path, error)
        return None
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return str(path)


def backend_description() -> str:
    """``cpu (cpu)``, ``gpu (NVIDIA H100 80GB HBM3)``: platform and device kind."""
    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


def git_commit() -> str | None:
    """The commit of the tmesolve source tree, if it is a git checkout (else None)."""
    source = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def provenance(config_yaml: str, overrides: Sequence[str], seed: int) -> dict[str, Any]:
    """Root attributes of a new run file (the writer adds versions, dtype, created, status)."""
    attrs: dict[str, Any] = {
        "config": config_yaml,
        "overrides": [str(item) for item in overrides],
        "seed": int(seed),
        "backend": backend_description(),
    }
    commit = git_commit()
    if commit is not None:
        attrs["git_commit"] = commit
    return attrs


# ---------------------------------------------------------------------------
# Checkpoint: the state pytree as named arrays and back
# ---------------------------------------------------------------------------


def _is_key_array(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def flatten_state(state: Any) -> tuple[dict[str, np.ndarray], str]:
    """(key -> host array, tree-structure text) of a state pytree.

    Keys are :func:`jax.tree_util.keystr` of each leaf's path (``.fields``,
    ``.aux.central``, ...). Typed PRNG keys are stored as their key data.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    arrays = {}
    for path, leaf in leaves:
        value = jax.random.key_data(leaf) if _is_key_array(leaf) else leaf
        arrays[jax.tree_util.keystr(path)] = np.asarray(value)
    return arrays, str(treedef)


def unflatten_state(
    template: Any, arrays: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> Any:
    """Put checkpoint arrays back into the tree structure of ``template`` (exact dtypes).

    Raises:
        RunFileError: a key is missing or extra, or a shape or dtype differs
            (the checkpoint was made by another configuration).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(path) for path, _ in leaves}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise RunFileError(
            f"{source}: state does not match this configuration "
            f"(missing {missing}, unexpected {extra})"
        )
    restored = []
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        array = np.asarray(arrays[key])
        if _is_key_array(leaf):
            like = jax.random.key_data(leaf)
            if array.shape != like.shape or array.dtype != like.dtype:
                raise RunFileError(
                    f"{source}: key {key} has shape {array.shape}, expected {like.shape}"
                )
            restored.append(
                jax.random.wrap_key_data(jnp.asarray(array), impl=jax.random.key_impl(leaf))
            )
            continue
        if array.shape != np.shape(leaf) or array.dtype != np.dtype(leaf.dtype):
            raise RunFileError(
                f"{source}: {key} is {array.dtype}{list(array.shape)}, this configuration "
                f"has {np.dtype(leaf.dtype)}{list(np.shape(leaf))}"
            )
        restored.append(jnp.asarray(array))
    return jax.tree_util.tree_unflatten(treedef, restored)


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Reports how far a run is: a tqdm bar on a terminal, log lines in a batch job.

    Log mode writes a line at each output and, from a background thread, at
    least every ``interval_s`` seconds while a long chunk runs (the simulated
    time inside a chunk is not known without a device sync, so that line says
    which interval is being computed).
    """

    def __init__(
        self,
        mode: str | bool,
        start_h: float,
        end_h: float,
        log: logging.Logger,
        interval_s: float = 30.0,
        outputs: int = 0,
    ) -> None:
        if mode is True:
            mode = "auto"
        if mode is False:
            mode = "off"
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.log = log
        self.start_h, self.end_h = start_h, end_h
        # Days for runs of two days or more, hours for shorter ones.
        self.unit, self.hours_per_unit = ("d", 24.0) if end_h >= 48.0 else ("h", 1.0)
        self.outputs = outputs
        self.interval_s = interval_s
        self.began = time.perf_counter()
        self.steps = 0
        self.stepping_s = 0.0
        self.current_h = start_h
        self.chunk: tuple[float, float] | None = None
        self._last_line = time.perf_counter()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._bar = None
        self._thread = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            unit, scale = self.unit, self.hours_per_unit
            self._bar = tqdm(
                total=end_h / scale,
                initial=start_h / scale,
                unit=unit,
                desc="simulated",
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3g}/{total:.3g} "
                + unit
                + " [{elapsed}<{remaining}{postfix}]",
            )
        elif self.mode == "log":
            self._thread = threading.Thread(
                target=self._heartbeat, name="tmesolve-progress", daemon=True
            )
            self._thread.start()

    def _rate(self) -> tuple[float, float]:
        """(steps per second, wall seconds left) from the stepping time so far."""
        steps_per_s = self.steps / self.stepping_s if self.stepping_s > 0 else math.nan
        done = self.current_h - self.start_h
        left = self.end_h - self.current_h
        eta = self.stepping_s / done * left if done > 0 else math.nan
        return steps_per_s, eta

    def begin_chunk(self, t0_h: float, t1_h: float) -> None:
        with self._lock:
            self.chunk = (t0_h, t1_h)

    def chunk_done(self, t_h: float, steps: int, wall_s: float) -> None:
        with self._lock:
            self.chunk = None
            self.steps += steps
            self.stepping_s += wall_s
            self.current_h = t_h
        if self._bar is not None:
            steps_per_s, _ = self._rate()
            # Set, not add: sums of float increments would end at 99.9 %.
            self._bar.n = t_h / self.hours_per_unit
            self._bar.set_postfix_str(f"{steps_per_s:.0f} steps/s", refresh=True)

    def output(self, index: int, t_h: float) -> None:
        if self.mode != "log":
            return
        steps_per_s, eta = self._rate()
        fraction = (t_h - self.start_h) / max(self.end_h - self.start_h, 1e-300)
        scale, unit = self.hours_per_unit, self.unit
        self.log.info(
            "t = %.4g %s of %.4g %s (%.0f %%), output %d/%d, %d steps, %.0f steps/s, "
            "elapsed %s, ETA %s",
            t_h / scale,
            unit,
            self.end_h / scale,
            unit,
            100.0 * fraction,
            index + 1,
            self.outputs,
            self.steps,
            steps_per_s,
            _clock(time.perf_counter() - self.began),
            _clock(eta),
        )
        self._last_line = time.perf_counter()

    def _heartbeat(self) -> None:
        while not self._closing.wait(min(self.interval_s, 1.0)):
            if time.perf_counter() - self._last_line < self.interval_s:
                continue
            with self._lock:
                chunk = self.chunk
            if chunk is None:
                continue
            _, eta = self._rate()
            scale, unit = self.hours_per_unit, self.unit
            self.log.info(
                "computing t = %.4g -> %.4g %s, elapsed %s, ETA %s",
                chunk[0] / scale,
                chunk[1] / scale,
                unit,
                _clock(time.perf_counter() - self.began),
                _clock(eta),
            )
            self._last_line = time.perf_counter()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON types (NumPy scalars and arrays converted; NaN kept as float)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a JAX array
        return _jsonable(np.asarray(value))
    return value if value is None or isinstance(value, str) else str(value)


def stored_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary a completed run stored in its root attributes ({} if none)."""
    from tmesolve.io.reader import open_run

    with open_run(run_dir) as run:
        text = run.attrs.get(SUMMARY_ATTRIBUTE)
    return json.loads(text) if isinstance(text, str) else {}


def read_records(file: Any, final_state: Any, grid: Grid, lesions: int) -> Records:
    """:class:`Records` from an open run file (h5py)."""
    from tmesolve.io.hdf5 import SYSTEMIC, TIME, TIMESERIES, data_names

    count = int(file[TIMESERIES][TIME].shape[0])
    timeseries = {name: file[TIMESERIES][name][:count] for name in data_names(file[TIMESERIES])}
    systemic = {name: file[SYSTEMIC][name][:count] for name in data_names(file[SYSTEMIC])}
    return Records(
        time_h=file[TIMESERIES][TIME][:count],
        timeseries=timeseries,
        systemic=systemic,
        snapshot_times_h=file[TIME][()],
        final_state=final_state,
        grid=grid,
        lesions=lesions,
    )


def _readout_rows(sim: Simulation, readouts: Mapping[str, Any], t_h: float) -> tuple[dict, dict]:
    values = {name: np.asarray(value) for name, value in jax.device_get(dict(readouts)).items()}
    missing = [name for name, _, _ in sim.timeseries if name not in values]
    missing += [name for name, _ in sim.systemic if name not in values]
    if missing:
        raise SimulationError(
            f"the model's readouts at t = {t_h:g} h lack {missing}; it returned {sorted(values)}"
        )
    timeseries = {name: values[name] for name, _, _ in sim.timeseries}
    systemic = {name: values[name] for name, _ in sim.systemic}
    return timeseries, systemic


def _field_key(state: State) -> str:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if leaf is state.fields:
            return jax.tree_util.keystr(path)
    raise RuntimeError("state.fields is not a leaf of the state")  # pragma: no cover


def run_simulation(
    sim: Simulation,
    run_dir: str | os.PathLike[str],
    *,
    attrs: Mapping[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | str = True,
    snapshot_every: int = 1,
    log: logging.Logger = logger,
    log_interval_s: float = 30.0,
    stop_after_snapshots: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``sim`` into ``run_dir/run.h5``; returns the summary.

    Args:
        sim: what to run (from a builder).
        run_dir: the run directory (created if needed).
        attrs: provenance for a new file (config, overrides, seed, backend, ...).
        resume: continue the run file in ``run_dir`` from its checkpoint;
            without it an existing run file is refused (FileExistsError).
        overwrite: start afresh over an existing run file (the app does so for
            one stopped before its first checkpoint, which holds nothing to keep).
        progress: "auto" (bar on a terminal, log lines otherwise), "bar", "log",
            "off", or True (auto) / False (off).
        snapshot_every: write the fields at every n-th output (and the last);
            records and checkpoints are written at every output.
        log_interval_s: least frequency of progress lines in log mode.
        stop_after_snapshots: stop cleanly after writing this many snapshots in
            this call, leaving the file ``running`` and resumable (for tests).

    Returns:
        ``finish``'s summary plus ``status``, ``run_file``, ``steps``,
        ``wall_time_s`` and ``compile_time_s``.

    Raises:
        SimulationError: a field became non-finite, or max_steps was reached.
        FileExistsError, RunFileError: see ``resume``.
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE_NAME
    model = sim.model
    outputs = np.asarray(sim.output_times_h, dtype=np.float64)
    events = np.asarray(sim.event_times_h, dtype=np.float64).reshape(-1)
    if outputs.ndim != 1 or outputs.size == 0 or np.any(np.diff(outputs) <= 0):
        raise ValueError("output_times_h: expected increasing times (h)")
    last_index = len(outputs) - 1
    started = time.perf_counter()
    integrator = Integrator(model, sim.integrator_order, sim.merge_reactions)

    if resume:
        writer = RunWriter.open_for_resume(path)
        try:
            arrays, step, checkpoint_h, meta = writer.read_checkpoint()
            _, treedef_text = flatten_state(sim.state)
            if meta.get("treedef") not in (None, treedef_text):
                raise RunFileError(
                    f"{path}: the checkpoint's state structure differs from this "
                    "configuration's; was the run made by another tmesolve version?"
                )
            state = unflatten_state(sim.state, arrays, source=f"{path} checkpoint")
            writer.truncate_after(checkpoint_h)
        except BaseException:
            writer.close()
            raise
        tolerance = 1e-9 * max(1.0, abs(checkpoint_h))
        done = int(np.searchsorted(outputs, checkpoint_h + tolerance, side="right"))
        start_h = checkpoint_h
        log.info(
            "resuming %s from t = %.6g h (step %d, %d of %d outputs done)",
            path,
            checkpoint_h,
            step,
            done,
            len(outputs),
        )
    else:
        writer = RunWriter.create(
            path,
            overwrite=overwrite,
            grid=model.grid,
            lesions=model.lesions,
            fields=sim.fields,
            maps=sim.maps,
            dtype=sim.dtype,
            attrs=attrs,
            timeseries=sim.timeseries,
            systemic=sim.systemic,
        )
        state = sim.state
        start_h = float(state.time)
        done = int(np.searchsorted(outputs, start_h - 1e-9 * max(1.0, abs(start_h)), side="left"))

    fields_key = _field_key(sim.state)
    field_index = {spec.name: model.index(spec.name) for spec in sim.fields}
    snapshots_written = 0
    reporter = Progress(progress, start_h, float(outputs[-1]), log, log_interval_s, len(outputs))
    summary: dict[str, Any] = {}
    # The writer outside the scope: a stop that the scope raises from a later error
    # still reaches it, and the file stays resumable.
    with writer, interrupts.stops_kept():
        try:
            # A zero-length advance compiles the chunk (or loads it from the
            # compiled-loop cache) and gives the readouts of the start state;
            # a stop swallowed while setting up ends the run before that.
            interrupts.raise_kept_stop()
            clock = time.perf_counter()
            state, readouts, diagnostics = integrator.advance(
                state, sim.params, sim.solver, start_h
            )
            jax.block_until_ready(readouts)
            compile_s = time.perf_counter() - clock
            set_attribute(writer.file, "compile_time_s", float(compile_s))
            log.info(
                "%s the %s chunk%s in %.2f s (%s, %s, grid %s x %d lesion(s))",
                "loaded" if integrator.last_source == "disk" else "compiled",
                sim.name,
                " from the compiled-loop cache" if integrator.last_source == "disk" else "",
                compile_s,
                backend_description(),
                sim.dtype,
                "x".join(map(str, model.grid.shape)),
                model.lesions,
            )

            def write_output(index: int, t_h: float) -> None:
                nonlocal snapshots_written
                arrays, treedef_text = flatten_state(state)
                timeseries, systemic = _readout_rows(sim, readouts, t_h)
                writer.append_record(t_h, timeseries, systemic)
                if index % snapshot_every == 0 or index == last_index:
                    fields = arrays[fields_key]
                    writer.append_snapshot(
                        t_h, {name: fields[i] for name, i in field_index.items()}
                    )
                    snapshots_written += 1
                writer.write_checkpoint(
                    arrays,
                    step=int(arrays[".step"]) if ".step" in arrays else 0,
                    time_h=t_h,
                    meta={"output_index": index, "treedef": treedef_text, "experiment": sim.name},
                )
                reporter.output(index, t_h)

            if (
                not resume
                and done < len(outputs)
                and abs(outputs[done] - start_h) <= 1e-9 * max(1.0, abs(start_h))
            ):
                write_output(done, float(outputs[done]))
                done += 1

            stops = np.union1d(outputs[done:], events[events > start_h])
            stops = stops[stops > start_h + 1e-9 * max(1.0, abs(start_h))]
            output_position = {float(t): i for i, t in enumerate(outputs)}
            stopped = False
            for stop in stops:
                # A Ctrl-C, SIGTERM or launcher stop that Python swallowed (see
                # tmesolve.interrupts) ends the run here, at the last checkpoint.
                interrupts.raise_kept_stop()
                stop = float(stop)
                reporter.begin_chunk(float(state.time), stop)
                clock = time.perf_counter()
                state, readouts, diagnostics = integrator.advance(
                    state, sim.params, sim.solver, stop
                )
                diagnostics = jax.device_get(diagnostics)
                reporter.chunk_done(stop, int(diagnostics["steps"]), time.perf_counter() - clock)
                if not bool(diagnostics["finite"]):
                    raise SimulationError(
                        f"a field became non-finite before t = {stop:g} h; reduce "
                        "solver.dt_max_h or check the parameters"
                    )
                reached = float(state.time)
                if reached < stop - 1e-6 * max(1.0, abs(stop)):
                    raise SimulationError(
                        f"solver.max_steps reached at t = {reached:g} h before "
                        f"t = {stop:g} h; raise solver.max_steps or check the step size"
                    )
                if stop in output_position:
                    write_output(output_position[stop], stop)
                    if (
                        stop_after_snapshots is not None
                        and snapshots_written >= stop_after_snapshots
                        and output_position[stop] < last_index
                    ):
                        stopped = True
                        break
        finally:
            reporter.close()

        wall_s = time.perf_counter() - started
        summary.update(
            run_file=str(path),
            steps=int(np.asarray(state.step)),
            wall_time_s=wall_s,
            compile_time_s=compile_s,
            time_h=float(np.asarray(state.time)),
        )
        if stopped:
            log.info(
                "stopped after %d snapshot(s) at t = %g h (output.stop_after_snapshots); the run "
                "file stays 'running' and can be resumed",
                snapshots_written,
                float(state.time),
            )
            summary["status"] = "running"
            return summary
        final_state = jax.tree_util.tree_map(
            lambda leaf: np.asarray(jax.random.key_data(leaf) if _is_key_array(leaf) else leaf),
            state,
        )
        if sim.finish is not None:
            records = read_records(writer.file, final_state, model.grid, model.lesions)
            result = dict(sim.finish(records))
            response = result.pop("response", None)
            if response:
                writer.write_response(**response)
            summary = {**_jsonable(result), **summary}
        # A stop swallowed while finishing: the run stays resumable rather than
        # ending as complete with its job already requeued.
        interrupts.raise_kept_stop()
        summary["status"] = STATUS_COMPLETE
        set_attribute(
            writer.file, SUMMARY_ATTRIBUTE, json.dumps(_jsonable(summary), sort_keys=True)
        )
        set_attribute(writer.file, "wall_time_s", float(wall_s))
        writer.set_status(STATUS_COMPLETE)
    return summary


def run_status(run_dir: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(status, stored configuration YAML) of ``run_dir/run.h5``, or None if there is none."""
    path = Path(run_dir) / RUN_FILE_NAME
    if not path.is_file():
        return None
    from tmesolve.io.reader import open_run

    with open_run(path) as run:
        return str(run.status), str(decode_attribute(run.attrs.get("config", "")))


def run_has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir/run.h5`` holds a complete checkpoint to resume from.

    A run stopped before its first output (during its first compile) has none.
    """
    with h5py.File(Path(run_dir) / RUN_FILE_NAME, "r") as file:
        return find_checkpoint(file) is not None


def stored_overrides(run_dir: str | os.PathLike[str]) -> list[str]:
    """The command-line overrides recorded in ``run_dir/run.h5`` (its ``overrides`` attribute)."""
    with h5py.File(Path(run_dir) / RUN_FILE_NAME, "r") as file:
        return [str(decode_attribute(item)) for item in np.atleast_1d(file.attrs.get("overrides", []))]


# ---------------------------------------------------------------------------
# Verification problems as experiments
# ---------------------------------------------------------------------------


@pytree_dataclass
class CheckedParams:
    """A verification model's parameters and the reference data of its analytic answer."""

    model: Any
    reference: Any


class CheckedModel(Model):
    """A verification model whose readouts compare it with its analytic answer on the device.

    Readouts (scalars): ``relative_l2_error`` ‖u − u*‖₂/‖u*‖₂, ``max_abs_error``
    max|u − u*|, ``total_amount`` Σu·ΔV (units·mm³) and ``maximum`` max u.
    """

    def __init__(self, inner: Model, exact: Callable[[jax.Array, Any, Any], jax.Array]) -> None:
        self.inner = inner
        self.exact = exact
        self.grid, self.species, self.lesions = inner.grid, inner.species, inner.lesions
        self.fast_boundary, self.spectrum = inner.fast_boundary, inner.spectrum

    def linear_coefficients(self, params):
        return self.inner.linear_coefficients(params.model)

    def linear_fixed_values(self, params):
        return self.inner.linear_fixed_values(params.model)

    def linear_sources(self, state, params):
        return self.inner.linear_sources(state, params.model)

    def react(self, state, params, dt):
        return self.inner.react(state, params.model, dt)

    def transport(self, state, params, dt):
        return self.inner.transport(state, params.model, dt)

    def stable_dt(self, state, params):
        return self.inner.stable_dt(state, params.model)

    def begin_interval(self, state, params):
        return self.inner.begin_interval(state, params.model)

    @property
    def refreshed_by_zero_transport(self):
        return self.inner.refreshed_by_zero_transport

    @property
    def stiff_fast(self):
        return self.inner.stiff_fast

    @property
    def linear_source_species(self):
        return self.inner.linear_source_species

    @property
    def linear_sources_vary(self):
        return self.inner.linear_sources_vary

    @property
    def trace_substeps_once(self):
        return self.inner.trace_substeps_once

    def apply_events(self, state, params, t0, t1):
        return self.inner.apply_events(state, params.model, t0, t1)

    def readouts(self, state, params):
        u = state.fields[0]
        exact = jnp.broadcast_to(self.exact(state.time, params.model, params.reference), u.shape)
        difference = u - exact
        return {
            "relative_l2_error": jnp.linalg.norm(difference.ravel())
            / jnp.linalg.norm(exact.ravel()),
            "max_abs_error": jnp.max(jnp.abs(difference)),
            "total_amount": jnp.sum(u) * self.grid.voxel_volume_mm3,
            "maximum": jnp.max(u),
        }


#: Accepted relative L2 error of each verification problem at its default
#: settings (conf/experiment/verify_*.yaml), per dtype; the values measured on
#: CPU (float32 / float64) that each guards, with a margin of 10-100x for other
#: machines and library versions:
#: gaussian 40³, σ 40 → 63 µm: 3.7e-7 / 7.8e-10 (float32 round-off of the dense
#: transforms; in float64 the walls' images); cosine: one DCT mode propagated
#: exactly, 2.9e-7 / 2.5e-15; source: constant source and one mode, exact,
#: 4.8e-7 / 1.1e-15; chemotaxis: limited upwind flux after ~5 relaxation times
#: at 32², 3.0e-3 / 3.0e-3 (spatial error); fisher: Ablowitz–Zeppetella wave at
#: dt = 0.05 h, 6.5e-5 / 4.7e-5 (splitting error).
DEFAULT_TOLERANCES = {
    "verify_gaussian": {"float32": 1e-5, "float64": 1e-8},
    "verify_cosine": {"float32": 2e-6, "float64": 1e-12},
    "verify_source": {"float32": 5e-6, "float64": 1e-12},
    "verify_chemotaxis": {"float32": 1e-2, "float64": 1e-2},
    "verify_fisher": {"float32": 1e-4, "float64": 1e-4},
}


def _verification_series(species_units: str) -> list[tuple[str, str, bool]]:
    amount_units = "mm^3" if species_units == "1" else f"{species_units}*mm^3"
    return [
        ("relative_l2_error", "1", False),
        ("max_abs_error", species_units, False),
        ("total_amount", amount_units, False),
        ("maximum", species_units, False),
    ]


def _verification_finish(kind: str, tolerance: float, check: str) -> Callable[[Records], dict]:
    """Summary of a verification run: its error against the analytic answer and the verdict.

    ``check`` is "max" (the largest error over all records: the answer is
    known at every time) or "final" (only the end state is known, e.g. an
    equilibrium).
    """

    def finish(records: Records) -> dict:
        errors = np.asarray(records.timeseries["relative_l2_error"], dtype=np.float64)
        amounts = np.asarray(records.timeseries["total_amount"], dtype=np.float64)
        checked = float(np.max(errors)) if check == "max" else float(errors[-1])
        summary = {
            "experiment": kind,
            "final_relative_l2_error": float(errors[-1]),
            "max_relative_l2_error": float(np.max(errors)),
            "checked_error": checked,
            "checked": check,
            "tolerance": tolerance,
            "within_tolerance": bool(checked <= tolerance),
        }
        if (
            amounts[0] != 0.0
        ):  # relative change of Σu·ΔV (conservation where there is no source or decay)
            summary["amount_change"] = float(abs(amounts[-1] - amounts[0]) / abs(amounts[0]))
        return summary

    return finish


def _tolerance(config: RunConfig) -> float:
    if config.experiment.tolerance is not None:
        return float(config.experiment.tolerance)
    return DEFAULT_TOLERANCES[config.experiment.kind][config.solver.dtype]


def _verification_simulation(
    config: RunConfig,
    model: Model,
    model_params: Any,
    reference: Any,
    exact: Callable,
    initial: np.ndarray,
    check: str,
    maps: dict | None = None,
) -> Simulation:
    dtype = jax_dtype(config.solver.dtype)
    checked = CheckedModel(model, exact)
    grid = model.grid
    fields = initial.reshape(1, 1, *grid.shape)
    state = initial_state(checked, fields, dtype=dtype)
    solver = make_solver_params(
        config.solver.dt_max_h, config.solver.safety, config.solver.max_steps, dtype=dtype
    )
    reference = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), reference)
    species = checked.species[0]
    return Simulation(
        name=config.experiment.kind,
        model=checked,
        integrator_order=config.solver.splitting_order,
        merge_reactions=config.solver.merge_reactions,
        params=CheckedParams(model=model_params, reference=reference),
        solver=solver,
        state=state,
        output_times_h=output_schedule(config.output.duration_h, config.output.interval_h),
        event_times_h=np.zeros(0),
        fields=select_fields(checked, config.output.fields),
        maps=maps or {},
        timeseries=_verification_series(species.units),
        systemic=[],
        finish=_verification_finish(config.experiment.kind, _tolerance(config), check),
        seed=config.seed,
    )


def _squared_radius(grid: Grid) -> np.ndarray:
    return grid.distance_from(grid.centre_um) ** 2


def build_verify_gaussian(config: RunConfig) -> Simulation:
    """Free-space Gaussian under diffusion–decay, ∂u/∂t = DΔu − λu.

    u*(r, t) = (σ₀²/σ²)^{d/2} e^{−λt} exp(−r²/2σ²), σ² = σ₀² + 2Dt (peak 1 at
    t = 0; d active axes). The box should be wide enough (≥ 7σ each side) that
    the no-flux walls do not matter.
    """
    from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params

    experiment = config.experiment
    grid = config.grid.to_grid()
    dtype = jax_dtype(config.solver.dtype)
    model = DiffusionDecay(grid, path=experiment.path)
    params = diffusion_decay_params(experiment.diffusivity, experiment.decay, 0.0, dtype=dtype)
    active = grid.ndim

    def exact(t, p, reference):
        variance = reference["sigma0_squared"] + 2.0 * p.diffusivity * t
        scale = (reference["sigma0_squared"] / variance) ** (active / 2.0) * jnp.exp(-p.decay * t)
        return scale * jnp.exp(-reference["r_squared"] / (2.0 * variance))

    r_squared = _squared_radius(grid)
    sigma0_squared = experiment.initial_width_um**2
    initial = np.exp(-r_squared / (2.0 * sigma0_squared))
    reference = {"r_squared": r_squared, "sigma0_squared": np.asarray(sigma0_squared)}
    return _verification_simulation(config, model, params, reference, exact, initial, "max")


def _cosine_mode(grid: Grid) -> tuple[np.ndarray, float]:
    """cos(πx/Lx)·cos(πy/Ly)·cos(πz/Lz) over the active axes and its κ² (µm⁻²)."""
    mode = np.ones(grid.shape)
    kappa_squared = 0.0
    for axis, coordinate in enumerate(grid.coordinates):
        if grid.shape[axis] > 1:
            length = grid.lengths_um[axis]
            mode = mode * np.cos(np.pi * (coordinate - grid.origin_um[axis]) / length)
            kappa_squared += (np.pi / length) ** 2
    return mode, kappa_squared


def build_verify_cosine(config: RunConfig) -> Simulation:
    """One cosine mode on a no-flux box: u* = mode·exp(−(Dκ² + λ)t), exact for the spectral path."""
    from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params

    experiment = config.experiment
    grid = config.grid.to_grid()
    dtype = jax_dtype(config.solver.dtype)
    model = DiffusionDecay(grid, path=experiment.path)
    params = diffusion_decay_params(experiment.diffusivity, experiment.decay, 0.0, dtype=dtype)
    mode, kappa_squared = _cosine_mode(grid)

    def exact(t, p, reference):
        return reference["mode"] * jnp.exp(
            -(p.diffusivity * reference["kappa_squared"] + p.decay) * t
        )

    reference = {"mode": mode, "kappa_squared": np.asarray(kappa_squared)}
    return _verification_simulation(config, model, params, reference, exact, mode, "max")


def build_verify_source(config: RunConfig) -> Simulation:
    """Constant source S with decay λ: u → S/λ.

    u(0) = (S/λ)(2 + mode), so u*(t) = (S/λ)[1 + e^{−λt} + mode·e^{−(Dκ²+λ)t}]
    exactly; with huge steps (D·dt/h² ≫ 1) the propagator must stay exact.
    """
    from tmesolve.model.verification import DiffusionDecay, diffusion_decay_params

    experiment = config.experiment
    if experiment.decay <= 0.0:
        raise ConfigError(
            "experiment.decay", experiment.decay, "a decay > 0 h⁻¹ (the steady state is S/λ)"
        )
    if experiment.source <= 0.0:
        raise ConfigError("experiment.source", experiment.source, "a source > 0 (units/h)")
    grid = config.grid.to_grid()
    dtype = jax_dtype(config.solver.dtype)
    model = DiffusionDecay(grid, path=experiment.path)
    params = diffusion_decay_params(
        experiment.diffusivity, experiment.decay, experiment.source, dtype=dtype
    )
    mode, kappa_squared = _cosine_mode(grid)
    steady = experiment.source / experiment.decay

    def exact(t, p, reference):
        level = p.source / p.decay
        return level * (
            1.0
            + jnp.exp(-p.decay * t)
            + reference["mode"]
            * jnp.exp(-(p.diffusivity * reference["kappa_squared"] + p.decay) * t)
        )

    reference = {"mode": mode, "kappa_squared": np.asarray(kappa_squared)}
    return _verification_simulation(
        config, model, params, reference, exact, steady * (2.0 + mode), "max"
    )


def build_verify_chemotaxis(config: RunConfig) -> Simulation:
    """Cells in a frozen attractant bump c (no-flux box) relax to u* ∝ exp(χc/D_u) (Boltzmann).

    c = exp(−ρ²/2w²) with ρ the distance from the box centre in the x–y plane;
    u(0) uniform; u* has the initial amount. Only the end state is checked.
    """
    from tmesolve.model.verification import Chemotaxis, chemotaxis_params

    experiment = config.experiment
    grid = config.grid.to_grid()
    dtype = jax_dtype(config.solver.dtype)
    x, y, _ = grid.coordinates
    cx, cy, _ = grid.centre_um
    attractant = np.exp(
        -((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * experiment.attractant_width_um**2)
    )
    attractant = attractant * np.ones(grid.shape)
    model = Chemotaxis(grid)
    params = chemotaxis_params(
        experiment.diffusivity, experiment.sensitivity, attractant, dtype=dtype
    )
    initial = np.full(grid.shape, experiment.initial_density)
    boltzmann = np.exp(experiment.sensitivity * attractant / experiment.diffusivity)
    boltzmann *= initial.sum() / boltzmann.sum()

    def exact(t, p, reference):
        return reference["equilibrium"]

    maps = {"attractant": (attractant[None], "1", "frozen chemoattractant c")}
    return _verification_simulation(
        config, model, params, {"equilibrium": boltzmann}, exact, initial, "final", maps=maps
    )


def build_verify_fisher(config: RunConfig) -> Simulation:
    """Fisher–KPP ∂u/∂t = DΔu + ru(1 − u): the Ablowitz–Zeppetella travelling wave.

    u* = [1 + exp(ξ/√6)]⁻², ξ = √(r/D)(x − x₀) − (5/√6) r t along x, with x₀
    a quarter of the box (so the front stays inside); speed 5/√6·√(rD).
    """
    from tmesolve.model.verification import FisherKPP, ablowitz_zeppetella, fisher_kpp_params

    experiment = config.experiment
    grid = config.grid.to_grid()
    dtype = jax_dtype(config.solver.dtype)
    model = FisherKPP(grid, path=experiment.path)
    params = fisher_kpp_params(experiment.diffusivity, experiment.rate, dtype=dtype)
    x = grid.coordinates[0] * np.ones(grid.shape)
    shift = grid.origin_um[0] + 0.25 * grid.lengths_um[0]
    initial = ablowitz_zeppetella(x, 0.0, experiment.diffusivity, experiment.rate, shift=shift)

    def exact(t, p, reference):
        xi = (
            jnp.sqrt(p.rate / p.diffusivity) * reference["x_minus_shift"]
            - 5.0 / np.sqrt(6.0) * p.rate * t
        )
        return 1.0 / (1.0 + jnp.exp(xi / np.sqrt(6.0))) ** 2

    return _verification_simulation(
        config, model, params, {"x_minus_shift": x - shift}, exact, initial, "max"
    )


register_builder("verify_gaussian", build_verify_gaussian)
register_builder("verify_cosine", build_verify_cosine)
register_builder("verify_source", build_verify_source)
register_builder("verify_chemotaxis", build_verify_chemotaxis)
register_builder("verify_fisher", build_verify_fisher)


__all__ = [
    "BUILDERS",
    "DEFAULT_TOLERANCES",
    "CheckedModel",
    "Progress",
    "Records",
    "Simulation",
    "available_kinds",
    "backend_description",
    "build_simulation",
    "configure_compilation_cache",
    "configure_precision",
    "flatten_state",
    "git_commit",
    "output_schedule",
    "provenance",
    "register_builder",
    "run_simulation",
    "run_has_checkpoint",
    "run_status",
    "stored_overrides",
    "select_fields",
    "stored_summary",
    "unflatten_state",
]
