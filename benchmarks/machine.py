"""What a benchmark ran on: machine, backend, device, versions, commit, load.

Figures from a shared 2-core VM and from a GPU node are only comparable with
this record beside them, so every results file starts with it.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gib() -> float | None:
    """Physical memory (GiB) from /proc/meminfo, None where unavailable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20  # kB → GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(*arguments: str) -> str | None:
    """Output of a read-only git command in the repository, None if git is unavailable
    (the commit itself comes from :func:`tmesolve.simulation.git_commit`, as in run files)."""
    try:
        completed = subprocess.run(
            ["git", *arguments],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (runnable processes), None where unsupported."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def hostname() -> str:
    """This machine's short host name, or ``"dev"`` when it has none."""
    name = socket.gethostname().split(".")[0]
    cleaned = "".join(ch for ch in name if ch.isalnum() or ch in "-_")
    return cleaned or "dev"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """Machine, backend, device, versions, git commit and time (UTC) of this run."""
    device = jax.devices()[0]
    from tmesolve.simulation import git_commit

    status = _git("status", "--porcelain", "--untracked-files=no")
    import jaxlib

    return {
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": hostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "memory_total_GiB": _memory_total_gib(),
        "load_average_at_start": load_average(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "numpy": np.__version__,
        },
        "git_commit": git_commit(),
        # Tracked files changed since that commit: the figures are of the working tree.
        "git_dirty": None if status is None else bool(status),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }
