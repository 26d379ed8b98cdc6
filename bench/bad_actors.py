"""Bad actors with valid credentials: do they move the other edges' fan-out time? (issue 14)

    python -m bench.bad_actors --edges 200 --rounds 5      # ~2 min

The real `serve` (embedded store) runs with N edges `edge-i` whose pods use the ConfigMap
`fan`; one round rewrites `fan` and measures, per edge, the time from just before the write
until the edge received the update (the simulator ACKs it at once). Each condition runs R
rounds with one bad actor at work in a process of its own (so it has its own CPU, as a real
edge would), started 2 s before the first round:

- `none`: no bad actor (the baseline, measured first and last);
- `flood`: edge `flood` sends node status reports at 10,000 per second;
- `big`: edge `big` sends 32 MiB frames in a loop;
- `foreign`: one certificate opens sessions for other node names (`ghost-i`) in a loop;
- `noack`: edge `silent`, whose pod uses `fan` too, never ACKs anything.

One JSON line per condition: latency p50/p99/max and the round's all-received time (mean
over rounds), and their ratio to the first baseline.
The hub's own limits (trioCloudHub.upstream*) are at their defaults unless `--no-limits`.
Everything shares the 2 cores: the fleet runs in this process, the hub and the actor in
their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.fairness import config_map, fan_arrivals, pod, write
from bench.run import machine
from trio_cloudhub.core.codec import encode
from trio_cloudhub.core.message import new_message
from trio_cloudhub.testing.edge_sim import bootstrap, open_fleet, start_sim_edge
from trio_cloudhub.testing.hub_process import HOST, HubProcess

ACTORS = ("flood", "big", "foreign", "noack")


def report(node: str, n: int, pad: str = "") -> str:
    message = new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{node}",
        content={"n": n, "pad": pad},
        now_ms=0,
    )
    return encode(message)


async def run_actor(actor: str, https_port: int, ws_port: int, token: str, seconds: float) -> None:
    own_name = {"flood": "flood", "big": "big", "noack": "silent"}.get(actor, "foreign-owner")
    identity = await bootstrap(HOST, https_port, token, own_name)
    context = identity.client_ssl_context()
    sent = 0
    started = time.monotonic()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            if actor == "flood":
                edge = await start_sim_edge(nursery, HOST, ws_port, context, "flood")
                while True:
                    tick = trio.current_time()
                    for _ in range(100):  # 10,000 per second in steps of 10 ms
                        await edge.send_text(report("flood", sent))
                        sent += 1
                    await trio.sleep_until(tick + 0.01)
            elif actor == "big":
                edge = await start_sim_edge(nursery, HOST, ws_port, context, "big")
                pad = "x" * (32 * 1024 * 1024 - 200)
                while True:
                    await edge.send_text(report("big", sent, pad))
                    sent += 1
            elif actor == "foreign":
                while True:
                    async with trio.open_nursery() as one:
                        await start_sim_edge(one, HOST, ws_port, context, f"ghost-{sent % 50}")
                        await trio.sleep(0.02)
                        one.cancel_scope.cancel()
                    sent += 1
            else:
                await start_sim_edge(nursery, HOST, ws_port, context, "silent", auto_ack=False)
                await trio.sleep_forever()
    print(json.dumps({"actor": actor, "sent": sent, "seconds": time.monotonic() - started}))


async def one_round(hub: HubProcess, edges: list[Any], value: str) -> list[float]:
    began = trio.current_time()
    write(hub.manifests, "fan.yaml", [config_map("fan", value)])
    with trio.fail_after(120):
        while len(arrivals := fan_arrivals(edges, value)) < len(edges):  # noqa: ASYNC110
            await trio.sleep(0.005)
    return [at - began for at in arrivals]


def summary(rounds: list[list[float]]) -> dict[str, float]:
    latencies = sorted(value for round_ in rounds for value in round_)
    return {
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "all_received_ms_mean": round(statistics.mean(max(r) for r in rounds) * 1000, 1),
    }


async def main_async(edges_count: int, rounds: int, actors: list[str], limits: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="cloudhub-bad-actors-") as root:
        extra: dict[str, Any] = {} if limits else {"upstreamQps": 0, "upstreamBytesPerSecond": 0}
        hub = HubProcess(Path(root), trio_cloud_hub=extra)
        nodes = [f"edge-{i}" for i in range(edges_count)]
        pods = [pod(f"pod-{n}", n, ["fan"]) for n in nodes]
        write(hub.manifests, "pods.yaml", [*pods, pod("pod-silent", "silent", ["fan"])])
        write(hub.manifests, "fan.yaml", [config_map("fan", "initial")])
        await hub.start()
        try:
            token = await hub.token()
            identity = await bootstrap(HOST, hub.https_port, token, "bench-edge")
            async with open_fleet(HOST, hub.websocket_port, identity, edges_count) as fleet:
                await trio.sleep(2)
                seq = 0
                baseline: dict[str, float] | None = None
                for condition in ["none", *actors, "none"]:
                    async with trio.open_nursery() as nursery:
                        process: trio.Process | None = None
                        if condition != "none":
                            command = [
                                sys.executable, "-m", "bench.bad_actors", "--actor", condition,
                                "--https-port", str(hub.https_port),
                                "--ws-port", str(hub.websocket_port),
                                "--token", token, "--seconds", str(4 + rounds * 4),
                            ]  # fmt: skip
                            run = partial(trio.run_process, command, check=False)
                            process = await nursery.start(run)
                            await trio.sleep(3)
                        measured = []
                        for _ in range(rounds):
                            seq += 1
                            measured.append(await one_round(hub, fleet.edges, f"v{seq}"))
                            await trio.sleep(1)
                        if process is not None:
                            process.terminate()
                    figures = summary(measured)
                    if baseline is None:
                        baseline = figures
                    line: dict[str, Any] = {
                        "scenario": "bad_actors",
                        "condition": condition,
                        "edges": edges_count,
                        "rounds": rounds,
                        "limits": limits,
                        **figures,
                        "p50_vs_baseline": round(figures["p50_ms"] / baseline["p50_ms"], 2),
                        "all_received_vs_baseline": round(
                            figures["all_received_ms_mean"] / baseline["all_received_ms_mean"], 2
                        ),
                        "edges_connected": len(fleet.connected),
                        "machine": machine(),
                    }
                    print(json.dumps(line), flush=True)
        finally:
            await hub.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--actors", default=",".join(ACTORS))
    parser.add_argument("--no-limits", action="store_true", help="upstream limits off")
    parser.add_argument("--actor", default="", help="(internal) run one actor")
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--ws-port", type=int, default=0)
    parser.add_argument("--token", default="")
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if args.actor:
        trio.run(run_actor, args.actor, args.https_port, args.ws_port, args.token, args.seconds)
        return
    actors = [name for name in args.actors.split(",") if name]
    trio.run(main_async, args.edges, args.rounds, actors, not args.no_limits)


if __name__ == "__main__":
    main()
