"""The operator's everyday commands over the API's REST interface (typer + rich):

warlock hosts [--label k=v]...                     the hosts (a table on a terminal; --json)
warlock exec 'CMD' (HOST... | --label k=v | --all) [--batch N|P%] [--timeout S] [--stop-on-failure]
                                                   run CMD as one job; output and outcomes as they come
warlock jobs [--limit N]                           recent jobs
warlock job ID                                     a job: state, counts, one outcome per host
warlock cancel ID [--job]                          cancel a command, or a job (an id job-..., or --job)
warlock keys list|create|revoke                    API keys: role read|operate|admin, label scope, expiry

The API's URL and key: WARLOCK_API_URL with WARLOCK_API_KEY_FILE (or WARLOCK_API_KEY), else the
.warlock/dev.json of a `warlock run` (see `services.ctl.client`).

Exit status: 0 done (for exec: every host succeeded); 1 a host failed, timed out, was unreachable or
cancelled, or the API refused the request (unknown id, forbidden, bad input); 2 usage or configuration
error (no API configured, the key refused); 3 the API could not be reached or failed (5xx); 130
interrupted (a job keeps running: `warlock cancel --job ID` stops it).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from services.ctl import client, render
from services.ctl.client import Api, ApiError, ApiUnreachable, ConfigError, StreamUnavailable

OK, FAILED, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130
JOB_ID_PREFIX = "job-"  # job ids look like job-<hex>; command ids are 32 hex digits

POLL_S = 0.5  # how often `warlock exec` asks for the job's state
STREAM_LIMIT = 16  # output streams followed at once; other hosts' output is fetched when they finish
FETCH_LIMIT = 16  # results fetched at once
STREAM_RETRIES = 3  # reconnects (with Last-Event-ID) of a broken output stream
FINISH_GRACE_S = 5.0  # after a host's outcome, how long its stream may take to deliver the rest
OUTPUT_HOSTS = 50  # `warlock exec` shows the output of this many hosts (--output-hosts): each costs a request

app = typer.Typer(
    name="warlock",
    help="Warlock fleet control plane: the operator's commands over the API (WARLOCK_API_URL).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help and usage errors as plain click text: they end up in pipes and logs too
    context_settings={"help_option_names": ["-h", "--help"]},
)
keys_app = typer.Typer(
    help="API keys: list, create (role, label scope, expiry), revoke.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

TRANSPORT: httpx.AsyncBaseTransport | None = None  # the unit tests' fake API (httpx.MockTransport)


def _err(message: str) -> None:
    print(f"warlock: {message}", file=sys.stderr, flush=True)


def run(body: Callable[[Api], Awaitable[int]]) -> int:
    """Run `body` with an API client; map what goes wrong to a message on stderr and an exit status."""

    async def go() -> int:
        async with Api(client.resolve_config(), TRANSPORT) as api:
            return await body(api)

    try:
        return asyncio.run(go())
    except ConfigError as exc:
        _err(str(exc))
        return USAGE
    except ApiUnreachable as exc:
        _err(str(exc))
        return UNREACHABLE
    except ApiError as exc:
        if exc.status == 401:
            _err(f"the API refused the key ({exc.detail}): check WARLOCK_API_KEY_FILE / WARLOCK_API_KEY")
            return USAGE
        _err(f"{exc.detail} (HTTP {exc.status})")
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED


def _finish(code: int) -> None:
    raise typer.Exit(code)


def parse_labels(values: list[str] | None, option: str = "--label") -> dict[str, str]:
    """``k=v`` strings as a dict; a typer.BadParameter (exit 2) for anything else."""
    labels: dict[str, str] = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=option)
        labels[key] = val
    return labels


def parse_selectors(values: list[str] | None) -> list[tuple[str, str | None]]:
    """`warlock hosts --label`: ``k=v`` (the label equals v) or ``k`` (the host has label k)."""
    selectors: list[tuple[str, str | None]] = []
    for value in values or []:
        key, sep, val = value.partition("=")
        if not key:
            raise typer.BadParameter(f"{value!r} is not KEY=VALUE or KEY", param_hint="--label")
        selectors.append((key, val if sep else None))
    return selectors


def _console() -> Console | None:
    """A rich console when stdout is a terminal, else None (plain output)."""
    return Console() if sys.stdout.isatty() else None


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- hosts

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label", "-l", metavar="KEY=VALUE", help="only hosts with this label (repeat: all must match)"
    ),
]
SelectorOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        "-l",
        metavar="KEY[=VALUE]",
        help="only hosts with this label value (KEY=VALUE) or label (KEY); repeat: all must match",
    ),
]


@app.command("hosts")
def hosts_cmd(label: SelectorOpt = None, as_json: JsonOpt = False) -> None:
    """The hosts: id, address, labels and agent state (filtered by label)."""
    labels = parse_selectors(label)

    async def body(api: Api) -> int:
        found = [h for h in await api.hosts(labels) if _matches(h, labels)]
        agents = {a.get("host_id"): a for a in await api.agents()}
        if as_json:
            _dump(found)
            return OK
        rows = []
        for host in sorted(found, key=lambda h: str(h.get("id"))):
            agent = agents.get(host.get("id"))
            state = str(agent.get("status")) if agent else "-"
            rows.append(
                [str(host.get("id")), str(host.get("address")), render.labels_text(host.get("labels")), state]
            )
        render.print_table(_console(), None, ["host", "address", "labels", "agent"], rows)
        return OK

    _finish(run(body))


def _matches(host: Mapping[str, Any], labels: list[tuple[str, str | None]]) -> bool:
    """Whether `host` has every label (the API filters already; an API that ignored ?label= would list
    every host, and running a command on them by mistake is what this prevents from spreading)."""
    have = host.get("labels") or {}
    return all(k in have if v is None else have.get(k) == v for k, v in labels)


# ----------------------------------------------------------------------------- exec


@dataclass
class HostState:
    """What `warlock exec` knows of one host of the job."""

    host: str
    command_id: str | None = None
    status: str = "pending"
    entry: dict[str, Any] = field(default_factory=dict)
    stream_task: asyncio.Task[bool] | None = None
    finish_task: asyncio.Task[None] | None = None
    shown: dict[str, int] = field(default_factory=dict)  # characters of each stream already shown
    reported: bool = False


class Follower:
    """Follows a job to its end: polls ``GET /api/jobs/{id}``, follows the output stream of up to
    `stream_limit` running hosts (SSE, resumed with Last-Event-ID when it breaks), fetches the output of
    the others when they finish, and reports each host's outcome once."""

    def __init__(
        self,
        api: Api,
        sink: render.Sink,
        *,
        output_hosts: int | None = None,
        poll_s: float | None = None,
        stream_limit: int = STREAM_LIMIT,
    ) -> None:
        self.api = api
        self.sink = sink
        self.output_hosts = OUTPUT_HOSTS if output_hosts is None else output_hosts
        self.with_output: set[str] = set()  # hosts whose output is shown (streamed or fetched)
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.stream_limit = stream_limit
        self.streams_supported = True
        self.hosts: dict[str, HostState] = {}
        self.fetch_slots = asyncio.Semaphore(FETCH_LIMIT)

    def _output_for(self, host: str) -> bool:
        """Whether `host`'s output is shown: the first `output_hosts` hosts asked about get it."""
        if host in self.with_output:
            return True
        if len(self.with_output) < self.output_hosts:
            self.with_output.add(host)
            return True
        return False

    def _streaming(self) -> int:
        return sum(1 for s in self.hosts.values() if s.stream_task is not None and not s.stream_task.done())

    async def follow(self, job_id: str) -> dict[str, Any]:
        """Until the job is no longer pending or running and every outcome is reported; the final job."""
        try:
            polls = 0
            while True:
                job = await self.api.job(job_id)
                for entry in render.outcomes_of(job):
                    self._see(entry)
                self.sink.progress(job)
                if job_done(job):
                    break
                # soon at first (a quick command is done in 0.1 s), then every poll_s; a big job's outcomes
                # are a big answer: ask less often (10,000 hosts: every 5 s)
                polls += 1
                wait = max(self.poll_s, min(5.0, render.targets_of(job) / 2000))
                await asyncio.sleep(min(wait, 0.05 * 2**polls))
            finishing = [s.finish_task for s in self.hosts.values() if s.finish_task is not None]
            await asyncio.gather(*finishing)
            for state in self.hosts.values():  # still pending in a finished job: say so, once
                if not state.reported:
                    state.reported = True
                    self.sink.host_done(state.entry)
            hidden = len(self.hosts) - len(self.with_output)
            if self.output_hosts and hidden > 0:
                self.sink.note(
                    f"output of {hidden} hosts not shown (--output-hosts N shows more; each host's output: "
                    f"warlock job {job_id} --json gives the command ids, GET /api/commands/ID the output)"
                )
            return job
        finally:
            for state in self.hosts.values():
                for task in (state.stream_task, state.finish_task):
                    if task is not None and not task.done():
                        task.cancel()

    def _see(self, entry: Mapping[str, Any]) -> None:
        host = render.host_id(entry)
        state = self.hosts.setdefault(host, HostState(host))
        state.entry = dict(entry)
        state.status = str(entry.get("status") or "pending")
        state.command_id = entry.get("command_id") or state.command_id
        active = state.status in client.HOST_ACTIVE_STATUSES
        if (
            state.status in client.STREAMABLE_STATUSES
            and self._output_for(state.host)
            and self.streams_supported
            and state.command_id
            and state.stream_task is None
            and self._streaming() < self.stream_limit
        ):
            state.stream_task = asyncio.create_task(self._stream(state))
        if not active and state.finish_task is None:
            state.finish_task = asyncio.create_task(self._finish_host(state))

    async def _stream(self, state: HostState) -> bool:
        """Show `state`'s output as it comes; True when the stream reached its final event."""
        assert state.command_id is not None
        last: str | None = None
        for attempt in range(STREAM_RETRIES + 1):
            try:
                async for event in self.api.stream(state.command_id, last):
                    last = event.id if event.id is not None else last
                    if event.final:
                        return True
                    if event.stream is not None and event.data:
                        self._show(state, event.stream, event.data)
                # closed without the final event (a proxy's timeout?): resume after the last one seen
            except StreamUnavailable:
                self.streams_supported = False  # an API without streams: fetch results instead
                return False
            except ApiError:
                return False
            except ApiUnreachable:
                pass
            if attempt < STREAM_RETRIES:
                await asyncio.sleep(0.2 * (attempt + 1))
        return False

    def _show(self, state: HostState, stream: str, data: str) -> None:
        state.shown[stream] = state.shown.get(stream, 0) + len(data)
        self.sink.output(state.host, state.command_id or "", stream, data)

    async def _finish_host(self, state: HostState) -> None:
        """After a host's outcome: let its stream deliver the rest (or fetch the output), then report it."""
        complete = False
        if state.stream_task is not None:
            try:
                complete = await asyncio.wait_for(asyncio.shield(state.stream_task), FINISH_GRACE_S)
            except TimeoutError:
                state.stream_task.cancel()
        if state.command_id and not complete and self._output_for(state.host):
            async with self.fetch_slots:
                try:
                    run_ = await self.api.command(state.command_id)
                except (ApiError, ApiUnreachable) as exc:
                    self.sink.note(f"{state.host}: cannot fetch the output of {state.command_id}: {exc}")
                    run_ = {}
            for stream in ("stdout", "stderr"):
                text = run_.get(stream)
                if isinstance(text, str) and len(text) > state.shown.get(stream, 0):
                    self._show(state, stream, text[state.shown.get(stream, 0) :])
            if run_.get("truncated"):
                self.sink.note(f"{state.host}: output truncated by the API")
        state.reported = True
        self.sink.host_done(state.entry)


