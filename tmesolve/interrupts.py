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
:func:`raise_kept_stop` at each output, which raises the kept stop again when
it was swallowed. When it was not, it is already on its way out, and leaving
:func:`stops_kept` forgets it.
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


def raise_kept_stop() -> None:
    """Raise the stop a wrapped signal handler raised, if it has not left yet.

    Called by the run loops between chunks: a stop that Python swallowed
    surfaces here, one output later than it would have, with the run file
    closed as for any other stop.
    """
    global _kept
    if _kept is not None:
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
    to lose). Outside the main thread, where Python runs no handler, this does
    nothing. On leaving, each wrapper is replaced by its handler again, unless
    the handler replaced itself meanwhile (a handler that ignores a second
    SIGTERM). A stop kept when the block ends normally is raised then; one
    kept when it ends by an exception is forgotten: it has left by then.
    """
    global _kept
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wrappers = {}
    for signum in signals:
        handler = signal.getsignal(signum)
        if callable(handler):
            wrappers[signum] = _keeping(handler)
            signal.signal(signum, wrappers[signum])
    _kept = None
    try:
        yield
        # Swallowed after the last check (the run finished meanwhile): stop now.
        raise_kept_stop()
    finally:
        _kept = None
        for signum, wrapper in wrappers.items():
            if signal.getsignal(signum) is wrapper:
                signal.signal(signum, wrapper.wrapped)
