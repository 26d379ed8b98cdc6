"""Network namespaces for fault tests: edges behind veth pairs, faults with nftables and tbf.

`NetLab.create(edges)` builds, in the host's network namespace, a bridge `tchb<run>` with the
hub's address `.1` of a private /24 that no interface or route of the host uses, and per edge a
namespace `tch-<run>-<i>` whose `eth0` (`.2`, `.3`, ...) is one end of a veth pair, the other
end (`tchv<run><i>`) on the bridge. The hub binds the bridge's address; edges run inside their
namespace (`ip netns exec`). Nothing else of the host is touched: every address used is on
these interfaces, and `close()` removes them all.

Faults of edge i (`set_fault`) live where the edge's cable would be:
- drops and random loss: an nftables `netdev` table on the namespace's `eth0`, `ingress`
  (hub→edge) and `egress` (edge→hub). Netdev hooks see packets after the IP stack: the sending
  TCP believes they left (a local `output` drop would make the kernel report it to TCP).
  Only IPv4 is dropped: ARP keeps working, as behind a router whose far side is cut.
  The lab's links have GSO limited to one segment, so a packet is one wire-sized segment;
- bandwidth and delay: `tbf` on both ends of the veth (the edge's egress and the bridge
  port's egress toward the edge).

`<run>` is the owner's pid (base 36) and a counter, so `sweep_stale()` can remove what an
earlier crashed run left (names with our prefix whose pid no longer runs) without touching a
lab of a run still going.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

import attrs

PREFIX = "tch"
_NS_RE = re.compile(rf"^{PREFIX}-([0-9a-z]+)-([0-9a-z]+)-\d+$")
_LINK_RE = re.compile(rf"^{PREFIX}[bv]([0-9a-z]{{5}})([0-9a-z]{{2}})")
_counter = itertools.count()
COMMAND_TIMEOUT = 20.0
# Where the lab's /24 is taken from (10.200.0.0 - 10.249.255.0): private, and checked
# against every address and route of the host before use.
_FIRST_NET = int(ipaddress.IPv4Address("10.200.0.0"))
_NETS = 50 * 256


# One TCP segment per packet (no GSO super-packets of up to 64 KiB): a dropped packet is a
# lost segment on the wire, and a loss rate means what it says.
_WIRE_SIZED = ["gso_max_segs", "1"]


class NetLabError(Exception):
    """The lab cannot be built here (not root, a tool missing, a command failed)."""


def _base36(value: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(width):
        value, digit = divmod(value, 36)
        out = digits[digit] + out
    return out


def run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run one command; NetLabError with its output when it fails."""
    try:
        done = subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetLabError(f"{' '.join(args)}: {exc}") from None
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise NetLabError(f"{' '.join(args)} exited with {done.returncode}: {output}")
    return done.stdout


