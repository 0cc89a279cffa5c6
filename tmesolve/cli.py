"""Command-line entry points: ``tmesolve`` (Hydra app), ``tmesolve-plot``, ``tmesolve-summary``.

``tmesolve [overrides]`` composes ``conf/config.yaml`` with Hydra, validates
it (:mod:`tmesolve.config`), builds the simulation and runs it into the Hydra
run directory (``run.h5``, ``run.xmf``, ``tmesolve.log``, ``figures/``).
``tmesolve -m a=1,2 b=x,y`` sweeps with the configured launcher (basic,
``hydra/launcher=joblib``, ``submitit_local``, ``submitit_slurm``).
``tmesolve resume=<run dir>`` continues a stopped run from its checkpoint.

Errors: a bad setting, a Hydra composition error or a failed run prints ONE
line on stderr (``<key>: got <value>; expected <what>``) and exits non-zero
(2 for configuration errors, 1 for a failed run); ``TMESOLVE_DEBUG=1``,
``HYDRA_FULL_ERROR=1`` or ``hydra.verbose=true`` show the traceback instead.

Stops from outside: Ctrl-C exits 130 and, for the commands, SIGTERM (a batch
queue's time limit, ``scancel``) 143, both once the Python operation in progress (an HDF5 write,
an output interval's compiled loop) returns; the run file closes with status
``running`` and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tmesolve import config as configuration
from tmesolve import interrupts, simulation
from tmesolve.errors import ConfigError

log = logging.getLogger("tmesolve")

#: Set by :func:`run_hydra_app` for the task: show tracebacks instead of one line.
_debug = False

#: Exit codes: a configuration error, a run that failed, an interrupt (Ctrl-C),
#: a SIGTERM (128 + the signal's number, as a shell reports it).
EXIT_CONFIG_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: a batch queue's time limit (Slurm sends it, then SIGKILL
    after its KillWait), ``scancel`` or a shutdown.

    Raised by the handler :func:`run_hydra_app` installs, so a run stops as it
    does on Ctrl-C: after the Python operation in progress (Python runs signal
    handlers between operations, so an HDF5 write is never cut in half), with
    ``run.h5`` closed at status ``running`` and the checkpoints kept.
    """


@contextlib.contextmanager
def _sigterm_raises_terminated() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread.

    Only where SIGTERM still has its default action (which kills the process
    at once): a host that set its own handler (a batch launcher such as
    submitit, which stops jobs with SIGUSR2 and lets SIGTERM pass) keeps it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        # One stop is enough; a second SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Abort(BaseException):
    """Leaves Hydra's job runner without its "Error executing job" report (one line only).

    A BaseException, so that Hydra's ``run_job`` (which catches Exception)
    lets it through to :func:`main_with_overrides`.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _debug_requested(argv: Sequence[str]) -> bool:
    if os.environ.get("TMESOLVE_DEBUG", "") not in ("", "0"):
        return True
    if os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0"):
        return True
    for item in argv:
        key, _, value = item.lstrip("+").partition("=")
        if key == "hydra.verbose" and value.strip().lower() not in ("", "false", "null", "[]"):
            return True
        if item in ("-v", "--verbose"):
            return True
    return False


def _quote(value: str) -> str:
    """A Hydra override value quoted so that any path survives the override grammar."""
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resume_arguments(argv: list[str]) -> list[str]:
    """``resume=<dir>`` also runs Hydra in that directory, leaving its ``.hydra/`` record alone."""
    for item in argv:
        key, _, value = item.partition("=")
        if key != "resume":
            continue
        value = value.strip().strip("'\"")
        if value.lower() in ("auto", "never", "always", "true", "false", ""):
            return argv
        extra = []
        if not any(a.startswith("hydra.run.dir=") for a in argv):
            extra.append(f"hydra.run.dir={_quote(os.path.abspath(value))}")
        if not any(a.startswith("hydra.output_subdir=") for a in argv):
            extra.append("hydra.output_subdir=null")
        return [*argv, *extra]
    return argv


def _write_to_log_files(text: str) -> None:
    """Append ``text`` to the run's log file only (not to the console)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.acquire()
                handler.stream.write(text if text.endswith("\n") else text + "\n")
                handler.flush()
            except (OSError, ValueError):
                pass
            finally:
                handler.release()


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def report(summary: dict[str, Any], run_dir: Path, figures: Sequence[Path] = ()) -> list[str]:
    """The end-of-run summary lines (also logged)."""
    lines = []
    status = summary.get("status", "?")
    if "within_tolerance" in summary:
        verdict = "within" if summary["within_tolerance"] else "NOT within"
        which = "at the end" if summary.get("checked") == "final" else "max over the records"
        lines.append(
            f"{summary.get('experiment', 'verification')}: relative L2 error against the analytic "
            f"solution {summary['checked_error']:.3g} ({which}) is {verdict} the tolerance "
            f"{summary['tolerance']:.3g}"
        )
    skip = {
        "run_file",
        "status",
        "within_tolerance",
        "checked_error",
        "checked",
        "tolerance",
        "experiment",
        "wall_time_s",
        "compile_time_s",
        "steps",
        "time_h",
    }
    for key, value in summary.items():
        if key not in skip:
            lines.append(f"  {key}: {_format_value(value)}")
    if "steps" in summary:
        lines.append(
            f"  {summary['steps']} steps to t = {summary.get('time_h', float('nan')):.4g} h in "
            f"{summary.get('wall_time_s', float('nan')):.1f} s (compile "
            f"{summary.get('compile_time_s', float('nan')):.1f} s)"
        )
    files = [name for name in ("run.h5", "run.xmf", "tmesolve.log") if (run_dir / name).exists()]
    if figures:
        files.append(f"figures/ ({len(figures)} PNG)")
    lines.append(f"  status {status}; files in {run_dir}: {', '.join(files)}")
    for line in lines:
        log.info("%s", line)
    return lines


