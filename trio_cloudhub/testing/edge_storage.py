"""What a real EdgeCore keeps of the cloud's messages: its metaManager's `meta` table.

EdgeCore's edgeHub hands every cloud message of group `resource` (v1.10 also `func`) whose
`parent_msg_id` is empty to metaManager, which keeps one row per key in SQLite (table `meta`,
columns key / type / value) and answers the cloud. The key is the message's resource as the
edge receives it (`<ns>/<type>/<name>`, `null/node/<n>` for the Node). The two lines differ
where it matters for delivery (read at tags v1.10.0 and v1.23.1 of kubeedge/kubeedge,
`edge/pkg/metamanager/process.go`, `dao/meta.go`, `dao/dbclient/meta.go`):

- `insert`: v1.10 `SaveMeta`, a plain INSERT: when a row with that key is already there,
  the duplicate-key error is *treated as success*: the row keeps its old value and the
  answer is still "OK". v1.23 `InsertOrUpdate` (INSERT OR REPLACE), "OK".
- `update` from edgecontroller or dynamiccontroller (v1.23 also devicecontroller,
  policycontroller): INSERT OR REPLACE, "OK", in both lines. From another source: stored
  the same way, no answer (v1.10 logs "unsupport message source").
- `delete`: v1.10 deletes the row with that key. v1.23 deletes a pod's row only when its
  value contains the pod's uid (`value LIKE %uid%`: a pod re-created under the same name
  survives the old one's delete), anything else by key. No row: still "OK", in both.
- other operations (`patch`, volume operations, unknown): not modelled, no answer.

A content that cannot be read (v1.23 pod delete whose content is not a pod) is answered with
the `error` operation instead of "OK" (`feedbackError`): the cloud sees no ACK. v1.10's
`NewErrorMessage` carries the request's own `parent_msg_id` (empty), v1.23's the request id.

The model is pure (no I/O, no clock): `MetaStore.handle` applies a message and returns the
answer EdgeCore would send, or None. It outlives connections, as the edge's database outlives
EdgeCore restarts: give the same store to every connection of a simulated edge.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from trio_cloudhub.core.message import (
    GROUP_RESOURCE,
    OP_DELETE,
    OP_ERROR,
    OP_INSERT,
    OP_UPDATE,
    Header,
    Message,
    Route,
    new_msg_id,
    object_metadata,
    response_to,
)

V1_10 = "v1.10"
V1_23 = "v1.23"
EDGECORE_LINES = (V1_10, V1_23)
OK = "OK"
METAMANAGER = "metaManager"
_UPDATE_SOURCES = {
    V1_10: frozenset({"edgecontroller", "dynamiccontroller"}),
    V1_23: frozenset(
        {"edgecontroller", "dynamiccontroller", "devicecontroller", "policycontroller"}
    ),
}
_META_GROUPS = {V1_10: frozenset({GROUP_RESOURCE, "func"}), V1_23: frozenset({GROUP_RESOURCE})}


class UnknownEdgeCoreLine(ValueError):
    """Only the v1.10 and v1.23 storage rules are modelled."""


@attrs.frozen(slots=True)
class MetaRow:
    """One row of EdgeCore's `meta` table: the resource type and the content as stored."""

    type: str
    value: Any
    text: str  # the value as JSON text, what `LIKE %uid%` searches


def resource_type_of(resource: str) -> str:
    """metaManager's `parseResource`: the type is the second of three tokens, the last of two."""
    tokens = resource.split("/")
    return tokens[1] if len(tokens) in (2, 3) else ""


