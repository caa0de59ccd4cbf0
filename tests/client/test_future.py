"""RunningFuture: a concurrent.futures.Future whose condition is created on first need."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from kiteq.client._future import RunningFuture
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def test_it_is_a_running_future_that_cannot_be_cancelled() -> None:
    future: RunningFuture[int] = RunningFuture()
    assert isinstance(future, concurrent.futures.Future)
    assert future.running()
    assert not future.done()
    assert not future.cancel()
    assert not future.cancelled()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        future.exception(timeout=0.01)


def test_result_without_anybody_waiting_allocates_no_condition() -> None:
    future: RunningFuture[int] = RunningFuture()
    future.set_result(42)
    assert "_condition" not in vars(future)
    assert future.done()
    assert future.result() == 42
    assert future.result(timeout=0) == 42
    assert future.exception() is None
    assert "_condition" not in vars(future)
    assert not future.running()
    assert "finished returned int" in repr(future)


def test_exception() -> None:
    future: RunningFuture[int] = RunningFuture()
    error = ValueError("boom")
    future.set_exception(error)
    assert future.done()
    assert future.exception() is error
    with pytest.raises(ValueError, match="boom"):
        future.result()
    with pytest.raises(ValueError, match="boom"):
        future.result(timeout=1)


@pytest.mark.parametrize("waited", [False, True])
def test_settling_twice_is_an_error(waited: bool) -> None:
    future: RunningFuture[int] = RunningFuture()
    if waited:
        with pytest.raises(TimeoutError):
            future.result(timeout=0)
    future.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        future.set_result(2)
    with pytest.raises(concurrent.futures.InvalidStateError):
        future.set_exception(ValueError())
    assert future.result() == 1


def test_a_waiting_thread_is_woken() -> None:
    future: RunningFuture[str] = RunningFuture()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(future.result(timeout=10)))
    waiter.start()
    wait_until(lambda: future.waited_on, 10, "the thread waiting in result()")
    future.set_result("done")
    waiter.join(10)
    assert got == ["done"]


def test_waiters_racing_the_result_are_never_lost() -> None:
    # result() and set_result() from two threads at about the same time, many times
    for i in range(2000):
        future: RunningFuture[int] = RunningFuture()
        got: list[int] = []
        started = threading.Event()

        def wait(
            f: RunningFuture[int] = future, out: list[int] = got, ready: threading.Event = started
        ) -> None:
            ready.set()
            out.append(f.result(timeout=10))

        waiter = threading.Thread(target=wait)
        waiter.start()
        started.wait()
        future.set_result(i)
        waiter.join(10)
        assert got == [i]


def test_callbacks_run_once_whether_added_before_or_after() -> None:
    future: RunningFuture[int] = RunningFuture()
    calls: list[tuple[str, int]] = []
    future.add_done_callback(lambda f: calls.append(("before", f.result())))
    future.set_result(7)
    future.add_done_callback(lambda f: calls.append(("after", f.result())))
    assert calls == [("before", 7), ("after", 7)]


def settle(futures: list[RunningFuture[int]], start: int = 0) -> None:
    for i, future in enumerate(futures[start:], start):
        future.set_result(i)


def test_wait_and_as_completed() -> None:
    futures: list[RunningFuture[int]] = [RunningFuture() for _ in range(4)]
    futures[0].set_result(0)  # finished before anybody looked
    timer = threading.Timer(0.05, settle, (futures, 1))
    timer.start()
    try:
        done, not_done = concurrent.futures.wait(futures, timeout=10)
        assert done == set(futures)
        assert not not_done
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [0, 1, 2, 3]
    finally:
        timer.join()


def test_as_completed_sees_results_that_arrive_while_it_waits() -> None:
    futures: list[RunningFuture[int]] = [RunningFuture() for _ in range(3)]
    timer = threading.Timer(0.05, settle, (futures,))
    timer.start()
    try:
        results = [f.result() for f in concurrent.futures.as_completed(futures, timeout=10)]
    finally:
        timer.join()
    assert sorted(results) == [0, 1, 2]


def test_unknown_attributes_are_still_attribute_errors() -> None:
    future: RunningFuture[int] = RunningFuture()
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = future.no_such_thing
    assert not hasattr(future, "no_such_thing")
