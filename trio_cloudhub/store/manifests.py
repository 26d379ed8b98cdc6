"""Reading the manifests folder: files of Kubernetes-style objects in YAML or JSON.

Pure functions run in a worker thread by the local store. A file is read only when its stamp
(mtime, size, inode, ctime) changed; it yields either the full list of its supported objects
or one error for the whole file, so the store can keep the last good objects of a broken file.
Rules for one document:
- `kind: List` (apiVersion v1) is expanded into its `items`;
- kinds other than v1 Node, Pod, ConfigMap, Secret are skipped with a warning;
- a document that is not a mapping, or has no valid `metadata.name`, fails the whole file;
- the fields the store owns (uid, resourceVersion, creationTimestamp, ...) are dropped, the
  namespace defaults to "default" for namespaced kinds, Secret `stringData` is folded into
  base64 `data` as the API server does.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

MAX_FILE_BYTES = 4 * 1024 * 1024
# Bounds on the parsed value: YAML aliases can expand a small file into a huge tree.
MAX_NODES_PER_FILE = 1_000_000
MAX_CHARS_PER_FILE = 16 * 1024 * 1024
SUFFIXES = (".yaml", ".yml", ".json")
API_VERSION = "v1"
# kind -> namespaced
SUPPORTED_KINDS: Mapping[str, bool] = {
    "Node": False,
    "Pod": True,
    "ConfigMap": True,
    "Secret": True,
}
DEFAULT_NAMESPACE = "default"
# Metadata the store fills or that would change the meaning of a message (deletionTimestamp
# turns any message into a delete on the hub side).
OWNED_METADATA = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
)
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """A file (or the document in it) that cannot be used; the message says why."""


@attrs.frozen(slots=True, order=True)
class ObjectKey:
    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str


@attrs.frozen(slots=True)
class FileStamp:
    mtime_ns: int
    size: int
    inode: int
    ctime_ns: int


@attrs.frozen(slots=True, eq=False)
class Manifest:
    """One normalised object as the user wrote it, before the store fills uid and versions."""

    key: ObjectKey
    doc: dict[str, Any]
    text: str  # canonical JSON of `doc`: equal text means unchanged content


@attrs.frozen(slots=True)
class FileResult:
    name: str
    stamp: FileStamp
    manifests: tuple[Manifest, ...] = ()
    warnings: tuple[str, ...] = ()
    error: str = ""
    unstable: bool = False  # changed while being read: try again at the next poll


# --- the folder -----------------------------------------------------------------------------


def is_manifest_name(name: str) -> bool:
    """A name the store reads: dot names are editor files and a mounted ConfigMap's links."""
    return not name.startswith(".") and name.endswith(SUFFIXES)


def changes_manifests(name: str) -> bool:
    """A change of this name may change what the folder holds (a ConfigMap volume switches
    its `..data` link; its visible files are links through it and never change)."""
    return is_manifest_name(name) or name == "..data"


def stamp_folder(folder: Path) -> dict[str, FileStamp]:
    """Stamps of the manifest files directly in `folder` (dot files skipped)."""
    stamps: dict[str, FileStamp] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if not is_manifest_name(entry.name):
                continue
            try:
                if entry.is_file():
                    stamps[entry.name] = _stamp(entry.stat())
            except OSError:
                continue  # vanished between listing and stat
    return stamps


def _stamp(info: os.stat_result) -> FileStamp:
    return FileStamp(info.st_mtime_ns, info.st_size, info.st_ino, info.st_ctime_ns)


def read_manifest_file(folder: Path, name: str, stamp: FileStamp) -> FileResult:
    """Read and parse one file; every failure becomes `FileResult.error`."""
    path = folder / name
    if stamp.size > MAX_FILE_BYTES:
        return FileResult(name, stamp, error=f"file is larger than {MAX_FILE_BYTES} bytes")
    try:
        data, opened = _read_regular_file(path)
        after = _stamp(path.stat())
    except _NotRegular as exc:
        return FileResult(name, stamp, error=str(exc))
    except FileNotFoundError:
        # Removed (or replaced) since the listing: the next scan sees what is there now.
        return FileResult(name, stamp, unstable=True)
    except OSError as exc:
        return FileResult(name, stamp, error=f"cannot read: {exc.strerror or exc}")
    if after != stamp or opened != stamp:
        return FileResult(name, after, unstable=True)
    if len(data) > MAX_FILE_BYTES:
        return FileResult(name, stamp, error=f"file is larger than {MAX_FILE_BYTES} bytes")
    try:
        manifests, warnings = parse_manifest_bytes(data, json_format=name.endswith(".json"))
    except ManifestError as exc:
        return FileResult(name, stamp, error=str(exc))
    return FileResult(name, stamp, manifests=tuple(manifests), warnings=tuple(warnings))


class _NotRegular(OSError):
    pass


