"""Who is calling: API keys as Bearer tokens, viewers read and operators also command."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from shared.security import ApiKey, ConfigurationError, find_key, is_loopback
from shared.settings import Settings

log = logging.getLogger(__name__)
CLOSE_UNAUTHORIZED, CLOSE_TOO_MANY = 4401, 4429  # as HTTP's 401 and 429
ANONYMOUS = ApiKey("anonymous", "", "operator")
bearer = HTTPBearer(
    auto_error=False,
    description="An API key from HEIMDALL_API_KEYS: viewers read, operators also command.",
)


def authenticate(keys: Sequence[ApiKey], token: str | None) -> ApiKey | None:
    """The caller's key; everyone is `anonymous` (an operator) when no keys are configured."""
    if not keys:
        return ANONYMOUS
    return find_key(keys, token) if token else None


def connection_token(connection: HTTPConnection) -> str | None:
    """A Bearer token from the header, or (WebSocket only) the `token` query parameter."""
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if connection.scope["type"] == "websocket":
        return connection.query_params.get("token") or None
    return None


def _unauthorized() -> HTTPException:
    return HTTPException(
        401,
        "missing or unknown API key: send the header Authorization: Bearer KEY",
        headers={"WWW-Authenticate": "Bearer"},
    )


class RequireKey:
    """401 for an `/api/` request without a known key, before its body is even read.

    The routes' `current_client` dependency says the same (and documents it in OpenAPI);
    this only makes sure nothing of an unauthenticated request is parsed first.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[ApiKey]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            token = connection_token(HTTPConnection(scope))
            if authenticate(self.keys, token) is None:
                error = _unauthorized()
                response = JSONResponse({"detail": error.detail}, 401, error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def current_client(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """401 with `WWW-Authenticate: Bearer` for a missing or unknown key."""
    keys: Sequence[ApiKey] = request.app.state.context.settings.api_keys
    client = authenticate(keys, credentials.credentials if credentials else None)
    if client is None:
        raise _unauthorized()
    return client


async def operator(request: Request, client: Annotated[ApiKey, Depends(current_client)]) -> ApiKey:
    """403 for a viewer's key: commands need an operator."""
    if not client.can_command:
        raise HTTPException(
            403,
            f"the key {client.name!r} has the viewer role, which may only read:"
            f" {request.method} {request.url.path} needs an operator key",
        )
    return client


ClientDep = Annotated[ApiKey, Depends(current_client)]
OperatorDep = Annotated[ApiKey, Depends(operator)]


class SocketGate:
    """Who may open a WebSocket, and how many each key may hold open at once."""

    def __init__(self, keys: Sequence[ApiKey], per_key: int) -> None:
        self.keys, self.per_key = keys, per_key
        self.open: Counter[str] = Counter()

    @asynccontextmanager
    async def admit(self, websocket: WebSocket) -> AsyncIterator[ApiKey | None]:
        """The caller's key while its socket is open; None once a refused one is closed.

        A refused socket is accepted and closed at once with a code and a reason and no
        message, as a browser cannot read the status of a refused handshake.
        """
        client = authenticate(self.keys, connection_token(websocket))
        if client is None:
            await _close(websocket, CLOSE_UNAUTHORIZED, "missing or unknown API key")
            yield None
            return
        if self.open[client.name] >= self.per_key:
            reason = f"too many WebSocket clients for key {client.name!r} (at most {self.per_key})"
            log.warning("websocket refused: %s", reason)
            await _close(websocket, CLOSE_TOO_MANY, reason)
            yield None
            return
        self.open[client.name] += 1
        try:
            yield client
        finally:
            self.open[client.name] -= 1


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    await websocket.close(code, reason[:120])


def check_exposure(settings: Settings) -> None:
    """Without keys the api is open to anyone who reaches it: loopback only, then."""
    if settings.api_keys:
        names = ", ".join(f"{k.name} ({k.role})" for k in settings.api_keys)
        log.info("api keys configured: %s", names)
        return
    if not is_loopback(settings.api_host):
        raise ConfigurationError(
            f"refusing to listen on {settings.api_host}: no API keys are configured, so"
            " anyone who can reach it could submit and cancel jobs. Set HEIMDALL_API_KEYS"
            " (name:KEY:role,...) or listen on 127.0.0.1"
        )
    log.warning(
        "no API keys configured (HEIMDALL_API_KEYS): the api is open to every local user"
        " and serves only on the loopback address %s",
        settings.api_host,
    )
