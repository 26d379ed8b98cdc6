"""Fairness: does one busy node delay the others? (issue 3, item 2)

    python -m bench.fairness --edges 200 --burst 3000 --rounds 5

The real `serve` (embedded store) runs with N edges `edge-i`, each with a pod that uses the
ConfigMap `fan`. One round rewrites `fan` and measures, per edge, the time from just before
the write until the edge received the update (the simulator ACKs it at once). Rounds run in
three conditions, and one JSON line per condition gives the latency min/p50/p99/max over
all rounds:

- `quiet`: nothing else happens;
- `flapping`: another node `flapper` connects over mutual TLS, sends a keepalive and drops the
  connection, in a tight loop, for the whole round (`flaps` counts its connections);
- `burst`: a node `busy` gets a pod using `--burst` new ConfigMaps; once the store has routed
  them (busy received the first), `fan` is rewritten, so thousands of messages sit in busy's
  queue just ahead of the fan-out. (Reading, storing and placing such a burst takes the store
  about 0.5 s for 3,000 objects; a change written meanwhile waits for that, as the desired
  state is processed in order, which this condition leaves out)
  (`busy_burst_received_at_fan_out_end`: how many of that round's burst `busy` had received
  when the last edge got `fan`: far fewer than the burst means the fan-out did not wait
  behind it).

Everything shares the machine: the edges and the flapper run in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import trio
import yaml

from bench.run import machine
from trio_cloudhub.testing.edge_sim import SimEdge, bootstrap, open_fleet, start_sim_edge
from trio_cloudhub.testing.hub_process import HOST, HubProcess


def write(folder: Path, name: str, docs: list[dict[str, Any]]) -> None:
    temp = folder / f".{name}.tmp"
    temp.write_text(yaml.dump_all(docs, Dumper=yaml.CSafeDumper))
    os.replace(temp, folder / name)


def pod(name: str, node: str, config_maps: list[str]) -> dict[str, Any]:
    env_from = [{"configMapRef": {"name": cm}} for cm in config_maps]
    container = {"name": "app", "image": "busybox", "envFrom": env_from}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [container]},
    }


def config_map(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"value": value},
    }


def fan_arrivals(edges: list[SimEdge], value: str) -> list[float]:
    found = []
    for edge in edges:
        for item in edge.received:
            content = item.message.content
            if isinstance(content, dict) and content.get("data") == {"value": value}:
                found.append(item.at)
                break
    return found


async def one_round(
    hub: HubProcess, edges: list[SimEdge], value: str, burst: int, busy: SimEdge, busy_round: int
) -> list[float]:
    if burst:
        names = [f"burst-{busy_round}-{i}" for i in range(burst)]
        write(hub.manifests, f"burst-{busy_round}.yaml", [config_map(n, "x") for n in names])
        write(hub.manifests, f"busy-{busy_round}.yaml", [pod(f"busy-{busy_round}", "busy", names)])
        # The store has read, stored and routed the burst once `busy` gets its first message:
        # from then on the burst sits in busy's queue, ahead of the fan-out.
        prefix = f"/burst-{busy_round}-"
        with trio.fail_after(60):
            while not any(prefix in item.message.resource for item in busy.received[-50:]):  # noqa: ASYNC110
                await trio.sleep(0.005)
    began = trio.current_time()
    write(hub.manifests, "fan.yaml", [config_map("fan", value)])
    with trio.fail_after(120):
        while len(arrivals := fan_arrivals(edges, value)) < len(edges):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return [at - began for at in arrivals]


def burst_received(busy: SimEdge, busy_round: int) -> int:
    prefix = f"/burst-{busy_round}-"
    return sum(prefix in item.message.resource for item in busy.received)


async def flap(identity: Any, port: int, count: list[int]) -> None:
    context = identity.client_ssl_context()
    while True:
        async with trio.open_nursery() as nursery:
            edge = await start_sim_edge(nursery, HOST, port, context, "flapper")
            await trio.sleep(0.01)
            await edge.close_abruptly()
            nursery.cancel_scope.cancel()
        count[0] += 1


def figures(condition: str, latencies: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    ordered = sorted(latencies)
    ms = [round(value * 1000, 1) for value in ordered]
    return {
        "scenario": "fairness",
        "condition": condition,
        "samples": len(ms),
        "latency_ms": {
            "min": ms[0],
            "p50": round(statistics.median(ordered) * 1000, 1),
            "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "max": ms[-1],
        },
        **extra,
        "machine": machine(),
    }


async def main_async(edges_count: int, burst: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cloudhub-fairness-") as root:
        hub = HubProcess(Path(root))  # INFO: start-up is read from the log
        nodes = [f"edge-{i}" for i in range(edges_count)]
        write(hub.manifests, "pods.yaml", [pod(f"pod-{n}", n, ["fan"]) for n in nodes])
        write(hub.manifests, "fan.yaml", [config_map("fan", "initial")])
        await hub.start()
        try:
            identity = await bootstrap(HOST, hub.https_port, await hub.token(), "bench-edge")
            async with (
                open_fleet(HOST, hub.websocket_port, identity, edges_count) as fleet,
                trio.open_nursery() as nursery,
            ):
                busy = await start_sim_edge(nursery, HOST, hub.websocket_port, identity, "busy")
                await trio.sleep(2)
                seq = 0
                for condition in ("quiet", "flapping", "burst"):
                    latencies: list[float] = []
                    flaps = [0]
                    busy_during: list[int] = []  # busy's messages until the fan-out was done
                    for round_number in range(rounds):
                        seq += 1
                        async with trio.open_nursery() as this_round:
                            if condition == "flapping":
                                this_round.start_soon(flap, identity, hub.websocket_port, flaps)
                                await trio.sleep(0.5)  # flapping is under way
                            burst_now = burst if condition == "burst" else 0
                            latencies += await one_round(
                                hub, fleet.edges, f"v{seq}", burst_now, busy, round_number
                            )
                            busy_during.append(burst_received(busy, round_number))
                            this_round.cancel_scope.cancel()
                        await trio.sleep(1)
                    extra: dict[str, Any] = {"edges": edges_count, "rounds": rounds}
                    if condition == "flapping":
                        extra["flaps"] = flaps[0]
                    if condition == "burst":
                        extra["burst_objects_per_round"] = burst
                        extra["busy_burst_received_at_fan_out_end"] = busy_during
                    print(json.dumps(figures(condition, latencies, extra)), flush=True)
                nursery.cancel_scope.cancel()
        finally:
            await hub.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=200)
    parser.add_argument("--burst", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(main_async, args.edges, args.burst, args.rounds)


if __name__ == "__main__":
    main()
