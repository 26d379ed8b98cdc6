"""Micro-benchmark of the local store alone: one ConfigMap change with N referencing pods.

    python -m bench.store_sync [--pods 1000] [--repeat 30] [--poll 0.05] [--idle-seconds 5]
                               [--profile]

The same manifests as `bench.run` (N pods `pod-i` on node `edge-i`, all using ConfigMap
`fanout` through `envFrom`), a real `LocalStore` on a temporary directory, no hub. Prints one
JSON line:
- `initial_sync_ms`: the first sync (read, parse, reconcile, write, N+1 messages);
- `change_sync_ms`: one sync after the ConfigMap file was rewritten (atomically, like
  `bench.run`), called directly: scan, read, reconcile, database write, placement, N `update`
  messages into a channel (drained by another task);
- `unchanged_sync_ms`: a sync when nothing changed (the scan alone);
- `end_to_end_ms`: `store.run` running with `--poll`: from just before the file write to the
  N-th message received (includes the wait for the poll or the change notification);
- `idle_cpu_s_per_minute`: this process's CPU while `store.run` idles, scaled to a minute.
`--profile` prints the top functions (cProfile, cumulative) of the change syncs on stderr.
Uses the store's private `_sync`, so it measures the store alone.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from bench.fleet_worker import percentiles
from bench.run import CONFIG_MAP, FANOUT_RESOURCE, POD, machine
from trio_cloudhub.core.message import Message
from trio_cloudhub.store.local import LocalStore, open_local_store


def write_config_map(folder: Path, generation: int) -> None:
    temporary = folder / ".configmap.yaml.tmp"
    temporary.write_text(CONFIG_MAP.format(generation=generation))
    os.replace(temporary, folder / "configmap.yaml")


def write_manifests(folder: Path, n: int) -> Path:
    folder.mkdir()
    (folder / "pods.yaml").write_text("---\n".join(POD.format(i=i) for i in range(n)))
    write_config_map(folder, 1)
    return folder


class Counter:
    """Drains the store's channel, counting the fan-out updates."""

    def __init__(self) -> None:
        self.updates = 0
        self.changed = trio.Event()

    async def drain(self, receive: trio.MemoryReceiveChannel[Message]) -> None:
        async for message in receive:
            if message.route.operation == "update" and message.route.resource.endswith(
                FANOUT_RESOURCE
            ):
                self.updates += 1
                self.changed.set()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(30):
            while self.updates < count:
                self.changed = trio.Event()
                await self.changed.wait()


async def direct_syncs(
    store: LocalStore, folder: Path, n: int, repeat: int, profile: cProfile.Profile | None
) -> dict[str, object]:
    send, receive = trio.open_memory_channel[Message](4 * n + 100)
    counter = Counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(counter.drain, receive)
        began = time.perf_counter()
        await store._sync(send.send_nowait, initial=True)
        initial_ms = (time.perf_counter() - began) * 1000
        changes: list[float] = []
        unchanged: list[float] = []
        for generation in range(2, repeat + 2):
            write_config_map(folder, generation)
            expected = counter.updates + n
            if profile is not None:
                profile.enable()
            began = time.perf_counter()
            await store._sync(send.send_nowait, initial=False)
            changes.append((time.perf_counter() - began) * 1000)
            if profile is not None:
                profile.disable()
            await counter.wait_for(expected)
            began = time.perf_counter()
            await store._sync(send.send_nowait, initial=False)
            unchanged.append((time.perf_counter() - began) * 1000)
        nursery.cancel_scope.cancel()
    return {
        "initial_sync_ms": round(initial_ms, 1),
        "change_sync_ms": percentiles(changes, 2, low=True),
        "unchanged_sync_ms": percentiles(unchanged, 3, low=True),
    }


async def running(
    store: LocalStore, folder: Path, n: int, repeat: int, idle_seconds: float
) -> dict[str, object]:
    send, receive = trio.open_memory_channel[Message](4 * n + 100)
    counter = Counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(counter.drain, receive)
        await nursery.start(store.run, send.send_nowait)
        await trio.sleep(0.5)
        cpu, wall = time.process_time(), time.monotonic()
        await trio.sleep(idle_seconds)
        idle = (time.process_time() - cpu) * 60 / (time.monotonic() - wall)
        latencies: list[float] = []
        for generation in range(1000, 1000 + repeat):
            expected = counter.updates + n
            began = time.perf_counter()
            write_config_map(folder, generation)
            await counter.wait_for(expected)
            latencies.append((time.perf_counter() - began) * 1000)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    return {"end_to_end_ms": percentiles(latencies, 1, low=True), "idle_cpu_s_per_minute": idle}


async def main_async(args: argparse.Namespace) -> None:
    n = args.pods
    with tempfile.TemporaryDirectory(prefix="cloudhub-store-bench-") as root:
        folder = write_manifests(Path(root, "manifests"), n)
        profile = cProfile.Profile() if args.profile else None
        # A poll interval of an hour: only the direct calls sync.
        async with open_local_store(Path(root, "data"), folder, poll_interval=3600) as store:
            figures = await direct_syncs(store, folder, n, args.repeat, profile)
        async with open_local_store(Path(root, "data"), folder, poll_interval=args.poll) as store:
            figures |= await running(store, folder, n, args.repeat, args.idle_seconds)
    figures["idle_cpu_s_per_minute"] = round(float(str(figures["idle_cpu_s_per_minute"])), 3)
    print(
        json.dumps(
            {"scenario": "store_sync", "pods": n, "poll_interval_s": args.poll, **figures}
            | {"machine": machine()}
        ),
        flush=True,
    )
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.store_sync", description=__doc__)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--poll", type=float, default=0.05, help="poll interval of store.run")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if args.pods < 1 or args.repeat < 1 or args.poll <= 0 or args.idle_seconds <= 0:
        parser.error("--pods, --repeat, --poll and --idle-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    trio.run(main_async, parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
