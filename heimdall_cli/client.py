"""A small typed client of the REST api, for the CLI."""

from __future__ import annotations

import math
from typing import Any

import httpx

from shared.settings import Settings

Json = dict[str, Any]
PREFIX = "/api/v1/training"


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
    def __init__(self, status: int, detail: object) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


HINTS = {
    401: "set HEIMDALL_API_KEY to a key from the api's HEIMDALL_API_KEYS",
    403: "this needs a key with the operator role in HEIMDALL_API_KEY",
}


class ApiClient:
    """Sends HEIMDALL_API_KEY, when set, as `Authorization: Bearer`."""

    def __init__(self, settings: Settings, timeout: float = 10.0) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=settings.api_url, timeout=timeout, headers=headers)

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
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            hint = HINTS.get(response.status_code)
            raise ApiError(response.status_code, f"{detail} ({hint})" if hint else detail)
        result: Json = response.json() if response.content else {}
        return result
