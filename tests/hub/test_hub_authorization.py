"""`modules.cloudHub.authorization` in the hub: status ownership enforced, counted, logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio.testing
from trio.testing import MockClock

from trio_cloudhub.config import parse_config
from trio_cloudhub.core import codec
from trio_cloudhub.core.message import Message, new_message
from trio_cloudhub.hub.hub import Hub, HubSettings
from trio_cloudhub.testing.hub import object_message, open_test_hub
from trio_cloudhub.testing.memory_store import MemoryStore

ENFORCING = HubSettings(authorization=True, authorization_debug=False)


def report(resource: str, content: Any) -> Message:
    return new_message(
        source="edged",
        group="meta",
        operation="update",
        resource=resource,
        content=content,
        now_ms=0,
    )


def node_status(name: str) -> Message:
    return report(f"default/nodestatus/{name}", {"UID": "u", "Status": {}, "ExtendResources": None})


def pod_status(name: str) -> Message:
    status = {"UID": f"uid-{name}", "Name": name, "Status": {"phase": "Running"}}
    return report(f"default/podstatus/{name}", status)


async def send_all(edge: Any, *messages: Message) -> None:
    for message in messages:
        await edge.send(codec.encode(message))
    await trio.testing.wait_all_tasks_blocked()


async def test_an_edge_reports_only_for_itself_and_its_pods(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_hub(settings=ENFORCING) as th:
        await th.publish(object_message("n1", "Pod", "mine", rv=1))
        await th.publish(object_message("n2", "Pod", "theirs", rv=2))
        edge = await th.connect("n1")
        with caplog.at_level(logging.WARNING, logger="trio_cloudhub.hub"):
            await send_all(
                edge,
                node_status("n1"),
                node_status("n2"),
                pod_status("mine"),
                pod_status("theirs"),
                pod_status("unknown"),
            )
        forwarded = [message.resource for _, message in th.store.reports]
        assert forwarded == ["default/nodestatus/n1", "default/podstatus/mine"]
        assert th.hub.stats["rejected:authorization"] == 3
        rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert len(rejected) == 3
        assert rejected[0].startswith("node n1: rejected update default/nodestatus/n2: ")
        assert "n1" in th.hub.sessions  # a rejected message does not end the session


async def test_debug_mode_logs_but_forwards(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = HubSettings(authorization=True, authorization_debug=True)
    async with open_test_hub(settings=settings) as th:
        edge = await th.connect("n1")
        with caplog.at_level(logging.WARNING, logger="trio_cloudhub.hub"):
            await send_all(edge, node_status("n2"))
        assert [m.resource for _, m in th.store.reports] == ["default/nodestatus/n2"]
        assert "would be rejected" in caplog.text
        assert th.hub.stats["rejected:authorization"] == 0


async def test_without_authorization_everything_is_forwarded_as_kubeedge_does(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_hub() as th:
        edge = await th.connect("n1")
        with caplog.at_level(logging.WARNING):
            await send_all(edge, node_status("n2"), pod_status("unknown"))
        assert len(th.store.reports) == 2
        assert caplog.records == []


def test_identity_check_follows_the_settings() -> None:
    enforcing = Hub(ENFORCING, MemoryStore())
    assert enforcing.authenticate("n1", None) is not None
    assert enforcing.stats["refused:identity"] == 1
    debug = Hub(HubSettings(authorization=True), MemoryStore())
    assert debug.authenticate("n1", None) is None
    assert Hub(HubSettings(), MemoryStore()).authenticate("n1", None) is None


def test_settings_come_from_the_config_file() -> None:
    text = """
modules:
  cloudHub:
    nodeLimit: 7
    authorization: {enable: true, debug: false}
trioCloudHub: {drainTimeoutSeconds: 9, reconcileIntervalSeconds: 0}
"""
    settings = HubSettings.from_config(parse_config(text, "t.yaml"))
    assert (settings.node_limit, settings.drain_timeout, settings.reconcile_interval) == (7, 9, 0)
    assert (settings.authorization, settings.authorization_debug) == (True, False)
