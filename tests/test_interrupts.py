"""tmesolve.interrupts: a stop that a signal handler raises survives Python swallowing it."""

from __future__ import annotations

import signal
import threading

import pytest

from tmesolve import interrupts


class Stopped(BaseException):
    """What the test's handler raises (as submitit's raises SystemExit)."""


@pytest.fixture
def stopping_handler():
    """SIGUSR1 raises :class:`Stopped` while the test runs; the previous handler after."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGUSR1, stop)
    yield stop
    signal.signal(signal.SIGUSR1, previous)


def test_python_swallows_a_stop_raised_in_a_weakref_callback(stopping_handler, signal_in_a_weakref_callback):
    """The problem itself, without tmesolve: the handler's stop is discarded."""
    assert [type(stop) for stop in signal_in_a_weakref_callback(signal.SIGUSR1)] == [Stopped]
    interrupts.raise_kept_stop()  # outside stops_kept nothing is kept


def test_a_swallowed_stop_is_raised_at_the_next_check(stopping_handler, signal_in_a_weakref_callback):
    with pytest.raises(Stopped) as raised, interrupts.stops_kept():
        discarded = signal_in_a_weakref_callback(signal.SIGUSR1)
        checked = True  # swallowed: the block goes on
        interrupts.raise_kept_stop()
        checked = False
    assert checked and discarded == [raised.value] and raised.value.args == (signal.SIGUSR1,)
    assert signal.getsignal(signal.SIGUSR1) is stopping_handler


def test_a_stop_swallowed_after_the_last_check_is_raised_on_leaving(stopping_handler,
                                                                    signal_in_a_weakref_callback):
    with pytest.raises(Stopped), interrupts.stops_kept():
        assert signal_in_a_weakref_callback(signal.SIGUSR1)
    interrupts.raise_kept_stop()  # raised once, not kept for a later run


def test_a_stop_that_was_not_swallowed_is_raised_once(stopping_handler):
    with pytest.raises(Stopped), interrupts.stops_kept():
        signal.raise_signal(signal.SIGUSR1)
    interrupts.raise_kept_stop()
    with interrupts.stops_kept():  # the next run starts without it
        interrupts.raise_kept_stop()


def test_handlers_are_put_back_and_default_actions_left_alone(stopping_handler):
    previous_usr2 = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with interrupts.stops_kept():
            assert signal.getsignal(signal.SIGUSR1) is not stopping_handler  # wrapped
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
            # A handler that replaces itself (ignoring a second SIGTERM) keeps its choice.
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGUSR1) is stopping_handler
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous_usr2)


def test_outside_the_main_thread_nothing_is_wrapped(stopping_handler):
    seen = []

    def run():
        with interrupts.stops_kept():
            seen.append(signal.getsignal(signal.SIGUSR1))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [stopping_handler]
