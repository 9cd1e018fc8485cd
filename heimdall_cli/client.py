"""A small typed client of the REST api, for the CLI."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from shared.settings import Settings

Json = dict[str, Any]
PREFIX = "/api/v1/training"
UNREACHABLE = 3  # the exit status of a command that got no answer from the api at all


def json_problem(value: object, where: str = "") -> str | None:
    """Where `value` holds what a JSON body cannot carry (YAML gives dates, bytes, NaN, keys
    that are not strings, lone surrogates), as `config.seed: ...`; None when it all can."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where or 'the top level'}: key {key!r} is not a string"
            inner = f"{where}.{key}" if where else key
            if problem := json_problem(key, where) or json_problem(item, inner):
                return problem
        return None
    if isinstance(value, list):
        found = (json_problem(item, f"{where}[{i}]") for i, item in enumerate(value))
        return next((problem for problem in found if problem), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value} is not a JSON number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"{where}: holds a lone surrogate at index {error.start}, which is not text"
        return None
    if value is None or isinstance(value, bool | int | float):
        return None
    return f"{where}: a {type(value).__name__} is not JSON; quote it to send it as text"


class ApiError(Exception):
    """The api answered with an error status; `message` is its `detail` for people."""

    def __init__(self, status: int, detail: object, hint: str | None = None) -> None:
        self.status, self.detail = status, detail
        self.message = f"{readable(detail)} ({hint})" if hint else readable(detail)
        super().__init__(f"{status}: {self.message}")


class ApiUnreachableError(Exception):
    """No answer from the api at all: nothing listens there, the name does not resolve,
    or it timed out."""

    def __init__(self, url: str, error: Exception) -> None:
        reason = str(error) or type(error).__name__
        super().__init__(
            f"cannot reach the api at {url}: {reason} (HEIMDALL_API_URL, or HEIMDALL_API_HOST"
            " and HEIMDALL_API_PORT, say where it listens)"
        )


HINTS = {
    401: "set HEIMDALL_API_KEY to a key from the api's HEIMDALL_API_KEYS",
    403: "this needs a key with the operator role in HEIMDALL_API_KEY",
}


def readable(detail: object) -> str:
    """An api `detail` on one line: FastAPI's error list as `config.epochs: message; ...`,
    a mapping as `key: value, ...`, text as it is."""
    if isinstance(detail, list):
        return "; ".join(_problem(e) if isinstance(e, dict) else readable(e) for e in detail)
    if isinstance(detail, dict):
        return ", ".join(f"{key}: {readable(value)}" for key, value in detail.items())
    return " ".join(str(detail).split())


def _problem(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", [])]
    field = ".".join(loc[1:] if loc[:1] in (["body"], ["query"], ["header"]) else loc)
    return f"{field}: {readable(error.get('msg'))}" if field else readable(error.get("msg"))


def error_of(response: httpx.Response) -> ApiError:
    """The ApiError of a 4xx/5xx answer (its body already read): the api's `detail`, or the
    status's reason when something else (a proxy) answered."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        detail = response.reason_phrase or "no reason given"
    return ApiError(response.status_code, detail, HINTS.get(response.status_code))


class ApiClient:
    """Sends HEIMDALL_API_KEY, when set, as `Authorization: Bearer`."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = settings.api_url
        with self.reaching():
            self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    @contextmanager
    def reaching(self) -> Iterator[None]:
        """httpx's errors of getting no answer as one ApiUnreachableError naming the URL."""
        try:
            yield
        except (httpx.TransportError, httpx.InvalidURL) as error:
            raise ApiUnreachableError(self.url, error) from None

    def submit(self, body: Json, idempotency_key: str | None = None) -> Json:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", f"{PREFIX}/jobs", json=body, headers=headers)

    def jobs(self, status: str | None, limit: int) -> Json:
        params: Json = {"limit": limit, **({"status": status} if status else {})}
        return self._call("GET", f"{PREFIX}/jobs", params=params)

    def job(self, job_id: str) -> Json:
        return self._call("GET", f"{PREFIX}/jobs/{job_id}")

    def command(self, job_id: str, action: str) -> Json:
        return self._call("POST", f"{PREFIX}/jobs/{job_id}/{action}")

    def metrics(self, job_id: str) -> list[Json]:
        rows: list[Json] = self._call("GET", f"{PREFIX}/jobs/{job_id}/metrics")  # type: ignore[assignment]
        return rows

    def events(self, job_id: str) -> Json:
        return self._call("GET", f"{PREFIX}/jobs/{job_id}/events")

    def _call(self, method: str, path: str, **kwargs: Any) -> Json:
        with self.reaching():
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise error_of(response)
        result: Json = response.json() if response.content else {}
        return result
