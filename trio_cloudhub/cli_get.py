"""`trio-cloudhub get nodes|pods`: ask the running hub(s), print like kubectl.

Where the answer comes from: the admin endpoint of every hub process serving the data
directory (`hub.admin`: each announces itself in `<data dir>/run/admin-<pid>-<port>.json`
while it runs), or the `--admin URL`s given. Answers of several processes are merged: a node
connected to any of them is connected (the newest session wins), otherwise the newest
record wins. Nothing is guessed: when no hub answers, that is the message (`get pods` of an
embedded store then reads what edges reported from the database, and says so).

Output: aligned columns (kubectl's three spaces), `-o wide` adds columns, `-o json|yaml`
prints the merged list with absolute times.
"""

from __future__ import annotations

import datetime
import http.client
import json
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from trio_cloudhub.admin_api import (
    API_VERSION,
    CONNECTED,
    FILE_PREFIX,
    NEVER_CONNECTED,
    RUN_DIR,
    process_alive,
    report_item,
)
from trio_cloudhub.store.localdb import DB_NAME, read_reports

REQUEST_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
NONE = "<none>"
UNKNOWN = "<unknown>"
OUTPUTS = ("wide", "json", "yaml")


class HubNotReachable(Exception):
    """No hub answered (not running, wrong data directory, endpoint unreachable)."""


@attrs.frozen
class Endpoint:
    url: str
    pid: int = 0  # 0: given on the command line


# --- finding the hubs -----------------------------------------------------------------------


def discover(data_dir: Path) -> list[Endpoint]:
    """The admin endpoints announced in `data_dir` by hub processes that still run."""
    if not data_dir.is_dir():
        raise HubNotReachable(
            f"data directory {data_dir} does not exist: pass the hub's --data-dir "
            "(or the --config it runs with)"
        )
    found: list[Endpoint] = []
    stale: list[int] = []
    run = data_dir / RUN_DIR
    for path in sorted(run.glob(f"{FILE_PREFIX}*.json")) if run.is_dir() else []:
        endpoint = _read_announcement(path)
        if endpoint is None:
            continue
        if process_alive(endpoint.pid):
            found.append(endpoint)
        else:
            stale.append(endpoint.pid)
    if not found:
        raise HubNotReachable(_not_running(data_dir, stale))
    return found


