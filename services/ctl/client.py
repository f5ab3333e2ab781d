"""The REST client of the operator CLI: every HTTP call `warlock hosts|exec|jobs|job|cancel|keys` makes.

One module so the field names and paths of the API's contract can be adjusted in one place. It knows
nothing of terminals: `services.ctl.ops` renders what it returns.

Where the API is (`resolve_config`): ``WARLOCK_API_URL`` with ``WARLOCK_API_KEY`` or
``WARLOCK_API_KEY_FILE``; else the ``api_url`` and ``api_key_file`` that a `warlock run` wrote to
``$WARLOCK_DEV_DIR/dev.json`` (default ``.warlock/dev.json``). dev.json's key is only ever sent to
dev.json's URL: with ``WARLOCK_API_URL`` set, the key must come from the environment too.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
STREAM_READ_TIMEOUT_S = 300.0  # an SSE stream may be silent while a command thinks (the API sends pings)

JOB_ACTIVE_STATES = frozenset({"pending", "queued", "running"})  # a job: more outcomes to come
HOST_ACTIVE_STATUSES = frozenset({"pending", "queued", "running"})  # a run: not final yet
STREAMABLE_STATUSES = frozenset({"pending", "running"})  # a run sent (or being sent): output may come
OUTCOMES_PAGE = 10_000  # outcomes per GET /api/jobs/{id}
RATE_LIMIT_RETRIES = 5  # a GET answered 429 is tried again after Retry-After (capped), this many times
RATE_LIMIT_WAIT_CAP_S = 10.0
FINAL_EVENTS = frozenset({"end", "result", "outcome", "final", "done"})  # SSE event names of the last event


class ConfigError(Exception):
    """No usable API URL or key (exit status 2); the message says what to set."""


class ApiUnreachable(Exception):
    """The API did not answer (connection refused, timeout, TLS failure) or answered 5xx (exit status 3)."""


class ApiError(Exception):
    """The API refused the request (4xx): `status` and the body's ``detail``."""

    def __init__(self, status: int, detail: str, body: Any = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.body = body


@dataclass(frozen=True)
class ApiConfig:
    """Where the API is and the key to present. `source` says where they came from (for messages)."""

    url: str
    key: str
    source: str

    def __repr__(self) -> str:  # never print the key
        return f"ApiConfig(url={self.url!r}, key=<hidden>, source={self.source!r})"


def dev_json_path(env: Mapping[str, str]) -> Path:
    """``$WARLOCK_DEV_DIR/dev.json`` (default ``.warlock/dev.json``), as `warlock run` writes it."""
    return Path(env.get("WARLOCK_DEV_DIR") or ".warlock") / "dev.json"


def _read_key_file(path: Path, what: str) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path} ({what}): {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"the API key file {path} ({what}) is empty")
    return key


def resolve_config(env: Mapping[str, str] | None = None) -> ApiConfig:
    """The API URL and key from the environment, else from dev.json; ConfigError if neither has them."""
    env = os.environ if env is None else env
    url = env.get("WARLOCK_API_URL", "").strip()
    if url:
        if env.get("WARLOCK_API_KEY"):
            key = env["WARLOCK_API_KEY"].strip()
        elif env.get("WARLOCK_API_KEY_FILE"):
            key = _read_key_file(Path(env["WARLOCK_API_KEY_FILE"]), "WARLOCK_API_KEY_FILE")
        else:
            raise ConfigError(
                "WARLOCK_API_URL is set but no key: set WARLOCK_API_KEY_FILE (a file holding the API key) "
                "or WARLOCK_API_KEY"
            )
        return ApiConfig(_checked_url(url, "WARLOCK_API_URL"), key, "environment")
    path = dev_json_path(env)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            "no API configured: set WARLOCK_API_URL and WARLOCK_API_KEY_FILE (or WARLOCK_API_KEY), "
            f"or start one here with `warlock run` (it writes {path})"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict) or not info.get("api_url") or not info.get("api_key_file"):
        raise ConfigError(f"{path} has no api_url and api_key_file; set WARLOCK_API_URL instead")
    key = _read_key_file(Path(str(info["api_key_file"])), f"api_key_file of {path}")
    return ApiConfig(_checked_url(str(info["api_url"]), str(path)), key, str(path))


