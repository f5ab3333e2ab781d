"""`warlock-api`: the FastAPI app factory and its entrypoint.

Nothing is built at import time: `create_app(settings)` returns an app whose lifespan opens the database
engine and the NATS connection, initialises the schema (or keeps retrying while the database is down,
answering 503 meanwhile), starts the NATS responders, and closes everything at shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import uvicorn
import uvloop
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api import __version__
from services.api.fleet.browser import BrowserHub, CommandEvents, TicketStore, key_check_interval
from services.api.fleet.bus import Bus
from services.api.fleet.cancel import cancel_many
from services.api.fleet.inflight import InFlight
from services.api.fleet.jobs import JobRunner
from services.api.fleet.lifecycle import AgentLifecycle
from services.api.fleet.liveness import GatewayWatch
from services.api.fleet.metrics_history import maintain_forever
from services.api.fleet.output import OutputHub
from services.api.fleet.reconciler import Reconciler, reconcile_forever
from services.api.fleet.runner import Runner
from services.api.fleet.signer import ApiSigner
from services.api.fleet.tasks import TaskTracker
from services.api.fleet.wheel import WheelSource
from services.api.http.deps import ApiState, AuthCache, document_api_key
from services.api.http.edge import ApiEdge
from services.api.http.errors import install_error_handlers
from services.api.http.routes import docs, include_routes
from services.api.http.routes.ws import hide_query_strings
from services.api.metrics import AccessLog, TimedRunStore
from services.api.metrics import router as metrics_router
from services.api.settings import ApiSettings
from services.api.store.db import SchemaMismatch, initialise, make_engine, sessionmaker
from services.api.store.runstore import open_store
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.metrics import observe_engine
from shared.natsx import NatsLink, describe
from shared.settings import load_settings

log = logging.getLogger("services.api")
FIRST_NATS_ATTEMPT_S = 5.0  # start-up waits this long for NATS at most, then serves (503) while retrying


async def _try_initialise(state: ApiState) -> bool:
    """One attempt at schema initialisation; False (and state.db_error set) when the database is down."""
    try:
        written = await initialise(state.engine, state.settings)
    except SchemaMismatch:
        raise
    except (SQLAlchemyError, OSError) as exc:
        state.db_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return False
    state.db_ready, state.db_error = True, None
    if written is not None:
        log.info("api key written to %s", written)
    return True


async def _initialise_until_ready(state: ApiState) -> None:
    delay = 0.5
    while not await _try_initialise(state):
        await asyncio.sleep(delay)
        delay = min(delay * 2, state.settings.db_retry_max)
    log.info("database ready")


async def _connect_nats(
    link: NatsLink,
    bus: Bus,
    stop: asyncio.Event,
    output: OutputHub | None = None,
    browsers: BrowserHub | None = None,
) -> None:
    """Connect to NATS (retrying until `stop`), then start the responders and consumers."""
    if not await link.connect(stop):
        return
    try:
        await bus.start()
        if output is not None:
            await output.start()
        if browsers is not None:
            await browsers.start()
    except nats.errors.Error as exc:
        log.error("NATS responders not started: %s", describe(exc))


def create_app(settings: ApiSettings) -> FastAPI:
    """The API application for `settings`; engine and NATS connection open in its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        signer = ApiSigner(settings.signing_key_file, settings.extra_trusted_keys, settings.command_ttl)
        engine = make_engine(settings.database_url)
        observe_engine(engine.sync_engine)  # warlock_db_query_seconds{source="orm"}
        link = NatsLink.from_settings(settings, "warlock-api", log, role="api")
        nc = link.nc
        tasks = TaskTracker()
        sessions = sessionmaker(engine)
        store = TimedRunStore(open_store(settings.database_url))  # timed: warlock_db_query_seconds
        announced = CommandEvents(store, nc)  # the runner's runs announced to browsers (fleet.browser)
        inflight = InFlight()  # agent requests by gateway: the watch wakes the callers of a silent one
        runner = Runner(nc, announced, sessions, settings, tasks, signer, inflight=inflight)
        lifecycle = AgentLifecycle(
            nc, sessions, settings, WheelSource(settings.agent_wheel, settings.wheel_dir), signer
        )
        auth = AuthCache(settings.auth_cache_ttl)
        state = ApiState(settings, engine, sessions, link, runner, tasks, auth, lifecycle, signer)
        watch = GatewayWatch(sessions, settings.gateway_silence, inflight=inflight)
        jobs = JobRunner(runner, engine, tasks)
        jobs.cancel_in_flight = cancel_many(runner)  # a job cancel kills its runs in flight too
        bus = Bus(
            nc,
            sessions,
            tasks,
            settings.max_output_chars,
            ready=lambda: state.db_ready,
            runner=runner,
            command_ttl=settings.command_ttl,
            watch=watch,
        )
        output = OutputHub(nc, sessions, ready=lambda: state.db_ready)  # output chunks: store, follow
        app.state.output = output
        browsers = BrowserHub(nc, sessions, engine)  # the browser stream: NATS events to its browsers
        app.state.browser_hub = browsers
        app.state.browser_tickets = TicketStore(engine, settings.ws_ticket_ttl)  # shared by the instances
        stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []
        try:
            if not await _try_initialise(state):
                log.warning("database unavailable (%s); answering 503 and retrying", state.db_error)
                background.append(asyncio.create_task(_initialise_until_ready(state), name="db-init"))
            # NATS in the background: the HTTP port opens (and /healthz says why NATS is missing) even when
            # NATS is down. The first attempt is awaited, so a reachable NATS is serving before we are.
            reconciler = Reconciler(sessions, settings, nc, signer, runner.rejections, runner.delivering)
            reconciling = reconcile_forever(reconciler, settings, ready=lambda: state.db_ready)
            background.append(asyncio.create_task(reconciling, name="reconciler"))
            background.append(asyncio.create_task(watch.run(lambda: state.db_ready), name="gateway-watch"))
            background.append(
                asyncio.create_task(jobs.maintain_forever(lambda: state.db_ready), name="job-maintenance")
            )
            metrics_retention = maintain_forever(
                engine,
                settings.metrics_maintenance_interval,
                settings.metrics_raw_retention,
                settings.metrics_rollup_retention,
                ready=lambda: state.db_ready,
            )
            background.append(asyncio.create_task(metrics_retention, name="metrics-retention"))
            key_checks = browsers.watch_keys(
                key_check_interval(settings.auth_cache_ttl), ready=lambda: state.db_ready
            )
            background.append(asyncio.create_task(key_checks, name="browser-key-checks"))
            nats_start = _connect_nats(link, bus, stop, output, browsers)
            connecting = asyncio.create_task(nats_start, name="nats-connect")
            background.append(connecting)
            failed = asyncio.create_task(link.failed.wait())
            first = {connecting, failed}
            await asyncio.wait(first, timeout=FIRST_NATS_ATTEMPT_S, return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
            if not link.connected:
                log.warning("serving without NATS (503 on what needs it) while retrying: %s", link.problem)
            app.state.api = state
            app.state.jobs = jobs
            yield
        finally:
            stop.set()
            for task in background:
                task.cancel()
            await output.stop()  # first: its buffered chunks are in no other instance's database
            await asyncio.gather(*background, return_exceptions=True)
            await bus.stop()
            await browsers.stop()
            await tasks.close(settings.shutdown_timeout)
            await runner.stop_listening()
            await jobs.mux.close()
            await link.close()
            await store.close()
            await engine.dispose()

    app = FastAPI(
        title="Warlock API",
        version=__version__,
        description="Fleet control plane: run commands by agent, or over SSH when no agent is connected.",
        lifespan=lifespan,
        docs_url=None,  # /docs is services.api.http.routes.docs: Swagger UI served by the API, no CDN
        redoc_url=None,  # ReDoc is not vendored, and FastAPI's would load it from a CDN
    )
    include_routes(app)
    app.include_router(docs.router)  # /docs and /static/swagger-ui/...: no API key
    hide_query_strings()  # uvicorn logs a WebSocket's URL with its query string: the browser stream's ticket
    if settings.metrics:
        app.include_router(metrics_router)  # /metrics: no API key (services.api.metrics)
    _document_api_key(app)
    install_error_handlers(app)
    app.add_middleware(ApiEdge, max_body_bytes=settings.max_body_bytes)  # key and size before the body
    app.add_middleware(JsonServerErrors)
    app.add_middleware(AccessLog, enabled=settings.access_log)  # outermost: sees every status, 500 too
    return app


def _document_api_key(app: FastAPI) -> None:
    """Generate the OpenAPI schema with the API key scheme declared (see `deps.document_api_key`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_api_key(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class JsonServerErrors:
    """Last line: an unexpected exception becomes a JSON 500 without traceback (logged server-side)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer a JSON 500 if it raises before responding."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn's server, logging ``api listening on http://host:port`` once it is bound."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then announce the bound address."""
        await super().startup(sockets)
        if self.started:
            port = self.config.port
            for srv in self.servers:
                for sock in srv.sockets:
                    port = int(sock.getsockname()[1])
            log.info("api listening on http://%s:%d", self.config.host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the open output streams first (uvicorn waits for every response to finish before the
        lifespan's shutdown): their clients reconnect, to another instance, with Last-Event-ID."""
        output = getattr(getattr(self.config.app, "state", None), "output", None)
        if isinstance(output, OutputHub):
            output.close_streams()
        await super().shutdown(sockets)


async def serve(settings: ApiSettings) -> int:
    """Run the API with uvicorn until a signal stops it; 1 if it could not start."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    server = _Server(config)
    await server.serve()
    return 0 if server.started else 1


def _parser() -> argparse.ArgumentParser:
    """The command line: nothing but --help and --version (configuration is WARLOCK_API_* variables)."""
    parser = argparse.ArgumentParser(
        prog="warlock-api",
        description="Warlock REST API (FastAPI on uvicorn). Configured by environment variables: "
        "WARLOCK_API_*, WARLOCK_DATABASE_URL, WARLOCK_NATS_URL, WARLOCK_LOG_LEVEL (README: Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"warlock-api {__version__}")
    return parser


def _stop_cleanly(_signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT outside uvicorn's own handling: exit 0 (uvicorn re-raises a signal it handled)."""
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `warlock-api` console script (configuration: WARLOCK_API_* variables).

    Exit codes: 0 after SIGTERM/SIGINT (in any state), 1 when the port cannot be bound, 2 on a
    configuration error.
    """
    _parser().parse_args(argv)
    try:
        settings = load_settings(ApiSettings)
    except ConfigError as exc:
        print(f"warlock-api: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    # uvicorn stops gracefully on these signals, then raises them again once done: this handler turns
    # that (and a signal before uvicorn's handlers are in place) into a clean exit instead of a kill
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_cleanly)
    # uvloop: measured here to cut the network path's CPU by 25-40 % (not used by the agent, where it
    # made spawning a subprocess ~3x slower)
    return uvloop.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