def _read_announcement(path: Path) -> Endpoint | None:
    try:
        with path.open("rb") as file:
            doc = json.loads(file.read(MAX_ANNOUNCEMENT_BYTES))
        url, pid = doc["url"], doc["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or not ours: skip it
    if not isinstance(url, str) or not isinstance(pid, int):
        return None
    return Endpoint(url, pid)


def _not_running(data_dir: Path, stale: Sequence[int]) -> str:
    text = f"no hub is running with data directory {data_dir}"
    if stale:
        pids = ", ".join(str(pid) for pid in stale)
        text += f" (left over from hubs that stopped without cleaning up: pid {pids})"
    elif not (data_dir / DB_NAME).exists() and not (data_dir / RUN_DIR).exists():
        text += " (it holds no hub database either: is it the right --data-dir?)"
    return (
        text + "; a running hub announces its admin endpoint in <data dir>/run/ when its "
        "metrics server (commonConfig.monitorServer.bindAddress) is up; or pass --admin URL"
    )


# --- asking them ----------------------------------------------------------------------------


def fetch(endpoint: Endpoint, path: str) -> dict[str, Any]:
    """GET `path` of one hub's admin endpoint; its JSON object."""
    parts = urllib.parse.urlsplit(endpoint.url)
    if parts.scheme != "http" or not parts.hostname:
        raise HubNotReachable(f"{endpoint.url}: not an http://host:port URL")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_ANSWER_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        who = f" (hub pid {endpoint.pid})" if endpoint.pid else ""
        raise HubNotReachable(f"cannot reach {endpoint.url}{who}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        text = body[:200].decode("utf-8", "replace").strip()
        raise HubNotReachable(f"{endpoint.url}{path} answered {response.status}: {text}")
    if len(body) > MAX_ANSWER_BYTES:
        raise HubNotReachable(f"{endpoint.url}{path}: answer above {MAX_ANSWER_BYTES} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise HubNotReachable(f"{endpoint.url}{path}: not a trio-cloudhub admin answer")
    doc["hub"] = {**(doc.get("hub") or {}), "url": endpoint.url}
    return doc


def merge_nodes(answers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One item per node: the process with its session (newest), else the newest record."""
    chosen: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for item in answer["items"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            previous = chosen.get(item["name"])
            if previous is None or _rank(item) > _rank(previous):
                chosen[item["name"]] = item
    return [chosen[name] for name in sorted(chosen)]


def _rank(item: dict[str, Any]) -> tuple[bool, str]:
    return item.get("status") == CONNECTED, str(item.get("since") or "")


def merge_pods(answers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for answer in answers:
        for item in answer["items"]:
            if not isinstance(item, dict):
                continue
            key = (str(item.get("namespace", "")), str(item.get("name", "")))
            previous = chosen.get(key)
            if previous is None or str(item.get("reported") or "") > str(
                previous.get("reported") or ""
            ):
                chosen[key] = item
    return [chosen[key] for key in sorted(chosen)]


# --- printing -------------------------------------------------------------------------------


def human_age(seconds: float) -> str:
    """kubectl's ages (apimachinery's HumanDuration): 45s, 3m20s, 15m, 5h3m, 2d4h, 3y."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if minutes < 10:
        return _pair(minutes, "m", whole % 60, "s")
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return _pair(hours, "h", minutes % 60, "m")
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return _pair(days, "d", hours % 24, "h")
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return _pair(days // 365, "y", days % 365, "d")
    return f"{days // 365}y"


def _pair(big: int, big_unit: str, small: int, small_unit: str) -> str:
    return f"{big}{big_unit}{small}{small_unit}" if small else f"{big}{big_unit}"


def age_of(stamp: Any, now: datetime.datetime, missing: str = NONE) -> str:
    if not stamp:
        return missing
    try:
        moment = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return UNKNOWN
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return human_age((now - moment).total_seconds())


Column = tuple[str, Callable[[dict[str, Any], datetime.datetime], str]]


def _text(key: str) -> Callable[[dict[str, Any], datetime.datetime], str]:
    return lambda item, now: str(item.get(key)) if item.get(key) not in (None, "") else NONE


def _age(key: str) -> Callable[[dict[str, Any], datetime.datetime], str]:
    return lambda item, now: age_of(item.get(key), now)


def _since(item: dict[str, Any], now: datetime.datetime) -> str:
    if item.get("status") == NEVER_CONNECTED:
        return NONE
    return age_of(item.get("since"), now, missing=UNKNOWN)  # a session whose end is unknown


NODE_COLUMNS: list[Column] = [
    ("NAME", _text("name")),
    ("STATUS", _text("status")),
    ("SINCE", _since),
    ("TRANSPORT", _text("transport")),
    ("REMOTE", _text("remote")),
    ("WAITING", lambda item, now: str(item.get("waiting", 0))),
    ("LAST-ACK", _age("lastAck")),
    ("LAST-KEEPALIVE", _age("lastKeepalive")),
]
NODE_WIDE: list[Column] = [
    ("BEHIND", lambda item, now: str(item.get("behind", 0))),
    ("IN-FLIGHT", _text("inFlight")),
    ("READY", _text("ready")),
    ("FIRST-CONNECTED", _age("firstConnected")),
    ("HUB", _text("hub")),
]
POD_COLUMNS: list[Column] = [
    ("NAMESPACE", _text("namespace")),
    ("NAME", _text("name")),
    ("NODE", _text("node")),
    ("STATUS", _text("status")),
    ("REPORTED", _age("reported")),
]
POD_WIDE: list[Column] = [("HUB", _text("hub"))]


def table(
    items: Sequence[dict[str, Any]], columns: Sequence[Column], now: datetime.datetime
) -> str:
    rows = [[name for name, _ in columns]]
    rows += [[cell(item, now) for _, cell in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


def render(
    what: str,
    items: list[dict[str, Any]],
    hubs: list[dict[str, Any]],
    output: str | None,
    now: datetime.datetime | None = None,
) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    kind = "NodeList" if what == "nodes" else "PodList"
    if output in ("json", "yaml"):
        doc = {"apiVersion": API_VERSION, "kind": kind, "hubs": hubs, "items": items}
        if output == "json":
            return json.dumps(doc, indent=4) + "\n"
        return str(yaml.safe_dump(doc, sort_keys=False))
    columns, wide = (NODE_COLUMNS, NODE_WIDE) if what == "nodes" else (POD_COLUMNS, POD_WIDE)
    return table(items, [*columns, *wide] if output == "wide" else columns, now)


# --- the command ----------------------------------------------------------------------------


def _ask(path: str, data_dir: Path, admin_urls: Sequence[str]) -> list[dict[str, Any]]:
    """Every hub's answer. Of the hubs found in the data directory, one that does not
    answer is left out with a warning when others answer (its process may be ending);
    endpoints given with --admin must all answer."""
    if admin_urls:
        return [fetch(Endpoint(url), path) for url in admin_urls]
    answers: list[dict[str, Any]] = []
    failures: list[str] = []
    for endpoint in discover(data_dir):
        try:
            answers.append(fetch(endpoint, path))
        except HubNotReachable as exc:
            failures.append(str(exc))
    if not answers:
        raise HubNotReachable("; ".join(failures))
    for failure in failures:
        print(f"trio-cloudhub: warning: left out: {failure}", file=sys.stderr)
    return answers


def get(
    what: str,
    data_dir: Path,
    *,
    store_kind: str,
    admin_urls: Sequence[str] = (),
    output: str | None = None,
) -> str:
    """What `trio-cloudhub get nodes|pods` prints; HubNotReachable when no hub answers."""
    try:
        answers = _ask(f"/admin/{what}", data_dir, admin_urls)
    except HubNotReachable as exc:
        if (
            what != "pods"
            or store_kind != "local"
            or admin_urls
            or not (data_dir / DB_NAME).exists()
        ):
            raise
        print(
            f"trio-cloudhub: {exc}\nshowing the pod reports stored in the database", file=sys.stderr
        )
        items = [report_item(report, None) for report in read_reports(data_dir, "pods")]
        return render(what, items, [], output)
    merge = merge_nodes if what == "nodes" else merge_pods
    return render(what, merge(answers), [answer["hub"] for answer in answers], output)
