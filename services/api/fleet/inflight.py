"""The agent requests this API instance is waiting on, by the gateway each was routed through.

A caller waits on an agent request for the command's timeout plus `exec_grace`. When the gateway that holds
the agent's session is SIGKILLed nobody answers the request, so without help the caller waits all of it. The
runner registers each agent request here under the gateway the host's agent was recorded connected through
when the command was sent (`HostTarget.gateway_id`); `GatewayWatch` calls `gone` for every gateway it finds
silent, which wakes those callers. They stop waiting and record the command as possibly run (never re-sent);
the request itself keeps listening until its own timeout, and a result that still arrives on it, or later on
``warlock.result.<host>`` from the agent's outbox, settles the row.

A request registered under a gateway it did not go through (the agent had reconnected elsewhere and its new
presence was not recorded yet) is woken too if that old gateway is silent: the caller is answered early
with a may-have-run row, and the result the live session returns still settles it. An agent recorded
connected through another gateway before the send is registered under that one, so it is never affected.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Gone:
    """Why a caller stopped waiting: the gateway its request went through is gone."""

    gateway_id: str
    reason: str


class InFlight:
    """Waiters by gateway id, then by command id; every method runs on the event loop, none awaits."""

    def __init__(self) -> None:
        self._by_gateway: dict[str, dict[str, asyncio.Future[Gone | None]]] = {}

    def watch(self, gateway_id: str, command_id: str) -> asyncio.Future[Gone | None]:
        """Register a request to `command_id` sent through `gateway_id`; the future resolves with `Gone` if
        the gateway is gone (the caller may resolve it with None itself, when the request is answered)."""
        future: asyncio.Future[Gone | None] = asyncio.get_running_loop().create_future()
        self._by_gateway.setdefault(gateway_id, {})[command_id] = future
        return future

    def forget(self, gateway_id: str, command_id: str) -> None:
        """The request ended (answered, timed out or given up): stop tracking it."""
        waiters = self._by_gateway.get(gateway_id)
        if waiters is None:
            return
        future = waiters.pop(command_id, None)
        if future is not None and not future.done():
            future.cancel()
        if not waiters:
            del self._by_gateway[gateway_id]

    def gateways(self) -> list[str]:
        """The gateways at least one request in flight went through."""
        return list(self._by_gateway)

    def gone(self, gateway_id: str, reason: str) -> int:
        """Wake every caller waiting on a request sent through `gateway_id`; return how many."""
        waiters = self._by_gateway.pop(gateway_id, {})
        woken = 0
        for future in waiters.values():
            if not future.done():
                future.set_result(Gone(gateway_id, reason))
                woken += 1
        return woken

    def __len__(self) -> int:
        return sum(len(waiters) for waiters in self._by_gateway.values())