def _checked_url(url: str, what: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{what}: {url[:200]!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def _detail(response: httpx.Response) -> tuple[str, Any]:
    """The ``detail`` of an error body (FastAPI's shape; a 422's list of problems joined), else the text."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:300] or response.reason_phrase), None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": ...}, ...]
        parts = []
        for item in detail[:5]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
        return "; ".join(parts) or "invalid request", body
    if detail is None:
        return response.reason_phrase or f"HTTP {response.status_code}", body
    return str(detail), body


@dataclass(frozen=True)
class StreamEvent:
    """One SSE event of a command's output stream: a chunk (`stream` and `data` set) or the final outcome
    (`final`, with the outcome in `outcome`). `id` is the event's sequence number (``Last-Event-ID``)."""

    id: str | None
    stream: str | None = None
    data: str = ""
    final: bool = False
    outcome: dict[str, Any] | None = None


def parse_event(event_id: str | None, name: str | None, raw: str) -> StreamEvent | None:
    """One SSE event as a StreamEvent: JSON ``{stream, data}`` is a chunk; an event named end/result/...
    or JSON without ``stream`` (the outcome: status, exit_code, ...) is final. None: nothing to show
    (a ping, a comment, an event we do not know)."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if name in FINAL_EVENTS:
        return StreamEvent(event_id, final=True, outcome=data if isinstance(data, dict) else None)
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("stream"), str) and isinstance(data.get("data"), str):
        return StreamEvent(event_id, stream=data["stream"], data=data["data"])
    if "status" in data:
        return StreamEvent(event_id, final=True, outcome=data)
    return None


class StreamUnavailable(Exception):
    """The API has no output stream for this command (older API, or the stream is gone): fetch the result."""


class Api:
    """The API's REST endpoints. Raises ApiUnreachable (no answer, 5xx) or ApiError (4xx)."""

    def __init__(self, config: ApiConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.url,
            headers={"Authorization": f"Bearer {config.key}", "Accept": "application/json"},
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            transport=transport,
            follow_redirects=False,
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._client.aclose()

    async def _call(
        self, method: str, path: str, *, params: Any = None, json_body: Any = None, ok: tuple[int, ...] = ()
    ) -> Any:
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                response = await self._client.request(method, path, params=params, json=json_body)
            except httpx.HTTPError as exc:
                raise ApiUnreachable(f"cannot reach the API at {self.config.url}: {_why(exc)}") from None
            # a GET refused by the key's rate limit did nothing: ask again when told. Anything else is
            # not sent twice (a 429 POST did nothing either, but whether to send it again is the operator's)
            if response.status_code != 429 or method != "GET" or attempt == RATE_LIMIT_RETRIES:
                break
            await asyncio.sleep(retry_after(response))
        return self._answer(response, ok)

    def _answer(self, response: httpx.Response, ok: tuple[int, ...] = ()) -> Any:
        if response.status_code >= 500:
            detail, _ = _detail(response)
            raise ApiUnreachable(f"the API at {self.config.url} answered {response.status_code}: {detail}")
        if response.status_code >= 400 and response.status_code not in ok:
            detail, body = _detail(response)
            raise ApiError(response.status_code, detail, body)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiUnreachable(
                f"the API at {self.config.url} answered {response.request.url.path} with something other "
                "than JSON (is WARLOCK_API_URL the API?)"
            ) from None

    # ------------------------------------------------------------------ hosts
    async def hosts(self, labels: Sequence[tuple[str, str | None]] = ()) -> list[dict[str, Any]]:
        """``GET /api/hosts?label=k=v&label=k2...`` (every selector must match; ``k``: has the label)."""
        params = [("label", k if v is None else f"{k}={v}") for k, v in labels]
        found = await self._call("GET", "/api/hosts", params=params)
        return list(found or [])

    async def agents(self) -> list[dict[str, Any]]:
        """``GET /api/agents``: the agent connection of every host that has (had) one."""
        return list(await self._call("GET", "/api/agents") or [])

    # ------------------------------------------------------------------ jobs and commands
    async def create_job(
        self,
        command: str,
        targets: dict[str, Any],
        *,
        command_timeout: float | None = None,
        batch: int | str | None = None,
        stop_on_failure: bool = False,
    ) -> dict[str, Any]:
        """``POST /api/jobs`` → the job (``job_id``, ``state``, ...)."""
        body: dict[str, Any] = {"command": command, "targets": targets}
        if command_timeout is not None:
            body["timeout"] = command_timeout
        if batch is not None:
            body["batch"] = batch
        if stop_on_failure:
            body["stop_on_failure"] = True
        return dict(await self._call("POST", "/api/jobs", json_body=body))

    async def job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}``: state, counts, and one outcome per host (``outcomes``, every page)."""
        path = f"/api/jobs/{_seg(job_id)}"
        doc = dict(await self._call("GET", path, params={"limit": OUTCOMES_PAGE}))
        outcomes, targets = doc.get("outcomes"), doc.get("targets")
        if isinstance(outcomes, list) and isinstance(targets, int):
            while len(outcomes) < targets:
                more = await self._call("GET", path, params={"limit": OUTCOMES_PAGE, "offset": len(outcomes)})
                page = more.get("outcomes") if isinstance(more, dict) else None
                if not page:
                    break
                outcomes.extend(page)
        return doc

    async def jobs(self, limit: int) -> list[dict[str, Any]]:
        """``GET /api/jobs?limit=N``: recent jobs, newest first."""
        return list(await self._call("GET", "/api/jobs", params={"limit": limit}) or [])

    async def cancel_job(self, job_id: str) -> dict[str, Any] | None:
        """``POST /api/jobs/{id}/cancel``."""
        return await self._call("POST", f"/api/jobs/{_seg(job_id)}/cancel")  # type: ignore[no-any-return]

    async def cancel_command(self, command_id: str) -> dict[str, Any] | None:
        """``POST /api/commands/{id}/cancel``."""
        return await self._call("POST", f"/api/commands/{_seg(command_id)}/cancel")  # type: ignore[no-any-return]

    async def command(self, command_id: str) -> dict[str, Any]:
        """``GET /api/commands/{id}``: the run with its stdout and stderr."""
        return dict(await self._call("GET", f"/api/commands/{_seg(command_id)}"))

    async def stream(self, command_id: str, last_event_id: str | None = None) -> AsyncIterator[StreamEvent]:
        """``GET /api/commands/{id}/stream`` (Server-Sent Events), from after `last_event_id`: chunks, then
        the final event. StreamUnavailable if the API has none (404/405); ApiUnreachable if it drops."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        try:
            async with self._client.stream(
                "GET", f"/api/commands/{_seg(command_id)}/stream", headers=headers, timeout=timeout
            ) as response:
                if response.status_code in (404, 405, 501):
                    raise StreamUnavailable(f"{response.status_code}")
                if response.status_code >= 400:
                    await response.aread()
                    self._answer(response)
                event_id: str | None = None
                name: str | None = None
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line == "":  # end of an event
                        if data or name:
                            event = parse_event(event_id, name, "\n".join(data))
                            if event is not None:
                                yield event
                                if event.final:
                                    return
                        name, data = None, []
                        continue
                    if line.startswith(":"):
                        continue  # comment (keep-alive)
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "id":
                        event_id = value
                    elif field == "event":
                        name = value
                    elif field == "data":
                        data.append(value)
        except httpx.HTTPError as exc:
            raise ApiUnreachable(f"the output stream of {command_id} broke: {_why(exc)}") from None

    # ------------------------------------------------------------------ API keys
    async def keys(self) -> list[dict[str, Any]]:
        """``GET /api/keys``: name, role, scope, expires_at (never the key)."""
        return list(await self._call("GET", "/api/keys") or [])

    async def create_key(
        self, name: str, role: str, scope: Mapping[str, str] | None, expires_at: str | None
    ) -> dict[str, Any]:
        """``POST /api/keys`` → the key's record and, this once, ``key``."""
        body: dict[str, Any] = {"name": name, "role": role}
        if scope:
            body["scope"] = dict(scope)
        if expires_at is not None:
            body["expires_at"] = expires_at
        return dict(await self._call("POST", "/api/keys", json_body=body))

    async def revoke_key(self, name: str) -> None:
        """``DELETE /api/keys/{name}``."""
        await self._call("DELETE", f"/api/keys/{_seg(name)}")


def retry_after(response: httpx.Response) -> float:
    """Seconds to wait after a 429: its ``Retry-After`` (seconds), capped; 1 if absent or unreadable."""
    try:
        wait = float(response.headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.0), RATE_LIMIT_WAIT_CAP_S)


def _seg(value: str) -> str:
    """`value` as one path segment: ``/`` and friends cannot steer the request to another endpoint."""
    return quote(value, safe="")


def _why(exc: httpx.HTTPError) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or (str(cause) if cause else "") or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
