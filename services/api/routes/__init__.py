"""HTTP routes: ``/api/...`` (API key required), ``/healthz`` and ``/agent/...`` downloads (open)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.deps import require_api_key
from services.api.routes import agents, commands, downloads, health, hosts


def api_router() -> APIRouter:
    """Every route of the API, with the API key required under ``/api``."""
    router = APIRouter()
    protected = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)])
    protected.include_router(agents.router)
    protected.include_router(hosts.router)
    protected.include_router(commands.router)
    router.include_router(protected)
    router.include_router(health.router)
    router.include_router(downloads.router)
    return router
