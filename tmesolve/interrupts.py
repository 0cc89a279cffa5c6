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

import functools
import signal
import threading
from collections.abc import Callable
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

    return keep_what_it_raises


class _StopsKept:
    """One use of :func:`stops_kept` (a class rather than a generator, so that a
    stop raised while entering undoes the entry instead of leaving it half made)."""

    def __init__(self) -> None:
        self.active = False
        self.outermost = False
        #: signal -> (the wrapper installed, the handler it wraps)
        self.wrapped: dict[signal.Signals, tuple[Callable[..., Any], Callable[..., Any]]] = {}

    def __enter__(self) -> _StopsKept:
        global _kept, _depth
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            self.outermost = _depth == 0
            # No call between these two statements: no handler can run in between.
            _depth += 1
            self.active = True
            if self.outermost:
                _kept = None
                for signum in STOP_SIGNALS:
                    handler = signal.getsignal(signum)
                    if callable(handler):
                        self.wrapped[signum] = (_keeping(handler), handler)
                        signal.signal(signum, self.wrapped[signum][0])
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, kind: Any, leaving: BaseException | None, traceback: Any) -> bool:
        global _kept
        if not self.active:
            return False
        try:
            if leaving is None:
                # Swallowed after the last check: the block's work is done; stop now.
                raise_kept_stop()
            else:
                stop, _kept = _kept, None
                if stop is not None and stop is not leaving:
                    raise stop from leaving
        finally:
            self._leave()
        return False

    def _leave(self) -> None:
        global _kept, _depth
        if not self.active:
            return
        self.active = False
        _depth -= 1
        if self.outermost:
            for signum, (wrapper, handler) in self.wrapped.items():
                if signal.getsignal(signum) is wrapper:
                    signal.signal(signum, handler)
            _kept = None


def stops_kept() -> _StopsKept:
    """While inside, what a Python-level handler of :data:`STOP_SIGNALS` raises is kept for :func:`raise_kept_stop`.

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
    return _StopsKept()


def keeping_stops(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run inside :func:`stops_kept` (a decorator)."""

    @functools.wraps(function)
    def kept(*args: Any, **kwargs: Any) -> Any:
        with stops_kept():
            return function(*args, **kwargs)

    return kept
