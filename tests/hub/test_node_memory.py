"""Per-node bookkeeping that holds no memory while idle (hub.node, hub.trim)."""

from __future__ import annotations

import sys

import pytest

from trio_cloudhub.hub import trim
from trio_cloudhub.hub.node import NodeEntry


def test_marks_ahead_are_taken_once() -> None:
    entry = NodeEntry("edge-1")
    assert entry.take_mark("u1") is False
    entry.mark_ahead("u1")
    entry.mark_ahead("u2")
    assert entry.take_mark("u1") is True
    assert entry.take_mark("u1") is False
    assert entry.take_mark("u2") is True
    assert entry.marked_ahead == set()


def test_marked_ahead_set_is_shared_with_the_methods() -> None:
    entry = NodeEntry("edge-1")
    entry.marked_ahead.add("u1")  # in place, as a caller of the set does
    assert "u1" in entry.marked_ahead
    assert entry.take_mark("u1") is True
    entry.mark_ahead("u2")
    entry.marked_ahead.discard("u2")
    assert entry.take_mark("u2") is False


def test_an_entry_has_no_instance_dict() -> None:
    assert not hasattr(NodeEntry("edge-1"), "__dict__")
    assert not hasattr(NodeEntry("edge-1").queue, "__dict__")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_memory_is_released_on_glibc() -> None:
    assert trim.release_free_memory() is True