def job_done(job: Mapping[str, Any]) -> bool:
    """No more outcomes to come: the job is not running (finished, or cancelled) and no run of it is in
    flight (a cancelled job's runs already sent finish first)."""
    if str(job.get("state")) in client.JOB_ACTIVE_STATES:
        return False
    counts = job.get("counts")
    if isinstance(counts, dict) and isinstance(counts.get("pending"), int):
        return bool(counts["pending"] == 0)
    return all(o.get("status") not in client.HOST_ACTIVE_STATUSES for o in render.outcomes_of(job))


def exit_status(job: Mapping[str, Any]) -> int:
    """0 when the job has hosts and every one succeeded, else 1."""
    hosts = render.outcomes_of(job)
    return OK if hosts and all(h.get("status") == "succeeded" for h in hosts) else FAILED


def parse_batch(value: str | None) -> int | str | None:
    """``--batch``: a number of hosts (``10``) or a share of them (``10%``)."""
    if value is None:
        return None
    if re.fullmatch(r"[1-9][0-9]{0,6}", value):
        return int(value)
    if re.fullmatch(r"(100|[1-9][0-9]?)%", value):
        return value
    raise typer.BadParameter(
        f"{value!r}: a number of hosts (10) or a percentage (1%..100%)", param_hint="--batch"
    )


