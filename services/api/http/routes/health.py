"""``/healthz``: NATS connected and the database answering ``SELECT 1``; no API key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from services.api.http.deps import StateDep
from services.api.store.db import ping

router = APIRouter(tags=["health"])

DB_CHECK_TIMEOUT = 5.0


@router.get("/healthz", responses={503: {"description": "NATS or the database is unavailable"}})
async def healthz(state: StateDep) -> JSONResponse:
    """200 when NATS is connected and the database answers; 503 naming what failed, and why."""
    nats_state = state.link.state()  # "ok" or "unavailable: <why>"
    if not state.db_ready:
        db_state = f"error: {state.db_error}"
    else:
        try:
            async with asyncio.timeout(DB_CHECK_TIMEOUT):
                await ping(state.engine)
            db_state = "ok"
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            db_state = f"error: {type(exc).__name__}"
    ok = nats_state == "ok" and db_state == "ok"
    body = {"status": "ok" if ok else "unavailable", "nats": nats_state, "database": db_state}
    return JSONResponse(body, status_code=200 if ok else 503)
