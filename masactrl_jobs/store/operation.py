"""How an operation is written once and run by both front ends.

An operation is a method that builds a :class:`Call` (a script or a raw command, and how to read
its reply). Decorated with :func:`operation`, it becomes a method of every front end: on
:class:`~masactrl_jobs.store.JobStore` it returns the result, on
:class:`~masactrl_jobs.store.AsyncJobStore` an awaitable of it, because each front end runs the
call its own way (``_run``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

__all__ = ["AsyncRunner", "Call", "Operation", "SyncRunner", "operation"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


@dataclass(frozen=True)
class Call(Generic[T]):
    """A script (by name) or a raw command (``script`` None), and how to read its reply.

    A raw command with no arguments needs no round trip: its result is ``parse(None)``.
    ``durable`` marks the writes a failover must not lose (a job's enqueue, start, end and
    requeue): with replicas to wait for, the front ends follow them with ``WAIT`` on the same
    connection (see ``fronts.py``).
    """

    script: str | None
    keys: Sequence[str]
    args: Sequence[Any]
    parse: Callable[[Any], T]
    durable: bool = False


class SyncRunner:
    """A front end whose ``_run`` returns a call's result."""

    def _run(self, call: Call[T]) -> T:
        raise NotImplementedError


class AsyncRunner:
    """A front end whose ``_run`` returns an awaitable of a call's result."""

    def _run(self, call: Call[T]) -> Awaitable[T]:
        raise NotImplementedError


class Operation(Generic[P, R]):
    """A descriptor: the builder ``build(store, *args)``, bound to the front end it is read from."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[R]]) -> None:
        self.build = build
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, store: None, owner: type) -> Operation[P, R]: ...
    @overload
    def __get__(self, store: SyncRunner, owner: type) -> Callable[P, R]: ...
    @overload
    def __get__(self, store: AsyncRunner, owner: type) -> Callable[P, Awaitable[R]]: ...
    def __get__(self, store: Any, owner: type) -> Any:
        if store is None:
            return self
        build, run = self.build, store._run

        def bound(*args: Any, **kwargs: Any) -> Any:
            return run(build(store, *args, **kwargs))

        bound.__name__, bound.__doc__ = self.__name__, self.__doc__  # for help() and tracebacks
        return bound


def operation(build: Callable[Concatenate[Any, P], Call[R]]) -> Operation[P, R]:
    """Make ``build`` (a method returning a :class:`Call`) an operation of every front end."""
    return Operation(build)
