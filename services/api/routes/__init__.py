"""HTTP routes: ``/api/...`` (API key required), ``/healthz`` and ``/agent/...`` downloads (open)."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from services.api.deps import require_api_key
from services.api.routes import agents, commands, downloads, health, hosts


def include_routes(app: FastAPI) -> None:
    """Add every route to `app`, with the API key required under ``/api``.

    Each router is included in the app directly, hosts (and so exec) first: FastAPI matches included
    routers level by level and in order, and a nested ``/api`` router cost the exec route a measurable
    share of its framework time.
    """
    protected = [Depends(require_api_key)]
    for router in (hosts.router, agents.router, commands.router):
        app.include_router(router, prefix="/api", dependencies=protected)
    app.include_router(health.router)
    app.include_router(downloads.router)
