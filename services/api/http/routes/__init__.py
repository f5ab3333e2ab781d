"""HTTP routes: ``/api/...`` (API key required, checked by `services.api.http.edge`), ``/healthz`` and
``/agent/...`` downloads (open)."""

from __future__ import annotations

from fastapi import FastAPI

from services.api.http.routes import (
    agents,
    commands,
    dashboard,
    downloads,
    health,
    hosts,
    jobs,
    keys,
    metrics_history,
    stream,
    ws,
)


def include_routes(app: FastAPI) -> None:
    """Add every route to `app`; routers under ``/api`` carry no key dependency (the edge checks it).

    Each router is included in the app directly, hosts (and so exec) first: FastAPI matches included
    routers level by level and in order, and a nested ``/api`` router cost the exec route a measurable
    share of its framework time.
    """
    routers = (hosts.router, agents.router, commands.router, downloads.api_router, keys.router, jobs.router)
    for router in routers:
        app.include_router(router, prefix="/api")
    app.include_router(stream.router, prefix="/api")
    app.include_router(metrics_history.router, prefix="/api")
    app.include_router(ws.router, prefix="/api")  # POST /api/ws-tickets (a read key)
    ws.add_websocket(app)  # /api/ws: a one-time ticket, checked by the route (the edge passes WebSockets)
    app.include_router(health.router)
    app.include_router(downloads.router)
    app.include_router(dashboard.api_router, prefix="/api")  # GET /api/fleet (a read key)
    app.include_router(dashboard.router)  # GET / and /ui/...: the dashboard's files, no API key