def check_prerequisites() -> None:
    """Raise NetLabError saying what is missing: root, `ip`, `tc`, `nft`, namespaces."""
    if os.geteuid() != 0:
        raise NetLabError("network namespaces need root (run the tests as root, as CI does)")
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        raise NetLabError(
            f"missing tools: {', '.join(missing)} (apt-get install iproute2 nftables; "
            ".ci/run installs them)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces and links with our prefix whose owning process is gone."""
    removed: list[str] = []
    for line in run(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_RE.match(name)
        if match and not _pid_alive(int(match.group(1), 36)):
            run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _LINK_RE.match(name)
        if match and not _pid_alive(int(match.group(1), 36)):
            run(["ip", "link", "delete", name], check=False)
            removed.append(name)
    return removed


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    found: list[ipaddress.IPv4Network] = []
    for line in run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            found.append(ipaddress.IPv4Interface(match.group(1)).network)
    for line in run(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        try:
            found.append(ipaddress.IPv4Network(first, strict=False))
        except ValueError:
            continue
    return found


def _free_network(seed: int) -> ipaddress.IPv4Network:
    used = _networks_in_use()
    for step in range(_NETS):
        index = (seed + step) % _NETS
        candidate = ipaddress.IPv4Network((_FIRST_NET + index * 256, 24))
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetLabError("no free /24 in 10.200.0.0-10.249.255.0")


@attrs.frozen
class Fault:
    """What the cable of one edge does: loss in % per direction, or a drop of everything
    (one-way or both ways), optionally only for one TCP port of the edge (its old connection).
    """

    to_hub_loss: int = 0  # % of edge→hub IPv4 packets dropped (100: all)
    to_edge_loss: int = 0  # % of hub→edge IPv4 packets dropped
    edge_port: int = 0  # when set, only packets of this local TCP port of the edge

    @classmethod
    def partition(cls) -> Fault:
        return cls(100, 100)

    @classmethod
    def loss(cls, percent: int) -> Fault:
        return cls(percent, percent)


def _drop_rule(percent: int, port_match: str) -> str:
    """nft rules for one direction: count every IPv4 packet, then drop `percent` %."""
    if percent <= 0:
        return ""
    return f"meta protocol ip {port_match}counter\n    " + _drop(percent, port_match)


def _drop(percent: int, port_match: str) -> str:
    if percent >= 100:
        return f"meta protocol ip {port_match}counter drop"
    return f"meta protocol ip {port_match}numgen random mod 100 < {percent} counter drop"


@attrs.define
class EdgeNet:
    index: int
    namespace: str
    address: str
    host_link: str  # the bridge port of this edge's veth, in the host namespace
    fault: Fault = attrs.field(factory=Fault)
    shaped: bool = False

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the edge's namespace."""
        return ["ip", "netns", "exec", self.namespace]


@attrs.define
class NetLab:
    run_id: str
    bridge: str
    network: ipaddress.IPv4Network
    hub_address: str
    edges: list[EdgeNet] = attrs.field(factory=list)
    closed: bool = False

    @classmethod
    def create(cls, edge_count: int) -> NetLab:
        check_prerequisites()
        sweep_stale()
        count = next(_counter)
        run_id = _base36(os.getpid(), 5) + _base36(count, 2)
        network = _free_network(os.getpid() * 7 + count)
        hosts = list(itertools.islice(network.hosts(), edge_count + 1))
        lab = cls(
            run_id=run_id,
            bridge=f"{PREFIX}b{run_id}",
            network=network,
            hub_address=str(hosts[0]),
        )
        try:
            lab._build(hosts[1:])
        except BaseException:
            lab.close()
            raise
        return lab

    def _build(self, addresses: Sequence[ipaddress.IPv4Address]) -> None:
        prefix = self.network.prefixlen
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.hub_address}/{prefix}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, *_WIRE_SIZED, "up"])
        for index, address in enumerate(addresses):
            namespace = f"{PREFIX}-{self.run_id[:5]}-{self.run_id[5:]}-{index}"
            host_link = f"{PREFIX}v{self.run_id}{index}"
            run(["ip", "netns", "add", namespace])
            edge = EdgeNet(index, namespace, str(address), host_link)
            self.edges.append(edge)
            run(
                [
                    "ip",
                    "link",
                    "add",
                    host_link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    namespace,
                ]
            )
            run(["ip", "link", "set", host_link, "master", self.bridge, *_WIRE_SIZED, "up"])
            ns = ["ip", "-n", namespace]
            run([*ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
            run([*ns, "link", "set", "eth0", *_WIRE_SIZED, "up"])
            run([*ns, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Remove everything this lab created (idempotent; deleting a namespace deletes its
        veth pair, its nftables table and its qdiscs)."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for edge in self.edges:
            try:
                run(["ip", "netns", "delete", edge.namespace])
            except NetLabError as exc:
                errors.append(str(exc))
        try:
            run(["ip", "link", "delete", self.bridge])
        except NetLabError as exc:
            if "Cannot find device" not in str(exc):
                errors.append(str(exc))
        if errors:
            raise NetLabError("; ".join(errors))

    # --- faults -------------------------------------------------------------------------

    def set_fault(self, index: int, fault: Fault) -> None:
        """Replace edge `index`'s nftables rules by `fault` at once (one transaction)."""
        edge = self.edges[index]
        port_in = f"tcp dport {fault.edge_port} " if fault.edge_port else ""
        port_out = f"tcp sport {fault.edge_port} " if fault.edge_port else ""
        ingress = _drop_rule(fault.to_edge_loss, port_in)
        egress = _drop_rule(fault.to_hub_loss, port_out)
        script = (
            "add table netdev tchfault\n"
            "delete table netdev tchfault\n"
            "table netdev tchfault {\n"
            "  chain ingress {\n"
            '    type filter hook ingress device "eth0" priority 0; policy accept;\n'
            f"    {ingress}\n"
            "  }\n"
            "  chain egress {\n"
            '    type filter hook egress device "eth0" priority 0; policy accept;\n'
            f"    {egress}\n"
            "  }\n"
            "}\n"
        )
        run([*edge.exec_prefix(), "nft", "-f", "-"], stdin=script)
        edge.fault = fault

    def heal(self, index: int) -> None:
        self.set_fault(index, Fault())

    def shape(self, index: int, rate: str, *, burst: str = "4kb", latency: str = "100ms") -> None:
        """A `rate` link (tbf, e.g. "64kbit") in both directions of edge `index`'s cable."""
        edge = self.edges[index]
        tbf = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        run([*edge.exec_prefix(), "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf])
        run(["tc", "qdisc", "replace", "dev", edge.host_link, "root", *tbf])
        edge.shaped = True

    def unshape(self, index: int) -> None:
        edge = self.edges[index]
        run([*edge.exec_prefix(), "tc", "qdisc", "delete", "dev", "eth0", "root"], check=False)
        run(["tc", "qdisc", "delete", "dev", edge.host_link, "root"], check=False)
        edge.shaped = False

    def dropped(self, index: int) -> dict[str, int]:
        """Packets the current fault saw and dropped so far, per direction:
        {"to_edge": dropped, "to_edge_seen": all, "to_hub": ..., "to_hub_seen": ...}."""
        text = run([*self.edges[index].exec_prefix(), "nft", "-j", "list", "ruleset"])
        found = {"to_edge": 0, "to_edge_seen": 0, "to_hub": 0, "to_hub_seen": 0}
        for item in json.loads(text).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            direction = "to_edge" if rule.get("chain") == "ingress" else "to_hub"
            expressions = [e for e in rule.get("expr", []) if isinstance(e, dict)]
            drops = any("drop" in e for e in expressions)
            for expression in expressions:
                counter = expression.get("counter")
                if counter:
                    key = direction if drops else f"{direction}_seen"
                    found[key] += int(counter.get("packets", 0))
        return found

    def nft_counters(self, index: int) -> str:
        """The edge's rule set as nft prints it (for a failing test's message)."""
        return run([*self.edges[index].exec_prefix(), "nft", "list", "ruleset"], check=False)
