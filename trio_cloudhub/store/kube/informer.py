"""One resource kind of a Kubernetes cluster kept in memory: list, then watch, forever.

The official `kubernetes` client blocks, so each list and each watch stream runs in a worker
thread taken from a shared `trio.CapacityLimiter` (a watch holds its thread for up to
`watch_timeout` seconds). Watch events cross back into trio one at a time through
`trio.from_thread.run`, which gives backpressure: a slow handler slows the stream, never
grows memory.

Rules (the client-go reflector's, simplified):
- list (raw JSON, no model objects: much cheaper), remember the list's resourceVersion, hand
  every object to the handler as ADDED, then set `synced`;
- watch from the last resourceVersion with bookmarks; ADDED/MODIFIED/DELETED update the
  cache and reach the handler; a BOOKMARK only moves the resourceVersion;
- a 410 Gone (as an HTTP status or as an ERROR event) means the history is gone: list again
  and hand the handler the difference with the cache (ADDED/MODIFIED/DELETED), so nothing
  is missed and nothing unchanged is repeated;
- any other failure (API server away, 5xx, broken stream): wait with back-off (0.5 s doubling
  to 30 s, reset by a successful stream) and watch again, or list again if the list failed.
A watch line above `MAX_EVENT_BYTES` ends the stream (and is logged); the next watch resumes.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import trio

log = logging.getLogger("trio_cloudhub.kube")

MAX_EVENT_BYTES = 8 * 1024 * 1024  # etcd refuses objects above 1.5 MiB; leave room
READ_CHUNK = 64 * 1024
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds
Handler = Callable[[str, dict[str, Any]], None]  # (ADDED | MODIFIED | DELETED, object)
ListFunction = Callable[..., Any]  # a client list function, e.g. CoreV1Api.list_node


class ApiError(Exception):
    """The API server answered with an error status (or the stream carried one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@attrs.define
class Backoff:
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(min(self.base * 2 ** min(self.failures - 1, 30), self.cap))

    def reset(self) -> None:
        self.failures = 0


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


def resource_version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Informer:
    """See the module docstring. `cache` maps (namespace, name) to the newest object."""

    def __init__(
        self,
        kind: str,
        list_function: ListFunction,
        *,
        limiter: trio.CapacityLimiter,
        watch_timeout: int = 300,
        list_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self._list = list_function
        self._limiter = limiter
        self._watch_timeout = watch_timeout
        self._kwargs = dict(list_kwargs or {})
        self.cache: dict[ObjectKey, dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = trio.Event()
        self.lists = 0  # how many times the kind was listed (1 + relists)
        self._backoff = Backoff()

    async def run(
        self, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """List until it works, report started (cache synced), then watch forever."""
        await self._list_until_done(handler)
        task_status.started()
        while True:
            try:
                await self._watch_once(handler)
            except ApiError as exc:
                if exc.status == 410:
                    log.info("%s: watch history expired (410): listing again", self.kind)
                    await self._list_until_done(handler)
                    continue
                await self._pause(f"watch failed: {exc}")
            except Exception as exc:  # connection refused, reset, urllib3 errors ...
                await self._pause(f"watch failed: {type(exc).__name__}: {exc}")

    # --- list ---------------------------------------------------------------------------

    async def _list_until_done(self, handler: Handler) -> None:
        while True:
            try:
                body = await trio.to_thread.run_sync(self._list_blocking, limiter=self._limiter)
            except Exception as exc:  # ApiError, connection errors: the server may come back
                await self._pause(f"list failed: {type(exc).__name__}: {exc}")
                continue
            self._take_list(body, handler)
            return

    def _list_blocking(self) -> dict[str, Any]:
        response = _call(self._list, _preload_content=False, **self._kwargs)
        data = _read_all(response)
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise ApiError(0, f"list answer is not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("items", []), list):
            raise ApiError(0, "list answer has no items")
        return body

    def _take_list(self, body: dict[str, Any], handler: Handler) -> None:
        fresh: dict[ObjectKey, dict[str, Any]] = {}
        for item in body.get("items") or []:
            if isinstance(item, dict):
                fresh[object_key(item)] = item
        old, self.cache = self.cache, fresh
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self.lists += 1
        self.synced.set()
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                handler("ADDED", obj)
            elif resource_version(before) != resource_version(obj):
                handler("MODIFIED", obj)
        for key, obj in old.items():
            if key not in fresh:
                handler("DELETED", obj)

    # --- watch --------------------------------------------------------------------------

    async def _watch_once(self, handler: Handler) -> None:
        token = trio.lowlevel.current_trio_token()
        stream = _Stream()

        def deliver(event: dict[str, Any]) -> None:
            if stream.stopped:  # cancelled: the abandoned thread must not reach the handler
                raise _Stopped
            self._take_event(event, handler)

        def run_stream() -> None:
            stream.response = _call(
                self._list,
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
                _preload_content=False,
                **self._kwargs,
            )
            try:
                for line in _lines(stream.response):
                    trio.from_thread.run_sync(deliver, _parse_event(line), trio_token=token)
            except (_Stopped, trio.RunFinishedError):
                pass
            finally:
                stream.close()

        try:
            await trio.to_thread.run_sync(run_stream, limiter=self._limiter, abandon_on_cancel=True)
        finally:
            stream.stopped = True
            stream.close()  # unblocks a thread left reading after a cancel
        self._backoff.reset()

    def _take_event(self, event: dict[str, Any], handler: Handler) -> None:
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            code = obj.get("code")
            raise ApiError(code if isinstance(code, int) else 0, str(obj.get("message", "")))
        rv = resource_version(obj)
        if rv:
            self.resource_version = rv
        if kind == "BOOKMARK":
            return
        key = object_key(obj)
        if kind == "DELETED":
            self.cache.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.cache[key] = obj
        else:
            return
        handler(str(kind), obj)

    async def _pause(self, why: str) -> None:
        delay = self._backoff.next_delay()
        level = logging.WARNING if self._backoff.failures in (1, 5) else logging.DEBUG
        log.log(level, "%s: %s; again in %.1f s", self.kind, why, delay)
        await trio.sleep(delay)


# --- the blocking side (worker threads) ---------------------------------------------------


class _Stopped(Exception):
    """The informer stopped while its watch thread was still reading."""


@attrs.define
class _Stream:
    response: Any = None
    stopped: bool = False

    def close(self) -> None:
        response, self.response = self.response, None
        if response is None:
            return
        # close() alone does not wake a thread blocked in recv(): shut the socket down first.
        sock = getattr(getattr(response, "connection", None), "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            response.close()
        except Exception:  # closing from another thread: best effort
            log.debug("closing a watch response failed", exc_info=True)


def _call(function: ListFunction, **kwargs: Any) -> Any:
    """Call a client function; an ApiException (it has a status) becomes ApiError."""
    try:
        response = function(**kwargs)
    except Exception as exc:
        status = getattr(exc, "status", None)
        if isinstance(status, int) and not isinstance(exc, OSError):
            raise ApiError(status, str(getattr(exc, "reason", "") or exc)) from None
        raise
    status = getattr(response, "status", 200)
    if isinstance(status, int) and not 200 <= status < 300:
        data = _read_all(response)
        raise ApiError(status, data[:200].decode("utf-8", "replace"))
    return response


def _read_all(response: Any) -> bytes:
    data = getattr(response, "data", None)
    if isinstance(data, bytes):
        return data
    return bytes(response.read())


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a watch stream, each bounded by MAX_EVENT_BYTES."""
    buffer = bytearray()
    for chunk in response.stream(READ_CHUNK, decode_content=True):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield line
        if len(buffer) > MAX_EVENT_BYTES:
            raise ApiError(0, f"watch event above {MAX_EVENT_BYTES} bytes")
    if buffer.strip():
        yield bytes(buffer)


def _parse_event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise ApiError(0, f"watch event is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ApiError(0, "watch event is not an object")
    return event
