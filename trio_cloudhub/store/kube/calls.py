"""One blocking `kubernetes` client call, its answer read raw with a size bound.

Raw answers (`_preload_content=False`) skip the client's model objects, which are slow and
drop fields they do not know. Failures of every kind become `KubeCallError`: an HTTP status
from the API server, or `status=None` when there was no answer (network, TLS, timeout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from trio_cloudhub.pki.kube_secrets import status_message

# (connect, read) seconds: a hung API server must not hold a worker thread forever.
REQUEST_TIMEOUT = (10.0, 30.0)
MAX_ANSWER_BYTES = 8 * 1024 * 1024
READ_CHUNK = 64 * 1024


class KubeCallError(Exception):
    """An API call that failed: `status` None means no HTTP answer (network, TLS, timeout)."""

    def __init__(self, status: int | None, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{status or 'no answer'}: {status_message(body)}")

    @property
    def reason(self) -> str:
        """The Status `reason` (NotFound, AlreadyExists, Conflict ...), or ""."""
        try:
            status = json.loads(self.body)
        except ValueError:
            return ""
        reason = status.get("reason") if isinstance(status, dict) else None
        return reason if isinstance(reason, str) else ""


def call_raw(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One client call returning the raw urllib3 response; failures become KubeCallError."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return function(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as exc:
        raw: Any = exc.body
        body = raw.encode("utf-8", "replace") if isinstance(raw, str) else bytes(raw or b"")
        raise KubeCallError(exc.status or None, body or str(exc.reason).encode()) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeCallError(None, str(exc).encode("utf-8", "replace")) from None


def read_body(response: Any, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """At most `limit + 1` bytes, so an oversized answer is refused without reading it all."""
    import urllib3

    chunks: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            chunk = response.read(min(READ_CHUNK, limit + 1 - size))
            if not chunk:
                response.release_conn()
                break
            chunks.append(chunk)
            size += len(chunk)
        else:
            response.close()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        response.close()
        raise KubeCallError(None, str(exc).encode("utf-8", "replace")) from None
    return b"".join(chunks)


def call_json(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One call, its JSON answer parsed (None for an empty one); bounded in size."""
    return _parsed(read_body(call_raw(function, *args, **kwargs)))


class RawApi:
    """Requests straight through the client's connection pool, for hot paths.

    The generated API methods validate and serialise every argument (pydantic), which costs
    more CPU than the request itself; the ack-point writes send thousands of tiny requests,
    so they build path and body themselves. TLS, client certificates and the bearer token
    (refreshed by the client's hook) are the `ApiClient`'s own.
    """

    def __init__(self, api_client: Any) -> None:
        self._configuration = api_client.configuration
        self._pool = api_client.rest_client.pool_manager

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: str = "",
    ) -> Any:
        """One request; the JSON answer (None when empty); KubeCallError on failure."""
        import urllib3

        headers = {"Accept": "application/json", **self._auth_headers()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        url = self._configuration.host.rstrip("/") + path + (f"?{query}" if query else "")
        timeout = urllib3.Timeout(connect=REQUEST_TIMEOUT[0], read=REQUEST_TIMEOUT[1])
        try:
            response = self._pool.request(
                method,
                url,
                body=data,
                headers=headers,
                preload_content=False,
                timeout=timeout,
                retries=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeCallError(None, str(exc).encode("utf-8", "replace")) from None
        answer = read_body(response)
        if not 200 <= response.status < 300:
            raise KubeCallError(response.status, answer)
        return _parsed(answer)

    def _auth_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for setting in self._configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers


def _parsed(data: bytes) -> Any:
    if len(data) > MAX_ANSWER_BYTES:
        raise KubeCallError(None, f"answer larger than {MAX_ANSWER_BYTES} bytes".encode())
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise KubeCallError(None, f"answer is not JSON: {exc}".encode()) from None
