"""Per-node bookkeeping that holds no memory while idle, and the heap trim after a burst of
sessions (hub.node, hub.trim)."""

from __future__ import annotations

import sys

import pytest
import trio
from trio.testing import MockClock

from trio_cloudhub.hub import hub as hub_module
from trio_cloudhub.hub import trim
from trio_cloudhub.hub.hub import HubSettings
from trio_cloudhub.hub.node import NodeEntry
from trio_cloudhub.testing.hub import open_test_hub


def test_marks_ahead_are_taken_once() -> None:
    entry = NodeEntry("edge-1")
    assert entry.take_mark("u1") is False
    entry.mark_ahead("u1")
    entry.mark_ahead("u2")
    assert entry.take_mark("u1") is True
    assert entry.take_mark("u1") is False
    assert entry.take_mark("u2") is True
    assert entry._marked is None  # no set kept once nothing is marked


def test_an_entry_has_no_instance_dict() -> None:
    assert not hasattr(NodeEntry("edge-1"), "__dict__")
    assert not hasattr(NodeEntry("edge-1").queue, "__dict__")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_memory_is_released_on_glibc() -> None:
    assert trim.release_free_memory() is True


async def test_heap_is_trimmed_once_a_burst_of_connects_is_over(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[float] = []
    monkeypatch.setattr(
        hub_module, "release_free_memory", lambda: trims.append(trio.current_time())
    )
    settings = HubSettings(node_limit=2 * trim.TRIM_AFTER_CHURN)
    with trio.fail_after(120):
        async with open_test_hub(settings=settings) as th:
            edges = [await th.connect(f"n{i}") for i in range(trim.TRIM_AFTER_CHURN - 1)]
            await trio.sleep(10 * trim.BURST_QUIET)
            assert trims == []  # not enough sessions started for a trim
            edges.append(await th.connect("last"))
            burst_end = trio.current_time()
            await trio.sleep(10 * trim.BURST_QUIET)
            assert len(trims) == 1 and trims[0] >= burst_end + trim.BURST_QUIET
            assert len(edges) == trim.TRIM_AFTER_CHURN


async def test_connections_that_never_became_sessions_count_for_the_trim(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood's connections (failed WebSocket handshakes, HTTPS connections) free what
    their handshakes took too: without a trim after them the hub's RSS stays at its peak."""
    trims: list[float] = []
    monkeypatch.setattr(
        hub_module, "release_free_memory", lambda: trims.append(trio.current_time())
    )
    with trio.fail_after(60):
        async with open_test_hub() as th:
            for index in range(trim.TRIM_AFTER_CHURN):
                if index % 2:
                    th.hub.handshake_failed("websocket", "timeout")
                else:
                    th.hub.connection_ended()
            burst_end = trio.current_time()
            await trio.sleep(10 * trim.BURST_QUIET)
            assert len(trims) == 1 and trims[0] >= burst_end + trim.BURST_QUIET
