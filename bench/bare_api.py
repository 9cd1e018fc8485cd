"""The bare baselines: FastAPI routes that do only the work, no domain, no schemas.

`GET /bare/jobs` and `GET /bare/jobs/{id}/metrics` run the api's own SQL through a
psycopg pool and return the rows; `/bare/ws` holds WebSocket clients and
`POST /bare/broadcast` sends one message to each of them.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bench.common import DATABASE_URL

Row = dict[str, Any]
LIST_SQL = (
    "SELECT * FROM training_jobs WHERE 1 = 1 AND archived = 0"
    " ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s"
)
COUNT_SQL = "SELECT COUNT(*) AS n FROM training_jobs WHERE 1 = 1 AND archived = 0"
JOB_SQL = "SELECT * FROM training_jobs WHERE id = %s"
METRICS_SQL = "SELECT * FROM training_metrics WHERE job_id = %s ORDER BY epoch ASC"


def create_app(url: str, schema: str) -> FastAPI:
    sockets: set[WebSocket] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=10,
            kwargs={"options": f"-c search_path={schema}", "row_factory": dict_row},
            open=True,
        )
        yield
        app.state.pool.close()

    app = FastAPI(lifespan=lifespan)

    def fetch(request: Request, *statements: tuple[str, tuple[Any, ...]]) -> list[list[Row]]:
        pool: ConnectionPool[psycopg.Connection[Row]] = request.app.state.pool
        with pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            out = []
            for sql, params in statements:
                cursor.execute(sql, params)
                out.append(cursor.fetchall())
            return out

    @app.get("/bare/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/bare/jobs")
    def jobs(request: Request, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        total, rows = fetch(request, (COUNT_SQL, ()), (LIST_SQL, (limit, offset)))
        return {"jobs": rows, "total": total[0]["n"]}

    @app.get("/bare/jobs/{job_id}/metrics")
    def metrics(request: Request, job_id: str) -> list[Row]:
        _, rows = fetch(request, (JOB_SQL, (job_id,)), (METRICS_SQL, (job_id,)))
        return rows

    @app.websocket("/bare/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        sockets.add(websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            sockets.discard(websocket)

    @app.get("/bare/clients")
    def clients() -> dict[str, int]:
        return {"clients": len(sockets)}

    @app.post("/bare/broadcast")
    async def broadcast(request: Request) -> dict[str, int]:
        message = (await request.body()).decode()
        await asyncio.gather(*(s.send_text(message) for s in list(sockets)))
        return {"sent": len(sockets)}

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--schema", default="public")
    args = p.parse_args()
    app = create_app(DATABASE_URL, args.schema)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")
