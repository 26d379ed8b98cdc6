"""The network lab itself: private addresses only, everything removed, stale labs swept."""

from __future__ import annotations

import ipaddress
import os

import pytest

from trio_cloudhub.testing import netlab
from trio_cloudhub.testing.netlab import NetLab, run, sweep_stale

pytestmark = pytest.mark.netns


def links() -> str:
    return run(["ip", "-o", "link", "show"])


def test_lab_uses_only_its_own_private_addresses_and_removes_everything() -> None:
    host_addresses = run(["ip", "-4", "-o", "addr", "show"])
    lab = NetLab.create(2)
    try:
        network = lab.network
        assert network.is_private and network.subnet_of(ipaddress.ip_network("10.0.0.0/8"))
        assert str(network) not in host_addresses
        assert ipaddress.ip_address(lab.hub_address) in network
        for edge in lab.edges:
            assert ipaddress.ip_address(edge.address) in network
            assert edge.namespace in run(["ip", "netns", "list"])
            inside = run([*edge.exec_prefix(), "ip", "-4", "-o", "addr", "show"])
            assert f"inet {edge.address}/24" in inside
        assert lab.bridge in links()
    finally:
        lab.close()
    namespaces = run(["ip", "netns", "list"])
    assert all(edge.namespace not in namespaces for edge in lab.edges)
    assert lab.bridge not in links()


def dead_pid() -> int:
    for pid in range(4_000_000, 4_100_000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid found")


def test_sweep_removes_what_a_crashed_run_left_and_nothing_else() -> None:
    stale_id = netlab._base36(dead_pid(), 5) + "00"
    stale_ns = f"tch-{stale_id[:5]}-00-0"
    stale_bridge = f"tchb{stale_id}"
    run(["ip", "netns", "add", stale_ns])
    run(["ip", "link", "add", stale_bridge, "type", "bridge"])
    live = NetLab.create(1)  # creating a lab sweeps first: its own names must survive
    try:
        assert stale_ns not in run(["ip", "netns", "list"])
        assert stale_bridge not in links()
        assert sweep_stale() == []
        assert live.edges[0].namespace in run(["ip", "netns", "list"])
        assert live.bridge in links()
    finally:
        live.close()
        run(["ip", "netns", "delete", stale_ns], check=False)
        run(["ip", "link", "delete", stale_bridge], check=False)
