"""``GET /api/hosts/{host}/metrics``: a host's metrics history, averaged over buckets of `step` seconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from services.api.http.auth import READ, check_host
from services.api.http.deps import SessionDep, app_state
from services.api.store import crud
from services.api.store import metrics as store

router = APIRouter(prefix="/hosts", tags=["hosts"])

DEFAULT_RANGE_S = 3600.0
DEFAULT_POINTS = 360  # a default step gives about this many buckets (a multiple of 30 s: the agents' pace)
MAX_STEP_S = 30 * 86400


class MetricsPoint(BaseModel):
    """One bucket: averages of the samples in ``[at, at + step)``."""

    at: datetime
    samples: int  # raw samples behind the averages (a 5-minute average counts as the samples it holds)
    cpu: float | None  # percent
    load_1: float | None
    mem: float | None  # percent
    swap: float | None  # percent
    disk: float | None  # percent used of the host's fullest filesystem
    net_rx: float | None  # bytes/s received, from the previous bucket (None: first bucket, or a reboot)
    net_tx: float | None  # bytes/s sent
    rtt_ms: float | None = None  # gateway ⇄ agent round trip (keepalive), milliseconds


class MetricsHistory(BaseModel):
    """A host's history over ``[since, until)``; buckets without samples are left out."""

    host_id: str
    since: datetime
    until: datetime
    step: int
    points: list[MetricsPoint]


def _bad(name: str, message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", name), "msg": message, "input": value}]
    )


def _utc(value: datetime) -> datetime:
    """An ISO time without a zone is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _rate(now: float | None, before: float | None, seconds: float) -> float | None:
    if now is None or before is None or seconds <= 0 or now < before:  # a counter that went back: a reboot
        return None
    return (now - before) / seconds


@router.get(
    "/{host}/metrics",
    response_model=MetricsHistory,
    responses={
        403: {"description": "the host is outside the key's scope"},
        404: {"description": "unknown host"},
        422: {"description": "bad time, until not after since, bad step, or too many points"},
    },
    dependencies=[READ],
)
async def host_metrics(
    host: str,
    session: SessionDep,
    request: Request,
    since: Annotated[datetime | None, Query(description="ISO 8601 start (default: until - 1 hour)")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 end, excluded (default: now)")] = None,
    step: Annotated[
        int | None,
        Query(
            ge=1, le=MAX_STEP_S, description="bucket seconds (default: about 360 points, a multiple of 30)"
        ),
    ] = None,
) -> MetricsHistory:
    """The host's CPU, load, memory, swap, disk and network averaged over buckets of `step` seconds,
    from the raw samples (last 24 h by default) and the 5-minute averages kept after them (30 days)."""
    end = _utc(until) if until is not None else datetime.now(UTC)
    start = (
        _utc(since) if since is not None else datetime.fromtimestamp(end.timestamp() - DEFAULT_RANGE_S, UTC)
    )
    span = end.timestamp() - start.timestamp()
    if span <= 0:
        raise _bad("until", "until must be after since", until.isoformat() if until else None)
    if step is None:
        step = max(30, math.ceil(span / DEFAULT_POINTS / 30) * 30)
    max_points = app_state(request).settings.metrics_max_points
    if math.ceil(span / step) > max_points:
        need = math.ceil(span / max_points)
        raise _bad(
            "step", f"{math.ceil(span / step)} points is more than {max_points}: use step >= {need}", step
        )
    found = await crud.get_host(session, host)
    check_host(request, found.id, found.labels)
    # buckets are aligned to the epoch: start at the bucket holding `since`
    first = math.floor(start.timestamp() / step) * step
    points = await store.history(session, found.id, first, end.timestamp(), step)
    out: list[MetricsPoint] = []
    previous: store.Point | None = None
    for point in points:
        gap = point.at - previous.at if previous is not None else 0.0
        before = previous.values if previous is not None else {}
        out.append(
            MetricsPoint(
                at=datetime.fromtimestamp(point.at, UTC),
                samples=point.samples,
                cpu=point.values["cpu"],
                load_1=point.values["load_1"],
                mem=point.values["mem"],
                swap=point.values["swap"],
                disk=point.values["disk"],
                net_rx=_rate(point.values["net_rx"], before.get("net_rx"), gap),
                net_tx=_rate(point.values["net_tx"], before.get("net_tx"), gap),
                rtt_ms=point.values["rtt_ms"],
            )
        )
        previous = point
    return MetricsHistory(host_id=found.id, since=start, until=end, step=step, points=out)
