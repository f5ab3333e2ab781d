"""A cancel that settles a run itself (the agent answers ``never_ran``) is announced on
``warlock.events.command.<host>`` as ``finished``, once: a second cancel of the settled run announces nothing.
The in-process API of `tests.integration.test_api_cancel` (both backends, a real nats-server, the gateway a
nats-py responder with its real identity); the listener is a NATS client with the API role, as the browser
hub of another instance is."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api.store.models import CommandStatus
from shared import subjects
from shared.protocol import CancelAnswer, Message
from tests.integration.test_api_cancel import (  # noqa: F401  (fixtures)
    add_run,
    api,
    cancel,
    peers,
    respond,
    trusted,
)
from tests.support.db import RunningApi
from tests.support.natsserver import NatsServer


async def test_a_cancel_that_settles_the_run_is_announced_once(
    api: RunningApi,  # noqa: F811
    nats_server: NatsServer,
    peers: list[NATS],  # noqa: F811
) -> None:
    events: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def heard(msg: Msg) -> None:
        assert msg.subject == subjects.command_event("h1")
        events.append(json.loads(msg.data))
        arrived.set()

    listener = await nats_server.connect("api")
    try:
        await listener.subscribe(subjects.ALL_COMMAND_EVENTS, cb=heard)
        await listener.flush()
        await add_run(api, "c1", CommandStatus.PENDING)
        seen: list[Message] = []
        answer = CancelAnswer(command_id="c1", state="never_ran")
        await respond(nats_server, peers, subjects.agent_cancel("h1"), seen, lambda r: answer)
        code, body = await cancel(api, "c1")
        assert (code, body["status"]) == (200, "cancelled")
        await asyncio.wait_for(arrived.wait(), 5)
        code, body = await cancel(api, "c1")  # already final: the row is unchanged
        assert body["state"] == "finished", body
        await asyncio.sleep(0.5)
    finally:
        await listener.close()
    assert len(events) == 1, events
    (event,) = events
    assert {k: event[k] for k in ("event", "command_id", "status", "via", "exit_code")} == {
        "event": "finished",
        "command_id": "c1",
        "status": "cancelled",
        "via": None,
        "exit_code": None,
    }
    assert event["at"] == pytest.approx(time.time(), abs=30)
