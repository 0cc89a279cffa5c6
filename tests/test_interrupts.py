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
        assert signal.getsignal(signal.SIGUSR1) is stopping_handler
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous_usr2)


def test_a_handler_that_replaced_itself_keeps_its_choice():
    """As tmesolve's SIGTERM handler does: ignore a second signal, then stop."""
    def stop_once(signum, frame):
        signal.signal(signum, signal.SIG_IGN)
        raise Stopped(signum)

    previous = signal.signal(signal.SIGUSR1, stop_once)
    try:
        with pytest.raises(Stopped), interrupts.stops_kept():
            signal.raise_signal(signal.SIGUSR1)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_error_after_a_swallowed_stop_does_not_lose_it(stopping_handler, signal_in_a_weakref_callback):
    """The job still ends as stopped (resumable), with the error as the cause."""
    with pytest.raises(Stopped) as raised, interrupts.stops_kept():
        assert signal_in_a_weakref_callback(signal.SIGUSR1)
        raise ValueError("a field became non-finite")
    assert isinstance(raised.value.__cause__, ValueError)


def test_scopes_nest(stopping_handler, signal_in_a_weakref_callback):
    """A job's scope around a run loop's: a stop swallowed in the job's set-up is
    raised at the loop's first check; the handlers are wrapped once."""
    with pytest.raises(Stopped), interrupts.stops_kept():
        wrapped = signal.getsignal(signal.SIGUSR1)
        assert signal_in_a_weakref_callback(signal.SIGUSR1)
        with interrupts.stops_kept():
            assert signal.getsignal(signal.SIGUSR1) is wrapped
            reached_the_loop = True
            interrupts.raise_kept_stop()
    assert reached_the_loop
    assert signal.getsignal(signal.SIGUSR1) is stopping_handler
    # The inner scope ending normally raises what was swallowed in it.
    with pytest.raises(Stopped), interrupts.stops_kept():
        with interrupts.stops_kept():
            assert signal_in_a_weakref_callback(signal.SIGUSR1)
        pytest.fail("the inner scope should have raised the stop")


def test_outside_the_main_thread_nothing_is_wrapped(stopping_handler):
    seen = []

    def run():
        with interrupts.stops_kept():
            seen.append(signal.getsignal(signal.SIGUSR1))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [stopping_handler]


def test_a_worker_thread_does_not_take_the_main_threads_stop(stopping_handler, signal_in_a_weakref_callback):
    with pytest.raises(Stopped), interrupts.stops_kept():
        assert signal_in_a_weakref_callback(signal.SIGUSR1)
        worker = threading.Thread(target=interrupts.raise_kept_stop)
        worker.start()
        worker.join()
        interrupts.raise_kept_stop()


def test_a_stop_while_entering_leaves_nothing_behind(stopping_handler, monkeypatch):
    """A stop that arrives while the handlers are being wrapped undoes the entry:
    the next scope is the outermost again and wraps afresh."""
    getsignal = signal.getsignal
    interrupt_handler = getsignal(signal.SIGINT)  # wrapped before SIGTERM, if callable

    def stopped_at_sigterm(signum):
        if signum == signal.SIGTERM:
            raise Stopped(signum)
        return getsignal(signum)

    monkeypatch.setattr(signal, "getsignal", stopped_at_sigterm)
    with pytest.raises(Stopped), interrupts.stops_kept():
        pytest.fail("entered")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is interrupt_handler
    with interrupts.stops_kept():
        assert signal.getsignal(signal.SIGUSR1) is not stopping_handler


def test_the_decorator_keeps_stops_for_the_call(stopping_handler, signal_in_a_weakref_callback):
    @interrupts.keeping_stops
    def job(value):
        """A job."""
        assert signal_in_a_weakref_callback(signal.SIGUSR1)
        return value

    assert job.__doc__ == "A job."
    with pytest.raises(Stopped):
        job(1)
