"""Bad actors with valid credentials (issue 14, item 4), against an in-process hub on trio's
MockClock: each is bounded, logged once per period (not per message), counted in the metrics,
and another edge loses nothing meanwhile. `bench/bad_actors.py` measures the other edges'
fan-out time with and without them over real TLS.
"""

from __future__ import annotations

import logging
import re

import attrs
import pytest
import trio
from trio.testing import MockClock

from trio_cloudhub.core import codec
from trio_cloudhub.core.message import new_message
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.testing import fuzz
from trio_cloudhub.testing.hub import (
    EdgeState,
    TestHub,
    object_message,
    open_test_hub,
    run_auto_ack_edge,
)


def report(node: str, n: int, size: int = 0) -> str:
    message = new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=f"default/nodestatus/{node}",
        content={"n": n, "pad": "x" * size},
        now_ms=0,
    )
    return codec.encode(message)


def limited(hub: TestHub, kind: str) -> float:
    text = hub.hub.metrics.exposition().decode()
    pattern = r'trio_cloudhub_limited_total\{kind="' + kind + r'"\} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def warnings_about(caplog: pytest.LogCaptureFixture, node: str, words: str) -> int:
    return sum(
        1
        for record in caplog.records
        if record.levelno == logging.WARNING
        and record.getMessage().startswith(f"node {node}:")
        and words in record.getMessage()
    )


async def calm_edge_gets(hub: TestHub, state: EdgeState, name: str, rv: int) -> float:
    """Publish a ConfigMap for `calm` and return how long it took to be received (mock s)."""
    started = trio.current_time()
    await hub.publish(object_message("calm", "ConfigMap", name, rv=rv))
    with trio.fail_after(30):
        while f"uid-configmap-default-{name}" not in state.objects:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return trio.current_time() - started


SETTINGS = HubSettings(
    keepalive_interval=3600,
    upstream_qps=300,
    upstream_burst=600,
    upstream_bytes_per_second=1024 * 1024,
    upstream_bytes_burst=2 * 1024 * 1024,
    warning_period=60,
)


async def test_an_edge_flooding_upstream_is_slowed_logged_once_counted_and_loses_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    count = 6000  # 10,000 per second as fast as the memory transport goes
    async with open_test_hub(settings=SETTINGS) as hub:
        calm_state = EdgeState()
        calm = await hub.connect("calm")
        hub.nursery.start_soon(run_auto_ack_edge, calm, calm_state)
        flood = await hub.connect("flood")
        started = trio.current_time()

        async def send_flood() -> None:
            for n in range(count):
                await flood.send(report("flood", n))

        with trio.fail_after(600):
            hub.nursery.start_soon(send_flood)
            await trio.sleep(1)
            delay = await calm_edge_gets(hub, calm_state, "during-flood", 1)
            while sum(node == "flood" for node, _ in hub.store.reports) < count:  # noqa: ASYNC110
                await trio.sleep(0.1)
        elapsed = trio.current_time() - started
    # Bounded: 300 per second after a burst of 600 (the flood alone would take no time).
    assert elapsed >= (count - 600) / 300 * 0.95
    assert delay < 1.0  # the other edge is served meanwhile
    assert [m.content["n"] for node, m in hub.store.reports if node == "flood"] == list(
        range(count)
    )  # nothing lost, in order
    assert limited(hub, "upstream-rate") >= count - 600 - 10
    assert warnings_about(caplog, "flood", "upstream-rate") == 1  # ~18 s: one period


async def test_an_edge_sending_big_frames_in_a_loop_is_held_to_its_byte_rate(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    frames, size = 40, 512 * 1024  # 20 MiB at 1 MiB/s after a 2 MiB burst
    settings = attrs.evolve(SETTINGS, warning_period=10)
    async with open_test_hub(settings=settings) as hub:
        calm_state = EdgeState()
        calm = await hub.connect("calm")
        hub.nursery.start_soon(run_auto_ack_edge, calm, calm_state)
        big = await hub.connect("big")
        started = trio.current_time()

        async def send_big() -> None:
            for n in range(frames):
                await big.send(report("big", n, size))

        with trio.fail_after(600):
            hub.nursery.start_soon(send_big)
            await trio.sleep(2)
            delay = await calm_edge_gets(hub, calm_state, "during-big", 1)
            while sum(node == "big" for node, _ in hub.store.reports) < frames:  # noqa: ASYNC110
                await trio.sleep(0.1)
        elapsed = trio.current_time() - started
    assert elapsed >= (frames * size - 2 * 1024 * 1024) / (1024 * 1024) * 0.95
    assert delay < 1.0
    assert len([1 for node, _ in hub.store.reports if node == "big"]) == frames
    assert limited(hub, "upstream-bytes") >= frames - 5
    # About 18 s of throttling with a 10 s period: two lines, not one per frame.
    assert 1 <= warnings_about(caplog, "big", "upstream-bytes") <= 2


async def test_an_edge_that_never_acks_is_bounded_logged_once_and_counted(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = attrs.evolve(SETTINGS, ack_timeout=5, ack_max_sends=5, reconcile_interval=0)
    async with open_test_hub(settings=settings) as hub:
        calm_state = EdgeState()
        calm = await hub.connect("calm")
        hub.nursery.start_soon(run_auto_ack_edge, calm, calm_state)
        silent_state = EdgeState()
        silent = await hub.connect("silent")
        hub.nursery.start_soon(
            lambda: run_auto_ack_edge(silent, silent_state, ack=lambda message: False)
        )
        with trio.fail_after(3600):
            for rv in range(1, 4):
                for name in ("a", "b", "c"):
                    await hub.publish(object_message("silent", "ConfigMap", name, rv=rv))
            await trio.sleep(100)
            delay = await calm_edge_gets(hub, calm_state, "while-silent", 1)
        queue_depth = len(hub.hub.nodes["silent"].queue)
    assert delay < 1.0
    assert queue_depth <= 3  # one slot per object, whatever the number of changes
    assert limited(hub, "no-ack") >= 3
    # Three objects give up after 25 s each, one after the other, over 100 s: one line per
    # 60 s period, the second counting those held back.
    assert warnings_about(caplog, "silent", "no ACK") == 2
    assert "(2 more since the last such line)" in caplog.text


async def test_a_certificate_of_another_node_is_counted_and_logged_once_or_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert = fuzz.material().client_cert_der  # CN system:node:edge-1
    legacy = fuzz.material().legacy_cert_der  # CN kubeedge.io, shared by a whole fleet
    async with open_test_hub(settings=SETTINGS) as hub:
        for _ in range(5):
            assert hub.hub.authenticate("edge-2", cert) is None  # authorization off: KubeEdge
        assert hub.hub.authenticate("edge-1", cert) is None
        assert hub.hub.authenticate("edge-3", legacy) is None
        assert limited(hub, "foreign-identity") == 5
        assert warnings_about(caplog, "edge-2", "certificate of node 'edge-1'") == 1
        assert warnings_about(caplog, "edge-3", "certificate") == 0
    strict = attrs.evolve(SETTINGS, authorization=True, authorization_debug=False)
    async with open_test_hub(settings=strict) as hub:
        assert hub.hub.authenticate("edge-2", cert) is not None
        assert hub.hub.authenticate("edge-1", cert) is None
