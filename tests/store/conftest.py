"""Helpers for the local store tests: manifests as dicts, a running store on tmp_path.

The store hands work to threads, so these tests run on the real clock with a 10 ms poll
interval (on Linux inotify usually reports a change first); every wait is bounded by
`trio.fail_after`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import yaml

from trio_cloudhub.core.message import Message
from trio_cloudhub.store.local import LocalStore, open_local_store

POLL = 0.01
WAIT = 5.0


def node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"node-role.kubernetes.io/edge": ""}},
    }


def config_map(
    name: str, data: dict[str, str] | None = None, namespace: str = ""
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data or {}}


def secret(name: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": data or {},
    }


def pod(
    name: str,
    node_name: str = "",
    *,
    volumes: list[dict[str, Any]] | None = None,
    env: list[dict[str, Any]] | None = None,
    env_from: list[dict[str, Any]] | None = None,
    image_pull_secrets: list[str] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": "busybox:1.36"}
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    spec: dict[str, Any] = {"containers": [container]}
    if node_name:
        spec["nodeName"] = node_name
    if volumes:
        spec["volumes"] = volumes
    if image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": item} for item in image_pull_secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def cm_volume(name: str) -> dict[str, Any]:
    return {"name": f"v-{name}", "configMap": {"name": name}}


def write_manifest(folder: Path, name: str, *docs: dict[str, Any]) -> None:
    write_text(folder, name, yaml.safe_dump_all(docs, sort_keys=False))


def write_text(folder: Path, name: str, text: str) -> None:
    """Replace atomically, so a poll never reads half a file."""
    temp = folder / f".{name}.tmp"
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, folder / name)


T = TypeVar("T")


async def eventually(check: Callable[[], T]) -> T:
    """Poll `check` until it returns something truthy (state outside trio: logs, files)."""
    with trio.fail_after(WAIT):
        while True:
            if result := check():
                return result
            await trio.sleep(POLL)


@attrs.define
class Running:
    store: LocalStore
    receive: trio.MemoryReceiveChannel[Message]
    manifests: Path

    def initial(self) -> list[Message]:
        """Everything the initial sync sent (already buffered when run() started)."""
        out: list[Message] = []
        while True:
            try:
                out.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                return out

    async def take(self, count: int) -> list[Message]:
        with trio.fail_after(WAIT):
            return [await self.receive.receive() for _ in range(count)]

    async def quiet(self, polls: int = 10) -> None:
        """No message arrives during a few polls."""
        with trio.move_on_after(POLL * polls):
            message = await self.receive.receive()
            raise AssertionError(f"unexpected message {message.route}")


@asynccontextmanager
async def running_store(
    data_dir: Path, manifests: Path, poll_interval: float = POLL
) -> AsyncIterator[Running]:
    send, receive = trio.open_memory_channel[Message](10_000)
    async with (
        open_local_store(data_dir, manifests, poll_interval=poll_interval) as store,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(WAIT):
            await nursery.start(store.run, send.send_nowait)
        yield Running(store, receive, manifests)
        nursery.cancel_scope.cancel()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    data, manifests = tmp_path / "data", tmp_path / "manifests"
    manifests.mkdir()
    return data, manifests