def _read_regular_file(path: Path) -> tuple[bytes, FileStamp]:
    """At most MAX_FILE_BYTES + 1 bytes of the regular file at `path`, and its stamp when opened.

    The name was a regular file when listed, but it may since have been replaced by (or a
    symlink re-pointed to) a FIFO, which a plain open() would wait on forever, or a device
    like /dev/zero: opened without blocking and checked on the open descriptor itself.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NotRegular(f"not a regular file (mode {stat.filemode(info.st_mode)})")
        chunks: list[bytes] = []
        left = MAX_FILE_BYTES + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), _stamp(info)
    finally:
        os.close(fd)


# --- parsing --------------------------------------------------------------------------------


def parse_manifest_bytes(data: bytes, *, json_format: bool) -> tuple[list[Manifest], list[str]]:
    """All supported objects of a file and warnings for the skipped ones; ManifestError else."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text: {exc}") from None
    budget = _Budget.for_text(text)
    manifests: list[Manifest] = []
    warnings: list[str] = []
    seen: set[ObjectKey] = set()
    for index, raw in _documents(text, json_format, budget):
        for doc in _expand_lists(raw, index):
            manifest = normalise_document(doc, index, warnings)
            if manifest is None:
                continue
            if manifest.key in seen:
                raise ManifestError(f"document {index}: {describe_key(manifest.key)} appears twice")
            seen.add(manifest.key)
            manifests.append(manifest)
    return manifests, warnings


