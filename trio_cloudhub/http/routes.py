"""What the HTTPS service answers (spec 7.4, 7.5), as a function of a parsed request.

No sockets here: `server.py` parses HTTP and TLS and awaits `CertificateService.handle`.
Status codes follow KubeEdge NEW, except that a bad certificate request is 400 (NEW: 500).
`GET /node/{name}` (v1.20+, `keadm join` refuses a name that exists) asks the cloud side,
with no authentication, as CloudCore's `CheckNode`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NoReturn, Protocol

import attrs

from trio_cloudhub.pki.certs import CertAndKey
from trio_cloudhub.pki.client_cert import (
    ClientCertError,
    check_node_subject,
    verify_rotation_cert,
)
from trio_cloudhub.pki.csr import CsrError, EdgeCsr, parse_csr, parse_ext_key_usages, sign_csr
from trio_cloudhub.pki.token import TokenError, TokenKeeper

logger = logging.getLogger("trio_cloudhub.http")

DER_TYPE = "application/octet-stream"
TEXT_TYPE = "text/plain; charset=utf-8"


@attrs.frozen
class Request:
    method: str
    path: str
    # Lower-case names, in arrival order (a name may repeat).
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # DER of the certificate the TLS peer presented, if any.
    peer_cert: bytes | None = None

    def header(self, name: str) -> str | None:
        """The first value of a header, matched case-insensitively (Go's `Header.Get`)."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


class NodeDirectory(Protocol):
    """What the service asks the cloud side about nodes (the store)."""

    def node_known(self, name: str) -> bool:
        """Whether a node of that name exists; raises when the cloud side cannot tell."""
        ...

    async def node_joined(self, name: str) -> None:
        """A certificate was issued for node `name` (the embedded store remembers it)."""
        ...


def text(status: int, message: str) -> Response:
    return Response(status, message.encode("utf-8"))


class _Refused(Exception):
    """Ends a request early with a ready response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class CertificateService:
    """`/ca.crt`, `/edge.crt`, `/readyz`, `/livez`."""

    def __init__(
        self,
        ca: CertAndKey,
        tokens: TokenKeeper,
        signing_days: int,
        *,
        clock: Callable[[], datetime],
        ready_check: Callable[[], bool] | None = None,
        nodes: NodeDirectory | None = None,
    ) -> None:
        self._ca = ca
        self._nodes = nodes
        self._tokens = tokens
        self._signing_days = signing_days
        self._clock = clock
        self._ready_check = ready_check
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/ca.crt": self._ca_crt,
            "/edge.crt": self._edge_crt,
            "/readyz": self._readyz,
            "/livez": self._livez,
        }

    async def handle(self, request: Request) -> Response:
        route = self._route(request.path)
        if route is None:
            return text(404, "404 page not found")
        if request.method != "GET":
            return attrs.evolve(text(405, "method not allowed"), headers=(("Allow", "GET"),))
        try:
            return await route(request)
        except _Refused as refused:
            return refused.response

    def _route(self, path: str) -> Callable[[Request], Awaitable[Response]] | None:
        prefix, _, name = path.partition("/node/")
        if not prefix and name and "/" not in name and self._nodes is not None:
            return self._check_node
        return self._routes.get(path)

    async def _ca_crt(self, request: Request) -> Response:
        return Response(200, self._ca.cert_der, DER_TYPE)

    async def _livez(self, request: Request) -> Response:
        return text(200, "ok")

    async def _readyz(self, request: Request) -> Response:
        ready = self._ready_check is None or self._ready_check()
        return text(200, "ok") if ready else text(503, "not ready")

    async def _check_node(self, request: Request) -> Response:
        """CloudCore's `CheckNode` answers, word for word ("founded" included)."""
        assert self._nodes is not None
        name = request.path.removeprefix("/node/")
        try:
            known = self._nodes.node_known(name)
        except Exception as exc:  # the cloud side failed: any kind of failure, one answer
            logger.warning("GET /node/%s: cannot query the node: %s", name, exc)
            return text(500, "Failed to query node information")
        return text(200, "Node founded") if known else text(404, "Node not found")

    async def _edge_crt(self, request: Request) -> Response:
        node_name = request.header("NodeName") or ""
        now = self._clock()
        rotating = self._authorize(request, node_name, now)
        try:
            usages = parse_ext_key_usages(request.header("ExtKeyUsages"))
            csr = parse_csr(request.body)
            if rotating:
                self._check_rotation_csr(csr, node_name)
            cert = sign_csr(csr, self._ca, now, self._signing_days, usages)
        except CsrError as exc:
            logger.warning("refused certificate request from node %r: %s", node_name, exc)
            return text(400, str(exc))
        logger.info(
            "issued certificate CN=%r for node %r (%s)",
            csr.common_name,
            node_name,
            "rotation" if rotating else "token",
        )
        if self._nodes is not None and node_name:
            await self._record_joined(node_name)
        return Response(200, cert, DER_TYPE)

    async def _record_joined(self, node_name: str) -> None:
        assert self._nodes is not None
        try:
            await self._nodes.node_joined(node_name)
        except Exception as exc:  # the certificate is issued; only /node/{name} may miss it
            logger.warning("node %r joined but could not be recorded: %s", node_name, exc)

    def _authorize(self, request: Request, node_name: str, now: datetime) -> bool:
        """True for a rotation (client certificate), False for a token bootstrap."""
        if request.peer_cert is not None:
            try:
                verify_rotation_cert(request.peer_cert, self._ca.cert_der, node_name, now)
            except ClientCertError as exc:
                self._refuse(401, str(exc), node_name)
            return True
        self._check_token(request.header("Authorization") or "", node_name, now)
        return False

    def _check_token(self, authorization: str, node_name: str, now: datetime) -> None:
        if not authorization:
            self._refuse(401, "token validation failure, token is empty", node_name)
        parts = authorization.split(" ")
        # KubeEdge checks only the shape `<scheme> <token>`, not the scheme word.
        if len(parts) != 2:
            self._refuse(401, "token validation failure, token cannot be resolved", node_name)
        try:
            self._tokens.verify(parts[1], now)
        except TokenError as exc:
            self._refuse(401, f"token validation failure, err: {exc}", node_name)

    def _check_rotation_csr(self, csr: EdgeCsr, node_name: str) -> None:
        """A rotating edge may only ask for its own identity (KubeEdge does not check this)."""
        try:
            check_node_subject(csr.common_name, csr.organizations, node_name)
        except ClientCertError as exc:
            self._refuse(401, f"certificate request {exc}", node_name)

    @staticmethod
    def _refuse(status: int, message: str, node_name: str) -> NoReturn:
        logger.warning("refused /edge.crt for node %r: %s", node_name, message)
        raise _Refused(text(status, message))
