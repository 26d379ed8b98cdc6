"""Log lines as operators grep them: one line per event, `key=value` fields.

    time=2026-11-26T23:10:00.123Z level=INFO logger=trio_cloudhub.hub msg="node connected"
        node=edge-1 transport=websocket remote=10.0.0.7:53122       (one line, wrapped here)

The fields a call passes with `extra=` (node, transport, msg_id, reason, remote, operation,
resource) follow the message; values with spaces, quotes or `=` are quoted, newlines (e.g. in
tracebacks) escaped, so an event never spans lines. Verbosity follows klog's `-v`: up to 2 is
INFO (quiet in steady state: connects, disconnects, refusals, failures), 4 and above is DEBUG
(every message a node sends or receives, by route and id; never its content).
"""

from __future__ import annotations

import logging
import sys
import time

FIELDS = ("node", "transport", "remote", "msg_id", "operation", "resource", "reason")
DEBUG_VERBOSITY = 4


def level_for(verbosity: int | None, configured: str) -> int:
    """The logging level of klog verbosity `-v N` (None: the configured level name)."""
    if verbosity is None:
        return getattr(logging, configured.upper(), logging.INFO)
    return logging.DEBUG if verbosity >= DEBUG_VERBOSITY else logging.INFO


def quote(value: object) -> str:
    text = str(value)
    if text and not any(char in text for char in ' "=\n\r\t\\'):
        return text
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        text = text.replace(raw, escaped)
    return f'"{text}"'


class KeyValueFormatter(logging.Formatter):
    worker = ""  # `serve --workers N`: which worker process wrote the line

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname}",
            f"logger={record.name}",
            f"msg={quote(record.getMessage())}",
        ]
        if self.worker:
            parts.append(f"worker={self.worker}")
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value not in (None, ""):
                parts.append(f"{field}={quote(value)}")
        if record.exc_info:
            parts.append(f"exc={quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: int, *, worker: str = "") -> None:
    """Key=value lines on stderr at `level` (replaces any earlier set-up); `worker` adds a
    `worker=` field to every line."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = KeyValueFormatter()
    formatter.worker = worker
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party libraries stay at INFO even at -v=4: their debug output is not ours.
    for noisy in ("asyncio", "urllib3", "kubernetes", "aioquic", "quic", "hpack"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
