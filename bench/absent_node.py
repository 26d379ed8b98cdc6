"""Hub memory for a node that is absent or never ACKs: it must follow objects, not changes.

    python -m bench.absent_node --objects 1000 --rounds 1,10,100

Runs the real `Hub` in-process with the in-memory store. For each round count R, a fresh hub
receives R versions of each of N config maps (about 1 KB each) for node `away`, which
(a) never connects, or (b) is connected but never ACKs (one message in flight, retransmitted).
Memory is what `tracemalloc` sees allocated by the hub after the changes (the messages the
bench built and dropped are freed; the queue keeps the newest version of each object).
Prints one JSON line per case: objects, changes, kib_held, bytes_per_object, queue_len.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from typing import Any

import trio
import trio.testing

from bench.run import machine
from trio_cloudhub.core import codec
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.testing.hub import keepalive_message, object_message, open_test_hub

PAYLOAD = "x" * 900


async def one_case(objects: int, rounds: int, connected: bool) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    async with open_test_hub(settings=HubSettings(reconcile_interval=0)) as th:
        edge = None
        if connected:
            edge = await th.connect("away")  # never ACKs: one message stays in flight
        base = tracemalloc.get_traced_memory()[0]
        for version in range(1, rounds + 1):
            for i in range(objects):
                message = object_message(
                    "away",
                    "ConfigMap",
                    f"c{i}",
                    rv=version * objects + i,
                    data={"data": {"v": PAYLOAD}},
                )
                th.hub.route_downstream(message)
            await trio.testing.wait_all_tasks_blocked()
            if edge is not None:
                while True:  # the edge reads (TCP keeps flowing) but never answers
                    try:
                        edge.receive_nowait()
                    except trio.WouldBlock:
                        break
                await edge.send(codec.encode(keepalive_message()))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        queue_len = len(th.hub.nodes["away"].queue)
    tracemalloc.stop()
    return {
        "case": "connected, never ACKs" if connected else "never connects",
        "objects": objects,
        "changes": objects * rounds,
        "kib_held": round(held / 1024, 1),
        "bytes_per_object": round(held / objects),
        "queue_len": queue_len,
    }


async def main_async(objects: int, rounds: list[int]) -> None:
    for connected in (False, True):
        for count in rounds:
            figures = await one_case(objects, count, connected)
            print(json.dumps({"scenario": "absent_node", **figures, "machine": machine()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--rounds", default="1,10,100", help="comma-separated round counts")
    args = parser.parse_args()
    rounds = [int(item) for item in args.rounds.split(",")]
    trio.run(main_async, args.objects, rounds)


if __name__ == "__main__":
    main()