def execute(
    cfg: DictConfig, run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Validate ``cfg``, build the simulation and run (or resume) it in ``run_dir``.

    Everything is validated before ``run.h5`` is created. ``cfg.resume``
    decides what happens when ``run_dir`` already holds a run file (see
    :data:`tmesolve.config.RESUME_MODES`).

    Returns:
        the run's summary (see :func:`tmesolve.simulation.run_simulation`).

    Raises:
        ConfigError: a bad setting (one-line message); SimulationError: the run failed.
    """
    run_dir = Path(run_dir)
    mode, resume_dir = configuration.resume_setting(cfg.resume)
    if resume_dir is not None:
        run_dir = Path(resume_dir).expanduser().resolve()
    existing = simulation.run_status(run_dir)
    resuming = replace_unstarted = False
    if existing is not None:
        status, stored_yaml = existing
        where = run_dir / "run.h5"
        if mode == "never":
            raise ConfigError(
                "resume",
                "never",
                "a run directory without run.h5",
                hint=f"{where} exists; choose another hydra.run.dir or resume=always",
            )
        stored = configuration.from_yaml(stored_yaml)
        if mode == "auto":
            if configuration.without_run_control(stored) != configuration.without_run_control(cfg):
                raise ConfigError(
                    "resume",
                    "auto",
                    "a run directory without run.h5 or with the same configuration",
                    hint=f"{where} holds a run of another configuration; "
                    "choose another hydra.run.dir, or resume=always to continue it",
                )
            if status.startswith("failed"):
                raise ConfigError(
                    "resume",
                    "auto",
                    "a run that is not marked failed",
                    hint=f"{where} says '{status}'; resume=always retries it from its checkpoint "
                    "(from the start if it has none)",
                )
        cfg = configuration.with_run_control(stored, cfg)
        if status == "complete":
            log.info("%s is already complete; nothing to run", where)
            summary = simulation.stored_summary(run_dir)
            report(summary, run_dir)
            return summary
        # A run stopped before its first output (a batch job preempted during its
        # first compile) holds nothing to continue from, and nothing of value.
        resuming = simulation.run_has_checkpoint(run_dir)
        if not resuming:
            log.warning("%s holds no checkpoint (stopped before its first output): starting it again", where)
            replace_unstarted = True
            # The new file describes the run as the first command made it, not the resume.
            overrides = simulation.stored_overrides(run_dir)
    elif mode == "always":
        raise ConfigError(
            "resume",
            cfg.resume,
            "a run directory holding run.h5",
            hint=f"there is none in {run_dir}",
        )

    run_config = configuration.to_run_config(cfg)
    simulation.configure_precision(run_config.solver.dtype)
    cache = simulation.configure_compilation_cache(run_config.output.compilation_cache_dir, log)
    sim = simulation.build_simulation(run_config)
    if cache:
        log.info("persistent compilation cache: %s", cache)
    attrs = simulation.provenance(configuration.to_yaml(cfg), overrides, run_config.seed)
    output = run_config.output
    try:
        summary = simulation.run_simulation(
            sim,
            run_dir,
            attrs=attrs,
            resume=resuming,
            overwrite=replace_unstarted,
            progress=output.progress,
            snapshot_every=output.snapshot_every,
            log=logging.getLogger("tmesolve.simulation"),
            log_interval_s=output.log_interval_s,
            stop_after_snapshots=output.stop_after_snapshots,
        )
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C, SIGTERM, or a batch launcher stopping the job (submitit exits on
        # SIGUSR2 before a time limit or a preemption, then requeues the job, which
        # continues here with resume=auto). run.h5 says running.
        if isinstance(stop.__cause__, Exception):
            # An error came after a stop that Python had swallowed (tmesolve.interrupts):
            # the stop wins, so that a requeued job continues; the error is reported here.
            log.error("error after the stop: %s", configuration.describe_error(stop.__cause__)[0])
        if (run_dir / "run.h5").is_file():
            log.warning("stopped (%s): resume with: tmesolve resume=%s", type(stop).__name__, run_dir)
        raise
    figures: list[Path] = []
    if summary.get("status") == "complete" and output.plots:
        from tmesolve.plots import plot_run

        try:
            figures = plot_run(run_dir)
        except Exception as error:  # figures are a convenience: the results are written
            log.warning("figures not drawn: %s", configuration.describe_error(error)[0])
    elif summary.get("status") == "running":
        log.info("resume with: tmesolve resume=%s", run_dir)
    report(summary, run_dir, figures)
    return summary


def job_abort(error: Exception, multirun: bool) -> _Abort | None:
    """What a Hydra task raises for ``error``: an :class:`_Abort` (one line), or None to re-raise.

    The message and the traceback go to the job's log file either way. In a
    sweep (or with tracebacks requested) the error itself goes on, so that
    Hydra reports which job failed and the launcher decides what goes on.
    """
    message, is_config_error = configuration.describe_error(error)
    _write_to_log_files(f"error: {message}\n{traceback.format_exc()}")
    if multirun or _debug:
        return None
    return _Abort(EXIT_CONFIG_ERROR if is_config_error else EXIT_RUN_FAILED, message)


def run_job(execute_job: Any, cfg: DictConfig) -> dict[str, Any]:
    """Inside a Hydra task: ``execute_job(cfg, run_dir, overrides)`` in the job's directory.

    An error becomes one line (:func:`job_abort`) outside a sweep.
    """
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    # Unresolved: an override may hold an interpolation such as ${oc.env:...}.
    overrides = [str(item) for item in OmegaConf.to_container(hydra_config.overrides.task)]
    multirun = hydra_config.mode == RunMode.MULTIRUN
    try:
        # A stop that Python swallows anywhere in the job (set-up, run, figures)
        # still ends it: at the run loop's next chunk, or when the job is done.
        with interrupts.stops_kept():
            return execute_job(cfg, run_dir, overrides)
    except Exception as error:
        abort = job_abort(error, multirun)
        if abort is None:
            raise
        raise abort from error


@hydra.main(config_path=str(configuration.config_dir()), config_name="config", version_base="1.3")
def _hydra_task(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task: one job (single run or one job of a sweep)."""
    return run_job(execute, cfg)


def run_hydra_app(task: Any, argv: Sequence[str], *, prog: str, prefix: str = "",
                  stop_on_sigterm: bool = False) -> int:
    """Run the Hydra app ``task`` (a ``@hydra.main`` function) with ``argv``; returns the exit code.

    Prints at most one line on stderr for an error, starting with ``prefix``
    (see the module docstring); Hydra's logging set-up is undone afterwards.
    ``stop_on_sigterm``: SIGTERM stops the run as Ctrl-C does (exit 143); for
    the console commands, which own their process (:class:`Terminated`), not
    for a call from Python, whose host decides what SIGTERM does.
    """
    global _debug
    argv = list(argv)
    debug = _debug = _debug_requested(argv)
    saved_argv = sys.argv
    saved_full_error = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra configures the root logger for the job; put it back afterwards
    # (matters when this runs in-process: tests, notebooks).
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    sys.argv = [prog, *argv]
    # Hydra then raises its errors instead of printing them over many lines.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    GlobalHydra.instance().clear()
    try:
        with _sigterm_raises_terminated() if stop_on_sigterm else contextlib.nullcontext(), \
                interrupts.stops_kept():
            task()
        return 0
    except _Abort as abort:
        print(prefix + abort.message, file=sys.stderr)
        return abort.code
    except SystemExit as exit_:  # --help, --info, ... exit through Hydra
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Terminated:
        if debug:
            raise
        print(f"{prog}: terminated (SIGTERM); the run's checkpoints are kept and it resumes", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug:
            raise
        message, is_config_error = configuration.describe_error(error)
        print(prefix + message, file=sys.stderr)
        return EXIT_CONFIG_ERROR if is_config_error else EXIT_RUN_FAILED
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def main_with_overrides(argv: Sequence[str], *, stop_on_sigterm: bool = False) -> int:
    """Run ``tmesolve`` with these command-line arguments in this process; returns the exit code.

    Prints at most one line on stderr for an error (see the module docstring);
    ``stop_on_sigterm``: see :func:`run_hydra_app` (the ``tmesolve`` command sets it).
    """
    argv = _resume_arguments(configuration.normalise_overrides(list(argv)))
    return run_hydra_app(_hydra_task, argv, prog="tmesolve", stop_on_sigterm=stop_on_sigterm)


def main() -> None:
    """``tmesolve``: the Hydra app (see ``tmesolve --help``)."""
    sys.exit(main_with_overrides(sys.argv[1:], stop_on_sigterm=True))


# ---------------------------------------------------------------------------
# tmesolve-plot, tmesolve-summary
# ---------------------------------------------------------------------------


def _one_line_errors(function):
    """Run a small command, turning an error into one line on stderr and exit code 1."""
    try:
        return function()
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        if _debug_requested(()):
            raise
        print(f"{Path(sys.argv[0]).name}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def plot_main(argv: Sequence[str] | None = None) -> int:
    """``tmesolve-plot <run dir | sweep dir>``: figures of a run or the waterfall of a sweep."""
    parser = argparse.ArgumentParser(
        prog="tmesolve-plot",
        description="Draw the figures of a run (into <run>/figures) or of a sweep "
        "(into <sweep>/figures).",
    )
    parser.add_argument("path", help="a run directory (holding run.h5) or a sweep directory")
    parser.add_argument(
        "--runs", action="store_true", help="for a sweep, also draw every run's figures"
    )
    args = parser.parse_args(argv)

    def draw() -> int:
        from tmesolve import plots

        path = Path(args.path)
        if (path / "run.h5").is_file() or path.suffix == ".h5":
            written = plots.plot_run(path)
        else:
            written = plots.plot_sweep(path)
            if args.runs:
                for run in plots.find_runs(path):
                    written += plots.plot_run(run)
        for figure in written:
            print(figure)
        return 0

    return _one_line_errors(draw)


def summary_main(argv: Sequence[str] | None = None) -> int:
    """``tmesolve-summary <sweep dir>``: one row per job (per job and arm for trials) into
    summary.csv and summary.h5."""
    parser = argparse.ArgumentParser(
        prog="tmesolve-summary",
        description="Collect every job's overrides and readouts of a sweep into summary.csv "
        "and summary.h5 (a sweep of tmesolve-cohort trials: one row per job and arm).",
    )
    parser.add_argument("path", help="the sweep directory (multirun/<date>/<time>)")
    parser.add_argument(
        "--output", help="folder for summary.csv and summary.h5 (default: the sweep dir)"
    )
    args = parser.parse_args(argv)

    def collect() -> int:
        from tmesolve.api import summarize_cohort_sweep, summarize_sweep, write_summary

        path = Path(args.path)
        trials = path.is_dir() and any(path.rglob("cohort.h5"))
        runs = path.is_dir() and any(path.rglob("run.h5"))
        folder = Path(args.output or args.path)
        if (folder / "cohort.h5").is_file():
            # A trial's own summary.csv lives there: never replace it with the sweep table.
            raise ValueError(
                f"{folder} is a trial directory (it holds cohort.h5 and its own summary.csv); "
                "give the sweep directory above it, or --output another folder"
            )
        # A sweep of tmesolve-cohort trials: one row per job and arm.
        rows = summarize_cohort_sweep(path) if trials and not runs else summarize_sweep(path)
        csv_path, h5_path = write_summary(rows, folder)
        what = "job-arm rows" if trials and not runs else "jobs"
        print(f"{len(rows)} {what} -> {csv_path}, {h5_path}")
        return 0

    return _one_line_errors(collect)


if __name__ == "__main__":
    # python -m tmesolve.cli [plot|summary] ...: the console scripts without installing them.
    # Dispatch to the imported module (not this __main__ copy), so that launchers
    # pickle the task function by its importable name.
    from tmesolve import cli as _cli

    _arguments = sys.argv[1:]
    if _arguments and _arguments[0] == "plot":
        sys.exit(_cli.plot_main(_arguments[1:]))
    if _arguments and _arguments[0] == "summary":
        sys.exit(_cli.summary_main(_arguments[1:]))
    sys.exit(_cli.main_with_overrides(_arguments, stop_on_sigterm=True))
