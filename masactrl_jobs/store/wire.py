"""The asyncio fast path: script calls batched into one pipeline, packed in RESP by hand.

The gateway makes many small script calls at once (every request a loop iteration runs).
redis-py spends far more CPU per command than Redis does, so :class:`AutoPipeline` sends the
calls made within one loop iteration as one write and reads their replies in order; alone, a call
goes out as a plain ``EVALSHA`` through redis-py's script object. The commands are packed here
(:func:`pack_command`; RESP is a stable, tiny format) because redis-py's per-argument encoding
was the largest single cost of a submission (bench/gateway.py). Connections, the reply parser and
error replies remain redis-py's, through its public connection interface.

A script Redis no longer has (a restart, a failover to a replica, ``SCRIPT FLUSH``) answers
``NOSCRIPT``; that call is then run alone, which loads the script and runs it again.

A batch that meets a stale connection (Redis restarted, or the master moved) is sent once more on
a fresh one, with the client's own retry policy, as redis-py does for its pipelines. A batch that
holds a durable call (``Call.durable``) ends with ``WAIT`` when the target asks for replica
acknowledgements (see ``fronts.py``).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions
from redis.commands.core import AsyncScript

from masactrl_jobs.store.connection import ReplicaWait
from masactrl_jobs.store.operation import Call

__all__ = ["AutoPipeline", "pack_command"]

T = TypeVar("T")

_Pending = tuple[Call[Any], "asyncio.Future[Any]"]


def pack_command(chunks: list[bytes], args: Sequence[Any]) -> None:
    """Append one command in RESP (an array of bulk strings) to ``chunks``."""
    append = chunks.append
    append(b"*%d\r\n" % len(args))
    for arg in args:
        kind = type(arg)  # exact types first: this runs for every argument of every call
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        append(b"$%d\r\n%s\r\n" % (len(data), data))


class AutoPipeline:
    """Runs script calls, batching those made in the same event-loop iteration."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        scripts: Mapping[str, AsyncScript],
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self.client = client
        self.scripts = scripts
        self.replica_wait = replica_wait
        self._pending: list[_Pending] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def run(self, call: Call[T]) -> T:
        """The parsed reply of a script call, sent with whatever else this iteration sends."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((call, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        result: T = await future
        return result

    async def drain(self) -> None:
        """Wait for the batches in flight (before closing the client)."""
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._flushing.discard)

    async def _run_one(self, call: Call[Any], future: asyncio.Future[Any]) -> None:
        try:
            script = self.scripts[call.script]  # type: ignore[index]
            reply = await script(keys=list(call.keys), args=list(call.args), client=self.client)
            result = call.parse(reply)
        except BaseException as exc:  # handed to the caller, whatever it is
            if not future.done():
                future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not future.done():
                future.set_result(result)

    async def _send(self, batch: list[_Pending]) -> None:
        replica_wait = self.replica_wait
        wait = (
            replica_wait is not None
            and any(call.durable for call, _ in batch)
            and replica_wait.wanted()
        )
        if len(batch) == 1 and not wait:
            await self._run_one(*batch[0])
            return
        try:
            replies = await self._pipeline(batch, wait)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (call, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # Redis restarted or was flushed: this call loads the script and runs again.
                if wait and call.durable:
                    script = self.scripts[call.script]  # type: ignore[index]
                    try:
                        await self.client.script_load(script.script)
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                        continue
                    await self._send([(call, future)])
                else:
                    await self._run_one(call, future)
            elif future.done():
                continue  # the caller went away (request cancelled)
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                try:
                    future.set_result(call.parse(reply))
                except Exception as exc:
                    future.set_exception(exc)

    async def _pipeline(self, batch: list[_Pending], wait: bool) -> list[Any]:
        """EVALSHA every call in one write (then WAIT if asked), and read the replies in order."""
        chunks: list[bytes] = []
        for call, _ in batch:
            sha = self.scripts[call.script].sha  # type: ignore[index]
            pack_command(chunks, ("EVALSHA", sha, len(call.keys), *call.keys, *call.args))
        if wait:
            assert self.replica_wait is not None
            pack_command(chunks, self.replica_wait.command())
        packed, count = b"".join(chunks), len(batch) + wait
        pool = self.client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]

        async def send() -> list[Any]:
            try:
                await connection.send_packed_command(packed)
                return await _read_replies(connection, count)
            except TimeoutError:
                raise redis.exceptions.TimeoutError("Timeout reading from Redis") from None

        async def drop(error: Exception) -> None:
            # Unread replies would desynchronise the connection for its next user; a stale one
            # must be dialled again (with Sentinel: to wherever the master now is).
            await connection.disconnect()

        try:
            replies: list[Any] = await connection.retry.call_with_retry(send, drop)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        if wait:
            assert self.replica_wait is not None
            self.replica_wait.acknowledged(replies.pop())
        return replies


async def _read_reply(connection: Any, timeout: float | None) -> Any:
    try:
        return await connection.read_response(timeout=timeout)
    except redis.exceptions.ResponseError as exc:
        return exc  # an error reply belongs to its call, not to the batch


async def _read_replies(connection: Any, count: int) -> list[Any]:
    """``count`` replies in order, error replies as exceptions."""
    if sys.version_info >= (3, 11):
        # One read timeout for the whole batch (its replies arrive together) instead of a
        # timeout context per reply; math.inf tells redis-py to set none of its own.
        async with asyncio.timeout(connection.socket_timeout):
            return [await _read_reply(connection, math.inf) for _ in range(count)]
    return [await _read_reply(connection, None) for _ in range(count)]
