"""The admin endpoint's format, shared by the hub that answers (`hub.admin`) and the command
line that asks (`cli_get`): names, the announcement file, times, a pod report as an item.

A hub announces its endpoint in `<data dir>/run/admin-<pid>-<port>.json`
(`{"url": ..., "pid": ..., "store": ..., "started": ...}`) while it serves. Times in
answers are RFC 3339 UTC with milliseconds, `null` for never.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from trio_cloudhub.store.localdb import Report

API_VERSION = "trio-cloudhub/v1"
RUN_DIR = "run"  # under the data directory
FILE_PREFIX = "admin-"
CONNECTED = "Connected"
DISCONNECTED = "Disconnected"
NEVER_CONNECTED = "NeverConnected"


def rfc3339(ms: int) -> str | None:
    """Milliseconds since the epoch as RFC 3339 UTC; None for 0 (never)."""
    if ms <= 0:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def admin_file(data_dir: Path, port: int, pid: int | None = None) -> Path:
    """Where the process `pid` (this one by default) announces its endpoint on `port`."""
    pid = os.getpid() if pid is None else pid
    return Path(data_dir) / RUN_DIR / f"{FILE_PREFIX}{pid}-{port}.json"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return False
    return True


def announced_pid(path: Path) -> int | None:
    """The pid in an announcement file's name (`admin-<pid>-<port>.json`), or None."""
    parts = path.name.removeprefix(FILE_PREFIX).removesuffix(".json").split("-")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None


def client_host(bind_host: str) -> str:
    """Where a local client reaches a server bound to `bind_host` (any address: loopback)."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def admin_url(bind_host: str, port: int) -> str:
    host = client_host(bind_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def report_item(report: Report, hub: int | None) -> dict[str, Any]:
    """A pod status report (embedded store) as an item of `/admin/pods`."""
    return {
        "namespace": report.namespace,
        "name": report.name,
        "node": report.node,
        "status": report.summary,
        "reported": rfc3339(int(report.updated.timestamp() * 1000)),
        "hub": hub,
    }
