"""Checkpoints of a virtual trial: a run stopped by a wall-time limit or a crash continues where it was.

A trial of many patients for a year takes hours on a CPU, longer than many
batch queues allow one job. :func:`tmesolve.cohort.run_trial` with
``progress_dir`` keeps there:

* ``trial.json``: every setting that decides the simulated values (the
  sampled patients, arms, grid, times, solver, parameter overrides, the
  tmesolve source digest, JAX and jaxlib versions, backend, device kind and
  ``XLA_FLAGS`` as the user set them, without the option tmesolve adds itself,
  :mod:`tmesolve.xla_defaults`). A run that resumes must have the same; a difference is
  refused, naming the settings that differ.
* ``chunk-<lesions>-<arm>-<patient>.h5``, one per chunk of patient-arms
  advanced together: its members, the readout records collected so far,
  the index of the next stop, steps and seconds spent (wall and CPU), and, until the
  chunk is finished, the whole batched state at its last stop (written at
  most every ``checkpoint_interval_s``, and at the end).

Each file is written under a temporary name and renamed into place, so a
job killed while writing leaves the previous checkpoint whole. Resuming
from a stop reruns the same compiled loop from the same state and
parameters, so a resumed trial's values are those of an uninterrupted one
(a test checks this value for value).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tmesolve.errors import ConfigError

log = logging.getLogger(__name__)

#: What to do with checkpoints found (see :class:`TrialProgress`).
RESUME_MODES = ("auto", "never", "always")
#: Version of the files' layout; a folder of another version is refused.
FORMAT = 1
FINGERPRINT_FILE = "trial.json"
_LIBVER = ("earliest", "v110")


def _numpy_to_json(value: Any) -> Any:
    """``json.dumps`` fallback: numpy arrays as lists, numpy scalars as Python numbers."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename the result onto ``path``.

    The file is flushed to disk before the rename, and the folder after it: a
    node that loses power keeps the old file or the new one, never a torn one.
    """
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class ChunkCheckpoint:
    """What a chunk file holds (see the module docstring).

    Attributes:
        lesion_count: the group's lesion count (per patient, after padding).
        members: (arm index, patient index) of the chunk's own patient-arms, in order.
        size: members plus the padding copies of the last one (the batch size).
        next_stop: index into the trial's stops of the next stop to run to.
        steps: steps taken so far (the largest over the batch, summed over stops).
        seconds: wall time spent on the chunk so far, over every attempt (s).
        cpu_seconds: the process's CPU time (all threads) spent on it so far (s): unlike
            the wall time, not inflated when other work shares the machine.
        records: readout name → (records so far, size, ...) values.
        recist_uses: per batch member, "mask" or "burden" (what RECIST measures).
        state_leaves: the batched state's leaves at ``next_stop``, or None when finished.
        attempts: runs that have worked on the chunk, this one included once it writes.
        path: the file it was read from (None: not read).
    """

    def __init__(self, *, lesion_count: int, members: Sequence[tuple[int, int]], size: int,
                 next_stop: int, steps: int, seconds: float, cpu_seconds: float, records: Mapping[str, np.ndarray],
                 recist_uses: Sequence[str], state_leaves: list[np.ndarray] | None,
                 attempts: int, path: Path | None = None) -> None:
        self.lesion_count = int(lesion_count)
        self.members = [tuple(int(i) for i in member) for member in members]
        self.size = int(size)
        self.next_stop = int(next_stop)
        self.steps = int(steps)
        self.seconds = float(seconds)
        self.cpu_seconds = float(cpu_seconds)
        self.records = dict(records)
        self.recist_uses = [str(use) for use in recist_uses]
        self.state_leaves = state_leaves
        self.attempts = int(attempts)
        self.path = path

    def summary(self, run_now: bool) -> dict[str, Any]:
        """The chunk's entry of :attr:`tmesolve.cohort.TrialResult.chunks`."""
        return {"lesion_count": self.lesion_count, "patient_arms": len(self.members), "size": self.size,
                "steps": self.steps, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "attempts": self.attempts, "run_now": run_now}

    def finished(self, stops: int) -> bool:
        return self.next_stop >= stops

    def collected(self) -> list[dict[str, np.ndarray]]:
        """The records as the trial loop keeps them: one dict of (size, ...) arrays per record."""
        count = min((len(values) for values in self.records.values()), default=0)
        return [{name: values[index] for name, values in self.records.items()} for index in range(count)]

    def restore_state(self, template: Any) -> Any:
        """``template`` (the freshly stacked state of the same chunk) with the saved leaves.

        Refuses leaves of another number, shape or dtype: the chunk file would then
        belong to another model or grid than the trial fingerprint says.
        """
        leaves, treedef = jax.tree_util.tree_flatten(template)
        saved = self.state_leaves or []
        if len(saved) != len(leaves) or any(
            np.shape(old) != np.shape(new) or np.asarray(old).dtype != np.asarray(new).dtype
            for old, new in zip(saved, leaves)
        ):
            raise ValueError(f"{self.path}: the saved state does not match the trial's state layout")
        return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(leaf) for leaf in saved])