@app.command("exec")
def exec_cmd(
    command: Annotated[str, typer.Argument(metavar="CMD", help="the shell command, quoted")],
    hosts: Annotated[
        list[str] | None,
        typer.Argument(metavar="HOST", help="hosts by id or address", show_default=False),
    ] = None,
    label: LabelOpt = None,
    all_hosts: Annotated[bool, typer.Option("--all", help="every host")] = False,
    batch: Annotated[
        str | None, typer.Option(metavar="N|P%", help="hosts at a time (10) or a share (10%)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, metavar="S", help="seconds the command may run on each host")
    ] = None,
    stop_on_failure: Annotated[
        bool, typer.Option("--stop-on-failure", help="start no new batch after a host failed")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="outcomes and summary only, no output")
    ] = False,
    output_hosts: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="show the output of at most this many hosts (each costs a request)"
        ),
    ] = OUTPUT_HOSTS,
    detach: Annotated[
        bool, typer.Option("--detach", help="print the job id and return; follow with `warlock job ID`")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run CMD on hosts as one job; show each host's output and outcome as they come, then a summary.
    Exit status 0 only when every host succeeded."""
    labels = parse_labels(label)
    chosen = [bool(hosts), bool(labels), all_hosts]
    if sum(chosen) != 1:
        raise typer.BadParameter("give hosts, or --label KEY=VALUE, or --all (exactly one of them)")
    targets: dict[str, Any] = {"hosts": hosts} if hosts else {"labels": labels} if labels else {"all": True}
    size = parse_batch(batch)

    async def body(api: Api) -> int:
        job = await api.create_job(
            command, targets, command_timeout=timeout, batch=size, stop_on_failure=stop_on_failure
        )
        job_id = str(job.get("job_id"))
        if detach:
            if as_json:
                _dump(job)
            else:
                print(job_id)
            return OK
        console = None if as_json else _console()
        sink: render.Sink = (
            render.JsonSink() if as_json else render.TerminalSink(console) if console else render.PlainSink()
        )
        sink.start(job)
        try:
            final = await Follower(api, sink, output_hosts=0 if quiet else output_hosts).follow(job_id)
        except (KeyboardInterrupt, asyncio.CancelledError):
            sink.stop()
            sink.note(
                f"stopped following; job {job_id} goes on (warlock job {job_id}; "
                f"warlock cancel --job {job_id})"
            )
            raise
        except ApiUnreachable as exc:
            sink.stop()
            sink.note(f"{exc}; job {job_id} goes on without us: warlock job {job_id}")
            return UNREACHABLE
        finally:
            sink.stop()
        code = exit_status(final)
        sink.finish(final, code)
        return code

    _finish(run(body))


# ----------------------------------------------------------------------------- jobs


@app.command("jobs")
def jobs_cmd(
    limit: Annotated[
        int, typer.Option(min=1, max=1000, metavar="N", help="at most this many, newest first")
    ] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs: id, state, counts, command."""

    async def body(api: Api) -> int:
        found = await api.jobs(limit)
        if as_json:
            _dump(found)
            return OK
        rows = [
            [
                str(j.get("job_id")),
                str(j.get("state")),
                str(j.get("created_at") or "-"),
                render.counts_text(render.counts_of(j)),
                str(j.get("command") or ""),
            ]
            for j in found
        ]
        render.print_table(_console(), None, ["job", "state", "created", "hosts", "command"], rows)
        return OK

    _finish(run(body))


@app.command("job")
def job_cmd(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
    """One job: state, counts and every host's outcome."""

    async def body(api: Api) -> int:
        job = await api.job(job_id)
        if as_json:
            _dump(job)
            return OK
        console = _console()
        head = f"job {job.get('job_id')} {job.get('state')}: {render.counts_text(render.counts_of(job))}"
        if job.get("command") is not None:
            head += f"\ncommand: {job['command']}"
        if console is None:
            print(head)
        else:
            console.print(head, highlight=False, markup=False)
        rows = [
            [
                render.host_id(h),
                str(h.get("status") or "pending"),
                str(h.get("command_id") or "-"),
                render.why(h) if h.get("status") not in ("pending", "running") else "-",
            ]
            for h in sorted(render.outcomes_of(job), key=render.host_id)
        ]
        render.print_table(console, None, ["host", "status", "command", "detail"], rows)
        return OK

    _finish(run(body))


@app.command("cancel")
def cancel_cmd(
    target: Annotated[
        str, typer.Argument(metavar="ID", help="a command id, or a job id (job-...; or with --job)")
    ],
    job: Annotated[
        bool, typer.Option("--job", help="ID is a job: cancel its commands and start no more")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a running command (its process is killed; a finished one keeps its result) or a job."""

    async def body(api: Api) -> int:
        is_job = job or target.startswith(JOB_ID_PREFIX)
        answer = await (api.cancel_job(target) if is_job else api.cancel_command(target))
        if as_json:
            _dump(answer)
            return OK
        state = (answer or {}).get("state") or (answer or {}).get("status") or "cancel requested"
        print(f"{'job' if is_job else 'command'} {target}: {state}")
        return OK

    _finish(run(body))


# ----------------------------------------------------------------------------- API keys

ROLES = ("read", "operate", "admin")


def parse_expiry(value: str | None, now: datetime | None = None) -> str | None:
    """``--expires``: ``30d``, ``12h``, ``90m`` from now, or an ISO 8601 date or time (UTC unless it
    says) → ISO 8601 UTC."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"([1-9][0-9]{0,5})([mhdw])", value)
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
        return (now + timedelta(**{unit: int(match.group(1))})).isoformat(timespec="seconds")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r}: 30d, 12h, 90m, 2w, or an ISO 8601 date/time", param_hint="--expires"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when <= now:
        raise typer.BadParameter(f"{value!r} is in the past", param_hint="--expires")
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _scope_text(scope: Any) -> str:
    if isinstance(scope, dict):
        inner = scope.get("labels") if isinstance(scope.get("labels"), dict) else scope
        return render.labels_text(inner) if inner else "-"
    return str(scope) if scope else "-"


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """Every API key: name, role, scope, expiry (never the key itself)."""

    async def body(api: Api) -> int:
        found = await api.keys()
        if as_json:
            _dump(found)
            return OK
        rows = [
            [
                str(k.get("name")),
                str(k.get("role") or "-"),
                _scope_text(k.get("scope")),
                str(k.get("expires_at") or "never"),
                str(k.get("state") or "-"),
            ]
            for k in found
        ]
        render.print_table(_console(), None, ["name", "role", "scope", "expires", "state"], rows)
        return OK

    _finish(run(body))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="a unique name; recorded as requested_by")],
    role: Annotated[
        str, typer.Option(metavar="ROLE", help="read | operate (run commands) | admin (hosts, agents, keys)")
    ] = "read",
    scope: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="only hosts with this label (repeat: all must match)"),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(metavar="30d|12h|DATE", help="expiry (default: never)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key; the key is printed once, alone on stdout (details on stderr)."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r}: one of {', '.join(ROLES)}", param_hint="--role")
    labels = parse_labels(scope, "--scope")
    expires_at = parse_expiry(expires)

    async def body(api: Api) -> int:
        made = await api.create_key(name, role, labels, expires_at)
        if as_json:
            _dump(made)
            return OK
        key = made.get("key")
        if not key:
            _err("the API answered without the key")
            return FAILED
        print(key, flush=True)
        _err(
            f"API key {made.get('name', name)} created: role {made.get('role', role)}, scope "
            f"{_scope_text(made.get('scope'))}, expires {made.get('expires_at') or 'never'}; "
            "shown once, keep it"
        )
        return OK

    _finish(run(body))


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Revoke an API key: requests with it are refused (401) from now on."""

    async def body(api: Api) -> int:
        await api.revoke_key(name)
        print(f"API key {name} revoked")
        return OK

    _finish(run(body))


def main(argv: list[str]) -> int:
    """Run one of the commands above (`argv` without the program name); its exit status."""
    try:
        app(args=argv, prog_name="warlock", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (OK if exc.code is None else USAGE)
    return OK