class MetaStore:
    """EdgeCore's `meta` table under the rules of one EdgeCore line (module docstring)."""

    def __init__(self, line: str = V1_23) -> None:
        if line not in EDGECORE_LINES:
            raise UnknownEdgeCoreLine(f"unknown EdgeCore line {line!r}: use {EDGECORE_LINES}")
        self.line = line
        self.rows: dict[str, MetaRow] = {}
        self.ignored_inserts = 0  # v1.10: inserts answered "OK" that stored nothing

    def takes(self, message: Message) -> bool:
        """Whether edgeHub hands `message` to metaManager (not a sync answer, a meta group)."""
        return not message.header.parent_msg_id and message.route.group in _META_GROUPS[self.line]

    def handle(self, message: Message, now_ms: int = 0) -> Message | None:
        """Apply a cloud message (edge resource form); the answer EdgeCore sends, or None."""
        if not self.takes(message):
            return None
        operation = message.route.operation
        if operation == OP_INSERT:
            return self._insert(message, now_ms)
        if operation == OP_UPDATE:
            return self._update(message, now_ms)
        if operation == OP_DELETE:
            return self._delete(message, now_ms)
        return None

    def store_answer(self, resource: str, content: Any) -> None:
        """The answer to one of the edge's own queries is stored under the query's key."""
        self._put(resource, content)

    # --- reading ------------------------------------------------------------------------

    def get(self, resource: str) -> Any | None:
        """The stored content under `resource` (`<ns>/<type>/<name>`), or None."""
        row = self.rows.get(resource)
        return row.value if row is not None else None

    def resource_version(self, resource: str) -> str | None:
        """`metadata.resourceVersion` of the stored object, or None when nothing is stored."""
        value = self.get(resource)
        if value is None:
            return None
        version = object_metadata(value).get("resourceVersion")
        return str(version) if version is not None else ""

    def uid(self, resource: str) -> str | None:
        value = self.get(resource)
        return str(object_metadata(value).get("uid", "")) if value is not None else None

    def keys(self) -> Iterator[str]:
        return iter(self.rows)

    def objects(self) -> Mapping[str, Any]:
        """Every stored content by key."""
        return {key: row.value for key, row in self.rows.items()}

    def versions(self) -> dict[str, str]:
        """key -> stored resourceVersion, for comparing with what the cloud wants."""
        return {key: self.resource_version(key) or "" for key in self.rows}

    # --- the rules ----------------------------------------------------------------------

    def _insert(self, message: Message, now_ms: int) -> Message:
        resource = message.route.resource
        if self.line == V1_10 and resource in self.rows:
            self.ignored_inserts += 1  # SaveMeta: duplicate key is success, nothing written
        else:
            self._put(resource, message.content)
        return response_to(message, OK, now_ms)

    def _update(self, message: Message, now_ms: int) -> Message | None:
        self._put(message.route.resource, message.content)  # before the source is looked at
        if message.route.source not in _UPDATE_SOURCES[self.line]:
            return None
        return response_to(message, OK, now_ms)

    def _delete(self, message: Message, now_ms: int) -> Message:
        resource = message.route.resource
        if self.line == V1_23 and resource_type_of(resource) == "pod":
            content = message.content
            if content is not None and not isinstance(content, dict):
                return self._error(message, "failed to delete pod meta to DB: not a pod", now_ms)
            uid = str(object_metadata(content).get("uid", ""))
            row = self.rows.get(resource)
            if row is not None and uid in row.text:  # value LIKE %uid%
                del self.rows[resource]
        else:
            self.rows.pop(resource, None)
        return response_to(message, OK, now_ms)

    def _put(self, resource: str, content: Any) -> None:
        text = json.dumps(content, separators=(",", ":"), sort_keys=True)
        self.rows[resource] = MetaRow(type=resource_type_of(resource), value=content, text=text)

    def _error(self, message: Message, text: str, now_ms: int) -> Message:
        """`feedbackError`: operation `error`; the parent differs between the lines."""
        parent = message.header.parent_msg_id if self.line == V1_10 else message.msg_id
        header = Header(msg_id=new_msg_id(), timestamp=now_ms, parent_msg_id=parent)
        route = Route(
            source=METAMANAGER,
            group=message.route.group,
            operation=OP_ERROR,
            resource=message.route.resource,
        )
        return Message(header=header, route=route, content=text)
