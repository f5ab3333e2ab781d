"""Stale presence: agents recorded connected through a gateway that went silent are marked disconnected.

A gateway that is SIGKILLed (or cut off) publishes no `disconnected` events, so its agents would read
connected forever. Every gateway publishes a heartbeat on ``warlock.gateway.<id>.heartbeat`` every few
seconds; every API instance hears all of them (no queue group: each instance keeps its own view) and, every
second, marks disconnected the agents of any gateway it has not heard for `gateway_silence` seconds
(counted from its own start for a gateway it never heard). The update is guarded by gateway id and status,
so an agent that reconnected through another gateway is untouched, and several API instances agree.
Bound: a dead gateway's agents read disconnected within `gateway_silence` + 1 s.

The same check, in memory and before the database (so it works while the database is down), wakes every
caller of this API instance waiting on an agent request sent through a silent gateway (`InFlight`): nobody
will answer it, so the caller records the command as possibly run (``disconnected``) within the same bound
instead of waiting out the command's timeout. Gateways with requests in flight are checked even when no
agent is recorded connected through them any more (the agent may already be back through another one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.fleet.inflight import InFlight
from services.api.store import crud
from shared import subjects
from shared.errors import InvalidIdError, ProtocolError
from shared.protocol import GatewayHeartbeat, decode_model

log = logging.getLogger("services.api")
CHECK_EVERY_S = 1.0


class GatewayWatch:
    """When this API last heard each gateway, and the marking of silent gateways' agents."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        silence: float,
        clock: Callable[[], float] = time.monotonic,
        inflight: InFlight | None = None,
    ) -> None:
        self.sessions = sessions
        self.silence = silence
        self.clock = clock
        self.inflight = inflight
        self.started = clock()
        self.heard: dict[str, float] = {}

    async def on_heartbeat(self, msg: Msg) -> None:
        """Record a heartbeat (a bad one is logged and ignored)."""
        try:
            gateway = subjects.parse_gateway_heartbeat(msg.subject)
            beat = decode_model(GatewayHeartbeat, msg.data)
        except (InvalidIdError, ProtocolError) as exc:
            log.warning("bad gateway heartbeat on %s ignored: %s", msg.subject[:120], exc)
            return
        if str(beat.gateway_id) != str(gateway):
            log.warning("gateway heartbeat for %s on the subject of %s ignored", beat.gateway_id, gateway)
            return
        self.heard[gateway] = self.clock()

    def silent(self, gateway: str) -> bool:
        """Whether `gateway` has not been heard for `silence` seconds (since this API started, if never)."""
        return self.clock() - self.heard.get(gateway, self.started) > self.silence

    def release(self) -> list[str]:
        """Wake the callers waiting on requests sent through a silent gateway; return those gateways."""
        if self.inflight is None:
            return []
        gone = sorted(g for g in self.inflight.gateways() if self.silent(g))
        for gateway in gone:
            reason = f"gateway {gateway} silent for over {self.silence:g}s"
            woken = self.inflight.gone(gateway, reason)
            if woken:
                log.warning("%s: %d caller(s) stop waiting on it (commands may have run)", reason, woken)
        return gone

    async def check(self) -> list[str]:
        """Mark the agents of every silent gateway disconnected; return those gateways."""
        async with self.sessions() as session:
            gateways = await crud.connected_gateways(session)
            gone = sorted(g for g in gateways if self.silent(g))
            for gateway in gone:
                count = await crud.mark_gateway_gone(session, gateway)
                if count:
                    log.warning(
                        "gateway %s silent for over %gs: %d agent(s) marked disconnected",
                        gateway,
                        self.silence,
                        count,
                    )
        return gone

    async def run(self, ready: Callable[[], bool]) -> None:
        """Every second: wake the callers of silent gateways; mark their agents while the database is ready.
        Never raises."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            self.release()
            if not ready():
                continue
            try:
                await self.check()
            except Exception as exc:  # a database hiccup: next second
                log.warning("gateway liveness check failed: %s: %s", type(exc).__name__, str(exc)[:200])
