"""A ``concurrent.futures.Future`` that costs little until somebody waits on it.

A plain ``Future`` allocates its synchronization when it is created: a ``Condition`` (an
``RLock``, a deque and five bound methods) and two lists, about a dozen objects the
garbage collector tracks. A producer creates one per send and callers typically keep
thousands of them, so creating them, and the collector's passes over them, cost more
than the rest of a send. ``RunningFuture`` creates those attributes only when one of
``Future``'s own methods first needs them (someone waits, adds a callback, cancels, ...),
and settles without them when nobody has.

It relies on ``Future``'s private attributes (``_state``, ``_result``, ``_exception``,
``_condition``, ``_waiters``, ``_done_callbacks``), unchanged from Python 3.8 to 3.13;
``tests/client/test_future.py`` checks the behaviour through the public API.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from concurrent.futures._base import FINISHED, RUNNING
from typing import Any, Final, TypeVar

__all__ = ["RunningFuture"]

_T = TypeVar("_T")

# Guards the lazy creation below and the decision to settle without a condition.
_LAZY_LOCK: Final = threading.Lock()
_LAZY_ATTRIBUTES: Final[dict[str, Callable[[], object]]] = {
    "_condition": threading.Condition,
    "_waiters": list,
    "_done_callbacks": list,
}


class RunningFuture(concurrent.futures.Future[_T]):
    """A future already in the RUNNING state (it cannot be cancelled), settled once.

    Behaves as ``concurrent.futures.Future`` in every respect (``result``, ``exception``,
    ``add_done_callback``, ``concurrent.futures.wait`` and ``as_completed``).
    """

    def __init__(self) -> None:  # no super().__init__(): it would allocate the condition
        self._state = RUNNING
        self._result: _T | None = None
        self._exception: BaseException | None = None
        # True until the condition exists; then every method takes Future's own path
        self._lazy = True

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set yet
        factory = _LAZY_ATTRIBUTES.get(name)
        if factory is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with _LAZY_LOCK:
            try:
                return object.__getattribute__(self, name)
            except AttributeError:
                value = factory()
                object.__setattr__(self, name, value)
                if name == "_condition":
                    self._lazy = False
                return value

    def set_result(self, result: _T) -> None:
        with _LAZY_LOCK:
            if self._lazy and self._state == RUNNING:
                # nobody waits and no callback is registered: both need the condition
                self._result = result
                self._state = FINISHED  # last: readers check the state first
                return
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        with _LAZY_LOCK:
            if self._lazy and self._state == RUNNING and exception is not None:
                self._exception = exception
                self._state = FINISHED
                return
        super().set_exception(exception)

    @property
    def waited_on(self) -> bool:
        """True while a thread waits in ``result`` or ``exception`` (for tests).

        Read without creating the condition, which would change the future's path.
        """
        return not self._lazy and bool(vars(self._condition)["_waiters"])

    # FINISHED is final, so a finished future answers without the condition

    def done(self) -> bool:
        return self._state == FINISHED or super().done()

    def result(self, timeout: float | None = None) -> _T:
        if self._state == FINISHED:
            if self._exception is None:
                return self._result  # type: ignore[return-value]  # set with the state
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # no cycle via the traceback
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)
