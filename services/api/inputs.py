"""Blank input means absent, for every route: `?status=` is no status filter.

Forms and hand-written URLs send empty values for fields left blank (`?status=&limit=50`),
and proxies or clients may send a blank header they meant to leave out. Dropping them here,
once, keeps each route's own validation for the values that are really there.

The optional headers, each ignored when empty or whitespace:

- `Idempotency-Key` (POST /jobs): retries with the same key make one job;
- `Heimdall-Position` (queries): answer once the read tables reach this store position.

`Authorization` is not among them: a blank key is a missing key, and gets 401.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

OPTIONAL_HEADERS = frozenset({b"idempotency-key", b"heimdall-position"})


class BlankInputs:
    """Drops query parameters with an empty value and blank optional headers (ASGI)."""

    def __init__(self, app: ASGIApp, optional_headers: frozenset[bytes] = OPTIONAL_HEADERS) -> None:
        self.app, self.optional_headers = app, optional_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            # Changed in place: outer middleware reads what the router adds to this scope.
            scope["query_string"] = without_empty_values(scope.get("query_string", b""))
            scope["headers"] = [
                (name, value)
                for name, value in scope.get("headers", [])
                if value.strip() or name not in self.optional_headers
            ]
        await self.app(scope, receive, send)


def without_empty_values(query: bytes) -> bytes:
    """`a=1&b=&c` to `a=1`: the pairs whose value is empty go, the rest stay byte for byte."""
    pairs = (pair for pair in query.split(b"&") if pair.partition(b"=")[2])
    return b"&".join(pairs)
