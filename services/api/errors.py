"""Domain and infrastructure errors mapped to responses; no traceback reaches a client."""

from __future__ import annotations

import logging
import math
import sqlite3

import psycopg
import psycopg_pool
from eventsourcing.persistence import IntegrityError, OperationalError
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.api.preflight import PreflightError
from shared.application import IdempotencyConflictError, JobNotFoundError
from shared.domainmodel import InitFromError, TrainingJobError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = "5"
OUTAGES = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    OperationalError,
    StoreInterfaceError,
    IntegrityError,
    ConnectionError,
    TimeoutError,
)


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(PreflightError, _cannot_run)
    app.add_exception_handler(InitFromError, _cannot_continue)
    app.add_exception_handler(JobNotFoundError, _not_found)
    app.add_exception_handler(TrainingJobError, _conflict)
    app.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)
    for outage in OUTAGES:
        app.add_exception_handler(outage, _unavailable)
    app.add_exception_handler(sqlite3.OperationalError, _sqlite_error)
    app.add_exception_handler(Exception, _internal)


async def _sqlite_error(request: Request, exc: Exception) -> JSONResponse:
    """A SQLite file locked by another writer past its wait is an outage (503); any other
    SQLite error is ours (500)."""
    if any(word in str(exc) for word in ("locked", "busy")):
        return await _unavailable(request, exc)
    return await _internal(request, exc)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k != "ctx"} for e in exc.errors()]
    try:
        encoded = _sendable(jsonable_encoder(errors))
    except RecursionError:  # an input nested hundreds deep: name the place, not the input
        encoded = [{k: v for k, v in e.items() if k != "input"} for e in errors]
        encoded = _sendable(encoded)
    if any(_not_json(e) for e in errors):
        return JSONResponse({"detail": "malformed JSON body", "errors": encoded}, status_code=400)
    return JSONResponse({"detail": encoded}, status_code=422)


async def _cannot_run(request: Request, exc: Exception) -> JSONResponse:
    """A config that validates but cannot run, in the shape of FastAPI's own 422."""
    assert isinstance(exc, PreflightError)
    return _config_error("preflight", exc.field, exc.message)


async def _cannot_continue(request: Request, exc: Exception) -> JSONResponse:
    """`init_from` names no job whose final weights can start this one."""
    return _config_error("init_from", "init_from", str(exc))


def _config_error(kind: str, field: str, message: str) -> JSONResponse:
    loc = ["body", "config", *field.split(".")]
    error = {"type": kind, "loc": loc, "msg": message}
    return JSONResponse({"detail": [_sendable(error)]}, status_code=422)


def _sendable(value: object) -> object:
    """Echoed inputs may hold what JSON or UTF-8 cannot carry: NaN and infinities (`1e400`)
    become their names, lone surrogates (`"\\ud800"`) and other unencodable characters
    their backslash escapes, in keys and values alike."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_sendable(k): _sendable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sendable(v) for v in value]
    return value


def _not_json(error: dict[str, object]) -> bool:
    """A body that does not parse as JSON at all, as opposed to JSON of the wrong shape."""
    if error.get("type") == "json_invalid":
        return True
    raw = isinstance(error.get("input"), str | bytes)
    return error.get("loc") == ("body",) and error.get("type") == "model_attributes_type" and raw


async def _http_error(request: Request, exc: Exception) -> Response:
    """As Starlette's, but a 405 lists every method of the path, not one route's."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code != 405:
        return await http_exception_handler(request, exc)
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
        for method in route.methods or ()
    }
    allow = ", ".join(sorted(methods))
    return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": allow})


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TrainingJobError)
    return JSONResponse({"detail": str(exc), "status": exc.status}, status_code=409)


async def _idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    error = {
        "type": "idempotency_key_reused",
        "loc": ["header", "idempotency-key"],
        "msg": str(exc),
        "input": request.headers.get("idempotency-key"),
    }
    return JSONResponse({"detail": [error]}, status_code=422)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("store unavailable on %s %s: %r", request.method, request.url.path, exc)
    watch = getattr(request.app.state.context, "watch", None)
    if watch is not None and isinstance(exc, psycopg.OperationalError | OperationalError):
        watch.mark_down(type(exc).__name__)
    return JSONResponse(
        {"detail": "the event store or read store is unavailable; retry shortly"},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
