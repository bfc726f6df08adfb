"""
The few Twisted idioms pgws uses everywhere: the default reactor, running a coroutine whose
failure is logged, a deadline that abandons rather than cancels, and back-off delays.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["backoff_delays", "default_reactor", "fire_and_log", "fired", "sleep", "within"]

_log = Logger()
_T = TypeVar("_T")


def default_reactor(reactor: Any = None) -> Any:
    """
    C{reactor}, or the global one when it is None.  The global reactor is imported only here and
    only when needed, so that a program may install another reactor before it uses pgws.
    """
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


def fire_and_log(coroutine: Coroutine[Any, Any, _T], what: str) -> defer.Deferred[_T]:
    """
    Run C{coroutine} now, in the background; if it fails, the failure is logged as C{what}
    failing (a background task has no caller to report to, and an unlogged failure is lost).
    """
    d = defer.Deferred.fromCoroutine(coroutine)
    d.addErrback(lambda f: _log.failure("{what} failed", f, what=what))
    return d


def fired(d: defer.Deferred[Any]) -> defer.Deferred[None]:
    """
    A new Deferred that fires (with None, never failing) once C{d} has fired; C{d}'s own
    callback chain is left as it was, so several waiters can share one Deferred.
    """
    out: defer.Deferred[None] = defer.Deferred()

    def passthrough(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(passthrough)
    return out


def within(d: defer.Deferred[_T], seconds: float, reactor: IReactorTime) -> defer.Deferred[_T]:
    """
    C{d}'s result, or a C{TimeoutError} after C{seconds} -- without cancelling C{d}.  Cancelling a
    txpostgres query calls psycopg2's C{cancel()}, which blocks while it connects to the server
    and leaves the query's Deferred unfired: a stuck query is abandoned instead, with its
    connection.
    """
    out: defer.Deferred[_T] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(defer.TimeoutError(f"no answer within {seconds:g} s"))

    timer = reactor.callLater(seconds, expire)

    def settle(result: _T | Failure) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(settle)
    return out


def sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred[None]:
    """Fires after C{seconds} of C{reactor}'s time (a clock in tests)."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def backoff_delays(first: float = 1.0, cap: float = 32.0) -> Iterator[float]:
    """C{first}, doubling up to C{cap}: by default 1, 2, 4 ... 32, 32 ... seconds between attempts."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)