class TrialProgress:
    """The checkpoint folder of one trial (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], *,
                 resume: bool | str, restart: bool = False, key: str = "resume") -> None:
        """Open ``directory`` for a trial with ``fingerprint``.

        Checkpoints are the chunk files (a ``trial.json`` alone records no work).
        ``resume`` says what to do with them (:data:`RESUME_MODES`; True is
        "always", False "never"):

        * "always": continue them; refused when there are none, or when their
          settings differ from this trial's (the error lists the settings);
        * "auto": continue them when their settings are this trial's; when they
          differ, start again if ``restart``, else refuse;
        * "never": start again if ``restart``, else refuse.

        Errors are :class:`ConfigError` naming ``key``. Nothing is written or
        removed before these checks pass.
        """
        mode = ("always" if resume else "never") if isinstance(resume, bool) else resume
        if mode not in RESUME_MODES:
            raise ConfigError(key, resume, f"one of {', '.join(RESUME_MODES)}, True or False")
        self.directory = Path(directory)
        # As it reads back from trial.json (tuples as lists), so the two compare equal.
        self.fingerprint = json.loads(json.dumps({**fingerprint, "format": FORMAT}, default=_numpy_to_json))
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError("progress_dir", str(self.directory), "a folder for the trial's checkpoints, not a file")
        stored_path = self.directory / FINGERPRINT_FILE
        chunk_files = sorted(self.directory.glob("chunk-*.h5")) if self.directory.is_dir() else []
        differ = self._settings_that_differ(stored_path) if chunk_files else []
        if not chunk_files:
            if mode == "always":
                raise ConfigError(key, mode, "checkpoints to continue", f"there are none in {self.directory}")
        elif (mode == "never" or (mode == "auto" and differ)) and restart:
            for path in chunk_files:
                path.unlink()
            log.warning("restart: removed %d chunk checkpoints of an earlier trial from %s", len(chunk_files),
                        self.directory)
            chunk_files = []
        elif mode == "never":
            made_with = f"other settings (these differ: {', '.join(differ)})" if differ else "the same settings"
            raise ConfigError(key, mode, f"no checkpoints in {self.directory} ({len(chunk_files)} chunk files "
                                         f"of an unfinished trial made with {made_with})",
                              "continue it, or start it again elsewhere")
        elif differ:
            raise ConfigError(key, mode, f"the settings of the unfinished trial in {self.directory} "
                                         f"(these differ: {', '.join(differ)})",
                              "or start the trial again to change them")
        self.chunks = [self._read(path, key, mode) for path in chunk_files]
        self.directory.mkdir(parents=True, exist_ok=True)
        # Written again: the same text where checkpoints with these settings were kept,
        # these settings where none are (nothing computed can contradict them).
        _write_atomically(stored_path, lambda path: path.write_text(json.dumps(self.fingerprint, indent=1)))
        self._last_saved: dict[str, float] = {}

    def _settings_that_differ(self, stored_path: Path) -> list[str]:
        """Names of the fingerprint entries that differ from ``stored_path``'s (sorted)."""
        if not stored_path.exists():
            return [f"{FINGERPRINT_FILE} (missing)"]
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError):
            return [f"{FINGERPRINT_FILE} (unreadable)"]
        if not isinstance(stored, dict):
            return [f"{FINGERPRINT_FILE} (not a settings record)"]
        return sorted(name for name in set(stored) | set(self.fingerprint)
                      if stored.get(name) != self.fingerprint.get(name))

    def saved_chunk_size(self, lesion_count: int) -> int | None:
        """The batch size of the group's saved chunks (None: none saved), for its other chunks."""
        sizes = [chunk.size for chunk in self.chunks if chunk.lesion_count == lesion_count]
        return max(sizes) if sizes else None

    @staticmethod
    def chunk_name(lesion_count: int, members: Sequence[tuple[int, int]]) -> str:
        arm, patient = members[0]
        return f"chunk-{lesion_count}-{arm:02d}-{patient:04d}.h5"

    def _read(self, path: Path, key: str, mode: str) -> ChunkCheckpoint:
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                attrs = handle.attrs
                records = {name: handle["records"][name][()] for name in handle["records"]}
                leaves = None
                if "state" in handle:
                    group = handle["state"]
                    leaves = [group[f"{index:05d}"][()] for index in range(len(group))]
                return ChunkCheckpoint(
                    lesion_count=int(attrs["lesion_count"]), members=json.loads(attrs["members"]),
                    size=int(attrs["size"]), next_stop=int(attrs["next_stop"]), steps=int(attrs["steps"]),
                    seconds=float(attrs["seconds"]), cpu_seconds=float(attrs["cpu_seconds"]), records=records,
                    recist_uses=json.loads(attrs["recist_uses"]), state_leaves=leaves,
                    attempts=int(attrs["attempts"]), path=path)
        except (OSError, KeyError, ValueError) as error:  # a damaged file (a node lost power mid-write)
            raise ConfigError(key, mode, f"readable checkpoints; {path} is not ({type(error).__name__})",
                              "remove it and its chunk runs again") from None

    def due(self, lesion_count: int, members: Sequence[tuple[int, int]], interval_s: float) -> bool:
        """Whether ``interval_s`` has passed since this run started or last wrote the chunk."""
        name = self.chunk_name(lesion_count, members)
        last = self._last_saved.setdefault(name, time.monotonic())
        return time.monotonic() - last >= interval_s

    def save(self, checkpoint: ChunkCheckpoint) -> Path:
        """Write ``checkpoint`` (atomically: the previous file stays whole until the rename)."""
        import h5py

        name = self.chunk_name(checkpoint.lesion_count, checkpoint.members)

        def write(path: Path) -> None:
            with h5py.File(path, "w", libver=_LIBVER) as handle:
                handle.attrs["format"] = FORMAT
                handle.attrs["lesion_count"] = checkpoint.lesion_count
                handle.attrs["members"] = json.dumps(checkpoint.members)
                handle.attrs["size"] = checkpoint.size
                handle.attrs["next_stop"] = checkpoint.next_stop
                handle.attrs["steps"] = checkpoint.steps
                handle.attrs["seconds"] = checkpoint.seconds
                handle.attrs["cpu_seconds"] = checkpoint.cpu_seconds
                handle.attrs["attempts"] = checkpoint.attempts
                handle.attrs["recist_uses"] = json.dumps(checkpoint.recist_uses)
                records = handle.create_group("records")
                for record_name, values in checkpoint.records.items():
                    records.create_dataset(record_name, data=np.asarray(values))
                if checkpoint.state_leaves is not None:
                    state = handle.create_group("state")
                    for index, leaf in enumerate(checkpoint.state_leaves):
                        state.create_dataset(f"{index:05d}", data=np.asarray(leaf))

        path = self.directory / name
        _write_atomically(path, write)
        self._last_saved[name] = time.monotonic()
        return path
