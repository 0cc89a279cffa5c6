"""A stop that a signal handler raises is not lost.

Python runs a signal handler in the main thread between two bytecodes. When
that moment falls inside code whose exceptions Python discards (a weakref
callback, ``__del__``, a finaliser run by the garbage collector: it prints
"Exception ignored in ..." and goes on), the ``KeyboardInterrupt`` or
``SystemExit`` the handler raised is lost and the run carries on. Under a
batch scheduler the job is then killed outright (SIGKILL, Slurm's KillWait
after the requeue), in the middle of whatever it was doing, and the requeued
job repeats the outputs written since. submitit's SIGUSR2 handler (requeue the
job, then ``sys.exit``) was lost this way in about one stop of five on a
loaded node: h5py and JAX release objects through weakref callbacks all the
time.

While :func:`stops_kept` is active, each Python-level handler of a stop
signal is wrapped so that what it raises is also kept; the run loops call
:func:`raise_kept_stop` before each chunk (between outputs and events), which
raises the kept stop again when it was swallowed. The app keeps stops for a
whole job (set-up, run, figures) and the run loops for their own span, so a
stop swallowed anywhere in a job ends it at the next chunk or at the latest
when the job's scope closes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

#: The signals that stop a run: Ctrl-C, a queue's time limit or ``scancel``
#: (SIGTERM), a hang-up, and the user signals batch launchers use (submitit
#: stops a job with SIGUSR2 before its time limit).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)

_kept: BaseException | None = None
#: How many :func:`stops_kept` scopes are open (they nest; the outermost wraps).
_depth = 0


def raise_kept_stop() -> None:
    """Raise the stop a wrapped signal handler raised, if it has not left yet.

    Called by the run loops between chunks: a stop that Python swallowed
    surfaces here, with the run file closed as for any other stop. Only in
    the main thread, where Python runs signal handlers and the stop belongs.
    """
    global _kept
    if _kept is not None and threading.current_thread() is threading.main_thread():
        stop, _kept = _kept, None
        raise stop


def _keeping(handler: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], Any]:
    def keep_what_it_raises(signum: int, frame: FrameType | None) -> Any:
        global _kept
        try:
            return handler(signum, frame)
        except BaseException as stop:
            _kept = stop
            raise

    keep_what_it_raises.wrapped = handler  # type: ignore[attr-defined]
    return keep_what_it_raises


@contextlib.contextmanager
def stops_kept(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While inside, what a Python-level handler of ``signals`` raises is kept for :func:`raise_kept_stop`.

    Handlers set to ``SIG_DFL`` or ``SIG_IGN`` are left alone (there is nothing
    to lose). Scopes nest: the outermost one wraps the handlers and, on
    leaving, puts each back unless the handler replaced itself meanwhile (one
    that ignores a second SIGTERM). Outside the main thread, where Python runs
    no handler, this does nothing.

    Leaving a scope with a stop kept: by the end of the block, the stop is
    raised then; by another exception (an error after the stop was
    swallowed), the stop is raised from it, so that the job still ends as
    stopped; by the stop itself, it is forgotten.
    """
    global _kept, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _depth == 0
    wrappers = {}
    _depth += 1
    try:
        if outermost:
            _kept = None
            for signum in signals:
                handler = signal.getsignal(signum)
                if callable(handler):
                    wrappers[signum] = _keeping(handler)
                    signal.signal(signum, wrappers[signum])
        try:
            yield
        except BaseException as leaving:
            stop, _kept = _kept, None
            if stop is not None and stop is not leaving:
                raise stop from leaving
            raise
        # Swallowed after the last check: the block's work is done; stop now.
        raise_kept_stop()
    finally:
        _depth -= 1
        if outermost:
            for signum, wrapper in wrappers.items():
                if signal.getsignal(signum) is wrapper:
                    signal.signal(signum, wrapper.wrapped)
            _kept = None