def _documents(text: str, json_format: bool, budget: _Budget) -> Iterator[tuple[int, Any]]:
    """(1-based position, plain JSON value) of every non-empty document, size-bounded."""
    try:
        if json_format:
            value = json.loads(text)
            docs: Iterator[Any] = iter(value if isinstance(value, list) else [value])
        else:
            docs = yaml.load_all(text, Loader=_Loader)  # a safe loader (CSafeLoader)
        for index, doc in enumerate(docs, start=1):
            if doc is not None:
                yield index, _plain(doc, budget)
    except ManifestError:
        raise
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(f"invalid YAML: {_one_line(str(exc))}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ManifestError(f"invalid {'JSON' if json_format else 'YAML'}: {exc}") from None
    except RecursionError:
        raise ManifestError("document is nested too deeply") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


@attrs.define
class _Budget:
    """Without aliases a value has fewer nodes than its text has characters, and about as many
    characters: the bounds grow with the text, so an alias bomb costs work in proportion to
    its own (small) size, not to MAX_NODES_PER_FILE."""

    max_nodes: int = MAX_NODES_PER_FILE
    max_chars: int = MAX_CHARS_PER_FILE
    nodes: int = 0
    chars: int = 0

    @classmethod
    def for_text(cls, text: str) -> _Budget:
        size = len(text)
        return cls(
            max_nodes=min(MAX_NODES_PER_FILE, max(10_000, size)),
            max_chars=min(MAX_CHARS_PER_FILE, 4 * size + 64 * 1024),
        )

    def spend(self, nodes: int, chars: int) -> None:
        self.nodes += nodes
        self.chars += chars
        if self.nodes > self.max_nodes or self.chars > self.max_chars:
            raise ManifestError("file expands to too large a value (YAML aliases?)")


def _plain(value: Any, budget: _Budget) -> Any:
    """The value as JSON types (dates to RFC 3339 text, binary to base64), size-bounded."""
    budget.spend(1, 0)
    if isinstance(value, str):
        budget.spend(0, len(value))
        return _valid_text(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError(f"number {value} cannot be represented in JSON")
        return value
    if isinstance(value, dict):
        return {_plain_key(key, budget): _plain(item, budget) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, budget) for item in value]
    return _plain_scalar(value, budget)


def _plain_key(key: Any, budget: _Budget) -> str:
    # Go's YAML-to-JSON conversion turns scalar keys into their text.
    if isinstance(key, bool):
        text = "true" if key else "false"
    elif isinstance(key, str):
        text = _valid_text(key)
    elif isinstance(key, int | float):
        text = str(key)
    else:
        raise ManifestError(f"mapping key of type {type(key).__name__} is not allowed")
    budget.spend(0, len(text))
    return text


def _valid_text(text: str) -> str:
    """`text` with lone surrogates (JSON's `"\\ud800"`) made U+FFFD, as Go's decoder does:
    they cannot be encoded as UTF-8, so SQLite and every edge would refuse the object."""
    if text.isascii():
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def _plain_scalar(value: Any, budget: _Budget) -> str:
    text: str
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        text = value.isoformat(timespec="seconds") + "Z"
    elif isinstance(value, datetime.date):
        text = value.isoformat()
    elif isinstance(value, bytes):
        text = base64.b64encode(value).decode("ascii")
    else:
        raise ManifestError(f"value of type {type(value).__name__} is not allowed")
    budget.spend(0, len(text))
    return text


def _expand_lists(doc: Any, index: int) -> list[Any]:
    if isinstance(doc, dict) and doc.get("kind") == "List" and doc.get("apiVersion") == "v1":
        items = doc.get("items")
        if not isinstance(items, list):
            raise ManifestError(f"document {index}: List without an items list")
        return list(items)
    return [doc]


# --- one document ---------------------------------------------------------------------------


def normalise_document(doc: Any, index: int, warnings: list[str]) -> Manifest | None:
    """The supported object in `doc`, None (with a warning) for other kinds; else raises."""
    if not isinstance(doc, dict):
        raise ManifestError(f"document {index} is not a mapping")
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    # `kind: {a: b}` is a mapping: not hashable, so not looked up.
    if not isinstance(kind, str) or kind not in SUPPORTED_KINDS or api_version != API_VERSION:
        warnings.append(f"document {index}: skipping unsupported kind {api_version}/{kind}")
        return None
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or "name" not in metadata:
        raise ManifestError(f"document {index} ({kind}) has no metadata.name")
    key = _object_key(str(kind), metadata, index)
    body = _body(key, doc, metadata)
    if key.kind == "Secret":
        _fold_string_data(body, index)
    if key.kind == "Pod":
        _check_node_name(body, index)
    return make_manifest(key, body)


def _object_key(kind: str, metadata: dict[str, Any], index: int) -> ObjectKey:
    name = metadata.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise ManifestError(f"document {index} ({kind}): invalid metadata.name {name!r}")
    if not SUPPORTED_KINDS[kind]:
        return ObjectKey(kind, "", name)
    namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(namespace, str) or not valid_namespace(namespace):
        raise ManifestError(f"document {index} ({kind} {name}): invalid namespace {namespace!r}")
    return ObjectKey(kind, namespace, name)


def _body(key: ObjectKey, doc: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """kind, apiVersion, metadata first (Go's field order), then the rest as written."""
    meta: dict[str, Any] = {"name": key.name}
    if key.namespace:
        meta["namespace"] = key.namespace
    for field, value in metadata.items():
        if field not in meta and field != "namespace" and field not in OWNED_METADATA:
            meta[field] = value
    body: dict[str, Any] = {"kind": key.kind, "apiVersion": API_VERSION, "metadata": meta}
    for field, value in doc.items():
        if field not in body:
            body[field] = value
    return body


def _fold_string_data(body: dict[str, Any], index: int) -> None:
    data = body.get("data") or {}
    string_data = body.pop("stringData", None) or {}
    if not isinstance(data, dict) or not isinstance(string_data, dict):
        raise ManifestError(f"document {index}: Secret data and stringData must be mappings")
    merged = dict(data)
    for field, value in string_data.items():
        if not isinstance(value, str):
            raise ManifestError(f"document {index}: Secret stringData.{field} is not a string")
        merged[field] = base64.b64encode(value.encode("utf-8")).decode("ascii")
    if merged:
        body["data"] = merged
    body.setdefault("type", "Opaque")


def _check_node_name(body: dict[str, Any], index: int) -> None:
    spec = body.get("spec")
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    if node is not None and (not isinstance(node, str) or not (node == "" or valid_name(node))):
        raise ManifestError(f"document {index}: invalid spec.nodeName {node!r}")


def make_manifest(key: ObjectKey, doc: dict[str, Any]) -> Manifest:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Manifest(key=key, doc=doc, text=text)


def manifest_from_text(key: ObjectKey, text: str) -> Manifest:
    """A manifest stored earlier (canonical JSON); ManifestError when it does not load."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"stored manifest of {describe_key(key)} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"stored manifest of {describe_key(key)} is not an object")
    return make_manifest(key, doc)


def valid_name(name: str) -> bool:
    """A DNS-1123 subdomain: also guarantees no `/`, which would break resource strings."""
    return len(name) <= 253 and _SUBDOMAIN.fullmatch(name) is not None


def valid_namespace(namespace: str) -> bool:
    return len(namespace) <= 63 and _LABEL.fullmatch(namespace) is not None


def describe_key(key: ObjectKey) -> str:
    where = f"{key.namespace}/" if key.namespace else ""
    return f"{key.kind} {where}{key.name}"


# --- the folder as a whole ------------------------------------------------------------------


def merge_files(
    files: Mapping[str, Sequence[Manifest]],
) -> tuple[dict[ObjectKey, tuple[str, Manifest]], list[str]]:
    """Every object with the file defining it; the first file by name wins a conflict."""
    merged: dict[ObjectKey, tuple[str, Manifest]] = {}
    conflicts: list[str] = []
    for name in sorted(files):
        for manifest in files[name]:
            owner = merged.get(manifest.key)
            if owner is not None:
                conflicts.append(
                    f"{describe_key(manifest.key)} is defined in {owner[0]} and {name}; "
                    f"using {owner[0]}"
                )
                continue
            merged[manifest.key] = (name, manifest)
    return merged, conflicts
