"""The open-loop bench's bare baseline: Starlette on an async psycopg pool, no domain.

`GET /bare/jobs?limit=N` runs the api's newest-first query and its count on
`training_jobs`; `POST /bare/jobs` inserts and commits one row into `bare_jobs`. Nothing
else: no validation, no events, no projection, no logging of requests.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.bare_api import COUNT_SQL, LIST_SQL
from bench.common import DATABASE_URL

BARE_TABLE = (
    "CREATE TABLE IF NOT EXISTS bare_jobs (id TEXT PRIMARY KEY, job_name TEXT NOT NULL,"
    " config TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)
INSERT_SQL = "INSERT INTO bare_jobs (id, job_name, config) VALUES (%s, %s, %s)"


def build(schema: str, pool_size: int = 10) -> Starlette:
    """The bare app on `schema` (its `training_jobs` must exist)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        DATABASE_URL,
        min_size=pool_size,
        max_size=pool_size,
        kwargs={"options": f"-c search_path={schema}", "row_factory": dict_row},
        open=False,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open()
        async with pool.connection() as conn:
            await conn.execute(BARE_TABLE)
        yield
        await pool.close()

    async def list_jobs(request: Request) -> Response:
        limit = int(request.query_params.get("limit", "20"))
        async with pool.connection() as conn:
            rows = await (await conn.execute(LIST_SQL, [limit, 0])).fetchall()
            count = await (await conn.execute(COUNT_SQL)).fetchone()
        body = {"jobs": rows, "total": count["n"] if count else 0}
        return Response(json.dumps(body, default=str), media_type="application/json")

    async def submit(request: Request) -> Response:
        body = await request.json()
        job_id = str(uuid.uuid4())
        async with pool.connection() as conn:
            await conn.execute(
                INSERT_SQL, [job_id, body["job_name"], json.dumps(body.get("config", {}))]
            )
        return Response(json.dumps({"id": job_id}), 201, media_type="application/json")

    async def health(request: Request) -> Response:
        return Response("ok")

    routes = [
        Route("/bare/jobs", list_jobs, methods=["GET"]),
        Route("/bare/jobs", submit, methods=["POST"]),
        Route("/health", health),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.schema), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
