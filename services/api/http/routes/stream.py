"""``GET /api/commands/{id}/stream``: a command's output as Server-Sent Events, then its outcome.

Events (``text/event-stream``; ``data`` is one line of JSON):

    id: <seq>   event: output   data: {"seq", "stream": "stdout"|"stderr", "data", "truncated"}
    id: end     event: end      data: {"command_id", "status", "exit_code", "signal", "via", "truncated",
                                       "error_code"}   (the recorded outcome: authoritative)

then the response ends. A client that reconnects with ``Last-Event-ID: <seq>`` gets the chunks after it (no
gap, no duplicate); with ``Last-Event-ID: end`` it is answered 204 (EventSource then stops reconnecting).
A comment line every 15 s keeps a quiet stream open through proxies. Unknown id → 404 JSON, before any
event. The API key goes in the ``Authorization`` header like every ``/api`` route, never in the URL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from services.api.fleet.output import ChunkEvent, EndEvent, Event, OutputHub
from services.api.http.auth import READ, check_run_host, scoped
from services.api.http.deps import app_state
from services.api.store import crud

router = APIRouter(prefix="/commands", tags=["commands"])

END_ID = "end"
RETRY_MS = 1000  # what EventSource waits before it reconnects


def format_event(event: Event) -> str:
    """One event in the text/event-stream format."""
    if isinstance(event, ChunkEvent):
        data = {"seq": event.seq, "stream": event.stream, "data": event.data, "truncated": event.truncated}
        return f"id: {event.seq}\nevent: output\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
    if isinstance(event, EndEvent):
        return f"id: {END_ID}\nevent: end\ndata: {json.dumps(event.outcome, separators=(',', ':'))}\n\n"
    return ": keepalive\n\n"


def output_hub(request: Request) -> OutputHub:
    """The app's output hub (set by the lifespan)."""
    hub: OutputHub = request.app.state.output
    return hub


@router.get(
    "/{command_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "output events, then the outcome"},
        204: {"description": "Last-Event-ID was the end event: nothing more will come"},
        400: {"description": "Last-Event-ID is neither a chunk number nor `end`"},
        403: {"description": "its host is outside the key's scope"},
        404: {"description": "unknown command"},
    },
    dependencies=[READ],
)
async def stream_command(
    command_id: str,
    request: Request,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """The command's output as it happens (Server-Sent Events), replayed from the start or after
    ``Last-Event-ID``, followed until the run is recorded final, then its outcome."""
    state = app_state(request)
    state.require_db()
    if scoped(request) is not None:  # a short session of its own: none is held while the stream is open
        async with state.sessions() as session:
            run = await crud.get_run(session, command_id)  # unknown: 404
            await check_run_host(request, session, run.host_id)
    after = 0
    if last_event_id is not None and last_event_id.strip():
        value = last_event_id.strip()
        if value == END_ID:
            return Response(status_code=204)
        if not value.isdigit() or len(value) > 12:
            problem = {"detail": "Last-Event-ID must be a chunk number or 'end'", "code": "bad_last_event_id"}
            return JSONResponse(problem, status_code=400)
        after = int(value)
    events = await output_hub(request).open(command_id, after)  # NotFound → 404 before any byte

    async def body() -> AsyncIterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        async for event in events:
            yield format_event(event)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
